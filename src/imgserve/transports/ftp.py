"""ftp:// and ftps://: RETR downloads, STOR-to-temp-then-rename uploads.

Runs the standard library's ftplib on the transport's own thread pool
(threads.py, ``ftp_threads`` threads), one connection per operation.

* ``ftps://`` is explicit FTPS: connect to port 21 (default), ``AUTH TLS``,
  then ``PBSZ 0`` / ``PROT P`` so the data channel is encrypted too. The
  server certificate is verified against the URL's host name with the system
  CAs plus ``settings.ca_file``. Data connections reuse the control
  connection's TLS session, as servers like vsftpd require. Implicit FTPS
  (TLS from the first byte, port 990) is not supported.
* Credentials come from the URL (``ftp://user:pass@host/path``, percent-encoded);
  without them the login is ``anonymous``. They are never logged nor put into
  error details (an error reply that echoes the password is scrubbed).
* Paths are relative to the login directory (RFC 1738); a leading ``%2F``
  (``ftp://host/%2Fsrv/x.png``) makes them absolute.
* Outbound policy: the host is resolved once and the control connection goes
  to the first allowed address. Data connections are always passive and go to
  the control connection's peer address, whatever address the server's PASV
  reply announces; that peer is checked against the policy again.
* Deadlines: the deadline starts when a pool thread picks the operation up;
  every socket operation gets the time left until it as its timeout, and
  reads/writes check the clock between chunks, so a server trickling one byte
  at a time still hits the deadline. A thread still blocked past the deadline
  (or whose caller was cancelled) has its sockets shut down.
* Errors: replies and exceptions become outcomes (outcomes.py): 4xx replies
  and connection failures are transient, 530 is refused credentials, 550 not
  found (or not permitted), other 5xx replies permanent refusals; the same in
  both directions.
"""

from __future__ import annotations

import contextlib
import ftplib
import ipaddress
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from imgserve.config import NetPolicy, TransportSettings
from imgserve.errors import AddressRefused, URLInvalid
from imgserve.transports import outcomes, policy
from imgserve.transports.base import Charge, Chunks, HopCheck, Target, Transport
from imgserve.transports.threads import BlockingExecutor
from imgserve.urls import redact_url

_CHUNK_BYTES = 64 * 1024
_GRACE_S = 2.0
"""How long past the deadline the event loop waits for the worker thread."""

_ANONYMOUS_PASSWORD = "anonymous@"  # noqa: S105 - the customary anonymous login

T = TypeVar("T")


@dataclass(frozen=True)
class _FTPURL:
    tls: bool
    host: str
    port: int
    user: str
    password: str
    absolute: bool
    dirs: tuple[str, ...]
    name: str

    @property
    def path(self) -> str:
        joined = "/".join((*self.dirs, self.name))
        return "/" + joined if self.absolute else joined


def _parse(url: str) -> _FTPURL:
    try:
        parts = urlsplit(url)
        port = parts.port or 21
    except ValueError as exc:
        raise URLInvalid(f"malformed URL {redact_url(url)}") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("ftp", "ftps") or not parts.hostname:
        raise URLInvalid(f"not an ftp(s) URL with a host: {redact_url(url)}")
    if parts.username is not None:
        user, password = unquote(parts.username), unquote(parts.password or "")
    else:
        user, password = "anonymous", _ANONYMOUS_PASSWORD
    path = parts.path.split(";type=", 1)[0]  # RFC 1738 typecode: always binary here
    segments = [unquote(s) for s in path.split("/")[1:]]
    absolute = bool(segments) and segments[0].startswith("/")
    if absolute:
        segments[0] = segments[0].lstrip("/")
        if not segments[0]:
            segments = segments[1:]
    for text in (user, password, *segments):
        if "\r" in text or "\n" in text or "\x00" in text:
            # A CR/LF would smuggle extra FTP commands onto the control connection.
            raise URLInvalid(f"control characters in {redact_url(url)}")
    if not segments or not segments[-1] or any(s in ("", ".", "..") for s in segments):
        raise URLInvalid(f"ftp URL without a clean file path: {redact_url(url)}")
    return _FTPURL(
        tls=scheme == "ftps",
        host=parts.hostname,
        port=port,
        user=user,
        password=password,
        absolute=absolute,
        dirs=tuple(segments[:-1]),
        name=segments[-1],
    )


def _resolve(host: str, port: int, net_policy: NetPolicy) -> str:
    """The first address of ``host`` the policy allows (AddressRefused if none)."""
    literal = policy.check_host_literal(host, net_policy)
    if literal is not None:
        return str(literal)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except UnicodeError as exc:  # IDNA cannot encode it: no lookup can ever find it
        raise policy.invalid_host_name(host, exc) from exc
    refusal: AddressRefused | None = None
    for info in infos:
        address = str(info[4][0])
        try:
            policy.check_address(host, ipaddress.ip_address(address.split("%", 1)[0]), net_policy)
        except AddressRefused as exc:
            refusal = refusal or exc
        else:
            return address
    raise refusal or AddressRefused(f"host {host} resolved to no address")


def _data_address(
    client: ftplib.FTP, port: int, check_peer: Callable[[str], None]
) -> tuple[str, int]:
    # Never trust the address a PASV reply announces: use the control peer.
    peer = str(_sock(client).getpeername()[0])
    check_peer(peer)
    return peer, port


class _FTP(ftplib.FTP):
    def __init__(self, check_peer: Callable[[str], None], timeout: float) -> None:
        super().__init__(timeout=timeout)
        self.trust_server_pasv_ipv4_address = False
        self._check_peer = check_peer

    def makepasv(self) -> tuple[str, int]:
        _announced, port = super().makepasv()
        return _data_address(self, port, self._check_peer)


class _FTPTLS(ftplib.FTP_TLS):
    def __init__(
        self, check_peer: Callable[[str], None], context: ssl.SSLContext, timeout: float
    ) -> None:
        super().__init__(context=context, timeout=timeout)
        self.trust_server_pasv_ipv4_address = False
        self._check_peer = check_peer

    def makepasv(self) -> tuple[str, int]:
        _announced, port = super().makepasv()
        return _data_address(self, port, self._check_peer)

    def ntransfercmd(
        self, cmd: str, rest: int | str | None = None
    ) -> tuple[socket.socket, int | None]:
        # PROT P is always on; reuse the control session for the data channel.
        conn, size = ftplib.FTP.ntransfercmd(self, cmd, rest)  # noqa: S321 - FTP is the job
        session = getattr(self.sock, "session", None)
        wrapped = self.context.wrap_socket(conn, server_hostname=self.host, session=session)
        return wrapped, size


def _sock(client: ftplib.FTP) -> socket.socket:
    if client.sock is None:
        raise ConnectionError("FTP control connection closed")
    return client.sock


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise outcomes.Timeout("deadline passed")
    return left


def _tick(sock: socket.socket, deadline: float) -> None:
    sock.settimeout(_left(deadline))


class FTPTransport(Transport):
    """FTP and explicit FTPS via ftplib on the transport's own threads."""

    schemes = ("ftp", "ftps")

    def __init__(self, settings: TransportSettings) -> None:
        super().__init__(settings)
        self._tls = ssl.create_default_context()
        if settings.ca_file is not None:
            self._tls.load_verify_locations(cafile=str(settings.ca_file))
        self._threads = BlockingExecutor("ftp", settings.ftp_threads)

    async def aclose(self) -> None:
        self._threads.close()

    def _connect(self, url: _FTPURL, deadline: float, sockets: list[socket.socket]) -> ftplib.FTP:
        address = _resolve(url.host, url.port, self.settings.policy)

        def check_peer(peer: str) -> None:
            policy.check_address(url.host, ipaddress.ip_address(peer), self.settings.policy)

        client: ftplib.FTP
        if url.tls:
            client = _FTPTLS(check_peer, self._tls, timeout=_left(deadline))
        else:
            client = _FTP(check_peer, timeout=_left(deadline))
        client.connect(address, url.port, timeout=_left(deadline))
        sockets.append(_sock(client))
        # Certificates name the host of the URL, not the address we dialled.
        client.host = url.host
        if isinstance(client, ftplib.FTP_TLS):
            client.auth()
            sockets.append(_sock(client))
        client.login(url.user, url.password)
        if isinstance(client, ftplib.FTP_TLS):
            client.prot_p()
        client.voidcmd("TYPE I")
        return client

    async def _run(self, timeout_s: float, func: Callable[..., T], *args: Any) -> T:
        """Run ``func(*args, deadline, sockets)`` on a pool thread within ``timeout_s``.

        The deadline starts when the thread does; the thread stops by itself
        at the deadline, and if it is still blocked ``_GRACE_S`` later (or the
        caller gives up) its sockets are shut down to unblock it.
        """
        sockets: list[socket.socket] = []

        def shut_down() -> None:
            for sock in sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        return await self._threads.run(
            timeout_s,
            lambda deadline: func(*args, deadline, sockets),
            grace_s=_GRACE_S,
            abandon=shut_down,
        )

    @staticmethod
    def _close(client: ftplib.FTP | None, polite: bool) -> None:
        if client is None:
            return
        if polite:
            with contextlib.suppress(*ftplib.all_errors):
                client.quit()
        client.close()

    # --- download -----------------------------------------------------------------

    async def download(
        self, url: str, charge: Charge | None = None, hop_check: HopCheck | None = None
    ) -> bytes:
        parsed = _parse(url)
        with outcomes.translated(outcomes.DOWNLOAD, url):
            try:
                return await self._run(
                    self.settings.download_timeout_s, self._download, parsed, url, charge
                )
            except TimeoutError as exc:
                raise outcomes.Timeout("not downloaded in time") from exc

    def _download(
        self,
        url: _FTPURL,
        raw_url: str,
        charge: Charge | None,
        deadline: float,
        sockets: list[socket.socket],
    ) -> bytes:
        client = None
        done = False
        with outcomes.translated(outcomes.DOWNLOAD, raw_url, lambda text: _scrub(text, url)):
            try:
                client = self._connect(url, deadline, sockets)
                limit = self.settings.max_download_bytes
                # SIZE is optional in FTP: without an answer the byte count decides.
                with contextlib.suppress(ftplib.error_perm, ftplib.error_temp, ftplib.error_reply):
                    size = client.size(url.path)
                    if size is not None and size > limit:
                        raise outcomes.TooLarge(f"{size} bytes > {limit}")
                _tick(_sock(client), deadline)
                conn = client.transfercmd("RETR " + url.path)
                sockets.append(conn)
                body = Chunks(limit, charge)
                with conn:
                    while True:
                        _tick(conn, deadline)
                        chunk = conn.recv(_CHUNK_BYTES)
                        if not chunk:
                            break
                        body.add(chunk)
                    if isinstance(conn, ssl.SSLSocket):
                        conn.unwrap()
                _tick(_sock(client), deadline)
                client.voidresp()
                done = True
                return body.join()
            finally:
                self._close(client, polite=done)

    # --- upload -------------------------------------------------------------------

    async def upload_once(self, target: Target, data: bytes, content_type: str) -> None:
        parsed = _parse(target.url)
        with outcomes.translated(outcomes.UPLOAD, target.url):
            try:
                await self._run(
                    self.settings.upload_timeout_s, self._upload, parsed, target.url, data
                )
            except TimeoutError as exc:
                raise outcomes.Timeout("not uploaded in time") from exc

    def _upload(
        self,
        url: _FTPURL,
        raw_url: str,
        data: bytes,
        deadline: float,
        sockets: list[socket.socket],
    ) -> None:
        client = None
        temp: str | None = None
        done = False
        with outcomes.translated(outcomes.UPLOAD, raw_url, lambda text: _scrub(text, url)):
            try:
                client = self._connect(url, deadline, sockets)
                self._enter_dirs(client, url, deadline)
                # A dot-name in the same directory: readers never see a partial
                # file under the final name, and the rename stays on one file system.
                temp = f".{url.name}.{uuid.uuid4().hex[:12]}.part"
                _tick(_sock(client), deadline)
                conn = client.transfercmd("STOR " + temp)
                sockets.append(conn)
                with conn:
                    view = memoryview(data)
                    for offset in range(0, len(view), _CHUNK_BYTES):
                        _tick(conn, deadline)
                        conn.sendall(view[offset : offset + _CHUNK_BYTES])
                    if isinstance(conn, ssl.SSLSocket):
                        conn.unwrap()
                _tick(_sock(client), deadline)
                client.voidresp()
                try:
                    client.rename(temp, url.name)
                except ftplib.error_perm:
                    # Some servers refuse to rename onto an existing file.
                    with contextlib.suppress(ftplib.error_perm):
                        client.delete(url.name)
                    client.rename(temp, url.name)
                temp = None
                done = True
            finally:
                if temp is not None and client is not None and time.monotonic() < deadline:
                    with contextlib.suppress(*ftplib.all_errors):
                        client.delete(temp)
                self._close(client, polite=done)

    @staticmethod
    def _enter_dirs(client: ftplib.FTP, url: _FTPURL, deadline: float) -> None:
        """CWD into the target directory, creating missing directories (MKD)."""
        if url.absolute:
            client.cwd("/")
        for directory in url.dirs:
            _tick(_sock(client), deadline)
            try:
                client.cwd(directory)
            except ftplib.error_perm:
                with contextlib.suppress(ftplib.error_perm):  # created meanwhile
                    client.mkd(directory)
                client.cwd(directory)


def _scrub(text: str, url: _FTPURL) -> str:
    """Remove the password from a server reply (a hostile server may echo it)."""
    if url.password and url.password != _ANONYMOUS_PASSWORD:
        text = text.replace(url.password, "***")
    return text

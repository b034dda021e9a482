"""http:// and https://: download with GET, upload with PUT or a multipart POST form.

One aiohttp session per transport, created on first use. Its connector uses a
resolver that drops every address the outbound policy refuses, so the address
aiohttp connects to is one that was checked; IP-literal hosts (which aiohttp
never passes to the resolver) are checked here before each request.
Redirects are followed by hand so each hop is re-checked. Responses are
decompressed here, not by aiohttp, so the size limit applies to decoded bytes
and a gzip bomb stops as soon as it passes the limit.

Statuses and aiohttp's exceptions become outcomes (outcomes.py): 401/403 are
refused credentials, 404/410 not found, 408/429/5xx transient, any other final
status >= 300 a permanent refusal, the same for downloads and uploads.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
import ssl
import zlib
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from imgserve.config import NetPolicy, TransportSettings
from imgserve.errors import AddressRefused, RedirectSchemeRefused, TooManyRedirects, URLInvalid
from imgserve.transports import outcomes, policy
from imgserve.transports.base import Charge, Chunks, HopCheck, Target, Transport
from imgserve.urls import redact_url

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK_BYTES = 64 * 1024


def client_tls_context(ca_file: object | None) -> ssl.SSLContext:
    """A verifying client context: system CAs plus ``ca_file`` (PEM) if given."""
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context


class PolicyResolver(AbstractResolver):
    """Resolves with the system resolver and keeps only allowed addresses.

    Raises AddressRefused (which aiohttp lets through unchanged) when every
    address a name resolves to is refused, URLInvalid for a name that cannot be
    looked up at all (an empty label, one over 63 characters).
    """

    def __init__(self, net_policy: NetPolicy) -> None:
        self._policy = net_policy
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            results = await self._inner.resolve(host, port, family)
        except UnicodeError as exc:  # IDNA cannot encode it: no lookup can ever find it
            raise policy.invalid_host_name(host, exc) from exc
        allowed: list[ResolveResult] = []
        refusal: AddressRefused | None = None
        for result in results:
            addr = ipaddress.ip_address(result["host"].split("%", 1)[0])
            try:
                policy.check_address(host, addr, self._policy)
            except AddressRefused as exc:
                refusal = refusal or exc
            else:
                allowed.append(result)
        if not allowed:
            raise refusal or AddressRefused(f"host {host} resolved to no address")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


class _Body:
    """Collects a response body, decoding gzip/deflate, within a byte limit; the
    decoded bytes are what ``charge`` counts."""

    def __init__(self, encoding: str, max_bytes: int, charge: Charge | None = None) -> None:
        self._chunks = Chunks(max_bytes, charge)
        self._decoder: Any = None
        self._raw_deflate_fallback = False
        if encoding in ("gzip", "x-gzip"):
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._decoder = zlib.decompressobj(zlib.MAX_WBITS)
            self._raw_deflate_fallback = True
        elif encoding not in ("", "identity"):
            raise outcomes.Refused(f"unsupported Content-Encoding {encoding!r}")

    def _add(self, data: bytes) -> None:
        try:
            self._chunks.add(data)
        except outcomes.TooLarge as exc:
            raise outcomes.TooLarge(f"{exc} (decoded)") from None

    def feed(self, chunk: bytes) -> None:
        if self._decoder is None:
            self._add(chunk)
            return
        pending = chunk
        while pending and not self._decoder.eof:
            # max_length bounds each step's output, so a bomb never expands
            # past the limit in memory.
            budget = self._chunks.max_bytes - self._chunks.size + 1
            try:
                out = self._decoder.decompress(pending, budget)
            except zlib.error as exc:
                if self._raw_deflate_fallback and self._chunks.size == 0:
                    # Some servers send raw deflate without the zlib header.
                    self._raw_deflate_fallback = False
                    self._decoder = zlib.decompressobj(-zlib.MAX_WBITS)
                    continue
                raise outcomes.Transient(f"corrupt compressed body: {exc}") from exc
            self._raw_deflate_fallback = False
            self._add(out)
            pending = self._decoder.unconsumed_tail

    def finish(self) -> bytes:
        if self._decoder is not None:
            try:
                self._add(self._decoder.flush())
            except zlib.error as exc:
                raise outcomes.Transient(f"corrupt compressed body: {exc}") from exc
        return self._chunks.join()


def _basic_auth(user: str, password: str) -> str:
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


def _headers(auth: str | None, **extra: str) -> dict[str, str]:
    headers = dict(extra)
    if auth is not None:
        headers["Authorization"] = auth
    return headers


def parse_url(url: str | URL) -> tuple[URL, str | None]:
    """Split credentials off an http(s) URL: (URL without userinfo, Authorization value)."""
    try:
        parsed = url if isinstance(url, URL) else URL(url)
        host = parsed.host
    except (ValueError, TypeError) as exc:
        raise URLInvalid(f"malformed URL {redact_url(str(url))}") from exc
    if parsed.scheme not in ("http", "https"):
        raise URLInvalid(f"not an http(s) URL: {redact_url(str(url))}")
    if not host:
        raise URLInvalid(f"URL without a host: {redact_url(str(url))}")
    auth = None
    if parsed.user is not None:
        auth = _basic_auth(parsed.user, parsed.password or "")
    return parsed.with_user(None), auth


def _origin(url: URL) -> tuple[str, str | None, int | None]:
    return (url.scheme, url.host, url.port)


def policy_session(
    settings: TransportSettings, user_agent: str = "imgserve/1.0"
) -> aiohttp.ClientSession:
    """A client session that connects only to addresses ``settings.policy`` allows
    (names through PolicyResolver; call ``check_literal`` before each request, since
    IP literals never reach a resolver), following nothing and keeping no cookies.
    Also what webhooks.py delivers events with."""
    connector = aiohttp.TCPConnector(
        resolver=PolicyResolver(settings.policy), ssl=client_tls_context(settings.ca_file)
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None),  # deadlines are the caller's
        auto_decompress=False,
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        headers={"User-Agent": user_agent},
    )


def check_literal(url: URL, net_policy: NetPolicy) -> None:
    """Check an IP-literal host against the policy (aiohttp does not resolve them)."""
    policy.check_host_literal(url.host or "", net_policy)


class HTTPTransport(Transport):
    """GET downloads; PUT or multipart-form POST uploads."""

    schemes = ("http", "https")

    def __init__(self, settings: TransportSettings) -> None:
        super().__init__(settings)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = policy_session(self.settings)
        return self._session

    def _check_literal(self, url: URL) -> None:
        check_literal(url, self.settings.policy)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- download -----------------------------------------------------------------

    async def download(
        self, url: str, charge: Charge | None = None, hop_check: HopCheck | None = None
    ) -> bytes:
        timeout_s = self.settings.download_timeout_s
        with outcomes.translated(outcomes.DOWNLOAD, url):
            try:
                async with asyncio.timeout(timeout_s):
                    return await self._download(url, charge, hop_check)
            except TimeoutError as exc:
                raise outcomes.Timeout(f"not downloaded within {timeout_s}s") from exc

    async def _download(self, url: str, charge: Charge | None, hop_check: HopCheck | None) -> bytes:
        current, auth = parse_url(url)
        for _hop in range(self.settings.max_redirects + 1):
            self._check_literal(current)
            with outcomes.translated(outcomes.DOWNLOAD, str(current)):
                async with self._client().get(
                    current,
                    allow_redirects=False,
                    headers=_headers(auth, **{"Accept-Encoding": "gzip, deflate"}),
                ) as resp:
                    if resp.status in _REDIRECTS:
                        current, auth = self._next_hop(current, auth, resp)
                        if hop_check is not None:
                            hop_check(str(current))
                        continue
                    if resp.status >= 400:
                        raise outcomes.http_status(resp.status)(f"HTTP {resp.status}")
                    return await self._read(resp, charge)
        raise TooManyRedirects(
            f"more than {self.settings.max_redirects} redirects from {redact_url(url)}"
        )

    def _next_hop(
        self, current: URL, auth: str | None, resp: aiohttp.ClientResponse
    ) -> tuple[URL, str | None]:
        location = resp.headers.get("Location")
        if not location:
            raise outcomes.Refused(f"HTTP {resp.status} without Location")
        try:
            target = current.join(URL(location))
        except (ValueError, TypeError) as exc:
            raise URLInvalid(f"malformed redirect Location from {current}") from exc
        if target.scheme not in ("http", "https"):
            raise RedirectSchemeRefused(
                f"{current} redirected to a {target.scheme or 'relative'}: URL"
            )
        next_url, next_auth = parse_url(target)
        # Credentials go only to the origin they were given for.
        if next_auth is None and _origin(next_url) == _origin(current):
            next_auth = auth
        return next_url, next_auth

    async def _read(self, resp: aiohttp.ClientResponse, charge: Charge | None) -> bytes:
        limit = self.settings.max_download_bytes
        encoding = resp.headers.get("Content-Encoding", "").strip().lower()
        if encoding in ("", "identity") and (resp.content_length or 0) > limit:
            raise outcomes.TooLarge(f"Content-Length {resp.content_length} > {limit} bytes")
        body = _Body(encoding, limit, charge)
        async for chunk in resp.content.iter_chunked(_CHUNK_BYTES):
            body.feed(chunk)
        return body.finish()

    # --- upload -------------------------------------------------------------------

    async def upload_once(self, target: Target, data: bytes, content_type: str) -> None:
        timeout_s = self.settings.upload_timeout_s
        with outcomes.translated(outcomes.UPLOAD, target.url):
            try:
                async with asyncio.timeout(timeout_s):
                    await self._upload(target, data, content_type)
            except TimeoutError as exc:
                raise outcomes.Timeout(f"not uploaded within {timeout_s}s") from exc

    async def _upload(self, target: Target, data: bytes, content_type: str) -> None:
        url, auth = parse_url(target.url)
        self._check_literal(url)
        if target.form_field:
            form = aiohttp.FormData()
            form.add_field(
                target.form_field,
                data,
                filename=target.filename or "upload",
                content_type=content_type,
            )
            request = self._client().post(
                url, data=form, headers=_headers(auth), allow_redirects=False
            )
        else:
            request = self._client().put(
                url,
                data=data,
                allow_redirects=False,
                headers=_headers(auth, **{"Content-Type": content_type}),
            )
        async with request as resp:
            status = resp.status
            await resp.read()
        if status >= 300:  # redirects are not followed for uploads: a refusal
            raise outcomes.http_status(status)(f"HTTP {status}")

"""Real servers on loopback for transport tests: aiohttp HTTP(S), pyftpdlib FTP(S), moto S3.

Plain pytest fixtures; register with ``pytest_plugins = ["tests.servers"]``.
Each server runs in a background thread with its own event/IO loop, so any
test (with any event loop) can talk to it; they are session-scoped and keep
per-name state, so tests use distinct names instead of resetting.

HTTP routes (``HTTPTestServer.url(path)``):
  GET  /files/{name}         bytes from ``state.files`` (404 if absent)
  PUT  /files/{name}         store the body
  POST /form                 multipart form: store each file part by its filename
  GET  /slow                 one byte a second (Content-Length 1000)
  PUT|POST /flaky/{name}     503 while ``state.fail_remaining[name] > 0``, then store
  PUT|POST /forbidden/{name} always 403
  GET  /redirect?to=URL      302 to URL
  GET  /chain/{n}/{name}     n redirects, then /files/{name}
  GET  /gzip/{name}          ``state.files[name]`` gzip-encoded
  GET  /gzip-bomb            64 MiB of zeros, gzip-encoded (about 64 KiB on the wire)
  GET  /auth/{name}          like /files but needs basic auth user:s3cret
``connections`` counts accepted TCP connections; ``state.attempts[name]``
counts requests per name on the upload routes.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import gzip
import logging
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import BodyPartReader, web
from ephemeral_port_reserve import reserve

# --- ports ----------------------------------------------------------------------------


def free_port() -> int:
    """A loopback port for a server that a test starts later in another process.

    Closing a socket bound to port 0 frees its port for anyone: with tests running in
    parallel (pytest-xdist), another worker's bind(0) (an FTP data connection, a test
    server) could take it before the daemon or Redis binds it. ``reserve`` leaves the
    port in TIME_WAIT, which the kernel's bind(0) and connect() skip for about 60 s,
    while a server that sets SO_REUSEADDR (aiohttp, redis-server) can still bind it.
    """
    return int(reserve("127.0.0.1"))


# --- TLS ------------------------------------------------------------------------------


@dataclass
class TLSFiles:
    """A test CA and a server certificate for 127.0.0.1 and localhost."""

    ca: Any
    cert: Any
    ca_pem: Path
    """The CA certificate (PEM): pass as ``TransportSettings(ca_file=...)``."""
    server_pem: Path
    """Server key + certificate chain (PEM), for pyftpdlib."""

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.cert.configure_cert(context)
        return context


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A trustme CA and a cert for 127.0.0.1/localhost, written to PEM files."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    base = tmp_path_factory.mktemp("tls")
    ca_pem = base / "ca.pem"
    server_pem = base / "server.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    cert.private_key_and_cert_chain_pem.write_to_path(str(server_pem))
    return TLSFiles(ca=ca, cert=cert, ca_pem=ca_pem, server_pem=server_pem)


@pytest.fixture(scope="session")
def ca_file(tls_files: TLSFiles) -> Path:
    """Path of the test CA's PEM file."""
    return tls_files.ca_pem


# --- HTTP -----------------------------------------------------------------------------

BASIC_USER = "user"
BASIC_PASSWORD = "s3cret"
BOMB_BYTES = 64 * 1024 * 1024


@dataclass
class HTTPState:
    files: dict[str, bytes] = field(default_factory=dict)
    content_types: dict[str, str] = field(default_factory=dict)
    form_fields: dict[str, str] = field(default_factory=dict)
    """filename -> the form field it arrived in."""
    fail_remaining: dict[str, int] = field(default_factory=dict)
    attempts: collections.Counter[str] = field(default_factory=collections.Counter)


def _make_app(state: HTTPState, bomb: bytes) -> web.Application:
    routes = web.RouteTableDef()

    @routes.get("/files/{name:.+}")
    async def get_file(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in state.files:
            raise web.HTTPNotFound()
        return web.Response(body=state.files[name])

    @routes.put("/files/{name:.+}")
    async def put_file(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        state.attempts[name] += 1
        state.files[name] = await request.read()
        state.content_types[name] = request.headers.get("Content-Type", "")
        return web.Response(status=201)

    @routes.post("/form")
    async def post_form(request: web.Request) -> web.Response:
        reader = await request.multipart()
        async for part in reader:
            if isinstance(part, BodyPartReader) and part.filename:
                state.files[part.filename] = await part.read()
                state.form_fields[part.filename] = part.name or ""
                state.content_types[part.filename] = part.headers.get("Content-Type", "")
                state.attempts[part.filename] += 1
        return web.Response(status=201)

    @routes.get("/slow")
    async def slow(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": "1000"})
        await resp.prepare(request)
        for _ in range(1000):
            await resp.write(b"x")
            await asyncio.sleep(1.0)
        return resp

    async def flaky(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        state.attempts[name] += 1
        if state.fail_remaining.get(name, 0) > 0:
            state.fail_remaining[name] -= 1
            return web.Response(status=503)
        if request.content_type.startswith("multipart/"):
            reader = await request.multipart()
            async for part in reader:
                if isinstance(part, BodyPartReader):
                    state.files[name] = await part.read()
        else:
            state.files[name] = await request.read()
        return web.Response(status=201)

    async def forbidden(request: web.Request) -> web.Response:
        state.attempts[request.match_info["name"]] += 1
        return web.Response(status=403)

    @routes.get("/redirect")
    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["to"])

    @routes.get("/chain/{n:\\d+}/{name:.+}")
    async def chain(request: web.Request) -> web.Response:
        n, name = int(request.match_info["n"]), request.match_info["name"]
        if n > 0:
            raise web.HTTPFound(f"/chain/{n - 1}/{name}")
        raise web.HTTPFound(f"/files/{name}")

    @routes.get("/gzip/{name:.+}")
    async def gzipped(request: web.Request) -> web.Response:
        body = gzip.compress(state.files[request.match_info["name"]])
        return web.Response(body=body, headers={"Content-Encoding": "gzip"})

    @routes.get("/gzip-bomb")
    async def gzip_bomb(request: web.Request) -> web.Response:
        return web.Response(body=bomb, headers={"Content-Encoding": "gzip"})

    @routes.get("/auth/{name:.+}")
    async def auth(request: web.Request) -> web.Response:
        expected = "Basic " + base64.b64encode(f"{BASIC_USER}:{BASIC_PASSWORD}".encode()).decode()
        if request.headers.get("Authorization") != expected:
            raise web.HTTPUnauthorized()
        return web.Response(body=state.files[request.match_info["name"]])

    app = web.Application()
    app.add_routes(routes)
    for method in ("PUT", "POST"):
        app.router.add_route(method, "/flaky/{name:.+}", flaky)
        app.router.add_route(method, "/forbidden/{name:.+}", forbidden)
    return app


class HTTPTestServer:
    """One aiohttp server on 127.0.0.1 (plain or TLS) with a connection counter."""

    def __init__(self, scheme: str, port: int, state: HTTPState) -> None:
        self.scheme = scheme
        self.host = "127.0.0.1"
        self.port = port
        self.state = state
        self._connections = 0
        self._lock = threading.Lock()

    @property
    def connections(self) -> int:
        """TCP connections accepted so far."""
        with self._lock:
            return self._connections

    def _count(self) -> None:
        with self._lock:
            self._connections += 1

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def url(self, path: str, host: str | None = None) -> str:
        return f"{self.scheme}://{host or self.host}:{self.port}{path}"


class _HTTPThread:
    """Runs the HTTP and HTTPS servers on one event loop in a daemon thread."""

    def __init__(self, tls: TLSFiles) -> None:
        self.loop = asyncio.new_event_loop()
        self._tls = tls
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self.servers: dict[str, HTTPTestServer] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="http-test-server", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        state = HTTPState()
        bomb = gzip.compress(b"\0" * BOMB_BYTES, compresslevel=9)
        runner = web.AppRunner(_make_app(state, bomb), handle_signals=False)
        await runner.setup()
        servers = []
        for scheme, context in (("http", None), ("https", self._tls.server_context())):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            srv = HTTPTestServer(scheme, sock.getsockname()[1], state)

            def factory(srv: HTTPTestServer = srv) -> Any:
                srv._count()
                assert runner.server is not None
                return runner.server()

            servers.append(await self.loop.create_server(factory, sock=sock, ssl=context))
            self.servers[scheme] = srv
        self._ready.set()
        await self._stop.wait()
        for server in servers:
            server.close()
        await runner.cleanup()


@pytest.fixture(scope="session")
def http_server_thread(tls_files: TLSFiles) -> Iterator[_HTTPThread]:
    thread = _HTTPThread(tls_files)
    thread.start()
    yield thread
    thread.stop()


@pytest.fixture(scope="session")
def http_server(http_server_thread: _HTTPThread) -> HTTPTestServer:
    """The plain HTTP test server on 127.0.0.1."""
    return http_server_thread.servers["http"]


@pytest.fixture(scope="session")
def https_server(http_server_thread: _HTTPThread) -> HTTPTestServer:
    """The HTTPS test server on 127.0.0.1 (certificate from ``tls_files``)."""
    return http_server_thread.servers["https"]


# --- FTP ------------------------------------------------------------------------------

FTP_USER = "user"
FTP_READER = "reader"
FTP_PASSWORD = "pa:ss@word"  # characters that need percent-encoding in a URL


@dataclass
class FTPState:
    stor_failures: int = 0
    """STOR commands still to answer with 451 (a transient failure)."""
    commands: list[tuple[str, str]] = field(default_factory=list)
    """(command, argument) pairs in arrival order (paths as server file paths)."""


class FTPTestServer:
    """A pyftpdlib server on 127.0.0.1 in a thread, serving ``home``."""

    def __init__(self, handler_base: Any, home: Path, **attrs: Any) -> None:
        from pyftpdlib.authorizers import DummyAuthorizer
        from pyftpdlib.ioloop import IOLoop
        from pyftpdlib.servers import FTPServer

        self.home = home
        self.state = FTPState()
        state = self.state
        authorizer = DummyAuthorizer()
        authorizer.add_user(FTP_USER, FTP_PASSWORD, str(home), perm="elradfmwMT")
        authorizer.add_user(FTP_READER, FTP_PASSWORD, str(home), perm="elr")

        class Handler(handler_base):  # type: ignore[misc, valid-type]
            def process_command(self, cmd: str, *args: Any, **kwargs: Any) -> Any:
                state.commands.append((cmd, str(args[0]) if args else ""))
                return super().process_command(cmd, *args, **kwargs)

            def ftp_STOR(self, file: str, mode: str = "w") -> Any:
                if state.stor_failures > 0:
                    state.stor_failures -= 1
                    self.respond("451 Injected transient failure.")
                    return None
                return super().ftp_STOR(file, mode)

        Handler.authorizer = authorizer
        Handler.passive_ports = None
        for key, value in attrs.items():
            setattr(Handler, key, value)
        self._server = FTPServer(("127.0.0.1", 0), Handler, ioloop=IOLoop())
        self.host, self.port = self._server.address[:2]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ftp-test-server", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._server.serve_forever(timeout=0.01, blocking=False, handle_exit=False)
        self._server.close_all()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def url(self, path: str, *, scheme: str = "ftp", user: str = FTP_USER) -> str:
        from urllib.parse import quote

        auth = f"{quote(user, safe='')}:{quote(FTP_PASSWORD, safe='')}@"
        return f"{scheme}://{auth}{self.host}:{self.port}/{path.lstrip('/')}"


@contextlib.contextmanager
def _ftp_server(handler_base: Any, home: Path, **attrs: Any) -> Iterator[FTPTestServer]:
    logging.getLogger("pyftpdlib").setLevel(logging.WARNING)
    server = FTPTestServer(handler_base, home, **attrs)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ftp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FTPTestServer]:
    """Plain FTP with user/reader accounts, STOR failure injection and a command log."""
    from pyftpdlib.handlers import FTPHandler

    with _ftp_server(FTPHandler, tmp_path_factory.mktemp("ftp")) as server:
        yield server


@pytest.fixture(scope="session")
def ftps_server(
    tmp_path_factory: pytest.TempPathFactory, tls_files: TLSFiles
) -> Iterator[FTPTestServer]:
    """Explicit FTPS (AUTH TLS) requiring TLS on control and data connections."""
    from pyftpdlib.handlers import TLS_FTPHandler

    with _ftp_server(
        TLS_FTPHandler,
        tmp_path_factory.mktemp("ftps"),
        certfile=str(tls_files.server_pem),
        ssl_context=None,
        tls_control_required=True,
        tls_data_required=True,
    ) as server:
        yield server


@pytest.fixture(scope="session")
def ftp_slow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FTPTestServer]:
    """Plain FTP whose data connections send at most 2 KiB a second."""
    from pyftpdlib.handlers import ThrottledDTPHandler

    class Slow(ThrottledDTPHandler):  # type: ignore[misc]
        write_limit = 2048
        read_limit = 2048

    from pyftpdlib.handlers import FTPHandler

    with _ftp_server(FTPHandler, tmp_path_factory.mktemp("ftp-slow"), dtp_handler=Slow) as server:
        yield server


MASQUERADE_ADDRESS = "169.254.169.254"


@pytest.fixture(scope="session")
def ftp_masquerade_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FTPTestServer]:
    """Plain FTP that announces the metadata address 169.254.169.254 in PASV replies."""
    from pyftpdlib.handlers import FTPHandler

    with _ftp_server(
        FTPHandler,
        tmp_path_factory.mktemp("ftp-masq"),
        masquerade_address=MASQUERADE_ADDRESS,
    ) as server:
        yield server


# --- S3 -------------------------------------------------------------------------------

S3_BUCKET = "imgserve-test"
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class S3TestServer:
    endpoint: str
    bucket: str

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
        )


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3TestServer]:
    """moto's S3 in server mode on 127.0.0.1 with one bucket."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3 = S3TestServer(endpoint=f"http://{host}:{port}", bucket=S3_BUCKET)
    s3.client().create_bucket(Bucket=S3_BUCKET)
    yield s3
    server.stop()


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Standard AWS_* variables with moto's test credentials."""
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    return dict(S3_ENV)

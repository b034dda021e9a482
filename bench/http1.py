"""A minimal HTTP/1.1 keep-alive client for one purpose: imgserve's ``POST /``.

The benchmark's client shares the machine's two cores with the server it
measures, so every millisecond it spends per job is taken from imgserve.
This client does the same request as aiohttp's (one POST with a body, over
keep-alive connections) and nothing else: no cookies, redirects, proxies,
compression, DNS or connection limits. Using it instead of aiohttp's took
about 0.35-0.4 ms of CPU off each job's ~1.2 ms of client CPU (``jpeg-fill``).

What it speaks, and what it refuses:

- requests: ``POST`` with a bytes body and a fixed header set (``Host``,
  ``Content-Type``, ``Content-Length``), written in one ``write``;
- replies: HTTP/1.x framed by ``Content-Length`` (what aiohttp's server sends for
  ``json_response``); ``Transfer-Encoding``, a missing length or any other
  surprise raises :class:`ProtocolError` and closes that connection;
- connections: one request at a time per connection (no pipelining). A request
  takes an idle connection or, when none is idle, opens a new one at once, so
  no request ever waits for another's connection; the pool therefore grows to
  the peak number of requests in flight. A connection the server closes
  (keep-alive timeout, ``Connection: close``, shutdown) leaves the pool when it
  closes. A request written to a reused connection that the server closed
  before sending a single reply byte is sent once more on a new connection:
  the server closes only idle connections, so it never saw that request;
- timeouts: a request without its whole reply after ``timeout_s`` fails with
  ``TimeoutError`` (checked once a second, not with a timer per request).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

MAX_HEAD_BYTES = 64 * 1024
RECEIVE_BUFFER_BYTES = 64 * 1024
SWEEP_S = 1.0
NO_BODY_STATUSES = frozenset({204, 304})


class ProtocolError(RuntimeError):
    """The server's reply is not HTTP/1.x framed by Content-Length."""


class _StaleConnection(ConnectionError):
    """A reused connection closed before its reply began (safe to send again)."""


@dataclass(frozen=True, slots=True)
class Reply:
    """One reply: its status and its whole body."""

    status: int
    body: bytes


class _Connection(asyncio.BufferedProtocol):
    """One TCP connection; at most one request outstanding on it.

    A buffered protocol: the transport receives into the pool's one small
    buffer instead of allocating a fresh 256 KiB ``bytes`` per read (which
    glibc serves with mmap/mremap/munmap, a fifth of the client's CPU).
    """

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.used = False
        """A request was sent on this connection before (so it may be stale)."""
        self.waiter: asyncio.Future[Reply] | None = None
        self.deadline = 0.0
        """Loop time by which the outstanding request must have its reply."""
        self.buffer = b""

    # ---- asyncio callbacks ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.pool.receive_buffer

    def buffer_updated(self, nbytes: int) -> None:
        data = bytes(self.pool.receive_buffer[:nbytes])
        if self.waiter is None:
            self._fail(ProtocolError("the server sent data with no request outstanding"))
            return
        self.buffer = self.buffer + data if self.buffer else data
        try:
            parsed = self._parse(self.buffer)
        except ProtocolError as exc:
            self._fail(exc)
            return
        if parsed is None:
            return
        reply, keep_alive = parsed
        waiter = self.waiter
        self._settle()
        if keep_alive:
            self.pool._release(self)
        else:
            self.close()
        if not waiter.done():
            waiter.set_result(reply)

    def eof_received(self) -> bool:
        self.pool._forget(self)  # no new request on it; connection_lost follows
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        if self.waiter is not None:
            if self.used and not self.buffer:
                self._fail(_StaleConnection("the server closed a reused connection"))
            else:
                reason = f": {exc}" if exc else ""
                self._fail(ConnectionError(f"the server closed the connection mid-reply{reason}"))

    # ---- requests ----

    def request(self, data: bytes, timeout_s: float) -> asyncio.Future[Reply]:
        """Send one complete request; the future gets its reply."""
        assert self.transport is not None and self.waiter is None
        loop = self.pool.loop
        self.waiter = waiter = loop.create_future()
        self.deadline = loop.time() + timeout_s
        self.transport.write(data)
        return waiter

    def _settle(self) -> None:
        self.waiter = None
        self.buffer = b""
        self.used = True

    def _fail(self, exc: Exception) -> None:
        """Fail the outstanding request (if any) and close the connection."""
        waiter = self.waiter
        self._settle()
        self.close()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool._forget(self)
            if self.transport is not None:
                self.transport.close()

    @staticmethod
    def _parse(data: bytes) -> tuple[Reply, bool] | None:
        """(reply, keep-alive) once ``data`` holds a whole reply; None while it does not."""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if len(data) > MAX_HEAD_BYTES:
                raise ProtocolError(f"no end of headers in the first {MAX_HEAD_BYTES} bytes")
            return None
        lines = data[:end].split(b"\r\n")
        status_line = lines[0]
        if not status_line.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")) or len(status_line) < 12:
            raise ProtocolError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
        try:
            status = int(status_line[9:12])
        except ValueError:
            raise ProtocolError(f"bad status line: {status_line[:80]!r}") from None
        keep_alive = status_line.startswith(b"HTTP/1.1")
        length = -1
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    raise ProtocolError(f"bad Content-Length: {value[:40]!r}") from None
            elif name == b"transfer-encoding":
                raise ProtocolError(f"Transfer-Encoding {value.strip()[:40]!r} is not supported")
            elif name == b"connection":
                token = value.strip().lower()
                if token == b"close":
                    keep_alive = False
                elif token == b"keep-alive":
                    keep_alive = True
        if status < 200:
            raise ProtocolError(f"interim reply {status} is not supported")
        if status in NO_BODY_STATUSES:
            length = 0
        elif length < 0:
            raise ProtocolError(f"reply {status} has no Content-Length")
        start = end + 4
        if len(data) < start + length:
            return None
        if len(data) > start + length:
            raise ProtocolError("more bytes than Content-Length (pipelining is not supported)")
        return Reply(status, data[start:]), keep_alive


class Pool:
    """Keep-alive connections to one ``host:port``, for ``POST`` requests."""

    def __init__(self, host: str, port: int, timeout_s: float = 120.0) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self.loop = asyncio.get_running_loop()
        self.idle: list[_Connection] = []
        self.connections: set[_Connection] = set()
        self.opened = 0
        """Connections opened so far (a new one per request that found none idle)."""
        # Shared by all connections: each read is consumed before the next one.
        self.receive_buffer = memoryview(bytearray(RECEIVE_BUFFER_BYTES))
        # One sweep a second enforces every request's timeout: cheaper than a
        # timer armed and cancelled per request.
        self._sweeper = self.loop.call_later(SWEEP_S, self._sweep)
        self._heads: dict[tuple[str, str], bytes] = {}

    async def post(self, path: str, body: bytes, content_type: str = "application/json") -> Reply:
        """POST ``body`` to ``path``; the whole reply, whatever its status."""
        head = self._heads.get((path, content_type))
        if head is None:
            head = self._heads[path, content_type] = (
                f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: {content_type}\r\nContent-Length: "
            ).encode("latin-1")
        data = head + b"%d\r\n\r\n" % len(body) + body
        connection = self.idle.pop() if self.idle else await self._connect()
        try:
            return await connection.request(data, self.timeout_s)
        except _StaleConnection:
            connection = await self._connect()
            return await connection.request(data, self.timeout_s)

    async def _connect(self) -> _Connection:
        _, protocol = await self.loop.create_connection(
            lambda: _Connection(self), self.host, self.port
        )
        self.connections.add(protocol)
        self.opened += 1
        return protocol

    def _release(self, connection: _Connection) -> None:
        if not connection.closed:
            self.idle.append(connection)

    def _forget(self, connection: _Connection) -> None:
        self.connections.discard(connection)
        if connection in self.idle:
            self.idle.remove(connection)

    def _sweep(self) -> None:
        now = self.loop.time()
        for connection in list(self.connections):
            if connection.waiter is not None and connection.deadline <= now:
                connection._fail(TimeoutError(f"no complete reply after {self.timeout_s:g} s"))
        self._sweeper = self.loop.call_later(SWEEP_S, self._sweep)

    def close(self) -> None:
        """Close every connection (requests in flight fail)."""
        self._sweeper.cancel()
        for connection in list(self.connections):
            connection.close()

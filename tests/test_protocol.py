"""Broken HTTP gets a JSON reply in imgserve's error shape, from a real TCP server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.http_exceptions import BadHttpMessage, BadStatusLine, LineTooLong

from imgserve import errors, protocol
from imgserve.planner import Planner
from imgserve.queue.sqlite import SQLiteQueue
from tests.inprocess import start_api


@dataclass
class Server:
    port: int
    queue: SQLiteQueue

    async def send(self, raw: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
        """Send raw bytes; the reply's status, headers and JSON body."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(raw)
            await writer.drain()
            data = await asyncio.wait_for(reader.read(), timeout=10)
        finally:
            writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in header_lines)
        return int(status_line.split()[1]), headers, json.loads(body)


@pytest.fixture
async def server(tmp_path: Path, shared_planner: Planner) -> AsyncIterator[Server]:
    served = await start_api(tmp_path / "state", shared_planner)
    assert isinstance(served.service.queue, SQLiteQueue)
    try:
        yield Server(port=served.port, queue=served.service.queue)
    finally:
        await served.stop()


def _get(path: bytes, *headers: bytes) -> bytes:
    lines = [b"GET " + path + b" HTTP/1.1", b"Host: localhost", *headers, b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n"


# (case id, raw request, HTTP status, code)
BROKEN: list[tuple[str, bytes, int, int]] = [
    ("not HTTP at all", b"GARBAGE\r\n\r\n", 400, 127),
    ("invalid method", b"G@T / HTTP/1.1\r\nHost: x\r\n\r\n", 400, 127),
    ("TLS on the plain port", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", 400, 127),
    ("bad HTTP version", b"GET / HTTP/9\r\nHost: x\r\n\r\n", 400, 127),
    ("header without a colon", _get(b"/health", b"NoColonHere"), 400, 127),
    ("space in a header name", _get(b"/health", b"Bad Header: 1"), 400, 127),
    ("NUL in a header value", _get(b"/health", b"X-A: a\x00b"), 400, 127),
    (
        "bad chunk size",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        400,
        127,
    ),
    ("20 KB header value", _get(b"/health", b"X-Big: " + b"a" * 20_000), 431, 128),
    ("20 KB header name", _get(b"/health", b"X" * 20_000 + b": 1"), 431, 128),
    ("200 headers", _get(b"/health", *(b"X-%d: 1" % i for i in range(200))), 431, 128),
    ("10 KB path", _get(b"/" + b"a" * 10_000), 414, 129),
    ("10 KB job id", _get(b"/jobs/" + b"0" * 10_000), 414, 129),
    ("10 KB query", _get(b"/health?x=" + b"a" * 10_000), 414, 129),
]


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [pytest.param(raw, status, code, id=name) for name, raw, status, code in BROKEN],
)
async def test_broken_http_gets_a_json_error(
    server: Server, raw: bytes, status: int, code: int
) -> None:
    """aiohttp's parse errors are answered in imgserve's JSON shape with a documented code."""
    got_status, headers, body = await server.send(raw)
    assert (got_status, body["code"]) == (status, code), body
    assert headers["Content-Type"].startswith("application/json")
    assert body["msg"] == "request invalid" and body["detail"]
    assert errors.by_code(code).status == status


async def test_the_server_keeps_serving_after_broken_requests(server: Server) -> None:
    """After refusing broken HTTP, the same server answers a good request normally."""
    for _name, raw, _status, _code in BROKEN[:3]:
        await server.send(raw)
    status, _headers, body = await server.send(_get(b"/health"))
    assert status == 200 and body["status"] == "ok"


async def test_limits_are_inclusive(server: Server) -> None:
    """A header line just under the field limit and a path at the URL limit are served."""
    header = b"X-A: " + b"a" * (protocol.FIELD_MAX_BYTES - 10)
    status, _h, _b = await server.send(_get(b"/health", header))
    assert status == 200
    path = b"/health?x=" + b"a" * (protocol.URL_MAX_BYTES - len(b"/health?x="))
    status, _h, _b = await server.send(_get(path))
    assert status == 200


@pytest.mark.parametrize(
    "job_id",
    [
        b"x",
        b"0" * 31,
        b"0" * 33,
        b"A" * 32,
        b"0123456789abcdef0123456789abcdeg",
        b"%00%0a" + b"0" * 26,
        b"..%2Fhealth",
        b"0" * 5_000,
    ],
)
async def test_impossible_job_ids_are_605_without_the_queue(server: Server, job_id: bytes) -> None:
    """An id that cannot be a job is 605 even with the queue closed: no lookup is made."""
    await server.queue.close()
    status, _headers, body = await server.send(_get(b"/jobs/" + job_id))
    assert (status, body["code"]) == (404, 605), body
    assert len(body["detail"]) < 100


async def test_a_well_formed_unknown_job_id_is_looked_up(server: Server) -> None:
    """A 32-hex id goes to the queue: 605 when open, and not 605 when the queue is closed."""
    status, _headers, body = await server.send(_get(b"/jobs/" + b"0" * 32))
    assert (status, body["code"]) == (404, 605)
    await server.queue.close()
    status, _headers, body = await server.send(_get(b"/jobs/" + b"0" * 32))
    assert body["code"] != 605


# (case id, status, exception, expected code)
MAPPING: list[tuple[str, int, BaseException | None, int]] = [
    ("URL limit", 400, LineTooLong(b"/aaa", 8192), 129),
    ("field limit", 400, LineTooLong(b"X-A", 8190), 128),
    ("unknown limit", 400, LineTooLong(b"X-A"), 128),
    ("too many headers", 400, BadHttpMessage("Too many headers received"), 128),
    ("bad status line", 400, BadStatusLine("x"), 127),
    ("handler timeout", 504, None, 601),
    ("handler exception", 500, RuntimeError("boom"), 601),
]


@pytest.mark.parametrize(
    ("status", "exc", "code"),
    [pytest.param(status, exc, code, id=name) for name, status, exc, code in MAPPING],
)
def test_error_for(status: int, exc: BaseException | None, code: int) -> None:
    """Each protocol-level failure maps to one imgserve code."""
    assert protocol.error_for(status, exc, url_max_bytes=8192).code == code


@pytest.mark.parametrize("encoding", [b"gzip", b"deflate"])
async def test_a_body_that_does_not_match_its_encoding_is_127(
    server: Server, encoding: bytes
) -> None:
    """A POST body that claims gzip/deflate but is not is a malformed request (127),
    not an internal error."""
    body = b'{"operationType": "resize"}'
    raw = (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Encoding: " + encoding
        + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
        + body
    )  # fmt: skip
    status, _, reply = await server.send(raw)
    assert (status, reply["code"]) == (400, 127)

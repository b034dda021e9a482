"""The benchmark's smoke mode runs end to end against a real imgserve daemon; the
imgserve client's own HTTP/1.1 pool, inotify watcher and source server work
against loopback."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from bench import http1, srcserver
from bench.systems.imgserve import Arrivals

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_smoke_measures_every_workload_with_all_jobs_done(tmp_path: Path) -> None:
    """`python -m bench --smoke` yields ratios > 0 per workload and no failed or lost job."""
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out-dir", str(tmp_path / "out"),
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["available"]["imgserve"], data["notes"]
    names = [w["name"] for w in data["options"]["workloads"]]
    assert names
    for name in names:
        ratio = data["summary"]["ratios"][name]["imgserve/limit"]
        assert ratio is not None and ratio["median"] > 0, (name, done.stderr[-2000:])
    phases = [p for p in data["phases"] if p["system"] == "imgserve"]
    assert {p["workload"] for p in phases} == set(names)
    for phase in phases:
        assert phase["failed"] == 0 and phase["unfinished"] == 0, phase
        assert phase["completed"] > 0, phase
    for lat in data["latency"]:
        assert lat["failed"] == 0 and lat["finished"] == lat["sent"], lat
    assert all(check.startswith("ok") for check in data["checks"]), data["checks"]


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Serve = Callable[..., Awaitable[int]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start an aiohttp server on loopback with one POST / handler; yields its port."""
    runners: list[web.AppRunner] = []

    async def start(handler: Handler, keepalive_timeout_s: float = 75.0) -> int:
        app = web.Application()
        app.router.add_post("/", handler)
        runner = web.AppRunner(app, keepalive_timeout=keepalive_timeout_s)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return int(runner.addresses[0][1])

    yield start
    for runner in runners:
        await runner.cleanup()


async def echo(request: web.Request) -> web.Response:
    """The request's body, its type and the client's port (one per connection)."""
    body = await request.read()
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return web.json_response(
        {"type": request.content_type, "body": body.decode(), "peer": peer and peer[1]},
        status=201 if body == b"created" else 200,
    )


async def test_http1_pool_posts_and_reuses_one_connection(serve: Serve) -> None:
    """Sequential POSTs go out with their body and type and share one keep-alive connection."""
    pool = http1.Pool("127.0.0.1", await serve(echo))
    replies = [await pool.post("/", b'{"a": 1}') for _ in range(3)]
    created = await pool.post("/", b"created", "text/plain")
    pool.close()
    assert [r.status for r in replies] == [200, 200, 200] and created.status == 201
    data = [json.loads(r.body) for r in replies]
    assert {d["body"] for d in data} == {'{"a": 1}'} and data[0]["type"] == "application/json"
    assert json.loads(created.body)["type"] == "text/plain"
    assert len({d["peer"] for d in data}) == 1 and pool.opened == 1


async def test_http1_pool_opens_a_connection_per_concurrent_request(serve: Serve) -> None:
    """Concurrent POSTs never wait for each other's connection: one connection each."""
    gate = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await gate.wait()
        return await echo(request)

    pool = http1.Pool("127.0.0.1", await serve(slow))
    tasks = [asyncio.create_task(pool.post("/", b"x")) for _ in range(5)]
    await asyncio.sleep(0.2)
    gate.set()
    replies = await asyncio.gather(*tasks)
    pool.close()
    assert pool.opened == 5 and len({json.loads(r.body)["peer"] for r in replies}) == 5


async def test_http1_pool_reconnects_after_the_server_closes_idle_connections(serve: Serve) -> None:
    """A connection closed by the server's keep-alive timeout is replaced by a new one."""
    pool = http1.Pool("127.0.0.1", await serve(echo, keepalive_timeout_s=0.1))
    first = await pool.post("/", b"1")
    await asyncio.sleep(0.5)
    second = await pool.post("/", b"2")
    pool.close()
    assert (first.status, second.status) == (200, 200) and pool.opened == 2


async def test_http1_pool_resends_once_when_a_reused_connection_closes_unanswered() -> None:
    """A request on a reused connection the server closes without a reply byte goes again."""
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    connections = 0
    handlers_done = asyncio.Semaphore(0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        with contextlib.suppress(asyncio.IncompleteReadError):
            for answered in itertools.count():
                await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(1)  # the one-byte body
                if connections == 1 and answered == 1:
                    break  # the race: close a reused connection with its request unanswered
                writer.write(reply)
        writer.close()
        await writer.wait_closed()
        handlers_done.release()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    pool = http1.Pool("127.0.0.1", server.sockets[0].getsockname()[1])
    replies = [await pool.post("/", b"x") for _ in range(3)]
    pool.close()
    for _ in range(2):
        await asyncio.wait_for(handlers_done.acquire(), 5)
    server.close()
    await server.wait_closed()
    assert [(r.status, r.body) for r in replies] == [(200, b"ok")] * 3 and pool.opened == 2


async def test_http1_pool_refuses_replies_not_framed_by_content_length(serve: Serve) -> None:
    """A chunked reply raises ProtocolError instead of being misread."""

    async def chunked(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"{}")
        await response.write_eof()
        return response

    pool = http1.Pool("127.0.0.1", await serve(chunked))
    with pytest.raises(http1.ProtocolError, match="Transfer-Encoding"):
        await pool.post("/", b"x")
    pool.close()


async def test_http1_pool_times_out_a_reply_that_never_comes(serve: Serve) -> None:
    """A request with no reply fails with TimeoutError once its timeout has passed."""

    release = asyncio.Event()

    async def late(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response()

    pool = http1.Pool("127.0.0.1", await serve(late), timeout_s=0.2)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(pool.post("/", b"x"), 5)
    pool.close()
    release.set()


async def test_arrivals_counts_renames_and_times_out(tmp_path: Path) -> None:
    """Two renames to one name, unread in between, count twice; a missing name times out."""
    arrivals = Arrivals(tmp_path)
    try:
        for attempt in range(2):  # like the daemon: a temporary file beside the target
            (tmp_path / f".a.jpg.{attempt}.tmp").write_bytes(b"x")
            os.rename(tmp_path / f".a.jpg.{attempt}.tmp", tmp_path / "a.jpg")
        await arrivals.wait("a.jpg", 2, timeout_s=5)
        with pytest.raises(TimeoutError):
            await arrivals.wait("b.jpg", 1, timeout_s=0.1)
    finally:
        await arrivals.close()


@pytest.fixture
async def source_server(tmp_path: Path) -> AsyncIterator[tuple[int, dict[str, bytes]]]:
    """The source server on loopback over a JPEG (bigger than one socket write) and an SVG."""
    data = {"a.jpg": os.urandom(3_000_000), "b.svg": b'<svg xmlns="http://www.w3.org/2000/svg"/>'}
    for name, body in data.items():
        (tmp_path / name).write_bytes(body)
    runner = web.AppRunner(srcserver.make_app(tmp_path))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    assert runner.addresses
    yield runner.addresses[0][1], data
    await runner.cleanup()


async def test_srcserver_serves_exact_bytes_under_any_tag_and_404s_unknown_names(
    source_server: tuple[int, dict[str, bytes]],
) -> None:
    """Any <anything> segment gets the file's exact bytes and type; an unknown name gets 404."""
    port, data = source_server
    base = f"http://127.0.0.1:{port}/src"
    cases = [
        ("r0-1", "a.jpg", "image/jpeg"),
        ("r0-2", "a.jpg", "image/jpeg"),
        ("warm-7", "b.svg", "image/svg+xml"),
    ]
    async with aiohttp.ClientSession() as session:
        for tag, name, ctype in cases:
            async with session.get(f"{base}/{tag}/{name}") as resp:
                assert resp.status == 200 and resp.headers["Content-Type"] == ctype
                assert resp.content_length == len(data[name])
                assert await resp.read() == data[name]
        async with session.get(f"{base}/r0-3/missing.jpg") as resp:
            assert resp.status == 404
        async with session.post(f"{base}/r0-4/a.jpg") as resp:
            assert resp.status == 405

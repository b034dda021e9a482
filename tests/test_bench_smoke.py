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
from typing import Any

import aiohttp
import pytest
import pyvips
from aiohttp import web
from bench import http1, report, srcserver, workloads
from bench.runner import Phase, Results
from bench.systems import limit
from bench.systems.imgserve import Arrivals, Daemon, JobFailed
from bench.systems.imgserve import Client as ImgserveClient

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.serial  # a speed ratio: measured with no other test running
def test_bench_smoke_measures_every_workload_with_all_jobs_done(tmp_path: Path) -> None:
    """`python -m bench --smoke` yields ratios > 0 per workload (renditions' POST /jobs
    included) and no failed or lost job."""
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
    phases = [p for p in data["phases"] if p["system"].startswith("imgserve")]
    assert {p["workload"] for p in phases} == set(names)
    # renditions is also measured without placeholders
    assert {p["workload"] for p in phases if p["system"] == "imgserve-noph"} == {"renditions"}
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


# ---- the renditions workload: what each system is asked, and how imgserve's
# completion is followed (the request bodies are pure; the rest runs on loopback)

RENDITIONS = workloads.BY_NAME["renditions"]
SOURCES = ["a.jpg", "b.jpg", "c.jpg"]


def test_renditions_request_grows_every_width_with_the_request_number() -> None:
    """Request i makes the 5 outputs with each width + i % WIDTH_SPREAD and rotates sources."""
    for index in (0, 1, 30, 57):
        req = workloads.request(RENDITIONS, SOURCES, index)
        grow = index % workloads.WIDTH_SPREAD
        assert req.source == SOURCES[index % 3]
        assert [(o.width, o.height) for o in req.outputs] == [
            (2048 + grow, None), (1280 + grow, None), (640 + grow, None), (320 + grow, None),
            (200 + grow, 200),
        ]  # fmt: skip
        assert {o.out_ext for o in req.outputs} == {"jpg"}


@pytest.mark.parametrize("placeholder", [True, False])
def test_renditions_jobs_body_is_one_source_with_five_outputs(placeholder: bool) -> None:
    """POST /jobs: the tagged source, 5 unique file:// outputs at Q 80, the last a cover box."""
    req = workloads.request(RENDITIONS, SOURCES, 31)
    body = workloads.jobs_body(RENDITIONS, req, "http://127.0.0.1:9/", "/out/", "r0i", placeholder)
    assert body["source"] == "http://127.0.0.1:9/src/r0i-31/b.jpg"
    assert body["placeholder"] is placeholder
    outputs = body["outputs"]
    assert [o["width"] for o in outputs] == [2050, 1282, 642, 322, 202]
    assert all(o["quality"] == workloads.JPEG_QUALITY for o in outputs)
    assert all("height" not in o and "fit" not in o for o in outputs[:4])
    assert (outputs[4]["height"], outputs[4]["fit"]) == (200, "cover")
    assert "gravity" not in outputs[4]  # imgserve's default gravity is centre
    urls = [o["url"] for o in outputs]
    assert len(set(urls)) == 5
    assert all(u.startswith("file:///out/renditions-r0i-31-") and u.endswith(".jpg") for u in urls)
    assert "{$" not in "".join(urls)  # names known before the reply


def test_renditions_is_not_sent_to_the_one_output_endpoint() -> None:
    """imgserve_body (0.2's POST /) refuses a several-output workload."""
    req = workloads.request(RENDITIONS, SOURCES, 0)
    with pytest.raises(ValueError, match="POST /jobs"):
        workloads.imgserve_body(RENDITIONS, req, "http://h", "/out", "t")


def test_one_output_bodies_keep_their_post_shape() -> None:
    """jpeg-fill's POST / body is 0.2's contract, as before the outputs refactor."""
    fill = workloads.BY_NAME["jpeg-fill-200x120"]
    body = workloads.imgserve_body(fill, workloads.request(fill, SOURCES, 2), "http://h", "/o", "t")
    assert body == {
        "operationType": "resize",
        "srcURL": "http://h/src/t-2/c.jpg",
        "dstURL": "file:///o/jpeg-fill-200x120-t-2-{$width}x{$height}.jpg",
        "args": {"width": 202, "height": 120, "gravity": "centre", "quality": 80},
    }


def test_renditions_thumbor_paths_are_five_requests_of_one_source() -> None:
    """thumbor gets one unsafe URL per output: width-only fits and a centred 200x200 fill-crop."""
    req = workloads.request(RENDITIONS, SOURCES, 1)
    paths = workloads.thumbor_paths(RENDITIONS, req, "127.0.0.1:9", "r0t")
    tail = "/filters:quality(80)/127.0.0.1:9/src/r0t-1/b.jpg"
    assert paths == [
        f"/unsafe/2049x0{tail}", f"/unsafe/1281x0{tail}", f"/unsafe/641x0{tail}",
        f"/unsafe/321x0{tail}", f"/unsafe/201x200{tail}",
    ]  # fmt: skip


def test_limit_makes_every_rendition_from_the_source_bytes() -> None:
    """The bare loop's render() makes each output at its asked size, as JPEG."""
    source = pyvips.Image.black(2200, 1375).jpegsave_buffer()
    req = workloads.request(RENDITIONS, ["x.jpg"], 3)
    sizes = []
    for out in req.outputs:
        image = pyvips.Image.new_from_buffer(limit.render(out, source), "")
        assert image.get("vips-loader") == "jpegload_buffer"
        sizes.append((image.width, image.height))
        assert sizes[-1] == workloads.expected_size(out, (2200, 1375))
    assert sizes[-1] == (203, 200) and limit.process(req, source) > 0


@pytest.mark.parametrize("placeholder", [True, False])
async def test_imgserve_client_follows_a_jobs_request_until_every_output_is_in(
    tmp_path: Path, serve_jobs: ServeJobs, placeholder: bool
) -> None:
    """Client posts /jobs, expects 202, and is done only when all 5 results have arrived."""
    port, posted, finish = await serve_jobs(tmp_path)
    daemon = Daemon(tmp_path / "state", tmp_path, port, workers=1)
    pool = http1.Pool("127.0.0.1", port)
    arrivals = Arrivals(tmp_path)
    try:
        client = ImgserveClient(
            pool, daemon, arrivals, RENDITIONS, SOURCES, "http://src", "t", placeholder
        )
        submitted = await client.submit(4)
        assert submitted[0] == "job-1" and posted[0]["placeholder"] is placeholder
        waiting = asyncio.create_task(client.wait_done(submitted))
        await finish(4)  # four of the five results: their waits end, the fifth's goes on
        deadline = asyncio.get_running_loop().time() + 5
        while len(arrivals.waiters) != 1 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert len(arrivals.waiters) == 1 and not waiting.done()
        await finish(1)
        await asyncio.wait_for(waiting, 5)
        assert [path for path, _out, _req in client.sample_dst] == [
            str(tmp_path / o["url"].rsplit("/", 1)[-1]) for o in posted[0]["outputs"]
        ]
    finally:
        pool.close()
        await arrivals.close()


async def test_imgserve_client_reports_a_refused_jobs_request(
    tmp_path: Path, serve_jobs: ServeJobs
) -> None:
    """A POST /jobs reply other than 202 raises JobFailed with the status."""
    port, _posted, _finish = await serve_jobs(tmp_path, status=400)
    pool = http1.Pool("127.0.0.1", port)
    arrivals = Arrivals(tmp_path)
    try:
        client = ImgserveClient(
            pool, Daemon(tmp_path, tmp_path, port, 1), arrivals, RENDITIONS, SOURCES, "h", "t"
        )
        with pytest.raises(JobFailed, match="POST /jobs -> 400"):
            await client.submit(0)
    finally:
        pool.close()
        await arrivals.close()


Finish = Callable[[int], Awaitable[None]]
ServeJobs = Callable[..., Awaitable[tuple[int, list[dict[str, Any]], Finish]]]


@pytest.fixture
async def serve_jobs() -> AsyncIterator[ServeJobs]:
    """A loopback stand-in for the daemon's POST /jobs, by the contract of issue #12:
    placeholders renamed into place before the 202 reply (when asked), results
    renamed into place when the test says so."""
    runners: list[web.AppRunner] = []

    async def start(out_dir: Path, status: int = 202) -> tuple[int, list[dict[str, Any]], Finish]:
        posted: list[dict[str, Any]] = []
        pending: list[str] = []

        def put(name: str, serial: int) -> None:
            tmp = out_dir / f".{name}.{serial}.tmp"  # like the daemon: rename into place
            tmp.write_bytes(b"x")
            os.rename(tmp, out_dir / name)

        async def jobs(request: web.Request) -> web.Response:
            body = await request.json()
            if status != 202:
                return web.json_response({"code": 100, "message": "refused"}, status=status)
            posted.append(body)
            for out in body["outputs"]:
                name = out["url"].rsplit("/", 1)[-1]
                if body["placeholder"]:
                    put(name, 0)
                pending.append(name)
            outputs = [{"url": o["url"], "width": o["width"]} for o in body["outputs"]]
            reply = {"jobId": f"job-{len(posted)}", "state": "queued", "outputs": outputs}
            return web.json_response(reply, status=202)

        async def finish(count: int) -> None:
            for _ in range(count):
                put(pending.pop(0), 1)

        app = web.Application()
        app.router.add_post("/jobs", jobs)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return int(runner.addresses[0][1]), posted, finish

    yield start
    for runner in runners:
        await runner.cleanup()


def test_report_counts_renditions_in_outputs_and_judges_its_targets() -> None:
    """The renditions table shows outputs/s = 5 x sources/s, its ratios and 1.6x/2.2x verdicts."""
    options = {
        "rounds": 1, "seconds": 3.0, "warmup_s": 0.5, "workers": 2, "in_flight": 8,
        "workloads": [{"name": "renditions"}],
    }  # fmt: skip
    rates = {"limit": 2.0, "imgserve": 4.0, "imgserve-noph": 4.4, "thumbor": 2.0}
    phases = [
        Phase(round=0, workload="renditions", system=system, per_s=per_s, completed=10,
              window_s=3.0, outputs_per_job=5, latency_p50_ms=100.0, latency_p95_ms=150.0)
        for system, per_s in rates.items()
    ]  # fmt: skip
    results = Results(options=options, phases=phases, available={"imgserve": True, "thumbor": True})
    text = report.markdown(results)
    assert "| imgserve (one POST /jobs, placeholders) | 20.0 | 4.0 | 100 / 150 |" in text
    assert "| bare loop (5 thumbnail_buffer calls per source) | 10.0 | 2.0 |" in text
    verdicts = {v.target: v.word for v in report.verdicts(results)}
    assert verdicts["renditions: imgserve >= 1.60x limit"] == "PASS"  # 2.0
    assert verdicts["renditions: imgserve >= 2.2x thumbor"] == "FAIL"  # 2.0
    ratios = report.summary(results)["ratios"]["renditions"]
    assert ratios["imgserve-noph/limit"]["median"] == pytest.approx(2.2)

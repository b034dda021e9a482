"""The client against real aiohttp servers playing imgserve: its retries (503 with
Retry-After then 202, a key's 429 until the attempts run out, no server at all) and
its waits on an event stream that is quiet but for pings."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from imgserve.client import (
    APIError,
    AsyncClient,
    AuthError,
    Client,
    Retries,
    ServiceError,
    TransportError,
    WaitTimeout,
)
from tests.servers import free_port

JOB_ID = "3f0c9a7e2b1d4c58a6e0f1b2c3d4e5f6"
ACCEPTED = {
    "jobId": JOB_ID,
    "state": "queued",
    "outputs": [{"url": "file:///o/a-64.webp", "width": 64, "height": 48, "format": "webp"}],
}
OUTPUTS = [{"url": "file:///o/{$basename}-{$width}.webp", "width": 64}]


@dataclass
class Busy:
    """Answers ``POST /jobs`` with ``script`` (status, code, Retry-After), then 202;
    records each request's arrival and Idempotency-Key."""

    script: list[tuple[int, int, str | None]]
    seen: list[tuple[float, str | None, bytes]] = field(default_factory=list)

    async def post_jobs(self, request: web.Request) -> web.Response:
        self.seen.append(
            (time.monotonic(), request.headers.get("Idempotency-Key"), await request.read())
        )
        if self.script:
            status, code, retry_after = self.script.pop(0)
            headers = {"Retry-After": retry_after} if retry_after else None
            body = {"msg": "queue full, retry later", "code": code, "detail": "busy"}
            return web.json_response(body, status=status, headers=headers)
        return web.json_response(ACCEPTED, status=202, headers={"Location": f"/jobs/{JOB_ID}"})


@pytest.fixture
async def busy_server() -> AsyncIterator[tuple[Busy, TestServer]]:
    """A real HTTP server on loopback playing a daemon whose queue is full at first."""
    busy = Busy(script=[])
    app = web.Application()
    app.router.add_post("/jobs", busy.post_jobs)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield busy, server
    await server.close()


def _url(server: TestServer) -> str:
    return f"http://127.0.0.1:{server.port}"


async def test_503_is_retried_after_retry_after_with_the_same_key(
    busy_server: tuple[Busy, TestServer],
) -> None:
    """503 (602) with ``Retry-After: 1``, then 202: AsyncClient waits about a second,
    sends the same request with the same Idempotency-Key, and returns the job."""
    busy, server = busy_server
    busy.script = [(503, 602, "1")]
    async with AsyncClient(_url(server), retries=Retries(wait_initial_s=0.01)) as client:
        job = await client.submit("https://e.example/a.jpg", OUTPUTS)
    assert job.id == JOB_ID and job.outputs[0].width == 64
    (t0, key0, body0), (t1, key1, body1) = busy.seen
    assert key0 and key0 == key1 and body0 == body1
    assert json.loads(body0)["source"] == "https://e.example/a.jpg"
    assert t1 - t0 >= 0.9  # Retry-After, not the 0.01 s backoff


async def test_sync_client_retries_503_too(busy_server: tuple[Busy, TestServer]) -> None:
    """The blocking Client retries the same way: two 503s (the second without
    Retry-After, so stamina's backoff), then the job; one key throughout."""
    busy, server = busy_server
    busy.script = [(503, 611, "1"), (503, 604, None)]

    def submit() -> str:
        with Client(_url(server), retries=Retries(wait_initial_s=0.05)) as client:
            return client.submit("https://e.example/a.jpg", OUTPUTS).id

    assert await asyncio.to_thread(submit) == JOB_ID
    assert len(busy.seen) == 3
    assert len({key for _, key, _ in busy.seen}) == 1


async def test_retries_are_bounded(busy_server: tuple[Busy, TestServer]) -> None:
    """A key's 429 (144) every time: after ``attempts`` tries it is raised as an
    AuthError with its code and Retry-After; a 409 613 (not retryable) is raised at
    once."""
    busy, server = busy_server
    busy.script = [(429, 144, "0")] * 3 + [(409, 613, None)]
    retries = Retries(attempts=3, wait_initial_s=0.01, wait_max_s=0.05)
    async with AsyncClient(_url(server), retries=retries) as client:
        with pytest.raises(AuthError) as caught:
            await client.submit("https://e.example/a.jpg", OUTPUTS)
        assert (caught.value.status, caught.value.code, caught.value.retry_after_s) == (
            429,
            144,
            0.0,
        )
        assert len(busy.seen) == 3
        with pytest.raises(ServiceError) as not_retried:
            await client.submit("https://e.example/a.jpg", OUTPUTS)
        assert not_retried.value.code == 613
        assert len(busy.seen) == 4


async def test_no_daemon_is_a_transport_error() -> None:
    """Nothing listening: retried, then TransportError naming the URL, with httpx's
    exception as its cause."""
    url = f"http://127.0.0.1:{free_port()}"
    retries = Retries(attempts=2, wait_initial_s=0.01)
    async with AsyncClient(url, retries=retries) as client:
        with pytest.raises(TransportError, match=r"/jobs/") as caught:
            await client.get(JOB_ID)
    assert caught.value.__cause__ is not None


@dataclass
class Quiet:
    """Plays a daemon's ``GET /events`` and ``GET /jobs/<id>``: the stream sends only
    ``: ping`` comments (every ``ping_s``) until ``end`` is set, then a change event
    ending each job; a job reads running until then. Counts the streams opened and
    the reads of each job."""

    ping_s: float = 0.5
    end: asyncio.Event = field(default_factory=asyncio.Event)
    streams: int = 0
    reads: list[str] = field(default_factory=list)

    async def events(self, request: web.Request) -> web.StreamResponse:
        self.streams += 1
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        while not self.end.is_set():
            await response.write(b": ping\n\n")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.ping_s):
                    await self.end.wait()
        for n, job_id in enumerate(sorted(set(self.reads)), 1):
            data = json.dumps({"jobId": job_id, "state": "done", "at": 1.0})
            await response.write(f"id: {n}\nevent: job.done\ndata: {data}\n\n".encode())
        while True:  # the stream stays open, as the daemon's does
            await response.write(b": ping\n\n")
            await asyncio.sleep(self.ping_s)

    async def job(self, request: web.Request) -> web.Response:
        job_id = request.match_info["id"]
        self.reads.append(job_id)
        state = "done" if self.end.is_set() else "running"
        return web.json_response({"jobId": job_id, "state": state, "outputs": []})


@pytest.fixture
async def quiet_server() -> AsyncIterator[tuple[Quiet, TestServer]]:
    """A real HTTP server on loopback whose event stream is quiet but for pings."""
    quiet = Quiet()
    app = web.Application()
    app.router.add_get("/events", quiet.events)
    app.router.add_get("/jobs/{id}", quiet.job)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield quiet, server
    await server.close()


async def test_sync_wait_times_out_on_a_stream_of_pings(
    quiet_server: tuple[Quiet, TestServer],
) -> None:
    """A stream that pings every 0.5 s and never says the job ended: the blocking
    ``wait(timeout_s=2)`` raises WaitTimeout after about 2 s (the pings kept httpx's
    read timeout from firing), carrying the job as last seen."""
    quiet, server = quiet_server

    def wait() -> tuple[float, WaitTimeout]:
        started = time.monotonic()
        with Client(_url(server)) as client:
            try:
                client.wait(JOB_ID, timeout_s=2)
            except WaitTimeout as exc:
                return time.monotonic() - started, exc
        raise AssertionError("wait returned")

    waiting = asyncio.ensure_future(asyncio.to_thread(wait))
    await asyncio.wait({waiting}, timeout=10)
    quiet.end.set()  # a wait that missed its deadline ends now (and fails the test)
    waited_s, timeout = await waiting
    assert 2 <= waited_s < 4
    assert timeout.job is not None and (timeout.job.id, timeout.job.state) == (JOB_ID, "running")


async def _until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Returns once ``condition()`` holds (checked every 10 ms), fails after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


IDS = [f"{i:032x}" for i in range(8)]


async def test_async_waits_share_one_stream(quiet_server: tuple[Quiet, TestServer]) -> None:
    """Four concurrent ``wait()``s on an AsyncClient of four connections: one event
    stream serves them all (each wait used to hold one, leaving no connection for
    its GET /jobs/<id>: PoolTimeout), and each returns its job once the stream says
    it ended."""
    quiet, server = quiet_server
    async with AsyncClient(_url(server), max_connections=4, timeout_s=3) as client:
        waits = [asyncio.create_task(client.wait(i, timeout_s=20, poll_s=60)) for i in IDS[:4]]
        await _until(lambda: set(IDS[:4]) <= set(quiet.reads))
        quiet.end.set()
        ended = await asyncio.gather(*waits)
    assert [(j.id, j.state) for j in ended] == [(i, "done") for i in IDS[:4]]
    assert quiet.streams == 1


async def test_sync_waits_bound_their_streams(quiet_server: tuple[Quiet, TestServer]) -> None:
    """Eight threads waiting on one blocking Client: at most ``Client.max_streams``
    event streams are open (the rest poll), and every wait returns its job done."""
    quiet, server = quiet_server
    loop = asyncio.get_running_loop()
    with (
        Client(_url(server), retries=Retries(attempts=1)) as client,
        ThreadPoolExecutor(len(IDS)) as threads,
    ):
        wait = functools.partial(client.wait, timeout_s=20, poll_s=0.2)
        waits = [loop.run_in_executor(threads, wait, i) for i in IDS]
        await _until(lambda: set(IDS) <= set(quiet.reads))
        streams = quiet.streams
        quiet.end.set()
        ended = await asyncio.gather(*waits)
    assert [(j.id, j.state) for j in ended] == [(i, "done") for i in IDS]
    assert 1 <= streams <= client.max_streams < len(IDS)


@pytest.mark.parametrize("call", ["redeliver_webhook", "cancel"])
async def test_a_request_without_a_key_is_not_sent_twice_after_no_reply(call: str) -> None:
    """``redeliver_webhook`` (a POST without Idempotency-Key) and ``cancel`` whose
    reply never comes (a read timeout): not sent again, since the first may have
    been acted on (a second delivery; a 409 613 for the cancel that worked); the
    TransportError is raised after the one try."""
    seen: list[str] = []
    never = asyncio.Event()

    async def silent(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path}")
        await never.wait()
        raise AssertionError("unreachable")  # pragma: no cover

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", silent)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    retries = Retries(attempts=3, wait_initial_s=0.01)
    try:
        async with AsyncClient(_url(server), timeout_s=0.3, retries=retries) as client:
            with pytest.raises(TransportError, match="ReadTimeout"):
                await getattr(client, call)(JOB_ID)
        assert len(seen) == 1, seen
    finally:
        never.set()
        await server.close()


@pytest.mark.parametrize(("status", "body"), [(502, b"<html>Bad Gateway</html>"), (200, b"ok")])
async def test_health_that_is_not_json_is_an_api_error(status: int, body: bytes) -> None:
    """``health()`` answered by something that is not imgserve (a proxy's page, a
    plain "ok"): APIError with the status and the start of the body, from both
    clients, not a ValueError."""

    async def page(request: web.Request) -> web.Response:
        return web.Response(status=status, body=body, content_type="text/html")

    app = web.Application()
    app.router.add_get("/health", page)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with AsyncClient(_url(server)) as client:
            with pytest.raises(APIError) as caught:
                await client.health()
        assert (caught.value.status, caught.value.code) == (status, 0)

        def sync_health() -> None:
            with Client(_url(server)) as client:
                client.health()

        with pytest.raises(APIError) as caught:
            await asyncio.to_thread(sync_health)
        assert body.decode()[:10] in caught.value.detail
    finally:
        await server.close()

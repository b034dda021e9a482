"""imgserve.client against the real daemon: submit bytes, files and URLs, get, list,
cancel, wait on the event stream and by polling when the stream is refused, error
codes as exceptions, Idempotency-Key replays, and a real webhook event verified."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pyvips
from aiohttp import web

from imgserve.client import (
    AsyncClient,
    AuthError,
    Client,
    InvalidWebhook,
    JobNotFound,
    JobState,
    RequestError,
    Retries,
    ServiceError,
    SourceError,
    Upload,
    ValidationError,
    WaitTimeout,
    verify_event,
)
from tests.e2e.conftest import IMGSERVE, Daemon, jpeg, serve
from tests.e2e.test_keys import keys_add
from tests.servers import HTTPTestServer
from tests.webhook_receiver import Receiver, receiver_fixture  # noqa: F401 - a fixture

pytestmark = pytest.mark.slow

SECRET = "whsec_" + base64.b64encode(b"imgserve client test secret key!").decode()
SLOW = b"IMGSERVE-FAULT-DELAY=1"  # a worker sleeps 1 s on this source (fault injection)


@pytest.fixture(scope="module")
def daemon(start_module_daemon: Any, tmp_path_factory: pytest.TempPathFactory) -> Daemon:
    """One worker (two runner slots), webhook events signed with SECRET."""
    secrets = tmp_path_factory.mktemp("secrets") / "webhook-secrets"
    secrets.write_text(SECRET + "\n")
    secrets.chmod(0o600)
    started: Daemon = start_module_daemon(
        "--workers", "1", "--webhook-secrets-file", str(secrets),
        "--set", "webhook_schedule_s=0,0.2", "--set", "webhook_timeout_s=2",
    )  # fmt: skip
    return started


@pytest.fixture
def client(daemon: Daemon) -> Iterator[Client]:
    with Client(daemon.url) as c:
        yield c


def out(daemon: Daemon, name: str) -> list[dict[str, Any]]:
    return [{"url": f"file://{daemon.out_dir}/{name}/{{$basename}}-{{$width}}.webp", "width": 64}]


def test_submit_bytes_and_a_file_then_wait(client: Client, daemon: Daemon, tmp_path: Path) -> None:
    """An Upload and a local path are sent as multipart; each job ends done, its
    output a 64 px wide webp at the URL the reply gave."""
    path = tmp_path / "Beach.jpg"
    path.write_bytes(jpeg(320, 240))
    for source, name in ((Upload(jpeg(200, 100), "Sea.jpg"), "Sea"), (path, "Beach")):
        job = client.submit(source, out(daemon, "up"))
        assert job.state is JobState.QUEUED
        (output,) = job.outputs
        assert output.url == f"file://{daemon.out_dir}/up/{name}-64.webp"
        done = client.wait(job, timeout_s=30)
        assert done.state is JobState.DONE and done.src_url is None
        assert done.outputs[0].bytes == (daemon.out_dir / f"up/{name}-64.webp").stat().st_size
        image = pyvips.Image.new_from_file(str(daemon.out_dir / f"up/{name}-64.webp"))
        assert (image.width, image.height) == (64, output.height)


def test_submit_a_url_then_get_and_list(
    client: Client, daemon: Daemon, http_server: HTTPTestServer
) -> None:
    """A URL source as JSON: get shows the typed view (source info, metadata,
    priority); list and iter_jobs find it, filtered by state."""
    src = serve(http_server, "client/url.jpg", jpeg(320, 240))
    job = client.submit(src, out(daemon, "url"), metadata={"post": 7}, priority="batch")
    done = client.wait(job, timeout_s=30)
    seen = client.get(job.id)
    assert (seen.state, seen.src_url, seen.metadata, seen.priority) == (
        JobState.DONE, src, {"post": 7}, "batch",
    )  # fmt: skip
    assert seen.source_info is not None
    assert (seen.source_info.width, seen.source_info.format) == (320, "jpeg")
    assert seen.outputs[0].blurhash and seen.outputs[0].dominant_color
    assert done.outputs == seen.outputs
    page = client.list_jobs(state="done", limit=1)
    assert len(page.jobs) == 1 and page.next_cursor is not None
    assert job.id in {j.id for j in client.iter_jobs(state=JobState.DONE, page_size=2)}
    assert job.id not in {j.id for j in client.iter_jobs(state="failed")}


def test_cancel_a_queued_job(client: Client, daemon: Daemon, tmp_path: Path) -> None:
    """With both runner slots taken by slow jobs, a third job waits queued: cancel
    makes it cancelled and it never writes its output; cancelling a job that ended
    is 409, code 613, as a ServiceError."""
    slow = [
        client.submit(Upload(jpeg(64, 64, SLOW), f"slow{i}.jpg"), out(daemon, "c"))
        for i in range(2)
    ]
    queued = client.submit(Upload(jpeg(64, 64), "victim.jpg"), out(daemon, "c"), placeholder=False)
    cancelled = client.cancel(queued)
    assert cancelled.state is JobState.CANCELLED
    for job in slow:
        assert client.wait(job, timeout_s=30).state is JobState.DONE
    assert client.wait(queued, timeout_s=5).state is JobState.CANCELLED
    assert not (daemon.out_dir / "c/victim-64.webp").exists()
    with pytest.raises(ServiceError) as caught:
        client.cancel(slow[0])
    assert (caught.value.status, caught.value.code) == (409, 613)


def test_wait_follows_the_event_stream(client: Client, daemon: Daemon) -> None:
    """``wait`` with a 60 s poll interval still returns as the job ends (about 1 s):
    it heard the end on GET /events. ``events()``, opened before the job, shows the
    job's changes in order, ending with done."""
    with Client(daemon.url) as watcher, watcher.events() as changes:
        job = client.submit(Upload(jpeg(64, 64, SLOW), "streamed.jpg"), out(daemon, "sse"))
        started = time.monotonic()
        done = client.wait(job, timeout_s=30, poll_s=60)
        assert done.state is JobState.DONE
        assert time.monotonic() - started < 10
        seen = []
        for change in changes:
            if change.job_id == job.id:
                seen.append(change)
                if change.ended:
                    break
    assert [c.state for c in seen] == [JobState.QUEUED, JobState.RUNNING, JobState.DONE]
    with Client(daemon.url) as watcher, watcher.events(after=seen[0].id) as again:
        replayed = next(c for c in again if c.job_id == job.id)
    assert replayed == seen[1]  # Last-Event-ID: right after the change named


def test_wait_gives_up_after_its_timeout(client: Client, daemon: Daemon) -> None:
    """A job still running when ``timeout_s`` runs out: WaitTimeout, from both
    clients, carrying the job as last seen (AsyncClient's)."""
    job = client.submit(Upload(jpeg(64, 64, SLOW), "late.jpg"), out(daemon, "late"))
    with pytest.raises(WaitTimeout):
        client.wait(job, timeout_s=0.2)

    async def async_wait() -> WaitTimeout:
        async with AsyncClient(daemon.url) as aclient:
            try:
                await aclient.wait(job, timeout_s=0.2)
            except WaitTimeout as exc:
                return exc
        raise AssertionError("no WaitTimeout")

    late = asyncio.run(async_wait())
    assert late.job is not None and late.job.id == job.id and not late.job.ended
    assert client.wait(job, timeout_s=30).state is JobState.DONE


class NoEvents:
    """An aiohttp reverse proxy in front of the daemon that refuses ``GET /events``
    as a daemon with every stream taken does (503, code 615) and forwards the rest;
    it counts what it got."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.hits: list[str] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(f"{request.method} {request.path}")
        if request.path == "/events":
            body = {"msg": "too many event streams open, retry later", "code": 615,
                    "detail": "64 event streams open"}  # fmt: skip
            return web.json_response(body, status=503, headers={"Retry-After": "2"})
        async with httpx.AsyncClient() as upstream:
            reply = await upstream.request(
                request.method, self.upstream + request.path_qs,
                headers={k: v for k, v in request.headers.items() if k.lower() != "host"},
                content=await request.read(),
            )  # fmt: skip
        headers = {k: v for k, v in reply.headers.items() if k.lower() == "content-type"}
        return web.Response(status=reply.status_code, body=reply.content, headers=headers)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = runner.addresses[0][1]
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    def __enter__(self) -> NoEvents:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def test_wait_polls_when_the_stream_is_refused(daemon: Daemon) -> None:
    """Behind a proxy that answers GET /events with 503 (615), both clients' ``wait``
    fall back to polling GET /jobs/<id> and return the job done, at once: the
    stream's 503 is not retried."""
    with NoEvents(daemon.url) as proxy:
        with Client(proxy.url) as client:
            job = client.submit(Upload(jpeg(64, 64, SLOW), "polled.jpg"), out(daemon, "poll"))
            assert client.wait(job, timeout_s=30, poll_s=0.2).state is JobState.DONE
        polls = [hit for hit in proxy.hits if hit == f"GET /jobs/{job.id}"]
        assert proxy.hits.count("GET /events") == 1 and len(polls) >= 2

        async def async_wait() -> JobState:
            async with AsyncClient(proxy.url) as aclient:
                ajob = await aclient.submit(
                    Upload(jpeg(64, 64, SLOW), "apolled.jpg"), out(daemon, "poll")
                )
                return (await aclient.wait(ajob, timeout_s=30, poll_s=0.2)).state

        assert asyncio.run(async_wait()) is JobState.DONE
        assert proxy.hits.count("GET /events") == 2


def test_async_client_submits_and_waits_on_the_stream(daemon: Daemon) -> None:
    """AsyncClient: ten jobs at once, waited on together (one shared event stream), all done."""

    async def run() -> list[JobState]:
        async with AsyncClient(daemon.url) as client:
            jobs = await asyncio.gather(
                *(
                    client.submit(Upload(jpeg(80, 60), f"a{i}.jpg"), out(daemon, "async"))
                    for i in range(10)
                )
            )
            ended = await asyncio.gather(*(client.wait(j, timeout_s=30, poll_s=60) for j in jobs))
            return [j.state for j in ended]

    assert asyncio.run(run()) == [JobState.DONE] * 10
    assert len(list((daemon.out_dir / "async").glob("a*-64.webp"))) == 10


def test_errors_carry_their_codes(
    client: Client, daemon: Daemon, http_server: HTTPTestServer
) -> None:
    """An unknown job is JobNotFound (605); a bad width a ValidationError (703) whose
    detail names the field; a source that is not there a SourceError (201)."""
    with pytest.raises(JobNotFound) as missing:
        client.get("0" * 32)
    assert (missing.value.status, missing.value.code) == (404, 605)
    with pytest.raises(ValidationError) as invalid:
        client.submit("https://e.example/a.jpg", [{"url": "file:///x/a.webp", "width": -5}])
    assert invalid.value.code == 703 and invalid.value.detail.startswith("outputs[0].width")
    with pytest.raises(SourceError) as gone:
        client.submit(str(http_server.url("/files/client/missing.jpg")), out(daemon, "err"))
    assert (gone.value.status, gone.value.code) == (422, 201)


def test_idempotency_key_replays_and_refuses_another_request(
    client: Client, daemon: Daemon
) -> None:
    """The same key with the same request answers the first job again (replayed);
    with another request it is refused with 130."""
    source = Upload(jpeg(64, 64), "same.jpg")
    first = client.submit(source, out(daemon, "idem"), idempotency_key="client-test-1")
    again = client.submit(source, out(daemon, "idem"), idempotency_key="client-test-1")
    assert again.id == first.id
    assert (first.replayed, again.replayed) == (False, True)
    with pytest.raises(RequestError) as reused:
        client.submit(
            Upload(jpeg(64, 64), "other.jpg"), out(daemon, "idem"), idempotency_key="client-test-1"
        )
    assert (reused.value.status, reused.value.code) == (422, 130)
    fresh = client.submit(source, out(daemon, "idem"))  # a key of its own: a new job
    assert fresh.id != first.id


def test_a_real_event_verifies(client: Client, daemon: Daemon, receiver: Receiver) -> None:
    """The daemon's job.completed event to a receiver verifies with verify_event and
    reads typed; the same request with its body changed does not."""
    job = client.submit(
        Upload(jpeg(64, 48), "hooked.jpg"),
        out(daemon, "hook"),
        webhook=receiver.url(),
        metadata={"n": 1},
    )
    (request,) = receiver.wait_for(1)
    event = verify_event(request.headers, request.body, SECRET)
    assert (event.type, event.job_id, event.state) == ("job.completed", job.id, JobState.DONE)
    assert event.id == request.headers["webhook-id"] and event.metadata == {"n": 1}
    assert (event.outputs[0].width, event.outputs[0].height) == (64, 48)
    tampered = request.body.replace(b"hooked", b"hacked")
    assert tampered != request.body
    with pytest.raises(InvalidWebhook):
        verify_event(request.headers, tampered, SECRET)


def test_api_keys(start_daemon: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a keys file: no key is AuthError 140; a key (given, or from
    IMGSERVE_API_KEY) submits, streams and waits, and the job is the key's; a key
    over its rate is 429 144, raised at once when its Retry-After is beyond the
    retries' timeout; ``imgserve submit`` reads its key from --api-key-file."""
    keys_file = tmp_path / "keys.toml"
    alice, limited = keys_add(keys_file, "alice"), keys_add(keys_file, "limited", "--rate", "0.05")
    daemon: Daemon = start_daemon("--keys", str(keys_file))
    with Client(daemon.url, api_key="") as anonymous, pytest.raises(AuthError) as caught:
        anonymous.list_jobs()
    assert (caught.value.status, caught.value.code) == (401, 140)
    monkeypatch.setenv("IMGSERVE_API_KEY", alice)
    with Client(daemon.url) as client:
        job = client.wait(
            client.submit(Upload(jpeg(64, 48), "k.jpg"), out(daemon, "keys")), poll_s=60
        )
        assert (job.state, job.key) == (JobState.DONE, "alice")
    retries = Retries(attempts=2, timeout_s=5, wait_initial_s=0.01)
    with Client(daemon.url, api_key=limited, retries=retries) as client:
        client.submit(Upload(jpeg(64, 48), "l1.jpg"), out(daemon, "keys"))
        started = time.monotonic()
        with pytest.raises(AuthError) as rate:
            client.submit(Upload(jpeg(64, 48), "l2.jpg"), out(daemon, "keys"))
        assert (rate.value.status, rate.value.code) == (429, 144)
        assert rate.value.retry_after_s is not None and rate.value.retry_after_s >= 1
        assert time.monotonic() - started < 5  # Retry-After (20 s) beyond timeout_s: at once
    key_file = tmp_path / "alice.key"
    key_file.write_text(alice + "\n")
    monkeypatch.delenv("IMGSERVE_API_KEY")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "cli.jpg").write_bytes(jpeg(64, 48))
    dst = f"file://{daemon.out_dir}/keys/{{$basename}}.png"
    result = subprocess.run(  # (IMGSERVE_API_KEY is unset now: the key comes from the file)
        [*IMGSERVE, "submit", "--url", daemon.url, "--api-key-file", str(key_file),
         str(tmp_path / "src"), "-o", dst, "--width", "8"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert (daemon.out_dir / "keys/cli.png").exists()

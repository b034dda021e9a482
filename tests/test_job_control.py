"""Job control through the API in-process (api.make_app around a real SQLite queue):
Idempotency-Key, cancel, list, priority, the webhook field, the SSE change stream
and webhook redelivery.

The API has no job runner here, so jobs stay queued until a test moves them on
through the queue itself (``consume`` with a handler that ends each job); a loopback
aiohttp server is the source, the destination (counting uploads) and nothing else.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pyvips
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from imgserve import api, errors
from imgserve.config import NetPolicy, ServerSettings, Settings, TransportSettings
from imgserve.planner import Planner
from imgserve.queue.base import Event, JobRecord, State
from imgserve.request_jobs import cursor_param, idempotency_key, list_query, validate_jobs
from tests.inprocess import API, start_api
from tests.test_webhooks import SECRET_A, dispatching, hook_settings
from tests.webhook_receiver import Receiver, receiver_fixture  # noqa: F401 - a fixture


def _jpeg(width: int = 64, height: int = 48) -> bytes:
    return bytes(pyvips.Image.black(width, height, bands=3).jpegsave_buffer())


@dataclass
class Loopback:
    """GET /src/<name> serves a JPEG (held while ``hold`` is clear, when ``held``);
    PUT /dst/<name> keeps what was uploaded, in order."""

    url: str = ""
    source: bytes = field(default_factory=_jpeg)
    held: bool = False
    hold: asyncio.Event = field(default_factory=asyncio.Event)
    missing: set[str] = field(default_factory=set)
    uploads: list[str] = field(default_factory=list)

    async def get(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name in self.missing:
            return web.Response(status=404)
        if self.held:
            await self.hold.wait()
        return web.Response(body=self.source, content_type="image/jpeg")

    async def put(self, request: web.Request) -> web.Response:
        await request.read()
        self.uploads.append(request.match_info["name"])
        return web.Response(status=201)


@pytest.fixture
async def loopback() -> AsyncIterator[Loopback]:
    server = Loopback()
    app = web.Application()
    app.router.add_get("/src/{name}", server.get)
    app.router.add_put("/dst/{name}", server.put)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield server
    server.hold.set()
    await runner.cleanup()


Start = Callable[..., Awaitable[API]]


@pytest.fixture
async def start(tmp_path: Path, shared_planner: Planner) -> AsyncIterator[Start]:
    """Start the API in-process (loopback allowed out; no job runner)."""
    started: list[API] = []

    async def start(**server: Any) -> API:
        allowed = server.pop("allow", (ipaddress.ip_network("127.0.0.0/8"),))
        transport = TransportSettings(policy=NetPolicy(allow_nets=allowed))
        settings = Settings(server=ServerSettings(**server), transport=transport)
        served = await start_api(tmp_path / f"q{len(started)}", shared_planner, settings)
        started.append(served)
        return served

    yield start
    for served in started:
        await served.stop()


@dataclass
class Answer:
    status: int
    body: Any
    headers: Any


async def call(base: str, method: str, path: str, body: Any = None, **headers: str) -> Answer:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, base + path, data=data, headers=headers) as resp,
    ):
        return Answer(resp.status, await resp.json(), resp.headers)


def v02_job(src: str, dst: str) -> dict[str, Any]:
    return {"operationType": "resize", "srcURL": src, "dstURL": dst, "args": {"width": 32}}


def v2_job(loop: Loopback, name: str, **more: Any) -> dict[str, Any]:
    return {
        "source": f"{loop.url}/src/{name}.jpg",
        "outputs": [{"url": f"{loop.url}/dst/{name}-{{$width}}.jpg", "width": 32}],
        **more,
    }


async def run_jobs(served: API, until: Callable[[], Awaitable[bool]]) -> list[str]:
    """Deliver queued jobs, ending each as done, until ``until()`` holds; the ids delivered."""
    queue = served.service.queue
    delivered: list[str] = []

    async def handler(record: JobRecord) -> None:
        delivered.append(record.id)
        await queue.complete(record.id, [100])

    stopping = asyncio.Event()
    consuming = asyncio.create_task(queue.consume(handler, 1, stopping))
    try:
        async with asyncio.timeout(20):
            while not await until():
                await asyncio.sleep(0.02)
    finally:
        stopping.set()
        await consuming
    return delivered


async def state_of(served: API, job_id: str) -> State:
    record = await served.service.queue.get(job_id)
    assert record is not None
    return record.state


# --- pure checks -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "fault"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("k" * 256, "256 characters"),
        ("a\x01b", "printable ASCII"),
        ("a\tb", "printable ASCII"),
        ("clé", "printable ASCII"),
    ],
)
def test_malformed_idempotency_keys_are_131(value: str, fault: str) -> None:
    """An empty, over-long or non-printable Idempotency-Key is 131, saying which."""
    with pytest.raises(errors.IdempotencyKeyInvalid) as info:
        idempotency_key(value)
    assert info.value.code == 131
    assert fault in info.value.detail


def test_idempotency_keys_of_255_printable_characters_pass() -> None:
    """A UUID, a key with spaces and punctuation, and one of 255 characters are kept as sent."""
    for value in ("3f0c9a7e-2b1d-4c58-a6e0-f1b2c3d4e5f6", "order 42/retry:1", "k" * 255):
        assert idempotency_key(value) == value


@pytest.mark.parametrize(
    ("params", "code", "start"),
    [
        ({"state": "finished"}, 703, "state: 'finished' is not one of queued"),
        ({"limit": "0"}, 703, "limit:"),
        ({"limit": "201"}, 703, "limit:"),
        ({"limit": "-1"}, 703, "limit:"),
        ({"limit": "٣"}, 703, "limit:"),
        ({"limit": "1e2"}, 703, "limit:"),
        ({"cursor": ""}, 703, "cursor:"),
        ({"cursor": "x" * 201}, 703, "cursor:"),
        ({"cursor": "a\nb"}, 703, "cursor:"),
        ({"page": "2"}, 702, "page: unknown field"),
    ],
)
def test_bad_list_parameters_name_the_parameter(
    params: dict[str, str], code: int, start: str
) -> None:
    """A bad state, limit or cursor is 703 and an unknown parameter 702, the detail
    starting with the parameter's name."""
    with pytest.raises(errors.ImgserveError) as info:
        list_query(params)
    assert info.value.code == code
    assert info.value.detail.startswith(start), info.value.detail


def test_list_parameters_defaults_and_values() -> None:
    """No parameter: every state, 50 a page, from the newest; each one is read."""
    assert list_query({}) == (None, 50, None)
    assert list_query({"state": "failed", "limit": "200", "cursor": "c1"}) == (
        State.FAILED,
        200,
        "c1",
    )
    assert cursor_param("after", "17") == "17"


def test_priority_and_webhook_fields() -> None:
    """priority is interactive or batch (interactive by default); webhook an http(s)
    URL with a host and a valid port, else 705 (703 when not a string)."""
    base = {"source": "http://h/a.jpg", "outputs": [{"url": "file:///t/a.jpg", "width": 9}]}
    spec = validate_jobs(base, max_outputs=4)
    assert (spec.priority, spec.webhook) == ("interactive", None)
    spec = validate_jobs(
        {**base, "priority": "batch", "webhook": "https://hooks.example.com/x"}, max_outputs=4
    )
    assert (spec.priority, spec.webhook) == ("batch", "https://hooks.example.com/x")
    refusals = [
        ({"priority": "Batch"}, 703, "priority: 'Batch' is not one of batch, interactive"),
        ({"priority": 1}, 703, "priority:"),
        ({"webhook": "ftp://h/x"}, 705, "webhook: scheme 'ftp'"),
        ({"webhook": "http:///x"}, 705, "webhook: the URL names no host"),
        ({"webhook": "https://h:99999/"}, 705, "webhook:"),
        ({"webhook": "http://h/\x00"}, 705, "webhook:"),
        ({"webhook": ["http://h/"]}, 703, "webhook: not a string"),
    ]
    for extra, code, start in refusals:
        with pytest.raises(errors.RequestInvalid) as info:
            validate_jobs({**base, **extra}, max_outputs=4)
        assert info.value.code == code, extra
        assert info.value.detail.startswith(start), info.value.detail


# --- Idempotency-Key -------------------------------------------------------------------


async def test_concurrent_identical_posts_make_one_job_and_one_placeholder(
    start: Start, loopback: Loopback
) -> None:
    """Ten POST /jobs at once with one key and one body: one job, one placeholder
    upload, and all ten replies are the first one (same jobId and Location)."""
    served = await start()
    loopback.held = True  # the first request waits in its download...
    callers: set[int] = set()
    reserve = served.service.queue.reserve_key

    async def counting_reserve(*args: Any) -> Any:  # the real call, counted per request
        callers.add(id(asyncio.current_task()))
        return await reserve(*args)

    served.service.queue.reserve_key = counting_reserve  # type: ignore[method-assign]
    job = v2_job(loopback, "same")
    posts = [
        asyncio.create_task(call(served.url, "POST", "/jobs", job, **{"Idempotency-Key": "k-1"}))
        for _ in range(10)
    ]
    async with asyncio.timeout(20):  # ...until all ten hold or wait on the key
        while len(callers) < 10:
            await asyncio.sleep(0.01)
    loopback.hold.set()
    answers = await asyncio.gather(*posts)
    assert {a.status for a in answers} == {202}, [a.body for a in answers]
    assert len({a.body["jobId"] for a in answers}) == 1
    assert {a.headers["Location"] for a in answers} == {f"/jobs/{answers[0].body['jobId']}"}
    assert sum(a.headers.get("Idempotent-Replayed") == "true" for a in answers) == 9
    assert (await served.service.queue.counts())["queued"] == 1
    assert loopback.uploads == ["same-32.jpg"]


async def test_a_replay_after_the_reply_returns_it_without_a_second_job(
    start: Start, loopback: Loopback
) -> None:
    """The same key and body after the first reply: the same status, body and
    Location, marked replayed; on POST / too (0.2's reply)."""
    served = await start()
    job = v2_job(loopback, "once")
    first = await call(served.url, "POST", "/jobs", job, **{"Idempotency-Key": "k-2"})
    again = await call(served.url, "POST", "/jobs", job, **{"Idempotency-Key": "k-2"})
    assert first.status == again.status == 202
    assert again.body == first.body
    assert again.headers["Location"] == first.headers["Location"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    legacy = v02_job(f"{loopback.url}/src/old.jpg", f"{loopback.url}/dst/old.jpg")
    one = await call(served.url, "POST", "/", legacy, **{"Idempotency-Key": "k-3"})
    two = await call(served.url, "POST", "/", legacy, **{"Idempotency-Key": "k-3"})
    assert one.status == two.status == 200
    assert two.body == one.body
    assert (await served.service.queue.counts())["queued"] == 2
    assert sorted(loopback.uploads) == ["old.jpg", "once-32.jpg"]


async def test_a_key_reused_with_another_request_is_422_130(
    start: Start, loopback: Loopback
) -> None:
    """The key of an answered request with another body, or on the other endpoint,
    is refused with 422 (130) and makes no job."""
    served = await start()
    first = await call(
        served.url, "POST", "/jobs", v2_job(loopback, "a"), **{"Idempotency-Key": "k"}
    )
    assert first.status == 202
    other = await call(
        served.url, "POST", "/jobs", v2_job(loopback, "b"), **{"Idempotency-Key": "k"}
    )
    assert (other.status, other.body["code"]) == (422, 130)
    assert other.body["detail"].startswith("Idempotency-Key:")
    legacy = v02_job(f"{loopback.url}/src/a.jpg", f"{loopback.url}/dst/a.jpg")
    elsewhere = await call(served.url, "POST", "/", legacy, **{"Idempotency-Key": "k"})
    assert (elsewhere.status, elsewhere.body["code"]) == (422, 130)
    assert (await served.service.queue.counts())["queued"] == 1


async def test_a_refused_request_frees_its_key_for_the_retry(
    start: Start, loopback: Loopback
) -> None:
    """A request refused after taking its key (the source is missing: 201) leaves
    nothing behind: the retry with the same key runs afresh and is accepted."""
    served = await start()
    loopback.missing.add("late.jpg")
    job = v2_job(loopback, "late")
    refused = await call(served.url, "POST", "/jobs", job, **{"Idempotency-Key": "k-late"})
    assert (refused.status, refused.body["code"]) == (422, 201)
    loopback.missing.clear()
    retried = await call(served.url, "POST", "/jobs", job, **{"Idempotency-Key": "k-late"})
    assert retried.status == 202, retried.body
    assert "Idempotent-Replayed" not in retried.headers
    assert (await served.service.queue.counts())["queued"] == 1


async def test_a_malformed_key_is_refused_before_any_work(start: Start, loopback: Loopback) -> None:
    """An over-long Idempotency-Key is 400 (131) on both endpoints; nothing is fetched."""
    served = await start()
    loopback.held = True  # a download would hang the test
    long_key = {"Idempotency-Key": "k" * 256}
    for path, job in (
        ("/jobs", v2_job(loopback, "x")),
        ("/", v02_job(f"{loopback.url}/src/x.jpg", f"{loopback.url}/dst/x.jpg")),
    ):
        answer = await call(served.url, "POST", path, job, **long_key)
        assert (answer.status, answer.body["code"]) == (400, 131)
    assert (await served.service.queue.counts())["queued"] == 0


async def test_a_key_held_by_a_request_that_never_answers_is_409_614(
    start: Start, loopback: Loopback, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key taken by a request that never answered (its API node died mid-request):
    a retry waits for the reply until the reply deadline plus the slack, then gets
    409 (614) with Retry-After, and makes no job."""
    monkeypatch.setattr(api, "KEY_WAIT_SLACK_S", 0.5)
    served = await start(reply_timeout_s=1.0)
    job = v2_job(loopback, "orphan")
    body = json.dumps(job).encode()
    fingerprint = api._fingerprint(b"POST /jobs", body)
    assert await served.service.queue.reserve_key("k-orphan", fingerprint, 60.0) is None
    loop = asyncio.get_running_loop()
    began = loop.time()
    answer = await call(served.url, "POST", "/jobs", body, **{"Idempotency-Key": "k-orphan"})
    assert (answer.status, answer.body["code"]) == (409, 614)
    assert 1.5 <= loop.time() - began < 10
    assert int(answer.headers["Retry-After"]) > 0
    assert (await served.service.queue.counts())["queued"] == 0


async def test_a_multipart_upload_replays_by_its_parts(start: Start, loopback: Loopback) -> None:
    """A multipart POST /jobs sent twice with one key (a new boundary each time) makes
    one job; another source file under the same key is 130."""
    served = await start()
    job = json.dumps({"outputs": [{"url": f"{loopback.url}/dst/up-{{$width}}.jpg", "width": 32}]})

    async def upload(source: bytes) -> Answer:
        form = aiohttp.FormData()
        form.add_field("job", job, content_type="application/json")
        form.add_field("source", source, filename="up.jpg", content_type="image/jpeg")
        async with (
            aiohttp.ClientSession() as session,
            session.post(served.url + "/jobs", data=form, headers={"Idempotency-Key": "m"}) as r,
        ):
            return Answer(r.status, await r.json(), r.headers)

    first, second = await upload(_jpeg()), await upload(_jpeg())
    assert first.status == second.status == 202
    assert second.body["jobId"] == first.body["jobId"]
    assert second.headers["Idempotent-Replayed"] == "true"
    other = await upload(_jpeg(80, 60))
    assert (other.status, other.body["code"]) == (422, 130)
    assert loopback.uploads == ["up-32.jpg"]


# --- priority and webhook at accept time -----------------------------------------------


async def test_priority_is_stored_on_the_record(start: Start, loopback: Loopback) -> None:
    """POST /jobs' priority goes to the queue record (batch here); a 0.2 job is
    interactive; the job view shows it; a bad one is 703 naming the field."""
    served = await start()
    batch = await call(served.url, "POST", "/jobs", v2_job(loopback, "b", priority="batch"))
    assert batch.status == 202, batch.body
    legacy = await call(
        served.url, "POST", "/", v02_job(f"{loopback.url}/src/l.jpg", f"{loopback.url}/dst/l.jpg")
    )
    queue = served.service.queue
    batch_record = await queue.get(batch.body["jobId"])
    legacy_record = await queue.get(legacy.body["jobId"])
    assert batch_record is not None and legacy_record is not None
    assert (batch_record.priority, legacy_record.priority) == ("batch", "interactive")
    view = await call(served.url, "GET", f"/jobs/{batch.body['jobId']}")
    assert view.body["priority"] == "batch"
    bad = await call(served.url, "POST", "/jobs", v2_job(loopback, "c", priority="low"))
    assert (bad.status, bad.body["code"]) == (400, 703)
    assert bad.body["detail"].startswith("priority:")


async def test_a_webhook_on_a_refused_address_is_refused_at_accept_time(
    start: Start, loopback: Loopback
) -> None:
    """A webhook whose address the outbound policy refuses (a private literal, or a
    name resolving only to loopback when loopback is not allowed) is 401 with
    ``webhook:``; nothing is queued or uploaded. An allowed one is stored."""
    served = await start()
    refused = await call(
        served.url, "POST", "/jobs", v2_job(loopback, "w", webhook="http://10.1.2.3/hook")
    )
    assert (refused.status, refused.body["code"]) == (403, 401)
    assert refused.body["detail"].startswith("webhook: address 10.1.2.3 is private")
    hook = f"{loopback.url}/hooks/imgserve"
    accepted = await call(served.url, "POST", "/jobs", v2_job(loopback, "w", webhook=hook))
    assert accepted.status == 202, accepted.body
    record = await served.service.queue.get(accepted.body["jobId"])
    assert record is not None and record.job["webhook"] == hook
    strict = await start(allow=())  # the default policy: loopback refused
    by_name = await call(
        strict.url, "POST", "/jobs", v2_job(loopback, "w", webhook="http://localhost:9/h")
    )
    assert (by_name.status, by_name.body["code"]) == (403, 401)
    assert by_name.body["detail"].startswith("webhook: address ")
    assert loopback.uploads == ["w-32.jpg"]  # only the accepted job's placeholder


# --- cancel --------------------------------------------------------------------------


async def test_cancel_a_queued_job_and_it_never_runs(start: Start, loopback: Loopback) -> None:
    """DELETE of a queued job: 200 with the job view, state cancelled; the queue never
    delivers it (a job queued after it is delivered alone); cancelling again is 409 (613)."""
    served = await start()
    doomed = await call(served.url, "POST", "/jobs", v2_job(loopback, "doomed"))
    kept = await call(served.url, "POST", "/jobs", v2_job(loopback, "kept"))
    doomed_id, kept_id = doomed.body["jobId"], kept.body["jobId"]
    answer = await call(served.url, "DELETE", f"/jobs/{doomed_id}")
    assert answer.status == 200, answer.body
    assert (answer.body["jobId"], answer.body["state"]) == (doomed_id, "cancelled")
    assert (await call(served.url, "GET", f"/jobs/{doomed_id}")).body["state"] == "cancelled"

    async def kept_done() -> bool:
        return await state_of(served, kept_id) == State.DONE

    delivered = await run_jobs(served, kept_done)
    assert delivered == [kept_id]
    assert await state_of(served, doomed_id) == State.CANCELLED
    again = await call(served.url, "DELETE", f"/jobs/{doomed_id}")
    assert (again.status, again.body["code"]) == (409, 613)
    done = await call(served.url, "DELETE", f"/jobs/{kept_id}")
    assert (done.status, done.body["code"]) == (409, 613)


async def test_cancel_a_running_job_is_409_and_it_goes_on(start: Start, loopback: Loopback) -> None:
    """DELETE of a job a runner holds is 409 (613); the job still ends done."""
    served = await start()
    job_id = (await call(served.url, "POST", "/jobs", v2_job(loopback, "busy"))).body["jobId"]
    queue = served.service.queue
    release = asyncio.Event()

    async def handler(record: JobRecord) -> None:
        await release.wait()
        await queue.complete(record.id, [1])

    stopping = asyncio.Event()
    consuming = asyncio.create_task(queue.consume(handler, 1, stopping))
    async with asyncio.timeout(20):
        while await state_of(served, job_id) != State.RUNNING:
            await asyncio.sleep(0.02)
    answer = await call(served.url, "DELETE", f"/jobs/{job_id}")
    assert (answer.status, answer.body["code"]) == (409, 613)
    release.set()
    async with asyncio.timeout(20):
        while await state_of(served, job_id) != State.DONE:
            await asyncio.sleep(0.02)
    stopping.set()
    await consuming


async def test_cancel_an_unknown_job_is_605(start: Start) -> None:
    """DELETE of an id no job has, or of something that is no id, is 404 (605)."""
    served = await start()
    for job_id in ("0" * 32, "not-an-id"):
        answer = await call(served.url, "DELETE", f"/jobs/{job_id}")
        assert (answer.status, answer.body["code"]) == (404, 605)


# --- list ----------------------------------------------------------------------------


async def test_list_pages_newest_first_without_gaps_or_repeats(
    start: Start, loopback: Loopback
) -> None:
    """Seven jobs listed three a page: 3, 3, 1, newest first, each once, the last page's
    nextCursor null; state=cancelled lists only the two cancelled, as their views."""
    served = await start()
    ids = []
    for n in range(7):
        answer = await call(
            served.url, "POST", "/jobs", v2_job(loopback, f"l{n}", placeholder=False)
        )
        assert answer.status == 202, answer.body
        ids.append(answer.body["jobId"])
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        query = "?limit=3" + (f"&cursor={cursor}" if cursor else "")
        page = await call(served.url, "GET", "/jobs" + query)
        assert page.status == 200, page.body
        pages.append([view["jobId"] for view in page.body["jobs"]])
        cursor = page.body["nextCursor"]
        if cursor is None:
            break
        assert len(pages) < 5
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [job_id for p in pages for job_id in p] == ids[::-1]
    for job_id in (ids[1], ids[4]):
        assert (await call(served.url, "DELETE", f"/jobs/{job_id}")).status == 200
    cancelled = await call(served.url, "GET", "/jobs?state=cancelled")
    assert [v["jobId"] for v in cancelled.body["jobs"]] == [ids[4], ids[1]]
    assert cancelled.body["nextCursor"] is None
    one = await call(served.url, "GET", f"/jobs/{ids[4]}")
    assert cancelled.body["jobs"][0] == one.body
    everything = await call(served.url, "GET", "/jobs")
    assert len(everything.body["jobs"]) == 7


async def test_list_refuses_bad_parameters(start: Start) -> None:
    """Over HTTP: a bad limit or state is 400 (703) naming it; one given twice too."""
    served = await start()
    for query, start_of_detail in (
        ("?limit=500", "limit:"),
        ("?state=nope", "state:"),
        ("?limit=3&limit=4", "limit: given more than once"),
    ):
        answer = await call(served.url, "GET", "/jobs" + query)
        assert (answer.status, answer.body["code"]) == (400, 703), query
        assert answer.body["detail"].startswith(start_of_detail)


# --- the event stream ----------------------------------------------------------------


class Stream:
    """An open ``GET /events``, read as SSE events (id, event, data)."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.comments = 0

    async def next(self) -> dict[str, str] | None:
        """The next event, or None when the server ended the stream."""
        event: dict[str, str] = {}
        while True:
            raw = await self.resp.content.readline()
            if not raw:
                return None
            line = raw.decode().rstrip("\r\n")
            if not line:
                if event:
                    return event
            elif line.startswith(":"):
                self.comments += 1
            else:
                name, _, value = line.partition(": ")
                event[name] = value

    async def take(self, count: int) -> list[dict[str, str]]:
        events = []
        async with asyncio.timeout(20):
            while len(events) < count:
                event = await self.next()
                assert event is not None, f"stream ended after {events}"
                events.append(event)
        return events


@pytest.fixture
async def open_stream() -> AsyncIterator[Callable[..., Awaitable[Stream]]]:
    async with aiohttp.ClientSession() as session:

        async def open_(url: str, query: str = "", **headers: str) -> Stream:
            resp = await session.get(url + "/events" + query, headers=headers)
            assert resp.status == 200, await resp.text()
            assert resp.content_type == "text/event-stream"
            return Stream(resp)

        yield open_


def _jobs_events(events: list[dict[str, str]], job_id: str) -> list[str]:
    return [e["event"] for e in events if json.loads(e["data"])["jobId"] == job_id]


async def test_the_stream_shows_a_job_queued_running_done_and_resumes(
    start: Start, loopback: Loopback, open_stream: Callable[..., Awaitable[Stream]]
) -> None:
    """A stream opened before a job shows job.queued, job.running, job.done for it,
    each with an id and {jobId, state, at}; streams resumed with Last-Event-ID (or
    ?after=) get exactly the events after that one, then new ones, none twice."""
    served = await start()
    stream = await open_stream(served.url)
    job_id = (await call(served.url, "POST", "/jobs", v2_job(loopback, "s"))).body["jobId"]

    async def done() -> bool:
        return await state_of(served, job_id) == State.DONE

    await run_jobs(served, done)
    events = await stream.take(3)
    assert [e["event"] for e in events] == ["job.queued", "job.running", "job.done"]
    data = [json.loads(e["data"]) for e in events]
    assert [d["state"] for d in data] == ["queued", "running", "done"]
    assert {d["jobId"] for d in data} == {job_id}
    assert all(abs(d["at"] - time.time()) < 60 for d in data)
    assert len({e["id"] for e in events}) == 3
    resumed = await open_stream(served.url, **{"Last-Event-ID": events[0]["id"]})
    by_query = await open_stream(served.url, f"?after={events[1]['id']}")
    later = (await call(served.url, "POST", "/jobs", v2_job(loopback, "t"))).body["jobId"]
    # Each stream's events after its resume point, then the later job's: none repeated.
    resumed_events = await resumed.take(3)
    assert resumed_events[:2] == events[1:]
    query_events = await by_query.take(2)
    assert query_events[0] == events[2]
    (first_next,) = await stream.take(1)
    for event in (resumed_events[2], query_events[1], first_next):
        assert (event["event"], json.loads(event["data"])["jobId"]) == ("job.queued", later)


async def test_a_new_stream_starts_from_now(
    start: Start, loopback: Loopback, open_stream: Callable[..., Awaitable[Stream]]
) -> None:
    """Without Last-Event-ID a stream shows only what happens after it opened."""
    served = await start()
    old = (await call(served.url, "POST", "/jobs", v2_job(loopback, "old"))).body["jobId"]
    stream = await open_stream(served.url)
    new = (await call(served.url, "POST", "/jobs", v2_job(loopback, "new"))).body["jobId"]
    (event,) = await stream.take(1)
    assert json.loads(event["data"])["jobId"] == new != old


async def test_streams_are_bounded_and_end_when_the_daemon_drains(
    start: Start, open_stream: Callable[..., Awaitable[Stream]]
) -> None:
    """Past max_streams a stream is 503 (615); a drain ends the open ones (the
    server closes them) and refuses new ones with 604."""
    served = await start()
    served.service.max_streams = 1
    stream = await open_stream(served.url)
    second = await call(served.url, "GET", "/events")
    assert (second.status, second.body["code"]) == (503, 615)
    assert "Retry-After" in second.headers
    served.service.draining = True
    async with asyncio.timeout(5):
        assert await stream.next() is None
    assert served.service.streams == 0
    refused = await call(served.url, "GET", "/events")
    assert (refused.status, refused.body["code"]) == (503, 604)


async def test_an_open_stream_does_not_hold_up_shutdown(
    start: Start, open_stream: Callable[..., Awaitable[Stream]]
) -> None:
    """Stopping the HTTP server with a stream open ends the stream at once, well
    before aiohttp's shutdown timeout."""
    served = await start()
    stream = await open_stream(served.url)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await served.runner.cleanup()
    assert loop.time() - began < 5
    async with asyncio.timeout(5):
        assert await stream.next() is None


async def test_a_bad_last_event_id_is_703(start: Start) -> None:
    """A Last-Event-ID that cannot be an id imgserve gave is 400 (703) naming the header."""
    served = await start()
    answer = await call(served.url, "GET", "/events", **{"Last-Event-ID": "x" * 300})
    assert (answer.status, answer.body["code"]) == (400, 703)
    assert answer.body["detail"].startswith("Last-Event-ID:")


# --- webhook redelivery and the job view ---------------------------------------------


async def test_redeliver_rearms_the_latest_event_and_the_view_shows_it(
    start: Start, loopback: Loopback
) -> None:
    """POST /jobs/<id>/webhook without an event is 404 (616); once the job ended with
    an event that gave up, it is pending again, due now, with its attempts kept, and
    GET /jobs/<id> shows it with the URL's credentials redacted."""
    served = await start()
    job_id = (await call(served.url, "POST", "/jobs", v2_job(loopback, "h"))).body["jobId"]
    none_yet = await call(served.url, "POST", f"/jobs/{job_id}/webhook")
    assert (none_yet.status, none_yet.body["code"]) == (404, 616)
    queue = served.service.queue
    event = Event(
        id="msg_" + "a" * 32,
        job_id=job_id,
        url="https://user:secret@hooks.example.com/in",
        type="job.completed",
        payload={"type": "job.completed"},
        state="failed",
        next_at=0.0,
        attempts=[{"at": 1.0, "status": 500, "error": None}],
    )

    async def handler(record: JobRecord) -> None:
        await queue.complete(record.id, [1], event=event)  # type: ignore[call-arg]

    stopping = asyncio.Event()
    consuming = asyncio.create_task(queue.consume(handler, 1, stopping))
    async with asyncio.timeout(20):
        while await state_of(served, job_id) != State.DONE:
            await asyncio.sleep(0.02)
    stopping.set()
    await consuming
    before = time.time()
    answer = await call(served.url, "POST", f"/jobs/{job_id}/webhook")
    assert answer.status == 202, answer.body
    assert answer.body["webhook"]["state"] == "pending"
    (stored,) = await queue.job_events(job_id)
    assert (stored.id, stored.state) == (event.id, "pending")
    assert before - 1 <= stored.next_at <= time.time()
    assert stored.attempts == event.attempts
    view = (await call(served.url, "GET", f"/jobs/{job_id}")).body["webhook"]
    assert view == {
        "url": "https://user:***@hooks.example.com/in",
        "eventId": event.id,
        "type": "job.completed",
        "state": "pending",
        "attempts": [{"at": 1.0, "status": 500, "error": None}],
    }
    unknown = await call(served.url, "POST", f"/jobs/{'f' * 32}/webhook")
    assert (unknown.status, unknown.body["code"]) == (404, 605)


# --- cancel and redelivery reach the webhook receiver --------------------------------


async def test_cancel_sends_a_signed_job_cancelled_event_and_redelivery_sends_it_again(
    tmp_path: Path, shared_planner: Planner, loopback: Loopback, receiver: Receiver
) -> None:
    """DELETE stores a job.cancelled event with the cancel and wakes the dispatcher; the
    receiver verifies it with standardwebhooks; POST /jobs/<id>/webhook sends the same
    webhook-id again."""
    hooks = hook_settings()
    transport = TransportSettings(
        policy=NetPolicy(allow_nets=(ipaddress.ip_network("127.0.0.0/8"),))
    )
    served = await start_api(
        tmp_path / "q", shared_planner, Settings(transport=transport, webhook=hooks)
    )
    try:
        # A long poll: only the API's poke can deliver the event promptly.
        async with dispatching(served.service.queue, hooks, poll_s=30.0) as dispatcher:
            served.service.on_event = dispatcher.poke
            body = v2_job(loopback, "gone", webhook=receiver.url(), metadata={"upload": 7})
            job_id = (await call(served.url, "POST", "/jobs", body)).body["jobId"]
            assert (await call(served.url, "DELETE", f"/jobs/{job_id}")).status == 200
            (first,) = await asyncio.to_thread(receiver.wait_for, 1, 10.0)
            payload = Webhook(SECRET_A).verify(first.body, first.headers)
            assert payload["type"] == "job.cancelled"
            assert payload["data"]["jobId"] == job_id
            assert payload["data"]["state"] == "cancelled"
            assert payload["data"]["metadata"] == {"upload": 7}
            again = await call(served.url, "POST", f"/jobs/{job_id}/webhook")
            assert again.status == 202, again.body
            second = (await asyncio.to_thread(receiver.wait_for, 2, 10.0))[1]
            Webhook(SECRET_A).verify(second.body, second.headers)
            assert second.headers["webhook-id"] == first.headers["webhook-id"]
    finally:
        await served.stop()
    assert loopback.uploads == ["gone-32.jpg"]  # its placeholder; nothing after the cancel


async def test_the_default_webhook_is_fixed_with_the_job_at_accept(
    tmp_path: Path, shared_planner: Planner, loopback: Loopback
) -> None:
    """The accepting node's --webhook-url is stored with the job (a worker node
    configured without it still sends the event there); a job's own URL wins."""
    loopback_net = (ipaddress.ip_network("127.0.0.0/8"),)
    settings = Settings(
        transport=TransportSettings(policy=NetPolicy(allow_nets=loopback_net)),
        webhook=hook_settings(webhook_url="https://hooks.example/default"),
    )
    served = await start_api(tmp_path / "q", shared_planner, settings)
    try:
        plain = await call(served.url, "POST", "/jobs", v2_job(loopback, "plain"))
        own = await call(
            served.url, "POST", "/jobs", v2_job(loopback, "own", webhook=f"{loopback.url}/h")
        )
        stored = [await served.service.queue.get(reply.body["jobId"]) for reply in (plain, own)]
        assert [r.job["webhook"] for r in stored if r is not None] == [
            "https://hooks.example/default",
            f"{loopback.url}/h",
        ]
    finally:
        await served.stop()

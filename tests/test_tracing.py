"""OpenTelemetry tracing in-process: one trace per job, from the request through its
phases to the runner's attempt, continued from the job record on either queue.

The API (api.make_app around the real queue, transports and planner) and a Runner
(the real process pool) run in this process, each with its own tracer provider
recording into the SDK's InMemorySpanExporter: the runner's spans can join the
request's trace only through the context stored with the job. Sources come from the
loopback HTTP test server; destinations are files under a file root, or the HTTP
server's /forbidden/ for a job that fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import os
import select
import socket
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from imgserve import api, auth, config, daemon, otel, protocol, tracing, webhooks
from imgserve.config import ImagingLimits, NetPolicy, Settings, TransportSettings, WorkerSettings
from imgserve.metrics import Metrics
from imgserve.otel import OpenTelemetry
from imgserve.planner import Planner
from imgserve.pool import ImagePool
from imgserve.queue import open_queue
from imgserve.queue.arq_redis import RedisQueue
from imgserve.queue.base import JobQueue
from imgserve.queue.sqlite import SQLiteQueue
from imgserve.transports import Transports
from imgserve.worker import Runner
from tests.e2e.conftest import jpeg, serve
from tests.servers import BASIC_PASSWORD, BASIC_USER, HTTPTestServer
from tests.webhook_receiver import Receiver, Reply, receiver_fixture  # noqa: F401 - a fixture

WAIT_S = 60.0


class Recorder:
    """A tracing of its own (one per node) and the spans it finished."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracing = OpenTelemetry(SimpleSpanProcessor(self.exporter))

    @property
    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [span for span in self.spans if span.name == name]

    async def wait_for(self, name: str, count: int = 1) -> list[ReadableSpan]:
        """The finished spans called ``name``, once there are ``count`` of them."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while len(self.named(name)) < count:
            assert loop.time() < deadline, f"no {name!r} span: {[s.name for s in self.spans]}"
            await asyncio.sleep(0.02)
        return self.named(name)


def children(spans: Sequence[ReadableSpan], parent: ReadableSpan) -> dict[str, ReadableSpan]:
    """The spans directly under ``parent``, by name."""
    span_id = parent.context.span_id
    return {s.name: s for s in spans if s.parent is not None and s.parent.span_id == span_id}


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


@pytest.fixture(scope="module")
def pool() -> Iterator[ImagePool]:
    pool = ImagePool(WorkerSettings(workers=1), ImagingLimits())
    yield pool
    pool.close()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    out = tmp_path / "out"
    out.mkdir()
    return Settings(
        worker=WorkerSettings(workers=1, max_attempts=1),
        transport=TransportSettings(
            policy=NetPolicy(allow_nets=(ipaddress.ip_network("127.0.0.0/8"),)),
            file_roots=(out,),
        ),
    )


QueueFactory = Callable[[], JobQueue]


@pytest.fixture(params=["sqlite", "redis"])
def make_queue(request: pytest.FixtureRequest, tmp_path: Path) -> QueueFactory:
    """Queue clients on one store, one per call (as each node has its own); SQLite's
    embedded mode has one queue for both. The test closes them."""
    if request.param == "sqlite":
        shared = open_queue(None, tmp_path / "q")
        return lambda: shared
    url = f"{request.getfixturevalue('redis_url')}?prefix=test-{uuid.uuid4().hex}"
    return lambda: open_queue(url, tmp_path)


@asynccontextmanager
async def api_node(
    queue: JobQueue,
    planner: Planner,
    settings: Settings,
    traces: tracing.Tracing,
    keys: auth.Keyring | None = None,
) -> AsyncIterator[str]:
    """The API on a free loopback port (its URL), tracing with ``traces``."""
    service = api.Service(
        settings=settings,
        queue=queue,
        transports=Transports(settings.transport),
        runner=None,
        planner=planner,
        metrics=Metrics(traces),
        keys=keys,
    )
    runner = protocol.make_runner(api.make_app(service), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
        await service.transports.aclose()


@asynccontextmanager
async def worker_node(
    queue: JobQueue, pool: ImagePool, settings: Settings, traces: tracing.Tracing
) -> AsyncIterator[Runner]:
    """A Runner taking jobs from ``queue``, tracing with ``traces``."""
    transports = Transports(settings.transport)
    runner = Runner(queue, transports, pool, settings, metrics=Metrics(traces))
    serving = asyncio.create_task(runner.serve())
    try:
        yield runner
    finally:
        runner.stopping.set()
        async with asyncio.timeout(WAIT_S):
            await serving
        await transports.aclose()


async def post(base: str, job: dict[str, Any], **headers: str) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(base + "/jobs", json=job, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


def file_output(settings: Settings, name: str, width: int) -> dict[str, Any]:
    return {"url": f"file://{settings.transport.file_roots[0]}/{name}", "width": width}


@pytest.fixture
def sqlite_queue(tmp_path: Path) -> JobQueue:
    return open_queue(None, tmp_path / "q")


@contextlib.asynccontextmanager
async def delivering_events(
    queue: JobQueue, settings: Settings, rec: Recorder
) -> AsyncIterator[None]:
    """A webhook dispatcher on ``queue`` tracing into ``rec``, while the block runs."""
    dispatcher = webhooks.Dispatcher(
        queue, settings.webhook, settings.transport, poll_s=0.05, metrics=Metrics(rec.tracing)
    )
    task = asyncio.create_task(dispatcher.serve())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def run_with_webhook(
    queue: JobQueue,
    planner: Planner,
    pool: ImagePool,
    settings: Settings,
    rec: Recorder,
    job: dict[str, Any],
) -> tuple[dict[str, Any], Any]:
    """``job`` through an API node and a runner on ``queue``: the reply, and the span
    of its event's first delivery attempt."""
    try:
        async with (
            delivering_events(queue, settings, rec),
            api_node(queue, planner, settings, rec.tracing) as base,
            worker_node(queue, pool, settings, rec.tracing),
        ):
            status, reply = await post(base, job)
            assert status == 202, reply
            [delivery] = await rec.wait_for("webhook")
    finally:
        await queue.close()
    return reply, delivery


async def test_a_job_is_one_trace_from_the_request_to_its_upload(
    sqlite_queue: JobQueue,
    shared_planner: Planner,
    pool: ImagePool,
    settings: Settings,
    http_server: HTTPTestServer,
) -> None:
    """A POST /jobs job with two outputs: the request's server span is the root, with
    download, plan, placeholder, enqueue, queue_wait and the job's attempt under it,
    and render and upload under the attempt; one trace, the job id on each job span."""
    rec = Recorder()
    src = serve(http_server, "trace/Photo.jpg", jpeg(320, 240))
    job = {
        "source": src,
        "outputs": [file_output(settings, "a.png", 64), file_output(settings, "b.png", 32)],
    }
    try:
        async with (
            api_node(sqlite_queue, shared_planner, settings, rec.tracing) as base,
            worker_node(sqlite_queue, pool, settings, rec.tracing),
        ):
            status, reply = await post(base, job)
            assert status == 202, reply
            [attempt] = await rec.wait_for("job")
    finally:
        await sqlite_queue.close()
    spans = rec.spans
    [request] = rec.named("POST /jobs")
    assert request.parent is None
    assert request.kind is SpanKind.SERVER
    assert {span.context.trace_id for span in spans} == {request.context.trace_id}
    job_id = reply["jobId"]
    assert attributes(request) | {
        tracing.JOB_ID: job_id,
        tracing.OPERATION: "resize",
        tracing.OUTPUTS: 2,
        tracing.SOURCE: src,
        "http.route": "/jobs",
        "http.response.status_code": 202,
    } == attributes(request)
    under_request = children(spans, request)
    assert set(under_request) == {
        "download", "plan", "placeholder", "enqueue", "queue_wait", "job"
    }  # fmt: skip
    assert attempt.kind is SpanKind.CONSUMER
    assert attributes(attempt) | {
        tracing.JOB_ID: job_id,
        tracing.OUTPUTS: 2,
        tracing.ATTEMPT: 1,
        tracing.OUTCOME: "done",
    } == attributes(attempt)
    assert attempt.status.status_code is StatusCode.UNSET
    assert set(children(spans, attempt)) == {"render", "upload"}
    wait = under_request["queue_wait"]
    assert attributes(wait)[tracing.JOB_ID] == job_id
    assert wait.start_time is not None and wait.end_time is not None
    assert attempt.start_time is not None and wait.end_time <= attempt.start_time
    assert request.end_time is not None and under_request["enqueue"].end_time is not None
    assert under_request["enqueue"].end_time <= request.end_time


async def test_a_failed_job_records_its_error_code_and_status(
    sqlite_queue: JobQueue,
    shared_planner: Planner,
    pool: ImagePool,
    settings: Settings,
    http_server: HTTPTestServer,
) -> None:
    """A job whose destination refuses the upload (403, code 502, no retry): the upload
    span and the attempt's span have status ERROR and the code; the attempt ends failed."""
    rec = Recorder()
    src = serve(http_server, "trace/Refused.jpg", jpeg(320, 240))
    job = {
        "source": src,
        "placeholder": False,
        "outputs": [{"url": http_server.url("/forbidden/out.png"), "width": 64}],
    }
    try:
        async with (
            api_node(sqlite_queue, shared_planner, settings, rec.tracing) as base,
            worker_node(sqlite_queue, pool, settings, rec.tracing),
        ):
            status, reply = await post(base, job)
            assert status == 202, reply
            [attempt] = await rec.wait_for("job")
            record = await sqlite_queue.get(reply["jobId"])
    finally:
        await sqlite_queue.close()
    assert record is not None and record.error_code == 502
    assert attempt.status.status_code is StatusCode.ERROR
    assert attributes(attempt) | {
        tracing.OUTCOME: "failed",
        tracing.ERROR_CODE: 502,
        tracing.ERROR_TYPE: "502",
    } == attributes(attempt)
    upload = children(rec.spans, attempt)["upload"]
    assert upload.status.status_code is StatusCode.ERROR
    assert attributes(upload)[tracing.ERROR_CODE] == 502


async def test_the_trace_survives_the_queue_round_trip(
    make_queue: QueueFactory,
    shared_planner: Planner,
    pool: ImagePool,
    settings: Settings,
    http_server: HTTPTestServer,
) -> None:
    """The API node and the worker node trace with providers of their own and talk
    only through the queue (SQLite, or Redis with a client each): the stored record
    holds the request's traceparent, and the worker's attempt is a child of the
    request's span, in its trace."""
    front, back = Recorder(), Recorder()
    api_queue, worker_queue = make_queue(), make_queue()
    src = serve(http_server, "trace/Queued.jpg", jpeg(320, 240))
    job = {"source": src, "outputs": [file_output(settings, "q.png", 64)]}
    try:
        async with api_node(api_queue, shared_planner, settings, front.tracing) as base:
            status, reply = await post(base, job)
            assert status == 202, reply
        async with worker_node(worker_queue, pool, settings, back.tracing):
            [attempt] = await back.wait_for("job")
        record = await worker_queue.get(reply["jobId"])
    finally:
        for queue in {id(api_queue): api_queue, id(worker_queue): worker_queue}.values():
            await queue.close()
    [request] = front.named("POST /jobs")
    assert not front.named("job")
    assert record is not None and record.trace_context is not None
    trace_hex = f"{request.context.trace_id:032x}"
    span_hex = f"{request.context.span_id:016x}"
    version, stored_trace, stored_span, flags = record.trace_context["traceparent"].split("-")
    assert (version, stored_trace, stored_span) == ("00", trace_hex, span_hex)
    assert int(flags, 16) & 1  # sampled
    assert attempt.context.trace_id == request.context.trace_id
    assert attempt.parent is not None and attempt.parent.span_id == request.context.span_id
    assert attempt.parent.is_remote
    assert set(children(back.spans, attempt)) == {"render", "upload"}


async def rewrite_stored(
    queue: JobQueue, job_id: str, change: Callable[[dict[str, Any]], None]
) -> None:
    """Rewrite the job's stored JSON with ``change`` made to it, as another release
    (or a hand in the store) would have written it: the SQLite row, or the Redis key."""
    if isinstance(queue, SQLiteQueue):
        with contextlib.closing(sqlite3.connect(queue.path)) as db:
            [(raw,)] = db.execute("SELECT record FROM jobs WHERE id=?", (job_id,))
            stored = json.loads(raw)
            change(stored)
            db.execute("UPDATE jobs SET record=? WHERE id=?", (json.dumps(stored), job_id))
            db.commit()
        return
    assert isinstance(queue, RedisQueue)
    where = queue.redis_settings
    client = redis.asyncio.Redis(host=str(where.host), port=where.port, db=where.database)
    try:
        key = f"{queue.prefix}:job:{job_id}"
        stored = json.loads(await client.get(key))
        change(stored)
        assert await client.set(key, json.dumps(stored), xx=True, keepttl=True)
    finally:
        await client.aclose()


@pytest.mark.parametrize("row", ["tracing-off", "before-tracing"])
async def test_a_record_without_a_trace_runs_in_a_trace_of_its_own(
    make_queue: QueueFactory,
    shared_planner: Planner,
    pool: ImagePool,
    settings: Settings,
    http_server: HTTPTestServer,
    row: str,
) -> None:
    """A job stored without a trace, on either queue (accepted by an API node with
    tracing off, or stored by a release before tracing: its JSON without the
    trace_context field) runs: its attempt is a root span with the job id, its
    queue_wait under it."""
    back = Recorder()
    api_queue, worker_queue = make_queue(), make_queue()
    src = serve(http_server, "trace/Untraced.jpg", jpeg(320, 240))
    job = {"source": src, "outputs": [file_output(settings, "u.png", 64)]}
    try:
        async with api_node(api_queue, shared_planner, settings, tracing.NO_TRACING) as base:
            status, reply = await post(base, job)
            assert status == 202, reply
        record = await api_queue.get(reply["jobId"])
        assert record is not None and record.trace_context is None
        if row == "before-tracing":
            await rewrite_stored(
                api_queue, reply["jobId"], lambda stored: stored.pop("trace_context")
            )
        async with worker_node(worker_queue, pool, settings, back.tracing):
            [attempt] = await back.wait_for("job")
    finally:
        for queue in {id(api_queue): api_queue, id(worker_queue): worker_queue}.values():
            await queue.close()
    assert attempt.parent is None
    assert attributes(attempt)[tracing.JOB_ID] == reply["jobId"]
    assert attributes(attempt)[tracing.OUTCOME] == "done"
    assert set(children(back.spans, attempt)) == {"queue_wait", "render", "upload"}


async def test_a_clients_traceparent_is_continued_and_credentials_stay_out(
    sqlite_queue: JobQueue,
    shared_planner: Planner,
    settings: Settings,
    http_server: HTTPTestServer,
) -> None:
    """A request carrying a W3C traceparent joins the client's trace; a source URL with
    a password is on the span redacted, and the password is in no attribute."""
    rec = Recorder()
    serve(http_server, "trace/Secret.jpg", jpeg(320, 240))
    host = f"{http_server.host}:{http_server.port}"
    src = f"http://{BASIC_USER}:{BASIC_PASSWORD}@{host}/auth/trace/Secret.jpg"
    job = {"source": src, "outputs": [file_output(settings, "s.png", 64)]}
    client_trace, client_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    try:
        async with api_node(sqlite_queue, shared_planner, settings, rec.tracing) as base:
            status, reply = await post(base, job, traceparent=f"00-{client_trace}-{client_span}-01")
            assert status == 202, reply
    finally:
        await sqlite_queue.close()
    [request] = rec.named("POST /jobs")
    assert f"{request.context.trace_id:032x}" == client_trace
    assert request.parent is not None and f"{request.parent.span_id:016x}" == client_span
    assert (
        attributes(request)[tracing.SOURCE]
        == f"http://{BASIC_USER}:***@{host}/auth/trace/Secret.jpg"
    )
    every_value = [str(v) for span in rec.spans for v in attributes(span).values()]
    assert every_value and not any(BASIC_PASSWORD in value for value in every_value)


async def test_a_clients_tracestate_is_stored_only_when_short(
    sqlite_queue: JobQueue,
    shared_planner: Planner,
    settings: Settings,
    http_server: HTTPTestServer,
) -> None:
    """A client's tracestate is kept with the job (and so its events) up to 512
    characters; a 32-member one of thousands is left out, the traceparent kept."""
    rec = Recorder()
    src = serve(http_server, "trace/State.jpg", jpeg(320, 240))
    job = {"source": src, "outputs": [file_output(settings, "ts.png", 64)]}
    short = "vendor=abc,other=1"
    long = ",".join(f"v{i}=" + "x" * 200 for i in range(32))
    stored = []
    try:
        async with api_node(sqlite_queue, shared_planner, settings, rec.tracing) as base:
            for state in (short, long):
                status, reply = await post(base, job, traceparent=TRACEPARENT, tracestate=state)
                assert status == 202, reply
                record = await sqlite_queue.get(reply["jobId"])
                assert record is not None and record.trace_context is not None
                stored.append(record.trace_context)
    finally:
        await sqlite_queue.close()
    assert len(long) > 6_000
    assert stored[0]["tracestate"] == short
    assert set(stored[1]) == {"traceparent"}
    assert stored[1]["traceparent"].split("-")[1] == TRACEPARENT.split("-")[1]


async def test_a_request_refused_for_its_key_gets_no_span(
    sqlite_queue: JobQueue,
    shared_planner: Planner,
    settings: Settings,
    http_server: HTTPTestServer,
) -> None:
    """With API keys, a POST /jobs with no key or a wrong one (401) carrying a
    traceparent gets no span, so no one without a key can fill the collector or
    force sampling; the same request with the key is traced."""
    rec = Recorder()
    secret = "s" * 40
    keys = auth.Keyring([auth.Key("client", hashlib.sha256(secret.encode()).digest())])
    src = serve(http_server, "trace/Keyed.jpg", jpeg(320, 240))
    job = {"source": src, "outputs": [file_output(settings, "k.png", 64)]}
    try:
        async with api_node(sqlite_queue, shared_planner, settings, rec.tracing, keys) as base:
            missing, _ = await post(base, job, traceparent=TRACEPARENT)
            wrong, _ = await post(
                base, job, traceparent=TRACEPARENT, Authorization="Bearer " + "w" * 40
            )
            assert (missing, wrong) == (401, 401)
            assert rec.spans == []
            status, reply = await post(
                base, job, traceparent=TRACEPARENT, Authorization=f"Bearer {secret}"
            )
            assert status == 202, reply
    finally:
        await sqlite_queue.close()
    [request] = rec.named("POST /jobs")
    assert attributes(request)[tracing.JOB_ID] == reply["jobId"]
    assert attributes(request)[tracing.KEY] == "client"


async def test_a_refused_job_has_its_code_on_the_request_span(
    sqlite_queue: JobQueue,
    shared_planner: Planner,
    settings: Settings,
    http_server: HTTPTestServer,
) -> None:
    """A job whose source is missing is refused (4xx with its code): the request span
    records the code and the status, keeps status UNSET (a client error, by HTTP's
    conventions), and its download span is the failed one."""
    rec = Recorder()
    job = {
        "source": http_server.url("/files/trace/Missing.jpg"),
        "outputs": [file_output(settings, "m.png", 64)],
    }
    try:
        async with api_node(sqlite_queue, shared_planner, settings, rec.tracing) as base:
            status, reply = await post(base, job)
    finally:
        await sqlite_queue.close()
    assert 400 <= status < 500, reply
    [request] = rec.named("POST /jobs")
    assert attributes(request)[tracing.ERROR_CODE] == reply["code"]
    assert attributes(request)["http.response.status_code"] == status
    assert request.status.status_code is StatusCode.UNSET
    download = children(rec.spans, request)["download"]
    assert download.status.status_code is StatusCode.ERROR
    assert attributes(download)[tracing.ERROR_CODE] == reply["code"]
    assert tracing.JOB_ID not in attributes(request)


class StoresCarrier(tracing.Tracing):
    """No tracing, but each job stored with ``stored`` as its trace context: a record
    another release wrote, or one tampered with in the queue's store."""

    def __init__(self, stored: object) -> None:
        self.stored = stored

    def carrier(self) -> Any:
        return self.stored


async def wait_finished(queue: JobQueue, job_id: str) -> Any:
    """The job's record once it has ended."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while (record := await queue.get(job_id)) is None or not record.finished:
        assert loop.time() < deadline, record
        await asyncio.sleep(0.05)
    return record


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


MALFORMED_CARRIERS = {
    "a-number-value": {"traceparent": 5},
    "not-str-values": {"traceparent": None, "tracestate": {"a": 1}},
    "a-str": TRACEPARENT,
    "a-list": ["traceparent"],
    "a-huge-value": {"traceparent": "0" * 100_000},
}


@pytest.mark.parametrize(
    ("stored", "kept"),
    [
        (None, {}),
        (TRACEPARENT, {}),
        (["traceparent"], {}),
        ({"traceparent": 5, "tracestate": None}, {}),
        ({"traceparent": TRACEPARENT}, {"traceparent": TRACEPARENT}),
        (
            {"traceparent": TRACEPARENT, "tracestate": "a=1", "baggage": "k=v"},
            {"traceparent": TRACEPARENT, "tracestate": "a=1"},
        ),
        ({"traceparent": TRACEPARENT, "tracestate": "a" * 513}, {"traceparent": TRACEPARENT}),
        ({"traceparent": "0" * 100_000}, {}),
    ],
)
def test_a_stored_carrier_keeps_only_w3c_headers_of_bounded_strs(
    stored: object, kept: dict[str, str]
) -> None:
    """clean_carrier keeps traceparent and tracestate when they are str values of at most
    512 characters, and nothing else: not other keys, other types, or a non-dict."""
    assert tracing.clean_carrier(stored) == kept


@pytest.mark.parametrize("stored", MALFORMED_CARRIERS.values(), ids=MALFORMED_CARRIERS.keys())
async def test_a_malformed_stored_trace_context_blocks_neither_the_job_nor_its_webhook(
    make_queue: QueueFactory,
    shared_planner: Planner,
    pool: ImagePool,
    settings: Settings,
    http_server: HTTPTestServer,
    receiver: Receiver,
    stored: object,
) -> None:
    """A record whose stored trace context is not a dict of strings (a number, a str,
    a list, a huge value), on either queue: the job runs once and is done, its attempt
    a root span, and its webhook event is delivered in a span of its own."""
    rec = Recorder()
    api_queue, worker_queue = make_queue(), make_queue()
    src = serve(http_server, "trace/Malformed.jpg", jpeg(320, 240))
    job = {
        "source": src,
        "webhook": receiver.url("/hook"),
        "outputs": [file_output(settings, "bad-context.png", 64)],
    }
    try:
        async with api_node(api_queue, shared_planner, settings, StoresCarrier(stored)) as base:
            status, reply = await post(base, job)
            assert status == 202, reply
        async with (
            delivering_events(worker_queue, settings, rec),
            worker_node(worker_queue, pool, settings, rec.tracing),
        ):
            record = await wait_finished(worker_queue, reply["jobId"])
            [delivery] = await rec.wait_for("webhook")
    finally:
        for queue in {id(api_queue): api_queue, id(worker_queue): worker_queue}.values():
            await queue.close()
    assert (record.state.value, record.attempts) == ("done", 1), record
    [attempt] = rec.named("job")
    assert attempt.parent is None
    assert attributes(attempt)[tracing.OUTCOME] == "done"
    assert delivery.parent is None
    assert attributes(delivery)[tracing.OUTCOME] == "delivered"
    assert len(receiver.received("/hook")) == 1


async def test_a_poison_job_with_a_malformed_trace_context_fails_as_a_poison_job(
    sqlite_queue: JobQueue,
    shared_planner: Planner,
    pool: ImagePool,
    settings: Settings,
    http_server: HTTPTestServer,
) -> None:
    """A job delivered past max_attempts (its runner died on each) whose stored trace
    context is {"traceparent": 5}: the poison check still runs, and the job fails
    for good with 603 instead of being delivered again and again."""
    rec = Recorder()
    src = serve(http_server, "trace/Poison.jpg", jpeg(320, 240))
    job = {"source": src, "outputs": [file_output(settings, "poison.png", 64)]}

    def died_once(stored: dict[str, Any]) -> None:
        stored.update(attempts=settings.worker.max_attempts, trace_context={"traceparent": 5})

    try:
        async with api_node(sqlite_queue, shared_planner, settings, tracing.NO_TRACING) as base:
            status, reply = await post(base, job)
            assert status == 202, reply
        await rewrite_stored(sqlite_queue, reply["jobId"], died_once)
        async with worker_node(sqlite_queue, pool, settings, rec.tracing):
            record = await wait_finished(sqlite_queue, reply["jobId"])
    finally:
        await sqlite_queue.close()
    assert (record.state.value, record.error_code) == ("failed", 603), record
    assert record.attempts == settings.worker.max_attempts + 1
    [attempt] = rec.named("job")
    assert attributes(attempt)[tracing.OUTCOME] == "failed"


# --- turning it on, and what happens when it cannot be ---------------------------------


def test_tracing_is_asked_for_by_flag_variable_or_endpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--tracing, IMGSERVE_TRACING or an OTLP endpoint turn tracing on; it is off by
    default, and OpenTelemetry's OTEL_SDK_DISABLED=true turns it off again."""
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    assert not tracing.wanted(config.load({}, environ={}).server)
    assert tracing.wanted(config.load({"tracing": True}, environ={}).server)
    assert tracing.wanted(config.load({}, environ={"IMGSERVE_TRACING": "1"}).server)
    endpoint = config.load({"otlp_endpoint": "http://collector:4318"}, environ={}).server
    assert endpoint.otlp_endpoint == "http://collector:4318" and tracing.wanted(endpoint)
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not tracing.wanted(endpoint)
    assert tracing.start(endpoint) is tracing.NO_TRACING


@pytest.mark.parametrize("url", ["collector:4318", "ftp://collector/", "http://"])
def test_an_otlp_endpoint_must_be_an_http_url(url: str) -> None:
    """--otlp-endpoint takes an http(s) URL with a host; anything else is a bad setting."""
    with pytest.raises(config.SettingsError, match="otlp_endpoint"):
        config.load({"otlp_endpoint": url}, environ={})


def test_the_endpoint_is_a_base_url_as_otel_exporter_otlp_endpoint_is() -> None:
    """--otlp-endpoint http://c:4318 sends to http://c:4318/v1/traces, as the standard
    OTEL_EXPORTER_OTLP_ENDPOINT variable would; without it, the variables decide."""
    assert otel.traces_endpoint("http://c:4318") == "http://c:4318/v1/traces"
    assert otel.traces_endpoint("https://c/otlp/") == "https://c/otlp/v1/traces"
    assert otel.traces_endpoint(None) is None


def _cli(
    args: list[str], *, hide_otel: Path | None = None, otel_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "IMGSERVE_"))}
    env.update(otel_env or {})
    if hide_otel is not None:
        # A package of that name first on the path, which fails to import as an
        # absent one does: the interpreter's own packages stay as they are.
        shadow = hide_otel / "opentelemetry"
        shadow.mkdir(parents=True)
        (shadow / "__init__.py").write_text(
            "raise ModuleNotFoundError(\"No module named 'opentelemetry'\", name='opentelemetry')\n"
        )
        env["PYTHONPATH"] = os.pathsep.join([str(hide_otel), *sys.path])
    return subprocess.run(
        [sys.executable, "-m", "imgserve", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "command",
    [
        ["start", "--tracing"],
        ["serve", "--otlp-endpoint", "http://127.0.0.1:4318"],
        ["worker", "--queue", "redis://127.0.0.1:1/0", "--tracing"],
    ],
    ids=["start", "serve", "worker"],
)
def test_tracing_without_the_extra_is_a_clear_startup_error(
    tmp_path: Path, command: list[str]
) -> None:
    """Tracing asked for without OpenTelemetry installed: the daemon does not start,
    exits 1 and says which extra to install (nothing is left running)."""
    state = tmp_path / "state"
    result = _cli([*command, "--state-dir", str(state), "--port", "1"], hide_otel=tmp_path / "p")
    assert result.returncode == daemon.EXIT_FAIL, result.stderr
    assert "pip install 'imgserve[tracing]'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (state / "imgserve.pid").exists()


@pytest.mark.parametrize(
    "command",
    [
        ["start", "--tracing"],
        ["serve", "--otlp-endpoint", "http://127.0.0.1:4318"],
        ["worker", "--queue", "redis://127.0.0.1:1/0", "--tracing"],
    ],
    ids=["start", "serve", "worker"],
)
def test_an_otel_variable_the_sdk_refuses_is_a_startup_error_before_detaching(
    tmp_path: Path, command: list[str]
) -> None:
    """OTEL_BSP_MAX_QUEUE_SIZE=0, which the SDK refuses: the daemon does not start (start
    does not detach a child), exits 1 and says why in one line, with no traceback."""
    state = tmp_path / "state"
    result = _cli(
        [*command, "--state-dir", str(state), "--port", "1"],
        otel_env={"OTEL_BSP_MAX_QUEUE_SIZE": "0"},
    )
    assert result.returncode == daemon.EXIT_FAIL, result.stderr
    assert "tracing cannot start" in result.stderr and "max_queue_size" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (state / "imgserve.startup.log").exists()
    assert not (state / "imgserve.pid").exists()


def test_without_tracing_no_opentelemetry_module_is_imported(tmp_path: Path) -> None:
    """Tracing off: building the settings, the checks before start, the API app, a
    runner and a timed phase import nothing of OpenTelemetry (it is installed here)."""
    probe = """
import asyncio, sys
from pathlib import Path
from imgserve import api, cli, config, daemon, tracing, worker
from imgserve.metrics import Metrics
from imgserve.queue import open_queue
from imgserve.transports import Transports
settings = cli.settings_from(cli.build_parser().parse_args(["serve", "--state-dir", sys.argv[1]]))
daemon.preflight(settings, daemon.paths_for(settings))
traces = tracing.start(settings.server)
assert traces is tracing.NO_TRACING
metrics = Metrics(traces)

async def build():
    queue = open_queue(None, Path(sys.argv[1]) / "q")
    transports = Transports(settings.transport)
    runner = worker.Runner(queue, transports, None, settings, metrics=metrics)
    service = api.Service(
        settings=settings, queue=queue, transports=transports, runner=runner,
        planner=None, metrics=metrics,
    )
    assert api.make_app(service).middlewares
    with metrics.phase("download"):
        pass
    await transports.aclose()
    await queue.close()

asyncio.run(build())
print(sorted(name for name in sys.modules if name.startswith("opentelemetry")))
"""
    result = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path)],
        env={k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "IMGSERVE_"))},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("answer", "outcome", "failed"), [(200, "delivered", False), (410, "failed", True)]
)
async def test_each_webhook_attempt_is_a_span_in_the_jobs_trace(
    sqlite_queue: JobQueue,
    shared_planner: Planner,
    pool: ImagePool,
    settings: Settings,
    http_server: HTTPTestServer,
    receiver: Receiver,
    answer: int,
    outcome: str,
    failed: bool,
) -> None:
    """The job's completion event is delivered in a ``webhook`` client span under the
    request's span: the job and event ids, the receiver's answer, and status ERROR
    when the receiver refuses it for good (410)."""
    rec = Recorder()
    receiver.default = Reply(answer)
    src = serve(http_server, "trace/Hooked.jpg", jpeg(320, 240))
    job = {
        "source": src,
        "webhook": receiver.url("/hook?token=hidden"),
        "outputs": [file_output(settings, "w.png", 64)],
    }
    reply, delivery = await run_with_webhook(sqlite_queue, shared_planner, pool, settings, rec, job)
    [request] = rec.named("POST /jobs")
    assert delivery.kind is SpanKind.CLIENT
    assert delivery.context.trace_id == request.context.trace_id
    assert delivery.parent is not None and delivery.parent.span_id == request.context.span_id
    assert attributes(delivery) | {
        tracing.JOB_ID: reply["jobId"],
        tracing.WEBHOOK_TYPE: "job.completed",
        tracing.WEBHOOK_ATTEMPT: 1,
        tracing.OUTCOME: outcome,
        "http.response.status_code": answer,
        "url.full": receiver.url("/hook?token=***"),
    } == attributes(delivery)
    assert attributes(delivery)[tracing.WEBHOOK_EVENT].startswith("msg_")
    expected = StatusCode.ERROR if failed else StatusCode.UNSET
    assert delivery.status.status_code is expected


async def test_long_urls_are_cut_to_500_characters_on_every_span(
    sqlite_queue: JobQueue,
    shared_planner: Planner,
    pool: ImagePool,
    settings: Settings,
    http_server: HTTPTestServer,
    receiver: Receiver,
) -> None:
    """A source URL and a webhook URL each thousands of characters long (a long query)
    are on the request, job and webhook spans cut to 500 characters, as an error's
    detail is; no attribute of any span is longer."""
    rec = Recorder()
    src = serve(http_server, "trace/Long.jpg", jpeg(320, 240)) + "?pad=" + "s" * 4000
    job = {
        "source": src,
        "webhook": receiver.url("/hook") + "?pad=" + "w" * 4000,
        "outputs": [file_output(settings, "long.png", 64)],
    }
    _, delivery = await run_with_webhook(sqlite_queue, shared_planner, pool, settings, rec, job)
    [request], [attempt] = rec.named("POST /jobs"), rec.named("job")
    for span in (request, attempt):
        assert attributes(span)[tracing.SOURCE] == src[: tracing.DETAIL_CHARS]
    assert attributes(delivery)["url.full"] == job["webhook"][: tracing.DETAIL_CHARS]
    longest = max(len(str(v)) for span in rec.spans for v in attributes(span).values())
    assert longest == tracing.DETAIL_CHARS


async def test_a_retried_job_has_an_attempt_span_and_a_wait_for_each_try(
    sqlite_queue: JobQueue,
    shared_planner: Planner,
    pool: ImagePool,
    settings: Settings,
    http_server: HTTPTestServer,
) -> None:
    """An upload that fails once (503, retryable) then succeeds: two job spans under
    the request's, attempt 1 ended retry (ERROR, code 501) and attempt 2 done, each
    with its own queue_wait: the second from the retry's due time to attempt 2."""
    rec = Recorder()
    http_server.state.fail_remaining["trace-r.png"] = 1
    retrying = dataclasses.replace(
        settings,
        worker=dataclasses.replace(settings.worker, max_attempts=2),
        transport=dataclasses.replace(
            settings.transport, upload_attempts=1, retry_base_s=0.05, retry_max_s=0.1
        ),
    )
    src = serve(http_server, "trace/Retried.jpg", jpeg(320, 240))
    job = {
        "source": src,
        "placeholder": False,
        "outputs": [{"url": http_server.url("/flaky/trace-r.png"), "width": 64}],
    }
    try:
        async with (
            api_node(sqlite_queue, shared_planner, retrying, rec.tracing) as base,
            worker_node(sqlite_queue, pool, retrying, rec.tracing),
        ):
            status, reply = await post(base, job)
            assert status == 202, reply
            attempts = await rec.wait_for("job", count=2)
    finally:
        await sqlite_queue.close()
    [request] = rec.named("POST /jobs")
    first, second = sorted(attempts, key=lambda span: attributes(span)[tracing.ATTEMPT])
    assert [attributes(first)[tracing.ATTEMPT], attributes(second)[tracing.ATTEMPT]] == [1, 2]
    assert attributes(first)[tracing.OUTCOME] == "retry"
    assert attributes(first)[tracing.ERROR_CODE] == 501
    assert first.status.status_code is StatusCode.ERROR
    assert attributes(second)[tracing.OUTCOME] == "done"
    assert second.status.status_code is StatusCode.UNSET
    waits = sorted(rec.named("queue_wait"), key=lambda span: attributes(span)[tracing.ATTEMPT])
    assert [attributes(w)[tracing.ATTEMPT] for w in waits] == [1, 2]
    for span in (first, second, *waits):
        assert span.parent is not None and span.parent.span_id == request.context.span_id
    assert waits[1].start_time is not None and first.start_time is not None
    assert waits[1].end_time is not None and second.start_time is not None
    assert first.start_time <= waits[1].start_time <= waits[1].end_time <= second.start_time


class SilentCollector:
    """A collector that takes connections and never answers: a listening socket that
    is never read, so an export waits its whole timeout (a closed port would refuse
    at once, and prove nothing about who waits)."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0), backlog=64)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.socket.getsockname()[1]}"

    def connected(self) -> bool:
        """An exporter has connected (a connection waits to be accepted)."""
        readable, _, _ = select.select([self.socket], [], [], 0)
        return bool(readable)

    def close(self) -> None:
        self.socket.close()


async def test_a_collector_that_never_answers_costs_spans_not_jobs(
    sqlite_queue: JobQueue,
    shared_planner: Planner,
    pool: ImagePool,
    settings: Settings,
    http_server: HTTPTestServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tracing (the real OTLP/HTTP exporter, a 30 s export timeout) to a collector that
    accepts and never answers: the job is accepted and done in far less than one
    export timeout, and closing the tracing, with an export hanging and 1,500 spans
    queued, returns within otel.CLOSE_TIMEOUT_S."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "30")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    collector = SilentCollector()
    traces = otel.start(collector.url)
    src = serve(http_server, "trace/Unsent.jpg", jpeg(320, 240))
    job = {"source": src, "outputs": [file_output(settings, "silent.png", 64)]}
    loop = asyncio.get_running_loop()
    try:
        async with (
            api_node(sqlite_queue, shared_planner, settings, traces) as base,
            worker_node(sqlite_queue, pool, settings, traces),
        ):
            posted = loop.time()
            status, reply = await post(base, job)
            accepted_s = loop.time() - posted
            assert status == 202, reply
            record = await wait_finished(sqlite_queue, reply["jobId"])
            done_s = loop.time() - posted
        deadline = loop.time() + WAIT_S
        while not collector.connected():
            assert loop.time() < deadline, "the exporter never connected"
            await asyncio.sleep(0.02)
        for _ in range(1_500):
            traces.tracer.start_span("queued").end()
    finally:
        await sqlite_queue.close()
        closing = loop.time()
        await asyncio.to_thread(traces.close)
        closed_s = loop.time() - closing
        collector.close()
    assert record.state.value == "done"
    assert accepted_s < 10.0 and done_s < 10.0, (accepted_s, done_s)
    assert closed_s < otel.CLOSE_TIMEOUT_S + 1.0, closed_s

"""Completion events: payloads, Standard Webhooks signatures (verified with the
``standardwebhooks`` package, the receiving side users run), what each answer means,
the retry schedule, and the webhook settings."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import ipaddress
import json
import time
import uuid
from collections.abc import AsyncIterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from imgserve import config, errors, webhooks
from imgserve.config import NetPolicy, SettingsError, TransportSettings, WebhookSettings
from imgserve.imaging.formats import Format
from imgserve.imaging.geometry import Size
from imgserve.imaging.pipeline import OutputPlan, SourceInfo
from imgserve.planning import JobPlan, Rendition
from imgserve.queue.base import Event, JobRecord
from imgserve.queue.sqlite import SQLiteQueue
from imgserve.spec import JobSpec, OutputRequest
from tests.webhook_receiver import Receiver, Reply, receiver_fixture  # noqa: F401 - a fixture

SECRET_A = "whsec_" + base64.b64encode(b"the first key, 32 bytes long!!!!").decode()
SECRET_B = "whsec_" + base64.b64encode(b"the second key").decode()
HOOK = "https://hooks.example/imgserve?token=s3cr3t"


def spec(webhook: str | None = HOOK) -> JobSpec:
    return JobSpec(
        source_url="https://src.example/a.jpg",
        source_name="a.jpg",
        outputs=(OutputRequest("https://cdn.example/a-small.webp"),),
        metadata={"post": 42},
        webhook=webhook,
    )


def plan() -> JobPlan:
    info = SourceInfo(Format.JPEG, Size(800, 600), 1)
    return JobPlan(
        "resize",
        info,
        (
            Rendition(OutputPlan(Size(200, 150), Format.WEBP), "https://u:pw@cdn.example/s.webp"),
            Rendition(OutputPlan(Size(400, 300), Format.JPEG), "https://cdn.example/m.jpg"),
        ),
    )


def record() -> JobRecord:
    return JobRecord(id="ab" * 16, job=spec().to_dict(), plan=plan().to_dict(), dst_url="x")


SETTINGS = WebhookSettings(webhook_secrets=(SECRET_A,))


def event(**changes: Any) -> Event:
    made = webhooks.event_for(record(), spec(), plan(), "job.completed", SETTINGS, now=1000.0)
    assert made is not None
    for name, value in changes.items():
        setattr(made, name, value)
    return made


# --- payloads ----------------------------------------------------------------------------


def test_completed_payload_has_links_sizes_and_metadata() -> None:
    """job.completed: jobId, state done, each output's redacted URL, size, format, bytes
    and what it looks like; the source's own info."""
    looks = [{"blurhash": "LEHV6nWB2yk8", "averageColor": "#102030"}, {"blurhash": "L00000"}]
    made = webhooks.event_for(
        record(),
        spec(),
        plan(),
        "job.completed",
        SETTINGS,
        output_bytes=[1234, 5678],
        previews=looks,
        now=0.0,
    )
    assert made is not None
    assert made.id.startswith("msg_") and len(made.id) == 4 + 32
    assert (made.job_id, made.url, made.type, made.state) == (
        "ab" * 16,
        HOOK,
        "job.completed",
        "pending",
    )
    assert made.payload == {
        "type": "job.completed",
        "timestamp": "1970-01-01T00:00:00.000Z",
        "data": {
            "jobId": "ab" * 16,
            "state": "done",
            "outputs": [
                {"url": "https://u:***@cdn.example/s.webp", "width": 200, "height": 150,
                 "format": "webp", "bytes": 1234, **looks[0]},
                {"url": "https://cdn.example/m.jpg", "width": 400, "height": 300,
                 "format": "jpeg", "bytes": 5678, **looks[1]},
            ],
            "sourceInfo": plan().source_info.view(),
            "metadata": {"post": 42},
        },
    }  # fmt: skip
    assert made.payload["data"]["sourceInfo"]["width"] == plan().source_info.size.width


def test_failed_payload_has_the_error_and_no_sizes() -> None:
    """job.failed carries the error's code, message and redacted detail; outputs without bytes."""
    exc = errors.UploadRefused("HTTP 403 from https://u:pw@cdn.example/s.webp")
    made = webhooks.event_for(record(), spec(), plan(), "job.failed", SETTINGS, error=exc)
    assert made is not None
    data = made.payload["data"]
    assert data["state"] == "failed"
    assert data["error"] == {
        "code": exc.code,
        "message": exc.message,
        "detail": "HTTP 403 from https://u:***@cdn.example/s.webp",
    }
    assert all("bytes" not in out for out in data["outputs"])


def test_cancelled_payload() -> None:
    """job.cancelled reports state cancelled and no error."""
    made = webhooks.event_for(record(), spec(), plan(), "job.cancelled", SETTINGS)
    assert made is not None
    assert (made.payload["type"], made.payload["data"]["state"]) == ("job.cancelled", "cancelled")
    assert "error" not in made.payload["data"]


@pytest.mark.parametrize(
    ("job_hook", "default", "expected"),
    [
        (HOOK, None, HOOK),
        (HOOK, "https://default.example/", HOOK),
        (None, "https://default.example/", "https://default.example/"),
        (None, None, None),
    ],
)
def test_event_goes_to_the_jobs_webhook_else_the_default(
    job_hook: str | None, default: str | None, expected: str | None
) -> None:
    """The job's own webhook wins; the default webhook_url serves the others; neither: no event."""
    settings = WebhookSettings(webhook_url=default)
    made = webhooks.event_for(record(), spec(job_hook), plan(), "job.completed", settings)
    assert (made.url if made else None) == expected


def test_unreadable_record_still_gets_an_event_to_the_default() -> None:
    """A record whose spec and plan cannot be read still announces its end (no outputs)."""
    settings = WebhookSettings(webhook_url="https://default.example/")
    made = webhooks.event_for(record(), None, None, "job.failed", settings)
    assert made is not None
    assert made.payload["data"]["outputs"] == [] and made.payload["data"]["metadata"] == {}


def test_each_event_has_its_own_id() -> None:
    """Two events never share a webhook-id."""
    assert event().id != event().id


def test_first_attempt_waits_the_schedules_first_entry() -> None:
    """next_at is the end plus the schedule's first wait (0: at once)."""
    settings = WebhookSettings(webhook_schedule_s=(2.0, 5.0))
    made = webhooks.event_for(record(), spec(), plan(), "job.completed", settings, now=100.0)
    assert made is not None and made.next_at == 102.0


def test_unknown_event_type_is_a_bug() -> None:
    """Only the three event types exist."""
    with pytest.raises(ValueError, match="unknown event type"):
        webhooks.event_for(record(), spec(), plan(), "job.started", SETTINGS)


# --- signing (verified by the standardwebhooks package) ------------------------------------


def _headers(secrets: tuple[str, ...], at: float | None = None) -> tuple[bytes, dict[str, str]]:
    made = event()
    body = webhooks.body_of(made)
    return body, webhooks.headers_for(made, body, secrets, time.time() if at is None else at)


def test_signature_verifies_with_standardwebhooks() -> None:
    """The receiver's library verifies the body and returns the payload."""
    body, headers = _headers((SECRET_A,))
    assert Webhook(SECRET_A).verify(body, headers) == json.loads(body)
    assert headers["webhook-signature"].startswith("v1,")
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"].startswith("imgserve/")


def test_rotation_signs_with_every_secret() -> None:
    """Two secrets: a receiver holding either one verifies; a third secret does not."""
    body, headers = _headers((SECRET_A, SECRET_B))
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(SECRET_A).verify(body, headers)
    Webhook(SECRET_B).verify(body, headers)
    other = "whsec_" + base64.b64encode(b"someone else").decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(body, headers)


def test_tampered_body_does_not_verify() -> None:
    """A changed body fails verification."""
    body, headers = _headers((SECRET_A,))
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET_A).verify(body.replace(b"done", b"fail"), headers)


def test_timestamp_is_the_attempts() -> None:
    """webhook-timestamp is the attempt's time in seconds (so a late retry is not 'too old')."""
    _, headers = _headers((SECRET_A,), at=1_700_000_000.9)
    assert headers["webhook-timestamp"] == "1700000000"


def test_sign_matches_the_spec_example() -> None:
    """sign() reproduces the signature standardwebhooks computes for the same input."""
    body = b'{"test": 2432232314}'
    ours = webhooks.sign(SECRET_A, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    from datetime import UTC, datetime

    theirs = Webhook(SECRET_A).sign(
        "msg_p5jXN8AQM9LWM0D4loKWxJek", datetime.fromtimestamp(1614265330, UTC), body.decode()
    )
    assert ours == theirs


def test_no_secret_no_signature_header() -> None:
    """Without a secret the event is sent unsigned (docs/webhooks.md says to set one)."""
    _, headers = _headers(())
    assert "webhook-signature" not in headers


# --- what an answer means -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "delivered", "permanent", "error"),
    [
        (200, True, False, None),
        (204, True, False, None),
        (302, False, False, "HTTP 302: redirects are not followed"),
        (301, False, False, "HTTP 301: redirects are not followed"),
        (400, False, False, "HTTP 400"),
        (410, False, True, "HTTP 410: the receiver is gone; no more attempts"),
        (429, False, False, "HTTP 429"),
        (500, False, False, "HTTP 500"),
    ],
)
def test_judge(status: int, delivered: bool, permanent: bool, error: str | None) -> None:
    """2xx delivered, 3xx a failure, 410 permanent, others retried."""
    answer = webhooks.judge(status, None)
    assert (answer.error is None, answer.permanent, answer.error) == (delivered, permanent, error)


NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("120", 120.0),
        (" 7 ", 7.0),
        (formatdate(NOW + 30, usegmt=True), 30.0),
        (formatdate(NOW - 30, usegmt=True), 0.0),
        ("soon", None),
        ("-5", None),
    ],
)
def test_retry_after(header: str | None, expected: float | None) -> None:
    """Retry-After in seconds or as an HTTP date; nonsense ignored."""
    assert webhooks.retry_after_s(header, NOW) == expected


SCHEDULE = (0.0, 10.0, 100.0)


def fixed(value: float) -> Any:
    return lambda: value


def test_delivered_ends_the_event() -> None:
    """A 2xx answer: state delivered, the attempt recorded with its status."""
    made = event()
    webhooks.record_attempt(made, webhooks.judge(200, None), 50.0, SCHEDULE)
    assert made.state == "delivered"
    assert made.attempts == [{"at": 50.0, "status": 200, "error": None, "next_at": None}]


def test_failure_waits_the_next_entry_with_jitter() -> None:
    """After attempt n fails, the next is schedule[n] later, within +-10 %."""
    low, high = event(), event()
    webhooks.record_attempt(low, webhooks.judge(500, None), 50.0, SCHEDULE, fixed(0.0))
    webhooks.record_attempt(high, webhooks.judge(500, None), 50.0, SCHEDULE, fixed(0.999999))
    assert (low.state, low.next_at) == ("pending", 50.0 + 9.0)
    assert high.next_at == pytest.approx(50.0 + 11.0)
    assert low.attempts[-1]["next_at"] == low.next_at
    webhooks.record_attempt(low, webhooks.judge(500, None), 59.0, SCHEDULE, fixed(0.5))
    assert low.next_at == 59.0 + 100.0


def test_schedule_used_up_fails_the_event() -> None:
    """One attempt per schedule entry, then state failed."""
    made = event()
    for at in (1.0, 2.0, 3.0):
        assert made.state == "pending"
        webhooks.record_attempt(made, webhooks.Answer(None, "refused"), at, SCHEDULE)
    assert made.state == "failed" and len(made.attempts) == 3
    assert made.attempts[-1]["next_at"] is None


@pytest.mark.parametrize(
    "answer", [webhooks.judge(410, None), webhooks.Answer(None, "x", permanent=True)]
)
def test_gone_or_refused_fails_at_once(answer: webhooks.Answer) -> None:
    """410, or a refused address: failed after one attempt, however long the schedule."""
    made = event()
    webhooks.record_attempt(made, answer, 1.0, SCHEDULE)
    assert made.state == "failed" and len(made.attempts) == 1


def test_waits_count_from_the_answer() -> None:
    """A slow answer: the next wait starts when it came, not when the attempt began."""
    made = event()
    webhooks.record_attempt(
        made, webhooks.judge(503, 1.0), 0.0, SCHEDULE, fixed(0.5), answered_at=3.0
    )
    assert made.next_at == 13.0 and made.attempts[-1]["at"] == 0.0


def test_retry_after_is_honoured_within_the_schedules_longest_wait() -> None:
    """Retry-After longer than the next wait is honoured, but never past the longest wait."""
    honoured = event()
    webhooks.record_attempt(honoured, webhooks.judge(503, 60.0), 0.0, SCHEDULE, fixed(0.5))
    assert honoured.next_at == 60.0
    bounded = event()
    webhooks.record_attempt(bounded, webhooks.judge(503, 86400.0), 0.0, SCHEDULE, fixed(0.5))
    assert bounded.next_at == 100.0
    shorter = event()
    webhooks.record_attempt(shorter, webhooks.judge(429, 1.0), 0.0, SCHEDULE, fixed(0.5))
    assert shorter.next_at == 10.0  # the schedule's wait is the least


def test_redeliver_starts_a_fresh_schedule_with_the_same_id() -> None:
    """A failed event redelivered: pending now, the same id, the whole schedule again."""
    made = event()
    first_id = made.id
    for at in (1.0, 2.0, 3.0):
        webhooks.record_attempt(made, webhooks.Answer(None, "down"), at, SCHEDULE)
    assert made.state == "failed"
    webhooks.redeliver(made, now=10.0)
    assert (made.id, made.state, made.next_at) == (first_id, "pending", 10.0)
    webhooks.record_attempt(made, webhooks.Answer(None, "down"), 10.0, SCHEDULE, fixed(0.5))
    assert (made.state, made.next_at) == ("pending", 20.0)
    assert len(made.attempts) == 4


# --- settings ------------------------------------------------------------------------------


def test_secrets_from_the_environment_comma_or_space_separated() -> None:
    """IMGSERVE_WEBHOOK_SECRET holds one secret or several (commas or spaces)."""
    env = {"IMGSERVE_WEBHOOK_SECRET": f"{SECRET_A}, {SECRET_B}"}
    assert config.load({}, environ=env).webhook.webhook_secrets == (SECRET_A, SECRET_B)
    env = {"IMGSERVE_WEBHOOK_SECRETS": f"{SECRET_A} {SECRET_B}"}
    assert config.load({}, environ=env).webhook.webhook_secrets == (SECRET_A, SECRET_B)


def test_secrets_from_toml_list(tmp_path: Path) -> None:
    """[webhook] webhook_secrets = [...] in the config file."""
    file = tmp_path / "c.toml"
    file.write_text(f'[webhook]\nwebhook_secrets = ["{SECRET_A}", "{SECRET_B}"]\n')
    settings = config.load({}, config_file=file, environ={})
    assert settings.webhook.webhook_secrets == (SECRET_A, SECRET_B)


def test_secrets_file_adds_to_the_secrets(tmp_path: Path) -> None:
    """webhook_secrets_file: its secrets (one a line) come after the others."""
    path = tmp_path / "secrets"
    path.write_text(f"{SECRET_B}\n")
    env = {"IMGSERVE_WEBHOOK_SECRET": SECRET_A}
    settings = config.load({}, environ=env, assignments=[f"webhook_secrets_file={path}"])
    assert settings.webhook.webhook_secrets == (SECRET_A, SECRET_B)


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "must start with 'whsec_'"),
        ("whsec_not*base64!", "'whsec_' \\+ base64"),
        ("whsec_", "key is empty"),
    ],
)
def test_bad_secret_refused_without_showing_it(bad: str, why: str, tmp_path: Path) -> None:
    """A malformed secret is a SettingsError that names the setting, never the secret."""
    with pytest.raises(SettingsError, match=why) as caught:
        config.load({}, environ={"IMGSERVE_WEBHOOK_SECRET": bad})
    assert bad not in str(caught.value) or bad == "whsec_"
    path = tmp_path / "secrets"
    path.write_text(bad)
    with pytest.raises(SettingsError, match="webhook_secrets_file") as caught:
        config.load({}, environ={}, assignments=[f"webhook_secrets_file={path}"])
    assert bad not in str(caught.value) or bad == "whsec_"


def test_secrets_never_in_settings_repr() -> None:
    """The settings' repr (which a log line might show) leaves the secrets out."""
    settings = config.load({}, environ={"IMGSERVE_WEBHOOK_SECRET": SECRET_A})
    assert SECRET_A not in repr(settings)


@pytest.mark.parametrize(
    ("assignment", "why"),
    [
        ("webhook_url=ftp://h.example/", "http\\(s\\) URL"),
        ("webhook_url=https://", "http\\(s\\) URL"),
        ("webhook_schedule_s=" + ",".join(["1"] * 21), "1 to 20 waits"),
        ("webhook_schedule_s=1,-1", "at least 0"),
        ("webhook_schedule_s=1,999999999", "at most 604800"),
        ("webhook_concurrency=0", "at least 1"),
        ("webhook_timeout_s=0", "at least 0.1"),
    ],
)
def test_bad_webhook_settings_refused(assignment: str, why: str) -> None:
    """Out-of-range webhook settings are refused naming the key."""
    with pytest.raises(SettingsError, match=why):
        config.load({}, environ={}, assignments=[assignment])


def test_defaults_follow_the_spec() -> None:
    """Defaults: the spec's schedule (eight attempts over about a day), 15 s per attempt."""
    hooks = WebhookSettings()
    assert hooks.webhook_schedule_s == (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
    assert hooks.webhook_timeout_s == 15.0
    assert hooks.webhook_url is None and hooks.webhook_secrets == ()


# --- delivery: the Dispatcher on a real SQLite queue, to a real receiver --------------------

LOOPBACK = TransportSettings(policy=NetPolicy(allow_nets=(ipaddress.ip_network("127.0.0.0/8"),)))


def hook_settings(**changes: Any) -> WebhookSettings:
    values: dict[str, Any] = {
        "webhook_secrets": (SECRET_A,),
        "webhook_schedule_s": (0.0, 0.1, 0.1),
        "webhook_timeout_s": 2.0,
    }
    return WebhookSettings(**(values | changes))


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[SQLiteQueue]:
    q = SQLiteQueue(tmp_path / "jobs.db")
    yield q
    await q.close()


@contextlib.asynccontextmanager
async def dispatching(
    queue: SQLiteQueue,
    settings: WebhookSettings,
    transport: TransportSettings = LOOPBACK,
    poll_s: float = 0.05,
) -> AsyncIterator[webhooks.Dispatcher]:
    dispatcher = webhooks.Dispatcher(queue, settings, transport, poll_s=poll_s)
    task = asyncio.create_task(webhooks.supervise(dispatcher))
    try:
        yield dispatcher
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            async with asyncio.timeout(15):  # a stop that hangs fails here, named
                await task


async def end_job(
    queue: SQLiteQueue,
    url: str,
    settings: WebhookSettings,
    how: str = "job.completed",
) -> Event:
    """Put a job, deliver it, and end it with its event, as the worker does."""
    rec = JobRecord(
        id=uuid.uuid4().hex, job=spec(url).to_dict(), plan=plan().to_dict(), dst_url="x"
    )
    await queue.put(rec, b"", max_active=100)
    error = errors.UploadRefused("HTTP 403") if how == "job.failed" else None
    made = webhooks.event_for(
        rec, spec(url), plan(), how, settings, output_bytes=[11, 22], error=error
    )
    assert made is not None
    stopping = asyncio.Event()

    async def handler(running: JobRecord) -> None:
        if error is None:
            await queue.complete(running.id, [11, 22], event=made)
        else:
            await queue.fail(running.id, error.code, error.detail, event=made)
        stopping.set()

    async with asyncio.timeout(30):  # a delivery that never comes fails here, named
        await queue.consume(handler, 1, stopping)
    return made


async def settled(queue: SQLiteQueue, job_id: str, timeout_s: float = 20.0) -> Event:
    """The job's one event, once it is delivered or failed for good."""
    deadline = time.monotonic() + timeout_s
    while True:
        events = await queue.job_events(job_id)
        if events and events[0].state != "pending":
            assert len(events) == 1
            return events[0]
        assert time.monotonic() < deadline, f"event still pending: {events}"
        await asyncio.sleep(0.02)


async def test_completed_event_delivered_and_verified(
    queue: SQLiteQueue, receiver: Receiver
) -> None:
    """job.completed reaches the receiver signed, with jobId, state, outputs and metadata."""
    settings = hook_settings()
    async with dispatching(queue, settings):
        made = await end_job(queue, receiver.url(), settings)
        stored = await settled(queue, made.job_id)
    assert stored.state == "delivered"
    assert [a["status"] for a in stored.attempts] == [200]
    (payload,) = receiver.verified(SECRET_A)
    assert payload["type"] == "job.completed"
    data = payload["data"]
    assert (data["jobId"], data["state"], data["metadata"]) == (made.job_id, "done", {"post": 42})
    assert [(o["width"], o["bytes"]) for o in data["outputs"]] == [(200, 11), (400, 22)]
    (request,) = receiver.received()
    assert request.headers["webhook-id"] == made.id
    assert request.headers["Content-Type"] == "application/json"


async def test_failed_event_carries_the_error(queue: SQLiteQueue, receiver: Receiver) -> None:
    """job.failed reaches the receiver with the error's code and message."""
    settings = hook_settings()
    async with dispatching(queue, settings):
        made = await end_job(queue, receiver.url(), settings, "job.failed")
        assert (await settled(queue, made.job_id)).state == "delivered"
    (payload,) = receiver.verified(SECRET_A)
    assert payload["type"] == "job.failed"
    assert payload["data"]["error"]["code"] == errors.UploadRefused.code


async def test_rotation_receiver_with_only_the_old_secret_verifies(
    queue: SQLiteQueue, receiver: Receiver
) -> None:
    """Signed with a new and an old secret: a receiver that knows only the second verifies."""
    settings = hook_settings(webhook_secrets=(SECRET_B, SECRET_A))
    async with dispatching(queue, settings):
        made = await end_job(queue, receiver.url(), settings)
        await settled(queue, made.job_id)
    (payload,) = receiver.verified(SECRET_A)
    assert payload["data"]["jobId"] == made.job_id


async def test_receiver_failing_twice_then_recovering(
    queue: SQLiteQueue, receiver: Receiver
) -> None:
    """500, 503, then 200: three attempts, the same webhook-id, each recorded."""
    receiver.answer(Reply(500), Reply(503))
    settings = hook_settings()
    async with dispatching(queue, settings):
        made = await end_job(queue, receiver.url(), settings)
        stored = await settled(queue, made.job_id)
    assert stored.state == "delivered"
    assert [a["status"] for a in stored.attempts] == [500, 503, 200]
    assert [a["error"] for a in stored.attempts] == ["HTTP 500", "HTTP 503", None]
    assert {r.headers["webhook-id"] for r in receiver.received()} == {made.id}
    assert len(receiver.verified(SECRET_A)) == 3


async def test_each_attempt_is_timed_and_counted_by_its_outcome(
    queue: SQLiteQueue, receiver: Receiver
) -> None:
    """Two failed attempts then a delivery: the webhook phase is timed three times, and
    the attempts are counted as 2 pending (tried again later) and 1 delivered."""
    receiver.answer(Reply(500), Reply(503))
    settings = hook_settings()
    async with dispatching(queue, settings) as dispatcher:
        made = await end_job(queue, receiver.url(), settings)
        assert (await settled(queue, made.job_id)).state == "delivered"
    registry = dispatcher.metrics.registry
    phase = {"phase": "webhook"}
    assert registry.get_sample_value("imgserve_job_phase_duration_seconds_count", phase) == 3
    counted = {
        outcome: registry.get_sample_value("imgserve_webhook_attempts_total", {"outcome": outcome})
        for outcome in ("pending", "delivered", "failed")
    }
    assert counted == {"pending": 2, "delivered": 1, "failed": 0}


async def test_receiver_always_failing_gets_the_whole_schedule(
    queue: SQLiteQueue, receiver: Receiver
) -> None:
    """A receiver that always fails gets one attempt per schedule entry, then none."""
    receiver.default = Reply(500)
    settings = hook_settings()
    async with dispatching(queue, settings):
        made = await end_job(queue, receiver.url(), settings)
        stored = await settled(queue, made.job_id)
    assert stored.state == "failed" and len(stored.attempts) == 3
    assert len(receiver.received()) == 3


async def test_410_stops_for_good(queue: SQLiteQueue, receiver: Receiver) -> None:
    """410 Gone: one attempt, the event failed, never tried again."""
    receiver.answer(Reply(410))
    settings = hook_settings()
    async with dispatching(queue, settings) as dispatcher:
        made = await end_job(queue, receiver.url(), settings)
        stored = await settled(queue, made.job_id)
        dispatcher.poke()
        await asyncio.sleep(0.3)  # a window in which a wrong retry would show
    assert stored.state == "failed" and [a["status"] for a in stored.attempts] == [410]
    assert len(receiver.received()) == 1


async def test_redirect_is_a_failure_never_followed(queue: SQLiteQueue, receiver: Receiver) -> None:
    """302 to another path: counted as a failed attempt; the Location is never requested."""
    moved = (("Location", receiver.url("/elsewhere")),)
    receiver.answer(Reply(302, moved), Reply(302, moved))
    settings = hook_settings()
    async with dispatching(queue, settings):
        made = await end_job(queue, receiver.url(), settings)
        stored = await settled(queue, made.job_id)
    assert [a["status"] for a in stored.attempts] == [302, 302, 200]
    assert "redirects are not followed" in stored.attempts[0]["error"]
    assert receiver.received("/elsewhere") == []


async def test_retry_after_is_honoured(queue: SQLiteQueue, receiver: Receiver) -> None:
    """503 with Retry-After: 1 when the schedule says 0.1 s: the next attempt waits 1 s."""
    receiver.answer(Reply(503, (("Retry-After", "1"),)))
    settings = hook_settings(webhook_schedule_s=(0.0, 0.1, 5.0))
    async with dispatching(queue, settings):
        made = await end_job(queue, receiver.url(), settings)
        assert (await settled(queue, made.job_id)).state == "delivered"
    first, second = receiver.received()
    assert 0.95 <= second.at - first.at < 4.5


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_refused_address_is_never_contacted(
    queue: SQLiteQueue, receiver: Receiver, host: str
) -> None:
    """A receiver on loopback without --allow-net: no request, the event failed at once."""
    settings = hook_settings()
    async with dispatching(queue, settings, TransportSettings()):
        made = await end_job(queue, receiver.url(host=host), settings)
        stored = await settled(queue, made.job_id)
    assert stored.state == "failed" and len(stored.attempts) == 1
    assert stored.attempts[0]["status"] is None
    assert "loopback" in stored.attempts[0]["error"]
    assert receiver.received() == []


async def test_hanging_receiver_times_out_and_is_retried(
    queue: SQLiteQueue, receiver: Receiver
) -> None:
    """A receiver that does not answer within webhook_timeout_s: a failed attempt, retried."""
    receiver.answer(Reply(200, hold_s=5.0))
    settings = hook_settings(webhook_timeout_s=0.5)
    async with dispatching(queue, settings):
        made = await end_job(queue, receiver.url(), settings)
        stored = await settled(queue, made.job_id)
    assert [a["status"] for a in stored.attempts] == [None, 200]
    assert "no answer within 0.5 s" in stored.attempts[0]["error"]


async def test_poke_wakes_the_dispatcher_at_once(queue: SQLiteQueue, receiver: Receiver) -> None:
    """With a long poll interval, poke() after the job's end sends the event at once."""
    settings = hook_settings()
    async with dispatching(queue, settings, poll_s=60.0) as dispatcher:
        await asyncio.sleep(0.1)  # the dispatcher is asleep in its poll
        started = time.monotonic()
        made = await end_job(queue, receiver.url(), settings)
        dispatcher.poke()
        await settled(queue, made.job_id)
    assert time.monotonic() - started < 5.0


async def test_redelivery_sends_again_with_the_same_id(
    queue: SQLiteQueue, receiver: Receiver
) -> None:
    """redeliver() + save_event + poke: a delivered event is sent once more, same webhook-id."""
    settings = hook_settings()
    async with dispatching(queue, settings) as dispatcher:
        made = await end_job(queue, receiver.url(), settings)
        stored = await settled(queue, made.job_id)
        await queue.save_event(webhooks.redeliver(stored))
        dispatcher.poke()
        deadline = time.monotonic() + 10
        while len(receiver.received()) < 2:
            assert time.monotonic() < deadline, "not sent again"
            await asyncio.sleep(0.02)
        again = await settled(queue, made.job_id)
    assert again.state == "delivered" and len(again.attempts) == 2
    assert [r.headers["webhook-id"] for r in receiver.received()] == [made.id, made.id]


class DiesOnce(webhooks.Dispatcher):
    """A dispatcher with a bug that kills its first run (fault injection)."""

    runs = 0

    async def serve(self) -> None:
        self.runs += 1
        if self.runs == 1:
            raise RuntimeError("injected bug")
        await super().serve()


async def test_a_dispatcher_that_dies_is_restarted(queue: SQLiteQueue, receiver: Receiver) -> None:
    """supervise() logs a dead dispatcher and starts it again: the event is still delivered."""
    settings = hook_settings()
    dispatcher = DiesOnce(queue, settings, LOOPBACK, poll_s=0.05)
    task = asyncio.create_task(webhooks.supervise(dispatcher, base_s=0.05))
    try:
        made = await end_job(queue, receiver.url(), settings)
        assert (await settled(queue, made.job_id)).state == "delivered"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert dispatcher.runs == 2


def test_a_schedule_longer_than_jobs_are_kept_is_refused() -> None:
    """Events are pruned with their job: with webhooks configured, a retry schedule
    outlasting keep_finished_s would lose undelivered events, so it is refused at
    load; a daemon without webhook settings may keep jobs for a minute."""
    kept, url = "keep_finished_s=3600", "webhook_url=https://hooks.example/x"
    with pytest.raises(config.SettingsError, match="keep_finished_s"):
        config.load({}, environ={}, assignments=[kept, url, "webhook_schedule_s=0,4000"])
    loaded = config.load({}, environ={}, assignments=[kept, url, "webhook_schedule_s=0,60"])
    assert loaded.webhook.webhook_schedule_s == (0.0, 60.0)
    short = config.load({}, environ={}, assignments=["keep_finished_s=60"])
    assert short.server.keep_finished_s == 60


async def test_metadata_with_a_lone_surrogate_is_still_delivered(
    queue: SQLiteQueue, receiver: Receiver
) -> None:
    """A caller's metadata holding a lone surrogate (valid JSON "\\ud800") is sent
    ASCII-escaped, and verifies; before, encoding it failed on every attempt."""
    settings = hook_settings()
    rec = JobRecord(
        id=uuid.uuid4().hex, job=spec(receiver.url()).to_dict(), plan=plan().to_dict(), dst_url="x"
    )
    made = webhooks.event_for(rec, spec(receiver.url()), plan(), "job.completed", settings)
    assert made is not None
    made.payload["data"]["metadata"] = {"name": "\ud800"}
    await queue.put(rec, b"", max_active=10)
    stopping = asyncio.Event()

    async def handler(running: JobRecord) -> None:
        await queue.complete(running.id, [1], event=made)
        stopping.set()

    await queue.consume(handler, 1, stopping)
    async with dispatching(queue, settings):
        delivered = await settled(queue, rec.id)
    assert delivered.state == "delivered"
    (got,) = receiver.received()
    payload = Webhook(SECRET_A).verify(got.body, got.headers)
    assert payload["data"]["metadata"] == {"name": "\ud800"}


def test_a_keyed_jobs_event_names_its_key() -> None:
    """A job submitted with an API key says which in its event's data (receivers that
    several keys' jobs reach can tell them apart); a job without a key has no such field."""
    keyed = dataclasses.replace(record(), key="cms")
    made = webhooks.event_for(keyed, spec(), plan(), "job.completed", SETTINGS, now=0.0)
    assert made is not None and made.payload["data"]["key"] == "cms"
    plain = webhooks.event_for(record(), spec(), plan(), "job.completed", SETTINGS, now=0.0)
    assert plain is not None and "key" not in plain.payload["data"]

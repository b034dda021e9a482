"""Completion events, signed and delivered as the Standard Webhooks specification says.

How an event travels (docs/webhooks.md):

1. When a job ends, the worker (or the API, for a cancel) builds its event with
   :func:`event_for`; the queue stores it in the same write that ends the job
   (the outbox), so a job that ended always has its event, whatever dies next.
2. A :class:`Dispatcher` runs in every daemon and worker-node process. It claims
   due events from the queue (each under a lease, so two processes never send
   the same attempt), POSTs each one, records the attempt and writes it back.
3. Delivery is at-least-once: the ``webhook-id`` is the same on every attempt, so
   receivers drop duplicates by it.

The pure parts (:func:`event_for`, :func:`sign`, :func:`retry_after_s`,
:func:`record_attempt`) know nothing of sockets and are table-tested; the I/O
parts (:class:`Sender`, :class:`Dispatcher`) run on aiohttp through the HTTP
transport's policy-enforcing session, so a webhook URL meets the same outbound
address policy as sources and destinations.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import hashlib
import hmac
import json
import logging
import random as _random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from imgserve import __version__, errors
from imgserve.config import WEBHOOK_SECRET_PREFIX, TransportSettings, WebhookSettings
from imgserve.metrics import Metrics
from imgserve.planning import JobPlan
from imgserve.queue.base import Event, JobQueue, JobRecord
from imgserve.retry import backoff_s
from imgserve.spec import JobSpec
from imgserve.urls import redact_url

log = logging.getLogger("imgserve.webhooks")

STATES = {"job.completed": "done", "job.failed": "failed", "job.cancelled": "cancelled"}
"""Each event type and the job state it reports."""

JITTER = 0.1
"""Each wait of the schedule is stretched or shrunk by up to 10 %, so the events of
jobs that ended together do not come back to a receiver together."""

USER_AGENT = f"imgserve/{__version__}"


# --- the event ---------------------------------------------------------------------------


def new_event_id() -> str:
    """A ``webhook-id``: ``msg_`` + 32 hex digits, unique per event."""
    return "msg_" + uuid.uuid4().hex


def webhook_url_for(spec: JobSpec | None, settings: WebhookSettings) -> str | None:
    """Where a job's event goes: its own ``webhook``, else the daemon's default."""
    if spec is not None and spec.webhook:
        return spec.webhook
    return settings.webhook_url


def outputs_of(
    plan: JobPlan | None,
    output_bytes: Sequence[int] | None,
    previews: Sequence[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Each output as the job view, the POST /jobs reply and the event show it:
    links and sizes, once done what it looks like (``previews``), never the image."""
    if plan is None:
        return []
    views = []
    for index, rendition in enumerate(plan.outputs):
        view: dict[str, Any] = {
            "url": redact_url(rendition.dst_url),
            "width": rendition.plan.result.width,
            "height": rendition.plan.result.height,
            "format": rendition.plan.output.value,
        }
        if output_bytes is not None and index < len(output_bytes):
            view["bytes"] = output_bytes[index]
        if previews is not None and index < len(previews):
            view.update(previews[index])
        views.append(view)
    return views


def iso_utc(at: float) -> str:
    """``at`` as ISO 8601 in UTC, to the millisecond (``2025-01-31T12:00:00.000Z``)."""
    text = datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def record_event(
    record: JobRecord, type: str, settings: WebhookSettings, **details: Any
) -> Event | None:
    """``event_for`` a stored job, its spec and plan read from the record. A record
    that cannot be read still gets its event, without outputs: its end is news too."""
    spec = plan = None
    with contextlib.suppress(Exception):
        spec = JobSpec.from_dict(record.job)
    with contextlib.suppress(Exception):
        plan = JobPlan.from_dict(record.plan)
    return event_for(record, spec, plan, type, settings, **details)


def event_for(
    record: JobRecord,
    spec: JobSpec | None,
    plan: JobPlan | None,
    type: str,
    settings: WebhookSettings,
    *,
    output_bytes: Sequence[int] | None = None,
    previews: Sequence[dict[str, Any]] | None = None,
    error: errors.ImgserveError | None = None,
    now: float | None = None,
) -> Event | None:
    """The event announcing that ``record``'s job ended as ``type`` (a key of
    STATES), or None when it goes nowhere (no ``webhook`` on the job, no default).

    ``spec`` and ``plan`` are the record's, read by the caller (None when they
    cannot be read: the event still goes to the default URL, without outputs).
    ``output_bytes`` are the sizes uploaded and ``previews`` what each output looks
    like (job.completed), ``error`` how the job failed (job.failed). The payload is
    kept small: links, hashes and colours, not images.
    """
    if type not in STATES:
        raise ValueError(f"unknown event type {type!r}")
    url = webhook_url_for(spec, settings)
    if url is None:
        return None
    at = time.time() if now is None else now
    data: dict[str, Any] = {
        "jobId": record.id,
        "state": STATES[type],
        "outputs": outputs_of(
            plan,
            output_bytes if type == "job.completed" else None,
            previews if type == "job.completed" else None,
        ),
    }
    if plan is not None:
        data["sourceInfo"] = plan.source_info.view()
    if record.key is not None:  # which API key's job: receivers shared by tenants can tell
        data["key"] = record.key
    if error is not None:
        data["error"] = {
            "code": error.code,
            "message": error.message,
            "detail": redact_url(error.detail),
        }
    data["metadata"] = spec.metadata if spec is not None else {}
    payload = {"type": type, "timestamp": iso_utc(at), "data": data}
    return Event(
        id=new_event_id(),
        job_id=record.id,
        url=url,
        type=type,
        payload=payload,
        created_at=at,
        next_at=at + settings.webhook_schedule_s[0],
        key=record.key,
        trace_context=record.trace_context,
    )


def body_of(event: Event) -> bytes:
    """The bytes sent (and signed): the payload as compact JSON, ASCII-escaped (a
    lone surrogate in a caller's metadata cannot be UTF-8 encoded; escaped, it can)."""
    return json.dumps(event.payload, separators=(",", ":")).encode()


# --- signing -----------------------------------------------------------------------------


def secret_key(secret: str) -> bytes:
    """The HMAC key a ``whsec_`` secret holds (config.check_webhook_secret checked it)."""
    encoded = secret.removeprefix(WEBHOOK_SECRET_PREFIX)
    return base64.b64decode(encoded + "=" * (-len(encoded) % 4))


def sign(secret: str | Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: ``v1,<base64 HMAC-SHA256(key, "id.timestamp.body")>``,
    one per secret, space-separated (a receiver holding any one of them verifies)."""
    secrets = (secret,) if isinstance(secret, str) else tuple(secret)
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(secret_key(s), signed, hashlib.sha256).digest()).decode()
        for s in secrets
    )


def headers_for(event: Event, body: bytes, secrets: Sequence[str], at: float) -> dict[str, str]:
    """The headers of one attempt at ``at`` (the timestamp is the attempt's, so a
    receiver's replay window holds for a retry hours after the job ended)."""
    timestamp = int(at)
    headers = {
        "webhook-id": event.id,
        "webhook-timestamp": str(timestamp),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }
    if secrets:
        headers["webhook-signature"] = sign(secrets, event.id, timestamp, body)
    return headers


# --- what an answer means ----------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """How one attempt went."""

    status: int | None
    """The HTTP status, or None when no answer came."""
    error: str | None = None
    """Why it failed, in words (None when delivered)."""
    retry_after_s: float | None = None
    """The receiver's ``Retry-After``, in seconds from the attempt."""
    permanent: bool = False
    """A failure no retry can fix without a change of settings (a refused address,
    a URL that is not http(s))."""


def retry_after_s(value: str | None, now: float) -> float | None:
    """A ``Retry-After`` header (seconds, or an HTTP date) as seconds from ``now``;
    None when absent or unreadable."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def judge(status: int, retry_after: float | None) -> Answer:
    """What an HTTP status means for an event: 2xx delivered; 410 gone for good;
    3xx a failure (redirects are never followed: the URL must be the receiver's);
    anything else a failure the schedule retries."""
    if 200 <= status < 300:
        return Answer(status)
    if status == 410:
        return Answer(status, "HTTP 410: the receiver is gone; no more attempts", permanent=True)
    if 300 <= status < 400:
        return Answer(status, f"HTTP {status}: redirects are not followed", retry_after)
    return Answer(status, f"HTTP {status}", retry_after)


def _jittered(wait_s: float, random: Callable[[], float]) -> float:
    return wait_s * (1.0 - JITTER + 2 * JITTER * random())


def _round(event: Event) -> int:
    """Attempts since the event was last (re)started: the schedule's position.
    An attempt that ended the event has ``next_at`` None; a redelivery starts over."""
    count = 0
    for attempt in reversed(event.attempts):
        if attempt.get("next_at", 0) is None:
            break
        count += 1
    return count


def record_attempt(
    event: Event,
    answer: Answer,
    at: float,
    schedule_s: Sequence[float],
    random: Callable[[], float] = _random.random,
    *,
    answered_at: float | None = None,
) -> None:
    """Record an attempt made at ``at`` and answered (or given up) at ``answered_at``
    on ``event``: append it to ``attempts``, and set ``state`` and ``next_at`` from
    the answer and the schedule. Waits count from the answer, as Retry-After does."""
    ended = at if answered_at is None else answered_at
    attempt: dict[str, Any] = {"at": at, "status": answer.status, "error": answer.error}
    delivered = answer.status is not None and 200 <= answer.status < 300
    tried = _round(event) + 1
    if delivered:
        event.state, event.next_at = "delivered", at
    elif answer.permanent or tried >= len(schedule_s):
        event.state, event.next_at = "failed", at
    else:
        wait = _jittered(schedule_s[tried], random)
        if answer.retry_after_s is not None:
            # Honoured, within the schedule's longest wait (a receiver cannot park
            # an event for a year).
            wait = max(wait, min(answer.retry_after_s, max(schedule_s)))
        event.next_at = ended + wait
    attempt["next_at"] = event.next_at if event.state == "pending" else None
    event.attempts.append(attempt)


def redeliver(event: Event, now: float | None = None) -> Event:
    """``POST /jobs/<id>/webhook``: send ``event`` again now, with the same
    ``webhook-id``, on a fresh schedule (its earlier attempts stay recorded).
    The caller saves it (queue.save_event) and pokes the dispatcher."""
    event.state = "pending"
    event.next_at = time.time() if now is None else now
    if event.attempts and event.attempts[-1].get("next_at") is not None:
        # A pending event: this attempt is a fresh start too.
        event.attempts[-1]["next_at"] = None
    return event


# --- delivery ----------------------------------------------------------------------------


class Sender(Protocol):
    async def post(self, url: str, headers: dict[str, str], body: bytes) -> Answer: ...

    async def aclose(self) -> None: ...


class HTTPSender:
    """POSTs events through the HTTP transport's policy-enforcing session: names
    resolve to allowed addresses only, IP literals are checked first, nothing is
    followed, and each attempt has one deadline."""

    def __init__(self, transport: TransportSettings, timeout_s: float) -> None:
        self.transport = transport
        self.timeout_s = timeout_s
        self._session: Any = None

    def _client(self) -> Any:
        from imgserve.transports import http

        if self._session is None or self._session.closed:
            self._session = http.policy_session(self.transport, USER_AGENT)
        return self._session

    async def post(self, url: str, headers: dict[str, str], body: bytes) -> Answer:
        from imgserve.transports import http, outcomes

        now = time.time()
        try:
            target, auth = http.parse_url(url)
            http.check_literal(target, self.transport.policy)
            if auth is not None:
                headers = {**headers, "Authorization": auth}
            async with asyncio.timeout(self.timeout_s):
                with outcomes.translated(outcomes.UPLOAD, url):
                    async with self._client().post(
                        target, data=body, headers=headers, allow_redirects=False
                    ) as resp:
                        # The body is never read: a receiver cannot make us hold its reply.
                        after = retry_after_s(resp.headers.get("Retry-After"), now)
                        return judge(resp.status, after)
        except TimeoutError:
            return Answer(None, f"no answer within {self.timeout_s:g} s")
        except (errors.AddressRefused, errors.URLInvalid) as exc:
            return Answer(None, exc.detail, permanent=True)
        except errors.ImgserveError as exc:
            return Answer(None, exc.detail)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class Dispatcher:
    """Claims due events from the queue and delivers them, ``webhook_concurrency``
    at once, until cancelled. Every process that runs jobs (or takes cancels) runs
    one; the queue's claim is atomic, so several share the outbox safely."""

    def __init__(
        self,
        queue: JobQueue,
        settings: WebhookSettings,
        transport: TransportSettings,
        *,
        sender: Sender | None = None,
        poll_s: float = 0.25,
        random: Callable[[], float] = _random.random,
        secrets_for: Callable[[str | None], Sequence[str] | None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.queue = queue
        self.metrics = metrics or Metrics()
        """Times each attempt (the ``webhook`` phase) and counts how attempts end; with
        its tracing, each attempt is a ``webhook`` span in its job's trace."""
        self.settings = settings
        self.secrets_for = secrets_for or (lambda _key: settings.webhook_secrets)
        """The secrets that sign an event, by its job's API key name (auth.webhook_signer);
        None: this process cannot sign it, so it is left for one that can."""
        self.sender: Sender = sender or HTTPSender(transport, settings.webhook_timeout_s)
        self.poll_s = poll_s
        self.random = random
        # Long enough for one attempt to end and be saved, so no one else takes it
        # meanwhile; short enough that an attempt lost with its process (kill -9) is
        # made again soon.
        self.lease_s = 2 * settings.webhook_timeout_s + 5.0
        self._wake = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()

    def poke(self) -> None:
        """A new event is stored: look at once instead of at the next poll."""
        self._wake.set()

    async def serve(self) -> None:
        """Deliver events until cancelled (in-flight attempts are cancelled with it:
        their leases run out and they are tried again). A failing queue is logged
        and retried with backoff; only a bug escapes."""
        failures = 0
        try:
            while True:
                free = self.settings.webhook_concurrency - len(self._inflight)
                claimed: list[Event] = []
                if free > 0:
                    try:
                        claimed = await self.queue.claim_events(free, self.lease_s)
                    except Exception as exc:  # the queue is down: keep trying
                        failures += 1
                        wait = backoff_s(failures, base_s=0.5, max_s=30.0, min_fraction=0.5)
                        log.warning(
                            "webhooks: cannot claim events (%s); again in %.1f s", exc, wait
                        )
                        await asyncio.sleep(wait)
                        continue
                    failures = 0
                for event in claimed:
                    task = asyncio.create_task(self._deliver(event))
                    self._inflight.add(task)
                    task.add_done_callback(self._ended)
                if free > 0 and len(claimed) == free:
                    continue  # a full batch: more may be due
                # Jittered: processes polling in step would race for each due event
                # the same way every time (a handed-off one would never change hands).
                # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a
                # cancel that lands as the wait ends, and the dispatcher then never stops.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_s * (0.5 + self.random())):
                        await self._wake.wait()
                self._wake.clear()
        finally:
            for task in list(self._inflight):
                task.cancel()
            await asyncio.gather(*self._inflight, return_exceptions=True)
            await self.sender.aclose()

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("webhooks: delivery task failed", exc_info=task.exception())
        self._wake.set()  # a slot is free

    async def _deliver(self, event: Event) -> None:
        at = time.time()
        secrets = self.secrets_for(event.key)
        if secrets is None:
            await self._hand_off(event, at)
            return
        with self.metrics.tracing.webhook_span(event):
            await self._attempt(event, at, secrets)

    async def _attempt(self, event: Event, at: float, secrets: Sequence[str]) -> None:
        """Send the event once, record how it went, and save it."""
        try:
            body = body_of(event)
            headers = headers_for(event, body, secrets, at)
            with self.metrics.timed("webhook"):  # (the attempt's span is webhook_span's)
                answer = await self.sender.post(event.url, headers, body)
        except Exception as exc:  # a bug: recorded as a failed attempt, never a lease loop
            log.exception("webhook %s for job %s could not be sent", event.id, event.job_id)
            answer = Answer(None, f"not sent: {type(exc).__name__}", permanent=True)
        schedule = self.settings.webhook_schedule_s
        record_attempt(event, answer, at, schedule, self.random, answered_at=time.time())
        self.metrics.webhooks.labels(event.state).inc()
        self.metrics.tracing.webhook_outcome(event)
        shown = redact_url(event.url)
        if event.state == "delivered":
            log.info(
                "webhook %s %s for job %s delivered to %s",
                event.id,
                event.type,
                event.job_id,
                shown,
            )
        elif event.state == "failed":
            log.warning(
                "webhook %s %s for job %s to %s failed for good after %d attempts: %s",
                event.id, event.type, event.job_id, shown, len(event.attempts), answer.error,
            )  # fmt: skip
        else:
            log.info(
                "webhook %s to %s: %s; next attempt in %.1f s",
                event.id, shown, answer.error, max(0.0, event.next_at - time.time()),
            )  # fmt: skip
        try:
            await self.queue.save_event(event)
        except Exception as exc:  # the lease runs out and the attempt is made again
            log.warning(
                "webhook %s: attempt not recorded (%s); it will be made again", event.id, exc
            )

    async def _hand_off(self, event: Event, now: float) -> None:
        """Leave an event this process cannot sign (its job's API key may have its own
        secret, and this node has no keys file) for a node that can: due again in
        about HANDOFF_S, no attempt recorded (docs/security.md). The wait is jittered:
        exactly HANDOFF_S would have it come due just as this process polls again, so
        it would win every claim and the event never reach a node that can sign it."""
        event.next_at = now + HANDOFF_S * (0.5 + self.random())
        log.debug("webhook %s: key %s unknown here; left for another node", event.id, event.key)
        try:
            await self.queue.save_event(event)
        except Exception as exc:  # the lease runs out and it comes due anyway
            log.warning("webhook %s: not handed off (%s)", event.id, exc)


HANDOFF_S = 1.0
"""How long an event a process cannot sign waits before any dispatcher claims it again."""


async def supervise(dispatcher: Dispatcher, *, base_s: float = 1.0, max_s: float = 60.0) -> None:
    """Run ``dispatcher.serve`` for ever: if it dies (a bug), log it and start it
    again after a backoff, so deliveries never stop silently. Cancel to stop."""
    deaths = 0
    while True:
        try:
            await dispatcher.serve()
        except Exception:
            deaths += 1
            wait = backoff_s(deaths, base_s=base_s, max_s=max_s, min_fraction=0.5)
            log.exception("webhooks: the dispatcher died; restarting in %.1f s", wait)
            await asyncio.sleep(wait)

"""The job queue interface: what the API and the job runners need of a backend.

A backend stores each accepted job (and a copy of its source) durably before
``put`` returns, delivers jobs to a handler with ``consume`` (at-least-once: a
job whose runner vanished is delivered again), and keeps finished jobs for
``GET /jobs/<id>`` until ``prune`` removes them. The handler decides how a job
ends by calling ``complete``, ``fail`` or ``retry``; a handler that raises
instead is delivered again after a backoff, so no delivered job is left
without an end. tests/queue/test_contract.py runs one suite against every
backend.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import binascii
import enum
import os
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, fields
from typing import Any

from imgserve import errors
from imgserve.retry import backoff_s


class State(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


ENDED = frozenset({State.DONE, State.FAILED, State.CANCELLED})
"""The states a job never leaves."""

PRIORITIES = ("interactive", "batch")
"""Lanes: a queued interactive job is always delivered before any batch job."""


NODE = f"{socket.gethostname()}:{os.getpid()}"
"""This process, as job records name the node that ran them."""


@dataclass
class JobRecord:
    """One accepted job and everything ``GET /jobs/<id>`` reports about it."""

    id: str
    job: dict[str, Any]
    """The validated request (request.Job.to_dict())."""
    plan: dict[str, Any]
    """What it produces (planning.JobPlan.to_dict(), versioned)."""
    dst_url: str
    """The first output's destination (0.2's dstURL); the plan has every output's."""
    state: State = State.QUEUED
    attempts: int = 0
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    run_at: float = 0.0
    error_code: int | None = None
    error_detail: str | None = None
    node: str | None = None
    """host:pid of the process that ran (or runs) the job."""
    output_bytes: list[int] | None = None
    """Once done: the size of each output as uploaded, in the plan's order."""
    previews: list[dict[str, Any]] | None = None
    """Once done: what each output looks like (pipeline.Rendered.preview), in order."""
    priority: str = "interactive"
    """One of PRIORITIES."""
    key: str | None = None
    """The name of the API key that submitted the job (None: keys were not configured)."""
    trace_context: dict[str, str] | None = None
    """The W3C Trace Context (``traceparent``, ``tracestate``) of the request that
    accepted the job, which its runner continues (imgserve.tracing); None: not traced,
    or stored before tracing existed."""

    @property
    def finished(self) -> bool:
        return self.state in ENDED

    @property
    def due_at(self) -> float:
        """When the job was due to run: accepted, or its retry's backoff over."""
        return max(self.created_at, self.run_at)

    def mark_running(self, attempt: int) -> None:
        self.state = State.RUNNING
        self.attempts = attempt
        self.started_at = time.time()
        self.node = NODE

    def mark_done(
        self,
        output_bytes: list[int] | None = None,
        previews: list[dict[str, Any]] | None = None,
    ) -> None:
        self.state = State.DONE
        self.output_bytes = output_bytes
        self.previews = previews
        self.finished_at = time.time()
        self.error_code = self.error_detail = None

    def mark_failed(self, code: int, detail: str) -> None:
        self.state = State.FAILED
        self.finished_at = time.time()
        self.error_code, self.error_detail = code, detail

    def mark_retry(self, delay_s: float, code: int, detail: str) -> None:
        self.state = State.QUEUED
        self.run_at = time.time() + delay_s
        self.error_code, self.error_detail = code, detail

    def mark_cancelled(self) -> None:
        self.state = State.CANCELLED
        self.finished_at = time.time()

    def check_cancellable(self) -> None:
        """JobNotCancellable unless the job is queued (the only state cancel may end)."""
        if self.state is not State.QUEUED:
            raise errors.JobNotCancellable(f"job {self.id} is {self.state.value}")

    def to_dict(self) -> dict[str, Any]:
        # Shallow on purpose: job and plan are plain JSON dicts already (asdict would
        # deep-copy them on every state change).
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["state"] = self.state.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobRecord:
        """Read a stored record; fields a later release added are ignored."""
        names = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in names}
        values["state"] = State(values["state"])
        return cls(**values)


@dataclass
class Event:
    """A job's completion event in the outbox. It is stored by the same write that
    ends its job, so a job that ended always has its event, and it is delivered at
    least once by webhooks.py."""

    id: str
    """The ``webhook-id``: the same on every attempt (``msg_`` + 32 hex digits)."""
    job_id: str
    url: str
    type: str
    """job.completed, job.failed or job.cancelled."""
    payload: dict[str, Any]
    """The body, as it is signed and sent on every attempt."""
    created_at: float = field(default_factory=time.time)
    state: str = "pending"
    """pending (an attempt is due at ``next_at``), delivered, failed (gave up after
    the schedule, or refused for good: 410, a refused address)."""
    next_at: float = 0.0
    attempts: list[dict[str, Any]] = field(default_factory=list)
    """One ``{"at", "status", "error"}`` per attempt, oldest first (status None when
    no HTTP answer came)."""
    key: str | None = None
    """The name of the API key its job was submitted with: a key may have its own
    signing secret (auth.webhook_signer)."""
    trace_context: dict[str, str] | None = None
    """Its job's ``JobRecord.trace_context``: each delivery attempt's span joins the
    job's trace (imgserve.tracing)."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Event:
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})


@dataclass(frozen=True)
class Change:
    """One job state change in the change feed (``GET /events``)."""

    id: str
    """Opaque, increasing: resume after it (SSE ``Last-Event-ID``)."""
    job_id: str
    state: State
    at: float


@dataclass(frozen=True)
class KeyEntry:
    """What an idempotency key holds: the request it was first used with and, once
    that request was answered, its reply."""

    fingerprint: str
    reply: dict[str, Any] | None
    """{"status", "headers", "body"}; None while the first request is being answered."""


def encode_list_cursor(created_at: float, job_id: str) -> str:
    """The ``list_jobs`` cursor after the job (``created_at``, ``job_id``): opaque to
    clients (base64url of "created_at:id", the float written exactly)."""
    text = f"{created_at!r}:{job_id}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_list_cursor(cursor: str) -> tuple[float, str]:
    """(created_at, id) of a ``list_jobs`` cursor; JobFieldInvalid("cursor: ...") when
    it is not one this module made."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, job_id = text.split(":", 1)
        created_at = float(created)
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise errors.JobFieldInvalid(
            f"cursor: not a cursor from a previous page ({cursor!r})"
        ) from exc
    if not job_id or created_at != created_at:  # NaN
        raise errors.JobFieldInvalid(f"cursor: not a cursor from a previous page ({cursor!r})")
    return created_at, job_id


def bad_change_id(after: str) -> errors.JobFieldInvalid:
    return errors.JobFieldInvalid(f"Last-Event-ID: not an event id from this stream ({after!r})")


Handler = Callable[[JobRecord], Coroutine[Any, Any, None]]

REDELIVERY_BASE_S = 1.0
REDELIVERY_MAX_S = 60.0


async def run_delivery(handler: Handler, record: JobRecord, deadline_s: float) -> str | None:
    """Run ``handler(record)`` within ``deadline_s``: None when it returned, else
    what went wrong in words (it raised, or ran past the deadline and was
    cancelled), for the backend to record while it delivers the job again."""
    deadline = asyncio.timeout(deadline_s)
    try:
        async with deadline:
            await handler(record)
    except Exception as exc:  # the contract: raised or overran -> delivered again
        if isinstance(exc, TimeoutError) and deadline.expired():
            return f"delivery ran past its deadline of {deadline_s:g} s"
        return f"handler raised {type(exc).__name__}: {exc}"
    return None


def redelivery_delay_s(attempt: int) -> float:
    """How long a job waits after its handler raised on delivery ``attempt``:
    1-2 s, doubling to 30-60 s (never at once: the fault may be ours)."""
    return backoff_s(
        max(1, attempt), base_s=REDELIVERY_BASE_S, max_s=REDELIVERY_MAX_S, min_fraction=0.5
    )


class JobQueue(abc.ABC):
    """A durable store of jobs with at-least-once delivery to runners."""

    max_source_bytes: int | None = None
    """The largest source ``put`` keeps a copy of (None: every one); a larger one
    is downloaded again by the worker, so an uploaded source cannot be larger."""

    @abc.abstractmethod
    async def put(self, record: JobRecord, source: bytes, *, max_active: int) -> None:
        """Store a new job and its source durably; QueueFull when ``max_active`` are unfinished."""

    @abc.abstractmethod
    async def source(self, job_id: str) -> bytes | None:
        """The stored copy of a job's source (None when it was not kept)."""

    async def source_file(self, job_id: str) -> str | None:
        """A local file holding the source, when the backend keeps one (cheaper than
        passing the bytes to a worker process); None otherwise."""
        return None

    @abc.abstractmethod
    async def consume(self, handler: Handler, concurrency: int, stopping: asyncio.Event) -> None:
        """Deliver due jobs (state running, attempts + 1) to ``handler``, up to
        ``concurrency`` at once, until ``stopping`` is set and the running ones end.

        The handler ends each job with ``complete``, ``fail`` or ``retry``. If it
        raises instead (any Exception), or runs past the backend's delivery
        deadline, the job is delivered again after ``redelivery_delay_s`` with
        its error recorded (code 601); the handler's attempt limit is what ends
        a job that keeps failing that way. A failure of the backend itself
        (a claim that raises) is logged and retried with backoff; ``consume``
        returns only once ``stopping`` is set.

        Cancelling it cancels the running handlers; their jobs are delivered again.
        """

    @abc.abstractmethod
    async def complete(
        self,
        job_id: str,
        output_bytes: list[int] | None = None,
        event: Event | None = None,
        previews: list[dict[str, Any]] | None = None,
    ) -> None:
        """Mark a running job done, with the size of each output it uploaded (and what
        each looks like, ``previews``), storing
        ``event`` in the outbox in the same write. A job that already ended keeps its
        first end and stores no event (a duplicate delivery finishing late changes
        nothing)."""

    @abc.abstractmethod
    async def fail(self, job_id: str, code: int, detail: str, event: Event | None = None) -> None:
        """Mark a job failed for good, storing ``event`` in the same write (no effect,
        and no event stored, on a job that already ended)."""

    @abc.abstractmethod
    async def retry(self, job_id: str, delay_s: float, code: int, detail: str) -> None:
        """Put a running job back, due after ``delay_s``, recording why (no
        effect on a job that already ended)."""

    @abc.abstractmethod
    async def get(self, job_id: str) -> JobRecord | None: ...

    @abc.abstractmethod
    async def counts(self) -> dict[str, int]:
        """Number of jobs in each state."""

    @abc.abstractmethod
    async def lanes(self) -> dict[str, int]:
        """Number of queued jobs in each lane (PRIORITIES), retries waiting among them."""

    async def recover(self) -> int:
        """On start: hand back jobs a previous run left running; return how many."""
        return 0

    @abc.abstractmethod
    async def prune(self, older_than_s: float) -> int:
        """Delete ended jobs (done, failed, cancelled) older than ``older_than_s``, with
        their events; trim the change feed to ``keep_changes``; drop expired
        idempotency keys. Return how many jobs were deleted."""

    # --- job control and the outbox (#13) -----------------------------------------------
    # Every backend implements these (tests/queue/test_contract.py). complete() and
    # fail() take ``event: Event | None = None`` too: the event is stored in the same
    # write that ends the job, and only if that write ends it.

    @abc.abstractmethod
    async def cancel(self, job_id: str, event: Event | None = None) -> JobRecord:
        """End a queued job as cancelled (never delivered after this), storing its
        event with it; JobNotFound, or JobNotCancellable for a job running or ended."""

    @abc.abstractmethod
    async def list_jobs(
        self, state: State | None, limit: int, cursor: str | None, *, key: str | None = None
    ) -> tuple[list[JobRecord], str | None]:
        """Jobs newest first (by created_at, then id), optionally in one state and only
        those submitted with the API key named ``key``; at most ``limit``, after
        ``cursor`` (opaque, from the previous page); the cursor of the next page, or
        None on the last. The key filter reads an index, not every job."""

    @abc.abstractmethod
    async def changes(self, after: str | None, limit: int) -> list[Change]:
        """State changes after the change ``after`` (oldest first, at most ``limit``);
        ``after=None``: from the oldest kept. Every put and state change is one Change,
        written with it. The feed keeps at least the last ``keep_changes`` changes."""

    @abc.abstractmethod
    async def change_cursor(self) -> str | None:
        """The id of the newest change (None when there is none): resume from it to
        see only what happens from now on."""

    @abc.abstractmethod
    async def claim_events(self, limit: int, lease_s: float) -> list[Event]:
        """Pending events due now, at most ``limit``, each leased for ``lease_s`` (its
        ``next_at`` moved on) so no other dispatcher takes it meanwhile."""

    @abc.abstractmethod
    async def save_event(self, event: Event) -> None:
        """Write back an event after an attempt (state, next_at, attempts); a pending
        one comes due again at ``next_at``. An event deleted meanwhile (pruned with
        its job) is not written back."""

    @abc.abstractmethod
    async def job_events(self, job_id: str) -> list[Event]:
        """A job's events, oldest first (kept as long as the job is)."""

    @abc.abstractmethod
    async def reserve_key(self, key: str, fingerprint: str, ttl_s: float) -> KeyEntry | None:
        """Take the idempotency ``key`` for a request with ``fingerprint``: None when it
        was free (the caller answers the request, then ``finish_key`` or
        ``release_key``), else what the key holds. Atomic across API nodes. A key
        held ``ttl_s`` without a ``finish_key`` (its node died) is free again."""

    @abc.abstractmethod
    async def finish_key(self, key: str, reply: dict[str, Any], ttl_s: float) -> None:
        """Store the reply of the request that holds ``key``, kept ``ttl_s`` from now
        (nothing is stored when the key was released or expired meanwhile)."""

    @abc.abstractmethod
    async def release_key(self, key: str) -> None:
        """Free ``key`` (its request was refused: a retry may try again)."""

    async def nodes(self) -> list[dict[str, Any]]:
        """Worker nodes seen recently (distributed backends), for /health."""
        return []

    async def announce(self, node: dict[str, Any]) -> None:  # noqa: B027 - optional
        """Publish this worker node's state (distributed backends)."""

    async def leave(self, name: str) -> None:  # noqa: B027 - optional
        """Withdraw this worker node from ``nodes()`` (it is stopping)."""

    async def close(self) -> None:  # noqa: B027 - optional
        """Release connections."""

"""Typed views of what imgserve answers: jobs, their outputs, pages, change events
and webhook events (field names as docs/api.md and docs/webhooks.md give them, in
snake_case). Frozen dataclasses built by ``from_dict``; each keeps the JSON it was
read from in ``raw``, so a field a later daemon adds is still there to read.

Pure: no I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from imgserve.client.errors import APIError, job_error


class JobState(enum.StrEnum):
    """A job's state (``GET /jobs/<id>``)."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def ended(self) -> bool:
        """Whether the job will not change any more."""
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


def job_state(value: Any) -> JobState | str:
    """A state as its JobState; one this client does not know (a newer daemon's) as
    its string, read as not ended."""
    try:
        return JobState(value)
    except ValueError:
        return str(value)


def _ended(state: JobState | str) -> bool:
    return isinstance(state, JobState) and state.ended


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class Output:
    """One output: where it is, its size and format; once the job is done, its
    ``bytes`` and what it looks like (docs/api.md, ``GET /jobs/<id>``)."""

    url: str
    width: int
    height: int
    format: str
    bytes: int | None = None
    blurhash: str | None = None
    thumbhash: str | None = None
    dominant_color: str | None = None
    average_color: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Output:
        return cls(
            url=str(data.get("url", "")),
            width=_int(data.get("width")) or 0,
            height=_int(data.get("height")) or 0,
            format=str(data.get("format", "")),
            bytes=_int(data.get("bytes")),
            blurhash=_str(data.get("blurhash")),
            thumbhash=_str(data.get("thumbhash")),
            dominant_color=_str(data.get("dominantColor")),
            average_color=_str(data.get("averageColor")),
            raw=data,
        )


@dataclass(frozen=True)
class SourceInfo:
    """The source as read before the reply: upright size, format, EXIF orientation."""

    width: int
    height: int
    format: str
    orientation: int | None = None
    has_alpha: bool | None = None
    animated: bool | None = None
    pages: int | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SourceInfo:
        has_alpha, animated = data.get("hasAlpha"), data.get("animated")
        return cls(
            width=_int(data.get("width")) or 0,
            height=_int(data.get("height")) or 0,
            format=str(data.get("format", "")),
            orientation=_int(data.get("orientation")),
            has_alpha=has_alpha if isinstance(has_alpha, bool) else None,
            animated=animated if isinstance(animated, bool) else None,
            pages=_int(data.get("pages")),
        )


@dataclass(frozen=True)
class JobError:
    """Why a job failed: a code of docs/errors.md, its message and the detail."""

    code: int
    message: str
    detail: str

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobError:
        return cls(
            code=_int(data.get("code")) or 0,
            message=str(data.get("message", "")),
            detail=str(data.get("detail", "")),
        )

    def exception(self) -> APIError:
        """The client exception of this code (its family's class)."""
        return job_error({"code": self.code, "message": self.message, "detail": self.detail})


@dataclass(frozen=True)
class WebhookAttempt:
    at: float | None
    status: int | None
    error: str | None


@dataclass(frozen=True)
class WebhookDelivery:
    """The delivery of a job's latest webhook event."""

    url: str
    event_id: str
    type: str
    state: str
    """``pending``, ``delivered`` or ``failed``."""
    attempts: tuple[WebhookAttempt, ...] = ()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WebhookDelivery:
        return cls(
            url=str(data.get("url", "")),
            event_id=str(data.get("eventId", "")),
            type=str(data.get("type", "")),
            state=str(data.get("state", "")),
            attempts=tuple(
                WebhookAttempt(_float(a.get("at")), _int(a.get("status")), _str(a.get("error")))
                for a in data.get("attempts") or ()
                if isinstance(a, Mapping)
            ),
        )


@dataclass(frozen=True)
class Job:
    """A job as ``GET /jobs/<id>`` shows it, or as ``POST /jobs`` answered it (then
    only ``id``, ``state`` and ``outputs`` are known; ``replayed`` says the reply was
    an earlier request's, replayed for its Idempotency-Key)."""

    id: str
    state: JobState | str
    """A JobState, or the string of a state this client does not know."""
    outputs: tuple[Output, ...] = ()
    operation_type: str | None = None
    src_url: str | None = None
    dst_url: str | None = None
    width: int | None = None
    height: int | None = None
    attempts: int | None = None
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    node: str | None = None
    source_info: SourceInfo | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    priority: str | None = None
    key: str | None = None
    error: JobError | None = None
    webhook: WebhookDelivery | None = None
    replayed: bool = False
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, replayed: bool = False) -> Job:
        source_info, error, webhook = data.get("sourceInfo"), data.get("error"), data.get("webhook")
        metadata = data.get("metadata")
        return cls(
            id=str(data["jobId"]),
            state=job_state(data["state"]),
            outputs=tuple(
                Output.from_dict(o) for o in data.get("outputs") or () if isinstance(o, Mapping)
            ),
            operation_type=_str(data.get("operationType")),
            src_url=_str(data.get("srcURL")),
            dst_url=_str(data.get("dstURL")),
            width=_int(data.get("width")),
            height=_int(data.get("height")),
            attempts=_int(data.get("attempts")),
            created_at=_float(data.get("createdAt")),
            started_at=_float(data.get("startedAt")),
            finished_at=_float(data.get("finishedAt")),
            node=_str(data.get("node")),
            source_info=SourceInfo.from_dict(source_info)
            if isinstance(source_info, Mapping)
            else None,
            metadata=metadata if isinstance(metadata, Mapping) else {},
            priority=_str(data.get("priority")),
            key=_str(data.get("key")),
            error=JobError.from_dict(error) if isinstance(error, Mapping) else None,
            webhook=WebhookDelivery.from_dict(webhook) if isinstance(webhook, Mapping) else None,
            replayed=replayed,
            raw=data,
        )

    @property
    def ended(self) -> bool:
        return _ended(self.state)

    def raise_for_state(self) -> Job:
        """The job itself when it did not fail; a failed job's error as its exception."""
        if self.state is JobState.FAILED and self.error is not None:
            raise self.error.exception()
        return self


@dataclass(frozen=True)
class JobPage:
    """A page of ``GET /jobs``, newest first; ``next_cursor`` None on the last page."""

    jobs: tuple[Job, ...]
    next_cursor: str | None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobPage:
        return cls(
            jobs=tuple(Job.from_dict(j) for j in data.get("jobs") or ()),
            next_cursor=_str(data.get("nextCursor")),
        )


@dataclass(frozen=True)
class ChangeEvent:
    """One change of ``GET /events``: a job's new state. ``id`` resumes the stream
    (``events(after=id)``) right after it."""

    id: str
    job_id: str
    state: JobState | str
    """A JobState, or the string of a state this client does not know."""
    at: float | None

    @property
    def ended(self) -> bool:
        """Whether the job will not change any more."""
        return _ended(self.state)

    @classmethod
    def from_sse(cls, event_id: str, data: Mapping[str, Any]) -> ChangeEvent:
        return cls(
            id=event_id,
            job_id=str(data["jobId"]),
            state=job_state(data["state"]),
            at=_float(data.get("at")),
        )


@dataclass(frozen=True)
class WebhookEvent:
    """A verified webhook event (docs/webhooks.md): ``id`` is its ``webhook-id``
    (the same on every attempt: deduplicate on it)."""

    id: str
    type: str
    """``job.completed``, ``job.failed`` or ``job.cancelled``."""
    timestamp: str
    job_id: str
    state: JobState | str
    outputs: tuple[Output, ...]
    source_info: SourceInfo | None
    error: JobError | None
    metadata: Mapping[str, Any]
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, event_id: str, payload: Mapping[str, Any]) -> WebhookEvent:
        data = payload["data"]
        source_info, error = data.get("sourceInfo"), data.get("error")
        metadata = data.get("metadata")
        return cls(
            id=event_id,
            type=str(payload["type"]),
            timestamp=str(payload.get("timestamp", "")),
            job_id=str(data["jobId"]),
            state=job_state(data["state"]),
            outputs=tuple(
                Output.from_dict(o) for o in data.get("outputs") or () if isinstance(o, Mapping)
            ),
            source_info=SourceInfo.from_dict(source_info)
            if isinstance(source_info, Mapping)
            else None,
            error=JobError.from_dict(error) if isinstance(error, Mapping) else None,
            metadata=metadata if isinstance(metadata, Mapping) else {},
            raw=payload,
        )

"""What the sync and the async client share: how a request is written, which
failures are retried and after how long, and how a reply is read.

The two clients differ only in how they wait (httpx.Client or httpx.AsyncClient);
everything here is decided without I/O, so both behave the same.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from imgserve import __version__
from imgserve.client.errors import KEY_BUSY, RETRY_STATUSES, APIError, TransportError, from_reply
from imgserve.client.models import Job

DEFAULT_URL = "http://127.0.0.1:8602"
URL_ENV = "IMGSERVE_URL"
KEY_ENV = "IMGSERVE_API_KEY"
REQUEST_TIMEOUT_S = 100.0
"""Each request's timeout: ``POST /jobs`` answers once the source is read and the
placeholders are up, within the daemon's reply deadline (``reply_timeout_s``, 90 s:
504, 612, after it), so a client that gave up sooner would only send it again."""
STREAM_READ_S = 40.0
"""Longest silence on ``GET /events`` before it is taken as broken: the daemon sends
a ping every 15 s."""


NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
"""No answer because the request never reached the daemon: safe to send again."""


@dataclass(frozen=True)
class Retries:
    """How a request is tried again after a 503 or 429 (waiting the reply's
    ``Retry-After``), a 409 614 (its Idempotency-Key's first request still being
    answered) or no answer: a connection refused, and for a request that may be sent
    twice (reads, and ``POST /jobs`` with its Idempotency-Key) a connection reset or
    a reply timed out too. A ``Retry-After`` is waited in full, or not at all when
    the retry would come after ``timeout_s``. Backoff without it is exponential with
    jitter (stamina), from ``wait_initial_s`` up to ``wait_max_s``. ``attempts``
    counts the first try; ``Retries(attempts=1)`` never retries."""

    attempts: int = 6
    timeout_s: float = 300.0
    wait_initial_s: float = 0.2
    wait_max_s: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")

    def stamina_kwargs(self, request: Request | None = None) -> dict[str, Any]:
        """stamina.retry_context's arguments for one ``request``'s tries."""
        resend = request is None or request.resend_unanswered
        started = time.monotonic()

        def on(exc: Exception) -> bool | float:
            elapsed_s = time.monotonic() - started
            return self.decide(exc, elapsed_s=elapsed_s, resend_unanswered=resend)

        return {
            "on": on,
            "attempts": self.attempts,
            "timeout": self.timeout_s,
            "wait_initial": self.wait_initial_s,
            "wait_max": self.wait_max_s,
        }

    def backoff_hook(self, exc: Exception) -> bool | float:
        """stamina's hook for a first failure (see :meth:`decide`)."""
        return self.decide(exc)

    def decide(
        self, exc: Exception, *, elapsed_s: float = 0.0, resend_unanswered: bool = True
    ) -> bool | float:
        """Whether to retry ``exc`` after ``elapsed_s`` of tries, and after how long
        when the daemon said: its ``Retry-After`` in full (sooner, it would refuse
        again), so no retry when that does not fit in ``timeout_s``. No answer is
        retried unless ``resend_unanswered`` is false and the request may have
        reached the daemon."""
        if isinstance(exc, httpx.TransportError):
            return resend_unanswered or isinstance(exc, NOT_SENT)
        if isinstance(exc, APIError) and (exc.status in RETRY_STATUSES or exc.code == KEY_BUSY):
            if exc.retry_after_s is None:
                return True
            if elapsed_s + exc.retry_after_s > self.timeout_s:
                return False
            return exc.retry_after_s
        return False


def retry_after_s(value: str | None, now: dt.datetime | None = None) -> float | None:
    """``Retry-After`` in seconds: delta-seconds or an HTTP date (RFC 9110 10.2.3);
    None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - (now or dt.datetime.now(dt.UTC))).total_seconds())


def headers(api_key: str | None) -> dict[str, str]:
    out = {"User-Agent": f"imgserve-client/{__version__}", "Accept": "application/json"}
    if api_key:
        out["Authorization"] = f"Bearer {api_key}"
    return out


def resolve(base_url: str | None, api_key: str | None) -> tuple[str, str | None]:
    """The daemon's URL and the API key: as given, else ``IMGSERVE_URL`` and
    ``IMGSERVE_API_KEY`` from the environment (a key never needs to be in argv)."""
    url = base_url or os.environ.get(URL_ENV) or DEFAULT_URL
    return url.rstrip("/"), api_key if api_key is not None else os.environ.get(KEY_ENV)


@dataclass(frozen=True)
class Upload:
    """A source sent in the request itself (multipart): its bytes and its file name,
    which gives the outputs' ``{$basename}`` and ``{$extension}``."""

    data: bytes
    filename: str

    @classmethod
    def from_path(cls, path: str | os.PathLike[str]) -> Upload:
        path = Path(path)
        return cls(path.read_bytes(), path.name)


Source = str | os.PathLike[str] | Upload
"""A ``str`` is the source's URL; a path (``pathlib.Path``) is a local file, read and
uploaded; an :class:`Upload` is bytes with their file name."""


@dataclass(frozen=True)
class Request:
    """One HTTP request, ready for httpx."""

    method: str
    path: str
    headers: Mapping[str, str]
    content: bytes | None = None
    data: Mapping[str, str] | None = None
    files: Mapping[str, tuple[str, bytes, str]] | None = None
    params: Mapping[str, str] | None = None
    resend_unanswered: bool = True
    """Whether it may be sent again when its reply did not come (a timeout, a reset):
    not when a second one would act again or answer otherwise (a webhook
    redelivery, a cancel: 409 613 for the job the first one cancelled)."""

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"headers": dict(self.headers)}
        if self.content is not None:
            out["content"] = self.content
        if self.data is not None:
            out["data"] = dict(self.data)
        if self.files is not None:
            out["files"] = dict(self.files)
        if self.params is not None:
            out["params"] = dict(self.params)
        return out


def job_body(
    outputs: Sequence[Mapping[str, Any]],
    *,
    placeholder: bool | None = None,
    metadata: Mapping[str, Any] | None = None,
    webhook: str | None = None,
    priority: str | None = None,
) -> dict[str, Any]:
    """A ``POST /jobs`` job without its source; unset fields are left to the daemon."""
    body: dict[str, Any] = {"outputs": [dict(o) for o in outputs]}
    if placeholder is not None:
        body["placeholder"] = placeholder
    if metadata is not None:
        body["metadata"] = dict(metadata)
    if webhook is not None:
        body["webhook"] = webhook
    if priority is not None:
        body["priority"] = priority
    return body


def is_url(text: str) -> bool:
    """Whether a source given as a ``str`` is a URL (has a scheme), not a path."""
    return "://" in text


def submit_request(source: Source, job: Mapping[str, Any], idempotency_key: str | None) -> Request:
    """``POST /jobs`` for ``job`` (from :func:`job_body`) from ``source``: JSON with a
    URL source, multipart with a file or an :class:`Upload`. The Idempotency-Key is
    ``idempotency_key``, else a fresh UUID, the same on every retry of this request."""
    key = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
    if isinstance(source, str):
        if not is_url(source):
            raise ValueError(
                f"source {source[:80]!r}: a str is the source's URL; "
                "pass a pathlib.Path (or an Upload) for a local file"
            )
        body = json.dumps({"source": source, **job}, separators=(",", ":")).encode()
        return Request("POST", "/jobs", {**key, "Content-Type": "application/json"}, content=body)
    upload = source if isinstance(source, Upload) else Upload.from_path(source)
    if not upload.filename:
        raise ValueError("an uploaded source needs a file name (it gives {$basename})")
    return Request(
        "POST",
        "/jobs",
        key,
        data={"job": json.dumps(dict(job), separators=(",", ":"))},
        files={"source": (upload.filename, upload.data, "application/octet-stream")},
    )


def job_id(job: Job | str) -> str:
    return job.id if isinstance(job, Job) else job


def list_params(state: str | None, limit: int | None, cursor: str | None) -> dict[str, str]:
    params: dict[str, str] = {}
    if state is not None:
        params["state"] = str(state)
    if limit is not None:
        params["limit"] = str(limit)
    if cursor is not None:
        params["cursor"] = cursor
    return params


def raise_for_reply(response: httpx.Response) -> None:
    """An error reply as its client exception (the body must have been read)."""
    if response.is_success:
        return
    raise from_reply(
        response.status_code, response.content, retry_after_s(response.headers.get("Retry-After"))
    )


def json_reply(response: httpx.Response) -> Any:
    raise_for_reply(response)
    try:
        return response.json()
    except ValueError as exc:
        raise APIError(response.status_code, 0, "reply is not JSON", response.text[:200]) from exc


def health_reply(response: httpx.Response) -> dict[str, Any]:
    """``GET /health``'s JSON, whatever its status (a 503 still says why it is
    degraded); a reply that is not imgserve's (a proxy's page) is an APIError."""
    try:
        data = response.json()
    except ValueError:
        data = None
    if isinstance(data, Mapping):
        return dict(data)
    raise_for_reply(response)
    raise APIError(response.status_code, 0, "reply is not JSON", response.text[:200])


def job_reply(response: httpx.Response) -> Job:
    replayed = response.headers.get("Idempotent-Replayed") == "true"
    return Job.from_dict(json_reply(response), replayed=replayed)


def transport_error(exc: httpx.TransportError, url: str) -> TransportError:
    return TransportError(f"{url}: {type(exc).__name__}: {exc}")


def is_event_stream(response: httpx.Response) -> bool:
    content_type = response.headers.get("content-type", "").partition(";")[0].strip()
    return response.status_code == 200 and content_type == "text/event-stream"


def not_a_stream(response: httpx.Response) -> APIError:
    """A 2xx reply to ``GET /events`` that is not an event stream (a proxy's page)."""
    content_type = response.headers.get("content-type", "")
    return APIError(
        response.status_code, 0, "not an event stream", f"Content-Type {content_type!r}"
    )


def change_data(data: str) -> Mapping[str, Any] | None:
    """An SSE ``data`` line of ``GET /events``, or None when it is not one."""
    try:
        parsed = json.loads(data)
    except ValueError:
        return None
    if not isinstance(parsed, Mapping) or "jobId" not in parsed or "state" not in parsed:
        return None
    return parsed

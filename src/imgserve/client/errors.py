"""The client's exceptions: imgserve's error replies, one class per family of codes.

Every refusal imgserve sends has the shape ``{"msg", "code", "detail"}`` with the
HTTP status of its code (docs/errors.md). :func:`from_reply` turns one into an
:class:`APIError` subclass chosen by the code's range, so a caller can catch a
family (``except SourceError``) or test one code (``exc.code == 605``). httpx's
own exceptions (no connection, a timeout) become :class:`TransportError` where
they enter the client, with the httpx exception as ``__cause__``.

Pure: no I/O, no httpx.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar

RETRY_STATUSES = frozenset({429, 503})
"""Statuses a request is retried on (with ``Retry-After``): a full queue, intake or
event-stream limit (503: 602, 604, 608, 611, 615) and a key's rate (429: 144)."""
KEY_BUSY = 614
"""409: the first request with this Idempotency-Key is still being answered; the
same request with the same key later gets its reply (docs/api.md)."""


class ClientError(Exception):
    """Base of everything the client raises."""


class TransportError(ClientError):
    """No answer from the daemon: it could not be reached, or the connection broke
    or timed out (after the retries). The httpx exception is ``__cause__``."""


class WaitTimeout(ClientError, TimeoutError):
    """``wait()`` gave up before the job ended; ``job`` is the job as last seen."""

    def __init__(self, message: str, job: Any) -> None:
        super().__init__(message)
        self.job = job


class APIError(ClientError):
    """An error reply of imgserve: ``status`` (HTTP), ``code`` (docs/errors.md),
    ``message`` (the reply's ``msg``), ``detail`` (what was wrong, URLs redacted)
    and ``retry_after_s`` (the reply's ``Retry-After``, if any)."""

    family: ClassVar[str] = "other"

    def __init__(
        self,
        status: int,
        code: int,
        message: str,
        detail: str,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"{status} (code {code}): {detail or message}")
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.retry_after_s = retry_after_s


class RequestError(APIError):
    """100-199: the request itself (body, arguments, Idempotency-Key, API keys)."""

    family = "request"


class AuthError(RequestError):
    """140-144: the API key is missing or unknown (401), the job is outside its
    scope (403) or over its rate (429)."""

    family = "auth"


class SourceError(APIError):
    """200-299: the source cannot be read or used, or a placeholder was refused."""

    family = "source"


class LimitError(APIError):
    """300-399: a size, pixel or time limit."""

    family = "limit"


class PolicyError(APIError):
    """400-499: the outbound address policy or the file roots refused a URL."""

    family = "policy"


class DestinationError(APIError):
    """500-599: a destination refused or failed the upload."""

    family = "destination"


class ServiceError(APIError):
    """600-699: the daemon (queue full, shutting down, unknown job, a job that
    cannot be cancelled...)."""

    family = "service"


class JobNotFound(ServiceError):
    """605: no such job (unknown, pruned, or another key's)."""


class ValidationError(APIError):
    """700-799: ``POST /jobs`` validation; ``detail`` starts with the field's path."""

    family = "validation"


_FAMILIES: tuple[tuple[range, type[APIError]], ...] = (
    (range(140, 150), AuthError),
    (range(100, 200), RequestError),
    (range(200, 300), SourceError),
    (range(300, 400), LimitError),
    (range(400, 500), PolicyError),
    (range(500, 600), DestinationError),
    (range(605, 606), JobNotFound),
    (range(600, 700), ServiceError),
    (range(700, 800), ValidationError),
)


def error_class(code: int) -> type[APIError]:
    """The exception class of an imgserve error code (APIError when out of range)."""
    for codes, cls in _FAMILIES:
        if code in codes:
            return cls
    return APIError


def from_reply(status: int, body: bytes, retry_after_s: float | None = None) -> APIError:
    """The exception for an error reply. A body that is not imgserve's JSON (a
    proxy's HTML page, say) still gives an APIError, with code 0 and its start."""
    try:
        data: Any = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, Mapping):
        text = body[:200].decode("utf-8", "replace")
        return APIError(status, 0, f"HTTP {status}", text, retry_after_s)
    message = str(data.get("msg", ""))
    code = data.get("code")
    if code is None and message == "request parse error":
        code = 100  # 0.2's shape for 100 has no code (docs/errors.md)
    if not isinstance(code, int):
        code = 0
    detail = str(data.get("detail", message))
    return error_class(code)(status, code, message, detail, retry_after_s)


def job_error(error: Mapping[str, Any], status: int = 0) -> APIError:
    """The exception for a failed job's ``error`` (``{code, message, detail}``)."""
    code = int(error.get("code") or 0)
    message = str(error.get("message", ""))
    return error_class(code)(status, code, message, str(error.get("detail") or message))

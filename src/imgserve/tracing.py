"""Optional OpenTelemetry tracing (docs/operating.md, "Tracing"): one trace per job.

Tracing is off unless asked for: ``--tracing`` (``IMGSERVE_TRACING=1``, ``tracing =
true``) or an ``--otlp-endpoint URL``. Off, the daemon uses ``NO_TRACING``: every
call here is a no-op and nothing imports opentelemetry. On, the ``tracing`` extra
(opentelemetry-sdk and the OTLP/HTTP exporter) must be installed, else the daemon
refuses to start (``TracingUnavailable``, exit 1); imgserve.otel then holds the
implementation, and the SDK reads the standard ``OTEL_*`` variables.

This module is the interface the rest of imgserve calls, so they never import
opentelemetry: ``Metrics.phase`` opens a span per timed phase, api.py's middleware
opens the request's span and stores its context with the job (``carrier``), and
the runner continues it (``job_span``) on whichever node runs the job.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from imgserve import errors
from imgserve.urls import redact_url

if TYPE_CHECKING:
    from aiohttp.typedefs import Middleware

    from imgserve.config import ServerSettings
    from imgserve.queue.base import Event, JobRecord

EXTRA = "imgserve[tracing]"

Carrier = dict[str, str]
"""W3C Trace Context headers (``traceparent``, ``tracestate``) as a job record keeps them."""

CARRIER_KEYS = ("traceparent", "tracestate")
CARRIER_CHARS = 512
"""The longest header a carrier keeps: W3C Trace Context asks that at least 512
characters of ``tracestate`` be passed on (a ``traceparent`` is 55); a longer one is
left out rather than stored with every job and copied into its events."""

# Attribute names: OpenTelemetry's semantic conventions where one fits, else imgserve.*.
JOB_ID = "imgserve.job.id"
OPERATION = "imgserve.job.operation"
OUTPUTS = "imgserve.job.outputs"
ATTEMPT = "imgserve.job.attempt"
OUTCOME = "imgserve.job.outcome"
"""How an attempt ended: done, retry (put back with a backoff) or failed (for good)."""
SOURCE = "imgserve.job.source"
"""The source URL, redacted (``upload`` for an uploaded source)."""
KEY = "imgserve.key.name"
NODE = "imgserve.node"
ERROR_CODE = "imgserve.error.code"
ERROR_DETAIL = "imgserve.error.detail"
ERROR_TYPE = "error.type"
WEBHOOK_EVENT = "imgserve.webhook.event_id"
WEBHOOK_TYPE = "imgserve.webhook.type"
WEBHOOK_ATTEMPT = "imgserve.webhook.attempt"
WEBHOOK_OUTCOMES = {"delivered": "delivered", "pending": "retry", "failed": "failed"}
"""An attempt's outcome by the event's state after it (pending: another is scheduled)."""

DETAIL_CHARS = 500
"""The longest text attribute a span keeps (an error's detail, a URL): cut past it."""

_NOTHING: AbstractContextManager[None] = contextlib.nullcontext()
"""The one no-op context every call returns when tracing is off (it is reusable)."""


class TracingUnavailable(RuntimeError):
    """Tracing was asked for but cannot be had: the ``tracing`` extra is not
    installed, or the SDK refuses the ``OTEL_*`` settings."""


class Tracing:
    """No tracing: what every call does when tracing is off (``NO_TRACING``).

    imgserve.otel.OpenTelemetry overrides each method; callers use this interface only.
    """

    enabled = False

    def middlewares(self) -> list[Middleware]:
        """What api.make_app adds to trace requests (none when off)."""
        return []

    def span(self, name: str) -> AbstractContextManager[None]:
        """A span for a phase, a child of the current one (none outside a job's trace)."""
        return _NOTHING

    def carrier(self) -> Carrier | None:
        """The current trace context, to store with a job (None: nothing to continue)."""
        return None

    def describe_job(self, record: JobRecord) -> None:
        """Put the job's attributes on the current span (the request that accepts it)."""

    def job_span(self, record: JobRecord) -> AbstractContextManager[None]:
        """The span of one attempt at a job, continuing the trace stored with it;
        its ``queue_wait`` (from when it was due to its start) is recorded beside it."""
        return _NOTHING

    def outcome(self, outcome: str, exc: errors.ImgserveError | None = None) -> None:
        """Record how the current attempt ended (done, retry, failed) and its error."""

    def webhook_span(self, event: Event) -> AbstractContextManager[None]:
        """The span of one delivery attempt of a job's webhook event, in the job's trace."""
        return _NOTHING

    def webhook_outcome(self, event: Event) -> None:
        """Record how the attempt just made ended (the event's state, the answer)."""

    def close(self) -> None:
        """Send the spans still buffered, blocking at most otel.CLOSE_TIMEOUT_S (5 s)."""


NO_TRACING = Tracing()


def wanted(server: ServerSettings) -> bool:
    """Tracing is asked for (and not vetoed by OpenTelemetry's ``OTEL_SDK_DISABLED``)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return server.tracing or server.otlp_endpoint is not None


def check(server: ServerSettings) -> None:
    """TracingUnavailable (saying why) when tracing is asked for and cannot start: the
    extra is missing, or the SDK refuses an ``OTEL_*`` value (``OTEL_BSP_MAX_QUEUE_SIZE=0``),
    which it says only when the tracing is built: so it is built here, and closed.
    Nothing is imported when tracing is not asked for."""
    if not wanted(server):
        return
    build = _implementation()
    try:
        build(server.otlp_endpoint).close()
    except Exception as exc:  # the SDK's own ValueError, for one
        raise TracingUnavailable(
            f"tracing cannot start: {type(exc).__name__}: {exc} (check the OTEL_* variables)"
        ) from None


def start(server: ServerSettings) -> Tracing:
    """The tracing ``server`` asks for: NO_TRACING, or spans sent over OTLP/HTTP."""
    if not wanted(server):
        return NO_TRACING
    return _implementation()(server.otlp_endpoint)


def _implementation() -> Callable[[str | None], Tracing]:
    """imgserve.otel's ``start``, imported now (TracingUnavailable without the extra)."""
    try:
        from imgserve import otel
    except ImportError as exc:
        raise TracingUnavailable(
            f"tracing is on (--tracing or --otlp-endpoint) but OpenTelemetry is not "
            f"installed ({exc.name or exc}): pip install '{EXTRA}'"
        ) from None
    return otel.start


# --- what spans say (pure) -----------------------------------------------------------------


def clean_carrier(stored: object) -> Carrier:
    """The W3C headers in a stored trace context, read without trusting it (a record
    another release wrote, or one edited in the store): only ``traceparent`` and
    ``tracestate``, and only str values of at most CARRIER_CHARS; the rest is left out."""
    if not isinstance(stored, dict):
        return {}
    return {
        key: value
        for key in CARRIER_KEYS
        if isinstance(value := stored.get(key), str) and len(value) <= CARRIER_CHARS
    }


def job_attributes(record: JobRecord) -> dict[str, str | int]:
    """A job's span attributes: id, operation, output count, the source (redacted) and
    the key's name; read without trusting the record (an old one may lack fields)."""
    plan = record.plan if isinstance(record.plan, dict) else {}
    job = record.job if isinstance(record.job, dict) else {}
    attributes: dict[str, str | int] = {JOB_ID: record.id}
    operation = plan.get("operation")
    if isinstance(operation, str):
        attributes[OPERATION] = operation
    outputs = plan.get("outputs")
    if isinstance(outputs, list):
        attributes[OUTPUTS] = len(outputs)
    source = job.get("source_url") or job.get("src_url")
    if isinstance(source, str):
        attributes[SOURCE] = redact_url(source)
    elif job.get("source_name") is not None:
        attributes[SOURCE] = "upload"
    if record.key is not None:
        attributes[KEY] = record.key
    return attributes


def webhook_attributes(event: Event) -> dict[str, str | int]:
    """A delivery attempt's span attributes: the job, the event, where to (redacted:
    a receiver's URL may carry a token) and which attempt this is."""
    return {
        JOB_ID: event.job_id,
        WEBHOOK_EVENT: event.id,
        WEBHOOK_TYPE: event.type,
        WEBHOOK_ATTEMPT: len(event.attempts) + 1,
        "url.full": redact_url(event.url),
    }


def error_attributes(exc: errors.ImgserveError) -> dict[str, str | int]:
    """An error's span attributes: its code (``error.type`` is the code as text, low
    cardinality) and its detail, redacted as every reply's is."""
    return {
        ERROR_CODE: exc.code,
        ERROR_TYPE: str(exc.code),
        ERROR_DETAIL: redact_url(exc.detail)[:DETAIL_CHARS],
    }

"""The OpenTelemetry side of imgserve.tracing: imported only when tracing is on.

Spans go through an SDK ``TracerProvider`` of imgserve's own (never the global
one, so tests and two services in one process do not collide) to the OTLP/HTTP
exporter. The SDK reads the standard variables: ``OTEL_EXPORTER_OTLP_ENDPOINT``
(or ``..._TRACES_ENDPOINT``), ``..._HEADERS``, ``..._TIMEOUT``, ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``.

A job's trace (docs/operating.md, "Tracing")::

    POST /jobs                 server span; continues a client's traceparent
    ├── download, plan, placeholder, enqueue
    ├── queue_wait             from when the job was due to its start (per attempt)
    ├── job                    one per attempt, on the node that ran it
    │   └── download (fetched again only), render, upload
    └── webhook                one per delivery attempt of the job's event

The request span's context is stored with the job (``JobRecord.trace_context``,
W3C ``traceparent``, copied to its webhook events), which is how a worker node
continues it. Exceptions are never recorded as span events (their text could hold
a URL's credentials): an imgserve error sets the code and the redacted detail only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from imgserve import __version__, errors, tracing
from imgserve.metrics import CLIENT_CLOSED, route_of
from imgserve.queue.base import NODE, Event, JobRecord
from imgserve.urls import redact_url

TRACED_ROUTES = frozenset({("POST", "/"), ("POST", "/jobs")})
"""The requests that get a span: those that submit a job. Probes, scrapes, event
streams and job reads would flood a collector with traces of no job."""

TRACES_PATH = "/v1/traces"

CLOSE_TIMEOUT_S = 5.0
"""The longest ``close`` waits for the last spans to be sent. The SDK's shutdown may
take 30 s and more (an export hanging up to its timeout, then each batch left), and
a stopping daemon has 15 s past its drain before ``imgserve stop`` and systemd's
TimeoutStopSec kill it; spans still unsent then are dropped."""

log = logging.getLogger("imgserve.tracing")


def start(otlp_endpoint: str | None) -> OpenTelemetry:
    """Tracing to an OTLP/HTTP collector: ``otlp_endpoint`` is a base URL, as
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` is (``/v1/traces`` is appended); None leaves the
    endpoint to the ``OTEL_EXPORTER_OTLP_*`` variables (default localhost:4318)."""
    exporter = OTLPSpanExporter(endpoint=traces_endpoint(otlp_endpoint))
    return OpenTelemetry(BatchSpanProcessor(exporter))


def traces_endpoint(otlp_endpoint: str | None) -> str | None:
    """The exporter's URL for a base URL (None: the exporter reads the variables)."""
    return otlp_endpoint.rstrip("/") + TRACES_PATH if otlp_endpoint is not None else None


def resource() -> Resource:
    """service.name imgserve and its version, unless ``OTEL_SERVICE_NAME`` or
    ``OTEL_RESOURCE_ATTRIBUTES`` say otherwise (the variables win, as the spec says)."""
    ours = Resource.create({"service.name": "imgserve", "service.version": __version__})
    return ours.merge(OTELResourceDetector().detect())


class OpenTelemetry(tracing.Tracing):
    """imgserve.tracing.Tracing on an SDK tracer provider with ``processor``."""

    enabled = True

    def __init__(self, processor: SpanProcessor) -> None:
        # close() shuts it down with a deadline: no atexit shutdown to wait 30 s more.
        # Every text attribute is cut as an error's detail is: URLs have no bound of
        # their own, and a span of kilobytes costs the collector, not the client.
        self.provider = TracerProvider(
            resource=resource(),
            shutdown_on_exit=False,
            span_limits=SpanLimits(max_attribute_length=tracing.DETAIL_CHARS),
        )
        self.provider.add_span_processor(processor)
        self.tracer = self.provider.get_tracer("imgserve", __version__)
        self.propagator = TraceContextTextMapPropagator()

    # --- spans ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _span(
        self,
        name: str,
        *,
        context: otel_context.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, str | int] | None = None,
    ) -> Iterator[Span]:
        """A current span that ends with the block; an exception out of it sets its
        status (an imgserve error: its code and redacted detail; never its text)."""
        with self.tracer.start_as_current_span(
            name,
            context=context,
            kind=kind,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield span
            except errors.ImgserveError as exc:
                _mark_error(span, exc)
                raise
            except asyncio.CancelledError:
                span.set_status(StatusCode.ERROR, "cancelled")
                raise
            except Exception as exc:
                span.set_attribute(tracing.ERROR_TYPE, type(exc).__qualname__)
                span.set_status(StatusCode.ERROR, type(exc).__qualname__)
                raise

    def span(self, name: str) -> contextlib.AbstractContextManager[None]:
        if not trace.get_current_span().get_span_context().is_valid:
            return contextlib.nullcontext()  # outside a job's trace: no stray root span
        return self._phase(name)

    @contextlib.contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        with self._span(name):
            yield

    def carrier(self) -> tracing.Carrier | None:
        headers: dict[str, str] = {}
        self.propagator.inject(headers)
        # Stored with the job and copied into each of its events: a client's long
        # tracestate is left out (W3C asks that 512 characters be passed on).
        return tracing.clean_carrier(headers) or None

    def describe_job(self, record: JobRecord) -> None:
        trace.get_current_span().set_attributes(tracing.job_attributes(record))

    def _parent(self, stored: object) -> otel_context.Context:
        """The context a stored carrier continues; for anything it cannot read, an
        empty one (the span starts a trace of its own): a bad record must never keep
        its job or its event from running."""
        try:
            return self.propagator.extract(tracing.clean_carrier(stored))
        except Exception:
            log.debug("an unreadable trace context is ignored", exc_info=True)
            return otel_context.Context()

    @contextlib.contextmanager
    def job_span(self, record: JobRecord) -> Iterator[None]:
        parent = self._parent(record.trace_context)
        attributes = {
            **tracing.job_attributes(record),
            tracing.ATTEMPT: record.attempts,
            tracing.NODE: NODE,
        }
        with self._span(
            "job", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
        ) as span:
            if record.started_at is not None:
                if not trace.get_current_span(parent).get_span_context().is_valid:
                    parent = trace.set_span_in_context(span)  # stored without a trace
                self._queue_wait(parent, record.due_at, record.started_at, attributes)
            yield

    def _queue_wait(
        self,
        parent: otel_context.Context,
        due_s: float,
        started_s: float,
        attributes: Mapping[str, str | int],
    ) -> None:
        """The wait as a span of its own, with the times the queue recorded: under the
        request's span (beside the job's), or the job's when the record has no trace."""
        start_ns = _ns(due_s)
        span = self.tracer.start_span(
            "queue_wait",
            context=parent,
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            start_time=start_ns,
        )
        span.end(end_time=max(start_ns, _ns(started_s)))

    def outcome(self, outcome: str, exc: errors.ImgserveError | None = None) -> None:
        span = trace.get_current_span()
        span.set_attribute(tracing.OUTCOME, outcome)
        if exc is not None:
            _mark_error(span, exc)

    # --- webhooks ------------------------------------------------------------------------

    @contextlib.contextmanager
    def webhook_span(self, event: Event) -> Iterator[None]:
        parent = self._parent(event.trace_context)
        attributes = tracing.webhook_attributes(event)
        with self._span("webhook", context=parent, kind=SpanKind.CLIENT, attributes=attributes):
            yield

    def webhook_outcome(self, event: Event) -> None:
        span = trace.get_current_span()
        span.set_attribute(tracing.OUTCOME, tracing.WEBHOOK_OUTCOMES.get(event.state, event.state))
        last = event.attempts[-1] if event.attempts else {}
        if isinstance(last.get("status"), int):
            span.set_attribute("http.response.status_code", last["status"])
        if event.state != "delivered":
            error = redact_url(str(last.get("error") or event.state))[: tracing.DETAIL_CHARS]
            span.set_attribute(tracing.ERROR_DETAIL, error)
            span.set_status(StatusCode.ERROR, error)

    # --- requests ------------------------------------------------------------------------

    def middlewares(self) -> list[Middleware]:
        return [self._middleware()]

    def _middleware(self) -> Middleware:
        """A server span per job submission, named ``POST /jobs`` (the route), continuing
        the client's ``traceparent`` if it sent one. Placed inside errors_middleware, it
        sees imgserve errors as exceptions: their code goes on the span; inside
        auth_middleware, so a request without a known key (401) is not traced."""

        @web.middleware
        async def traced(request: web.Request, handler: Handler) -> web.StreamResponse:
            route = route_of(request)
            if (request.method, route) not in TRACED_ROUTES:
                return await handler(request)
            parent = self.propagator.extract(request.headers)
            attributes = {"http.request.method": request.method, "http.route": route}
            with self.tracer.start_as_current_span(
                f"{request.method} {route}",
                context=parent,
                kind=SpanKind.SERVER,
                attributes=attributes,
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                status = 500
                try:
                    response = await handler(request)
                    status = response.status
                    return response
                except errors.ImgserveError as exc:
                    status = exc.status
                    span.set_attributes(tracing.error_attributes(exc))
                    raise
                except web.HTTPException as exc:
                    status = exc.status
                    raise
                except asyncio.CancelledError:
                    status = CLIENT_CLOSED
                    raise
                finally:
                    span.set_attribute("http.response.status_code", status)
                    # HTTP's conventions: a 4xx is the client's error, not the server's.
                    if status >= 500:
                        span.set_status(StatusCode.ERROR, f"HTTP {status}")

        return traced

    def close(self) -> None:
        # The SDK's shutdown takes no deadline (force_flush ignores its own), so it
        # runs in a thread of its own, left behind if it overruns: it is a daemon
        # thread, as the batch processor's is, and the process exits without it.
        closing = threading.Thread(
            target=self.provider.shutdown, name="imgserve-tracing-close", daemon=True
        )
        closing.start()
        closing.join(CLOSE_TIMEOUT_S)
        if closing.is_alive():
            log.warning(
                "tracing: the last spans were not sent within %g s; they are dropped",
                CLOSE_TIMEOUT_S,
            )


def _mark_error(span: Span, exc: errors.ImgserveError) -> None:
    span.set_attributes(tracing.error_attributes(exc))
    span.set_status(StatusCode.ERROR, f"{exc.code}: {exc.message}")


def _ns(epoch_s: float) -> int:
    return int(epoch_s * 1e9)

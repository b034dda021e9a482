"""Prometheus metrics (docs/operating.md): what each process counts, and its exposition.

One ``Metrics`` per service, each with its own ``CollectorRegistry`` (never the
global default), so two services in one test process do not collide. The API
counts requests, accepted jobs and the checks before the reply (download, plan,
placeholder); the ``Runner`` counts how jobs end and times queue wait, render
and upload. Gauges that belong to someone else (the queue's counts, the pool's
processes) are read at scrape time by a collector: the queue is async and
collectors are sync, so ``refresh`` (awaited by the ``/metrics`` handler before
rendering) caches the queue's counts and the collector reads that cache.

Names follow the Prometheus conventions: the ``imgserve_`` prefix, base units in
the name (``_seconds``, ``_bytes``), ``_total`` on counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from imgserve.queue.base import PRIORITIES
from imgserve.tracing import NO_TRACING, Tracing
from imgserve.urls import scheme_of

log = logging.getLogger("imgserve.metrics")

PHASES = ("download", "plan", "placeholder", "queue_wait", "render", "upload", "webhook")
"""The phases of a job that are timed (``imgserve_job_phase_duration_seconds``)."""

# Image work spans milliseconds (a thumbnail) to a minute (the job timeout).
_PHASE_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_REQUEST_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 90)

QUEUE_STATES = ("queued", "running", "done", "failed", "cancelled")

UNMATCHED_ROUTE = "unmatched"
"""The ``route`` label of a request no route matched (the raw path would be unbounded)."""

_PAGE_SIZE = 4096

CLIENT_CLOSED = 499
"""The ``status`` of a request cut off before its reply (the handler cancelled, as
when the daemon stops under it; aiohttp does not cancel on a client's disconnect).
nginx's code for a request that got no reply."""

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The classic text format, which every Prometheus server reads (Debian 12's 2.42
predates the 1.0.0 one prometheus_client now names latest; the body is the same
for imgserve's plain ASCII names)."""


class Metrics:
    """Every metric one imgserve process exports, on its own registry."""

    def __init__(self, tracing: Tracing = NO_TRACING) -> None:
        self.tracing = tracing
        """Where ``phase`` opens a span too (imgserve.tracing; off by default)."""
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Histogram(
            "imgserve_http_request_duration_seconds",
            "HTTP requests by route (the pattern, not the path), method and status",
            ["route", "method", "status"],
            buckets=_REQUEST_BUCKETS_S,
            registry=reg,
        )
        self.accepted = Counter(
            "imgserve_jobs_accepted_total",
            "Jobs accepted (stored in the queue before the reply), by operation",
            ["operation"],
            registry=reg,
        )
        self.refused = Counter(
            "imgserve_jobs_refused_total",
            "Jobs refused before the reply (while checked), by error code",
            ["code"],
            registry=reg,
        )
        self.done = Counter(
            "imgserve_jobs_done_total",
            "Jobs that ended done, by operation",
            ["operation"],
            registry=reg,
        )
        self.failed = Counter(
            "imgserve_jobs_failed_total",
            "Jobs that ended failed for good, by operation and error code",
            ["operation", "code"],
            registry=reg,
        )
        self.retried = Counter(
            "imgserve_jobs_retried_total",
            "Attempts that failed and were put back for a retry, by operation and error code",
            ["operation", "code"],
            registry=reg,
        )
        self.phases = Histogram(
            "imgserve_job_phase_duration_seconds",
            "Time a job spends in each phase: "
            "download, plan, placeholder (API); queue_wait, render, upload (runner); "
            "webhook (one delivery attempt, any process)",
            ["phase"],
            buckets=_PHASE_BUCKETS_S,
            registry=reg,
        )
        self.downloaded = Counter(
            "imgserve_download_bytes_total",
            "Source bytes downloaded, by URL scheme",
            ["scheme"],
            registry=reg,
        )
        self.uploaded = Counter(
            "imgserve_upload_bytes_total",
            "Bytes uploaded (results, placeholders), by URL scheme",
            ["scheme"],
            registry=reg,
        )
        self.webhooks = Counter(
            "imgserve_webhook_attempts_total",
            "Completion event delivery attempts, by what the event is after it: "
            "delivered, pending (tried again later) or failed (for good)",
            ["outcome"],
            registry=reg,
        )
        for outcome in ("delivered", "pending", "failed"):
            self.webhooks.labels(outcome)  # known outcomes start at 0, not missing
        self.restarts = Counter(
            "imgserve_worker_restarts_total",
            "Worker processes lost during a render (crashed, or killed past the job "
            "timeout); the pool starts another",
            registry=reg,
        )
        self.rendering = Gauge(
            "imgserve_workers_busy",
            "Worker processes rendering a job now",
            registry=reg,
        )
        self.running = Gauge(
            "imgserve_jobs_running",
            "Jobs this process's runner holds now (download, render or upload)",
            registry=reg,
        )
        ProcessCollector(registry=reg)
        PlatformCollector(registry=reg)
        self.queue_counts: dict[str, int] | None = None
        """The queue's counts at the last ``refresh`` (None: not read yet, or unreadable)."""
        self.lane_counts: dict[str, int] | None = None
        """Its queued jobs by lane at the last ``refresh``."""
        self._refreshers: list[Callable[[], Awaitable[None]]] = []
        self._state = _StateCollector(self)
        reg.register(self._state)

    # --- wiring --------------------------------------------------------------------------

    def watch_queue(
        self,
        counts: Callable[[], Awaitable[dict[str, int]]],
        lanes: Callable[[], Awaitable[dict[str, int]]],
    ) -> None:
        """Export the queue's depth by state and its queued jobs by lane, read by
        ``refresh`` before each scrape."""

        async def read() -> None:
            try:
                self.queue_counts = await counts()
                self.lane_counts = await lanes()
            except Exception as exc:  # the queue is down: the depth goes missing, not /metrics
                log.warning("queue counts not read for /metrics: %s", exc)
                self.queue_counts = self.lane_counts = None

        self._refreshers.append(read)

    def watch_pool(
        self,
        workers: int,
        pids: Callable[[], Iterable[int]],
        replacements: Callable[[], int],
        vips_peak_bytes: Callable[[], int | None] = lambda: None,
    ) -> None:
        """Export the pool's processes (configured, alive, their memory, libvips' peak)
        and restarts."""
        self._state.pool = _Pool(workers, pids, replacements, vips_peak_bytes)

    async def refresh(self) -> None:
        """Read what collectors cannot read synchronously (the queue's counts)."""
        for read in self._refreshers:
            await read()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # --- counting ------------------------------------------------------------------------

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase (one of ``PHASES``), whether it ends well or not; with tracing
        on, in a span of its own under the job's."""
        with self.timed(name), self.tracing.span(name):
            yield

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Time a phase (one of ``PHASES``) without a span of its own."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.phases.labels(name).observe(time.perf_counter() - started)

    def count_download(self, url: str, size_bytes: int) -> None:
        self.downloaded.labels(scheme_of(url)).inc(size_bytes)

    def count_upload(self, url: str, size_bytes: int) -> None:
        self.uploaded.labels(scheme_of(url)).inc(size_bytes)


class _Pool:
    def __init__(
        self,
        workers: int,
        pids: Callable[[], Iterable[int]],
        replacements: Callable[[], int],
        vips_peak_bytes: Callable[[], int | None],
    ) -> None:
        self.workers = workers
        self.pids = pids
        self.replacements = replacements
        self.vips_peak_bytes = vips_peak_bytes


class _StateCollector(Collector):
    """Gauges read at scrape time from what others own; sync, so nothing here awaits."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.pool: _Pool | None = None

    def collect(self) -> Iterator[Metric]:
        counts = self.metrics.queue_counts
        if counts is not None:
            depth = GaugeMetricFamily(
                "imgserve_queue_jobs", "Jobs in the queue by state (all nodes)", labels=["state"]
            )
            for state in QUEUE_STATES:
                depth.add_metric([state], counts.get(state, 0))
            yield depth
        lanes = self.metrics.lane_counts
        if lanes is not None:
            waiting = GaugeMetricFamily(
                "imgserve_queue_lane_jobs",
                "Queued jobs (waiting to run, retries among them) by lane (all nodes)",
                labels=["lane"],
            )
            for lane in PRIORITIES:
                waiting.add_metric([lane], lanes.get(lane, 0))
            yield waiting
        if self.pool is None:
            return
        pids = list(self.pool.pids())
        workers = GaugeMetricFamily(
            "imgserve_workers", "Worker processes of this process's pool", labels=["state"]
        )
        workers.add_metric(["configured"], self.pool.workers)
        workers.add_metric(["alive"], len(pids))
        yield workers
        yield GaugeMetricFamily(
            "imgserve_workers_resident_memory_bytes",
            "Resident memory of the worker processes together (libvips' pixels among it)",
            value=sum(_resident_bytes(pid) for pid in pids),
        )
        peak = self.pool.vips_peak_bytes()
        if peak is not None:
            yield GaugeMetricFamily(
                "imgserve_vips_memory_peak_bytes",
                "The most memory libvips has held for pixels in one worker process "
                "(its own accounting, as the workers report after each render)",
                value=peak,
            )
        yield CounterMetricFamily(
            "imgserve_worker_pool_restarts",
            "Worker pools replaced after one broke (a process died outside a task)",
            value=self.pool.replacements(),
        )


def _resident_bytes(pid: int) -> int:
    """A process's resident set from /proc (0 once it is gone, or off Linux)."""
    try:
        fields = Path(f"/proc/{pid}/statm").read_text().split()
        return int(fields[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


# --- HTTP ---------------------------------------------------------------------------------


def route_of(request: web.Request) -> str:
    """The route pattern that matched (``/jobs/{job_id}``), never the raw path."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else UNMATCHED_ROUTE


def request_timer(metrics: Metrics) -> Middleware:
    """A middleware timing every request by route, method and status; outermost, so
    the status is the one sent (error replies included)."""

    @web.middleware
    async def timed(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:  # cut off before a reply: the server stopping under it
            status = CLIENT_CLOSED
            raise
        finally:
            metrics.requests.labels(route_of(request), request.method, str(status)).observe(
                time.perf_counter() - started
            )

    return timed


async def exposition(metrics: Metrics) -> web.Response:
    """The ``/metrics`` reply: every metric in the Prometheus text format."""
    await metrics.refresh()
    response = web.Response(body=metrics.render())
    response.headers["Content-Type"] = CONTENT_TYPE
    return response


def make_app(metrics: Metrics) -> web.Application:
    """The app a ``--metrics-listen`` address serves: ``/metrics`` only, no key
    (bind it to a private interface; docs/operating.md)."""
    app = web.Application()

    async def handler(_request: web.Request) -> web.Response:
        return await exposition(metrics)

    app.router.add_get("/metrics", handler)
    return app

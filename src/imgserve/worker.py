"""One job end to end, top to bottom: source -> render -> upload -> record.

The queue backend delivers jobs to :meth:`Runner.run` (up to ``concurrency`` at
once); network I/O stays on the event loop and pixels go to the process pool.
Retryable failures go back to the queue with backoff until the attempts run
out; a job that fails for good gets the failure image at its destination (when
the destination still takes it) and its error recorded. A job's end is recorded
with its completion event (webhooks.event_for), in the same write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from imgserve import errors, webhooks
from imgserve.config import Settings
from imgserve.imaging import pipeline
from imgserve.metrics import Metrics
from imgserve.planning import JobPlan, targets
from imgserve.pool import ImagePool
from imgserve.queue.base import Event, JobQueue, JobRecord
from imgserve.retry import backoff_s
from imgserve.spec import JobSpec
from imgserve.transports import Transports
from imgserve.transports.base import Target

log = logging.getLogger("imgserve.jobs")

Upload = tuple[Target, bytes, str]
"""Where to, what, and its content type."""


def _key_field(record: JobRecord) -> str:
    """`` key=NAME`` for a job submitted with an API key (its name, never its secret)."""
    return f" key={record.key}" if record.key is not None else ""


def _operation(record: JobRecord) -> str:
    """The job's operation for the metrics' labels, read without trusting the record."""
    operation = record.plan.get("operation") if isinstance(record.plan, dict) else None
    return operation if isinstance(operation, str) else "unknown"


def _refuse_redirect(url: str) -> None:
    raise errors.SourceOutOfScope(
        f"source: redirected to {url}: a keyed job's download on a worker node follows no "
        "redirect (the key's sources are checked where the job was accepted)"
    )


async def upload_all(transports: Transports, uploads: Sequence[Upload]) -> None:
    """Upload every output at once; when any fails, raise the first failure (in
    the outputs' order) once all have ended, so none is left half-sent."""
    outcomes = await asyncio.gather(
        *(transports.upload(target, data, content_type) for target, data, content_type in uploads),
        return_exceptions=True,
    )
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome


async def upload_failure_images(
    transports: Transports, plan: JobPlan, destinations: Sequence[Target]
) -> None:
    """Put the "Image processing failed" image at each of ``destinations`` (one per
    output of ``plan``, in order); raise the first upload failure once all ended."""
    uploads = []
    for rendition, target in zip(plan.outputs, destinations, strict=True):
        out = rendition.plan
        image = await asyncio.to_thread(pipeline.failure_image, out.result, out.output)
        uploads.append((target, image, out.content_type))
    await upload_all(transports, uploads)


class Runner:
    def __init__(
        self,
        queue: JobQueue,
        transports: Transports,
        pool: ImagePool,
        settings: Settings,
        *,
        on_event: Callable[[], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.queue = queue
        self.transports = transports
        self.pool = pool
        self.settings = settings
        self.on_event = on_event
        """Called once a job's end is stored with an event (webhooks.Dispatcher.poke)."""
        # Downloads and uploads overlap with rendering: two jobs per worker process.
        self.concurrency = max(2, settings.worker.workers * 2)
        self.running = 0
        self.stopping = asyncio.Event()
        self.metrics = metrics or Metrics()
        """How jobs end and how long their phases take (GET /metrics)."""

    async def serve(self) -> None:
        """Run jobs from the queue until ``stopping`` is set and running jobs end."""
        await self.queue.consume(self.run, self.concurrency, self.stopping)

    async def run(self, record: JobRecord) -> None:
        """Run one delivered job and record how it ended.

        Every failure of the job itself ends in ``_failed`` (retry or fail). Only a
        failure to record that end (the queue is down) escapes, and the queue then
        delivers the job again (JobQueue.consume's contract).
        """
        self.running += 1
        self.metrics.running.inc()
        try:
            with self.metrics.tracing.job_span(record):
                await self._run(record)
        finally:
            self.running -= 1
            self.metrics.running.dec()

    async def _run(self, record: JobRecord) -> None:
        max_attempts = self.settings.worker.max_attempts
        if record.attempts > max_attempts:
            # Delivered again after its runner died on every attempt: a poison job.
            exc = errors.WorkerCrashed(
                f"the job's worker died on each of {max_attempts} attempts; giving up"
            )
            await self._failed(record, exc)
            return
        log.debug("job %s running attempt=%d dst=%s", record.id, record.attempts, record.dst_url)
        self._observe_queue_wait(record)
        try:
            spec = JobSpec.from_dict(record.job)
            plan = JobPlan.from_dict(record.plan)
            source, planned = await self._source(record, spec)
            # One task renders every output from one decode of the source.
            with self._rendering():
                results = await self.pool.render(source, record.plan, planned=planned)
            uploads = [
                (target, result.data, rendition.plan.content_type)
                for target, result, rendition in zip(
                    targets(spec, plan), results, plan.outputs, strict=True
                )
            ]
            with self.metrics.phase("upload"):
                await upload_all(self.transports, uploads)
            for target, data, _ in uploads:
                self.metrics.count_upload(target.url, len(data))
        except errors.ImgserveError as exc:
            await self._failed(record, exc)
        except Exception as exc:  # a bug: record it, never lose the job silently
            log.exception("job %s: unexpected error", record.id)
            await self._failed(record, errors.InternalError(f"{type(exc).__name__}: {exc}"))
        else:
            sizes = [len(result.data) for result in results]
            previews = [result.preview for result in results]
            event = self._event(record, "job.completed", output_bytes=sizes, previews=previews)
            await self.queue.complete(record.id, sizes, event=event, previews=previews)
            self.metrics.tracing.outcome("done")
            self.metrics.done.labels(_operation(record)).inc()
            self._announce(event)
            log.info(
                "job %s done attempt=%d outputs=%d%s",
                record.id,
                record.attempts,
                len(results),
                _key_field(record),
            )

    async def _source(self, record: JobRecord, spec: JobSpec) -> tuple[bytes | str, bool]:
        """The source (its bytes or a file holding them), and whether it is the
        queue's copy, the very bytes the plan checked (else downloaded again)."""
        kept: bytes | str | None = await self.queue.source_file(record.id)
        if kept is None:
            kept = await self.queue.source(record.id)
        if kept is not None:
            return kept, True
        if spec.source_url is None:
            raise errors.SourceNotFound("the uploaded source is no longer stored in the queue")
        # A keyed job's redirects were checked against the key's sources on the API
        # node; this node has no keys, so a keyed job's download follows none.
        hops = _refuse_redirect if record.key is not None else None
        with self.metrics.phase("download"):
            data = await self.transports.download(spec.source_url, hop_check=hops)
        self.metrics.count_download(spec.source_url, len(data))
        return data, False

    def _observe_queue_wait(self, record: JobRecord) -> None:
        """From when the job was due (accepted, or its retry's backoff over) to its start."""
        if record.started_at is not None:
            wait_s = max(0.0, record.started_at - record.due_at)
            self.metrics.phases.labels("queue_wait").observe(wait_s)

    @contextlib.contextmanager
    def _rendering(self) -> Iterator[None]:
        """Time a render and count it busy; a worker process lost on it (crashed,
        killed past the job timeout) is a restart: pebble starts another."""
        self.metrics.rendering.inc()
        try:
            with self.metrics.phase("render"):
                yield
        except (errors.WorkerCrashed, errors.ProcessingTimeout):
            self.metrics.restarts.inc()
            raise
        finally:
            self.metrics.rendering.dec()

    async def _failed(self, record: JobRecord, exc: errors.ImgserveError) -> None:
        attempts_left = record.attempts < self.settings.worker.max_attempts
        if exc.retryable and attempts_left:
            delay = backoff_s(
                record.attempts,
                base_s=self.settings.transport.retry_base_s,
                max_s=self.settings.transport.retry_max_s,
            )
            log.warning(
                "job %s retry in %.1fs code=%d attempt=%d: %s",
                record.id,
                delay,
                exc.code,
                record.attempts,
                exc.detail,
            )
            await self.queue.retry(record.id, delay, exc.code, exc.detail)
            self.metrics.tracing.outcome("retry", exc)
            self.metrics.retried.labels(_operation(record), str(exc.code)).inc()
            return
        log.error(
            "job %s failed code=%d attempts=%d%s: %s",
            record.id,
            exc.code,
            record.attempts,
            _key_field(record),
            exc.detail,
        )
        # The failure image goes first: once the job reads "failed", it is in place.
        await self._upload_failure_image(record)
        event = self._event(record, "job.failed", error=exc)
        await self.queue.fail(record.id, exc.code, exc.detail, event=event)
        self.metrics.tracing.outcome("failed", exc)
        self.metrics.failed.labels(_operation(record), str(exc.code)).inc()
        self._announce(event)

    def _event(self, record: JobRecord, type: str, **details: Any) -> Event | None:
        """The job's completion event (None: it has no webhook)."""
        return webhooks.record_event(record, type, self.settings.webhook, **details)

    def _announce(self, event: Event | None) -> None:
        if event is not None and self.on_event is not None:
            self.on_event()

    async def _upload_failure_image(self, record: JobRecord) -> None:
        try:
            spec = JobSpec.from_dict(record.job)
            plan = JobPlan.from_dict(record.plan)
            await upload_failure_images(self.transports, plan, targets(spec, plan))
        except errors.ImgserveError as exc:
            log.warning("job %s: failure image not uploaded: %s", record.id, exc.detail)
        except Exception as exc:  # a record we cannot read: the failure still counts
            log.warning(
                "job %s: failure image not drawn: %s: %s", record.id, type(exc).__name__, exc
            )

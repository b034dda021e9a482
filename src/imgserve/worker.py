"""One job end to end, top to bottom: source -> render -> upload -> record.

The queue backend delivers jobs to :meth:`Runner.run` (up to ``concurrency`` at
once); network I/O stays on the event loop and pixels go to the process pool.
Retryable failures go back to the queue with backoff until the attempts run
out; a job that fails for good gets the failure image at its destination (when
the destination still takes it) and its error recorded.
"""

from __future__ import annotations

import asyncio
import logging

from imgserve import errors
from imgserve.config import Settings
from imgserve.destination import destination_target
from imgserve.imaging import pipeline
from imgserve.planning import JobPlan
from imgserve.pool import ImagePool
from imgserve.queue.base import JobQueue, JobRecord
from imgserve.request import Job
from imgserve.retry import backoff_s
from imgserve.transports import Transports

log = logging.getLogger("imgserve.jobs")


class Runner:
    def __init__(
        self, queue: JobQueue, transports: Transports, pool: ImagePool, settings: Settings
    ) -> None:
        self.queue = queue
        self.transports = transports
        self.pool = pool
        self.settings = settings
        # Downloads and uploads overlap with rendering: two jobs per worker process.
        self.concurrency = max(2, settings.worker.workers * 2)
        self.running = 0
        self.stopping = asyncio.Event()

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
        try:
            await self._run(record)
        finally:
            self.running -= 1

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
        try:
            job = Job.from_dict(record.job)
            plan = JobPlan.from_dict(record.plan)
            # The queue's copy is the very source the plan checked; a new download is not.
            source: bytes | str | None = await self.queue.source_file(record.id)
            if source is None:
                source = await self.queue.source(record.id)
            planned = source is not None
            if source is None:
                source = await self.transports.download(job.src_url)
            results = await self.pool.render(source, record.plan, planned=planned)
            for rendition, result in zip(plan.outputs, results, strict=True):
                target = destination_target(rendition.dst_url, job.form_field)
                await self.transports.upload(target, result, rendition.plan.content_type)
        except errors.ImgserveError as exc:
            await self._failed(record, exc)
        except Exception as exc:  # a bug: record it, never lose the job silently
            log.exception("job %s: unexpected error", record.id)
            await self._failed(record, errors.InternalError(f"{type(exc).__name__}: {exc}"))
        else:
            await self.queue.complete(record.id)
            log.info("job %s done attempt=%d", record.id, record.attempts)

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
            return
        log.error(
            "job %s failed code=%d attempts=%d: %s",
            record.id,
            exc.code,
            record.attempts,
            exc.detail,
        )
        # The failure image goes first: once the job reads "failed", it is in place.
        await self._upload_failure_image(record)
        await self.queue.fail(record.id, exc.code, exc.detail)

    async def _upload_failure_image(self, record: JobRecord) -> None:
        try:
            plan = JobPlan.from_dict(record.plan)
            for rendition in plan.outputs:
                out = rendition.plan
                image = await asyncio.to_thread(pipeline.failure_image, out.result, out.output)
                target = destination_target(rendition.dst_url, record.job.get("form_field"))
                await self.transports.upload(target, image, out.content_type)
        except errors.ImgserveError as exc:
            log.warning("job %s: failure image not uploaded: %s", record.id, exc.detail)
        except Exception as exc:  # a record we cannot read: the failure still counts
            log.warning(
                "job %s: failure image not drawn: %s: %s", record.id, type(exc).__name__, exc
            )

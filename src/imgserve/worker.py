"""One job end to end, top to bottom: source -> render -> upload -> record.

The :class:`Runner` claims jobs from the queue and runs up to ``concurrency``
of them at once; network I/O stays on the event loop, pixels go to the
process pool. Retryable failures go back to the queue with backoff until the
attempts run out; a job that fails for good gets the failure image at its
destination (when the destination still takes it) and its error recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from imgserve import errors
from imgserve.config import Settings
from imgserve.imaging import pipeline
from imgserve.pool import ImagePool
from imgserve.queue.base import JobQueue, JobRecord
from imgserve.request import Job, destination_target
from imgserve.retry import backoff_s
from imgserve.transports import Transports

log = logging.getLogger("imgserve.jobs")


class Runner:
    def __init__(
        self,
        queue: JobQueue,
        transports: Transports,
        pool: ImagePool,
        settings: Settings,
        spool_dir: Path,
    ) -> None:
        self.queue = queue
        self.transports = transports
        self.pool = pool
        self.settings = settings
        self.spool_dir = spool_dir
        self.concurrency = max(2, settings.worker.workers * 2)
        self.wakeup = asyncio.Event()
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def running(self) -> int:
        return len(self._tasks)

    async def serve(self) -> None:
        """Claim and run jobs until ``stop`` is called."""
        while not self._stopping:
            if len(self._tasks) >= self.concurrency:
                await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                record = await self.queue.claim()
            except errors.ImgserveError as exc:
                log.error("queue unavailable: %s", exc.detail)
                await asyncio.sleep(1.0)
                continue
            if record is None:
                await self._idle()
                continue
            task = asyncio.create_task(self.run(record))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _idle(self) -> None:
        due = await self.queue.next_due_in()
        timeout = 1.0 if due is None else min(1.0, max(0.01, due))
        self.wakeup.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wakeup.wait(), timeout)

    async def stop(self, deadline_s: float) -> bool:
        """Stop claiming; wait up to ``deadline_s`` for running jobs. True if all ended."""
        self._stopping = True
        self.wakeup.set()
        if not self._tasks:
            return True
        _done, pending = await asyncio.wait(self._tasks, timeout=deadline_s)
        for task in pending:
            task.cancel()
        return not pending

    async def run(self, record: JobRecord) -> None:
        """Run one claimed job and record how it ended."""
        job = Job.from_dict(record.job)
        log.info("job %s running attempt=%d dst=%s", record.id, record.attempts, record.dst_url)
        heartbeat = asyncio.create_task(self._heartbeat(record.id))
        try:
            source = await self._source(record, job)
            result = await self.pool.render(source, record.plan)
            plan = pipeline.Plan.from_dict(record.plan)
            target = destination_target(plan.dst_url, job.form_field)
            await self.transports.upload(target, result, plan.content_type)
        except asyncio.CancelledError:
            log.warning("job %s interrupted by shutdown; it stays queued", record.id)
            with contextlib.suppress(Exception):
                await asyncio.shield(
                    self.queue.retry(record.id, 0.0, 604, "interrupted by shutdown")
                )
            raise
        except errors.ImgserveError as exc:
            await self._failed(record, job, exc)
        except Exception as exc:  # a bug: record it, never lose the job silently
            log.exception("job %s: unexpected error", record.id)
            await self._failed(record, job, errors.InternalError(f"{type(exc).__name__}: {exc}"))
        else:
            await self.queue.complete(record.id)
            self._drop_spool(record)
            log.info("job %s done attempt=%d", record.id, record.attempts)
        finally:
            heartbeat.cancel()

    async def _heartbeat(self, job_id: str) -> None:
        while True:
            await asyncio.sleep(5.0)
            with contextlib.suppress(errors.ImgserveError):
                await self.queue.heartbeat(job_id)

    async def _source(self, record: JobRecord, job: Job) -> str:
        """The spooled source file, downloading it again if the spool lost it."""
        if record.source_path and os.path.exists(record.source_path):
            return record.source_path
        data = await self.transports.download(job.src_url)
        path = self.spool_dir / f"{record.id}.src"
        await asyncio.to_thread(write_spool, path, data)
        record.source_path = str(path)
        return str(path)

    async def _failed(self, record: JobRecord, job: Job, exc: errors.ImgserveError) -> None:
        attempts_left = record.attempts < self.settings.worker.max_attempts
        if exc.retryable and attempts_left and not self._stopping:
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
            self.wakeup.set()
            return
        log.error(
            "job %s failed code=%d attempts=%d: %s",
            record.id,
            exc.code,
            record.attempts,
            exc.detail,
        )
        await self.queue.fail(record.id, exc.code, exc.detail)
        self._drop_spool(record)
        await self._upload_failure_image(record, job)

    async def _upload_failure_image(self, record: JobRecord, job: Job) -> None:
        plan = pipeline.Plan.from_dict(record.plan)
        try:
            image = await asyncio.to_thread(pipeline.failure_image, plan.result, plan.output)
            target = destination_target(plan.dst_url, job.form_field)
            await self.transports.upload(target, image, plan.content_type)
        except errors.ImgserveError as exc:
            log.warning("job %s: failure image not uploaded: %s", record.id, exc.detail)

    @staticmethod
    def _drop_spool(record: JobRecord) -> None:
        if record.source_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(record.source_path)


def write_spool(path: Path, data: bytes) -> None:
    """Write a source copy durably (the job row that names it is committed after)."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)

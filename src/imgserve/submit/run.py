"""Running ``imgserve submit``: at most ``concurrency`` jobs in flight, each
submitted, then waited on with ``AsyncClient.wait``, whose waits share one
``GET /events`` stream (polling ``GET /jobs/<id>`` while it cannot be had), so a run
of 10,000 jobs holds one stream, not one per job.

Ctrl-C once: no new job is submitted, the ones in flight are waited for; twice: the
run stops at once (the daemon finishes what it accepted). Under ``--resume`` a
job's Idempotency-Key comes from its source and options (plan.resume_key): a job
the daemon answers as a replay that had ended done is counted as skipped, one that
had failed (or was pruned since) is tried again under a key derived from that try.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from imgserve.client import (
    AsyncClient,
    ClientError,
    Job,
    JobNotFound,
    JobState,
    Upload,
    ValidationError,
)
from imgserve.client.errors import APIError
from imgserve.submit.plan import Item, Tally, resume_key, retry_key
from imgserve.submit.report import Reporter

KEY_REFUSED = frozenset({140, 141})
"""401: no API key, or one the daemon does not know (docs/errors.md)."""
DESTINATION_OUT_OF_SCOPE = 143
MAX_RETRIES_OF_FAILED = 5
"""Under --resume, how many earlier failed tries of one job are followed before a new one."""


@dataclass(frozen=True)
class Options:
    concurrency: int = 8
    resume: bool = False
    poll_s: float = 1.0
    stop_on_invalid: bool = True
    """Stop submitting when the daemon refuses the job itself (7xx not about the
    source) or the key may not write its outputs (403 143): every other item has the
    same job and would be refused the same way. (A refused key, 401 140/141, stops
    any run.)"""


class Run:
    def __init__(
        self, client: AsyncClient, items: Sequence[Item], options: Options, reporter: Reporter
    ) -> None:
        self.client = client
        self.items = items
        self.options = options
        self.reporter = reporter
        self.tally = Tally(total=len(items))
        self.stopping = asyncio.Event()

    async def run(self) -> Tally:
        """Every item submitted and ended, or as many as the run got to."""
        slots = asyncio.Semaphore(self.options.concurrency)
        async with asyncio.TaskGroup() as group:
            for item in self.items:
                await slots.acquire()
                if self.reporter.gone:
                    self.stopping.set()
                if self.stopping.is_set():
                    slots.release()
                    break
                task = group.create_task(self._one(item))
                task.add_done_callback(lambda _t: slots.release())
        return self.tally

    def stop(self, why: str) -> None:
        if not self.stopping.is_set():
            self.stopping.set()
            self.reporter.note(why)

    async def _one(self, item: Item) -> None:
        if item.error is not None:
            self._failed(item, 0, item.error)
            return
        try:
            job = await self._submit(item)
            if job is None:
                return
            ended = await self.client.wait(job.id, poll_s=self.options.poll_s)
        except APIError as exc:
            self._failed(item, exc.code, exc.detail)
            why = self._why_stop(exc)
            if why is not None:
                self.stop(f"stopping: {why} ({exc.code} {exc.detail})")
            return
        except ClientError as exc:  # no answer, after the client's retries
            self._failed(item, 0, str(exc))
            self.stop(f"stopping: no answer from the daemon ({exc})")
            return
        except OSError as exc:  # the file went away or cannot be read
            self._failed(item, 0, f"cannot read {item.label}: {exc.strerror}")
            return
        except Exception as exc:  # a reply not understood (a proxy, a newer daemon), a bug:
            self._failed(item, 0, f"unexpected {type(exc).__name__}: {exc}")  # this item's end
            return
        if ended.state is JobState.DONE:
            self.tally.done += 1
            self.reporter.ended(item, ended, "done", self.tally)
        elif ended.state is JobState.CANCELLED:
            self.tally.cancelled += 1
            self.reporter.ended(item, ended, "cancelled", self.tally)
        else:
            error = ended.error
            self._failed(item, error.code if error else 0, error.detail if error else "", ended)

    def _why_stop(self, exc: APIError) -> str | None:
        """Why a refusal means every other item would be refused the same way, or
        None when it is about this item alone."""
        if exc.code in KEY_REFUSED:
            return "the daemon refused the API key"
        if not self.options.stop_on_invalid:
            return None  # (a jobs file: each line has outputs of its own)
        if exc.code == DESTINATION_OUT_OF_SCOPE:
            return "the API key may not write to the outputs"
        if isinstance(exc, ValidationError) and not exc.detail.startswith("source"):
            return "the daemon refused the job itself"
        return None

    async def _submit(self, item: Item) -> Job | None:
        """The item's job: submitted, or under --resume an earlier run's (None when
        that one had ended done: counted as skipped)."""
        data = None
        if isinstance(item.source, Path):  # read here: at most `concurrency` files in memory
            data = await asyncio.to_thread(item.source.read_bytes)
        source: str | Upload = str(item.source) if data is None else Upload(data, item.name or "")
        if not self.options.resume:
            return await self.client.submit_job(source, item.job)
        key = resume_key(item, data)
        for _ in range(MAX_RETRIES_OF_FAILED):
            job = await self.client.submit_job(source, item.job, idempotency_key=key)
            if not job.replayed:
                return job
            try:
                current = await self.client.get(job.id)
            except JobNotFound:  # the daemon kept the key but pruned its job: send anew
                key = retry_key(key, job.id)
                continue
            if current.state is JobState.DONE:
                self.tally.skipped += 1
                self.reporter.ended(item, current, "skipped", self.tally)
                return None
            if current.state is not JobState.FAILED:
                return current  # queued or running from an earlier run: wait for it
            key = retry_key(key, job.id)
        return await self.client.submit_job(source, item.job)

    def _failed(self, item: Item, code: int, detail: str, job: Job | None = None) -> None:
        self.tally.failed += 1
        self.tally.failures.append((item.label, code, detail))
        self.reporter.failed(item, code, detail, job, self.tally)


async def run(
    client: AsyncClient, items: Sequence[Item], options: Options, reporter: Reporter
) -> tuple[Tally, bool]:
    """The run, with Ctrl-C handled: (how it ended, whether it was interrupted).
    A second Ctrl-C raises KeyboardInterrupt out of here."""
    runner = Run(client, items, options, reporter)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    presses = 0

    def on_interrupt() -> None:
        nonlocal presses
        presses += 1
        if presses == 1:
            runner.stop("stopping: no new jobs; waiting for those in flight (Ctrl-C again: leave)")
        elif main is not None:
            main.cancel()

    with _handler(loop, signal.SIGINT, on_interrupt):
        try:
            tally = await runner.run()
        except asyncio.CancelledError:
            if presses >= 2:
                raise KeyboardInterrupt from None
            raise
    return tally, presses > 0


@contextlib.contextmanager
def _handler(
    loop: asyncio.AbstractEventLoop, signum: int, callback: Callable[[], None]
) -> Iterator[None]:
    loop.add_signal_handler(signum, callback)
    try:
        yield
    finally:
        loop.remove_signal_handler(signum)

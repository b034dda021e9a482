"""One contract suite for every job queue backend (embedded SQLite, Redis via arq)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from imgserve import errors
from imgserve.queue import open_queue
from imgserve.queue.base import JobQueue, JobRecord, State


def record(**changes: Any) -> JobRecord:
    values: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "job": {"operation": "resize", "src_url": "http://h/x.jpg"},
        "plan": {"result": [10, 10]},
        "dst_url": "file:///tmp/x.jpg",
    }
    values.update(changes)
    return JobRecord(**values)


QueueFactory = Callable[..., JobQueue]


@pytest.fixture(params=["sqlite", "redis"])
async def make_queue(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[QueueFactory]:
    """Opens backends of one kind (all on the same store), closed after the test."""
    url = None
    if request.param == "redis":
        url = f"{request.getfixturevalue('redis_url')}?prefix=test-{uuid.uuid4().hex}"
    opened: list[JobQueue] = []

    def make(**options: Any) -> JobQueue:
        backend = open_queue(url, tmp_path, **options)
        opened.append(backend)
        return backend

    make.url = url  # type: ignore[attr-defined]
    yield make
    for backend in opened:
        await backend.close()


@pytest.fixture
def queue(make_queue: QueueFactory) -> JobQueue:
    return make_queue()


async def wait_state(queue: JobQueue, job_id: str, *states: State) -> JobRecord:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        found = await queue.get(job_id)
        if found is not None and found.state in states:
            return found
        await asyncio.sleep(0.02)
    raise AssertionError(f"job {job_id} never reached {states}: {await queue.get(job_id)}")


Handler = Callable[[JobRecord], Awaitable[None]]


async def consuming(queue: JobQueue, handler: Handler, concurrency: int = 2) -> Any:
    stopping = asyncio.Event()
    task = asyncio.create_task(queue.consume(handler, concurrency, stopping))
    return stopping, task


async def stop(stopping: asyncio.Event, task: asyncio.Task[None]) -> None:
    stopping.set()
    await asyncio.wait_for(task, 15)


async def test_put_consume_complete(queue: JobQueue) -> None:
    """A job put is delivered once (running, attempt 1) with its source, then done."""
    job = record()
    await queue.put(job, b"source bytes", max_active=10)
    assert (await queue.get(job.id)).state is State.QUEUED  # type: ignore[union-attr]
    seen: list[tuple[State, int, bytes | None]] = []

    async def handler(delivered: JobRecord) -> None:
        current = await queue.get(delivered.id)
        assert current is not None
        seen.append((current.state, delivered.attempts, await queue.source(delivered.id)))
        await queue.complete(delivered.id)

    stopping, task = await consuming(queue, handler)
    done = await wait_state(queue, job.id, State.DONE)
    await stop(stopping, task)
    assert seen == [(State.RUNNING, 1, b"source bytes")]
    assert done.finished_at is not None and done.started_at is not None
    assert (await queue.counts())["done"] == 1
    assert await queue.source(job.id) is None  # the copy goes once the job ends


async def test_complete_keeps_each_output_s_size(queue: JobQueue) -> None:
    """complete(outputs' sizes) is stored with the job and read back by get."""
    job = record()
    await queue.put(job, b"x", max_active=10)

    async def handler(delivered: JobRecord) -> None:
        await queue.complete(delivered.id, [1234, 56, 7])

    stopping, task = await consuming(queue, handler)
    done = await wait_state(queue, job.id, State.DONE)
    await stop(stopping, task)
    assert done.output_bytes == [1234, 56, 7]


def test_a_record_with_fields_a_later_release_adds_still_reads() -> None:
    """JobRecord.from_dict ignores fields it does not know (a newer node wrote them)."""
    stored = record().to_dict()
    stored["webhook_attempts"] = 3
    assert JobRecord.from_dict(stored).id == stored["id"]


async def test_order_is_first_in_first_out(queue: JobQueue) -> None:
    """With one job at a time, jobs run in the order they were accepted."""
    jobs = [record() for _ in range(3)]
    for job in jobs:
        await queue.put(job, b"x", max_active=10)
        await asyncio.sleep(0.01)
    order: list[str] = []

    async def handler(delivered: JobRecord) -> None:
        order.append(delivered.id)
        await queue.complete(delivered.id)

    stopping, task = await consuming(queue, handler, concurrency=1)
    await wait_state(queue, jobs[-1].id, State.DONE)
    await stop(stopping, task)
    assert order == [job.id for job in jobs]


async def test_full_queue_refuses(queue: JobQueue) -> None:
    """put raises QueueFull once max_active jobs are unfinished."""
    await queue.put(record(), b"x", max_active=2)
    await queue.put(record(), b"x", max_active=2)
    with pytest.raises(errors.QueueFull):
        await queue.put(record(), b"x", max_active=2)
    assert (await queue.counts())["queued"] == 2


async def test_retry_waits_for_its_delay(queue: JobQueue) -> None:
    """A retried job keeps its error, waits its delay, and comes back as attempt 2."""
    job = record()
    await queue.put(job, b"x", max_active=10)
    calls: list[tuple[int, float]] = []

    async def handler(delivered: JobRecord) -> None:
        calls.append((delivered.attempts, time.monotonic()))
        if delivered.attempts == 1:
            await queue.retry(delivered.id, 0.5, 501, "upload failed")
            stored = await queue.get(delivered.id)
            assert stored is not None and stored.state is State.QUEUED
            assert stored.error_code == 501
        else:
            await queue.complete(delivered.id)

    stopping, task = await consuming(queue, handler)
    await wait_state(queue, job.id, State.DONE)
    await stop(stopping, task)
    assert [attempt for attempt, _ in calls] == [1, 2]
    assert calls[1][1] - calls[0][1] >= 0.45


async def test_fail_records_the_error(queue: JobQueue) -> None:
    """fail is terminal and keeps the code and detail."""
    job = record()
    await queue.put(job, b"x", max_active=10)

    async def handler(delivered: JobRecord) -> None:
        await queue.fail(delivered.id, 202, "truncated")

    stopping, task = await consuming(queue, handler)
    stored = await wait_state(queue, job.id, State.FAILED)
    await stop(stopping, task)
    assert (stored.error_code, stored.error_detail) == (202, "truncated")
    assert (await queue.counts())["failed"] == 1


async def test_stop_lets_running_jobs_finish(queue: JobQueue) -> None:
    """Setting stopping takes no new job but waits for the running one to end."""
    first, second = record(), record()
    await queue.put(first, b"x", max_active=10)
    started = asyncio.Event()

    async def handler(delivered: JobRecord) -> None:
        started.set()
        await asyncio.sleep(0.3)
        await queue.complete(delivered.id)

    stopping, task = await consuming(queue, handler)
    await asyncio.wait_for(started.wait(), 10)
    stopping.set()
    await queue.put(second, b"x", max_active=10)
    await asyncio.wait_for(task, 10)
    assert (await queue.get(first.id)).state is State.DONE  # type: ignore[union-attr]
    assert (await queue.get(second.id)).state is State.QUEUED  # type: ignore[union-attr]


async def test_cancelled_job_is_delivered_again(queue: JobQueue) -> None:
    """A job whose consumer is cancelled mid-run is delivered again (attempt 2)."""
    job = record()
    await queue.put(job, b"x", max_active=10)
    started = asyncio.Event()

    async def hang(delivered: JobRecord) -> None:
        started.set()
        await asyncio.sleep(3600)

    stopping, task = await consuming(queue, hang)
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await queue.recover()
    attempts: list[int] = []

    async def finish(delivered: JobRecord) -> None:
        attempts.append(delivered.attempts)
        await queue.complete(delivered.id)

    stopping, task = await consuming(queue, finish)
    await wait_state(queue, job.id, State.DONE)
    await stop(stopping, task)
    assert attempts == [2]


async def test_prune_removes_old_finished_jobs_only(queue: JobQueue) -> None:
    """prune deletes finished jobs past the keep time and leaves unfinished ones."""
    done, waiting = record(), record()
    await queue.put(done, b"x", max_active=10)

    async def handler(delivered: JobRecord) -> None:
        await queue.complete(delivered.id)

    stopping, task = await consuming(queue, handler)
    await wait_state(queue, done.id, State.DONE)
    await stop(stopping, task)
    await queue.put(waiting, b"x", max_active=10)
    await asyncio.sleep(0.05)
    assert await queue.prune(older_than_s=0.01) == 1
    assert await queue.get(done.id) is None
    assert await queue.get(waiting.id) is not None
    assert (await queue.counts())["done"] == 0


async def test_unknown_job(queue: JobQueue) -> None:
    """get of an unknown id is None; finishing it is JobNotFound."""
    assert await queue.get("missing") is None
    with pytest.raises(errors.JobNotFound):
        await queue.complete("missing")


async def test_sqlite_counts_follow_every_change_and_are_rebuilt_on_open(tmp_path: Path) -> None:
    """The embedded queue's per-state counts (kept by triggers) match the jobs table,
    and a reopened database recounts them from the jobs themselves."""
    import sqlite3

    from imgserve.queue.sqlite import SQLiteQueue

    queue = open_queue(None, tmp_path)
    assert isinstance(queue, SQLiteQueue)
    for _ in range(3):
        await queue.put(record(), b"x", max_active=10)
    first = await queue.claim()
    second = await queue.claim()
    assert first is not None and second is not None
    await queue.complete(first.id)
    await queue.fail(second.id, 301, "gone")
    expected = {"queued": 1, "running": 0, "done": 1, "failed": 1, "cancelled": 0}
    assert await queue.counts() == expected
    await queue.close()

    with sqlite3.connect(queue.path) as db:
        db.execute("UPDATE state_counts SET n = 99")
    reopened = open_queue(None, tmp_path)
    try:
        assert await reopened.counts() == expected
    finally:
        await reopened.close()


async def test_handler_that_raises_is_delivered_again_after_backoff(queue: JobQueue) -> None:
    """A handler exception is not the job's end: the job comes back after a backoff
    as the next attempt, with the exception recorded (601) while it waits."""
    job = record()
    await queue.put(job, b"x", max_active=10)
    calls: list[tuple[int, float]] = []

    waiting: list[int | None] = []
    waiting_detail: list[str] = []

    async def handler(delivered: JobRecord) -> None:
        calls.append((delivered.attempts, time.monotonic()))
        if delivered.attempts == 1:
            raise RuntimeError("a bug in the handler")
        # The record as it was stored between the attempts (before this delivery).
        waiting.append(delivered.error_code)
        waiting_detail.append(delivered.error_detail or "")
        await queue.complete(delivered.id)

    stopping, task = await consuming(queue, handler)
    done = await wait_state(queue, job.id, State.DONE)
    await stop(stopping, task)
    # While it waited for attempt 2 the job was queued with the exception recorded.
    assert waiting == [errors.InternalError.code]
    assert "RuntimeError" in waiting_detail[0]
    assert [attempt for attempt, _ in calls] == [1, 2]
    assert calls[1][1] - calls[0][1] >= 0.45  # redelivery_delay_s(1) is 0.5-1 s
    assert done.attempts == 2 and done.error_code is None


async def test_handler_that_keeps_raising_is_retried_with_growing_backoff(
    queue: JobQueue,
) -> None:
    """Every raising delivery is delivered again (never dropped, never left running),
    the attempts counting up so the handler's own limit can end the job."""
    job = record()
    await queue.put(job, b"x", max_active=10)
    attempts: list[int] = []

    async def handler(delivered: JobRecord) -> None:
        attempts.append(delivered.attempts)
        if delivered.attempts < 3:
            raise ValueError(f"attempt {delivered.attempts}")
        await queue.fail(delivered.id, 603, "gave up")

    stopping, task = await consuming(queue, handler)
    failed = await wait_state(queue, job.id, State.FAILED)
    await stop(stopping, task)
    assert attempts == [1, 2, 3]
    assert (failed.error_code, failed.attempts) == (603, 3)


async def test_delivery_past_its_deadline_is_cancelled_and_delivered_again(
    make_queue: QueueFactory,
) -> None:
    """A handler that hangs past the delivery deadline is cancelled and the job
    delivered again, instead of holding a slot for ever."""
    queue = make_queue(job_deadline_s=2.0)
    job = record()
    await queue.put(job, b"x", max_active=10)
    cancelled = asyncio.Event()

    async def handler(delivered: JobRecord) -> None:
        if delivered.attempts == 1:
            try:
                await asyncio.sleep(3600)
            finally:
                cancelled.set()
        await queue.complete(delivered.id)

    stopping, task = await consuming(queue, handler)
    done = await wait_state(queue, job.id, State.DONE)
    await stop(stopping, task)
    assert cancelled.is_set()
    assert done.attempts == 2


async def test_late_end_of_a_duplicate_delivery_changes_nothing(queue: JobQueue) -> None:
    """At-least-once: a second delivery that ends after the first one finished the
    job cannot reopen it or overwrite how it ended."""
    job = record()
    await queue.put(job, b"x", max_active=10)

    async def handler(delivered: JobRecord) -> None:
        await queue.complete(delivered.id)

    stopping, task = await consuming(queue, handler)
    await wait_state(queue, job.id, State.DONE)
    await stop(stopping, task)
    await queue.retry(job.id, 0.0, 501, "late duplicate")
    await queue.fail(job.id, 502, "late duplicate")
    stored = await queue.get(job.id)
    assert stored is not None
    assert (stored.state, stored.error_code) == (State.DONE, None)
    assert (await queue.counts())["done"] == 1


async def test_job_whose_runner_died_is_reclaimed_when_its_lease_runs_out(
    make_queue: QueueFactory, tmp_path: Path
) -> None:
    """A consumer process killed with SIGKILL mid-job holds its job only until the
    lease runs out: a live consumer then runs it, with no restart or recover()."""
    queue = make_queue(lease_s=1.0, job_deadline_s=2.0)
    job = record()
    await queue.put(job, b"x", max_active=10)
    marker = tmp_path / "claimed"
    store = make_queue.url or str(tmp_path)  # type: ignore[attr-defined]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.queue.consumer_proc", store, str(marker)],
        cwd=Path(__file__).parents[2],
    )
    try:
        deadline = time.monotonic() + 30
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert marker.read_text() == job.id
    finally:
        proc.kill()
        proc.wait()
    attempts: list[int] = []

    async def finish(delivered: JobRecord) -> None:
        attempts.append(delivered.attempts)
        await queue.complete(delivered.id)

    stopping, task = await consuming(queue, finish)
    await wait_state(queue, job.id, State.DONE)  # within 15 s: lease 1 s / arq's 12 s
    await stop(stopping, task)
    assert attempts == [2]


async def test_sqlite_consumer_outlives_a_failing_database(tmp_path: Path) -> None:
    """Claims that raise (the database locked, the disk gone) are logged and retried
    with backoff; consume keeps running and delivers the job once claims work again."""
    from imgserve.queue.sqlite import SQLiteQueue

    class Failing(SQLiteQueue):
        failures = 3

        async def claim(self) -> JobRecord | None:
            if self.failures > 0:
                self.failures -= 1
                raise errors.QueueUnavailable("job database: disk I/O error")
            return await super().claim()

    queue = Failing(tmp_path / "jobs.db")
    job = record()
    await queue.put(job, b"x", max_active=10)

    async def handler(delivered: JobRecord) -> None:
        await queue.complete(delivered.id)

    stopping, task = await consuming(queue, handler)
    try:
        await wait_state(queue, job.id, State.DONE)
        assert not task.done()
        assert queue.failures == 0
    finally:
        await stop(stopping, task)
        await queue.close()


async def test_sqlite_lease_is_renewed_while_the_handler_runs(tmp_path: Path) -> None:
    """A job that runs for several leases is kept by its live consumer: a second
    consumer on the same database never takes it over, and it runs once."""
    from imgserve.queue.sqlite import SQLiteQueue

    owner = SQLiteQueue(tmp_path / "jobs.db", lease_s=0.6)
    other = SQLiteQueue(tmp_path / "jobs.db", lease_s=0.6)
    job = record()
    await owner.put(job, b"x", max_active=10)
    runs: list[tuple[str, int]] = []

    async def slow(delivered: JobRecord) -> None:
        runs.append(("owner", delivered.attempts))
        await asyncio.sleep(2.5)  # four leases
        await owner.complete(delivered.id)

    async def steal(delivered: JobRecord) -> None:
        runs.append(("other", delivered.attempts))
        await other.complete(delivered.id)

    stopping, task = await consuming(owner, slow, concurrency=1)
    try:
        deadline = time.monotonic() + 15
        while not runs:
            assert time.monotonic() < deadline, "the owner never took the job"
            await asyncio.sleep(0.01)
        other_stopping, other_task = await consuming(other, steal, concurrency=1)
        await wait_state(owner, job.id, State.DONE)
        await stop(other_stopping, other_task)
    finally:
        await stop(stopping, task)
        await owner.close()
        await other.close()
    assert runs == [("owner", 1)]

"""One contract suite for every job queue backend (embedded SQLite, Redis via arq)."""

from __future__ import annotations

import asyncio
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


@pytest.fixture(params=["sqlite", "redis"])
async def queue(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobQueue]:
    if request.param == "sqlite":
        backend = open_queue(None, tmp_path)
    else:
        redis_url = request.getfixturevalue("redis_url")
        backend = open_queue(f"{redis_url}?prefix=test-{uuid.uuid4().hex}", tmp_path)
    yield backend
    await backend.close()


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
    expected = {"queued": 1, "running": 0, "done": 1, "failed": 1}
    assert await queue.counts() == expected
    await queue.close()

    with sqlite3.connect(queue.path) as db:
        db.execute("UPDATE state_counts SET n = 99")
    reopened = open_queue(None, tmp_path)
    try:
        assert await reopened.counts() == expected
    finally:
        await reopened.close()

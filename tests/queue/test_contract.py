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
from imgserve.queue.arq_redis import RedisQueue
from imgserve.queue.base import Event, JobQueue, JobRecord, KeyEntry, State


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


async def test_lanes_count_the_queued_jobs_of_each_lane(queue: JobQueue) -> None:
    """lanes() counts queued jobs by lane: two interactive and one batch put; the
    running one leaves its lane, comes back to it when retried, and leaves it done."""
    jobs = [
        record(priority="interactive"),
        record(priority="interactive"),
        record(priority="batch"),
    ]
    for job in jobs:
        await queue.put(job, b"x", max_active=10)
    assert await queue.lanes() == {"interactive": 2, "batch": 1}
    seen: list[dict[str, int]] = []
    release = asyncio.Event()

    async def handler(delivered: JobRecord) -> None:
        if delivered.id != jobs[2].id:
            await release.wait()  # the interactive ones stay running
        elif delivered.attempts == 1:
            seen.append(await queue.lanes())  # all three running
            await queue.retry(delivered.id, 60.0, 501, "upload failed")
            seen.append(await queue.lanes())
            return
        await queue.complete(delivered.id)

    stopping, task = await consuming(queue, handler, concurrency=3)
    await wait_state(queue, jobs[2].id, State.QUEUED)
    while len(seen) < 2:
        await asyncio.sleep(0.02)
    release.set()
    for job in jobs[:2]:
        await wait_state(queue, job.id, State.DONE)
    await stop(stopping, task)
    assert seen == [{"interactive": 0, "batch": 0}, {"interactive": 0, "batch": 1}]
    assert await queue.lanes() == {"interactive": 0, "batch": 1}


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
    queue = make_queue(lease_s=1.0, job_deadline_s=600.0)  # the lease alone decides
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
    await wait_state(queue, job.id, State.DONE)  # within 15 s: the lease is 1 s
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


# --- #13: the outbox, cancel, list, the change feed, idempotency keys, lanes -----------


def event(job_id: str, type_: str = "job.completed", **changes: Any) -> Event:
    values: dict[str, Any] = {
        "id": f"msg_{uuid.uuid4().hex}",
        "job_id": job_id,
        "url": "http://127.0.0.1:9/hook",
        "type": type_,
        "payload": {"type": type_, "data": {"jobId": job_id, "outputs": []}},
    }
    values.update(changes)
    return Event(**values)


async def test_complete_and_fail_store_their_event_only_when_they_end_the_job(
    queue: JobQueue,
) -> None:
    """The event given to complete/fail is in the outbox once the job ended; a late
    duplicate end (with its own event) stores nothing."""
    done, failed = record(), record()
    for job in (done, failed):
        await queue.put(job, b"x", max_active=10)
    first = event(done.id)
    await queue.complete(done.id, [3], event=first)
    await queue.fail(done.id, 502, "late", event=event(done.id, "job.failed"))
    await queue.complete(done.id, event=event(done.id))
    assert [e.id for e in await queue.job_events(done.id)] == [first.id]
    stored = (await queue.job_events(done.id))[0]
    assert (stored.type, stored.payload, stored.state) == (
        "job.completed",
        first.payload,
        "pending",
    )

    gone = event(failed.id, "job.failed")
    await queue.fail(failed.id, 202, "truncated", event=gone)
    assert [e.type for e in await queue.job_events(failed.id)] == ["job.failed"]
    assert await queue.job_events("no-such-job") == []


async def test_concurrent_ends_from_two_nodes_store_exactly_one_event(
    make_queue: QueueFactory,
) -> None:
    """Ends racing on two queue objects of one store: one wins, and only its event is
    stored (the read-modify-write is atomic: WATCH on Redis, one transaction in SQLite)."""
    one, two = make_queue(), make_queue()
    job = record()
    await one.put(job, b"x", max_active=10)
    ends = []
    for i in range(10):
        node = one if i % 2 else two
        ends.append(node.complete(job.id, event=event(job.id, "job.completed")))
        ends.append(node.fail(job.id, 202, "x", event=event(job.id, "job.failed")))
    await asyncio.gather(*ends)
    stored = await one.get(job.id)
    events = await one.job_events(job.id)
    assert stored is not None and len(events) == 1
    assert events[0].type == {State.DONE: "job.completed", State.FAILED: "job.failed"}[stored.state]


async def test_claim_events_leases_each_event_to_one_dispatcher(make_queue: QueueFactory) -> None:
    """Two dispatchers on one store claiming at once never get the same event; a
    leased event is not claimable until its lease runs out or it is saved due."""
    one, two = make_queue(), make_queue()
    made: list[Event] = []
    for _ in range(20):
        job = record()
        await one.put(job, b"x", max_active=100)
        made.append(event(job.id))
        await one.complete(job.id, event=made[-1])
    batches = await asyncio.gather(
        *(node.claim_events(3, 60.0) for node in (one, two, one, two, one, two, one, two))
    )
    claimed = [e.id for batch in batches for e in batch]
    assert len(claimed) == len(set(claimed)) == 20
    assert {e.id for e in made} == set(claimed)
    assert all(e.next_at > time.time() + 50 for batch in batches for e in batch)
    assert await one.claim_events(10, 60.0) == []

    first = batches[0][0]
    first.attempts.append({"at": time.time(), "status": 500, "error": None})
    first.next_at = time.time() - 1  # due again at once
    await two.save_event(first)
    again = await one.claim_events(10, 60.0)
    assert [e.id for e in again] == [first.id]
    assert again[0].attempts == first.attempts
    again[0].state = "delivered"
    await one.save_event(again[0])
    stored = await two.job_events(first.job_id)
    assert [(e.state, len(e.attempts)) for e in stored] == [("delivered", 1)]


async def test_a_lease_that_runs_out_makes_the_event_claimable_again(queue: JobQueue) -> None:
    """A dispatcher that claimed an event and died: once its lease ends, another takes it."""
    job = record()
    await queue.put(job, b"x", max_active=10)
    await queue.complete(job.id, event=event(job.id))
    (leased,) = await queue.claim_events(5, 0.2)
    assert await queue.claim_events(5, 0.2) == []
    deadline = time.monotonic() + 10
    while not (again := await queue.claim_events(5, 0.2)):
        assert time.monotonic() < deadline, "the lease never ran out"
        await asyncio.sleep(0.02)
    assert [e.id for e in again] == [leased.id]


async def test_events_are_pruned_with_their_job(queue: JobQueue) -> None:
    """prune deletes an ended job's events with it; save_event does not bring one back."""
    job = record()
    await queue.put(job, b"x", max_active=10)
    stored = event(job.id)
    await queue.complete(job.id, event=stored)
    await asyncio.sleep(0.05)
    assert await queue.prune(older_than_s=0.01) == 1
    assert await queue.job_events(job.id) == []
    await queue.save_event(stored)
    assert await queue.claim_events(10, 1.0) == []
    assert await queue.job_events(job.id) == []


async def test_cancel_ends_a_queued_job_which_is_never_delivered(queue: JobQueue) -> None:
    """cancel: queued -> cancelled (finished, counted, source gone, event stored); a
    consumer then runs the next job but never the cancelled one."""
    cancelled, after = record(), record()
    await queue.put(cancelled, b"source", max_active=10)
    await queue.put(after, b"source", max_active=10)
    gone = event(cancelled.id, "job.cancelled")
    ended = await queue.cancel(cancelled.id, event=gone)
    assert ended.state is State.CANCELLED and ended.finished_at is not None
    stored = await queue.get(cancelled.id)
    assert stored is not None and stored.state is State.CANCELLED
    assert (await queue.counts())["cancelled"] == 1
    assert (await queue.counts())["queued"] == 1
    assert await queue.source(cancelled.id) is None
    assert [e.id for e in await queue.job_events(cancelled.id)] == [gone.id]
    ran: list[str] = []

    async def handler(delivered: JobRecord) -> None:
        ran.append(delivered.id)
        await queue.complete(delivered.id)

    stopping, task = await consuming(queue, handler, concurrency=1)
    await wait_state(queue, after.id, State.DONE)
    await stop(stopping, task)
    assert ran == [after.id]
    assert (await queue.get(cancelled.id)).state is State.CANCELLED  # type: ignore[union-attr]


async def test_cancel_of_a_job_waiting_for_its_retry_stops_it(queue: JobQueue) -> None:
    """A job queued again for a retry can be cancelled, and is not delivered again."""
    job, marker = record(), record()
    await queue.put(job, b"x", max_active=10)
    attempts: list[int] = []
    retried = asyncio.Event()

    async def handler(delivered: JobRecord) -> None:
        if delivered.id == marker.id:
            await queue.complete(delivered.id)
            return
        attempts.append(delivered.attempts)
        await queue.retry(delivered.id, 0.3, 501, "upload failed")
        retried.set()

    stopping, task = await consuming(queue, handler, concurrency=1)
    await asyncio.wait_for(retried.wait(), 10)
    await wait_state(queue, job.id, State.QUEUED)
    await queue.cancel(job.id)
    await asyncio.sleep(0.6)  # past the retry's due time: it would have run by now
    await queue.put(marker, b"x", max_active=10)
    await wait_state(queue, marker.id, State.DONE)
    await stop(stopping, task)
    assert attempts == [1]
    assert (await queue.get(job.id)).state is State.CANCELLED  # type: ignore[union-attr]


async def test_cancel_refuses_running_ended_and_unknown_jobs(queue: JobQueue) -> None:
    """A running or ended job is JobNotCancellable (its state in the detail); an
    unknown one JobNotFound; the refused job is unchanged."""
    running, done = record(), record()
    await queue.put(running, b"x", max_active=10)
    started, release = asyncio.Event(), asyncio.Event()

    async def handler(delivered: JobRecord) -> None:
        started.set()
        await release.wait()
        await queue.complete(delivered.id)

    stopping, task = await consuming(queue, handler, concurrency=1)
    await asyncio.wait_for(started.wait(), 10)
    with pytest.raises(errors.JobNotCancellable, match="running"):
        await queue.cancel(running.id)
    release.set()
    await wait_state(queue, running.id, State.DONE)
    await stop(stopping, task)
    with pytest.raises(errors.JobNotCancellable, match="done"):
        await queue.cancel(running.id)
    await queue.put(done, b"x", max_active=10)
    await queue.cancel(done.id)
    with pytest.raises(errors.JobNotCancellable, match="cancelled"):
        await queue.cancel(done.id)
    with pytest.raises(errors.JobNotFound):
        await queue.cancel("missing")
    assert errors.JobNotCancellable.code == 613 and errors.JobNotCancellable.status == 409


async def test_list_jobs_pages_newest_first_with_a_state_filter(queue: JobQueue) -> None:
    """list_jobs: newest first (created_at, then id on a tie), pages joined by the
    cursor give every job once, a state filter, None as the last page's cursor."""
    base = time.time()
    jobs = [record(created_at=base + i) for i in range(7)]
    twins = [record(id=f"{c}" * 32, created_at=base + 3) for c in "ab"]  # a tie on time
    for job in jobs + twins:
        await queue.put(job, b"x", max_active=100)
    for job in jobs[1::2]:
        await queue.fail(job.id, 202, "x")
    expected = sorted(jobs + twins, key=lambda j: (j.created_at, j.id), reverse=True)

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        page, cursor = await queue.list_jobs(None, 2, cursor)
        pages += 1
        assert len(page) <= 2
        seen += [job.id for job in page]
        if cursor is None:
            break
    assert seen == [job.id for job in expected]
    assert pages == 5

    failed, cursor = await queue.list_jobs(State.FAILED, 2, None)
    assert [j.id for j in failed] == [jobs[5].id, jobs[3].id] and cursor is not None
    rest, cursor = await queue.list_jobs(State.FAILED, 2, cursor)
    assert [j.id for j in rest] == [jobs[1].id] and cursor is None
    assert all(j.state is State.FAILED for j in failed + rest)
    assert await queue.list_jobs(State.RUNNING, 10, None) == ([], None)


async def test_list_jobs_refuses_a_cursor_it_did_not_make(queue: JobQueue) -> None:
    """A malformed cursor is JobFieldInvalid (703) naming the cursor, not a crash."""
    for bad in ("%%%", "bm90IGEgY3Vyc29y", ""):
        with pytest.raises(errors.JobFieldInvalid, match=r"^cursor: "):
            await queue.list_jobs(None, 10, bad)


async def test_list_jobs_forgets_pruned_jobs(queue: JobQueue) -> None:
    """A pruned job leaves the listing (all jobs and its state's)."""
    old, kept = record(), record()
    await queue.put(old, b"x", max_active=10)
    await queue.complete(old.id)
    await asyncio.sleep(0.05)
    await queue.put(kept, b"x", max_active=10)
    assert await queue.prune(older_than_s=0.01) == 1
    assert [j.id for j in (await queue.list_jobs(None, 10, None))[0]] == [kept.id]
    assert await queue.list_jobs(State.DONE, 10, None) == ([], None)


async def test_list_jobs_filters_by_key_with_state_and_pages(queue: JobQueue) -> None:
    """list_jobs(key=): only that key's jobs, newest first, across pages, with a state
    filter too; the key round-trips on the record; a pruned job leaves its key's list."""
    base = time.time()
    mine = [record(created_at=base + i, key="alice") for i in range(5)]
    theirs = [record(created_at=base + i + 0.5, key="bob") for i in range(3)]
    keyless = record(created_at=base + 10)
    for job in mine + theirs + [keyless]:
        await queue.put(job, b"x", max_active=100)
    await queue.fail(mine[1].id, 202, "x")
    await queue.fail(mine[3].id, 202, "x")
    await queue.fail(theirs[2].id, 202, "x")

    seen: list[str] = []
    cursor: str | None = None
    while True:
        page, cursor = await queue.list_jobs(None, 2, cursor, key="alice")
        seen += [job.id for job in page]
        assert all(job.key == "alice" for job in page)
        if cursor is None:
            break
    assert seen == [job.id for job in reversed(mine)]
    failed, cursor = await queue.list_jobs(State.FAILED, 10, None, key="alice")
    assert [j.id for j in failed] == [mine[3].id, mine[1].id] and cursor is None
    first, cursor = await queue.list_jobs(State.FAILED, 1, None, key="alice")
    assert [j.id for j in first] == [mine[3].id] and cursor is not None
    assert [j.id for j in (await queue.list_jobs(State.FAILED, 1, cursor, key="alice"))[0]] == [
        mine[1].id
    ]
    assert [j.id for j in (await queue.list_jobs(None, 10, None, key="bob"))[0]] == [
        j.id for j in reversed(theirs)
    ]
    assert await queue.list_jobs(None, 10, None, key="carol") == ([], None)
    assert len((await queue.list_jobs(None, 20, None))[0]) == 9  # no key: every job
    stored = await queue.get(mine[0].id)
    assert stored is not None and stored.key == "alice"
    again = await queue.get(keyless.id)
    assert again is not None and again.key is None

    await asyncio.sleep(0.05)
    assert await queue.prune(older_than_s=0.01) == 3
    assert [j.id for j in (await queue.list_jobs(None, 10, None, key="bob"))[0]] == [
        theirs[1].id,
        theirs[0].id,
    ]
    assert await queue.list_jobs(State.FAILED, 10, None, key="alice") == ([], None)
    if isinstance(queue, RedisQueue):  # the index entries went with the records
        async with queue._redis_call() as r:
            assert await r.zcard(queue._by_key_key("alice")) == 3
            assert await r.zcard(queue._by_key_key("bob")) == 2


async def test_change_feed_has_every_put_and_state_change_in_order(queue: JobQueue) -> None:
    """changes(): one Change per put and per state change, oldest first, resumable
    after any id; change_cursor() is the newest id."""
    assert await queue.change_cursor() is None
    assert await queue.changes(None, 10) == []
    job, other = record(), record()
    await queue.put(job, b"x", max_active=10)

    async def handler(delivered: JobRecord) -> None:
        await queue.complete(delivered.id)

    stopping, task = await consuming(queue, handler, concurrency=1)
    await wait_state(queue, job.id, State.DONE)
    await stop(stopping, task)
    await queue.put(other, b"x", max_active=10)
    await queue.cancel(other.id)

    feed = await queue.changes(None, 100)
    assert [(c.job_id, c.state) for c in feed] == [
        (job.id, State.QUEUED),
        (job.id, State.RUNNING),
        (job.id, State.DONE),
        (other.id, State.QUEUED),
        (other.id, State.CANCELLED),
    ]
    assert all(abs(c.at - time.time()) < 60 for c in feed)
    assert len({c.id for c in feed}) == 5
    assert await queue.change_cursor() == feed[-1].id
    assert [c.id for c in await queue.changes(feed[1].id, 2)] == [feed[2].id, feed[3].id]
    assert await queue.changes(feed[-1].id, 10) == []


async def test_change_feed_refuses_an_id_it_did_not_make(queue: JobQueue) -> None:
    """A malformed Last-Event-ID is JobFieldInvalid naming the header."""
    for bad in ("abc", "1-x", "-1", " 1"):
        with pytest.raises(errors.JobFieldInvalid, match=r"^Last-Event-ID: "):
            await queue.changes(bad, 10)


async def test_change_feed_keeps_at_least_keep_changes(make_queue: QueueFactory) -> None:
    """After prune the feed still holds (at least) the newest keep_changes changes."""
    queue = make_queue(keep_changes=5)
    for _ in range(30):
        await queue.put(record(), b"x", max_active=100)
    newest = await queue.change_cursor()
    await queue.prune(older_than_s=3600)
    feed = await queue.changes(None, 1000)
    assert 5 <= len(feed) <= 30
    assert feed[-1].id == newest


async def test_sqlite_prune_trims_the_change_feed_to_keep_changes(tmp_path: Path) -> None:
    """The embedded feed is trimmed to exactly keep_changes; ids keep counting up."""
    from imgserve.queue.sqlite import SQLiteQueue

    queue = SQLiteQueue(tmp_path / "jobs.db", keep_changes=5)
    try:
        for _ in range(12):
            await queue.put(record(), b"x", max_active=100)
        await queue.prune(older_than_s=3600)
        feed = await queue.changes(None, 100)
        assert [c.id for c in feed] == [str(n) for n in range(8, 13)]
        await queue.put(record(), b"x", max_active=100)
        assert await queue.change_cursor() == "13"
    finally:
        await queue.close()


async def test_idempotency_key_reserve_finish_release(queue: JobQueue) -> None:
    """reserve_key: None when free, then what the key holds (fingerprint, reply once
    finished); release_key frees it."""
    assert await queue.reserve_key("k1", "fp-a", 60.0) is None
    assert await queue.reserve_key("k1", "fp-b", 60.0) == KeyEntry("fp-a", None)
    reply = {"status": 200, "headers": {"Location": "/jobs/x"}, "body": {"id": "x", "a": []}}
    await queue.finish_key("k1", reply, 60.0)
    assert await queue.reserve_key("k1", "fp-a", 60.0) == KeyEntry("fp-a", reply)
    assert await queue.reserve_key("k2", "fp-a", 60.0) is None
    await queue.release_key("k2")
    assert await queue.reserve_key("k2", "fp-c", 60.0) is None
    assert await queue.reserve_key("k2", "fp-a", 60.0) == KeyEntry("fp-c", None)


async def test_an_expired_idempotency_key_is_free_again(queue: JobQueue) -> None:
    """A key past its ttl (reserved or finished) can be taken again; prune drops it."""
    assert await queue.reserve_key("short", "fp-a", 0.2) is None
    await queue.finish_key("short", {"status": 200, "headers": {}, "body": {}}, 0.2)
    deadline = time.monotonic() + 10
    while await queue.reserve_key("short", "fp-b", 60.0) is not None:
        assert time.monotonic() < deadline, "the key never expired"
        await asyncio.sleep(0.02)
    assert await queue.reserve_key("short", "fp-c", 60.0) == KeyEntry("fp-b", None)


async def test_concurrent_reserves_of_one_key_take_it_once(make_queue: QueueFactory) -> None:
    """20 concurrent reserve_key calls for one key on four queue objects: exactly one
    gets None, every other sees the winner's fingerprint."""
    nodes = [make_queue() for _ in range(4)]
    results = await asyncio.gather(
        *(nodes[i % 4].reserve_key("same", f"fp-{i}", 60.0) for i in range(20))
    )
    winners = [i for i, found in enumerate(results) if found is None]
    assert len(winners) == 1
    assert {found.fingerprint for found in results if found is not None} == {f"fp-{winners[0]}"}


async def test_interactive_jobs_run_before_batch_jobs_that_came_first(queue: JobQueue) -> None:
    """With one job at a time, 5 batch jobs then 2 interactive: both interactive ones
    run before the remaining batch ones (the first batch job may already be running),
    each lane first in, first out."""
    batch = [record(priority="batch") for _ in range(5)]
    interactive = [record() for _ in range(2)]
    order: list[str] = []
    hold = asyncio.Event()

    async def handler(delivered: JobRecord) -> None:
        order.append(delivered.id)
        await hold.wait()
        await queue.complete(delivered.id)

    stopping, task = await consuming(queue, handler, concurrency=1)
    for job in batch + interactive:
        await queue.put(job, b"x", max_active=100)
        await asyncio.sleep(0.01)
    hold.set()
    await wait_state(queue, batch[-1].id, State.DONE)
    await stop(stopping, task)
    first = 1 if order[0] == batch[0].id else 0
    assert order[first : first + 2] == [job.id for job in interactive]
    assert [i for i in order if i not in {j.id for j in interactive}] == [j.id for j in batch]


async def test_an_interactive_retry_keeps_its_lane(queue: JobQueue) -> None:
    """An interactive job waiting for a retry, once due, runs before batch jobs
    queued long before it."""
    urgent = record()
    batch = [record(priority="batch") for _ in range(3)]
    order: list[tuple[str, int]] = []

    async def handler(delivered: JobRecord) -> None:
        order.append((delivered.id, delivered.attempts))
        if delivered.id == urgent.id and delivered.attempts == 1:
            await queue.retry(delivered.id, 0.2, 501, "upload failed")
            return
        if delivered.id != urgent.id:
            await asyncio.sleep(0.5)  # a long batch job: the retry comes due meanwhile
        await queue.complete(delivered.id)

    await queue.put(urgent, b"x", max_active=100)
    for job in batch:
        await asyncio.sleep(0.01)
        await queue.put(job, b"x", max_active=100)
    stopping, task = await consuming(queue, handler, concurrency=1)
    await wait_state(queue, batch[-1].id, State.DONE)
    await stop(stopping, task)
    assert order[:3] == [(urgent.id, 1), (batch[0].id, 1), (urgent.id, 2)]


async def test_sqlite_database_of_the_previous_release_opens_and_works(tmp_path: Path) -> None:
    """A jobs.db written by 0.3 before #13 (no priority column, no events, changes or
    key tables) opens, keeps its queued job, and everything new works on it."""
    import json
    import sqlite3

    from imgserve.queue.sqlite import SQLiteQueue

    old = record()
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        db.executescript(_PREVIOUS_SCHEMA)
        stored = old.to_dict()
        del stored["priority"], stored["key"]  # the previous release's record had neither
        db.execute(
            "INSERT INTO jobs (id, state, record, run_at, created_at) VALUES (?,?,?,?,?)",
            (old.id, "queued", json.dumps(stored), 0.0, old.created_at),
        )
    queue = SQLiteQueue(tmp_path / "jobs.db")
    try:
        assert (await queue.counts())["queued"] == 1
        claimed = await queue.claim()
        assert claimed is not None and claimed.id == old.id
        assert claimed.priority == "interactive"
        await queue.complete(old.id, event=event(old.id))
        assert len(await queue.job_events(old.id)) == 1
        assert [c.state for c in await queue.changes(None, 10)] == [State.RUNNING, State.DONE]
        assert [j.id for j in (await queue.list_jobs(State.DONE, 5, None))[0]] == [old.id]
        assert await queue.list_jobs(None, 5, None, key="alice") == ([], None)
        keyed = record(key="alice")
        await queue.put(keyed, b"x", max_active=10)
        assert [j.id for j in (await queue.list_jobs(None, 5, None, key="alice"))[0]] == [keyed.id]
        assert await queue.reserve_key("k", "fp", 60.0) is None
    finally:
        await queue.close()


# The schema the release before #13 created (src/imgserve/queue/sqlite.py at 792575d).
_PREVIOUS_SCHEMA = """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY, state TEXT NOT NULL, record TEXT NOT NULL, run_at REAL NOT NULL,
    created_at REAL NOT NULL, finished_at REAL, lease_until REAL
);
CREATE INDEX jobs_due ON jobs (state, run_at);
CREATE INDEX jobs_finished ON jobs (finished_at);
CREATE TABLE state_counts (state TEXT PRIMARY KEY, n INTEGER NOT NULL);
CREATE TRIGGER jobs_insert AFTER INSERT ON jobs BEGIN
    INSERT INTO state_counts VALUES (new.state, 1) ON CONFLICT (state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER jobs_delete AFTER DELETE ON jobs BEGIN
    UPDATE state_counts SET n = n - 1 WHERE state = old.state;
END;
CREATE TRIGGER jobs_state AFTER UPDATE OF state ON jobs WHEN old.state <> new.state BEGIN
    UPDATE state_counts SET n = n - 1 WHERE state = old.state;
    INSERT INTO state_counts VALUES (new.state, 1) ON CONFLICT (state) DO UPDATE SET n = n + 1;
END;
"""

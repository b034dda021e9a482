"""One contract suite for every job queue backend (embedded SQLite, Redis)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
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


async def test_put_claim_complete(queue: JobQueue) -> None:
    """A job put is claimed once (running, attempt 1), then completes as done."""
    job = record()
    await queue.put(job, max_active=10)
    assert (await queue.get(job.id)).state is State.QUEUED  # type: ignore[union-attr]
    claimed = await queue.claim()
    assert claimed is not None and claimed.id == job.id
    assert claimed.state is State.RUNNING and claimed.attempts == 1
    assert await queue.claim() is None
    await queue.complete(job.id)
    done = await queue.get(job.id)
    assert done is not None and done.state is State.DONE and done.finished_at is not None
    assert (await queue.counts())["done"] == 1


async def test_order_is_first_in_first_out(queue: JobQueue) -> None:
    """Due jobs are claimed in the order they were accepted."""
    first, second = record(created_at=time.time() - 1), record()
    await queue.put(first, max_active=10)
    await queue.put(second, max_active=10)
    assert [(await queue.claim()).id, (await queue.claim()).id] == [first.id, second.id]  # type: ignore[union-attr]


async def test_full_queue_refuses(queue: JobQueue) -> None:
    """put raises QueueFull once max_active jobs are unfinished."""
    await queue.put(record(), max_active=2)
    await queue.put(record(), max_active=2)
    with pytest.raises(errors.QueueFull):
        await queue.put(record(), max_active=2)
    assert (await queue.counts())["queued"] == 2


async def test_retry_waits_for_its_delay(queue: JobQueue) -> None:
    """A retried job keeps its error and is not due before its delay."""
    job = record()
    await queue.put(job, max_active=10)
    await queue.claim()
    await queue.retry(job.id, 0.4, 501, "upload failed")
    stored = await queue.get(job.id)
    assert stored is not None and stored.state is State.QUEUED and stored.error_code == 501
    assert await queue.claim() is None
    due = await queue.next_due_in()
    assert due is not None and 0 < due <= 0.4
    await asyncio.sleep(0.45)
    again = await queue.claim()
    assert again is not None and again.attempts == 2


async def test_fail_records_the_error(queue: JobQueue) -> None:
    """fail is terminal and keeps the code and detail."""
    job = record()
    await queue.put(job, max_active=10)
    await queue.claim()
    await queue.fail(job.id, 202, "truncated")
    stored = await queue.get(job.id)
    assert stored is not None and stored.state is State.FAILED
    assert (stored.error_code, stored.error_detail) == (202, "truncated")
    assert await queue.claim() is None


async def test_recover_hands_back_running_jobs(queue: JobQueue) -> None:
    """A job left running by a runner that died is queued again by recover."""
    job = record()
    await queue.put(job, max_active=10)
    await queue.claim()
    assert await queue.recover(stale_after_s=0.0) == 1
    again = await queue.claim()
    assert again is not None and again.id == job.id and again.attempts == 2


async def test_prune_removes_old_finished_jobs_only(queue: JobQueue) -> None:
    """prune deletes finished jobs past the keep time and leaves unfinished ones."""
    done, waiting = record(), record()
    await queue.put(done, max_active=10)
    await queue.claim()
    await queue.complete(done.id)
    await queue.put(waiting, max_active=10)
    await asyncio.sleep(0.05)
    assert await queue.prune(older_than_s=0.01) == 1
    assert await queue.get(done.id) is None
    assert await queue.get(waiting.id) is not None


async def test_unknown_job(queue: JobQueue) -> None:
    """get of an unknown id is None; finishing it is JobNotFound."""
    assert await queue.get("missing") is None
    with pytest.raises(errors.JobNotFound):
        await queue.complete("missing")

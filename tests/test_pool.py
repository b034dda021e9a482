"""The worker pool (real forkserver workers): set-up, and every wait ending."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pyvips

from imgserve import errors
from imgserve.config import ImagingLimits, WorkerSettings
from imgserve.pool import MALLOC_ENV, ImagePool
from imgserve.supervised import NoAnswer


def _probe() -> tuple[int, int, int, dict[str, str]]:
    malloc = {name: os.environ.get(name, "") for name in MALLOC_ENV}
    return os.nice(0), pyvips.concurrency_get(), os.sched_getscheduler(0), malloc


@pytest.fixture
def pool() -> Iterator[ImagePool]:
    pool = ImagePool(WorkerSettings(workers=1, nice=7, threads=3), ImagingLimits())
    yield pool
    pool.close()


def test_workers_run_as_batch_work_at_the_configured_nice_and_libvips_threads(
    pool: ImagePool,
) -> None:
    niceness, threads, policy, malloc = pool.processes.pebble.schedule(_probe).result(timeout=60)
    assert niceness == os.nice(0) + 7
    assert threads == 3
    assert policy == os.SCHED_BATCH
    assert malloc == {name: os.environ.get(name, value) for name, value in MALLOC_ENV.items()}


def test_default_is_one_libvips_thread_per_worker() -> None:
    assert WorkerSettings().threads == 1


def _plan() -> dict[str, Any]:
    """A plan for a 40x30 JPEG thumbnail of a 400x300 JPEG source."""
    return {
        "operation": "resize",
        "source_format": "jpeg",
        "source": [400, 300],
        "pages": 1,
        "result": [40, 30],
        "output": "jpeg",
        "dst_url": "file:///tmp/x.jpg",
    }


@pytest.fixture
def fifo(tmp_path: Path) -> str:
    """A source path whose open() blocks for ever: its worker hangs on it."""
    path = tmp_path / "never.jpg"
    os.mkfifo(path)
    return str(path)


def _worker_blocked_on(pool: ImagePool, path: str, timeout_s: float = 30.0) -> int:
    """The pid of the worker stuck opening ``path`` (waits until one is)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for pid in pool.processes.pids():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/wchan").read_text() == "wait_for_partner":
                    return int(pid)
        time.sleep(0.02)
    raise AssertionError("no worker ever opened the source")


async def test_an_answer_that_never_comes_fails_the_job_retryably() -> None:
    """If pebble never resolves a running task (its answer lost), the wait still ends
    at the job timeout plus the grace (render reports it as a retryable 610)."""
    pool = ImagePool(WorkerSettings(workers=1, job_timeout_s=0.5), ImagingLimits(),
                     answer_grace_s=0.5)  # fmt: skip
    try:
        never: concurrent.futures.Future[bytes] = concurrent.futures.Future()
        never.set_running_or_notify_cancel()  # started, and then nothing
        started = time.monotonic()
        with pytest.raises(NoAnswer):
            await asyncio.wait_for(pool.processes.answer(never, pool.processes.pebble), 30)
        assert time.monotonic() - started >= 1.0
        assert errors.WorkerUnresponsive.retryable
    finally:
        pool.close(timeout_s=1.0)


async def test_time_queued_inside_pebble_is_not_charged_to_the_render(tmp_path: Path) -> None:
    """A render that waits in pebble's queue behind another gets its whole timeout
    once it starts: the deadline runs from its start, not from scheduling."""
    pool = ImagePool(WorkerSettings(workers=1, job_timeout_s=2.0), ImagingLimits(),
                     answer_grace_s=0.2)  # fmt: skip
    source = bytes(pyvips.Image.black(400, 300, bands=3).jpegsave_buffer())
    first, second = tmp_path / "first.jpg", tmp_path / "second.jpg"
    os.mkfifo(first)
    os.mkfifo(second)

    def feed(path: Path) -> None:
        """Write the source once a worker has the FIFO open for reading (10 s at most)."""
        deadline = time.monotonic() + 10
        while True:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:  # ENXIO: no reader yet
                assert time.monotonic() < deadline, f"no worker ever read {path.name}"
                time.sleep(0.01)
        os.set_blocking(fd, True)
        with os.fdopen(fd, "wb") as fifo:
            fifo.write(source)

    try:
        renders = [asyncio.create_task(pool.render(str(p), _plan())) for p in (first, second)]
        await asyncio.sleep(1.5)  # the first source takes 1.5 s of its 2 s to arrive
        await asyncio.to_thread(feed, first)
        await asyncio.sleep(1.5)  # so does the second, which started only now
        await asyncio.to_thread(feed, second)
        for render in renders:  # 3 s after both were scheduled: past 2 s + 0.2 s
            result = await asyncio.wait_for(render, 30)
            assert pyvips.Image.new_from_buffer(result[0].data, "").width == 40
    finally:
        pool.close(timeout_s=1.0)


async def test_renders_waiting_on_a_broken_pool_fail_retryably_and_the_next_runs(
    fifo: str,
) -> None:
    """When the pool stops answering mid-job, every render it holds (running or queued
    inside pebble) fails at once as a retryable 603; a new pool takes the next job."""
    pool = ImagePool(WorkerSettings(workers=1, job_timeout_s=60.0), ImagingLimits())
    try:
        running = asyncio.create_task(pool.render(fifo, _plan()))
        queued = asyncio.create_task(pool.render(fifo, _plan()))
        await asyncio.to_thread(_worker_blocked_on, pool, fifo)
        broken = pool.processes.pebble
        broken.stop()  # what pebble's own failure looks like from outside: not active
        for task in (running, queued):
            with pytest.raises(errors.WorkerCrashed) as caught:
                await asyncio.wait_for(task, 10)
            assert caught.value.retryable
        assert pool.processes.pebble is not broken and pool.processes.replacements == 1
        source = pyvips.Image.black(400, 300, bands=3).jpegsave_buffer()
        result = await asyncio.wait_for(pool.render(bytes(source), _plan()), 60)
        assert pyvips.Image.new_from_buffer(result[0].data, "").width == 40
    finally:
        with contextlib.suppress(OSError):  # let a worker stuck in open() go
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        pool.close(timeout_s=1.0)

"""The worker pool's processes are set up as configured (real forkserver workers)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import pyvips

from imgserve.config import ImagingLimits, WorkerSettings
from imgserve.pool import MALLOC_ENV, ImagePool


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
    niceness, threads, policy, malloc = pool._pool.schedule(_probe).result(timeout=60)
    assert niceness == os.nice(0) + 7
    assert threads == 3
    assert policy == os.SCHED_BATCH
    assert malloc == {name: os.environ.get(name, value) for name, value in MALLOC_ENV.items()}


def test_default_is_one_libvips_thread_per_worker() -> None:
    assert WorkerSettings().threads == 1

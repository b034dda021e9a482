"""The dashboard's history buffer (imgserve.ui.history): samples kept, throughput
between samples, the ring's size, and the sampler over a real SQLite queue and
a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path
from typing import Any

import pytest

from imgserve import errors
from imgserve.queue import open_queue
from imgserve.queue.base import JobRecord, State
from imgserve.ui.history import History, sample_forever


def counts(**given: int) -> dict[str, int]:
    return {"queued": 0, "running": 0, "done": 0, "failed": 0, "cancelled": 0, **given}


@pytest.mark.parametrize(
    ("totals", "done_since", "failed_since"),
    [
        ([counts(done=3)], [None], [None]),
        ([counts(done=3), counts(done=5, failed=1)], [None, 2], [None, 1]),
        # Pruned between samples: the counts fall, which is no negative throughput.
        ([counts(done=9, failed=4), counts(done=2, failed=4)], [None, 0], [None, 0]),
        ([counts(done=1), counts(done=1), counts(done=4)], [None, 0, 3], [None, 0, 0]),
    ],
)
def test_throughput_is_the_growth_of_done_and_failed(
    totals: list[dict[str, int]], done_since: list[int | None], failed_since: list[int | None]
) -> None:
    """Each sample says how many jobs ended done and failed since the one before."""
    history = History(size=10, interval_s=10.0)
    for at, sample in enumerate(totals):
        history.add(float(at), sample)
    view = history.view()
    assert view["intervalS"] == 10.0
    assert [s["doneSince"] for s in view["samples"]] == done_since
    assert [s["failedSince"] for s in view["samples"]] == failed_since
    assert [s["done"] for s in view["samples"]] == [t["done"] for t in totals]


def test_the_ring_keeps_the_newest_samples_and_every_state() -> None:
    """Past its size the oldest samples go; a state the queue did not report reads 0."""
    history = History(size=3)
    for at in range(5):
        history.add(float(at), {"queued": at})
    samples = history.view()["samples"]
    assert [s["at"] for s in samples] == [2.0, 3.0, 4.0]
    assert samples[0] == {
        "at": 2.0,
        "queued": 2,
        "running": 0,
        "done": 0,
        "failed": 0,
        "cancelled": 0,
        "doneSince": None,
        "failedSince": None,
    }


async def _until(condition: Any, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_sampler_reads_the_queue_counts_at_once_and_then_on_its_interval(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """In both queue modes the first sample is taken when sampling starts (the page
    has data at once), the next ones every interval, each with the queue's counts."""
    url = None
    if backend == "redis":
        url = f"{request.getfixturevalue('redis_url')}?prefix=test-{uuid.uuid4().hex}"
    queue = open_queue(url, tmp_path)
    try:
        job = JobRecord(id=uuid.uuid4().hex, job={}, plan={}, dst_url="file:///x")
        await queue.put(job, b"", max_active=10)
        history = History(size=10, interval_s=0.05)
        task = asyncio.create_task(sample_forever(history, queue.counts))
        await _until(lambda: len(history) >= 3)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        samples = history.view()["samples"]
        assert [s["queued"] for s in samples[:3]] == [1, 1, 1]
        assert samples[1]["at"] - samples[0]["at"] >= 0.04
    finally:
        await queue.close()


async def test_a_queue_that_cannot_be_read_leaves_a_gap_and_sampling_goes_on() -> None:
    """A failed read adds no sample; the next read that works does."""
    calls = 0

    async def flaky_counts() -> dict[str, int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise errors.QueueUnavailable("Redis: connection refused")
        return counts(queued=calls)

    history = History(size=10, interval_s=0.01)
    task = asyncio.create_task(sample_forever(history, flaky_counts))
    await _until(lambda: len(history) >= 1)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert history.view()["samples"][0]["queued"] == 2


async def test_a_sample_is_stamped_when_its_counts_arrived_not_when_asked() -> None:
    """A slow read's sample carries the time its counts were read, not the time before."""
    now = [100.0]

    async def slow_counts() -> dict[str, int]:
        now[0] = 107.0  # the read took 7 s
        return counts(queued=1)

    history = History(size=10, interval_s=0.01)
    task = asyncio.create_task(sample_forever(history, slow_counts, clock=lambda: now[0]))
    await _until(lambda: len(history) >= 1)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert history.view()["samples"][0]["at"] == 107.0


async def test_a_read_that_hangs_is_given_up_and_sampling_goes_on() -> None:
    """A counts() that never answers is abandoned after the interval: the next read samples."""
    calls = 0
    hung = asyncio.Event()

    async def hanging_counts() -> dict[str, int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            hung.set()
            await asyncio.Event().wait()  # never answers
        return counts(queued=calls)

    history = History(size=10, interval_s=0.05)
    task = asyncio.create_task(sample_forever(history, hanging_counts))
    await _until(lambda: len(history) >= 1, timeout_s=2.0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert hung.is_set()
    assert history.view()["samples"][0]["queued"] == 2


def test_a_sample_has_a_count_for_every_job_state() -> None:
    """Every State the queue has is a field of each sample (the /ui/history schema
    requires each)."""
    history = History(size=1)
    history.add(0.0, {})
    assert set(history.view()["samples"][0]) >= {state.value for state in State}

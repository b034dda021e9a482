"""The dashboard's hour of history: a ring buffer of the queue's counts.

The API process samples ``JobQueue.counts()`` every ``SAMPLE_S`` and keeps the
last ``SAMPLES`` samples (an hour), so ``GET /ui/history`` has a chart's worth
of data the moment the page opens. The counts are the queue's, of every node,
in both queue modes; each API node keeps its own buffer of the same numbers.

Throughput is the growth of the ``done`` and ``failed`` counts from one sample
to the next. Pruning finished jobs (``keep_finished_s``) lowers those counts, so
a step in which jobs were pruned shows less than ran (never less than 0).

The buffer is pure; ``sample_forever`` is the one function here that waits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from imgserve import errors
from imgserve.queue.base import State

log = logging.getLogger("imgserve.ui")

SAMPLE_S = 10.0
SAMPLES = 360
"""An hour of samples, ``SAMPLE_S`` apart."""

STATES = tuple(state.value for state in State)
"""Every job state: the /ui/history schema requires a count of each."""


@dataclass(frozen=True)
class Sample:
    at: float
    """Unix time the counts were read."""
    counts: dict[str, int]
    """Jobs per state (``STATES``), as ``JobQueue.counts()`` gave them."""


class History:
    """The newest ``size`` samples, oldest first."""

    def __init__(self, size: int = SAMPLES, interval_s: float = SAMPLE_S) -> None:
        self.interval_s = interval_s
        self._samples: deque[Sample] = deque(maxlen=size)

    def add(self, at: float, counts: dict[str, int]) -> None:
        self._samples.append(Sample(at, {state: counts.get(state, 0) for state in STATES}))

    def __len__(self) -> int:
        return len(self._samples)

    def view(self) -> dict[str, Any]:
        """``GET /ui/history``: each sample's counts, and the jobs that ended done and
        failed since the sample before it (``null`` for the oldest, which has none)."""
        out: list[dict[str, Any]] = []
        before: Sample | None = None
        for sample in self._samples:
            item: dict[str, Any] = {"at": sample.at, **sample.counts}
            for state in ("done", "failed"):
                item[f"{state}Since"] = (
                    None if before is None else max(0, sample.counts[state] - before.counts[state])
                )
            out.append(item)
            before = sample
        return {"intervalS": self.interval_s, "samples": out}


async def sample_forever(
    history: History,
    counts: Callable[[], Awaitable[dict[str, int]]],
    clock: Callable[[], float] = time.time,
) -> None:
    """Add a sample at once, then every ``history.interval_s``, until cancelled. A
    queue that cannot be read, or does not answer within the interval, leaves a gap
    (the chart draws none across it). A sample is stamped when its counts arrived."""
    while True:
        try:
            async with asyncio.timeout(history.interval_s):
                got = await counts()
            history.add(clock(), got)
        except TimeoutError:
            log.debug("dashboard history: no sample: counts took over %s s", history.interval_s)
        except errors.ImgserveError as exc:
            log.debug("dashboard history: no sample: %s", exc.detail)
        except Exception:  # a bug here must not end the history (nor the app)
            log.exception("dashboard history: no sample")
        await asyncio.sleep(history.interval_s)

"""Load generators: closed-loop lanes for throughput, Poisson arrivals for latency.

Both run on one asyncio loop in the benchmark process. A closed loop keeps
``lanes`` requests in flight: each lane sends one, waits for it to finish, sends
the next. Jobs that finish inside ``[t0, t0 + measure_s]`` are counted; CPU
probes run at t0 and at the window's end. An open loop sends requests at
exponentially distributed intervals regardless of replies and times each reply
from its *scheduled* send time, so a stalled client or server cannot hide
latency (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

# One request: given its number, do it and return its output size in bytes
# (raise on failure).
Job = Callable[[int], Awaitable[int]]
Probe = Callable[[], None]


@dataclass
class ClosedResult:
    """Throughput of one closed-loop window."""

    completed: int
    """Jobs finished inside the window."""
    window_s: float
    started: int = 0
    finished: int = 0
    failed: int = 0
    out_bytes: int = 0
    errors: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    """How long each job counted in the window took, from its start to its end."""

    @property
    def per_s(self) -> float:
        return self.completed / self.window_s if self.window_s else 0.0


@dataclass
class OpenResult:
    """Reply latencies of one open-loop run."""

    rate_per_s: float
    duration_s: float
    latencies_s: list[float] = field(default_factory=list)
    sent: int = 0
    finished: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


def _note(errors: list[str], exc: BaseException) -> None:
    if len(errors) < 5:
        errors.append(f"{type(exc).__name__}: {exc}"[:300])


async def closed_loop(
    job: Job,
    lanes: int,
    warmup_s: float,
    measure_s: float,
    on_window_start: Probe | None = None,
    on_window_end: Probe | None = None,
    drain_timeout_s: float = 120.0,
    min_completed: int = 0,
) -> ClosedResult:
    """Run ``lanes`` lanes of ``job`` until the window closes, then let them drain.
    ``min_completed``: the window stays open (up to ``drain_timeout_s`` more) until
    that many jobs finished in it (the smoke run's 1 s window on a loaded machine
    may otherwise close before any job ends)."""
    loop = asyncio.get_running_loop()
    t0 = loop.time() + warmup_s
    t1 = t0 + measure_s
    result = ClosedResult(completed=0, window_s=measure_s)
    counter = iter(range(10**12))
    if on_window_start is not None:
        loop.call_at(t0, on_window_start)
    if on_window_end is not None:
        loop.call_at(t1, on_window_end)

    def counting(at: float) -> bool:
        return at <= t1 or (result.completed < min_completed and at <= t1 + drain_timeout_s)

    async def lane() -> None:
        while counting(loop.time()):
            index = next(counter)
            result.started += 1
            began = loop.time()
            try:
                size = await job(index)
            except Exception as exc:  # counted and reported, the run goes on
                result.failed += 1
                _note(result.errors, exc)
                continue
            result.finished += 1
            done = loop.time()
            if t0 <= done and counting(done):
                result.window_s = max(result.window_s, done - t0)
                result.completed += 1
                result.out_bytes += size
                result.latencies_s.append(done - began)

    tasks = [asyncio.create_task(lane()) for _ in range(lanes)]
    done, pending = await asyncio.wait(
        tasks, timeout=warmup_s + measure_s + drain_timeout_s * (2 if min_completed else 1)
    )
    for task in pending:
        task.cancel()
    for task in done:
        if task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    if pending:
        result.errors.append(f"{len(pending)} lanes still busy {drain_timeout_s:.0f} s after")
    return result


async def open_loop(
    send: Callable[[int], Awaitable[Any]],
    finish: Callable[[Any], Awaitable[None]],
    rate_per_s: float,
    duration_s: float,
    seed: int = 1,
    drain_timeout_s: float = 120.0,
) -> OpenResult:
    """Poisson arrivals of ``send`` at ``rate_per_s`` for ``duration_s``.

    The latency of ``send`` (the reply) is recorded; ``finish`` then follows the
    request to its end (for imgserve: waits for its result) off the clock.
    """
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    result = OpenResult(rate_per_s=rate_per_s, duration_s=duration_s)
    start = loop.time() + 0.05
    tasks: list[asyncio.Task[None]] = []

    async def one(index: int, scheduled: float) -> None:
        try:
            reply = await send(index)
            result.latencies_s.append(loop.time() - scheduled)
            await finish(reply)
            result.finished += 1
        except Exception as exc:  # counted and reported, the run goes on
            result.failed += 1
            _note(result.errors, exc)

    at = start
    index = 0
    while True:
        at += rng.expovariate(rate_per_s)
        if at - start > duration_s:
            break
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(index, at)))
        result.sent += 1
        index += 1
    if tasks:
        _done, pending = await asyncio.wait(tasks, timeout=drain_timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            result.errors.append(f"{len(pending)} requests unfinished after {drain_timeout_s} s")
    return result


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def session(keep_alive: bool, connections: int = 0) -> aiohttp.ClientSession:
    """A client session; without keep-alive each request opens a new connection."""
    connector = aiohttp.TCPConnector(limit=connections, force_close=not keep_alive)
    timeout = aiohttp.ClientTimeout(total=120)
    return aiohttp.ClientSession(connector=connector, timeout=timeout)


def now_s() -> float:
    return time.monotonic()

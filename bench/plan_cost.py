"""What planning out of the API process costs: ``python -m bench.plan_cost``.

For one JPEG, PNG and SVG of the benchmark's real sources (bench/images.py),
plans one job at a time, ``--rounds`` times, four ways:

- ``thread``: ``planning.plan`` + placeholder in a thread of this process (the
  API before planner.py);
- ``pipe``: in a planner process, the bytes pickled over pebble's pipe (what
  ``planner.Planner.plan`` does);
- ``shm``: in a planner process, the bytes copied into ``multiprocessing.shared_memory``
  and attached by name in the planner;
- ``file``: in a planner process, the bytes written to a file on tmpfs
  (/dev/shm) and read back by the planner.

Reports, per source and way, this process's CPU per job (user + system, every
thread: the event loop, pebble's threads) and the planner's, and the wall
latency (median, p95) of one plan. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import pebble
import psutil

from bench import images
from imgserve import planning
from imgserve.config import ImagingLimits
from imgserve.planner import _init_planner, _placeholder
from imgserve.planner import _plan as plan_in_planner
from imgserve.request import Job, validate

Planned = tuple[planning.JobPlan, tuple[bytes, ...]]
LIMITS = ImagingLimits()
# A tmpfs, so the file variant measures copies, not a disk.
FILE_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def _plan_here(job: Job, data: bytes, limits: ImagingLimits) -> Planned:
    plan = planning.plan(job, data, limits)
    return plan, (_placeholder(plan.result.width, plan.result.height, plan.output),)


def _plan_from_shm(job: Job, name: str, size: int, limits: ImagingLimits) -> Planned:
    block = shared_memory.SharedMemory(name=name)
    try:
        # Python < 3.13 registers an attached block with the resource tracker too.
        # Forkserver children share the parent's tracker, whose registry is a set:
        # unregistering here would make the parent's unlink fail in the tracker.
        data = bytes(block.buf[:size])
    finally:
        block.close()
    return plan_in_planner(job, data, limits)


def _plan_from_file(job: Job, path: str, limits: ImagingLimits) -> Planned:
    with open(path, "rb") as fh:
        data = fh.read()
    return plan_in_planner(job, data, limits)


class Ways:
    """The four ways, each an async ``(job, data) -> (plan, placeholder)``."""

    def __init__(self) -> None:
        self.pool = pebble.ProcessPool(
            max_workers=1,
            initializer=_init_planner,
            initargs=(2048, False),
            context=multiprocessing.get_context("forkserver"),
        )
        self.pool.schedule(os.getpid).result(timeout=60)

    def planner_pid(self) -> int:
        (pid,) = self.pool._pool_manager.worker_manager.workers
        return int(pid)

    async def _run(self, fn: Callable[..., Planned], *args: Any) -> Planned:
        result: Planned = await asyncio.wrap_future(self.pool.schedule(fn, args=args, timeout=30))
        return result

    async def thread(self, job: Job, data: bytes) -> Planned:
        return await asyncio.to_thread(_plan_here, job, data, LIMITS)

    async def pipe(self, job: Job, data: bytes) -> Planned:
        return await self._run(plan_in_planner, job, data, LIMITS)

    async def shm(self, job: Job, data: bytes) -> Planned:
        block = shared_memory.SharedMemory(create=True, size=len(data))
        try:
            block.buf[: len(data)] = data
            return await self._run(_plan_from_shm, job, block.name, len(data), LIMITS)
        finally:
            block.close()
            block.unlink()

    async def file(self, job: Job, data: bytes) -> Planned:
        fd, path = tempfile.mkstemp(dir=FILE_DIR, prefix="imgserve-plan-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            return await self._run(_plan_from_file, job, path, LIMITS)
        finally:
            os.unlink(path)

    def close(self) -> None:
        self.pool.stop()  # type: ignore[no-untyped-call]
        self.pool.join(timeout=5)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _measure(
    way: Callable[[Job, bytes], Awaitable[Planned]], job: Job, data: bytes, rounds: int, pid: int
) -> dict[str, float]:
    for _ in range(5):  # warm caches, lru placeholder, page cache
        await way(job, data)
    planner = psutil.Process(pid)
    walls: list[float] = []
    cpu0, child0 = _cpu_s(), sum(planner.cpu_times()[:2])
    for _ in range(rounds):
        started = time.perf_counter()
        await way(job, data)
        walls.append(time.perf_counter() - started)
    cpu1, child1 = _cpu_s(), sum(planner.cpu_times()[:2])
    walls.sort()
    return {
        "api_cpu_ms": (cpu1 - cpu0) / rounds * 1000,
        "planner_cpu_ms": (child1 - child0) / rounds * 1000,
        "wall_p50_ms": statistics.median(walls) * 1000,
        "wall_p95_ms": walls[int(0.95 * (len(walls) - 1))] * 1000,
    }


def _pick(sources: images.SourceSet, kind: images.SourceKind, near_bytes: int) -> str:
    names = sources.files[kind]
    return min(names, key=lambda n: abs((sources.root / n).stat().st_size - near_bytes))


def _job(kind: str, name: str) -> Job:
    operation = "rasterize" if kind == "svg" else "resize"
    args = {"width": 800} if kind == "svg" else {"width": 200, "height": 120}
    dst = "file:///out/{$basename}-{$width}.png" if kind != "jpeg" else "file:///out/{$width}.jpg"
    body = {"operationType": operation, "srcURL": f"http://src/{name}", "dstURL": dst, "args": args}
    return validate(body)


async def _main(rounds: int, out_dir: Path) -> None:
    sources = images.real(out_dir / "images")
    # The JPEG nearest the ~1.7 MB the load benchmark's jpeg workloads use; the median PNG and SVG.
    picks = {
        "jpeg": _pick(sources, "jpeg", 1_700_000),
        "png": sorted(sources.files["png"], key=lambda n: (sources.root / n).stat().st_size)[
            len(sources.files["png"]) // 2
        ],
        "svg": sorted(sources.files["svg"], key=lambda n: (sources.root / n).stat().st_size)[
            len(sources.files["svg"]) // 2
        ],
    }
    ways = Ways()
    try:
        print(
            "| source | bytes | way | API CPU ms/job | planner CPU ms/job | wall p50 ms "
            "| wall p95 ms |\n|---|---:|---|---:|---:|---:|---:|"
        )
        for kind, name in picks.items():
            data = sources.read(name)
            job = _job(kind, name)
            for label in ("thread", "pipe", "shm", "file"):
                way = getattr(ways, label)
                row = await _measure(way, job, data, rounds, ways.planner_pid())
                cells = [f"{kind} {name}", f"{len(data):,}", label]
                cells += [f"{row[k]:.2f}" for k in ("api_cpu_ms", "planner_cpu_ms")]
                cells += [f"{row[k]:.2f}" for k in ("wall_p50_ms", "wall_p95_ms")]
                print("| " + " | ".join(cells) + " |", flush=True)
    finally:
        ways.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args()
    asyncio.run(_main(args.rounds, args.out_dir))


if __name__ == "__main__":  # forkserver re-imports the main module
    main()

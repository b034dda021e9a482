"""The supervised pool of image worker processes (pebble).

Image work never runs on the API's event loop: each render goes to a worker
process started with forkserver (libvips must not be forked after use). pebble
replaces a worker that dies (segfault, OOM kill, SIGKILL) and kills one that
runs past the job deadline; both come back here as imgserve errors, so a dead
worker costs only its own job.

Every wait here has a deadline of its own: pebble's answer is awaited for at
most the job timeout plus ``ANSWER_GRACE_S`` (WorkerUnresponsive, retryable).
A pool pebble reports broken (a worker killed while it held the task channel)
is replaced, and every render still waiting on it fails at once as a
retryable WorkerCrashed instead of waiting for an answer that cannot come.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import resource
import signal
import threading
import time
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import pebble

from imgserve import errors
from imgserve.config import ImagingLimits, WorkerSettings

log = logging.getLogger("imgserve.pool")

# glibc malloc tuning for processes that decode images, one job after another:
# - MALLOC_ARENA_MAX: glibc gives each libvips thread its own arena; two per
#   process halve worker RSS at no measurable cost.
# - MALLOC_TOP_PAD_ / MALLOC_MMAP_THRESHOLD_: keep freed memory mapped (64 MiB
#   at the top of the heap; blocks under 32 MiB come from the heap, not mmap),
#   so each image reuses the last one's pages instead of faulting in ~8 MB of
#   fresh ones: 3-5 ms less kernel time per image, ~60 MB more RSS per worker.
MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "2",
    "MALLOC_TOP_PAD_": str(64 << 20),
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
}

# Fault injection for the test suite only: with this variable set, a source
# containing one of these markers makes its worker misbehave on purpose.
FAULT_ENV = "IMGSERVE_FAULT_INJECTION"
# SEGV: segfault; DELAY[=s]: sleep (2 s) then render; SLEEP: hang; HOG: allocate 64 GiB.


def _init_worker(memory_limit_mb: int, nice: int, threads: int) -> None:
    """Runs once in each new worker: memory cap, default signals, hardened libvips."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.nice(nice)  # replies wait on the API process: pixel work yields the CPU to it
    if hasattr(os, "SCHED_BATCH"):  # Linux: CPU-bound, so longer slices, no wake-up preemption
        with contextlib.suppress(OSError):  # a sandbox may forbid it: only a little slower
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    if memory_limit_mb > 0:
        limit = memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from imgserve.imaging import vips  # hardens libvips before any job

    vips.set_threads(threads)


def _fault(data: bytes) -> None:
    tail = data[-64:]
    if not os.environ.get(FAULT_ENV) or b"IMGSERVE-FAULT-" not in tail:
        return
    if b"IMGSERVE-FAULT-SEGV" in tail:
        os.kill(os.getpid(), signal.SIGSEGV)
    elif b"IMGSERVE-FAULT-DELAY" in tail:
        _, _, seconds = tail.partition(b"IMGSERVE-FAULT-DELAY=")
        time.sleep(float(seconds.decode()) if seconds else 2.0)
    elif b"IMGSERVE-FAULT-SLEEP" in tail:
        time.sleep(3600.0)
    elif b"IMGSERVE-FAULT-HOG" in tail:
        bytearray(64 * 1024**3)


def _render(
    source: bytes | str, plan: dict[str, Any], limits: ImagingLimits, planned: bool
) -> bytes:
    """Worker-side entry point: render the plan from the source bytes, or from a
    spooled file read here (libvips still decodes from bytes only)."""
    from imgserve.imaging import pipeline

    if isinstance(source, str):
        with open(source, "rb") as fh:
            data = fh.read()
    else:
        data = source
    try:
        _fault(data)
        return pipeline.render(pipeline.Plan.from_dict(plan), data, limits, planned=planned)
    except MemoryError as exc:
        raise errors.WorkerMemoryExceeded("the worker ran out of memory") from exc
    except errors.ImgserveError as exc:
        if "out of memory" in exc.detail or "memory allocation" in exc.detail:
            raise errors.WorkerMemoryExceeded(exc.detail) from exc
        raise


ANSWER_GRACE_S = 5.0
"""How long past the job timeout a render waits for pebble (kill, replace, report)."""
_WATCH_S = 1.0
"""How often a waiting render checks that its pool is still alive."""


class ImagePool:
    """N worker processes; ``render`` is safe to await from the event loop."""

    def __init__(
        self,
        settings: WorkerSettings,
        limits: ImagingLimits,
        *,
        answer_grace_s: float = ANSWER_GRACE_S,
    ) -> None:
        self.settings = settings
        self.limits = limits
        self.answer_grace_s = answer_grace_s
        self.replacements = 0
        """Broken pools replaced since start."""
        # The forkserver (and so every worker) is exec'd with this environment.
        for name, value in MALLOC_ENV.items():
            os.environ.setdefault(name, value)
        self._pool = self._new_pool()

    def _new_pool(self) -> pebble.ProcessPool:
        pool = pebble.ProcessPool(
            max_workers=self.settings.workers,
            initializer=_init_worker,
            initargs=(self.settings.memory_limit_mb, self.settings.nice, self.settings.threads),
            context=multiprocessing.get_context("forkserver"),
        )
        # Start the workers now (pebble starts them on first use), so the first job
        # does not wait for them and /health counts them from the start.
        pool.schedule(os.getpid)
        return pool

    def _replace_broken_pool(self, broken: pebble.ProcessPool) -> None:
        """pebble cannot recover when an idle worker dies holding its channel lock
        (an OOM kill, a stray SIGKILL): start a fresh pool and stop the broken one."""
        if self._pool is broken:
            log.warning("worker pool broken (a worker died while idle); starting a new one")
            self._pool = self._new_pool()
            self.replacements += 1
            threading.Thread(target=broken.stop, daemon=True).start()

    async def render(
        self, source: bytes | str, plan: dict[str, Any], *, planned: bool = False
    ) -> bytes:
        """Render ``plan`` from ``source``: the bytes, or the path of a file holding them.

        ``planned``: the source is the queue's copy of the bytes the plan checked.
        """
        args = (source, plan, self.limits, planned)
        pool = self._pool
        try:
            future = pool.schedule(_render, args=args, timeout=self.settings.job_timeout_s)
        except RuntimeError:  # broken since the last job: one retry on a fresh pool
            self._replace_broken_pool(pool)
            pool = self._pool
            future = pool.schedule(_render, args=args, timeout=self.settings.job_timeout_s)
        try:
            return await self._answer(future, pool)
        except FutureTimeout as exc:
            raise errors.ProcessingTimeout(
                f"rendering took longer than {self.settings.job_timeout_s:g} s"
            ) from exc
        except pebble.ProcessExpired as exc:
            raise errors.WorkerCrashed(f"worker process died (exit code {exc.exitcode})") from exc
        except CancelledError as exc:
            raise errors.ShuttingDown("worker pool stopped before the job ran") from exc
        except MemoryError as exc:
            raise errors.WorkerMemoryExceeded("the worker ran out of memory") from exc
        except errors.ImgserveError:
            raise
        except RuntimeError as exc:  # BrokenProcessPool among them
            self._replace_broken_pool(pool)
            raise errors.WorkerCrashed(f"worker pool failed: {exc}") from exc
        except Exception as exc:
            raise errors.InternalError(f"worker error: {type(exc).__name__}: {exc}") from exc

    async def _answer(self, future: Any, pool: pebble.ProcessPool) -> bytes:
        """pebble's answer for ``future``, watched: never longer than the job timeout
        plus the grace, and not at all once its pool is broken or replaced."""
        loop = asyncio.get_running_loop()
        answer = asyncio.wrap_future(future)
        deadline = loop.time() + self.settings.job_timeout_s + self.answer_grace_s
        while True:
            left = deadline - loop.time()
            try:
                done, _ = await asyncio.wait({answer}, timeout=max(0.0, min(_WATCH_S, left)))
            except asyncio.CancelledError:
                answer.cancel()  # and so the pebble task, as a plain await would
                raise
            if done:
                return answer.result()  # type: ignore[no-any-return]
            if pool is self._pool and not pool.active:
                self._replace_broken_pool(pool)
            if pool is not self._pool:
                future.cancel()
                raise errors.WorkerCrashed("the worker pool broke and was replaced mid-job")
            if loop.time() >= deadline:
                future.cancel()
                raise errors.WorkerUnresponsive(
                    f"no answer from the worker pool within {self.settings.job_timeout_s:g} s "
                    f"+ {self.answer_grace_s:g} s"
                )

    def workers_alive(self) -> int:
        workers = getattr(getattr(self._pool, "_pool_manager", None), "worker_manager", None)
        processes = getattr(workers, "workers", None)
        if isinstance(processes, dict):
            return sum(1 for p in processes.values() if p.is_alive())
        return self.settings.workers

    def close(self, timeout_s: float = 5.0) -> None:
        """Let running renders finish for up to ``timeout_s``, then stop the workers."""
        self._pool.close()  # type: ignore[no-untyped-call]
        with contextlib.suppress(TimeoutError):
            self._pool.join(timeout=timeout_s)
        if self._pool.active:
            self._pool.stop()  # type: ignore[no-untyped-call]
            self._pool.join(timeout=timeout_s)

"""The supervised pool of image worker processes (pebble).

Image work never runs on the API's event loop: each render goes to a worker
process started with forkserver (libvips must not be forked after use). pebble
replaces a worker that dies (segfault, OOM kill, SIGKILL) and kills one that
runs past the job deadline; both come back here as imgserve errors, so a dead
worker costs only its own job.

Every wait here has a deadline of its own (supervised.py): a running render's
answer is awaited for at most the job timeout plus ``ANSWER_GRACE_S``
(WorkerUnresponsive, retryable). A pool pebble reports broken (a worker killed
while it held the task channel) is replaced, and every render still waiting on
it fails at once as a retryable WorkerCrashed instead of waiting for an answer
that cannot come.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pebble

from imgserve import errors
from imgserve.config import ImagingLimits, WorkerSettings
from imgserve.supervised import NoAnswer, PoolBroken, SupervisedPool, inject_fault

if TYPE_CHECKING:  # pyvips is imported in the worker processes only
    from imgserve.imaging.pipeline import Rendered

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
# SEGV, KILL, DELAY[=s], SLEEP, HOG: see supervised.inject_fault.


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
    if os.environ.get(FAULT_ENV):
        inject_fault(data, b"IMGSERVE-FAULT-")


@dataclass(frozen=True)
class Answer:
    """What a worker sends back for one job."""

    outputs: list[Rendered]
    vips_peak_bytes: int | None
    """The most memory libvips has held for pixels in that worker process so far."""


def _render(
    source: bytes | str, plan: dict[str, Any], limits: ImagingLimits, planned: bool
) -> Answer:
    """Worker-side entry point: render every output of the stored plan (in order, from
    one decode) from the source bytes, or from a spooled file read here (libvips
    still decodes from bytes only)."""
    from imgserve import planning
    from imgserve.imaging.vips import tracked_memory_bytes

    if isinstance(source, str):
        with open(source, "rb") as fh:
            data = fh.read()
    else:
        data = source
    try:
        _fault(data)
        job_plan = planning.JobPlan.from_dict(plan)
        outputs = planning.render_outputs(job_plan, data, limits, planned=planned)
    except MemoryError as exc:
        raise errors.WorkerMemoryExceeded("the worker ran out of memory") from exc
    except errors.ImgserveError as exc:
        if any(sign in exc.detail for sign in _OUT_OF_MEMORY):
            raise errors.WorkerMemoryExceeded(exc.detail) from exc
        raise
    memory = tracked_memory_bytes()
    return Answer(outputs, None if memory is None else memory[1])


# How libvips and its loaders say they ran out of memory (under RLIMIT_AS).
_OUT_OF_MEMORY = ("out of memory", "memory allocation", "Insufficient memory")

ANSWER_GRACE_S = 5.0
"""How long past the job timeout a running render waits for pebble (kill, report)."""


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
        self.vips_peak_bytes: int | None = None
        """The most pixel memory libvips has held in one worker process (as the
        workers report after each render); None before the first report."""
        # The forkserver (and so every worker) is exec'd with this environment.
        for name, value in MALLOC_ENV.items():
            os.environ.setdefault(name, value)
        self.processes = SupervisedPool(
            "worker",
            processes=settings.workers,
            initializer=_init_worker,
            initargs=(settings.memory_limit_mb, settings.nice, settings.threads),
            timeout_s=settings.job_timeout_s,
            grace_s=answer_grace_s,
        )

    async def render(
        self, source: bytes | str, plan: dict[str, Any], *, planned: bool = False
    ) -> list[Rendered]:
        """Render every output of the stored ``plan`` (JobPlan.to_dict()), in order, in
        one task, from ``source``: the bytes, or the path of a file holding them.

        ``planned``: the source is the queue's copy of the bytes the plan checked.
        """
        processes = self.processes
        pool = processes.pebble
        try:
            future, pool = processes.schedule(_render, (source, plan, self.limits, planned))
            answer: Answer = await processes.answer(future, pool)
        except FutureTimeout as exc:
            raise errors.ProcessingTimeout(
                f"rendering took longer than {self.settings.job_timeout_s:g} s"
            ) from exc
        except pebble.ProcessExpired as exc:
            raise errors.WorkerCrashed(f"worker process died (exit code {exc.exitcode})") from exc
        except PoolBroken as exc:
            raise errors.WorkerCrashed(str(exc)) from exc
        except NoAnswer as exc:
            raise errors.WorkerUnresponsive(str(exc)) from exc
        except MemoryError as exc:
            raise errors.WorkerMemoryExceeded("the worker ran out of memory") from exc
        except errors.ImgserveError:
            raise
        except RuntimeError as exc:  # BrokenProcessPool among them
            processes.replace(pool)
            raise errors.WorkerCrashed(f"worker pool failed: {exc}") from exc
        except Exception as exc:
            raise errors.InternalError(f"worker error: {type(exc).__name__}: {exc}") from exc
        if answer.vips_peak_bytes is not None:
            self.vips_peak_bytes = max(self.vips_peak_bytes or 0, answer.vips_peak_bytes)
        return answer.outputs

    def workers_alive(self) -> int:
        return len(self.processes.pids())

    def close(self, timeout_s: float = 5.0) -> None:
        """Let running renders finish for up to ``timeout_s``, then stop the workers."""
        self.processes.close(timeout_s)

"""Planning out of the API process: a small supervised pool of planner processes.

``planning.plan`` hands untrusted bytes to C loaders (libvips' header read,
librsvg, expat). Run in the API process, one loader crash would kill the API
and the embedded job runner with it. Here planning and the placeholder drawing
run in one or two pebble processes started by the forkserver (libvips is never
forked after use): a planner that dies (segfault, abort, OOM or other kill)
fails only the request it was planning (code 206) and pebble starts another; a
planner that spins past the deadline is killed (code 306). imgserve errors
raised in a planner (202, 204, 30x, ...) reach the caller unchanged.

Planners run at normal priority: the reply waits on them. The source bytes go
to the planner pickled over pebble's pipe; bench/plan_cost.py measured that
against shared memory and a tmpfs file (see bench/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import resource
import signal
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import pebble

from imgserve import errors, planning
from imgserve.config import ImagingLimits
from imgserve.imaging import pipeline
from imgserve.imaging.formats import Format
from imgserve.imaging.geometry import Size
from imgserve.pool import FAULT_ENV, MALLOC_ENV
from imgserve.spec import JobSpec
from imgserve.supervised import NoAnswer, SupervisedPool, inject_fault

log = logging.getLogger("imgserve.planner")

# What ps, top and the tests see as a planner's name (/proc/<pid>/comm, 15 bytes at most).
PROCESS_NAME = "imgserve-plan"
# The outer wait gets this much past pebble's own deadline: pebble's manager
# thread kills an overdue planner within a tick, but a wedged pool must not
# hang the reply.
GRACE_S = 2.0

# Fault injection for the test suite only: with IMGSERVE_FAULT_INJECTION set when
# the Planner is made, a source whose last 64 bytes hold one of these markers
# makes its planner misbehave. Apart from pool.py's markers, which act while
# rendering, so a test picks the stage that misbehaves:
# PLAN-SEGV: segfault; PLAN-KILL: SIGKILL (as the OOM killer does);
# PLAN-DELAY[=s]: sleep (2 s), then plan; PLAN-SLEEP: hang; PLAN-HOG: allocate 64 GiB.
_FAULT = b"IMGSERVE-FAULT-PLAN-"
_faults_enabled = False  # set in each planner by _init_planner


def _fault(data: bytes) -> None:
    if _faults_enabled:
        inject_fault(data, _FAULT)


def _init_planner(memory_limit_mb: int, faults: bool) -> None:
    """Runs once in each new planner: default signals, memory cap, name, libvips."""
    global _faults_enabled
    _faults_enabled = faults
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if memory_limit_mb > 0:
        limit = memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    with contextlib.suppress(OSError):  # only a name: ps and the tests tell planners apart
        Path("/proc/self/comm").write_text(PROCESS_NAME)
    from imgserve.imaging import vips  # hardens libvips before any source

    vips.set_threads(1)  # header reads and placeholders are small


@functools.lru_cache(maxsize=128)
def _placeholder(width: int, height: int, output: Format) -> bytes:
    return pipeline.placeholder(Size(width, height), output)


def _plan(
    spec: JobSpec, data: bytes, limits: ImagingLimits
) -> tuple[planning.JobPlan, tuple[bytes, ...]]:
    """Planner-side entry point: check the source and size the results, then draw
    each output's placeholder (none when the job skips them). Only imgserve errors
    leave: anything else may not unpickle in the parent, and pebble treats an
    unpicklable reply as a broken pool."""
    try:
        _fault(data)
        plan = planning.plan(spec, data, limits)
        if not spec.placeholder:
            return plan, ()
        return plan, tuple(
            _placeholder(r.plan.result.width, r.plan.result.height, r.plan.output)
            for r in plan.outputs
        )
    except errors.ImgserveError:
        raise
    except MemoryError as exc:
        raise errors.WorkerMemoryExceeded(
            "the planner ran out of memory reading the source header"
        ) from exc
    except Exception as exc:
        raise errors.InternalError(f"planning failed: {type(exc).__name__}: {exc}") from exc


class Planner:
    """``processes`` planner processes; ``plan`` is safe to await from the event loop."""

    def __init__(self, *, processes: int, timeout_s: float, memory_limit_mb: int) -> None:
        self.timeout_s = timeout_s
        # The forkserver (and so every planner) is exec'd with this environment.
        for name, value in MALLOC_ENV.items():
            os.environ.setdefault(name, value)
        self.processes = SupervisedPool(
            "planner",
            processes=processes,
            initializer=_init_planner,
            # Read here, not in the planner: the shared forkserver keeps the
            # environment of whichever pool started it first.
            initargs=(memory_limit_mb, bool(os.environ.get(FAULT_ENV))),
            timeout_s=timeout_s,
            grace_s=GRACE_S,
        )

    async def plan(
        self, spec: JobSpec, data: bytes, limits: ImagingLimits
    ) -> tuple[planning.JobPlan, tuple[bytes, ...]]:
        """Check ``data`` against ``spec`` and ``limits`` in a planner process; return
        the plan and each output's placeholder bytes, in the plan's order (none
        when ``spec.placeholder`` is false).

        A broken pool is replaced and the request tried once more on the fresh one
        (a pool breaks when any planner dies at the wrong moment, this request's or
        not); a planner that dies running this request fails only this request.
        Waiting for a free planner is bounded by the caller (the reply deadline).
        """
        processes = self.processes
        for attempt in (1, 2):
            pool = processes.pebble
            try:
                future, pool = processes.schedule(_plan, (spec, data, limits))
                return await processes.answer(future, pool)  # type: ignore[no-any-return]
            except (FutureTimeout, NoAnswer) as exc:  # pebble's deadline, or the outer one
                raise errors.ProcessingTimeout(
                    f"reading the source header and drawing the placeholders took longer than "
                    f"{self.timeout_s:g} s"
                ) from exc
            except pebble.ProcessExpired as exc:
                raise errors.LoaderCrashed(
                    f"the planner process died reading the source (exit code {exc.exitcode})"
                ) from exc
            except errors.ImgserveError:
                raise
            except RuntimeError as exc:  # PoolBroken, BrokenProcessPool, a broken schedule
                processes.replace(pool)
                if attempt == 2:
                    raise errors.LoaderCrashed(
                        f"the planner pool broke twice reading the source: {exc}"
                    ) from exc
            except Exception as exc:
                raise errors.InternalError(f"planner error: {type(exc).__name__}: {exc}") from exc
        raise AssertionError("unreachable: the second attempt returns or raises")

    def pids(self) -> set[int]:
        """The planner processes alive now."""
        return self.processes.pids()

    def alive(self) -> int:
        """How many planner processes are alive now (for /health)."""
        return len(self.pids())

    def close(self, timeout_s: float = 5.0) -> None:
        self.processes.close(timeout_s)

"""A pebble process pool kept alive: replaced when it breaks, every answer watched.

The image workers (pool.py) and the planners (planner.py) are both pebble
ProcessPools started by the forkserver (libvips is never forked after use).
This module owns what they share, so the two cannot drift apart:

- the processes start at once (pebble starts them on first use), so the first
  job does not wait for them and /health counts them from the start;
- a pool pebble reports broken (a process killed while it held the task channel,
  or one that died before its task was acknowledged) is replaced by a fresh one;
  scheduling on it retries once on the fresh pool;
- :meth:`SupervisedPool.answer` never waits open-ended. Once a task runs, its
  answer is awaited for at most ``timeout_s + grace_s`` (pebble kills a task at
  ``timeout_s``; the grace is for the kill and the report), then
  :class:`NoAnswer`. Time spent queued inside pebble is not charged to the task:
  its caller bounds that (the delivery deadline, the reply deadline). Every
  ``_WATCH_S`` it checks that its pool is alive; once the pool broke or was
  replaced, every task still waiting on it ends at once with :class:`PoolBroken`.

Callers map these, and pebble's own outcomes (``TimeoutError`` at ``timeout_s``,
``ProcessExpired``), to their imgserve errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import pebble

log = logging.getLogger("imgserve.pool")

_WATCH_S = 1.0
"""How often a waiting task checks that its pool is still alive."""


def inject_fault(data: bytes, prefix: bytes) -> None:
    """Fault injection for the test suite only (callers check that it is on): a
    source whose last 64 bytes hold ``prefix`` + SEGV (segfault), KILL (SIGKILL,
    as the OOM killer does), DELAY[=s] (sleep, 2 s by default, then go on), SLEEP
    (hang) or HOG (allocate 64 GiB) makes its process misbehave."""
    tail = data[-64:]
    if prefix not in tail:
        return
    if prefix + b"SEGV" in tail:
        os.kill(os.getpid(), signal.SIGSEGV)
    elif prefix + b"KILL" in tail:
        os.kill(os.getpid(), signal.SIGKILL)
    elif prefix + b"DELAY" in tail:
        _, _, seconds = tail.partition(prefix + b"DELAY=")
        time.sleep(float(seconds.decode()) if seconds else 2.0)
    elif prefix + b"SLEEP" in tail:
        time.sleep(3600.0)
    elif prefix + b"HOG" in tail:
        bytearray(64 * 1024**3)


class PoolBroken(RuntimeError):
    """The pool broke, or was replaced, while the task waited for its answer."""


class NoAnswer(Exception):
    """No answer within the timeout plus the grace after the task started."""


class SupervisedPool:
    """``processes`` forkserver processes, each set up by ``initializer(*initargs)``."""

    def __init__(
        self,
        name: str,
        *,
        processes: int,
        initializer: Callable[..., None],
        initargs: tuple[Any, ...],
        timeout_s: float,
        grace_s: float,
    ) -> None:
        self.name = name
        self.processes = processes
        self.timeout_s = timeout_s
        self.grace_s = grace_s
        self.replacements = 0
        """Broken pools replaced since start."""
        self._initializer = initializer
        self._initargs = initargs
        self.pebble = self._new_pool()
        """The pebble pool in use now."""

    def _new_pool(self) -> pebble.ProcessPool:
        pool = pebble.ProcessPool(
            max_workers=self.processes,
            initializer=self._initializer,
            initargs=self._initargs,
            context=multiprocessing.get_context("forkserver"),
        )
        pool.schedule(os.getpid)  # start the processes now
        return pool

    def replace(self, broken: pebble.ProcessPool) -> None:
        """Start a fresh pool in place of ``broken`` (once, however many callers saw
        it break) and stop the old one in the background."""
        if self.pebble is broken:
            log.warning("%s pool broken (a process died outside a task); starting a new one",
                        self.name)  # fmt: skip
            self.pebble = self._new_pool()
            self.replacements += 1
            threading.Thread(target=broken.stop, daemon=True).start()

    def schedule(
        self, function: Callable[..., Any], args: tuple[Any, ...]
    ) -> tuple[Future[Any], pebble.ProcessPool]:
        """Schedule ``function(*args)`` with pebble's timeout; (its future, its pool)."""
        pool = self.pebble
        try:
            return pool.schedule(function, args=args, timeout=self.timeout_s), pool
        except RuntimeError:  # broken since the last task: once more on a fresh pool
            self.replace(pool)
            pool = self.pebble
            return pool.schedule(function, args=args, timeout=self.timeout_s), pool

    async def answer(self, future: Future[Any], pool: pebble.ProcessPool) -> Any:
        """The task's result (or pebble's exception for it), watched as the module
        docstring says; cancelling the wait cancels the task."""
        loop = asyncio.get_running_loop()
        waiting = asyncio.wrap_future(future)
        deadline: float | None = None
        while True:
            if deadline is None and future.running():
                deadline = loop.time() + self.timeout_s + self.grace_s
            wait_s = (
                _WATCH_S if deadline is None else max(0.0, min(_WATCH_S, deadline - loop.time()))
            )
            try:
                done, _ = await asyncio.wait({waiting}, timeout=wait_s)
            except asyncio.CancelledError:
                waiting.cancel()  # and so the pebble task, as a plain await would
                raise
            if done:
                return waiting.result()
            if pool is self.pebble and not pool.active:
                self.replace(pool)
            if pool is not self.pebble:
                future.cancel()
                raise PoolBroken(f"the {self.name} pool broke and was replaced")
            if deadline is not None and loop.time() >= deadline:
                future.cancel()
                raise NoAnswer(
                    f"no answer from the {self.name} pool within {self.timeout_s:g} s "
                    f"+ {self.grace_s:g} s"
                )

    def pids(self) -> set[int]:
        """The processes alive now."""
        workers = getattr(getattr(self.pebble, "_pool_manager", None), "worker_manager", None)
        processes = getattr(workers, "workers", None)
        if not isinstance(processes, dict):
            return set()
        return {p.pid for p in list(processes.values()) if p.is_alive()}

    def close(self, timeout_s: float = 5.0) -> None:
        """Let running tasks finish for up to ``timeout_s``, then stop the processes."""
        pool = self.pebble
        pool.close()  # type: ignore[no-untyped-call]
        with contextlib.suppress(TimeoutError):  # still running: stopped below
            pool.join(timeout=timeout_s)
        if pool.active:
            pool.stop()  # type: ignore[no-untyped-call]
            pool.join(timeout=timeout_s)

"""Dedicated thread pools for the blocking transports (ftplib, boto3, file I/O).

The event loop's default executor also runs DNS lookups (aiohttp's
ThreadedResolver calls ``loop.getaddrinfo``) and other short blocking work;
a few slow FTP transfers there would stall every new request. Each blocking
transport therefore owns a :class:`BlockingExecutor` of its own size
(``TransportSettings.ftp_threads``, ``s3_threads``, ``file_threads``).

An operation's deadline starts when a thread picks it up, not when it is
submitted: waiting for a free thread is not charged to the per-operation
timeout (the caller bounds its total time separately, for instance with the
reply deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def _abandon_nothing() -> None:
    return None


class BlockingExecutor:
    """A sized thread pool whose operations get their timeout from the moment they start."""

    def __init__(self, name: str, threads: int) -> None:
        self.threads = max(1, threads)
        self._executor = ThreadPoolExecutor(
            max_workers=self.threads, thread_name_prefix=f"imgserve-{name}"
        )

    async def run(
        self,
        timeout_s: float,
        func: Callable[[float], T],
        *,
        grace_s: float = 0.0,
        abandon: Callable[[], None] = _abandon_nothing,
    ) -> T:
        """Run ``func(deadline)`` in a thread; ``deadline`` is ``timeout_s`` after it starts.

        ``func`` should stop by itself at ``deadline`` (a monotonic time). The
        caller waits ``grace_s`` longer, then raises TimeoutError; when it stops
        waiting for a running thread (that timeout, or cancellation),
        ``abandon()`` is called to unblock the thread (FTP shuts its sockets).
        """
        loop = asyncio.get_running_loop()
        started = asyncio.Event()

        def work() -> T:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(started.set)
            return func(time.monotonic() + timeout_s)

        future = loop.run_in_executor(self._executor, work)
        start_wait = asyncio.ensure_future(started.wait())
        try:
            # Queued: no deadline of ours (cancelling the future un-queues it).
            waiting: set[asyncio.Future[Any]] = {future, start_wait}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            async with asyncio.timeout(timeout_s + grace_s):
                return await asyncio.shield(future)
        except BaseException:
            if started.is_set() and not future.done():
                abandon()
            future.cancel()
            raise
        finally:
            start_wait.cancel()

    def close(self) -> None:
        """Drop queued work and let running operations end by their own deadlines."""
        self._executor.shutdown(wait=False, cancel_futures=True)

"""Admission before work: how many jobs the API checks at once, and how many source
bytes they may hold.

A job being checked (download, plan, placeholder upload) holds its source in
the API process's memory. :class:`Intake` admits at most ``max_jobs`` of them and
charges every downloaded chunk to a shared byte budget: a chunk that would take
the jobs past ``max_bytes`` stops its download with IntakeBusy (503, code 611),
unless its job is the only one holding bytes (one source up to the download
limit always fits, so a budget below it cannot refuse a job for ever).
Pure bookkeeping: no I/O, no asyncio; ``charge`` is thread-safe because the
blocking transports call it from their threads.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from imgserve import errors


class Intake:
    def __init__(self, max_jobs: int, max_bytes: int) -> None:
        self.max_jobs = max_jobs
        self.max_bytes = max_bytes
        self.jobs = 0
        """Jobs being checked now."""
        self.bytes = 0
        """Source bytes they hold."""
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def admit(self) -> Iterator[Admission]:
        """Admit one job for checking, or raise IntakeBusy; its bytes are freed at exit."""
        if self.jobs >= self.max_jobs:
            raise errors.IntakeBusy(f"{self.jobs} jobs being checked, the limit is {self.max_jobs}")
        if self.bytes >= self.max_bytes:
            raise errors.IntakeBusy(
                f"jobs being checked hold {self.bytes} bytes of sources, "
                f"the limit is {self.max_bytes}"
            )
        admission = Admission(self)
        self.jobs += 1
        try:
            yield admission
        finally:
            self.jobs -= 1
            admission.release()


class Admission:
    """One admitted job's share of the byte budget."""

    def __init__(self, intake: Intake) -> None:
        self._intake = intake
        self.bytes = 0

    def charge(self, size: int) -> None:
        """Count ``size`` more source bytes for this job, or raise IntakeBusy."""
        intake = self._intake
        with intake._lock:
            others = intake.bytes - self.bytes
            if others > 0 and intake.bytes + size > intake.max_bytes:
                raise errors.IntakeBusy(
                    f"jobs being checked would hold more than {intake.max_bytes} bytes of sources"
                )
            intake.bytes += size
            self.bytes += size

    def release(self) -> None:
        with self._intake._lock:
            self._intake.bytes -= self.bytes
            self.bytes = 0

"""The embedded queue's copy of each unfinished job's source: one file per job.

A job's file is ``<job id>.src``; it is fsync'd before the job is committed, so
a committed job always has its whole source. When a job ends, its file is not
deleted but renamed to ``free-<n>`` and written over by a later job: creating,
growing and deleting a file of a few MB for every job costs the kernel several
times what writing over one does (page-cache pages, blocks and inodes are
reused instead of freed and found again). Only a few files are kept that way,
and only small ones, so an idle daemon holds at most ``KEEP_FREE`` x
``KEEP_MAX_BYTES`` of disk.

Not thread-safe: the SQLite queue calls it from its one database thread.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

KEEP_FREE = 16
"""Files of finished jobs kept for reuse; more than that are deleted."""
KEEP_MAX_BYTES = 8 * 1024 * 1024
"""A larger file is deleted when its job ends (big sources are rare; disk is not free)."""

_SUFFIX = ".src"
_FREE = "free-"


class Spool:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._free: list[Path] = []
        self._made = False

    def path(self, job_id: str) -> Path:
        return self.directory / f"{job_id}{_SUFFIX}"

    def write(self, job_id: str, data: bytes) -> None:
        """Store ``data`` as the job's source; on return it survives a crash."""
        if not self._made:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._made = True
        tmp = self.directory / f"{job_id}.tmp"
        reused = False
        if self._free:
            os.rename(self._free.pop(), tmp)
            reused = True
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | (0 if reused else os.O_TRUNC), 0o600)
        try:
            with memoryview(data) as view:
                done = 0
                while done < len(view):
                    done += os.pwrite(fd, view[done:], done)
            if reused:
                os.ftruncate(fd, len(data))
            os.fdatasync(fd)  # the size is part of what fdatasync makes durable
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, self.path(job_id))

    def release(self, job_id: str) -> None:
        """The job has ended (or was never stored): keep its file for reuse, or delete it."""
        self._recycle(self.path(job_id))

    def tidy(self, active: set[str]) -> None:
        """On open: files of jobs that are not unfinished (a crash between a job's end
        and its file's release, or in the middle of a write) become free files."""
        if not self.directory.is_dir():
            return
        self._made = True
        self._free.clear()
        for entry in sorted(self.directory.iterdir()):
            name = entry.name
            if name.endswith(_SUFFIX) and name[: -len(_SUFFIX)] in active:
                continue
            if name.startswith(_FREE) or name.endswith((_SUFFIX, ".tmp")):
                self._recycle(entry)

    def _recycle(self, path: Path) -> None:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return
        if len(self._free) >= KEEP_FREE or size > KEEP_MAX_BYTES:
            path.unlink(missing_ok=True)
            return
        free = self.directory / f"{_FREE}{len(self._free)}"
        while free in self._free or (free != path and free.exists()):
            free = self.directory / f"{_FREE}{os.urandom(4).hex()}"
        with contextlib.suppress(FileNotFoundError):
            if free != path:
                os.rename(path, free)
            self._free.append(free)

"""Job queue backends behind one interface (base.JobQueue), chosen by URL.

``None`` selects the embedded SQLite queue in the state directory;
``redis://host:port/db`` the distributed one on Redis with arq (the ``redis``
extra). Backends are imported lazily so the embedded mode needs neither.
"""

from __future__ import annotations

from pathlib import Path

from imgserve import errors
from imgserve.queue.base import JobQueue


def open_queue(
    url: str | None,
    data_dir: Path,
    *,
    keep_finished_s: float = 7 * 24 * 3600.0,
    job_deadline_s: float = 600.0,
    lease_s: float = 30.0,
    keep_changes: int = 100_000,
) -> JobQueue:
    """The backend for ``url``. ``job_deadline_s``: the longest one delivery may
    run; ``lease_s``: how long a running job is held without a renewal (renewed
    every ``lease_s / 3`` while it runs, so it is how soon a dead runner's job
    runs elsewhere); ``keep_changes``: the change feed keeps at least this many
    of the newest."""
    if not url:
        from imgserve.queue.sqlite import SQLiteQueue

        return SQLiteQueue(
            data_dir / "jobs.db",
            lease_s=lease_s,
            job_deadline_s=job_deadline_s,
            keep_changes=keep_changes,
        )
    if url.startswith(("redis://", "rediss://", "unix://")):
        from imgserve.queue.arq_redis import RedisQueue

        return RedisQueue(
            url,
            keep_finished_s=keep_finished_s,
            job_deadline_s=job_deadline_s,
            keep_changes=keep_changes,
            lease_s=lease_s,
        )
    raise errors.QueueUnavailable(f"unsupported queue URL {url!r} (use redis://host:port/db)")

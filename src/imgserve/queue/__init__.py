"""Job queue backends behind one interface (base.JobQueue), chosen by URL.

``None`` selects the embedded SQLite queue in the state directory;
``redis://host:port/db`` the distributed one (needs the ``redis`` extra).
"""

from __future__ import annotations

from pathlib import Path

from imgserve.queue.base import JobQueue


def open_queue(url: str | None, data_dir: Path) -> JobQueue:
    if not url:
        from imgserve.queue.sqlite import SQLiteQueue

        return SQLiteQueue(data_dir / "jobs.db")
    raise ValueError(f"unsupported queue URL {url!r}: only the embedded queue is available")

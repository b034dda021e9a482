"""A consumer that claims one job, says which, and hangs: killed by the contract tests.

``python -m tests.queue.consumer_proc STORE MARKER``: STORE is a redis:// URL or the
directory of an embedded queue; MARKER is the file the claimed job id is written to.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from imgserve.queue import open_queue
from imgserve.queue.base import JobRecord


async def main(store: str, marker: Path) -> None:
    url = store if "://" in store else None
    queue = open_queue(
        url, Path(store) if url is None else Path("."), lease_s=1.0, job_deadline_s=600.0
    )

    async def hang(record: JobRecord) -> None:
        # Renamed into place: the test, polling for the marker, never reads it half written.
        partial = marker.with_name(marker.name + ".partial")
        partial.write_text(record.id)
        partial.rename(marker)
        await asyncio.sleep(3600)

    await queue.consume(hang, 1, asyncio.Event())


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], Path(sys.argv[2])))

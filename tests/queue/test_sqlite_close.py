"""SQLiteQueue.close while a first call is still opening the database (the
dashboard's sampler reads the counts as the app starts): the database is closed
after that call, and closing again is a no-op."""

from __future__ import annotations

import asyncio
from pathlib import Path

from imgserve.queue.sqlite import SQLiteQueue


async def test_close_during_the_first_call_closes_what_that_call_opened(tmp_path: Path) -> None:
    """A close racing the call that opens the database leaves no connection open,
    and a second close does not fail."""
    for attempt in range(20):  # the first call is in the queue's thread as close starts
        queue = SQLiteQueue(tmp_path / f"jobs{attempt}.db")
        first = asyncio.ensure_future(queue.counts())
        await asyncio.sleep(0)  # the call is handed to the queue's thread
        await queue.close()
        assert (await first)["queued"] == 0
        assert queue._db is None
        await queue.close()

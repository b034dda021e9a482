"""The embedded queue: one SQLite file in the state directory.

Every accepted job is committed (WAL, fsync'd: synchronous=FULL) before the
API replies, with its source spooled (fsync'd, queue/spool.py) next to the
database, so a kill -9 at any moment loses nothing: on start, ``recover`` puts
jobs that were running back in the queue. One connection is used from one
dedicated thread, which serialises access and keeps SQLite off the event loop.
The daemon that accepts the jobs also runs them, so ``put`` wakes ``consume``
directly.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from imgserve import errors
from imgserve.queue.base import Handler, JobQueue, JobRecord, State
from imgserve.queue.spool import Spool

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    record TEXT NOT NULL,
    run_at REAL NOT NULL,
    created_at REAL NOT NULL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (state, run_at);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_at);
-- Jobs per state, kept by triggers: counting a week of finished jobs per request
-- would scan them all. Rebuilt from the jobs table on every open.
CREATE TABLE IF NOT EXISTS state_counts (state TEXT PRIMARY KEY, n INTEGER NOT NULL);
CREATE TRIGGER IF NOT EXISTS jobs_insert AFTER INSERT ON jobs BEGIN
    INSERT INTO state_counts VALUES (new.state, 1)
        ON CONFLICT (state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS jobs_delete AFTER DELETE ON jobs BEGIN
    UPDATE state_counts SET n = n - 1 WHERE state = old.state;
END;
CREATE TRIGGER IF NOT EXISTS jobs_state AFTER UPDATE OF state ON jobs
WHEN old.state <> new.state BEGIN
    UPDATE state_counts SET n = n - 1 WHERE state = old.state;
    INSERT INTO state_counts VALUES (new.state, 1)
        ON CONFLICT (state) DO UPDATE SET n = n + 1;
END;
"""
_RECOUNT = """
BEGIN IMMEDIATE;
DELETE FROM state_counts;
INSERT INTO state_counts SELECT state, COUNT(*) FROM jobs GROUP BY state;
COMMIT;
"""


class SQLiteQueue(JobQueue):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.spool = Spool(path.parent / "spool")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imgserve-sqlite")
        self._db: sqlite3.Connection | None = None
        self._wakeup = asyncio.Event()
        # Jobs per state as of the last write: this process is the database's
        # only writer, so reading them needs no trip to the database thread.
        self._counts = {state.value: 0 for state in State}

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            # Later state changes need not reach the disk before going on: one
            # lost to a power cut only re-runs its job. ``put`` syncs (and so
            # makes every earlier change durable too).
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=5000")
            db.executescript(_SCHEMA)
            db.executescript(_RECOUNT)
            active = db.execute("SELECT id FROM jobs WHERE state IN ('queued', 'running')")
            self.spool.tidy({job_id for (job_id,) in active})
            self._db = db
            self._read_counts(db)
        return self._db

    def _read_counts(self, db: sqlite3.Connection) -> None:
        found = dict(db.execute("SELECT state, n FROM state_counts").fetchall())
        self._counts = {state.value: int(found.get(state.value, 0)) for state in State}

    async def _run(self, fn: Callable[[sqlite3.Connection], T], *, writes: bool = True) -> T:
        loop = asyncio.get_running_loop()

        def call() -> T:
            try:
                db = self._conn()
                try:
                    return fn(db)
                finally:
                    if writes:
                        self._read_counts(db)
            except sqlite3.Error as exc:
                raise errors.QueueUnavailable(f"job database: {exc}") from exc

        return await loop.run_in_executor(self._executor, call)

    @staticmethod
    def _load(row: Any) -> JobRecord:
        return JobRecord.from_dict(json.loads(row[0]))

    @staticmethod
    def _save(db: sqlite3.Connection, record: JobRecord) -> None:
        db.execute(
            "UPDATE jobs SET state=?, record=?, run_at=?, finished_at=? WHERE id=?",
            (
                record.state.value,
                json.dumps(record.to_dict()),
                record.run_at,
                record.finished_at,
                record.id,
            ),
        )

    async def put(self, record: JobRecord, source: bytes, *, max_active: int) -> None:
        def op(db: sqlite3.Connection) -> None:
            try:
                self.spool.write(record.id, source)
            except OSError as exc:
                raise errors.QueueUnavailable(f"source spool: {exc}") from exc
            db.execute("PRAGMA synchronous=FULL")
            try:
                insert(db)
            finally:
                db.execute("PRAGMA synchronous=NORMAL")

        def insert(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            try:
                (active,) = db.execute(
                    "SELECT COALESCE(SUM(n), 0) FROM state_counts "
                    "WHERE state IN ('queued', 'running')"
                ).fetchone()
                if active >= max_active:
                    raise errors.QueueFull(f"{active} jobs waiting, the limit is {max_active}")
                db.execute(
                    "INSERT INTO jobs (id, state, record, run_at, created_at) VALUES (?,?,?,?,?)",
                    (
                        record.id,
                        record.state.value,
                        json.dumps(record.to_dict()),
                        record.run_at,
                        record.created_at,
                    ),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                self.spool.release(record.id)
                raise

        await self._run(op)
        self._wakeup.set()

    async def source(self, job_id: str) -> bytes | None:
        def read() -> bytes | None:
            try:
                return self.spool.path(job_id).read_bytes()
            except FileNotFoundError:
                return None

        return await asyncio.to_thread(read)

    async def source_file(self, job_id: str) -> str | None:
        path = self.spool.path(job_id)
        return str(path) if path.exists() else None  # one stat: not worth a thread hop

    async def consume(self, handler: Handler, concurrency: int, stopping: asyncio.Event) -> None:
        running: set[asyncio.Task[None]] = set()
        try:
            while not stopping.is_set():
                if len(running) >= concurrency:
                    await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    continue
                record = await self.claim()
                if record is None:
                    await self._idle(stopping)
                    continue
                task = asyncio.create_task(handler(record))
                running.add(task)
                task.add_done_callback(running.discard)
            if running:
                await asyncio.wait(running)
        finally:
            for task in running:
                task.cancel()
            if running:
                await asyncio.wait(running)

    async def _idle(self, stopping: asyncio.Event) -> None:
        due = await self._next_due_in()
        timeout = 1.0 if due is None else min(1.0, max(0.01, due))
        self._wakeup.clear()
        waiters = [asyncio.create_task(self._wakeup.wait()), asyncio.create_task(stopping.wait())]
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()

    async def claim(self) -> JobRecord | None:
        def op(db: sqlite3.Connection) -> JobRecord | None:
            now = time.time()
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute(
                    "SELECT record FROM jobs WHERE state='queued' AND run_at<=? "
                    "ORDER BY run_at, created_at LIMIT 1",
                    (now,),
                ).fetchone()
                if row is None:
                    db.execute("COMMIT")
                    return None
                record = self._load(row)
                record.mark_running(record.attempts + 1)
                self._save(db, record)
                db.execute("COMMIT")
                return record
            except BaseException:
                db.execute("ROLLBACK")
                raise

        return await self._run(op)

    async def _update(self, job_id: str, change: Callable[[JobRecord], None]) -> None:
        def op(db: sqlite3.Connection) -> None:
            row = db.execute("SELECT record FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise errors.JobNotFound(job_id)
            record = self._load(row)
            change(record)
            self._save(db, record)
            if record.state in (State.DONE, State.FAILED):
                self.spool.release(job_id)  # on this thread: no extra hop

        await self._run(op)

    async def complete(self, job_id: str) -> None:
        await self._update(job_id, lambda record: record.mark_done())

    async def fail(self, job_id: str, code: int, detail: str) -> None:
        await self._update(job_id, lambda record: record.mark_failed(code, detail))

    async def retry(self, job_id: str, delay_s: float, code: int, detail: str) -> None:
        await self._update(job_id, lambda record: record.mark_retry(delay_s, code, detail))
        self._wakeup.set()

    async def get(self, job_id: str) -> JobRecord | None:
        def op(db: sqlite3.Connection) -> JobRecord | None:
            row = db.execute("SELECT record FROM jobs WHERE id=?", (job_id,)).fetchone()
            return None if row is None else self._load(row)

        return await self._run(op, writes=False)

    async def counts(self) -> dict[str, int]:
        if self._db is None:
            await self._run(lambda db: None)
        return dict(self._counts)

    async def recover(self) -> int:
        def op(db: sqlite3.Connection) -> int:
            rows = db.execute("SELECT record FROM jobs WHERE state='running'").fetchall()
            for row in rows:
                record = self._load(row)
                record.state = State.QUEUED
                record.run_at = time.time()
                self._save(db, record)
            return len(rows)

        return await self._run(op)

    async def prune(self, older_than_s: float) -> int:
        def op(db: sqlite3.Connection) -> int:
            cur = db.execute(
                "DELETE FROM jobs WHERE state IN ('done', 'failed') AND finished_at<?",
                (time.time() - older_than_s,),
            )
            return cur.rowcount

        return await self._run(op)

    async def _next_due_in(self) -> float | None:
        def op(db: sqlite3.Connection) -> float | None:
            (run_at,) = db.execute("SELECT MIN(run_at) FROM jobs WHERE state='queued'").fetchone()
            return None if run_at is None else max(0.0, run_at - time.time())

        return await self._run(op, writes=False)

    async def close(self) -> None:
        def op(db: sqlite3.Connection) -> None:
            db.close()
            self._db = None

        if self._db is not None:
            await self._run(op, writes=False)
        self._executor.shutdown(wait=True)

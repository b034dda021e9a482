"""The embedded queue: one SQLite file in the state directory.

Every accepted job is committed (WAL, fsync'd: synchronous=FULL) before the
API replies, with its source spooled (fsync'd, queue/spool.py) next to the
database, so a kill -9 at any moment loses nothing: on start, ``recover`` puts
jobs that were running back in the queue. One connection is used from one
dedicated thread, which serialises access and keeps SQLite off the event loop.
The daemon that accepts the jobs also runs them, so ``put`` wakes ``consume``
directly.

A claimed job carries a lease (``lease_until``) that ``consume`` renews every
``lease_s / 3`` while its handler runs. A running job whose lease ran out (its
handler ended without recording an end, or the process that held it died) is
put back in the queue by the same loop, without waiting for a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from imgserve import errors
from imgserve.queue.base import (
    Handler,
    JobQueue,
    JobRecord,
    State,
    redelivery_delay_s,
    run_delivery,
)
from imgserve.queue.spool import Spool
from imgserve.retry import backoff_s

T = TypeVar("T")
log = logging.getLogger("imgserve.queue")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    record TEXT NOT NULL,
    run_at REAL NOT NULL,
    created_at REAL NOT NULL,
    finished_at REAL,
    lease_until REAL
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
    def __init__(self, path: Path, *, lease_s: float = 30.0, job_deadline_s: float = 600.0) -> None:
        self.path = path
        self.lease_s = lease_s
        """How long a claimed job is held without a renewal before it is queued again."""
        self.job_deadline_s = job_deadline_s
        """The longest one delivery may run before it is cancelled and delivered again."""
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
            columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
            if "lease_until" not in columns:  # a database from before leases
                db.execute("ALTER TABLE jobs ADD COLUMN lease_until REAL")
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
    def _save(db: sqlite3.Connection, record: JobRecord, lease_until: float | None = None) -> None:
        db.execute(
            "UPDATE jobs SET state=?, record=?, run_at=?, finished_at=?, lease_until=? WHERE id=?",
            (
                record.state.value,
                json.dumps(record.to_dict()),
                record.run_at,
                record.finished_at,
                lease_until,
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
        running: dict[asyncio.Task[None], str] = {}
        leases = asyncio.create_task(self._keep_leases(running))
        claim_failures = 0
        try:
            while not stopping.is_set():
                if len(running) >= concurrency:
                    await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    record = await self.claim()
                    if record is None:
                        await self._idle(stopping)
                        continue
                except Exception as exc:  # the database, not a job: wait and try again
                    claim_failures += 1
                    delay = backoff_s(claim_failures, base_s=0.1, max_s=5.0, min_fraction=0.5)
                    log.error("job queue: claim failed (%s); trying again in %.1f s", exc, delay)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stopping.wait(), delay)
                    continue
                claim_failures = 0
                task = asyncio.create_task(self._deliver(handler, record))
                running[task] = record.id
                task.add_done_callback(lambda done: running.pop(done, None))
            if running:
                await asyncio.wait(list(running))
        finally:
            leases.cancel()
            for task in running:
                task.cancel()
            if running:
                await asyncio.wait(list(running))
            with contextlib.suppress(asyncio.CancelledError):
                await leases

    async def _deliver(self, handler: Handler, record: JobRecord) -> None:
        """Run one delivery; a handler that raises or overruns is delivered again."""
        problem = await run_delivery(handler, record, self.job_deadline_s)
        if problem is None:
            return
        delay = redelivery_delay_s(record.attempts)
        log.error("job %s: %s; delivering it again in %.1f s", record.id, problem, delay)
        try:
            await self.retry(record.id, delay, errors.InternalError.code, problem)
        except Exception as again:  # the lease brings the job back
            log.error("job %s: could not queue it again (%s); its lease will", record.id, again)

    async def _keep_leases(self, running: dict[asyncio.Task[None], str]) -> None:
        """Renew the leases of the jobs this consumer runs; queue again the running
        jobs whose lease ran out and that no handler here holds."""
        while True:
            await asyncio.sleep(self.lease_s / 3)
            held = {job_id for task, job_id in running.items() if not task.done()}
            try:
                await self._renew(held)
                expired = await self._reclaim(held)
            except Exception as exc:  # the database: next round
                log.error("job queue: lease renewal failed: %s", exc)
                continue
            for job_id in expired:
                log.warning("job %s: its lease ran out with no runner; queued again", job_id)
            if expired:
                self._wakeup.set()

    async def _renew(self, job_ids: set[str]) -> None:
        if not job_ids:
            return
        until = time.time() + self.lease_s
        marks = ",".join("?" * len(job_ids))

        def op(db: sqlite3.Connection) -> None:
            db.execute(
                f"UPDATE jobs SET lease_until=? WHERE state='running' AND id IN ({marks})",  # noqa: S608
                (until, *job_ids),
            )

        await self._run(op, writes=False)

    async def _reclaim(self, held: set[str]) -> list[str]:
        def op(db: sqlite3.Connection) -> list[str]:
            now = time.time()
            rows = db.execute(
                "SELECT record FROM jobs WHERE state='running' AND lease_until<?", (now,)
            ).fetchall()
            reclaimed: list[str] = []
            for row in rows:
                record = self._load(row)
                if record.id in held:
                    continue
                record.mark_retry(
                    0.0, errors.InternalError.code, "its runner stopped renewing the lease"
                )
                self._save(db, record)
                reclaimed.append(record.id)
            return reclaimed

        return await self._run(op)

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
                self._save(db, record, lease_until=now + self.lease_s)
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
            if record.finished:
                return  # a late duplicate: the first end stands
            change(record)
            self._save(db, record)
            if record.state in (State.DONE, State.FAILED):
                self.spool.release(job_id)  # on this thread: no extra hop

        await self._run(op)

    async def complete(self, job_id: str, output_bytes: list[int] | None = None) -> None:
        await self._update(job_id, lambda record: record.mark_done(output_bytes))

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

"""The embedded queue: one SQLite file in the state directory.

Every accepted job is committed (WAL, fsync'd: synchronous=FULL) before the
API replies, with its source spooled (fsync'd, queue/spool.py) next to the
database, so a kill -9 at any moment loses nothing: on start, ``recover`` puts
jobs that were running back in the queue. One connection is used from one
dedicated thread, which serialises access and keeps SQLite off the event loop.
The daemon that accepts the jobs also runs them, so ``put`` wakes ``consume``
directly.

Every write that changes a job is one transaction (``BEGIN IMMEDIATE``) that
also holds what goes with it: the job's completion event in the outbox (the
``events`` table) when it ends, and, by triggers, its per-state count and its
entry in the change feed (the ``changes`` table, ``GET /events``).
Idempotency keys live in the same file (``idem_keys``).

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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from imgserve import errors
from imgserve.queue.base import (
    PRIORITIES,
    Change,
    Event,
    Handler,
    JobQueue,
    JobRecord,
    KeyEntry,
    State,
    bad_change_id,
    decode_list_cursor,
    encode_list_cursor,
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
-- The outbox: a job's completion events, inserted by the write that ends the job.
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    state TEXT NOT NULL,
    next_at REAL NOT NULL,
    created_at REAL NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_due ON events (state, next_at);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, created_at);
CREATE TRIGGER IF NOT EXISTS jobs_delete_events AFTER DELETE ON jobs BEGIN
    DELETE FROM events WHERE job_id = old.id;
END;
-- The change feed, written by triggers so no write can forget it. AUTOINCREMENT:
-- a seq is never reused, even after prune deleted the newest rows' neighbours.
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    state TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TRIGGER IF NOT EXISTS jobs_change_insert AFTER INSERT ON jobs BEGIN
    INSERT INTO changes (job_id, state, at)
        VALUES (new.id, new.state, (julianday('now') - 2440587.5) * 86400.0);
END;
CREATE TRIGGER IF NOT EXISTS jobs_change_state AFTER UPDATE OF state ON jobs
WHEN old.state <> new.state BEGIN
    INSERT INTO changes (job_id, state, at)
        VALUES (new.id, new.state, (julianday('now') - 2440587.5) * 86400.0);
END;
CREATE TABLE IF NOT EXISTS idem_keys (
    key TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    reply TEXT,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS idem_keys_expiry ON idem_keys (expires_at);
"""
# Indexes on columns a migration may have just added (see _conn).
_INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_lane ON jobs (state, priority, run_at);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_at, id);
CREATE INDEX IF NOT EXISTS jobs_state_created ON jobs (state, created_at, id);
CREATE INDEX IF NOT EXISTS jobs_key_created ON jobs (key, created_at, id);
CREATE INDEX IF NOT EXISTS jobs_key_state_created ON jobs (key, state, created_at, id);
"""
_ENDED_SQL = "('done', 'failed', 'cancelled')"


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction, taken at once (no deadlock upgrading a read lock)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _insert_event(db: sqlite3.Connection, event: Event) -> None:
    db.execute(
        "INSERT INTO events (id, job_id, state, next_at, created_at, record) VALUES (?,?,?,?,?,?)",
        (
            event.id,
            event.job_id,
            event.state,
            event.next_at,
            event.created_at,
            json.dumps(event.to_dict()),
        ),
    )


_RECOUNT = """
BEGIN IMMEDIATE;
DELETE FROM state_counts;
INSERT INTO state_counts SELECT state, COUNT(*) FROM jobs GROUP BY state;
COMMIT;
"""


class SQLiteQueue(JobQueue):
    def __init__(
        self,
        path: Path,
        *,
        lease_s: float = 30.0,
        job_deadline_s: float = 600.0,
        keep_changes: int = 100_000,
    ) -> None:
        self.path = path
        self.keep_changes = keep_changes
        """How many of the newest changes ``prune`` keeps in the change feed."""
        self.lease_s = lease_s
        """How long a claimed job is held without a renewal before it is queued again."""
        self.job_deadline_s = job_deadline_s
        """The longest one delivery may run before it is cancelled and delivered again."""
        self.spool = Spool(path.parent / "spool")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imgserve-sqlite")
        self._db: sqlite3.Connection | None = None
        self._closed = False
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
            # One writer migrates at a time: two openers of a new database must not
            # both see a column missing and both add it.
            db.execute("BEGIN IMMEDIATE")
            try:
                columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
                if "lease_until" not in columns:  # a database from before leases
                    db.execute("ALTER TABLE jobs ADD COLUMN lease_until REAL")
                if "priority" not in columns:  # a database from before lanes (0.3)
                    db.execute("ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0")
                if "key" not in columns:  # a database from before API keys (#15)
                    db.execute("ALTER TABLE jobs ADD COLUMN key TEXT")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.executescript(_INDEXES)
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
        lane = PRIORITIES.index(record.priority)  # ValueError: a caller's bug

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
            try:
                with _transaction(db):
                    (active,) = db.execute(
                        "SELECT COALESCE(SUM(n), 0) FROM state_counts "
                        "WHERE state IN ('queued', 'running')"
                    ).fetchone()
                    if active >= max_active:
                        raise errors.QueueFull(f"{active} jobs waiting, the limit is {max_active}")
                    db.execute(
                        "INSERT INTO jobs (id, state, record, run_at, created_at, priority, key) "
                        "VALUES (?,?,?,?,?,?,?)",
                        (
                            record.id,
                            record.state.value,
                            json.dumps(record.to_dict()),
                            record.run_at,
                            record.created_at,
                            lane,
                            record.key,
                        ),
                    )
            except BaseException:
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
                        async with asyncio.timeout(delay):  # (3.11's wait_for loses cancels)
                            await stopping.wait()
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
            with _transaction(db):
                # Lanes first: a due interactive job goes before every batch job.
                row = db.execute(
                    "SELECT record FROM jobs WHERE state='queued' AND run_at<=? "
                    "ORDER BY priority, run_at, created_at LIMIT 1",
                    (now,),
                ).fetchone()
                if row is None:
                    return None
                record = self._load(row)
                record.mark_running(record.attempts + 1)
                self._save(db, record, lease_until=now + self.lease_s)
                return record

        return await self._run(op)

    async def _update(
        self,
        job_id: str,
        change: Callable[[JobRecord], None],
        event: Event | None = None,
        *,
        cancelling: bool = False,
    ) -> JobRecord:
        """Read, change and write one job in one transaction, with its event when the
        change ends it. An ended job is left as it is (a late duplicate: the first end
        stands), except that ``cancelling`` refuses it (JobNotCancellable)."""

        def op(db: sqlite3.Connection) -> JobRecord:
            with _transaction(db):
                row = db.execute("SELECT record FROM jobs WHERE id=?", (job_id,)).fetchone()
                if row is None:
                    raise errors.JobNotFound(job_id)
                record = self._load(row)
                if cancelling:
                    record.check_cancellable()
                elif record.finished:
                    return record
                change(record)
                self._save(db, record)
                if event is not None and record.finished:
                    _insert_event(db, event)
            if record.finished:
                self.spool.release(job_id)  # on this thread: no extra hop
            return record

        return await self._run(op)

    async def complete(
        self,
        job_id: str,
        output_bytes: list[int] | None = None,
        event: Event | None = None,
        previews: list[dict[str, Any]] | None = None,
    ) -> None:
        await self._update(job_id, lambda record: record.mark_done(output_bytes, previews), event)

    async def fail(self, job_id: str, code: int, detail: str, event: Event | None = None) -> None:
        await self._update(job_id, lambda record: record.mark_failed(code, detail), event)

    async def retry(self, job_id: str, delay_s: float, code: int, detail: str) -> None:
        await self._update(job_id, lambda record: record.mark_retry(delay_s, code, detail))
        self._wakeup.set()

    async def cancel(self, job_id: str, event: Event | None = None) -> JobRecord:
        # claim only takes queued jobs, so a cancelled one is never delivered.
        return await self._update(job_id, JobRecord.mark_cancelled, event, cancelling=True)

    async def list_jobs(
        self, state: State | None, limit: int, cursor: str | None, *, key: str | None = None
    ) -> tuple[list[JobRecord], str | None]:
        after = decode_list_cursor(cursor) if cursor is not None else None

        def op(db: sqlite3.Connection) -> list[JobRecord]:
            where: list[str] = []
            args: list[str | float] = []
            if key is not None:
                where.append("key=?")
                args.append(key)
            if state is not None:
                where.append("state=?")
                args.append(state.value)
            if after is not None:
                where.append("(created_at<? OR (created_at=? AND id<?))")
                args += [after[0], after[0], after[1]]
            sql = "SELECT record FROM jobs"
            if where:
                sql += " WHERE " + " AND ".join(where)
            sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
            rows = db.execute(sql, (*args, limit + 1)).fetchall()
            return [self._load(row) for row in rows]

        found = await self._run(op, writes=False)
        page = found[:limit]
        more = len(found) > limit and bool(page)
        return page, encode_list_cursor(page[-1].created_at, page[-1].id) if more else None

    async def changes(self, after: str | None, limit: int) -> list[Change]:
        if after is not None and not (after.isascii() and after.isdigit()):
            raise bad_change_id(after)

        def op(db: sqlite3.Connection) -> list[Any]:
            return db.execute(
                "SELECT seq, job_id, state, at FROM changes WHERE seq>? ORDER BY seq LIMIT ?",
                (int(after or 0), limit),
            ).fetchall()

        rows = await self._run(op, writes=False)
        return [Change(str(seq), job_id, State(state), at) for seq, job_id, state, at in rows]

    async def change_cursor(self) -> str | None:
        def op(db: sqlite3.Connection) -> int | None:
            (seq,) = db.execute("SELECT MAX(seq) FROM changes").fetchone()
            return None if seq is None else int(seq)

        seq = await self._run(op, writes=False)
        return None if seq is None else str(seq)

    # --- the outbox ----------------------------------------------------------------------

    async def claim_events(self, limit: int, lease_s: float) -> list[Event]:
        def op(db: sqlite3.Connection) -> list[Event]:
            now = time.time()
            with _transaction(db):
                rows = db.execute(
                    "SELECT record FROM events WHERE state='pending' AND next_at<=? "
                    "ORDER BY next_at, created_at LIMIT ?",
                    (now, limit),
                ).fetchall()
                claimed = [Event.from_dict(json.loads(row[0])) for row in rows]
                for event in claimed:
                    event.next_at = now + lease_s
                    db.execute(
                        "UPDATE events SET next_at=?, record=? WHERE id=?",
                        (event.next_at, json.dumps(event.to_dict()), event.id),
                    )
            return claimed

        return await self._run(op, writes=False)

    async def save_event(self, event: Event) -> None:
        def op(db: sqlite3.Connection) -> None:
            # An UPDATE: an event pruned with its job meanwhile is not brought back.
            db.execute(
                "UPDATE events SET state=?, next_at=?, record=? WHERE id=?",
                (event.state, event.next_at, json.dumps(event.to_dict()), event.id),
            )

        await self._run(op, writes=False)

    async def job_events(self, job_id: str) -> list[Event]:
        def op(db: sqlite3.Connection) -> list[Event]:
            rows = db.execute(
                "SELECT record FROM events WHERE job_id=? ORDER BY created_at, rowid", (job_id,)
            ).fetchall()
            return [Event.from_dict(json.loads(row[0])) for row in rows]

        return await self._run(op, writes=False)

    # --- idempotency keys ----------------------------------------------------------------

    async def reserve_key(self, key: str, fingerprint: str, ttl_s: float) -> KeyEntry | None:
        def op(db: sqlite3.Connection) -> KeyEntry | None:
            now = time.time()
            with _transaction(db):
                db.execute("DELETE FROM idem_keys WHERE key=? AND expires_at<=?", (key, now))
                taken = db.execute(
                    "INSERT OR IGNORE INTO idem_keys VALUES (?,?,NULL,?)",
                    (key, fingerprint, now + ttl_s),
                ).rowcount
                if taken == 1:
                    return None
                held, reply = db.execute(
                    "SELECT fingerprint, reply FROM idem_keys WHERE key=?", (key,)
                ).fetchone()
            return KeyEntry(held, None if reply is None else json.loads(reply))

        return await self._run(op, writes=False)

    async def finish_key(self, key: str, reply: dict[str, Any], ttl_s: float) -> None:
        def op(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE idem_keys SET reply=?, expires_at=? WHERE key=?",
                (json.dumps(reply), time.time() + ttl_s, key),
            )

        await self._run(op, writes=False)

    async def release_key(self, key: str) -> None:
        def op(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM idem_keys WHERE key=?", (key,))

        await self._run(op, writes=False)

    async def get(self, job_id: str) -> JobRecord | None:
        def op(db: sqlite3.Connection) -> JobRecord | None:
            row = db.execute("SELECT record FROM jobs WHERE id=?", (job_id,)).fetchone()
            return None if row is None else self._load(row)

        return await self._run(op, writes=False)

    async def counts(self) -> dict[str, int]:
        if self._db is None:
            await self._run(lambda db: None)
        return dict(self._counts)

    async def lanes(self) -> dict[str, int]:
        def op(db: sqlite3.Connection) -> dict[str, int]:
            rows = db.execute(
                "SELECT priority, COUNT(*) FROM jobs WHERE state='queued' GROUP BY priority"
            ).fetchall()
            return {PRIORITIES[lane]: int(n) for lane, n in rows}

        counted = await self._run(op, writes=False)
        return {lane: counted.get(lane, 0) for lane in PRIORITIES}

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
            now = time.time()
            with _transaction(db):
                # Their events go with them (trigger jobs_delete_events).
                removed = db.execute(
                    f"DELETE FROM jobs WHERE state IN {_ENDED_SQL} AND finished_at<?",  # noqa: S608
                    (now - older_than_s,),
                ).rowcount
                db.execute(
                    "DELETE FROM changes WHERE seq <= (SELECT MAX(seq) FROM changes) - ?",
                    (self.keep_changes,),
                )
                db.execute("DELETE FROM idem_keys WHERE expires_at<=?", (now,))
            return removed

        return await self._run(op)

    async def _next_due_in(self) -> float | None:
        def op(db: sqlite3.Connection) -> float | None:
            (run_at,) = db.execute("SELECT MIN(run_at) FROM jobs WHERE state='queued'").fetchone()
            return None if run_at is None else max(0.0, run_at - time.time())

        return await self._run(op, writes=False)

    async def close(self) -> None:
        def op() -> None:
            # In the queue's thread, so after a call still there that may be opening
            # the database as close starts (checked here, not on the loop).
            if self._db is not None:
                self._db.close()
                self._db = None

        if self._closed:
            return
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(self._executor, op)
        self._executor.shutdown(wait=True)

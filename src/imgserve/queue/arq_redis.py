"""The distributed queue: Redis, with arq delivering jobs to worker nodes.

Why arq (docs/queue.md has the evidence): it is asyncio-native like the rest
of imgserve, and a job taken by a worker stays in the queue under a lease (an
"in-progress" key that expires) until it ends, so a worker node killed with
SIGKILL loses nothing: the lease runs out and another node runs the job. A job
cancelled by a graceful shutdown is handed back at once.

Beside arq's queue, imgserve keeps the status ``GET /jobs/<id>`` reports: one
JSON record per job, a set per state for the counts, sorted sets by creation
time (all jobs, and per state) for ``list_jobs``, and a sorted set of finished
jobs for pruning (finished records also expire on their own). The source is
kept in Redis up to ``max_source_bytes`` so a worker node does not download it
again; larger sources are downloaded by the worker.

Every change to a record is a read-modify-write under WATCH on the record's key,
committed in one MULTI/EXEC with what goes with it: the state sets, the change
feed entry (a stream), and, when the job ends, its event in the outbox. Two
nodes changing one job at once cannot interleave: the later one reads again.

Priority lanes ride on arq's queue order (score = due time in ms, lowest first):
an interactive job is enqueued ``LANE_OFFSET_MS`` in the past, so it sorts before
every batch job. docs/queue.md explains how a deferred retry keeps its lane.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

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

try:
    import redis.exceptions
    from arq import Retry, Worker, create_pool, func
    from arq.connections import ArqRedis, RedisSettings
    from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix
    from redis.asyncio.retry import Retry as RedisRetry
    from redis.backoff import ExponentialBackoff
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "the Redis queue needs the 'redis' extra: pip install 'imgserve[redis]'"
    ) from exc

log = logging.getLogger("imgserve.queue")

JOB_FUNCTION = "imgserve_job"
# imgserve counts attempts itself (WorkerSettings.max_attempts); arq must not stop first.
_ARQ_MAX_TRIES = 1000
_CONNECTION_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
LANE_OFFSET_MS = 10**12
"""How far in the past (about 32 years) an interactive job is scored in arq's queue:
every interactive score is below every batch score, yet still positive (arq skips
a job scored 0)."""
ARQ_JOB_TTL_S = 30 * 24 * 3600.0
"""How long arq keeps a job's definition (arq's own default, a day, would let a
long batch backfill expire in the queue)."""
PROMOTE_EVERY_S = 0.05
_STREAM_ID = re.compile(r"\d+-\d+")

# Leases due events atomically: two dispatchers never get the same event in one lease.
_CLAIM_EVENTS = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
  local raw = redis.call('GET', ARGV[4] .. id)
  if raw then
    redis.call('ZADD', KEYS[1], ARGV[2], id)
    table.insert(out, raw)
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
"""
# Gives a due interactive retry its lane back: arq re-scored it at its due time
# (Retry(defer=...)), which sorts it among batch jobs; move it LANE_OFFSET_MS back.
# A score still in the interactive range means arq has not re-scored it yet.
_PROMOTE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 100)
local offset = tonumber(ARGV[2])
local moved = 0
for _, id in ipairs(due) do
  local score = redis.call('ZSCORE', KEYS[2], id)
  if not score then
    redis.call('ZREM', KEYS[1], id)
  elseif tonumber(score) > tonumber(ARGV[1]) - offset / 2 then
    redis.call('ZADD', KEYS[2], 'XX', tonumber(score) - offset, id)
    redis.call('ZREM', KEYS[1], id)
    moved = moved + 1
  end
end
return moved
"""


def split_url(url: str) -> tuple[str, str]:
    """``redis://host:port/db?prefix=name`` -> (URL for redis, key prefix)."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    prefix = query.pop("prefix", ["imgserve"])[0]
    clean = urlunsplit(parts._replace(query=urlencode(query, doseq=True)))
    return clean, prefix


class RedisQueue(JobQueue):
    def __init__(
        self,
        url: str,
        *,
        keep_finished_s: float = 7 * 24 * 3600.0,
        job_deadline_s: float = 600.0,
        max_source_bytes: int = 16 * 1024 * 1024,
        keep_changes: int = 100_000,
    ) -> None:
        redis_url, self.prefix = split_url(url)
        settings = RedisSettings.from_dsn(redis_url)
        settings.conn_retries = 0
        settings.conn_timeout = 2
        # A connection left stale by a Redis restart is re-opened, not reported.
        settings.retry_on_error = [redis.exceptions.ConnectionError]
        settings.retry = RedisRetry(ExponentialBackoff(cap=1.0, base=0.05), 3)
        self.redis_settings = settings
        self.queue_name = f"{self.prefix}:queue"
        self.keep_finished_s = keep_finished_s
        self.job_deadline_s = job_deadline_s
        self.max_source_bytes: int = max_source_bytes
        self.keep_changes = keep_changes
        """The change stream is trimmed (approximately, never below) to this many."""
        self._redis: ArqRedis | None = None
        self._claim_script: Any = None
        self._promote_script: Any = None
        self._retries: dict[str, float] = {}
        self._abandoned: set[str] = set()

    # --- keys and connection -------------------------------------------------------------

    def _job_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def _src_key(self, job_id: str) -> str:
        return f"{self.prefix}:src:{job_id}"

    def _state_key(self, state: State) -> str:
        return f"{self.prefix}:state:{state.value}"

    def _by_state_key(self, state: State) -> str:
        return f"{self.prefix}:bystate:{state.value}"

    def _by_key_key(self, name: str) -> str:
        """Jobs submitted with the API key ``name``, scored by created_at (list_jobs)."""
        return f"{self.prefix}:bykey:{name}"

    def _event_key(self, event_id: str) -> str:
        return f"{self.prefix}:event:{event_id}"

    def _job_events_key(self, job_id: str) -> str:
        return f"{self.prefix}:job-events:{job_id}"

    def _idem_key(self, key: str) -> str:
        return f"{self.prefix}:key:{key}"

    @property
    def _finished_key(self) -> str:
        return f"{self.prefix}:finished"

    @property
    def _created_key(self) -> str:
        return f"{self.prefix}:created"

    @property
    def _changes_key(self) -> str:
        return f"{self.prefix}:changes"

    @property
    def _due_events_key(self) -> str:
        return f"{self.prefix}:events:due"

    @property
    def _deferred_key(self) -> str:
        return f"{self.prefix}:deferred"

    def _finished_ttl_s(self) -> int:
        return int(self.keep_finished_s) + 60

    @contextlib.asynccontextmanager
    async def _redis_call(self) -> AsyncIterator[ArqRedis]:
        """The connection, with Redis failures translated into QueueUnavailable (608)."""
        try:
            if self._redis is None:
                self._redis = await create_pool(
                    self.redis_settings, default_queue_name=self.queue_name, retry=0
                )
                self._claim_script = self._redis.register_script(_CLAIM_EVENTS)
                self._promote_script = self._redis.register_script(_PROMOTE)
            yield self._redis
        except _CONNECTION_ERRORS as exc:
            raise errors.QueueUnavailable(f"Redis: {exc}") from exc

    # --- the API side ----------------------------------------------------------------------

    async def put(self, record: JobRecord, source: bytes, *, max_active: int) -> None:
        if record.priority not in PRIORITIES:
            raise ValueError(f"priority {record.priority!r}")  # a caller's bug
        async with self._redis_call() as r:
            async with r.pipeline(transaction=False) as pipe:
                pipe.scard(self._state_key(State.QUEUED))
                pipe.scard(self._state_key(State.RUNNING))
                queued, running = await pipe.execute()
            if queued + running >= max_active:
                raise errors.QueueFull(
                    f"{queued + running} jobs waiting, the limit is {max_active}"
                )
            async with r.pipeline(transaction=True) as pipe:
                self._add_change(pipe, record)
                pipe.set(self._job_key(record.id), json.dumps(record.to_dict()))
                pipe.sadd(self._state_key(State.QUEUED), record.id)
                pipe.zadd(self._created_key, {record.id: record.created_at})
                pipe.zadd(self._by_state_key(State.QUEUED), {record.id: record.created_at})
                if len(source) <= self.max_source_bytes:
                    pipe.set(self._src_key(record.id), source)
                # API keys (#15): the per-key index list_jobs(key=) reads.
                if record.key is not None:
                    pipe.zadd(self._by_key_key(record.key), {record.id: record.created_at})
                change_id, *_ = await pipe.execute()
            defer_until = None
            if record.priority == "interactive":
                lane_ms = time.time() * 1000 - LANE_OFFSET_MS
                defer_until = datetime.fromtimestamp(lane_ms / 1000, tz=UTC)
            try:
                job = await r.enqueue_job(
                    JOB_FUNCTION,
                    record.id,
                    _job_id=record.id,
                    _defer_until=defer_until,
                    _expires=ARQ_JOB_TTL_S,  # else arq's TTL is relative to the score
                )
            except BaseException:
                async with r.pipeline(transaction=True) as pipe:
                    pipe.delete(self._job_key(record.id), self._src_key(record.id))
                    pipe.srem(self._state_key(State.QUEUED), record.id)
                    pipe.zrem(self._created_key, record.id)
                    pipe.zrem(self._by_state_key(State.QUEUED), record.id)
                    pipe.xdel(self._changes_key, change_id)
                    await pipe.execute()
                raise
            if job is None:
                raise errors.InternalError(f"job id {record.id} already queued")

    def _add_change(self, pipe: Any, record: JobRecord) -> None:
        pipe.xadd(
            self._changes_key,
            {"job_id": record.id, "state": record.state.value, "at": repr(time.time())},
            maxlen=self.keep_changes,
            approximate=True,
        )

    async def get(self, job_id: str) -> JobRecord | None:
        async with self._redis_call() as r:
            raw = await r.get(self._job_key(job_id))
        return None if raw is None else JobRecord.from_dict(json.loads(raw))

    async def source(self, job_id: str) -> bytes | None:
        async with self._redis_call() as r:
            data = await r.get(self._src_key(job_id))
        return None if data is None else bytes(data)

    async def counts(self) -> dict[str, int]:
        async with self._redis_call() as r, r.pipeline(transaction=False) as pipe:
            for state in State:
                pipe.scard(self._state_key(state))
            values = await pipe.execute()
        return {state.value: int(n) for state, n in zip(State, values, strict=True)}

    async def prune(self, older_than_s: float) -> int:
        async with self._redis_call() as r:
            cutoff = time.time() - older_than_s
            found: list[bytes] = await r.zrangebyscore(self._finished_key, "-inf", cutoff)
            ids = [i.decode() for i in found]
            if not ids:
                return 0
            async with r.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.lrange(self._job_events_key(job_id), 0, -1)
                event_ids = [e.decode() for batch in await pipe.execute() for e in batch]
            owners = self._owners(await r.mget([self._job_key(i) for i in ids]), ids)
            async with r.pipeline(transaction=True) as pipe:
                for name, owned in owners.items():
                    pipe.zrem(self._by_key_key(name), *owned)
                pipe.delete(*(self._job_key(i) for i in ids))
                pipe.delete(*(self._job_events_key(i) for i in ids))
                if event_ids:
                    pipe.delete(*(self._event_key(e) for e in event_ids))
                    pipe.zrem(self._due_events_key, *event_ids)
                for state in State:
                    pipe.srem(self._state_key(state), *ids)
                    pipe.zrem(self._by_state_key(state), *ids)
                pipe.zrem(self._created_key, *ids)
                pipe.zrem(self._finished_key, *ids)
                await pipe.execute()
        return len(ids)

    @staticmethod
    def _owners(raws: list[Any], ids: list[str]) -> dict[str, list[str]]:
        """The jobs of ``ids`` (records ``raws``) by the API key that submitted them."""
        owners: dict[str, list[str]] = {}
        for job_id, raw in zip(ids, raws, strict=True):
            name = json.loads(raw).get("key") if raw is not None else None
            if name is not None:
                owners.setdefault(name, []).append(job_id)
        return owners

    async def nodes(self) -> list[dict[str, Any]]:
        async with self._redis_call() as r:
            keys = [k async for k in r.scan_iter(match=f"{self.prefix}:node:*")]
            values = await r.mget(keys) if keys else []
        return [json.loads(v) for v in values if v]

    async def announce(self, node: dict[str, Any]) -> None:
        async with self._redis_call() as r:
            await r.set(f"{self.prefix}:node:{node['name']}", json.dumps(node), ex=15)

    # --- the worker side -------------------------------------------------------------------

    async def _update(
        self,
        job_id: str,
        change: Callable[[JobRecord], None],
        event: Event | None = None,
        *,
        cancelling: bool = False,
    ) -> JobRecord:
        """Read, change and write one job atomically (WATCH on its key: a concurrent
        change makes this read again), with its event when the change ends it. An
        ended job is left as it is (a late duplicate: the first end stands), except
        that ``cancelling`` refuses it (JobNotCancellable)."""
        key = self._job_key(job_id)
        async with self._redis_call() as r, r.pipeline(transaction=True) as pipe:
            while True:
                await pipe.watch(key)
                raw = await pipe.get(key)
                if raw is None:
                    raise errors.JobNotFound(job_id)
                record = JobRecord.from_dict(json.loads(raw))
                before = record.state
                if cancelling:
                    record.check_cancellable()
                elif record.finished:
                    return record
                change(record)
                pipe.multi()  # type: ignore[no-untyped-call]
                self._write(pipe, record, before, event)
                try:
                    await pipe.execute()
                except redis.exceptions.WatchError:
                    continue  # changed by someone else since we read it: again
                return record

    def _write(self, pipe: Any, record: JobRecord, before: State, event: Event | None) -> None:
        """Queue (in a MULTI) the writes of a changed record and what goes with it."""
        job_id = record.id
        ended = record.finished
        ttl = self._finished_ttl_s() if ended else None
        pipe.set(self._job_key(job_id), json.dumps(record.to_dict()), ex=ttl)
        if record.state is not before:
            for state in State:
                if state is not record.state:
                    pipe.srem(self._state_key(state), job_id)
                    pipe.zrem(self._by_state_key(state), job_id)
            pipe.sadd(self._state_key(record.state), job_id)
            pipe.zadd(self._by_state_key(record.state), {job_id: record.created_at})
            self._add_change(pipe, record)
        if (
            record.state is State.QUEUED
            and record.priority == "interactive"
            and record.run_at > time.time()
        ):
            pipe.zadd(self._deferred_key, {job_id: record.run_at * 1000})
        if record.state is State.CANCELLED:
            # Out of arq's queue, so no worker takes it (and _deliver skips it if one
            # already read it).
            pipe.zrem(self.queue_name, job_id)
            pipe.delete(job_key_prefix + job_id, retry_key_prefix + job_id)
            pipe.zrem(self._deferred_key, job_id)
        if ended:
            pipe.zadd(self._finished_key, {job_id: record.finished_at or time.time()})
            pipe.delete(self._src_key(job_id))
            if event is not None:
                pipe.set(self._event_key(event.id), json.dumps(event.to_dict()), ex=ttl)
                if event.state == "pending":
                    pipe.zadd(self._due_events_key, {event.id: event.next_at})
                pipe.rpush(self._job_events_key(job_id), event.id)
                pipe.expire(self._job_events_key(job_id), ttl)

    async def complete(
        self, job_id: str, output_bytes: list[int] | None = None, event: Event | None = None
    ) -> None:
        await self._update(job_id, lambda record: record.mark_done(output_bytes), event)

    async def fail(self, job_id: str, code: int, detail: str, event: Event | None = None) -> None:
        await self._update(job_id, lambda record: record.mark_failed(code, detail), event)

    async def retry(self, job_id: str, delay_s: float, code: int, detail: str) -> None:
        await self._update(job_id, lambda record: record.mark_retry(delay_s, code, detail))
        # arq re-schedules the job when its function raises Retry (see _deliver).
        self._retries[job_id] = delay_s

    async def cancel(self, job_id: str, event: Event | None = None) -> JobRecord:
        return await self._update(job_id, JobRecord.mark_cancelled, event, cancelling=True)

    # --- listing and the change feed ---------------------------------------------------

    async def list_jobs(
        self, state: State | None, limit: int, cursor: str | None, *, key: str | None = None
    ) -> tuple[list[JobRecord], str | None]:
        # One sorted set per state (kept in the same MULTI as the state sets): a page
        # of 50 failed jobs among 100k done ones reads 51 entries, not 100k records.
        # With a key, its own index; a state then is checked against the state's set.
        if key is not None:
            index = self._by_key_key(key)
        else:
            index = self._created_key if state is None else self._by_state_key(state)
        state_filter = self._by_state_key(state) if key is not None and state else None
        after = decode_list_cursor(cursor) if cursor is not None else None
        top: float | str = "+inf" if after is None else after[0]
        want = limit + 1
        entries: list[tuple[str, float]] = []
        async with self._redis_call() as r:
            offset = 0
            while len(entries) < want:
                # Filtering by state drops entries: read more at a time.
                num = want - len(entries) if state_filter is None else max(want, 200)
                batch: list[tuple[bytes, float]] = await r.zrevrangebyscore(
                    index, top, "-inf", start=offset, num=num, withscores=True
                )
                if not batch:
                    break
                offset += len(batch)
                if state_filter is not None:
                    members = [member.decode() for member, _ in batch]
                    scores = await r.zmscore(state_filter, members)
                    batch = [e for e, s in zip(batch, scores, strict=True) if s is not None]
                for member, score in batch:
                    job_id = member.decode()
                    # Ties on created_at are ordered by id, as the cursor is.
                    if after is not None and score == after[0] and job_id >= after[1]:
                        continue
                    entries.append((job_id, score))
            shown = entries[:limit]
            raws = await r.mget([self._job_key(job_id) for job_id, _ in shown]) if shown else []
        # A finished record may have expired before prune dropped its index entry.
        page = [JobRecord.from_dict(json.loads(raw)) for raw in raws if raw is not None]
        more = len(entries) > limit and bool(shown)
        return page, encode_list_cursor(shown[-1][1], shown[-1][0]) if more else None

    async def changes(self, after: str | None, limit: int) -> list[Change]:
        if after is not None and not _STREAM_ID.fullmatch(after):
            raise bad_change_id(after)
        async with self._redis_call() as r:
            try:
                found = await r.xrange(
                    self._changes_key, min="-" if after is None else f"({after}", count=limit
                )
            except redis.exceptions.ResponseError as exc:  # an id out of range
                raise bad_change_id(after or "") from exc
        return [
            Change(
                entry_id.decode(),
                fields[b"job_id"].decode(),
                State(fields[b"state"].decode()),
                float(fields[b"at"]),
            )
            for entry_id, fields in found
        ]

    async def change_cursor(self) -> str | None:
        async with self._redis_call() as r:
            newest = await r.xrevrange(self._changes_key, count=1)
        return newest[0][0].decode() if newest else None

    # --- the outbox --------------------------------------------------------------------

    async def claim_events(self, limit: int, lease_s: float) -> list[Event]:
        now = time.time()
        until = now + lease_s
        async with self._redis_call():  # the script is bound to the pool it opens
            raws = await self._claim_script(
                keys=[self._due_events_key],
                args=[repr(now), repr(until), limit, f"{self.prefix}:event:"],
            )
        claimed = [Event.from_dict(json.loads(raw)) for raw in raws]
        for event in claimed:
            event.next_at = until  # the due set holds the lease; the JSON the last save
        return claimed

    async def save_event(self, event: Event) -> None:
        async with self._redis_call() as r, r.pipeline(transaction=True) as pipe:
            # XX: an event pruned with its job meanwhile is not brought back.
            pipe.set(self._event_key(event.id), json.dumps(event.to_dict()), xx=True, keepttl=True)
            if event.state == "pending":
                pipe.zadd(self._due_events_key, {event.id: event.next_at})
            else:
                pipe.zrem(self._due_events_key, event.id)
            await pipe.execute()

    async def job_events(self, job_id: str) -> list[Event]:
        async with self._redis_call() as r:
            listed: list[bytes] = await r.lrange(self._job_events_key(job_id), 0, -1)  # type: ignore[misc]
            ids = [e.decode() for e in listed]
            if not ids:
                return []
            async with r.pipeline(transaction=False) as pipe:
                pipe.mget([self._event_key(e) for e in ids])
                pipe.zmscore(self._due_events_key, ids)
                raws, due = await pipe.execute()
        events = []
        for raw, next_at in zip(raws, due, strict=True):
            if raw is None:
                continue
            event = Event.from_dict(json.loads(raw))
            if event.state == "pending" and next_at is not None:
                event.next_at = float(next_at)  # a lease moves only the due set
            events.append(event)
        return events

    # --- idempotency keys --------------------------------------------------------------

    async def reserve_key(self, key: str, fingerprint: str, ttl_s: float) -> KeyEntry | None:
        name = self._idem_key(key)
        held = json.dumps({"fingerprint": fingerprint, "reply": None})
        async with self._redis_call() as r:
            while True:
                if await r.set(name, held, nx=True, px=max(1, int(ttl_s * 1000))):
                    return None
                raw = await r.get(name)
                if raw is not None:
                    found = json.loads(raw)
                    return KeyEntry(found["fingerprint"], found["reply"])
                # it expired between the two calls: try to take it again

    async def finish_key(self, key: str, reply: dict[str, Any], ttl_s: float) -> None:
        name = self._idem_key(key)
        async with self._redis_call() as r, r.pipeline(transaction=True) as pipe:
            while True:
                await pipe.watch(name)
                raw = await pipe.get(name)
                if raw is None:
                    return  # released or expired: nothing holds it any more
                entry = json.loads(raw)
                entry["reply"] = reply
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.set(name, json.dumps(entry), px=max(1, int(ttl_s * 1000)))
                try:
                    await pipe.execute()
                except redis.exceptions.WatchError:
                    continue
                return

    async def release_key(self, key: str) -> None:
        async with self._redis_call() as r:
            await r.delete(self._idem_key(key))

    # --- delivery ----------------------------------------------------------------------

    async def _deliver(self, handler: Handler, job_id: str, job_try: int) -> None:
        self._retries.pop(job_id, None)
        current = await self.get(job_id)
        if current is None or current.finished:
            return  # delivered again after it ended, or cancelled: nothing to do

        record = await self._update(job_id, lambda record: record.mark_running(job_try))
        if record.state is not State.RUNNING:
            return  # it ended (was cancelled) between the two reads
        # End before arq's own timeout would drop the job with its status unset.
        problem = await run_delivery(handler, record, self.job_deadline_s - 1.0)
        asked = self._retries.pop(job_id, None)
        if problem is not None:
            delay = redelivery_delay_s(job_try)
            log.error("job %s: %s; delivering it again in %.1f s", job_id, problem, delay)
            await self.retry(job_id, delay, errors.InternalError.code, problem)
            self._retries.pop(job_id, None)
            raise Retry(defer=delay)
        if asked is not None:
            raise Retry(defer=asked)

    async def consume(self, handler: Handler, concurrency: int, stopping: asyncio.Event) -> None:
        async def job(ctx: dict[str, Any], job_id: str) -> None:
            try:
                await self._deliver(handler, job_id, int(ctx["job_try"]))
            except Retry:
                raise
            except Exception as exc:
                # Redis itself failed around the handler; a job must never end in
                # arq with its status unset. arq may fail to write the retry too,
                # leaving its lease behind: hand the job back once Redis answers.
                self._abandoned.add(job_id)
                delay = redelivery_delay_s(int(ctx["job_try"]))
                log.warning("job %s: %s; delivering it again in %.1f s", job_id, exc, delay)
                raise Retry(defer=delay) from exc

        promoter = asyncio.create_task(self._keep_lanes(stopping))
        try:
            await self._run_workers(job, concurrency, stopping)
        finally:
            promoter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await promoter

    async def _keep_lanes(self, stopping: asyncio.Event) -> None:
        """Give due interactive retries their lane back (see _PROMOTE), every
        PROMOTE_EVERY_S, as often as arq's workers poll."""
        while not stopping.is_set():
            try:
                async with self._redis_call():
                    await self._promote_script(
                        keys=[self._deferred_key, self.queue_name],
                        args=[int(time.time() * 1000), LANE_OFFSET_MS],
                    )
            except (errors.QueueUnavailable, redis.exceptions.RedisError) as exc:
                log.debug("lanes: promoting due retries failed (%s); next round", exc)
            await asyncio.sleep(PROMOTE_EVERY_S)

    async def _run_workers(self, job: Any, concurrency: int, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            await self._hand_back_abandoned()
            worker = Worker(
                functions=[func(job, name=JOB_FUNCTION, max_tries=_ARQ_MAX_TRIES)],
                redis_settings=self.redis_settings,
                queue_name=self.queue_name,
                max_jobs=concurrency,
                job_timeout=self.job_deadline_s,  # the lease is this + 10 s
                keep_result=0,
                poll_delay=0.05,
                handle_signals=False,
                retry_jobs=True,
                max_tries=_ARQ_MAX_TRIES,
                health_check_interval=60,
            )
            main = asyncio.create_task(worker.async_run())
            waiter = asyncio.create_task(stopping.wait())
            try:
                await asyncio.wait({main, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if main.done():
                    problem = main.exception() if not main.cancelled() else None
                    log.warning("queue connection lost (%s); reconnecting in 1 s", problem)
                    await asyncio.sleep(1.0)
                    continue
                worker.allow_pick_jobs = False  # stopping: take nothing new
                running = [t for t in worker.tasks.values() if not t.done()]
                if running:
                    await asyncio.wait(running)
            finally:
                waiter.cancel()
                # Cancelled jobs go straight back to arq's queue for another worker.
                with contextlib.suppress(Exception):
                    await asyncio.shield(worker.close())

    async def _hand_back_abandoned(self) -> None:
        """Drop arq's lease on jobs whose delivery here failed with Redis itself:
        their function has ended, so no runner holds them, and without this they
        would wait for the lease to run out (the whole delivery deadline)."""
        if not self._abandoned:
            return
        ids = list(self._abandoned)
        try:
            async with self._redis_call() as r:
                await r.delete(*(in_progress_key_prefix + job_id for job_id in ids))
        except errors.QueueUnavailable:
            return  # still down: next round
        self._abandoned.difference_update(ids)
        log.info("handed back %d jobs whose delivery failed while Redis was down", len(ids))

    async def close(self) -> None:
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose(close_connection_pool=True)
            self._redis = None

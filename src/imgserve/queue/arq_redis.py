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
import collections
import contextlib
import contextvars
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar
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
    from arq.jobs import serialize_job
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
_UNAVAILABLE_REPLIES = (
    "BUSY",
    "LOADING",
    "READONLY",
    "OOM",
    "MISCONF",
    "MASTERDOWN",
    "TRYAGAIN",
    "NOREPLICAS",
)
"""Error replies of a Redis that is up but cannot serve now (a slow script, a load,
a failover, full memory): the queue is unavailable (608), not broken."""
LANE_OFFSET_MS = 10**12
"""How far in the past (about 32 years) an interactive job is scored in arq's queue:
every interactive score is below every batch score, yet still positive (arq skips
a job scored 0)."""
ARQ_JOB_TTL_S = 30 * 24 * 3600.0
"""How long arq keeps a job's definition (arq's own default, a day, would let a
long batch backfill expire in the queue)."""
PROMOTE_EVERY_S = 0.05
NODE_TTL_S = 15.0
"""A worker node not heard from for this long is left out of ``nodes()`` (they
announce themselves every 5 s)."""
RENEW_RETRY_S = 0.25
"""How soon a lease renewal that failed (Redis unreachable or busy) is tried again."""
RECONCILE_EVERY_S = 60.0
ORPHAN_GRACE_S = 60.0
"""A queued record younger than this is never taken for an orphan: a release
before 0.4 wrote the record and the enqueue in two steps."""
_STREAM_ID = re.compile(r"\d+-\d+")

_T = TypeVar("_T")

_DELIVERY: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar(
    "imgserve_redis_delivery", default=None
)
"""(job id, try) of the delivery running in this task: a write from a delivery
that lost its lease to a later try is dropped (see _update)."""

# Stores a new job and enqueues it in one step, or refuses it when the queue is
# full: a crash can never leave a record that no worker will run, and two API
# nodes cannot both take the last place (the check and the writes are atomic).
# KEYS: job, src, state:queued, state:running, created, bystate:queued, changes,
#       arq job, arq queue, bykey:<name> (the API key's index), lane:<priority>
# ARGV: id, record, created_at, max_active, keep_changes, now, arq job, arq job
#       ttl ms, arq score, keep source (0/1), source, has a key (0/1)
_PUT = """
local active = redis.call('SCARD', KEYS[3]) + redis.call('SCARD', KEYS[4])
if active >= tonumber(ARGV[4]) then return {'full', active} end
if redis.call('EXISTS', KEYS[1], KEYS[8]) > 0 then return {'exists', 0} end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[5], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[6], ARGV[3], ARGV[1])
if ARGV[10] == '1' then redis.call('SET', KEYS[2], ARGV[11]) end
redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[5], '*',
           'job_id', ARGV[1], 'state', 'queued', 'at', ARGV[6])
redis.call('PSETEX', KEYS[8], ARGV[8], ARGV[7])
redis.call('ZADD', KEYS[9], ARGV[9], ARGV[1])
if ARGV[12] == '1' then redis.call('ZADD', KEYS[10], ARGV[3], ARGV[1]) end
redis.call('SADD', KEYS[11], ARGV[1])
return {'ok', 0}
"""
# Renews the lease of a running try: 1 while it is still this try's, else 0
# (a later try took the job over: arq's retry counter moved on; or the lease ran
# out). PEXPIRE XX only shortens or extends a key that exists: a renewal never
# re-creates a lease arq deleted.
# KEYS: arq in-progress, arq retry; ARGV: lease ms, try
_RENEW = """
local try = redis.call('GET', KEYS[2])
if not try or tonumber(try) ~= tonumber(ARGV[2]) then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[1], 'XX')
"""
# Drops the lease of a try that ended here without arq being told (Redis was
# down), unless a later try holds the job by now. KEYS, ARGV as _RENEW.
_RELEASE = """
local try = redis.call('GET', KEYS[2])
if try and tonumber(try) == tonumber(ARGV[2]) then return redis.call('DEL', KEYS[1]) end
return 0
"""
# A node's heartbeat: its score in the nodes ZSET and its info in a hash; nodes
# silent for NODE_TTL_S are dropped from both.
# KEYS: nodes, node info; ARGV: now, stale before, name, info
_ANNOUNCE = """
for _, name in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])) do
  redis.call('HDEL', KEYS[2], name)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
return 1
"""
# Enqueues an orphan again: a record still queued or running that arq has no job
# for (left by a release that wrote the two apart, or whose arq job expired).
# Checked and written in one step, so a job that ends meanwhile is left alone.
# KEYS: state:queued, state:running, arq job, arq queue, arq in-progress
# ARGV: id, arq job, arq job ttl ms, arq score
_REQUEUE = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0
   and redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[5]) == 1 then return 0 end
local fixed = 0
if redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('PSETEX', KEYS[3], ARGV[3], ARGV[2])
  fixed = 1
end
if not redis.call('ZSCORE', KEYS[4], ARGV[1]) then
  redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
  fixed = 1
end
return fixed
"""

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

_SCRIPTS = {
    "claim_events": _CLAIM_EVENTS,
    "promote": _PROMOTE,
    "put": _PUT,
    "renew": _RENEW,
    "release": _RELEASE,
    "announce": _ANNOUNCE,
    "requeue": _REQUEUE,
}


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
        lease_s: float = 30.0,
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
        self.lease_s = lease_s
        """How long a running job is held without a renewal: how soon a dead
        node's jobs run elsewhere. Renewed every lease_s / 3 while the job runs."""
        self._redis: ArqRedis | None = None
        self._scripts: dict[str, Any] = {}
        self._retries: dict[str, float] = {}
        self._abandoned: dict[str, int] = {}
        """Jobs (and their try) whose delivery here ended without arq being told."""
        self._lost: set[tuple[str, int]] = set()
        """Tries whose write _update dropped: a later try owns the job."""
        self._finishing: dict[str, int] = {}
        """Tries whose delivery failed with Redis: abandoned if arq's finish fails too."""
        self._foreign_finishes: collections.Counter[str] = collections.Counter()
        """arq finishes to skip: of tries that lost their job to a later try."""

    # --- keys and connection -------------------------------------------------------------

    def _job_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def _src_key(self, job_id: str) -> str:
        return f"{self.prefix}:src:{job_id}"

    def _state_key(self, state: State) -> str:
        return f"{self.prefix}:state:{state.value}"

    def _by_state_key(self, state: State) -> str:
        return f"{self.prefix}:bystate:{state.value}"

    def _lane_key(self, priority: str) -> str:
        """The queued jobs of one lane (lanes(); a job is in it while it is queued)."""
        return f"{self.prefix}:lane:{priority}"

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

    @property
    def _nodes_key(self) -> str:
        return f"{self.prefix}:nodes"

    @property
    def _node_info_key(self) -> str:
        return f"{self.prefix}:node-info"

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
                self._scripts = {
                    name: self._redis.register_script(source) for name, source in _SCRIPTS.items()
                }
            yield self._redis
        except _CONNECTION_ERRORS as exc:
            raise errors.QueueUnavailable(f"Redis: {exc}") from exc
        except redis.exceptions.ResponseError as exc:
            if str(exc).startswith(_UNAVAILABLE_REPLIES):  # Redis is there, but not serving
                raise errors.QueueUnavailable(f"Redis: {exc}") from exc
            raise

    # --- the API side ----------------------------------------------------------------------

    async def put(self, record: JobRecord, source: bytes, *, max_active: int) -> None:
        if record.priority not in PRIORITIES:
            raise ValueError(f"priority {record.priority!r}")  # a caller's bug
        now = time.time()
        keep_source = len(source) <= self.max_source_bytes
        async with self._redis_call():
            outcome, active = await self._scripts["put"](
                keys=[
                    self._job_key(record.id),
                    self._src_key(record.id),
                    self._state_key(State.QUEUED),
                    self._state_key(State.RUNNING),
                    self._created_key,
                    self._by_state_key(State.QUEUED),
                    self._changes_key,
                    job_key_prefix + record.id,
                    self.queue_name,
                    # API keys (#15): the per-key index list_jobs(key=) reads.
                    self._by_key_key(record.key) if record.key else self._job_key(record.id),
                    self._lane_key(record.priority),
                ],
                args=[
                    record.id,
                    json.dumps(record.to_dict()),
                    repr(record.created_at),
                    max_active,
                    self.keep_changes,
                    repr(now),
                    *self._arq_job(record.id, record.priority, now),
                    "1" if keep_source else "0",
                    source if keep_source else b"",
                    "1" if record.key else "0",
                ],
            )
        if outcome == b"full":
            raise errors.QueueFull(f"{active} jobs waiting, the limit is {max_active}")
        if outcome != b"ok":
            raise errors.InternalError(f"job id {record.id} already queued")

    def _arq_job(
        self, job_id: str, priority: str, now: float, *, job_try: int | None = None
    ) -> tuple[bytes, int, int]:
        """What arq's enqueue_job writes for a job due now, in its lane: the job's
        definition, its TTL (ms) and its score in arq's queue."""
        now_ms = int(now * 1000)
        definition = serialize_job(JOB_FUNCTION, (job_id,), {}, job_try, now_ms)
        score = now_ms - LANE_OFFSET_MS if priority == "interactive" else now_ms
        return definition, int(ARQ_JOB_TTL_S * 1000), score

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
        async def read() -> bytes | None:
            async with self._redis_call() as r:
                data = await r.get(self._src_key(job_id))
            return None if data is None else bytes(data)

        return await self._through_outage(read)

    async def _through_outage(self, call: Callable[[], Awaitable[_T]]) -> _T:
        """``call()``, tried again every RENEW_RETRY_S while Redis is unavailable, for
        as long as a lease outlives an outage (two thirds of it, see _run_leased):
        a running try's own reads and writes ride out a Redis restart instead of
        costing the job an attempt (a redelivery for a fault that is not the job's)."""
        give_up_at = time.monotonic() + self.lease_s * 2 / 3
        warned = False
        while True:
            try:
                return await call()
            except errors.QueueUnavailable as exc:
                if time.monotonic() + RENEW_RETRY_S > give_up_at:
                    raise
                if not warned:
                    log.warning("%s; trying again while the lease lasts", exc)
                    warned = True
            await asyncio.sleep(RENEW_RETRY_S)

    async def counts(self) -> dict[str, int]:
        async with self._redis_call() as r, r.pipeline(transaction=False) as pipe:
            for state in State:
                pipe.scard(self._state_key(state))
            values = await pipe.execute()
        return {state.value: int(n) for state, n in zip(State, values, strict=True)}

    async def lanes(self) -> dict[str, int]:
        async with self._redis_call() as r, r.pipeline(transaction=False) as pipe:
            for lane in PRIORITIES:
                pipe.scard(self._lane_key(lane))
            values = await pipe.execute()
        return {lane: int(n) for lane, n in zip(PRIORITIES, values, strict=True)}

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
        # O(nodes), whatever the number of jobs: no keyspace scan.
        async with self._redis_call() as r:
            fresh: list[bytes] = await r.zrangebyscore(
                self._nodes_key, time.time() - NODE_TTL_S, "+inf"
            )
            values = await r.hmget(self._node_info_key, fresh) if fresh else []  # type: ignore[misc]
        return [json.loads(v) for v in values if v]

    async def announce(self, node: dict[str, Any]) -> None:
        now = time.time()
        async with self._redis_call():
            await self._scripts["announce"](
                keys=[self._nodes_key, self._node_info_key],
                args=[repr(now), repr(now - NODE_TTL_S), node["name"], json.dumps(node)],
            )

    async def leave(self, name: str) -> None:
        async with self._redis_call() as r, r.pipeline(transaction=True) as pipe:
            pipe.zrem(self._nodes_key, name)
            pipe.hdel(self._node_info_key, name)
            await pipe.execute()

    # --- the worker side -------------------------------------------------------------------

    async def _update(
        self,
        job_id: str,
        change: Callable[[JobRecord], None],
        event: Event | None = None,
        *,
        cancelling: bool = False,
        by_runner: bool = False,
    ) -> JobRecord:
        """Read, change and write one job atomically (WATCH on its key: a concurrent
        change makes this read again), with its event when the change ends it. An
        ended job is left as it is (a late duplicate: the first end stands), except
        that ``cancelling`` refuses it (JobNotCancellable). ``by_runner``: the change
        comes from a delivery, and is dropped if a later try has taken the job
        over (this one lost its lease)."""
        if by_runner:  # a running try: ride out a Redis restart (see _through_outage)
            return await self._through_outage(
                lambda: self._update_once(job_id, change, event, cancelling, _DELIVERY.get())
            )
        return await self._update_once(job_id, change, event, cancelling, None)

    async def _update_once(
        self,
        job_id: str,
        change: Callable[[JobRecord], None],
        event: Event | None,
        cancelling: bool,
        delivery: tuple[str, int] | None,
    ) -> JobRecord:
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
                elif (
                    delivery is not None and delivery[0] == job_id and record.attempts > delivery[1]
                ):
                    log.warning(
                        "job %s: try %d lost its lease to try %d; its write is dropped",
                        job_id,
                        delivery[1],
                        record.attempts,
                    )
                    self._lost.add(delivery)
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
            if record.state is State.QUEUED:
                pipe.sadd(self._lane_key(record.priority), job_id)
            else:
                pipe.srem(self._lane_key(record.priority), job_id)
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
        self,
        job_id: str,
        output_bytes: list[int] | None = None,
        event: Event | None = None,
        previews: list[dict[str, Any]] | None = None,
    ) -> None:
        await self._update(
            job_id, lambda record: record.mark_done(output_bytes, previews), event, by_runner=True
        )

    async def fail(self, job_id: str, code: int, detail: str, event: Event | None = None) -> None:
        await self._update(
            job_id, lambda record: record.mark_failed(code, detail), event, by_runner=True
        )

    async def retry(self, job_id: str, delay_s: float, code: int, detail: str) -> None:
        await self._update(
            job_id, lambda record: record.mark_retry(delay_s, code, detail), by_runner=True
        )
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
            raws = await self._scripts["claim_events"](
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

        _DELIVERY.set((job_id, job_try))  # this task's writes: see _update
        record = await self._update(
            job_id, lambda record: record.mark_running(job_try), by_runner=True
        )
        if (job_id, job_try) in self._lost:
            raise _LeaseLost  # a later try marked it running first
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

    async def _renew(self, job_id: str, job_try: int) -> bool:
        """Set this try's lease to lease_s from now; False when the job is no longer
        this try's (a later try took it over, or the lease ran out)."""
        async with self._redis_call():
            held = await self._scripts["renew"](
                keys=[in_progress_key_prefix + job_id, retry_key_prefix + job_id],
                args=[max(1, int(self.lease_s * 1000)), job_try],
            )
        return bool(held)

    async def _run_leased(self, job_id: str, job_try: int, body: Callable[[], Any]) -> None:
        """Run ``body`` while this try holds the job's lease: shortened to lease_s
        before the body starts, renewed every lease_s / 3 while it runs. A try that
        lost the lease (its node stalled or was cut off longer than the lease, and
        another try took over) is stopped (_LeaseLost) instead of racing the new
        owner. Redis being unreachable is not a lost lease: the renewal goes on
        trying, and decides once Redis answers."""
        if not await self._renew(job_id, job_try):
            raise _LeaseLost
        inner = asyncio.ensure_future(body())
        lost = False

        async def keep() -> None:
            nonlocal lost
            every_s = self.lease_s / 3
            wait_s = every_s
            while True:
                await asyncio.sleep(wait_s)
                try:
                    held = await self._renew(job_id, job_try)
                except Exception as exc:  # Redis down, BUSY, READONLY...: not a lost lease
                    if wait_s == every_s:  # the first failure of a run of them
                        log.warning("job %s: lease renewal failed (%s); retrying", job_id, exc)
                    # Soon, not a third of a lease later: the lease then survives an
                    # outage of up to two thirds of it, not one third.
                    wait_s = min(every_s, RENEW_RETRY_S)
                    continue
                wait_s = every_s
                if not held:
                    lost = True
                    inner.cancel()
                    return

        keeper = asyncio.create_task(keep())
        try:
            await inner
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if lost and (current is None or not current.cancelling()):
                raise _LeaseLost from None
            raise
        except Exception:
            if lost or (job_id, job_try) in self._lost:
                raise _LeaseLost from None  # its retry was dropped: a later try owns it
            raise
        finally:
            keeper.cancel()
            with contextlib.suppress(BaseException):
                await keeper
        if lost or (job_id, job_try) in self._lost:
            raise _LeaseLost  # its end was dropped: a later try owns the job

    async def consume(self, handler: Handler, concurrency: int, stopping: asyncio.Event) -> None:
        async def job(ctx: dict[str, Any], job_id: str) -> None:
            job_try = int(ctx["job_try"])
            try:
                await self._run_leased(
                    job_id, job_try, lambda: self._deliver(handler, job_id, job_try)
                )
            except _LeaseLost:
                # Another try owns the job: arq must not touch its queue entry or
                # lease (see _Worker.finish_job); the new owner ends it.
                self._foreign_finishes[job_id] += 1
                log.warning("job %s: try %d lost its lease; stopped here", job_id, job_try)
                raise Retry() from None
            except Retry:
                raise
            except Exception as exc:
                # Redis itself failed around the handler; a job must never end in
                # arq with its status unset. arq may fail to write the retry too,
                # leaving its lease behind: then the job is handed back once Redis
                # answers (_Worker.finish_job).
                self._finishing[job_id] = job_try
                delay = redelivery_delay_s(job_try)
                log.warning("job %s: %s; delivering it again in %.1f s", job_id, exc, delay)
                raise Retry(defer=delay) from exc
            finally:
                self._lost.discard((job_id, job_try))

        helpers = [
            asyncio.create_task(self._keep_lanes(stopping)),
            asyncio.create_task(self._keep_reconciling(stopping)),
        ]
        try:
            await self._run_workers(job, concurrency, stopping)
        finally:
            for task in helpers:
                task.cancel()
            for task in helpers:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _keep_lanes(self, stopping: asyncio.Event) -> None:
        """Give due interactive retries their lane back (see _PROMOTE), every
        PROMOTE_EVERY_S, as often as arq's workers poll."""
        while not stopping.is_set():
            try:
                async with self._redis_call():
                    await self._scripts["promote"](
                        keys=[self._deferred_key, self.queue_name],
                        args=[int(time.time() * 1000), LANE_OFFSET_MS],
                    )
            except (errors.QueueUnavailable, redis.exceptions.RedisError) as exc:
                log.debug("lanes: promoting due retries failed (%s); next round", exc)
            await asyncio.sleep(PROMOTE_EVERY_S)

    async def _keep_reconciling(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                found = await self.reconcile()
            except (errors.QueueUnavailable, redis.exceptions.RedisError) as exc:
                log.debug("reconcile: %s; next round", exc)
            else:
                if found:
                    log.warning("queued again %d jobs that arq had no entry for", found)
            with contextlib.suppress(TimeoutError):  # (not wait_for: 3.11 can lose a cancel)
                async with asyncio.timeout(RECONCILE_EVERY_S):
                    await stopping.wait()

    async def reconcile(self) -> int:
        """Find records still queued or running that arq has no job for (left by a
        release that wrote the record and the enqueue apart, or whose arq job
        expired) and enqueue them again; their delivery then ends them as usual
        (one that can no longer run, say an upload whose copy is gone, fails with
        its code). Return how many."""
        async with self._redis_call() as r:
            ids = sorted(
                {m.decode() for m in await r.smembers(self._state_key(State.QUEUED))}  # type: ignore[misc]
                | {m.decode() for m in await r.smembers(self._state_key(State.RUNNING))}  # type: ignore[misc]
            )
            if not ids:
                return 0
            async with r.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.exists(job_key_prefix + job_id)
                    pipe.zscore(self.queue_name, job_id)
                found = await pipe.execute()
            suspects = [
                job_id
                for job_id, has_job, score in zip(ids, found[::2], found[1::2], strict=True)
                if not has_job or score is None
            ]
            raws = await r.mget([self._job_key(i) for i in suspects]) if suspects else []
            fixed = 0
            now = time.time()
            for job_id, raw in zip(suspects, raws, strict=True):
                if raw is None:
                    continue
                record = JobRecord.from_dict(json.loads(raw))
                if record.state is State.QUEUED and now - record.created_at < ORPHAN_GRACE_S:
                    continue  # an older API node may be between its two writes
                # The next try keeps counting (arq takes a try number above its
                # own counter), and a retry waiting for its time keeps waiting.
                definition, ttl_ms, score = self._arq_job(
                    job_id, record.priority, now, job_try=record.attempts + 1
                )
                if record.state is State.QUEUED and record.run_at > now:
                    score = int(record.run_at * 1000)
                fixed += await self._scripts["requeue"](
                    keys=[
                        self._state_key(State.QUEUED),
                        self._state_key(State.RUNNING),
                        job_key_prefix + job_id,
                        self.queue_name,
                        in_progress_key_prefix + job_id,
                    ],
                    args=[job_id, definition, ttl_ms, score],
                )
        return int(fixed)

    async def recover(self) -> int:
        return await self.reconcile()

    async def _check_server(self) -> bool:
        """Whether Redis answers; DependencyMissing (609) when it is older than 7.0,
        whose PEXPIRE lacks the XX the lease renewal uses."""
        try:
            async with self._redis_call() as r:
                info = await r.info("server")
        except errors.QueueUnavailable as exc:
            log.warning("queue: %s; trying again in 1 s", exc.detail)
            return False
        version = str(info.get("redis_version", "0"))
        if tuple(int(part) for part in version.split(".")[:2] if part.isdigit()) < (7, 0):
            raise errors.DependencyMissing(
                f"Redis {version}: worker nodes need Redis 7.0 or later (docs/queue.md)"
            )
        return True

    async def _run_workers(self, job: Any, concurrency: int, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            if not await self._check_server():
                await asyncio.sleep(1.0)
                continue
            await self._hand_back_abandoned()
            worker = _Worker(
                self,
                functions=[func(job, name=JOB_FUNCTION, max_tries=_ARQ_MAX_TRIES)],
                redis_settings=self.redis_settings,
                queue_name=self.queue_name,
                max_jobs=concurrency,
                job_timeout=self.job_deadline_s,
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
        would wait for the lease to run out. A lease a later try holds by now is
        left alone (_RELEASE)."""
        if not self._abandoned:
            return
        taken = dict(self._abandoned)
        try:
            async with self._redis_call():
                for job_id, job_try in taken.items():
                    await self._scripts["release"](
                        keys=[in_progress_key_prefix + job_id, retry_key_prefix + job_id],
                        args=[1, job_try],
                    )
        except errors.QueueUnavailable:
            return  # still down: next round
        for job_id in taken:
            self._abandoned.pop(job_id, None)
        log.info("handed back %d jobs whose delivery failed while Redis was down", len(taken))

    async def close(self) -> None:
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose(close_connection_pool=True)
            self._redis = None


class _LeaseLost(Exception):
    """This try no longer holds its job: a later try does."""


class _Worker(Worker):
    """arq's worker, with imgserve's lease: arq's own in-progress key is set to the
    short lease from the start (arq sets it to the job timeout + 10 s), and a try
    that lost its job to a later try leaves arq's entries alone at its end (they
    are the new owner's: deleting its lease would let a third node run the job).
    A Redis failure does not stop the jobs running here: the poll loop waits for
    Redis instead of failing (which would cancel them all)."""

    def __init__(self, queue: RedisQueue, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.in_progress_timeout_s = queue.lease_s
        self._queue = queue
        self._foreign = queue._foreign_finishes

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        # A job still running here is not claimed again here (its lease ran out
        # while it ran: the owner check stops it; a second try on this node would
        # share arq's per-job bookkeeping with it).
        fresh = [j for j in job_ids if not self._running_here(j.decode())]
        try:
            await super().start_jobs(fresh)
        except Exception:
            # arq takes a job slot before its first Redis call of a claim and gives
            # it back on every path but an exception: give it back here.
            self.job_counter -= 1
            self.sem.release()
            raise

    def _running_here(self, job_id: str) -> bool:
        task = self.tasks.get(job_id)
        return task is not None and not task.done()

    async def finish_job(self, job_id: str, *args: Any, **kwargs: Any) -> None:
        if self._foreign[job_id] > 0:
            self._foreign[job_id] -= 1
            if not self._foreign[job_id]:
                del self._foreign[job_id]
            return
        handing_back = self._queue._finishing.pop(job_id, None)
        try:
            await super().finish_job(job_id, *args, **kwargs)
        except Exception:
            if handing_back is not None:  # its lease stays: hand it back once Redis answers
                self._queue._abandoned[job_id] = handing_back
            raise

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
            await self._queue._hand_back_abandoned()
        except (redis.exceptions.RedisError, OSError) as exc:
            log.warning("queue: Redis failed under the poll loop (%s); polling again in 1 s", exc)
            await asyncio.sleep(1.0)

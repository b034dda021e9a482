"""The distributed queue: Redis, with arq delivering jobs to worker nodes.

Why arq (docs/queue.md has the evidence): it is asyncio-native like the rest
of imgserve, and a job taken by a worker stays in the queue under a lease (an
"in-progress" key that expires) until it ends, so a worker node killed with
SIGKILL loses nothing: the lease runs out and another node runs the job. A job
cancelled by a graceful shutdown is handed back at once.

Beside arq's queue, imgserve keeps the status ``GET /jobs/<id>`` reports: one
JSON record per job, a set per state for the counts, and a sorted set of
finished jobs for pruning (finished records also expire on their own). The
source is kept in Redis up to ``max_source_bytes`` so a worker node does not
download it again; larger sources are downloaded by the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from imgserve import errors
from imgserve.queue.base import (
    Handler,
    JobQueue,
    JobRecord,
    State,
    redelivery_delay_s,
    run_delivery,
)

try:
    import redis.exceptions
    from arq import Retry, Worker, create_pool, func
    from arq.connections import ArqRedis, RedisSettings
    from arq.constants import in_progress_key_prefix
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
        self._redis: ArqRedis | None = None
        self._retries: dict[str, float] = {}
        self._abandoned: set[str] = set()

    # --- keys and connection -------------------------------------------------------------

    def _job_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def _src_key(self, job_id: str) -> str:
        return f"{self.prefix}:src:{job_id}"

    def _state_key(self, state: State) -> str:
        return f"{self.prefix}:state:{state.value}"

    @property
    def _finished_key(self) -> str:
        return f"{self.prefix}:finished"

    @contextlib.asynccontextmanager
    async def _redis_call(self) -> AsyncIterator[ArqRedis]:
        """The connection, with Redis failures translated into QueueUnavailable (608)."""
        try:
            if self._redis is None:
                self._redis = await create_pool(
                    self.redis_settings, default_queue_name=self.queue_name, retry=0
                )
            yield self._redis
        except _CONNECTION_ERRORS as exc:
            raise errors.QueueUnavailable(f"Redis: {exc}") from exc

    # --- the API side ----------------------------------------------------------------------

    async def put(self, record: JobRecord, source: bytes, *, max_active: int) -> None:
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
                pipe.set(self._job_key(record.id), json.dumps(record.to_dict()))
                pipe.sadd(self._state_key(State.QUEUED), record.id)
                if len(source) <= self.max_source_bytes:
                    pipe.set(self._src_key(record.id), source)
                await pipe.execute()
            try:
                job = await r.enqueue_job(JOB_FUNCTION, record.id, _job_id=record.id)
            except BaseException:
                async with r.pipeline(transaction=True) as pipe:
                    pipe.delete(self._job_key(record.id), self._src_key(record.id))
                    pipe.srem(self._state_key(State.QUEUED), record.id)
                    await pipe.execute()
                raise
            if job is None:
                raise errors.InternalError(f"job id {record.id} already queued")

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
            async with r.pipeline(transaction=True) as pipe:
                pipe.delete(*(self._job_key(i) for i in ids))
                pipe.srem(self._state_key(State.DONE), *ids)
                pipe.srem(self._state_key(State.FAILED), *ids)
                pipe.zrem(self._finished_key, *ids)
                await pipe.execute()
        return len(ids)

    async def nodes(self) -> list[dict[str, Any]]:
        async with self._redis_call() as r:
            keys = [k async for k in r.scan_iter(match=f"{self.prefix}:node:*")]
            values = await r.mget(keys) if keys else []
        return [json.loads(v) for v in values if v]

    async def announce(self, node: dict[str, Any]) -> None:
        async with self._redis_call() as r:
            await r.set(f"{self.prefix}:node:{node['name']}", json.dumps(node), ex=15)

    # --- the worker side -------------------------------------------------------------------

    async def _update(self, job_id: str, change: Any) -> JobRecord:
        async with self._redis_call() as r:
            raw = await r.get(self._job_key(job_id))
            if raw is None:
                raise errors.JobNotFound(job_id)
            record = JobRecord.from_dict(json.loads(raw))
            if record.finished:
                return record  # a late duplicate: the first end stands
            change(record)
            finished = record.state in (State.DONE, State.FAILED)
            async with r.pipeline(transaction=True) as pipe:
                pipe.set(
                    self._job_key(job_id),
                    json.dumps(record.to_dict()),
                    ex=int(self.keep_finished_s) + 60 if finished else None,
                )
                for state in State:
                    if state is not record.state:
                        pipe.srem(self._state_key(state), job_id)
                pipe.sadd(self._state_key(record.state), job_id)
                if finished:
                    pipe.zadd(self._finished_key, {job_id: record.finished_at or time.time()})
                    pipe.delete(self._src_key(job_id))
                await pipe.execute()
        return record

    async def complete(self, job_id: str, output_bytes: list[int] | None = None) -> None:
        await self._update(job_id, lambda record: record.mark_done(output_bytes))

    async def fail(self, job_id: str, code: int, detail: str) -> None:
        await self._update(job_id, lambda record: record.mark_failed(code, detail))

    async def retry(self, job_id: str, delay_s: float, code: int, detail: str) -> None:
        await self._update(job_id, lambda record: record.mark_retry(delay_s, code, detail))
        # arq re-schedules the job when its function raises Retry (see _deliver).
        self._retries[job_id] = delay_s

    async def _deliver(self, handler: Handler, job_id: str, job_try: int) -> None:
        self._retries.pop(job_id, None)
        current = await self.get(job_id)
        if current is None or current.state in (State.DONE, State.FAILED):
            return  # delivered again after it ended (at-least-once): nothing to do

        record = await self._update(job_id, lambda record: record.mark_running(job_try))
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

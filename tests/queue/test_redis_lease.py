"""The Redis queue's own guarantees (#14), against a real Redis: the renewed lease and
its owner check, the atomic put and its bound across API nodes, the reconciler of
orphaned records, and the O(1) node registry behind /health.

tests/e2e/test_durability.py shows the same with real worker node processes."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix

from imgserve import errors
from imgserve.queue.arq_redis import LANE_OFFSET_MS, ORPHAN_GRACE_S, RedisQueue
from imgserve.queue.base import JobRecord, State
from tests.queue.test_contract import consuming, record, stop, wait_state
from tests.redis_server import RedisServer

Opener = Callable[..., RedisQueue]


@pytest.fixture
async def opener(redis_url: str) -> AsyncIterator[Opener]:
    """Opens RedisQueues on one fresh key prefix (several: several nodes)."""
    url = f"{redis_url}?prefix=lease-{uuid.uuid4().hex}"
    opened: list[RedisQueue] = []

    def make(**options: Any) -> RedisQueue:
        queue = RedisQueue(url, **options)
        opened.append(queue)
        return queue

    yield make
    for queue in opened:
        await queue.close()


@pytest.fixture
async def r(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def until(condition: Callable[[], Any], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.02)


async def test_a_job_running_for_many_leases_is_never_taken_over(
    opener: Opener, r: aioredis.Redis
) -> None:
    """A handler running for eight leases keeps its job: a second consumer polling the
    same queue never gets it, and arq's in-progress key never holds more than the lease
    (arq itself would set the job deadline + 10 s)."""
    owner, other = opener(lease_s=0.5, job_deadline_s=600.0), opener(lease_s=0.5)
    job = record()
    await owner.put(job, b"x", max_active=10)
    tries: list[tuple[str, int]] = []
    ttls_ms: list[int] = []

    async def slow(delivered: JobRecord) -> None:
        tries.append(("owner", delivered.attempts))
        for _ in range(20):  # 4 s
            ttls_ms.append(await r.pttl(in_progress_key_prefix + delivered.id))
            await asyncio.sleep(0.2)
        await owner.complete(delivered.id)

    async def never(delivered: JobRecord) -> None:
        tries.append(("other", delivered.attempts))
        await other.complete(delivered.id)

    running = await consuming(owner, slow)
    await wait_state(owner, job.id, State.RUNNING)
    watching = await consuming(other, never)
    await wait_state(owner, job.id, State.DONE)
    await stop(*running)
    await stop(*watching)
    assert tries == [("owner", 1)]
    assert ttls_ms and all(0 < ttl <= 500 for ttl in ttls_ms), ttls_ms


async def _stopped(queue: RedisQueue, job_id: str, caplog: pytest.LogCaptureFixture) -> None:
    """Until the try that lost its lease has stopped and arq's finish for it has run."""

    async def done() -> bool:
        said = any("lost its lease; stopped here" in r.getMessage() for r in caplog.records)
        return said and job_id not in queue._foreign_finishes

    await until(done)


async def test_a_try_that_lost_its_lease_stops_and_leaves_the_job_to_the_new_owner(
    opener: Opener, r: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """When a later try takes the job over (arq's retry counter moves past this try,
    as after a partition longer than the lease), the renewal stops this try's run
    within a third of a lease, and arq's entries for the job (its definition, its
    queue entry, the new owner's lease) are left as they are."""
    queue = opener(lease_s=0.6)
    job = record()
    await queue.put(job, b"x", max_active=10)
    cancelled = asyncio.Event()

    async def hang(delivered: JobRecord) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    stopping, task = await consuming(queue, hang)
    await wait_state(queue, job.id, State.RUNNING)
    await r.set(retry_key_prefix + job.id, 2)  # what another node's arq does on takeover
    await r.psetex(in_progress_key_prefix + job.id, 30_000, b"1")  # ... and its lease
    await asyncio.wait_for(cancelled.wait(), 5)
    await _stopped(queue, job.id, caplog)
    assert await r.exists(job_key_prefix + job.id) == 1
    assert await r.zscore(queue.queue_name, job.id) is not None
    assert 20_000 < await r.pttl(in_progress_key_prefix + job.id) <= 30_000
    stored = await queue.get(job.id)
    assert stored is not None and (stored.state, stored.attempts) == (State.RUNNING, 1)
    await stop(stopping, task)


async def test_the_end_of_a_try_that_lost_its_lease_is_dropped(
    opener: Opener, r: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A try that finishes after a later try took the job over: its complete() is not
    written (the new owner's run decides the job's end) and arq's entries are kept."""
    queue = opener(lease_s=30.0)
    job = record()
    await queue.put(job, b"x", max_active=10)
    taken_over = asyncio.Event()

    async def late(delivered: JobRecord) -> None:
        await taken_over.wait()
        await queue.complete(delivered.id)

    stopping, task = await consuming(queue, late)
    await wait_state(queue, job.id, State.RUNNING)
    raw = await r.get(queue._job_key(job.id))
    stored = json.loads(raw)
    stored["attempts"] = 2  # the new owner's mark_running
    await r.set(queue._job_key(job.id), json.dumps(stored))
    await r.set(retry_key_prefix + job.id, 2)
    taken_over.set()
    await _stopped(queue, job.id, caplog)
    after = await queue.get(job.id)
    assert after is not None and (after.state, after.attempts) == (State.RUNNING, 2)
    assert await r.exists(job_key_prefix + job.id) == 1
    assert await r.zscore(queue.queue_name, job.id) is not None
    await stop(stopping, task)


async def test_put_stores_the_record_and_arqs_job_in_one_step(
    opener: Opener, r: aioredis.Redis
) -> None:
    """After put: the record, the state sets, arq's job definition and its queue entry
    (an interactive job scored LANE_OFFSET_MS in the past, a batch job at now) all exist;
    a second put of the same id is refused and changes nothing."""
    queue = opener()
    fast, slow = record(), record(priority="batch")
    before_ms = time.time() * 1000
    await queue.put(fast, b"x", max_active=10)
    await queue.put(slow, b"y", max_active=10)
    after_ms = time.time() * 1000
    for job in (fast, slow):
        assert await r.exists(job_key_prefix + job.id, queue._job_key(job.id)) == 2
        assert await r.sismember(queue._state_key(State.QUEUED), job.id)
    fast_score = await r.zscore(queue.queue_name, fast.id)
    slow_score = await r.zscore(queue.queue_name, slow.id)
    assert fast_score is not None and slow_score is not None
    assert before_ms - LANE_OFFSET_MS - 1 <= fast_score <= after_ms - LANE_OFFSET_MS + 1
    assert before_ms - 1 <= slow_score <= after_ms + 1
    assert await queue.source(fast.id) == b"x"
    with pytest.raises(errors.InternalError):
        await queue.put(fast, b"other", max_active=10)
    assert await queue.source(fast.id) == b"x"


async def test_queue_max_holds_across_api_nodes_putting_at_once(opener: Opener) -> None:
    """Two API nodes putting 40 jobs at once against max_active=7: exactly 7 accepted,
    the other 33 refused with QueueFull (602), none stored."""
    nodes = [opener(), opener()]
    jobs = [record() for _ in range(40)]
    outcomes = await asyncio.gather(
        *(nodes[i % 2].put(job, b"x", max_active=7) for i, job in enumerate(jobs)),
        return_exceptions=True,
    )
    accepted = [job for job, outcome in zip(jobs, outcomes, strict=True) if outcome is None]
    refused = [o for o in outcomes if o is not None]
    assert len(accepted) == 7
    assert all(isinstance(o, errors.QueueFull) for o in refused), refused
    assert (await nodes[0].counts())["queued"] == 7
    stored = [await nodes[0].get(job.id) for job in jobs]
    assert sum(s is not None for s in stored) == 7


async def test_reconciler_enqueues_an_orphaned_record_again(
    opener: Opener, r: aioredis.Redis
) -> None:
    """A queued record that arq has no job for (written by an older release whose node
    died between its two writes) is enqueued again by reconcile() and runs; one younger
    than ORPHAN_GRACE_S, or one that ended, is left alone."""
    queue = opener()
    old = record(created_at=time.time() - ORPHAN_GRACE_S - 5)
    young, ended = record(), record(created_at=time.time() - ORPHAN_GRACE_S - 5)
    for job in (old, young, ended):
        await queue.put(job, b"x", max_active=10)
        await r.delete(job_key_prefix + job.id)  # the older release's missing enqueue
        await r.zrem(queue.queue_name, job.id)
    await queue.cancel(ended.id)
    held = record(created_at=time.time() - ORPHAN_GRACE_S - 5)  # a lease holds it: not orphaned
    await queue.put(held, b"x", max_active=10)
    await r.delete(job_key_prefix + held.id)
    await r.psetex(in_progress_key_prefix + held.id, 30_000, b"1")
    assert await queue.reconcile() == 1
    assert await r.exists(job_key_prefix + old.id) == 1
    assert await r.exists(job_key_prefix + young.id, job_key_prefix + ended.id) == 0
    assert await r.exists(job_key_prefix + held.id) == 0
    assert await queue.reconcile() == 0  # nothing left to fix

    async def finish(delivered: JobRecord) -> None:
        await queue.complete(delivered.id)

    stopping, task = await consuming(queue, finish)
    done = await wait_state(queue, old.id, State.DONE)
    await stop(stopping, task)
    assert done.attempts == 1
    assert (await queue.get(young.id)).state is State.QUEUED  # type: ignore[union-attr]


async def test_a_running_orphan_is_enqueued_again_and_finishes(
    opener: Opener, r: aioredis.Redis
) -> None:
    """A record left running by a node whose arq job vanished (expired, or an older
    release's crash) is not stuck: the consumer's reconciler (run when it starts)
    enqueues it and it finishes."""
    queue = opener()
    job = record(created_at=time.time() - ORPHAN_GRACE_S - 5)
    await queue.put(job, b"x", max_active=10)
    await queue._update(job.id, lambda rec: rec.mark_running(1))
    await r.delete(job_key_prefix + job.id)
    await r.zrem(queue.queue_name, job.id)

    async def finish(delivered: JobRecord) -> None:
        await queue.complete(delivered.id)

    stopping, task = await consuming(queue, finish)
    done = await wait_state(queue, job.id, State.DONE)
    await stop(stopping, task)
    assert done.attempts >= 1


async def test_nodes_reads_the_registry_without_scanning_100k_job_records(
    private_redis: RedisServer,
) -> None:
    """With 100,000 job records in Redis, nodes() and counts() (what /health reads)
    issue a fixed handful of commands and no SCAN or KEYS; a node silent for 15 s
    is left out, and one that leaves is gone at once."""
    queue = RedisQueue(private_redis.url)
    r = aioredis.Redis.from_url(private_redis.url)
    try:
        await _registry_checks(queue, r)
    finally:
        await queue.close()
        await r.aclose()


async def _registry_checks(queue: RedisQueue, r: aioredis.Redis) -> None:
    async with r.pipeline(transaction=False) as pipe:
        for i in range(100_000):
            pipe.set(queue._job_key(f"filler-{i}"), b"{}")
        await pipe.execute()
    for name in ("a:1", "b:2", "stale:3"):
        await queue.announce({"name": name, "workers": 2, "workersAlive": 2})
    await r.zadd(queue._nodes_key, {"stale:3": time.time() - 60})

    await r.config_resetstat()
    nodes = await queue.nodes()
    counts = await queue.counts()
    stats = await r.info("commandstats")
    assert sorted(n["name"] for n in nodes) == ["a:1", "b:2"]
    assert counts["queued"] == 0
    assert not any(name in stats for name in ("cmdstat_scan", "cmdstat_keys"))
    ours = {k: v for k, v in stats.items() if not k.startswith(("cmdstat_config", "cmdstat_info"))}
    issued = sum(v["calls"] for v in ours.values())
    assert issued <= 2 + len(State), stats

    await queue.leave("a:1")
    assert [n["name"] for n in await queue.nodes()] == ["b:2"]
    await queue.announce({"name": "c:4"})  # a heartbeat drops the stale node's info
    assert await r.hexists(queue._node_info_key, "stale:3") == 0


_BUSY_SCRIPT = """
local t0 = redis.call('TIME')
repeat
  local t = redis.call('TIME')
until (t[1] - t0[1]) * 1000000 + (t[2] - t0[2]) > tonumber(ARGV[1])
return 1
"""


async def test_redis_busy_neither_cancels_a_running_job_nor_stops_its_renewals(
    private_redis: RedisServer,
) -> None:
    """Redis answering BUSY for 0.8 s (another client's slow script) while a job runs
    with a 1.5 s lease: the poll loop and the renewals ride it out, so the job keeps
    its first try (a BUSY used to end the renewals, or cancel every running job)."""
    import redis as sync_redis

    client = sync_redis.Redis.from_url(private_redis.url)
    client.config_set("busy-reply-threshold", 100)
    queue = RedisQueue(private_redis.url, lease_s=1.5)
    other = RedisQueue(private_redis.url, lease_s=1.5)  # takes the job if the lease lapses
    try:
        job = record()
        await queue.put(job, b"x", max_active=10)
        tries: list[int] = []

        async def slow(delivered: JobRecord) -> None:
            tries.append(delivered.attempts)
            await asyncio.sleep(3.0)
            await queue.complete(delivered.id)

        stopping, task = await consuming(queue, slow)
        await wait_state(queue, job.id, State.RUNNING)
        watching = await consuming(other, slow)
        await asyncio.to_thread(client.eval, _BUSY_SCRIPT, 0, 800_000)
        done = await wait_state(queue, job.id, State.DONE)
        await stop(stopping, task)
        await stop(*watching)
        assert tries == [1] and done.attempts == 1
    finally:
        await queue.close()
        await other.close()
        client.close()


async def test_a_running_trys_reads_and_writes_ride_out_a_redis_restart(
    private_redis: RedisServer,
) -> None:
    """Redis killed (and restarted 1 s later) just as a running try reads its source,
    and again just as it writes its end: both calls wait for Redis instead of raising,
    so the job is done in its first try (it used to be delivered again: an attempt
    spent on an outage, the CI failure of test_redis_restart_during_a_long_job)."""
    queue = RedisQueue(private_redis.url, lease_s=3.0)
    try:
        job = record()
        await queue.put(job, b"the source", max_active=10)
        tries: list[int] = []
        read: list[bytes | None] = []

        restarts: list[threading.Timer] = []

        async def outage() -> None:
            if restarts:  # the last restart has finished its own checks
                await asyncio.to_thread(restarts[-1].join)
            await asyncio.to_thread(private_redis.kill)
            restarts.append(threading.Timer(1.0, private_redis.start))
            restarts[-1].start()

        async def handler(delivered: JobRecord) -> None:
            tries.append(delivered.attempts)
            await outage()
            read.append(await queue.source(delivered.id))
            await outage()
            await queue.complete(delivered.id)

        stopping, task = await consuming(queue, handler)

        async def ended() -> bool:
            while len(restarts) < 2 or restarts[-1].is_alive():
                await asyncio.sleep(0.02)  # (queue.get would meet the outage)
            return (await queue.get(job.id)).state is State.DONE  # type: ignore[union-attr]

        await until(ended)
        await stop(stopping, task)
        done = await queue.get(job.id)
        assert tries == [1] and done is not None and done.attempts == 1
        assert read == [b"the source"]
    finally:
        await queue.close()


async def test_an_outage_longer_than_the_lease_allows_is_608(private_redis: RedisServer) -> None:
    """A running try waits for Redis only while its lease could outlive the outage (two
    thirds of it); then the call fails with 608 like any other."""
    queue = RedisQueue(private_redis.url, lease_s=0.9)
    try:
        job = record()
        await queue.put(job, b"x", max_active=10)
        private_redis.kill()
        started = time.monotonic()
        with pytest.raises(errors.QueueUnavailable):
            await queue.source(job.id)
        assert 0.3 <= time.monotonic() - started < 5.0
    finally:
        await queue.close()

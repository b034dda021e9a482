"""No accepted job is lost: kill -9 of the daemon, worker nodes and Redis; flaky destinations."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import IMGSERVE, Daemon, alive, decode, descendants, jpeg, resize, serve
from tests.redis_server import RedisServer
from tests.servers import HTTPTestServer

pytestmark = pytest.mark.slow


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and its descendants, and wait until they are gone: a process
    still exiting counts as running, and a restart right after would refuse."""
    victims = {p for p in descendants(pid) | {pid} if alive(p)}
    for p in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(alive(p) for p in victims):
        assert time.monotonic() < deadline, f"still alive after SIGKILL: {victims}"
        time.sleep(0.02)


def test_kill_9_daemon_with_30_jobs_in_flight(
    start_daemon: Any, http_server: HTTPTestServer
) -> None:
    """kill -9 of the whole daemon with 30 accepted jobs; after start, all 30 are done."""
    daemon: Daemon = start_daemon()
    src = serve(http_server, "d/slow.jpg", jpeg(320, 240, b"IMGSERVE-FAULT-DELAY=0.25"))
    ids = []
    for i in range(30):
        reply = daemon.post(resize(src, f"file://{daemon.out_dir}/d/{i}.jpg", width=32))
        assert reply.status == 200, reply.body
        ids.append(reply.body["jobId"])
    kill_tree(daemon.pid)
    states = [daemon_state for daemon_state in _states_offline(daemon, ids)]
    assert states.count("done") < 30, "all jobs finished before the kill; the test proves nothing"

    restarted = daemon.cli("start", "-FORCE")
    assert restarted.returncode == 0, restarted.stderr
    finals = [daemon.wait(job_id, timeout_s=90) for job_id in ids]
    assert [f["state"] for f in finals] == ["done"] * 30
    for i in range(30):
        image = decode((daemon.out_dir / f"d/{i}.jpg").read_bytes())
        assert (image.width, image.height) == (32, 24)
    assert "recovered" in (daemon.state_dir / "imgserve.log").read_text()


def _states_offline(daemon: Daemon, ids: list[str]) -> list[str]:
    """Job states read straight from the embedded queue's database while the daemon is down."""
    import json
    import sqlite3

    with sqlite3.connect(daemon.state_dir / "jobs.db") as db:
        rows = dict(db.execute("SELECT id, record FROM jobs").fetchall())
    assert set(ids) <= set(rows), "an accepted job is missing from the database"
    return [json.loads(rows[i])["state"] for i in ids]


def test_destination_down_then_recovers(start_daemon: Any, http_server: HTTPTestServer) -> None:
    """A destination failing three times, then recovering, gets the result exactly once."""
    daemon = start_daemon()
    src = serve(http_server, "f/photo.jpg", jpeg(400, 300, b"IMGSERVE-FAULT-DELAY=0.5"))
    name = "flaky-result.jpg"
    reply = daemon.post(resize(src, http_server.url(f"/flaky/{name}"), width=40))
    assert reply.status == 200, reply.body
    assert http_server.state.attempts[name] == 1  # the placeholder
    http_server.state.fail_remaining[name] = 3
    status = daemon.wait(reply.body["jobId"])
    assert status["state"] == "done", status
    assert http_server.state.attempts[name] == 1 + 3 + 1
    image = decode(http_server.state.files[name])
    assert (image.width, image.height) == (40, 30)


class Node:
    """An `imgserve worker` node process."""

    def __init__(self, redis_url: str, extra: list[str], log: Path) -> None:
        self.log = log
        self.process = subprocess.Popen(
            [*IMGSERVE, "worker", "--queue", redis_url, "--workers", "1",
             "--allow-net", "127.0.0.0/8", *extra],
            env={**os.environ, "IMGSERVE_FAULT_INJECTION": "1"},
            stdout=subprocess.DEVNULL,
            stderr=open(log, "wb"),  # noqa: SIM115 - closed with the process
            start_new_session=True,
        )  # fmt: skip

    def kill(self) -> None:
        kill_tree(self.process.pid)
        self.process.wait(10)

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


@pytest.fixture
def cluster(start_daemon: Any, private_redis: RedisServer, tmp_path: Path) -> Any:
    """An API node and worker nodes on one private Redis."""
    nodes: list[Node] = []

    def make(workers: int, *extra: str) -> tuple[Daemon, list[Node]]:
        api = start_daemon("--queue", private_redis.url, *extra)
        for _ in range(workers):
            log = tmp_path / f"node{len(nodes)}.log"
            nodes.append(Node(private_redis.url, ["--file-root", str(api.out_dir), *extra], log))
        _wait_nodes(api, len(nodes))
        return api, nodes[-workers:]

    yield make
    for node in nodes:
        if node.process.poll() is None:
            node.kill()


def _wait_nodes(api: Daemon, count: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if len(api.request("GET", "/health").body.get("nodes", [])) >= count:
            return
        time.sleep(0.1)
    raise AssertionError("worker nodes did not announce themselves")


def test_two_worker_nodes_share_a_batch(cluster: Any, http_server: HTTPTestServer) -> None:
    """Jobs accepted by the API node run on both worker nodes; every one is done."""
    api, nodes = cluster(2)
    src = serve(http_server, "r/batch.jpg", jpeg(320, 240, b"IMGSERVE-FAULT-DELAY=0.2"))
    ids = [
        api.post(resize(src, f"file://{api.out_dir}/r/{i}.jpg", width=64)).body["jobId"]
        for i in range(12)
    ]
    finals = [api.wait(job_id) for job_id in ids]
    assert [f["state"] for f in finals] == ["done"] * 12
    ran_on = {f["node"].split(":")[1] for f in finals}
    assert ran_on == {str(node.process.pid) for node in nodes}
    deadline = time.monotonic() + 12  # nodes announce themselves every 5 s
    while time.monotonic() < deadline:
        health = api.request("GET", "/health").body
        if health["workersAlive"] == 2:
            break
        time.sleep(0.2)
    assert health["workers"] == 2 and health["workersAlive"] == 2


def test_worker_node_killed_mid_job(
    cluster: Any, private_redis: RedisServer, http_server: HTTPTestServer
) -> None:
    """kill -9 of the worker node running a job: the job finishes on the other node."""
    api, nodes = cluster(1, "--lease", "4")
    src = serve(http_server, "r/long.jpg", jpeg(320, 240, b"IMGSERVE-FAULT-DELAY=1.5"))
    job_id = api.post(resize(src, f"file://{api.out_dir}/r/long.jpg", width=64)).body["jobId"]
    api.wait_running(job_id)
    first = api.job(job_id)
    assert first["state"] == "running"
    nodes[0].kill()
    survivor = Node(
        private_redis.url,
        ["--file-root", str(api.out_dir), "--lease", "4"],
        nodes[0].log.with_name("survivor.log"),
    )
    try:
        final = api.wait(job_id, timeout_s=60)
        assert final["state"] == "done", final
        assert final["attempts"] == 2
        assert final["node"].endswith(f":{survivor.process.pid}")
    finally:
        survivor.kill()


def test_job_that_kills_its_worker_node_every_time_fails_603(
    cluster: Any, private_redis: RedisServer, http_server: HTTPTestServer
) -> None:
    """A job whose node dies on every attempt (kill -9 here, an OOM kill in real life)
    is given up with 603 after --max-attempts, its failure image in place; the
    queue goes on with other jobs."""
    flags = ["--lease", "3", "--max-attempts", "2"]
    api, nodes = cluster(1, *flags)
    src = serve(http_server, "r/poison.jpg", jpeg(320, 240, b"IMGSERVE-FAULT-DELAY=60"))
    dst = api.out_dir / "r" / "poison.jpg"
    job_id = api.post(resize(src, dst.as_uri(), width=64)).body["jobId"]
    placeholder = dst.read_bytes()
    node = nodes[0]
    spares: list[Node] = []
    try:
        for attempt in (1, 2):
            deadline = time.monotonic() + 30
            while (api.job(job_id)["state"], api.job(job_id)["attempts"]) != ("running", attempt):
                assert time.monotonic() < deadline, api.job(job_id)
                time.sleep(0.05)
            node.kill()
            node = Node(
                private_redis.url,
                ["--file-root", str(api.out_dir), *flags],
                nodes[0].log.with_name(f"spare{attempt}.log"),
            )
            spares.append(node)
        final = api.wait(job_id, timeout_s=60)
        assert final["state"] == "failed", final
        assert final["error"]["code"] == 603
        assert dst.read_bytes() != placeholder  # the failure image replaced it
        ok = serve(http_server, "r/after.jpg", jpeg(320, 240))
        after = api.post(resize(ok, f"file://{api.out_dir}/r/after.jpg", width=64))
        assert api.wait(after.body["jobId"])["state"] == "done"
    finally:
        for spare in spares:
            if spare.process.poll() is None:
                spare.kill()


def test_worker_node_sigterm_finishes_its_job(cluster: Any, http_server: HTTPTestServer) -> None:
    """SIGTERM to a worker node lets its running job finish, then it exits 0."""
    api, nodes = cluster(1)
    src = serve(http_server, "r/term.jpg", jpeg(320, 240, b"IMGSERVE-FAULT-DELAY=1"))
    job_id = api.post(resize(src, f"file://{api.out_dir}/r/term.jpg", width=64)).body["jobId"]
    api.wait_running(job_id)
    assert nodes[0].terminate() == 0
    assert api.job(job_id)["state"] == "done"


def test_redis_restart_mid_run(
    cluster: Any, private_redis: RedisServer, http_server: HTTPTestServer
) -> None:
    """Redis killed for a few seconds, then restarted (AOF): 608 while down; the jobs
    before (some of which end while Redis is down) and after all finish, promptly."""
    api, _nodes = cluster(1)
    src = serve(http_server, "r/redis.jpg", jpeg(320, 240, b"IMGSERVE-FAULT-DELAY=0.3"))
    before = [
        api.post(resize(src, f"file://{api.out_dir}/r/b{i}.jpg", width=64)).body["jobId"]
        for i in range(6)
    ]
    private_redis.kill()
    down = api.post(resize(src, f"file://{api.out_dir}/r/down.jpg", width=64))
    assert (down.status, down.body["code"]) == (503, 608)
    time.sleep(3.0)  # the outage: jobs end meanwhile and must wait to record it
    private_redis.start()
    after = [
        api.post(resize(src, f"file://{api.out_dir}/r/a{i}.jpg", width=64)).body["jobId"]
        for i in range(3)
    ]
    finals = [api.wait(job_id, timeout_s=90) for job_id in before + after]
    assert [f["state"] for f in finals] == ["done"] * 9


# --- #14: a renewed lease (docs/queue.md "The lease") -------------------------------------


def _pid(view: dict[str, Any]) -> int:
    return int(view["node"].rsplit(":", 1)[1])


def _node_running(nodes: list[Node], view: dict[str, Any]) -> Node:
    (node,) = [n for n in nodes if n.process.pid == _pid(view)]
    return node


def _wait_try(api: Daemon, job_id: str, attempt: int, timeout_s: float = 30) -> dict[str, Any]:
    """The job's view once try ``attempt`` (or a later one) runs it, or it ended."""
    deadline = time.monotonic() + timeout_s
    while True:
        view = api.job(job_id)
        if view["attempts"] >= attempt and view["state"] in ("running", "done", "failed"):
            return view
        assert time.monotonic() < deadline, view
        time.sleep(0.02)


def test_kill_9_of_a_node_whose_job_outlived_several_leases(
    cluster: Any, http_server: HTTPTestServer
) -> None:
    """A job that has run for three leases on a node killed with kill -9 starts again
    on the other node within the lease plus a second or two (not the delivery deadline,
    ~9 minutes), and finishes there."""
    lease_s = 2.5
    api, nodes = cluster(2, "--lease", str(lease_s))
    src = serve(http_server, "l/long.jpg", jpeg(320, 240, b"IMGSERVE-FAULT-DELAY=10"))
    job_id = api.post(resize(src, f"file://{api.out_dir}/l/long.jpg", width=64)).body["jobId"]
    first = _wait_try(api, job_id, 1)
    while time.time() - first["startedAt"] < 3 * lease_s:
        time.sleep(0.05)
    assert api.job(job_id)["attempts"] == 1  # three leases in: never taken over
    victim = _node_running(nodes, first)
    killed_at = time.time()
    victim.kill()
    second = _wait_try(api, job_id, 2)
    assert second["attempts"] == 2
    assert _pid(second) != victim.process.pid
    assert second["startedAt"] - killed_at < lease_s + 2.0, second["startedAt"] - killed_at
    final = api.wait(job_id, timeout_s=60)
    assert (final["state"], final["attempts"]) == ("done", 2), final


def test_a_healthy_job_running_for_many_leases_runs_once(
    cluster: Any, http_server: HTTPTestServer
) -> None:
    """A job running for four leases with a second node polling: one attempt, and the
    destination gets exactly the placeholder and one result."""
    api, _nodes = cluster(2, "--lease", "1.5")
    src = serve(http_server, "l/healthy.jpg", jpeg(320, 240, b"IMGSERVE-FAULT-DELAY=6"))
    name = "healthy-result.jpg"
    reply = api.post(resize(src, http_server.url(f"/flaky/{name}"), width=40))
    assert reply.status == 200, reply.body
    final = api.wait(reply.body["jobId"], timeout_s=60)
    assert (final["state"], final["attempts"]) == ("done", 1), final
    assert http_server.state.attempts[name] == 2
    assert (decode(http_server.state.files[name]).width) == 40


def test_kill_9_with_a_backlog_the_recovered_jobs_run_first(
    cluster: Any, private_redis: RedisServer, http_server: HTTPTestServer
) -> None:
    """Two jobs on a node killed with kill -9, six more queued behind them: once the
    lease runs out, the next node runs the two recovered jobs before any of the backlog
    (they keep their place in the queue)."""
    lease_s = 3.0
    api, nodes = cluster(1, "--lease", str(lease_s))
    slow = serve(http_server, "l/first.jpg", jpeg(320, 240, b"IMGSERVE-FAULT-DELAY=4"))
    quick = serve(http_server, "l/backlog.jpg", jpeg(320, 240))
    first = [
        api.post(resize(slow, f"file://{api.out_dir}/l/f{i}.jpg", width=64)).body["jobId"]
        for i in range(2)
    ]
    for job_id in first:
        _wait_try(api, job_id, 1)
    backlog = [
        api.post(resize(quick, f"file://{api.out_dir}/l/b{i}.jpg", width=64)).body["jobId"]
        for i in range(6)
    ]
    assert {api.job(job_id)["state"] for job_id in backlog} == {"queued"}  # the node is full
    killed_at = time.time()
    nodes[0].kill()
    while time.time() < killed_at + lease_s + 0.5:
        time.sleep(0.05)
    survivor = Node(
        private_redis.url,
        ["--file-root", str(api.out_dir), "--lease", str(lease_s)],
        nodes[0].log.with_name("survivor.log"),
    )
    try:
        finals = {job_id: api.wait(job_id, timeout_s=60) for job_id in first + backlog}
    finally:
        survivor.kill()
    assert {f["state"] for f in finals.values()} == {"done"}
    assert [finals[job_id]["attempts"] for job_id in first] == [2, 2]
    recovered_started = max(finals[job_id]["startedAt"] for job_id in first)
    backlog_started = min(finals[job_id]["startedAt"] for job_id in backlog)
    assert recovered_started < backlog_started


def test_sigterm_hands_a_running_job_back_at_once(
    cluster: Any, http_server: HTTPTestServer
) -> None:
    """SIGTERM to a node whose job outlives --shutdown-timeout: the node exits 0 and the
    job starts on the other node within seconds, not after the 30 s lease."""
    api, nodes = cluster(2, "--shutdown-timeout", "1")
    src = serve(http_server, "l/term.jpg", jpeg(320, 240, b"IMGSERVE-FAULT-DELAY=4"))
    job_id = api.post(resize(src, f"file://{api.out_dir}/l/term.jpg", width=64)).body["jobId"]
    first = _wait_try(api, job_id, 1)
    victim = _node_running(nodes, first)
    termed_at = time.time()
    assert victim.terminate() == 0
    second = _wait_try(api, job_id, 2)
    assert _pid(second) != victim.process.pid
    assert second["startedAt"] - termed_at < 10.0  # the lease (30 s) did not run out
    assert api.wait(job_id, timeout_s=60)["state"] == "done"


def test_a_node_whose_event_loop_stalls_keeps_its_job(
    cluster: Any, http_server: HTTPTestServer
) -> None:
    """A node frozen (SIGSTOP) for 3 s of its 6 s lease while its job runs keeps the job:
    the other node never takes it, one attempt, one result upload."""
    api, nodes = cluster(2, "--lease", "6")
    src = serve(http_server, "l/stall.jpg", jpeg(320, 240, b"IMGSERVE-FAULT-DELAY=5"))
    name = "stall-result.jpg"
    reply = api.post(resize(src, http_server.url(f"/flaky/{name}"), width=40))
    first = _wait_try(api, reply.body["jobId"], 1)
    frozen = _node_running(nodes, first)
    frozen.process.send_signal(signal.SIGSTOP)
    try:
        time.sleep(3.0)  # the stall itself is what is under test
    finally:
        frozen.process.send_signal(signal.SIGCONT)
    final = api.wait(reply.body["jobId"], timeout_s=60)
    assert (final["state"], final["attempts"]) == ("done", 1), final
    assert _pid(final) == frozen.process.pid
    assert http_server.state.attempts[name] == 2


def test_a_node_cut_off_longer_than_its_lease_stops_its_run(
    cluster: Any, http_server: HTTPTestServer
) -> None:
    """A node frozen longer than its lease loses its job to the other node; once it runs
    again it stops its own try (it checks the owner at its next renewal) instead of
    racing the new owner: the job is done once, by the new owner."""
    lease_s = 2.5
    api, nodes = cluster(2, "--lease", str(lease_s))
    src = serve(http_server, "l/cut.jpg", jpeg(320, 240, b"IMGSERVE-FAULT-DELAY=5"))
    job_id = api.post(resize(src, f"file://{api.out_dir}/l/cut.jpg", width=64)).body["jobId"]
    first = _wait_try(api, job_id, 1)
    frozen = _node_running(nodes, first)
    frozen.process.send_signal(signal.SIGSTOP)
    try:
        second = _wait_try(api, job_id, 2)
    finally:
        frozen.process.send_signal(signal.SIGCONT)
    assert _pid(second) != frozen.process.pid
    deadline = time.monotonic() + 10
    while "lost its lease" not in frozen.log.read_text():
        assert time.monotonic() < deadline, frozen.log.read_text()[-2000:]
        time.sleep(0.05)
    final = api.wait(job_id, timeout_s=60)
    assert (final["state"], final["attempts"]) == ("done", 2), final
    assert _pid(final) == _pid(second)


def test_health_reads_nodes_without_a_keyspace_scan(
    cluster: Any, private_redis: RedisServer
) -> None:
    """/health with 100,000 job records in Redis: the API node's reply lists the worker
    node, and Redis served it with a fixed handful of commands and no SCAN or KEYS."""
    import redis

    api, nodes = cluster(1)
    client = redis.Redis.from_url(private_redis.url)
    try:
        with client.pipeline(transaction=False) as pipe:
            for i in range(100_000):
                pipe.set(f"imgserve:job:filler-{i}", b"{}")
            pipe.execute()
        client.config_resetstat()
        started = time.monotonic()
        health = api.request("GET", "/health").body
        took_s = time.monotonic() - started
        stats: dict[str, Any] = client.info("commandstats")  # type: ignore[assignment]
    finally:
        client.close()
    assert [n["pid"] for n in health["nodes"]] == [nodes[0].process.pid]
    assert not {"cmdstat_scan", "cmdstat_keys"} & set(stats)
    served = {k: v["calls"] for k, v in stats.items() if k.startswith("cmdstat_")}
    served.pop("cmdstat_config|resetstat", None)
    served.pop("cmdstat_info", None)
    # The worker node's own polling runs meanwhile: count only what /health reads.
    assert served.get("cmdstat_scard", 0) >= 5 and served.get("cmdstat_hmget", 0) >= 1
    print(f"/health with 100k job records: {took_s * 1000:.1f} ms")


def test_redis_restart_during_a_long_job(
    cluster: Any, private_redis: RedisServer, http_server: HTTPTestServer
) -> None:
    """Redis killed for 2 s (AOF, restarted) while a job runs: the node's poll loop
    waits for Redis instead of cancelling its jobs, and a failed renewal is retried
    every 0.25 s, so the job's 6 s lease (renewed at most 2 s before the outage)
    outlives it and the job finishes in its first try."""
    lease_s = 6.0
    api, _nodes = cluster(1, "--lease", str(lease_s))
    src = serve(http_server, "l/outage.jpg", jpeg(320, 240, b"IMGSERVE-FAULT-DELAY=5"))
    job_id = api.post(resize(src, f"file://{api.out_dir}/l/outage.jpg", width=64)).body["jobId"]
    _wait_try(api, job_id, 1)
    private_redis.kill()
    time.sleep(2.0)  # the outage
    private_redis.start()
    back_at = time.monotonic()
    final = api.wait(job_id, timeout_s=60)
    assert (final["state"], final["attempts"]) == ("done", 1), final
    print(f"done {time.monotonic() - back_at:.1f} s after Redis returned")

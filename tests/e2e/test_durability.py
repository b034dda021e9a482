"""No accepted job is lost: kill -9 of the daemon, worker nodes and Redis; flaky destinations."""

from __future__ import annotations

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
    for p in descendants(pid) | {pid}:
        if alive(p):
            os.kill(p, signal.SIGKILL)


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

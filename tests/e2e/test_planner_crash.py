"""End to end: a loader crash or hang while planning costs one request, never the daemon."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Daemon, jpeg, resize, serve
from tests.servers import HTTPTestServer

pytestmark = pytest.mark.slow


def _until(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.05)


@pytest.mark.parametrize("fault", ["SEGV", "KILL"])
def test_planner_crash_answers_206_and_the_daemon_keeps_serving(
    start_daemon: Any, http_server: HTTPTestServer, fault: str
) -> None:
    """A planner dying on a source answers that POST with 206; same daemon, next job done."""
    daemon: Daemon = start_daemon()
    _until(lambda: len(daemon.planners()) == 2)
    pid, planners, workers = daemon.pid, daemon.planners(), daemon.workers()
    bad = serve(
        http_server, f"p/{fault}.jpg", jpeg(300, 200, f"IMGSERVE-FAULT-PLAN-{fault}".encode())
    )
    reply = daemon.post(resize(bad, f"file://{daemon.out_dir}/p/bad.jpg", width=30))
    assert (reply.status, reply.body["code"]) == (422, 206), reply.body
    assert not (daemon.out_dir / "p" / "bad.jpg").exists()  # refused before the placeholder

    assert daemon.pid == pid
    assert daemon.request("GET", "/health").body["status"] == "ok"
    good = serve(http_server, "p/good.jpg", jpeg(300, 200))
    after = daemon.post(resize(good, f"file://{daemon.out_dir}/p/good.jpg", width=30))
    assert after.status == 200, after.body
    assert daemon.wait(after.body["jobId"])["state"] == "done"
    _until(lambda: len(daemon.planners()) == 2)
    assert len(planners - daemon.planners()) == 1  # exactly the crashed planner was replaced
    assert daemon.workers() == workers  # the image workers never noticed


def test_spinning_loader_answers_306_at_the_planning_deadline(
    start_daemon: Any, http_server: HTTPTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A source that makes planning hang is answered 306 at plan_timeout_s; the next is 200."""
    monkeypatch.setenv("IMGSERVE_PLAN_TIMEOUT_S", "1.5")
    daemon: Daemon = start_daemon()
    hang = serve(http_server, "h/hang.jpg", jpeg(300, 200, b"IMGSERVE-FAULT-PLAN-SLEEP"))
    started = time.monotonic()
    reply = daemon.post(resize(hang, f"file://{daemon.out_dir}/h/hang.jpg", width=30))
    assert (reply.status, reply.body["code"]) == (422, 306), reply.body
    assert 1.5 <= time.monotonic() - started < 5.0
    good = serve(http_server, "h/good.jpg", jpeg(300, 200))
    after = daemon.post(resize(good, f"file://{daemon.out_dir}/h/good.jpg", width=30))
    assert after.status == 200 and daemon.wait(after.body["jobId"])["state"] == "done"


def test_idle_planners_killed_from_outside_cost_no_request(
    start_daemon: Any, http_server: HTTPTestServer
) -> None:
    """SIGKILL of every idle planner (an OOM kill): the next POST is still answered 200."""
    daemon: Daemon = start_daemon()
    _until(lambda: len(daemon.planners()) == 2)
    victims = daemon.planners()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    good = serve(http_server, "i/good.jpg", jpeg(300, 200))
    reply = daemon.post(resize(good, f"file://{daemon.out_dir}/i/good.jpg", width=30))
    assert reply.status == 200, reply.body
    assert daemon.wait(reply.body["jobId"])["state"] == "done"
    _until(lambda: len(daemon.planners()) == 2)
    assert not daemon.planners() & victims


def _nice(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])  # field 19


def test_planners_parse_in_their_own_processes_at_normal_priority(start_daemon: Any) -> None:
    """The daemon runs two planners beside its image workers, at the API's niceness."""
    daemon: Daemon = start_daemon()
    _until(lambda: len(daemon.planners()) == 2 and len(daemon.workers()) == 2)
    assert not daemon.planners() & daemon.workers()
    for planner in daemon.planners():
        assert _nice(planner) == _nice(daemon.pid)

"""The daemon watches its job runner: if it ends while the daemon should be running,
/health answers 503 "degraded", intake stops, and the daemon exits non-zero with every
resource closed (so a supervisor restarts it)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from pathlib import Path

import aiohttp
import pytest

from imgserve import config, daemon
from imgserve.worker import Runner
from tests.e2e.conftest import _cmdline, _ppid, alive, descendants, free_port


async def test_runner_that_dies_degrades_health_stops_intake_and_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job runner that raises (a bug no job can cause) is not left dead behind a
    daemon that still says ok: 503 degraded, POST / 604, exit code 1, port closed,
    worker processes gone."""
    started = asyncio.Event()

    async def broken_serve(self: Runner) -> None:
        started.set()
        raise RuntimeError("claim loop bug")

    monkeypatch.setattr(Runner, "serve", broken_serve)
    before = _forked()  # other tests' planners may live on in this process
    port = free_port()
    settings = config.load(
        {"host": "127.0.0.1", "port": port, "workers": 1, "state_dir": str(tmp_path)},
        environ={},
    )
    paths = daemon.paths_for(settings)
    serving = asyncio.create_task(daemon._serve(settings, paths, linger_s=120.0))
    await asyncio.wait_for(started.wait(), 60)
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/health") as resp:
            health = await resp.json()
            assert resp.status == 503, health
        assert health["status"] == "degraded"
        assert "RuntimeError: claim loop bug" in health["detail"]
        body = json.dumps({"operationType": "resize", "srcURL": "http://127.0.0.1/x.jpg",
                           "dstURL": "file:///tmp/x.jpg", "args": {"width": 1}})  # fmt: skip
        async with session.post(base + "/", data=body) as resp:
            reply = await resp.json()
            assert (resp.status, reply["code"]) == (503, 604)
    workers = _forked() - before  # this daemon's image workers and planners
    assert workers
    assert not serving.done()  # lingering, degraded, until its time is up or a signal
    os.kill(os.getpid(), signal.SIGTERM)  # the daemon's handler: ends the linger now
    assert await asyncio.wait_for(serving, 30) == daemon.EXIT_FAIL
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    deadline = asyncio.get_running_loop().time() + 15
    while workers & _live(workers):
        assert asyncio.get_running_loop().time() < deadline, _live(workers)
        await asyncio.sleep(0.05)


def _live(pids: set[int]) -> set[int]:
    return {pid for pid in pids if alive(pid)}


def _forked() -> set[int]:
    """Children of this process's forkserver (image workers, planners)."""
    tree = descendants(os.getpid())
    servers = {p for p in tree if b"forkserver" in _cmdline(p)}
    return {p for p in tree if _ppid(p) in servers}

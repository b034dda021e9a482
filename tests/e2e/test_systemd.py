"""Service conventions end to end: sd_notify readiness and JSON logs from the real daemon
and a real worker node."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imgserve import cli, notify
from tests.e2e.conftest import IMGSERVE, Daemon, jpeg, resize
from tests.redis_server import RedisServer
from tests.servers import BASIC_PASSWORD, BASIC_USER, HTTPTestServer

pytestmark = pytest.mark.slow

_CREDENTIALS = struct.Struct("iII")  # struct ucred: pid, uid, gid


class NotifySocket:
    """A unix datagram socket standing in for systemd's notify socket; it asks the
    kernel for each sender's pid, as systemd does to check NotifyAccess=main."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.sock.settimeout(60)

    def receive(self) -> tuple[str, int]:
        """The next datagram and the pid that sent it (fails the test after 60 s)."""
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(_CREDENTIALS.size))
        pids = [
            _CREDENTIALS.unpack(cdata[: _CREDENTIALS.size])[0]
            for level, kind, cdata in ancillary
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
        ]
        return data.decode(), pids[0]


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[NotifySocket, str]]:
    """A bound notify socket on a path, and the NOTIFY_SOCKET value naming it."""
    path = tmp_path / "notify.sock"
    listener = NotifySocket(str(path))
    yield listener, str(path)
    listener.sock.close()


def _answers(daemon: Daemon) -> bool:
    with urllib.request.urlopen(daemon.url + "/livez", timeout=5) as reply:
        return bool(reply.status == 200)


def test_serve_says_ready_once_listening_and_stopping_on_sigterm(
    start_daemon: Any, notify_socket: tuple[NotifySocket, str]
) -> None:
    """The daemon sends READY=1 once its port answers and STOPPING=1 when SIGTERM drains it."""
    listener, address = notify_socket
    daemon: Daemon = start_daemon(env={"NOTIFY_SOCKET": address})
    state, sender = listener.receive()
    assert (state, sender) == (notify.READY, daemon.pid)
    assert _answers(daemon)
    os.kill(daemon.pid, signal.SIGTERM)
    assert listener.receive() == (notify.STOPPING, daemon.pid)


def test_worker_node_says_ready_and_stopping_and_logs_json(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    """A worker node sends READY=1 once consuming, STOPPING=1 on SIGTERM, and with
    --log-format json writes JSON lines to stderr, the queue URL's password hidden."""
    address = "@imgserve-test-" + uuid.uuid4().hex  # the abstract namespace
    listener = NotifySocket("\0" + address[1:])
    queue = private_redis.url.replace("redis://", "redis://:hunter2@", 1)
    log = tmp_path / "node.log"
    with open(log, "wb") as stderr:
        node = subprocess.Popen(
            [*IMGSERVE, "worker", "--queue", queue, "--workers", "1", "--log-format", "json"],
            env={**os.environ, "NOTIFY_SOCKET": address},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        assert listener.receive() == (notify.READY, node.pid)
        node.send_signal(signal.SIGTERM)
        assert listener.receive() == (notify.STOPPING, node.pid)
        assert node.wait(30) == 0
    finally:
        if node.poll() is None:
            node.kill()
            node.wait()
        listener.sock.close()
    text = log.read_text()
    entries = [json.loads(line) for line in text.splitlines()]
    started = [e for e in entries if e["message"].startswith("imgserve worker ")]
    assert started and started[0]["logger"] == "imgserve.daemon", entries
    assert "redis://***@127.0.0.1" in started[0]["message"]
    assert "hunter2" not in text


def test_json_log_file_of_a_job(
    start_daemon: Any, http_server: HTTPTestServer, tmp_path: Path
) -> None:
    """With --log-format json every line of the log file is a JSON object; a job's
    accepted and done lines carry its id, event and fields; a password is hidden."""
    daemon: Daemon = start_daemon("--log-format", "json")
    http_server.state.files["json/cred.jpg"] = jpeg(100, 80)
    src = http_server.url("/auth/json/cred.jpg").replace(
        "://", f"://{BASIC_USER}:{BASIC_PASSWORD}@"
    )
    reply = daemon.post(resize(src, f"file://{daemon.out_dir}/json/cred.jpg", width=10))
    assert reply.status == 200, reply.body
    job_id = reply.body["jobId"]
    assert daemon.wait(job_id)["state"] == "done"

    text = (daemon.state_dir / "imgserve.log").read_text()
    assert BASIC_PASSWORD not in text
    entries = [json.loads(line) for line in text.splitlines()]
    assert {"time", "level", "logger", "pid", "job_id", "event", "fields", "message"} <= set(
        entries[0]
    )
    mine = {e["event"]: e for e in entries if e["job_id"] == job_id}
    accepted, done = mine["accepted"], mine["done"]
    assert (accepted["level"], accepted["logger"]) == ("INFO", "imgserve.jobs")
    assert f"{BASIC_USER}:***@" in accepted["message"]
    assert (done["logger"], done["pid"]) == ("imgserve.jobs", daemon.pid)
    assert done["fields"] == {"attempt": 1, "outputs": 1}
    assert accepted["time"] <= done["time"]


def test_notify_reaches_an_abstract_socket_and_is_silent_without_one() -> None:
    """notify() sends to an @name socket, does nothing without NOTIFY_SOCKET, and a
    socket nobody listens on is logged, not raised."""
    name = "imgserve-test-" + uuid.uuid4().hex
    listener = NotifySocket("\0" + name)
    try:
        assert notify.notify(notify.READY, {"NOTIFY_SOCKET": "@" + name})
        assert listener.receive() == (notify.READY, os.getpid())
    finally:
        listener.sock.close()
    assert not notify.notify(notify.READY, {})
    assert not notify.notify(notify.READY, {"NOTIFY_SOCKET": "vsock:2:1"})
    assert not notify.notify(notify.READY, {"NOTIFY_SOCKET": "@" + name})  # closed now


CONTRIB = Path(__file__).parents[2] / "contrib"
UNITS = ["imgserve.service", "imgserve-worker.service"]


def _exec_start(unit: Path) -> list[str]:
    """ExecStart's words, its line continuations joined."""
    text = unit.read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.startswith("ExecStart="))
    return line.removeprefix("ExecStart=").split()


@pytest.mark.parametrize("name", UNITS)
def test_unit_file_runs_a_notify_service_with_flags_the_cli_takes(name: str) -> None:
    """Each contrib unit is Type=notify and its ExecStart parses with imgserve's CLI."""
    unit = CONTRIB / name
    assert "\nType=notify\n" in unit.read_text()
    program, *argv = _exec_start(unit)
    assert program.endswith("/bin/imgserve")
    args = cli.build_parser().parse_args([a.replace("%d", "/run/credentials/x") for a in argv])
    assert args.command == ("serve" if name == "imgserve.service" else "worker")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_unit_files_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd-analyze verify accepts both units (ExecStart pointed at this imgserve)."""
    here = Path(sys.executable).with_name("imgserve")
    for name in UNITS:
        text = (CONTRIB / name).read_text()
        (tmp_path / name).write_text(text.replace("/opt/imgserve/.venv/bin/imgserve", str(here)))
    result = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / n) for n in UNITS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr

"""The real daemon as a subprocess: ``imgserve start --state-dir ...`` on a free port."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pyvips

from imgserve.planner import PROCESS_NAME as PLANNER_NAME
from tests.servers import free_port  # tests import it from here too

IMGSERVE = [sys.executable, "-m", "imgserve"]


def descendants(pid: int) -> set[int]:
    """All live processes below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class Reply:
    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
        self.status = status
        self.body = body
        self.headers = headers


class Daemon:
    """Drives one daemon started with the real CLI."""

    def __init__(self, state_dir: Path, out_dir: Path, extra: list[str]) -> None:
        self.state_dir = state_dir
        self.out_dir = out_dir
        self.port = free_port()
        self.args = [
            "--state-dir", str(state_dir), "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", "2", "--allow-net", "127.0.0.0/8", "--file-root", str(out_dir),
            "--shutdown-timeout", "10", *extra,
        ]  # fmt: skip
        self.env = {**os.environ, "IMGSERVE_FAULT_INJECTION": "1"}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cli(self, command: str, *more: str) -> subprocess.CompletedProcess[str]:
        args = self.args if command in ("start", "restart", "serve") else self.args[:2]
        return subprocess.run(
            [*IMGSERVE, command, *args, *more],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=90,
        )

    @property
    def pid(self) -> int:
        return int((self.state_dir / "imgserve.pid").read_text().split()[0])

    def request(self, method: str, path: str, body: bytes | None = None) -> Reply:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return Reply(resp.status, json.loads(resp.read()), dict(resp.headers))
        except urllib.error.HTTPError as exc:
            return Reply(exc.code, json.loads(exc.read()), dict(exc.headers))

    def post(self, job: dict[str, Any]) -> Reply:
        return self.request("POST", "/", json.dumps(job).encode())

    def job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/jobs/{job_id}").body

    def wait(self, job_id: str, timeout_s: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            body = self.job(job_id)
            if body.get("state") in ("done", "failed"):
                return body
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} did not finish: {self.job(job_id)}")

    def wait_running(self, job_id: str, timeout_s: float = 10.0) -> None:
        """Until a worker has the job (fails the test if it never does)."""
        deadline = time.monotonic() + timeout_s
        while self.job(job_id)["state"] != "running":
            assert time.monotonic() < deadline, f"job {job_id} never ran: {self.job(job_id)}"
            time.sleep(0.02)

    def forked(self) -> set[int]:
        """Every child of the daemon's forkserver: image workers and planners."""
        tree = descendants(self.pid)
        servers = {p for p in tree if b"forkserver" in _cmdline(p) and _ppid(p) == self.pid}
        return {p for p in tree if _ppid(p) in servers}

    def workers(self) -> set[int]:
        """Image worker processes."""
        return {p for p in self.forked() if _comm(p) != PLANNER_NAME}

    def planners(self) -> set[int]:
        """Planner processes (imgserve.planner names them)."""
        return {p for p in self.forked() if _comm(p) == PLANNER_NAME}


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _launcher(base: Path) -> tuple[Any, Any]:
    """Start daemons under ``base`` (``start(*flags, env=)``), and stop every one of
    them, killing whatever of its process tree is left (``stop_all()``)."""
    started: list[Daemon] = []

    def start(*extra: str, env: dict[str, str] | None = None) -> Daemon:
        daemon = Daemon(base / f"state{len(started)}", base / "out", list(extra))
        daemon.env.update(env or {})
        daemon.out_dir.mkdir(exist_ok=True)
        result = daemon.cli("start")
        assert result.returncode == 0, result.stderr
        started.append(daemon)
        return daemon

    def stop_all() -> None:
        for daemon in started:
            if (daemon.state_dir / "imgserve.pid").exists():
                pid = daemon.pid
                tree = descendants(pid) | {pid}
                daemon.cli("stop")
                for p in tree:
                    if alive(p):
                        os.kill(p, signal.SIGKILL)

    return start, stop_all


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Any]:
    """Start daemons with extra flags; each is stopped (and checked gone) at the end."""
    start, stop_all = _launcher(tmp_path)
    yield start
    stop_all()


def jpeg(width: int, height: int, marker: bytes = b"") -> bytes:
    """A JPEG with four coloured quadrants, plus an optional trailing fault marker."""
    img = pyvips.Image.black(width, height, bands=3).new_from_image([40, 120, 200])
    img = img.draw_rect([220, 60, 60], 0, 0, width // 2, height // 2, fill=True)
    return bytes(img.jpegsave_buffer(Q=90)) + marker


def resize(src: str, dst: str, **args: Any) -> dict[str, Any]:
    """A 0.2 resize request."""
    return {"operationType": "resize", "srcURL": src, "dstURL": dst, "args": args}


def serve(http_server: Any, name: str, data: bytes) -> str:
    """Put ``data`` on the HTTP test server; return its URL."""
    http_server.state.files[name] = data
    return str(http_server.url(f"/files/{name}"))


def decode(data: bytes) -> pyvips.Image:
    return pyvips.Image.new_from_buffer(bytes(data), "")


@pytest.fixture(scope="module")
def start_module_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Like ``start_daemon``, but each daemon lives until the test module ends, so its
    tests share one start; ``env`` adds variables to the daemon's environment."""
    start, stop_all = _launcher(tmp_path_factory.mktemp("daemon"))
    yield start
    stop_all()


def png_bands(width: int, height: int) -> bytes:
    """A lossless PNG in three vertical bands: the left quarter red, the middle half
    green, the right quarter blue, so a crop or a stretch shows which part it kept."""
    img = pyvips.Image.black(width, height, bands=3).new_from_image([0, 200, 0])
    img = img.draw_rect([220, 0, 0], 0, 0, width // 4, height, fill=True)
    img = img.draw_rect([0, 0, 220], width * 3 // 4, 0, width - width * 3 // 4, height, fill=True)
    return bytes(img.pngsave_buffer())


Part = tuple[str, str | None, bytes]
"""One multipart part: its name, its file name (None: not a file part) and its bytes."""


def multipart(parts: list[Part], boundary: str = "imgserve-test-boundary") -> tuple[bytes, str]:
    """A multipart/form-data body written out by hand (so tests control every byte),
    and its Content-Type."""
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        out += data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


def send(
    daemon: Daemon, path: str, body: bytes, content_type: str | None = "application/json"
) -> Reply:
    """POST ``body`` with ``content_type`` (None: no Content-Type header at all, which
    urllib would not allow)."""
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60)
    try:
        headers = {"Content-Type": content_type} if content_type is not None else {}
        conn.request("POST", path, body, headers)
        resp = conn.getresponse()
        return Reply(resp.status, json.loads(resp.read()), dict(resp.getheaders()))
    finally:
        conn.close()


def post_jobs(daemon: Daemon, job: dict[str, Any]) -> Reply:
    """``POST /jobs`` with a JSON job."""
    return send(daemon, "/jobs", json.dumps(job).encode())

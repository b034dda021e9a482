"""imgserve end to end: the real daemon, started and stopped with its own CLI.

A job is ``POST /`` with the JSON contract, sent through :mod:`bench.http1`
(a lean keep-alive client: the benchmark's client shares the CPUs with the
daemon, so its CPU per job is kept small); it counts once its result is in
place under ``--file-root``, as seen through inotify (:class:`Arrivals`): the
daemon renames every file into place, the placeholder before the reply and the
result after it, so a name's second arrival is its result. Watching the
directory costs the daemon nothing, where polling ``GET /jobs/<id>`` would
cost it a request per poll. Jobs that failed (their failure image also
arrives) are counted from ``GET /health`` around each phase. Sources come from
the benchmark's source server on loopback. A several-output workload is one
``POST /jobs`` per source, counted once every output's result has arrived.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from asyncinotify import Inotify, Mask

from bench import http1, workloads
from bench.workloads import Workload


class JobFailed(RuntimeError):
    """The daemon refused a job or reported it failed."""


def executable() -> str:
    """The ``imgserve`` script next to this interpreter, else the one on PATH."""
    beside = Path(sys.executable).parent / "imgserve"
    if beside.exists():
        return str(beside)
    found = shutil.which("imgserve")
    if found is None:
        raise FileNotFoundError("no imgserve executable (pip install -e . in this venv)")
    return found


def port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


class Daemon:
    """One imgserve daemon under ``state_dir``, writing results into ``out_dir``.

    With ``src_dir`` (a checkout's ``src/``) that code is run instead of the
    installed package, through ``python -m imgserve`` and PYTHONPATH.
    """

    def __init__(
        self,
        state_dir: Path,
        out_dir: Path,
        port: int,
        workers: int,
        src_dir: Path | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.out_dir = out_dir
        self.host = "127.0.0.1"
        self.port = port
        self.workers = workers
        self.src_dir = src_dir
        self.extra_env = dict(extra_env or {})
        self.pid: int | None = None

    def _command(self) -> list[str]:
        if self.src_dir is not None:
            return [sys.executable, "-m", "imgserve"]
        return [executable()]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ, **self.extra_env)
        if self.src_dir is not None:
            env["PYTHONPATH"] = str(self.src_dir)
        return env

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _flags(self) -> list[str]:
        return ["--state-dir", str(self.state_dir)]

    def start(self, timeout_s: float = 60.0) -> int:
        """``imgserve start``; returns the daemon's pid."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            *self._command(), "start", *self._flags(), "--host", self.host,
            "--port", str(self.port), "--workers", str(self.workers),
            "--allow-net", "127.0.0.0/8", "--file-root", str(self.out_dir),
        ]  # fmt: skip
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout_s, env=self._env()
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"imgserve start exited {done.returncode}: {done.stderr.strip()[-1500:]}"
            )
        deadline = time.monotonic() + timeout_s
        while not port_open(self.host, self.port):
            if time.monotonic() > deadline:
                raise RuntimeError("imgserve start returned but the port never opened")
            time.sleep(0.05)
        self.pid = self._find_pid()
        return self.pid

    def _find_pid(self) -> int:
        runtime = self.state_dir / "imgserve.runtime.json"
        if runtime.exists():
            pid = json.loads(runtime.read_text()).get("pid")
            if isinstance(pid, int) and psutil.pid_exists(pid):
                return pid
        for pidfile in self.state_dir.glob("*.pid"):
            text = pidfile.read_text().strip()
            if text.isdigit() and psutil.pid_exists(int(text)):
                return int(text)
        for conn in psutil.net_connections("tcp"):
            listening = conn.status == psutil.CONN_LISTEN and conn.laddr
            if listening and conn.laddr.port == self.port and conn.pid:
                return int(conn.pid)
        raise RuntimeError("cannot tell the imgserve daemon's pid")

    def stop(self, timeout_s: float = 60.0) -> None:
        """``imgserve stop``; kills what is left of the tree if that fails."""
        tree: list[psutil.Process] = []
        if self.pid is not None and psutil.pid_exists(self.pid):
            root = psutil.Process(self.pid)
            tree = [root, *root.children(recursive=True)]
        subprocess.run(
            [*self._command(), "stop", *self._flags()],
            capture_output=True, text=True, timeout=timeout_s, check=False, env=self._env(),
        )  # fmt: skip
        _, alive = psutil.wait_procs(tree, timeout=10)
        for proc in alive:
            proc.kill()
        self.pid = None

    def version_info(self) -> str:
        done = subprocess.run(
            [*self._command(), "version"], capture_output=True, text=True, env=self._env()
        )
        return done.stdout.strip() or done.stderr.strip()


# Plain ints: IntFlag arithmetic is slow.
_MOVED_TO = int(Mask.MOVED_TO)
_Q_OVERFLOW = int(Mask.Q_OVERFLOW)


class Arrivals:
    """Files renamed into one directory, counted per name (inotify, no polling).

    The inotify descriptor stays registered with the event loop and its events
    are decoded here (``struct inotify_event``): asyncinotify's own reader
    registers and unregisters the descriptor for every read and builds an
    ``Event`` with a ``Path`` per file, which cost the client about 0.2 ms of
    CPU per job more.

    ``MOVED_FROM`` is watched only to be ignored: the kernel merges an event
    into an identical unread one just before it (cookies are not compared), so
    a job's two renames to the same name, unread in between, would count once
    and the job would time out. The daemon's temporary files live in the same
    directory, so their ``MOVED_FROM`` always separates the two.
    """

    _EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name

    def __init__(self, directory: Path) -> None:
        self.inotify = Inotify()
        self.inotify.add_watch(directory, Mask.MOVED_FROM | Mask.MOVED_TO | Mask.Q_OVERFLOW)
        self.fd = self.inotify.fd
        # Read into one reused buffer: a fresh large bytes object per read costs
        # an mmap/munmap pair in glibc.
        self.buffer = bytearray(64 * 1024)
        self.count: dict[str, int] = {}
        self.waiters: dict[str, tuple[int, asyncio.Future[None], float]] = {}
        """name -> (arrivals wanted, its future, loop time of its deadline)"""
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.fd, self._on_readable)
        # One sweep a second enforces the waits' timeouts: cheaper than a timer
        # armed and cancelled per job.
        self.sweeper = self.loop.call_later(1.0, self._sweep)

    def _on_readable(self) -> None:
        try:
            size = os.readv(self.fd, [self.buffer])
        except BlockingIOError:
            return
        data = self.buffer
        event = self._EVENT
        offset = 0
        while offset < size:
            _wd, mask, _cookie, length = event.unpack_from(data, offset)
            start = offset + event.size
            offset = start + length
            if mask & _MOVED_TO:
                name = bytes(data[start:offset]).rstrip(b"\0")
                if name:
                    self._arrived(os.fsdecode(name))
            elif mask & _Q_OVERFLOW:
                self._overflowed()

    def _arrived(self, name: str) -> None:
        seen = self.count[name] = self.count.get(name, 0) + 1
        wanted = self.waiters.get(name)
        if wanted is not None and seen >= wanted[0] and not wanted[1].done():
            wanted[1].set_result(None)

    def _sweep(self) -> None:
        now = self.loop.time()
        for _, waiter, deadline in self.waiters.values():
            if deadline <= now and not waiter.done():
                waiter.set_exception(TimeoutError())
        self.sweeper = self.loop.call_later(1.0, self._sweep)

    def _overflowed(self) -> None:
        error = RuntimeError("inotify queue overflowed: arrivals were missed")
        for _, waiter, _ in self.waiters.values():
            if not waiter.done():
                waiter.set_exception(error)

    async def wait(self, name: str, arrivals: int, timeout_s: float) -> None:
        """Until ``name`` has arrived ``arrivals`` times (counting those already seen)."""
        if self.count.get(name, 0) < arrivals:
            waiter = self.loop.create_future()
            self.waiters[name] = (arrivals, waiter, self.loop.time() + timeout_s)
            try:
                await waiter
            finally:
                del self.waiters[name]
        self.count.pop(name, None)

    async def close(self) -> None:
        self.sweeper.cancel()
        self.loop.remove_reader(self.fd)
        self.inotify.close()


async def failed_jobs(http: aiohttp.ClientSession, daemon: Daemon) -> int:
    """The daemon's count of failed jobs (``GET /health``)."""
    async with http.get(daemon.base_url + "/health") as reply:
        return int((await reply.json())["failed"])


class Client:
    """Submits jobs of one workload and waits for each result to be in place.

    ``http`` is the benchmark's pool of keep-alive connections to the daemon.
    A one-output workload is 0.2's ``POST /`` (reply 200); a several-output one
    is one ``POST /jobs`` per source (reply 202), done when every output's
    result has arrived. ``placeholder`` (``POST /jobs`` only) asks for the
    placeholders before the reply; without them each output arrives once.
    """

    RESULT_TIMEOUT_S = 120.0

    def __init__(
        self,
        http: http1.Pool,
        daemon: Daemon,
        arrivals: Arrivals,
        workload: Workload,
        sources: list[str],
        src_base_url: str,
        tag: str,
        placeholder: bool = True,
    ) -> None:
        self.http = http
        self.daemon = daemon
        self.arrivals = arrivals
        self.workload = workload
        self.sources = sources
        self.src_base_url = src_base_url
        self.tag = tag
        self.placeholder = placeholder or not workload.renditions
        self.sample_dst: list[tuple[str, workloads.Output, workloads.Request]] = []
        """(path of a result, the output it is, its request)"""

    @property
    def arrivals_per_output(self) -> int:
        """The placeholder arrives before the reply, the result (or failure image) after."""
        return 2 if self.placeholder else 1

    def body(self, index: int) -> tuple[dict[str, Any], workloads.Request]:
        req = workloads.request(self.workload, self.sources, index)
        out_dir = str(self.daemon.out_dir)
        if self.workload.renditions:
            body = workloads.jobs_body(
                self.workload, req, self.src_base_url, out_dir, self.tag, self.placeholder
            )
        else:
            body = workloads.imgserve_body(
                self.workload, req, self.src_base_url, out_dir, tag=self.tag
            )
        return body, req

    async def submit(self, index: int) -> tuple[str, list[str], workloads.Request]:
        """POST one job; returns (job id, the paths of its outputs, request)."""
        body, req = self.body(index)
        path, status = ("/jobs", 202) if self.workload.renditions else ("/", 200)
        reply = await self.http.post(path, json.dumps(body).encode())
        if reply.status != status:
            raise JobFailed(
                f"POST {path} -> {reply.status}: {reply.body[:300].decode(errors='replace')}"
            )
        data = json.loads(reply.body)
        if self.workload.renditions:
            dst_urls = [str(out["url"]) for out in body["outputs"]]
        else:
            dst_urls = [str(data.get("dstURL", ""))]
        return str(data["jobId"]), [url.removeprefix("file://") for url in dst_urls], req

    async def wait_done(self, submitted: tuple[str, list[str], workloads.Request]) -> None:
        """Wait until every output's result is renamed into place (raises on timeout)."""
        job_id, paths, req = submitted
        names = [path.rsplit("/", 1)[-1] for path in paths]
        want = self.arrivals_per_output
        try:
            if len(names) == 1:
                await self.arrivals.wait(names[0], want, self.RESULT_TIMEOUT_S)
            else:
                await asyncio.gather(
                    *(self.arrivals.wait(name, want, self.RESULT_TIMEOUT_S) for name in names)
                )
        except TimeoutError as exc:
            raise JobFailed(f"job {job_id}: no result after {self.RESULT_TIMEOUT_S:g} s") from exc
        if not self.sample_dst:
            self.sample_dst = list(zip(paths, req.outputs, [req] * len(paths), strict=True))

    async def job(self, index: int) -> int:
        """One job end to end (for the closed loop); output size is not known here."""
        await self.wait_done(await self.submit(index))
        return 0

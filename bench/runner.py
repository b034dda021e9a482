"""One benchmark run: set everything up, measure in interleaved rounds, tear down.

Round ``r`` visits every workload; for each it measures the systems one after
the other, in an order rotated every round (limit, imgserve, thumbor; then
imgserve, thumbor, limit; ...) so that slow drift of the machine hits all of
them alike. Ratios are taken within a round, then summarised over rounds.
After the rounds, imgserve's reply latency is measured with open-loop
arrivals at 50% and 80% of its median measured capacity per workload.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pyvips

from bench import client, http1, images, workloads
from bench.procmon import Noise, TreeMonitor
from bench.systems import imgserve as imgserve_sys
from bench.systems import limit as limit_sys
from bench.systems import thumbor as thumbor_sys
from bench.workloads import Workload

BENCH_DIR = Path(__file__).resolve().parent
THUMBOR_VENV = BENCH_DIR / ".venv-thumbor"
SYSTEMS = ("limit", "imgserve", "thumbor")
NO_PLACEHOLDER = "imgserve-noph"
"""imgserve taking ``POST /jobs`` with ``"placeholder": false`` (several-output
workloads only: placeholders cost one more image per output)."""
# Foreign CPU (% of one core) above which a phase is flagged as disturbed.
NOISY_PCT = 15.0
LOAD_LEVELS = (0.5, 0.8)


@dataclass(frozen=True)
class Options:
    """Everything a run is told (see cli.py for the flags)."""

    rounds: int
    seconds: float
    warmup_s: float
    workloads: tuple[Workload, ...]
    skip_thumbor: bool
    smoke: bool
    out_dir: Path
    workers: int
    in_flight: int
    latency_s: float | None
    """None: long enough for ~250 requests, within [seconds, 15 s]."""
    imgserve_src: Path | None = None
    """Run imgserve from this ``src/`` directory instead of the installed package."""
    imgserve_env: tuple[tuple[str, str], ...] = ()
    """Extra environment for the imgserve daemon only (A/B experiments)."""


@dataclass
class Phase:
    """One system measured on one workload in one round."""

    round: int
    workload: str
    system: str
    per_s: float
    """Requests (sources) finished per second; ``outputs_per_job`` times that many images."""
    completed: int
    window_s: float
    mode: str = ""
    outputs_per_job: int = 1
    latency_p50_ms: float | None = None
    """Median time a request counted in the window took, start to last output."""
    latency_p95_ms: float | None = None
    cpu_ms_per_job: float | None = None
    root_cpu_ms_per_job: float | None = None
    """CPU of the root process alone (imgserve: the API process, not the workers)."""
    client_cpu_ms_per_job: float | None = None
    source_server_cpu_ms_per_job: float | None = None
    out_kb_per_job: float | None = None
    failed: int = 0
    unfinished: int = 0
    errors: list[str] = field(default_factory=list)
    foreign_cpu_pct: float | None = None
    """CPU used by processes outside the benchmark, % of one core, over the phase."""


@dataclass
class Latency:
    """imgserve's POST reply latency at one load level."""

    workload: str
    load: float
    rate_per_s: float
    duration_s: float
    sent: int
    finished: int
    failed: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    errors: list[str] = field(default_factory=list)
    foreign_cpu_pct: float | None = None


@dataclass
class Results:
    """Everything measured; ``report`` turns it into tables."""

    options: dict[str, Any]
    environment: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, list[str]] = field(default_factory=dict)
    phases: list[Phase] = field(default_factory=list)
    latency: list[Latency] = field(default_factory=list)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    tree_processes: dict[str, int] = field(default_factory=dict)
    per_process: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    available: dict[str, bool] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Interrupted(RuntimeError):
    """SIGINT or SIGTERM arrived; the run stopped between two phases."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def git_head(where: Path = BENCH_DIR, paths: tuple[str, ...] = ()) -> str:
    """The commit checked out at ``where``, "+dirty" when ``paths`` (all: empty) differ."""
    done = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, check=False
    )
    head = done.stdout.strip() or "unknown"
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no", "--", *paths],
        cwd=where, capture_output=True, text=True, check=False,
    )  # fmt: skip
    return head + ("+dirty" if status.stdout.strip() else "")


class Runner:
    """Owns the servers, the pools and the results of one run."""

    def __init__(self, options: Options) -> None:
        self.o = options
        self.results = Results(options=_jsonable(asdict(options)))
        self.monitor = TreeMonitor(0.05)
        self.run_dir = options.out_dir / ("smoke-run" if options.smoke else "run")
        self.sources: images.SourceSet | None = None
        self.src_proc: subprocess.Popen[bytes] | None = None
        self.src_port = 0
        self.limit: limit_sys.Limit | None = None
        self.daemon: imgserve_sys.Daemon | None = None
        self.arrivals: imgserve_sys.Arrivals | None = None
        self.imgserve_http: http1.Pool | None = None
        self.thumbor: thumbor_sys.Server | None = None
        self.limit_modes: dict[str, list[str]] = {}
        self.stopping = False

    def _check_stop(self) -> None:
        if self.stopping:
            raise Interrupted("interrupted by a signal; servers stopped")

    # ---- setup / teardown -------------------------------------------------

    def setup(self) -> None:
        o = self.o
        if self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        self.run_dir.mkdir(parents=True)
        if o.smoke:
            self.sources = images.smoke(o.out_dir / "smoke-images")
        else:
            self.sources = images.real(o.out_dir / "images")
        self.results.sources = {k: list(v) for k, v in self.sources.files.items()}
        self._environment()
        self._start_source_server()
        log(f"limit: {o.workers} pyvips processes")
        self.limit = limit_sys.Limit(self.sources.root, o.workers)
        self.monitor.watch("bench", os.getpid(), background=False)
        self.monitor.start()
        self._start_imgserve()
        if not o.skip_thumbor:
            self._start_thumbor()
        self.results.available = {
            "limit": True,
            "imgserve": self.daemon is not None,
            "thumbor": self.thumbor is not None,
        }

    def _environment(self) -> None:
        env = self.results.environment
        env["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        env["nproc"] = os.cpu_count()
        env["cpu_model"] = cpu_model()
        env["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)
        env["python"] = platform.python_version()
        env["libvips"] = f"{pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)}"
        env["pyvips"] = pyvips.__version__
        env["git_head"] = git_head(BENCH_DIR, (str(BENCH_DIR),))
        env["kernel"] = platform.release()

    def _start_source_server(self) -> None:
        assert self.sources is not None
        self.src_port = free_port()
        cmd = [
            sys.executable, "-m", "bench.srcserver", "--root", str(self.sources.root),
            "--port", str(self.src_port),
        ]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=str(BENCH_DIR.parent))
        self.src_proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        deadline = time.monotonic() + 30
        while not imgserve_sys.port_open("127.0.0.1", self.src_port):
            if self.src_proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the source server did not start")
            time.sleep(0.05)
        self.monitor.watch("srcserver", self.src_proc.pid)

    def _start_imgserve(self) -> None:
        daemon = imgserve_sys.Daemon(
            self.run_dir / "imgserve-state",
            self.run_dir / "imgserve-out",
            free_port(),
            self.o.workers,
            self.o.imgserve_src,
            dict(self.o.imgserve_env),
        )
        try:
            pid = daemon.start()
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            note = f"imgserve could not be started, so it is not measured: {exc}"
            log(note)
            self.results.notes.append(note)
            with contextlib.suppress(Exception):
                daemon.stop()
            return
        self.daemon = daemon
        self.monitor.watch("imgserve", pid)
        self.results.environment["imgserve"] = daemon.version_info()
        src = self.o.imgserve_src
        self.results.environment["imgserve_git_head"] = git_head(src) if src else git_head()
        if src:
            self.results.environment["imgserve_src"] = str(src)
        if self.o.imgserve_env:
            self.results.environment["imgserve_env"] = dict(self.o.imgserve_env)
        log(f"imgserve: pid {pid} at {daemon.base_url}, {self.o.workers} workers")

    def _start_thumbor(self) -> None:
        try:
            thumbor_sys.ensure_venv(THUMBOR_VENV)
            self.results.environment.update(
                {f"thumbor_{k}": v for k, v in thumbor_sys.versions(THUMBOR_VENV).items()}
            )
            server = thumbor_sys.Server(
                THUMBOR_VENV, self.run_dir / "thumbor", free_port(), self.o.workers
            )
            pid = server.start()
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            note = f"thumbor could not be started, so it is not measured: {exc}"
            log(note)
            self.results.notes.append(note)
            return
        self.thumbor = server
        self.monitor.watch("thumbor", pid)
        log(f"thumbor: pid {pid} at {server.base_url}, --processes {self.o.workers}")

    def teardown(self) -> None:
        for name, stop in (
            ("thumbor", self.thumbor.stop if self.thumbor else None),
            ("imgserve", self.daemon.stop if self.daemon else None),
            ("limit", self.limit.close if self.limit else None),
        ):
            if stop is None:
                continue
            try:
                stop()
            except Exception as exc:  # keep tearing the rest down
                log(f"stopping {name} failed: {exc}")
        self.monitor.stop()
        if self.src_proc is not None:
            self.src_proc.terminate()
            try:
                self.src_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.src_proc.kill()

    # ---- measuring ---------------------------------------------------------

    async def measure(self) -> Results:
        async with client.session(keep_alive=True) as keep, client.session(False) as fresh:
            if self.daemon is not None:
                self.arrivals = imgserve_sys.Arrivals(self.daemon.out_dir)
                self.imgserve_http = http1.Pool(self.daemon.host, self.daemon.port)
            try:
                await self._measure(keep, fresh)
            finally:
                if self.imgserve_http is not None:
                    self.imgserve_http.close()
                if self.arrivals is not None:
                    await self.arrivals.close()
                # Once, after all measurement: deleting files inside a measured
                # window slows the daemon's next file creations on this disk.
                self._clean_outputs()
        for name in ("imgserve", "thumbor"):
            if self.results.available.get(name):
                self.results.peak_rss_mb[name] = self.monitor.peak_rss_bytes(name) / 2**20
                self.results.tree_processes[name] = self.monitor.processes(name)
                self.results.per_process[name] = self.monitor.per_process(name)
        return self.results

    async def _measure(self, keep: aiohttp.ClientSession, fresh: aiohttp.ClientSession) -> None:
        o = self.o
        await self._warm(keep, fresh)
        for rnd in range(o.rounds):
            for workload in o.workloads:
                systems = systems_for(workload)
                order = systems[rnd % len(systems) :] + systems[: rnd % len(systems)]
                for system in order:
                    self._check_stop()
                    await self._phase(rnd, workload, system, keep, fresh)
        if self.daemon is not None:
            for workload in o.workloads:
                for load in LOAD_LEVELS:
                    self._check_stop()
                    await self._latency(workload, load, keep)

    async def _warm(self, keep: aiohttp.ClientSession, fresh: aiohttp.ClientSession) -> None:
        """Every workload once through each server, unmeasured (imports, pools, caches)."""
        seconds = min(1.0, 2 * self.o.warmup_s)
        for workload in self.o.workloads:
            self._check_stop()
            names = self._names(workload)
            if self.daemon is not None:
                c = self._imgserve_client(workload, "warm")
                await client.closed_loop(c.job, self.o.in_flight, 0.0, seconds)
            if self.thumbor is not None:
                t = thumbor_sys.Client(
                    fresh, self.thumbor, workload, names, self._src_host(), "warm"
                )
                await client.closed_loop(t.job, self.o.in_flight, 0.0, seconds)
        log(f"warmed up ({seconds:g} s per workload per server)")

    async def _phase(
        self,
        rnd: int,
        workload: Workload,
        system: str,
        keep: aiohttp.ClientSession,
        fresh: aiohttp.ClientSession,
    ) -> None:
        if system == "limit":
            self._limit_phase(rnd, workload)
        elif system in ("imgserve", NO_PLACEHOLDER) and self.daemon is not None:
            await self._imgserve_phase(rnd, workload, system, keep)
        elif system == "thumbor" and self.thumbor is not None:
            await self._thumbor_phase(rnd, workload, fresh)

    def _imgserve_client(
        self, workload: Workload, tag: str, placeholder: bool = True
    ) -> imgserve_sys.Client:
        assert self.daemon is not None and self.arrivals is not None
        assert self.imgserve_http is not None
        return imgserve_sys.Client(
            self.imgserve_http,
            self.daemon,
            self.arrivals,
            workload,
            self._names(workload),
            self._src_url(),
            tag,
            placeholder,
        )

    async def _count_daemon_failures(
        self, http: aiohttp.ClientSession, before: int, into: Phase | client.OpenResult
    ) -> None:
        """Add the jobs the daemon failed since it counted ``before`` (its failure
        images arrive like results, so the client cannot tell them apart)."""
        assert self.daemon is not None
        failed = await imgserve_sys.failed_jobs(http, self.daemon) - before
        if failed:
            into.failed += failed
            into.errors.append(f"{failed} jobs failed in the daemon")

    def _names(self, workload: Workload) -> list[str]:
        assert self.sources is not None
        return self.sources.files[workload.source_kind]

    def _limit_phase(self, rnd: int, workload: Workload) -> None:
        assert self.limit is not None
        modes = self.limit_modes.get(workload.name, ["processes", "threads"])
        best: Phase | None = None
        for mode in modes:
            noise = Noise(self.monitor)
            noise.start()
            r = self.limit.run(
                mode, workload, self._names(workload), self.o.warmup_s, self.o.seconds
            )
            foreign = noise.stop()
            phase = Phase(
                round=rnd, workload=workload.name, system="limit", mode=mode,
                per_s=r.images / r.window_s, completed=r.images, window_s=r.window_s,
                cpu_ms_per_job=1000 * r.cpu_s / r.all_images if r.all_images else None,
                out_kb_per_job=r.out_bytes / r.images / 1024 if r.images else None,
                foreign_cpu_pct=foreign, outputs_per_job=len(workload.outputs),
            )  # fmt: skip
            _set_latency(phase, list(r.latencies_s))
            log(
                f"r{rnd} {workload.name:18} limit/{mode:9} {phase.per_s:7.1f} "
                f"{_unit(workload)}" + _noisy(foreign)
            )
            if best is None or phase.per_s > best.per_s:
                best = phase
        assert best is not None
        # Both variants are tried in the first round; later rounds run the faster.
        self.limit_modes[workload.name] = [best.mode]
        self.results.phases.append(best)

    async def _imgserve_phase(
        self, rnd: int, workload: Workload, system: str, http: aiohttp.ClientSession
    ) -> None:
        assert self.daemon is not None
        placeholder = system != NO_PLACEHOLDER
        c = self._imgserve_client(workload, f"r{rnd}{'i' if placeholder else 'n'}", placeholder)
        failed0 = await imgserve_sys.failed_jobs(http, self.daemon)
        phase = await self._closed(rnd, workload, system, c.job, tree="imgserve")
        await self._count_daemon_failures(http, failed0, phase)
        if rnd == 0:
            for path, out, req in c.sample_dst:
                self._check_file(system, workload, out, req, path)
        self.results.phases.append(phase)

    async def _thumbor_phase(
        self, rnd: int, workload: Workload, http: aiohttp.ClientSession
    ) -> None:
        assert self.thumbor is not None
        tag = f"r{rnd}t"
        c = thumbor_sys.Client(
            http, self.thumbor, workload, self._names(workload), self._src_host(), tag
        )
        phase = await self._closed(rnd, workload, "thumbor", c.job)
        if rnd == 0 and c.sample is not None:
            bodies, req = c.sample
            for body, out in zip(bodies, req.outputs, strict=True):
                image = pyvips.Image.new_from_buffer(body, "")
                self._check_image("thumbor", workload, out, req, image)
        self.results.phases.append(phase)

    async def _closed(
        self,
        rnd: int,
        workload: Workload,
        system: str,
        job: client.Job,
        tree: str | None = None,
    ) -> Phase:
        """Closed-loop throughput of ``job``; ``tree`` is the process tree doing
        the work (default: the one named ``system``)."""
        probes: dict[str, float] = {}
        tree = tree or system

        def start() -> None:
            probes["root0"] = self.monitor.root_cpu_s(tree)
            probes["cpu0"] = self.monitor.cpu_s(tree)
            probes["client0"] = time.thread_time()
            probes["src0"] = self.monitor.cpu_s("srcserver")

        def end() -> None:
            probes["root1"] = self.monitor.root_cpu_s(tree)
            probes["cpu1"] = self.monitor.cpu_s(tree)
            probes["client1"] = time.thread_time()
            probes["src1"] = self.monitor.cpu_s("srcserver")

        noise = Noise(self.monitor)
        noise.start()
        r = await client.closed_loop(
            job, self.o.in_flight, self.o.warmup_s, self.o.seconds, start, end,
            min_completed=1 if self.o.smoke else 0,
        )  # fmt: skip
        foreign = noise.stop()
        n = r.completed
        phase = Phase(
            round=rnd, workload=workload.name, system=system, per_s=r.per_s,
            completed=n, window_s=r.window_s, failed=r.failed,
            unfinished=r.started - r.finished - r.failed, errors=r.errors,
            foreign_cpu_pct=foreign, outputs_per_job=len(workload.outputs),
        )  # fmt: skip
        _set_latency(phase, r.latencies_s)
        if n and "cpu1" in probes:
            phase.cpu_ms_per_job = 1000 * (probes["cpu1"] - probes["cpu0"]) / n
            phase.root_cpu_ms_per_job = 1000 * (probes["root1"] - probes["root0"]) / n
            phase.client_cpu_ms_per_job = 1000 * (probes["client1"] - probes["client0"]) / n
            phase.source_server_cpu_ms_per_job = 1000 * (probes["src1"] - probes["src0"]) / n
        if r.out_bytes and n:
            phase.out_kb_per_job = r.out_bytes / n / 1024
        extra = f", {r.failed} failed: {r.errors[:1]}" if r.failed or r.errors else ""
        extra += _noisy(foreign)
        log(f"r{rnd} {workload.name:18} {system:15} {phase.per_s:7.1f} {_unit(workload)}{extra}")
        return phase

    async def _latency(self, workload: Workload, load: float, http: aiohttp.ClientSession) -> None:
        assert self.daemon is not None
        capacity = [
            p.per_s
            for p in self.results.phases
            if p.system == "imgserve" and p.workload == workload.name and p.per_s > 0
        ]
        if not capacity:
            return
        capacity.sort()
        rate = load * capacity[len(capacity) // 2]
        duration = self.o.latency_s or min(15.0, max(self.o.seconds, 250 / rate))
        c = self._imgserve_client(workload, f"l{int(load * 100)}")
        failed0 = await imgserve_sys.failed_jobs(http, self.daemon)
        noise = Noise(self.monitor)
        noise.start()
        r = await client.open_loop(c.submit, c.wait_done, rate, duration)
        foreign = noise.stop()
        await self._count_daemon_failures(http, failed0, r)
        lat = [1000 * x for x in r.latencies_s]
        entry = Latency(
            workload=workload.name, load=load, rate_per_s=rate, duration_s=duration,
            sent=r.sent, finished=r.finished, failed=r.failed,
            p50_ms=client.percentile(lat, 50), p95_ms=client.percentile(lat, 95),
            p99_ms=client.percentile(lat, 99), max_ms=max(lat) if lat else float("nan"),
            errors=r.errors, foreign_cpu_pct=foreign,
        )  # fmt: skip
        log(
            f"latency {workload.name:18} {int(load * 100)}% ({rate:.1f}/s, {r.sent} sent): "
            f"p50 {entry.p50_ms:.1f} p95 {entry.p95_ms:.1f} p99 {entry.p99_ms:.1f} ms"
            + (f", {r.failed} failed: {r.errors[:1]}" if r.failed else "")
            + _noisy(foreign)
        )
        self.results.latency.append(entry)

    # ---- helpers -----------------------------------------------------------

    def _src_url(self) -> str:
        return f"http://127.0.0.1:{self.src_port}"

    def _src_host(self) -> str:
        return f"127.0.0.1:{self.src_port}"

    def _clean_outputs(self) -> None:
        """Delete imgserve's results (names are unique per run, so never mid-run)."""
        if self.daemon is None:
            return
        for path in self.daemon.out_dir.iterdir():
            with contextlib.suppress(OSError):
                path.unlink()

    def _check_file(
        self,
        system: str,
        workload: Workload,
        out: workloads.Output,
        req: workloads.Request,
        path: str,
    ) -> None:
        try:
            image = pyvips.Image.new_from_buffer(Path(path).read_bytes(), "")
        except (OSError, pyvips.Error) as exc:
            self.results.checks.append(f"FAIL {system} {workload.name}: cannot read {path}: {exc}")
            return
        self._check_image(system, workload, out, req, image)

    def _check_image(
        self,
        system: str,
        workload: Workload,
        out: workloads.Output,
        req: workloads.Request,
        image: pyvips.Image,
    ) -> None:
        assert self.sources is not None
        want = workloads.expected_size(out, self.sources.sizes[req.source])
        got = (image.width, image.height)
        loader = str(image.get("vips-loader")) if image.get_typeof("vips-loader") else "?"
        fmt_ok = out.out_ext.replace("jpg", "jpeg") in loader
        size_ok = abs(got[0] - want[0]) <= 1 and abs(got[1] - want[1]) <= 1
        verdict = "ok  " if fmt_ok and size_ok else "FAIL"
        self.results.checks.append(
            f"{verdict} {system} {workload.name}: {got[0]}x{got[1]} {loader}, "
            f"expected {want[0]}x{want[1]} {out.out_ext}"
        )


def systems_for(workload: Workload) -> tuple[str, ...]:
    """The systems measured on ``workload``, in round 0's order."""
    if workload.renditions:
        return (*SYSTEMS, NO_PLACEHOLDER)
    return SYSTEMS


def _unit(workload: Workload) -> str:
    return f"sources/s ({len(workload.outputs)} outputs each)" if workload.renditions else "jobs/s"


def _set_latency(phase: Phase, latencies_s: list[float]) -> None:
    if latencies_s:
        ms = [1000 * x for x in latencies_s]
        phase.latency_p50_ms = client.percentile(ms, 50)
        phase.latency_p95_ms = client.percentile(ms, 95)


def _noisy(foreign_pct: float) -> str:
    if foreign_pct <= NOISY_PCT:
        return ""
    return f" [other processes used {foreign_pct:.0f}% of a core]"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def run(options: Options) -> Results:
    """Set up, measure, tear down; returns the results (raises on setup errors).

    SIGINT or SIGTERM stops the run after the current phase (a second one at
    once) and still stops every server it started. The handlers are installed
    explicitly: a background job's inherited "ignore SIGINT" would otherwise
    leave no way to stop it cleanly.
    """
    runner = Runner(options)

    def on_signal(signum: int, _frame: object) -> None:
        if runner.stopping:
            raise KeyboardInterrupt
        runner.stopping = True
        log(f"signal {signum}: stopping after this phase (send it again to stop now)")

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        runner.setup()
        return asyncio.run(runner.measure())
    finally:
        try:
            runner.teardown()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

"""CPU time and peak RSS of whole process trees, sampled from a background thread.

Every ``interval_s`` (50 ms) the monitor walks each watched tree (the root and
all its descendants), remembers every process's latest user+system CPU time and
records the tree's summed RSS. CPU of a process that exits between two samples
is counted up to its last sample (at most one interval lost), which is why the
monitor keeps per-process values instead of reading ``children_*`` times.
RSS is summed over the tree, so pages shared between forked processes count
once per process; it is the same rule for every system measured.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

_GONE = (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess)
# Members of a tree are listed again this often (or when one exited): listing
# children reads every process on the machine, ~1 ms, too much for every sample.
MEMBERS_EVERY_S = 0.5


@dataclass
class _Tree:
    root: psutil.Process
    background: bool = True
    cpu_s: dict[tuple[int, float], float] = field(default_factory=dict)
    rss_bytes: int = 0
    peak_rss_bytes: int = 0
    processes: int = 0
    peak_by_process: dict[tuple[int, float], tuple[str, int]] = field(default_factory=dict)
    """Per process: a short description and its own peak RSS."""
    members: list[psutil.Process] = field(default_factory=list)
    members_at: float = -1e9
    """When ``members`` was last listed (finding children scans every process)."""


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent running anything (all cores)."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0))


class Noise:
    """Measures CPU used on the machine by processes outside the watched trees.

    ``start()`` then ``stop()`` returns that foreign CPU in percent of one core
    over the interval: other people's work competing with the benchmark.
    """

    def __init__(self, monitor: TreeMonitor) -> None:
        self.monitor = monitor
        self._t0 = self._busy0 = self._ours0 = 0.0

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._busy0 = machine_busy_s()
        self._ours0 = self.monitor.all_cpu_s()

    def stop(self) -> float:
        ours = self.monitor.all_cpu_s() - self._ours0
        busy = machine_busy_s() - self._busy0
        wall = max(1e-6, time.monotonic() - self._t0)
        return max(0.0, 100 * (busy - ours) / wall)


def describe(proc: psutil.Process) -> str:
    """A short name for a process: its command line, trimmed to the telling part.

    ``python -c "from multiprocessing.X import main; ..."`` becomes
    ``multiprocessing.X``, and a child of a forkserver is called its worker.
    """
    with contextlib.suppress(*_GONE):
        cmd = proc.cmdline()
        if "-c" in cmd[:-1]:
            code = cmd[cmd.index("-c") + 1]
            module = code.split(" import ", 1)[0].removeprefix("from ").strip()
            parent = proc.parent()
            if parent is not None and parent.cmdline() == cmd:
                return f"{module} child (pid {proc.pid})"
            return f"{module} (pid {proc.pid})"
        if cmd:
            text = " ".join(Path(cmd[0]).name if i == 0 else c for i, c in enumerate(cmd))
            return f"{text[:90]} (pid {proc.pid})"
    return f"pid {proc.pid}"


class TreeMonitor:
    """Samples named process trees until stopped."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self._trees: dict[str, _Tree] = {}
        self._lock = threading.Lock()
        self._sampling = threading.Lock()  # one sample at a time (thread vs caller)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="treemonitor", daemon=True)

    def watch(self, name: str, pid: int, background: bool = True) -> None:
        """Start sampling the tree rooted at ``pid`` under ``name``.

        ``background=False``: sampled only when asked (for long-lived trees whose
        CPU is read at phase boundaries only, such as the benchmark's own).
        """
        with self._lock:
            self._trees[name] = _Tree(psutil.Process(pid), background)
        self.sample(name)

    def forget(self, name: str) -> None:
        with self._lock:
            self._trees.pop(name, None)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                names = [name for name, tree in self._trees.items() if tree.background]
            for name in names:
                self.sample(name)

    def sample(self, name: str) -> None:
        """Take one sample of tree ``name`` now."""
        with self._sampling:
            self._sample(name)

    def _sample(self, name: str) -> None:
        with self._lock:
            tree = self._trees.get(name)
        if tree is None:
            return
        now = time.monotonic()
        if now - tree.members_at > MEMBERS_EVERY_S or not all(p.is_running() for p in tree.members):
            try:
                tree.members = [tree.root, *tree.root.children(recursive=True)]
            except _GONE:
                tree.members = []
            tree.members_at = now
        members = tree.members
        rss = 0
        count = 0
        for proc in members:
            with contextlib.suppress(*_GONE):
                with proc.oneshot():
                    times = proc.cpu_times()
                    mem = proc.memory_info()
                    key = (proc.pid, proc.create_time())
                tree.cpu_s[key] = times.user + times.system
                rss += mem.rss
                count += 1
                known = tree.peak_by_process.get(key)
                if known is None:
                    tree.peak_by_process[key] = (describe(proc), mem.rss)
                elif mem.rss > known[1]:
                    tree.peak_by_process[key] = (known[0], mem.rss)
        with self._lock:
            tree.rss_bytes = rss
            tree.processes = count
            tree.peak_rss_bytes = max(tree.peak_rss_bytes, rss)

    def cpu_s(self, name: str) -> float:
        """Total CPU seconds used so far by every process ever seen in tree ``name``."""
        self.sample(name)
        with self._lock:
            return sum(self._trees[name].cpu_s.values())

    def all_cpu_s(self) -> float:
        """CPU seconds of every process seen in any watched tree, each counted once."""
        with self._lock:
            names = list(self._trees)
        for name in names:
            self.sample(name)
        seen: dict[tuple[int, float], float] = {}
        with self._lock:
            for tree in self._trees.values():
                seen.update(tree.cpu_s)
        return sum(seen.values())

    def root_cpu_s(self, name: str) -> float:
        """CPU seconds of the tree's root process alone (imgserve: the API process)."""
        self.sample(name)
        with self._lock:
            tree = self._trees[name]
            with contextlib.suppress(*_GONE):
                return tree.cpu_s.get((tree.root.pid, tree.root.create_time()), 0.0)
            return 0.0

    def peak_rss_bytes(self, name: str) -> int:
        with self._lock:
            return self._trees[name].peak_rss_bytes

    def per_process(self, name: str) -> list[dict[str, object]]:
        """Every process seen in tree ``name``: pid, description, peak RSS, CPU seconds."""
        with self._lock:
            tree = self._trees[name]
            return [
                {"pid": key[0], "process": desc, "peak_rss_mb": round(rss / 2**20, 1),
                 "cpu_s": round(tree.cpu_s.get(key, 0.0), 2)}
                for key, (desc, rss) in tree.peak_by_process.items()
            ]  # fmt: skip

    def rss_bytes(self, name: str) -> int:
        with self._lock:
            return self._trees[name].rss_bytes

    def processes(self, name: str) -> int:
        with self._lock:
            return self._trees[name].processes

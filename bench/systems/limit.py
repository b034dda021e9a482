"""The limit: a bare pyvips loop doing the same work as imgserve, with no service around it.

Each output is made from the source bytes with ``thumbnail_buffer`` (shrink-on-load,
cover-and-crop or attention crop in the same call), then saved to bytes with
the encoder options imgserve uses (keep no metadata, Huffman-optimised
non-progressive JPEG, Q 80; WebP Q 80; PNG compression 6). A request with
several outputs (``renditions``) makes each one so, one after the other: the
way a per-output server works, without the server. libvips' operation
cache is off, as in imgserve. The loop runs in as many processes as cores, or
as many threads in this process; the caller keeps whichever is faster.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyvips

from bench import workloads
from bench.workloads import UNBOUNDED, Workload

_SOURCES: dict[str, bytes] = {}


@dataclass(frozen=True)
class WindowResult:
    """What one loop did inside the measured window."""

    images: int
    """Finished inside the window."""
    window_s: float
    out_bytes: int
    """Output bytes of the images finished inside the window."""
    all_images: int
    """Finished from the loop's start to its end (warm-up and tail included)."""
    cpu_s: float
    """CPU used from the loop's start to its end (for CPU per image)."""
    latencies_s: tuple[float, ...] = ()
    """Seconds each request counted in the window took (all its outputs)."""


def _load_sources(root: str) -> None:
    pyvips.cache_set_max(0)
    for path in Path(root).iterdir():
        if path.is_file() and path.name not in _SOURCES:
            _SOURCES[path.name] = path.read_bytes()


def _worker_init(root: str, vips_threads: int) -> None:
    pyvips.concurrency_set(vips_threads)
    _load_sources(root)


def _worker_ping(delay_s: float) -> int:
    time.sleep(delay_s)
    return os.getpid()


def render(out: workloads.Output, data: bytes) -> bytes:
    """One output, the bare way: thumbnail_buffer then save to bytes."""
    kwargs: dict[str, Any] = {"height": out.height or UNBOUNDED, "size": "both"}
    if out.gravity == "smart":
        kwargs["crop"] = "attention"
    elif out.gravity == "centre":
        kwargs["crop"] = "centre"
    image = pyvips.Image.thumbnail_buffer(data, out.width, **kwargs)
    if out.out_ext == "jpg":
        saved = image.jpegsave_buffer(
            keep="none",
            optimize_coding=True,
            interlace=workloads.PROGRESSIVE_JPEG,
            Q=workloads.JPEG_QUALITY,
        )
    elif out.out_ext == "webp":
        saved = image.webpsave_buffer(keep="none", Q=workloads.WEBP_QUALITY)
    else:
        saved = image.pngsave_buffer(keep="none", compression=workloads.PNG_COMPRESSION)
    return bytes(saved)


def process(req: workloads.Request, data: bytes) -> int:
    """One request: each output on its own, from the source bytes (as a service
    making one output per request would); returns the output bytes in all."""
    return sum(len(render(out, data)) for out in req.outputs)


def run_window(
    workload_name: str,
    sources: list[str],
    first: int,
    stride: int,
    start_at: float,
    warmup_s: float,
    measure_s: float,
) -> WindowResult:
    """Loop from ``start_at`` (a ``time.monotonic`` value) until the window closes.

    Request numbers are ``first``, ``first + stride``, ...; images finished inside
    ``[start_at + warmup_s, start_at + warmup_s + measure_s]`` are counted.
    """
    workload = workloads.BY_NAME[workload_name]
    delay = start_at - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    t0 = start_at + warmup_s
    t1 = t0 + measure_s
    index = first
    images = out_bytes = all_images = 0
    latencies_s: list[float] = []
    cpu0 = time.process_time()
    while time.monotonic() < t1:
        req = workloads.request(workload, sources, index)
        began = time.monotonic()
        size = process(req, _SOURCES[req.source])
        index += stride
        all_images += 1
        done = time.monotonic()
        if t0 <= done <= t1:
            images += 1
            out_bytes += size
            latencies_s.append(done - began)
    # process_time covers libvips' own threads; in threads mode it covers the
    # other loops too, so the caller measures CPU itself there.
    cpu_s = time.process_time() - cpu0
    return WindowResult(images, measure_s, out_bytes, all_images, cpu_s, tuple(latencies_s))


class Limit:
    """A pool of loop processes (kept for the whole run) plus the threaded variant."""

    def __init__(self, root: Path, workers: int) -> None:
        self.root = root
        self.workers = workers
        ctx = multiprocessing.get_context("spawn")
        # One libvips thread per process: the parallelism comes from the processes.
        self._pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=workers,
            mp_context=ctx,
            initializer=_worker_init,
            initargs=(str(root), 1),
        )
        pids = set(self._pool.map(_worker_ping, [0.3] * workers))
        if len(pids) != workers:
            raise RuntimeError(f"limit pool started {len(pids)} of {workers} processes")
        _load_sources(str(root))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def run(
        self, mode: str, workload: Workload, sources: list[str], warmup_s: float, measure_s: float
    ) -> WindowResult:
        """Requests/s of ``workload`` in ``mode`` ("processes" or "threads"), summed over loops."""
        start_at = time.monotonic() + 0.2
        args = [
            (workload.name, sources, k, self.workers, start_at, warmup_s, measure_s)
            for k in range(self.workers)
        ]
        if mode == "processes":
            futures = [self._pool.submit(run_window, *a) for a in args]
            results = [f.result() for f in futures]
            cpu_s = sum(r.cpu_s for r in results)
        elif mode == "threads":
            results, cpu_s = self._threads(args)
        else:
            raise ValueError(f"unknown limit mode {mode!r}")
        return WindowResult(
            images=sum(r.images for r in results),
            window_s=measure_s,
            out_bytes=sum(r.out_bytes for r in results),
            all_images=sum(r.all_images for r in results),
            cpu_s=cpu_s,
            latencies_s=tuple(t for r in results for t in r.latencies_s),
        )

    def _threads(self, args: list[tuple[Any, ...]]) -> tuple[list[WindowResult], float]:
        results: list[WindowResult | None] = [None] * len(args)
        errors: list[BaseException] = []

        def target(k: int) -> None:
            try:
                results[k] = run_window(*args[k])
            except BaseException as exc:  # re-raised in the caller below
                errors.append(exc)

        old = pyvips.concurrency_get()
        pyvips.concurrency_set(1)
        threads = [threading.Thread(target=target, args=(k,)) for k in range(len(args))]
        try:
            cpu0 = time.process_time()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            cpu_s = time.process_time() - cpu0
        finally:
            pyvips.concurrency_set(old)
        if errors:
            raise errors[0]
        return [r for r in results if r is not None], cpu_s

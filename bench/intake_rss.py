"""Peak RSS of the API process under a burst of large sources (docs/daemon.md).

``python -m bench.intake_rss [--jobs 40] [--megapixels 24] [--set NAME=VALUE ...]``
starts a real daemon (``imgserve start``, embedded queue, two workers), serves one
large noise JPEG from ``bench.srcserver``, sends ``--jobs`` POST / at once and
samples the API process's RSS every 20 ms until every reply is in. Prints one
JSON line: replies by status and code, peak RSS, source size.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
import psutil
import pyvips


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _noise_jpeg(path: Path, megapixels: float) -> int:
    width = int((megapixels * 1e6 * 4 / 3) ** 0.5)
    height = int(width * 3 / 4)
    image = pyvips.Image.gaussnoise(width, height, sigma=60, mean=128).cast("uchar")
    image = image.bandjoin([image, image])
    image.jpegsave(str(path), Q=90)
    return path.stat().st_size


async def _burst(base: str, src: str, out: Path, jobs: int) -> list[tuple[int, int | None]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:

        async def one(n: int) -> tuple[int, int | None]:
            body = {"operationType": "resize", "srcURL": f"{src}/{n}/big.jpg",
                    "dstURL": f"file://{out}/{n}.jpg", "args": {"width": 200}}  # fmt: skip
            async with session.post(base, json=body) as resp:
                reply = await resp.json()
                return resp.status, reply.get("code")

        return await asyncio.gather(*(one(n) for n in range(jobs)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--megapixels", type=float, default=24.0)
    parser.add_argument("--set", action="append", default=[], help="daemon setting NAME=VALUE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images, out, state = root / "images", root / "out", root / "state"
        for d in (images, out, state):
            d.mkdir()
        size = _noise_jpeg(images / "big.jpg", args.megapixels)
        src_port, port = _free_port(), _free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "bench.srcserver", "--root", str(images), "--port",
             str(src_port)],
        )  # fmt: skip
        daemon = [sys.executable, "-m", "imgserve"]
        common = ["--state-dir", str(state)]
        extra = [f"--set={item}" for item in args.set]
        subprocess.run(
            [*daemon, "start", *common, "--host", "127.0.0.1", "--port", str(port),
             "--workers", "2", "--allow-net", "127.0.0.0/8", "--file-root", str(out), *extra],
            check=True,
        )  # fmt: skip
        try:
            pid = int((state / "imgserve.pid").read_text().split()[0])
            api = psutil.Process(pid)
            peak = api.memory_info().rss
            idle = peak
            done = threading.Event()

            def sample() -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, api.memory_info().rss)
                    time.sleep(0.02)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            started = time.monotonic()
            replies = asyncio.run(
                _burst(f"http://127.0.0.1:{port}/", f"http://127.0.0.1:{src_port}/src",
                       out, args.jobs)
            )  # fmt: skip
            elapsed = time.monotonic() - started
            done.set()
            sampler.join()
        finally:
            subprocess.run([*daemon, "stop", *common], check=False, capture_output=True)
            server.terminate()
            server.wait()
    counts = collections.Counter(f"{status}/{code}" if code else str(status)
                                 for status, code in replies)  # fmt: skip
    print(json.dumps({
        "jobs": args.jobs, "source_bytes": size, "settings": args.set,
        "replies": dict(counts), "burst_s": round(elapsed, 2),
        "api_rss_idle_mib": round(idle / 2**20, 1), "api_rss_peak_mib": round(peak / 2**20, 1),
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

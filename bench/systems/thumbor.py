"""thumbor 7.8 from PyPI, in its own venv (``bench/.venv-thumbor``), as the comparison.

Configured to do what imgserve does and nothing more: http_loader (pycurl),
no storage, no result storage, JPEG quality 80 non-progressive, WebP quality 80,
PNG compression 6, and for ``smart`` crops thumbor's usual face + feature
detectors (OpenCV). It runs with ``--processes`` = cores, started in its own
session (``setsid``) and stopped by signalling the whole process group. Its
forked children share one listening socket, so the client opens a new
connection per request (no keep-alive) to spread requests over them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from bench import debian, workloads
from bench.systems.imgserve import port_open
from bench.workloads import Workload

VERSION = "7.8.0"
REQUIREMENTS = [
    f"thumbor[opencv]=={VERSION}",  # opencv: the detectors behind /smart/
    "cairosvg>=2.8.2,<3",  # SVG sources
    "pycurl>=7.45.2,<8",  # the curl HTTP client thumbor's http_loader prefers
]
# pycurl builds against these when pip finds no wheel; cairosvg loads libcairo.
DEBIAN_PACKAGES = ["libcurl4-openssl-dev", "libssl-dev", "libcairo2"]

CONFIG = """\
# Written by the imgserve benchmark (bench/systems/thumbor.py).
LOADER = 'thumbor.loaders.http_loader'
HTTP_LOADER_CURL_ASYNC_HTTP_CLIENT = True
STORAGE = 'thumbor.storages.no_storage'
RESULT_STORAGE = None
ALLOW_UNSAFE_URL = True
QUALITY = {jpeg_quality}
WEBP_QUALITY = {webp_quality}
PROGRESSIVE_JPEG = {progressive}
PNG_COMPRESSION_LEVEL = {png_compression}
PRESERVE_EXIF_INFO = False
DETECTORS = ['thumbor.detectors.face_detector', 'thumbor.detectors.feature_detector']
ENABLE_ETAGS = False
MAX_AGE = 0
"""


class ThumborFailed(RuntimeError):
    """thumbor answered a request with an error."""


def _venv_ok(venv: Path) -> bool:
    python = venv / "bin" / "python"
    if not (venv / "bin" / "thumbor").exists() or not python.exists():
        return False
    probe = "import thumbor, cv2, cairosvg, pycurl; print(thumbor.__version__)"
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    return done.returncode == 0 and done.stdout.strip() == VERSION


def ensure_venv(venv: Path) -> None:
    """Create ``venv`` with thumbor installed, unless it is already there."""
    if _venv_ok(venv):
        return
    debian.ensure(DEBIAN_PACKAGES, "thumbor (pycurl, cairosvg)")
    print(f"[bench] installing thumbor {VERSION} into {venv} (first run only)", file=sys.stderr)
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "--upgrade", "pip"], check=False, capture_output=True)
    done = subprocess.run([*pip, *REQUIREMENTS], capture_output=True, text=True)
    if done.returncode != 0 or not _venv_ok(venv):
        raise RuntimeError(f"installing thumbor failed:\n{done.stderr[-3000:]}")


def versions(venv: Path) -> dict[str, str]:
    """Versions of thumbor and the libraries doing its work."""
    probe = (
        "import json, thumbor, PIL, cv2, cairosvg, tornado, sys; print(json.dumps({"
        "'thumbor': thumbor.__version__, 'Pillow': PIL.__version__, "
        "'opencv': cv2.__version__, 'cairosvg': cairosvg.__version__, "
        "'tornado': tornado.version, 'python': sys.version.split()[0]}))"
    )
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, check=True
    )
    data: dict[str, str] = json.loads(done.stdout)
    return data


class Server:
    """A thumbor server with ``processes`` forked processes on 127.0.0.1:``port``."""

    def __init__(self, venv: Path, work_dir: Path, port: int, processes: int) -> None:
        self.venv = venv
        self.work_dir = work_dir
        self.host = "127.0.0.1"
        self.port = port
        self.processes = processes
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("thumbor is not running")
        return self._proc.pid

    def start(self, timeout_s: float = 60.0) -> int:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        conf = self.work_dir / "thumbor.conf"
        conf.write_text(
            CONFIG.format(
                jpeg_quality=workloads.JPEG_QUALITY,
                webp_quality=workloads.WEBP_QUALITY,
                progressive=workloads.PROGRESSIVE_JPEG,
                png_compression=workloads.PNG_COMPRESSION,
            )
        )
        log = (self.work_dir / "thumbor.log").open("ab")
        cmd = [
            str(self.venv / "bin" / "thumbor"), "--ip", self.host, "--port", str(self.port),
            "--conf", str(conf), "--processes", str(self.processes), "--log-level", "error",
        ]  # fmt: skip
        # start_new_session = setsid: thumbor and its forks get their own group.
        self._proc = subprocess.Popen(
            cmd, stdout=log, stderr=log, start_new_session=True, cwd=self.work_dir
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while not port_open(self.host, self.port):
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"thumbor exited {self._proc.returncode}; see {self.work_dir}/thumbor.log"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("thumbor did not open its port")
            time.sleep(0.1)
        time.sleep(0.5)  # let every forked child reach accept()
        return self._proc.pid

    def stop(self) -> None:
        if self._proc is None:
            return
        pgid = self._proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=5)
        self._proc = None


class Client:
    """GETs unsafe thumbor URLs for one workload, a new connection each time.

    A request of a several-output workload is one GET per output, sent
    together (as a web application wanting five sizes would); it is done when
    the last body is read.
    """

    def __init__(
        self,
        http: aiohttp.ClientSession,
        server: Server,
        workload: Workload,
        sources: list[str],
        src_host: str,
        tag: str,
    ) -> None:
        self.http = http
        self.server = server
        self.workload = workload
        self.sources = sources
        self.src_host = src_host
        self.tag = tag
        self.sample: tuple[list[bytes], workloads.Request] | None = None

    async def _get(self, path: str) -> bytes:
        url = self.server.base_url + path
        async with self.http.get(url) as reply:
            body = await reply.read()
            if reply.status != 200 or not body:
                raise ThumborFailed(f"GET {url} -> {reply.status}: {body[:200]!r}")
        return body

    async def job(self, index: int) -> int:
        req = workloads.request(self.workload, self.sources, index)
        paths = workloads.thumbor_paths(self.workload, req, self.src_host, self.tag)
        if len(paths) == 1:
            bodies = [await self._get(paths[0])]
        else:
            bodies = list(await asyncio.gather(*(self._get(path) for path in paths)))
        if self.sample is None:
            self.sample = (bodies, req)
        return sum(len(body) for body in bodies)

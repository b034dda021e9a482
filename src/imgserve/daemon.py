"""The daemon's lifecycle: where its files go, serve, start, stop, status.

Signals (``imgserve serve`` and the daemon ``imgserve start`` leaves behind):

- SIGTERM or SIGINT: drain. Intake stops (POST / answers 503, code 604), running
  jobs get ``shutdown_timeout_s`` to finish; jobs still queued stay in the
  durable queue and run on the next start. The process then exits 0.
- A second SIGTERM or SIGINT: stop at once. Interrupted jobs stay queued.

``start`` runs ``imgserve serve`` as a detached child (a new session; no fork
after libvips is loaded) and returns once the port answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgserve import auth, logs, notify, tracing
from imgserve.config import Settings
from imgserve.urls import redact_url

if TYPE_CHECKING:
    from imgserve import webhooks
    from imgserve.metrics import Metrics

log = logging.getLogger("imgserve.daemon")

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_NOT_RUNNING = 3  # LSB: program is not running


@dataclass(frozen=True)
class Paths:
    pid_file: Path
    log_file: Path
    data_dir: Path
    """Holds the job database and the source spool."""

    @property
    def runtime_file(self) -> Path:
        return self.data_dir / "imgserve.runtime.json"

    @property
    def startup_log(self) -> Path:
        return self.data_dir / "imgserve.startup.log"


def resolve_paths(
    state_dir: Path | None,
    pid_file: Path | None,
    log_dir: Path | None,
    *,
    euid: int,
    home: Path,
) -> Paths:
    """0.2's rule: root logs to /var/log/imgserve and keeps its pid in /var/run;
    anyone else keeps both in ~/.imgserve. ``state_dir`` (IMGSERVE_HOME) puts
    everything in one directory; ``pid_file`` and ``log_dir`` override one each."""
    if state_dir is not None:
        base_pid, base_log, data = state_dir / "imgserve.pid", state_dir, state_dir
    elif euid == 0:
        base_pid = Path("/var/run/imgserve.pid")
        base_log = Path("/var/log/imgserve")
        data = Path("/var/lib/imgserve")
    else:
        base_pid, base_log, data = (
            home / ".imgserve/imgserve.pid",
            home / ".imgserve",
            home / ".imgserve",
        )
    return Paths(
        pid_file=pid_file or base_pid,
        log_file=(log_dir or base_log) / "imgserve.log",
        data_dir=data,
    )


def paths_for(settings: Settings) -> Paths:
    server = settings.server
    return resolve_paths(
        server.state_dir, server.pid_file, server.log_dir, euid=os.geteuid(), home=Path.home()
    )


# --- pid files -------------------------------------------------------------------------


def read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    with contextlib.suppress(FileNotFoundError, IndexError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            return False
    return True


def running_pid(paths: Paths) -> tuple[int | None, bool]:
    """(pid, alive). A pid file whose process is gone is stale: (pid, False)."""
    pid = read_pid(paths.pid_file)
    return pid, pid is not None and pid_alive(pid)


def write_pid_file(paths: Paths, *, force: bool) -> None:
    paths.pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid, alive = running_pid(paths)
    if alive and pid != os.getpid():
        raise RuntimeError(f"already running with pid {pid} ({paths.pid_file})")
    if pid is not None and not alive and not force:
        log.warning("removing stale pid file %s (pid %d is gone)", paths.pid_file, pid)
    tmp = paths.pid_file.with_suffix(".tmp")
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, paths.pid_file)


def remove_pid_file(paths: Paths) -> None:
    if read_pid(paths.pid_file) == os.getpid():
        paths.pid_file.unlink(missing_ok=True)
        paths.runtime_file.unlink(missing_ok=True)


# --- serve -------------------------------------------------------------------------------


def serve(settings: Settings, *, to_file: bool, force: bool) -> int:
    """Run the daemon in this process until a signal drains it.

    Whatever stops it before it is up is printed as one line on stderr (which
    ``start`` reads back from the startup log); tracebacks go to the log only.
    """
    paths = paths_for(settings)
    try:
        preflight(settings, paths)
        logs.configure(
            paths.log_file if to_file else None,
            max_bytes=settings.server.log_max_bytes,
            backups=settings.server.log_backups,
            log_format=settings.server.log_format,
        )
        write_pid_file(paths, force=force)
    except (StartupError, RuntimeError, OSError) as exc:
        print(f"imgserve: {exc}", file=sys.stderr)
        return EXIT_FAIL
    try:
        return asyncio.run(_serve(settings, paths))
    except Exception as exc:
        if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
            host, port = settings.server.host, settings.server.port
            message = f"cannot listen on {host}:{port}: address in use"
            log.error("%s", message)
        else:
            up = _runtime_pid(paths) == os.getpid()
            first_line = (str(exc).strip().splitlines() or [""])[0]
            message = f"{'stopped' if up else 'cannot start'}: {type(exc).__name__}: {first_line}"
            log.exception("%s", message)
        print(f"imgserve: {redact_url(message)}", file=sys.stderr)
        return EXIT_FAIL
    finally:
        remove_pid_file(paths)


DEGRADED_LINGER_S = 5.0
"""How long a daemon whose job runner died keeps answering /health 503 before it
exits, so a load balancer or a supervisor's health check sees why."""


async def _serve(settings: Settings, paths: Paths, *, linger_s: float = DEGRADED_LINGER_S) -> int:
    """The daemon's body. Every resource is entered on one exit stack, so every way
    out (a signal, a start-up error, the job runner dying) closes them all."""
    from aiohttp import web

    from imgserve import api, protocol
    from imgserve.imaging import vips
    from imgserve.metrics import Metrics
    from imgserve.planner import Planner
    from imgserve.pool import ImagePool
    from imgserve.transports import Transports
    from imgserve.worker import Runner

    vips.set_threads(1)
    paths.data_dir.mkdir(parents=True, exist_ok=True)
    async with contextlib.AsyncExitStack() as stack:
        traces = _start_tracing(stack, settings)
        queue = _open_queue(settings, paths.data_dir)
        stack.push_async_callback(queue.close)
        transports = Transports(settings.transport)
        stack.push_async_callback(transports.aclose)
        planner = Planner(
            processes=settings.server.planners,
            timeout_s=settings.server.plan_timeout_s,
            memory_limit_mb=settings.worker.memory_limit_mb,
        )
        stack.push_async_callback(asyncio.to_thread, planner.close)
        keys = load_keyring(settings)
        metrics = Metrics(traces)
        dispatcher = _start_dispatcher(stack, queue, settings, metrics, keys)
        # With a Redis queue this node only accepts jobs; `imgserve worker` nodes run them.
        runner: Runner | None = None
        pool: ImagePool | None = None
        if settings.server.queue_url is None:
            recovered = await queue.recover()
            if recovered:
                log.info("recovered %d unfinished jobs from the queue", recovered)
            pool = ImagePool(settings.worker, settings.imaging)
            stack.push_async_callback(asyncio.to_thread, pool.close)
            runner = Runner(
                queue, transports, pool, settings, on_event=dispatcher.poke, metrics=metrics
            )
            _watch_pool(metrics, pool)
        service = api.Service(
            settings=settings,
            queue=queue,
            transports=transports,
            runner=runner,
            workers_alive=pool.workers_alive if pool else (lambda: 0),
            planner=planner,
            on_event=dispatcher.poke,
            keys=keys,
            metrics=metrics,
        )
        app_runner = protocol.make_runner(
            api.make_app(service), access_log=None, handle_signals=False
        )
        await app_runner.setup()
        stack.push_async_callback(app_runner.cleanup)
        site = web.TCPSite(
            app_runner,
            settings.server.host,
            settings.server.port,
            reuse_address=True,
            backlog=1024,
        )
        await site.start()
        await _serve_metrics(stack, metrics, settings.server.metrics_listen)

        def draining() -> None:
            service.draining = True
            notify.notify(notify.STOPPING)

        stop = _drain_on_signals(on_first=draining)
        _write_runtime_file(paths, settings)
        notify.notify(notify.READY)  # the port is listening
        log.info(
            "imgserve listening on %s:%d with %d workers, state in %s",
            settings.server.host,
            settings.server.port,
            settings.worker.workers,
            paths.data_dir,
        )
        if keys is not None:
            log.info("API keys: %d from %s", len(keys), keys.source)
        exposed = auth.exposure_warning(settings.server.host, keys is not None)
        if exposed is not None:
            log.warning("%s", exposed)
        pruner = asyncio.create_task(_prune_loop(queue, settings.server.keep_finished_s))
        stack.push_async_callback(_cancel, pruner)
        if runner is None:
            await stop.wait()
            return EXIT_OK
        ended = await _run_jobs(stack, runner, stop, settings.server.shutdown_timeout_s)
        if ended is not None:
            service.degraded = f"the job runner stopped: {ended}"
            log.critical("%s; no job can run, exiting in %.0f s", service.degraded, linger_s)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(linger_s):  # (3.11's wait_for can lose a cancel)
                    await stop.wait()
            return EXIT_FAIL
    log.info("imgserve stopped")
    return EXIT_OK


def _start_dispatcher(
    stack: contextlib.AsyncExitStack,
    queue: Any,
    settings: Settings,
    metrics: Metrics,
    keys: auth.Keyring | None = None,
    *,
    hand_off: bool = False,
) -> webhooks.Dispatcher:
    """Deliver completion events from the queue's outbox in this process, until the
    stack closes (before the queue does). Every process that ends jobs runs one, and
    the API node too (cancels, redeliveries); the queue's claim is atomic across
    nodes. A dispatcher that dies is logged and restarted (webhooks.supervise): a
    stalled outbox loses nothing, so it never takes the daemon down."""
    from imgserve import webhooks

    hooks = settings.webhook
    if hooks.webhook_url is not None and not hooks.webhook_secrets:
        log.warning("no webhook secret is set: completion events are sent unsigned")
    # A key may sign its jobs' events with its own secret; a node without the keys
    # file leaves those events to one that has it (auth.webhook_signer).
    signer = auth.webhook_signer(keys, hooks.webhook_secrets, hand_off=hand_off)
    dispatcher = webhooks.Dispatcher(
        queue,
        hooks,
        settings.transport,
        secrets_for=signer,
        metrics=metrics,
    )
    task = asyncio.create_task(webhooks.supervise(dispatcher))
    stack.push_async_callback(_cancel, task)
    return dispatcher


async def _run_jobs(
    stack: contextlib.AsyncExitStack, runner: Any, stop: asyncio.Event, drain_s: float
) -> str | None:
    """Run jobs until ``stop`` is set, then drain them (None); if the runner ends
    first, which it never should, say how it ended."""
    jobs = asyncio.create_task(runner.serve())
    stack.push_async_callback(_cancel, jobs)  # after a drain, a no-op
    stopped = asyncio.create_task(stop.wait())
    stack.push_async_callback(_cancel, stopped)
    await asyncio.wait({jobs, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if jobs.done() and not stop.is_set():
        return _ending(jobs)
    await drain(runner, jobs, drain_s)
    return None


def _ending(task: asyncio.Task[None]) -> str:
    """How a task that should have run for ever ended, in words."""
    if task.cancelled():
        return "cancelled"
    exc = task.exception()
    return "returned" if exc is None else f"{type(exc).__name__}: {exc}"


async def _cancel(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait for it; how it ended was dealt with by its owner."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


def _start_tracing(stack: contextlib.AsyncExitStack, settings: Settings) -> tracing.Tracing:
    """The tracing the settings ask for (preflight checked the extra is there); the
    spans still buffered are sent when the stack closes, after everything else, for
    at most otel.CLOSE_TIMEOUT_S."""
    traces = tracing.start(settings.server)
    if traces.enabled:
        stack.push_async_callback(asyncio.to_thread, traces.close)
        endpoint = settings.server.otlp_endpoint or "the OTEL_EXPORTER_OTLP_* endpoint"
        log.info("tracing: OTLP/HTTP to %s", redact_url(endpoint))
    return traces


def check_tracing(settings: Settings) -> None:
    """StartupError when tracing is asked for and cannot start (the ``tracing`` extra
    is missing, or the SDK refuses an ``OTEL_*`` value)."""
    try:
        tracing.check(settings.server)
    except tracing.TracingUnavailable as exc:
        raise StartupError(str(exc)) from None


def _watch_pool(metrics: Metrics, pool: Any) -> None:
    processes = pool.processes
    metrics.watch_pool(
        pool.settings.workers,
        processes.pids,
        lambda: processes.replacements,
        lambda: pool.vips_peak_bytes,
    )


async def _serve_metrics(
    stack: contextlib.AsyncExitStack, metrics: Metrics, address: str | None
) -> None:
    """``--metrics-listen HOST:PORT``: ``/metrics`` alone, without a key, until the
    stack closes (docs/operating.md)."""
    if address is None:
        return
    from aiohttp import web

    from imgserve import metrics as metrics_app
    from imgserve.config import listen_address

    host, port = listen_address(address)
    runner = web.AppRunner(metrics_app.make_app(metrics), access_log=None, handle_signals=False)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
    except OSError as exc:  # not the main port's "address in use": say which one
        raise StartupError(f"--metrics-listen {address}: {exc.strerror or exc}") from exc
    log.info("metrics on http://%s/metrics (no key: keep it on a private interface)", address)


def _write_runtime_file(paths: Paths, settings: Settings) -> None:
    paths.runtime_file.write_text(
        json.dumps(
            {
                "pid": os.getpid(),
                "host": settings.server.host,
                "port": settings.server.port,
                "started_at": time.time(),
            }
        )
    )


def _open_queue(settings: Settings, data_dir: Path) -> Any:
    from imgserve.queue import open_queue

    t = settings.transport
    # The longest one delivery of a job can take.
    delivery_s = (
        t.download_timeout_s
        + settings.worker.job_timeout_s
        + (t.upload_attempts + 1) * (t.upload_timeout_s + t.retry_max_s)
        + 10.0
    )
    # The lease is renewed while the job runs, in both backends: it can be short,
    # and it does not bound the delivery.
    return open_queue(
        settings.server.queue_url,
        data_dir,
        keep_finished_s=settings.server.keep_finished_s,
        job_deadline_s=delivery_s,
        lease_s=settings.worker.lease_s or 30.0,
    )


def _drain_on_signals(on_first: Any = None) -> asyncio.Event:
    """SIGTERM/SIGINT once: set the returned event (drain). Twice: exit at once."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    seen = 0

    def on_signal(signum: int) -> None:
        nonlocal seen
        seen += 1
        name = signal.Signals(signum).name
        if seen == 1:
            log.info("%s: draining (again to stop at once)", name)
            if on_first is not None:
                on_first()
            stop.set()
        else:
            log.warning("%s again: stopping now; unfinished jobs will run again", name)
            logging.shutdown()
            if os.getpgrp() == os.getpid():  # `start` makes the daemon a group leader:
                os.killpg(os.getpgrp(), signal.SIGKILL)  # take the workers along
            os._exit(EXIT_FAIL)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    return stop


def run_worker(settings: Settings) -> int:
    """``imgserve worker``: a worker node of the distributed mode, in the foreground."""
    logs.configure(
        None,
        max_bytes=settings.server.log_max_bytes,
        backups=0,
        log_format=settings.server.log_format,
    )
    if not settings.server.queue_url:
        print("imgserve worker: --queue redis://host:port/db is required", file=sys.stderr)
        return EXIT_FAIL
    try:
        _check_queue(settings.server.queue_url, Path("."))
        check_watermarks(settings)
        load_keyring(settings)
        check_tracing(settings)
    except StartupError as exc:
        print(f"imgserve worker: {exc}", file=sys.stderr)
        return EXIT_FAIL
    try:
        return asyncio.run(_worker(settings))
    except StartupError as exc:  # --metrics-listen cannot be bound
        print(f"imgserve worker: {exc}", file=sys.stderr)
        return EXIT_FAIL


async def _worker(settings: Settings) -> int:
    import socket

    from imgserve.metrics import Metrics
    from imgserve.pool import ImagePool
    from imgserve.transports import Transports
    from imgserve.worker import Runner

    name = f"{socket.gethostname()}:{os.getpid()}"
    async with contextlib.AsyncExitStack() as stack:
        traces = _start_tracing(stack, settings)
        queue = _open_queue(settings, Path("."))
        stack.push_async_callback(queue.close)
        pool = ImagePool(settings.worker, settings.imaging)
        stack.push_async_callback(asyncio.to_thread, pool.close)
        transports = Transports(settings.transport)
        stack.push_async_callback(transports.aclose)
        # Worker nodes check no keys; given the keys file, they sign keyed events.
        metrics = Metrics(traces)
        dispatcher = _start_dispatcher(
            stack, queue, settings, metrics, load_keyring(settings), hand_off=True
        )
        _watch_pool(metrics, pool)
        runner = Runner(
            queue, transports, pool, settings, on_event=dispatcher.poke, metrics=metrics
        )
        await _serve_metrics(stack, metrics, settings.server.metrics_listen)
        stop = _drain_on_signals(on_first=lambda: notify.notify(notify.STOPPING))

        async def announce() -> None:
            while True:
                node = {
                    "name": name,
                    "pid": os.getpid(),
                    "workers": settings.worker.workers,
                    "workersAlive": pool.workers_alive(),
                    "running": runner.running,
                    "at": time.time(),
                }
                with contextlib.suppress(Exception):
                    await queue.announce(node)
                await asyncio.sleep(5.0)

        log.info(
            "imgserve worker %s: %d workers on %s",
            name,
            settings.worker.workers,
            redact_url(settings.server.queue_url or ""),
        )
        announcer = asyncio.create_task(announce())
        stack.push_async_callback(_cancel, announcer)
        notify.notify(notify.READY)  # _run_jobs starts consuming at once
        ended = await _run_jobs(stack, runner, stop, settings.server.shutdown_timeout_s)
        await _cancel(announcer)  # no heartbeat after the leave
        with contextlib.suppress(Exception):
            await queue.leave(name)  # gone from /health at once, not in NODE_TTL_S
        if ended is not None:
            log.critical("imgserve worker %s: the job runner stopped: %s", name, ended)
            return EXIT_FAIL
    log.info("imgserve worker %s stopped", name)
    return EXIT_OK


async def drain(runner: Any, jobs: asyncio.Task[None], deadline_s: float) -> None:
    """Stop taking jobs; give running ones ``deadline_s``, then interrupt them.

    Interrupted jobs are not lost: the queue delivers them again (the embedded
    queue on the next start, Redis to another worker node).
    """
    runner.stopping.set()
    done, _ = await asyncio.wait({jobs}, timeout=deadline_s)
    if not done:
        log.warning("deadline passed with %d jobs running; they will run again", runner.running)
        jobs.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await jobs


async def _prune_loop(queue: Any, keep_s: float) -> None:
    while True:
        with contextlib.suppress(Exception):
            removed = await queue.prune(keep_s)
            if removed:
                log.info("pruned %d finished jobs older than %.0f s", removed, keep_s)
        await asyncio.sleep(min(600.0, max(1.0, keep_s / 10)))


# --- start / stop / status ---------------------------------------------------------------


def _local_address(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _health(host: str, port: int, timeout_s: float = 2.0) -> dict[str, Any] | None:
    url = f"http://{_local_address(host)}:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            data = json.loads(reply.read())
            return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _runtime_pid(paths: Paths) -> int | None:
    """The pid in the runtime file, written only once the port is bound."""
    try:
        return int(json.loads(paths.runtime_file.read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class StartupError(Exception):
    """Why the daemon cannot come up, in one line for the terminal."""


def preflight(settings: Settings, paths: Paths) -> None:
    """What can be checked before detaching: the directories the daemon writes
    can be created and written, the queue backend imports and accepts its URL, the
    keys and watermarks can be used, and tracing, if asked for, is installed and
    accepts its ``OTEL_*`` settings.

    Raises StartupError with the reason.
    """
    for directory in sorted({paths.data_dir, paths.log_file.parent, paths.pid_file.parent}):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError as exc:
            raise StartupError(f"cannot write to {directory}: {exc.strerror or exc}") from exc
    _check_queue(settings.server.queue_url, paths.data_dir)
    load_keyring(settings)
    check_watermarks(settings)
    check_tracing(settings)


def check_watermarks(settings: Settings) -> None:
    """Each ``--watermark`` file is an image of a raster format imgserve decodes
    (StartupError naming it): a bad one would fail every job that names it."""
    from imgserve.imaging import formats

    for name, path in settings.imaging.watermark_files().items():
        try:
            head = path.read_bytes()
        except OSError as exc:
            raise StartupError(f"watermark {name!r}: {path}: {exc.strerror or exc}") from exc
        if formats.sniff(head) not in formats.RASTER_SOURCES:
            raise StartupError(f"watermark {name!r}: {path} is not a PNG, JPEG, WebP, ... image")


# --- API keys (docs/security.md) -------------------------------------------------------


def keys_file(settings: Settings) -> Path:
    """Where the API keys are: ``keys_file``, else ``keys.toml`` in the state directory."""
    return settings.server.keys_file or paths_for(settings).data_dir / "keys.toml"


def load_keyring(settings: Settings) -> auth.Keyring | None:
    """The API keys (None: no keys file, so no authentication, as 0.2). StartupError
    naming the file and the entry when it cannot be used."""
    path = keys_file(settings)
    if settings.server.keys_file is None and not path.exists():
        return None
    try:
        keys = auth.load_keys(path)
    except auth.KeysFileError as exc:
        raise StartupError(str(exc)) from None
    if auth.loose_permissions(path):
        log.warning("keys file %s is readable by other users: chmod 600 it", path)
    return keys


def _check_queue(url: str | None, data_dir: Path) -> None:
    """The queue backend for ``url`` imports and accepts it (nothing connects)."""
    if url:
        from imgserve import errors
        from imgserve.queue import open_queue

        try:
            open_queue(url, data_dir)  # builds the client only
        except (ImportError, errors.ImgserveError) as exc:
            raise StartupError(redact_url(str(exc))) from exc
        except ValueError as exc:  # the Redis client's URL parser
            raise StartupError(redact_url(f"bad queue URL {url}: {exc}")) from exc


def start(
    settings: Settings, serve_argv: list[str], *, force: bool, timeout_s: float = 60.0
) -> int:
    """Run ``imgserve serve`` detached; 0 once its port answers, else print why and 1."""
    paths = paths_for(settings)
    try:
        preflight(settings, paths)
    except StartupError as exc:
        print(f"imgserve: {exc}", file=sys.stderr)
        return EXIT_FAIL
    pid, alive = running_pid(paths)
    if alive:
        print(f"imgserve: already running with pid {pid} ({paths.pid_file})", file=sys.stderr)
        return EXIT_FAIL
    if pid is not None and not force:
        print(
            f"imgserve: stale pid file {paths.pid_file} (pid {pid} is gone); "
            "start with -FORCE to replace it",
            file=sys.stderr,
        )
        return EXIT_FAIL
    exposed = auth.exposure_warning(settings.server.host, load_keyring(settings) is not None)
    if exposed is not None:
        print(f"imgserve: warning: {exposed}", file=sys.stderr)
    from imgserve.pool import MALLOC_ENV  # for the forkserver: workers and planners

    with open(paths.startup_log, "wb") as err:
        child = subprocess.Popen(
            [sys.executable, "-m", "imgserve", "serve", "--daemonized", *serve_argv],
            env={**MALLOC_ENV, **os.environ},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
            close_fds=True,
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = child.poll()
        if code is not None:
            reason = paths.startup_log.read_text(errors="replace").strip()
            print(reason or f"imgserve: failed to start (exit {code})", file=sys.stderr)
            return EXIT_FAIL
        if _runtime_pid(paths) == child.pid and _health(
            settings.server.host, settings.server.port, 0.5
        ):
            print(
                f"imgserve started: pid {child.pid}, "
                f"http://{settings.server.host}:{settings.server.port}/"
            )
            return EXIT_OK
        time.sleep(0.1)
    print(
        f"imgserve: did not answer within {timeout_s:.0f} s; see {paths.log_file}", file=sys.stderr
    )
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)
    return EXIT_FAIL


def stop(settings: Settings, *, timeout_s: float | None = None) -> int:
    paths = paths_for(settings)
    pid, alive = running_pid(paths)
    if pid is None:
        print("imgserve: not running")
        return EXIT_OK
    if not alive:
        print(f"imgserve: not running (removing stale pid file {paths.pid_file})")
        paths.pid_file.unlink(missing_ok=True)
        return EXIT_OK
    os.kill(pid, signal.SIGTERM)
    wait_s = timeout_s if timeout_s is not None else settings.server.shutdown_timeout_s + 15.0
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            print(f"imgserve stopped (pid {pid})")
            return EXIT_OK
        time.sleep(0.1)
    print(f"imgserve: pid {pid} did not stop within {wait_s:.0f} s; killing it", file=sys.stderr)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    return EXIT_FAIL


def status(settings: Settings) -> int:
    paths = paths_for(settings)
    pid, alive = running_pid(paths)
    if not alive:
        if pid is not None:
            print(f"imgserve is not running (stale pid file {paths.pid_file}: pid {pid} is gone)")
        else:
            print("imgserve is not running")
        return EXIT_NOT_RUNNING
    host, port = settings.server.host, settings.server.port
    with contextlib.suppress(OSError, ValueError):
        runtime = json.loads(paths.runtime_file.read_text())
        host, port = runtime["host"], runtime["port"]
    health = _health(host, port)
    print(f"imgserve is running: pid {pid}, address {host}:{port}")
    if health:
        queue = health.get("queue", {})
        print(
            f"state: {health.get('status')}; jobs queued {queue.get('queued', 0)}, "
            f"running {queue.get('running', 0)}, done {queue.get('done', 0)}, "
            f"failed {queue.get('failed', 0)}; workers alive "
            f"{health.get('workersAlive')}/{health.get('workers')}"
        )
    else:
        print("state: not answering on its port")
    return EXIT_OK

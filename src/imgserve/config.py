"""Typed, frozen settings, one dataclass per subsystem.

Precedence, highest first: command-line flags, ``IMGSERVE_*`` environment
variables, the TOML file given with ``--config``, then the defaults below.
Each subsystem receives only its own settings object in its constructor;
nothing reaches for a global.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1024 * 1024


@dataclass(frozen=True)
class ImagingLimits:
    """Limits on untrusted images, enforced in imaging/."""

    max_pixels: int = 50_000_000
    """Largest source accepted, counting all frames of an animation."""
    max_result_pixels: int = 50_000_000
    """Largest result (and largest SVG render) produced."""
    max_result_bytes: int = 64 * MiB


@dataclass(frozen=True)
class NetPolicy:
    """Outbound address policy: which hosts a transport may connect to."""

    allow_nets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    allow_hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class TransportSettings:
    """Settings shared by every transport."""

    policy: NetPolicy = field(default_factory=NetPolicy)
    file_roots: tuple[Path, ...] = ()
    ca_file: Path | None = None
    s3_endpoint: str | None = None
    s3_region: str | None = None
    download_timeout_s: float = 30.0
    max_download_bytes: int = 100 * MiB
    max_redirects: int = 5
    upload_timeout_s: float = 60.0
    upload_attempts: int = 4
    retry_base_s: float = 0.5
    retry_max_s: float = 30.0
    ftp_threads: int = 16
    """Threads of the ftp/ftps transport's own pool: FTP transfers in flight at once
    (more wait for a thread; their deadline starts when they get one)."""
    s3_threads: int = 16
    """Threads (and pooled connections) of the s3 transport's own pool."""
    file_threads: int = 8
    """Threads of the file transport's own pool (reads, writes, fsync)."""


@dataclass(frozen=True)
class WorkerSettings:
    """The pool of image-processing worker processes."""

    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    job_timeout_s: float = 60.0
    memory_limit_mb: int = 2048
    """Address-space cap per worker process (RLIMIT_AS); 0 disables it."""
    max_attempts: int = 3
    """Attempts per job before a retryable failure becomes final."""
    nice: int = 10
    """Niceness of the worker processes: replies wait on the API process, so the
    batch pixel work yields the CPU to it (p99 reply latency halves under load)."""
    threads: int = 1
    """libvips threads per worker process: the processes already use every core,
    and more threads per image only add contention (+10% CPU per job measured)."""
    lease_s: float = 0.0
    """Distributed mode: how long a worker node holds a job before another may take
    it over (a node that died). 0 computes it from the deadlines of one delivery."""


@dataclass(frozen=True)
class ServerSettings:
    """The HTTP API and the daemon around it."""

    host: str = "0.0.0.0"
    port: int = 8602
    state_dir: Path | None = None
    pid_file: Path | None = None
    log_dir: Path | None = None
    max_request_bytes: int = 1 * MiB
    queue_max: int = 256
    """Jobs accepted but not finished; past this, POST / answers 503."""
    intake_max: int = 64
    """Jobs being checked at once (download, plan, placeholder); past this, 503 (611)."""
    intake_max_bytes: int = 512 * MiB
    """Source bytes held by jobs being checked; once reached, new jobs get 503 (611)."""
    reply_timeout_s: float = 90.0
    """One deadline for checking a job before the reply (code 612)."""
    shutdown_timeout_s: float = 30.0
    keep_finished_s: float = 7 * 24 * 3600.0
    queue_url: str | None = None
    """None: the embedded SQLite queue; redis://host:port/db: distributed mode."""
    log_max_bytes: int = 10 * MiB
    log_backups: int = 5
    planners: int = 2
    """Planner processes: they read each source's header for the reply (untrusted
    bytes parsed outside the API process). Two, so one hostile file that spins
    until ``plan_timeout_s`` does not hold up every other request."""
    plan_timeout_s: float = 10.0
    """Deadline for reading one source's header and drawing its placeholder."""


@dataclass(frozen=True)
class Settings:
    """Everything, grouped by subsystem."""

    server: ServerSettings = field(default_factory=ServerSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    transport: TransportSettings = field(default_factory=TransportSettings)
    imaging: ImagingLimits = field(default_factory=ImagingLimits)


# Flat option name -> (section, field). The same names are used in the TOML
# file (flat or under [server]/[worker]/...), as IMGSERVE_<NAME> variables and
# as --<name-with-dashes> flags.
_FIELDS: dict[str, tuple[str, str]] = {
    "host": ("server", "host"),
    "port": ("server", "port"),
    "state_dir": ("server", "state_dir"),
    "home": ("server", "state_dir"),
    "pid": ("server", "pid_file"),
    "pid_file": ("server", "pid_file"),
    "logdir": ("server", "log_dir"),
    "log_dir": ("server", "log_dir"),
    "max_request_bytes": ("server", "max_request_bytes"),
    "queue_max": ("server", "queue_max"),
    "intake_max": ("server", "intake_max"),
    "intake_max_bytes": ("server", "intake_max_bytes"),
    "reply_timeout_s": ("server", "reply_timeout_s"),
    "shutdown_timeout_s": ("server", "shutdown_timeout_s"),
    "keep_finished_s": ("server", "keep_finished_s"),
    "queue": ("server", "queue_url"),
    "log_max_bytes": ("server", "log_max_bytes"),
    "planners": ("server", "planners"),
    "plan_timeout_s": ("server", "plan_timeout_s"),
    "workers": ("worker", "workers"),
    "job_timeout_s": ("worker", "job_timeout_s"),
    "memory_limit_mb": ("worker", "memory_limit_mb"),
    "max_attempts": ("worker", "max_attempts"),
    "lease_s": ("worker", "lease_s"),
    "worker_nice": ("worker", "nice"),
    "worker_threads": ("worker", "threads"),
    "allow_net": ("transport", "policy.allow_nets"),
    "allow_host": ("transport", "policy.allow_hosts"),
    "file_root": ("transport", "file_roots"),
    "ca_file": ("transport", "ca_file"),
    "s3_endpoint": ("transport", "s3_endpoint"),
    "s3_region": ("transport", "s3_region"),
    "download_timeout_s": ("transport", "download_timeout_s"),
    "max_download_bytes": ("transport", "max_download_bytes"),
    "max_redirects": ("transport", "max_redirects"),
    "upload_timeout_s": ("transport", "upload_timeout_s"),
    "upload_attempts": ("transport", "upload_attempts"),
    "retry_base_s": ("transport", "retry_base_s"),
    "retry_max_s": ("transport", "retry_max_s"),
    "max_pixels": ("imaging", "max_pixels"),
    "max_result_pixels": ("imaging", "max_result_pixels"),
    "max_result_bytes": ("imaging", "max_result_bytes"),
}

# List-valued options and the separator used for them in environment variables.
_LIST_SEP = {"allow_net": ",", "allow_host": ",", "file_root": ":"}


def option_names() -> list[str]:
    return sorted(_FIELDS)


def _convert(name: str, value: Any) -> Any:
    section, dotted = _FIELDS[name]
    attr = dotted.split(".")[-1]
    if name in _LIST_SEP:
        items = value.split(_LIST_SEP[name]) if isinstance(value, str) else list(value)
        items = [str(i).strip() for i in items if str(i).strip()]
        if name == "allow_net":
            return tuple(ipaddress.ip_network(i, strict=False) for i in items)
        if name == "allow_host":
            return tuple(i.lower().rstrip(".") for i in items)
        return tuple(Path(i).resolve() for i in items)
    cls = {
        "server": ServerSettings,
        "worker": WorkerSettings,
        "transport": TransportSettings,
        "imaging": ImagingLimits,
    }[section]
    ftype = {f.name: f.type for f in dataclasses.fields(cls)}[attr]
    if value is None:
        return None
    if "Path" in str(ftype):
        return Path(value).expanduser()
    if "int" in str(ftype) and "float" not in str(ftype):
        return int(value)
    if "float" in str(ftype):
        return float(value)
    return str(value)


def _flatten_toml(data: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten_toml(value))
        else:
            flat[key.replace("-", "_")] = value
    return flat


def load(
    overrides: dict[str, Any] | None = None,
    *,
    config_file: Path | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Build Settings from defaults, a TOML file, the environment and overrides.

    ``overrides`` holds flag values by option name (see ``option_names()``);
    ``None`` values are ignored so unset flags do not mask lower layers.
    """
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    path = config_file or (Path(env["IMGSERVE_CONFIG"]) if env.get("IMGSERVE_CONFIG") else None)
    if path is not None:
        with open(path, "rb") as fh:
            file_values = _flatten_toml(tomllib.load(fh))
        unknown = set(file_values) - set(_FIELDS)
        if unknown:
            raise ValueError(f"unknown settings in {path}: {', '.join(sorted(unknown))}")
        raw.update(file_values)
    for name in _FIELDS:
        var = "IMGSERVE_" + name.upper()
        if var in env and env[var] != "":
            raw[name] = env[var]
    for name, value in (overrides or {}).items():
        if value is None or value == [] or value == ():
            continue
        if name not in _FIELDS:
            raise ValueError(f"unknown setting {name!r}")
        raw[name] = value

    sections: dict[str, dict[str, Any]] = {
        "server": {},
        "worker": {},
        "transport": {},
        "imaging": {},
        "policy": {},
    }
    for name, value in raw.items():
        section, dotted = _FIELDS[name]
        converted = _convert(name, value)
        if dotted.startswith("policy."):
            sections["policy"][dotted.split(".", 1)[1]] = converted
        else:
            sections[section][dotted] = converted
    transport = TransportSettings(policy=NetPolicy(**sections["policy"]), **sections["transport"])
    return Settings(
        server=ServerSettings(**sections["server"]),
        worker=WorkerSettings(**sections["worker"]),
        transport=transport,
        imaging=ImagingLimits(**sections["imaging"]),
    )

"""Typed, frozen settings, one dataclass per subsystem, and the layers that set them.

Precedence, highest first: command-line flags, ``IMGSERVE_*`` environment
variables, the TOML file given with ``--config``, then the defaults below.
Each subsystem receives only its own settings object in its constructor;
nothing reaches for a global.

The dataclasses are the one source of truth: every field is an option, named
by its field name (plus the 0.2 / short aliases in ``_ALIASES``), settable as a
flat TOML key or under its own section (``[server]``, ``[worker]``,
``[transport]``, ``[transport.policy]``, ``[imaging]``, ``[webhook]``), as
``IMGSERVE_<NAME>`` and with ``--set NAME=VALUE``. ``[webhook]`` holds the
completion events' settings (docs/webhooks.md). Its type annotation says how
a value is checked and converted, so a field added later needs no more code.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import ipaddress
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgserve.logs import LOG_FORMATS
from imgserve.urls import redact_url

MiB = 1024 * 1024


@dataclass(frozen=True)
class ImagingLimits:
    """Limits on untrusted images, enforced in imaging/."""

    max_pixels: int = 50_000_000
    """Largest source accepted, counting all frames of an animation."""
    max_result_pixels: int = 50_000_000
    """Largest result (and largest SVG render) produced."""
    max_result_bytes: int = 64 * MiB
    max_job_pixels: int = 200_000_000
    """All outputs of one ``POST /jobs`` job together (each whole-frame image it is
    cut from counted too): what one worker task renders and the planner draws."""
    watermarks: tuple[str, ...] = ()
    """``NAME=FILE`` pairs: the overlay images an output's ``watermark`` may name
    (the operator's files, never fetched from a caller's URL)."""

    def watermark_files(self) -> dict[str, Path]:
        return dict(_watermark_pair(pair) for pair in self.watermarks)


def _watermark_pair(pair: str) -> tuple[str, Path]:
    name, sep, path = pair.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name) or not path:
        raise ValueError(f"expected NAME=FILE (NAME letters, digits, _ . -), got {pair!r}")
    return name, Path(path)


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
    """How long a running job is held without a renewal before another runner may
    take it over (its runner died, or stalled or was cut off that long): the
    lease is renewed every lease_s / 3 while the job runs, so this is the
    dead-node detection time, not a bound on the job (job_timeout_s and the
    transport deadlines are). 0 means 30 s."""


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
    max_outputs: int = 16
    """Outputs one ``POST /jobs`` job may ask for (code 704 past it)."""
    reply_timeout_s: float = 90.0
    """One deadline for checking a job before the reply (code 612)."""
    idempotency_ttl_s: float = 24 * 3600.0
    """How long an ``Idempotency-Key``'s reply is kept for replays."""
    shutdown_timeout_s: float = 30.0
    keep_finished_s: float = 7 * 24 * 3600.0
    queue_url: str | None = None
    """None: the embedded SQLite queue; redis://host:port/db: distributed mode."""
    log_max_bytes: int = 10 * MiB
    log_backups: int = 5
    log_format: str = "text"
    """How log lines are written: ``text`` (one line each) or ``json`` (one JSON
    object each, for log shippers); docs/systemd.md."""
    planners: int = 2
    """Planner processes: they read each source's header for the reply (untrusted
    bytes parsed outside the API process). Two, so one hostile file that spins
    until ``plan_timeout_s`` does not hold up every other request."""
    plan_timeout_s: float = 10.0
    """Deadline for reading one source's header and drawing its placeholder."""
    redact_params: tuple[str, ...] = ()
    """Query-parameter names redacted from URLs in logs and replies, beside the
    built-in ones (signatures, tokens)."""
    keys_file: Path | None = None
    """The API keys file (TOML, docs/security.md). None: ``keys.toml`` in the state
    directory when it exists; with no keys file, no authentication (0.2)."""
    metrics_listen: str | None = None
    """``HOST:PORT`` of a second listener serving only ``/metrics``, without a key
    (docs/operating.md: bind it to a private interface). None: ``/metrics`` is
    served on the main port only, behind the API keys like every endpoint."""
    tracing: bool = False
    """OpenTelemetry traces, one per job, sent over OTLP/HTTP (the ``tracing`` extra;
    docs/operating.md). The standard ``OTEL_*`` variables configure the exporter."""
    otlp_endpoint: str | None = None
    """The collector's OTLP/HTTP base URL, as ``OTEL_EXPORTER_OTLP_ENDPOINT`` (imgserve
    appends ``/v1/traces``); setting it turns tracing on. None: the variables' endpoint,
    else http://localhost:4318."""


WEBHOOK_SCHEDULE_S: tuple[float, ...] = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
"""The Standard Webhooks schedule: the wait before each attempt (immediately, 5 s,
5 min, 30 min, 2 h, 5 h, 10 h, 10 h)."""


@dataclass(frozen=True)
class WebhookSettings:
    """Completion events: where they go, how they are signed and retried (docs/webhooks.md)."""

    webhook_url: str | None = None
    """Where every job's event goes unless the job names its own ``webhook``
    (0.2 jobs included); None: only jobs that name one send events."""
    webhook_secrets: tuple[str, ...] = field(default=(), repr=False)
    """Signing secrets (``whsec_`` + base64), newest first: every delivery is signed
    with each, so receivers can move to a new secret without downtime."""
    webhook_secrets_file: Path | None = None
    """A file holding more secrets (whitespace- or comma-separated), read by ``load``:
    keeps them out of argv, where any local user could read them."""
    webhook_timeout_s: float = 15.0
    """Deadline of one delivery attempt, from connecting to the answer's headers
    (the body is never read)."""
    webhook_schedule_s: tuple[float, ...] = WEBHOOK_SCHEDULE_S
    """The wait before each attempt (the first is after the job ends); once every
    entry is used up, the event fails for good. Each wait gets +-10 % jitter."""
    webhook_concurrency: int = 8
    """Deliveries in flight at once in one process."""


@dataclass(frozen=True)
class Settings:
    """Everything, grouped by subsystem."""

    server: ServerSettings = field(default_factory=ServerSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    transport: TransportSettings = field(default_factory=TransportSettings)
    imaging: ImagingLimits = field(default_factory=ImagingLimits)
    webhook: WebhookSettings = field(default_factory=WebhookSettings)


class SettingsError(ValueError):
    """A setting that is unknown, of the wrong type or out of range; names the key."""


# Extra names for a field: 0.2's option names and the singular forms the
# repeatable flags use. The field name itself is always accepted too.
_ALIASES: dict[str, tuple[str, ...]] = {
    "server.state_dir": ("home",),
    "server.pid_file": ("pid",),
    "server.log_dir": ("logdir",),
    "server.queue_url": ("queue",),
    "server.redact_params": ("redact_param",),
    "server.keys_file": ("keys",),
    "worker.nice": ("worker_nice",),
    "worker.threads": ("worker_threads",),
    "transport.policy.allow_nets": ("allow_net",),
    "transport.policy.allow_hosts": ("allow_host",),
    "transport.file_roots": ("file_root",),
    "webhook.webhook_secrets": ("webhook_secret",),
    "imaging.watermarks": ("watermark",),
}

# Inclusive bounds where the type alone lets nonsense through. Besides these,
# a field whose name carries a unit (_s, _bytes, _pixels, _mb) cannot be negative.
_BOUNDS: dict[str, tuple[float | None, float | None]] = {
    "server.port": (1, 65535),
    "server.queue_max": (1, None),
    "server.intake_max": (1, None),
    "server.max_outputs": (1, 1000),
    "server.planners": (1, None),
    "transport.ftp_threads": (1, None),
    "transport.s3_threads": (1, None),
    "transport.file_threads": (1, None),
    "server.log_backups": (0, None),
    "worker.workers": (1, None),
    "worker.threads": (1, None),
    "worker.max_attempts": (1, None),
    "worker.nice": (-20, 19),
    "transport.upload_attempts": (1, None),
    "transport.max_redirects": (0, None),
    "webhook.webhook_concurrency": (1, 1000),
    "webhook.webhook_timeout_s": (0.1, 300),
    "webhook.webhook_schedule_s": (0, 7 * 24 * 3600),
}
_UNIT_SUFFIXES = ("_s", "_bytes", "_pixels", "_mb")

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Option:
    """One settable field: where it lives in Settings and the names it answers to."""

    path: tuple[str, ...]
    """("transport", "policy", "allow_nets"): sections, then the field."""
    type: Any
    names: tuple[str, ...]
    """Flat names, the first one canonical: field name (or section_field when two
    sections share a field name), then aliases."""

    @property
    def key(self) -> str:
        return ".".join(self.path)

    @property
    def section(self) -> str:
        return ".".join(self.path[:-1])

    @property
    def env_vars(self) -> tuple[str, ...]:
        return tuple("IMGSERVE_" + name.upper() for name in self.names)


def _walk(cls: type, prefix: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            yield from _walk(hint, (*prefix, f.name))
        else:
            yield (*prefix, f.name), hint


def _build_options(root: type, aliases: Mapping[str, tuple[str, ...]]) -> dict[str, Option]:
    leaves = list(_walk(root, ()))
    counts: dict[str, int] = {}
    for path, _ in leaves:
        counts[path[-1]] = counts.get(path[-1], 0) + 1
    options: dict[str, Option] = {}
    for path, hint in leaves:
        key = ".".join(path)
        flat = path[-1] if counts[path[-1]] == 1 else f"{path[0]}_{path[-1]}"
        options[key] = Option(path, hint, (flat, *aliases.get(key, ())))
        _describe(hint)  # a field of a type this module cannot convert fails at import
    unknown_aliases = set(aliases) - set(options)
    if unknown_aliases:
        raise TypeError(f"aliases for fields that do not exist: {sorted(unknown_aliases)}")
    return options


def _describe(hint: Any) -> str:
    """What a value of this type looks like, for error messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"a list, each {_describe(args[0])}"
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if all(m in (ipaddress.IPv4Network, ipaddress.IPv6Network) for m in members):
            return "a network (CIDR)"
        if len(members) == 1:
            return _describe(members[0])
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a finite number",
        str: "a string",
        Path: "a path",
        ipaddress.IPv4Network: "a network (CIDR)",
        ipaddress.IPv6Network: "a network (CIDR)",
    }
    if hint in names:
        return names[hint]
    raise TypeError(f"config cannot convert settings of type {hint!r}")


def _list_separator(hint: Any) -> str:
    """Environment lists: ':' between paths (like PATH), ',' between anything else."""
    return ":" if typing.get_args(hint)[0] is Path else ","


def _to_bool(value: Any, text: bool) -> bool | None:
    words = {"1": True, "true": True, "yes": True, "on": True}
    words |= {"0": False, "false": False, "no": False, "off": False}
    if isinstance(value, bool):
        return value
    return words.get(value.strip().lower()) if text and isinstance(value, str) else None


def _to_int(value: Any, text: bool) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if text and isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value.strip().replace("_", ""))
    return None


def _to_float(value: Any, text: bool) -> float | None:
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif text and isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = float(value)
    return number if number is not None and math.isfinite(number) else None


def _to_str(value: Any, text: bool) -> str | None:
    return value if isinstance(value, str) else None


def _to_path(value: Any, text: bool) -> Path | None:
    return Path(value).expanduser() if isinstance(value, str | Path) and str(value) else None


def _to_network(value: Any, text: bool) -> _Network | None:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return ipaddress.ip_network(value.strip(), strict=False)
    return None


# Each returns None when the value does not fit; ``text`` says whether strings
# may stand for numbers and booleans (environment, flags). TOML values are
# typed already, so there a string where a number belongs is an error.
_SCALARS: dict[Any, Any] = {
    bool: _to_bool,
    int: _to_int,
    float: _to_float,
    str: _to_str,
    Path: _to_path,
    ipaddress.IPv4Network: _to_network,
    ipaddress.IPv6Network: _to_network,
}


def _coerce(hint: Any, value: Any, *, text: bool) -> Any:
    """``value`` as ``hint``; raises ValueError saying what was expected."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if isinstance(value, str):
            value = value.split(_list_separator(hint))
        if not isinstance(value, list | tuple):
            raise ValueError(f"expected {_describe(hint)}, got {value!r}")
        items = [i.strip() if isinstance(i, str) else i for i in value]
        return tuple(_coerce(args[0], i, text=text) for i in items if i != "")
    scalar = hint
    if origin in (typing.Union, types.UnionType):  # X | None, or the network union
        scalar = next(a for a in args if a is not type(None))
    converted = _SCALARS[scalar](value, text)
    if converted is None:
        raise ValueError(f"expected {_describe(hint)}, got {value!r}")
    return converted


def _check_bounds(option: Option, value: Any) -> None:
    low, high = _BOUNDS.get(option.key, (None, None))
    if low is None and option.path[-1].endswith(_UNIT_SUFFIXES):
        low = 0
    if not isinstance(value, int | float) or isinstance(value, bool):
        return
    if low is not None and value < low:
        raise ValueError(f"must be at least {low:g}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"must be at most {high:g}, got {value!r}")


# Normalisations beyond the type: host names compare case-insensitively without
# the root dot; file roots are compared against resolved paths.
_NORMALISE: dict[str, Any] = {
    "transport.policy.allow_hosts": lambda hosts: tuple(h.lower().rstrip(".") for h in hosts),
    "transport.file_roots": lambda roots: tuple(r.resolve() for r in roots),
    "webhook.webhook_secrets": lambda secrets: split_secrets(" ".join(secrets)),
    "imaging.watermarks": lambda pairs: tuple(map(_resolved_pair, pairs)),
}

WEBHOOK_SECRET_PREFIX = "whsec_"  # noqa: S105 - the spec's prefix, not a secret
MAX_WEBHOOK_ATTEMPTS = 20


def split_secrets(text: str) -> tuple[str, ...]:
    """Secrets separated by commas or whitespace (a file, an env variable, a list)."""
    return tuple(text.replace(",", " ").split())


def check_webhook_secret(secret: str) -> None:
    """Raise ValueError unless ``secret`` is ``whsec_`` + base64 of a non-empty key.
    The message never holds the secret."""
    if not secret.startswith(WEBHOOK_SECRET_PREFIX):
        raise ValueError(f"a webhook secret must start with {WEBHOOK_SECRET_PREFIX!r}")
    encoded = secret[len(WEBHOOK_SECRET_PREFIX) :]
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        raise ValueError(f"a webhook secret is {WEBHOOK_SECRET_PREFIX!r} + base64") from None
    if not key:
        raise ValueError("a webhook secret's key is empty")


def _check_http_url(url: str | None) -> None:
    """An http(s) URL with a host (a webhook's, the OTLP endpoint's); the error shows
    it redacted, as a log line would (it may carry a password or a token)."""
    if url is None:
        return
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest.split("/", 1)[0]:
        raise ValueError(f"expected an http(s) URL with a host, got {redact_url(url)!r}")


def _resolved_pair(pair: str) -> str:
    """NAME=FILE with FILE resolved; a malformed pair as it is (_check_watermarks
    says what is wrong with it)."""
    try:
        name, path = _watermark_pair(pair)
    except ValueError:
        return pair
    return f"{name}={path.resolve()}"


def _check_watermarks(pairs: tuple[str, ...]) -> None:
    names = set()
    for pair in pairs:
        name, path = _watermark_pair(pair)
        if name in names:
            raise ValueError(f"watermark {name!r} is given twice")
        names.add(name)
        if not path.is_file():
            raise ValueError(f"watermark {name!r}: {path} is not a file")


def _check_log_format(value: str) -> None:
    if value not in LOG_FORMATS:
        raise ValueError(f"expected one of {', '.join(LOG_FORMATS)}, got {value!r}")


def listen_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as (host, port); ValueError if not."""
    host, sep, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host, int(port)


def _check_listen(address: str | None) -> None:
    if address is not None:
        listen_address(address)


def _check_schedule(schedule: tuple[float, ...]) -> None:
    if not 1 <= len(schedule) <= MAX_WEBHOOK_ATTEMPTS:
        raise ValueError(f"expected 1 to {MAX_WEBHOOK_ATTEMPTS} waits, got {len(schedule)}")


def _check_secrets(secrets: tuple[str, ...]) -> None:
    for index, secret in enumerate(secrets):
        try:
            check_webhook_secret(secret)
        except ValueError as exc:
            raise ValueError(f"secret {index + 1}: {exc}") from None


# Checks of a whole value, after it is converted and normalised; each raises
# ValueError saying what is wrong (never echoing a secret).
_CHECKS: dict[str, Any] = {
    "server.log_format": _check_log_format,
    "webhook.webhook_url": _check_http_url,
    "webhook.webhook_schedule_s": _check_schedule,
    "webhook.webhook_secrets": _check_secrets,
    "imaging.watermarks": _check_watermarks,
    "server.metrics_listen": _check_listen,
    "server.otlp_endpoint": _check_http_url,
}

OPTIONS: dict[str, Option] = _build_options(Settings, _ALIASES)
"""Every settable field by dotted key ("server.port")."""
_BY_NAME: dict[str, Option] = {}
for _option in OPTIONS.values():
    for _name in (*_option.names, _option.key):
        if _name in _BY_NAME:
            raise TypeError(f"setting name {_name!r} is used twice")
        _BY_NAME[_name] = _option
_SECTIONS: set[str] = {
    ".".join(o.path[:i]) for o in OPTIONS.values() for i in range(1, len(o.path))
}


def option_names() -> list[str]:
    """Every flat name (field names and aliases) a layer accepts."""
    return sorted(name for o in OPTIONS.values() for name in o.names)


def lookup(name: str) -> Option:
    """The option for a flat name ("port", "pid") or a dotted key ("server.port")."""
    option = _BY_NAME.get(name.replace("-", "_"))
    if option is None:
        raise SettingsError(f"unknown setting {name!r}")
    return option


class _Layer:
    """One layer's values by option, refusing the same field set twice under two names."""

    def __init__(self, where: str, *, text: bool) -> None:
        self.where = where
        self.text = text
        self.values: dict[str, tuple[Any, str]] = {}

    def set(self, option: Option, value: Any, spelled: str) -> None:
        label = f"{spelled} in {self.where}" if self.where else spelled
        if option.key in self.values:
            first = self.values[option.key][1]
            raise SettingsError(f"{option.key} is set twice: as {first} and as {label}")
        try:
            converted = _coerce(option.type, value, text=self.text)
            if isinstance(converted, tuple):
                for item in converted:
                    _check_bounds(option, item)
            else:
                _check_bounds(option, converted)
        except ValueError as exc:
            raise SettingsError(f"{option.key}: {_shown(option, exc)} ({label})") from None
        normalise = _NORMALISE.get(option.key)
        value = normalise(converted) if normalise else converted
        check = _CHECKS.get(option.key)
        try:
            if check is not None:
                check(value)
        except ValueError as exc:
            raise SettingsError(f"{option.key}: {exc} ({label})") from None
        self.values[option.key] = (value, label)


def _shown(option: Option, exc: ValueError) -> str:
    # A conversion error quotes the value: never for a secret.
    return "expected a list of strings" if option.key in _SECRET_KEYS else str(exc)


_SECRET_KEYS = frozenset({"webhook.webhook_secrets"})


def _from_toml(data: Mapping[str, Any], path: Path) -> _Layer:
    layer = _Layer(str(path), text=False)

    def visit(table: Mapping[str, Any], section: str) -> None:
        for raw_key, value in table.items():
            key = raw_key.replace("-", "_")
            sub = f"{section}.{key}" if section else key
            if isinstance(value, dict):
                if sub not in _SECTIONS:
                    raise SettingsError(f"unknown section [{sub}] in {path}")
                visit(value, sub)
                continue
            spelled = f"[{section}] {key}" if section else key
            option = _BY_NAME.get(key) if "." not in key else None
            if option is None:
                where = f"[{section}]" if section else "the top level"
                raise SettingsError(f"unknown setting {key!r} in {where} of {path}")
            if section and not (option.key + ".").startswith(section + "."):
                raise SettingsError(
                    f"{key!r} is not a [{section}] setting in {path}: it belongs in "
                    f"[{option.section}]"
                )
            layer.set(option, value, spelled)

    visit(data, "")
    return layer


def _from_env(env: Mapping[str, str]) -> _Layer:
    layer = _Layer("the environment", text=True)
    for option in OPTIONS.values():
        for var in option.env_vars:
            if env.get(var, "") != "":
                layer.set(option, env[var], var)
    return layer


def _from_flags(overrides: Mapping[str, Any], assignments: Sequence[str]) -> _Layer:
    layer = _Layer("", text=True)
    for name, value in overrides.items():
        if value is None or value == [] or value == ():
            continue
        layer.set(lookup(name), value, "--" + name.replace("_", "-"))
    for item in assignments:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise SettingsError(f"--set wants NAME=VALUE, got {item!r}")
        option = lookup(name.strip())
        if option.key in _NOT_ON_THE_COMMAND_LINE:
            raise SettingsError(
                f"--set {name.strip()}: a secret on the command line shows in the process "
                "list; use the environment, the config file or --webhook-secrets-file"
            )
        layer.set(option, value, f"--set {name.strip()}")
    return layer


_NOT_ON_THE_COMMAND_LINE = frozenset({"webhook.webhook_secrets"})
"""Settings holding secrets: argv is readable by every user of the machine (ps)."""


def _build(cls: type, prefix: tuple[str, ...], values: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        path = (*prefix, f.name)
        hint = hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, path, values)
        elif ".".join(path) in values:
            kwargs[f.name] = values[".".join(path)]
    return cls(**kwargs)


def load(
    overrides: Mapping[str, Any] | None = None,
    *,
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    assignments: Sequence[str] = (),
) -> Settings:
    """Build Settings from defaults, a TOML file, the environment and overrides.

    ``overrides`` holds flag values by flat name or dotted key (see
    ``option_names()``); ``None`` values are ignored so unset flags do not mask
    lower layers. ``assignments`` are ``--set NAME=VALUE`` items, in the same
    layer as the flags. Raises SettingsError (a ValueError) naming the offending
    key, OSError when the file cannot be read.
    """
    env = os.environ if environ is None else environ
    layers: list[_Layer] = []
    path = config_file or (Path(env["IMGSERVE_CONFIG"]) if env.get("IMGSERVE_CONFIG") else None)
    if path is not None:
        with open(path, "rb") as fh:
            try:
                data = tomllib.load(fh)
            except tomllib.TOMLDecodeError as exc:
                raise SettingsError(f"{path} is not valid TOML: {exc}") from None
        layers.append(_from_toml(data, path))
    layers.append(_from_env(env))
    layers.append(_from_flags(overrides or {}, assignments))
    values: dict[str, Any] = {}
    for layer in layers:
        values.update({key: value for key, (value, _) in layer.values.items()})
    secrets_file = values.get("webhook.webhook_secrets_file")
    if secrets_file is not None:
        values["webhook.webhook_secrets"] = (
            *values.get("webhook.webhook_secrets", ()),
            *_read_secrets(secrets_file),
        )
    result: Settings = _build(Settings, (), values)
    hooks = result.webhook
    schedule_s = sum(hooks.webhook_schedule_s)
    uses_webhooks = hooks.webhook_url is not None or bool(hooks.webhook_secrets)
    if uses_webhooks and schedule_s >= result.server.keep_finished_s:
        # A finished job is pruned with its events: one still being retried would go.
        raise SettingsError(
            f"webhook_schedule_s: its waits add up to {schedule_s:g} s, not less than "
            f"keep_finished_s ({result.server.keep_finished_s:g} s), after which a job "
            "and its undelivered event are pruned"
        )
    return result


def _read_secrets(path: Path) -> tuple[str, ...]:
    """The secrets in a ``webhook_secrets_file`` (whitespace- or comma-separated)."""
    try:
        secrets = split_secrets(path.read_text())
        _check_secrets(secrets)
    except ValueError as exc:  # UnicodeDecodeError too
        raise SettingsError(f"webhook.webhook_secrets_file: {exc} ({path})") from None
    if not secrets:
        raise SettingsError(f"webhook.webhook_secrets_file: {path} holds no secret")
    return secrets

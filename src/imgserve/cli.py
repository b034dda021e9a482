"""The ``imgserve`` command: parse flags, build Settings, call one daemon function.

Flags take 0.2's single-dash form (``-host``, ``-port``, ``-pid``, ``-logdir``,
``-FORCE``) and the usual double-dash form. Exit codes: 0 success, 1 failure,
2 usage error, 3 "not running" from ``status`` (LSB).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

from imgserve import __version__, config, daemon, keys_cli, logs, urls
from imgserve.submit import cli as submit_cli

COMMANDS = ("start", "stop", "restart", "status", "version", "serve", "worker")
# A webhook secret or an API key, wherever argparse would echo one (a mistyped
# flag's value, an argument it does not know).
_SECRET = re.compile(r"(whsec_|isk_)\S+")


class _Parser(argparse.ArgumentParser):
    """argparse, with long options matched exactly (a prefix such as
    ``--webhook-secret`` must not become ``--webhook-secrets-file`` and have its
    value read as a path) and secrets masked in its error messages."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        super().error(_SECRET.sub(lambda m: m[1] + "***", message))


class _RefuseSecret(argparse.Action):
    """``--webhook-secret VALUE``: refused, never echoed. A secret in argv shows in
    ``ps`` to every user of the machine."""

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        parser.error(
            "--webhook-secret: a secret on the command line shows in the process list; "
            "set IMGSERVE_WEBHOOK_SECRET, webhook_secrets in the config file, or "
            "--webhook-secrets-file PATH"
        )


def _common(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--config", type=Path, help="TOML settings file (same names as the flags)")
    add("--state-dir", "--home", dest="state_dir", help="one directory for pid, logs and jobs")
    add("-host", "--host", dest="host", help="listen address (default 0.0.0.0)")
    add("-port", "--port", dest="port", type=int, help="listen port (default 8602)")
    add("-pid", "--pid", dest="pid", help="pid file path")
    add("-logdir", "--logdir", "--log-dir", dest="logdir", help="log directory")
    add("-FORCE", "--force", dest="force", action="store_true", help="start over a stale pid file")
    add("--workers", type=int, help="image worker processes (default: CPU count)")
    add("--queue", help="redis://host:port/db for distributed mode (default: embedded)")
    add("--queue-max", dest="queue_max", type=int, help="jobs waiting before 503")
    add("--max-outputs", dest="max_outputs", type=int, help="outputs per POST /jobs job (16)")
    add("--allow-net", dest="allow_net", action="append", help="CIDR to allow (repeatable)")
    add("--allow-host", dest="allow_host", action="append", help="host name to allow")
    add("--file-root", dest="file_root", action="append", help="directory file:// may use")
    add("--watermark", dest="watermark", action="append", help="NAME=FILE overlay (repeatable)")
    add("--ca-file", dest="ca_file", help="extra trusted CA certificates (PEM)")
    add("--s3-endpoint", dest="s3_endpoint", help="S3 endpoint URL (MinIO, ...)")
    add("--s3-region", dest="s3_region", help="S3 region")
    add("--job-timeout", dest="job_timeout_s", type=float, help="seconds per render")
    add("--memory-limit-mb", dest="memory_limit_mb", type=int, help="per-worker cap, 0 = none")
    add("--max-attempts", dest="max_attempts", type=int, help="attempts per job")
    add("--worker-nice", dest="worker_nice", type=int, help="niceness of workers (10)")
    add("--worker-threads", dest="worker_threads", type=int, help="libvips threads per worker (1)")
    add("--max-pixels", dest="max_pixels", type=int, help="largest source in pixels")
    add("--download-timeout", dest="download_timeout_s", type=float, help="seconds")
    add("--max-download-bytes", dest="max_download_bytes", type=int, help="bytes")
    add("--upload-timeout", dest="upload_timeout_s", type=float, help="seconds per attempt")
    add("--upload-attempts", dest="upload_attempts", type=int, help="tries per upload")
    add("--retry-base", dest="retry_base_s", type=float, help="first backoff, seconds")
    add("--retry-max", dest="retry_max_s", type=float, help="longest backoff, seconds")
    add("--max-redirects", dest="max_redirects", type=int, help="http(s) redirects to follow")
    add("--lease", dest="lease_s", type=float, help="dead-node detection, s (docs/queue.md)")
    add("--shutdown-timeout", dest="shutdown_timeout_s", type=float, help="drain deadline")
    add("--keep-finished", dest="keep_finished_s", type=float, help="seconds to keep job status")
    add("--max-request-bytes", dest="max_request_bytes", type=int, help="largest POST body")
    add("--max-result-pixels", dest="max_result_pixels", type=int, help="largest result")
    add("--max-result-bytes", dest="max_result_bytes", type=int, help="largest encoded result")
    add("--log-max-bytes", dest="log_max_bytes", type=int, help="rotate the log at this size")
    add("--log-backups", dest="log_backups", type=int, help="rotated logs kept (5)")
    add("--log-format", dest="log_format", choices=logs.LOG_FORMATS, help="text or json")
    add("--redact-param", dest="redact_param", action="append", help="query parameter to hide")
    add("--webhook-url", dest="webhook_url", help="default completion-event URL for every job")
    add("--webhook-secrets-file", dest="webhook_secrets_file", help="file of whsec_ secrets")
    add("--webhook-secret", action=_RefuseSecret, help=argparse.SUPPRESS)
    add("--keys", dest="keys", help="API keys file (TOML; see docs/security.md)")
    add(
        "--metrics-listen",
        dest="metrics_listen",
        metavar="HOST:PORT",
        help="serve /metrics here too, without a key (a private interface)",
    )
    add(
        "--tracing",
        dest="tracing",
        action="store_true",
        default=None,
        help="send OpenTelemetry traces over OTLP/HTTP (the imgserve[tracing] extra)",
    )
    add(
        "--otlp-endpoint",
        dest="otlp_endpoint",
        metavar="URL",
        help="the collector's OTLP/HTTP base URL (turns tracing on; /v1/traces is appended)",
    )
    add(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any setting by name, e.g. --set worker.lease_s=30 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="imgserve", description="image-processing daemon")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    helps = {
        "start": "start the daemon in the background",
        "stop": "stop gracefully (drain running jobs)",
        "restart": "stop, then start",
        "status": "state, pid, address and job counts (exit 3 when not running)",
        "version": "print the version",
        "serve": "run in the foreground, logging to stderr (systemd, containers)",
        "worker": "run a worker node for --queue redis://... in the foreground",
    }
    for name in COMMANDS:
        child = sub.add_parser(name, help=helps[name])
        _common(child)
        if name == "serve":
            child.add_argument("--daemonized", action="store_true", help=argparse.SUPPRESS)
    keys_cli.add_parser(sub, _Parser)
    submit_cli.add_parser(sub, _Parser)
    return parser


# Parsed values that are not settings; every other dest names a setting.
_NOT_SETTINGS = frozenset(
    {"command", "config", "force", "daemonized", "assignments", "webhook_secret"}
)


def _setting_dests() -> tuple[str, ...]:
    probe = _Parser(add_help=False)
    _common(probe)
    return tuple(a.dest for a in probe._actions if a.dest not in _NOT_SETTINGS)


_SETTING_FLAGS = _setting_dests()


def settings_from(args: argparse.Namespace) -> config.Settings:
    """Settings from the flags, ``--set`` items, ``--config`` and the environment."""
    overrides: dict[str, Any] = {name: getattr(args, name, None) for name in _SETTING_FLAGS}
    return config.load(overrides, config_file=args.config, assignments=args.assignments)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "version":
        print(f"imgserve {__version__}")
        return daemon.EXIT_OK
    if args.command == "keys":
        return _keys(args)
    if args.command == "submit":
        return submit_cli.run(args)
    try:
        settings = settings_from(args)
    except (ValueError, OSError) as exc:  # SettingsError is a ValueError
        print(f"imgserve: bad settings: {exc}", file=sys.stderr)
        return 2
    urls.configure_redaction(settings.server.redact_params)  # before anything is logged
    passthrough = [a for a in argv[1:] if a not in ("-FORCE", "--force")]
    if args.command == "worker":
        return daemon.run_worker(settings)
    if args.command == "serve":
        return daemon.serve(settings, to_file=args.daemonized, force=args.force)
    if args.command == "start":
        return daemon.start(settings, passthrough, force=args.force)
    if args.command == "stop":
        return daemon.stop(settings)
    if args.command == "restart":
        daemon.stop(settings)
        return daemon.start(settings, passthrough, force=True)
    return daemon.status(settings)


def _keys(args: argparse.Namespace) -> int:
    """``imgserve keys ...`` on ``--keys``, else the keys file the daemon would read."""
    try:
        overrides = {"state_dir": args.state_dir, "keys_file": args.keys}
        settings = config.load(overrides, config_file=args.config)
    except (ValueError, OSError) as exc:
        print(f"imgserve: bad settings: {exc}", file=sys.stderr)
        return 2
    return keys_cli.run(args, daemon.keys_file(settings))

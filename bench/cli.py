"""``python -m bench``: parse flags, run the benchmark, print the markdown report.

Exit codes: 0 the run completed (whatever the targets say), 1 it could not run,
130 it was stopped by SIGINT/SIGTERM (servers are stopped either way).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from bench import report, runner, workloads

DEFAULT_OUT = Path(__file__).resolve().parent / "out"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="imgserve vs the bare pyvips limit vs thumbor, as per-round ratios",
    )
    add = parser.add_argument
    add("--rounds", type=int, help="interleaved rounds (default 3; smoke 1)")
    add(
        "--seconds-per-round",
        dest="seconds",
        type=float,
        help="measured seconds per system per workload per round (default 3; smoke 1)",
    )
    add(
        "--warmup",
        dest="warmup_s",
        type=float,
        help="unmeasured seconds before each window (default 0.5; smoke 0.1)",
    )
    add("--workloads", help=f"comma-separated subset of: {', '.join(workloads.BY_NAME)}")
    add("--skip-thumbor", action="store_true", help="do not install or measure thumbor")
    add(
        "--smoke",
        action="store_true",
        help="a few seconds: tiny generated images, imgserve and the limit only, no apt",
    )
    add(
        "--workers",
        type=int,
        help="imgserve workers = thumbor processes = limit loops (default: CPU count)",
    )
    add(
        "--in-flight",
        dest="in_flight",
        type=int,
        help="requests the closed-loop client keeps in flight (default 4 x workers)",
    )
    add(
        "--latency-seconds",
        dest="latency_s",
        type=float,
        help="seconds per open-loop latency run (default: ~250 requests, 3-15 s)",
    )
    add(
        "--out-dir",
        type=Path,
        default=DEFAULT_OUT,
        help="images, state and logs (default bench/out)",
    )
    add("--json", dest="json_out", type=Path, help="write the raw results here")
    add(
        "--imgserve-src",
        dest="imgserve_src",
        type=Path,
        help="run imgserve from this src/ directory (e.g. a clean checkout of a commit) "
        "instead of the installed package",
    )
    add(
        "--imgserve-env",
        dest="imgserve_env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the imgserve daemon only (repeatable), for A/B runs",
    )
    return parser  # fmt: skip


def options_from(args: argparse.Namespace) -> runner.Options:
    smoke = bool(args.smoke)
    workers = args.workers or os.cpu_count() or 2
    return runner.Options(
        rounds=args.rounds or (1 if smoke else 3),
        seconds=args.seconds or (1.0 if smoke else 3.0),
        warmup_s=args.warmup_s if args.warmup_s is not None else (0.1 if smoke else 0.5),
        workloads=workloads.select(args.workloads),
        skip_thumbor=bool(args.skip_thumbor) or smoke,
        smoke=smoke,
        out_dir=args.out_dir.resolve(),
        workers=workers,
        in_flight=args.in_flight or 4 * workers,
        latency_s=args.latency_s or (0.5 if smoke else None),
        imgserve_src=args.imgserve_src.resolve() if args.imgserve_src else None,
        imgserve_env=tuple(_key_value(item) for item in args.imgserve_env),
    )


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--imgserve-env takes KEY=VALUE, not {item!r}")
    return key, value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = options_from(args)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        results = runner.run(options)
    except runner.Interrupted as exc:
        print(f"benchmark stopped: {exc}", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"benchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(report.markdown(results))
    if args.json_out:
        data = results.to_dict()
        data["summary"] = report.summary(results)
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return 0

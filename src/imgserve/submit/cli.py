"""``imgserve submit``: its flags, and the one call that runs it.

Imports only argparse at module level: ``imgserve --help`` and the daemon's
commands work without the ``client`` extra; ``submit`` says which extra it needs.
Exit codes: 0 every job done (or done before), 1 a job failed, 2 a usage error,
130 interrupted by Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

DESCRIPTION = """\
Submit a job per source to an imgserve daemon, wait for each, and show a summary.

Sources are URLs (the daemon reads them), local files (uploaded) or directories
(walked recursively for image files). Outputs come from --output flags, each once
per size, or from a --preset TOML file (a POST /jobs job without its source);
--jobs FILE sends whole jobs instead, one JSON object a line. Destination URLs take
imgserve's tags: {$basename}, {$extension} (= {$ext}), {$width}, {$height}.

The daemon is --url, else $IMGSERVE_URL, else http://127.0.0.1:8602; an API key
comes from $IMGSERVE_API_KEY or --api-key-file (never from argv).
"""

EPILOG = """\
examples:
  imgserve submit photos/ --output 'file:///srv/t/{$basename}-{$width}.webp' --size 640 --size 1280
  imgserve submit https://example.com/a.jpg --output 's3://media/{$basename}.avif' --width 800
  imgserve submit photos/ --preset thumbs.toml --concurrency 16 --resume
  imgserve submit --jobs jobs.jsonl

exit status: 0 all done, 1 some job failed, 2 usage error, 130 interrupted
"""


def add_parser(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """The ``submit`` subcommand, on the ``imgserve`` parser's subparsers."""
    parser = sub.add_parser(
        "submit",
        help="submit a job per source (files, directories, URLs) and wait for them",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("sources", nargs="*", metavar="SOURCE", help="a URL, a file or a directory")
    add("--jobs", metavar="FILE", help="jobs to send, one POST /jobs JSON object a line (- stdin)")
    out = parser.add_argument_group("outputs (with SOURCEs)")
    out.add_argument(
        "--output", "-o", action="append", default=[], metavar="URL",
        help="destination URL template (repeatable), e.g. 'file:///out/{$basename}-{$width}.webp'",
    )  # fmt: skip
    out.add_argument("--width", type=int, metavar="N", help="output width in pixels")
    out.add_argument("--height", type=int, metavar="N", help="output height in pixels")
    out.add_argument(
        "--size", action="append", default=[], metavar="WxH",
        help="a size: 640, 640x480, x480 (repeatable: each --output once per size)",
    )  # fmt: skip
    out.add_argument("--fit", choices=("cover", "contain", "fill", "inside", "outside"))
    out.add_argument("--gravity", metavar="G", help="centre, north, ..., smart")
    out.add_argument(
        "--format", metavar="F", help="jpeg, png, webp, avif, gif, tiff (default: the extension)"
    )
    out.add_argument("--quality", type=int, metavar="Q", help="1-100 (jpeg, webp, avif)")
    out.add_argument(
        "--background", metavar="COLOUR", help="#rrggbb[aa]: contain's padding, flattening"
    )
    out.add_argument("--enlarge", action="store_true", default=None, help="scale small sources up")
    out.add_argument("--keep-metadata", action="store_true", default=None, help="keep EXIF/XMP/ICC")
    out.add_argument("--preset", type=Path, metavar="TOML", help="the job from a TOML file instead")
    job = parser.add_argument_group("the job")
    job.add_argument("--priority", choices=("interactive", "batch"), help="lane (default batch)")
    job.add_argument("--metadata", metavar="JSON", help="a JSON object stored with each job")
    job.add_argument("--webhook", metavar="URL", help="completion event URL for each job")
    job.add_argument(
        "--no-placeholder", dest="placeholder", action="store_false", default=None,
        help="upload no placeholder before the reply",
    )  # fmt: skip
    job.add_argument(
        "--name-from-path", action="store_true",
        help="name each file of a directory by its path below it (2019/a.jpg as 2019-a.jpg)",
    )  # fmt: skip
    run = parser.add_argument_group("the run")
    run.add_argument("--url", help="the daemon (default $IMGSERVE_URL or http://127.0.0.1:8602)")
    run.add_argument("--api-key-file", type=Path, metavar="FILE", help="read the API key here")
    run.add_argument(
        "--concurrency", "-j", type=int, default=8, metavar="N", help="jobs in flight (8)"
    )
    run.add_argument(
        "--resume", action="store_true",
        help="derive each job's Idempotency-Key from its source and options: run again, "
        "what is done is skipped",
    )  # fmt: skip
    run.add_argument(
        "--retries", type=int, default=6, metavar="N",
        help="tries per request on 503/429/no answer, honouring Retry-After (6)",
    )  # fmt: skip
    run.add_argument("--plain", action="store_true", help="plain lines even on a terminal")
    run.add_argument(
        "--timeout", type=float, default=100.0, metavar="S", help="seconds per request (100)"
    )


def _job_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    from imgserve.submit import plan

    if args.preset is not None:
        if args.output:
            raise plan.PlanError("--preset and --output: give the outputs one way")
        job = plan.load_preset(args.preset)
    else:
        if not args.output:
            raise plan.PlanError("no outputs: give --output URL (and a size), or --preset")
        sizes = [plan.parse_size(s) for s in args.size]
        first = {k: v for k, v in (("width", args.width), ("height", args.height)) if v is not None}
        for flag, value in first.items():
            if value < 1:
                raise plan.PlanError(f"--{flag} {value}: sizes are positive")
        if first:
            sizes.insert(0, first)
        names = ("fit", "gravity", "format", "quality", "background", "enlarge", "keep_metadata")
        common = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
        job = {"outputs": plan.outputs_from_flags(args.output, sizes, common)}
    job.setdefault("priority", "batch")
    if args.priority is not None:
        job["priority"] = args.priority
    if args.placeholder is not None:
        job["placeholder"] = args.placeholder
    if args.webhook is not None:
        job["webhook"] = args.webhook
    if args.metadata is not None:
        try:
            metadata = json.loads(args.metadata)
        except ValueError as exc:
            raise plan.PlanError(f"--metadata: not JSON: {exc}") from exc
        if not isinstance(metadata, dict):
            raise plan.PlanError("--metadata: a JSON object, please")
        job["metadata"] = metadata
    return job


def _items(args: argparse.Namespace) -> list[Any]:
    from imgserve.submit import plan

    if args.jobs is not None:
        if args.sources or args.output or args.preset:
            raise plan.PlanError("--jobs holds whole jobs: no SOURCE, --output or --preset with it")
        if args.jobs == "-":
            return plan.load_jobs(sys.stdin, "stdin")
        try:
            with open(args.jobs, encoding="utf-8") as fh:
                return plan.load_jobs(fh, args.jobs)
        except OSError as exc:
            raise plan.PlanError(f"--jobs {args.jobs}: {exc.strerror}") from exc
    if not args.sources:
        raise plan.PlanError("nothing to submit: give SOURCEs, or --jobs FILE")
    return plan.items_for(args.sources, _job_from_flags(args), name_from_path=args.name_from_path)


def _api_key(args: argparse.Namespace) -> str | None:
    if args.api_key_file is None:
        return None  # the client reads IMGSERVE_API_KEY
    return str(args.api_key_file.read_text(encoding="utf-8").strip())


def run(args: argparse.Namespace) -> int:
    """``imgserve submit``: plan, run, summarise; the exit code."""
    try:
        import asyncio

        from imgserve.client import AsyncClient, Retries
        from imgserve.submit import plan
        from imgserve.submit.report import Reporter
        from imgserve.submit.run import Options
        from imgserve.submit.run import run as run_jobs
    except ImportError as exc:
        print(
            f"imgserve submit: {exc.name} is missing: pip install 'imgserve[client]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.concurrency < 1 or args.retries < 1:
        print("imgserve submit: --concurrency and --retries must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        items = _items(args)
        api_key = _api_key(args)
    except (plan.PlanError, OSError) as exc:
        print(f"imgserve submit: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # (a walk of a large tree takes a while)
        print("imgserve submit: interrupted before anything was sent", file=sys.stderr)
        return EXIT_INTERRUPTED
    options = Options(
        concurrency=args.concurrency, resume=args.resume, stop_on_invalid=args.jobs is None
    )

    async def main() -> tuple[plan.Tally, bool]:
        async with AsyncClient(
            args.url,
            api_key=api_key,
            timeout_s=args.timeout,
            retries=Retries(attempts=args.retries),
            max_connections=args.concurrency + 2,
        ) as client:
            return await run_jobs(client, items, options, reporter)

    reporter = Reporter(sys.stdout, total=len(items), plain=True if args.plain else None)
    try:
        with reporter:
            tally, interrupted = asyncio.run(main())
    except KeyboardInterrupt:
        print("imgserve submit: left; the daemon finishes the jobs it accepted", file=sys.stderr)
        return EXIT_INTERRUPTED
    reporter.summary(tally, interrupted=interrupted)
    if tally.failed or reporter.gone:  # (gone: the output closed, the run stopped early)
        return EXIT_FAILED
    return EXIT_INTERRUPTED if interrupted else EXIT_OK

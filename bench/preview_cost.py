"""What describing an output costs next to rendering it: ``python -m bench.preview_cost``.

The issue's budget: BlurHash, ThumbHash and the two colours of an output
(imaging/preview.py ``describe``) must cost under 3% of the render. For each
source (a real wallpaper cut to a 1600x1200 baseline JPEG, Q90, made in memory)
and each output (320, 640 and 1280 wide; JPEG and WebP, the pipeline's default
quality), one round times, in this order:

- the render: ``vips.thumbnail`` (shrink-on-load) + ``vips.materialize`` +
  ``vips.save``, the calls the pipeline makes for a single output;
- ``describe`` on the materialised image of that render, which is what the
  pipeline holds just before encoding.

Each is repeated (``--renders``, ``--describes``) and timed by wall clock
(median of the repetitions) and by this process's CPU time (every thread:
libvips saves with several), and the round's ratios describe / render are kept.
Rounds are interleaved so that load from elsewhere on the machine falls on
both; the report gives the median ratio over rounds and the worst round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyvips

from imgserve.imaging import preview, vips
from imgserve.imaging.formats import Format

WALLPAPERS = Path("/usr/share/wallpapers")
SOURCES = ("FallenLeaf", "Autumn")
SOURCE_SIZE = (1600, 1200)
WIDTHS = (320, 640, 1280)
FORMATS = (Format.JPEG, Format.WEBP)
BUDGET_PERCENT = 3.0
_UNBOUNDED = 10_000_000


@dataclass
class Case:
    source: str
    data: bytes
    width: int
    fmt: Format
    wall_ratios: list[float]
    cpu_ratios: list[float]
    render_ms: list[float]
    describe_ms: list[float]


def _source(theme: str) -> bytes:
    """The theme's largest JPEG cut (centre) to a 1600x1200 baseline JPEG, Q90."""
    images = WALLPAPERS / theme / "contents" / "images"
    candidates = sorted(images.glob("*.jpg"), key=lambda p: p.stat().st_size)
    if not candidates:
        sys.exit(f"no JPEG in {images}: install plasma-workspace-wallpapers")
    width, height = SOURCE_SIZE
    image = pyvips.Image.thumbnail(str(candidates[-1]), width, height=height, crop="centre")
    return bytes(image.jpegsave_buffer(Q=90, keep="none"))


def _render(data: bytes, width: int, fmt: Format) -> tuple[vips.Image, bytes]:
    image = vips.materialize(vips.thumbnail(data, Format.JPEG, width, _UNBOUNDED), Format.JPEG)
    return image, vips.save(image, fmt, None, False)


def _timed(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(median wall seconds, mean CPU seconds) of ``repeat`` calls."""
    walls: list[float] = []
    cpu0 = time.process_time()
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - started)
    return statistics.median(walls), (time.process_time() - cpu0) / repeat


def _round(case: Case, renders: int, describes: int) -> None:
    image, _ = _render(case.data, case.width, case.fmt)
    preview.describe(image)  # warm: NumPy's and thash's first-call costs
    render_wall, render_cpu = _timed(lambda: _render(case.data, case.width, case.fmt), renders)
    describe_wall, describe_cpu = _timed(lambda: preview.describe(image), describes)
    case.wall_ratios.append(describe_wall / render_wall)
    case.cpu_ratios.append(describe_cpu / render_cpu)
    case.render_ms.append(render_wall * 1000)
    case.describe_ms.append(describe_wall * 1000)


def _percent(values: list[float]) -> str:
    return f"{100 * statistics.median(values):.2f} ({100 * max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--renders", type=int, default=20, help="renders timed per round")
    parser.add_argument("--describes", type=int, default=200, help="describes timed per round")
    parser.add_argument("--threads", type=int, default=0, help="libvips threads (0: its default)")
    args = parser.parse_args()
    if args.threads:
        vips.set_threads(args.threads)

    cases = [
        Case(theme, data, width, fmt, [], [], [], [])
        for theme, data in ((theme, _source(theme)) for theme in SOURCES)
        for width in WIDTHS
        for fmt in FORMATS
    ]
    for number in range(args.rounds):
        print(f"round {number + 1}/{args.rounds}", file=sys.stderr, flush=True)
        for case in cases:
            _round(case, args.renders, args.describes)

    print(
        f"{os.cpu_count()} CPUs; libvips {vips.version()}, pyvips {pyvips.__version__}, "
        f"Python {sys.version.split()[0]}; {args.rounds} rounds x {args.renders} renders + "
        f"{args.describes} describes per case; preview.SAMPLE_PX={preview.SAMPLE_PX}, "
        f"HASH_PX={preview.HASH_PX}\n"
    )
    print(
        "| source (1600x1200 JPEG) | output | render ms | describe ms "
        "| describe / render, wall % (worst round) | describe / render, CPU % (worst round) |\n"
        "|---|---|---:|---:|---:|---:|"
    )
    worst = 0.0
    for case in cases:
        worst = max(worst, statistics.median(case.wall_ratios), statistics.median(case.cpu_ratios))
        cells = [
            case.source,
            f"{case.width} wide {case.fmt.value}",
            f"{statistics.median(case.render_ms):.1f}",
            f"{statistics.median(case.describe_ms):.3f}",
            _percent(case.wall_ratios),
            _percent(case.cpu_ratios),
        ]
        print("| " + " | ".join(cells) + " |", flush=True)
    verdict = "PASS" if 100 * worst < BUDGET_PERCENT else "FAIL"
    print(f"\nHighest median ratio: {100 * worst:.2f}% (budget {BUDGET_PERCENT}%): {verdict}")


if __name__ == "__main__":
    main()

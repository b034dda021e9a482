"""Image fixtures: real corpus files from Debian packages, and synthetic images made with pyvips.

The corpus comes from the desktop-base and plasma-workspace-wallpapers
packages, which the CI test script installs. A missing file is a broken test
environment, so it fails loudly instead of skipping.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pyvips

from imgserve import planning
from imgserve.config import ImagingLimits
from imgserve.request import validate
from imgserve.spec import JobSpec

# Corpus files, picked small enough to keep the suite fast.
WALLPAPER_JPEG = Path("/usr/share/wallpapers/Autumn/contents/images/640x480.jpg")
WALLPAPER_PNG = Path("/usr/share/wallpapers/Altai/contents/images/1080x1920.png")
CORPUS_SVGS = (
    Path("/usr/share/desktop-base/debian-logos/logo.svg"),
    Path("/usr/share/desktop-base/joy-theme/wallpaper/contents/images/1920x1080.svg"),
    Path("/usr/share/desktop-base/lines-theme/login/background-nologo.svg"),
)
PACKAGES = "desktop-base and plasma-workspace-wallpapers"

# Quadrant colours of the synthetic test card: top-left, top-right, bottom-left, bottom-right.
RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)


def corpus(path: Path) -> bytes:
    """The bytes of a corpus file; fail (never skip) when the package is missing."""
    if not path.is_file():
        pytest.fail(f"corpus file {path} is missing: install the Debian packages {PACKAGES}")
    return path.read_bytes()


def quadrants(width: int, height: int) -> pyvips.Image:
    """An sRGB test card with one flat colour per quadrant."""
    xy = pyvips.Image.xyz(width, height)
    left = xy[0] < width // 2
    top = xy[1] < height // 2
    image = (top & left).ifthenelse(
        list(RED), top.ifthenelse(list(GREEN), left.ifthenelse(list(BLUE), list(YELLOW)))
    )
    return image.cast("uchar").copy(interpretation="srgb")


def animation(width: int, height: int, colours: list[tuple[int, int, int]]) -> pyvips.Image:
    """A strip of flat-coloured frames with page-height and delay set."""
    frames = [(pyvips.Image.black(width, height, bands=3) + list(c)).cast("uchar") for c in colours]
    strip = pyvips.Image.arrayjoin(frames, across=1).copy(interpretation="srgb")
    strip.set_type(pyvips.GValue.gint_type, "page-height", height)
    strip.set_type(pyvips.GValue.array_int_type, "delay", [80] * len(colours))
    strip.set_type(pyvips.GValue.gint_type, "loop", 0)
    return strip


def job_for(operation: str, src: str, dst: str, **args: Any) -> JobSpec:
    """0.2's request, as the job it plans as."""
    return validate(
        {"operationType": operation, "srcURL": src, "dstURL": dst, "args": args}
    ).to_spec()


Run = Callable[..., tuple[planning.JobPlan, bytes]]


@pytest.fixture
def limits() -> ImagingLimits:
    return ImagingLimits()


@pytest.fixture
def run(limits: ImagingLimits) -> Run:
    """Plan and render one job: run(data, src, dst, operation="resize", **args)."""

    def _run(
        data: bytes,
        src: str,
        dst: str,
        operation: str = "resize",
        limits_: ImagingLimits | None = None,
        **args: Any,
    ) -> tuple[planning.JobPlan, bytes]:
        use = limits_ or limits
        planned = planning.plan(job_for(operation, src, dst, **args), data, use)
        return planned, planning.render(planned, data, use)[0]

    return _run


@pytest.fixture(scope="session")
def photo_jpeg() -> bytes:
    return corpus(WALLPAPER_JPEG)


@pytest.fixture(scope="session")
def photo() -> pyvips.Image:
    """The corpus photo, shrunk, as a reference for pixel comparisons."""
    return pyvips.Image.new_from_buffer(corpus(WALLPAPER_JPEG), "").resize(0.125)

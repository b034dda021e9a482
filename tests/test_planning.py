"""Stored plans: jobs queued by the previous release still run after an upgrade.

The literals below are ``pipeline.Plan.to_dict()`` exactly as imgserve 0.3's first
release stored them in ``JobRecord.plan`` (made with that code, pasted here).
"""

from __future__ import annotations

from typing import Any

import pytest
import pyvips

from imgserve import api, pool
from imgserve.config import ImagingLimits
from imgserve.queue.base import JobRecord

# resize of a 64x48 JPEG to width 32, gravity north, quality 80, {$tags} in the URL.
STORED_RESIZE: dict[str, Any] = {
    "operation": "resize",
    "source_format": "jpeg",
    "source": [64, 48],
    "pages": 1,
    "result": [32, 24],
    "output": "jpeg",
    "dst_url": "file:///o/beach-32x24.jpg",
    "gravity": "north",
    "quality": 80,
    "keep_metadata": False,
    "svg_scale": None,
}
# rasterize of a 40x20 SVG at scale 1.5.
STORED_RASTERIZE: dict[str, Any] = {
    "operation": "rasterize",
    "source_format": "svg",
    "source": [40, 20],
    "pages": 1,
    "result": [60, 30],
    "output": "png",
    "dst_url": "file:///o/logo.png",
    "gravity": "centre",
    "quality": None,
    "keep_metadata": False,
    "svg_scale": 1.5,
}
RED_JPEG = pyvips.Image.black(64, 48, bands=3).new_from_image([200, 30, 30]).jpegsave_buffer()
BLUE_SVG = (
    b'<svg xmlns="http://www.w3.org/2000/svg" width="40" height="20">'
    b'<rect width="40" height="20" fill="blue"/></svg>'
)


@pytest.mark.parametrize("planned", [True, False], ids=["queued-copy", "downloaded-again"])
@pytest.mark.parametrize(
    ("stored", "source", "loader", "size"),
    [
        (STORED_RESIZE, RED_JPEG, "jpegload_buffer", (32, 24)),
        (STORED_RASTERIZE, BLUE_SVG, "pngload_buffer", (60, 30)),
    ],
    ids=["resize", "rasterize"],
)
def test_a_plan_stored_by_the_previous_release_still_renders(
    stored: dict[str, Any], source: bytes, loader: str, size: tuple[int, int], planned: bool
) -> None:
    """A worker renders a job whose plan is the previous release's flat dict."""
    out = pyvips.Image.new_from_buffer(
        pool._render(source, dict(stored), ImagingLimits(), planned), ""
    )
    assert (out.width, out.height) == size
    assert out.get("vips-loader") == loader


def test_job_view_reads_a_plan_stored_by_the_previous_release() -> None:
    """GET /jobs/<id> shows a previous release's job with its size and destination."""
    record = JobRecord(
        id="0" * 32, job={}, plan=dict(STORED_RESIZE), dst_url=STORED_RESIZE["dst_url"]
    )
    view = api.job_view(record)
    assert (view["width"], view["height"], view["dstURL"]) == (32, 24, "file:///o/beach-32x24.jpg")

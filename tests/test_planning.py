"""Stored plans: jobs queued by the previous release still run after an upgrade.

The literals below are ``pipeline.Plan.to_dict()`` and ``request.Job.to_dict()``
exactly as imgserve 0.3's first release stored them in ``JobRecord.plan`` and
``JobRecord.job`` (made with that code, pasted here).
"""

from __future__ import annotations

from typing import Any

import pytest
import pyvips

from imgserve import api, planning, pool
from imgserve.config import ImagingLimits
from imgserve.queue.base import JobRecord
from imgserve.request import validate

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
# The request of the STORED_RESIZE job: request.Job.to_dict() as the previous
# releases stored it in JobRecord.job.
STORED_JOB: dict[str, Any] = {
    "operation": "resize",
    "src_url": "http://h/photos/beach.jpg",
    "dst_template": "file:///o/{$basename}-{$width}x{$height}.{$ext}",
    "width": 32,
    "height": None,
    "scale": None,
    "gravity": "north",
    "enlarge": False,
    "quality": 80,
    "keep_metadata": False,
    "form_field": None,
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
        pool._render(source, dict(stored), ImagingLimits(), planned).outputs[0].data, ""
    )
    assert (out.width, out.height) == size
    assert out.get("vips-loader") == loader


def test_job_view_reads_a_plan_stored_by_the_previous_release() -> None:
    """GET /jobs/<id> shows a previous release's job with its size and destination."""
    record = JobRecord(
        id="0" * 32, job=STORED_JOB, plan=dict(STORED_RESIZE), dst_url=STORED_RESIZE["dst_url"]
    )
    view = api.job_view(record)
    assert (view["width"], view["height"], view["dstURL"]) == (32, 24, "file:///o/beach-32x24.jpg")


RESIZE_JOB = {
    "operationType": "resize",
    "srcURL": "http://h/photos/beach.jpg",
    "dstURL": "file:///o/{$basename}-{$width}x{$height}.{$ext}",
    "args": {"width": 32, "gravity": "north", "quality": 80},
}
RASTERIZE_JOB = {
    "operationType": "rasterize",
    "srcURL": "http://h/logo.svg",
    "dstURL": "file:///o/{$basename}.{$ext}",
    "args": {"scale": 1.5},
}


@pytest.mark.parametrize(
    ("stored", "request_", "source"),
    [(STORED_RESIZE, RESIZE_JOB, RED_JPEG), (STORED_RASTERIZE, RASTERIZE_JOB, BLUE_SVG)],
    ids=["resize", "rasterize"],
)
def test_a_version_1_plan_reads_as_the_plan_made_today(
    stored: dict[str, Any], request_: dict[str, Any], source: bytes
) -> None:
    """The previous release's plan reads back as the plan this release makes for the
    same request, bar the SVG's float size, which only planning needs."""
    today = planning.plan(validate(request_).to_spec(), source, ImagingLimits())
    read = planning.JobPlan.from_dict(stored)
    assert read.outputs == today.outputs
    assert read.operation == today.operation
    info = today.source_info
    assert read.source_info == type(info)(info.format, info.size, info.pages)


def test_a_plan_round_trips_through_its_versioned_dict() -> None:
    """JobPlan.to_dict carries the version, and from_dict gives the very plan back."""
    plan = planning.plan(validate(RASTERIZE_JOB).to_spec(), BLUE_SVG, ImagingLimits())
    stored = plan.to_dict()
    assert stored["version"] == planning.VERSION == 2
    assert planning.JobPlan.from_dict(stored) == plan
    assert plan.source_info.svg_size == (40.0, 20.0)


def test_fields_a_later_release_adds_are_ignored() -> None:
    """A plan stored by a later release, with fields this one does not know, still renders."""
    plan = planning.plan(validate(RESIZE_JOB).to_spec(), RED_JPEG, ImagingLimits())
    stored = plan.to_dict()
    stored["version"] = 3
    stored["metadata"] = {"uploadId": "42"}
    stored["source"]["colourspace"] = "srgb"
    stored["outputs"][0]["fit"] = "cover"
    assert planning.JobPlan.from_dict(stored) == plan
    out = pyvips.Image.new_from_buffer(
        pool._render(RED_JPEG, stored, ImagingLimits(), True).outputs[0].data, ""
    )
    assert (out.width, out.height) == (32, 24)

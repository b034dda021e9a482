"""spec.JobSpec: the stored job reads back, whichever release and endpoint stored it."""

from __future__ import annotations

from typing import Any

from imgserve.imaging.formats import Format
from imgserve.request import validate
from imgserve.spec import VERSION, JobSpec, OutputRequest
from tests.test_planning import STORED_JOB


def test_a_0_2_request_is_a_job_with_one_output() -> None:
    """0.2's resize covers the box, refuses to enlarge, and keeps its form field."""
    job = validate(
        {
            "operationType": "resize",
            "srcURL": "http://h/u/Beach.photo.jpg?x=1",
            "dstURL": "http://up/u.php:{$basename}.png",
            "args": {"width": 10, "height": 20, "gravity": "North", "field_name": "f"},
        }
    )
    spec = job.to_spec()
    assert spec.source_url == "http://h/u/Beach.photo.jpg?x=1"
    assert (spec.basename, spec.extension) == ("Beach.photo", "jpg")
    assert spec.operation == "resize" and spec.placeholder and spec.metadata == {}
    (out,) = spec.outputs
    assert out == OutputRequest(
        url="http://up/u.php:{$basename}.png",
        width=10,
        height=20,
        fit="cover",
        gravity="north",
        form_field="f",
        refuse_small=True,
    )


def test_a_0_2_rasterize_fits_inside_and_may_enlarge() -> None:
    """0.2's rasterize fits the drawing inside the box (its own rule, not cover)."""
    spec = validate(
        {
            "operationType": "rasterize",
            "srcURL": "file:///a/logo.svg",
            "dstURL": "file:///o/x.png",
            "args": {"scale": 2},
        }
    ).to_spec()
    (out,) = spec.outputs
    assert (out.fit, out.scale, out.refuse_small) == ("inside", 2.0, False)


def test_a_job_stored_by_the_previous_release_reads_as_today_s() -> None:
    """A JobRecord.job written before jobs v2 (0.2's flat request) reads as the spec
    the same request makes today."""
    today = validate(
        {
            "operationType": "resize",
            "srcURL": "http://h/photos/beach.jpg",
            "dstURL": "file:///o/{$basename}-{$width}x{$height}.{$ext}",
            "args": {"width": 32, "gravity": "north", "quality": 80},
        }
    ).to_spec()
    assert JobSpec.from_dict(dict(STORED_JOB)) == today


def test_a_spec_round_trips_through_its_versioned_dict() -> None:
    """to_dict carries the version, and from_dict gives the very spec back."""
    spec = JobSpec(
        source_url=None,
        source_name="Beach.jpg",
        outputs=(
            OutputRequest(url="s3://m/{$basename}.webp", width=2048),
            OutputRequest(
                url="file:///t/a.png",
                width=200,
                height=200,
                fit="contain",
                format=Format.PNG,
                background=(255, 0, 0, 128),
            ),
        ),
        metadata={"uploadId": "42"},
    )
    stored = spec.to_dict()
    assert stored["version"] == VERSION
    assert JobSpec.from_dict(stored) == spec


def test_fields_a_later_release_adds_are_ignored() -> None:
    """A spec stored by a later release, with fields this one does not know, still reads."""
    spec = JobSpec(
        source_url="http://h/a.jpg", source_name="a.jpg", outputs=(OutputRequest("file:///o.jpg"),)
    )
    stored: dict[str, Any] = spec.to_dict()
    stored["notify"] = {"email": "ops@example.com"}
    stored["outputs"][0]["blurhash"] = True
    assert JobSpec.from_dict(stored) == spec

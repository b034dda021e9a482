"""Fit modes and many outputs from one decode: sizes, formats and pixels (with a
tolerance, never bytes)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import pyvips

from imgserve import errors
from imgserve.config import ImagingLimits
from imgserve.imaging import pipeline, vips
from imgserve.imaging.formats import Format
from imgserve.imaging.geometry import Size
from imgserve.imaging.pipeline import OutputPlan, OutputSpec, SourceInfo

from .conftest import BLUE, GREEN, RED, YELLOW, animation, quadrants

WHITE = (255, 255, 255)


def decode(data: bytes, *, all_frames: bool = False) -> pyvips.Image:
    return pyvips.Image.new_from_buffer(data, "n=-1" if all_frames else "")


def close(pixel: list[float], colour: tuple[int, ...], tolerance: float = 24) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, colour, strict=False))


def make(
    data: bytes, specs: list[OutputSpec], limits: ImagingLimits | None = None
) -> tuple[SourceInfo, list[OutputPlan], list[pyvips.Image]]:
    """Inspect, plan every output, render them all at once; the decoded results."""
    use = limits or ImagingLimits()
    operation = "rasterize" if data.lstrip().startswith(b"<") else "resize"
    info = pipeline.inspect(operation, data, use)
    plans = [pipeline.plan_output(info, spec, use) for spec in specs]
    out = pipeline.render(data, info, plans, use, planned=True)
    return info, plans, [decode(b, all_frames=p.animated) for b, p in zip(out, plans, strict=True)]


def one(data: bytes, **spec: Any) -> pyvips.Image:
    """One output of ``data``; ``format`` defaults to PNG."""
    spec.setdefault("format", Format.PNG)
    _info, plans, images = make(data, [OutputSpec(**spec)])
    image = images[0]
    assert (image.width, image.height) == (plans[0].result.width, plans[0].result.height)
    return image


@pytest.fixture(scope="module")
def card() -> bytes:
    """A 400x200 quadrant card (red, green / blue, yellow) as PNG."""
    return bytes(quadrants(400, 200).pngsave_buffer())


# --- each fit mode's size and pixels ------------------------------------------------


def test_contain_pads_transparent_in_png(card: bytes) -> None:
    """contain in PNG pads the box with transparency by default, the card centred."""
    image = one(card, width=100, height=100, fit="contain")
    assert (image.width, image.height) == (100, 100)
    assert image.bands == 4
    assert image(50, 5)[3] == 0 and image(50, 94)[3] == 0
    assert close(image(10, 30), (*RED, 255)) and close(image(90, 70), (*YELLOW, 255))


def test_contain_pads_white_in_jpeg(card: bytes) -> None:
    """contain in JPEG (no alpha) pads with white by default."""
    image = one(card, width=100, height=100, fit="contain", format=Format.JPEG)
    assert image.bands == 3
    assert close(image(50, 5), WHITE, 8) and close(image(50, 94), WHITE, 8)
    assert close(image(10, 30), RED)


@pytest.mark.parametrize("fmt", [Format.PNG, Format.JPEG])
def test_contain_pads_with_the_background(card: bytes, fmt: Format) -> None:
    """An explicit background colours contain's padding, in either format."""
    image = one(card, width=100, height=100, fit="contain", background=(0, 0, 255, 255), format=fmt)
    assert close(image(50, 5), (*BLUE, 255)) and close(image(50, 94), (*BLUE, 255))
    assert close(image(90, 30), GREEN)


def test_contain_places_the_image_by_gravity(card: bytes) -> None:
    """contain with gravity north puts the image at the top, the padding below."""
    image = one(card, width=100, height=100, fit="contain", gravity="north")
    assert close(image(10, 5), (*RED, 255)) and close(image(10, 45), (*BLUE, 255))
    assert image(50, 60)[3] == 0


@pytest.mark.parametrize(
    ("gravity", "left", "right"),
    [("west", RED, RED), ("east", GREEN, GREEN), ("centre", RED, GREEN)],
)
def test_cover_crop_keeps_the_gravitys_side(
    card: bytes, gravity: str, left: tuple[int, int, int], right: tuple[int, int, int]
) -> None:
    """cover crops to exactly the box and keeps the side its gravity names."""
    image = one(card, width=100, height=100, fit="cover", gravity=gravity)
    assert close(image(3, 25), left) and close(image(96, 25), right)


def test_fill_stretches_the_whole_image(card: bytes) -> None:
    """fill squeezes the whole 2:1 card into a square: every corner keeps its colour,
    where cover would have cut the card's left and right quarters off."""
    stripe = quadrants(400, 200).draw_rect([255, 0, 255], 380, 0, 20, 200, fill=True)
    data = stripe.pngsave_buffer()
    filled = one(data, width=100, height=100, fit="fill")
    covered = one(data, width=100, height=100, fit="cover")
    assert (filled.width, filled.height) == (100, 100)
    assert close(filled(98, 50), (255, 0, 255))
    assert close(filled(3, 3), RED) and close(filled(3, 96), BLUE)
    assert close(filled(70, 3), GREEN) and close(filled(70, 96), YELLOW)
    assert not close(covered(98, 50), (255, 0, 255))


@pytest.mark.parametrize(("fit", "size"), [("inside", (100, 50)), ("outside", (200, 100))])
def test_inside_and_outside_sizes(card: bytes, fit: str, size: tuple[int, int]) -> None:
    """inside fits within the box, outside covers it; neither crops nor pads."""
    image = one(card, width=100, height=100, fit=fit)
    assert (image.width, image.height) == size
    assert close(image(3, 3), RED) and close(image(size[0] - 4, size[1] - 4), YELLOW)


@pytest.mark.parametrize(
    ("fit", "enlarge", "size"),
    [
        ("cover", False, (50, 40)),
        ("cover", True, (100, 100)),
        ("contain", False, (100, 100)),
        ("inside", False, (50, 40)),
        ("inside", True, (100, 80)),
        ("fill", False, (50, 40)),
        ("fill", True, (100, 100)),
    ],
)
def test_enlarge_caps_the_scale(fit: str, enlarge: bool, size: tuple[int, int]) -> None:
    """Without enlarge a small source keeps its size (contain still pads to the box);
    with it, it grows to the fit's size."""
    small = quadrants(50, 40).pngsave_buffer()
    image = one(small, width=100, height=100, fit=fit, enlarge=enlarge)
    assert (image.width, image.height) == size
    assert close(image(2, 2), RED) if fit != "contain" else image(50, 2)[3] == 0


def test_refuse_small_keeps_0_2s_203() -> None:
    """refuse_small (0.2's POST /) still refuses a source smaller than the box."""
    small = quadrants(50, 40).pngsave_buffer()
    with pytest.raises(errors.EnlargeNotAllowed):
        one(small, width=100, height=100, refuse_small=True)


# --- many outputs, one decode ------------------------------------------------------------

RENDITIONS = [
    OutputSpec(Format.WEBP, width=400),
    OutputSpec(Format.JPEG, width=320, quality=80),
    OutputSpec(Format.PNG, width=100, height=100, fit="cover", gravity="smart"),
    OutputSpec(Format.AVIF, width=120, height=120, fit="contain"),
    OutputSpec(Format.JPEG, width=160, height=90, fit="fill"),
    OutputSpec(Format.GIF, width=200, height=200, fit="inside"),
]
LOADER = {
    Format.WEBP: "webpload_buffer",
    Format.JPEG: "jpegload_buffer",
    Format.PNG: "pngload_buffer",
    Format.AVIF: "heifload_buffer",
    Format.GIF: "gifload_buffer",
}


def test_many_outputs_each_at_its_size_and_format_from_one_decode(
    photo_jpeg: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Six outputs render at their planned sizes and formats from one decode, each
    within a small tolerance of the same output rendered on its own."""
    decodes: list[tuple[int, int]] = []
    thumbnail = vips.thumbnail

    def counted(data: bytes, fmt: Format, width: int, height: int, **kw: Any) -> pyvips.Image:
        decodes.append((width, height))
        return thumbnail(data, fmt, width, height, **kw)

    monkeypatch.setattr(vips, "thumbnail", counted)
    info, plans, images = make(photo_jpeg, RENDITIONS)
    assert len(decodes) == 1  # the largest output's shrink-on-load, nothing else
    assert decodes[0][0] == 400
    for spec, plan, image in zip(RENDITIONS, plans, images, strict=True):
        assert (image.width, image.height) == (plan.result.width, plan.result.height)
        assert image.get("vips-loader") == LOADER[spec.format]
        alone = decode(pipeline.render(photo_jpeg, info, [plan], ImagingLimits(), planned=True)[0])
        difference = (image[0:3].cast("float") - alone[0:3].cast("float")).abs().avg()
        assert difference < (8 if spec.format is Format.GIF else 3), spec
    assert [p.result for p in plans] == [
        Size(400, 250), Size(320, 200), Size(100, 100), Size(120, 120), Size(160, 90),
        Size(200, 125)
    ]  # fmt: skip


def test_a_single_output_renders_as_before(photo_jpeg: bytes) -> None:
    """One output is today's one thumbnail_buffer call with the cover box, then the crop."""
    _info, _plans, images = make(
        photo_jpeg, [OutputSpec(Format.PNG, width=100, height=100, gravity="east")]
    )
    before = pyvips.Image.thumbnail_buffer(photo_jpeg, 10_000_000, height=100, size="both")
    before = before.crop(before.width - 100, 0, 100, 100)
    assert (images[0].width, images[0].height) == (100, 100)
    assert (images[0] - before).abs().max() == 0


def test_outputs_come_back_in_request_order(card: bytes) -> None:
    """render returns the outputs in the order asked, whatever order it makes them in."""
    widths = [40, 200, 10, 120]
    _info, _plans, images = make(card, [OutputSpec(Format.PNG, width=w) for w in widths])
    assert [image.width for image in images] == widths


def test_a_downloaded_source_is_rechecked_once_per_job(
    card: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """planned=False inspects the source again once for the job, not once per output."""
    limits = ImagingLimits()
    info = pipeline.inspect("resize", card, limits)
    plans = [pipeline.plan_output(info, OutputSpec(Format.PNG, width=w), limits) for w in (20, 40)]
    seen: list[int] = []
    inspect = pipeline.inspect

    def counted(operation: str, data: bytes, use: ImagingLimits) -> SourceInfo:
        seen.append(len(data))
        return inspect(operation, data, use)

    monkeypatch.setattr(pipeline, "inspect", counted)
    assert len(pipeline.render(card, info, plans, limits)) == 2
    assert seen == [len(card)]


def test_byte_limit_names_the_output(photo_jpeg: bytes) -> None:
    """A result past max_result_bytes is 303 naming which output it was."""
    limits = ImagingLimits(max_result_bytes=5000)
    info = pipeline.inspect("resize", photo_jpeg, limits)
    small = pipeline.plan_output(info, OutputSpec(Format.JPEG, width=10), limits)
    big = pipeline.plan_output(info, OutputSpec(Format.PNG, width=300), limits)
    with pytest.raises(errors.ResultOverLimit) as caught:
        pipeline.render(photo_jpeg, info, [small, big], limits, planned=True)
    assert caught.value.detail.startswith("outputs[1]: result is ")


# --- SVG and animated sources -------------------------------------------------------------

EDGE_SVG = (
    b'<svg xmlns="http://www.w3.org/2000/svg" width="40" height="40">'
    b'<rect width="40" height="40" fill="white"/><rect width="20" height="40" fill="black"/>'
    b'<rect x="29.5" width="1" height="40" fill="black"/></svg>'
)


@pytest.mark.parametrize("fit", ["inside", "cover"])
def test_svg_outputs_are_rendered_at_their_own_size(fit: str) -> None:
    """An SVG with three outputs is drawn at each size: its edge stays sharp (1-2 px of
    grey at 16x) and a 1-unit line is its scale wide, never an upscaled blur."""
    sizes = (40, 160, 640)
    specs = [OutputSpec(Format.PNG, width=w, height=w, fit=fit) for w in sizes]
    _info, _plans, images = make(EDGE_SVG, specs)
    for size, image in zip(sizes, images, strict=True):
        assert (image.width, image.height) == (size, size)
        row = [image(x, size // 2)[0] for x in range(size)]
        grey = [x for x, value in enumerate(row) if 30 < value < 225]
        edge = [x for x in grey if x < size * 5 // 8]
        assert len(edge) <= 2, (size, edge)
        line = [x for x, value in enumerate(row) if value < 128 and x > size // 2]
        assert len(line) == pytest.approx(size / 40, abs=1), (size, line)


def test_svg_cover_and_contain_crop_and_pad() -> None:
    """A 2:1 drawing: cover crops it to the square, contain pads it (transparent)."""
    wide = (
        b'<svg xmlns="http://www.w3.org/2000/svg" width="80" height="40">'
        b'<rect width="40" height="40" fill="red"/><rect x="40" width="40" height="40" '
        b'fill="blue"/></svg>'
    )
    specs = [
        OutputSpec(Format.PNG, width=100, height=100, fit="cover", gravity="west"),
        OutputSpec(Format.PNG, width=100, height=100, fit="contain"),
    ]
    _info, plans, (covered, contained) = make(wide, specs)
    assert [p.result for p in plans] == [Size(100, 100)] * 2
    assert close(covered(5, 50), (*RED, 255)) and close(covered(95, 50), (*RED, 255))
    assert contained(50, 5)[3] == 0 and close(contained(90, 50), (*BLUE, 255))


FRAMES = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


def test_animated_gif_to_a_gif_and_a_jpeg() -> None:
    """An animated source with a GIF and a JPEG output: every frame in the GIF, the
    first in the JPEG, both at their planned sizes."""
    gif = animation(60, 40, FRAMES).gifsave_buffer()
    specs = [
        OutputSpec(Format.GIF, width=30, height=30),
        OutputSpec(Format.JPEG, width=30),
    ]
    _info, plans, (moving, still) = make(gif, specs)
    assert [p.animated for p in plans] == [True, False]
    assert (moving.width, moving.get("page-height"), moving.height) == (30, 30, 90)
    for index, colour in enumerate(FRAMES):
        assert close(moving(15, index * 30 + 15), colour, 30)
    assert (still.width, still.height) == (30, 20)
    assert close(still(15, 10), FRAMES[0], 30)


# --- the stored plan ----------------------------------------------------------------------


def test_output_plan_reads_the_previous_releases_dict() -> None:
    """An output stored by the previous release (vars(plan), sizes as lists) reads back
    with today's defaults, and to_dict/from_dict round-trip the new fields."""
    stored = {
        "result": [32, 24],
        "output": "jpeg",
        "gravity": "north",
        "quality": 80,
        "keep_metadata": False,
        "svg_scale": None,
        "animated": False,
        "dst_url": "file:///o/beach-32x24.jpg",
    }
    plan = OutputPlan.from_dict(stored)
    assert plan == OutputPlan(Size(32, 24), Format.JPEG, gravity="north", quality=80)
    assert (plan.fit, plan.background, plan.scaled) == ("cover", None, None)
    info = SourceInfo(Format.JPEG, Size(64, 48), 1)
    assert pipeline.scaled_size(info, plan) == Size(32, 24)
    new = OutputPlan(
        Size(10, 10), Format.PNG, fit="contain", background=(1, 2, 3, 4), scaled=Size(10, 5)
    )
    assert OutputPlan.from_dict({**new.to_dict(), "later": 1}) == new


def test_deriving_many_outputs_keeps_one_base_in_memory() -> None:
    """Twelve outputs from one decode: libvips' memory while they are made stays
    a few bases, not the sum of every base made so far (about 60 MB here)."""
    source = bytes(
        pyvips.Image.gaussnoise(2400, 1600).cast("uchar").bandjoin([128, 64]).jpegsave_buffer()
    )
    limits = ImagingLimits()
    info = pipeline.inspect("resize", source, limits)
    plans = [
        pipeline.plan_output(info, OutputSpec(Format.JPEG, width=2000 - 100 * i), limits)
        for i in range(12)
    ]
    # Images this large are mmap'd by malloc and unmapped when freed: RSS follows them.
    before = _rss_bytes()
    held: list[int] = []
    for _index, image in pipeline._derived(source, info, list(enumerate(plans))):
        held.append(_rss_bytes() - before)
        del image
    one_base = 2000 * 1333 * 3
    assert len(held) == 12
    assert max(held) < 5 * one_base, [h // 1_000_000 for h in held]  # all kept: 8 bases


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

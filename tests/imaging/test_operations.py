"""Operations per output (#16): crop, rotate, flip, flop, blur, sharpen, grayscale, pad
and watermark, checked on pixels (with a tolerance, never bytes), alone, combined with
each fit, and in a job of many outputs decoded once."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import pyvips

from imgserve import errors, planning
from imgserve.config import ImagingLimits
from imgserve.imaging.formats import Format
from imgserve.imaging.operations import Crop, Operations, Pad, Watermark
from imgserve.imaging.pipeline import OutputSpec
from imgserve.request_jobs import validate_jobs
from imgserve.spec import FITS

from .conftest import BLUE, GREEN, RED, YELLOW, animation, quadrants
from .test_renditions import WHITE, close, decode, make, one

MAGENTA = (255, 0, 255)


@pytest.fixture(scope="module")
def card() -> bytes:
    """A 400x200 quadrant card: red, green on top; blue, yellow below."""
    return bytes(quadrants(400, 200).pngsave_buffer())


def corners(image: pyvips.Image) -> list[list[float]]:
    """The colours at the centres of the four quadrants: tl, tr, bl, br."""
    w, h = image.width, image.height
    points = (
        (w // 4, h // 4),
        (3 * w // 4, h // 4),
        (w // 4, 3 * h // 4),
        (3 * w // 4, 3 * h // 4),
    )
    return [image(x, y)[:3] for x, y in points]


def quads(image: pyvips.Image, *colours: tuple[int, int, int]) -> bool:
    return all(close(p, c) for p, c in zip(corners(image), colours, strict=True))


# --- rotate, flip, flop: orientation of an asymmetric card ---------------------------


@pytest.mark.parametrize(
    ("ops", "size", "expect"),
    [
        (Operations(rotate=90), (100, 200), (BLUE, RED, YELLOW, GREEN)),
        (Operations(rotate=180), (100, 50), (YELLOW, BLUE, GREEN, RED)),
        (Operations(rotate=270), (100, 200), (GREEN, YELLOW, RED, BLUE)),
        (Operations(flip=True), (100, 50), (BLUE, YELLOW, RED, GREEN)),
        (Operations(flop=True), (100, 50), (GREEN, RED, YELLOW, BLUE)),
        (Operations(rotate=90, flop=True), (100, 200), (RED, BLUE, GREEN, YELLOW)),
    ],
    ids=["rotate90", "rotate180", "rotate270", "flip", "flop", "rotate90+flop"],
)
def test_rotations_and_mirrors_turn_the_card_the_right_way(
    card: bytes, ops: Operations, size: tuple[int, int], expect: tuple[Any, ...]
) -> None:
    """Clockwise turns and mirrors put each quadrant where it belongs; 90 and 270 swap
    the sides before the width is applied."""
    image = one(card, width=100, ops=ops)
    assert (image.width, image.height) == size
    assert quads(image, *expect), corners(image)


def test_any_angle_turns_on_the_background(card: bytes) -> None:
    """rotate 45 on #f0f: the result is the turned card's bounding box, its corners the
    background, its middle the card."""
    ops = Operations(rotate=45)
    image = one(card, width=300, ops=ops, background=(*MAGENTA, 255), format=Format.JPEG)
    assert image.width == 300
    assert abs(image.height - 300) <= 2  # 400x200 turned 45 degrees is 424x424
    assert close(image(3, 3), MAGENTA, 40) and close(image(296, image.height - 4), MAGENTA, 40)
    assert not close(image(150, image.height // 2), MAGENTA, 60)


# --- crop ----------------------------------------------------------------------------


def test_crop_takes_the_region_before_the_resize(card: bytes) -> None:
    """A crop of the green quadrant, resized to 50 wide, is all green and 50x25."""
    image = one(card, width=50, ops=Operations(crop=Crop(200, 0, 200, 100)))
    assert (image.width, image.height) == (50, 25)
    assert all(close(p, GREEN) for p in corners(image))


def test_crop_across_quadrants_keeps_their_places(card: bytes) -> None:
    """The middle 200x100 of the card holds a part of each quadrant, in place."""
    image = one(card, width=100, ops=Operations(crop=Crop(100, 50, 200, 100)))
    assert (image.width, image.height) == (100, 50)
    assert quads(image, RED, GREEN, BLUE, YELLOW)


def test_crop_then_rotate(card: bytes) -> None:
    """The crop is taken first (in the source's pixels), then turned: the green quadrant
    turned 90 degrees is 100x200 at width 100."""
    image = one(card, width=100, ops=Operations(crop=Crop(200, 0, 200, 100), rotate=90))
    assert (image.width, image.height) == (100, 200)
    assert all(close(p, GREEN) for p in corners(image))


def test_crop_outside_the_source_is_703(card: bytes) -> None:
    """A crop past the source's edge is refused before the reply, naming the output."""
    body = {
        "source": "https://h/card.png",
        "outputs": [
            {"url": "s3://b/a.png", "width": 10},
            {"url": "s3://b/b.png", "width": 10, "crop": {"left": 300, "top": 0,
                                                          "width": 200, "height": 50}},
        ],
    }  # fmt: skip
    spec = validate_jobs(body, max_outputs=4)
    with pytest.raises(errors.JobFieldInvalid) as info:
        planning.plan(spec, card, ImagingLimits())
    assert info.value.code == 703
    assert info.value.detail.startswith("outputs[1].crop: 200x50 at (300, 0) is outside")


def test_a_tiny_crop_blown_up_past_the_limit_is_refused(card: bytes) -> None:
    """Decoding the whole source at the scale a 2x2 crop needs for 4000 px is over
    max_result_pixels: 303 before any pixel is decoded."""
    body = {
        "source": "https://h/card.png",
        "outputs": [{"url": "s3://b/a.png", "width": 4000, "enlarge": True,
                     "crop": {"left": 0, "top": 0, "width": 2, "height": 2}}],
    }  # fmt: skip
    spec = validate_jobs(body, max_outputs=4)
    with pytest.raises(errors.ResultOverLimit) as info:
        planning.plan(spec, card, ImagingLimits(max_result_pixels=10_000_000))
    assert info.value.code == 303


# --- pad, effects ---------------------------------------------------------------------


def test_pad_adds_borders_of_the_background(card: bytes) -> None:
    """pad top 10, left 5 in blue around a 100x50 JPEG: 105x60, blue borders, the card
    moved by the pad."""
    ops = Operations(pad=Pad(top=10, left=5))
    image = one(card, width=100, ops=ops, background=(*BLUE, 255), format=Format.JPEG)
    assert (image.width, image.height) == (105, 60)
    assert close(image(2, 30), BLUE) and close(image(50, 4), BLUE)
    assert close(image(5 + 25, 10 + 12), RED) and close(image(5 + 75, 10 + 37), YELLOW)


def test_pad_is_transparent_in_png_by_default(card: bytes) -> None:
    image = one(card, width=100, ops=Operations(pad=Pad(right=7, bottom=3)))
    assert (image.width, image.height) == (107, 53)
    assert image.bands == 4 and image(104, 20)[3] == 0 and image(50, 51)[3] == 0
    assert image(50, 20)[3] == 255


def _steepest_step(image: pyvips.Image) -> float:
    """The largest change between neighbours along the middle row (across the edge)."""
    row = [image(x, image.height // 2)[0] for x in range(image.width)]
    return max(abs(b - a) for a, b in itertools.pairwise(row))


def test_blur_softens_and_sharpen_hardens_an_edge() -> None:
    """Across a soft grey edge, blur makes the steepest step smaller and sharpen makes it
    larger than in the plain render."""
    xy = pyvips.Image.xyz(400, 200)
    edge = (xy[0] < 200).ifthenelse([64, 64, 64], [192, 192, 192]).gaussblur(2)
    data = bytes(edge.cast("uchar").copy(interpretation="srgb").pngsave_buffer())
    plain = one(data, width=200)
    blurred = one(data, width=200, ops=Operations(blur=4))
    sharpened = one(data, width=200, ops=Operations(sharpen=1.5))
    assert _steepest_step(blurred) < _steepest_step(plain) * 0.7
    assert _steepest_step(sharpened) > _steepest_step(plain) * 1.2
    assert (blurred.width, blurred.height) == (sharpened.width, sharpened.height) == (200, 100)


def test_grayscale_makes_every_pixel_grey(card: bytes) -> None:
    image = one(card, width=100, ops=Operations(grayscale=True), format=Format.JPEG)
    for pixel in corners(image):
        assert max(pixel) - min(pixel) <= 3, pixel
    assert corners(image)[0][0] < corners(image)[3][0]  # red is darker than yellow


# --- watermark ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def white_square(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("marks") / "square.png"
    square = (pyvips.Image.black(20, 20, bands=3) + 255).cast("uchar").copy(interpretation="srgb")
    square.bandjoin(255).cast("uchar").pngsave(str(path))
    return path


def _black(size: int) -> bytes:
    black = pyvips.Image.black(size, size, bands=3).cast("uchar").copy(interpretation="srgb")
    return bytes(black.pngsave_buffer())


def _marked(source: bytes, mark: Watermark, path: Path, **spec: Any) -> pyvips.Image:
    limits = ImagingLimits(watermarks=(f"{mark.name}={path}",))
    spec.setdefault("format", Format.PNG)
    _info, _plans, images = make(source, [OutputSpec(ops=Operations(watermark=mark), **spec)],
                                 limits)  # fmt: skip
    return images[0]


def test_watermark_position_and_opacity(white_square: Path) -> None:
    """A white 20x20 overlay at opacity 0.5, south-east with a 5 px margin, on black:
    about 128 grey in its place, black elsewhere."""
    mark = Watermark("logo", gravity="southeast", opacity=0.5, margin=5)
    image = _marked(_black(100), mark, white_square, width=100)
    inside = image(100 - 5 - 10, 100 - 5 - 10)
    assert all(abs(channel - 128) <= 3 for channel in inside[:3]), inside
    assert image(100 - 3, 100 - 3)[:3] == [0, 0, 0]  # the margin
    assert image(10, 10)[:3] == [0, 0, 0] and image(50, 50)[:3] == [0, 0, 0]


def test_watermark_scale_and_gravity(white_square: Path) -> None:
    """scale 0.5 makes the overlay half the output's width; north-west puts it there."""
    mark = Watermark("logo", gravity="northwest", scale=0.5)
    image = _marked(_black(100), mark, white_square, width=100)
    assert image(2, 2)[:3] == [255, 255, 255] and image(47, 47)[:3] == [255, 255, 255]
    assert image(53, 53)[:3] == [0, 0, 0] and image(98, 2)[:3] == [0, 0, 0]


def test_an_unknown_watermark_name_is_703_before_the_reply() -> None:
    body = {
        "source": "https://h/a.jpg",
        "outputs": [{"url": "s3://b/a.png", "width": 10, "watermark": {"name": "x"}}],
    }
    with pytest.raises(errors.JobFieldInvalid) as info:
        validate_jobs(body, max_outputs=4, watermarks=frozenset({"logo"}))
    assert info.value.detail.startswith("outputs[0].watermark.name: 'x' is not a watermark")


# --- combined with each fit, and with many outputs from one decode --------------------


@pytest.mark.parametrize("fit", FITS)
def test_operations_with_each_fit(card: bytes, fit: str) -> None:
    """crop (green quadrant) + rotate 90 + pad 4 with each fit into 60x60: the result is
    the fit's size plus the pad, green inside, white in the pad (JPEG)."""
    ops = Operations(crop=Crop(200, 0, 200, 100), rotate=90, pad=Pad(4, 4, 4, 4))
    _info, plans, images = make(card, [OutputSpec(Format.JPEG, width=60, height=60, fit=fit,
                                                  ops=ops, enlarge=True)])  # fmt: skip
    image, box = images[0], plans[0].box
    assert (image.width, image.height) == (box.width + 8, box.height + 8)
    expected_box = {"cover": (60, 60), "contain": (60, 60), "fill": (60, 60),
                    "inside": (30, 60), "outside": (60, 120)}[fit]  # fmt: skip
    assert (box.width, box.height) == expected_box
    assert close(image(4 + box.width // 2, 4 + box.height // 2), GREEN)
    assert close(image(1, 1), WHITE, 20)  # JPEG chroma bleeds a little


def test_many_outputs_with_different_operations_share_one_decode(card: bytes) -> None:
    """Three outputs (plain, a crop, a turned and blurred one) from one decode each get
    their own pixels."""
    specs = [
        OutputSpec(Format.PNG, width=200),
        OutputSpec(Format.PNG, width=40, ops=Operations(crop=Crop(0, 100, 200, 100))),
        OutputSpec(Format.PNG, width=50, ops=Operations(rotate=180, blur=0.5)),
    ]
    _info, _plans, (plain, crop, turned) = make(card, specs)
    assert quads(plain, RED, GREEN, BLUE, YELLOW)
    assert (crop.width, crop.height) == (40, 20) and all(close(p, BLUE) for p in corners(crop))
    assert quads(turned, YELLOW, BLUE, GREEN, RED)


def test_an_animation_with_an_operation_keeps_its_first_frame() -> None:
    """Frames are only cropped: an animated GIF flipped gives its first frame, still."""
    gif = bytes(animation(40, 30, [RED, GREEN, BLUE]).gifsave_buffer())
    _info, plans, images = make(gif, [OutputSpec(Format.GIF, width=20, ops=Operations(flip=True))])
    assert not plans[0].animated
    assert images[0].get_n_pages() == 1 and close(images[0](10, 7), RED, 40)


def test_an_svg_turns_by_right_angles_and_refuses_a_crop() -> None:
    """A 200x100 drawing turned 90 is 50x100 at width 50; a crop or a 45 degree turn of
    a drawing is 703 naming the field."""
    svg = (b'<svg xmlns="http://www.w3.org/2000/svg" width="200" height="100">'
           b'<rect width="100" height="100" fill="red"/>'
           b'<rect x="100" width="100" height="100" fill="blue"/></svg>')  # fmt: skip
    image = one(svg, width=50, ops=Operations(rotate=90))
    assert (image.width, image.height) == (50, 100)
    assert close(image(25, 25), RED) and close(image(25, 75), BLUE)
    for extra, field in (({"crop": {"left": 0, "top": 0, "width": 5, "height": 5}}, "crop"),
                         ({"rotate": 45, "background": "#fff"}, "rotate")):  # fmt: skip
        body = {"source": "https://h/a.svg",
                "outputs": [{"url": "s3://b/a.png", "width": 10, **extra}]}  # fmt: skip
        with pytest.raises(errors.JobFieldInvalid) as info:
            planning.plan(validate_jobs(body, max_outputs=4), svg, ImagingLimits())
        assert info.value.detail.startswith(f"outputs[0].{field}:"), info.value.detail


def test_a_decoded_render_round_trips_its_plan(card: bytes) -> None:
    """A plan with operations stored (to_dict) and read back renders the same sizes."""
    body = {"source": "https://h/card.png",
            "outputs": [{"url": "s3://b/a.png", "width": 60, "rotate": 90, "flop": True,
                         "enlarge": True,
                         "crop": {"left": 10, "top": 10, "width": 100, "height": 50},
                         "pad": {"left": 3}, "blur": 1, "grayscale": True}]}  # fmt: skip
    job = planning.plan(validate_jobs(body, max_outputs=4), card, ImagingLimits())
    again = planning.JobPlan.from_dict(job.to_dict())
    assert again == job
    (result,) = planning.render(again, card, ImagingLimits(), planned=True)
    image = decode(result)
    assert (image.width, image.height) == (63, 120)


# --- review of #16 --------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_photo() -> dict[str, bytes]:
    """An 800x600 quadrant card as JPEG and PNG: large enough that a one-output job's
    shrink-on-load decode is read as a stream (a 400x200 card is not)."""
    card = quadrants(800, 600)
    return {"jpeg": bytes(card.jpegsave_buffer(Q=95)), "png": bytes(card.pngsave_buffer())}


@pytest.mark.parametrize("kind", ["jpeg", "png"])
@pytest.mark.parametrize(
    ("ops", "gravity", "expect"),
    [
        (Operations(flip=True), "centre", (BLUE, YELLOW, RED, GREEN)),
        (Operations(rotate=90), "centre", (BLUE, RED, YELLOW, GREEN)),
        (Operations(rotate=180), "centre", (YELLOW, BLUE, GREEN, RED)),
        (Operations(crop=Crop(0, 0, 800, 600)), "smart", (RED, GREEN, BLUE, YELLOW)),
    ],
    ids=["flip", "rotate90", "rotate180", "smart+crop"],
)
def test_a_one_output_job_cuts_and_turns_a_large_source(
    big_photo: dict[str, bytes],
    kind: str,
    ops: Operations,
    gravity: str,
    expect: tuple[Any, ...],
) -> None:
    """One output of an 800x600 JPEG or PNG, enlarged to 1000 wide, flipped, turned or
    smart-cropped after a crop: rendered (it read the streamed decode out of order: 202)."""
    size = (1000, 750) if ops.rotate in (0, 180) else (1000, 1333)
    spec = OutputSpec(Format.PNG, width=1000, enlarge=True, gravity=gravity, ops=ops)
    if gravity == "smart":
        spec = OutputSpec(Format.PNG, width=1000, height=750, gravity="smart", ops=ops,
                          enlarge=True)  # fmt: skip
    _info, _plans, (image,) = make(big_photo[kind], [spec])
    assert (image.width, image.height) == size
    assert quads(image, *expect), corners(image)


def test_an_enlarged_crop_is_cut_at_the_source_size_then_enlarged() -> None:
    """A 100x100 crop of a 4000x3000 source at width 400 is accepted: it is cut from
    the source at its own size (never decoded at 16000x12000) and enlarged."""
    source = quadrants(4000, 3000).jpegsave_buffer(Q=80)
    crop = {"left": 2100, "top": 100, "width": 100, "height": 100}  # in the green quadrant
    body = {
        "source": "https://h/big.jpg",
        "outputs": [{"url": "s3://b/a.png", "width": 400, "enlarge": True, "crop": crop}],
    }
    job = planning.plan(validate_jobs(body, max_outputs=4), bytes(source), ImagingLimits())
    out = job.outputs[0].plan
    assert out.frame is not None and out.frame.pixels <= 4000 * 3000
    (result,) = planning.render(job, bytes(source), ImagingLimits(), planned=True)
    image = decode(result)
    assert (image.width, image.height) == (400, 400)
    assert all(close(p, GREEN) for p in corners(image))


def test_a_watermark_margin_that_leaves_no_room_is_703() -> None:
    body = {"source": "https://h/a.png",
            "outputs": [{"url": "s3://b/a.png", "width": 100,
                         "watermark": {"name": "logo", "margin": 25}}]}  # fmt: skip
    spec = validate_jobs(body, max_outputs=4, watermarks=frozenset({"logo"}))
    card = bytes(quadrants(400, 200).pngsave_buffer())  # 100x50 at width 100
    with pytest.raises(errors.JobFieldInvalid) as info:
        planning.plan(spec, card, ImagingLimits(watermarks=("logo=/dev/null",)))
    assert info.value.detail.startswith("outputs[0].watermark.margin: 25 px on each side")

"""plan + render on real and synthetic images: sizes, formats, pixels, limits, hostile input.

Assertions compare decoded size, format and pixels within a tolerance, never bytes.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
import pyvips

from imgserve import errors, planning
from imgserve.config import ImagingLimits
from imgserve.imaging import formats, geometry, pipeline, vips
from imgserve.imaging.formats import Format
from imgserve.imaging.geometry import Size

from .conftest import (
    BLUE,
    CORPUS_SVGS,
    GREEN,
    RED,
    WALLPAPER_PNG,
    YELLOW,
    Run,
    animation,
    corpus,
    job_for,
    quadrants,
)

LOADERS = {
    Format.JPEG: "jpegload_buffer",
    Format.PNG: "pngload_buffer",
    Format.WEBP: "webpload_buffer",
    Format.AVIF: "heifload_buffer",
    Format.GIF: "gifload_buffer",
    Format.TIFF: "tiffload_buffer",
}


def decode(data: bytes, *, all_frames: bool = False) -> pyvips.Image:
    return pyvips.Image.new_from_buffer(data, "n=-1" if all_frames else "")


def close(pixel: list[float], colour: tuple[int, ...], tolerance: float = 24) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, colour, strict=False))


def mean_difference(a: pyvips.Image, b: pyvips.Image) -> float:
    """Mean absolute difference per band of two images of the same size."""
    assert (a.width, a.height) == (b.width, b.height)
    return float((a[0:3].cast("float") - b[0:3].cast("float")).abs().avg())


def reference(photo: pyvips.Image, size: Size) -> pyvips.Image:
    """The corpus photo scaled to ``size`` (the same aspect ratio) as a pixel reference."""
    return photo.resize(size.width / photo.width, vscale=size.height / photo.height)


def svg(body: str, width: int = 40, height: int = 40) -> bytes:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
        f'width="{width}" height="{height}">{body}</svg>'
    ).encode()


# --- real photos, every output format ---------------------------------------------------


@pytest.mark.parametrize("extension", ["jpg", "jpeg", "png", "webp", "avif", "gif", "tif", "tiff"])
def test_corpus_photo_to_every_output_format(
    run: Run, photo_jpeg: bytes, photo: pyvips.Image, extension: str
) -> None:
    """A corpus JPEG decodes, in every output format, to the planned size and close pixels."""
    plan, out = run(
        photo_jpeg, "http://h/autumn.jpg", f"file:///o/{{$width}}.{extension}", width=160
    )
    image = decode(out)
    assert plan.result == Size(160, 100)
    assert plan.dst_url == f"file:///o/160.{extension}"
    assert (image.width, image.height) == (160, 100)
    assert image.get("vips-loader") == LOADERS[plan.output]
    assert mean_difference(image, reference(photo, plan.result)) < (
        12 if extension != "gif" else 20
    )


@pytest.mark.parametrize(
    ("source_ext", "save"),
    [
        ("png", {"format": ".png"}),
        ("webp", {"format": ".webp", "Q": 90}),
        ("tif", {"format": ".tif"}),
        ("gif", {"format": ".gif"}),
        ("avif", {"format": ".avif", "Q": 80, "effort": 0}),
    ],
)
def test_photo_sources_of_several_formats(
    run: Run, photo: pyvips.Image, source_ext: str, save: dict[str, object]
) -> None:
    """Sources in PNG, WebP, TIFF, GIF and AVIF resize to the planned size keeping the picture."""
    options = dict(save)
    data = photo.write_to_buffer(str(options.pop("format")), **options)
    plan, out = run(data, f"http://h/p.{source_ext}", "file:///o/{$basename}.{$ext}", width=120)
    image = decode(out)
    assert plan.dst_url == f"file:///o/p.{source_ext}"
    assert plan.output is plan.source_format  # the source's extension keeps the format
    assert (image.width, image.height) == (plan.result.width, plan.result.height) == (120, 75)
    assert mean_difference(image, reference(photo, plan.result)) < 20


def test_corpus_png_height_only(run: Run) -> None:
    """A tall corpus PNG resized by height keeps its aspect ratio."""
    plan, out = run(corpus(WALLPAPER_PNG), "http://h/altai.png", "file:///o.webp", height=192)
    image = decode(out)
    assert plan.source == Size(1080, 1920)
    assert (image.width, image.height) == (108, 192)
    assert image.deviate() > 5  # a picture, not a flat fill


def test_quality_affects_size(run: Run, photo_jpeg: bytes) -> None:
    """A lower quality gives a smaller file of the same size in pixels."""
    _plan, low = run(photo_jpeg, "http://h/a.jpg", "file:///o.jpg", width=320, quality=10)
    _plan, high = run(photo_jpeg, "http://h/a.jpg", "file:///o.jpg", width=320, quality=95)
    assert len(low) * 2 < len(high)
    assert (decode(low).width, decode(high).width) == (320, 320)


# --- colour, alpha, metadata -----------------------------------------------------------


@pytest.mark.parametrize("keep", ["icc", "none"], ids=["with profile", "without profile"])
def test_cmyk_jpeg_becomes_srgb(run: Run, photo: pyvips.Image, keep: str) -> None:
    """A CMYK JPEG (with or without a profile) comes out as 3-band sRGB with its colours."""
    cmyk = photo.colourspace("cmyk")
    data = cmyk.jpegsave_buffer(keep=keep, Q=95)
    assert decode(data).interpretation == "cmyk"
    plan, out = run(data, "http://h/c.jpg", "file:///o.png", width=80)
    image = decode(out)
    assert image.interpretation == "srgb"
    assert image.bands == 3
    assert mean_difference(image, reference(photo, plan.result)) < 25


def _alpha_ramp() -> bytes:
    """Red, transparent on the left fading to opaque on the right."""
    ramp = (pyvips.Image.xyz(100, 40)[0] * 255 / 99).cast("uchar")
    red = (pyvips.Image.black(100, 40, bands=3) + list(RED)).cast("uchar")
    return red.bandjoin(ramp).copy(interpretation="srgb").pngsave_buffer()


def test_png_alpha_kept_in_png(run: Run) -> None:
    """PNG with alpha to PNG keeps the alpha channel and its values."""
    _plan, out = run(_alpha_ramp(), "http://h/a.png", "file:///o.png", width=50)
    image = decode(out)
    assert image.bands == 4
    assert image(1, 10)[3] < 20
    assert image(48, 10)[3] > 235
    assert close(image(48, 10)[:3], RED)


def test_png_alpha_flattened_onto_white_in_jpeg(run: Run) -> None:
    """PNG with alpha to JPEG is flattened onto white: transparent -> white, opaque -> red."""
    _plan, out = run(_alpha_ramp(), "http://h/a.png", "file:///o.jpg", width=50)
    image = decode(out)
    assert image.bands == 3
    assert close(image(1, 10), (255, 255, 255), 20)
    assert close(image(48, 10), RED, 20)
    assert close(image(25, 10), (255, 128, 128), 30)  # half transparent: pink, not dark


def test_metadata_stripped_by_default(run: Run, photo: pyvips.Image) -> None:
    """EXIF and XMP are removed unless args.keep_metadata is true."""
    tagged = photo.copy()
    tagged.set_type(pyvips.GValue.gstr_type, "exif-ifd0-Artist", "Jane Secret")
    data = tagged.jpegsave_buffer(keep="all")
    assert decode(data).get_typeof("exif-data")
    _plan, stripped = run(data, "http://h/a.jpg", "file:///o.jpg", width=40)
    _plan, kept = run(data, "http://h/a.jpg", "file:///o.jpg", width=40, keep_metadata=True)
    assert not decode(stripped).get_typeof("exif-data")
    assert decode(kept).get_typeof("exif-data")
    assert "Jane Secret" in decode(kept).get("exif-ifd0-Artist")


# --- EXIF orientation --------------------------------------------------------------------

# Colour seen in each corner (TL, TR, BL, BR) once the stored card is shown upright.
UPRIGHT = {
    1: (RED, GREEN, BLUE, YELLOW),
    2: (GREEN, RED, YELLOW, BLUE),
    3: (YELLOW, BLUE, GREEN, RED),
    4: (BLUE, YELLOW, RED, GREEN),
    5: (RED, BLUE, GREEN, YELLOW),
    6: (BLUE, RED, YELLOW, GREEN),
    7: (YELLOW, GREEN, BLUE, RED),
    8: (GREEN, YELLOW, RED, BLUE),
}


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_exif_orientation_applied(run: Run, orientation: int) -> None:
    """An EXIF-rotated JPEG is planned and rendered upright, with orientation reset."""
    card = quadrants(300, 200)
    card.set_type(pyvips.GValue.gint_type, "orientation", orientation)
    data = card.jpegsave_buffer(keep="all", Q=95)
    plan, out = run(data, "http://h/r.jpg", "file:///o.png", width=60, keep_metadata=True)
    image = decode(out)
    expected = Size(60, 90) if orientation >= 5 else Size(60, 40)
    assert plan.result == expected
    assert (image.width, image.height) == (expected.width, expected.height)
    w, h = image.width, image.height
    corners = [image(3, 3), image(w - 4, 3), image(3, h - 4), image(w - 4, h - 4)]
    for got, want in zip(corners, UPRIGHT[orientation], strict=True):
        assert close(got, want), (orientation, corners)
    orientation_out = image.get("orientation") if image.get_typeof("orientation") else 1
    assert orientation_out == 1


# --- gravity ----------------------------------------------------------------------------

# A 400x200 card cropped to 100x100: colours at the left and right edges (upper, lower half).
WIDE_GRAVITY = {
    "centre": (RED, GREEN, BLUE, YELLOW),
    "north": (RED, GREEN, BLUE, YELLOW),
    "south": (RED, GREEN, BLUE, YELLOW),
    "west": (RED, RED, BLUE, BLUE),
    "northwest": (RED, RED, BLUE, BLUE),
    "southwest": (RED, RED, BLUE, BLUE),
    "east": (GREEN, GREEN, YELLOW, YELLOW),
    "northeast": (GREEN, GREEN, YELLOW, YELLOW),
    "southeast": (GREEN, GREEN, YELLOW, YELLOW),
}
# A 200x400 card cropped to 100x100: colours at the top and bottom edges (left, right half).
TALL_GRAVITY = {
    "centre": (RED, GREEN, BLUE, YELLOW),
    "west": (RED, GREEN, BLUE, YELLOW),
    "east": (RED, GREEN, BLUE, YELLOW),
    "north": (RED, GREEN, RED, GREEN),
    "northwest": (RED, GREEN, RED, GREEN),
    "northeast": (RED, GREEN, RED, GREEN),
    "south": (BLUE, YELLOW, BLUE, YELLOW),
    "southwest": (BLUE, YELLOW, BLUE, YELLOW),
    "southeast": (BLUE, YELLOW, BLUE, YELLOW),
}


@pytest.mark.parametrize("gravity", sorted(WIDE_GRAVITY))
def test_gravity_keeps_expected_region_of_wide_image(run: Run, gravity: str) -> None:
    """Each gravity keeps its part of a wide image (colour-quadrant card)."""
    data = quadrants(400, 200).pngsave_buffer()
    _plan, out = run(
        data, "http://h/q.png", "file:///o.png", width=100, height=100, gravity=gravity
    )
    image = decode(out)
    got = [image(3, 25), image(96, 25), image(3, 75), image(96, 75)]
    for pixel, want in zip(got, WIDE_GRAVITY[gravity], strict=True):
        assert close(pixel, want), (gravity, got)


@pytest.mark.parametrize("gravity", sorted(TALL_GRAVITY))
def test_gravity_keeps_expected_region_of_tall_image(run: Run, gravity: str) -> None:
    """Each gravity keeps its part of a tall image (colour-quadrant card)."""
    data = quadrants(200, 400).pngsave_buffer()
    _plan, out = run(
        data, "http://h/q.png", "file:///o.png", width=100, height=100, gravity=gravity
    )
    image = decode(out)
    got = [image(25, 3), image(75, 3), image(25, 96), image(75, 96)]
    for pixel, want in zip(got, TALL_GRAVITY[gravity], strict=True):
        assert close(pixel, want), (gravity, got)


def _busy_right_edge() -> pyvips.Image:
    """A flat grey 400x100 image with a busy, colourful patch near its right edge."""
    grey = (pyvips.Image.black(400, 100, bands=3) + 128).cast("uchar")
    noise = pyvips.Image.gaussnoise(80, 80, sigma=90, mean=128)
    patch = noise.bandjoin([noise.rot90(), noise.rot180()]).cast("uchar")
    return grey.insert(patch, 310, 10).copy(interpretation="srgb")


def test_smart_crop_keeps_the_interesting_part(run: Run) -> None:
    """gravity smart (libvips attention) keeps the busy patch that centre would cut off."""
    data = _busy_right_edge().pngsave_buffer()
    _plan, smart = run(
        data, "http://h/b.png", "file:///o.png", width=100, height=100, gravity="smart"
    )
    _plan, centre = run(data, "http://h/b.png", "file:///o.png", width=100, height=100)
    assert (decode(smart).width, decode(smart).height) == (100, 100)
    assert decode(smart).deviate() > 30
    assert decode(centre).deviate() < 5


# --- animation --------------------------------------------------------------------------

FRAMES = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)]


@pytest.fixture
def animated_gif() -> bytes:
    return animation(60, 40, FRAMES).gifsave_buffer()


@pytest.mark.parametrize("extension", ["gif", "webp"])
@pytest.mark.parametrize("gravity", ["centre", "southeast", "smart"])
def test_animated_gif_keeps_frames(
    run: Run, animated_gif: bytes, extension: str, gravity: str
) -> None:
    """An animated GIF to GIF/WebP keeps every frame, each cropped to the planned size."""
    plan, out = run(
        animated_gif,
        "http://h/anim.gif",
        f"file:///o.{extension}",
        width=30,
        height=30,
        gravity=gravity,
    )
    image = decode(out, all_frames=True)
    assert plan.pages == 4 and plan.animated
    assert image.width == 30
    assert image.get("page-height") == 30
    assert image.height == 30 * len(FRAMES)
    for index, colour in enumerate(FRAMES):
        assert close(image(15, index * 30 + 15), colour, 30), index


def test_animated_gif_width_only(run: Run, animated_gif: bytes) -> None:
    """One dimension on an animation keeps the aspect ratio of each frame."""
    plan, out = run(animated_gif, "http://h/anim.gif", "file:///o.gif", width=30)
    image = decode(out, all_frames=True)
    assert plan.result == Size(30, 20)
    assert (image.width, image.get("page-height"), image.height) == (30, 20, 80)


def test_animated_gif_to_jpeg_is_first_frame(run: Run, animated_gif: bytes) -> None:
    """An animated GIF to JPEG gives the first frame only, at the planned size."""
    plan, out = run(animated_gif, "http://h/anim.gif", "file:///o.jpg", width=30, height=30)
    image = decode(out)
    assert not plan.animated
    assert (image.width, image.height) == (30, 30)
    assert close(image(15, 15), FRAMES[0], 30)


# --- broken, hostile and oversized sources -----------------------------------------------


@pytest.mark.parametrize("extension", ["jpg", "png", "gif", "webp", "tif"])
def test_truncated_source_is_202(
    run: Run, photo: pyvips.Image, limits: ImagingLimits, extension: str
) -> None:
    """A truncated image fails with 202 (at plan or at render), never a half-grey result."""
    full = photo.write_to_buffer(f".{extension}")
    truncated = full[: len(full) // 2]
    job = job_for("resize", f"http://h/t.{extension}", "file:///o.png", width=32)
    with pytest.raises(errors.SourceUnreadable) as info:
        # WebP and TIFF already fail on the header; JPEG, PNG and GIF at decode.
        planning.render(planning.plan(job, truncated, limits), truncated, limits)
    assert info.value.code == 202


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello, world" * 20,
        b"<html><body>not found</body></html>",
        b"\xff\xd8\xff" + b"\0" * 40,
    ],
    ids=["empty", "text", "html", "jpeg magic only"],
)
def test_non_image_bytes_are_202(limits: ImagingLimits, data: bytes) -> None:
    """Bytes that are not a decodable image are refused with 202 before processing."""
    with pytest.raises(errors.SourceUnreadable) as info:
        planning.plan(job_for("resize", "http://h/x.jpg", "file:///o.png", width=10), data, limits)
    assert info.value.code == 202


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A few hundred bytes of PNG declaring width x height (only the first rows present)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (width + 1) * 4, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", rows)
        + _png_chunk(b"IEND", b"")
    )


def test_decompression_bomb_refused_before_decoding(
    limits: ImagingLimits, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small PNG declaring 20000x20000 is 302 from its header, no pixel decoded."""
    bomb = _png_bomb()
    assert len(bomb) < 2000

    def no_decode(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the bomb reached the decoder")

    monkeypatch.setattr(vips, "thumbnail", no_decode)
    job = job_for("resize", "http://h/bomb.png", "file:///o.png", width=100)
    with pytest.raises(errors.SourcePixelsOverLimit) as info:
        planning.plan(job, bomb, limits)
    assert info.value.code == 302


def test_render_rechecks_a_source_that_changed(run: Run, limits: ImagingLimits) -> None:
    """render re-checks a source swapped after planning (a re-download): a bomb is 302."""
    small = quadrants(64, 64).pngsave_buffer()
    plan = planning.plan(
        job_for("resize", "http://h/a.png", "file:///o.png", width=32), small, limits
    )
    with pytest.raises(errors.SourcePixelsOverLimit):
        planning.render(plan, _png_bomb(), limits)
    with pytest.raises(errors.SourceChanged):
        planning.render(plan, quadrants(64, 64).jpegsave_buffer(), limits)


@pytest.mark.parametrize(
    ("planned_size", "new_size", "gravity"),
    [((64, 64), (64, 32), "centre"), ((64, 48), (48, 64), "smart"), ((80, 60), (81, 60), "north")],
)
def test_render_refuses_a_source_whose_size_changed_since_planning(
    limits: ImagingLimits,
    planned_size: tuple[int, int],
    new_size: tuple[int, int],
    gravity: str,
) -> None:
    """A source downloaded again with another size is 207, never rendered with the
    planned cover size and crop window (stale geometry)."""
    planned = quadrants(*planned_size).pngsave_buffer()
    job = job_for("resize", "http://h/a.png", "file:///o.png", width=32, height=16,
                  gravity=gravity)  # fmt: skip
    plan = planning.plan(job, planned, limits)
    with pytest.raises(errors.SourceChanged) as info:
        planning.render(plan, quadrants(*new_size).pngsave_buffer(), limits)
    assert info.value.code == 207
    assert f"{new_size[0]}x{new_size[1]}" in info.value.detail
    # The same size (other pixels) still renders to the promised result.
    again = quadrants(*planned_size).invert().pngsave_buffer()
    out = decode(planning.render(plan, again, limits)[0])
    assert (out.width, out.height) == (plan.result.width, plan.result.height)


def test_pixel_limit_counts_all_frames(animated_gif: bytes) -> None:
    """4 frames of 60x40 (9600 px) exceed a 9000 px limit though one frame (2400) would not."""
    job = job_for("resize", "http://h/anim.gif", "file:///o.gif", width=30)
    with pytest.raises(errors.SourcePixelsOverLimit) as info:
        planning.plan(job, animated_gif, ImagingLimits(max_pixels=9000))
    assert "4 frames" in info.value.detail
    assert planning.plan(job, animated_gif, ImagingLimits(max_pixels=9600)).pages == 4


def test_result_over_pixel_limit_is_303(limits: ImagingLimits) -> None:
    """An enlarged result past the result limit is 303 at plan time."""
    data = quadrants(100, 100).pngsave_buffer()
    job = job_for(
        "resize", "http://h/a.png", "file:///o.png", width=3000, height=3000, enlarge=True
    )
    with pytest.raises(errors.ResultOverLimit) as info:
        planning.plan(job, data, ImagingLimits(max_result_pixels=1_000_000))
    assert info.value.code == 303


def test_result_limit_counts_output_frames(animated_gif: bytes) -> None:
    """An animated result counts every frame; the same job to JPEG (one frame) passes."""
    tight = ImagingLimits(max_result_pixels=1000)
    to_gif = job_for("resize", "http://h/a.gif", "file:///o.gif", width=30, height=30)
    with pytest.raises(errors.ResultOverLimit):
        planning.plan(to_gif, animated_gif, tight)
    to_jpeg = job_for("resize", "http://h/a.gif", "file:///o.jpg", width=30, height=30)
    assert planning.plan(to_jpeg, animated_gif, tight).result == Size(30, 30)


def test_result_over_byte_limit_is_303(run: Run, photo_jpeg: bytes) -> None:
    """A result file past max_result_bytes is 303 at render time."""
    with pytest.raises(errors.ResultOverLimit):
        run(
            photo_jpeg,
            "http://h/a.jpg",
            "file:///o.png",
            limits_=ImagingLimits(max_result_bytes=1000),
            width=200,
        )


def test_enlarge_refused_without_flag(limits: ImagingLimits) -> None:
    """A source smaller than the box is 203 unless args.enlarge."""
    data = quadrants(50, 50).pngsave_buffer()
    with pytest.raises(errors.EnlargeNotAllowed):
        planning.plan(job_for("resize", "http://h/a.png", "file:///o.png", width=60), data, limits)


def test_enlarge_allowed_with_flag(run: Run) -> None:
    """With args.enlarge a small source is scaled up to the exact box."""
    _plan, out = run(
        quadrants(50, 50).pngsave_buffer(),
        "http://h/a.png",
        "file:///o.png",
        width=100,
        height=60,
        enlarge=True,
    )
    image = decode(out)
    assert (image.width, image.height) == (100, 60)
    assert close(image(5, 5), RED) and close(image(95, 55), YELLOW)


def test_svg_source_for_resize_is_108(limits: ImagingLimits) -> None:
    """An SVG served under a neutral URL is refused by resize with 108."""
    job = job_for("resize", "http://h/image?id=1", "file:///o.png", width=10)
    with pytest.raises(errors.SourceTypeNotAllowed) as info:
        planning.plan(job, svg('<rect width="40" height="40"/>'), limits)
    assert info.value.code == 108


def test_raster_source_for_rasterize_is_108(limits: ImagingLimits, photo_jpeg: bytes) -> None:
    """A JPEG served under a neutral URL is refused by rasterize with 108."""
    job = job_for("rasterize", "http://h/image?id=1", "file:///o.png", width=10)
    with pytest.raises(errors.SourceTypeNotAllowed) as info:
        planning.plan(job, photo_jpeg, limits)
    assert info.value.code == 108


# --- SVG ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CORPUS_SVGS, ids=lambda p: p.parent.name + "/" + p.name)
def test_corpus_svgs_rasterize_at_planned_size(run: Run, path: Path) -> None:
    """desktop-base SVGs rasterize to RGBA PNG at the planned size, with something drawn."""
    plan, out = run(
        corpus(path),
        "http://h/art.svg",
        "file:///o/{$basename}.png",
        operation="rasterize",
        width=160,
    )
    image = decode(out)
    assert plan.output is Format.PNG
    assert plan.result.width == 160
    assert (image.width, image.height) == (plan.result.width, plan.result.height)
    assert image.bands == 4
    assert image[3].max() > 0
    assert image.deviate() > 1


def test_rasterize_fits_inside_box_with_alpha(run: Run) -> None:
    """A 80x40 drawing in a 100x100 box renders at 100x50; transparent stays transparent."""
    drawing = svg('<circle cx="40" cy="20" r="10" fill="blue"/>', 80, 40)
    plan, out = run(
        drawing, "http://h/c.svg", "file:///o.png", operation="rasterize", width=100, height=100
    )
    image = decode(out)
    assert plan.result == Size(100, 50)
    assert (image.width, image.height) == (100, 50)
    assert image(2, 2)[3] == 0
    assert close(image(50, 25), (0, 0, 255, 255))


def test_rasterize_scale_and_default_png(run: Run) -> None:
    """rasterize at a scale; a {$ext} destination writes PNG (an SVG cannot be written)."""
    drawing = svg('<rect width="40" height="40" fill="red"/>', 40, 20)
    plan, out = run(
        drawing,
        "http://h/logo.svg",
        "file:///o/{$basename}.{$ext}",
        operation="rasterize",
        scale=2.5,
    )
    image = decode(out)
    assert plan.output is Format.PNG
    assert plan.dst_url == "file:///o/logo.png"
    assert (image.width, image.height) == (100, 50)
    assert image.get("vips-loader") == "pngload_buffer"


def test_rasterize_to_jpeg_flattens_onto_white(run: Run) -> None:
    """A transparent SVG background becomes white in JPEG."""
    drawing = svg('<rect x="20" width="20" height="40" fill="black"/>')
    _plan, out = run(drawing, "http://h/a.svg", "file:///o.jpg", operation="rasterize", width=40)
    image = decode(out)
    assert image.bands == 3
    assert close(image(5, 20), (255, 255, 255), 10)
    assert close(image(35, 20), (0, 0, 0), 10)


def test_rasterize_fractional_size_fills_the_result(run: Run) -> None:
    """A drawing of 98.42x477.086 px fills its render: no transparent rows from rounding."""
    drawing = (
        b'<svg xmlns="http://www.w3.org/2000/svg" width="98.42" height="477.086">'
        b'<rect width="100%" height="100%" fill="green"/></svg>'
    )
    plan, out = run(drawing, "http://h/bar.svg", "file:///o.png", operation="rasterize", width=79)
    image = decode(out)
    assert plan.result == Size(79, 383)
    assert (image.width, image.height) == (79, 383)
    alpha = image[3]
    assert alpha.crop(0, 0, 78, 382).min() > 240
    # The edges are anti-aliased, but covered: no empty rows or columns.
    assert alpha.crop(0, 382, 79, 1).min() > 200
    assert alpha.crop(78, 0, 1, 383).min() > 200


def test_svg_render_over_limit_is_304(limits: ImagingLimits) -> None:
    """An SVG that would render past the result pixel limit is 304 before rendering."""
    for args in ({"width": 100_000}, {"scale": 200.0}):
        job = job_for("rasterize", "http://h/logo.svg", "file:///o.png", **args)
        with pytest.raises(errors.SVGRenderOverLimit) as info:
            planning.plan(job, corpus(CORPUS_SVGS[0]), limits)
        assert info.value.code == 304


def test_svg_declaring_huge_size_is_304(limits: ImagingLimits) -> None:
    """An SVG declaring 1,000,000 px squares is refused when rendered at its own scale."""
    huge = svg('<rect width="10" height="10"/>', 1_000_000, 1_000_000)
    job = job_for("rasterize", "http://h/huge.svg", "file:///o.png", scale=1.0)
    with pytest.raises(errors.SVGRenderOverLimit):
        planning.plan(job, huge, limits)


HOSTILE_SVGS = {
    "file href": svg('<image href="file:///etc/passwd" width="40" height="40"/>'),
    "xlink file href": svg('<image xlink:href="file:///etc/hostname" width="40" height="40"/>'),
    "relative href": svg('<image href="secret.png" width="40" height="40"/>'),
    "billion laughs": (
        b'<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY a "lolololololol">'
        b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">'
        b'<!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;"><!ENTITY e "&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;">'
        b'<!ENTITY f "&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;"><!ENTITY g "&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;">'
        b'<!ENTITY h "&g;&g;&g;&g;&g;&g;&g;&g;&g;&g;">]>'
        b'<svg xmlns="http://www.w3.org/2000/svg" width="40" height="40"><text y="20">&h;</text>'
        b"</svg>"
    ),
    "external entity": (
        b'<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        b'<svg xmlns="http://www.w3.org/2000/svg" width="40" height="40"><text y="20">&x;</text>'
        b"</svg>"
    ),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_SVGS))
def test_hostile_svg_is_204(limits: ImagingLimits, name: str) -> None:
    """SVGs referencing files or declaring entities are refused with 204 at plan and render."""
    data = HOSTILE_SVGS[name]
    job = job_for("rasterize", "http://h/evil.svg", "file:///o.png", width=40)
    with pytest.raises(errors.SVGInvalid) as info:
        planning.plan(job, data, limits)
    assert info.value.code == 204
    benign = svg('<rect width="40" height="40" fill="red"/>')
    plan = planning.plan(job, benign, limits)
    with pytest.raises(errors.SVGInvalid):
        planning.render(plan, data, limits)


def test_svg_loaded_from_bytes_reads_no_file(tmp_path: Path) -> None:
    """Even past the 204 check, libvips given bytes does not draw a referenced local image."""
    red = tmp_path / "red.png"
    red.write_bytes(
        (pyvips.Image.black(40, 40, bands=3) + list(RED)).cast("uchar").pngsave_buffer()
    )
    for href in (red.as_uri(), str(red), "red.png"):
        data = svg(f'<image href="{href}" width="40" height="40"/>')
        try:
            image = vips.load_svg(data, 1.0).copy_memory()
        except errors.SVGInvalid:
            continue  # refused outright is fine too
        assert image[3].max() == 0, href


# --- placeholder and failure images -----------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(LOADERS, key=str))
@pytest.mark.parametrize("kind", ["placeholder", "failure_image"])
def test_stand_in_images_have_planned_size_and_text(fmt: Format, kind: str) -> None:
    """Placeholder and failure images are at the result's size and format, and not blank."""
    draw = pipeline.placeholder if kind == "placeholder" else pipeline.failure_image
    image = decode(draw(Size(320, 120), fmt))
    assert (image.width, image.height) == (320, 120)
    assert image.get("vips-loader") == LOADERS[fmt]
    background = image(2, 2)
    rgb = image[0:3].cast("float")
    differs = ((rgb - background[:3]).abs() > 40).bandor()
    assert differs.avg() / 255 > 0.005  # some text was drawn


@pytest.mark.parametrize("size", [Size(320, 120), Size(1000, 40), Size(41, 300), Size(8, 8)])
def test_stand_in_text_stays_inside_a_plain_border(size: Size) -> None:
    """The canvas is the label extended by copying its border: every edge row and
    column is the plain canvas colour, so no text is smeared to the edges."""
    image = decode(pipeline.placeholder(size, Format.PNG))
    assert (image.width, image.height) == (size.width, size.height)
    edges = [
        image.crop(0, 0, size.width, 1),
        image.crop(0, size.height - 1, size.width, 1),
        image.crop(0, 0, 1, size.height),
        image.crop(size.width - 1, 0, 1, size.height),
    ]
    for edge in edges:
        assert edge.min() == edge.max() == 238


@pytest.mark.parametrize(
    ("fit", "height"),
    [(0.5, 0), (1, 1), (6, 5), (6.73, 6), (7, 6), (8, 8), (9.9, 9), (100, 90), (128, 128)],
)
def test_label_heights_come_from_a_fixed_ladder(fit: float, height: int) -> None:
    """Labels take the tallest ladder step (2^(k/4)) that fits, so sizes repeat."""
    assert vips.label_height(fit) == height


def test_placeholder_and_failure_look_different() -> None:
    """The failure image is distinguishable from the placeholder it replaces."""
    size = Size(320, 120)
    a = decode(pipeline.placeholder(size, Format.PNG))
    b = decode(pipeline.failure_image(size, Format.PNG))
    assert mean_difference(a, b) > 3


# --- plan bookkeeping and libvips hardening -------------------------------------------


def test_plan_round_trips_through_a_dict(limits: ImagingLimits, animated_gif: bytes) -> None:
    """Plan.to_dict / from_dict (the queue's storage) lose nothing."""
    job = job_for("resize", "http://h/a.gif", "file:///o/{$width}.webp", width=30, gravity="smart")
    plan = planning.plan(job, animated_gif, limits)
    assert planning.JobPlan.from_dict(plan.to_dict()) == plan
    assert plan.content_type == "image/webp"


def test_result_size_known_before_processing(limits: ImagingLimits, photo_jpeg: bytes) -> None:
    """plan gives the result size and final URL from the header alone."""
    job = job_for(
        "resize",
        "http://h/dir/autumn.jpg",
        "s3://b/{$width}x{$height}/{$basename}.webp",
        height=100,
    )
    plan = planning.plan(job, photo_jpeg, limits)
    assert plan.result == geometry.resize_result(plan.source, None, 100, False) == Size(160, 100)
    assert plan.dst_url == "s3://b/160x100/autumn.webp"


def _matrix_source() -> pyvips.Source:
    return pyvips.Source.new_from_memory(b"2 2\n1 2\n3 4\n")


def test_loader_outside_allowlist_is_blocked(tmp_path: Path) -> None:
    """After importing imgserve.imaging.vips, libvips refuses matrix, CSV and .v loaders."""
    assert vips.ALLOWED_LOADERS  # the module is imported and hardened
    # This libvips build has no buffer loader outside the allowlist, so the
    # same bytes go in through an in-memory Source (matrixload_source exists).
    with pytest.raises(pyvips.Error):
        pyvips.Image.new_from_source(_matrix_source(), "")
    with pytest.raises(pyvips.Error):
        pyvips.Image.matrixload_source(_matrix_source())
    with pytest.raises(pyvips.Error):
        pyvips.Image.new_from_buffer(b"2 2\n1 2\n3 4\n", "")
    matrix = tmp_path / "m.mat"
    matrix.write_bytes(b"2 2\n1 2\n3 4\n")
    with pytest.raises(pyvips.Error):
        pyvips.Image.new_from_file(str(matrix))
    csv = tmp_path / "m.csv"
    csv.write_bytes(b"1,2\n3,4\n")
    with pytest.raises(pyvips.Error):
        pyvips.Image.csvload(str(csv))
    assert pyvips.cache_get_max() == 0


def test_allowlisted_loaders_still_work(photo: pyvips.Image) -> None:
    """The allowlist leaves JPEG, PNG, WebP, GIF, TIFF, AVIF and SVG loading from bytes."""
    for suffix in (".jpg", ".png", ".webp", ".gif", ".tif", ".avif"):
        assert decode(photo.write_to_buffer(suffix)).width == photo.width
    assert decode(svg('<rect width="4" height="4"/>')).width == 40


# --- SVG size: declared on the root, or measured by librsvg ---------------------------


def test_declared_svg_sizes_agree_with_librsvg() -> None:
    """For every desktop-base SVG that declares its size in pixels, the declared size is
    what librsvg measures (the fast path in plan changes no result)."""
    checked = 0
    for path in sorted(Path("/usr/share/desktop-base").rglob("*.svg")):
        data = path.read_bytes()
        if formats.svg_problem(data):
            continue
        try:
            declared = formats.svg_declared_size(data)
        except formats.SVGMalformed:
            continue
        if declared is None:
            continue
        measured = vips.svg_size(data)
        assert declared == pytest.approx(measured, abs=0.002), path
        checked += 1
    assert checked >= 20


@pytest.mark.parametrize(
    ("root", "size"),
    [
        ('width="800" height="450"', (800.0, 450.0)),
        ('width="800px" height=" 450.5px "', (800.0, 450.5)),
        ('width="1e3" height="2.5E2"', (1000.0, 250.0)),
        ('width="100%" height="450"', None),
        ('width="10cm" height="5cm"', None),
        ('width="2em" height="1em"', None),
        ('viewBox="0 0 80 45"', None),
        ('width="0" height="450"', None),
    ],
)
def test_svg_declared_size(root: str, size: tuple[float, float] | None) -> None:
    data = f'<svg xmlns="http://www.w3.org/2000/svg" {root}><rect/></svg>'.encode()
    assert formats.svg_declared_size(data) == size


@pytest.mark.parametrize(
    ("data", "size"),
    [
        (b'<svg width="40" height="30"><rect/></svg>', (40.0, 30.0)),
        (
            b'<s:svg xmlns:s="http://www.w3.org/2000/svg" width="40" height="30"><s:rect/></s:svg>',
            (40.0, 30.0),
        ),
        (b'<svg xmlns="http://example.com/x" width="40" height="30"><rect/></svg>', None),
        (b'<html width="40" height="30"><svg/></html>', None),
    ],
    ids=["no namespace", "prefixed", "other namespace", "other root"],
)
def test_svg_declared_size_only_for_an_svg_root(
    data: bytes, size: tuple[float, float] | None
) -> None:
    """Only a root librsvg accepts as SVG gives the fast path; others go to librsvg."""
    assert formats.svg_declared_size(data) == size


def test_svg_measured_by_librsvg_when_not_declared(limits: ImagingLimits) -> None:
    """An SVG sized by its viewBox alone is planned at librsvg's size."""
    data = b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 80 45"><rect/></svg>'
    job = job_for("rasterize", "http://h/v.svg", "file:///o.png", scale=1.0)
    assert planning.plan(job, data, limits).result == Size(80, 45)


@pytest.mark.parametrize(
    "data",
    [
        b'<svg xmlns="http://www.w3.org/2000/svg" width="40" height="40"><rect></svg>',
        b'<svg xmlns="http://www.w3.org/2000/svg" width="40" height="40"><rect/>',
    ],
    ids=["mismatched tag", "truncated"],
)
def test_malformed_svg_is_204_before_reply(limits: ImagingLimits, data: bytes) -> None:
    job = job_for("rasterize", "http://h/bad.svg", "file:///o.png", width=40)
    with pytest.raises(errors.SVGInvalid) as info:
        planning.plan(job, data, limits)
    assert info.value.code == 204

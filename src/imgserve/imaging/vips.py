"""The only module that imports pyvips.

Importing it hardens libvips for untrusted input once per process: loaders
flagged untrusted are blocked, then every loader outside the allowlist, and
libvips' operation cache is turned off (it would keep decoded sources of other
users' jobs alive). Images are decoded from bytes only: a file name would let
libvips parse options out of it, and an SVG loaded by path may read files next
to it. pyvips errors become imgserve errors here.
"""

from __future__ import annotations

import ctypes
import functools
import math
from dataclasses import dataclass
from typing import Any

import pyvips

from imgserve import errors
from imgserve.imaging.formats import Format

# libvips loader classes allowed to run; everything else is blocked.
ALLOWED_LOADERS = (
    "VipsForeignLoadJpeg",
    "VipsForeignLoadUhdr",
    "VipsForeignLoadPng",
    "VipsForeignLoadWebp",
    "VipsForeignLoadNsgif",
    "VipsForeignLoadTiff",
    "VipsForeignLoadHeif",
    "VipsForeignLoadSvg",
)
# Loader option string: fail on any decode error, never return a half-grey image.
_FAIL = "fail_on=warning"
# Largest side asked of svgload when measuring an SVG (libvips' coordinate limit is 1e8).
_MAX_SVG_HEADER = 10_000_000


def _harden() -> None:
    pyvips.cache_set_max(0)
    pyvips.block_untrusted_set(True)
    pyvips.operation_block_set("VipsForeignLoad", True)
    for name in ALLOWED_LOADERS:
        pyvips.operation_block_set(name, False)


_harden()

Image = pyvips.Image


@functools.cache
def _tracked() -> tuple[Any, Any] | None:
    """libvips' own memory accounting (vips_tracked_get_mem, _highwater), which pyvips
    does not bind: looked up in the libvips this process loaded (None when it cannot
    be found, as off Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            path = next(line.split()[-1] for line in maps if "/libvips" in line)
        lib = ctypes.CDLL(path)
        now, peak = lib.vips_tracked_get_mem, lib.vips_tracked_get_mem_highwater
    except (OSError, StopIteration, AttributeError, IndexError):
        return None
    now.restype = peak.restype = ctypes.c_size_t
    return now, peak


def tracked_memory_bytes() -> tuple[int, int] | None:
    """(now, highest since the process started) of the memory libvips allocated for
    pixels in this process; None when libvips' accounting cannot be read."""
    tracked = _tracked()
    if tracked is None:
        return None
    now, peak = tracked
    return int(now()), int(peak())


@dataclass(frozen=True)
class Header:
    width: int
    height: int
    """Height of one frame."""
    pages: int
    orientation: int
    has_alpha: bool = False


def set_threads(threads: int) -> None:
    """libvips worker threads per operation in this process (the API process uses 1:
    its images are small, and the CPU belongs to the worker processes)."""
    pyvips.concurrency_set(threads)


def version() -> str:
    return f"{pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)}"


def _unreadable(fmt: Format, exc: Exception) -> errors.ImgserveError:
    text = str(exc).strip().splitlines()
    reason = text[-1] if text else "decode failed"
    if fmt is Format.SVG:
        return errors.SVGInvalid(f"SVG could not be rendered: {reason}")
    return errors.SourceUnreadable(f"{fmt.value} could not be decoded: {reason}")


def read_header(data: bytes, fmt: Format) -> Header:
    """Width, height, frame count and EXIF orientation, without decoding pixels."""
    try:
        image = pyvips.Image.new_from_buffer(data, "", access="sequential")
        pages = image.get("n-pages") if image.get_typeof("n-pages") else 1
        orientation = image.get("orientation") if image.get_typeof("orientation") else 1
        height = image.height
        if pages > 1 and image.get_typeof("page-height"):
            height = image.get("page-height")
        return Header(image.width, height, int(pages), int(orientation), bool(image.hasalpha()))
    except pyvips.Error as exc:
        raise _unreadable(fmt, exc) from exc


def svg_size(data: bytes) -> tuple[float, float]:
    """An SVG's intrinsic size in CSS pixels, to three decimals.

    libvips reports whole pixels; scaling from a rounded size would crop a
    drawing or leave transparent rows. The header at a large scale is only
    arithmetic (nothing is rendered), so it gives the fractional part.
    """
    try:
        try:
            # One parse in the common case: most drawings fit VIPS_MAX_COORD at x1000.
            scaled = pyvips.Image.svgload_buffer(data, scale=1000.0)
            # A size past libvips' range comes back as 1: measure such drawings below.
            if min(scaled.width, scaled.height) > 1:
                return scaled.width / 1000.0, scaled.height / 1000.0
        except pyvips.Error:
            pass  # too large to scale by 1000: measure first, as below
        image = pyvips.Image.svgload_buffer(data)
        longest = max(image.width, image.height)
        factor = min(1000.0, _MAX_SVG_HEADER / longest)
        if factor <= 1:
            return float(image.width), float(image.height)
        scaled = pyvips.Image.svgload_buffer(data, scale=factor)
        return scaled.width / factor, scaled.height / factor
    except pyvips.Error as exc:
        raise _unreadable(Format.SVG, exc) from exc


def attention_centre(image: pyvips.Image, width: int, height: int) -> tuple[int, int]:
    """Where libvips' attention strategy centres a ``width`` x ``height`` crop."""
    _cropped, found = image.smartcrop(
        min(width, image.width),
        min(height, image.height),
        interesting="attention",
        attention_x=True,
        attention_y=True,
    )
    return int(found["attention_x"]), int(found["attention_y"])


def thumbnail(
    data: bytes,
    fmt: Format,
    width: int,
    height: int,
    *,
    crop: str | None = None,
    all_pages: bool = False,
) -> pyvips.Image:
    """Shrink-on-load thumbnail: upright (EXIF applied), sRGB, fit in or crop to the box."""
    options = _FAIL + (",n=-1" if all_pages else "")
    kwargs: dict[str, Any] = {"height": height, "size": "both", "option_string": options}
    if crop:
        kwargs["crop"] = crop
    try:
        return pyvips.Image.thumbnail_buffer(data, width, **kwargs)
    except pyvips.Error as exc:
        raise _unreadable(fmt, exc) from exc


def load_svg(data: bytes, scale: float) -> pyvips.Image:
    try:
        return pyvips.Image.svgload_buffer(data, scale=scale, fail_on="warning")
    except pyvips.Error as exc:
        raise _unreadable(Format.SVG, exc) from exc


def materialize(image: pyvips.Image, fmt: Format) -> pyvips.Image:
    """Force the decode now, so a corrupt source fails as 202 rather than at save."""
    try:
        return image.copy_memory()
    except pyvips.Error as exc:
        raise _unreadable(fmt, exc) from exc


def fit_exact(image: pyvips.Image, width: int, height: int, direction: str) -> pyvips.Image:
    """Crop (or pad by copying edges) to exactly width x height, keeping ``direction``."""
    if image.width == width and image.height == height:
        return image
    return image.gravity(direction, width, height, extend="copy")


def resize_to(image: pyvips.Image, width: int, height: int) -> pyvips.Image:
    """``image`` (in memory, upright, sRGB) scaled to exactly width x height, alpha
    premultiplied as thumbnail does, so transparent pixels do not bleed their colour."""
    try:
        if image.hasalpha():
            unpremultiplied = image.format
            scaled = image.premultiply().resize(width / image.width, vscale=height / image.height)
            out = scaled.unpremultiply().cast(unpremultiplied)
        else:
            out = image.resize(width / image.width, vscale=height / image.height)
        # resize rounds each side on its own; never leave a side one pixel off.
        return fit_exact(out, width, height, "centre")
    except pyvips.Error as exc:
        raise errors.InternalError(f"resizing failed: {exc}") from exc


def attention_crop(image: pyvips.Image, width: int, height: int) -> pyvips.Image:
    """The ``width`` x ``height`` window of ``image`` libvips' attention strategy picks."""
    return image.smartcrop(
        min(width, image.width), min(height, image.height), interesting="attention"
    )


def pad(
    image: pyvips.Image,
    left: int,
    top: int,
    width: int,
    height: int,
    rgba: tuple[int, int, int, int],
    *,
    alpha: bool,
) -> pyvips.Image:
    """``image`` placed at (left, top) on a width x height canvas of ``rgba`` (0-255).

    ``alpha``: the output holds alpha, so the canvas keeps ``rgba``'s; otherwise the
    canvas is opaque (any alpha of the image is flattened later)."""
    image, colour = _on_background(image, rgba, alpha=alpha)
    return image.embed(left, top, width, height, extend="background", background=colour)


def _on_background(
    image: pyvips.Image, rgba: tuple[int, int, int, int], *, alpha: bool
) -> tuple[pyvips.Image, list[float]]:
    """``image`` ready to be drawn on ``rgba`` (sRGB; an alpha band added when the
    output holds alpha and the colour is see-through), and the colour in its bands
    and range: what padding and turning fill new pixels with."""
    if image.bands < 3:
        image = image.colourspace("srgb")  # a grey image on a coloured canvas
    peak = 65535 if image.format == "ushort" else 255
    colour = [channel * peak / 255 for channel in rgba[:3]]
    if alpha and rgba[3] < 255 and not image.hasalpha():
        image = image.bandjoin(peak)
    if image.hasalpha():
        colour.append((rgba[3] if alpha else 255) * peak / 255)
    return image, colour


def first_frame(image: pyvips.Image) -> pyvips.Image:
    """The top frame of an animation strip."""
    return image.crop(0, 0, image.width, image.get("page-height"))


def crop_frames(image: pyvips.Image, left: int, top: int, width: int, height: int) -> pyvips.Image:
    """Crop every frame of an animation (a strip of frames ``page-height`` tall)."""
    page_height = image.get("page-height")
    pages = image.height // page_height
    frames = [image.crop(left, i * page_height + top, width, height) for i in range(pages)]
    out = pyvips.Image.arrayjoin(frames, across=1).copy()
    out.set_type(pyvips.GValue.gint_type, "page-height", height)
    return out


def to_srgb(image: pyvips.Image) -> pyvips.Image:
    if image.interpretation not in ("srgb", "b-w"):
        image = image.colourspace("srgb")
    return image


def flatten(image: pyvips.Image, rgb: tuple[int, int, int] = (255, 255, 255)) -> pyvips.Image:
    """Drop alpha onto a background (white unless given; 0-255) for formats that
    cannot hold it."""
    if image.hasalpha():
        peak = 65535 if image.format == "ushort" else 255
        colour = [channel * peak / 255 for channel in rgb]
        if image.bands - 1 < 3:
            colour = colour[:1] if len(set(rgb)) == 1 else colour
            if len(colour) == 3:
                image = image.colourspace("srgb")
        return image.flatten(background=colour)
    return image


def save(
    image: pyvips.Image,
    fmt: Format,
    quality: int | None,
    keep_metadata: bool,
    *,
    fast: bool = False,
) -> bytes:
    """Encode ``image``; ``fast`` trades size for speed (placeholders live seconds)."""
    keep = "all" if keep_metadata else "none"
    q: dict[str, Any] = {"Q": quality} if quality is not None else {}
    try:
        if fmt is Format.JPEG:
            out = image.jpegsave_buffer(keep=keep, optimize_coding=not fast, **q)
        elif fmt is Format.PNG:
            out = image.pngsave_buffer(keep=keep, compression=1 if fast else 6)
        elif fmt is Format.WEBP:
            out = image.webpsave_buffer(keep=keep, effort=0 if fast else 4, **q)
        elif fmt is Format.AVIF:
            out = image.heifsave_buffer(keep=keep, compression="av1", effort=0 if fast else 2, **q)
        elif fmt is Format.HEIF:
            out = image.heifsave_buffer(keep=keep, compression="hevc", **q)
        elif fmt is Format.GIF:
            out = image.gifsave_buffer(keep=keep, effort=1 if fast else 7)
        elif fmt is Format.TIFF:
            out = image.tiffsave_buffer(keep=keep, compression="deflate")
        else:
            raise errors.DstExtensionUnsupported(f"cannot write {fmt.value}")
    except pyvips.Error as exc:
        raise errors.InternalError(f"encoding {fmt.value} failed: {exc}") from exc
    return bytes(out)


@functools.lru_cache(maxsize=4)
def _text_mask(text: str) -> pyvips.Image | None:
    """``text`` rendered once, large; labels are shrunk from it."""
    try:
        return pyvips.Image.text(
            text, width=1200, dpi=300, align="centre", font="sans"
        ).copy_memory()
    except pyvips.Error:
        return None  # no fonts on this machine: the plain canvas still says "not ready"


@functools.lru_cache(maxsize=512)
def _label(text: str, height: int, failed: bool) -> pyvips.Image:
    """``text`` ``height`` pixels tall on the canvas colour, with a one-pixel border
    of that colour (kept in memory: label heights repeat across image sizes, and
    drawing one costs more than the canvas around it)."""
    mask = _text_mask(text)
    assert mask is not None  # label_canvas draws no label without fonts
    small = mask.resize(height / mask.height)
    background, colour, interpretation = _label_colours(failed)
    label = small.ifthenelse(colour, small.new_from_image(background), blend=True)
    label = label.embed(
        1, 1, label.width + 2, label.height + 2, extend="background", background=background
    )
    return label.copy(interpretation=interpretation).copy_memory()


def _label_colours(failed: bool) -> tuple[list[int], list[int], str]:
    """Background, text colour and interpretation: grey placeholders are one band."""
    if failed:
        return [250, 235, 235], [160, 40, 40], "srgb"
    return [238], [110], "b-w"


def label_height(fit: float) -> int:
    """The tallest label height of a fixed ladder (steps of 2^(1/4), ~19%) that is
    not above ``fit``: labels are then drawn once per step, not once per image size."""
    return int(2 ** (math.floor(math.log2(fit) * 4) / 4)) if fit >= 1 else 0


@functools.lru_cache(maxsize=2)
def _canvas_pixel(failed: bool) -> pyvips.Image:
    """One pixel of the canvas colour, for canvases without a label."""
    background, _colour, interpretation = _label_colours(failed)
    pixel = pyvips.Image.black(1, 1, bands=len(background)).new_from_image(background)
    return pixel.copy(interpretation=interpretation).copy_memory()


def label_canvas(width: int, height: int, text: str, *, failed: bool) -> pyvips.Image:
    """A light canvas with ``text`` centred, for placeholders and failure images.

    The canvas is the label (or a pixel) extended by copying its border, which is
    the canvas colour: one libvips call, where drawing onto a canvas (``insert``,
    ``embed`` with a background) takes several and costs three times as much.
    """
    mask = _text_mask(text)
    if mask is not None:
        scale = min(0.8 * width / mask.width, 0.5 * height / mask.height)
        tall = label_height(mask.height * scale)
        if tall >= 6 and mask.width * tall / mask.height >= 24:
            label = _label(text, tall, failed)
            left, top = (width - label.width) // 2, (height - label.height) // 2
            return label.embed(left, top, width, height, extend="copy")
    return _canvas_pixel(failed).embed(0, 0, width, height, extend="copy")


# --- operations (imaging/operations.py; pipeline.STEPS applies them) ----------------


def crop_scaled(image: pyvips.Image, source: Any, crop: Any) -> pyvips.Image:
    """``crop`` (a rectangle of the upright ``source``, in its pixels) of ``image``,
    which is that source decoded at another scale."""
    fx, fy = image.width / source.width, image.height / source.height
    left = min(round(crop.left * fx), image.width - 1)
    top = min(round(crop.top * fy), image.height - 1)
    width = max(1, min(round(crop.width * fx), image.width - left))
    height = max(1, min(round(crop.height * fy), image.height - top))
    return image.crop(left, top, width, height)


def rotate(
    image: pyvips.Image, degrees: float, rgba: tuple[int, int, int, int], *, alpha: bool
) -> pyvips.Image:
    """Turn clockwise: right angles exactly; any other angle on ``rgba`` (the corners),
    the result the bounding box of the turned image."""
    turns = degrees % 360
    if turns in (90, 180, 270):
        return image.rot(f"d{int(turns)}")
    image, colour = _on_background(image, rgba, alpha=alpha)
    return image.rotate(turns, background=colour)


def flip(image: pyvips.Image, *, vertical: bool, horizontal: bool) -> pyvips.Image:
    if vertical:
        image = image.flipver()
    if horizontal:
        image = image.fliphor()
    return image


def blur(image: pyvips.Image, sigma: float) -> pyvips.Image:
    """Gaussian blur, alpha premultiplied so transparent pixels do not bleed colour."""
    if image.hasalpha():
        kind = image.format
        return image.premultiply().gaussblur(sigma).unpremultiply().cast(kind)
    return image.gaussblur(sigma).cast(image.format)


def sharpen(image: pyvips.Image, sigma: float) -> pyvips.Image:
    """libvips' unsharp mask on the lightness, back in the image's own space."""
    kind, space = image.format, image.interpretation
    return image.sharpen(sigma=sigma).colourspace(space).cast(kind)


def grayscale(image: pyvips.Image) -> pyvips.Image:
    """Grey, kept as sRGB (with its alpha) so later steps and encoders see one shape."""
    return image.colourspace("b-w").colourspace("srgb")


@functools.lru_cache(maxsize=16)
def _watermark_image(path: str, mtime_ns: int, size: int) -> pyvips.Image:
    from imgserve.imaging.formats import RASTER_SOURCES, sniff

    with open(path, "rb") as file:  # the operator's file, read once per process
        data = file.read()
    fmt = sniff(data)
    if fmt is None or fmt not in RASTER_SOURCES:
        raise errors.InternalError(f"watermark {path} is not an image in a supported format")
    try:
        image = pyvips.Image.new_from_buffer(data, "", fail_on="warning").colourspace("srgb")
        if not image.hasalpha():
            image = image.bandjoin(255)
        return image.cast("uchar").copy_memory()
    except pyvips.Error as exc:
        raise errors.InternalError(f"watermark {path} cannot be decoded: {exc}") from exc


def load_watermark(path: str) -> pyvips.Image:
    """The overlay at ``path`` (sRGB with alpha), decoded once per process and file version."""
    import os

    try:
        stat = os.stat(path)
    except OSError as exc:
        raise errors.InternalError(f"watermark {path}: {exc.strerror}") from exc
    return _watermark_image(path, stat.st_mtime_ns, stat.st_size)


def watermark(image: pyvips.Image, overlay: pyvips.Image, mark: Any) -> pyvips.Image:
    """``overlay`` over ``image`` by ``mark``'s gravity, margin, scale and opacity."""
    if image.bands < 3:
        image = image.colourspace("srgb")
    room_w = max(1, image.width - 2 * mark.margin)
    room_h = max(1, image.height - 2 * mark.margin)
    want_w = image.width * mark.scale if mark.scale is not None else overlay.width
    factor = min(want_w / overlay.width, room_w / overlay.width, room_h / overlay.height)
    width = max(1, round(overlay.width * factor))
    height = max(1, round(overlay.height * factor))
    if (width, height) != (overlay.width, overlay.height):
        overlay = resize_to(overlay, width, height)
    if mark.opacity < 1:
        overlay = overlay[:3].bandjoin(overlay[3] * mark.opacity).cast("uchar")
    if image.format == "ushort":
        overlay = overlay.colourspace("rgb16")
    gravity = mark.gravity
    x = (image.width - width) // 2
    y = (image.height - height) // 2
    if "west" in gravity:
        x = mark.margin
    elif "east" in gravity:
        x = image.width - width - mark.margin
    if "north" in gravity:
        y = mark.margin
    elif "south" in gravity:
        y = image.height - height - mark.margin
    had_alpha = image.hasalpha()
    out = image.composite2(overlay, "over", x=x, y=y).cast(image.format)
    # Over an opaque image the result is opaque: keep the image's bands.
    return out if had_alpha else out[: image.bands]


def fetch_rows(image: pyvips.Image, rows: range) -> bytes:
    """The pixels of ``rows`` (full width, band-interleaved), computed in this thread
    through a region: no libvips pipeline (and thread pool) to start, which is what
    makes a preview cheap (preview.py). Contiguous rows are fetched at once."""
    try:
        region = pyvips.Region.new(image)
        if rows.step == 1:
            return bytes(region.fetch(0, rows.start, image.width, len(rows)))
        return b"".join(region.fetch(0, y, image.width, 1) for y in rows)
    except pyvips.Error as exc:
        raise errors.InternalError(str(exc)) from exc

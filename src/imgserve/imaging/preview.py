"""What a rendered output looks like, for a page to show before the image loads.

``describe`` takes the output image as the render has it just before encoding
(sRGB or grey, 8 or 16 bits a channel, alpha or not; an animation as a strip of
frames ``page-height`` tall, of which the first frame is described) and gives
its BlurHash, its ThumbHash and two colours. It never decodes anything again.

Its cost must stay small next to the render's (the issue's budget is 3%, and a
320-wide JPEG renders in about 12 ms here), so everything is computed from a
small sample of the pixels:

- The first frame is point-sampled to at most ``SAMPLE_PX`` pixels on its
  longer side. A frame of up to ``WHOLE_FETCH_PX`` pixels (the image is in
  memory just before encoding) is fetched whole through a libvips region,
  which runs in this thread, and strided in NumPy; of a larger one only the
  sampled rows are fetched. Every libvips pipeline starts a thread pool: a box filter
  (``shrink``, ``thumbnail_image``) measured 0.6-1.5 ms for a 640x400 output
  and ``subsample`` + ``write_to_memory`` 0.2 ms, against 0.01-0.1 ms here.
- The hashes are made from that sample averaged over 2x2 blocks (at most
  ``HASH_PX`` on the longer side): both are a few cosine components (BlurHash at
  most 9 along a side, ThumbHash 7), which 24 pixels resolve, and the averaging
  undoes most of the point sample's aliasing.

The encoders are libraries: ThumbHash by ``thash``'s NumPy backend (byte for
byte the output of evanw's reference Rust crate on the images checked), BlurHash
by ``fast-blurhash`` (the Rust ``blurhash`` crate); both take raw pixels, so no
Pillow. The tests decode both hashes with other implementations (halcy's
``blurhash``, ``thumbhash-rs``).

Colours, as ``#rrggbb``, over the visible pixels (alpha weighs each pixel):

- ``average_color``: the alpha-weighted mean of the sample (of every pixel's
  colour alike if nothing is visible).
- ``dominant_color``: the sample's colours are quantised to 4 bits a channel
  (4096 bins, each pixel counted by its alpha); the colour is the mean of the
  pixels in the fullest bin (ties: the lowest bin), so a flat image gives
  exactly its colour and a two-colour image the colour of the larger part.

BlurHash has no alpha: its input is the image composited over the average
colour (ThumbHash encodes alpha itself, and composites the same way).

The pixels are read with vips.fetch_rows (a libvips region, no pipeline); its
libvips errors are InternalError (601).
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass

import fast_blurhash
import numpy as np
import numpy.typing as npt
import thash

from imgserve import errors
from imgserve.imaging import vips

SAMPLE_PX = 48
"""Longest side of the point sample: colours are counted on it, hashes made from it."""
MIN_SAMPLES = 8
"""Fewest rows (columns) sampled from a frame that has as many."""
WHOLE_FETCH_PX = 500_000
"""Frames up to this many pixels are fetched whole, larger ones a sampled row at a time."""
HASH_PX = 24
"""Longest side of the image the hashes are made from (ThumbHash allows 100)."""
MIN_HASH_SIDE_PX = 4
"""Shortest side the hashes are made from: ThumbHash has up to 7 components a side."""
MAX_COMPONENTS = 9
"""BlurHash's limit on components along each axis."""
_QUANT_BITS = 4
_BIN_WEIGHTS = np.array([1 << (2 * _QUANT_BITS), 1 << _QUANT_BITS, 1], dtype=np.intp)
_PEAKS = {"uchar": 255.0, "ushort": 65535.0}

Pixels = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Preview:
    """What one output looks like: two placeholders and two colours."""

    blurhash: str
    thumbhash: str
    """Standard base64 (with padding) of the ThumbHash bytes."""
    dominant_color: str
    """``#rrggbb``."""
    average_color: str
    """``#rrggbb``."""

    def to_dict(self) -> dict[str, str]:
        """The JSON keys of the job view and the completion event."""
        return {
            "blurhash": self.blurhash,
            "thumbhash": self.thumbhash,
            "dominantColor": self.dominant_color,
            "averageColor": self.average_color,
        }


def check_components(components: tuple[int, int]) -> tuple[int, int]:
    """BlurHash components (x, y), each 1..9; a ValueError says what is wrong."""
    if len(components) != 2:
        raise ValueError(f"blurhash components must be two numbers (x, y), not {components!r}")
    for name, value in zip(("x", "y"), components, strict=True):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"blurhash {name} components must be an integer, not {value!r}")
        if not 1 <= value <= MAX_COMPONENTS:
            raise ValueError(
                f"blurhash {name} components must be 1 to {MAX_COMPONENTS}, not {value}"
            )
    return components[0], components[1]


def describe(image: vips.Image, components: tuple[int, int] = (4, 3)) -> Preview:
    """BlurHash (``components`` = x, y), ThumbHash and colours of ``image``'s first frame.

    ``image`` is the output as the render holds it before encoding (in memory: the
    pixels are read, never decoded). ValueError: components outside 1..9, or pixels
    that are not 8 or 16-bit integers; InternalError (601): libvips failed to read.
    """
    x_components, y_components = check_components(components)
    colour, alpha = _sample(image)
    average = _average(colour, alpha)
    small_colour, small_alpha = _widen(*_halve(colour, alpha))
    height, width = small_colour.shape[:2]
    if small_alpha is None:
        rgb = np.rint(small_colour).astype(np.uint8)
        rgba = np.concatenate([rgb, np.full((height, width, 1), 255, np.uint8)], axis=2)
    else:
        opacity = small_alpha / 255.0
        rgb = np.rint(small_colour * opacity + average * (1.0 - opacity)).astype(np.uint8)
        rgba = np.rint(np.concatenate([small_colour, small_alpha], axis=2)).astype(np.uint8)
    blurhash = fast_blurhash.encode(rgb.tobytes(), x_components, y_components, width, height)
    thumbhash = bytes(thash.rgba_to_thumb_hash(width, height, rgba.reshape(-1)))
    return Preview(
        blurhash=blurhash,
        thumbhash=base64.b64encode(thumbhash).decode("ascii"),
        dominant_color=_hex(_dominant(colour, alpha, average)),
        average_color=_hex(average),
    )


def _sample(image: vips.Image) -> tuple[Pixels, Pixels | None]:
    """The first frame point-sampled to at most SAMPLE_PX a side: colour (height,
    width, 3) and alpha (height, width, 1, None where the image has none), 0-255."""
    # Each property read crosses into GObject (microseconds each): read them once.
    width, height, bands, pixel_format = image.width, image.height, image.bands, image.format
    peak = _PEAKS.get(pixel_format)
    if peak is None:
        raise ValueError(f"cannot describe an image of {pixel_format} pixels")
    if image.get_typeof("page-height") and 0 < image.get("page-height") < height:
        height = image.get("page-height")
    # One step for both sides keeps the aspect ratio (ThumbHash records it), except
    # that a short side keeps at least MIN_SAMPLES rows or columns: a 4000x2 output
    # sampled every 84 pixels would show one of its two rows.
    step = max(1, math.ceil(max(width, height) / SAMPLE_PX))
    x_step = min(step, max(1, width // MIN_SAMPLES))
    y_step = min(step, max(1, height // MIN_SAMPLES))
    # Sample each step's centre, not its corner: corners leave the last step out,
    # which darkens the mean of a gradient by half a step.
    left, top = x_step // 2, y_step // 2
    dtype = np.uint8 if pixel_format == "uchar" else np.uint16
    try:
        # A region is computed in this thread, with no libvips pipeline (thread pool)
        # to start: fetching a whole in-memory 640x480 frame costs 0.03 ms, where
        # subsample + write_to_memory costs 0.2 ms. Past WHOLE_FETCH_PX only the
        # sampled rows are fetched (0.05 ms, however wide), so memory stays bounded.
        if width * height <= WHOLE_FETCH_PX:
            data = vips.fetch_rows(image, range(height))
            whole = np.frombuffer(data, dtype=dtype).reshape(height, width, bands)
            pixels = whole[top::y_step, left::x_step]
        else:
            rows = range(top, height, y_step)
            strip = np.frombuffer(vips.fetch_rows(image, rows), dtype=dtype)
            pixels = strip.reshape(len(rows), width, bands)[:, left::x_step]
    except errors.InternalError as exc:
        raise errors.InternalError(f"sampling the output for its preview failed: {exc}") from exc
    values = pixels.astype(np.float64)
    if peak != 255.0:
        values *= 255.0 / peak
    colour = np.repeat(values[..., :1], 3, axis=2) if bands < 3 else values[..., :3]
    alpha = values[..., bands - 1 :] if bands in (2, 4) else None
    return colour, alpha


def _halve(colour: Pixels, alpha: Pixels | None) -> tuple[Pixels, Pixels | None]:
    """Average 2x2 blocks down to at most HASH_PX a side (along a side of at least 2
    pixels; an odd last row or column is dropped), undoing most of the point sample's
    aliasing. Colour is averaged premultiplied: transparent pixels do not bleed."""
    height, width = colour.shape[:2]
    if max(height, width) <= HASH_PX:
        return colour, alpha
    rows, cols = (height // 2 * 2 or 1), (width // 2 * 2 or 1)
    y_offsets = (0, 1) if height > 1 else (0,)
    x_offsets = (0, 1) if width > 1 else (0,)
    share = 1.0 / (len(y_offsets) * len(x_offsets))

    def blocks(values: Pixels) -> Pixels:
        step_y, step_x = len(y_offsets), len(x_offsets)
        total = sum(values[dy:rows:step_y, dx:cols:step_x] for dy in y_offsets for dx in x_offsets)
        return np.asarray(total, dtype=np.float64) * share

    if alpha is None:
        return blocks(colour), None
    mean_alpha = blocks(alpha)
    premultiplied = blocks(colour * alpha)
    mean_colour = np.divide(
        premultiplied, mean_alpha, out=np.zeros_like(premultiplied), where=mean_alpha > 0
    )
    return mean_colour, mean_alpha


def _widen(colour: Pixels, alpha: Pixels | None) -> tuple[Pixels, Pixels | None]:
    """Repeat each pixel so the shorter side has at least MIN_HASH_SIDE_PX (the same
    factor on both sides keeps the aspect ratio ThumbHash records). On a side of
    fewer pixels than half its components, a cosine component aliases to the
    constant one: a flat 1x1 image's ThumbHash decodes far from its colour."""
    short = min(colour.shape[:2])
    if short >= MIN_HASH_SIDE_PX:
        return colour, alpha
    factor = math.ceil(MIN_HASH_SIDE_PX / short)

    def repeat(values: Pixels) -> Pixels:
        return np.repeat(np.repeat(values, factor, axis=0), factor, axis=1)

    return repeat(colour), None if alpha is None else repeat(alpha)


def _average(colour: Pixels, alpha: Pixels | None) -> Pixels:
    """Alpha-weighted mean colour; the plain mean where nothing is visible."""
    flat = colour.reshape(-1, 3)
    weights = np.ones(len(flat)) if alpha is None else alpha.reshape(-1)
    total = float(weights.sum())
    if total <= 0:
        weights, total = np.ones(len(flat)), float(len(flat))
    # A matrix product sums the columns several times faster than sum(axis=0).
    return np.asarray(weights @ flat, dtype=np.float64) / total


def _dominant(colour: Pixels, alpha: Pixels | None, average: Pixels) -> Pixels:
    """The mean colour of the fullest bin of the 4-bit-a-channel histogram."""
    flat = colour.reshape(-1, 3)
    weights = np.ones(len(flat)) if alpha is None else alpha.reshape(-1)
    if float(weights.sum()) <= 0:
        return average
    levels = np.rint(flat).astype(np.intp) >> (8 - _QUANT_BITS)
    bins = levels @ _BIN_WEIGHTS
    counts = np.bincount(bins, weights=weights, minlength=1 << (3 * _QUANT_BITS))
    members = np.where(bins == int(np.argmax(counts)), weights, 0.0)
    return np.asarray(members @ flat, dtype=np.float64) / float(members.sum())


def _hex(colour: Pixels) -> str:
    r, g, b = (int(v) for v in np.clip(np.rint(colour), 0, 255))
    return f"#{r:02x}{g:02x}{b:02x}"

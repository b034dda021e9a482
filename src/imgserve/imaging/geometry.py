"""Result sizes and crop positions (pure arithmetic, no pyvips).

Everything the daemon must know before processing lives here: the size of the
result, so a placeholder of that size can be uploaded first, where a crop
keeps its window and where padding puts the image. ``fit_size`` and
``svg_fit_size`` size an output for each of sharp's fit modes (``FITS``);
``resize_result`` and ``rasterize_result`` are 0.2's rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from imgserve import errors

# Gravity names accepted in args.gravity; "smart" uses libvips' attention crop.
COMPASS = {
    "centre": "centre",
    "center": "centre",
    "north": "north",
    "south": "south",
    "east": "east",
    "west": "west",
    "northeast": "north-east",
    "northwest": "north-west",
    "southeast": "south-east",
    "southwest": "south-west",
}
GRAVITIES = frozenset({*COMPASS, "smart"})

FITS = ("cover", "contain", "fill", "inside", "outside")
"""How an output given both sides fills its box (sharp's vocabulary): cover crops
to the box, contain pads to it, fill stretches to it, inside fits within it,
outside covers it without cropping."""
# Fits that scale by the larger of the two factors (the image covers the box).
_COVERING = frozenset({"cover", "outside", "fill"})


@dataclass(frozen=True)
class Size:
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def oriented(size: Size, orientation: int) -> Size:
    """The upright size of an image whose EXIF orientation is ``orientation``."""
    if orientation in (5, 6, 7, 8):
        return Size(size.height, size.width)
    return size


def resize_result(src: Size, width: int | None, height: int | None, enlarge: bool) -> Size:
    """The size ``resize`` produces (0.2: fill the box exactly, crop the overflow).

    With one dimension the other follows the aspect ratio. A source smaller
    than the box in a requested dimension is refused (203) unless enlarging.
    """
    if width is None and height is None:
        raise errors.WidthInvalid("resize needs width, height or both")
    if not enlarge:
        refuse_smaller(src, width, height)
    if width is not None and height is not None:
        return Size(width, height)
    return proportional(src, width, height)


def refuse_smaller(src: Size, width: int | None, height: int | None) -> None:
    """0.2's rule: a source smaller than a requested side is refused (203)."""
    if (width is not None and src.width < width) or (height is not None and src.height < height):
        raise errors.EnlargeNotAllowed(
            f"source is {src.width}x{src.height}, smaller than the requested "
            f"{width or '-'}x{height or '-'}; set args.enlarge to allow enlarging"
        )


def proportional(src: Size, width: int | None, height: int | None) -> Size:
    """``src`` scaled to the one side given, the other following its aspect ratio."""
    if width is not None:
        return Size(width, max(1, round_half_up(src.height * width / src.width)))
    assert height is not None
    return Size(max(1, round_half_up(src.width * height / src.height)), height)


@dataclass(frozen=True)
class Fitted:
    """How one output is made from its source."""

    scaled: Size
    """The whole source scaled uniformly: what the decoder (or resizer) makes, before
    any stretch, crop or padding."""
    result: Size
    """One frame of the output."""


def fit_size(
    src: Size,
    width: int | None,
    height: int | None,
    fit: str = "cover",
    enlarge: bool = False,
    *,
    refuse_small: bool = False,
) -> Fitted:
    """Size an output of a raster source (``src`` upright) for ``fit`` (one of FITS).

    With one side the image scales proportionally whatever the fit. Without
    ``enlarge`` the scale stops at 1 (sharp's withoutEnlargement): cover keeps
    what of the box the source covers, contain still pads to the whole box,
    fill caps each side at the source's, inside and outside stay within the
    source. ``refuse_small`` is 0.2's rule instead: a source smaller than a
    requested side is refused (203), as ``resize_result`` does.
    """
    if width is None and height is None:
        raise errors.WidthInvalid("resize needs width, height or both")
    if fit not in FITS:
        raise ValueError(f"unknown fit {fit!r}")
    if refuse_small and not enlarge:
        refuse_smaller(src, width, height)
    if width is None or height is None:
        grows = width > src.width if width is not None else (height or 0) > src.height
        scaled = src if grows and not enlarge else proportional(src, width, height)
        return Fitted(scaled, scaled)
    box = Size(width, height)
    factors = (width / src.width, height / src.height)
    if fit == "fill":
        if not enlarge:
            box = Size(min(width, src.width), min(height, src.height))
        return Fitted(cover_size(src, box)[0], box)
    if fit in _COVERING:
        scaled = src if not enlarge and max(factors) > 1 else cover_size(src, box)[0]
        if fit == "outside":
            return Fitted(scaled, scaled)
        return Fitted(scaled, Size(min(box.width, scaled.width), min(box.height, scaled.height)))
    scaled = src if not enlarge and min(factors) > 1 else contain_size(src, box)
    return Fitted(scaled, box if fit == "contain" else scaled)


def cover_size(src: Size, box: Size) -> tuple[Size, bool]:
    """The size to scale ``src`` to so it covers ``box``, and whether width binds.

    The binding dimension equals the box; the other is at least the box.
    """
    width_binds = box.width / src.width >= box.height / src.height
    if width_binds:
        other = max(box.height, round_half_up(src.height * box.width / src.width))
        return Size(box.width, other), True
    other = max(box.width, round_half_up(src.width * box.height / src.height))
    return Size(other, box.height), False


def contain_size(src: Size, box: Size) -> Size:
    """``src`` scaled to fit inside ``box``: the binding side equals the box, the
    other is at most the box (and at least 1)."""
    if box.width / src.width <= box.height / src.height:
        other = min(box.height, max(1, round_half_up(src.height * box.width / src.width)))
        return Size(box.width, other)
    other = min(box.width, max(1, round_half_up(src.width * box.height / src.height)))
    return Size(other, box.height)


def crop_offsets(scaled: Size, box: Size, gravity: str) -> tuple[int, int]:
    """Top-left corner of the ``box`` window kept from an image of size ``scaled``."""
    direction = COMPASS[gravity]
    spare_x = max(0, scaled.width - box.width)
    spare_y = max(0, scaled.height - box.height)
    left = spare_x // 2
    top = spare_y // 2
    if "west" in direction:
        left = 0
    elif "east" in direction:
        left = spare_x
    if "north" in direction:
        top = 0
    elif "south" in direction:
        top = spare_y
    return left, top


def width_drives(src: Size, scaled: Size) -> bool:
    """Whether scaling ``src`` to ``scaled``'s width gives its height too (else the
    height drives): which side a thumbnail box gives, the other left free."""
    return max(1, round_half_up(src.height * scaled.width / src.width)) == scaled.height


def pad_offsets(scaled: Size, box: Size, gravity: str) -> tuple[int, int]:
    """Where an image of size ``scaled`` sits in the padded ``box`` (smart: centred)."""
    return crop_offsets(box, scaled, "centre" if gravity == "smart" else gravity)


def window_around(scaled: Size, box: Size, centre_x: int, centre_y: int) -> tuple[int, int]:
    """Top-left corner of the ``box`` window centred on a point, kept inside ``scaled``."""
    spare_x = max(0, scaled.width - box.width)
    spare_y = max(0, scaled.height - box.height)
    left = min(max(0, centre_x - box.width // 2), spare_x)
    top = min(max(0, centre_y - box.height // 2), spare_y)
    return left, top


def rasterize_result(
    src_width: float,
    src_height: float,
    width: int | None,
    height: int | None,
    scale: float | None,
) -> tuple[Size, float]:
    """The size an SVG renders at, and the scale factor that gives it.

    ``src_width`` x ``src_height`` is the drawing's intrinsic size, which may
    be fractional (an Inkscape page of 210 mm is 793.7 px). Width and/or
    height fit the drawing inside the box keeping its aspect ratio; ``scale``
    multiplies its intrinsic size.
    """
    if width is None and height is None:
        if scale is None:
            raise errors.WidthInvalid("rasterize needs width, height or scale")
        factor = scale
    elif width is not None and height is not None:
        factor = min(width / src_width, height / src_height)
    elif width is not None:
        factor = width / src_width
    else:
        assert height is not None
        factor = height / src_height
    sides = (src_width * factor, src_height * factor)
    # A drawing may declare any finite size (1e-300 px, 1e300 px): the ratio can overflow.
    if not all(math.isfinite(side) for side in (factor, *sides)):
        raise errors.SVGRenderOverLimit(
            f"a {src_width:g}x{src_height:g} px drawing scaled by {factor:g} has no finite size"
        )
    out = Size(max(1, round_half_up(sides[0])), max(1, round_half_up(sides[1])))
    # The requested side is exact even where floating point drifts.
    if width is not None and (height is None or out.width > width):
        out = Size(width, out.height) if abs(out.width - width) <= 1 else out
    if height is not None and (width is None or out.height > height):
        out = Size(out.width, height) if abs(out.height - height) <= 1 else out
    return out, factor


def svg_fit_size(
    src_width: float,
    src_height: float,
    width: int | None,
    height: int | None,
    scale: float | None,
    fit: str = "inside",
) -> tuple[Fitted, float]:
    """Size an output of a drawing, and the factor to render it at.

    A drawing has no pixels to run out of, so ``enlarge`` does not apply. With
    ``scale``, one side, or fit inside, this is 0.2's ``rasterize_result``.
    Otherwise the drawing renders at the larger factor (cover, outside, fill)
    or the smaller one (contain), with the binding side exact, and is then
    cropped (cover), stretched (fill) or padded (contain) to the box.
    """
    if fit not in FITS:
        raise ValueError(f"unknown fit {fit!r}")
    if scale is not None or width is None or height is None or fit == "inside":
        result, factor = rasterize_result(src_width, src_height, width, height, scale)
        return Fitted(result, result), factor
    by_width = width / src_width
    by_height = height / src_height
    binds_width = (by_width >= by_height) == (fit in _COVERING)
    if binds_width:
        scaled, factor = rasterize_result(src_width, src_height, width, None, None)
    else:
        scaled, factor = rasterize_result(src_width, src_height, None, height, None)
    if fit == "outside":
        return Fitted(scaled, scaled), factor
    return Fitted(scaled, Size(width, height)), factor

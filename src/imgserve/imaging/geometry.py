"""Result sizes and crop positions (pure arithmetic, no pyvips).

Everything the daemon must know before processing lives here: the size of the
result, so a placeholder of that size can be uploaded first, and where a crop
keeps its window.
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
    if not enlarge and (
        (width is not None and src.width < width) or (height is not None and src.height < height)
    ):
        raise errors.EnlargeNotAllowed(
            f"source is {src.width}x{src.height}, smaller than the requested "
            f"{width or '-'}x{height or '-'}; set args.enlarge to allow enlarging"
        )
    if width is not None and height is not None:
        return Size(width, height)
    if width is not None:
        return Size(width, max(1, round_half_up(src.height * width / src.width)))
    assert height is not None
    return Size(max(1, round_half_up(src.width * height / src.height)), height)


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

"""The operations an output may ask for beyond resizing, and their geometry.

Pure: no pyvips. ``Operations`` is what one output asks for (validated by
request_jobs.py, stored in the plan); ``region`` and ``frame_scale`` are the
geometry planning and the render share. The render applies them in one fixed
order (pipeline.STEPS, docs/imaging.md):

1. extract: ``crop``, a rectangle in source pixels (after EXIF orientation);
2. ``rotate`` (0, 90, 180, 270, or any angle on ``background``), ``flip``
   (top to bottom), ``flop`` (left to right);
3. resize and fit (the output's width, height, fit, gravity);
4. effects: ``blur``, ``sharpen``, ``grayscale``;
5. ``pad``: borders of ``background``;
6. ``watermark``: an overlay image named in the server's configuration;
7. the encoder (format, quality, ``keep_metadata``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from imgserve.imaging.geometry import Size

BLUR_SIGMA = (0.3, 100.0)
"""blur's Gaussian sigma, in output pixels (libvips gaussblur)."""
SHARPEN_SIGMA = (0.3, 10.0)
"""sharpen's sigma: libvips' unsharp mask, 0.5 for screens, 1-2 for print."""
MAX_PAD_PX = 4096
"""The widest border on one side."""
MAX_MARGIN_PX = 4096
WATERMARK_GRAVITIES = (
    "centre",
    "north",
    "south",
    "east",
    "west",
    "northeast",
    "northwest",
    "southeast",
    "southwest",
)


@dataclass(frozen=True)
class Crop:
    """A rectangle of the upright source, in its pixels."""

    left: int
    top: int
    width: int
    height: int

    def outside(self, source: Size) -> bool:
        return self.left + self.width > source.width or self.top + self.height > source.height


@dataclass(frozen=True)
class Watermark:
    name: str
    """A name from the server's ``--watermark NAME=FILE``."""
    gravity: str = "southeast"
    opacity: float = 1.0
    scale: float | None = None
    """The overlay's width as a fraction of the output's (None: its own width, made
    smaller only if the output is)."""
    margin: int = 0
    """Pixels between the overlay and the output's edges its gravity points at."""


@dataclass(frozen=True)
class Pad:
    top: int = 0
    right: int = 0
    bottom: int = 0
    left: int = 0


@dataclass(frozen=True)
class Operations:
    """What one output asks for besides its size, fit and format."""

    crop: Crop | None = None
    rotate: float = 0.0
    """Degrees clockwise."""
    flip: bool = False
    flop: bool = False
    blur: float | None = None
    sharpen: float | None = None
    grayscale: bool = False
    pad: Pad | None = None
    watermark: Watermark | None = None

    @property
    def any(self) -> bool:
        return self != Operations()

    @property
    def geometric(self) -> bool:
        """Whether the source is cut or turned before the resize."""
        return self.crop is not None or self.rotate != 0 or self.flip or self.flop

    @property
    def right_angle(self) -> bool:
        return self.rotate % 90 == 0

    def region(self, source: Size) -> Size:
        """The image the resize starts from: the crop (or the whole source), turned."""
        crop = Size(self.crop.width, self.crop.height) if self.crop else source
        return rotated_size(crop, self.rotate)

    def padded(self, size: Size) -> Size:
        if self.pad is None:
            return size
        p = self.pad
        return Size(size.width + p.left + p.right, size.height + p.top + p.bottom)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Operations:
        if not data:
            return cls()
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        for key, kind in (("crop", Crop), ("pad", Pad), ("watermark", Watermark)):
            if values.get(key) is not None:
                known = {f.name for f in dataclasses.fields(kind)}
                values[key] = kind(**{k: v for k, v in values[key].items() if k in known})
        return cls(**values)


def rotated_size(size: Size, degrees: float) -> Size:
    """The bounding box of ``size`` turned by ``degrees`` (exact for right angles)."""
    turns = degrees % 360
    if turns in (0, 180):
        return size
    if turns in (90, 270):
        return Size(size.height, size.width)
    rad = math.radians(turns)
    cos, sin = abs(math.cos(rad)), abs(math.sin(rad))
    return Size(
        max(1, round(size.width * cos + size.height * sin)),
        max(1, round(size.width * sin + size.height * cos)),
    )


def frame_size(source: Size, ops: Operations, scaled: Size) -> Size:
    """The whole upright source at the scale that makes its ``ops.region`` ``scaled``,
    never above the source's own size: the size to decode at before cutting and
    turning (an enlarged crop is cut from the source at its size, then enlarged)."""
    region = ops.region(source)
    factor = min(1.0, max(scaled.width / region.width, scaled.height / region.height))
    return Size(max(1, round(source.width * factor)), max(1, round(source.height * factor)))

"""Draw docs/images/operations.jpg: each output operation applied to one photo.

    .venv/bin/python scripts/contact_sheet.py [SOURCE] [OUT]

SOURCE defaults to a Debian wallpaper (2560x1600; scripts/test.sh installs the
package);
OUT to docs/images/operations.jpg. Every tile is rendered by imgserve's own
pipeline (validate -> plan -> render, as a job's output would be), labelled with
the output fields that made it.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import pyvips

from imgserve import planning
from imgserve.config import ImagingLimits
from imgserve.request_jobs import validate_jobs

SOURCE = Path("/usr/share/wallpapers/Autumn/contents/images/640x480.jpg")
OUT = Path(__file__).resolve().parents[1] / "docs" / "images" / "operations.jpg"
TILE = 240

TILES: list[dict[str, Any]] = [
    {},
    {"crop": {"left": 1400, "top": 300, "width": 900, "height": 900}},
    {"rotate": 90},
    {"rotate": 20, "background": "#3060c0"},
    {"flip": True},
    {"flop": True},
    {"blur": 4},
    {"sharpen": 2},
    {"grayscale": True},
    {"width": 208, "pad": {"top": 16, "right": 16, "bottom": 16, "left": 16}, "background": "#fc0"},
    {"fit": "contain", "height": 240, "background": "#202020"},
    {"watermark": {"name": "logo", "gravity": "southeast", "opacity": 0.7, "margin": 8}},
    {"crop": {"left": 1280, "top": 0, "width": 1280, "height": 1600}, "rotate": 270, "sharpen": 1},
]


def _logo(directory: Path) -> Path:
    """A small white 'imgserve' overlay with transparency, for the watermark tile."""
    text = pyvips.Image.text("imgserve", dpi=150, font="sans bold")
    alpha = text.cast("uchar")
    white = (pyvips.Image.black(alpha.width, alpha.height, bands=3) + 255).cast("uchar")
    path = directory / "logo.png"
    white.bandjoin(alpha).copy(interpretation="srgb").pngsave(str(path))
    return path


def _label(fields: dict[str, Any]) -> pyvips.Image:
    """The fields as black text on white, TILE wide."""
    shown = json.dumps(fields, separators=(", ", ": ")) if fields else "(no operation)"
    mask = pyvips.Image.text(shown, width=TILE - 8, dpi=72, font="monospace 9")
    ink = (255 - mask).embed(4, 4, TILE, mask.height + 8, extend="white")
    return ink.cast("uchar").colourspace("srgb")


def tile(data: bytes, fields: dict[str, Any], limits: ImagingLimits) -> pyvips.Image:
    output = {"url": "file:///tile.jpg", "width": TILE, **fields}
    body = {"source": "https://example.com/photo.jpg", "outputs": [output]}
    spec = validate_jobs(body, max_outputs=1, watermarks=frozenset({"logo"}))
    (result,) = planning.render(planning.plan(spec, data, limits), data, limits)
    image = pyvips.Image.new_from_buffer(result, "")
    frame = pyvips.Image.black(TILE, TILE, bands=3) + 255
    frame = frame.insert(image[:3], (TILE - image.width) // 2, (TILE - image.height) // 2)
    return frame.join(_label(fields), "vertical", background=[255, 255, 255]).cast("uchar")


def main(source: Path = SOURCE, out: Path = OUT) -> Path:
    data = source.read_bytes()
    with tempfile.TemporaryDirectory() as scratch:
        limits = ImagingLimits(watermarks=(f"logo={_logo(Path(scratch))}",))
        tiles = [tile(data, fields, limits) for fields in TILES]
    height = max(t.height for t in tiles)
    tiles = [t.embed(0, 0, TILE, height, extend="white") for t in tiles]
    sheet = pyvips.Image.arrayjoin(tiles, across=4, shim=8, background=[255, 255, 255])
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.jpegsave(str(out), Q=82, keep="none")
    return out


if __name__ == "__main__":
    args = [Path(a) for a in sys.argv[1:3]]
    print(main(*args))

"""The source images: real wallpapers from Debian packages, or tiny generated ones.

A full run uses the largest JPEG and PNG of every theme in
``plasma-workspace-wallpapers`` (2560x1600 to 5120x2880; some of the JPEGs are
progressive), the wallpaper SVG of every theme in ``desktop-base``, and a
12-megapixel baseline JPEG plus its progressive twin made from one of them.
Everything is copied once into one directory (``bench/out/images``) that the
source server serves. Smoke mode generates a few small images instead and never
calls apt.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pyvips

from bench import debian
from bench.workloads import SourceKind

WALLPAPERS = Path("/usr/share/wallpapers")
DESKTOP_BASE = Path("/usr/share/desktop-base")
PACKAGES = ["plasma-workspace-wallpapers", "desktop-base"]
# The 12-megapixel pair is cut from this wallpaper (a 5120x2880 baseline JPEG).
TWELVE_MP_FROM = "SafeLanding"
TWELVE_MP_SIZE = (4000, 3000)

_SIZE_NAME = re.compile(r"^(\d+)x(\d+)\.(jpg|png|svg)$")
_SVG_EXTERNAL = re.compile(rb"""(?:xlink:)?href\s*=\s*["']\s*(?!#|data:)[^"'\s]""", re.I)


@dataclass
class SourceSet:
    """The images one run uses, all in ``root``."""

    root: Path
    files: dict[SourceKind, list[str]] = field(default_factory=dict)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)
    """File name -> where it came from (for the results)."""

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()


def _largest(directory: Path, ext: str) -> Path | None:
    best: tuple[int, Path] | None = None
    for path in directory.glob(f"*.{ext}"):
        m = _SIZE_NAME.match(path.name)
        if m and (best is None or int(m[1]) * int(m[2]) > best[0]):
            best = (int(m[1]) * int(m[2]), path)
    return best[1] if best else None


def _self_contained_svg(path: Path) -> bool:
    data = path.read_bytes()
    return b"<!ENTITY" not in data and not _SVG_EXTERNAL.search(data)


def _add(sources: SourceSet, kind: SourceKind, name: str, origin: str) -> None:
    image = pyvips.Image.new_from_file(str(sources.root / name))
    sources.files.setdefault(kind, []).append(name)
    sources.sizes[name] = (image.width, image.height)
    sources.origins[name] = origin


def _copy(sources: SourceSet, kind: SourceKind, src: Path, name: str) -> None:
    dst = sources.root / name
    if not dst.exists() or dst.stat().st_size != src.stat().st_size:
        shutil.copyfile(src, dst)
    _add(sources, kind, name, str(src))


def real(root: Path) -> SourceSet:
    """The wallpaper sources (installing the Debian packages when missing)."""
    debian.ensure(PACKAGES, "the benchmark's source images")
    root.mkdir(parents=True, exist_ok=True)
    sources = SourceSet(root)
    themes = sorted(p for p in WALLPAPERS.iterdir() if (p / "contents" / "images").is_dir())
    for theme in themes:
        images = theme / "contents" / "images"
        jpg = _largest(images, "jpg")
        if jpg is not None:
            _copy(sources, "jpeg", jpg, f"{theme.name}-{jpg.name}")
        png = _largest(images, "png")
        if png is not None:
            _copy(sources, "png", png, f"{theme.name}-{png.name}")
    # desktop-base themes are real directories; "active-theme" is an alias of one.
    for theme in sorted(DESKTOP_BASE.glob("*-theme")):
        if theme.is_symlink() or theme.name == "active-theme":
            continue
        svg = _largest(theme / "wallpaper" / "contents" / "images", "svg")
        if svg is not None and _self_contained_svg(svg):
            _copy(sources, "svg", svg, f"{theme.name}-{svg.name}")
    _make_twelve_mp(sources, themes)
    kinds: tuple[SourceKind, ...] = ("jpeg", "png", "svg")
    for kind in kinds:
        if not sources.files.get(kind):
            raise RuntimeError(f"found no {kind} sources under {WALLPAPERS} / {DESKTOP_BASE}")
    return sources


def _make_twelve_mp(sources: SourceSet, themes: list[Path]) -> None:
    width, height = TWELVE_MP_SIZE
    base_name, prog_name = "12mp-baseline.jpg", "12mp-progressive.jpg"
    origin = next(
        (t / "contents" / "images" for t in themes if t.name == TWELVE_MP_FROM),
        None,
    )
    src = _largest(origin, "jpg") if origin else None
    if src is None:  # fall back to the largest JPEG found
        src = max(
            (sources.root / n for n in sources.files.get("jpeg", [])),
            key=lambda p: p.stat().st_size,
        )
    if not (sources.root / base_name).exists() or not (sources.root / prog_name).exists():
        image = pyvips.Image.thumbnail(str(src), width, height=height, crop="centre", size="force")
        image = image.copy_memory()
        image.jpegsave(str(sources.root / base_name), Q=90, interlace=False, keep="none")
        image.jpegsave(str(sources.root / prog_name), Q=90, interlace=True, keep="none")
    note = f"{width}x{height} cut from {src} with pyvips"
    _add(sources, "jpeg", base_name, note + " (baseline)")
    _add(sources, "jpeg", prog_name, note + " (progressive)")


_SMOKE_SVG = """<svg xmlns="http://www.w3.org/2000/svg"
 width="640" height="400" viewBox="0 0 640 400">
<defs><linearGradient id="g" x1="0" y1="0" x2="1" y2="1">
<stop offset="0" stop-color="#{a}"/><stop offset="1" stop-color="#{b}"/></linearGradient></defs>
<rect width="640" height="400" fill="url(#g)"/>
<circle cx="{cx}" cy="200" r="120" fill="#ffffff" fill-opacity="0.6"/>
<path d="M40 360 L320 60 L600 360 Z" fill="none" stroke="#202020" stroke-width="8"/>
</svg>
"""


# Smoke JPEGs are wider than renditions' largest output (2048 + spread) so that no
# system is asked to enlarge; PNGs stay small, PNG decoding has no shrink-on-load.
SMOKE_JPEG_SIZE = (2200, 1375)
SMOKE_PNG_SIZE = (1600, 1000)


def _smoke_raster(seed: int, width: int, height: int) -> pyvips.Image:
    xy = pyvips.Image.xyz(width, height)
    red = xy[0] * (255 / width)
    green = xy[1] * (255 / height)
    blue = (xy[0] + xy[1] * seed) % 256
    noise = pyvips.Image.gaussnoise(width, height, sigma=20, mean=0)
    image = red.bandjoin([green + noise, blue]).cast("uchar")
    return image.copy(interpretation="srgb")


def smoke(root: Path) -> SourceSet:
    """A few small generated sources (no apt, no network, a fraction of a second)."""
    root.mkdir(parents=True, exist_ok=True)
    sources = SourceSet(root)
    for seed in (1, 2):
        # The size is in the name: files made by an older version are not reused.
        image = _smoke_raster(seed, *SMOKE_JPEG_SIZE)
        for progressive in (False, True):
            kind = "-progressive" if progressive else ""
            name = f"smoke-{seed}{kind}-{image.width}x{image.height}.jpg"
            if not (root / name).exists():
                image.jpegsave(str(root / name), Q=90, interlace=progressive)
            _add(sources, "jpeg", name, "generated")
        image = _smoke_raster(seed, *SMOKE_PNG_SIZE)
        name = f"smoke-{seed}-{image.width}x{image.height}.png"
        if not (root / name).exists():
            image.pngsave(str(root / name))
        _add(sources, "png", name, "generated")
    for seed, (a, b) in enumerate((("3060c0", "f0a030"), ("20a060", "c02060"))):
        name = f"smoke-{seed}.svg"
        (root / name).write_text(_SMOKE_SVG.format(a=a, b=b, cx=200 + 200 * seed))
        _add(sources, "svg", name, "generated")
    return sources

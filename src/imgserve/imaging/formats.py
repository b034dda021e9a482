"""Image formats: sniffing source bytes, mapping extensions to savers (pure).

Sniffing here, not libvips' own, decides which loader family a source may use;
vips.py additionally blocks every other libvips loader, so a file that sniffs as
one thing cannot be decoded by a loader outside the allowlist.
"""

from __future__ import annotations

import enum
import math
import re
from xml.parsers import expat


class Format(enum.StrEnum):
    JPEG = "jpeg"
    PNG = "png"
    WEBP = "webp"
    GIF = "gif"
    TIFF = "tiff"
    HEIF = "heif"
    AVIF = "avif"
    SVG = "svg"


# Formats a raster source may be in (resize), and the one rasterize accepts.
RASTER_SOURCES = frozenset(
    {Format.JPEG, Format.PNG, Format.WEBP, Format.GIF, Format.TIFF, Format.HEIF, Format.AVIF}
)
VECTOR_SOURCES = frozenset({Format.SVG})

# Destination extensions imgserve can write, and the format each writes.
OUTPUT_EXTENSIONS: dict[str, Format] = {
    "jpg": Format.JPEG,
    "jpeg": Format.JPEG,
    "jpe": Format.JPEG,
    "png": Format.PNG,
    "webp": Format.WEBP,
    "avif": Format.AVIF,
    "gif": Format.GIF,
    "tif": Format.TIFF,
    "tiff": Format.TIFF,
}

CONTENT_TYPES: dict[Format, str] = {
    Format.JPEG: "image/jpeg",
    Format.PNG: "image/png",
    Format.WEBP: "image/webp",
    Format.GIF: "image/gif",
    Format.TIFF: "image/tiff",
    Format.HEIF: "image/heif",
    Format.AVIF: "image/avif",
    Format.SVG: "image/svg+xml",
}

# The extension a format is written with when the source URL has none.
CANONICAL_EXTENSION: dict[Format, str] = {
    Format.JPEG: "jpg",
    Format.PNG: "png",
    Format.WEBP: "webp",
    Format.GIF: "gif",
    Format.TIFF: "tif",
    Format.HEIF: "heic",
    Format.AVIF: "avif",
    Format.SVG: "svg",
}

# Formats that keep an alpha channel; the others are flattened onto white.
ALPHA_FORMATS = frozenset({Format.PNG, Format.WEBP, Format.GIF, Format.TIFF, Format.AVIF})
# Formats that can hold several frames (an animated source stays animated).
ANIMATED_FORMATS = frozenset({Format.GIF, Format.WEBP})

_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}
_SVG_HEAD = re.compile(rb"<svg[\s>/]", re.IGNORECASE)


def sniff(data: bytes) -> Format | None:
    """The format of ``data`` from its leading bytes, or None when unknown."""
    head = data[:64]
    if head.startswith(b"\xff\xd8\xff"):
        return Format.JPEG
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return Format.PNG
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return Format.GIF
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return Format.WEBP
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return Format.TIFF
    if head[4:8] == b"ftyp":
        brands = {head[8:12]} | {head[i : i + 4] for i in range(16, min(len(head), 48), 4)}
        if brands & _AVIF_BRANDS:
            return Format.AVIF
        if brands & _HEIF_BRANDS:
            return Format.HEIF
        return None
    return Format.SVG if _looks_like_svg(data) else None


def _looks_like_svg(data: bytes) -> bool:
    text = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n")
    if not text.startswith(b"<"):
        return False
    return _SVG_HEAD.search(text) is not None


def extension_of(path: str) -> str:
    """The lower-case extension of the last path segment ("" when none)."""
    name = path.rsplit("/", 1)[-1]
    stem, dot, ext = name.rpartition(".")
    return ext.lower() if dot and stem else ""


def output_format(extension: str) -> Format | None:
    return OUTPUT_EXTENSIONS.get(extension.lower())


# Matched against the lower-cased document: case-sensitive patterns that start
# with a literal are searched several times faster than IGNORECASE ones.
_SVG_HREF = re.compile(rb"""href\s*=\s*(["'])\s*(.*?)\1""", re.DOTALL)  # also xlink:href
_SVG_CSS_URL = re.compile(rb"""url\(\s*["']?\s*([^)"'\s]*)""")


def svg_problem(data: bytes) -> str | None:
    """Why an untrusted SVG is refused, or None when it is self-contained.

    Entity declarations (billion laughs) and references to anything outside
    the document (files, URLs, XInclude, CSS imports) are refused; only
    fragment (``#id``) and ``data:`` references may remain. librsvg would
    refuse most of these itself; this makes the refusal an explicit 204.
    """
    lower = data.lower()  # same length and offsets as ``data``
    if b"<!entity" in lower:
        return "SVG declares XML entities"
    if b"@import" in lower:
        return "SVG imports an external stylesheet"
    spans = [m.span(2) for m in _SVG_HREF.finditer(lower)]
    spans += [m.span(1) for m in _SVG_CSS_URL.finditer(lower)]
    for start, end in spans:
        ref = lower[start:end].strip()
        if ref and not ref.startswith(b"#") and not ref.startswith(b"data:"):
            shown = data[start:end].strip()[:80].decode("utf-8", "replace")
            return f"SVG references an external resource ({shown})"
    return None


_CSS_PIXELS = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(?:px)?\s*")


_SVG_ROOT = "http://www.w3.org/2000/svg svg"  # expat's "namespace name" form


class SVGMalformed(ValueError):
    """The document is not well-formed XML."""


def svg_declared_size(data: bytes) -> tuple[float, float] | None:
    """The size an SVG declares on its root in CSS pixels (``width="800"``,
    ``height="450px"``), or None when it does not say so plainly (no
    attributes, percentages, other units: librsvg must measure it then).

    The whole document is parsed (expat, a fraction of librsvg's cost), so a
    document that is not well-formed XML raises SVGMalformed. Call
    ``svg_problem`` first: it refuses entity declarations.
    """
    parser = expat.ParserCreate(namespace_separator=" ")
    root: list[dict[str, str]] = []

    def start(name: str, attributes: dict[str, str]) -> None:
        if name in ("svg", _SVG_ROOT):  # librsvg refuses a root in another namespace
            root.append(attributes)
        parser.StartElementHandler = None  # only the root element matters

    parser.StartElementHandler = start
    try:
        parser.Parse(data, True)
    except expat.ExpatError as exc:
        raise SVGMalformed(f"SVG is not well-formed XML: {exc}") from exc
    if not root:
        return None
    sides = [_CSS_PIXELS.fullmatch(root[0].get(side, "")) for side in ("width", "height")]
    if sides[0] is None or sides[1] is None:
        return None
    width, height = float(sides[0][1]), float(sides[1][1])
    if not (0 < width < math.inf and 0 < height < math.inf):
        return None
    return width, height

"""Format sniffing, extension maps and the untrusted-SVG check (pure, no pyvips)."""

from __future__ import annotations

import pytest

from imgserve.imaging import formats
from imgserve.imaging.formats import Format

SNIFF: list[tuple[str, bytes, Format | None]] = [
    ("jpeg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", Format.JPEG),
    ("jpeg exif", b"\xff\xd8\xff\xe1\x12\x34Exif\x00\x00", Format.JPEG),
    ("png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", Format.PNG),
    ("gif87a", b"GIF87a\x01\x00\x01\x00", Format.GIF),
    ("gif89a", b"GIF89a\x01\x00\x01\x00", Format.GIF),
    ("webp", b"RIFF\x24\x00\x00\x00WEBPVP8 ", Format.WEBP),
    ("tiff little-endian", b"II*\x00\x08\x00\x00\x00", Format.TIFF),
    ("tiff big-endian", b"MM\x00*\x00\x00\x00\x08", Format.TIFF),
    ("avif", b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf", Format.AVIF),
    ("avif sequence", b"\x00\x00\x00\x1cftypavis\x00\x00\x00\x00avismsf1", Format.AVIF),
    ("avif by compatible brand", b"\x00\x00\x00\x1cftypmif1\x00\x00\x00\x00mif1avif", Format.AVIF),
    ("heic", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", Format.HEIF),
    ("heif mif1", b"\x00\x00\x00\x18ftypmif1\x00\x00\x00\x00mif1heic", Format.HEIF),
    ("mp4 is not an image", b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2", None),
    ("svg", b'<svg xmlns="http://www.w3.org/2000/svg"/>', Format.SVG),
    ("svg with xml prolog", b'<?xml version="1.0"?>\n<svg width="1"></svg>', Format.SVG),
    ("svg with BOM and blanks", b"\xef\xbb\xbf \n<svg>\n</svg>", Format.SVG),
    ("svg with doctype and comment", b"<!DOCTYPE svg><!-- x --><SVG\n/>", Format.SVG),
    ("html is not svg", b"<html><body>hi</body></html>", None),
    ("svgz (gzip) is refused", b"\x1f\x8b\x08\x00\x00\x00\x00\x00", None),
    ("utf-16 svg is refused", "<svg/>".encode("utf-16"), None),
    ("text mentioning svg", b"this is not <svg> at the start", None),
    ("bmp", b"BM6\x00\x00\x00\x00\x00", None),
    ("ppm", b"P6\n8 8\n255\n", None),
    ("pdf", b"%PDF-1.7\n", None),
    ("jpeg 2000", b"\x00\x00\x00\x0cjP  \r\n\x87\n", None),
    ("empty", b"", None),
    ("short", b"\xff\xd8", None),
]


@pytest.mark.parametrize(
    ("data", "expected"), [pytest.param(d, f, id=name) for name, d, f in SNIFF]
)
def test_sniff(data: bytes, expected: Format | None) -> None:
    """Leading bytes name the format; anything else is None (and later 202)."""
    assert formats.sniff(data) is expected


@pytest.mark.parametrize(
    ("path", "extension"),
    [
        ("/a/b/photo.JPG", "jpg"),
        ("photo.tar.gz", "gz"),
        ("/a.b/noext", ""),
        (".hidden", ""),
        ("dir/", ""),
        ("", ""),
        ("x.{$ext}", "{$ext}"),
    ],
)
def test_extension_of(path: str, extension: str) -> None:
    """The extension is the lower-cased suffix of the last segment only."""
    assert formats.extension_of(path) == extension


@pytest.mark.parametrize(
    ("extension", "fmt"),
    [
        ("jpg", Format.JPEG),
        ("JPEG", Format.JPEG),
        ("png", Format.PNG),
        ("webp", Format.WEBP),
        ("avif", Format.AVIF),
        ("gif", Format.GIF),
        ("tif", Format.TIFF),
        ("tiff", Format.TIFF),
        ("svg", None),
        ("bmp", None),
        ("heic", None),
        ("", None),
    ],
)
def test_output_format(extension: str, fmt: Format | None) -> None:
    """Only the documented destination extensions map to a writer."""
    assert formats.output_format(extension) is fmt


def test_every_format_has_a_content_type_and_extension() -> None:
    """Each format has a MIME type and a canonical extension that maps back to it."""
    for fmt in Format:
        assert formats.CONTENT_TYPES[fmt].startswith("image/")
        ext = formats.CANONICAL_EXTENSION[fmt]
        if fmt in formats.OUTPUT_EXTENSIONS.values():
            assert formats.output_format(ext) is fmt


def test_jpeg_cannot_hold_alpha() -> None:
    """JPEG is the output format flattened onto white."""
    assert Format.JPEG not in formats.ALPHA_FORMATS
    assert Format.PNG in formats.ALPHA_FORMATS


_NS = b'xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink"'

SVG_PROBLEMS: list[tuple[str, bytes, str | None]] = [
    (
        "self-contained",
        b"<svg " + _NS + b' width="10" height="10"><rect width="10" height="10"/></svg>',
        None,
    ),
    (
        "fragment references",
        b"<svg " + _NS + b'><defs><linearGradient id="g"/></defs>'
        b'<rect fill="url(#g)"/><use xlink:href="#g"/><use href=" #g"/></svg>',
        None,
    ),
    (
        "data: image",
        b"<svg " + _NS + b'><image href="data:image/png;base64,iVBORw0KGgo="/></svg>',
        None,
    ),
    (
        "billion laughs",
        b'<!DOCTYPE svg [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;">]><svg/>',
        "entities",
    ),
    (
        "parameter entity",
        b'<!DOCTYPE svg [<!ENTITY % p SYSTEM "file:///etc/passwd">]><svg/>',
        "entities",
    ),
    ("lower-case entity", b'<!DOCTYPE svg [<!entity a "x">]><svg/>', "entities"),
    ("file href", b"<svg " + _NS + b'><image href="file:///etc/passwd"/></svg>', "external"),
    ("xlink file href", b"<svg " + _NS + b"><image xlink:href='/etc/passwd'/></svg>", "external"),
    ("relative href", b"<svg " + _NS + b'><image href="secret.png"/></svg>', "external"),
    ("http href", b"<svg " + _NS + b'><image href="http://169.254.169.254/x"/></svg>', "external"),
    ("use of another file", b"<svg " + _NS + b'><use href="other.svg#icon"/></svg>', "external"),
    ("href with spaces", b"<svg " + _NS + b'><image href = " file:///x "/></svg>', "external"),
    (
        "xinclude",
        b'<svg xmlns:xi="http://www.w3.org/2001/XInclude"><xi:include href="/etc/passwd" '
        b'parse="text"/></svg>',
        "external",
    ),
    # Found case-insensitively, shown as written.
    (
        "upper-case href",
        b"<svg " + _NS + b'><image XLINK:HREF="File:///Etc/X"/></svg>',
        "File:///Etc/X",
    ),
    ("css url", b'<svg><rect style="fill: url(/etc/passwd)"/></svg>', "external"),
    ("css quoted url", b"<svg><style>rect{fill:url('file:///x')}</style></svg>", "external"),
    ("css import", b"<svg><style>@import 'http://evil/x.css';</style></svg>", "stylesheet"),
    ("css import upper", b"<svg><style>@IMPORT url(#x);</style></svg>", "stylesheet"),
]


@pytest.mark.parametrize(
    ("data", "problem"), [pytest.param(d, p, id=name) for name, d, p in SVG_PROBLEMS]
)
def test_svg_problem(data: bytes, problem: str | None) -> None:
    """Entities and references outside the document are named; self-contained SVGs pass."""
    found = formats.svg_problem(data)
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert problem in found

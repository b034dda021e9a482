"""Where a result goes: 0.2's dstURL tags, its ``URL:filename`` form syntax and
the output extension a destination names.

Pure: no I/O, no pyvips, no asyncio. request.py validates a template with these
functions; planning.py fills one in once the result's size is known.
"""

from __future__ import annotations

import re

from imgserve.imaging import formats
from imgserve.transports.base import Target

TAG = re.compile(r"\{\$([A-Za-z]+)\}")
TAGS = frozenset({"width", "height", "basename", "extension", "ext"})
FORM_SCHEMES = frozenset({"http", "https"})
"""The schemes whose destinations may be form uploads (``URL:filename``)."""


def scheme(url: str) -> str:
    """The URL's scheme, lower-cased; "" when it has none."""
    head, sep, _ = url.partition("://")
    return head.lower() if sep else ""


def split_form_destination(dst: str) -> tuple[str, str | None]:
    """Split 0.2's ``http://host/upload.php:name.png`` into (URL, file name).

    The split is on the last colon after the URL's path begins, so a port
    (``http://host:8080/up:x.png``) is not mistaken for it. Returns
    ``(dst, None)`` when there is no file name part.
    """
    scheme_end = dst.find("://")
    path_start = dst.find("/", scheme_end + 3 if scheme_end >= 0 else 0)
    if path_start < 0:
        return dst, None
    colon = dst.rfind(":", path_start)
    if colon < 0:
        return dst, None
    return dst[:colon], dst[colon + 1 :]


def _dst_path(dst: str) -> str:
    """The part of dstURL whose extension names the output format."""
    if scheme(dst) in FORM_SCHEMES:
        url, filename = split_form_destination(dst)
        if filename is not None:
            return filename
        dst = url
    # Tags may hold characters urlsplit dislikes; only the path's tail matters.
    return dst.split("?", 1)[0].split("#", 1)[0]


def template_extension(template: str) -> str:
    """The extension a dstURL template names, tags unfilled (what request.py checks)."""
    return formats.extension_of(_dst_path(template))


def substitute(template: str, *, width: int, height: int, basename: str, extension: str) -> str:
    """Replace 0.2's dstURL tags; ``{$ext}`` is an alias of ``{$extension}``."""
    values = {
        "width": str(width),
        "height": str(height),
        "basename": basename,
        "extension": extension,
        "ext": extension,
    }
    return TAG.sub(lambda m: values[m.group(1)], template)


def destination_extension(template: str, source_extension: str) -> str:
    """The output extension once tags are known (only ``{$ext}`` can change it)."""
    path = substitute(
        _dst_path(template), width=1, height=1, basename="x", extension=source_extension
    )
    return formats.extension_of(path)


def destination_target(dst_url: str, form_field: str | None) -> Target:
    """Where a substituted dstURL uploads to: a form upload, or the URL itself."""
    if form_field is not None and scheme(dst_url) in FORM_SCHEMES:
        url, filename = split_form_destination(dst_url)
        return Target(url=url, form_field=form_field, filename=filename)
    return Target(url=dst_url)

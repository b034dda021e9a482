"""The JSON request contract of imgserve 0.2: parse and validate into a Job.

Pure: no I/O, no pyvips. Checks run in 0.2's order so each mistake gets 0.2's
code; what can only be known from the source (its size, its real format)
is checked later by imaging/.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from imgserve import errors, spec
from imgserve.destination import (
    FORM_SCHEMES,
    TAG,
    TAGS,
    scheme,
    split_form_destination,
    template_extension,
)
from imgserve.imaging import formats, geometry
from imgserve.spec import JobSpec

REQUIRED_KEYS = frozenset({"operationType", "srcURL", "dstURL", "args"})
OPERATIONS = frozenset({"resize", "rasterize"})
SOURCE_SCHEMES = frozenset({"http", "https", "ftp", "ftps", "file", "s3"})
DEST_SCHEMES = SOURCE_SCHEMES

_ARGS = {
    "resize": frozenset(
        {"width", "height", "gravity", "enlarge", "quality", "keep_metadata"}
        | {"field_name", "field_file"}
    ),
    "rasterize": frozenset(
        {"width", "height", "scale", "quality", "keep_metadata", "field_name", "field_file"}
    ),
}

MAX_JSON_DEPTH = 20
"""Deepest nesting a body may have; 0.2's contract needs 2 (the body, then args)."""
MAX_SIDE_PX = 10_000_000
"""libvips' largest image side (VIPS_MAX_COORD): no result can be wider or taller."""
MAX_SCALE = float(MAX_SIDE_PX)
"""A larger scale puts every drawing of a pixel or more past MAX_SIDE_PX."""

# C0 controls and DEL: a URL, file name or form field holding one is never
# what the user meant, and a CR or LF in it could split a header or a log line.
# Lone surrogates cannot be encoded, so no transport could send them either.
_CONTROL = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")
_SHOWN_CHARS = 80


@dataclass(frozen=True)
class Job:
    """A validated request. ``request`` keeps the original JSON for the queue."""

    operation: str
    src_url: str
    dst_template: str
    width: int | None = None
    height: int | None = None
    scale: float | None = None
    gravity: str = "centre"
    enlarge: bool = False
    quality: int | None = None
    keep_metadata: bool = False
    form_field: str | None = None

    def to_spec(self) -> JobSpec:
        """This request as a job with one output."""
        return spec.from_v02(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))  # flat values: asdict's deep copy costs more than the job

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        return cls(**data)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _depth_over(obj: Any, limit: int) -> bool:
    """Whether ``obj`` nests lists/objects more than ``limit`` deep (no recursion)."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children = list(value.values())
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def parse_body(body: bytes) -> dict[str, Any]:
    """Decode the request body; anything but a JSON object is a parse error (100).

    Strict JSON: ``NaN``/``Infinity`` are refused, and so is nesting deeper
    than MAX_JSON_DEPTH (the decoder's own limit is the interpreter's stack).
    """
    try:
        obj = json.loads(body, parse_constant=_refuse_constant)
    except RecursionError as exc:
        raise errors.RequestParseError(f"body nests deeper than {MAX_JSON_DEPTH} levels") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.RequestParseError(f"body is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise errors.RequestParseError("body is not a JSON object")
    if _depth_over(obj, MAX_JSON_DEPTH):
        raise errors.RequestParseError(f"body nests deeper than {MAX_JSON_DEPTH} levels")
    return obj


def shown(value: Any) -> str:
    """``repr(value)`` cut to a length fit for an error detail."""
    text = repr(value) if not isinstance(value, int) or value.bit_length() < 256 else "(a huge int)"
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def check_text(name: str, value: str, error: type[errors.RequestInvalid]) -> None:
    """Refuse a control character or lone surrogate in a URL or name (before any I/O)."""
    m = _CONTROL.search(value)
    if m:
        raise error(f"{name} holds the control character U+{ord(m[0]):04X} at offset {m.start()}")


def finite(value: float) -> bool:
    """Not inf or NaN; an int always is (math.isfinite would overflow on one beyond a
    float's range, which JSON carries)."""
    return isinstance(value, int) or math.isfinite(value)


def positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def validate(obj: dict[str, Any]) -> Job:
    """Check a decoded request and return the Job, or raise its 1xx error."""
    keys = set(obj)
    if keys != REQUIRED_KEYS:
        missing = sorted(REQUIRED_KEYS - keys)
        unknown = sorted(keys - REQUIRED_KEYS)
        detail = "; ".join(
            part
            for part in (
                f"missing: {', '.join(missing)}" if missing else "",
                f"unknown: {', '.join(unknown)}" if unknown else "",
            )
            if part
        )
        raise errors.KeysInvalid(detail)
    operation = obj["operationType"]
    if not isinstance(operation, str) or operation not in OPERATIONS:
        raise errors.UnknownOperation(
            f"operationType {shown(operation)} is not one of {', '.join(sorted(OPERATIONS))}"
        )
    args = obj["args"]
    if not isinstance(args, dict):
        raise errors.ArgsNotObject(f"args is {type(args).__name__}, not an object")
    src, dst = obj["srcURL"], obj["dstURL"]
    if not isinstance(src, str) or not src.strip():
        raise errors.EmptySrcURL("srcURL must be a non-empty string")
    if not isinstance(dst, str) or not dst.strip():
        raise errors.EmptyDstURL("dstURL must be a non-empty string")
    check_text("srcURL", src, errors.URLInvalid)
    check_text("dstURL", dst, errors.URLInvalid)

    unknown_args = sorted(set(args) - _ARGS[operation])
    if unknown_args:
        raise errors.ArgInvalid(f"unknown args for {operation}: {', '.join(unknown_args)}")
    width, height = args.get("width"), args.get("height")
    scale = args.get("scale")
    if width is not None and not positive_int(width):
        raise errors.WidthInvalid(f"width {shown(width)} is not a positive integer")
    if height is not None and not positive_int(height):
        raise errors.HeightInvalid(f"height {shown(height)} is not a positive integer")
    over_limit = errors.SVGRenderOverLimit if operation == "rasterize" else errors.ResultOverLimit
    for side, value in (("width", width), ("height", height)):
        if value is not None and value > MAX_SIDE_PX:
            raise over_limit(f"{side} {shown(value)} is over the largest side, {MAX_SIDE_PX} px")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not scale > 0:
            raise errors.ScaleInvalid(f"scale {shown(scale)} is not a positive number")
        if not finite(scale):
            raise errors.ScaleInvalid(f"scale {shown(scale)} is not a finite number")
        if width is not None or height is not None:
            raise errors.ScaleInvalid("give scale or width/height, not both")
        if scale > MAX_SCALE:
            raise errors.SVGRenderOverLimit(
                f"scale {shown(scale)} is over {MAX_SCALE:g}: no result side can be that large"
            )
    if width is None and height is None and scale is None:
        raise errors.WidthInvalid(
            "width or height is required" + (" (or scale)" if operation == "rasterize" else "")
        )

    src_scheme = scheme(src)
    if src_scheme not in SOURCE_SCHEMES:
        raise errors.SrcSchemeUnsupported(
            f"srcURL scheme {src_scheme or '(none)'!r} is not one of "
            f"{', '.join(sorted(SOURCE_SCHEMES))}"
        )
    src_ext = formats.extension_of(_url_path("srcURL", src))
    if operation == "rasterize" and src_ext and src_ext != "svg":
        raise errors.SourceTypeNotAllowed(f"rasterize takes an SVG source, not .{src_ext}")
    if operation == "resize" and src_ext == "svg":
        raise errors.SourceTypeNotAllowed("resize takes a raster source; use rasterize for SVG")

    dst_scheme = scheme(dst)
    if dst_scheme not in DEST_SCHEMES:
        raise errors.DstSchemeUnsupported(
            f"dstURL scheme {dst_scheme or '(none)'!r} is not one of "
            f"{', '.join(sorted(DEST_SCHEMES))}"
        )
    field = _form_field(args)
    if dst_scheme in FORM_SCHEMES:
        _url, filename = split_form_destination(dst)
        if filename is not None and field is None:
            raise errors.FormFieldMissing(
                "dstURL uses the URL:filename form upload syntax; set args.field_name"
            )
        if field is not None and filename is None:
            raise errors.URLInvalid(
                "a form upload (args.field_name) needs dstURL in the form URL:filename"
            )
    elif field is not None:
        raise errors.ArgInvalid(
            f"args.field_name applies to http(s) destinations, not {dst_scheme}"
        )
    for tag in TAG.findall(dst):
        if tag not in TAGS:
            raise errors.URLInvalid(f"unknown dstURL tag {{${tag}}}")
    dst_ext = template_extension(dst)
    if not TAG.search(dst_ext) and "{$" not in dst_ext and formats.output_format(dst_ext) is None:
        raise errors.DstExtensionUnsupported(
            f"destination extension {dst_ext or '(none)'!r} is not one of "
            f"{', '.join(sorted(formats.OUTPUT_EXTENSIONS))}"
        )

    gravity = args.get("gravity", "centre")
    if not isinstance(gravity, str) or gravity.lower() not in geometry.GRAVITIES:
        raise errors.GravityInvalid(
            f"gravity {shown(gravity)} is not one of {', '.join(sorted(geometry.GRAVITIES))}"
        )
    quality = args.get("quality")
    if quality is not None and not (positive_int(quality) and quality <= 100):
        raise errors.QualityInvalid(f"quality {shown(quality)} is not an integer from 1 to 100")
    for flag in ("enlarge", "keep_metadata"):
        if flag in args and not isinstance(args[flag], bool):
            raise errors.ArgInvalid(f"args.{flag} must be true or false")
    return Job(
        operation=operation,
        src_url=src,
        dst_template=dst,
        width=width,
        height=height,
        scale=float(scale) if scale is not None else None,
        gravity=gravity.lower(),
        enlarge=bool(args.get("enlarge", False)),
        quality=quality,
        keep_metadata=bool(args.get("keep_metadata", False)),
        form_field=field,
    )


def _form_field(args: dict[str, Any]) -> str | None:
    """The upload form field: ``field_name``, or 0.2's ``field_file``."""
    key = "field_name" if "field_name" in args else "field_file" if "field_file" in args else None
    if key is None:
        return None
    value = args[key]
    if not isinstance(value, str):
        raise errors.FormFieldNotString(f"args.{key} is {type(value).__name__}, not a string")
    if not value:
        raise errors.FormFieldMissing(f"args.{key} is empty")
    check_text(f"args.{key}", value, errors.FormFieldInvalid)
    return value


def _url_path(name: str, url: str) -> str:
    """The path of ``url``; URLInvalid where urlsplit refuses it (a broken IPv6 host)."""
    try:
        return urlsplit(url).path
    except ValueError as exc:
        raise errors.URLInvalid(f"{name} is malformed: {exc}") from exc

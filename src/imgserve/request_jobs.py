"""The ``POST /jobs`` request contract: validate a decoded job into a JobSpec.

Pure: no I/O, no pyvips. Every refusal is a 7xx error (docs/errors.md) whose
``detail`` starts with the path of the field at fault
(``outputs[3].width: not a positive integer (got -5)``). What can only be known
from the source (its size, its real format, what ``{$ext}`` becomes) is checked
by planning.py; so is ``scale`` against a raster source.

0.2's rules are reused, not copied: request.py's control-character rule,
value display and limits, destination.py's tags and ``URL:filename`` split,
formats.py's extension table.

The job control requests are checked here too: the ``Idempotency-Key`` header
(13x) and ``GET /jobs``' query (703/702, naming the parameter).
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import quote, urlsplit

from imgserve import errors
from imgserve.destination import (
    FORM_SCHEMES,
    TAG,
    TAGS,
    scheme,
    split_form_destination,
    template_extension,
)
from imgserve.imaging import formats, geometry
from imgserve.imaging import operations as ops
from imgserve.imaging.formats import Format
from imgserve.queue.base import PRIORITIES, State
from imgserve.request import (
    DEST_SCHEMES,
    MAX_SCALE,
    MAX_SIDE_PX,
    SOURCE_SCHEMES,
    check_text,
    finite,
    parse_body,
    positive_int,
    shown,
)
from imgserve.spec import FITS, RGBA, JobSpec, OutputRequest, source_name_of

METADATA_MAX_BYTES = 8 * 1024
"""The largest ``metadata`` a job may carry, as compact UTF-8 JSON."""

OPERATION_FIELDS = frozenset(
    {"crop", "rotate", "flip", "flop", "blur", "sharpen", "grayscale", "pad", "watermark"}
)
PREVIEW_FIELDS = frozenset({"blurhash_components"})
JOB_FIELDS = frozenset({"source", "outputs", "placeholder", "metadata", "webhook", "priority"})
WEBHOOK_SCHEMES = frozenset({"http", "https"})
OUTPUT_FIELDS = frozenset(
    {
        "url",
        "width",
        "height",
        "scale",
        "fit",
        "gravity",
        "enlarge",
        "format",
        "quality",
        "keep_metadata",
        "background",
        "form_field",
        *OPERATION_FIELDS,
        *PREVIEW_FIELDS,
    }
)

FORMATS: dict[str, Format] = {
    "jpeg": Format.JPEG,
    "jpg": Format.JPEG,
    "png": Format.PNG,
    "webp": Format.WEBP,
    "avif": Format.AVIF,
    "gif": Format.GIF,
    "tiff": Format.TIFF,
}
"""The names ``format`` takes (``jpg`` as an alias of ``jpeg``)."""

# Only ASCII hex digits: Python's \d and int() would take other scripts' digits.
_HEX_COLOUR = re.compile(r"#([0-9a-fA-F]{3,4}|[0-9a-fA-F]{6}|[0-9a-fA-F]{8})")
# A field name shown bare in a path; anything else is shown quoted and cut.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_]{1,40}")


def decode_job(body: bytes, *, where: str = "body") -> dict[str, Any]:
    """Decode a JSON body, or the multipart ``job`` part (``where="job"``), by
    request.parse_body's strict rules; anything but a JSON object is 700."""
    try:
        return parse_body(body)
    except errors.RequestParseError as exc:
        raise errors.JobBodyInvalid(f"{where}: {exc.detail.removeprefix('body ')}") from exc


def validate_jobs(
    obj: dict[str, Any],
    *,
    max_outputs: int,
    uploaded_name: str | None = None,
    watermarks: frozenset[str] = frozenset(),
) -> JobSpec:
    """Check a decoded ``POST /jobs`` body and return its JobSpec, or raise a 7xx error.

    ``uploaded_name`` is the file name of the multipart ``source`` part: then
    ``source`` must be absent and the spec has no source URL. Checks run
    top-level fields first, then each output in order; the first fault wins.
    An output's ``fit`` is accepted with one side given, where it changes
    nothing (the other side follows the source's aspect ratio). ``watermarks``:
    the names an output's ``watermark`` may take (the server's configuration).
    """
    if not isinstance(obj, dict):
        raise errors.JobBodyInvalid(f"body: not a JSON object (got {type(obj).__name__})")
    _refuse_unknown("", obj, JOB_FIELDS)
    if uploaded_name is not None:
        if "source" in obj:
            raise errors.JobUploadInvalid(
                "source: give the source as a URL or as a file part, not both"
            )
        source_url = None
        source_name = _uploaded_name(uploaded_name)
    else:
        source_url = _source_url(obj)
        source_name = source_name_of(source_url)
    outputs = _outputs(obj, max_outputs, watermarks)
    placeholder = _flag(obj, "", "placeholder", default=True)
    metadata = _metadata(obj)
    webhook = _webhook(obj["webhook"]) if "webhook" in obj else None
    return JobSpec(
        source_url=source_url,
        source_name=source_name,
        outputs=outputs,
        placeholder=placeholder,
        metadata=metadata,
        webhook=webhook,
        priority=_choice(obj, "", "priority", PRIORITIES, default="interactive"),
    )


def _refuse_unknown(prefix: str, obj: dict[str, Any], known: frozenset[str]) -> None:
    unknown = sorted(set(obj) - known)
    if unknown:
        more = f" (also unknown: {', '.join(map(_name, unknown[1:4]))})" if unknown[1:] else ""
        raise errors.JobFieldUnknown(
            f"{prefix}{_name(unknown[0])}: unknown field{more}; "
            f"the fields are {', '.join(sorted(known))}"
        )


def _name(key: str) -> str:
    """A field name fit for a path: bare when plain, else quoted and cut."""
    return key if _PLAIN_NAME.fullmatch(key) else shown(key)


def _uploaded_name(name: str) -> str:
    """The multipart file name without the path a browser may send with it,
    percent-encoded as a URL path segment (a source URL's name already is): in a
    destination, ``{$basename}`` of ``a#b?.jpg`` is ``a%23b%3F``, not a fragment."""
    base = re.split(r"[/\\]", name)[-1]
    if not base.strip():
        raise errors.JobUploadInvalid(
            f"source: the file part's file name {shown(name)} is empty once its path is removed"
        )
    check_text("source: the file part's file name", base, errors.JobUploadInvalid)
    return quote(base, safe="")


def _source_url(obj: dict[str, Any]) -> str:
    if "source" not in obj:
        raise errors.JobFieldMissing("source: missing (a URL, or send the file as a source part)")
    return _url("source", obj["source"], SOURCE_SCHEMES)


def _url(path: str, value: Any, schemes: frozenset[str]) -> str:
    """A URL string of one of ``schemes``, free of control characters."""
    if not isinstance(value, str):
        raise errors.JobFieldInvalid(f"{path}: not a string (got {shown(value)})")
    if not value.strip():
        raise errors.JobURLInvalid(f"{path}: empty")
    check_text(f"{path}:", value, errors.JobURLInvalid)
    url_scheme = scheme(value)
    if url_scheme not in schemes:
        raise errors.JobURLInvalid(
            f"{path}: scheme {shown(url_scheme or '(none)')} is not one of "
            f"{', '.join(sorted(schemes))}"
        )
    try:
        urlsplit(value)
    except ValueError as exc:  # a broken IPv6 host
        raise errors.JobURLInvalid(f"{path}: malformed ({exc})") from exc
    return value


def _webhook(value: Any) -> str:
    """An http(s) URL with a host; its address is checked against the outbound
    policy by the API, which resolves it."""
    url = _url("webhook", value, WEBHOOK_SCHEMES)
    parts = urlsplit(url)
    if not parts.hostname:
        raise errors.JobURLInvalid("webhook: the URL names no host")
    try:
        parts.port  # noqa: B018 - parsing it is the check
    except ValueError as exc:
        raise errors.JobURLInvalid(f"webhook: {exc}") from exc
    return url


def _outputs(
    obj: dict[str, Any], max_outputs: int, watermarks: frozenset[str]
) -> tuple[OutputRequest, ...]:
    if "outputs" not in obj:
        raise errors.JobFieldMissing("outputs: missing")
    outputs = obj["outputs"]
    if not isinstance(outputs, list):
        raise errors.JobFieldInvalid(f"outputs: not a list (got {shown(outputs)})")
    if not outputs:
        raise errors.JobOutputsCount("outputs: empty, at least 1")
    if len(outputs) > max_outputs:
        raise errors.JobOutputsCount(f"outputs: {len(outputs)} outputs, at most {max_outputs}")
    return tuple(_output(f"outputs[{i}]", out, watermarks) for i, out in enumerate(outputs))


def _output(path: str, out: Any, watermarks: frozenset[str] = frozenset()) -> OutputRequest:
    if not isinstance(out, dict):
        raise errors.JobFieldInvalid(f"{path}: not an object (got {shown(out)})")
    _refuse_unknown(f"{path}.", out, OUTPUT_FIELDS)
    if "url" not in out:
        raise errors.JobFieldMissing(f"{path}.url: missing")
    url = _url(f"{path}.url", out["url"], DEST_SCHEMES)
    for tag in TAG.findall(url):
        if tag not in TAGS:
            raise errors.JobURLInvalid(
                f"{path}.url: unknown tag {shown('{$' + tag + '}')}; "
                f"the tags are {', '.join(sorted(TAGS))}"
            )
    width = _side(out, path, "width")
    height = _side(out, path, "height")
    scale = _scale(out, path, sized=width is not None or height is not None)
    if width is None and height is None and scale is None:
        raise errors.JobFieldMissing(f"{path}: give width, height or both (or scale, for SVG)")
    form_field = _form_field(out, path, url)
    background = _background(out, path)
    return OutputRequest(
        url=url,
        width=width,
        height=height,
        scale=scale,
        fit=_choice(out, path, "fit", FITS, default="cover"),
        gravity=_choice(out, path, "gravity", geometry.GRAVITIES, default="centre", fold=True),
        enlarge=_flag(out, f"{path}.", "enlarge", default=False),
        format=_format(out, path, url),
        quality=_quality(out, path),
        keep_metadata=_flag(out, f"{path}.", "keep_metadata", default=False),
        background=background,
        form_field=form_field,
        ops=_operations(out, path, background, watermarks),
        blurhash_components=_components(out, path),
    )


def _components(out: dict[str, Any], path: str) -> tuple[int, int]:
    """``blurhash_components``: [across, down], 1 to 9 each (BlurHash's own limit)."""
    if "blurhash_components" not in out:
        return (4, 3)
    value = out["blurhash_components"]
    if not (
        isinstance(value, list)
        and len(value) == 2
        and all(positive_int(n) and n <= 9 for n in value)
    ):
        raise errors.JobFieldInvalid(
            f"{path}.blurhash_components: not two integers from 1 to 9 (got {shown(value)})"
        )
    return (int(value[0]), int(value[1]))


# --- operations (imaging/operations.py) ---------------------------------------------


def _operations(
    out: dict[str, Any], path: str, background: RGBA | None, watermarks: frozenset[str]
) -> ops.Operations:
    rotate = _number(out, path, "rotate", (-360.0, 360.0)) or 0.0
    if rotate % 90 and background is None:
        raise errors.JobFieldInvalid(
            f"{path}.rotate: {shown(out['rotate'])} is not 0, 90, 180 or 270: an angle "
            "between them needs a background for the corners"
        )
    return ops.Operations(
        crop=_crop(out, path),
        rotate=rotate % 360,
        flip=_flag(out, f"{path}.", "flip", default=False),
        flop=_flag(out, f"{path}.", "flop", default=False),
        blur=_number(out, path, "blur", ops.BLUR_SIGMA),
        sharpen=_number(out, path, "sharpen", ops.SHARPEN_SIGMA),
        grayscale=_flag(out, f"{path}.", "grayscale", default=False),
        pad=_pad(out, path),
        watermark=_watermark(out, path, watermarks),
    )


def _number(
    obj: dict[str, Any],
    path: str,
    key: str,
    bounds: tuple[float, float],
    *,
    exclusive: bool = False,
) -> float | None:
    """A finite number within ``bounds`` (``exclusive``: above the lower bound)."""
    if key not in obj:
        return None
    value = obj[key]
    low, high = bounds
    if isinstance(value, bool) or not isinstance(value, int | float) or not finite(value):
        raise errors.JobFieldInvalid(f"{path}.{key}: not a number (got {shown(value)})")
    if not (low < value <= high if exclusive else low <= value <= high):
        side = f"above {low:g}" if exclusive else f"from {low:g}"
        raise errors.JobFieldInvalid(
            f"{path}.{key}: {shown(value)} is out of range ({side} to {high:g})"
        )
    return float(value)


def _count(obj: dict[str, Any], path: str, key: str, low: int, high: int) -> int:
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise errors.JobFieldInvalid(
            f"{path}.{key}: not an integer from {low} to {high} (got {shown(value)})"
        )
    return value


def _object(obj: dict[str, Any], path: str, key: str, known: frozenset[str]) -> dict[str, Any]:
    value = obj[key]
    if not isinstance(value, dict):
        raise errors.JobFieldInvalid(f"{path}.{key}: not an object (got {shown(value)})")
    _refuse_unknown(f"{path}.{key}.", value, known)
    return value


def _crop(out: dict[str, Any], path: str) -> ops.Crop | None:
    if "crop" not in out:
        return None
    keys = ("left", "top", "width", "height")
    crop = _object(out, path, "crop", frozenset(keys))
    for key in keys:
        if key not in crop:
            raise errors.JobFieldMissing(f"{path}.crop.{key}: missing")
    where = f"{path}.crop"
    return ops.Crop(
        left=_count(crop, where, "left", 0, MAX_SIDE_PX),
        top=_count(crop, where, "top", 0, MAX_SIDE_PX),
        width=_count(crop, where, "width", 1, MAX_SIDE_PX),
        height=_count(crop, where, "height", 1, MAX_SIDE_PX),
    )


def _pad(out: dict[str, Any], path: str) -> ops.Pad | None:
    if "pad" not in out:
        return None
    sides = ("top", "right", "bottom", "left")
    pad = _object(out, path, "pad", frozenset(sides))
    where = f"{path}.pad"
    widths = {s: _count(pad, where, s, 0, ops.MAX_PAD_PX) for s in sides if s in pad}
    return ops.Pad(**widths)


def _watermark(out: dict[str, Any], path: str, watermarks: frozenset[str]) -> ops.Watermark | None:
    if "watermark" not in out:
        return None
    known = frozenset({"name", "gravity", "opacity", "scale", "margin"})
    mark = _object(out, path, "watermark", known)
    where = f"{path}.watermark"
    if "name" not in mark:
        raise errors.JobFieldMissing(f"{where}.name: missing")
    name = mark["name"]
    if not isinstance(name, str) or name not in watermarks:
        configured = ", ".join(sorted(watermarks)) or "none are configured (--watermark)"
        raise errors.JobFieldInvalid(
            f"{where}.name: {shown(name)} is not a watermark of this server; {configured}"
        )
    gravity = _choice(mark, where, "gravity", ops.WATERMARK_GRAVITIES, default="southeast")
    opacity = _number(mark, where, "opacity", (0.0, 1.0), exclusive=True)
    scale = _number(mark, where, "scale", (0.0, 1.0), exclusive=True)
    margin = _count(mark, where, "margin", 0, ops.MAX_MARGIN_PX) if "margin" in mark else 0
    return ops.Watermark(
        name=name,
        gravity=gravity,
        opacity=1.0 if opacity is None else opacity,
        scale=scale,
        margin=margin,
    )


def _side(out: dict[str, Any], path: str, key: str) -> int | None:
    if key not in out:
        return None
    value = out[key]
    if not positive_int(value):
        raise errors.JobFieldInvalid(f"{path}.{key}: not a positive integer (got {shown(value)})")
    if value > MAX_SIDE_PX:
        raise errors.JobFieldInvalid(
            f"{path}.{key}: {shown(value)} is over the largest side, {MAX_SIDE_PX} px"
        )
    return int(value)


def _scale(out: dict[str, Any], path: str, *, sized: bool) -> float | None:
    if "scale" not in out:
        return None
    value = out["scale"]
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise errors.JobFieldInvalid(f"{path}.scale: not a positive number (got {shown(value)})")
    if not finite(value):
        raise errors.JobFieldInvalid(f"{path}.scale: not a finite number (got {shown(value)})")
    if sized:
        raise errors.JobFieldInvalid(f"{path}.scale: give scale or width/height, not both")
    if value > MAX_SCALE:
        raise errors.JobFieldInvalid(
            f"{path}.scale: {shown(value)} is over {MAX_SCALE:g}: no result side can be that large"
        )
    return float(value)


def _choice(
    out: dict[str, Any],
    path: str,
    key: str,
    choices: frozenset[str] | tuple[str, ...],
    *,
    default: str,
    fold: bool = False,
) -> str:
    """One of ``choices`` (``fold``: compared lower-cased, as 0.2's gravity is)."""
    if key not in out:
        return default
    value = out[key]
    chosen = value.lower() if fold and isinstance(value, str) else value
    if not isinstance(chosen, str) or chosen not in choices:
        where = f"{path}.{key}" if path else key
        raise errors.JobFieldInvalid(
            f"{where}: {shown(value)} is not one of {', '.join(sorted(choices))}"
        )
    return chosen


def _flag(obj: dict[str, Any], prefix: str, key: str, *, default: bool) -> bool:
    if key not in obj:
        return default
    value = obj[key]
    if not isinstance(value, bool):
        raise errors.JobFieldInvalid(f"{prefix}{key}: not true or false (got {shown(value)})")
    return value


def _format(out: dict[str, Any], path: str, url: str) -> Format | None:
    """The explicit format, or None when the url's extension names one (or is a tag
    planning fills in, as ``{$ext}``)."""
    if "format" in out:
        value = out["format"]
        if not isinstance(value, str) or value not in FORMATS:
            raise errors.JobFormatInvalid(
                f"{path}.format: {shown(value)} is not one of {', '.join(FORMATS)}"
            )
        return FORMATS[value]
    ext = template_extension(url)
    if "{$" not in ext and formats.output_format(ext) is None:
        raise errors.JobFormatInvalid(
            f"{path}.format: missing, and the url's extension {shown(ext or '(none)')} names "
            f"no output format (the extensions are {', '.join(sorted(formats.OUTPUT_EXTENSIONS))})"
        )
    return None


def _quality(out: dict[str, Any], path: str) -> int | None:
    if "quality" not in out:
        return None
    value = out["quality"]
    if not (positive_int(value) and value <= 100):
        raise errors.JobFieldInvalid(
            f"{path}.quality: not an integer from 1 to 100 (got {shown(value)})"
        )
    return int(value)


def _background(out: dict[str, Any], path: str) -> RGBA | None:
    """CSS hex colour, ``#rgb``, ``#rgba``, ``#rrggbb`` or ``#rrggbbaa``, as RGBA 0-255."""
    if "background" not in out:
        return None
    value = out["background"]
    match = _HEX_COLOUR.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise errors.JobFieldInvalid(
            f"{path}.background: {shown(value)} is not a colour #rgb, #rgba, #rrggbb or #rrggbbaa"
        )
    digits = match[1]
    if len(digits) <= 4:
        digits = "".join(d * 2 for d in digits)
    if len(digits) == 6:
        digits += "ff"
    r, g, b, a = (int(digits[i : i + 2], 16) for i in range(0, 8, 2))
    return (r, g, b, a)


def _form_field(out: dict[str, Any], path: str, url: str) -> str | None:
    """The form field of an http(s) ``URL:filename`` destination; both or neither."""
    field = out.get("form_field")
    if "form_field" in out:
        if not isinstance(field, str) or not field:
            raise errors.JobFieldInvalid(
                f"{path}.form_field: not a non-empty string (got {shown(field)})"
            )
        check_text(f"{path}.form_field:", field, errors.JobFieldInvalid)
    url_scheme = scheme(url)
    if url_scheme not in FORM_SCHEMES:
        if field is not None:
            raise errors.JobFieldInvalid(
                f"{path}.form_field: applies to http(s) destinations, not {url_scheme}"
            )
        return None
    _target, filename = split_form_destination(url)
    if filename is not None and field is None:
        raise errors.JobURLInvalid(
            f"{path}.url: uses the URL:filename form upload syntax; set form_field"
        )
    if field is not None and filename is None:
        raise errors.JobURLInvalid(
            f"{path}.url: a form upload (form_field) needs the url in the form URL:filename"
        )
    return field


def _metadata(obj: dict[str, Any]) -> dict[str, Any]:
    if "metadata" not in obj:
        return {}
    metadata = obj["metadata"]
    if not isinstance(metadata, dict):
        raise errors.JobFieldInvalid(f"metadata: not a JSON object (got {shown(metadata)})")
    try:
        text = json.dumps(metadata, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:  # only when not from parse_body
        raise errors.JobFieldInvalid(f"metadata: not JSON ({exc})") from exc
    # surrogatepass: a lone surrogate (a JSON \ud800 escape) counts, it does not crash.
    size_bytes = len(text.encode("utf-8", "surrogatepass"))
    if size_bytes > METADATA_MAX_BYTES:
        raise errors.JobMetadataTooLarge(
            f"metadata: {size_bytes} bytes as JSON, at most {METADATA_MAX_BYTES}"
        )
    return metadata


# --- job control requests -------------------------------------------------------------

IDEMPOTENCY_KEY_MAX_CHARS = 255
LIST_LIMIT_DEFAULT = 50
LIST_LIMIT_MAX = 200
LIST_PARAMS = frozenset({"state", "limit", "cursor"})
CURSOR_MAX_CHARS = 200
"""Longer than any cursor or change id a backend makes (they are opaque, not free text)."""

# Printable ASCII, as HTTP header values are safest: no control character, no byte a
# proxy could re-encode (a key that changed on the way would not match its replay).
_PRINTABLE = re.compile(r"[\x20-\x7e]+")


def idempotency_key(value: str) -> str:
    """Check an ``Idempotency-Key`` header: 1-255 printable ASCII characters, not
    only spaces (131 otherwise)."""
    if not value.strip():
        raise errors.IdempotencyKeyInvalid("Idempotency-Key: empty")
    if len(value) > IDEMPOTENCY_KEY_MAX_CHARS:
        raise errors.IdempotencyKeyInvalid(
            f"Idempotency-Key: {len(value)} characters, at most {IDEMPOTENCY_KEY_MAX_CHARS}"
        )
    if not _PRINTABLE.fullmatch(value):
        raise errors.IdempotencyKeyInvalid(
            f"Idempotency-Key: {shown(value)} holds a character other than printable ASCII"
        )
    return value


def cursor_param(name: str, value: str) -> str:
    """An opaque cursor or event id handed back by the client (703 when it cannot be one)."""
    if not value or len(value) > CURSOR_MAX_CHARS or not _PRINTABLE.fullmatch(value):
        raise errors.JobFieldInvalid(f"{name}: {shown(value)} is not a cursor imgserve gave")
    return value


def list_query(params: dict[str, str]) -> tuple[State | None, int, str | None]:
    """``GET /jobs``' query: (state or None for every state, limit 1-200, cursor)."""
    _refuse_unknown("", params, LIST_PARAMS)
    state: State | None = None
    if "state" in params:
        try:
            state = State(params["state"])
        except ValueError:
            raise errors.JobFieldInvalid(
                f"state: {shown(params['state'])} is not one of {', '.join(s.value for s in State)}"
            ) from None
    limit = LIST_LIMIT_DEFAULT
    if "limit" in params:
        text = params["limit"]
        # Only ASCII digits: int() would take other scripts' digits, signs and spaces.
        if not re.fullmatch(r"[0-9]{1,4}", text) or not 1 <= int(text) <= LIST_LIMIT_MAX:
            raise errors.JobFieldInvalid(
                f"limit: {shown(text)} is not an integer from 1 to {LIST_LIMIT_MAX}"
            )
        limit = int(text)
    cursor = cursor_param("cursor", params["cursor"]) if "cursor" in params else None
    return state, limit, cursor

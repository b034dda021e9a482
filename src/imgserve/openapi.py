"""The OpenAPI 3.1 document of imgserve's HTTP API (docs/api.md, "OpenAPI").

``document()`` builds it. What the code holds as data comes from the code itself:
every error code with its HTTP status and message (errors.py), the enums and
limits the validators use (request.py, request_jobs.py, geometry, operations,
formats, queue.base). What the code states as statements, the shape of each
field, is written here as JSON Schema, and tests/test_openapi.py proves that the
two agree: the routes the app registers, the job view's fields, and that the
validators accept what the request schemas accept and the documented examples.

The document is kept in the repository as ``openapi.json`` beside this module
(package data), which ``GET /openapi.json`` serves as it is (``served()``, read
once). A test fails when the file and ``document()`` differ; write it anew with
``python -m imgserve.openapi > src/imgserve/openapi.json``.

Pure: no I/O but reading that one file.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import sys
from collections.abc import Iterable
from typing import Any

from imgserve import __version__, errors
from imgserve.destination import TAGS
from imgserve.imaging import geometry
from imgserve.imaging import operations as ops
from imgserve.imaging.formats import OUTPUT_EXTENSIONS
from imgserve.queue.base import PRIORITIES, State
from imgserve.request import MAX_SCALE, MAX_SIDE_PX, OPERATIONS
from imgserve.request_jobs import (
    CURSOR_MAX_CHARS,
    FORMATS,
    IDEMPOTENCY_KEY_MAX_CHARS,
    LIST_LIMIT_DEFAULT,
    LIST_LIMIT_MAX,
    METADATA_MAX_BYTES,
)
from imgserve.spec import FITS
from imgserve.ui import ASSETS as UI_ASSETS

FILE_NAME = "openapi.json"
DEFAULT_MAX_OUTPUTS = 16
"""``--max-outputs``' default, as the schema states it (a server may set another)."""

Schema = dict[str, Any]

# --- error codes per operation ----------------------------------------------------------

ANY_REQUEST = (127, 128, 129, 601)
"""Any request: broken HTTP (protocol.py) and an unexpected error."""
KEYED = (140, 141)
"""With API keys configured, on every endpoint but the probes."""
JOB_CHECK = (
    # the caller's key, before anything is read
    142, 143, 144,
    # a URL its transport cannot use (a file:// URL with a host, an http one without)
    124,
    # reading and planning the source, uploading placeholders (before the reply)
    201, 202, 204, 205, 206, 301, 302, 303, 304, 305, 306, 307, 308,
    401, 402, 403, 404, 405, 406,
    # the service
    602, 603, 604, 608, 609, 610, 611, 612,
)  # fmt: skip
"""What checking a job before the reply may refuse it with, whichever endpoint took it."""
IDEMPOTENCY = (130, 131, 614)
V02_REQUEST = (*range(100, 114), *range(120, 127), 108, 203)
JOBS_REQUEST = (*range(700, 710), 113, 125)
JOB_ID = (605, 606)
"""An unknown job id, or a path segment that is not one (``a%2Fb`` is no path here)."""
ANY_PATH = (607,)
"""A method no operation has, on any path: in ``x-imgserve-errors`` only."""
JOB_ONLY = (207, 501, 502, 503)
"""Found after the reply, by the worker: a failed job's ``error.code``, never a reply
(a placeholder's failed upload is 205). In ``x-imgserve-errors`` only."""
NOT_PER_OPERATION = (*ANY_PATH, *JOB_ONLY)

OPERATION_ERRORS: dict[tuple[str, str], tuple[int, ...]] = {
    ("post", "/"): (*V02_REQUEST, *IDEMPOTENCY, *JOB_CHECK),
    ("post", "/jobs"): (*JOBS_REQUEST, *IDEMPOTENCY, *JOB_CHECK),
    ("get", "/jobs"): (702, 703, 608),
    ("get", "/jobs/{job_id}"): (*JOB_ID, 608),
    ("delete", "/jobs/{job_id}"): (*JOB_ID, 613, 608),
    ("post", "/jobs/{job_id}/webhook"): (*JOB_ID, 616, 608),
    ("get", "/events"): (702, 703, 604, 608, 615),
    ("get", "/health"): (608,),
    ("get", "/livez"): (),
    ("get", "/metrics"): (),
    ("get", "/openapi.json"): (),
    ("get", "/ui"): (),
    ("get", "/ui/"): (),
    **{("get", f"/ui/{name}"): () for name in UI_ASSETS},
    ("get", "/ui/history"): (),
}
"""The codes each operation may answer with, besides ANY_REQUEST (and KEYED)."""

OPEN_OPERATIONS = frozenset(
    {
        ("get", "/health"),
        ("get", "/livez"),
        ("get", "/openapi.json"),
        ("get", "/ui"),
        ("get", "/ui/"),
        *(("get", f"/ui/{name}") for name in UI_ASSETS),
    }
)
"""Answered without a key (api.OPEN_PATHS): the dashboard's files hold no data."""


def _codes(method: str, path: str) -> list[int]:
    own = OPERATION_ERRORS[(method, path)]
    keyed = () if (method, path) in OPEN_OPERATIONS else KEYED
    return sorted({*ANY_REQUEST, *keyed, *own})


def _error_responses(codes: Iterable[int], *, parse_error: bool = False) -> dict[str, Any]:
    """One response per HTTP status: an Error body, and in ``x-imgserve-codes`` the
    codes it may carry there (one Error model for every operation keeps generated
    clients small; tests/e2e/test_openapi_live.py holds replies to the list)."""
    by_status: dict[int, list[type[errors.ImgserveError]]] = {}
    for code in sorted(set(codes)):
        cls = errors.by_code(code)
        assert cls.code == code, f"no error class has code {code}"
        by_status.setdefault(cls.status, []).append(cls)
    responses: dict[str, Any] = {}
    for status, classes in sorted(by_status.items()):
        lines = [f"- {cls.code} `{cls.__name__}`: {cls.message}" for cls in classes]
        body: Schema = {"$ref": "#/components/schemas/Error"}
        if parse_error and any(cls is errors.RequestParseError for cls in classes):
            body = {"oneOf": [{"$ref": "#/components/schemas/ParseError"}, body]}
        headers: dict[str, Any] = {}
        if status == 503 or any(cls in _RETRY_AFTER for cls in classes):
            headers["Retry-After"] = {"$ref": "#/components/headers/Retry-After"}
        if status == 401:
            headers["WWW-Authenticate"] = {"$ref": "#/components/headers/WWW-Authenticate"}
        response: dict[str, Any] = {
            "description": "Refused (docs/errors.md):\n\n" + "\n".join(lines),
            "content": {"application/json": {"schema": body}},
            "x-imgserve-codes": [cls.code for cls in classes],
        }
        if headers:
            response["headers"] = headers
        responses[str(status)] = response
    return responses


_RETRY_AFTER = (errors.IdempotencyKeyBusy, errors.APIKeyRateLimited)
"""Besides every 503: the errors whose reply carries Retry-After (api.error_reply)."""


def error_catalogue() -> list[dict[str, Any]]:
    """Every code errors.py defines, as ``x-imgserve-errors`` lists it."""
    return [
        {
            "code": cls.code,
            "name": cls.__name__,
            "status": cls.status,
            "message": cls.message,
            "retryable": cls.retryable,
        }
        for cls in errors.all_errors()
    ]


# --- URL patterns -------------------------------------------------------------------------
# As narrow as the validators, never wider: a URL these match passes request.py's and
# request_jobs.py's checks (a scheme they take, no control character, an authority
# urlsplit takes: ASCII, no IPv6 brackets, known tags only, the extension rule).

_SOURCE_SCHEMES = "(https?|ftps?|file|s3)"
_AUTHORITY = r"[A-Za-z0-9._~%!$&'()*+,;=:@-]*"
_TAG = r"\{\$(" + "|".join(sorted(TAGS)) + r")\}"
_TEXT = r"[^\x00-\x1f\x7f]"
_PLAIN = r"[^\x00-\x1f\x7f{}:?#]"
"""A destination's path or query character: a colon would make an http(s) URL a form
upload, a brace may only open a tag."""
_PORT = r"([0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"


def _any_case(word: str) -> str:
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in word)


_STEM = rf"([^\x00-\x1f\x7f{{}}:?#/.]|{_TAG})"
"""The character before an extension's dot: the last segment's name is not empty."""
_EXTENSION = (
    _STEM
    + r"\.("
    + "|".join(_any_case(ext) for ext in sorted(OUTPUT_EXTENSIONS))
    + "|"
    + _TAG
    + ")"
)
_PATH = rf"(/({_PLAIN}|{_TAG})*)"
_QUERY = rf"([?#]({_PLAIN}|{_TAG})*)?"

SOURCE_URL = rf"^{_SOURCE_SCHEMES}://{_AUTHORITY}(/{_TEXT}*)?$"
DESTINATION_URL = rf"^{_SOURCE_SCHEMES}://{_AUTHORITY}{_PATH}?{_QUERY}$"
DESTINATION_URL_NAMING_FORMAT = rf"^{_SOURCE_SCHEMES}://{_AUTHORITY}{_PATH}{_EXTENSION}{_QUERY}$"
FORM_URL = rf"^https?://{_AUTHORITY}{_PATH}:({_PLAIN}|{_TAG})*$"
FORM_URL_NAMING_FORMAT = rf"^https?://{_AUTHORITY}{_PATH}:({_PLAIN}|{_TAG})*{_EXTENSION}$"
WEBHOOK_URL = (
    rf"^https?://([A-Za-z0-9._~%!$&'()*+,;=:-]*@)?[A-Za-z0-9._~%!$&'()*+,;=-]+(:{_PORT}?)?"
    rf"([/?#]{_TEXT}*)?$"
)
CONTROL_FREE = r"^[^\x00-\x1f\x7f]*$"
PRINTABLE = r"^[\x20-\x7e]*[\x21-\x7e][\x20-\x7e]*$"
HEX_COLOUR = r"^#([0-9a-fA-F]{3,4}|[0-9a-fA-F]{6}|[0-9a-fA-F]{8})$"


# --- schemas ------------------------------------------------------------------------------


def _side(what: str) -> Schema:
    return {"type": "integer", "minimum": 1, "maximum": MAX_SIDE_PX, "description": what}


def _bool(what: str, default: bool) -> Schema:
    return {"type": "boolean", "default": default, "description": what}


def _number(low: float, high: float, what: str, *, exclusive: bool = False) -> Schema:
    bound = {"exclusiveMinimum": low} if exclusive else {"minimum": low}
    return {"type": "number", **bound, "maximum": high, "description": what}


def _count(low: int, high: int, what: str = "") -> Schema:
    schema: Schema = {"type": "integer", "minimum": low, "maximum": high}
    if what:
        schema["description"] = what
    return schema


_GRAVITIES = sorted(geometry.GRAVITIES)


def _output_schema() -> Schema:
    sides = ("top", "right", "bottom", "left")
    properties: dict[str, Schema] = {
        "url": {
            "type": "string",
            "description": "The destination, with the tags {$width}, {$height}, {$basename}, "
            "{$extension} (= {$ext}). An http(s) URL is a PUT, or with form_field a form "
            "upload written URL:filename (0.2's syntax).",
        },
        "form_field": {
            "type": "string",
            "minLength": 1,
            "pattern": CONTROL_FREE,
            "description": "The form field of a form upload (http(s) URL:filename only).",
        },
        "width": _side("Pixels; at least one of width and height (or scale, SVG only)."),
        "height": _side("Pixels."),
        "scale": _number(
            0, MAX_SCALE, "SVG sources only, instead of width/height.", exclusive=True
        ),
        "fit": {"enum": list(FITS), "default": "cover", "description": "With both sides."},
        "gravity": {
            "enum": _GRAVITIES,
            "default": "centre",
            "description": "What cover keeps, where contain places (any case is taken).",
        },
        "enlarge": _bool("Whether a smaller source may be scaled up.", False),
        "format": {
            "enum": list(FORMATS),
            "description": "The output format; default: the one the url's extension names.",
        },
        "quality": _count(1, 100, "The encoder's quality (jpeg, webp, avif)."),
        "keep_metadata": _bool("Keep the source's EXIF/XMP/ICC metadata.", False),
        "background": {
            "type": "string",
            "pattern": HEX_COLOUR,
            "description": "#rgb, #rgba, #rrggbb or #rrggbbaa: contain's padding and the "
            "colour transparency is flattened onto.",
        },
        "crop": {
            "type": "object",
            "description": "A rectangle of the upright source, in its pixels (docs/imaging.md).",
            "required": ["left", "top", "width", "height"],
            "properties": {
                "left": _count(0, MAX_SIDE_PX),
                "top": _count(0, MAX_SIDE_PX),
                "width": _count(1, MAX_SIDE_PX),
                "height": _count(1, MAX_SIDE_PX),
            },
            "additionalProperties": False,
        },
        "rotate": _number(
            -360, 360, "Degrees clockwise; other than a multiple of 90 it needs a background."
        ),
        "flip": _bool("Mirror top to bottom.", False),
        "flop": _bool("Mirror left to right.", False),
        "blur": _number(*ops.BLUR_SIGMA, "Gaussian blur sigma, in output pixels."),
        "sharpen": _number(*ops.SHARPEN_SIGMA, "Unsharp mask sigma."),
        "grayscale": _bool("Render in shades of grey.", False),
        "pad": {
            "type": "object",
            "description": "A border of background on each side, in pixels.",
            "properties": {side: _count(0, ops.MAX_PAD_PX) for side in sides},
            "additionalProperties": False,
        },
        "watermark": {
            "type": "object",
            "description": "One of the server's --watermark images, drawn over the output.",
            "required": ["name"],
            "properties": {
                "name": {
                    "type": "string",
                    "description": "A name the server configured (--watermark NAME=FILE); "
                    "any other is refused with 703.",
                },
                "gravity": {"enum": list(ops.WATERMARK_GRAVITIES), "default": "southeast"},
                "opacity": _number(0, 1, "Default 1.", exclusive=True),
                "scale": _number(0, 1, "Its width as a share of the output's.", exclusive=True),
                "margin": _count(0, ops.MAX_MARGIN_PX, "Pixels from the edges."),
            },
            "additionalProperties": False,
        },
        "blurhash_components": {
            "type": "array",
            "description": "The BlurHash's components across and down (default [4, 3]).",
            "items": _count(1, 9),
            "minItems": 2,
            "maxItems": 2,
        },
    }
    return {
        "type": "object",
        "description": "One output (docs/api.md, 'Fields').",
        "required": ["url"],
        "properties": properties,
        "additionalProperties": False,
        "allOf": [
            {"anyOf": [{"required": ["width"]}, {"required": ["height"]}, {"required": ["scale"]}]},
            {"not": {"required": ["scale", "width"]}},
            {"not": {"required": ["scale", "height"]}},
            {
                "anyOf": [
                    {"not": {"required": ["rotate"]}},
                    {"properties": {"rotate": {"multipleOf": 90}}},
                    {"required": ["background"]},
                ]
            },
            {
                "oneOf": [
                    {
                        "description": "A destination: no form_field.",
                        "not": {"required": ["form_field"]},
                        "anyOf": [
                            {
                                "required": ["format"],
                                "properties": {"url": {"pattern": DESTINATION_URL}},
                            },
                            {"properties": {"url": {"pattern": DESTINATION_URL_NAMING_FORMAT}}},
                        ],
                    },
                    {
                        "description": "A form upload: an http(s) URL:filename and form_field.",
                        "required": ["form_field"],
                        "anyOf": [
                            {"required": ["format"], "properties": {"url": {"pattern": FORM_URL}}},
                            {"properties": {"url": {"pattern": FORM_URL_NAMING_FORMAT}}},
                        ],
                    },
                ]
            },
        ],
    }


def _job_properties(max_outputs: int) -> dict[str, Schema]:
    return {
        "outputs": {
            "type": "array",
            "minItems": 1,
            "maxItems": max_outputs,
            "description": f"1 to max_outputs ({max_outputs} by default, --max-outputs).",
            "items": {"$ref": "#/components/schemas/Output"},
        },
        "placeholder": _bool("Upload each output's placeholder before the reply.", True),
        "metadata": {
            "type": "object",
            "description": f"The caller's own JSON object, at most {METADATA_MAX_BYTES} bytes "
            "as compact UTF-8 JSON (709), returned with the job and in its events.",
        },
        "webhook": {
            "type": "string",
            "pattern": WEBHOOK_URL,
            "description": "Where the job's completion event goes (docs/webhooks.md); default "
            "the server's --webhook-url. Its host must pass the outbound address policy (403, "
            "401).",
        },
        "priority": {"enum": list(PRIORITIES), "default": "interactive"},
    }


def _job_schema(max_outputs: int) -> Schema:
    return {
        "type": "object",
        "description": "A job naming its source (docs/api.md, 'POST /jobs').",
        "required": ["source", "outputs"],
        "properties": {
            "source": {
                "type": "string",
                "pattern": SOURCE_URL,
                "description": "URL of the source: http(s), ftp(s), file, s3.",
            },
            **_job_properties(max_outputs),
        },
        "additionalProperties": False,
    }


def _upload_job_schema(max_outputs: int) -> Schema:
    return {
        "type": "object",
        "description": "The multipart job part: a job without source.",
        "required": ["outputs"],
        "properties": _job_properties(max_outputs),
        "additionalProperties": False,
    }


def _v02_schema() -> Schema:
    args: dict[str, Schema] = {
        "width": _side("Pixels; width or height (or scale, for rasterize)."),
        "height": _side("Pixels."),
        "scale": _number(0, MAX_SCALE, "rasterize only, instead of width/height.", exclusive=True),
        "gravity": {"enum": _GRAVITIES, "default": "centre"},
        "enlarge": _bool("Scale up a smaller source (else 203).", False),
        "quality": _count(1, 100),
        "keep_metadata": _bool("Keep the source's metadata.", False),
        "field_name": {
            "type": "string",
            "minLength": 1,
            "pattern": CONTROL_FREE,
            "description": "The form field of a form upload (dstURL URL:filename).",
        },
        "field_file": {"type": "string", "minLength": 1, "pattern": CONTROL_FREE},
    }
    form = {"anyOf": [{"required": ["field_name"]}, {"required": ["field_file"]}]}
    sized = {"anyOf": [{"required": ["width"]}, {"required": ["height"]}]}
    return {
        "type": "object",
        "description": "imgserve 0.2's request, unchanged (README, docs/imaging.md).",
        "required": sorted(["operationType", "srcURL", "dstURL", "args"]),
        "properties": {
            "operationType": {"enum": sorted(OPERATIONS)},
            "srcURL": {"type": "string", "pattern": SOURCE_URL},
            "dstURL": {"type": "string"},
            "args": {"type": "object", "properties": args, "additionalProperties": False},
        },
        "additionalProperties": False,
        "allOf": [
            {
                "oneOf": [
                    {
                        "properties": {
                            "operationType": {"const": "resize"},
                            "srcURL": {"not": {"pattern": r"\.[sS][vV][gG]([?#]|$)"}},
                            "args": {"allOf": [sized, {"not": {"required": ["scale"]}}]},
                        }
                    },
                    {
                        "properties": {
                            "operationType": {"const": "rasterize"},
                            "srcURL": {"pattern": r"[^/]\.[sS][vV][gG]$"},
                            "args": {
                                "not": {
                                    "anyOf": [{"required": ["gravity"]}, {"required": ["enlarge"]}]
                                },
                                "oneOf": [
                                    {"allOf": [sized, {"not": {"required": ["scale"]}}]},
                                    {"required": ["scale"], "not": sized},
                                ],
                            },
                        }
                    },
                ]
            },
            {
                "oneOf": [
                    {
                        "properties": {
                            "dstURL": {"pattern": DESTINATION_URL_NAMING_FORMAT},
                            "args": {"not": form},
                        }
                    },
                    {
                        "properties": {
                            "dstURL": {"pattern": FORM_URL_NAMING_FORMAT},
                            "args": form,
                        }
                    },
                ]
            },
        ],
    }


def _view_schemas() -> dict[str, Schema]:
    nullable_number = {"type": ["number", "null"]}
    output_view: Schema = {
        "type": "object",
        "description": "An output as the reply, the job view and the events show it.",
        "required": ["url", "width", "height", "format"],
        "properties": {
            "url": {"type": "string", "description": "Tags filled in, credentials redacted."},
            "width": {"type": "integer"},
            "height": {"type": "integer"},
            "format": {"enum": sorted({f.value for f in FORMATS.values()})},
            "bytes": {"type": "integer", "description": "As uploaded, once the job is done."},
            "blurhash": {"type": "string", "description": "Once done (blurha.sh)."},
            "thumbhash": {"type": "string", "description": "Once done, standard base64."},
            "dominantColor": {"type": "string", "pattern": "^#[0-9a-f]{6}$"},
            "averageColor": {"type": "string", "pattern": "^#[0-9a-f]{6}$"},
        },
        "additionalProperties": False,
    }
    attempt: Schema = {
        "type": "object",
        "required": ["at", "status", "error"],
        "properties": {
            "at": nullable_number,
            "status": {"type": ["integer", "null"], "description": "null: no answer came."},
            "error": {"type": ["string", "null"]},
        },
        "additionalProperties": False,
    }
    webhook: Schema = {
        "type": "object",
        "description": "The delivery of the job's latest webhook event (docs/webhooks.md).",
        "required": ["url", "eventId", "type", "state", "attempts"],
        "properties": {
            "url": {"type": "string"},
            "eventId": {"type": "string"},
            "type": {"enum": ["job.completed", "job.failed", "job.cancelled"]},
            "state": {"enum": ["pending", "delivered", "failed"]},
            "attempts": {"type": "array", "items": attempt},
        },
        "additionalProperties": False,
    }
    source_info: Schema = {
        "type": "object",
        "description": "The source as read before the reply.",
        "required": ["width", "height", "format", "orientation", "hasAlpha", "animated", "pages"],
        "properties": {
            "width": {"type": "integer"},
            "height": {"type": "integer"},
            "format": {"type": "string"},
            "orientation": _count(1, 8, "EXIF orientation."),
            "hasAlpha": {"type": "boolean"},
            "animated": {"type": "boolean"},
            "pages": {"type": "integer", "minimum": 1},
        },
        "additionalProperties": False,
    }
    job: Schema = {
        "type": "object",
        "description": "A job's state and outputs (docs/api.md, 'GET /jobs/<id>').",
        "required": [
            "jobId",
            "state",
            "operationType",
            "srcURL",
            "dstURL",
            "attempts",
            "createdAt",
            "startedAt",
            "finishedAt",
            "node",
            "width",
            "height",
            "outputs",
            "sourceInfo",
            "metadata",
            "priority",
            "key",
        ],
        "properties": {
            "jobId": {"$ref": "#/components/schemas/JobId"},
            "state": {"$ref": "#/components/schemas/State"},
            "operationType": {"enum": sorted(OPERATIONS)},
            "srcURL": {"type": ["string", "null"], "description": "null: an uploaded source."},
            "dstURL": {"type": "string", "description": "The first output's URL, as 0.2's."},
            "attempts": {"type": "integer", "minimum": 0},
            "createdAt": {"type": "number", "description": "Unix time, seconds."},
            "startedAt": nullable_number,
            "finishedAt": nullable_number,
            "node": {"type": ["string", "null"], "description": "host:pid that ran it."},
            "width": {"type": "integer", "description": "The first output's, as 0.2's."},
            "height": {"type": "integer"},
            "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/OutputView"}},
            "sourceInfo": {"$ref": "#/components/schemas/SourceInfo"},
            "metadata": {"type": "object"},
            "priority": {"enum": list(PRIORITIES)},
            "key": {"type": ["string", "null"], "description": "The API key's name."},
            "webhook": {"$ref": "#/components/schemas/WebhookDelivery"},
            "error": {
                "type": "object",
                "description": "How a failed job failed.",
                "required": ["code", "message", "detail"],
                "properties": {
                    "code": {"type": "integer"},
                    "message": {"type": "string"},
                    "detail": {"type": "string"},
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    }
    return {
        "JobId": {
            "type": "string",
            "pattern": "^[0-9a-f]{32}$",
            "description": "32 lower-case hex digits.",
        },
        "State": {"enum": [s.value for s in State]},
        "OutputView": output_view,
        "SourceInfo": source_info,
        "WebhookDelivery": webhook,
        "Job": job,
        "JobAccepted": {
            "type": "object",
            "required": ["jobId", "state", "outputs"],
            "properties": {
                "jobId": {"$ref": "#/components/schemas/JobId"},
                "state": {"$ref": "#/components/schemas/State"},
                "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/OutputView"}},
            },
            "additionalProperties": False,
        },
        "V02Accepted": {
            "type": "object",
            "required": ["dstURL", "jobId"],
            "properties": {
                "dstURL": {"type": "string", "description": "Tags filled in, redacted."},
                "jobId": {"$ref": "#/components/schemas/JobId"},
            },
            "additionalProperties": False,
        },
        "JobList": {
            "type": "object",
            "required": ["jobs", "nextCursor"],
            "properties": {
                "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/Job"}},
                "nextCursor": {
                    "type": ["string", "null"],
                    "description": "The next page's cursor; null on the last page.",
                },
            },
            "additionalProperties": False,
        },
        "Redelivery": {
            "type": "object",
            "required": ["jobId", "webhook"],
            "properties": {
                "jobId": {"$ref": "#/components/schemas/JobId"},
                "webhook": {"$ref": "#/components/schemas/WebhookDelivery"},
            },
            "additionalProperties": False,
        },
        "Change": {
            "type": "object",
            "description": "The data of a GET /events event.",
            "required": ["jobId", "state", "at"],
            "properties": {
                "jobId": {"$ref": "#/components/schemas/JobId"},
                "state": {"$ref": "#/components/schemas/State"},
                "at": {"type": "number"},
            },
            "additionalProperties": False,
        },
        "Health": {
            "type": "object",
            "description": "docs/daemon.md, 'GET /health'.",
            "required": [
                "status",
                "version",
                "queue",
                "queueDepth",
                "running",
                "failed",
                "workers",
                "workersAlive",
                "nodes",
                "uptimeS",
                "intake",
            ],
            "properties": {
                "status": {"enum": ["ok", "draining", "degraded"]},
                "version": {"type": "string"},
                "queue": {
                    "type": "object",
                    "description": "Jobs in each state.",
                    "additionalProperties": {"type": "integer"},
                },
                "queueDepth": {"type": "integer"},
                "running": {"type": "integer"},
                "failed": {"type": "integer"},
                "workers": {"type": "integer"},
                "workersAlive": {"type": "integer"},
                "nodes": {"type": "array", "items": {"type": "object"}},
                "uptimeS": {"type": "number"},
                "intake": {
                    "type": "object",
                    "required": ["jobs", "bytes"],
                    "properties": {"jobs": {"type": "integer"}, "bytes": {"type": "integer"}},
                    "additionalProperties": False,
                },
                "detail": {"type": "string", "description": "Only when degraded: why."},
            },
            "additionalProperties": False,
        },
        "Error": {
            "type": "object",
            "description": "Every refusal (docs/errors.md): msg is 'request invalid' below 500, "
            "else the error's message; code is stable (each response's x-imgserve-codes "
            "lists the codes it may carry, x-imgserve-errors all of them); detail says what "
            "was wrong, URLs redacted.",
            "required": ["msg", "code", "detail"],
            "properties": {
                "msg": {"type": "string"},
                "code": {"type": "integer"},
                "detail": {"type": "string"},
            },
            "additionalProperties": False,
        },
        "ParseError": {
            "type": "object",
            "description": "0.2's reply to a POST / body that is not a JSON object (code 100).",
            "required": ["msg"],
            "properties": {"msg": {"const": "request parse error"}},
            "additionalProperties": False,
        },
    }


# --- examples (docs/api.md, README) -------------------------------------------------------

JOB_EXAMPLE: dict[str, Any] = {
    "source": "https://uploads.example.com/u/42/Beach.jpg",
    "outputs": [
        {"url": "s3://media/u/42/{$basename}-{$width}.webp", "width": 2048},
        {"url": "s3://media/u/42/{$basename}-{$width}.jpg", "width": 1280, "quality": 82},
        {"url": "file:///srv/thumbs/{$basename}-{$width}.avif", "width": 640},
        {
            "url": "ftp://u:pw@ftp.example.com/sq/{$basename}.png",
            "width": 200,
            "height": 200,
            "fit": "cover",
            "gravity": "smart",
        },
    ],
    "placeholder": True,
    "metadata": {"uploadId": "42"},
}
UPLOAD_JOB_EXAMPLE: dict[str, Any] = {
    "outputs": [{"url": "file:///srv/t/{$basename}-{$width}.webp", "width": 640}]
}
V02_EXAMPLE: dict[str, Any] = {
    "operationType": "resize",
    "srcURL": "https://example.com/photos/Ex.jpg",
    "dstURL": "ftp://user:pw@example.com/thumbs/{$width}-{$basename}.{$ext}",
    "args": {"width": 200, "height": 120},
}


# --- the document -------------------------------------------------------------------------


def _json(schema_ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_ref}"}}}


def _operation(
    method: str,
    path: str,
    summary: str,
    responses: dict[str, Any],
    *,
    description: str = "",
    **more: Any,
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": more.pop("operationId"),
        "summary": summary,
    }
    if description:
        operation["description"] = description
    operation.update(more)
    if (method, path) in OPEN_OPERATIONS:
        operation["security"] = []
    parse_error = (method, path) == ("post", "/")
    refusals = _error_responses(_codes(method, path), parse_error=parse_error)
    for status, refusal in refusals.items():
        if status in responses:  # a reply of its own at that status (the degraded /health)
            responses[status]["x-imgserve-codes"] = refusal["x-imgserve-codes"]
    operation["responses"] = {**refusals, **responses}
    return operation


_JOB_ID_PARAM = {
    "name": "job_id",
    "in": "path",
    "required": True,
    "schema": {"$ref": "#/components/schemas/JobId"},
}
_IDEMPOTENCY_PARAM = {"$ref": "#/components/parameters/Idempotency-Key"}


def _job_links(job_id: str = "$response.body#/jobId") -> dict[str, Any]:
    """Where a reply naming a job leads (clients and schemathesis' state machine)."""
    return {
        "GetJob": {"operationId": "getJob", "parameters": {"job_id": job_id}},
        "CancelJob": {"operationId": "cancelJob", "parameters": {"job_id": job_id}},
        "RedeliverWebhook": {"operationId": "redeliverWebhook", "parameters": {"job_id": job_id}},
    }


def _paths(max_outputs: int) -> dict[str, Any]:
    job_reply_headers = {
        "Location": {"description": "/jobs/<id>", "schema": {"type": "string"}},
        "Idempotent-Replayed": {"$ref": "#/components/headers/Idempotent-Replayed"},
    }
    return {
        "/": {
            "post": _operation(
                "post",
                "/",
                "imgserve 0.2's job: one source, one output",
                {
                    "200": {
                        "description": "Accepted: the source was read, the result's size "
                        "computed and a placeholder of that size uploaded.",
                        "headers": {
                            "Idempotent-Replayed": {
                                "$ref": "#/components/headers/Idempotent-Replayed"
                            }
                        },
                        "content": _json("V02Accepted"),
                        "links": _job_links(),
                    }
                },
                operationId="submitV02",
                description="0.2's request, reply and codes, unchanged. The body is read as "
                "JSON whatever its Content-Type.",
                parameters=[_IDEMPOTENCY_PARAM],
                requestBody={
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/V02Request"},
                            "examples": {"resize": {"value": V02_EXAMPLE}},
                        }
                    },
                },
            )
        },
        "/jobs": {
            "post": _operation(
                "post",
                "/jobs",
                "A job with one source and 1 to max_outputs outputs",
                {
                    "202": {
                        "description": "Accepted: every output's final URL and size; with "
                        "placeholder, every placeholder is up.",
                        "headers": job_reply_headers,
                        "content": _json("JobAccepted"),
                        "links": _job_links(),
                    }
                },
                operationId="submitJob",
                description="The source as a URL (JSON), or the source itself (multipart: a "
                "job part and a source file part, whose file name gives {$basename}).",
                parameters=[_IDEMPOTENCY_PARAM],
                requestBody={
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/JobRequest"},
                            "examples": {"four outputs": {"value": JOB_EXAMPLE}},
                        },
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "required": ["job", "source"],
                                "properties": {
                                    "job": {"$ref": "#/components/schemas/UploadJobRequest"},
                                    "source": {
                                        "type": "string",
                                        "contentMediaType": "application/octet-stream",
                                        "description": "The image; the part needs a file name.",
                                    },
                                },
                            },
                            "encoding": {"job": {"contentType": "application/json"}},
                        },
                    },
                },
            ),
            "get": _operation(
                "get",
                "/jobs",
                "List jobs, newest first, a page at a time",
                {
                    "200": {
                        "description": "A page of jobs.",
                        "content": _json("JobList"),
                        "links": _job_links("$response.body#/jobs/0/jobId"),
                    }
                },
                operationId="listJobs",
                description="A key that is not admin sees only its own jobs.",
                parameters=[
                    {
                        "name": "state",
                        "in": "query",
                        "schema": {"$ref": "#/components/schemas/State"},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": LIST_LIMIT_MAX,
                            "default": LIST_LIMIT_DEFAULT,
                        },
                    },
                    {
                        "name": "cursor",
                        "in": "query",
                        "description": "nextCursor of the previous page.",
                        "schema": {"$ref": "#/components/schemas/Cursor"},
                    },
                ],
            ),
        },
        "/jobs/{job_id}": {
            "parameters": [_JOB_ID_PARAM],
            "get": _operation(
                "get",
                "/jobs/{job_id}",
                "A job's state and outputs",
                {"200": {"description": "The job.", "content": _json("Job")}},
                operationId="getJob",
            ),
            "delete": _operation(
                "delete",
                "/jobs/{job_id}",
                "Cancel a queued job",
                {"200": {"description": "Cancelled: the job's view.", "content": _json("Job")}},
                operationId="cancelJob",
                description="A job running or ended is 409 (613).",
            ),
        },
        "/jobs/{job_id}/webhook": {
            "parameters": [_JOB_ID_PARAM],
            "post": _operation(
                "post",
                "/jobs/{job_id}/webhook",
                "Send the job's latest webhook event again",
                {
                    "202": {
                        "description": "Re-armed: pending, due at once, same webhook-id.",
                        "content": _json("Redelivery"),
                    }
                },
                operationId="redeliverWebhook",
            ),
        },
        "/events": {
            "get": _operation(
                "get",
                "/events",
                "Job state changes as Server-Sent Events",
                {
                    "200": {
                        "description": "An endless stream: `id:` (opaque, increasing), "
                        "`event: job.<state>`, `data:` a Change as JSON; `: ping` every 15 s. "
                        "Ends when the daemon drains; resume with Last-Event-ID.",
                        "content": {
                            "text/event-stream": {
                                "schema": {"type": "string"},
                                "x-imgserve-event-data": {"$ref": "#/components/schemas/Change"},
                            }
                        },
                    }
                },
                operationId="streamEvents",
                parameters=[
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "description": "Start right after this change (else from now on).",
                        "schema": {"$ref": "#/components/schemas/Cursor"},
                    },
                    {
                        "name": "after",
                        "in": "query",
                        "description": "As Last-Event-ID, for clients that cannot set it.",
                        "schema": {"$ref": "#/components/schemas/Cursor"},
                    },
                ],
            )
        },
        "/health": {
            "get": _operation(
                "get",
                "/health",
                "The daemon's state, queue counts and workers",
                {
                    "200": {"description": "Serving.", "content": _json("Health")},
                    "503": {
                        "description": "Degraded (the Health body, with detail), or the "
                        "queue is unavailable (608).",
                        "headers": {"Retry-After": {"$ref": "#/components/headers/Retry-After"}},
                        "content": {
                            "application/json": {
                                "schema": {
                                    "oneOf": [
                                        {"$ref": "#/components/schemas/Health"},
                                        {"$ref": "#/components/schemas/Error"},
                                    ]
                                }
                            }
                        },
                    },
                },
                operationId="health",
            )
        },
        "/livez": {
            "get": _operation(
                "get",
                "/livez",
                "Liveness: the process answers",
                {
                    "200": {
                        "description": "Alive.",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["status"],
                                    "properties": {"status": {"const": "alive"}},
                                    "additionalProperties": False,
                                }
                            }
                        },
                    }
                },
                operationId="livez",
            )
        },
        "/metrics": {
            "get": _operation(
                "get",
                "/metrics",
                "Prometheus metrics (docs/operating.md)",
                {
                    "200": {
                        "description": "The Prometheus text exposition format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
                operationId="metrics",
            )
        },
        "/openapi.json": {
            "get": _operation(
                "get",
                "/openapi.json",
                "This document",
                {
                    "200": {
                        "description": "The OpenAPI 3.1 document of this API.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
                operationId="openapi",
            )
        },
        **_ui_paths(),
    }


def _ui_paths() -> dict[str, Any]:
    """The dashboard (docs/operating.md "Dashboard"): its page and files, and the
    history its chart reads."""
    count = {"type": "integer", "minimum": 0}
    since = {"type": ["integer", "null"], "minimum": 0}
    sample = {
        "type": "object",
        "required": ["at", *(state.value for state in State), "doneSince", "failedSince"],
        "properties": {
            "at": {"type": "number", "description": "Unix time of the sample"},
            **{state.value: count for state in State},
            "doneSince": since,
            "failedSince": since,
        },
        "additionalProperties": False,
    }
    paths: dict[str, Any] = {
        "/ui": {
            "get": _operation(
                "get",
                "/ui",
                "The dashboard page",
                {
                    "200": {
                        "description": "The page (its data is read with a key).",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
                operationId="dashboard",
            )
        },
        "/ui/": {
            "get": _operation(
                "get",
                "/ui/",
                "The dashboard page's other URL",
                {"302": {"description": "To /ui."}},
                operationId="dashboardSlash",
            )
        },
        "/ui/history": {
            "get": _operation(
                "get",
                "/ui/history",
                "The last hour of queue counts, a sample every 10 s (the dashboard's chart)",
                {
                    "200": {
                        "description": "The samples, oldest first.",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["intervalS", "samples"],
                                    "properties": {
                                        "intervalS": {"type": "number"},
                                        "samples": {"type": "array", "items": sample},
                                    },
                                    "additionalProperties": False,
                                }
                            }
                        },
                    }
                },
                operationId="dashboardHistory",
            )
        },
    }
    for name, content_type in UI_ASSETS.items():
        path = f"/ui/{name}"
        paths[path] = {
            "get": _operation(
                "get",
                path,
                f"A file of the dashboard page: {name}",
                {
                    "200": {
                        "description": "The file.",
                        "content": {content_type.split(";")[0]: {"schema": {"type": "string"}}},
                    }
                },
                operationId="dashboardFile"
                + "".join(part.capitalize() for part in name.replace("-", ".").split(".")),
            )
        }
    return paths


def _components(max_outputs: int) -> dict[str, Any]:
    schemas = {
        "V02Request": _v02_schema(),
        "JobRequest": _job_schema(max_outputs),
        "UploadJobRequest": _upload_job_schema(max_outputs),
        "Output": _output_schema(),
        "Cursor": {
            "type": "string",
            "minLength": 1,
            "maxLength": CURSOR_MAX_CHARS,
            "pattern": r"^[\x20-\x7e]+$",
            "description": "Opaque: a value imgserve gave (nextCursor, an event id).",
        },
        **_view_schemas(),
    }
    return {
        "schemas": schemas,
        "parameters": {
            "Idempotency-Key": {
                "name": "Idempotency-Key",
                "in": "header",
                "description": "Answer once: the same key with the same request replays the "
                "first reply (Idempotent-Replayed: true); with another request, 422 (130).",
                "schema": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": IDEMPOTENCY_KEY_MAX_CHARS,
                    "pattern": PRINTABLE,
                },
            }
        },
        "headers": {
            "Retry-After": {
                "description": "Seconds to wait before trying again.",
                "schema": {"type": "string", "pattern": "^[0-9]+$"},
            },
            "WWW-Authenticate": {
                "description": 'Bearer realm="imgserve" (with error="invalid_token" for 141).',
                "schema": {"type": "string"},
            },
            "Idempotent-Replayed": {
                "description": "true: this is the first reply to the Idempotency-Key, again.",
                "schema": {"const": "true"},
            },
        },
        "securitySchemes": {
            "apiKey": {
                "type": "http",
                "scheme": "bearer",
                "description": "An API key (docs/security.md): `Authorization: Bearer isk_...`. "
                "Needed only when the server has a keys file; a key may be limited to its "
                "sources, destinations, limits and rate, and sees only its own jobs unless "
                "admin.",
            }
        },
    }


def document(max_outputs: int = DEFAULT_MAX_OUTPUTS) -> dict[str, Any]:
    """The OpenAPI 3.1 document of imgserve's HTTP API."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "imgserve",
            "version": __version__,
            "summary": "Image-processing daemon: JSON jobs over HTTP, placeholder-then-replace.",
            "description": "docs/api.md tells the same in words. Every refusal is an Error "
            "body with a stable code (docs/errors.md); x-imgserve-errors lists them all.",
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "servers": [{"url": "http://localhost:8602", "description": "The default port."}],
        "security": [{}, {"apiKey": []}],
        "paths": _paths(max_outputs),
        "components": _components(max_outputs),
        "x-imgserve-errors": error_catalogue(),
    }


def render(doc: dict[str, Any]) -> str:
    """The document as openapi.json holds it (sorted keys would scatter each operation)."""
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


@functools.cache
def served() -> bytes:
    """openapi.json as kept beside this module (read once)."""
    return importlib.resources.files("imgserve").joinpath(FILE_NAME).read_bytes()


if __name__ == "__main__":  # python -m imgserve.openapi > src/imgserve/openapi.json
    sys.stdout.write(render(document()))

"""The ``POST /jobs`` request contract: every 7xx refusal with its field path, and
accepted jobs mapped to their JobSpec."""

from __future__ import annotations

import json
from typing import Any

import pytest

from imgserve import errors
from imgserve.imaging.formats import Format
from imgserve.imaging.operations import Crop, Operations, Pad, Watermark
from imgserve.request_jobs import METADATA_MAX_BYTES, decode_job, validate_jobs
from imgserve.spec import JobSpec, OutputRequest

MAX = 16
SRC = "https://uploads.example.com/u/42/Beach.jpg"


def _out(**fields: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"url": "s3://media/{$basename}-{$width}.webp", "width": 640}
    out.update(fields)
    return {key: value for key, value in out.items() if value is not _DROP}


def _job(*outputs: dict[str, Any], **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"source": SRC, "outputs": list(outputs) or [_out()]}
    body.update(fields)
    return {key: value for key, value in body.items() if value is not _DROP}


_DROP = object()
"""A field value meaning "leave the field out"."""


# (case id, body, expected code, the detail's start)
INVALID: list[tuple[str, dict[str, Any], int, str]] = [
    ("source missing", _job(source=_DROP), 701, "source: missing"),
    ("source not a string", _job(source=42), 703, "source: not a string (got 42)"),
    ("source null", _job(source=None), 703, "source: not a string"),
    ("source empty", _job(source=""), 705, "source: empty"),
    ("source blank", _job(source="  "), 705, "source: empty"),
    (
        "source scheme",
        _job(source="gopher://h/a.jpg"),
        705,
        "source: scheme 'gopher' is not one of file, ftp, ftps, http, https, s3",
    ),
    ("source no scheme", _job(source="/srv/a.jpg"), 705, "source: scheme '(none)'"),
    ("source control char", _job(source="http://h/a\n.jpg"), 705, "source: holds the control"),
    ("source lone surrogate", _job(source="http://h/\ud800.jpg"), 705, "source: holds the"),
    ("source broken IPv6 host", _job(source="http://[::1/a.jpg"), 705, "source: malformed"),
    ("unknown top-level field", _job(callback="x"), 702, "callback: unknown field"),
    ("unknown odd top-level field", _job(**{"a b": 1}), 702, "'a b': unknown field"),
    ("outputs missing", _job(outputs=_DROP), 701, "outputs: missing"),
    ("outputs an object", _job(outputs={"url": "x"}), 703, "outputs: not a list"),
    ("outputs empty", _job(outputs=[]), 704, "outputs: empty, at least 1"),
    ("outputs too many", _job(*[_out()] * 17), 704, "outputs: 17 outputs, at most 16"),
    ("output not an object", _job(_out(), "s3://b/a.png"), 703, "outputs[1]: not an object"),
    ("output unknown field", _job(_out(trim=True)), 702, "outputs[0].trim: unknown field"),
    ("output 0.2 field name", _job(_out(field_name="f")), 702, "outputs[0].field_name: unknown"),
    # operations (#16)
    ("crop not an object", _job(_out(crop=[0, 0, 1, 1])), 703, "outputs[0].crop: not an object"),
    (
        "crop side missing",
        _job(_out(crop={"left": 0, "top": 0, "width": 5})),
        701,
        "outputs[0].crop.height: missing",
    ),
    ("crop unknown key", _job(_out(crop={"x": 0})), 702, "outputs[0].crop.x: unknown field"),
    (
        "crop negative",
        _job(_out(crop={"left": -1, "top": 0, "width": 5, "height": 5})),
        703,
        "outputs[0].crop.left: not an integer from 0 to",
    ),
    (
        "crop empty",
        _job(_out(crop={"left": 0, "top": 0, "width": 0, "height": 5})),
        703,
        "outputs[0].crop.width: not an integer from 1 to",
    ),
    ("rotate a string", _job(_out(rotate="90")), 703, "outputs[0].rotate: not a number"),
    ("rotate past a turn", _job(_out(rotate=400)), 703, "outputs[0].rotate: 400 is out of range"),
    (
        "rotate 45 without background",
        _job(_out(rotate=45)),
        703,
        "outputs[0].rotate: 45 is not 0, 90, 180 or 270: an angle between them needs a background",
    ),
    ("flip not a bool", _job(_out(flip=1)), 703, "outputs[0].flip: not true or false"),
    ("blur too small", _job(_out(blur=0.1)), 703, "outputs[0].blur: 0.1 is out of range"),
    ("blur nan", _job(_out(blur=float("nan"))), 703, "outputs[0].blur: not a number"),
    ("sharpen too large", _job(_out(sharpen=11)), 703, "outputs[0].sharpen: 11 is out of range"),
    ("grayscale a string", _job(_out(grayscale="yes")), 703, "outputs[0].grayscale: not true"),
    ("pad negative", _job(_out(pad={"top": -1})), 703, "outputs[0].pad.top: not an integer"),
    ("pad unknown side", _job(_out(pad={"up": 1})), 702, "outputs[0].pad.up: unknown field"),
    ("pad too wide", _job(_out(pad={"left": 4097})), 703, "outputs[0].pad.left: not an integer"),
    (
        "watermark a string",
        _job(_out(watermark="logo")),
        703,
        "outputs[0].watermark: not an object",
    ),
    ("watermark without name", _job(_out(watermark={})), 701, "outputs[0].watermark.name: missing"),
    (
        "watermark none configured",
        _job(_out(watermark={"name": "logo"})),
        703,
        "outputs[0].watermark.name: 'logo' is not a watermark of this server; none are configured",
    ),
    ("url missing", _job(_out(url=_DROP)), 701, "outputs[0].url: missing"),
    ("url not a string", _job(_out(url=["s3://b/a.png"])), 703, "outputs[0].url: not a string"),
    ("url empty", _job(_out(url="")), 705, "outputs[0].url: empty"),
    (
        "url scheme",
        _job(_out(), _out(url="gopher://h/a.png")),
        705,
        "outputs[1].url: scheme 'gopher' is not one of file, ftp, ftps, http, https, s3",
    ),
    ("url control char", _job(_out(url="s3://b/a\x00.png")), 705, "outputs[0].url: holds the"),
    ("url DEL", _job(_out(url="s3://b/a\x7f.png")), 705, "outputs[0].url: holds the"),
    ("url unknown tag", _job(_out(url="s3://b/{$size}.png")), 705, "outputs[0].url: unknown tag"),
    ("url broken IPv6 host", _job(_out(url="http://[::1/a.png")), 705, "outputs[0].url: malformed"),
    (
        "form syntax without form_field",
        _job(_out(url="http://h/upload:a.png")),
        705,
        "outputs[0].url: uses the URL:filename form upload syntax",
    ),
    (
        "form_field without form syntax",
        _job(_out(url="http://h/upload/a.png", form_field="file")),
        705,
        "outputs[0].url: a form upload (form_field) needs",
    ),
    (
        "form_field for s3",
        _job(_out(url="s3://b/a.png", form_field="file")),
        703,
        "outputs[0].form_field: applies to http(s) destinations, not s3",
    ),
    ("form_field empty", _job(_out(form_field="")), 703, "outputs[0].form_field: not a non-empty"),
    ("form_field a number", _job(_out(form_field=3)), 703, "outputs[0].form_field: not a"),
    (
        "form_field control char",
        _job(_out(url="http://h/up:a.png", form_field="f\r\nX: y")),
        703,
        "outputs[0].form_field: holds the control character U+000D",
    ),
    ("no size", _job(_out(width=_DROP)), 701, "outputs[0]: give width, height or both"),
    (
        "width negative",
        _job(*[_out()] * 3, _out(width=-5)),
        703,
        "outputs[3].width: not a positive integer (got -5)",
    ),
    ("width zero", _job(_out(width=0)), 703, "outputs[0].width: not a positive integer (got 0)"),
    ("width a string", _job(_out(width="640")), 703, "outputs[0].width: not a positive integer"),
    ("width a float", _job(_out(width=640.0)), 703, "outputs[0].width: not a positive integer"),
    ("width a bool", _job(_out(width=True)), 703, "outputs[0].width: not a positive integer"),
    ("width null", _job(_out(width=None)), 703, "outputs[0].width: not a positive integer"),
    (
        "width huge",
        _job(_out(width=10**400)),
        703,
        "outputs[0].width: (a huge int) is over the largest side, 10000000 px",
    ),
    (
        "height over the largest side",
        _job(_out(width=_DROP, height=10_000_001)),
        703,
        "outputs[0].height: 10000001 is over the largest side",
    ),
    ("height negative", _job(_out(height=-1)), 703, "outputs[0].height: not a positive integer"),
    ("scale zero", _job(_out(width=_DROP, scale=0)), 703, "outputs[0].scale: not a positive"),
    ("scale a string", _job(_out(width=_DROP, scale="2")), 703, "outputs[0].scale: not a positive"),
    ("scale a bool", _job(_out(width=_DROP, scale=True)), 703, "outputs[0].scale: not a positive"),
    (
        "scale infinite",
        _job(_out(width=_DROP, scale=float("inf"))),
        703,
        "outputs[0].scale: not a finite number",
    ),
    ("scale with width", _job(_out(scale=2)), 703, "outputs[0].scale: give scale or width/height"),
    ("scale too large", _job(_out(width=_DROP, scale=1e8)), 703, "outputs[0].scale: 100000000.0"),
    ("fit unknown", _job(_out(fit="crop")), 703, "outputs[0].fit: 'crop' is not one of contain"),
    ("fit wrong case", _job(_out(fit="Cover")), 703, "outputs[0].fit: 'Cover' is not one of"),
    ("fit a number", _job(_out(fit=1)), 703, "outputs[0].fit: 1 is not one of"),
    ("gravity unknown", _job(_out(gravity="up")), 703, "outputs[0].gravity: 'up' is not one of"),
    ("gravity a list", _job(_out(gravity=["north"])), 703, "outputs[0].gravity: ['north']"),
    ("enlarge a string", _job(_out(enlarge="yes")), 703, "outputs[0].enlarge: not true or false"),
    ("enlarge a number", _job(_out(enlarge=1)), 703, "outputs[0].enlarge: not true or false"),
    (
        "keep_metadata null",
        _job(_out(keep_metadata=None)),
        703,
        "outputs[0].keep_metadata: not true or false",
    ),
    ("quality zero", _job(_out(quality=0)), 703, "outputs[0].quality: not an integer from 1"),
    ("quality 101", _job(_out(quality=101)), 703, "outputs[0].quality: not an integer from 1"),
    ("quality a float", _job(_out(quality=80.5)), 703, "outputs[0].quality: not an integer"),
    ("background a name", _job(_out(background="red")), 703, "outputs[0].background: 'red'"),
    ("background 5 digits", _job(_out(background="#12345")), 703, "outputs[0].background:"),
    ("background no hash", _job(_out(background="ffffff")), 703, "outputs[0].background:"),
    ("background non-hex", _job(_out(background="#ggg")), 703, "outputs[0].background:"),
    ("background other digits", _job(_out(background="#١٢٣")), 703, "outputs[0].background:"),
    ("background a list", _job(_out(background=[0, 0, 0])), 703, "outputs[0].background:"),
    (
        "format unknown",
        _job(_out(format="bmp")),
        706,
        "outputs[0].format: 'bmp' is not one of jpeg, jpg, png, webp, avif, gif, tiff",
    ),
    ("format heif", _job(_out(format="heif")), 706, "outputs[0].format: 'heif' is not one of"),
    ("format a number", _job(_out(format=1)), 706, "outputs[0].format: 1 is not one of"),
    (
        "format from a bad extension",
        _job(_out(url="s3://b/a.bmp")),
        706,
        "outputs[0].format: missing, and the url's extension 'bmp' names no output format",
    ),
    (
        "format from no extension",
        _job(_out(url="s3://b/{$basename}")),
        706,
        "outputs[0].format: missing, and the url's extension '(none)'",
    ),
    ("placeholder a string", _job(placeholder="no"), 703, "placeholder: not true or false"),
    ("metadata a list", _job(metadata=["42"]), 703, "metadata: not a JSON object"),
    ("metadata a string", _job(metadata="42"), 703, "metadata: not a JSON object"),
    (
        "metadata too large",
        _job(metadata={"k": "x" * 8990}),
        709,
        "metadata: 8998 bytes as JSON, at most 8192",
    ),
    (
        "rotate beyond a float's range (JSON carries it)",
        _job(_out(rotate=10**400)),
        703,
        "outputs[0].rotate: (a huge int) is out of range",
    ),
    (
        "scale beyond a float's range",
        _job(_out(width=_DROP, scale=10**400)),
        703,
        "outputs[0].scale: (a huge int) is over",
    ),
    (
        "metadata counted as UTF-8",
        _job(metadata={"k": "é" * 4095}),
        709,
        "metadata: 8198 bytes as JSON, at most 8192",
    ),
]


@pytest.mark.parametrize(
    ("body", "code", "detail"), [row[1:] for row in INVALID], ids=[row[0] for row in INVALID]
)
def test_invalid_jobs_are_refused_with_their_code_and_field_path(
    body: dict[str, Any], code: int, detail: str
) -> None:
    """Each mistake is its 7xx code (a 400 RequestInvalid) with the field path first."""
    with pytest.raises(errors.RequestInvalid) as info:
        validate_jobs(body, max_outputs=MAX)
    assert (info.value.code, info.value.status) == (code, 400)
    assert info.value.detail.startswith(detail), info.value.detail


# (case id, body, uploaded file name, expected code, the detail's start)
UPLOAD_INVALID: list[tuple[str, dict[str, Any], str, int, str]] = [
    ("a source URL and a file part", _job(), "a.jpg", 707, "source: give the source as a URL"),
    ("a null source and a file part", _job(source=None), "a.jpg", 707, "source: give the"),
    ("an empty file name", _job(source=_DROP), "", 707, "source: the file part's file name"),
    ("a file name that is a path", _job(source=_DROP), "dir/", 707, "source: the file part's"),
    ("a blank file name", _job(source=_DROP), "C:\\u\\ ", 707, "source: the file part's"),
    (
        "a control character in the file name",
        _job(source=_DROP),
        "a\nb.jpg",
        707,
        "source: the file part's file name holds the control character U+000A",
    ),
]


@pytest.mark.parametrize(
    ("body", "name", "code", "detail"),
    [row[1:] for row in UPLOAD_INVALID],
    ids=[row[0] for row in UPLOAD_INVALID],
)
def test_invalid_uploads_are_refused(
    body: dict[str, Any], name: str, code: int, detail: str
) -> None:
    """A multipart job with a bad file name, or a source URL too, is 707 naming source."""
    with pytest.raises(errors.JobUploadInvalid) as info:
        validate_jobs(body, max_outputs=MAX, uploaded_name=name)
    assert info.value.code == code
    assert info.value.detail.startswith(detail), info.value.detail


def test_unknown_fields_are_all_named() -> None:
    """Several unknown fields: the first is the path, the others are listed after it."""
    with pytest.raises(errors.JobFieldUnknown) as info:
        validate_jobs(_job(zeta=1, alpha=2), max_outputs=MAX)
    assert info.value.detail.startswith("alpha: unknown field (also unknown: zeta)")


def test_shown_values_are_bounded() -> None:
    """A huge value in a refused field is cut in the detail, not echoed whole."""
    with pytest.raises(errors.JobFieldInvalid) as info:
        validate_jobs(_job(_out(width="9" * 100_000)), max_outputs=MAX)
    assert len(info.value.detail) < 200


def test_max_outputs_is_the_callers_limit() -> None:
    """max_outputs outputs are accepted, one more is 704."""
    assert len(validate_jobs(_job(*[_out()] * 3), max_outputs=3).outputs) == 3
    with pytest.raises(errors.JobOutputsCount, match=r"^outputs: 4 outputs, at most 3$"):
        validate_jobs(_job(*[_out()] * 4), max_outputs=3)


ISSUE_EXAMPLE = """
{"source": "https://uploads.example.com/u/42/Beach.jpg",
 "outputs": [
   {"url": "s3://media/u/42/{$basename}-{$width}.webp", "width": 2048},
   {"url": "s3://media/u/42/{$basename}-{$width}.jpg", "width": 1280, "quality": 82},
   {"url": "file:///srv/thumbs/{$basename}-{$width}.avif", "width": 640},
   {"url": "ftp://u:pw@ftp.example.com/sq/{$basename}.png", "width": 200, "height": 200,
    "fit": "cover", "gravity": "smart"}],
 "placeholder": true,
 "metadata": {"uploadId": "42"}}
"""


def test_the_issue_example_maps_to_its_jobspec() -> None:
    """The example body of #12 becomes one source and four outputs in request order."""
    spec = validate_jobs(decode_job(ISSUE_EXAMPLE.encode()), max_outputs=MAX)
    assert spec == JobSpec(
        source_url=SRC,
        source_name="Beach.jpg",
        outputs=(
            OutputRequest(url="s3://media/u/42/{$basename}-{$width}.webp", width=2048),
            OutputRequest(url="s3://media/u/42/{$basename}-{$width}.jpg", width=1280, quality=82),
            OutputRequest(url="file:///srv/thumbs/{$basename}-{$width}.avif", width=640),
            OutputRequest(
                url="ftp://u:pw@ftp.example.com/sq/{$basename}.png",
                width=200,
                height=200,
                fit="cover",
                gravity="smart",
            ),
        ),
        operation=None,
        placeholder=True,
        metadata={"uploadId": "42"},
    )
    assert spec.basename == "Beach"
    assert JobSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_defaults() -> None:
    """Left out: placeholder on, metadata empty, cover, centre, no enlarge, format from the url."""
    spec = validate_jobs(
        {"source": SRC, "outputs": [{"url": "file:///o/a.jpg", "height": 9}]}, max_outputs=MAX
    )
    assert spec.placeholder is True
    assert spec.metadata == {}
    assert spec.operation is None
    (out,) = spec.outputs
    assert out == OutputRequest(url="file:///o/a.jpg", height=9)
    assert (out.fit, out.gravity, out.enlarge, out.format, out.refuse_small) == (
        "cover",
        "centre",
        False,
        None,
        False,
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("jpg", Format.JPEG),
        ("jpeg", Format.JPEG),
        ("png", Format.PNG),
        ("webp", Format.WEBP),
        ("avif", Format.AVIF),
        ("gif", Format.GIF),
        ("tiff", Format.TIFF),
    ],
)
def test_format_names(name: str, expected: Format) -> None:
    """Each format name (jpg an alias of jpeg) gives its Format, whatever the url's extension."""
    (out,) = validate_jobs(
        _job(_out(url="s3://b/no-extension", format=name)), max_outputs=MAX
    ).outputs
    assert out.format is expected


@pytest.mark.parametrize(
    "url",
    ["s3://b/a.{$ext}", "s3://b/a.{$extension}", "s3://b/a.JPG", "http://h/up:{$basename}.tif"],
)
def test_format_from_the_url(url: str) -> None:
    """No format: a url extension that names one, or a tag planning fills in, is accepted."""
    form = {"form_field": "file"} if url.startswith("http") else {}
    (out,) = validate_jobs(_job(_out(url=url, **form)), max_outputs=MAX).outputs
    assert out.format is None


@pytest.mark.parametrize(
    ("colour", "rgba"),
    [
        ("#fff", (255, 255, 255, 255)),
        ("#0f08", (0, 255, 0, 136)),
        ("#1a2B3c", (26, 43, 60, 255)),
        ("#1a2b3c4d", (26, 43, 60, 77)),
        ("#00000000", (0, 0, 0, 0)),
    ],
)
def test_background_colours(colour: str, rgba: tuple[int, int, int, int]) -> None:
    """CSS hex colours of 3, 4, 6 and 8 digits become RGBA 0-255."""
    (out,) = validate_jobs(_job(_out(background=colour, fit="contain")), max_outputs=MAX).outputs
    assert out.background == rgba
    assert out.fit == "contain"


def test_every_output_field() -> None:
    """Each output field given lands in the OutputRequest (gravity lower-cased)."""
    out = {
        "url": "https://h/upload.php:{$basename}.png",
        "width": 300,
        "height": 200,
        "fit": "outside",
        "gravity": "NorthEast",
        "enlarge": True,
        "format": "webp",
        "quality": 70,
        "keep_metadata": True,
        "background": "#102030",
        "form_field": "file",
    }
    (got,) = validate_jobs(_job(out), max_outputs=MAX).outputs
    assert got == OutputRequest(
        url="https://h/upload.php:{$basename}.png",
        width=300,
        height=200,
        fit="outside",
        gravity="northeast",
        enlarge=True,
        format=Format.WEBP,
        quality=70,
        keep_metadata=True,
        background=(16, 32, 48, 255),
        form_field="file",
    )


@pytest.mark.parametrize("fit", ["cover", "contain", "fill", "inside", "outside"])
def test_fit_with_one_side_is_accepted(fit: str) -> None:
    """Every fit is accepted with only one side given (where it changes nothing)."""
    (out,) = validate_jobs(_job(_out(fit=fit)), max_outputs=MAX).outputs
    assert (out.fit, out.width, out.height) == (fit, 640, None)


def test_scale_is_accepted_for_planning_to_judge() -> None:
    """scale alone is accepted (an int becomes a float); planning refuses it for raster sources."""
    (out,) = validate_jobs(_job(_out(width=_DROP, scale=2)), max_outputs=MAX).outputs
    assert (out.scale, out.width, out.height) == (2.0, None, None)
    assert isinstance(out.scale, float)


def test_placeholder_off_and_metadata_kept() -> None:
    """placeholder false and a metadata object up to the limit are kept as sent."""
    metadata = {"k": "x" * (METADATA_MAX_BYTES - len('{"k":"","n":null}')), "n": None}
    spec = validate_jobs(_job(placeholder=False, metadata=metadata), max_outputs=MAX)
    assert spec.placeholder is False
    assert spec.metadata == metadata


def test_uploaded_source() -> None:
    """With a file part, the spec has no source URL and the file's name, its path removed."""
    spec = validate_jobs(_job(source=_DROP), max_outputs=MAX, uploaded_name="C:\\fakepath\\Me.HEIC")
    assert (spec.source_url, spec.source_name) == (None, "Me.HEIC")
    assert (spec.basename, spec.extension) == ("Me", "heic")
    spec = validate_jobs(_job(source=_DROP), max_outputs=MAX, uploaded_name="photos/beach.jpg")
    assert spec.source_name == "beach.jpg"


def test_source_name_from_the_url() -> None:
    """A source URL's name is its path's last segment (the query left out)."""
    spec = validate_jobs(_job(source="s3://bucket/dir/Cat.PNG?versionId=3"), max_outputs=MAX)
    assert (spec.source_name, spec.basename) == ("Cat.PNG", "Cat")


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"", "body: is not JSON"),
        (b"[1]", "body: is not a JSON object"),
        (b'{"a": NaN}', "body: is not JSON"),
        (b'{"a": ' + b"[" * 50 + b"]" * 50 + b"}", "body: nests deeper than 20 levels"),
        (b"\xff", "body: is not JSON"),
    ],
)
def test_decode_job_refuses_anything_but_an_object(body: bytes, detail: str) -> None:
    """A body that is not a strict JSON object is 700, naming where it was read."""
    with pytest.raises(errors.JobBodyInvalid) as info:
        decode_job(body)
    assert (info.value.code, info.value.status) == (700, 400)
    assert info.value.detail.startswith(detail), info.value.detail


def test_decode_job_names_the_part() -> None:
    """The multipart job part is named "job" in the detail."""
    with pytest.raises(errors.JobBodyInvalid, match=r"^job: is not a JSON object$"):
        decode_job(b'"x"', where="job")
    assert decode_job(b'{"outputs": []}', where="job") == {"outputs": []}


def test_every_7xx_code_is_covered() -> None:
    """The tables above exercise every POST /jobs code errors.py defines (708 is the API's)."""
    defined = {cls.code for cls in errors.all_errors() if 700 <= cls.code <= 799}
    covered = {row[2] for row in INVALID} | {row[3] for row in UPLOAD_INVALID}
    assert defined - {700, 708} <= covered
    assert {700, 708} <= defined  # 700: test_decode_job_*; 708: raised by api.py


def test_api_side_errors_have_their_codes() -> None:
    """The errors the API raises itself: 707 for multipart parts, 708 (415) for the media type."""
    assert (errors.JobUploadInvalid.code, errors.JobUploadInvalid.status) == (707, 400)
    media = errors.JobMediaTypeUnsupported("Content-Type: text/plain")
    assert (media.code, media.status, media.detail) == (708, 415, "Content-Type: text/plain")
    assert isinstance(media, errors.RequestInvalid)


def test_operations_are_read_into_the_output() -> None:
    """Every operation field reaches the OutputRequest, rotate taken modulo a turn."""
    body = _job(
        _out(
            crop={"left": 1, "top": 2, "width": 30, "height": 40},
            rotate=-90,
            flip=True,
            flop=True,
            blur=2,
            sharpen=0.5,
            grayscale=True,
            pad={"top": 3, "left": 4},
            watermark={"name": "logo", "gravity": "north", "opacity": 0.4, "scale": 0.25,
                       "margin": 6},
        )
    )  # fmt: skip
    spec = validate_jobs(body, max_outputs=MAX, watermarks=frozenset({"logo"}))
    assert spec.outputs[0].ops == Operations(
        crop=Crop(1, 2, 30, 40),
        rotate=270,
        flip=True,
        flop=True,
        blur=2.0,
        sharpen=0.5,
        grayscale=True,
        pad=Pad(top=3, left=4),
        watermark=Watermark("logo", gravity="north", opacity=0.4, scale=0.25, margin=6),
    )
    assert validate_jobs(_job(), max_outputs=MAX).outputs[0].ops == Operations()

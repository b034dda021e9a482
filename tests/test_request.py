"""The JSON request contract of 0.2: parse, validate (every 1xx code), tags, form URLs."""

from __future__ import annotations

from typing import Any

import pytest

from imgserve import errors
from imgserve.destination import destination_extension, split_form_destination, substitute
from imgserve.request import Job, parse_body, validate


def _req(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "operationType": "resize",
        "srcURL": "http://example.com/photos/cat.jpg",
        "dstURL": "file:///out/{$width}x{$height}-{$basename}.png",
        "args": {"width": 100, "height": 80},
    }
    body.update(overrides)
    return body


def _args(**args: Any) -> dict[str, Any]:
    return _req(args=args)


def _without(key: str) -> dict[str, Any]:
    body = _req()
    del body[key]
    return body


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"[1, 2]", b'"a string"', b"42", b"null", b"\xff\xfe"],
)
def test_parse_body_refuses_anything_but_an_object(body: bytes) -> None:
    """A body that is not a JSON object is 0.2's "request parse error" (100)."""
    with pytest.raises(errors.RequestParseError) as info:
        parse_body(body)
    assert info.value.code == 100
    assert info.value.message == "request parse error"


def test_parse_body_returns_the_object() -> None:
    """A JSON object body is decoded as is."""
    assert parse_body(b'{"a": 1}') == {"a": 1}


# (case id, request, expected code)
INVALID: list[tuple[str, dict[str, Any], int]] = [
    ("missing operationType", _without("operationType"), 101),
    ("missing srcURL", _without("srcURL"), 101),
    ("missing dstURL", _without("dstURL"), 101),
    ("missing args", _without("args"), 101),
    ("unknown key", {**_req(), "callback": "x"}, 101),
    ("empty object", {}, 101),
    ("unknown operation", _req(operationType="crop"), 102),
    ("operation not a string", _req(operationType=3), 102),
    ("operation wrong case", _req(operationType="Resize"), 102),
    ("args a list", _req(args=[100, 80]), 103),
    ("args a string", _req(args="width=100"), 103),
    ("args null", _req(args=None), 103),
    ("empty srcURL", _req(srcURL=""), 104),
    ("blank srcURL", _req(srcURL="   "), 104),
    ("srcURL not a string", _req(srcURL=None), 104),
    ("empty dstURL", _req(dstURL=""), 105),
    ("dstURL not a string", _req(dstURL=7), 105),
    ("no width nor height", _args(), 106),
    ("width zero", _args(width=0, height=10), 106),
    ("width negative", _args(width=-5), 106),
    ("width a string", _args(width="100"), 106),
    ("width a float", _args(width=10.5), 106),
    ("width a bool", _args(width=True), 106),
    ("height zero", _args(width=10, height=0), 107),
    ("height a string", _args(height="80"), 107),
    ("height null-ish float", _args(height=1.0), 107),
    ("rasterize a PNG", _req(operationType="rasterize", srcURL="http://h/a.png"), 108),
    ("resize an SVG", _req(srcURL="http://h/drawing.svg"), 108),
    ("source scheme gopher", _req(srcURL="gopher://h/a.jpg"), 109),
    ("source without scheme", _req(srcURL="/etc/passwd"), 109),
    ("source scheme data", _req(srcURL="data:image/png;base64,AAAA"), 109),
    ("destination scheme mailto", _req(dstURL="mailto://x@y/a.png"), 110),
    ("destination without scheme", _req(dstURL="out.png"), 110),
    ("form syntax without field", _req(dstURL="http://h/upload.php:{$basename}.png"), 111),
    (
        "empty field_name",
        _req(dstURL="http://h/upload.php:a.png", args={"width": 10, "field_name": ""}),
        111,
    ),
    (
        "field_name a number",
        _req(dstURL="http://h/upload.php:a.png", args={"width": 10, "field_name": 5}),
        112,
    ),
    (
        "field_file a list",
        _req(dstURL="http://h/upload.php:a.png", args={"width": 10, "field_file": ["f"]}),
        112,
    ),
    (
        "field_name with a line break",
        _req(dstURL="http://h/upload.php:a.png", args={"width": 10, "field_name": "f\r\nX: 1"}),
        126,
    ),
    ("destination .bmp", _req(dstURL="file:///out/a.bmp"), 113),
    ("destination .svg", _req(dstURL="file:///out/a.svg"), 113),
    ("destination without extension", _req(dstURL="file:///out/a"), 113),
    (
        "form file name .exe",
        _req(dstURL="http://h/up:a.exe", args={"width": 1, "field_name": "f"}),
        113,
    ),
    ("gravity unknown", _args(width=10, gravity="up"), 120),
    ("gravity not a string", _args(width=10, gravity=1), 120),
    ("quality zero", _args(width=10, quality=0), 121),
    ("quality 101", _args(width=10, quality=101), 121),
    ("quality a string", _args(width=10, quality="80"), 121),
    (
        "scale zero",
        _req(operationType="rasterize", srcURL="http://h/a.svg", args={"scale": 0}),
        122,
    ),
    (
        "scale with width",
        _req(operationType="rasterize", srcURL="http://h/a.svg", args={"scale": 2, "width": 5}),
        122,
    ),
    ("unknown arg", _args(width=10, sharpen=True), 123),
    ("scale for resize", _args(width=10, scale=2), 123),
    ("enlarge not a bool", _args(width=10, enlarge="yes"), 123),
    ("keep_metadata not a bool", _args(width=10, keep_metadata=1), 123),
    ("field for a file destination", _args(width=10, field_name="f"), 123),
    ("unknown dstURL tag", _req(dstURL="file:///out/{$colour}.png"), 124),
    (
        "field without form syntax",
        _req(dstURL="http://h/a.png", args={"width": 1, "field_name": "f"}),
        124,
    ),
]


@pytest.mark.parametrize(
    ("request_body", "code"),
    [pytest.param(body, code, id=name) for name, body, code in INVALID],
)
def test_invalid_requests_get_their_code(request_body: dict[str, Any], code: int) -> None:
    """Each invalid request is refused with its stable code and a detail."""
    with pytest.raises(errors.RequestInvalid) as info:
        validate(request_body)
    assert info.value.code == code, info.value.detail
    assert info.value.status in (400, 422)
    assert info.value.detail


def test_a_scale_beyond_a_floats_range_is_over_the_limit() -> None:
    """JSON carries integers no float holds: a scale of 10**400 is 304 (over the
    limit), not an OverflowError (a 500)."""
    body = _req(operationType="rasterize", srcURL="http://h/a.svg", args={"scale": 10**400})
    with pytest.raises(errors.SVGRenderOverLimit) as info:
        validate(body)
    assert info.value.code == 304


def test_every_1xx_code_is_covered() -> None:
    """The table above exercises every request-validation code that errors.py defines."""
    defined = {
        cls.code
        for cls in errors.all_errors()
        if issubclass(cls, errors.RequestInvalid) and cls.code < 200  # 7xx: test_request_jobs.py
    }
    defined.discard(125)  # body size: enforced by the HTTP edge before parsing
    assert defined <= {code for _name, _body, code in INVALID}


def test_keys_detail_names_missing_and_unknown() -> None:
    """101's detail names both the missing and the unknown keys."""
    body = _without("args")
    body["arguments"] = {}
    with pytest.raises(errors.KeysInvalid) as info:
        validate(body)
    assert "missing: args" in info.value.detail
    assert "unknown: arguments" in info.value.detail


# (case id, request, attribute checks on the Job)
VALID: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("both dimensions", _req(), {"width": 100, "height": 80, "gravity": "centre"}),
    ("width only", _args(width=50), {"width": 50, "height": None}),
    ("height only", _args(height=50), {"width": None, "height": 50}),
    ("gravity lower-cased", _args(width=5, gravity="NorthEast"), {"gravity": "northeast"}),
    ("gravity smart", _args(width=5, height=5, gravity="smart"), {"gravity": "smart"}),
    ("enlarge", _args(width=5, enlarge=True), {"enlarge": True}),
    ("quality bounds", _args(width=5, quality=100), {"quality": 100}),
    ("quality one", _args(width=5, quality=1), {"quality": 1}),
    ("keep_metadata", _args(width=5, keep_metadata=True), {"keep_metadata": True}),
    (
        "rasterize at a scale",
        _req(operationType="rasterize", srcURL="http://h/logo.svg", args={"scale": 1.5}),
        {"scale": 1.5, "width": None, "operation": "rasterize"},
    ),
    (
        "rasterize, integer scale becomes float",
        _req(operationType="rasterize", srcURL="http://h/logo.svg", args={"scale": 2}),
        {"scale": 2.0},
    ),
    (
        "rasterize a source without extension",
        _req(operationType="rasterize", srcURL="http://h/render?id=3", args={"width": 10}),
        {"width": 10},
    ),
    (
        "resize a source without extension",
        _req(srcURL="https://h/image?id=3"),
        {"src_url": "https://h/image?id=3"},
    ),
    (
        "form upload with field_name",
        _req(dstURL="http://h/upload.php:{$basename}.jpg", args={"width": 5, "field_name": "f"}),
        {"form_field": "f"},
    ),
    (
        "form upload with 0.2's field_file",
        _req(dstURL="http://h/upload.php:{$basename}.jpg", args={"width": 5, "field_file": "up"}),
        {"form_field": "up"},
    ),
    ("PUT without a form field", _req(dstURL="https://h/bucket/a.webp"), {"form_field": None}),
    ("{$ext} destination", _req(dstURL="s3://bucket/{$basename}.{$ext}"), {}),
    ("{$extension} destination", _req(dstURL="ftp://h/{$basename}.{$extension}"), {}),
    ("upper-case scheme", _req(srcURL="HTTPS://h/a.JPG"), {}),
    ("every output extension jpeg", _req(dstURL="file:///o/a.jpeg"), {}),
    ("every output extension tiff", _req(dstURL="file:///o/a.TIFF"), {}),
    ("every output extension avif", _req(dstURL="file:///o/a.avif"), {}),
    ("every output extension gif", _req(dstURL="file:///o/a.gif"), {}),
    ("query string ignored for extension", _req(dstURL="https://h/a.png?sig=x.y"), {}),
]


@pytest.mark.parametrize(
    ("request_body", "expected"),
    [pytest.param(body, want, id=name) for name, body, want in VALID],
)
def test_valid_requests_give_a_job(request_body: dict[str, Any], expected: dict[str, Any]) -> None:
    """A valid request becomes a Job carrying its arguments."""
    job = validate(request_body)
    for attr, value in expected.items():
        assert getattr(job, attr) == value, attr


def test_job_round_trips_through_a_dict() -> None:
    """Job.to_dict / from_dict (the queue's storage form) lose nothing."""
    job = validate(_args(width=5, gravity="south", quality=70, keep_metadata=True))
    assert Job.from_dict(job.to_dict()) == job


@pytest.mark.parametrize(
    ("src", "basename", "extension"),
    [
        ("http://h/photos/cat.jpg", "cat", "jpg"),
        ("http://h/photos/Cat.Large.JPEG?size=2", "Cat.Large", "jpeg"),
        ("s3://bucket/deep/key/photo.webp", "photo", "webp"),
        ("file:///srv/img/noext", "noext", ""),
        ("ftp://h/.hidden", ".hidden", ""),
        ("http://h/dir/", "", ""),
    ],
)
def test_source_basename_and_extension(src: str, basename: str, extension: str) -> None:
    """{$basename} is the file name without extension; {$extension} is lower-cased."""
    spec = Job(operation="resize", src_url=src, dst_template="file:///o.png", width=1).to_spec()
    assert spec.basename == basename
    assert spec.extension == extension


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("file:///o/{$width}x{$height}.png", "file:///o/640x480.png"),
        ("file:///o/{$basename}.{$extension}", "file:///o/cat.jpg"),
        ("file:///o/{$basename}.{$ext}", "file:///o/cat.jpg"),
        ("http://h/up.php:{$width}-{$basename}.{$ext}", "http://h/up.php:640-cat.jpg"),
        ("s3://b/{$basename}/{$basename}.png", "s3://b/cat/cat.png"),
        ("file:///o/plain.png", "file:///o/plain.png"),
        ("file:///o/{$width}{$height}{$ext}", "file:///o/640480jpg"),
    ],
)
def test_substitute_tags(template: str, expected: str) -> None:
    """Every tag is replaced, {$ext} as an alias of {$extension}."""
    got = substitute(template, width=640, height=480, basename="cat", extension="jpg")
    assert got == expected


@pytest.mark.parametrize(
    ("dst", "url", "filename"),
    [
        (
            "http://example.com/upload.php:{$width}-{$basename}.{$ext}",
            "http://example.com/upload.php",
            "{$width}-{$basename}.{$ext}",
        ),
        ("http://host:8080/up:x.png", "http://host:8080/up", "x.png"),
        ("https://host:8443/a/b/up.php:name.jpg", "https://host:8443/a/b/up.php", "name.jpg"),
        ("http://[::1]:8080/up:x.png", "http://[::1]:8080/up", "x.png"),
        ("http://user:pw@host/up:x.png", "http://user:pw@host/up", "x.png"),
        ("http://host:8080/plain.png", "http://host:8080/plain.png", None),
        ("http://host/plain.png", "http://host/plain.png", None),
        ("http://host:8080", "http://host:8080", None),
        ("https://host/a:b/up:final.webp", "https://host/a:b/up", "final.webp"),
    ],
)
def test_split_form_destination(dst: str, url: str, filename: str | None) -> None:
    """The file name follows the last colon after the path begins; ports are not split."""
    assert split_form_destination(dst) == (url, filename)


def test_form_destination_with_port_validates() -> None:
    """A form upload to a host with a port is accepted and keeps the field."""
    job = validate(
        _req(dstURL="http://host:8080/up:{$basename}.png", args={"width": 5, "field_name": "f"})
    )
    assert job.form_field == "f"


def test_field_name_wins_over_field_file() -> None:
    """When both are given, args.field_name is the form field."""
    job = validate(
        _req(
            dstURL="http://h/up:{$basename}.png",
            args={"width": 5, "field_name": "new", "field_file": "old"},
        )
    )
    assert job.form_field == "new"


@pytest.mark.parametrize(
    ("template", "source_ext", "expected"),
    [
        ("file:///o/a.png", "jpg", "png"),
        ("file:///o/{$basename}.{$ext}", "jpg", "jpg"),
        ("file:///o/{$basename}.{$extension}", "webp", "webp"),
        ("http://h/up.php:{$basename}.{$ext}", "gif", "gif"),
        ("http://h:8080/up.php:{$width}.JPG", "png", "jpg"),
        ("https://h/a.tif?x=1", "png", "tif"),
        ("file:///o/{$basename}", "png", ""),
    ],
)
def test_destination_extension(template: str, source_ext: str, expected: str) -> None:
    """The output extension is read after tags are known; a form URL's file name names it."""
    assert destination_extension(template, source_ext) == expected

"""Hostile request bodies get a documented 1xx/3xx code from the pure request contract.

One table per class of input (deep nesting, non-finite and huge numbers,
control characters), plus the geometry a number that passed can reach.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from imgserve import errors, planning
from imgserve.config import ImagingLimits
from imgserve.imaging import geometry
from imgserve.request import MAX_JSON_DEPTH, MAX_SIDE_PX, parse_body, validate


def _body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "operationType": "resize",
        "srcURL": "http://example.com/cat.jpg",
        "dstURL": "file:///out/{$basename}.png",
        "args": {"width": 100},
    }
    body.update(overrides)
    return body


def _svg(**args: Any) -> dict[str, Any]:
    return _body(operationType="rasterize", srcURL="http://example.com/logo.svg", args=args)


def _code(raw: bytes) -> int:
    """The code parse + validate give ``raw``; 0 when it is accepted."""
    try:
        validate(parse_body(raw))
    except errors.ImgserveError as exc:
        return exc.code
    return 0


def _nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


# (case id, raw body, expected code)
NESTING: list[tuple[str, bytes, int]] = [
    ("body a deep list", _nested(100_000).encode(), 100),
    ("body a deep list inside an object", f'{{"a": {_nested(100_000)}}}'.encode(), 100),
    ("deep objects", ('{"a":' * 50_000 + "1" + "}" * 50_000).encode(), 100),
    (
        "deep list in args.width",
        json.dumps(_body(args={"width": 1}))
        .replace('"width": 1', f'"width": {_nested(100_000)}')
        .encode(),
        100,
    ),
    (
        "list past the depth limit in args",
        json.dumps(_body(args={"width": json.loads(_nested(MAX_JSON_DEPTH))})).encode(),
        100,
    ),
    (
        "shallow nested list as width",
        json.dumps(_body(args={"width": [[[100]]]})).encode(),
        106,
    ),
    ("nested object as height", json.dumps(_body(args={"height": {"a": {"b": 1}}})).encode(), 107),
    ("nested object as gravity", json.dumps(_body(args={"width": 1, "gravity": {}})).encode(), 120),
    ("list as operationType", json.dumps(_body(operationType=["resize"])).encode(), 102),
    ("object as operationType", json.dumps(_body(operationType={"a": 1})).encode(), 102),
    ("nested list as srcURL", json.dumps(_body(srcURL=[["http://h/a.jpg"]])).encode(), 104),
    (
        "nested args value for field_name",
        json.dumps(_body(args={"width": 1, "field_name": [[]]})).encode(),
        112,
    ),
]


def _raw(body: dict[str, Any], replace: str, by: str) -> bytes:
    text = json.dumps(body)
    assert replace in text
    return text.replace(replace, by, 1).encode()


# (case id, raw body, expected code)
NUMBERS: list[tuple[str, bytes, int]] = [
    ("width Infinity", _raw(_body(args={"width": 7}), "7", "Infinity"), 100),
    ("width -Infinity", _raw(_body(args={"width": 7}), "7", "-Infinity"), 100),
    ("width NaN", _raw(_body(args={"width": 7}), "7", "NaN"), 100),
    ("scale Infinity", _raw(_svg(scale=7), "7", "Infinity"), 100),
    ("scale NaN", _raw(_svg(scale=7), "7", "NaN"), 100),
    ("quality NaN", _raw(_body(args={"width": 1, "quality": 7}), "7", "NaN"), 100),
    ("int past 4300 digits", _raw(_body(args={"width": 7}), "7", "9" * 5000), 100),
    ("scale 1e400 (inf)", _raw(_svg(scale=7), "7", "1e400"), 122),
    ("scale -1e400", _raw(_svg(scale=7), "7", "-1e400"), 122),
    ("scale 1e308", _raw(_svg(scale=7), "7", "1e308"), 304),
    ("scale just over the largest side", _raw(_svg(scale=7), "7", "10000000.5"), 304),
    ("scale 5e-324", _raw(_svg(scale=7), "7", "5e-324"), 0),
    ("width 1e308", _raw(_body(args={"width": 7}), "7", "1e308"), 106),
    ("width 10**400 resize", _raw(_body(args={"width": 7}), "7", str(10**400)), 303),
    ("height 10**400 resize", _raw(_body(args={"height": 7}), "7", str(10**400)), 303),
    (
        "both 10**400, enlarge",
        json.dumps(_body(args={"width": 10**400, "height": 10**400, "enlarge": True})).encode(),
        303,
    ),
    ("width over the largest side", _raw(_body(args={"width": 7}), "7", str(MAX_SIDE_PX + 1)), 303),
    ("width at the largest side", _raw(_body(args={"width": 7}), "7", str(MAX_SIDE_PX)), 0),
    ("width 10**400 rasterize", _raw(_svg(width=7), "7", str(10**400)), 304),
    ("height 10**400 rasterize", _raw(_svg(height=7), "7", str(10**400)), 304),
    ("width -10**400", _raw(_body(args={"width": 7}), "7", str(-(10**400))), 106),
    ("quality 10**400", _raw(_body(args={"width": 1, "quality": 7}), "7", str(10**400)), 121),
    ("quality 1e400", _raw(_body(args={"width": 1, "quality": 7}), "7", "1e400"), 121),
]

_CONTROLS = ["\x00", "\x01", "\t", "\n", "\r", "\x1b", "\x1f", "\x7f"]

# (case id, request, expected code)
CONTROL: list[tuple[str, dict[str, Any], int]] = [
    *(
        (f"srcURL holds U+{ord(c):04X}", _body(srcURL=f"http://example.com/a{c}b.jpg"), 124)
        for c in _CONTROLS
    ),
    *(
        (f"dstURL holds U+{ord(c):04X}", _body(dstURL=f"file:///out/a{c}.png"), 124)
        for c in _CONTROLS
    ),
    ("srcURL host with CRLF", _body(srcURL="http://example.com\r\nHost: evil/a.jpg"), 124),
    ("srcURL ends with LF", _body(srcURL="http://example.com/a.jpg\n"), 124),
    ("srcURL lone surrogate", _body(srcURL="http://example.com/\ud800.jpg"), 124),
    (
        "form file name holds LF",
        _body(dstURL="http://h/up.php:a\nb.png", args={"width": 1, "field_name": "f"}),
        124,
    ),
    (
        "form file name holds NUL",
        _body(dstURL="http://h/up.php:a\x00.png", args={"width": 1, "field_name": "f"}),
        124,
    ),
    *(
        (
            f"field_name holds U+{ord(c):04X}",
            _body(dstURL="http://h/up.php:a.png", args={"width": 1, "field_name": f"f{c}"}),
            126,
        )
        for c in _CONTROLS
    ),
    (
        "field_file holds CRLF",
        _body(dstURL="http://h/up.php:a.png", args={"width": 1, "field_file": "f\r\nX: y"}),
        126,
    ),
    (
        "field_name lone surrogate",
        _body(dstURL="http://h/up.php:a.png", args={"width": 1, "field_name": "\udfff"}),
        126,
    ),
    ("srcURL broken IPv6 host", _body(srcURL="http://[::1/a.jpg"), 124),
    ("srcURL NFKC-unsafe host", _body(srcURL="http://ex\u2100ample.com/a.jpg"), 124),
]


@pytest.mark.parametrize(
    ("raw", "code"), [pytest.param(raw, code, id=name) for name, raw, code in NESTING + NUMBERS]
)
def test_hostile_bodies_get_their_code(raw: bytes, code: int) -> None:
    """Deep nesting and non-finite or huge numbers get a documented code, never an exception."""
    assert _code(raw) == code


@pytest.mark.parametrize(
    ("body", "code"), [pytest.param(body, code, id=name) for name, body, code in CONTROL]
)
def test_control_characters_are_refused(body: dict[str, Any], code: int) -> None:
    """A control character in a URL, file name or form field name is refused before any I/O."""
    with pytest.raises(errors.RequestInvalid) as info:
        validate(body)
    assert info.value.code == code, info.value.detail
    assert "U+" in info.value.detail or "malformed" in info.value.detail


def test_nesting_at_the_limit_is_parsed() -> None:
    """A body exactly MAX_JSON_DEPTH deep still parses (the limit is not off by one)."""
    inner: Any = 1
    for _ in range(MAX_JSON_DEPTH - 1):
        inner = [inner]
    assert parse_body(json.dumps({"a": inner}).encode())["a"] == inner
    with pytest.raises(errors.RequestParseError):
        parse_body(json.dumps({"a": [inner]}).encode())


def test_huge_values_are_not_echoed_whole() -> None:
    """An error detail shows a hostile value cut short, not 4,000 digits of it."""
    with pytest.raises(errors.QualityInvalid) as info:
        validate(_body(args={"width": 1, "quality": 10**4000}))
    assert len(info.value.detail) < 200


# (case id, src_width, src_height, width, height, scale)
OVERFLOWING: list[tuple[str, float, float, int | None, int | None, float | None]] = [
    ("huge drawing at the largest scale", 1e308, 1.0, None, None, 1e7),
    ("tiny drawing to a width", 1e-308, 1.0, 100, None, None),
    ("tall drawing to a width", 1e-300, 1e300, 100, None, None),
    ("wide drawing to a height", 1e300, 1e-300, None, 100, None),
]


@pytest.mark.parametrize(
    ("src_w", "src_h", "width", "height", "scale"),
    [pytest.param(*row[1:], id=row[0]) for row in OVERFLOWING],
)
def test_rasterize_geometry_cannot_overflow(
    src_w: float, src_h: float, width: int | None, height: int | None, scale: float | None
) -> None:
    """A drawing's declared size and an accepted scale never overflow: 304, not OverflowError."""
    with pytest.raises(errors.SVGRenderOverLimit):
        geometry.rasterize_result(src_w, src_h, width, height, scale)


@pytest.mark.parametrize(
    ("declared", "args"),
    [
        (('width="1e-300"', 'height="1"'), {"width": 100}),
        (('width="1"', 'height="1e308"'), {"width": 100}),
        (('width="1e300"', 'height="1"'), {"scale": 1e7}),
    ],
)
def test_planning_a_hostile_drawing_is_a_limit_error(
    declared: tuple[str, str], args: dict[str, Any]
) -> None:
    """planning.plan on an SVG declaring an extreme size answers 304, whatever the args."""
    job = validate(_svg(**args))
    svg = f'<svg xmlns="http://www.w3.org/2000/svg" {declared[0]} {declared[1]}/>'.encode()
    with pytest.raises(errors.SVGRenderOverLimit):
        planning.plan(job.to_spec(), svg, ImagingLimits())

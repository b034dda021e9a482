"""No request body yields a 5xx or an unhandled exception (hypothesis).

The strategies make JSON-ish values of every type for every key: deep
nesting, huge and non-finite numbers, control characters, lone surrogates
and any unicode in strings. The pure contract (parse_body + validate, then
the geometry an accepted job reaches) runs many examples; a bounded run goes
through the real HTTP app over loopback, where every network source is
refused by the default address policy before any I/O.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from aiohttp import ClientSession
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgserve import errors
from imgserve.imaging import geometry
from imgserve.planner import Planner
from imgserve.request import parse_body, validate
from tests.inprocess import start_api

DOCUMENTED = {cls.code for cls in errors.all_errors()}
KEYS = ["operationType", "srcURL", "dstURL", "args"]
ARG_KEYS = [
    "width",
    "height",
    "scale",
    "gravity",
    "enlarge",
    "quality",
    "keep_metadata",
    "field_name",
    "field_file",
]

# Characters a hostile client likes: controls, DEL, C1, separators, surrogates.
_NASTY = st.sampled_from(
    ["\x00", "\n", "\r", "\t", "\x1b", "\x7f", "\x85", "\u2028", "\ud800", "\udfff", "%", "@", ":"]
)
texts = st.lists(st.one_of(st.characters(), _NASTY), max_size=20).map("".join)
numbers = st.one_of(
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.sampled_from([0, 1, -1, 10**7, 10**7 + 1, 2**63, 10**308, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e308, -1e308, 5e-324, float("inf"), float("-inf"), float("nan")]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=4)),
    max_leaves=12,
)


def _deep(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


# json.dumps itself recurses, so deeper bodies are written as text (deep_bodies).
nested = st.integers(min_value=1, max_value=300).map(_deep)
hostile_values = st.one_of(json_values, nested)

schemes = st.sampled_from(["http", "https", "ftp", "ftps", "file", "HTTP", "gopher", "", "s3"])
# Hosts that need no DNS and that the default policy refuses (or no host at all).
hosts = st.sampled_from(
    ["127.0.0.1", "10.0.0.1", "[::1]", "169.254.169.254", "0x7f.1", "localhost", "", "[::1"]
)
userinfo = st.one_of(st.just(""), texts.map(lambda t: t.replace("/", "") + "@"))
paths = st.lists(st.one_of(texts, st.sampled_from(["{$width}", "{$ext}", "{$bad}", ":a.png"])))
extensions = st.sampled_from([".jpg", ".png", ".svg", ".webp", ".bmp", "", ".{$ext}"])


@st.composite
def urls(draw: st.DrawFn) -> str:
    path = "/".join(draw(paths)).replace("?", "").replace("#", "")
    return f"{draw(schemes)}://{draw(userinfo)}{draw(hosts)}/{path}{draw(extensions)}" + draw(
        st.sampled_from(["", "?token=secret", ":name.png", "?X-Amz-Signature=s"])
    )


def _no_network_url(url: str) -> str:
    """s3:// URLs would reach AWS: keep only forms the transport refuses before I/O."""
    return url.replace("s3://", "s3://@", 1) if url.lower().startswith("s3://") else url


@st.composite
def args(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(hostile_values)
    chosen = draw(st.lists(st.sampled_from(ARG_KEYS), unique=True, max_size=5))
    good = {
        "width": st.integers(1, 2000),
        "height": st.integers(1, 2000),
        "scale": st.floats(0.01, 10),
        "gravity": st.sampled_from(["centre", "north", "smart", "NorthEast"]),
        "enlarge": st.booleans(),
        "quality": st.integers(1, 100),
        "keep_metadata": st.booleans(),
        "field_name": st.sampled_from(["file", "f"]),
        "field_file": st.sampled_from(["file"]),
    }
    out: dict[str, Any] = {
        key: draw(st.one_of(good[key], hostile_values) if key in good else hostile_values)
        for key in chosen
    }
    if draw(st.booleans()):
        out[draw(texts)] = draw(hostile_values)
    return out


@st.composite
def requests(draw: st.DrawFn, *, offline: bool = False) -> dict[str, Any]:
    url = urls().map(_no_network_url) if offline else st.one_of(urls(), texts)
    values = {
        "operationType": st.one_of(st.sampled_from(["resize", "rasterize"]), hostile_values),
        "srcURL": st.one_of(url, hostile_values),
        "dstURL": st.one_of(url, hostile_values),
        "args": args(),
    }
    body = {key: draw(values[key]) for key in KEYS if draw(st.integers(0, 19)) != 0}
    if draw(st.integers(0, 9)) == 0:
        body[draw(texts)] = draw(hostile_values)
    return body


def _encode(body: Any) -> bytes:
    # allow_nan: NaN/Infinity tokens are what a hostile client sends; lone
    # surrogates survive as \ud800 escapes, as they would on the wire.
    return json.dumps(body, allow_nan=True).encode()


def _deep_body(depth: int, where: int) -> bytes:
    deep = "[" * depth + "1" + "]" * depth
    body = {"operationType": "resize", "srcURL": "http://h/a.jpg", "dstURL": "file:///o/a.png"}
    text = json.dumps({**body, "args": {"width": "HERE"}})
    return [deep, text.replace('"HERE"', deep), '{"a": ' + deep + "}"][where].encode()


deep_bodies = st.builds(_deep_body, st.integers(1, 100_000), st.integers(0, 2))
raw_bodies = st.one_of(
    requests().map(_encode),
    hostile_values.map(_encode),
    st.binary(max_size=64),
    deep_bodies,
    st.integers(1, 100_000).map(lambda n: b"[" * n),
)


def _check_refusal(exc: errors.ImgserveError) -> None:
    assert exc.code in DOCUMENTED, exc
    assert exc.status < 500, exc
    assert exc.detail


@settings(max_examples=2000, deadline=None)
@given(raw=raw_bodies, src=st.tuples(st.integers(1, 10**7), st.integers(1, 10**7)))
def test_parse_and_validate_never_crash(raw: bytes, src: tuple[int, int]) -> None:
    """parse_body + validate accept a Job or refuse with a documented 4xx code; nothing else."""
    try:
        job = validate(parse_body(raw))
    except errors.ImgserveError as exc:
        _check_refusal(exc)
        return
    assert json.loads(json.dumps(job.to_dict())) == job.to_dict()
    # The arithmetic an accepted job reaches before any pixel is touched.
    try:
        if job.operation == "resize":
            geometry.resize_result(geometry.Size(*src), job.width, job.height, job.enlarge)
        else:
            geometry.rasterize_result(src[0] / 7, src[1] / 7, job.width, job.height, job.scale)
    except errors.ImgserveError as exc:
        _check_refusal(exc)


def test_http_app_never_answers_5xx(tmp_path: Path, shared_planner: Planner) -> None:
    """Through the real app and protocol, every reply is JSON, documented and under 500."""
    loop = asyncio.new_event_loop()
    served = loop.run_until_complete(start_api(tmp_path / "state", shared_planner))
    url = served.url + "/"
    session = loop.run_until_complete(_session())
    http_bodies = st.one_of(requests(offline=True).map(_encode), raw_bodies)

    async def post(raw: bytes) -> tuple[int, Any]:
        async with session.post(url, data=raw) as reply:
            return reply.status, json.loads(await reply.read())

    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(raw=http_bodies)
    def check(raw: bytes) -> None:
        status, body = loop.run_until_complete(post(raw))
        assert isinstance(body, dict), body
        if body == {"msg": "request parse error"}:
            assert status == 400
            return
        assert body["code"] in DOCUMENTED, body
        assert status < 500 and status == errors.by_code(body["code"]).status, body

    try:
        check()
        counts = loop.run_until_complete(served.service.queue.counts())
        assert counts["queued"] == counts["running"] == 0  # nothing got past the policy
    finally:
        loop.run_until_complete(session.close())
        loop.run_until_complete(served.stop())
        loop.close()


async def _session() -> ClientSession:
    return ClientSession()

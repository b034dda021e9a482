"""No ``POST /jobs`` body gets past validation as anything but a JobSpec or a 7xx
refusal (hypothesis).

Bodies are valid jobs with one to three fields broken (set to a hostile value
from 0.2's property test: control characters, lone surrogates, huge and
non-finite numbers, deep nesting; or to a near-miss such as ``"Cover"``,
``"bmp"``, ``"#12345"``; or dropped, or joined by an unknown field), so that
every check, the last ones included, is reached; then arbitrary JSON objects,
and raw bytes through decode_job. Pure: the API's handling of the same bodies
is the API's test.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import event, given, settings
from hypothesis import strategies as st

from imgserve import errors
from imgserve.request_jobs import JOB_FIELDS, OUTPUT_FIELDS, decode_job, validate_jobs
from imgserve.spec import JobSpec
from tests.test_property_requests import hostile_values, raw_bodies, texts, urls

MAX_OUTPUTS = 4
GOOD_URLS = [
    "s3://media/{$basename}-{$width}.webp",
    "file:///srv/{$basename}x{$height}.{$ext}",
    "ftp://u:pw@ftp.example.com/sq/{$basename}.png",
    "https://h/upload.php:{$basename}.jpg",
]

CROP_KEYS = ("left", "top", "width", "height")
valid_output_values: dict[str, st.SearchStrategy[Any]] = {
    "fit": st.sampled_from(["cover", "contain", "fill", "inside", "outside"]),
    "gravity": st.sampled_from(["centre", "center", "smart", "NorthEast", "SOUTH"]),
    "enlarge": st.booleans(),
    "format": st.sampled_from(["jpeg", "jpg", "png", "webp", "avif", "gif", "tiff"]),
    "quality": st.integers(1, 100),
    "keep_metadata": st.booleans(),
    "background": st.from_regex(r"#([0-9a-f]{3,4}|[0-9A-F]{6}|[0-9a-fA-F]{8})", fullmatch=True),
    "crop": st.fixed_dictionaries(
        {k: st.integers(0 if k in ("left", "top") else 1, 5000) for k in CROP_KEYS}
    ),
    "rotate": st.sampled_from([0, 90, 180, 270, -90, 360]),
    "flip": st.booleans(),
    "flop": st.booleans(),
    "blur": st.floats(0.3, 100),
    "sharpen": st.floats(0.3, 10),
    "grayscale": st.booleans(),
    "blurhash_components": st.lists(st.integers(1, 9), min_size=2, max_size=2),
    "pad": st.dictionaries(
        st.sampled_from(["top", "right", "bottom", "left"]), st.integers(0, 4096)
    ),
}


@st.composite
def valid_outputs(draw: st.DrawFn) -> dict[str, Any]:
    url = draw(st.sampled_from(GOOD_URLS))
    out: dict[str, Any] = {"url": url}
    if url.startswith("https"):
        out["form_field"] = "file"
    sides = draw(st.sampled_from([("width",), ("height",), ("width", "height"), ("scale",)]))
    for side in sides:
        out[side] = draw(st.floats(0.01, 100) if side == "scale" else st.integers(1, 10_000_000))
    for key in draw(st.lists(st.sampled_from(sorted(valid_output_values)), unique=True)):
        out[key] = draw(valid_output_values[key])
    return out


valid_jobs = st.fixed_dictionaries(
    {
        "source": st.sampled_from(["https://h/u/Beach.jpg", "s3://b/a.svg", "file:///srv/x"]),
        "outputs": st.lists(valid_outputs(), min_size=1, max_size=MAX_OUTPUTS),
    },
    optional={
        "placeholder": st.booleans(),
        "metadata": st.dictionaries(texts, st.one_of(st.none(), st.integers(), texts), max_size=4),
        "priority": st.sampled_from(["interactive", "batch"]),
        "webhook": st.sampled_from(["https://hooks.example.com/imgserve", "http://h:8080/x"]),
    },
)

# Values one step off a valid one, per field: what a careless client sends.
near_misses: dict[str, st.SearchStrategy[Any]] = {
    "source": st.one_of(urls(), st.sampled_from(["http://[::1/a.jpg", "", " "])),
    "outputs": st.lists(valid_outputs(), min_size=MAX_OUTPUTS + 1, max_size=MAX_OUTPUTS + 2),
    "placeholder": st.sampled_from([0, 1, "true", None]),
    "metadata": st.one_of(
        st.sampled_from([{"n": float("nan")}, {"n": [float("-inf")]}]),
        st.builds(lambda n: {"k": "x" * n}, st.integers(8180, 8200)),
        st.dictionaries(texts, hostile_values, max_size=4),
    ),
    "url": st.one_of(
        urls(),
        st.sampled_from(["s3://b/{$size}.png", "s3://b/a.bmp", "s3://b/a", "http://h/u:a.png"]),
    ),
    "width": st.sampled_from([0, -1, 10_000_001, 1.5, True, "10"]),
    "height": st.sampled_from([0, -1, 10_000_001, 1.0, False]),
    "scale": st.one_of(st.floats(), st.sampled_from([0, -1, 1e8, True])),
    "fit": st.sampled_from(["Cover", "crop", ""]),
    "gravity": st.sampled_from(["up", "north east", ""]),
    "enlarge": st.sampled_from([0, "false"]),
    "format": st.sampled_from(["JPEG", "bmp", "heif", "svg", ""]),
    "quality": st.sampled_from([0, 101, 50.5, "80"]),
    "keep_metadata": st.sampled_from([1, None]),
    "background": st.sampled_from(["#12345", "red", "fff", "#ggg", "#١٢٣"]),
    "form_field": st.sampled_from(["", "f\n", 3]),
    "crop": st.sampled_from(
        [{"left": -1, "top": 0, "width": 1, "height": 1}, {"left": 0}, [0, 0, 1, 1], None]
    ),
    "rotate": st.sampled_from([45, "90", 361, float("nan"), True]),
    "flip": st.sampled_from([1, "true"]),
    "flop": st.sampled_from([0, None]),
    "blur": st.sampled_from([0, 0.2, 101, True, "2"]),
    "sharpen": st.sampled_from([0, 10.5, -1]),
    "grayscale": st.sampled_from(["yes", 1]),
    "pad": st.sampled_from([{"top": -1}, {"x": 1}, 5, {"left": 4097}, {"top": 1.5}]),
    "watermark": st.sampled_from([{"name": "nope"}, {}, "logo", {"name": 3}]),
    "blurhash_components": st.sampled_from([[0, 3], [4], [4, 3, 1], "4x3", [10, 1], [True, 3]]),
    "priority": st.sampled_from(["Batch", "low", "", None]),
    "webhook": st.one_of(urls(), st.sampled_from(["ftp://h/x", "http:///x", "https://h:99999/"])),
}

_DROP = object()


@st.composite
def broken(draw: st.DrawFn, field: str) -> Any:
    """A replacement for ``field``: a near miss, a hostile value, or _DROP."""
    kind = draw(st.sampled_from(["near", "hostile", "drop"]))
    if kind == "drop":
        return _DROP
    return draw(near_misses[field] if kind == "near" else hostile_values)


def _set(obj: dict[str, Any], key: str, value: Any) -> None:
    if value is _DROP:
        obj.pop(key, None)
    else:
        obj[key] = value


@st.composite
def broken_jobs(draw: st.DrawFn) -> dict[str, Any]:
    body = draw(valid_jobs)
    for _ in range(draw(st.integers(1, 3))):
        outputs = body.get("outputs")
        where = draw(st.sampled_from(["output", "job", "output", "output", "unknown"]))
        if where == "output" and isinstance(outputs, list) and outputs:
            i = draw(st.integers(0, len(outputs) - 1))
            if not isinstance(outputs[i], dict) or draw(st.integers(0, 9)) == 0:
                outputs[i] = draw(hostile_values)
            else:
                field = draw(st.sampled_from(sorted(OUTPUT_FIELDS)))
                _set(outputs[i], field, draw(broken(field)))
        elif where == "unknown":
            body[draw(texts)] = draw(hostile_values)
        else:
            field = draw(st.sampled_from(sorted(JOB_FIELDS)))
            _set(body, field, draw(broken(field)))
    return body


bodies = st.one_of(valid_jobs, broken_jobs(), st.dictionaries(texts, hostile_values, max_size=5))
uploaded_names = st.one_of(st.none(), texts, st.sampled_from(["a.jpg", "C:\\x\\b.png", "d/"]))


def _as_decoded(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` as JSON decoding gives it: two lone surrogates in a row decode as
    one character, which is what the API (and so the queue) ever sees."""
    decoded: dict[str, Any] = json.loads(json.dumps(body, allow_nan=True))
    return decoded


def _check(body: dict[str, Any], uploaded_name: str | None) -> None:
    try:
        spec = validate_jobs(body, max_outputs=MAX_OUTPUTS, uploaded_name=uploaded_name)
    except errors.ImgserveError as exc:
        assert 700 <= exc.code <= 799, exc
        assert isinstance(exc, errors.RequestInvalid) and exc.status == 400, exc
        assert exc.detail and exc.detail != exc.message, exc
        event(f"refused {exc.code}")
        return
    assert 1 <= len(spec.outputs) <= MAX_OUTPUTS
    assert (spec.source_url is None) == (uploaded_name is not None)
    for out in spec.outputs:
        assert (out.width, out.height, out.scale) != (None, None, None)
    # What the queue stores reads back as the same spec.
    assert JobSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    event("accepted")


@settings(max_examples=1500, deadline=None)
@given(body=bodies, uploaded_name=uploaded_names, keep_source=st.booleans())
def test_any_object_validates_or_is_a_7xx_refusal(
    body: dict[str, Any], uploaded_name: str | None, keep_source: bool
) -> None:
    """validate_jobs returns a JobSpec that round-trips, or raises a 700-799 error."""
    if uploaded_name is not None and not keep_source:
        body.pop("source", None)  # the multipart job part, mostly without a source URL
    _check(_as_decoded(body), uploaded_name)


@settings(max_examples=500, deadline=None)
@given(
    raw=st.one_of(broken_jobs().map(lambda b: json.dumps(b, allow_nan=True).encode()), raw_bodies)
)
def test_any_body_decodes_and_validates_or_is_a_7xx_refusal(raw: bytes) -> None:
    """decode_job + validate_jobs on any bytes: a JobSpec or a 700-799 error, nothing else."""
    try:
        body = decode_job(raw)
    except errors.JobBodyInvalid as exc:
        assert exc.code == 700 and exc.detail.startswith("body: "), exc
        return
    _check(body, None)


@settings(max_examples=500, deadline=None)
@given(body=valid_jobs)
def test_valid_jobs_are_accepted_as_sent(body: dict[str, Any]) -> None:
    """Any job of valid fields is accepted, each output's values kept in request order."""
    spec = validate_jobs(body, max_outputs=MAX_OUTPUTS)
    assert spec.source_url == body["source"]
    assert spec.placeholder is body.get("placeholder", True)
    assert spec.metadata == body.get("metadata", {})
    assert [out.url for out in spec.outputs] == [out["url"] for out in body["outputs"]]
    for out, sent in zip(spec.outputs, body["outputs"], strict=True):
        assert (out.width, out.height) == (sent.get("width"), sent.get("height"))
        assert out.gravity == sent.get("gravity", "centre").lower()
        assert out.fit == sent.get("fit", "cover")
        assert out.quality == sent.get("quality")
        assert (out.format is None) == ("format" not in sent)

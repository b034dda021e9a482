"""``POST /jobs`` in-process: every refusal's status, code and field path, over HTTP.

The API runs in-process (tests/inprocess.start_api: the real app, SQLite queue,
transports and planner) with no runner, so accepted jobs stay queued; sources and
destinations are the loopback test servers (tests/servers.py) and a file root.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pyvips
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgserve import errors
from imgserve.config import ImagingLimits, NetPolicy, ServerSettings, Settings, TransportSettings
from imgserve.planner import Planner
from tests.e2e.conftest import Part, decode, jpeg, multipart, serve
from tests.inprocess import API, start_api
from tests.servers import HTTPTestServer

DOCUMENTED = {cls.code for cls in errors.all_errors()}
UNFETCHED = "http://127.0.0.1:9/never/Fetched.jpg"
"""A source URL for jobs refused before any download (port 9 answers nothing)."""


def _settings(
    out: Path,
    *,
    server: ServerSettings | None = None,
    imaging: ImagingLimits | None = None,
    **transport: Any,
) -> Settings:
    return Settings(
        server=server or ServerSettings(),
        imaging=imaging or ImagingLimits(),
        transport=TransportSettings(
            policy=NetPolicy(allow_nets=(ipaddress.ip_network("127.0.0.0/8"),)),
            file_roots=(out,),
            **transport,
        ),
    )


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """The file root destinations may write under."""
    path = tmp_path / "out"
    path.mkdir()
    return path


@pytest.fixture
async def start(tmp_path: Path, out: Path, shared_planner: Planner) -> AsyncIterator[Any]:
    """Start the API in-process (settings from ``_settings``); stopped at the end."""
    started: list[API] = []

    async def start(**overrides: Any) -> API:
        served = await start_api(  # (keyword overrides: TransportSettings, server=, imaging=)
            tmp_path / f"q{len(started)}", shared_planner, _settings(out, **overrides)
        )
        started.append(served)
        return served

    yield start
    for served in started:
        await served.stop()


class Reply:
    def __init__(self, status: int, body: Any, headers: Any) -> None:
        self.status, self.body, self.headers = status, body, headers


async def post(
    api: API, body: bytes | dict[str, Any], content_type: str | None = "application/json"
) -> Reply:
    """POST /jobs; a dict is sent as JSON. ``content_type`` None sends no Content-Type."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = {"Content-Type": content_type} if content_type is not None else {}
    async with (
        aiohttp.ClientSession(skip_auto_headers=["Content-Type"]) as session,
        session.post(api.url + "/jobs", data=data, headers=headers) as resp,
    ):
        return Reply(resp.status, json.loads(await resp.read()), resp.headers)


async def get(api: API, path: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(api.url + path) as resp:
        return json.loads(await resp.read())


def _out(**fields: Any) -> dict[str, Any]:
    return {"url": "file:///out/{$basename}-{$width}.png", "width": 100, **fields}


def _job(*outputs: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"source": UNFETCHED, "outputs": list(outputs) or [_out()], **fields}


# (case id, body, code, the detail's start)
VALIDATION: list[tuple[str, bytes | dict[str, Any], int, str]] = [
    ("not JSON", b"not json", 700, ""),
    ("a JSON list", b"[1, 2]", 700, ""),
    ("a JSON string", b'"job"', 700, ""),
    ("unknown top-level field", _job(colour="red"), 702, "colour: "),
    ("unknown output field", _job(_out(), _out(), _out(), _out(trim=1)), 702, "outputs[3].trim: "),
    ("source missing", {"outputs": [_out()]}, 701, "source: "),
    ("source not a string", _job(source=5), 703, "source: "),
    ("source empty", _job(source=" "), 705, "source: "),
    ("source scheme", _job(source="gopher://h/a.jpg"), 705, "source: "),
    ("outputs missing", {"source": UNFETCHED}, 701, "outputs: "),
    ("outputs not a list", {"source": UNFETCHED, "outputs": {"url": "x"}}, 703, "outputs: "),
    ("outputs empty", {"source": UNFETCHED, "outputs": []}, 704, "outputs: "),
    ("17 outputs", _job(*[_out()] * 17), 704, "outputs: 17 outputs, at most 16"),
    ("output not an object", _job(_out(), 5), 703, "outputs[1]: "),  # type: ignore[arg-type]
    ("url missing", _job({"width": 10}), 701, "outputs[0].url: "),
    ("url not a string", _job(_out(url=7)), 703, "outputs[0].url: "),
    ("url empty", _job(_out(url="")), 705, "outputs[0].url: "),
    ("url scheme", _job(_out(url="gopher://h/x.png")), 705, "outputs[0].url: "),
    ("url unknown tag", _job(_out(url="file:///out/{$size}.png")), 705, "outputs[0].url: "),
    ("form url without form_field", _job(_out(url="http://h/form:x.png")), 705, "outputs[0].url: "),
    ("form_field on file", _job(_out(form_field="f")), 703, "outputs[0].form_field: "),
    ("no size", _job({"url": "file:///out/x.png"}), 701, "outputs[0]: "),
    ("width negative", _job(_out(), _out(), _out(), _out(width=-5)), 703, "outputs[3].width: "),
    ("width a string", _job(_out(width="10")), 703, "outputs[0].width: "),
    ("width a float", _job(_out(width=10.5)), 703, "outputs[0].width: "),
    ("height huge", _job(_out(height=10**9)), 703, "outputs[0].height: "),
    ("fit unknown", _job(_out(height=10, fit="squash")), 703, "outputs[0].fit: "),
    ("gravity unknown", _job(_out(gravity="up")), 703, "outputs[0].gravity: "),
    ("enlarge not a bool", _job(_out(enlarge="yes")), 703, "outputs[0].enlarge: "),
    ("quality 0", _job(_out(quality=0)), 703, "outputs[0].quality: "),
    ("quality 101", _job(_out(quality=101)), 703, "outputs[0].quality: "),
    ("keep_metadata 1", _job(_out(keep_metadata=1)), 703, "outputs[0].keep_metadata: "),
    ("background a name", _job(_out(background="red")), 703, "outputs[0].background: "),
    ("background 5 digits", _job(_out(background="#12345")), 703, "outputs[0].background: "),
    ("scale and width", _job(_out(scale=2)), 703, "outputs[0].scale: "),
    ("scale negative", _job({"url": "file:///o/x.png", "scale": -1}), 703, "outputs[0].scale: "),
    ("format unknown", _job(_out(format="bmp")), 706, "outputs[0].format: "),
    ("extension no format", _job(_out(url="file:///out/x.bmp")), 706, "outputs[0].format: "),
    ("placeholder not a bool", _job(placeholder="no"), 703, "placeholder: "),
    ("metadata a list", _job(metadata=[1]), 703, "metadata: "),
    ("metadata over 8 KiB", _job(metadata={"a": "x" * 9000}), 709, "metadata: "),
]


@pytest.mark.parametrize(
    ("body", "code", "detail"), [case[1:] for case in VALIDATION], ids=[c[0] for c in VALIDATION]
)
async def test_validation_refusals_name_the_field(
    start: Any, body: bytes | dict[str, Any], code: int, detail: str
) -> None:
    """Each invalid job gets 400, its 7xx code and a detail starting with the field
    path; nothing is queued."""
    api = await start()
    reply = await post(api, body)
    assert (reply.status, reply.body["msg"], reply.body["code"]) == (
        400,
        "request invalid",
        code,
    ), reply.body
    assert reply.body["detail"].startswith(detail), reply.body["detail"]
    assert reply.body["detail"]
    assert (await api.service.queue.counts())["queued"] == 0


async def test_max_outputs_setting(start: Any, out: Path, http_server: HTTPTestServer) -> None:
    """server.max_outputs bounds the outputs (704 naming the limit); at the limit the
    job is accepted."""
    api = await start(server=ServerSettings(max_outputs=2))
    reply = await post(api, _job(_out(), _out(), _out()))
    assert (reply.status, reply.body["code"]) == (400, 704)
    assert reply.body["detail"] == "outputs: 3 outputs, at most 2"
    src = serve(http_server, "api/max/Two.jpg", jpeg(300, 200))
    two = [_out(url=f"file://{out}/max-{n}.png") for n in range(2)]
    reply = await post(api, {"source": src, "outputs": two})
    assert reply.status == 202, reply.body


async def test_reply_and_job_view(start: Any, out: Path, http_server: HTTPTestServer) -> None:
    """202 with Location and every output (final url, size, format) in request order;
    GET /jobs/<id> shows 0.2's fields, the same outputs and the metadata."""
    api = await start()
    src = serve(http_server, "api/view/Photo.jpg", jpeg(400, 300))
    job = {
        "source": src,
        "outputs": [
            {"url": f"file://{out}/{{$basename}}-{{$width}}x{{$height}}.webp", "width": 200},
            {"url": f"file://{out}/{{$basename}}.{{$ext}}", "height": 30, "quality": 70},
            {"url": f"file://{out}/sq.png", "width": 50, "height": 50, "format": "jpeg"},
        ],
        "metadata": {"uploadId": "42"},
    }
    reply = await post(api, job)
    assert reply.status == 202, reply.body
    job_id = reply.body["jobId"]
    assert reply.headers["Location"] == f"/jobs/{job_id}"
    outputs = [
        {"url": f"file://{out}/Photo-200x150.webp", "width": 200, "height": 150, "format": "webp"},
        {"url": f"file://{out}/Photo.jpg", "width": 40, "height": 30, "format": "jpeg"},
        {"url": f"file://{out}/sq.png", "width": 50, "height": 50, "format": "jpeg"},
    ]
    assert reply.body == {"jobId": job_id, "state": "queued", "outputs": outputs}

    view = await get(api, f"/jobs/{job_id}")
    assert view["outputs"] == outputs  # no bytes before the job is done
    assert view["metadata"] == {"uploadId": "42"}
    assert (view["jobId"], view["state"], view["operationType"]) == (job_id, "queued", "resize")
    assert (view["srcURL"], view["dstURL"]) == (src, outputs[0]["url"])
    assert (view["width"], view["height"], view["attempts"]) == (200, 150, 0)


async def test_credentials_are_redacted_in_the_reply(
    start: Any, http_server: HTTPTestServer
) -> None:
    """An output URL's password never comes back in the reply or the job view."""
    api = await start()
    src = serve(http_server, "api/red/Cred.jpg", jpeg(100, 100))
    dst = http_server.url("/files/api/red/{$basename}.png").replace("://", "://u:hunter2@")
    reply = await post(api, {"source": src, "outputs": [{"url": dst, "width": 10}]})
    assert reply.status == 202, reply.body
    assert "hunter2" not in json.dumps(reply.body)
    assert reply.body["outputs"][0]["url"].endswith("/files/api/red/Cred.png")
    assert "hunter2" not in json.dumps(await get(api, f"/jobs/{reply.body['jobId']}"))


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("application/json", 202),
        ("application/json; charset=utf-8", 202),
        (None, 202),
        ("text/plain", 415),
        ("application/x-www-form-urlencoded", 415),
        ("image/jpeg", 415),
    ],
)
async def test_content_types(
    start: Any, out: Path, http_server: HTTPTestServer, content_type: str | None, status: int
) -> None:
    """JSON (or no Content-Type) is read as a job; any other non-multipart type is 415 (708)."""
    api = await start()
    src = serve(http_server, "api/ct/Ok.jpg", jpeg(100, 100))
    job = {"source": src, "outputs": [{"url": f"file://{out}/ct.png", "width": 10}]}
    reply = await post(api, json.dumps(job).encode(), content_type)
    assert reply.status == status, reply.body
    if status == 415:
        assert reply.body["code"] == 708 and "Content-Type" in reply.body["detail"]


async def test_plan_time_refusals_name_the_output(
    start: Any, out: Path, http_server: HTTPTestServer
) -> None:
    """What needs the source keeps its code, prefixed with the output: scale on a raster
    (703), a {$ext} naming no writable format (113); an unreachable source stays 201."""
    api = await start()
    src = serve(http_server, "api/plan/Photo.jpg", jpeg(300, 200))
    good = {"url": f"file://{out}/plan.png", "width": 10}
    reply = await post(api, {"source": src, "outputs": [good, {"url": good["url"], "scale": 2}]})
    assert (reply.status, reply.body["code"]) == (400, 703), reply.body
    assert reply.body["detail"].startswith("outputs[1].scale: applies to SVG sources")

    raw = serve(http_server, "api/plan/Photo.raw", jpeg(300, 200))
    reply = await post(
        api, {"source": raw, "outputs": [{"url": f"file://{out}/r.{{$ext}}", "width": 10}]}
    )
    assert reply.body["code"] == 113, reply.body
    assert reply.body["detail"].startswith("outputs[0]: "), reply.body["detail"]

    missing = http_server.url("/files/api/plan/nope.jpg")
    reply = await post(api, {"source": missing, "outputs": [good]})
    assert (reply.status, reply.body["code"]) == (422, 201)
    assert not any(out.iterdir())  # no placeholder went up for any of them
    assert (await api.service.queue.counts())["queued"] == 0


async def test_small_source_is_kept_at_its_own_size(
    start: Any, out: Path, http_server: HTTPTestServer
) -> None:
    """No 203 in POST /jobs: a source smaller than the output, enlarge false, keeps its
    size (contain still pads to the box); enlarge true grows it."""
    api = await start()
    src = serve(http_server, "api/small/Tiny.jpg", jpeg(50, 40))
    reply = await post(api, {"source": src, "outputs": [
        {"url": f"file://{out}/s1.png", "width": 100},
        {"url": f"file://{out}/s2.png", "width": 100, "height": 100},
        {"url": f"file://{out}/s3.png", "width": 100, "height": 100, "fit": "contain"},
        {"url": f"file://{out}/s4.png", "width": 100, "enlarge": True},
    ]})  # fmt: skip
    assert reply.status == 202, reply.body
    sizes = [(o["width"], o["height"]) for o in reply.body["outputs"]]
    assert sizes == [(50, 40), (50, 40), (100, 100), (100, 80)]


async def test_refused_placeholder_refuses_the_job(
    start: Any, out: Path, http_server: HTTPTestServer
) -> None:
    """One placeholder refused: 422 (205) naming that output; the outputs whose
    placeholder went up get the failure image; nothing is queued."""
    api = await start()
    src = serve(http_server, "api/ph/Ok.jpg", jpeg(300, 200))
    reply = await post(api, {"source": src, "outputs": [
        {"url": f"file://{out}/ph0.png", "width": 100},
        {"url": http_server.url("/forbidden/ph1.png"), "width": 100},
    ]})  # fmt: skip
    assert (reply.status, reply.body["code"]) == (422, 205), reply.body
    assert reply.body["detail"].startswith("outputs[1]: "), reply.body["detail"]
    image = decode((out / "ph0.png").read_bytes())
    assert (image.width, image.height) == (100, 67)
    corner = image(1, 1)
    assert corner[0] > corner[1] + 5  # the failure canvas (reddish), not the grey placeholder
    assert (await api.service.queue.counts())["queued"] == 0


# --- multipart --------------------------------------------------------------------------


def _upload_job(out: Path) -> bytes:
    return json.dumps(
        {"outputs": [{"url": f"file://{out}/up/{{$basename}}.{{$extension}}", "width": 20}]}
    ).encode()


async def test_multipart_upload_accepted(start: Any, out: Path) -> None:
    """A real client's multipart (aiohttp.FormData): the file name gives the tags, the
    job has no source URL, and its outputs are in the reply and the job view."""
    api = await start()
    form = aiohttp.FormData()
    form.add_field("job", _upload_job(out).decode(), content_type="application/json")
    form.add_field("source", jpeg(200, 100), filename="SeaSide.jpeg", content_type="image/jpeg")
    async with (
        aiohttp.ClientSession() as session,
        session.post(api.url + "/jobs", data=form) as resp,
    ):
        status, body = resp.status, await resp.json()
    assert status == 202, body
    assert body["outputs"] == [
        {"url": f"file://{out}/up/SeaSide.jpeg", "width": 20, "height": 10, "format": "jpeg"}
    ]
    view = await get(api, f"/jobs/{body['jobId']}")
    assert view["srcURL"] is None and view["outputs"] == body["outputs"]


def _parts(out: Path, name: str) -> list[Part]:
    job, source = ("job", None, _upload_job(out)), ("source", "a.jpg", jpeg(60, 40))
    with_url = json.loads(_upload_job(out)) | {"source": UNFETCHED}
    return {
        "no job part": [source],
        "no source part": [job],
        "source without file name": [job, ("source", None, jpeg(60, 40))],
        "an unknown part": [job, source, ("extra", None, b"1")],
        "two job parts": [job, job, source],
        "source both as url and part": [("job", None, json.dumps(with_url).encode()), source],
        "no parts": [],
    }[name]


@pytest.mark.parametrize(
    ("case", "detail"),
    [
        ("no job part", "job: "),
        ("no source part", "source: "),
        ("source without file name", "source: "),
        ("an unknown part", ""),
        ("two job parts", ""),
        ("source both as url and part", "source: "),
        ("no parts", "job: "),
    ],
)
async def test_multipart_refusals(start: Any, out: Path, case: str, detail: str) -> None:
    """A multipart body that is not one job part and one source file part: 400 (707)."""
    api = await start()
    body, content_type = multipart(_parts(out, case))
    reply = await post(api, body, content_type)
    assert (reply.status, reply.body["code"]) == (400, 707), reply.body
    assert reply.body["detail"].startswith(detail), reply.body["detail"]
    assert (await api.service.queue.counts())["queued"] == 0


async def test_multipart_job_part_not_json(start: Any) -> None:
    """A job part that is not a JSON object: 700, naming the job part."""
    api = await start()
    body, content_type = multipart([("job", None, b"[1]"), ("source", "a.jpg", jpeg(20, 20))])
    reply = await post(api, body, content_type)
    assert (reply.status, reply.body["code"]) == (400, 700), reply.body
    assert reply.body["detail"].startswith("job"), reply.body["detail"]


@pytest.mark.parametrize(
    "body",
    [
        b"no boundary anywhere",
        b'--imgserve-test-boundary\r\nContent-Disposition: form-data; name="job"\r\n\r\n{}',
        b"--imgserve-test-boundary\r\n\r\n\r\n--imgserve-test-boundary--\r\n",
        b'--other\r\nContent-Disposition: form-data; name="job"\r\n\r\n{}\r\n--other--\r\n',
        b"--imgserve-test-boundary\r\nContent-Dispos",
        b"--imgserve-test-boundary\r\nnot a header\r\n\r\n{}\r\n--imgserve-test-boundary--\r\n",
    ],
    ids=[
        "no boundary",
        "cut off",
        "part without headers",
        "wrong boundary",
        "header cut off",
        "not a header",
    ],
)
async def test_malformed_multipart_is_707(start: Any, body: bytes) -> None:
    """A body that is not well-formed multipart: 400 (707), and the API still serves."""
    api = await start()
    reply = await post(api, body, "multipart/form-data; boundary=imgserve-test-boundary")
    assert (reply.status, reply.body["code"]) == (400, 707), reply.body
    assert (await get(api, "/health"))["status"] == "ok"


async def test_oversize_upload_is_301(start: Any, out: Path) -> None:
    """An upload over the download byte limit: 413 (301), stopped as it arrives; the
    intake budget is given back."""
    api = await start(max_download_bytes=50_000)
    body, content_type = multipart(
        [("job", None, _upload_job(out)), ("source", "big.jpg", jpeg(64, 64) + bytes(200_000))]
    )
    reply = await post(api, body, content_type)
    assert (reply.status, reply.body["code"]) == (413, 301), reply.body
    assert reply.body["detail"].startswith("source: ")
    assert (api.service.intake.jobs, api.service.intake.bytes) == (0, 0)


_names = st.sampled_from(["job", "source", "Job", "src", "", 'a"b'])
_files = st.one_of(
    st.none(), st.sampled_from(["a.jpg", "", "../../x.png", "c:\\a\\b.gif"]), st.text(max_size=8)
)
_payloads = st.one_of(
    st.binary(max_size=64),
    st.just(jpeg(16, 16)),
    st.sampled_from([b"{}", b'{"outputs": []}', b"null", b'{"outputs": [{"url": 1}]}']),
)
_hostile = st.tuples(
    st.lists(st.tuples(_names, _files, _payloads), max_size=4),
    st.integers(0, 400),  # where to cut the body (400: not at all)
    st.sampled_from(["imgserve-test-boundary", "x", "a" * 80]),
)


def test_hostile_multipart_never_answers_5xx(
    tmp_path: Path, out: Path, shared_planner: Planner
) -> None:
    """Random parts, names, file names and cut-off bodies: every reply is a documented
    code under 500 (hypothesis, bounded), and the API still serves after."""
    loop = asyncio.new_event_loop()
    served = loop.run_until_complete(start_api(tmp_path / "state", shared_planner, _settings(out)))
    job = _upload_job(out)

    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(case=_hostile, valid_job=st.booleans())
    def check(case: tuple[list[Part], int, str], valid_job: bool) -> None:
        parts, cut, boundary = case
        if valid_job:
            parts = [("job", None, job), *parts]
        body, _ = multipart(parts, "imgserve-test-boundary")
        reply = loop.run_until_complete(
            post(
                served,
                body[:cut] if cut < 400 else body,
                f"multipart/form-data; boundary={boundary}",
            )
        )
        assert isinstance(reply.body, dict), reply.body
        if reply.status == 202:  # a valid job and source among the noise
            assert reply.body["state"] == "queued"
            return
        assert reply.body["code"] in DOCUMENTED, reply.body
        assert reply.status < 500 and reply.status == errors.by_code(reply.body["code"]).status

    try:
        check()
        assert loop.run_until_complete(get(served, "/health"))["status"] == "ok"
    finally:
        loop.run_until_complete(served.stop())
        loop.close()


# --- bounds on what one job may cost (review of #12) ------------------------------------


def _png(width: int, height: int) -> bytes:
    return bytes(pyvips.Image.black(width, height, bands=3).pngsave_buffer())


async def test_an_output_whose_scaled_source_is_over_the_limit_is_303(
    start: Any, out: Path, http_server: HTTPTestServer
) -> None:
    """A 4000x4 source stretched (fill, enlarge) to 4x4000 would first be scaled to
    4000000x4000: refused before the reply (303, naming the output), not left to
    spin in a worker."""
    api = await start()
    src = serve(http_server, "api/thin/Thin.png", _png(4000, 4))
    reply = await post(api, _job(
        _out(url=f"file://{out}/thin.png", width=4, height=4000, fit="fill", enlarge=True),
        source=src,
    ))  # fmt: skip
    assert (reply.status, reply.body["code"]) == (422, 303), reply.body
    assert reply.body["detail"].startswith("outputs[0]: the source scaled"), reply.body
    assert not (out / "thin.png").exists()


async def test_outputs_over_the_job_pixel_limit_together_are_303(
    start: Any, out: Path, http_server: HTTPTestServer
) -> None:
    """Each output within the result limit, all of them together over max_job_pixels:
    refused before the reply with 303 naming `outputs`; one output alone is fine."""
    api = await start(imaging=ImagingLimits(max_job_pixels=100_000))
    src = serve(http_server, "api/budget/Big.jpg", jpeg(400, 200))
    outputs = [_out(url=f"file://{out}/b{i}.jpg", width=400) for i in range(2)]
    reply = await post(api, _job(*outputs, source=src))
    assert (reply.status, reply.body["code"]) == (422, 303), reply.body
    assert reply.body["detail"].startswith("outputs: 2 outputs of 160000 pixels"), reply.body
    assert (await post(api, _job(outputs[0], source=src))).status == 202


async def test_a_trickled_upload_is_cut_at_the_download_timeout(start: Any, out: Path) -> None:
    """A multipart upload that stops arriving is refused after download_timeout_s
    (305), as a download would be, and gives its intake slot back."""
    api = await start(download_timeout_s=1.0)
    body, content_type = multipart(
        [("job", None, _upload_job(out)), ("source", "slow.jpg", jpeg(64, 64))]
    )
    cut = body.index(b"\xff\xd8") + 2  # the job part and two bytes of the source

    async def trickle() -> Any:
        yield body[:cut]
        await asyncio.sleep(30)  # never sends the rest

    async with aiohttp.ClientSession() as session:
        request = session.post(
            api.url + "/jobs", data=trickle(), headers={"Content-Type": content_type}
        )
        async with asyncio.timeout(15), request as resp:
            status, answer = resp.status, await resp.json()
    assert (status, answer["code"]) == (422, 305), answer
    assert answer["detail"].startswith("source: the upload did not arrive")
    assert (api.service.intake.jobs, api.service.intake.bytes) == (0, 0)


async def test_a_reply_deadline_during_placeholders_withdraws_the_ones_up(
    start: Any, out: Path, http_server: HTTPTestServer, ftp_slow_server: Any
) -> None:
    """The reply deadline strikes while one placeholder still crawls to a slow FTP
    server: 504 (612), and the output whose placeholder did go up gets the failure
    image, not a "being processed" placeholder forever."""
    api = await start(server=ServerSettings(reply_timeout_s=2.0))
    src = serve(http_server, "api/deadline/D.jpg", jpeg(1200, 800))
    reply = await post(api, _job(
        _out(url=f"file://{out}/quick.png", width=300),
        _out(url=ftp_slow_server.url("deadline/slow.png"), width=1200),
        source=src,
    ))  # fmt: skip
    assert (reply.status, reply.body["code"]) == (504, 612), reply.body
    image = decode((out / "quick.png").read_bytes())
    corner = image(1, 1)
    assert corner[0] > corner[1] + 5  # the failure canvas (reddish), not the grey placeholder
    assert (await api.service.queue.counts())["queued"] == 0


async def test_an_uploaded_file_name_is_a_url_path_segment(start: Any, out: Path) -> None:
    """{$basename} of an uploaded "Sea #1?.jpeg" is percent-encoded, as a source URL's
    name is: the destination is one file, not a path cut at '#' or '?'."""
    api = await start()
    body, content_type = multipart(
        [("job", None, _upload_job(out)), ("source", "Sea #1?.jpeg", jpeg(60, 40))]
    )
    reply = await post(api, body, content_type)
    assert reply.status == 202, reply.body
    assert reply.body["outputs"][0]["url"] == f"file://{out}/up/Sea%20%231%3F.jpeg"
    assert (out / "up" / "Sea #1?.jpeg").exists()


async def test_webhook_host_idna_cannot_encode_is_705(start: Any) -> None:
    """A webhook whose host no lookup can take (an empty label) is refused with 705
    naming the webhook, not answered 500 (601; found by schemathesis)."""
    api = await start()
    reply = await post(api, _job(webhook="http://.hooks.example/x"))
    assert (reply.status, reply.body["code"]) == (400, 705), reply.body
    assert reply.body["detail"].startswith("webhook: ")

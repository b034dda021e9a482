"""``POST /jobs`` through the real daemon: one source, many outputs, every scheme.

One daemon serves the whole module (each start costs seconds); every test uses its
own file names. The error table lives in tests/test_jobs_api.py (in-process); here
a few codes show they come through the real daemon too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import pytest
import pyvips

from tests.e2e.conftest import (
    Daemon,
    decode,
    jpeg,
    multipart,
    png_bands,
    post_jobs,
    send,
    serve,
)
from tests.servers import FTP_PASSWORD, S3_ENV, FTPTestServer, HTTPTestServer, S3TestServer

pytestmark = pytest.mark.slow

RED, GREEN, BLUE = (220, 0, 0), (0, 200, 0), (0, 0, 220)
LOADERS = {"jpeg": "jpegload", "png": "pngload", "webp": "webpload", "avif": "heifload",
           "gif": "gifload"}  # fmt: skip


@pytest.fixture(scope="module")
def daemon(start_module_daemon: Any, s3_server: S3TestServer) -> Daemon:
    """The module's daemon: S3 on moto, two attempts per job (the crash test)."""
    env = {**S3_ENV, "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    started: Daemon = start_module_daemon(
        "--s3-endpoint", s3_server.endpoint, "--s3-region", "us-east-1",
        "--max-attempts", "2", "--retry-base", "0.2",
        env=env,
    )  # fmt: skip
    return started


def near(pixel: list[float], colour: tuple[int, ...], tolerance: int = 30) -> bool:
    return all(abs(p - c) <= tolerance for p, c in zip(pixel, colour, strict=False))


def is_placeholder(image: pyvips.Image) -> bool:
    """The placeholder is a light grey canvas: its corner is (238, 238, 238)."""
    return near(image(1, 1)[:3], (238, 238, 238), 3)


def is_failure(image: pyvips.Image) -> bool:
    """The failure canvas is reddish, neither the grey placeholder nor a result."""
    corner = image(1, 1)
    return bool(corner[0] > corner[1] + 5) and not is_placeholder(image)


def check_image(data: bytes, width: int, height: int, fmt: str) -> pyvips.Image:
    """``data`` decodes as a ``fmt`` image of ``width`` x ``height``."""
    image = decode(data)
    assert (image.width, image.height) == (width, height), (image.width, image.height, fmt)
    assert image.get("vips-loader").startswith(LOADERS[fmt]), image.get("vips-loader")
    return image


def accepted(reply: Any) -> tuple[str, list[dict[str, Any]]]:
    """The job id and outputs of a 202 reply (checking its Location and state)."""
    assert reply.status == 202, reply.body
    job_id = reply.body["jobId"]
    assert reply.headers["Location"] == f"/jobs/{job_id}"
    assert reply.body["state"] == "queued"
    return job_id, reply.body["outputs"]


def s3_reader(s3_server: S3TestServer) -> Callable[[str], bytes]:
    client = s3_server.client()

    def read(key: str) -> bytes:
        return bytes(client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read())

    return read


def test_five_outputs_over_every_scheme_and_format(
    daemon: Daemon,
    http_server: HTTPTestServer,
    ftp_server: FTPTestServer,
    s3_server: S3TestServer,
) -> None:
    """One http source, five outputs (http PUT, http form, ftp, file, s3) in five
    formats: each lands with the reply's size and format; GET shows their bytes."""
    src = serve(http_server, "jobs5/Beach.jpg", jpeg(1600, 1200))
    out = daemon.out_dir
    job = {
        "source": src,
        "outputs": [
            {"url": http_server.url("/files/jobs5/{$basename}-{$width}.jpg"), "width": 640,
             "quality": 80},
            {"url": http_server.url("/form") + ":jobs5-{$basename}-{$width}x{$height}.png",
             "form_field": "upload", "width": 200, "height": 200, "fit": "cover"},
            {"url": ftp_server.url("jobs5/{$basename}-{$width}.webp"), "width": 320},
            {"url": f"file://{out}/jobs5/{{$basename}}-{{$width}}.avif", "width": 160},
            {"url": f"s3://{s3_server.bucket}/jobs5/{{$basename}}-{{$height}}.gif",
             "height": 75},
        ],
        "metadata": {"uploadId": "42", "tags": ["a", "b"]},
    }  # fmt: skip
    job_id, outputs = accepted(post_jobs(daemon, job))
    expected = [(640, 480, "jpeg"), (200, 200, "png"), (320, 240, "webp"), (160, 120, "avif"),
                (100, 75, "gif")]  # fmt: skip
    assert [(o["width"], o["height"], o["format"]) for o in outputs] == expected
    assert outputs[0]["url"] == http_server.url("/files/jobs5/Beach-640.jpg")
    assert outputs[1]["url"] == http_server.url("/form") + ":jobs5-Beach-200x200.png"
    assert outputs[2]["url"].endswith("/jobs5/Beach-320.webp")
    assert FTP_PASSWORD not in json.dumps(outputs) and "***" in outputs[2]["url"]
    assert outputs[3]["url"] == f"file://{out}/jobs5/Beach-160.avif"
    assert outputs[4]["url"] == f"s3://{s3_server.bucket}/jobs5/Beach-75.gif"

    status = daemon.wait(job_id)
    assert status["state"] == "done", status
    stored = [
        http_server.state.files["jobs5/Beach-640.jpg"],
        http_server.state.files["jobs5-Beach-200x200.png"],
        (ftp_server.home / "jobs5/Beach-320.webp").read_bytes(),
        (out / "jobs5/Beach-160.avif").read_bytes(),
        s3_reader(s3_server)("jobs5/Beach-75.gif"),
    ]
    for data, (width, height, fmt) in zip(stored, expected, strict=True):
        image = check_image(data, width, height, fmt)
        assert not is_placeholder(image)
        assert near(image(2, 2)[:3], (220, 60, 60), 40)  # the source's red top-left quadrant
    assert http_server.state.form_fields["jobs5-Beach-200x200.png"] == "upload"
    assert [o["bytes"] for o in status["outputs"]] == [len(d) for d in stored]
    assert [{k: o[k] for k in ("url", "width", "height", "format")} for o in status["outputs"]] == (
        outputs
    )
    assert status["srcURL"] == src and status["dstURL"] == outputs[0]["url"]
    assert (status["width"], status["height"], status["attempts"]) == (640, 480, 1)
    assert status["operationType"] == "resize"
    assert status["metadata"] == {"uploadId": "42", "tags": ["a", "b"]}


def test_multipart_source_upload(daemon: Daemon, http_server: HTTPTestServer) -> None:
    """The source sent as a file part (before the job part): its file name gives
    {$basename} and {$extension}; the job has no source URL."""
    out = daemon.out_dir
    job = {"outputs": [
        {"url": f"file://{out}/upload/{{$basename}}-{{$width}}.{{$extension}}", "width": 120},
        {"url": http_server.url("/files/upload/{$basename}.png"), "width": 60, "height": 60},
    ]}  # fmt: skip
    body, content_type = multipart(
        [("source", "Holiday.jpeg", jpeg(600, 400)), ("job", None, json.dumps(job).encode())]
    )
    job_id, outputs = accepted(send(daemon, "/jobs", body, content_type))
    assert [o["url"] for o in outputs] == [
        f"file://{out}/upload/Holiday-120.jpeg",
        http_server.url("/files/upload/Holiday.png"),
    ]
    status = daemon.wait(job_id)
    assert status["state"] == "done", status
    assert status["srcURL"] is None
    first = check_image((out / "upload/Holiday-120.jpeg").read_bytes(), 120, 80, "jpeg")
    assert near(first(2, 2)[:3], (220, 60, 60), 40)
    check_image(http_server.state.files["upload/Holiday.png"], 60, 60, "png")


def test_svg_source_renders_each_output_at_its_own_size(
    daemon: Daemon, http_server: HTTPTestServer
) -> None:
    """An SVG source with three outputs (800 px, 200 px, scale 3): each drawn at its
    own size, so the black/white edge stays one pixel sharp at every size."""
    svg = (
        b'<svg xmlns="http://www.w3.org/2000/svg" width="100" height="50">'
        b'<rect width="100" height="50" fill="white"/>'
        b'<rect width="50" height="50" fill="black"/></svg>'
    )
    src = serve(http_server, "svg/Edge.svg", svg)
    out = daemon.out_dir
    job = {"source": src, "outputs": [
        {"url": f"file://{out}/svg/{{$basename}}-{{$width}}.png", "width": 800},
        {"url": f"file://{out}/svg/{{$basename}}-{{$width}}.webp", "width": 200},
        {"url": f"file://{out}/svg/{{$basename}}-{{$width}}.jpg", "scale": 3},
    ]}  # fmt: skip
    job_id, outputs = accepted(post_jobs(daemon, job))
    sizes = [(800, 400, "png"), (200, 100, "webp"), (300, 150, "jpeg")]
    assert [(o["width"], o["height"], o["format"]) for o in outputs] == sizes
    status = daemon.wait(job_id)
    assert status["state"] == "done", status
    assert status["operationType"] == "rasterize"
    for name, (width, height, fmt) in zip(["800.png", "200.webp", "300.jpg"], sizes, strict=True):
        image = check_image((out / f"svg/Edge-{name}").read_bytes(), width, height, fmt)
        row = [image(x, height // 2)[0] for x in range(width)]
        assert row[width // 2 - 1] < 40 and row[width // 2] > 215, (name, row[width // 2 - 2 :][:4])
        # Drawn at this size the pixel-aligned edge has no grey pixel; a raster scaled
        # up from a smaller rendering has at least one (3 from 100 px to 800 px).
        assert not [v for v in row if 60 < v < 195], (name, [v for v in row if 60 < v < 195])


def test_every_fit_mode_size_and_pixels(daemon: Daemon, http_server: HTTPTestServer) -> None:
    """cover (crop at gravity), contain (padding: transparent, white on JPEG, explicit
    colours), fill (stretch), inside, outside, and enlarge false, from one 400x200
    source banded red | green | blue."""
    src = serve(http_server, "fit/Bands.png", png_bands(400, 200))
    out = daemon.out_dir

    def dst(name: str) -> str:
        return f"file://{out}/fit/{name}"

    box = {"width": 100, "height": 100}
    big = {"width": 800, "height": 800}
    cases: list[tuple[str, dict[str, Any], tuple[int, int]]] = [
        ("cover-west.png", {**box, "gravity": "west"}, (100, 100)),
        ("cover-east.png", {**box, "fit": "cover", "gravity": "east"}, (100, 100)),
        ("fill.png", {**box, "fit": "fill"}, (100, 100)),
        ("contain.png", {"width": 200, "height": 200, "fit": "contain"}, (200, 200)),
        ("contain.jpg", {"width": 200, "height": 200, "fit": "contain"}, (200, 200)),
        ("contain-rgb.png", {"width": 200, "height": 200, "fit": "contain",
                             "background": "#00f"}, (200, 200)),
        ("contain-rgba.png", {"width": 200, "height": 200, "fit": "contain",
                              "background": "#0000ff80"}, (200, 200)),
        ("inside.png", {**box, "fit": "inside"}, (100, 50)),
        ("outside.png", {**box, "fit": "outside"}, (200, 100)),
        ("cover-small.png", {**big, "fit": "cover"}, (400, 200)),
        ("contain-small.png", {**big, "fit": "contain"}, (800, 800)),
        ("cover-enlarge.png", {**big, "fit": "cover", "enlarge": True}, (800, 800)),
        ("inside-wide.png", {"width": 1000, "fit": "inside"}, (400, 200)),
    ]  # fmt: skip
    job = {"source": src, "outputs": [{"url": dst(name), **args} for name, args, _ in cases]}
    job_id, outputs = accepted(post_jobs(daemon, job))
    assert [(o["width"], o["height"]) for o in outputs] == [size for _, _, size in cases]
    status = daemon.wait(job_id)
    assert status["state"] == "done", status
    images = {
        name: check_image(
            (out / "fit" / name).read_bytes(), *size, "jpeg" if name.endswith("jpg") else "png"
        )
        for name, _, size in cases
    }

    def colour(name: str, x: int, y: int) -> list[float]:
        return list(images[name](x, y))

    # cover: scaled to 200x100, the west window keeps red|green, the east green|blue
    for name, left, right in (("cover-west.png", RED, GREEN), ("cover-east.png", GREEN, BLUE)):
        assert near(colour(name, 10, 50), left) and near(colour(name, 90, 50), right), name
    # fill: all three bands, squeezed (a centre crop would be green only)
    for x, band in ((10, RED), (50, GREEN), (90, BLUE)):
        assert near(colour("fill.png", x, 50), band), (x, colour("fill.png", x, 50))
    # contain: 200x100 in the middle of 200x200, padded above and below
    for name in ("contain.png", "contain.jpg", "contain-rgb.png", "contain-rgba.png"):
        for x, band in ((10, RED), (100, GREEN), (190, BLUE)):
            assert near(colour(name, x, 100)[:3], band), (name, x, colour(name, x, 100))
    assert images["contain.png"].bands == 4 and colour("contain.png", 2, 2)[3] == 0
    assert colour("contain.png", 100, 100)[3] == 255
    assert near(colour("contain.jpg", 2, 2), (255, 255, 255), 8)
    assert near(colour("contain.jpg", 100, 197), (255, 255, 255), 8)
    assert near(colour("contain-rgb.png", 2, 2), (0, 0, 255, 255), 2)
    assert near(colour("contain-rgba.png", 2, 197), (0, 0, 255, 128), 2)
    # inside/outside keep the aspect: all bands, nothing cropped
    for name, (width, height) in (("inside.png", (100, 50)), ("outside.png", (200, 100))):
        assert near(colour(name, 2, height // 2), RED) and near(colour(name, width - 3, 2), BLUE)
    # enlarge false: never larger than the source; contain still pads to the box
    assert near(colour("contain-small.png", 400, 400), GREEN)
    assert near(colour("contain-small.png", 210, 400), RED)
    assert near(colour("contain-small.png", 590, 400), BLUE)
    assert colour("contain-small.png", 400, 250)[3] == 0  # above the 400x200 source
    assert near(colour("cover-enlarge.png", 400, 400), GREEN)
    assert near(colour("cover-small.png", 10, 100), RED)


def test_placeholders_at_reply_time_then_replaced(
    daemon: Daemon, http_server: HTTPTestServer
) -> None:
    """placeholder true: every output's placeholder (its size and format) is in place
    when the reply arrives, then replaced; placeholder false: nothing before the reply."""
    out = daemon.out_dir
    src = serve(http_server, "ph/Slow.jpg", jpeg(800, 600, b"IMGSERVE-FAULT-DELAY=1"))

    def job(tag: str, placeholder: bool) -> dict[str, Any]:
        return {"source": src, "placeholder": placeholder, "outputs": [
            {"url": f"file://{out}/ph/{tag}-{{$width}}.png", "width": 200},
            {"url": http_server.url(f"/files/ph/{tag}.webp"), "width": 90, "height": 90},
        ]}  # fmt: skip

    job_id, _ = accepted(post_jobs(daemon, job("on", True)))
    first = check_image((out / "ph/on-200.png").read_bytes(), 200, 150, "png")
    second = check_image(http_server.state.files["ph/on.webp"], 90, 90, "webp")
    assert is_placeholder(first) and is_placeholder(second)
    assert daemon.job(job_id)["state"] in ("queued", "running")
    assert daemon.wait(job_id)["state"] == "done"
    first = check_image((out / "ph/on-200.png").read_bytes(), 200, 150, "png")
    second = check_image(http_server.state.files["ph/on.webp"], 90, 90, "webp")
    assert not is_placeholder(first) and not is_placeholder(second)

    job_id, _ = accepted(post_jobs(daemon, job("off", False)))
    assert not (out / "ph/off-200.png").exists()
    assert "ph/off.webp" not in http_server.state.files
    assert daemon.job(job_id)["state"] in ("queued", "running")
    assert daemon.wait(job_id)["state"] == "done"
    assert not is_placeholder(check_image((out / "ph/off-200.png").read_bytes(), 200, 150, "png"))
    check_image(http_server.state.files["ph/off.webp"], 90, 90, "webp")


def test_failed_jobs_put_the_failure_image_at_every_output(
    daemon: Daemon, http_server: HTTPTestServer, ftp_server: FTPTestServer,
    s3_server: S3TestServer,
) -> None:  # fmt: skip
    """A source that fails at render (truncated JPEG, 202, no retry) and one that
    crashes its worker on both attempts (603): every output gets the failure image."""
    out = daemon.out_dir
    whole = jpeg(800, 600)
    cut = serve(http_server, "fail/Cut.jpg", whole[: len(whole) // 2])
    job_id, outputs = accepted(post_jobs(daemon, {"source": cut, "outputs": [
        {"url": f"file://{out}/fail/cut.png", "width": 100},
        {"url": http_server.url("/files/fail/cut.jpg"), "width": 120, "height": 120},
        {"url": ftp_server.url("fail/cut.webp"), "width": 50},
    ]}))  # fmt: skip
    status = daemon.wait(job_id)
    assert status["state"] == "failed" and status["error"]["code"] == 202, status
    assert status["attempts"] == 1
    stored = [
        (out / "fail/cut.png").read_bytes(),
        http_server.state.files["fail/cut.jpg"],
        (ftp_server.home / "fail/cut.webp").read_bytes(),
    ]
    for data, view in zip(stored, outputs, strict=True):
        assert is_failure(check_image(data, view["width"], view["height"], view["format"]))

    crash = serve(http_server, "fail/Crash.jpg", jpeg(300, 200, b"IMGSERVE-FAULT-SEGV"))
    job_id, outputs = accepted(post_jobs(daemon, {"source": crash, "outputs": [
        {"url": f"file://{out}/fail/crash.png", "width": 30},
        {"url": f"s3://{s3_server.bucket}/fail/crash.jpg", "width": 60, "height": 60},
    ]}))  # fmt: skip
    status = daemon.wait(job_id)
    assert status["state"] == "failed" and status["error"]["code"] == 603, status
    assert status["attempts"] == 2
    assert "bytes" not in status["outputs"][0]
    assert is_failure(check_image((out / "fail/crash.png").read_bytes(), 30, 20, "png"))
    assert is_failure(check_image(s3_reader(s3_server)("fail/crash.jpg"), 60, 60, "jpeg"))


def test_error_codes_name_the_field(daemon: Daemon, http_server: HTTPTestServer) -> None:
    """Through the real daemon: 702, 704, 703 at plan time, 415 (708) and a multipart
    707, each naming the field; none leaves a job behind and the daemon still serves."""
    src = serve(http_server, "err/Ok.jpg", jpeg(300, 200))
    out = daemon.out_dir
    good = {"url": f"file://{out}/err/{{$width}}.png", "width": 10}

    def refused(reply: Any) -> tuple[int, int, str]:
        return reply.status, reply.body["code"], reply.body["detail"]

    status, code, detail = refused(
        post_jobs(daemon, {"source": src, "outputs": [good, {**good, "colour": "red"}]})
    )
    assert (status, code) == (400, 702) and detail.startswith("outputs[1].colour: "), detail
    status, code, detail = refused(post_jobs(daemon, {"source": src, "outputs": [good] * 17}))
    assert (status, code, detail) == (400, 704, "outputs: 17 outputs, at most 16")
    status, code, detail = refused(
        post_jobs(daemon, {"source": src, "outputs": [good, {"url": good["url"], "scale": 2}]})
    )
    assert (status, code) == (400, 703), detail
    assert detail.startswith("outputs[1].scale: applies to SVG sources"), detail
    reply = send(daemon, "/jobs", json.dumps({"source": src, "outputs": [good]}).encode(),
                 "text/plain")  # fmt: skip
    assert (reply.status, reply.body["code"]) == (415, 708)
    body, content_type = multipart([("job", None, json.dumps({"outputs": [good]}).encode())])
    status, code, detail = refused(send(daemon, "/jobs", body, content_type))
    assert (status, code) == (400, 707) and detail.startswith("source: "), detail

    health = daemon.request("GET", "/health").body
    assert health["status"] == "ok" and health["queue"]["queued"] == 0
    assert not (out / "err").exists()  # not even a placeholder went up

"""End to end: the real daemon started by the CLI, real HTTP sources and destinations."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Daemon, alive, decode, descendants, jpeg, resize, serve
from tests.servers import BASIC_PASSWORD, BASIC_USER, HTTPTestServer

pytestmark = pytest.mark.slow


def is_placeholder(image: Any) -> bool:
    """The placeholder is a light grey canvas: its corner is (238, 238, 238)."""
    return bool(all(abs(v - 238) <= 3 for v in image(1, 1)[:3]))


def test_02_example_file_destination_placeholder_then_result(
    start_daemon: Any, http_server: HTTPTestServer
) -> None:
    """0.2's example: reply with tags substituted, placeholder first, then the 200x120 result."""
    daemon: Daemon = start_daemon()
    src = serve(http_server, "photos/Ex.jpg", jpeg(800, 600, b"IMGSERVE-FAULT-DELAY"))
    dst = f"file://{daemon.out_dir}/thumbs/{{$width}}-{{$basename}}.{{$ext}}"
    reply = daemon.post(resize(src, dst, width=200, height=120))
    assert reply.status == 200, reply.body
    final = daemon.out_dir / "thumbs" / "200-Ex.jpg"
    assert reply.body["dstURL"] == f"file://{final}"
    assert set(reply.body) == {"dstURL", "jobId"}

    placeholder = decode(final.read_bytes())
    assert (placeholder.width, placeholder.height) == (200, 120)
    assert is_placeholder(placeholder)
    assert daemon.job(reply.body["jobId"])["state"] in ("queued", "running")

    status = daemon.wait(reply.body["jobId"])
    assert status["state"] == "done", status
    assert status["dstURL"] == f"file://{final}"
    assert status["attempts"] == 1
    assert status["width"] == 200 and status["height"] == 120
    assert status["finishedAt"] >= status["startedAt"] >= status["createdAt"]
    result = decode(final.read_bytes())
    assert (result.width, result.height) == (200, 120)
    assert result.get("vips-loader").startswith("jpegload")
    assert not is_placeholder(result)
    # the source's top-left quadrant is red: the centre crop keeps red at the top left
    red = result(5, 5)
    assert red[0] > 180 and red[2] < 110


def test_02_post_form_destination(start_daemon: Any, http_server: HTTPTestServer) -> None:
    """0.2's URL:filename form upload with field_name reaches a real form endpoint."""
    daemon = start_daemon()
    src = serve(http_server, "form/Photo.jpg", jpeg(640, 480))
    dst = http_server.url("/form") + ":{$width}x{$height}-{$basename}.png"
    reply = daemon.post(resize(src, dst, width=160, field_name="upload"))
    assert reply.status == 200, reply.body
    assert reply.body["dstURL"] == http_server.url("/form") + ":160x120-Photo.png"
    assert daemon.wait(reply.body["jobId"])["state"] == "done"
    stored = http_server.state.files["160x120-Photo.png"]
    assert http_server.state.form_fields["160x120-Photo.png"] == "upload"
    image = decode(stored)
    assert (image.width, image.height, image.get("vips-loader")[:7]) == (160, 120, "pngload")


def test_put_destination_and_field_file_alias(
    start_daemon: Any, http_server: HTTPTestServer
) -> None:
    """A dstURL without a form field is an HTTP PUT; field_file is 0.2's alias of field_name."""
    daemon = start_daemon()
    src = serve(http_server, "put/p.jpg", jpeg(500, 500))
    reply = daemon.post(resize(src, http_server.url("/files/out/{$basename}.webp"), width=100))
    assert reply.status == 200, reply.body
    assert daemon.wait(reply.body["jobId"])["state"] == "done"
    image = decode(http_server.state.files["out/p.webp"])
    assert (image.width, image.height) == (100, 100)
    assert http_server.state.content_types["out/p.webp"] == "image/webp"

    dst = http_server.url("/form") + ":alias-{$basename}.jpg"
    reply = daemon.post(resize(src, dst, width=50, field_file="f"))
    assert reply.status == 200, reply.body
    assert daemon.wait(reply.body["jobId"])["state"] == "done"
    assert http_server.state.form_fields["alias-p.jpg"] == "f"


def test_rasterize_svg(start_daemon: Any, http_server: HTTPTestServer) -> None:
    """rasterize renders an SVG source to a PNG of the requested width with alpha."""
    daemon = start_daemon()
    svg = (
        b'<svg xmlns="http://www.w3.org/2000/svg" width="100" height="50">'
        b'<circle cx="25" cy="25" r="20" fill="red"/></svg>'
    )
    src = serve(http_server, "vec/logo.svg", svg)
    job = {
        "operationType": "rasterize",
        "srcURL": src,
        "dstURL": f"file://{daemon.out_dir}/{{$basename}}-{{$width}}.png",
        "args": {"width": 400},
    }
    reply = daemon.post(job)
    assert reply.status == 200, reply.body
    assert daemon.wait(reply.body["jobId"])["state"] == "done"
    image = decode((daemon.out_dir / "logo-400.png").read_bytes())
    assert (image.width, image.height, image.bands) == (400, 200, 4)
    assert image(399, 199)[3] == 0  # transparent outside the circle
    assert image(100, 100)[0] > 200 and image(100, 100)[3] == 255


@pytest.mark.parametrize(
    ("body", "status", "expected"),
    [
        (b"not json", 400, {"msg": "request parse error"}),
        (b"[1, 2]", 400, {"msg": "request parse error"}),
        (b'{"operationType": "resize"}', 400, {"msg": "request invalid", "code": 101}),
        (
            b'{"operationType": "blur", "srcURL": "a", "dstURL": "b", "args": {}}',
            400,
            {"msg": "request invalid", "code": 102},
        ),
    ],
)
def test_invalid_requests(
    start_daemon: Any, body: bytes, status: int, expected: dict[str, Any]
) -> None:
    """Malformed and invalid requests get 0.2's reply shapes with 4xx statuses."""
    daemon = start_daemon()
    reply = daemon.request("POST", "/", body)
    assert reply.status == status
    assert {k: reply.body[k] for k in expected} == expected
    if "code" in expected:
        assert reply.body["detail"]


def test_validation_against_source_and_destination(
    start_daemon: Any, http_server: HTTPTestServer
) -> None:
    """Unreachable source 201, non-image 202, too small 203, refused placeholder 205."""
    daemon = start_daemon()
    dst = f"file://{daemon.out_dir}/v/{{$basename}}.jpg"
    missing = daemon.post(resize(http_server.url("/files/nope.jpg"), dst, width=10))
    assert (missing.status, missing.body["code"]) == (422, 201)
    text = serve(http_server, "v/text.jpg", b"hello, not an image")
    assert daemon.post(resize(text, dst, width=10)).body["code"] == 202
    small = serve(http_server, "v/small.jpg", jpeg(50, 50))
    assert daemon.post(resize(small, dst, width=100)).body["code"] == 203
    assert daemon.post(resize(small, dst, width=100, enlarge=True)).status == 200
    refused = daemon.post(resize(small, http_server.url("/forbidden/x.jpg"), width=10))
    assert (refused.status, refused.body["code"]) == (422, 205)
    outside = daemon.post(resize(small, "file:///etc/imgserve-test.jpg", width=10))
    assert outside.body["code"] == 403
    # none of these left a job behind; the daemon still serves
    assert daemon.request("GET", "/health").body["queue"]["queued"] == 0


def test_unknown_paths_methods_and_big_bodies(start_daemon: Any, tmp_path: Path) -> None:
    """404/405/413 come back as JSON with codes; the body limit is read from --config TOML."""
    config = tmp_path / "imgserve.toml"
    config.write_text("[server]\nmax_request_bytes = 4096\n")
    daemon = start_daemon("--config", str(config))
    assert daemon.request("GET", "/nope").body["code"] == 606
    reply = daemon.request("DELETE", "/")
    assert (reply.status, reply.body["code"]) == (405, 607)
    reply = daemon.request("GET", "/jobs/0123")
    assert (reply.status, reply.body["code"]) == (404, 605)
    reply = daemon.request("POST", "/", b"{" + b" " * 5000 + b"}")
    assert (reply.status, reply.body["code"]) == (413, 125)


def test_failure_after_reply_replaces_placeholder(
    start_daemon: Any, http_server: HTTPTestServer
) -> None:
    """A truncated JPEG passes the header check, fails at render: 202 and the failure image."""
    daemon = start_daemon()
    whole = jpeg(800, 600)
    src = serve(http_server, "t/cut.jpg", whole[: len(whole) // 2])
    reply = daemon.post(resize(src, f"file://{daemon.out_dir}/t/cut.png", width=100))
    assert reply.status == 200, reply.body
    status = daemon.wait(reply.body["jobId"])
    assert status["state"] == "failed"
    assert status["error"]["code"] == 202
    assert status["attempts"] == 1  # a corrupt image is not retried
    image = decode((daemon.out_dir / "t/cut.png").read_bytes())
    assert (image.width, image.height) == (100, 75)
    corner = image(1, 1)
    assert corner[0] > corner[1] + 5  # the failure canvas is reddish, not the grey placeholder


def test_worker_killed_mid_job_is_retried(start_daemon: Any, http_server: HTTPTestServer) -> None:
    """SIGKILL of the workers mid-job: the job is retried and done; the next job succeeds."""
    daemon = start_daemon()
    src = serve(http_server, "k/slow.jpg", jpeg(600, 400, b"IMGSERVE-FAULT-DELAY"))
    reply = daemon.post(resize(src, f"file://{daemon.out_dir}/k/slow.jpg", width=60))
    job_id = reply.body["jobId"]
    daemon.wait_running(job_id)
    time.sleep(0.3)
    victims = daemon.workers()
    assert victims, "no worker processes found"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    status = daemon.wait(job_id)
    assert status["state"] == "done", status
    assert status["attempts"] == 2
    ok = serve(http_server, "k/ok.jpg", jpeg(300, 200))
    after = daemon.post(resize(ok, f"file://{daemon.out_dir}/k/ok.jpg", width=30))
    assert daemon.wait(after.body["jobId"])["state"] == "done"
    assert daemon.workers() and not (daemon.workers() & victims)


def _sleeping(pids: set[int]) -> set[int]:
    """The workers asleep in a render (the DELAY fault), not waiting for a task."""
    found = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/wchan").read_text() == "hrtimer_nanosleep":
                found.add(pid)
    return found


def test_idle_and_busy_workers_killed_with_jobs_queued_behind_them(
    start_daemon: Any, http_server: HTTPTestServer
) -> None:
    """SIGKILL of an idle worker (which can break pebble's pool), then of a busy one
    while more jobs wait behind it: every job still ends done, none hangs."""
    daemon = start_daemon("--workers", "2", "--max-attempts", "3")
    deadline = time.monotonic() + 30
    while len(daemon.workers()) < 2:
        assert time.monotonic() < deadline, "the workers never started"
        time.sleep(0.05)
    idle = next(iter(daemon.workers()))
    os.kill(idle, signal.SIGKILL)

    src = serve(http_server, "kb/slow.jpg", jpeg(400, 300, b"IMGSERVE-FAULT-DELAY=1"))
    ids = [
        daemon.post(resize(src, f"file://{daemon.out_dir}/kb/{n}.jpg", width=40)).body["jobId"]
        for n in range(6)
    ]
    busy: set[int] = set()
    while not busy:
        assert time.monotonic() < deadline + 30, "no worker ever took a job"
        busy = _sleeping(daemon.workers())
        time.sleep(0.02)
    os.kill(busy.pop(), signal.SIGKILL)

    finished = [daemon.wait(job_id, timeout_s=120) for job_id in ids]
    assert [job["state"] for job in finished] == ["done"] * 6, finished
    assert any(job["attempts"] > 1 for job in finished)  # the busy one ran again
    deadline = time.monotonic() + 30
    while daemon.request("GET", "/health").body["workersAlive"] != 2:
        assert time.monotonic() < deadline, daemon.request("GET", "/health").body
        time.sleep(0.05)


def test_segfaulting_job_fails_after_attempts(
    start_daemon: Any, http_server: HTTPTestServer
) -> None:
    """A job that segfaults its worker every time fails with 603; other jobs still finish."""
    daemon = start_daemon("--max-attempts", "2")
    bad = serve(http_server, "s/bad.jpg", jpeg(300, 200, b"IMGSERVE-FAULT-SEGV"))
    good = serve(http_server, "s/good.jpg", jpeg(300, 200))
    bad_id = daemon.post(resize(bad, f"file://{daemon.out_dir}/s/bad.jpg", width=30)).body["jobId"]
    good_id = daemon.post(resize(good, f"file://{daemon.out_dir}/s/good.jpg", width=30)).body[
        "jobId"
    ]
    status = daemon.wait(bad_id)
    assert status["state"] == "failed"
    assert status["error"]["code"] == 603
    assert status["attempts"] == 2
    assert daemon.wait(good_id)["state"] == "done"
    assert daemon.request("GET", "/health").body["status"] == "ok"


def test_job_timeout_and_memory_cap(start_daemon: Any, http_server: HTTPTestServer) -> None:
    """A runaway render is killed at the job timeout (306); a memory hog gets 307."""
    # 3 s: a loaded machine (the suite runs 4 workers on 2 cores) takes over a second
    # to fault in 1.5 GB, and the hog must reach the cap before the timeout.
    daemon = start_daemon("--job-timeout", "3", "--memory-limit-mb", "1500")
    hang = serve(http_server, "l/hang.jpg", jpeg(300, 200, b"IMGSERVE-FAULT-SLEEP"))
    hog = serve(http_server, "l/hog.jpg", jpeg(300, 200, b"IMGSERVE-FAULT-HOG"))
    hang_id = daemon.post(resize(hang, f"file://{daemon.out_dir}/l/h.jpg", width=30)).body["jobId"]
    hog_id = daemon.post(resize(hog, f"file://{daemon.out_dir}/l/m.jpg", width=30)).body["jobId"]
    assert daemon.wait(hang_id)["error"]["code"] == 306
    assert daemon.wait(hog_id)["error"]["code"] == 307


def test_full_queue_gets_503(start_daemon: Any, http_server: HTTPTestServer) -> None:
    """With the queue full, POST / answers 503 with Retry-After and code 602."""
    daemon = start_daemon("--queue-max", "1", "--workers", "1")
    slow = serve(http_server, "q/slow.jpg", jpeg(300, 200, b"IMGSERVE-FAULT-DELAY"))
    first = daemon.post(resize(slow, f"file://{daemon.out_dir}/q/1.jpg", width=30))
    assert first.status == 200
    second = daemon.post(resize(slow, f"file://{daemon.out_dir}/q/2.jpg", width=30))
    assert (second.status, second.body["code"]) == (503, 602)
    assert second.headers["Retry-After"]
    assert daemon.wait(first.body["jobId"])["state"] == "done"


def test_cli_lifecycle_files_and_logs(start_daemon: Any, http_server: HTTPTestServer) -> None:
    """status/stop exit codes; pid and 0640 log in the state dir; no password logged; none left."""
    daemon = start_daemon()
    http_server.state.files["cred.jpg"] = jpeg(100, 100)
    src = http_server.url("/auth/cred.jpg").replace("://", f"://{BASIC_USER}:{BASIC_PASSWORD}@")
    reply = daemon.post(resize(src, f"file://{daemon.out_dir}/c/cred.jpg", width=10))
    assert reply.status == 200, reply.body
    status = daemon.wait(reply.body["jobId"])
    assert status["state"] == "done"
    assert BASIC_PASSWORD not in str(status)

    again = daemon.cli("start")
    assert again.returncode == 1 and "already running" in again.stderr
    result = daemon.cli("status")
    assert result.returncode == 0
    assert f"pid {daemon.pid}" in result.stdout and f":{daemon.port}" in result.stdout
    assert "done 1" in result.stdout and "workers alive 2/2" in result.stdout
    for worker in daemon.workers():  # stat field 19: niceness
        assert Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[16] == "10"

    log = daemon.state_dir / "imgserve.log"
    assert stat.S_IMODE(log.stat().st_mode) == 0o640
    text = log.read_text()
    assert f"job {reply.body['jobId']} done" in text
    assert BASIC_PASSWORD not in text and f"{BASIC_USER}:***@" in text

    pid = daemon.pid
    tree = descendants(pid) | {pid}
    assert len(tree) >= 3  # daemon, forkserver, workers
    stopped = daemon.cli("stop")
    assert stopped.returncode == 0, stopped.stderr
    time.sleep(0.5)
    assert not [p for p in tree if alive(p)]
    assert not (daemon.state_dir / "imgserve.pid").exists()
    assert daemon.cli("status").returncode == 3


def test_stale_pid_file_and_port_in_use(start_daemon: Any, tmp_path: Path) -> None:
    """A stale pid file is reported (and replaced with -FORCE); a taken port fails start."""
    daemon = start_daemon()
    other = Daemon(tmp_path / "other", daemon.out_dir, [])
    other.port = daemon.port
    other.args[other.args.index("--port") + 1] = str(daemon.port)
    busy = other.cli("start")
    assert busy.returncode == 1 and "in use" in busy.stderr

    stale = Daemon(tmp_path / "stale", daemon.out_dir, [])
    stale.state_dir.mkdir()
    (stale.state_dir / "imgserve.pid").write_text("999999\n")
    status = stale.cli("status")
    assert status.returncode == 3 and "stale" in status.stdout
    refused = stale.cli("start")
    assert refused.returncode == 1 and "stale" in refused.stderr
    forced = stale.cli("start", "-FORCE")
    assert forced.returncode == 0, forced.stderr
    assert stale.cli("stop").returncode == 0


def test_stop_drains_running_jobs_and_restart(
    start_daemon: Any, http_server: HTTPTestServer
) -> None:
    """stop lets a running job finish before exiting; restart comes back with a new pid."""
    daemon = start_daemon()
    src = serve(http_server, "g/drain.jpg", jpeg(300, 200, b"IMGSERVE-FAULT-DELAY=1.5"))
    reply = daemon.post(resize(src, f"file://{daemon.out_dir}/g/drain.jpg", width=30))
    daemon.wait_running(reply.body["jobId"])
    first_pid = daemon.pid
    restarted = daemon.cli("restart")
    assert restarted.returncode == 0, restarted.stderr
    assert daemon.pid != first_pid and not alive(first_pid)
    status = daemon.job(reply.body["jobId"])
    assert status["state"] == "done" and status["attempts"] == 1, status
    assert "draining" in (daemon.state_dir / "imgserve.log").read_text()


def test_second_signal_stops_at_once_and_the_job_runs_later(
    start_daemon: Any, http_server: HTTPTestServer
) -> None:
    """A second SIGTERM exits without waiting; the interrupted job runs on the next start."""
    daemon = start_daemon("--shutdown-timeout", "60")
    src = serve(http_server, "g/hang.jpg", jpeg(300, 200, b"IMGSERVE-FAULT-DELAY=4"))
    reply = daemon.post(resize(src, f"file://{daemon.out_dir}/g/hang.jpg", width=30))
    daemon.wait_running(reply.body["jobId"])
    pid = daemon.pid
    tree = descendants(pid)
    os.kill(pid, signal.SIGTERM)
    time.sleep(0.3)
    assert alive(pid)  # draining: waiting for the running job
    started = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    while alive(pid) and time.monotonic() - started < 5:
        time.sleep(0.05)
    assert not alive(pid) and time.monotonic() - started < 3
    time.sleep(0.3)
    assert not [p for p in tree if alive(p)], "workers left behind"
    assert daemon.cli("start", "-FORCE").returncode == 0
    assert daemon.wait(reply.body["jobId"])["state"] == "done"


def test_configured_secret_query_parameters_are_redacted(
    start_daemon: Any, http_server: HTTPTestServer
) -> None:
    """--redact-param adds names to the built-in secret parameters: their values
    appear neither in the reply nor in the log."""
    daemon = start_daemon("--redact-param", "session_id")
    missing = str(http_server.url("/files/red/missing.jpg?session_id=s3cr3tvalue&w=1"))
    reply = daemon.post(resize(missing, f"file://{daemon.out_dir}/red/x.jpg", width=10))
    assert (reply.status, reply.body["code"]) == (422, 201)
    assert "s3cr3tvalue" not in json.dumps(reply.body)
    assert "session_id=***" in reply.body["detail"]
    log_text = (daemon.state_dir / "imgserve.log").read_text()
    assert "s3cr3tvalue" not in log_text

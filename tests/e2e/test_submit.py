"""``imgserve submit`` for real: the command as a subprocess (so its output is not a
terminal: plain lines) against a real daemon. A folder of 200 images with a corrupt
one in the middle, run again with --resume, a jobs file and a preset, and Ctrl-C
once (waits for the jobs in flight) and twice (leaves)."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import pytest
import pyvips

from tests.e2e.conftest import Daemon, decode, jpeg, serve
from tests.e2e.test_keys import keys_add
from tests.servers import HTTPTestServer

pytestmark = pytest.mark.slow

SLOW = b"IMGSERVE-FAULT-DELAY=1"  # a worker sleeps 1 s on this source (fault injection)


@pytest.fixture(scope="module")
def daemon(start_module_daemon: Any) -> Daemon:
    """One try per job and per upload, so a failing destination fails the job at once."""
    started: Daemon = start_module_daemon("--max-attempts", "1", "--upload-attempts", "1")
    return started


def submit(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imgserve", "submit", "--url", daemon.url, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def lines(out: str, outcome: str) -> list[str]:
    """The plain lines of jobs that ended ``outcome`` (``[n/total] outcome ...``)."""
    return [line for line in out.splitlines() if re.match(rf"\[\d+/\d+\] {outcome} ", line)]


def counts(daemon: Daemon) -> dict[str, int]:
    queue: dict[str, int] = daemon.request("GET", "/health").body["queue"]
    return queue


def photos(folder: Path, count: int) -> None:
    """``count`` small distinct JPEGs in nested folders, one corrupt in the middle."""
    for i in range(count):
        where = folder / f"set{i % 4}"
        where.mkdir(parents=True, exist_ok=True)
        img = pyvips.Image.black(24, 16, bands=3).new_from_image([i % 256, 80, 160])
        (where / f"p{i:03d}.jpg").write_bytes(bytes(img.jpegsave_buffer(Q=80)))
    (folder / "set0" / "p100.jpg").write_bytes(b"this is not a JPEG at all")


def test_a_folder_with_a_failure_then_resume(daemon: Daemon, tmp_path: Path) -> None:
    """200 files: 199 done and written, the corrupt one failed with 202 in its line
    and the summary, exit 1, plain lines throughout. The same command again skips
    the 199 (the daemon makes no new job) and still reports the corrupt file; with
    it fixed, the third run submits only it and exits 0."""
    photos(tmp_path / "in", 200)
    out_dir = daemon.out_dir / "batch"
    command = [
        str(tmp_path / "in"), "--output", f"file://{out_dir}/{{$basename}}-{{$width}}.webp",
        "--width", "8", "--concurrency", "16", "--resume",
    ]  # fmt: skip
    first = submit(daemon, *command)
    assert first.returncode == 1, first.stderr
    assert len(lines(first.stdout, "done")) == 199
    (failed,) = lines(first.stdout, "failed")
    assert "set0/p100.jpg" in failed and "code 202" in failed
    assert re.search(r"│\s+202 │\s+1 │", first.stdout), first.stdout[-2000:]
    assert "\x1b[" not in first.stdout  # no colours, no cursor moves: not a terminal
    assert len(list(out_dir.glob("p*-8.webp"))) == 199
    image = pyvips.Image.new_from_file(str(out_dir / "p007-8.webp"))
    assert (image.width, image.height) == (8, 5)

    done_before = counts(daemon)["done"]
    second = submit(daemon, *command)
    assert second.returncode == 1, second.stderr
    assert len(lines(second.stdout, "skipped")) == 199
    assert lines(second.stdout, "done") == [] and len(lines(second.stdout, "failed")) == 1
    assert counts(daemon)["done"] == done_before

    img = pyvips.Image.black(24, 16, bands=3)
    (tmp_path / "in/set0/p100.jpg").write_bytes(bytes(img.jpegsave_buffer()))
    third = submit(daemon, *command)
    assert third.returncode == 0, third.stdout[-2000:]
    assert len(lines(third.stdout, "skipped")) == 199 and len(lines(third.stdout, "done")) == 1
    assert (out_dir / "p100-8.webp").exists()
    assert counts(daemon)["done"] == done_before + 1


def test_jobs_file_and_preset(daemon: Daemon, http_server: HTTPTestServer, tmp_path: Path) -> None:
    """--jobs sends each line's job as it is (URL sources the daemon reads); a
    preset gives a file upload its two outputs."""
    jobs = tmp_path / "jobs.jsonl"
    with jobs.open("w") as fh:
        for i in range(3):
            src = serve(http_server, f"submit/j{i}.jpg", jpeg(64, 48))
            dst = f"file://{daemon.out_dir}/jobs/{{$basename}}-{{$width}}.png"
            fh.write(json.dumps({"source": src, "outputs": [{"url": dst, "width": 32}]}) + "\n")
    result = submit(daemon, "--jobs", str(jobs))
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in (daemon.out_dir / "jobs").iterdir()) == [
        "j0-32.png", "j1-32.png", "j2-32.png",
    ]  # fmt: skip

    preset = tmp_path / "thumbs.toml"
    preset.write_text(
        f'[[outputs]]\nurl = "file://{daemon.out_dir}/preset/{{$basename}}-{{$width}}.webp"\n'
        f"width = 40\n[[outputs]]\n"
        f'url = "file://{daemon.out_dir}/preset/{{$basename}}-sq.jpg"\n'
        'width = 20\nheight = 20\nfit = "cover"\n'
    )
    (tmp_path / "one.jpg").write_bytes(jpeg(80, 60))
    result = submit(daemon, str(tmp_path / "one.jpg"), "--preset", str(preset))
    assert result.returncode == 0, result.stdout + result.stderr
    square = pyvips.Image.new_from_file(str(daemon.out_dir / "preset/one-sq.jpg"))
    assert (square.width, square.height) == (20, 20)
    assert pyvips.Image.new_from_file(str(daemon.out_dir / "preset/one-40.webp")).width == 40


def test_resume_tries_a_failed_job_again(
    daemon: Daemon, http_server: HTTPTestServer, tmp_path: Path
) -> None:
    """A job that failed after it was accepted (its destination answered 503) is
    submitted again by the next --resume run, which now succeeds; the run after that
    finds the retried job done and skips it."""
    name = "submit-resume/out.png"
    http_server.state.fail_remaining[name] = 10**6
    jobs = tmp_path / "jobs.jsonl"
    src = serve(http_server, "submit-resume/src.jpg", jpeg(64, 48))
    dst = http_server.url(f"/flaky/{name}")
    job = {"source": src, "outputs": [{"url": dst, "width": 16}], "placeholder": False}
    jobs.write_text(json.dumps(job) + "\n")
    first = submit(daemon, "--jobs", str(jobs), "--resume")
    assert first.returncode == 1
    (failed,) = lines(first.stdout, "failed")
    assert "code 501" in failed, failed
    http_server.state.fail_remaining[name] = 0
    second = submit(daemon, "--jobs", str(jobs), "--resume")
    assert second.returncode == 0, second.stdout
    assert len(lines(second.stdout, "done")) == 1
    assert decode(http_server.state.files[name]).width == 16
    third = submit(daemon, "--jobs", str(jobs), "--resume")
    assert third.returncode == 0, third.stdout
    assert len(lines(third.stdout, "skipped")) == 1


def on_a_terminal(daemon: Daemon, *args: str) -> tuple[int, str]:
    """``imgserve submit ARGS`` with its output on a pseudo-terminal: its exit code
    and everything it showed."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgserve", "submit", "--url", daemon.url, *args],
        stdin=subprocess.DEVNULL, stdout=follower, stderr=follower,
        env={**os.environ, "COLUMNS": "160"},
    )  # fmt: skip
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the command ended and closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    return proc.wait(60), shown.decode("utf-8", "replace")


def test_a_terminal_gets_the_progress_bar(daemon: Daemon, tmp_path: Path) -> None:
    """On a terminal (a pseudo-terminal here): rich's progress bar with the jobs
    done and failed, the rate and the ETA, in colour; no plain lines; the summary."""
    for i in range(5):
        (tmp_path / f"t{i}.jpg").write_bytes(jpeg(40 + i, 30))
    code, text = on_a_terminal(
        daemon,
        str(tmp_path),
        "-o",
        f"file://{daemon.out_dir}/tty/{{$basename}}.png",
        "--width",
        "8",
    )
    assert code == 0
    assert "\x1b[" in text
    for part in ("5/5", "5 done", "0 failed", "jobs/s", "ETA", "imgserve submit: 5 jobs"):
        assert part in text, (part, text[-3000:])
    assert not re.search(r"^\[\d+/5\] done", text, re.MULTILINE)


def test_a_terminal_shows_bracketed_names_as_they_are(daemon: Daemon, tmp_path: Path) -> None:
    """Folders named ``[old]`` and ``[/raw]`` with a corrupt file each: on a terminal
    both failures are shown with their paths whole (not read as rich markup: no
    MarkupError, no dropped ``[old]``), and the run ends with exit 1."""
    for folder in ("[old]", "[/raw]"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "bad.jpg").write_bytes(b"not a JPEG")
    (tmp_path / "good.jpg").write_bytes(jpeg(40, 30))
    code, text = on_a_terminal(
        daemon, str(tmp_path), "-o", f"file://{daemon.out_dir}/br/{{$basename}}.png",
        "--width", "8", "--name-from-path",
    )  # fmt: skip
    plain = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", text)
    assert "Traceback" not in plain and code == 1, plain[-3000:]
    for folder in ("[old]", "[/raw]"):
        assert f"failed {tmp_path}/{folder}/bad.jpg: code 202" in plain, plain[-3000:]


def test_a_closed_output_stops_the_run_quietly(daemon: Daemon, tmp_path: Path) -> None:
    """``imgserve submit ... | head -1``: once its output is closed the run stops as
    on Ctrl-C (the jobs in flight end, nothing new is sent), without a traceback,
    and exits 1: not everything was done."""
    for i in range(40):
        (tmp_path / f"h{i:02d}.jpg").write_bytes(jpeg(20 + i, 20))
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgserve", "submit", "--url", daemon.url, str(tmp_path),
         "-o", f"file://{daemon.out_dir}/head/{{$basename}}.png", "--width", "8", "-j", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    assert re.match(r"\[1/40\] done ", proc.stdout.readline())
    proc.stdout.close()
    assert proc.wait(60) == 1
    assert "Traceback" not in proc.stderr.read()
    assert len(list((daemon.out_dir / "head").glob("*.png"))) < 40


def _until_line(stream: IO[str], pattern: str) -> list[str]:
    """Lines read from ``stream`` until one matches ``pattern`` (fails at its end)."""
    seen = []
    for line in stream:
        seen.append(line)
        if re.search(pattern, line):
            return seen
    raise AssertionError(f"no line matched {pattern!r}: {''.join(seen)}")


def _slow_folder(folder: Path, count: int) -> None:
    folder.mkdir()
    for i in range(count):
        (folder / f"s{i}.jpg").write_bytes(jpeg(32 + i, 32, SLOW))


def test_ctrl_c_waits_for_jobs_in_flight(daemon: Daemon, tmp_path: Path) -> None:
    """Ctrl-C after the first job ended: nothing new is submitted, the jobs in
    flight are waited for and reported, the summary says how many were not
    submitted, exit 130; the daemon is left with nothing queued or running."""
    _slow_folder(tmp_path / "slow", 8)
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgserve", "submit", "--url", daemon.url, str(tmp_path / "slow"),
         "-o", f"file://{daemon.out_dir}/int/{{$basename}}.png", "--width", "8", "-j", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    before = _until_line(proc.stdout, r"^\[1/8\] done ")
    proc.send_signal(signal.SIGINT)
    rest = proc.stdout.read()
    assert proc.wait(60) == 130
    out = "".join(before) + rest
    assert "stopping: no new jobs" in out
    ended = len(lines(out, "done"))
    assert 2 <= ended < 8
    assert re.search(rf"not submitted\s+│\s+{8 - ended} │", out), out
    assert len(list((daemon.out_dir / "int").glob("*.png"))) == ended
    assert (counts(daemon)["queued"], counts(daemon)["running"]) == (0, 0)


def test_second_ctrl_c_leaves(daemon: Daemon, tmp_path: Path) -> None:
    """A second Ctrl-C leaves at once, saying so, with exit 130, without waiting for
    the jobs in flight (2 s each: the daemon finishes them) or printing a summary."""
    folder = tmp_path / "slower"
    folder.mkdir()
    for i in range(6):
        (folder / f"s{i}.jpg").write_bytes(jpeg(32 + i, 32, b"IMGSERVE-FAULT-DELAY=2"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgserve", "submit", "--url", daemon.url, str(folder),
         "-o", f"file://{daemon.out_dir}/int2/{{$basename}}.png", "--width", "8", "-j", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while counts(daemon)["running"] == 0:  # the run is under way: a job is in a worker
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _until_line(proc.stdout, "stopping: no new jobs")
    proc.send_signal(signal.SIGINT)
    rest = proc.stdout.read()
    assert proc.wait(30) == 130
    assert "left; the daemon finishes the jobs it accepted" in rest
    assert lines(rest, "done") == [] and "jobs in" not in rest  # it did not wait


def test_a_refused_key_stops_the_run(start_daemon: Any, tmp_path: Path) -> None:
    """With a keyed daemon, a key it does not know (401 141), and a key whose
    destinations do not cover the outputs of the flags (403 143), stop the run after
    the jobs in flight: not one refusal per file of the folder. The daemon makes no
    job either way."""
    keys_file = tmp_path / "keys.toml"
    keys_add(keys_file, "alice")
    scoped = keys_add(keys_file, "scoped", "--destinations", f"file://{tmp_path}/out/ok/")
    daemon: Daemon = start_daemon("--keys", str(keys_file))
    assert daemon.out_dir == tmp_path / "out"
    for i in range(20):
        (tmp_path / "in" / f"k{i:02d}.jpg").parent.mkdir(exist_ok=True)
        (tmp_path / "in" / f"k{i:02d}.jpg").write_bytes(jpeg(20 + i, 20))
    for key, code in (("not-a-key-this-daemon-knows", 141), (scoped, 143)):
        (tmp_path / "key").write_text(key + "\n")
        result = submit(
            daemon, str(tmp_path / "in"), "-o", f"file://{daemon.out_dir}/no/{{$basename}}.png",
            "--width", "8", "-j", "2", "--api-key-file", str(tmp_path / "key"),
        )  # fmt: skip
        assert result.returncode == 1, result.stdout + result.stderr
        refused = lines(result.stdout, "failed")
        assert 1 <= len(refused) <= 2 and f"code {code}" in refused[0], result.stdout
        assert "stopping:" in result.stdout
        assert re.search(r"not submitted\s+│\s+1[89] │", result.stdout), result.stdout
    assert not (daemon.out_dir / "no").exists()


def test_resume_after_the_job_was_pruned(start_daemon: Any, tmp_path: Path) -> None:
    """--resume when the daemon still knows the key but has pruned its job (kept 1 s
    here): the replay names a job that is gone (605), so the item is submitted again
    under the retry key and ends done, instead of failing with 605."""
    daemon: Daemon = start_daemon("--keep-finished", "1")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "pruned.jpg").write_bytes(jpeg(40, 30))
    command = [str(tmp_path / "in"), "-o", f"file://{daemon.out_dir}/pr/{{$basename}}.png",
               "--width", "8", "--resume"]  # fmt: skip
    first = submit(daemon, *command)
    assert first.returncode == 0, first.stdout + first.stderr
    (done,) = lines(first.stdout, "done")
    job_id = re.search(r" job ([0-9a-f]{32}) ", done)
    assert job_id is not None, done
    deadline = time.monotonic() + 30
    while daemon.request("GET", f"/jobs/{job_id[1]}").status != 404:  # pruned
        assert time.monotonic() < deadline
        time.sleep(0.1)
    again = submit(daemon, *command)
    assert again.returncode == 0, again.stdout + again.stderr
    (redone,) = lines(again.stdout, "done")
    assert job_id[1] not in redone

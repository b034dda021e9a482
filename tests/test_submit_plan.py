"""``imgserve submit`` before anything is sent: sizes, outputs from flags, presets,
jobs files, the directory walk, same-name uploads, --resume keys, and the usage
errors of the command (exit 2, in-process)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from imgserve import cli
from imgserve.submit import plan
from imgserve.submit.plan import Item, PlanError
from imgserve.submit.report import Reporter
from tests.servers import free_port


@pytest.mark.parametrize(
    ("text", "size"),
    [("640", {"width": 640}), ("640x", {"width": 640}), ("x480", {"height": 480}),
     ("640x480", {"width": 640, "height": 480})],
)  # fmt: skip
def test_sizes(text: str, size: dict[str, int]) -> None:
    """--size takes WIDTH, WIDTHx, xHEIGHT and WIDTHxHEIGHT."""
    assert plan.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "x", "big", "0", "640x0", "-5", "640*480"])
def test_bad_sizes(text: str) -> None:
    """Anything else, or a zero side, is a usage error naming the flag."""
    with pytest.raises(PlanError, match="--size"):
        plan.parse_size(text)


def test_outputs_are_each_url_at_each_size() -> None:
    """Two URLs at two sizes give four outputs, each with the common options."""
    outputs = plan.outputs_from_flags(
        ["file:///o/{$basename}-{$width}.webp", "file:///o/{$basename}-{$width}.jpg"],
        [{"width": 640}, {"width": 200, "height": 200}],
        {"fit": "cover", "quality": 80},
    )
    assert [(o["url"][-4:], o.get("width"), o.get("height")) for o in outputs] == [
        ("webp", 640, None), ("webp", 200, 200), (".jpg", 640, None), (".jpg", 200, 200),
    ]  # fmt: skip
    assert all(o["fit"] == "cover" and o["quality"] == 80 for o in outputs)


def test_several_sizes_need_a_size_tag() -> None:
    """With several sizes, a URL without {$width}/{$height} would be written over."""
    with pytest.raises(PlanError, match=r"\{\$width\}"):
        plan.outputs_from_flags(["file:///o/{$basename}.webp"], [{"width": 1}, {"width": 2}], {})
    with pytest.raises(PlanError, match="needs a size"):
        plan.outputs_from_flags(["file:///o/a.webp"], [], {})


def test_preset(tmp_path: Path) -> None:
    """A preset is a job without source in TOML; no outputs, a source or bad TOML
    are refused with the file named."""
    good = tmp_path / "thumbs.toml"
    good.write_text(
        'priority = "batch"\n'
        '[[outputs]]\nurl = "file:///o/{$basename}-{$width}.webp"\nwidth = 64\n'
        '[[outputs]]\nurl = "file:///o/{$basename}-sq.png"\nwidth = 32\nheight = 32\n'
        'fit = "cover"\n'
    )
    preset = plan.load_preset(good)
    assert preset["priority"] == "batch" and len(preset["outputs"]) == 2
    assert preset["outputs"][1] == {"url": "file:///o/{$basename}-sq.png", "width": 32,
                                    "height": 32, "fit": "cover"}  # fmt: skip
    for text, why in (("priority = 1\n", "outputs"), ('source = "x"\n', "source"), ("[", "thumb")):
        bad = tmp_path / "thumbs.toml"
        bad.write_text(text)
        with pytest.raises(PlanError, match=why):
            plan.load_preset(bad)


def test_jobs_file() -> None:
    """A jobs file: a job a line, comments and blank lines skipped; a line that is
    not a job with a source URL is refused with its line number."""
    items = plan.load_jobs(
        ['# two jobs\n', '{"source": "https://e.example/a.jpg", "outputs": []}\n', "\n",
         '{"source": "https://e.example/b.jpg", "outputs": [], "priority": "batch"}\n'],
        "jobs.jsonl",
    )  # fmt: skip
    assert [(i.source, dict(i.job)) for i in items] == [
        ("https://e.example/a.jpg", {"outputs": []}),
        ("https://e.example/b.jpg", {"outputs": [], "priority": "batch"}),
    ]
    with pytest.raises(PlanError, match=r"jobs\.jsonl:2"):
        plan.load_jobs(['{"source": "https://e.example/a.jpg"}', "[1]"], "jobs.jsonl")
    with pytest.raises(PlanError, match=r"jobs\.jsonl:1: not JSON"):
        plan.load_jobs(["{"], "jobs.jsonl")


def test_a_jobs_file_source_must_be_a_url() -> None:
    """A jobs line whose source is a path (no scheme) is refused with its line
    number, before anything is sent (it used to stop the run with a ValueError)."""
    with pytest.raises(PlanError, match=r"jobs\.jsonl:2: .*photos/a\.jpg.* URL"):
        plan.load_jobs(
            ['{"source": "https://e.example/a.jpg", "outputs": []}',
             '{"source": "photos/a.jpg", "outputs": []}'],
            "jobs.jsonl",
        )  # fmt: skip


def _tree(base: Path, *names: str) -> None:
    for name in names:
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_bytes(b"x")


def test_walk(tmp_path: Path) -> None:
    """A directory gives its image files recursively in sorted order, without hidden
    ones or other files; a file named on the command line is sent as it is; a URL
    passes through; a missing path is an error."""
    _tree(tmp_path, "b.jpg", "a.PNG", "notes.txt", ".hidden.jpg", ".cache/c.jpg", "sub/d.webp")
    (tmp_path / "x.bin").write_bytes(b"x")
    found = [
        label for label, _ in plan.walk([str(tmp_path), str(tmp_path / "x.bin"), "s3://b/k.jpg"])
    ]
    assert found == [str(tmp_path / n) for n in ("a.PNG", "b.jpg", "sub/d.webp", "x.bin")] + [
        "s3://b/k.jpg"
    ]
    with pytest.raises(PlanError, match="no such file"):
        list(plan.walk([str(tmp_path / "missing.jpg")]))


def test_same_file_names_are_refused_unless_named_by_path(tmp_path: Path) -> None:
    """2019/a.jpg and 2020/a.jpg would both write {$basename} a: refused; with
    name_from_path they are sent as 2019-a.jpg and 2020-a.jpg."""
    _tree(tmp_path, "2019/a.jpg", "2020/a.jpg", "b.jpg")
    with pytest.raises(PlanError, match="more than once"):
        plan.items_for([str(tmp_path)], {"outputs": []})
    items = plan.items_for([str(tmp_path)], {"outputs": []}, name_from_path=True)
    assert [i.name for i in items] == ["b.jpg", "2019-a.jpg", "2020-a.jpg"]


def test_resume_keys() -> None:
    """The same source and job give the same key; another content, name, URL or
    option another; keys are valid Idempotency-Keys (printable ASCII, <= 255)."""
    job = {"outputs": [{"url": "file:///o/{$basename}.webp", "width": 64}], "priority": "batch"}
    upload = Item("a.jpg", Path("a.jpg"), job, name="a.jpg")
    key = plan.resume_key(upload, b"JPEG")
    reordered = {"priority": "batch", "outputs": job["outputs"]}
    assert key == plan.resume_key(
        Item("a.jpg", Path("elsewhere/a.jpg"), reordered, "a.jpg"), b"JPEG"
    )
    assert key != plan.resume_key(upload, b"JPEG2")
    assert key != plan.resume_key(Item("b.jpg", Path("b.jpg"), job, name="b.jpg"), b"JPEG")
    other_job = {**job, "priority": "interactive"}
    assert key != plan.resume_key(Item("a.jpg", Path("a.jpg"), other_job, name="a.jpg"), b"JPEG")
    url = Item("u", "https://e.example/a.jpg", job)
    assert plan.resume_key(url, None) != plan.resume_key(
        Item("u", "https://e.example/b.jpg", job), None
    )
    for one in (key, plan.retry_key(key, "3f0c" * 8)):
        assert len(one) <= 255 and one.isascii() and one.isprintable()
    assert plan.retry_key(key, "3f0c" * 8) != key


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["submit"], "nothing to submit"),
        (["submit", "{dir}"], "no outputs"),
        (["submit", "{dir}", "-o", "file:///o/{$basename}.webp"], "needs a size"),
        (["submit", "--jobs", "j.jsonl", "{dir}"], "--jobs holds whole jobs"),
        (["submit", "{dir}/nope.jpg", "-o", "file:///o/a.webp", "--width", "8"], "no such file"),
        (["submit", "{dir}", "-o", "u", "--width", "8", "--metadata", "[1]"], "JSON object"),
        (["submit", "{dir}", "-o", "u", "--width", "8", "--concurrency", "0"], "concurrency"),
        (["submit", "{dir}", "-o", "u", "--width", "0"], "--width 0: sizes are positive"),
        (["submit", "{dir}", "-o", "u", "--width", "8", "--height", "-2"], "--height -2"),
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A command that cannot make jobs exits 2 before contacting anything, saying why."""
    _tree(tmp_path, "a.jpg")
    code = cli.main([a.replace("{dir}", str(tmp_path)) for a in argv])
    assert code == 2
    assert message in capsys.readouterr().err


def test_no_daemon_stops_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing listening at --url: the first jobs fail with no answer, the run stops
    submitting the rest (they are "not submitted"), and exits 1."""
    for i in range(40):
        (tmp_path / f"a{i:02d}.jpg").write_bytes(b"x")
    url = f"http://127.0.0.1:{free_port()}"
    argv = ["submit", str(tmp_path), "--url", url, "-o", "file:///o/{$basename}.png",
            "--width", "8", "-j", "2", "--retries", "1", "--plain"]  # fmt: skip
    assert cli.main(argv) == 1
    out = capsys.readouterr().out
    assert "stopping: no answer from the daemon" in out
    assert re.search(r"not submitted\s+│\s+3[0-9] │", out), out


def test_without_the_client_extra_it_says_which_to_install(tmp_path: Path) -> None:
    """With httpx not installed, ``imgserve submit`` exits 2 naming the extra; the
    rest of the command line still works (it imports the client only when run)."""
    (tmp_path / "a.jpg").write_bytes(b"x")
    probe = (
        "import sys; sys.modules['httpx'] = None; from imgserve.cli import main; "
        f"sys.exit(main(['submit', {str(tmp_path)!r}, '-o', 'file:///o/a.png', '--width', '8']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "pip install 'imgserve[client]'" in result.stderr
    version = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['httpx'] = None; "
         "from imgserve.cli import main; sys.exit(main(['version']))"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert version.returncode == 0 and version.stdout.startswith("imgserve ")


@pytest.mark.parametrize("label", ["photos/[old]/a.jpg", "in1/[/raw]/bad.jpg", "scans/[/]/b.jpg"])
def test_a_failure_on_a_terminal_shows_names_as_they_are(label: str) -> None:
    """Square brackets in a path or a detail are shown as they are on the progress
    bar's console and in the summary, not read as rich markup (which dropped
    ``[old]`` and raised MarkupError on ``[/raw]``)."""
    out = io.StringIO()
    reporter = Reporter(out, total=1, plain=False)
    item = Item(label=label, source=Path(label), job={}, name="a.jpg")
    tally = plan.Tally(total=1, failed=1, failures=[(label, 202, "not an image: [/x]")])
    reporter.failed(item, 202, "not an image: [/x]", None, tally)
    assert f"failed {label}: code 202: not an image: [/x]" in out.getvalue()
    reporter.summary(tally, interrupted=False)
    assert label in out.getvalue().rpartition("first source")[2]


@contextlib.contextmanager
def _daemon_that_answers(body: dict[str, object], status: int) -> Iterator[str]:
    """A real HTTP server in a thread answering every request with ``body``; its URL."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    port = free_port()

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(body, status=status)

    def serve() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", answer)
        runner = web.AppRunner(app)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_an_unexpected_reply_fails_its_item_not_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A daemon whose 202 is no job (no jobId): each item is recorded as failed with
    what went wrong, the run goes on to the end and exits 1 (it used to die with a
    traceback out of the task group)."""
    for i in range(3):
        (tmp_path / f"a{i}.jpg").write_bytes(b"x")
    with _daemon_that_answers({"state": "queued"}, 202) as url:
        argv = ["submit", str(tmp_path), "--url", url, "-o", "file:///o/{$basename}.png",
                "--width", "8", "-j", "1", "--plain"]  # fmt: skip
        assert cli.main(argv) == 1
    out = capsys.readouterr().out
    assert len(re.findall(r"^\[\d/3\] failed .* code 0: unexpected KeyError", out, re.M)) == 3, out


def test_ctrl_c_while_planning_exits_130(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C during the directory walk (a KeyboardInterrupt raised from it, as the
    signal would): exit 130 saying nothing was sent, no traceback."""

    def interrupted(arguments: object) -> Iterator[tuple[str, Path]]:
        yield str(tmp_path / "a.jpg"), tmp_path / "a.jpg"
        raise KeyboardInterrupt

    monkeypatch.setattr(plan, "walk", interrupted)
    argv = ["submit", str(tmp_path), "-o", "file:///o/{$basename}.png", "--width", "8"]
    assert cli.main(argv) == 130
    assert "interrupted before anything was sent" in capsys.readouterr().err


def test_the_help_in_the_docs_is_the_real_one(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/client.md's ``imgserve submit --help`` block is what the command prints
    (90 columns), defaults included."""
    doc = (Path(__file__).parents[1] / "docs" / "client.md").read_text()
    shown = doc.partition("$ imgserve submit --help\n")[2].partition("```")[0]
    monkeypatch.setenv("COLUMNS", "90")
    with pytest.raises(SystemExit):
        cli.main(["submit", "--help"])
    assert _argparse_neutral(shown) == _argparse_neutral(capsys.readouterr().out)


def _argparse_neutral(text: str) -> str:
    """Help text as any supported Python prints it: 3.13's argparse shows
    ``--output, -o URL`` where 3.11 shows ``--output URL, -o URL`` (and so aligns and
    wraps a few lines differently); the words are the same."""
    text = re.sub(r"(-[-\w]+) ([A-Z][A-Z_]*), (-[-\w]+) \2\b", r"\1, \3 \2", text)
    return " ".join(text.split())


def _unlistable_below(base: Path) -> Path:
    """A directory below ``base`` that os.walk finds but cannot list: its path is
    longer than PATH_MAX (made one level at a time with dir_fd). Permissions would
    not do: the tests may run as root."""
    fd = os.open(base, os.O_RDONLY)
    try:
        for _ in range(17):
            os.mkdir("d" * 250, dir_fd=fd)
            child = os.open("d" * 250, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)
    return base / "/".join(["d" * 250] * 17)


def test_a_directory_that_cannot_be_listed_is_a_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A subdirectory os.walk cannot list is an item failed with why (not silently
    left out): the run counts it failed, sending nothing for it, and exits 1."""
    _unlistable_below(tmp_path)
    (unlisted,) = plan.items_for([str(tmp_path)], {"outputs": []})
    assert unlisted.error is not None and "cannot list" in unlisted.error
    assert "File name too long" in unlisted.error
    url = f"http://127.0.0.1:{free_port()}"
    argv = ["submit", str(tmp_path), "--url", url, "-o", "file:///o/{$basename}.png",
            "--width", "8", "-j", "1", "--retries", "1", "--plain"]  # fmt: skip
    assert cli.main(argv) == 1
    assert "cannot list" in capsys.readouterr().out

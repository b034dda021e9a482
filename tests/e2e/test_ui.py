"""The dashboard in a real browser: Playwright driving Debian's Chromium (headless)
against the real daemon. The page loads, a job submitted while it is open appears
live and turns done with its ThumbHash previews drawn, a failed job shows its code
and opens to its error and webhook attempts, the state filter, with API keys a
prompt until a good key is typed (the key only ever in an Authorization header),
and in Redis mode the worker nodes.

A screenshot of each page is kept: under ``$TEST_ARTIFACTS`` when set (CI keeps
that directory), else in the test's tmp_path; its path is recorded as the
``screenshot`` property of the test (in pytest's JUnit XML) and printed."""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, Page, Request, Route, expect, sync_playwright

from tests.e2e.conftest import Daemon, jpeg, post_jobs, serve
from tests.e2e.test_durability import Node, _wait_nodes
from tests.e2e.test_keys import keys_add
from tests.redis_server import RedisServer
from tests.servers import HTTPTestServer
from tests.webhook_receiver import Receiver, Reply, until

pytestmark = pytest.mark.slow

SECRET = "whsec_" + base64.b64encode(b"imgserve dashboard webhook key!!").decode()
DONE_MS = 30_000
"""How long a job may take to reach its end on a loaded CI machine (it takes about a second)."""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium, headless (Playwright's own browser download needs a network)."""
    executable = shutil.which("chromium")
    assert executable is not None, "Debian's chromium is not installed: scripts/test.sh does it"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def tolerated() -> list[str]:
    """Console errors a test expects (the browser logs each refused request): the
    page fixture ignores those containing one of these."""
    return ["status of 401"]


@pytest.fixture
def page(browser: Browser, tolerated: list[str]) -> Iterator[Page]:
    """A fresh tab (its own sessionStorage); a script error on the page, or an error
    in its console (a Content-Security-Policy refusal, say), fails the test."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    tab = context.new_page()
    script_errors: list[str] = []
    tab.on("pageerror", lambda exc: script_errors.append(str(exc)))
    tab.on(
        "console",
        lambda message: script_errors.append(message.text) if message.type == "error" else None,
    )
    yield tab
    context.close()
    assert [e for e in script_errors if not any(t in e for t in tolerated)] == []


@pytest.fixture
def screenshot(
    page: Page, tmp_path: Path, request: pytest.FixtureRequest, record_property: Any
) -> Iterator[None]:
    """The page as the test left it, kept as a test artifact."""
    yield
    where = Path(os.environ.get("TEST_ARTIFACTS") or tmp_path)
    where.mkdir(parents=True, exist_ok=True)
    path = where / f"{request.node.name}.png"
    page.screenshot(path=str(path), full_page=True)
    record_property("screenshot", str(path))
    print(f"screenshot: {path}")


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    rx = Receiver()
    rx.start()
    yield rx
    rx.stop()


@pytest.fixture(scope="module")
def daemon(start_module_daemon: Any, tmp_path_factory: pytest.TempPathFactory) -> Daemon:
    """A daemon without keys that signs webhook events (jobs name their own webhook)."""
    secrets = tmp_path_factory.mktemp("ui") / "webhook-secrets"
    secrets.write_text(SECRET + "\n")
    secrets.chmod(0o600)
    started: Daemon = start_module_daemon(
        "--webhook-secrets-file", str(secrets), "--set", "webhook_schedule_s=0,0.2,0.2"
    )
    return started


def _job(daemon: Daemon, source: str, name: str, **more: Any) -> dict[str, Any]:
    out = daemon.out_dir
    return {
        "source": source,
        "outputs": [
            {"url": f"file://{out}/ui/{name}-{{$width}}.webp", "width": 320},
            {"url": f"file://{out}/ui/{name}-{{$width}}.png", "width": 96, "height": 96},
        ],
        **more,
    }


def _accepted(reply: Any) -> str:
    assert reply.status == 202, reply.body
    job_id: str = reply.body["jobId"]
    return job_id


def _size(count_bytes: int) -> str:
    """A size as the page writes it."""
    if count_bytes < 1024:
        return f"{count_bytes} B"
    return f"{count_bytes / 1024:.1f} KiB"


def _open(page: Page, daemon: Daemon) -> None:
    """The dashboard, live: the event stream is connected, so changes from now on show."""
    page.goto(f"{daemon.url}/ui")
    expect(page.locator("#dashboard")).to_be_visible()
    expect(page.locator("#live")).to_have_attribute("data-live", "yes")


PIXELS = """canvas => {
  const d = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  const at = (x, y) => {
    const i = (y * canvas.width + x) * 4;
    return [d[i], d[i + 1], d[i + 2], d[i + 3]];
  };
  return {width: canvas.width, height: canvas.height,
          topLeft: at(0, 0), bottomRight: at(canvas.width - 1, canvas.height - 1)};
}"""


def test_a_job_submitted_while_the_page_is_open_turns_done_with_its_previews_drawn(
    daemon: Daemon, page: Page, http_server: HTTPTestServer, screenshot: None
) -> None:
    """The job appears from the event stream, turns done, and each output's ThumbHash
    is drawn: the source's red top-left quarter and blue rest show in the preview."""
    _open(page, daemon)
    source = serve(http_server, "ui/Quarters.jpg", jpeg(640, 480))
    job_id = _accepted(post_jobs(daemon, _job(daemon, source, "quarters")))

    row = page.locator(f'tr.job[data-job-id="{job_id}"]')
    expect(row).to_be_visible()
    expect(row).to_have_attribute("data-state", "done", timeout=DONE_MS)
    previews = row.locator('canvas[data-drawn="yes"]')
    expect(previews).to_have_count(2)
    wide = previews.nth(0).evaluate(PIXELS)
    assert wide["width"] > wide["height"]  # the 4:3 output's hash keeps its aspect ratio
    red, blue = wide["topLeft"], wide["bottomRight"]
    assert red[3] == blue[3] == 255
    assert red[0] > red[2] + 40 and blue[2] > blue[0] + 40, (red, blue)
    view = daemon.job(job_id)
    expect(row).to_contain_text("320\N{MULTIPLICATION SIGN}240 webp")
    sizes = ", ".join(_size(out["bytes"]) for out in view["outputs"])
    expect(row.locator("td").nth(4)).to_have_text(sizes)
    expect(row.locator("td").nth(5)).to_contain_text("run ")
    expect(page.locator("#nodes")).to_contain_text("embedded")
    expect(page.locator("#summary")).to_contain_text("2 of 2")  # workers alive
    expect(page.locator("#chart canvas")).to_have_count(1)  # uPlot drew the chart


def test_a_failed_job_shows_its_code_and_opens_to_its_error_and_delivery_attempts(
    daemon: Daemon,
    page: Page,
    http_server: HTTPTestServer,
    receiver: Receiver,
    screenshot: None,
) -> None:
    """A truncated source fails at render (202); its row shows the code, and a click
    opens its error and its webhook attempts (a 503, then the 200)."""
    _open(page, daemon)
    whole = jpeg(800, 600)
    source = serve(http_server, "ui/Cut.jpg", whole[: len(whole) // 2])
    receiver.answer(Reply(503))
    webhook = receiver.url("/ui-hook")
    job_id = _accepted(post_jobs(daemon, _job(daemon, source, "cut", webhook=webhook)))

    row = page.locator(f'tr.job[data-job-id="{job_id}"]')
    expect(row).to_have_attribute("data-state", "failed", timeout=DONE_MS)
    expect(row.locator(".code")).to_have_text("202")

    page.locator('#filter button[data-state="failed"]').click()
    expect(row).to_be_visible()
    states = page.locator("#jobs tr.job").evaluate_all("rows => rows.map(r => r.dataset.state)")
    assert set(states) == {"failed"}
    page.locator('#filter button[data-state="done"]').click()
    expect(row).to_have_count(0)
    page.locator('#filter button[data-state=""]').click()

    # Delivery goes on after the job's end (no change on the stream): opening the
    # row reads the job again.
    until(lambda: _delivered(daemon, job_id), 30.0, "the webhook event delivered")
    row.click()
    detail = page.locator(f'tr.detail[data-job-id="{job_id}"]')
    expect(detail).to_contain_text("202")
    expect(detail).to_contain_text(daemon.job(job_id)["error"]["message"])
    attempts = detail.locator("table.attempts tbody tr")
    expect(attempts).to_have_count(2)
    expect(attempts.nth(0)).to_contain_text("503")
    expect(attempts.nth(1)).to_contain_text("200")
    expect(detail).to_contain_text("job.failed")


def _delivered(daemon: Daemon, job_id: str) -> bool:
    return bool(daemon.job(job_id).get("webhook", {}).get("state") == "delivered")


@pytest.fixture(scope="module")
def keyed(start_module_daemon: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Daemon, str]:
    """A daemon with one API key, and that key."""
    keys_file = tmp_path_factory.mktemp("ui-keys") / "keys.toml"
    secret = keys_add(keys_file, "dashboard")
    daemon: Daemon = start_module_daemon("--keys", str(keys_file))
    return daemon, secret


def _keyed_get(daemon: Daemon, path: str, token: str | None) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=30)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_with_keys_the_page_asks_for_one_and_shows_the_jobs_with_it(
    keyed: tuple[Daemon, str], page: Page, http_server: HTTPTestServer, screenshot: None
) -> None:
    """Without a key the page is a prompt (140), a wrong key is refused (141), the
    right one shows the jobs; every data request carries it in Authorization and no
    URL ever holds it; it lasts a reload (sessionStorage)."""
    daemon, secret = keyed
    requests: list[Request] = []
    page.on("request", lambda sent: requests.append(sent))
    source = serve(http_server, "ui/Keyed.jpg", jpeg(400, 300))
    job = json.dumps(_job(daemon, source, "keyed")).encode()
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60)
    conn.request("POST", "/jobs", job, {"Authorization": f"Bearer {secret}"})
    reply = conn.getresponse()
    job_id = json.loads(reply.read())["jobId"]
    conn.close()

    page.goto(f"{daemon.url}/ui")
    expect(page.locator("#keyprompt")).to_be_visible()
    expect(page.locator("#keymessage")).to_contain_text("140")
    expect(page.locator("#dashboard")).to_be_hidden()
    page.fill("#keyinput", "isk_" + "not-the-key" * 4)
    page.click("#keyform button")
    expect(page.locator("#keymessage")).to_contain_text("141")
    expect(page.locator("#dashboard")).to_be_hidden()

    typed = len(requests)
    page.fill("#keyinput", secret)
    page.click("#keyform button")
    expect(page.locator("#dashboard")).to_be_visible()
    expect(page.locator(f'tr.job[data-job-id="{job_id}"]')).to_be_visible()
    expect(page.locator(f'tr.job[data-job-id="{job_id}"]')).to_contain_text("dashboard")
    expect(page.locator("#live")).to_have_attribute("data-live", "yes")
    expect(page.locator("#chart canvas")).to_have_count(1)

    page.reload()
    expect(page.locator("#dashboard")).to_be_visible()
    expect(page.locator("#keyprompt")).to_be_hidden()
    expect(page.locator("#live")).to_have_attribute("data-live", "yes")
    # A job submitted now reaches the page from the stream: read with GET /jobs/<id>.
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60)
    conn.request("POST", "/jobs", job, {"Authorization": f"Bearer {secret}"})
    later_id = json.loads(conn.getresponse().read())["jobId"]
    conn.close()
    expect(page.locator(f'tr.job[data-job-id="{later_id}"]')).to_be_visible()

    assert requests and not [r.url for r in requests if secret in r.url]
    data = [
        r
        for r in requests[typed:]
        if urlsplit(r.url).path.startswith(("/jobs", "/events", "/ui/history"))
    ]
    assert [r.url for r in data if r.headers.get("authorization") != f"Bearer {secret}"] == []
    keyed_paths = {urlsplit(r.url).path for r in data}
    assert keyed_paths >= {"/jobs", "/events", "/ui/history", f"/jobs/{later_id}"}


def test_history_endpoint_returns_samples_behind_the_key(keyed: tuple[Daemon, str]) -> None:
    """``GET /ui/history`` refuses as ``GET /jobs`` does without a key (401, 140) and
    with one gives the samples the API process took, with every state's count."""
    daemon, secret = keyed
    assert _keyed_get(daemon, "/ui/history", None)[0] == _keyed_get(daemon, "/jobs", None)[0]
    status, body = _keyed_get(daemon, "/ui/history", None)
    assert (status, body["code"]) == (401, 140)
    status, body = _keyed_get(daemon, "/ui/history", secret)
    assert status == 200
    assert body["intervalS"] == 10.0
    assert body["samples"], body
    assert set(body["samples"][0]) >= {"at", "queued", "running", "done", "failed", "cancelled"}


@pytest.fixture
def redis_api(start_daemon: Any, private_redis: RedisServer, tmp_path: Path) -> Iterator[Daemon]:
    """An API node on Redis, with one worker node that has announced itself."""
    api: Daemon = start_daemon("--queue", private_redis.url)
    node = Node(private_redis.url, ["--file-root", str(api.out_dir)], tmp_path / "node.log")
    try:
        _wait_nodes(api, 1)
        yield api
    finally:
        node.kill()


def test_in_redis_mode_the_page_shows_the_worker_nodes_and_their_jobs(
    redis_api: Daemon, page: Page, http_server: HTTPTestServer, screenshot: None
) -> None:
    """With an API node and a worker node on Redis, the node is listed with its
    workers, a job it runs turns done on the page, and the history is sampled."""
    api = redis_api
    _open(page, api)
    nodes = api.request("GET", "/health").body["nodes"]
    listed = page.locator(f'#nodes tr[data-node="{nodes[0]["name"]}"]')
    expect(listed).to_contain_text("1 of 1")
    expect(page.locator("#summary")).to_contain_text("1 of 1")

    source = serve(http_server, "ui/Redis.jpg", jpeg(320, 240))
    job_id = _accepted(post_jobs(api, _job(api, source, "redis")))
    row = page.locator(f'tr.job[data-job-id="{job_id}"]')
    expect(row).to_have_attribute("data-state", "done", timeout=DONE_MS)
    expect(row.locator('canvas[data-drawn="yes"]')).to_have_count(2)
    assert api.job(job_id)["node"] == nodes[0]["name"]
    expect(page.locator("#chartnote")).to_have_text(re.compile(r"^[1-9]\d* samples"))
    samples = api.request("GET", "/ui/history").body["samples"]
    assert len(samples) >= 1
    assert {"queued", "running", "done", "failed"} <= set(samples[0]), samples[0]


def test_with_the_queue_down_the_status_says_so_and_the_page_keeps_running(
    start_daemon: Any,
    private_redis: RedisServer,
    page: Page,
    tolerated: list[str],
    screenshot: None,
) -> None:
    """When Redis goes away, /health answers 503 with the 608 error body: the status
    shows the queue unavailable with the detail, and no script error follows."""
    api: Daemon = start_daemon("--queue", private_redis.url)
    _open(page, api)
    expect(page.locator("#status")).to_have_attribute("data-status", "ok")
    tolerated.append("status of 503")  # /health, /jobs and /events refused meanwhile
    private_redis.kill()
    down = api.request("GET", "/health")
    assert (down.status, down.body["code"]) == (503, 608), down.body
    status = page.locator("#status")
    expect(status).to_have_attribute("data-status", "down", timeout=15_000)
    expect(status).to_have_text(re.compile(r"^queue unavailable \(608\): .+"))
    expect(page.locator("#version")).not_to_contain_text("undefined")
    expect(page.locator("#uptime")).not_to_contain_text("NaN")
    # Two more polls (5 s apart) without a script error (the page fixture checks).
    page.wait_for_timeout(11_000)
    expect(status).to_have_attribute("data-status", "down")


def _pumping(page: Page, condition: Any, timeout_s: float, what: str) -> None:
    """Waits for condition while Playwright runs the page's callbacks (route handlers
    run only inside a Playwright call, not during a plain sleep)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        page.wait_for_timeout(50)


def test_the_event_stream_resumes_starts_afresh_after_a_400_and_honours_retry_after(
    daemon: Daemon, page: Page, tolerated: list[str], screenshot: None
) -> None:
    """A stream that ends is resumed with its Last-Event-ID; a 400 (703) makes the next
    request start afresh without one; a 503's Retry-After is waited out; the list
    is reloaded on every connect."""
    tolerated.extend(["status of 400", "status of 503"])
    sent: list[tuple[float, str | None]] = []
    list_reads: list[float] = []

    def events(route: Route) -> None:
        sent.append((time.monotonic(), route.request.headers.get("last-event-id")))
        if len(sent) == 1:  # a stream that carries one id, then ends
            route.fulfill(status=200, content_type="text/event-stream", body="id: 7\n: ping\n\n")
        elif len(sent) == 2:
            body = {"msg": "a job field has the wrong type", "code": 703, "detail": "Last-Event-ID"}
            route.fulfill(status=400, json=body)
        elif len(sent) == 3:
            body = {"msg": "job queue unavailable", "code": 608, "detail": "busy"}
            route.fulfill(status=503, json=body, headers={"Retry-After": "3"})
        else:
            route.continue_()

    page.route("**/events", events)
    page.on(
        "request",
        lambda r: list_reads.append(time.monotonic()) if urlsplit(r.url).path == "/jobs" else None,
    )
    page.goto(f"{daemon.url}/ui")  # live only briefly until the fourth connect
    _pumping(page, lambda: len(sent) >= 4, 30.0, "the fourth GET /events")
    expect(page.locator("#live")).to_have_attribute("data-live", "yes")
    assert [last_id for _, last_id in sent[:4]] == [None, "7", None, None]
    assert sent[3][0] - sent[2][0] >= 2.9  # Retry-After: 3
    # open() reads the list, then each of the two 200 connects does.
    _pumping(page, lambda: any(at > sent[3][0] for at in list_reads), 10.0, "a reload")
    assert len(list_reads) >= 3


XSS = "<img/src=x/onerror=window.__x=1>"
"""Markup that runs a script if a job field were put in the page as HTML."""


def test_job_fields_holding_markup_show_as_text_and_run_nothing(
    daemon: Daemon, page: Page, http_server: HTTPTestServer, screenshot: None
) -> None:
    """A failed job whose source URL and output names hold an <img onerror> shows them
    as text: no <img> in its row or its opened detail, and no script ran."""
    _open(page, daemon)
    whole = jpeg(400, 300)
    source = serve(http_server, f"ui/{XSS}.jpg", whole[: len(whole) // 2])  # fails at render
    job_id = _accepted(post_jobs(daemon, _job(daemon, source, XSS)))
    row = page.locator(f'tr.job[data-job-id="{job_id}"]')
    expect(row).to_have_attribute("data-state", "failed", timeout=DONE_MS)
    view = daemon.job(job_id)
    assert XSS in view["srcURL"] and XSS in view["outputs"][0]["url"], view
    row.click()
    detail = page.locator(f'tr.detail[data-job-id="{job_id}"]')
    expect(detail).to_contain_text(view["srcURL"])
    expect(detail).to_contain_text(view["outputs"][0]["url"])
    expect(row.locator("img")).to_have_count(0)
    expect(detail.locator("img")).to_have_count(0)
    assert page.evaluate("typeof window.__x") == "undefined"


def test_a_late_reply_of_an_older_list_read_does_not_overwrite_a_newer_one(
    daemon: Daemon, page: Page, screenshot: None
) -> None:
    """A busy spell's list read answered after the next connect's read (which came
    back first) is dropped: the table shows the newer reply, never the late one."""
    changes = "".join(f'data: {{"jobId": "busy-{i}", "state": "queued"}}\n\n' for i in range(11))
    streams: list[Route] = []
    reads: list[Route] = []
    held: list[Route] = []

    def events(route: Route) -> None:
        streams.append(route)
        if len(streams) == 1:  # eleven changes (a busy spell), then the stream ends
            route.fulfill(status=200, content_type="text/event-stream", body=changes)
        else:
            route.continue_()

    def job_list(route: Route) -> None:
        reads.append(route)
        if len(reads) == 3:  # open, the first connect, then the busy spell's: held
            held.append(route)
        else:
            route.continue_()

    page.route("**/events", events)
    page.route(lambda url: urlsplit(url).path == "/jobs", job_list)
    page.goto(f"{daemon.url}/ui")
    _pumping(page, lambda: len(reads) >= 4 and len(streams) >= 2, 30.0, "the reconnect's read")
    expect(page.locator("#live")).to_have_attribute("data-live", "yes")
    late = {"jobs": [{"jobId": "late-reply", "state": "queued", "createdAt": 0, "outputs": []}]}
    with page.expect_request_finished(lambda r: r is held[0].request):
        held[0].fulfill(status=200, json=late)
    page.evaluate("() => new Promise((done) => setTimeout(done, 50))")  # its reply handled
    expect(page.locator('tr.job[data-job-id="late-reply"]')).to_have_count(0)


def test_the_chart_leaves_a_gap_where_samples_are_missing(
    daemon: Daemon, page: Page, screenshot: None
) -> None:
    """Samples more than 1.5 intervals apart get a null point between them (a gap, not
    a line across the time the queue gave no counts), and the note says so."""
    now = time.time()
    ats = [now - 300, now - 290, now - 280, now - 200, now - 190]  # 80 s missing
    zero = {"queued": 0, "running": 0, "done": 0, "failed": 0, "cancelled": 0}
    samples = [{"at": at, **zero, "doneSince": 0, "failedSince": 0} for at in ats]
    page.route(
        "**/ui/history",
        lambda route: route.fulfill(json={"intervalS": 10.0, "samples": samples}),
    )
    _open(page, daemon)
    expect(page.locator("#chartnote")).to_have_text(
        re.compile(r"^5 samples, one every 10 s, .* 1 gap where the queue could not be read\.$")
    )
    expect(page.locator("#chart canvas")).to_have_count(1)

"""imgserve.client without a daemon: error replies to exceptions, Retry-After, the
retry decision, request building, models, webhook verification, and that importing
it loads none of the daemon's modules."""

from __future__ import annotations

import base64
import datetime as dt
import json
import subprocess
import sys
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement
from standardwebhooks.webhooks import Webhook

from imgserve import errors as server_errors
from imgserve.client import (
    APIError,
    AuthError,
    ChangeEvent,
    DestinationError,
    InvalidWebhook,
    Job,
    JobNotFound,
    JobState,
    LimitError,
    PolicyError,
    RequestError,
    Retries,
    ServiceError,
    SourceError,
    Upload,
    ValidationError,
    verify_event,
)
from imgserve.client import _protocol as p
from imgserve.client.errors import error_class, from_reply

SECRET = "whsec_" + base64.b64encode(b"a client test webhook secret key").decode()


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (106, RequestError),
        (130, RequestError),
        (141, AuthError),
        (144, AuthError),
        (201, SourceError),
        (303, LimitError),
        (401, PolicyError),
        (502, DestinationError),
        (602, ServiceError),
        (605, JobNotFound),
        (613, ServiceError),
        (703, ValidationError),
        (999, APIError),
    ],
)
def test_each_code_raises_its_family(code: int, cls: type[APIError]) -> None:
    """A code's exception class is its range's family (and 605 its own)."""
    assert error_class(code) is cls


def test_every_server_code_has_a_family() -> None:
    """Every code the daemon defines (imgserve.errors) maps to a family, not the
    catch-all: a new range would need a class here."""
    for cls in server_errors.all_errors():
        assert error_class(cls.code) is not APIError, cls.__name__


def test_error_reply_carries_code_detail_and_retry_after() -> None:
    """``{"msg", "code", "detail"}`` becomes the family's exception with each field."""
    body = json.dumps({"msg": "request invalid", "code": 703, "detail": "outputs[0].width: x"})
    exc = from_reply(400, body.encode(), retry_after_s=None)
    assert isinstance(exc, ValidationError)
    assert (exc.status, exc.code, exc.message) == (400, 703, "request invalid")
    assert exc.detail == "outputs[0].width: x"
    busy = from_reply(503, b'{"msg": "queue full, retry later", "code": 602}', 2.0)
    assert (busy.code, busy.retry_after_s, busy.detail) == (602, 2.0, "queue full, retry later")


def test_parse_error_and_foreign_bodies() -> None:
    """0.2's ``{"msg": "request parse error"}`` is code 100; a proxy's HTML page is an
    APIError with code 0 and the start of the page."""
    assert from_reply(400, b'{"msg": "request parse error"}').code == 100
    foreign = from_reply(502, b"<html>Bad Gateway</html>")
    assert type(foreign) is APIError
    assert (foreign.code, foreign.detail) == (0, "<html>Bad Gateway</html>")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("2", 2.0),
        (" 30 ", 30.0),
        ("Tue, 01 Dec 2026 12:00:10 GMT", 10.0),
        ("Tue, 01 Dec 2026 11:00:00 GMT", 0.0),
        ("soon", None),
        ("-3", None),
    ],
)
def test_retry_after(header: str | None, expected: float | None) -> None:
    """Retry-After as delta-seconds or an HTTP date (a past date waits 0)."""
    now = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
    assert p.retry_after_s(header, now) == expected


def test_which_failures_are_retried() -> None:
    """503, 429 and 409/614 are retried after Retry-After, no answer is retried with
    backoff, any other error reply is not."""
    retries = Retries(wait_max_s=10.0)
    hook = retries.backoff_hook
    assert hook(from_reply(503, b'{"msg": "x", "code": 611}', 2.0)) == 2.0
    assert hook(from_reply(409, b'{"msg": "x", "code": 614}', 2.0)) == 2.0
    assert hook(from_reply(503, b'{"msg": "x", "code": 602}')) is True
    assert hook(httpx.ConnectError("refused")) is True
    assert hook(from_reply(409, b'{"msg": "x", "code": 613}')) is False
    assert hook(from_reply(422, b'{"msg": "x", "code": 201}')) is False
    assert hook(ValueError("a bug")) is False
    with pytest.raises(ValueError, match="attempts"):
        Retries(attempts=0)


@pytest.mark.parametrize(
    ("retry_after_s", "elapsed_s", "expected"),
    [(120.0, 0.0, 120.0), (120.0, 170.0, 120.0), (120.0, 190.0, False), (600.0, 0.0, False),
     (None, 0.0, True)],
)  # fmt: skip
def test_retry_after_is_waited_in_full_or_not_at_all(
    retry_after_s: float | None, elapsed_s: float, expected: float | bool
) -> None:
    """A Retry-After longer than ``wait_max_s`` (30 s) is waited in full when the
    retry still fits in ``timeout_s`` (300 s) after it, else raised at once: cut to
    30 s, the retry would only be refused again."""
    busy = from_reply(429, b'{"msg": "x", "code": 144}', retry_after_s)
    assert Retries().decide(busy, elapsed_s=elapsed_s) == expected


def test_url_source_is_json_with_a_fresh_key() -> None:
    """A str source is a JSON job naming it; each request gets its own UUID key
    unless one is given; a str that is no URL (a path) is refused."""
    job = p.job_body([{"url": "file:///o/{$basename}.webp", "width": 8}], priority="batch")
    first = p.submit_request("https://e.example/a.jpg", job, None)
    second = p.submit_request("https://e.example/a.jpg", job, None)
    assert json.loads(first.content or b"") == {
        "source": "https://e.example/a.jpg",
        "outputs": [{"url": "file:///o/{$basename}.webp", "width": 8}],
        "priority": "batch",
    }
    assert first.headers["Content-Type"] == "application/json"
    assert first.headers["Idempotency-Key"] != second.headers["Idempotency-Key"]
    assert p.submit_request("x://y", job, "mine").headers["Idempotency-Key"] == "mine"
    with pytest.raises(ValueError, match=r"pathlib\.Path"):
        p.submit_request("photos/a.jpg", job, None)  # a path given as a str


def test_file_source_is_multipart(tmp_path: pytest.TempPathFactory) -> None:
    """A path is read and sent as the source part with its file name; an Upload
    needs a file name."""
    path = tmp_path / "Beach.jpg"  # type: ignore[operator]
    path.write_bytes(b"JPEG")
    request = p.submit_request(path, p.job_body([{"url": "u", "width": 1}]), "k")
    assert request.files == {"source": ("Beach.jpg", b"JPEG", "application/octet-stream")}
    assert json.loads((request.data or {})["job"]) == {"outputs": [{"url": "u", "width": 1}]}
    with pytest.raises(ValueError, match="file name"):
        p.submit_request(Upload(b"x", ""), {}, None)


def test_job_view_is_typed() -> None:
    """docs/api.md's job view reads into Job, outputs and error with snake_case names,
    the JSON kept in ``raw``; a failed job raises its error's family."""
    view = {
        "jobId": "3f0c" * 8,
        "state": "failed",
        "operationType": "resize",
        "srcURL": "https://e.example/a.jpg",
        "dstURL": "file:///o/a.webp",
        "width": 64,
        "height": 48,
        "attempts": 1,
        "createdAt": 1764590000.1,
        "outputs": [
            {"url": "file:///o/a.webp", "width": 64, "height": 48, "format": "webp",
             "bytes": 120, "dominantColor": "#c8a078", "averageColor": "#b49a80"}
        ],
        "sourceInfo": {"width": 640, "height": 480, "format": "jpeg", "orientation": 1,
                       "hasAlpha": False, "animated": False, "pages": 1},
        "metadata": {"uploadId": "42"},
        "priority": "interactive",
        "key": None,
        "error": {"code": 201, "message": "source unreachable", "detail": "HTTP 404"},
        "somethingNew": 1,
    }  # fmt: skip
    job = Job.from_dict(view)
    assert (job.state, job.ended, job.width, job.attempts) == (JobState.FAILED, True, 64, 1)
    (output,) = job.outputs
    assert (output.format, output.bytes, output.dominant_color) == ("webp", 120, "#c8a078")
    assert job.source_info is not None and job.source_info.has_alpha is False
    assert job.metadata == {"uploadId": "42"}
    assert job.raw["somethingNew"] == 1
    with pytest.raises(SourceError) as caught:
        job.raise_for_state()
    assert (caught.value.code, caught.value.detail) == (201, "HTTP 404")


def _signed(body: str, secret: str = SECRET, at: datetime | None = None) -> dict[str, str]:
    msg_id = "msg_" + "ab" * 16
    when = at or datetime.now(UTC)
    signature = Webhook(secret).sign(msg_id, when, body)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
    }


EVENT = json.dumps(
    {
        "type": "job.completed",
        "timestamp": "2026-12-01T12:00:00.123Z",
        "data": {
            "jobId": "4f1c" * 8,
            "state": "done",
            "outputs": [{"url": "file:///o/a.webp", "width": 32, "height": 24,
                         "format": "webp", "bytes": 99}],
            "metadata": {"post": 42},
        },
    }
)  # fmt: skip


def test_verify_event_accepts_a_signed_event() -> None:
    """An event signed by the standardwebhooks library verifies (with the secret
    alone, or among several during a rotation) and reads typed."""
    headers = {k.title(): v for k, v in _signed(EVENT).items()}  # header case is free
    event = verify_event(headers, EVENT.encode(), SECRET)
    assert (event.id, event.type, event.state) == ("msg_" + "ab" * 16, "job.completed", "done")
    assert event.outputs[0].bytes == 99 and event.metadata == {"post": 42}
    other = "whsec_" + base64.b64encode(b"another secret, about to go away").decode()
    assert verify_event(headers, EVENT, [other, SECRET]).job_id == "4f1c" * 8


@pytest.mark.parametrize(
    "tamper",
    ["body", "signature", "secret", "old", "no-header", "garbage-signature", "not-an-event"],
)
def test_verify_event_refuses_what_is_not_signed(tamper: str) -> None:
    """A changed body, a foreign signature or secret, a stale timestamp, a missing or
    malformed header, or a signed payload that is no imgserve event: InvalidWebhook."""
    body, secret = EVENT, SECRET
    headers = _signed(body)
    if tamper == "body":
        body = body.replace('"bytes": 99', '"bytes": 98')
    elif tamper == "signature":
        headers["webhook-signature"] = _signed(body, "whsec_" + "QUJD" * 8)["webhook-signature"]
    elif tamper == "secret":
        secret = "whsec_" + base64.b64encode(b"not the secret the event was signed").decode()
    elif tamper == "old":
        headers = _signed(body, at=datetime.now(UTC) - dt.timedelta(minutes=10))
    elif tamper == "no-header":
        del headers["webhook-signature"]
    elif tamper == "garbage-signature":
        headers["webhook-signature"] = "v1"
    elif tamper == "not-an-event":
        body = json.dumps({"hello": "world"})
        headers = _signed(body)
    with pytest.raises(InvalidWebhook):
        verify_event(headers, body.encode(), secret)


SERVER_SIDE = {"pyvips", "aiohttp", "aiohttp_sse", "pebble", "boto3", "botocore", "numpy",
               "arq", "redis", "prometheus_client", "thash", "fast_blurhash"}  # fmt: skip


def _loaded_by(statement: str) -> set[str]:
    """The modules a fresh interpreter has loaded after ``statement``."""
    probe = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    return set(json.loads(out.stdout))


def test_importing_the_client_loads_nothing_of_the_daemon() -> None:
    """``import imgserve.client`` (and the submit command's modules) in a fresh
    interpreter loads none of the daemon's libraries (pyvips, aiohttp, pebble, boto3,
    numpy...) and no imgserve module but the client's and the command's own."""
    loaded = _loaded_by("import imgserve.client")
    assert not loaded & SERVER_SIDE
    ours = {m for m in loaded if m.startswith("imgserve.")}
    assert ours and all(m.startswith("imgserve.client") for m in ours), ours
    loaded = _loaded_by("import imgserve.submit.cli, imgserve.submit.run")
    assert not loaded & SERVER_SIDE
    ours = {m for m in loaded if m.startswith("imgserve.")}
    assert all(m.startswith(("imgserve.client", "imgserve.submit")) for m in ours), ours
    assert "httpx" in loaded


def test_the_command_line_loads_no_daemon_library() -> None:
    """``imgserve.cli`` (what the ``imgserve`` command imports before it parses
    anything) loads none of the daemon's libraries either: they are imported by the
    commands that run the daemon."""
    assert not _loaded_by("import imgserve.cli") & SERVER_SIDE


def test_the_client_extra_needs_a_stamina_that_honours_retry_after() -> None:
    """A float from the backoff hook (Retry-After) is a wait only from stamina 25.2:
    the ``client`` extra must not allow an older one."""
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    (stamina,) = (
        Requirement(r)
        for r in pyproject["project"]["optional-dependencies"]["client"]
        if Requirement(r).name == "stamina"
    )
    assert not stamina.specifier.contains("25.1.0")
    assert stamina.specifier.contains("25.2.0")


def test_a_state_of_a_newer_daemon_is_kept_as_its_string() -> None:
    """A job or a change in a state this client does not know (a newer daemon's) is
    read, its state kept as the string and not ended, instead of a ValueError (which
    stopped the shared event stream's follower)."""
    job = Job.from_dict({"jobId": "j1", "state": "paused"})
    assert (job.state, job.ended) == ("paused", False)
    change = ChangeEvent.from_sse("7", {"jobId": "j1", "state": "paused"})
    assert (change.state, change.ended) == ("paused", False)
    assert ChangeEvent.from_sse("8", {"jobId": "j1", "state": "done"}).ended
    assert Job.from_dict({"jobId": "j1", "state": "done"}).state is JobState.DONE

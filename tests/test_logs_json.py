"""``--log-format json``: the message parser's table, the formatter, the setting."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imgserve import cli, config, logs

JOB = "0123456789abcdef0123456789abcdef"

# (case id, message, job id, event, fields)
MESSAGES: list[tuple[str, str, str | None, str | None, dict[str, Any]]] = [
    (
        "accepted, keyed",
        f"job {JOB} accepted key=ci resize http://h/a.jpg -> file:///o/a.jpg 10x10",
        JOB,
        "accepted",
        {"key": "ci"},
    ),
    ("done", f"job {JOB} done attempt=1 outputs=2", JOB, "done", {"attempt": 1, "outputs": 2}),
    (
        "failed, the detail after a colon",
        f"job {JOB} failed code=302 attempts=3 key=ci: too big",
        JOB,
        "failed",
        {"code": 302, "attempts": 3, "key": "ci"},
    ),
    (
        "retry",
        f"job {JOB} retry in 1.5s code=201 attempt=1: refused",
        JOB,
        "retry",
        {"code": 201, "attempt": 1},
    ),
    ("cancelled by a key", f"job {JOB} cancelled by key=ops", JOB, "cancelled", {"key": "ops"}),
    ("a remark about a job: no event", f"job {JOB}: failure image not uploaded", JOB, None, {}),
    (
        "webhook line: job id from 'for job'",
        f"webhook msg_1 job.completed for job {JOB} delivered to http://h/hook",
        JOB,
        None,
        {},
    ),
    ("no job at all", "imgserve listening on 127.0.0.1:8602", None, None, {}),
    ("a query string is not a field", "fetching http://h/a?size=1 now", None, None, {}),
    (
        "a URL value stays whole",
        f"job {JOB} running dst=file:///o/a.jpg",
        JOB,
        "running",
        {"dst": "file:///o/a.jpg"},
    ),
]


@pytest.mark.parametrize(
    ("message", "job_id", "event", "fields"),
    [case[1:] for case in MESSAGES],
    ids=[case[0] for case in MESSAGES],
)
def test_parse_message(
    message: str, job_id: str | None, event: str | None, fields: dict[str, Any]
) -> None:
    """The job id, event and name=value fields are read from the message's shape."""
    assert logs.parse_message(message) == (job_id, event, fields)


def _record(msg: str, *args: Any, **kwargs: Any) -> logging.LogRecord:
    logger = logging.getLogger("imgserve.test")
    return logger.makeRecord(
        logger.name, logging.INFO, "f.py", 1, msg, args, kwargs.pop("exc_info", None), **kwargs
    )


def _format(record: logging.LogRecord) -> dict[str, Any]:
    line = logs.JsonFormatter().format(record)
    assert "\n" not in line
    parsed: dict[str, Any] = json.loads(line)
    return parsed


def test_record_becomes_one_json_object() -> None:
    """A record is an object with time, level, logger, pid, job id, event, fields, message."""
    entry = _format(_record("job %s done attempt=%d outputs=%d", JOB, 2, 1))
    assert entry["level"] == "INFO"
    assert entry["logger"] == "imgserve.test"
    assert isinstance(entry["pid"], int)
    assert entry["time"].endswith("Z") and entry["time"][10] == "T"
    assert entry["job_id"] == JOB
    assert entry["event"] == "done"
    assert entry["fields"] == {"attempt": 2, "outputs": 1}
    assert entry["message"] == f"job {JOB} done attempt=2 outputs=1"


def test_credentials_are_redacted_everywhere() -> None:
    """A password or a secret query parameter is hidden in the message, fields and extras."""
    record = _record(
        "job %s accepted src=%s",
        JOB,
        "ftp://user:hunter2@h/a.jpg?token=t0k",
        extra={"dst": "s3://AKIA:s3cret@b/k"},
    )
    line = logs.JsonFormatter().format(record)
    for secret in ("hunter2", "t0k", "s3cret"):
        assert secret not in line
    entry = json.loads(line)
    assert entry["fields"]["src"] == "ftp://user:***@h/a.jpg?token=***"
    assert entry["fields"]["dst"] == "s3://AKIA:***@b/k"


def test_traceback_is_redacted_and_kept_on_one_line() -> None:
    """An exception's traceback is one escaped string, its credentials hidden."""
    try:
        raise RuntimeError("cannot reach ftp://u:pa55@h/x")
    except RuntimeError:
        record = _record("job %s: unexpected error", JOB, exc_info=sys.exc_info())
    line = logs.JsonFormatter().format(record)
    assert "pa55" not in line and "\n" not in line
    entry = json.loads(line)
    assert "RuntimeError: cannot reach ftp://u:***@h/x" in entry["exc_info"]
    assert entry["event"] is None and entry["job_id"] == JOB


def test_line_breaks_cannot_forge_a_line() -> None:
    """Line breaks, NUL and U+2028 in a message are escaped inside the JSON string."""
    line = logs.JsonFormatter().format(_record("a %s b", 'x\n{"level": "ERROR"}\u2028\x00'))
    assert len(line.splitlines()) == 1
    assert json.loads(line)["message"] == 'a x\n{"level": "ERROR"}\u2028\x00 b'


def test_extra_wins_over_the_message() -> None:
    """``extra=`` job_id, event and fields override what the message text says."""
    record = _record(
        "job %s done attempt=1",
        JOB,
        extra={"job_id": "other", "event": "rendered", "fields": {"attempt": 9}, "ms": 12},
    )
    entry = _format(record)
    assert (entry["job_id"], entry["event"]) == ("other", "rendered")
    assert entry["fields"] == {"attempt": 9, "ms": 12}


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


@pytest.mark.usefixtures("restore_root")
def test_configure_json_writes_json_lines(tmp_path: Path) -> None:
    """configure(log_format="json") writes every record to the file as a JSON line."""
    path = tmp_path / "imgserve.log"
    logs.configure(path, max_bytes=1 << 20, backups=1, log_format="json")
    logging.getLogger("imgserve.worker").info("job %s done attempt=%d", JOB, 1)
    logging.getLogger("imgserve.daemon").warning("plain line")
    for handler in logging.getLogger().handlers:
        handler.flush()
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["message"] for e in entries] == [f"job {JOB} done attempt=1", "plain line"]
    assert entries[0]["event"] == "done"


@pytest.mark.usefixtures("restore_root")
def test_configure_text_is_the_default(tmp_path: Path) -> None:
    """Without log_format the file holds the text lines, as before."""
    path = tmp_path / "imgserve.log"
    logs.configure(path, max_bytes=1 << 20, backups=1)
    logging.getLogger("imgserve.worker").info("job %s done", JOB)
    for handler in logging.getLogger().handlers:
        handler.flush()
    line = path.read_text().strip()
    assert " INFO imgserve.worker[" in line and line.endswith(f"]: job {JOB} done")
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_unknown_formatter_is_refused() -> None:
    """logs.formatter names the choices for a format it does not know."""
    with pytest.raises(ValueError, match="text, json"):
        logs.formatter("xml")


def test_setting_defaults_to_text_and_takes_json() -> None:
    """log_format is text by default; --log-format json and IMGSERVE_LOG_FORMAT set it."""
    assert config.load({}, environ={}).server.log_format == "text"
    assert config.load({"log_format": "json"}, environ={}).server.log_format == "json"
    assert config.load({}, environ={"IMGSERVE_LOG_FORMAT": "json"}).server.log_format == "json"
    args = cli.build_parser().parse_args(["serve", "--log-format", "json"])
    assert args.log_format == "json"


def test_setting_refuses_an_unknown_format() -> None:
    """An unknown log_format is a SettingsError naming the choices."""
    with pytest.raises(config.SettingsError, match="log_format: expected one of text, json"):
        config.load({}, environ={"IMGSERVE_LOG_FORMAT": "xml"})

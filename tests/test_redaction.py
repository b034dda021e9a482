"""Credentials never reach a reply or a log: redact_url's table, and the log formatter."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgserve import logs, urls
from imgserve.urls import configure_redaction, redact_url

# (case id, text, redacted)
USERINFO: list[tuple[str, str, str]] = [
    ("plain password", "ftp://user:pw@example.com/x", "ftp://user:***@example.com/x"),
    ("password with a space", "ftp://user:my pass@h/x", "ftp://user:***@h/x"),
    ("password with @", "https://user:p@ss@h/x.png", "https://user:***@h/x.png"),
    ("password with two @", "https://u:a@b@c@h/x", "https://u:***@h/x"),
    ("password with %", "ftp://user:100%sure@h/x", "ftp://user:***@h/x"),
    ("password percent-encoded", "ftp://user:p%40ss@h/x", "ftp://user:***@h/x"),
    ("password with :", "ftp://user:a:b:c@h/x", "ftp://user:***@h/x"),
    ("password with # and ?", "https://u:a#b?c@h/x", "https://u:***@h/x"),
    ("user-only token", "https://TOKEN@host/", "https://***@host/"),
    ("user-only token, no path", "https://ghp_abc123@host", "https://***@host"),
    ("empty user, password", "https://:secret@host/", "https://***@host/"),
    ("ftp keeps the user", "ftp://alice:pw@h/", "ftp://alice:***@h/"),
    ("s3 keys, / encoded", "s3://AKIA:se%2Fcret@bucket/k", "s3://AKIA:***@bucket/k"),
    ("@ in the path stays", "http://example.com/a:b@c", "http://example.com/a:b@c"),
    ("@2x file name stays", "http://h/img@2x.png", "http://h/img@2x.png"),
    ("no credentials", "http://example.com:8080/a.png", "http://example.com:8080/a.png"),
    ("form destination", "http://u:pw@h/up.php:a.png", "http://u:***@h/up.php:a.png"),
    (
        "several URLs in a log line",
        "job x ftp://u:p@h/1 -> https://a:b c@h/2 and http://t@h",
        "job x ftp://u:***@h/1 -> https://a:***@h/2 and http://***@h",
    ),
    (
        "URLs without paths in one line",
        "src http://u:p@a dst ftp://v:q@b",
        "src http://u:***@a dst ftp://v:***@b",
    ),
    ("not a URL at all", "mail admin@example.com", "mail admin@example.com"),
    ("upper-case scheme", "FTP://U:P@H/x", "FTP://U:***@H/x"),
]

# (case id, text, redacted)
QUERY: list[tuple[str, str, str]] = [
    (
        "S3 presigned URL",
        "https://b.s3.amazonaws.com/k.png?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIA%2F20260101%2Fus-east-1&X-Amz-Date=20260101T000000Z"
        "&X-Amz-Security-Token=FwoGZX&X-Amz-Signature=abcdef0123",
        "https://b.s3.amazonaws.com/k.png?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=***&X-Amz-Date=20260101T000000Z"
        "&X-Amz-Security-Token=***&X-Amz-Signature=***",
    ),
    ("lower-case amz names", "http://h/a?x-amz-signature=s", "http://h/a?x-amz-signature=***"),
    ("token", "http://h/a.png?token=t0k", "http://h/a.png?token=***"),
    ("TOKEN upper case", "http://h/a.png?TOKEN=t0k", "http://h/a.png?TOKEN=***"),
    ("sig", "http://h/a.png?w=1&sig=abc", "http://h/a.png?w=1&sig=***"),
    ("signature", "http://h/a.png?Signature=abc&w=1", "http://h/a.png?Signature=***&w=1"),
    ("key", "http://h/a.png?key=abc#frag", "http://h/a.png?key=***#frag"),
    ("access_token", "http://h/a?access_token=abc", "http://h/a?access_token=***"),
    ("password", "http://h/a?password=hunter2", "http://h/a?password=***"),
    ("empty value", "http://h/a?token=&w=1", "http://h/a?token=***&w=1"),
    (
        "names that only end like one",
        "http://h/a?monkey=1&mytoken=2",
        "http://h/a?monkey=1&mytoken=2",
    ),
    ("value ends at a space", "fetch http://h/a?sig=abc failed", "fetch http://h/a?sig=*** failed"),
    (
        "form destination with a token",
        "http://h/up.php?token=abc:name.png",
        "http://h/up.php?token=***",
    ),
    (
        "userinfo and query together",
        "https://u:pw@h/a?sig=1&b=2",
        "https://u:***@h/a?sig=***&b=2",
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [pytest.param(text, expected, id=name) for name, text, expected in USERINFO + QUERY],
)
def test_redact_url(text: str, expected: str) -> None:
    """Every credential in a URL or a line of text becomes ***; everything else stays."""
    assert redact_url(text) == expected


@pytest.fixture
def extra_params() -> Iterator[None]:
    yield
    configure_redaction([])


def test_configured_params_are_redacted(extra_params: None) -> None:
    """configure_redaction adds parameter names (any case); a later call replaces them."""
    configure_redaction(["api_key", " Auth "])
    assert (
        redact_url("http://h/a?API_KEY=1&auth=2&token=3")
        == "http://h/a?API_KEY=***&auth=***&token=***"
    )
    configure_redaction(["other"])
    assert redact_url("http://h/a?api_key=1&other=2") == "http://h/a?api_key=1&other=***"


def test_built_in_params_cannot_be_configured_away(extra_params: None) -> None:
    """An empty or blank extra list still redacts the built-in secret names."""
    configure_redaction(["", "  "])
    assert redact_url("http://h/a?X-Amz-Signature=s") == "http://h/a?X-Amz-Signature=***"
    assert "token" in urls.SECRET_PARAMS


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[Path]:
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    path = tmp_path / "imgserve.log"
    logs.configure(path, max_bytes=1 << 20, backups=1)
    yield path
    for handler in list(root.handlers):
        handler.close()
        root.removeHandler(handler)
    for handler in saved:
        root.addHandler(handler)
    root.setLevel(level)


def _written(path: Path) -> str:
    for handler in logging.getLogger().handlers:
        handler.flush()
    return path.read_text(encoding="utf-8")


def test_a_newline_cannot_forge_a_log_line(log_file: Path) -> None:
    """A URL with a line break is logged on one line, its control characters escaped."""
    url = (
        "http://h/a.png\n2026-01-01 00:00:00,000 INFO imgserve.jobs[1]: forged\r\x00\x1b[31m\u2028"
    )
    logging.getLogger("imgserve.test").warning("fetch %s failed", url)
    text = _written(log_file)
    assert text.count("\n") == 1 and text.endswith("\n")
    assert (
        "\\n2026-01-01 00:00:00,000 INFO imgserve.jobs[1]: forged\\r\\x00\\x1b[31m\\u2028" in text
    )


def test_a_traceback_is_one_redacted_line(log_file: Path) -> None:
    """An exception's traceback is written on the record's line, credentials redacted."""
    try:
        raise ValueError("bad ftp://bob:hunter2@h/x\n2026-01-01 INFO forged")
    except ValueError:
        logging.getLogger("imgserve.test").exception("job failed")
    text = _written(log_file)
    assert text.count("\n") == 1
    assert (
        "Traceback" in text and "ValueError: bad ftp://bob:***@h/x\\n2026-01-01 INFO forged" in text
    )
    assert "hunter2" not in text


def test_log_records_redact_query_secrets(log_file: Path) -> None:
    """A presigned URL's signature never reaches the log file."""
    logging.getLogger("imgserve.test").info("fetch %s", "https://b/k?X-Amz-Signature=deadbeef&a=1")
    text = _written(log_file)
    assert "deadbeef" not in text and "X-Amz-Signature=***&a=1" in text


def test_lone_surrogates_are_logged(log_file: Path) -> None:
    """A string that cannot be encoded is escaped, so the record is written, not lost."""
    logging.getLogger("imgserve.test").info("gravity %r", "\ud800")
    assert "gravity '\\ud800'" in _written(log_file)


@pytest.mark.parametrize(
    ("text", "escaped"),
    [
        ("plain é ✓", "plain é ✓"),
        ("a\tb", "a\\tb"),
        ("\x7f\x85\x9f", "\\x7f\\x85\\x9f"),
        ("\u2029", "\\u2029"),
        ("back\\slash", "back\\slash"),
    ],
)
def test_escape_control(text: str, escaped: str) -> None:
    """Control characters become escapes; printable text (any script) is unchanged."""
    assert logs.escape_control(text) == escaped

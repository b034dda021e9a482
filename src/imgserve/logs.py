"""Logging set-up: one line per record, credentials never shown.

Every record is written by :class:`SafeFormatter`, which works on the whole
formatted text (message, traceback, stack) so no call site can get around it:

- credentials are replaced by ``***`` (:func:`imgserve.urls.redact_url`);
- control characters are escaped (``\\n``, ``\\x00``, ``\\u2028``, ...), so
  a URL or an error detail with a line break cannot forge a log line, and a
  traceback is written as one line with its line breaks as ``\\n``.

``--log-format json`` writes one JSON object per line instead
(:class:`JsonFormatter`): time, level, logger, pid, job id, event, fields and
the message, redacted alike. The call sites stay plain ``%``-style messages;
the formatter reads their shape (:func:`parse_message`):

- ``job <id> <event> ...`` at the start (``job 3f.. done attempt=1 ...``), or
  ``for job <id>`` anywhere (the webhook lines), gives ``job_id``; the word
  right after a leading job id is the ``event`` (``accepted``, ``done``,
  ``failed``, ``retry``, ``cancelled``, ``running``);
- every ``name=value`` word is a field (``attempt=1`` -> ``{"attempt": 1}``);
- ``extra={"job_id": ..., "event": ..., "fields": {...}}`` or any other
  ``extra=`` name on a call wins over what the text says, for call sites that
  want structure without a message convention.

Reading the message rather than rewriting every call keeps the text log as it
was and one convention for both; the message is always there in full, so a
line the parser misreads loses nothing.

The log file rotates by size and is created with mode 0640.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from imgserve.urls import redact_url

LOG_FORMATS = ("text", "json")
"""``--log-format`` choices; text is the default."""

FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_table() -> dict[int, str]:
    # C0, DEL and C1, the Unicode line and paragraph separators (which
    # str.splitlines and some viewers treat as line breaks), and lone
    # surrogates (which cannot be encoded, so the record would be lost).
    codes = [*range(0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029, *range(0xD800, 0xE000)]
    table: dict[int, str] = {}
    for code in codes:
        char = chr(code)
        table[code] = _NAMED.get(char) or (f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}")
    return table


_ESCAPES = _escape_table()


def escape_control(text: str) -> str:
    """``text`` on one line: every control character written as an escape."""
    return text.translate(_ESCAPES)


class SafeFormatter(logging.Formatter):
    """Formats a record as one line with its credentials redacted."""

    def format(self, record: logging.LogRecord) -> str:
        return escape_control(redact_url(super().format(record)))


_LEADING_JOB = re.compile(r"job (?P<id>[^\s:]+)(?P<colon>:?)(?: (?P<event>[a-z][a-z_]*)\b)?")
_FOR_JOB = re.compile(r"\bfor job (?P<id>[^\s:]+)")
# A field is a whole word name=value; "?a=b" inside a URL is not one.
_FIELD = re.compile(r"(?<!\S)(?P<name>[a-z][a-z0-9_]*)=(?P<value>\S+)")
_INT = re.compile(r"-?\d+")


def _value(text: str) -> str | int:
    text = text.rstrip(":,;")
    return int(text) if _INT.fullmatch(text) else text


def parse_message(message: str) -> tuple[str | None, str | None, dict[str, Any]]:
    """(job id, event, fields) read from a log message's conventional shape."""
    job_id: str | None = None
    event: str | None = None
    leading = _LEADING_JOB.match(message)
    if leading is not None:
        job_id = leading["id"]
        # "job X: text" is about the job, not a state change: no event.
        event = None if leading["colon"] else leading["event"]
    else:
        found = _FOR_JOB.search(message)
        job_id = found["id"] if found is not None else None
    fields = {m["name"]: _value(m["value"]) for m in _FIELD.finditer(message)}
    return job_id, event, fields


# What every LogRecord has; the rest came in through extra=.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, dict):
        return {str(k): _redacted(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact_url(str(value))


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object on one line, its credentials redacted.

    ``ensure_ascii`` escapes every control and non-ASCII character (U+2028
    included), so no value can break the line."""

    def format(self, record: logging.LogRecord) -> str:
        message = redact_url(record.getMessage())
        job_id, event, fields = parse_message(message)
        extra = {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS}
        job_id = extra.pop("job_id", job_id)
        event = extra.pop("event", event)
        fields.update(extra.pop("fields", None) or {})
        fields.update(extra)
        entry: dict[str, Any] = {
            "time": _iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "job_id": job_id,
            "event": event,
            "fields": fields,
            "message": message,
        }
        if record.exc_info:
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(_redacted(entry), ensure_ascii=True, default=str)


def _iso_time(created: float) -> str:
    """RFC 3339 in UTC with milliseconds: ``2026-12-01T15:54:12.123Z``."""
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created * 1000) % 1000:03d}Z"


def formatter(log_format: str) -> logging.Formatter:
    """The formatter for a ``--log-format`` choice."""
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return SafeFormatter(FORMAT)
    raise ValueError(f"log format {log_format!r} is not one of {', '.join(LOG_FORMATS)}")


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A size-rotated log file created 0640, readable by the admin group only."""

    def _open(self):  # type: ignore[no-untyped-def]
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        os.fchmod(fd, 0o640)
        return os.fdopen(fd, self.mode.replace("w", "a"), encoding=self.encoding)


def configure(
    log_file: Path | None,
    *,
    max_bytes: int,
    backups: int,
    level: int = logging.INFO,
    log_format: str = "text",
) -> None:
    """Log to ``log_file`` (rotated) or, when None, to stderr, as ``log_format``
    (text or json) lines."""
    handler: logging.Handler
    if log_file is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = PrivateRotatingFileHandler(log_file, maxBytes=max_bytes, backupCount=backups)
    handler.setFormatter(formatter(log_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("pyvips").setLevel(logging.WARNING)

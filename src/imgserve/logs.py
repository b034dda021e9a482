"""Logging set-up: one line per record, credentials never shown.

Every record is written by :class:`SafeFormatter`, which works on the whole
formatted text (message, traceback, stack) so no call site can get around it:

- credentials are replaced by ``***`` (:func:`imgserve.urls.redact_url`);
- control characters are escaped (``\\n``, ``\\x00``, ``\\u2028``, ...), so
  a URL or an error detail with a line break cannot forge a log line, and a
  traceback is written as one line with its line breaks as ``\\n``.

The log file rotates by size and is created with mode 0640.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from pathlib import Path

from imgserve.urls import redact_url

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


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A size-rotated log file created 0640, readable by the admin group only."""

    def _open(self):  # type: ignore[no-untyped-def]
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        os.fchmod(fd, 0o640)
        return os.fdopen(fd, self.mode.replace("w", "a"), encoding=self.encoding)


def configure(
    log_file: Path | None, *, max_bytes: int, backups: int, level: int = logging.INFO
) -> None:
    """Log to ``log_file`` (rotated) or, when None, to stderr."""
    handler: logging.Handler
    if log_file is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = PrivateRotatingFileHandler(log_file, maxBytes=max_bytes, backupCount=backups)
    handler.setFormatter(SafeFormatter(FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("pyvips").setLevel(logging.WARNING)

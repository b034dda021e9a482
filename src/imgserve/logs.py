"""Logging set-up: one line per job state change, credentials never shown.

Every record passes through :class:`RedactFilter`, which replaces URL
passwords with ``***`` after formatting, so no call site can leak one. The
log file rotates by size and is created with mode 0640.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from pathlib import Path

from imgserve.urls import redact_url

FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


class RedactFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_url(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact_url(logging.Formatter().formatException(record.exc_info))
        return True


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
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(RedactFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("pyvips").setLevel(logging.WARNING)

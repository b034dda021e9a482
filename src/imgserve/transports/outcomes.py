"""Transport-neutral outcomes, and the one table from them to imgserve errors.

Transports meet failures in many shapes: HTTP statuses, FTP replies, S3 error
codes, errno values and the exception classes of aiohttp, ftplib, ssl and
botocore. Each shape is named here once as one of a few :class:`Outcome`\\ s
(NotFound, AuthRefused, Refused, Transient, Timeout, TLSFailed, TooLarge,
Malformed), and :data:`ERRORS` turns (outcome, direction) into the imgserve
error, so one failure means the same thing, retryable or not, whether it met a
download or an upload.

Transports raise outcomes for what they detect themselves and run their I/O
inside :func:`translated`, which turns what escapes it (outcomes and the
third-party exceptions in :data:`EXCEPTIONS`) into imgserve errors with
``raise ... from exc``, the way httpx's ``map_httpcore_exceptions`` does.
Errors that do not depend on the direction (URLInvalid, AddressRefused and the
other policy errors) are raised as imgserve errors directly and pass through.

:data:`EXCEPTIONS` names classes as ``module.QualName`` strings, so this module
imports none of aiohttp, ftplib or botocore: a transport's library is still
only imported by the transport that needs it (tests/transports/test_outcomes.py
imports every name, so a misspelt one fails the suite).
"""

from __future__ import annotations

import contextlib
import enum
import errno
from collections.abc import Callable, Iterator
from typing import Any

from imgserve.errors import (
    DownloadTimeout,
    ImgserveError,
    SourceNotFound,
    SourceRefused,
    SourceTooLarge,
    SourceUnreachable,
    TLSVerifyFailed,
    UploadFailed,
    UploadRefused,
    UploadTimeout,
    URLInvalid,
)
from imgserve.urls import redact_url


class Direction(enum.Enum):
    """Which way the bytes were going when the failure happened."""

    DOWNLOAD = "download"
    UPLOAD = "upload"


DOWNLOAD = Direction.DOWNLOAD
UPLOAD = Direction.UPLOAD


class Outcome(Exception):
    """A transport failure, named independently of protocol and direction."""


class NotFound(Outcome):
    """The object (or its bucket or directory) is not there."""


class AuthRefused(Outcome):
    """Credentials missing or refused: the same credentials will be refused again."""


class Refused(Outcome):
    """A permanent refusal for another reason: permission, bad request, unsupported."""


class Transient(Outcome):
    """A failure that trying again later can fix: connection, 5xx, throttling, disk full."""


class Timeout(Outcome):
    """The operation's deadline passed."""


class TLSFailed(Outcome):
    """The peer's certificate did not verify."""


class TooLarge(Outcome):
    """Over a size limit: ours on a download, the destination's on an upload."""


class Malformed(Outcome):
    """The URL, or the request built from it, is malformed (rejected before sending)."""


OUTCOMES: tuple[type[Outcome], ...] = (
    NotFound,
    AuthRefused,
    Refused,
    Transient,
    Timeout,
    TLSFailed,
    TooLarge,
    Malformed,
)

ERRORS: dict[type[Outcome], dict[Direction, type[ImgserveError]]] = {
    NotFound: {DOWNLOAD: SourceNotFound, UPLOAD: UploadRefused},
    AuthRefused: {DOWNLOAD: SourceRefused, UPLOAD: UploadRefused},
    Refused: {DOWNLOAD: SourceRefused, UPLOAD: UploadRefused},
    Transient: {DOWNLOAD: SourceUnreachable, UPLOAD: UploadFailed},
    Timeout: {DOWNLOAD: DownloadTimeout, UPLOAD: UploadTimeout},
    TLSFailed: {DOWNLOAD: TLSVerifyFailed, UPLOAD: TLSVerifyFailed},
    TooLarge: {DOWNLOAD: SourceTooLarge, UPLOAD: UploadRefused},
    Malformed: {DOWNLOAD: URLInvalid, UPLOAD: URLInvalid},
}
"""(outcome, direction) -> the imgserve error class: the only place this is decided."""


def error_class(outcome: type[Outcome], direction: Direction) -> type[ImgserveError]:
    """The imgserve error an outcome becomes in ``direction``."""
    for cls in outcome.__mro__:
        if cls in ERRORS:
            return ERRORS[cls][direction]
    raise KeyError(f"{outcome.__name__} has no row in outcomes.ERRORS")


# --- protocol replies -> outcomes (pure) -----------------------------------------------


def http_status(status: int) -> type[Outcome]:
    """The outcome of a final HTTP status >= 300 (no redirect followed)."""
    if status in (404, 410):
        return NotFound
    if status in (401, 403, 407):
        return AuthRefused
    if status in (408, 429) or status >= 500:
        return Transient
    return Refused


def ftp_reply(reply: str) -> type[Outcome]:
    """The outcome of an FTP error reply (``"550 No such file"``)."""
    code = reply[:3]
    if code in ("530", "532"):  # not logged in / need an account
        return AuthRefused
    if code == "550":  # RETR: no such file; STOR: no permission (permanent either way)
        return NotFound
    if code == "552":  # exceeded storage allocation
        return TooLarge
    if code.startswith("4"):
        return Transient
    return Refused


_S3_NOT_FOUND = frozenset({"NoSuchKey", "NoSuchBucket", "404", "NotFound"})
_S3_AUTH = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "InvalidToken",
        "SignatureDoesNotMatch",
    }
)
_S3_TRANSIENT = frozenset(
    {
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "Throttling",
        "ThrottlingException",
        "RequestTimeTooSkewed",
        # Refreshable credentials (roles, SSO) are renewed by botocore: retry.
        "ExpiredToken",
        "ExpiredTokenException",
    }
)


def s3_error(code: str, status: int) -> type[Outcome]:
    """The outcome of an S3 error reply (error code, HTTP status)."""
    if code in _S3_NOT_FOUND or status == 404:
        return NotFound
    if code in _S3_TRANSIENT or status >= 500 or status in (408, 429):
        return Transient
    if code in _S3_AUTH or status in (401, 403):
        return AuthRefused
    if code == "EntityTooLarge" or status == 413:
        return TooLarge
    return Refused


_ERRNO: dict[int, type[Outcome]] = {
    errno.ENOENT: NotFound,
    errno.EACCES: Refused,
    errno.EPERM: Refused,
    errno.EROFS: Refused,
    errno.ENOTDIR: Refused,
    errno.EISDIR: Refused,
    errno.ENAMETOOLONG: Refused,
    errno.EFBIG: TooLarge,
    errno.ETIMEDOUT: Timeout,
}


def os_errno(number: int | None) -> type[Outcome]:
    """The outcome of an OSError's errno; the rest (refused, reset, ENOSPC) is transient."""
    return _ERRNO.get(number or 0, Transient)


# --- third-party exceptions -> outcomes ------------------------------------------------


def _by_errno(exc: BaseException) -> type[Outcome]:
    return os_errno(getattr(exc, "errno", None))


def _by_ftp_reply(exc: BaseException) -> type[Outcome]:
    return ftp_reply(str(exc))


def _by_s3_error(exc: BaseException) -> type[Outcome]:
    response: Any = getattr(exc, "response", None) or {}
    error: Any = response.get("Error", {})
    meta: Any = response.get("ResponseMetadata", {})
    return s3_error(str(error.get("Code", "")), int(meta.get("HTTPStatusCode", 0) or 0))


Rule = type[Outcome] | Callable[[BaseException], type[Outcome]]

EXCEPTIONS: dict[str, Rule] = {
    # Python and the standard library (file I/O, sockets, ftplib, ssl).
    "builtins.OSError": _by_errno,
    "builtins.TimeoutError": Timeout,
    "builtins.EOFError": Transient,  # ftplib: the server closed the control connection
    "ssl.SSLError": Transient,  # handshake failure, alert, unexpected EOF
    "ssl.SSLCertVerificationError": TLSFailed,
    "ftplib.Error": Transient,  # the base of the classes below
    "ftplib.error_perm": _by_ftp_reply,
    "ftplib.error_temp": _by_ftp_reply,
    "ftplib.error_reply": Transient,  # an unexpected reply in the dialogue
    "ftplib.error_proto": Transient,  # a reply that is not FTP
    "zlib.error": Transient,  # http: a corrupt (perhaps truncated) compressed body
    # aiohttp (http, https).
    "aiohttp.client_exceptions.ClientError": Transient,
    "aiohttp.client_exceptions.ClientConnectorCertificateError": TLSFailed,
    "aiohttp.client_exceptions.ServerTimeoutError": Timeout,
    "aiohttp.client_exceptions.InvalidURL": Malformed,
    # botocore (s3).
    "botocore.exceptions.BotoCoreError": Transient,
    "botocore.exceptions.ClientError": _by_s3_error,
    "botocore.exceptions.ConnectTimeoutError": Timeout,
    "botocore.exceptions.ReadTimeoutError": Timeout,
    "botocore.exceptions.SSLError": TLSFailed,
    "botocore.exceptions.NoCredentialsError": AuthRefused,
    "botocore.exceptions.PartialCredentialsError": AuthRefused,
    "botocore.exceptions.ParamValidationError": Malformed,  # e.g. an invalid bucket name
    "botocore.exceptions.NoRegionError": Refused,  # configuration: the same next time
}
"""Third-party exception class (``module.QualName``) -> outcome, or a function of the
exception that decides it. The most specific class of an exception's MRO wins."""


def class_name(cls: type) -> str:
    """``module.QualName``, the key of a class in :data:`EXCEPTIONS`."""
    return f"{cls.__module__}.{cls.__qualname__}"


def rule_for(cls: type[BaseException]) -> Rule | None:
    """The rule of the most specific class in ``cls``'s MRO that has one."""
    for base in cls.__mro__:
        rule = EXCEPTIONS.get(class_name(base))
        if rule is not None:
            return rule
    return None


def outcome_of(exc: BaseException) -> type[Outcome] | None:
    """The outcome ``exc`` stands for, or None for an exception the table does not name."""
    if isinstance(exc, Outcome):
        return type(exc)
    rule = rule_for(type(exc))
    if rule is None:
        return None
    if isinstance(rule, type):
        return rule
    return rule(exc)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, Outcome):
        return str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        # The path is the URL's, already in the detail: "Permission denied" is enough.
        return f"{type(exc).__name__}: {exc.strerror}"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _unchanged(text: str) -> str:
    return text


def error_for(
    exc: BaseException, direction: Direction, url: str, scrub: Callable[[str], str] = _unchanged
) -> ImgserveError | None:
    """The imgserve error for ``exc`` met on ``url``, or None when the table does not name it.

    The detail is ``"<url>: <what happened>"`` with credentials redacted;
    ``scrub`` removes anything else secret from the third-party text first
    (an FTP server may echo the password).
    """
    outcome = outcome_of(exc)
    if outcome is None:
        return None
    detail = f"{redact_url(url)}: {redact_url(scrub(_describe(exc)))}"
    return error_class(outcome, direction)(detail)


@contextlib.contextmanager
def translated(
    direction: Direction, url: str, scrub: Callable[[str], str] = _unchanged
) -> Iterator[None]:
    """Raise what escapes the block as the imgserve error of its outcome.

    Imgserve errors pass unchanged; an exception the table does not name is a
    bug and passes unchanged too (the worker records it as 601).
    """
    try:
        yield
    except ImgserveError:
        raise
    except Exception as exc:
        error = error_for(exc, direction, url, scrub)
        if error is None:
            raise
        raise error from exc

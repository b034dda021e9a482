"""The one failure table: third-party exceptions -> outcomes -> imgserve errors by direction."""

# ruff: noqa: S321 - ftplib's exception classes are built here, no FTP is spoken

from __future__ import annotations

import ast
import contextlib
import errno
import ftplib
import importlib
import inspect
import pkgutil
import socket
import ssl
import zlib
from collections.abc import Iterator
from types import ModuleType

import aiohttp
import aiohttp.client_exceptions
import botocore.exceptions
import pytest

import imgserve.transports
from imgserve import errors
from imgserve.transports import outcomes
from imgserve.transports.outcomes import (
    DOWNLOAD,
    UPLOAD,
    AuthRefused,
    Direction,
    Malformed,
    NotFound,
    Outcome,
    Refused,
    TLSFailed,
    TooLarge,
    Transient,
)
from imgserve.transports.outcomes import Timeout as TimedOut

# --- (outcome, direction) -> imgserve error ---------------------------------------------

DIRECTION_TABLE = [
    (NotFound, DOWNLOAD, errors.SourceNotFound, False),
    (NotFound, UPLOAD, errors.UploadRefused, False),
    (AuthRefused, DOWNLOAD, errors.SourceRefused, False),
    (AuthRefused, UPLOAD, errors.UploadRefused, False),
    (Refused, DOWNLOAD, errors.SourceRefused, False),
    (Refused, UPLOAD, errors.UploadRefused, False),
    (Transient, DOWNLOAD, errors.SourceUnreachable, True),
    (Transient, UPLOAD, errors.UploadFailed, True),
    (TimedOut, DOWNLOAD, errors.DownloadTimeout, True),
    (TimedOut, UPLOAD, errors.UploadTimeout, True),
    (TLSFailed, DOWNLOAD, errors.TLSVerifyFailed, False),
    (TLSFailed, UPLOAD, errors.TLSVerifyFailed, False),
    (TooLarge, DOWNLOAD, errors.SourceTooLarge, False),
    (TooLarge, UPLOAD, errors.UploadRefused, False),
    (Malformed, DOWNLOAD, errors.URLInvalid, False),
    (Malformed, UPLOAD, errors.URLInvalid, False),
]


@pytest.mark.parametrize(("outcome", "direction", "expected", "retryable"), DIRECTION_TABLE)
def test_direction_table(
    outcome: type[Outcome],
    direction: Direction,
    expected: type[errors.ImgserveError],
    retryable: bool,
) -> None:
    """Each (outcome, direction) becomes exactly the listed imgserve error."""
    cls = outcomes.error_class(outcome, direction)
    assert cls is expected
    assert cls.retryable is retryable


def test_every_outcome_has_both_directions() -> None:
    """The table has one row per outcome and direction, and the test table lists them all."""
    assert set(outcomes.ERRORS) == set(outcomes.OUTCOMES)
    assert all(set(row) == set(Direction) for row in outcomes.ERRORS.values())
    assert {(o, d) for o, d, _e, _r in DIRECTION_TABLE} == {
        (o, d) for o in outcomes.OUTCOMES for d in Direction
    }


@pytest.mark.parametrize("outcome", outcomes.OUTCOMES, ids=lambda o: o.__name__)
def test_retryable_does_not_depend_on_the_direction(outcome: type[Outcome]) -> None:
    """A failure is retried on a download exactly when it is retried on an upload."""
    download = outcomes.error_class(outcome, DOWNLOAD)
    upload = outcomes.error_class(outcome, UPLOAD)
    assert download.retryable is upload.retryable


# --- protocol replies -> outcomes (pure) -------------------------------------------------


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (404, NotFound),
        (410, NotFound),
        (401, AuthRefused),
        (403, AuthRefused),
        (407, AuthRefused),
        (408, Transient),
        (429, Transient),
        (500, Transient),
        (503, Transient),
        (400, Refused),
        (405, Refused),
        (413, Refused),
        (304, Refused),
        (301, Refused),
    ],
)
def test_http_status(status: int, outcome: type[Outcome]) -> None:
    """HTTP statuses map to one outcome whatever the direction."""
    assert outcomes.http_status(status) is outcome


@pytest.mark.parametrize(
    ("reply", "outcome"),
    [
        ("530 Login incorrect.", AuthRefused),
        ("532 Need account for storing files.", AuthRefused),
        ("550 No such file or directory.", NotFound),
        ("552 Exceeded storage allocation.", TooLarge),
        ("500 Command AUTH not understood.", Refused),
        ("553 File name not allowed.", Refused),
        ("421 Service not available.", Transient),
        ("451 Injected transient failure.", Transient),
        ("452 Insufficient storage.", Transient),
    ],
)
def test_ftp_reply(reply: str, outcome: type[Outcome]) -> None:
    """FTP error replies map by code: 530 refused credentials, 4xx transient, 5xx permanent."""
    assert outcomes.ftp_reply(reply) is outcome


@pytest.mark.parametrize(
    ("code", "status", "outcome"),
    [
        ("NoSuchKey", 404, NotFound),
        ("NoSuchBucket", 404, NotFound),
        ("", 404, NotFound),
        ("AccessDenied", 403, AuthRefused),
        ("InvalidAccessKeyId", 403, AuthRefused),
        ("SignatureDoesNotMatch", 403, AuthRefused),
        ("", 403, AuthRefused),
        ("SlowDown", 503, Transient),
        ("InternalError", 500, Transient),
        ("RequestTimeout", 400, Transient),
        ("ExpiredToken", 400, Transient),
        ("EntityTooLarge", 400, TooLarge),
        ("InvalidBucketName", 400, Refused),
    ],
)
def test_s3_error(code: str, status: int, outcome: type[Outcome]) -> None:
    """S3 error codes map to one outcome whatever the direction."""
    assert outcomes.s3_error(code, status) is outcome


@pytest.mark.parametrize(
    ("number", "outcome"),
    [
        (errno.ENOENT, NotFound),
        (errno.EACCES, Refused),
        (errno.EROFS, Refused),
        (errno.EISDIR, Refused),
        (errno.EFBIG, TooLarge),
        (errno.ETIMEDOUT, TimedOut),
        (errno.ECONNREFUSED, Transient),
        (errno.ECONNRESET, Transient),
        (errno.ENOSPC, Transient),
        (None, Transient),
    ],
)
def test_os_errno(number: int | None, outcome: type[Outcome]) -> None:
    """errno values map to outcomes; connection errors and a full disk are transient."""
    assert outcomes.os_errno(number) is outcome


# --- third-party exceptions -> outcomes ---------------------------------------------------


def _client_error(code: str, status: int) -> botocore.exceptions.ClientError:
    response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return botocore.exceptions.ClientError(response, "GetObject")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("exc", "outcome"),
    [
        (FileNotFoundError(errno.ENOENT, "No such file or directory"), NotFound),
        (PermissionError(errno.EACCES, "Permission denied"), Refused),
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), Transient),
        (TimeoutError("timed out"), TimedOut),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), Transient),
        (EOFError(), Transient),
        (ssl.SSLCertVerificationError("certificate verify failed"), TLSFailed),
        (ssl.SSLError("handshake failure"), Transient),
        (ftplib.error_perm("530 Login incorrect."), AuthRefused),
        (ftplib.error_perm("550 No such file."), NotFound),
        (ftplib.error_temp("451 Try later."), Transient),
        (ftplib.error_reply("226 Unexpected."), Transient),
        (zlib.error("invalid stored block lengths"), Transient),
        (aiohttp.ClientPayloadError("truncated"), Transient),
        (aiohttp.ServerDisconnectedError(), Transient),
        (aiohttp.ServerTimeoutError("read timeout"), TimedOut),
        (aiohttp.InvalidURL("http://[x"), Malformed),
        (_client_error("NoSuchKey", 404), NotFound),
        (_client_error("AccessDenied", 403), AuthRefused),
        (_client_error("SlowDown", 503), Transient),
        (botocore.exceptions.NoCredentialsError(), AuthRefused),
        (botocore.exceptions.PartialCredentialsError(provider="env", cred_var="x"), AuthRefused),
        (botocore.exceptions.ReadTimeoutError(endpoint_url="http://s3"), TimedOut),
        (botocore.exceptions.ConnectTimeoutError(endpoint_url="http://s3"), TimedOut),
        (botocore.exceptions.EndpointConnectionError(endpoint_url="http://s3"), Transient),
        (botocore.exceptions.SSLError(endpoint_url="https://s3", error="bad cert"), TLSFailed),
        (botocore.exceptions.ParamValidationError(report="Invalid bucket name"), Malformed),
        (botocore.exceptions.NoRegionError(), Refused),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else "",
)
def test_third_party_exceptions(exc: BaseException, outcome: type[Outcome]) -> None:
    """Each third-party exception names one outcome (the most specific class wins)."""
    assert outcomes.outcome_of(exc) is outcome


def test_certificate_errors_are_tls_failures_not_connection_errors() -> None:
    """aiohttp's certificate error is also a ClientError and an OSError: TLS wins."""
    cls = aiohttp.ClientConnectorCertificateError
    assert issubclass(cls, aiohttp.ClientError) and issubclass(cls, OSError)
    assert outcomes.rule_for(cls) is TLSFailed


def test_exceptions_outside_the_table_are_not_translated() -> None:
    """A bug (KeyError, ValueError) is not dressed up as a transport failure."""
    assert outcomes.outcome_of(KeyError("x")) is None
    assert outcomes.outcome_of(ValueError("x")) is None
    with pytest.raises(KeyError), outcomes.translated(DOWNLOAD, "http://h/x"):
        raise KeyError("x")


def test_every_name_in_the_table_is_a_real_exception_class() -> None:
    """Each ``module.QualName`` key imports to an exception class of exactly that name."""
    for name in outcomes.EXCEPTIONS:
        module_name, _, attr = name.rpartition(".")
        cls = getattr(importlib.import_module(module_name), attr)
        assert inspect.isclass(cls) and issubclass(cls, BaseException), name
        assert outcomes.class_name(cls) == name


def test_every_library_exception_has_an_outcome() -> None:
    """ftplib.all_errors, aiohttp's client exceptions and botocore's exceptions are all mapped."""
    library: list[type[BaseException]] = list(ftplib.all_errors)
    for name in aiohttp.client_exceptions.__all__:
        cls = getattr(aiohttp.client_exceptions, name)
        if issubclass(cls, aiohttp.ClientError):  # not the websocket-only TypeError
            library.append(cls)
    for cls in vars(botocore.exceptions).values():
        if inspect.isclass(cls) and issubclass(
            cls, botocore.exceptions.BotoCoreError | botocore.exceptions.ClientError
        ):
            library.append(cls)
    unmapped = [outcomes.class_name(cls) for cls in library if outcomes.rule_for(cls) is None]
    assert unmapped == []


# Caught in transports/ but not transport failures: each is handled on the spot.
NOT_TRANSPORT_FAILURES: dict[type[BaseException], str] = {
    ValueError: "parsing URL text (urlsplit, yarl, ipaddress): raised as URLInvalid",
    TypeError: "yarl on a URL it cannot build: raised as URLInvalid",
    UnicodeError: "resolving a host IDNA cannot encode: raised as URLInvalid (124)",
    ModuleNotFoundError: "a transport's library is missing: DependencyMissing",
    RuntimeError: "threads.py: the event loop closed while a thread finished",
    BaseException: "threads.py: unblocks the thread, then re-raises unchanged",
}


def _transport_modules() -> Iterator[ModuleType]:
    yield imgserve.transports
    for info in pkgutil.iter_modules(imgserve.transports.__path__):
        if info.name != "outcomes":  # the translator itself catches Exception
            yield importlib.import_module(f"imgserve.transports.{info.name}")


def _caught(module: ModuleType) -> Iterator[tuple[int, type[BaseException]]]:
    """Every class an ``except`` clause or ``contextlib.suppress(...)`` in ``module`` names."""
    tree = ast.parse(inspect.getsource(module))
    namespace = vars(module)
    expressions: list[ast.expr] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ExceptHandler) and node.type is not None:
            expressions.append(node.type)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "suppress"
        ):
            expressions.extend(node.args)
    for expr in expressions:
        starred = isinstance(expr, ast.Starred)
        code = compile(ast.Expression(expr.value if starred else expr), module.__name__, "eval")
        value = eval(code, namespace)  # noqa: S307 - the module's own except expressions
        items = value if isinstance(value, tuple) else (value,)
        for cls in items:
            yield expr.lineno, cls


def test_every_exception_the_transports_catch_is_in_the_table() -> None:
    """Every class transports/*.py catches is an imgserve error, an outcome or in the table."""
    found = 0
    unmapped: list[str] = []
    for module in _transport_modules():
        for line, cls in _caught(module):
            found += 1
            known = (
                issubclass(cls, errors.ImgserveError | Outcome)
                or outcomes.rule_for(cls) is not None
                or cls in NOT_TRANSPORT_FAILURES
            )
            if not known:
                unmapped.append(f"{module.__name__}:{line} catches {outcomes.class_name(cls)}")
    assert found > 10  # the walk really saw the transports' except clauses
    assert unmapped == []


# --- translation: detail text, redaction -------------------------------------------------


def test_translated_details_never_carry_credentials() -> None:
    """The URL is redacted and the scrubber removes a password an FTP reply echoes."""
    url = "ftp://user:Secret-77@host/x.png"
    scrub = lambda text: text.replace("Secret-77", "***")  # noqa: E731
    with pytest.raises(errors.SourceRefused) as info, outcomes.translated(DOWNLOAD, url, scrub):
        raise ftplib.error_perm("530 Login incorrect for user / Secret-77")
    assert "Secret-77" not in str(info.value)
    assert info.value.detail.startswith("ftp://user:***@host/x.png: ")
    assert isinstance(info.value.__cause__, ftplib.error_perm)


def test_imgserve_errors_pass_through_unchanged() -> None:
    """A policy error raised inside a translated block is not reclassified."""
    refused = errors.AddressRefused("127.0.0.1 refused")
    with pytest.raises(errors.AddressRefused) as info, outcomes.translated(UPLOAD, "http://h/x"):
        raise refused
    assert info.value is refused


def test_outcomes_raised_by_transports_translate_by_direction() -> None:
    """The same outcome raised in a download and an upload gives the direction's error."""
    for direction, expected in ((DOWNLOAD, errors.SourceTooLarge), (UPLOAD, errors.UploadRefused)):
        with pytest.raises(expected) as info, outcomes.translated(direction, "s3://b/k"):
            raise TooLarge("5000 bytes > 4999")
        assert info.value.detail == "s3://b/k: 5000 bytes > 4999"


def test_suppress_is_found_by_the_walk() -> None:
    """The AST walk sees contextlib.suppress arguments, starred ones included."""
    from imgserve.transports import ftp

    caught = {cls for _line, cls in _caught(ftp)}
    assert set(ftplib.all_errors) <= caught
    with contextlib.suppress(*ftplib.all_errors):
        raise EOFError

"""The one exception tree of imgserve.

Every failure a user can see is an :class:`ImgserveError` subclass with a
stable numeric ``code`` (the compatibility contract with imgserve 0.2 for
codes 101-205), an HTTP ``status``, a public ``message`` and ``retryable``:
whether trying the same job again can help. Third-party exceptions are
translated into these where they enter imgserve (``raise ... from exc``);
only the HTTP edge (api.py) turns them into replies.

docs/errors.md lists the same table for humans; tests/test_errors_doc.py checks
that the two agree.
"""

from __future__ import annotations

from typing import ClassVar


class ImgserveError(Exception):
    """Base class: a failure with a stable code and a public message."""

    code: ClassVar[int] = 0
    status: ClassVar[int] = 500
    message: ClassVar[str] = "internal error"
    retryable: ClassVar[bool] = False

    def __init__(self, detail: str | None = None) -> None:
        self.detail = detail or self.message
        super().__init__(self.detail)

    def to_dict(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message, "detail": self.detail}


class RequestParseError(ImgserveError):
    """The body is not a JSON object (0.2: "request parse error")."""

    code = 100
    status = 400
    message = "request parse error"


class RequestInvalid(ImgserveError):
    """Base of every "request invalid" reply."""

    status = 400


# --- 0.2's request validation codes -------------------------------------------------


class KeysInvalid(RequestInvalid):
    code = 101
    message = "request keys missing or unknown"


class UnknownOperation(RequestInvalid):
    code = 102
    message = "unknown operationType"


class ArgsNotObject(RequestInvalid):
    code = 103
    message = "args is not an object"


class EmptySrcURL(RequestInvalid):
    code = 104
    message = "srcURL is empty"


class EmptyDstURL(RequestInvalid):
    code = 105
    message = "dstURL is empty"


class WidthInvalid(RequestInvalid):
    code = 106
    message = "width missing or not a positive integer"


class HeightInvalid(RequestInvalid):
    code = 107
    message = "height missing or not a positive integer"


class SourceTypeNotAllowed(RequestInvalid):
    code = 108
    status = 422
    message = "source type not allowed for this operation"


class SrcSchemeUnsupported(RequestInvalid):
    code = 109
    message = "source URL scheme not supported"


class DstSchemeUnsupported(RequestInvalid):
    code = 110
    message = "destination URL scheme not supported"


class FormFieldMissing(RequestInvalid):
    code = 111
    message = "upload form field missing"


class FormFieldNotString(RequestInvalid):
    code = 112
    message = "upload form field is not a string"


class DstExtensionUnsupported(RequestInvalid):
    code = 113
    message = "destination extension not supported"


# --- new argument checks (120-129) ---------------------------------------------------


class GravityInvalid(RequestInvalid):
    code = 120
    message = "gravity not one of centre, north, ..., smart"


class QualityInvalid(RequestInvalid):
    code = 121
    message = "quality is not an integer from 1 to 100"


class ScaleInvalid(RequestInvalid):
    code = 122
    message = "scale is not a positive number"


class ArgInvalid(RequestInvalid):
    code = 123
    message = "an argument has the wrong type or an unknown name"


class URLInvalid(RequestInvalid):
    code = 124
    message = "URL is malformed"


class RequestTooLarge(RequestInvalid):
    code = 125
    status = 413
    message = "request body over the size limit"


# --- hostile input (126-129) ----------------------------------------------------------


class FormFieldInvalid(RequestInvalid):
    code = 126
    message = "upload form field name holds a control character"


class HTTPProtocolError(ImgserveError):
    """The HTTP message itself is broken, so no request reached the handlers.

    Found by aiohttp's parser (see protocol.py); not a JSON contract failure.
    """

    status = 400


class HTTPRequestMalformed(HTTPProtocolError):
    code = 127
    message = "HTTP request malformed"


class HTTPHeadersTooLarge(HTTPProtocolError):
    code = 128
    status = 431
    message = "request header too large"


class HTTPURLTooLong(HTTPProtocolError):
    code = 129
    status = 414
    message = "request URL too long"


# --- idempotency keys (130-131) --------------------------------------------------------


class IdempotencyKeyReused(ImgserveError):
    """The ``Idempotency-Key`` was first used with another request (endpoint or body)."""

    code = 130
    status = 422
    message = "Idempotency-Key already used with a different request"


class IdempotencyKeyInvalid(ImgserveError):
    """The ``Idempotency-Key`` header is empty, too long or not printable ASCII."""

    code = 131
    status = 400
    message = "Idempotency-Key header invalid"


# --- API keys (140-144): docs/security.md ----------------------------------------------


class APIKeyMissing(ImgserveError):
    """Keys are configured and the request carries no ``Authorization: Bearer`` key."""

    code = 140
    status = 401
    message = "API key missing"


class APIKeyUnknown(ImgserveError):
    """The ``Authorization: Bearer`` key is not one of the configured keys."""

    code = 141
    status = 401
    message = "API key unknown"


class SourceOutOfScope(ImgserveError):
    """The key's ``sources`` do not include the job's source URL."""

    code = 142
    status = 403
    message = "source outside the key's scope"


class DestinationOutOfScope(ImgserveError):
    """The key's ``destinations`` do not include one of the job's destinations."""

    code = 143
    status = 403
    message = "destination outside the key's scope"


class APIKeyRateLimited(ImgserveError):
    """The key started more jobs than its ``rate`` (and ``burst``) allow on this node;
    the reply's Retry-After says when the next one may start."""

    code = 144
    status = 429
    message = "too many jobs for this key, retry later"
    retryable = True

    def __init__(self, detail: str | None = None, *, retry_after_s: float = 1.0) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


# --- 0.2's source and destination codes ----------------------------------------------


class SourceUnreachable(ImgserveError):
    """The source could not be downloaded (connection, DNS, HTTP error)."""

    code = 201
    status = 422
    message = "source unreachable"
    retryable = True


class SourceNotFound(SourceUnreachable):
    """The source server answered definitively that the object is not there."""

    retryable = False


class SourceRefused(SourceUnreachable):
    """The source server refused for good (credentials refused, permission, bad request)."""

    retryable = False


class SourceUnreadable(ImgserveError):
    code = 202
    status = 422
    message = "source image size unreadable (not an image, truncated or unsupported format)"


class EnlargeNotAllowed(ImgserveError):
    code = 203
    status = 422
    message = "source smaller than the requested size and enlarging not allowed"


class SVGInvalid(ImgserveError):
    code = 204
    status = 422
    message = "invalid SVG"


class PlaceholderUploadFailed(ImgserveError):
    code = 205
    status = 422
    message = "placeholder upload failed"


class LoaderCrashed(ImgserveError):
    """The process reading the source header died (segfault, abort, OOM or other kill)."""

    code = 206
    status = 422
    message = "the image loader crashed while reading the source header"


class SourceChanged(ImgserveError):
    """The source was downloaded again after the reply and is not the image that was
    planned: rendering it would break the promised result size."""

    code = 207
    status = 422
    message = "source changed since the job was accepted"


# --- limits (301-309) -----------------------------------------------------------------


class SourceTooLarge(ImgserveError):
    code = 301
    status = 413
    message = "source over the download size limit"


class SourcePixelsOverLimit(ImgserveError):
    code = 302
    status = 422
    message = "source over the pixel limit"


class ResultOverLimit(ImgserveError):
    code = 303
    status = 422
    message = "result over the size limit"


class SVGRenderOverLimit(ImgserveError):
    code = 304
    status = 422
    message = "SVG would render past the pixel limit"


class DownloadTimeout(ImgserveError):
    code = 305
    status = 422
    message = "source download deadline exceeded"
    retryable = True


class ProcessingTimeout(ImgserveError):
    code = 306
    status = 422
    message = "processing deadline exceeded"


class WorkerMemoryExceeded(ImgserveError):
    code = 307
    status = 422
    message = "worker memory limit exceeded"


class TooManyRedirects(ImgserveError):
    code = 308
    status = 422
    message = "too many redirects"


# --- security policy (401-409) ---------------------------------------------------------


class AddressRefused(ImgserveError):
    code = 401
    status = 403
    message = "address refused by the outbound network policy"


class FileSchemeDisabled(ImgserveError):
    code = 402
    status = 403
    message = "file:// is disabled (no file roots configured)"


class PathOutsideRoots(ImgserveError):
    code = 403
    status = 403
    message = "path outside the configured file roots"


class NotARegularFile(ImgserveError):
    code = 404
    status = 403
    message = "not a regular file"


class RedirectSchemeRefused(ImgserveError):
    code = 405
    status = 403
    message = "redirect to a scheme other than http(s) refused"


class TLSVerifyFailed(ImgserveError):
    code = 406
    status = 422
    message = "TLS certificate verification failed"


# --- destination (501-509) -------------------------------------------------------------


class UploadFailed(ImgserveError):
    """A transient upload failure (connection reset, 5xx, 429, FTP 4xx)."""

    code = 501
    status = 502
    message = "upload to the destination failed"
    retryable = True


class UploadRefused(ImgserveError):
    """A permanent upload failure (HTTP 4xx, FTP 5xx, access denied)."""

    code = 502
    status = 422
    message = "destination refused the upload"


class UploadTimeout(UploadFailed):
    code = 503
    message = "upload deadline exceeded"


# --- service and internal (601-609) ----------------------------------------------------


class InternalError(ImgserveError):
    code = 601
    status = 500
    message = "internal error"
    retryable = True


class QueueFull(ImgserveError):
    code = 602
    status = 503
    message = "queue full, retry later"


class WorkerCrashed(ImgserveError):
    """The worker process died mid-job (segfault, OOM kill, abort) on every attempt."""

    code = 603
    status = 500
    message = "worker process died while processing the job"
    retryable = True


class ShuttingDown(ImgserveError):
    code = 604
    status = 503
    message = "shutting down, not accepting jobs"


class JobNotFound(ImgserveError):
    code = 605
    status = 404
    message = "no such job"


class NotFound(ImgserveError):
    code = 606
    status = 404
    message = "no such path"


class MethodNotAllowed(ImgserveError):
    code = 607
    status = 405
    message = "method not allowed"


class QueueUnavailable(ImgserveError):
    code = 608
    status = 503
    message = "job queue unavailable"
    retryable = True


class DependencyMissing(ImgserveError):
    """An optional package this job needs is not installed (the message names the extra)."""

    code = 609
    status = 500
    message = "a package this job needs is not installed"


class WorkerUnresponsive(WorkerCrashed):
    """The worker pool gave no answer within the job deadline plus a grace."""

    code = 610
    message = "no answer from the worker process within the deadline"


class IntakeBusy(ImgserveError):
    """Every intake slot (a download + check before the reply) is taken, or the
    sources being checked hold the intake byte budget."""

    code = 611
    status = 503
    message = "too many jobs being checked, retry later"


class ReplyTimeout(ImgserveError):
    """Checking the job (download, plan, placeholder upload) ran past the reply deadline."""

    code = 612
    status = 504
    message = "the job could not be checked within the reply deadline"


class JobNotCancellable(ImgserveError):
    """Only a queued job can be cancelled; the detail says the job's state."""

    code = 613
    status = 409
    message = "job cannot be cancelled"


# --- POST /jobs validation (700-799): each detail starts with the field path -----------


class JobBodyInvalid(RequestInvalid):
    """The body (or the multipart ``job`` part) is not a JSON object.

    Raised with a detail naming where: ``JobBodyInvalid("job: is not JSON: ...")``.
    """

    code = 700
    message = "job body is not a JSON object"


class JobFieldMissing(RequestInvalid):
    code = 701
    message = "a required job field is missing"


class JobFieldUnknown(RequestInvalid):
    code = 702
    message = "unknown job field"


class JobFieldInvalid(RequestInvalid):
    code = 703
    message = "a job field has the wrong type or value"


class JobOutputsCount(RequestInvalid):
    code = 704
    message = "too few or too many outputs"


class JobURLInvalid(RequestInvalid):
    code = 705
    message = "a job URL is malformed or not supported"


class JobFormatInvalid(RequestInvalid):
    code = 706
    message = "output format unknown or not given"


class JobUploadInvalid(RequestInvalid):
    """The multipart body is not a ``job`` part and a ``source`` file part."""

    code = 707
    message = "multipart job body invalid"


class JobMediaTypeUnsupported(RequestInvalid):
    code = 708
    status = 415
    message = "Content-Type must be application/json or multipart/form-data"


class JobMetadataTooLarge(RequestInvalid):
    code = 709
    message = "job metadata over the size limit"


# --- job control (614-616) -------------------------------------------------------------


class IdempotencyKeyBusy(ImgserveError):
    """Another request holding the same ``Idempotency-Key`` was still being answered
    when this one stopped waiting for its reply."""

    code = 614
    status = 409
    message = "a request with this Idempotency-Key is still being answered"
    retryable = True


class EventStreamsFull(ImgserveError):
    """As many ``GET /events`` streams are open as the daemon serves at once."""

    code = 615
    status = 503
    message = "too many event streams open, retry later"


class JobHasNoEvent(ImgserveError):
    """``POST /jobs/<id>/webhook`` for a job that has no completion event (yet)."""

    code = 616
    status = 404
    message = "the job has no webhook event"


def all_errors() -> list[type[ImgserveError]]:
    """Every error class that defines its own code, in code order."""
    found: list[type[ImgserveError]] = []
    stack: list[type[ImgserveError]] = list(ImgserveError.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if "code" in cls.__dict__:
            found.append(cls)
    return sorted(found, key=lambda cls: cls.code)


def by_code(code: int) -> type[ImgserveError]:
    """The error class for a stored code (InternalError when unknown)."""
    for cls in all_errors():
        if cls.code == code:
            return cls
    return InternalError

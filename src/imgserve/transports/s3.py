"""s3://bucket/key: GetObject downloads, PutObject uploads (boto3 in a thread).

The key is everything after ``bucket/``, taken literally (no percent-decoding),
as the AWS CLI does. Credentials and region come from boto3's standard chain
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_DEFAULT_REGION``, profiles, instance roles); ``settings.s3_region``
overrides the region and ``settings.s3_endpoint`` points at another S3
implementation (MinIO, Ceph, moto), with path-style addressing. Credentials in
the URL are refused. The endpoint is operator configuration and is not
subject to the outbound address policy (buckets and keys cannot change the
host connected to when an endpoint is set).

botocore's own retries are off: the registry's retry loop is the only one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any

import boto3
import botocore.exceptions as boto_errors
from botocore.config import Config

from imgserve.config import TransportSettings
from imgserve.errors import (
    DownloadTimeout,
    ImgserveError,
    SourceNotFound,
    SourceTooLarge,
    SourceUnreachable,
    TLSVerifyFailed,
    UploadFailed,
    UploadRefused,
    UploadTimeout,
    URLInvalid,
)
from imgserve.transports.base import Target, Transport
from imgserve.urls import redact_url

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

_CHUNK_BYTES = 256 * 1024
_NOT_FOUND = frozenset({"NoSuchKey", "NoSuchBucket", "404", "NotFound"})
_TRANSIENT = frozenset(
    {
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "Throttling",
        "ThrottlingException",
        "RequestTimeTooSkewed",
    }
)


class _Deadline(Exception):
    """The total download deadline passed (inside the worker thread)."""


def _parse(url: str) -> tuple[str, str]:
    scheme, sep, rest = url.partition("://")
    if scheme.lower() != "s3" or not sep:
        raise URLInvalid(f"not an s3:// URL: {redact_url(url)}")
    bucket, _, key = rest.partition("/")
    if "@" in bucket:
        raise URLInvalid("credentials in s3:// URLs are not supported; use AWS_* variables")
    if not bucket or not key:
        raise URLInvalid(f"s3:// URL needs a bucket and a key: {redact_url(url)}")
    return bucket, key


def _error_code(exc: boto_errors.ClientError) -> tuple[str, int]:
    error: Any = exc.response.get("Error", {})
    meta: Any = exc.response.get("ResponseMetadata", {})
    return str(error.get("Code", "")), int(meta.get("HTTPStatusCode", 0) or 0)


class S3Transport(Transport):
    """S3 and S3-compatible stores via boto3."""

    schemes = ("s3",)

    def __init__(self, settings: TransportSettings) -> None:
        super().__init__(settings)
        self._client: S3Client | None = None
        self._lock = threading.Lock()
        self._bundle: str | None = None

    def _ca_bundle(self) -> str | bool:
        """botocore's ``verify``: default CAs, plus settings.ca_file when set."""
        if self.settings.ca_file is None:
            return True
        if self._bundle is None:
            # botocore takes one bundle file; concatenate so the extra CA adds to
            # the defaults instead of replacing them.
            from botocore.httpsession import get_cert_path

            default = get_cert_path(True)
            fd, path = tempfile.mkstemp(prefix="imgserve-ca-", suffix=".pem")
            with os.fdopen(fd, "wb") as out:
                if isinstance(default, str):
                    with contextlib.suppress(OSError), open(default, "rb") as fh:
                        out.write(fh.read() + b"\n")
                out.write(self.settings.ca_file.read_bytes())
            self._bundle = path
        return self._bundle

    def _s3(self) -> S3Client:
        with self._lock:
            if self._client is None:
                config = Config(
                    connect_timeout=min(self.settings.download_timeout_s, 30.0),
                    read_timeout=max(
                        self.settings.download_timeout_s, self.settings.upload_timeout_s
                    ),
                    retries={"total_max_attempts": 1, "mode": "standard"},
                    s3={"addressing_style": "path"} if self.settings.s3_endpoint else {},
                )
                # A fresh session reads the AWS_* environment now, not at import.
                session = boto3.session.Session()
                self._client = session.client(
                    "s3",
                    endpoint_url=self.settings.s3_endpoint,
                    region_name=self.settings.s3_region,
                    config=config,
                    verify=self._ca_bundle(),
                )
            return self._client

    async def aclose(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
        if self._bundle is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._bundle)
            self._bundle = None

    # --- download -----------------------------------------------------------------

    async def download(self, url: str) -> bytes:
        bucket, key = _parse(url)
        timeout_s = self.settings.download_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.to_thread(
                    self._download, bucket, key, url, time.monotonic() + timeout_s
                )
        except TimeoutError as exc:
            raise DownloadTimeout(f"{redact_url(url)} not downloaded in time") from exc

    def _download(self, bucket: str, key: str, url: str, deadline: float) -> bytes:
        shown = redact_url(url)
        limit = self.settings.max_download_bytes
        try:
            reply = self._s3().get_object(Bucket=bucket, Key=key)
            body = reply["Body"]
            with contextlib.closing(body):
                if reply.get("ContentLength", 0) > limit:
                    raise SourceTooLarge(f"{shown} is {reply['ContentLength']} bytes > {limit}")
                parts: list[bytes] = []
                total = 0
                while chunk := body.read(_CHUNK_BYTES):
                    if time.monotonic() > deadline:
                        raise _Deadline
                    total += len(chunk)
                    if total > limit:
                        raise SourceTooLarge(f"{shown} is more than {limit} bytes")
                    parts.append(chunk)
            return b"".join(parts)
        except ImgserveError:
            raise
        except _Deadline as exc:
            raise DownloadTimeout(f"{shown} not downloaded in time") from exc
        except boto_errors.ClientError as exc:
            code, status = _error_code(exc)
            if code in _NOT_FOUND or status == 404:
                raise SourceNotFound(f"{shown}: {code or status}") from exc
            raise SourceUnreachable(f"{shown}: {code or status}") from exc
        except (boto_errors.ConnectTimeoutError, boto_errors.ReadTimeoutError) as exc:
            raise DownloadTimeout(f"{shown}: {exc}") from exc
        except boto_errors.SSLError as exc:
            raise TLSVerifyFailed(f"{shown}: {exc}") from exc
        except boto_errors.NoCredentialsError as exc:
            raise SourceUnreachable(f"{shown}: no AWS credentials (AWS_ACCESS_KEY_ID...)") from exc
        except (boto_errors.BotoCoreError, OSError) as exc:
            raise SourceUnreachable(f"{shown}: {type(exc).__name__}: {exc}") from exc

    # --- upload -------------------------------------------------------------------

    async def upload_once(self, target: Target, data: bytes, content_type: str) -> None:
        bucket, key = _parse(target.url)
        try:
            async with asyncio.timeout(self.settings.upload_timeout_s):
                await asyncio.to_thread(self._upload, bucket, key, target.url, data, content_type)
        except TimeoutError as exc:
            raise UploadTimeout(f"{redact_url(target.url)} not uploaded in time") from exc

    def _upload(self, bucket: str, key: str, url: str, data: bytes, content_type: str) -> None:
        shown = redact_url(url)
        try:
            self._s3().put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)
        except boto_errors.ClientError as exc:
            code, status = _error_code(exc)
            if code in _TRANSIENT or status >= 500 or status in (408, 429):
                raise UploadFailed(f"{shown}: {code or status}") from exc
            raise UploadRefused(f"{shown}: {code or status}") from exc
        except (boto_errors.ConnectTimeoutError, boto_errors.ReadTimeoutError) as exc:
            raise UploadTimeout(f"{shown}: {exc}") from exc
        except boto_errors.SSLError as exc:
            raise TLSVerifyFailed(f"{shown}: {exc}") from exc
        except boto_errors.NoCredentialsError as exc:
            raise UploadRefused(f"{shown}: no AWS credentials (AWS_ACCESS_KEY_ID...)") from exc
        except (boto_errors.BotoCoreError, OSError) as exc:
            raise UploadFailed(f"{shown}: {type(exc).__name__}: {exc}") from exc

"""s3://bucket/key: GetObject downloads, PutObject uploads (boto3 on its own threads).

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
boto3 runs on the transport's own thread pool (threads.py, ``s3_threads``
threads, as many pooled connections); its errors become outcomes (outcomes.py).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from typing import TYPE_CHECKING

import boto3
from botocore.config import Config

from imgserve.config import TransportSettings
from imgserve.errors import URLInvalid
from imgserve.transports import outcomes
from imgserve.transports.base import Charge, Chunks, HopCheck, Target, Transport
from imgserve.transports.threads import BlockingExecutor
from imgserve.urls import redact_url

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

_CHUNK_BYTES = 256 * 1024


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


class S3Transport(Transport):
    """S3 and S3-compatible stores via boto3."""

    schemes = ("s3",)

    def __init__(self, settings: TransportSettings) -> None:
        super().__init__(settings)
        self._client: S3Client | None = None
        self._lock = threading.Lock()
        self._bundle: str | None = None
        self._threads = BlockingExecutor("s3", settings.s3_threads)

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
                    # One connection per pool thread, so no thread waits on urllib3.
                    max_pool_connections=self._threads.threads,
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
        self._threads.close()
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
        if self._bundle is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._bundle)
            self._bundle = None

    # --- download -----------------------------------------------------------------

    async def download(
        self, url: str, charge: Charge | None = None, hop_check: HopCheck | None = None
    ) -> bytes:
        bucket, key = _parse(url)
        timeout_s = self.settings.download_timeout_s
        with outcomes.translated(outcomes.DOWNLOAD, url):
            try:
                return await self._threads.run(
                    timeout_s, lambda deadline: self._download(bucket, key, charge, deadline)
                )
            except TimeoutError as exc:
                raise outcomes.Timeout(f"not downloaded within {timeout_s}s") from exc

    def _download(self, bucket: str, key: str, charge: Charge | None, deadline: float) -> bytes:
        limit = self.settings.max_download_bytes
        reply = self._s3().get_object(Bucket=bucket, Key=key)
        body = reply["Body"]
        with contextlib.closing(body):
            if reply.get("ContentLength", 0) > limit:
                raise outcomes.TooLarge(f"{reply['ContentLength']} bytes > {limit}")
            chunks = Chunks(limit, charge)
            while chunk := body.read(_CHUNK_BYTES):
                if time.monotonic() > deadline:
                    raise outcomes.Timeout("deadline passed")
                chunks.add(chunk)
        return chunks.join()

    # --- upload -------------------------------------------------------------------

    async def upload_once(self, target: Target, data: bytes, content_type: str) -> None:
        bucket, key = _parse(target.url)
        timeout_s = self.settings.upload_timeout_s

        def put(_deadline: float) -> None:
            self._s3().put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)

        with outcomes.translated(outcomes.UPLOAD, target.url):
            try:
                await self._threads.run(timeout_s, put)
            except TimeoutError as exc:
                raise outcomes.Timeout(f"not uploaded within {timeout_s}s") from exc

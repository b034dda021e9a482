"""s3-specific behaviour against moto's server: keys, metadata, credentials, URL forms."""

from __future__ import annotations

import dataclasses

import pytest

from imgserve.config import TransportSettings
from imgserve.errors import SourceRefused, UploadRefused, URLInvalid
from imgserve.transports import Target, Transports
from tests.servers import S3TestServer
from tests.transports.conftest import unique


@pytest.fixture
def s3_settings(settings: TransportSettings, s3_server: S3TestServer) -> TransportSettings:
    """Settings pointing at moto's endpoint."""
    return dataclasses.replace(settings, s3_endpoint=s3_server.endpoint, s3_region="us-east-1")


async def test_upload_sets_content_type_and_literal_key(
    s3_server: S3TestServer, s3_env: dict[str, str], s3_settings: TransportSettings
) -> None:
    """PutObject stores the Content-Type; the key is taken literally (no decoding)."""
    key = f"out/{unique('k')}/a%20b.png"
    registry = Transports(s3_settings)
    try:
        await registry.upload(Target(f"s3://{s3_server.bucket}/{key}"), b"img", "image/png")
        assert await registry.download(f"s3://{s3_server.bucket}/{key}") == b"img"
    finally:
        await registry.aclose()
    head = s3_server.client().head_object(Bucket=s3_server.bucket, Key=key)
    assert head["ContentType"] == "image/png"


async def test_wrong_credentials_are_refused_not_retried(
    s3_server: S3TestServer,
    s3_env: dict[str, str],
    s3_settings: TransportSettings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without credentials both an upload and a download are refused for good (not retried)."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    registry = Transports(s3_settings)
    try:
        with pytest.raises(UploadRefused):
            await registry.upload(Target(f"s3://{s3_server.bucket}/x.png"), b"x", "image/png")
        with pytest.raises(SourceRefused) as info:
            await registry.download(f"s3://{s3_server.bucket}/x.png")
        # Was retryable on download only; the same missing credentials fail again.
        assert not info.value.retryable and info.value.code == 201
    finally:
        await registry.aclose()


@pytest.mark.parametrize(
    "url",
    ["s3://bucket", "s3://bucket/", "s3:///key", "s3://key:secret@bucket/key"],
)
async def test_malformed_s3_urls(
    s3_env: dict[str, str], s3_settings: TransportSettings, url: str
) -> None:
    """A missing bucket or key, or credentials in the URL, is URLInvalid."""
    registry = Transports(s3_settings)
    try:
        with pytest.raises(URLInvalid) as info:
            await registry.download(url)
    finally:
        await registry.aclose()
    assert "secret" not in str(info.value)

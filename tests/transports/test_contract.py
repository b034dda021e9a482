"""The transport contract, run against every transport and its real server."""

from __future__ import annotations

import time

import pytest

from imgserve.errors import (
    DownloadTimeout,
    ImgserveError,
    IntakeBusy,
    SourceNotFound,
    SourceTooLarge,
    UploadFailed,
)
from tests.transports.conftest import Backend, unique

PAYLOAD = bytes(range(256)) * 40


async def test_download_returns_the_stored_bytes(backend: Backend) -> None:
    """A download returns exactly the bytes the server holds."""
    url = backend.put_source(unique("src"), PAYLOAD)
    registry = backend.transports()
    try:
        assert await registry.download(url) == PAYLOAD
    finally:
        await registry.aclose()


async def test_download_of_a_missing_object_is_source_not_found(backend: Backend) -> None:
    """A missing object is SourceNotFound (not retryable)."""
    registry = backend.transports()
    try:
        with pytest.raises(SourceNotFound) as info:
            await registry.download(backend.missing_url)
    finally:
        await registry.aclose()
    assert not info.value.retryable


async def test_upload_stores_the_bytes(backend: Backend) -> None:
    """An upload leaves exactly the uploaded bytes on the server."""
    name = unique("up")
    registry = backend.transports()
    try:
        await registry.upload(backend.target(name), PAYLOAD, "image/png")
    finally:
        await registry.aclose()
    assert backend.read_back(name) == PAYLOAD


async def test_upload_overwrites_an_existing_object(backend: Backend) -> None:
    """A second upload to the same target replaces the first."""
    name = unique("over")
    registry = backend.transports()
    try:
        await registry.upload(backend.target(name), b"first version, longer", "image/png")
        await registry.upload(backend.target(name), b"second", "image/png")
    finally:
        await registry.aclose()
    assert backend.read_back(name) == b"second"


async def test_download_over_the_size_limit_is_source_too_large(backend: Backend) -> None:
    """A source bigger than max_download_bytes is SourceTooLarge."""
    url = backend.put_source(unique("big"), b"x" * 5000)
    registry = backend.transports(max_download_bytes=4999)
    try:
        with pytest.raises(SourceTooLarge):
            await registry.download(url)
    finally:
        await registry.aclose()


async def test_download_at_the_size_limit_succeeds(backend: Backend) -> None:
    """A source of exactly max_download_bytes is accepted."""
    url = backend.put_source(unique("exact"), b"y" * 5000)
    registry = backend.transports(max_download_bytes=5000)
    try:
        assert await registry.download(url) == b"y" * 5000
    finally:
        await registry.aclose()


# Only these have a loopback server that can trickle bytes.
SLOW_SERVERS = ["http", "https", "ftp"]
# Only these have a server that can fail an upload on demand.
FLAKY_SERVERS = ["http", "https", "ftp", "ftps"]


@pytest.mark.parametrize("backend", SLOW_SERVERS, indirect=True)
async def test_slow_download_hits_the_total_deadline(backend: Backend) -> None:
    """A server trickling bytes hits download_timeout_s as one total deadline."""
    assert backend.slow_url is not None
    registry = backend.transports(download_timeout_s=1.5)
    started = time.monotonic()
    try:
        with pytest.raises(DownloadTimeout):
            await registry.download(backend.slow_url)
    finally:
        await registry.aclose()
    assert time.monotonic() - started < 4.0


@pytest.mark.parametrize("backend", FLAKY_SERVERS, indirect=True)
async def test_upload_retries_transient_failures(backend: Backend) -> None:
    """Two transient failures, then success: the upload succeeds on attempt 3."""
    assert backend.flaky is not None
    name = unique("flaky")
    target = backend.flaky(name, 2)
    registry = backend.transports(upload_attempts=3)
    try:
        await registry.upload(target, PAYLOAD, "image/png")
    finally:
        await registry.aclose()
    assert backend.read_back(name) == PAYLOAD


@pytest.mark.parametrize("backend", FLAKY_SERVERS, indirect=True)
async def test_upload_gives_up_after_upload_attempts(backend: Backend) -> None:
    """With fewer attempts than failures the last UploadFailed is raised."""
    assert backend.flaky is not None
    target = backend.flaky(unique("flaky"), 2)
    registry = backend.transports(upload_attempts=2)
    try:
        with pytest.raises(UploadFailed) as info:
            await registry.upload(target, PAYLOAD, "image/png")
    finally:
        await registry.aclose()
    assert info.value.retryable


async def test_permanent_refusal_is_not_retried(backend: Backend) -> None:
    """A permanent refusal raises a non-retryable error after one attempt."""
    assert backend.refused is not None, f"{backend.name} needs a refusing server"
    target, attempts = backend.refused(unique("refused"))
    before = attempts()
    registry = backend.transports(upload_attempts=4)
    try:
        with pytest.raises(ImgserveError) as info:
            await registry.upload(target, PAYLOAD, "image/png")
    finally:
        await registry.aclose()
    assert not info.value.retryable
    if before >= 0:
        assert attempts() - before == 1


async def test_download_charges_every_byte_as_it_arrives(backend: Backend) -> None:
    """Every transport reports each chunk to ``charge`` (the intake byte budget):
    the charged sizes add up to the source."""
    big = bytes(range(256)) * 4096  # 1 MiB: more than one chunk on every transport
    url = backend.put_source(unique("charged"), big)
    charged: list[int] = []
    registry = backend.transports()
    try:
        assert await registry.download(url, charged.append) == big
    finally:
        await registry.aclose()
    assert sum(charged) == len(big)
    assert all(size > 0 for size in charged)


async def test_a_charge_that_refuses_stops_the_download(backend: Backend) -> None:
    """A charge that raises (the budget is spent) ends the download with its error,
    unchanged, whatever the transport."""
    url = backend.put_source(unique("refused"), bytes(range(256)) * 4096)
    seen: list[int] = []

    def charge(size: int) -> None:
        seen.append(size)
        if sum(seen) > 100_000:
            raise IntakeBusy("budget spent")

    registry = backend.transports()
    try:
        with pytest.raises(IntakeBusy):
            await registry.download(url, charge)
    finally:
        await registry.aclose()
    assert sum(seen[:-1]) <= 100_000  # nothing was read on after the refusal

"""http(s)-specific behaviour: encodings, forms, auth, TLS, credentials, registry."""

from __future__ import annotations

import dataclasses
import gzip
import logging
import time

import pytest

from imgserve.config import TransportSettings
from imgserve.errors import (
    DstSchemeUnsupported,
    ImgserveError,
    SourceRefused,
    SourceTooLarge,
    SourceUnreachable,
    SrcSchemeUnsupported,
    TLSVerifyFailed,
    UploadRefused,
    URLInvalid,
)
from imgserve.transports import SCHEMES, Target, Transports, outcomes
from imgserve.transports.http import _Body
from tests.servers import BASIC_PASSWORD, BASIC_USER, HTTPTestServer
from tests.transports.conftest import unique

SECRET = "hunter2-Sup3rSecret"


async def test_gzip_body_is_decoded(http_server: HTTPTestServer, transports: Transports) -> None:
    """A gzip-encoded response is returned decoded."""
    name = unique("gz")
    http_server.state.files[name] = b"plain text " * 100
    assert await transports.download(http_server.url(f"/gzip/{name}")) == b"plain text " * 100


async def test_gzip_bomb_stops_at_the_limit(
    http_server: HTTPTestServer, settings: TransportSettings
) -> None:
    """64 MiB of gzip-compressed zeros hit the 1 MiB decoded limit quickly."""
    registry = Transports(dataclasses.replace(settings, max_download_bytes=1024 * 1024))
    started = time.monotonic()
    try:
        with pytest.raises(SourceTooLarge):
            await registry.download(http_server.url("/gzip-bomb"))
    finally:
        await registry.aclose()
    assert time.monotonic() - started < 3.0


@pytest.mark.parametrize("encoding", ["gzip", "deflate-zlib", "deflate-raw"])
def test_body_decoder_bounds_output(encoding: str) -> None:
    """The decoder never holds more than limit + 1 decoded bytes per step."""
    import zlib

    raw = b"\0" * 1_000_000
    if encoding == "gzip":
        data, header = gzip.compress(raw), "gzip"
    elif encoding == "deflate-zlib":
        data, header = zlib.compress(raw), "deflate"
    else:
        comp = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        data, header = comp.compress(raw) + comp.flush(), "deflate"
    assert _Body(header, 2_000_000).feed(data) is None
    body = _Body(header, 1000)
    with pytest.raises(outcomes.TooLarge):
        body.feed(data)
    assert len(body._chunks.join()) <= 1000


def test_unknown_content_encoding_is_refused() -> None:
    """An encoding we cannot bound (br, compress) is a permanent refusal, not passed raw."""
    with pytest.raises(outcomes.Refused):
        _Body("br", 100)


async def test_form_upload_sends_the_file_in_the_named_field(
    http_server: HTTPTestServer, transports: Transports
) -> None:
    """Target.form_field makes a multipart POST with Target.filename."""
    filename = unique("form") + ".png"
    target = Target(http_server.url("/form"), form_field="image", filename=filename)
    await transports.upload(target, b"PNGDATA", "image/png")
    assert http_server.state.files[filename] == b"PNGDATA"
    assert http_server.state.form_fields[filename] == "image"
    assert http_server.state.content_types[filename] == "image/png"


async def test_put_upload_sends_the_content_type(
    http_server: HTTPTestServer, transports: Transports
) -> None:
    """A PUT carries the given Content-Type."""
    name = unique("ct")
    await transports.upload(Target(http_server.url(f"/files/{name}")), b"x", "image/webp")
    assert http_server.state.content_types[name] == "image/webp"


async def test_basic_auth_from_url(http_server: HTTPTestServer, transports: Transports) -> None:
    """user:password in the URL becomes HTTP basic auth."""
    name = unique("auth")
    http_server.state.files[name] = b"private"
    url = http_server.url(f"/auth/{name}").replace("://", f"://{BASIC_USER}:{BASIC_PASSWORD}@")
    assert await transports.download(url) == b"private"
    with pytest.raises(SourceUnreachable) as info:
        await transports.download(http_server.url(f"/auth/{name}"))
    # The same (missing) credentials will be refused again: not retried.
    assert isinstance(info.value, SourceRefused) and not info.value.retryable


async def test_https_without_the_ca_is_tls_verify_failed(
    https_server: HTTPTestServer, settings: TransportSettings
) -> None:
    """Certificates are verified by default: an unknown CA is TLSVerifyFailed."""
    https_server.state.files["tls.bin"] = b"x"
    registry = Transports(dataclasses.replace(settings, ca_file=None))
    try:
        with pytest.raises(TLSVerifyFailed):
            await registry.download(https_server.url("/files/tls.bin"))
        with pytest.raises(TLSVerifyFailed):
            await registry.upload(Target(https_server.url("/files/tls.bin")), b"x", "image/png")
    finally:
        await registry.aclose()


async def test_https_hostname_is_verified(
    https_server: HTTPTestServer, transports: Transports
) -> None:
    """The certificate (for 127.0.0.1 and localhost) is accepted for localhost."""
    https_server.state.files["name.bin"] = b"by name"
    url = https_server.url("/files/name.bin", host="localhost")
    assert await transports.download(url) == b"by name"


async def test_credentials_never_appear_in_errors_or_logs(
    http_server: HTTPTestServer, transports: Transports, caplog: pytest.LogCaptureFixture
) -> None:
    """A password in the URL is absent from error details, messages and retry logs."""
    caplog.set_level(logging.DEBUG)
    errors: list[ImgserveError] = []
    for url in (
        f"http://user:{SECRET}@127.0.0.1:1/files/x",  # connection refused
        http_server.url("/files/missing").replace("://", f"://user:{SECRET}@"),
        http_server.url("/forbidden/x").replace("://", f"://user:{SECRET}@"),
    ):
        with pytest.raises(ImgserveError) as info:
            await transports.download(url)
        errors.append(info.value)
    http_server.state.fail_remaining["cred"] = 1
    flaky = http_server.url("/flaky/cred").replace("://", f"://user:{SECRET}@")
    await transports.upload(Target(flaky), b"x", "image/png")
    with pytest.raises(UploadRefused) as refused:
        await transports.upload(
            Target(http_server.url("/forbidden/c").replace("://", f"://u:{SECRET}@")),
            b"x",
            "image/png",
        )
    errors.append(refused.value)
    for error in errors:
        assert SECRET not in str(error)
        assert SECRET not in repr(error.to_dict())
    assert "retrying" in caplog.text
    assert SECRET not in caplog.text


async def test_unknown_schemes(transports: Transports) -> None:
    """Unknown schemes: SrcSchemeUnsupported, DstSchemeUnsupported, URLInvalid from for_url."""
    assert {"http", "https", "ftp", "ftps", "file", "s3"} == SCHEMES
    assert transports.supports("HTTPS") and not transports.supports("gopher")
    with pytest.raises(SrcSchemeUnsupported):
        await transports.download("gopher://example.com/x")
    with pytest.raises(DstSchemeUnsupported):
        await transports.upload(Target("gopher://example.com/x"), b"x", "image/png")
    with pytest.raises(URLInvalid):
        transports.for_url("no-scheme")


def test_registry_caches_one_instance_per_class(settings: TransportSettings) -> None:
    """http and https share one transport; ftp and ftps share another."""
    registry = Transports(settings)
    assert registry.for_url("http://a/") is registry.for_url("https://b/")
    assert registry.for_url("ftp://a/x") is registry.for_url("ftps://b/x")
    assert registry.for_url("http://a/") is not registry.for_url("ftp://a/x")


async def test_malformed_http_urls_are_url_invalid(transports: Transports) -> None:
    """A URL without a host or with a bad port is URLInvalid."""
    for url in ("http:///path", "http://host:99999/x"):
        with pytest.raises(URLInvalid):
            await transports.download(url)


@pytest.mark.parametrize("host", [".leading-dot", "a..b", "x" * 64 + ".example"])
async def test_host_names_idna_cannot_encode_are_url_invalid(
    transports: Transports, host: str
) -> None:
    """A host with an empty label or one over 63 characters is URLInvalid, as the
    resolver meets it, not a UnicodeError (601; found by schemathesis)."""
    with pytest.raises(URLInvalid, match="not a valid host name"):
        await transports.download(f"http://{host}/a.jpg")
    with pytest.raises(URLInvalid, match="not a valid host name"):
        await transports.upload(Target(f"https://{host}/a.png"), b"x", "image/png")


async def test_credentials_are_not_forwarded_to_another_origin(
    http_server: HTTPTestServer, https_server: HTTPTestServer, transports: Transports
) -> None:
    """Basic auth from the URL is dropped when a redirect changes scheme, host or port."""
    name = unique("xorigin")
    http_server.state.files[name] = b"private"
    creds = f"{BASIC_USER}:{BASIC_PASSWORD}@"
    same = http_server.url(f"/redirect?to=/auth/{name}").replace("://", f"://{creds}")
    assert await transports.download(same) == b"private"
    other = https_server.url(f"/auth/{name}")
    cross = http_server.url(f"/redirect?to={other}").replace("://", f"://{creds}", 1)
    with pytest.raises(SourceUnreachable, match="401"):
        await transports.download(cross)

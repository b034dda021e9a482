"""ftp(s)-specific behaviour: atomic rename, MKD, explicit TLS, credentials, URL forms."""

from __future__ import annotations

import dataclasses
import os

import pytest

from imgserve.config import TransportSettings
from imgserve.errors import (
    ImgserveError,
    SourceRefused,
    SourceUnreachable,
    TLSVerifyFailed,
    URLInvalid,
)
from imgserve.transports import Target, Transports
from tests.servers import FTP_PASSWORD, FTPTestServer
from tests.transports.conftest import unique


async def test_upload_goes_to_a_temp_name_then_renames(
    ftp_server: FTPTestServer, transports: Transports
) -> None:
    """STOR writes a temporary name in the same directory; RNFR/RNTO moves it into place."""
    name = unique("atomic") + ".png"
    start = len(ftp_server.state.commands)
    await transports.upload(Target(ftp_server.url(name)), b"data", "image/png")
    commands = ftp_server.state.commands[start:]
    stor = [arg for cmd, arg in commands if cmd == "STOR"]
    rnfr = [arg for cmd, arg in commands if cmd == "RNFR"]
    rnto = [arg for cmd, arg in commands if cmd == "RNTO"]
    assert len(stor) == 1 and os.path.basename(stor[0]) != name
    assert os.path.dirname(stor[0]) == str(ftp_server.home)
    assert rnfr == stor
    assert [os.path.basename(p) for p in rnto] == [name]
    assert (ftp_server.home / name).read_bytes() == b"data"
    leftovers = [p for p in os.listdir(ftp_server.home) if p.endswith(".part")]
    assert leftovers == []


async def test_upload_creates_missing_directories(
    ftp_server: FTPTestServer, transports: Transports
) -> None:
    """Missing directories on the path are created with MKD."""
    top = unique("dir")
    await transports.upload(Target(ftp_server.url(f"{top}/a/b/x.png")), b"deep", "image/png")
    assert (ftp_server.home / top / "a" / "b" / "x.png").read_bytes() == b"deep"


async def test_absolute_path_with_encoded_slash(
    ftp_server: FTPTestServer, transports: Transports
) -> None:
    """A leading %2F makes the path absolute (RFC 1738)."""
    name = unique("abs")
    (ftp_server.home / name).write_bytes(b"abs")
    assert await transports.download(ftp_server.url(f"%2F{name}")) == b"abs"


async def test_ftps_protects_the_data_channel(
    ftps_server: FTPTestServer, transports: Transports
) -> None:
    """ftps:// does AUTH TLS, then PBSZ 0 and PROT P before any transfer."""
    name = unique("tls")
    start = len(ftps_server.state.commands)
    await transports.upload(Target(ftps_server.url(name, scheme="ftps")), b"x", "image/png")
    names = [cmd for cmd, _ in ftps_server.state.commands[start:]]
    assert names.index("AUTH") < names.index("USER") < names.index("PROT") < names.index("STOR")
    assert ("PROT", "P") in ftps_server.state.commands[start:]


async def test_ftps_without_the_ca_is_tls_verify_failed(
    ftps_server: FTPTestServer, settings: TransportSettings
) -> None:
    """The FTPS server certificate is verified by default."""
    (ftps_server.home / "v.bin").write_bytes(b"v")
    registry = Transports(dataclasses.replace(settings, ca_file=None))
    try:
        with pytest.raises(TLSVerifyFailed):
            await registry.download(ftps_server.url("v.bin", scheme="ftps"))
    finally:
        await registry.aclose()


async def test_ftps_requires_tls_on_a_plain_server(
    ftp_server: FTPTestServer, transports: Transports
) -> None:
    """ftps:// against a server without AUTH TLS fails instead of falling back to plain."""
    (ftp_server.home / "plain.bin").write_bytes(b"p")
    with pytest.raises(SourceUnreachable):
        await transports.download(ftp_server.url("plain.bin", scheme="ftps"))


async def test_wrong_password_error_has_no_password(
    ftp_server: FTPTestServer, transports: Transports
) -> None:
    """A refused login (530) is a permanent refusal, reported without the password."""
    url = ftp_server.url("x.bin").replace("pa%3Ass%40word", "wrong-Secret-77")
    assert "wrong-Secret-77" in url
    with pytest.raises(ImgserveError) as info:
        await transports.download(url)
    # The same password will be refused again: not retried (it was, before).
    assert isinstance(info.value, SourceRefused) and not info.value.retryable
    assert "530" in info.value.detail
    assert "wrong-Secret-77" not in str(info.value)
    assert "wrong-Secret-77" not in repr(info.value.to_dict())
    assert FTP_PASSWORD not in str(info.value)


@pytest.mark.parametrize(
    "path",
    ["a%0D%0ADELE%20b.png", "dir/", "a/../b.png", "a/./b.png", "a%00b.png"],
)
async def test_unsafe_ftp_paths_are_url_invalid(
    ftp_server: FTPTestServer, transports: Transports, path: str
) -> None:
    """CR/LF (command injection), NUL, dot segments and missing names are URLInvalid."""
    before = len(ftp_server.state.commands)
    with pytest.raises(URLInvalid):
        await transports.upload(Target(ftp_server.url(path)), b"x", "image/png")
    assert len(ftp_server.state.commands) == before


@pytest.mark.parametrize("host", [".leading-dot", "x" * 64 + ".example"])
async def test_host_names_idna_cannot_encode_are_url_invalid(
    transports: Transports, host: str
) -> None:
    """An FTP host IDNA cannot encode is URLInvalid, not a UnicodeError (601)."""
    with pytest.raises(URLInvalid, match="not a valid host name"):
        await transports.download(f"ftp://{host}/a.jpg")

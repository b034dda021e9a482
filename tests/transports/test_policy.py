"""The outbound address policy: pure tables, then refusals against real servers."""

from __future__ import annotations

import dataclasses
import ipaddress
import socket

import pytest

from imgserve.config import NetPolicy, TransportSettings
from imgserve.errors import (
    AddressRefused,
    RedirectSchemeRefused,
    SourceUnreachable,
    TooManyRedirects,
    UploadFailed,
)
from imgserve.transports import Target, Transports
from imgserve.transports.policy import (
    check_address,
    check_host_literal,
    embedded_ipv4,
    is_allowed,
    parse_ip_literal,
    refusal_reason,
)
from tests.servers import FTPTestServer, HTTPTestServer
from tests.transports.conftest import LOOPBACK, unique

ip = ipaddress.ip_address

# --- pure: parsing host strings -------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f.0.0.1", "127.0.0.1"),
        ("0x7F000001", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("127.0.0.1.", "127.0.0.1"),
        ("0", "0.0.0.0"),
        ("169.254.43518", "169.254.169.254"),
        ("[::1]", "::1"),
        ("[::ffff:127.0.0.1]", "::ffff:127.0.0.1"),
        ("[fe80::1%25eth0]", "fe80::1"),
        ("example.com", None),
        ("localhost", None),
        ("1.2.3.4.5", None),
        ("256.0.0.1", None),
        ("08.0.0.1", None),
        ("1.2.3.4294967296", None),
        ("4294967296", None),
        ("0x1g", None),
        ("", None),
        ("[not-an-ip]", None),
    ],
)
def test_parse_ip_literal(host: str, expected: str | None) -> None:
    """Every numeric host form maps to the address inet_aton would use."""
    got = parse_ip_literal(host)
    assert (None if got is None else str(got)) == (None if expected is None else str(ip(expected)))


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("::127.0.0.1", "127.0.0.1"),
        ("2002:7f00:1::", "127.0.0.1"),
        ("64:ff9b::a9fe:a9fe", "169.254.169.254"),
        ("64:ff9b:1:7f00:0:100::", "127.0.0.1"),
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "10.0.0.1"),
        ("::1", None),
        ("::", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_embedded_ipv4(address: str, expected: str | None) -> None:
    """IPv4-mapped, compatible, 6to4, NAT64 and Teredo forms expose their IPv4 address."""
    got = embedded_ipv4(ipaddress.IPv6Address(address))
    assert (None if got is None else str(got)) == expected


# --- pure: the default policy ------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("100.64.0.1", "shared"),
        ("100.127.255.254", "shared"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", ""),
        ("192.0.2.1", ""),
        ("198.18.0.1", ""),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("fec0::1", "site-local"),
        ("ff02::1", "multicast"),
        ("2001:db8::1", ""),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "link-local"),
        ("::ffff:10.1.2.3", "private"),
        ("::127.0.0.1", "loopback"),
        ("2002:7f00:1::", "loopback"),
        ("2002:a9fe:a9fe::", "link-local"),
        ("64:ff9b::7f00:1", "loopback"),
        ("64:ff9b::a00:1", "private"),
        ("64:ff9b:1:7f00:0:100::", "loopback"),
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "private"),
    ],
)
def test_default_policy_refuses(address: str, reason: str) -> None:
    """Non-public addresses, in every IPv6 wrapping, are refused with a reason."""
    got = refusal_reason(ip(address))
    assert got is not None
    assert reason in got


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "93.184.216.34",
        "2606:4700:4700::1111",
        "2a00:1450:4001:80b::200e",
        "::ffff:8.8.8.8",
        "2002:808:808::",
        "64:ff9b::808:808",
    ],
)
def test_default_policy_allows_public_addresses(address: str) -> None:
    """Globally routable unicast addresses (also wrapped in IPv6) are allowed."""
    assert refusal_reason(ip(address)) is None
    assert is_allowed("example.com", ip(address), NetPolicy())


_NET8 = NetPolicy(allow_nets=(ipaddress.ip_network("127.0.0.0/8"),))
_NET32 = NetPolicy(allow_nets=(ipaddress.ip_network("127.0.0.2/32"),))
_V6NET = NetPolicy(allow_nets=(ipaddress.ip_network("fd00::/8"),))
_HOSTS = NetPolicy(allow_hosts=("internal.example",))


@pytest.mark.parametrize(
    ("host", "address", "net_policy", "allowed"),
    [
        ("127.0.0.5", "127.0.0.5", _NET8, True),
        ("x", "::ffff:127.0.0.1", _NET8, True),
        ("x", "10.0.0.1", _NET8, False),
        ("x", "127.0.0.2", _NET32, True),
        ("x", "127.0.0.1", _NET32, False),
        ("x", "fd00::5", _V6NET, True),
        ("x", "fe80::5", _V6NET, False),
        ("internal.example", "10.0.0.1", _HOSTS, True),
        ("Internal.Example.", "10.0.0.1", _HOSTS, True),
        ("sub.internal.example", "10.0.0.1", _HOSTS, False),
        ("other.example", "10.0.0.1", _HOSTS, False),
        ("other.example", "8.8.8.8", _HOSTS, True),
    ],
)
def test_allow_lists(host: str, address: str, net_policy: NetPolicy, allowed: bool) -> None:
    """allow_nets opens networks (also embedded forms); allow_hosts opens exact names."""
    assert is_allowed(host, ip(address), net_policy) is allowed


def test_check_address_message_names_address_and_reason() -> None:
    """The refusal says which address, for which host, and why."""
    with pytest.raises(AddressRefused) as info:
        check_address("metadata.internal", ip("169.254.169.254"), NetPolicy())
    assert "169.254.169.254" in info.value.detail
    assert "link-local" in info.value.detail
    assert "metadata.internal" in info.value.detail


@pytest.mark.parametrize("host", ["2130706433", "0x7f.1", "[::ffff:7f00:1]", "127.0.0.1."])
def test_check_host_literal_refuses_encoded_loopback(host: str) -> None:
    """Encoded loopback literals are refused without any resolution."""
    with pytest.raises(AddressRefused):
        check_host_literal(host, NetPolicy())


def test_check_host_literal_passes_names_through() -> None:
    """A host name is not a literal: it is left to the resolver check."""
    assert check_host_literal("example.com", NetPolicy()) is None


# --- against real servers: refused before any connection -------------------------------


def _resolves(host: str) -> bool:
    if parse_ip_literal(host) is not None:
        return True
    try:
        socket.getaddrinfo(host, 80)
    except OSError:
        return False
    return True


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "2130706433",
        "0177.0.0.1",
        "0x7f.0.0.1",
        "0x7f000001",
        "127.1",
        "127.0.0.1.",
        "[::ffff:127.0.0.1]",
        "localhost",
        "localhost.",
        "LocalHost",
    ],
)
async def test_http_loopback_forms_refused_before_connecting(
    http_server: HTTPTestServer, settings: TransportSettings, host: str
) -> None:
    """Literal, encoded and name-based loopback hosts never reach the server."""
    http_server.state.files["policy.bin"] = b"secret"
    expected: type[Exception] = AddressRefused
    expected_up: type[Exception] = AddressRefused
    if not _resolves(host):
        # Some resolvers do not know "localhost." at all: then it is a DNS failure.
        expected, expected_up = SourceUnreachable, UploadFailed
    registry = Transports(dataclasses.replace(settings, policy=NetPolicy()))
    before = http_server.connections
    try:
        with pytest.raises(expected):
            await registry.download(http_server.url("/files/policy.bin", host=host))
        with pytest.raises(expected_up):
            await registry.upload(
                Target(http_server.url("/files/policy-up.bin", host=host)), b"x", "image/png"
            )
    finally:
        await registry.aclose()
    assert http_server.connections == before


async def test_metadata_address_refused(settings: TransportSettings) -> None:
    """The cloud metadata address is refused by default (no connection attempt)."""
    registry = Transports(dataclasses.replace(settings, policy=NetPolicy()))
    try:
        with pytest.raises(AddressRefused):
            await registry.download("http://169.254.169.254/latest/meta-data/")
        with pytest.raises(AddressRefused):
            await registry.download("http://[::ffff:a9fe:a9fe]/latest/meta-data/")
    finally:
        await registry.aclose()


@pytest.mark.parametrize("host", ["127.0.0.1", "2130706433", "localhost"])
async def test_ftp_loopback_refused_before_connecting(
    ftp_server: FTPTestServer, settings: TransportSettings, host: str
) -> None:
    """FTP checks the address before dialling: the server sees no login."""
    (ftp_server.home / "policy.bin").write_bytes(b"secret")
    registry = Transports(dataclasses.replace(settings, policy=NetPolicy()))
    before = len(ftp_server.state.commands)
    url = ftp_server.url("policy.bin").replace("@127.0.0.1:", f"@{host}:")
    try:
        with pytest.raises(AddressRefused):
            await registry.download(url)
    finally:
        await registry.aclose()
    assert len(ftp_server.state.commands) == before


async def test_redirect_to_loopback_is_refused(
    http_server: HTTPTestServer, settings: TransportSettings
) -> None:
    """Each redirect hop is re-checked: an allowed host redirecting to 127.0.0.1 is refused."""
    http_server.state.files["hop.bin"] = b"data"
    only_localhost = NetPolicy(allow_hosts=("localhost",))
    registry = Transports(dataclasses.replace(settings, policy=only_localhost))
    start = http_server.url("/files/hop.bin", host="localhost")
    assert await registry.download(start) == b"data"  # the allowed name works
    before = http_server.connections
    redirect = http_server.url(
        "/redirect?to=" + http_server.url("/files/hop.bin"), host="localhost"
    )
    try:
        with pytest.raises(AddressRefused):
            await registry.download(redirect)
    finally:
        await registry.aclose()
    # One connection for the redirect, none for the refused hop.
    assert http_server.connections - before <= 1


async def test_redirect_to_file_url_is_refused(
    http_server: HTTPTestServer, transports: Transports
) -> None:
    """A redirect to file:// (or any non-http scheme) is RedirectSchemeRefused."""
    with pytest.raises(RedirectSchemeRefused):
        await transports.download(http_server.url("/redirect?to=file:///etc/passwd"))


async def test_redirects_within_the_limit_are_followed(
    http_server: HTTPTestServer, transports: Transports, settings: TransportSettings
) -> None:
    """max_redirects hops are followed; one more is TooManyRedirects."""
    name = unique("chain")
    http_server.state.files[name] = b"end"
    hops = settings.max_redirects - 1  # /chain/n makes n + 1 redirects
    assert await transports.download(http_server.url(f"/chain/{hops}/{name}")) == b"end"
    with pytest.raises(TooManyRedirects):
        await transports.download(http_server.url(f"/chain/{hops + 1}/{name}"))


async def test_ftp_pasv_address_is_ignored_for_the_control_peer(
    ftp_masquerade_server: FTPTestServer, settings: TransportSettings
) -> None:
    """A PASV reply announcing 169.254.169.254 is not dialled: data goes to the checked peer."""
    (ftp_masquerade_server.home / "masq.bin").write_bytes(b"via peer")
    registry = Transports(dataclasses.replace(settings, download_timeout_s=3.0))
    try:
        assert await registry.download(ftp_masquerade_server.url("masq.bin")) == b"via peer"
    finally:
        await registry.aclose()
    assert ("PASV", "") in ftp_masquerade_server.state.commands


async def test_refused_upload_is_not_retried(
    http_server: HTTPTestServer, settings: TransportSettings
) -> None:
    """AddressRefused is permanent: upload() raises it without retrying."""
    registry = Transports(dataclasses.replace(settings, policy=NetPolicy(), upload_attempts=5))
    before = http_server.connections
    try:
        with pytest.raises(AddressRefused) as info:
            await registry.upload(Target(http_server.url("/files/x")), b"x", "image/png")
    finally:
        await registry.aclose()
    assert not info.value.retryable
    assert http_server.connections == before


def test_loopback_fixture_policy_allows_loopback() -> None:
    """The tests' LOOPBACK policy opens 127.0.0.0/8 and nothing else."""
    assert is_allowed("x", ip("127.0.0.1"), LOOPBACK)
    assert not is_allowed("x", ip("10.0.0.1"), LOOPBACK)

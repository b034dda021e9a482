"""The outbound address policy: which addresses a transport may connect to.

Pure logic, no sockets and no asyncio: the transports resolve a host name
once, pass every candidate address through :func:`check_address` and connect
only to an address that passed, so the address checked is the address used.

By default only globally routable unicast addresses are allowed. Loopback,
private (RFC 1918), link-local (including the 169.254.169.254 cloud metadata
service), shared address space (100.64.0.0/10), multicast, reserved,
unspecified, documentation/benchmark ranges, IPv6 unique-local and site-local
addresses are refused, and so is any IPv6 address that embeds a refused IPv4
address (IPv4-mapped ``::ffff:a.b.c.d``, IPv4-compatible ``::a.b.c.d``, 6to4
``2002::/16``, NAT64 ``64:ff9b::/96`` and ``64:ff9b:1::/48``, Teredo).

``NetPolicy.allow_nets`` opens networks (an address inside one is allowed,
also when it is embedded in an IPv6 form) and ``NetPolicy.allow_hosts`` opens
host names (exact, case-insensitive, trailing dot ignored): every address such
a name resolves to is allowed.

Host strings are also parsed the lenient way ``inet_aton`` does, so numeric
forms such as ``2130706433``, ``0177.0.0.1``, ``0x7f.1`` and ``127.1`` are
recognised as the loopback address they are and cannot slip through.
"""

from __future__ import annotations

import ipaddress
import re
from typing import TypeAlias

from imgserve.config import NetPolicy
from imgserve.errors import AddressRefused, URLInvalid

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

_SHARED = ipaddress.IPv4Network("100.64.0.0/10")
_SITE_LOCAL = ipaddress.IPv6Network("fec0::/10")
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")
_IPV4_COMPAT = ipaddress.IPv6Network("::/96")
_V4_PART = re.compile(r"0[xX][0-9a-fA-F]*|0[0-7]*|[1-9][0-9]*")


def normalise_host(host: str) -> str:
    """Lower-case a host, drop IPv6 brackets and one trailing dot."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.endswith(".") and not host.endswith(".."):
        host = host[:-1]
    return host


def _parse_v4_part(part: str) -> int | None:
    if not _V4_PART.fullmatch(part):
        return None
    if part[:2] in ("0x", "0X"):
        return int(part[2:] or "0", 16)
    if len(part) > 1 and part[0] == "0":
        return int(part, 8)
    return int(part)


def parse_legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """Parse an IPv4 address the way ``inet_aton`` does (1-4 parts, octal, hex).

    Returns None when ``host`` is not such a form (a host name, say).
    """
    parts = host.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values = [_parse_v4_part(p) for p in parts]
    if any(v is None for v in values):
        return None
    nums = [v for v in values if v is not None]
    # The last part fills every remaining byte: a.b.c.d, a.b.cd, a.bcd, abcd.
    last_bytes = 5 - len(nums)
    if any(n > 255 for n in nums[:-1]) or nums[-1] >= 256**last_bytes:
        return None
    value = 0
    for n in nums[:-1]:
        value = value * 256 + n
    value = value * 256**last_bytes + nums[-1]
    return ipaddress.IPv4Address(value)


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address a host string denotes by itself, or None for a host name.

    Accepts bracketed IPv6 (with or without a zone id) and every numeric IPv4
    form; a trailing dot is ignored.
    """
    host = normalise_host(host)
    if not host:
        return None
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            return None
    return parse_legacy_ipv4(host)


def embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 transition form carries, if any."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr in _IPV4_COMPAT and int(addr) > 1:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr in _NAT64[0]:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr in _NAT64[1]:
        # RFC 6052 /48 prefix: the IPv4 bits sit in bits 48-63 and 72-87.
        raw = int(addr).to_bytes(16, "big")
        return ipaddress.IPv4Address(raw[6:8] + raw[9:11])
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr.teredo is not None:
        return addr.teredo[1]
    return None


def _classify(addr: IPAddress) -> str | None:
    """Why ``addr`` is refused by default, or None when it is public."""
    if addr.is_unspecified:
        return "unspecified"
    if addr.is_loopback:
        return "loopback"
    if addr.is_link_local:
        return "link-local"
    if addr.is_multicast:
        return "multicast"
    if isinstance(addr, ipaddress.IPv4Address) and addr in _SHARED:
        return "shared address space"
    if isinstance(addr, ipaddress.IPv6Address) and addr in _SITE_LOCAL:
        return "site-local"
    if addr.is_reserved:
        return "reserved"
    if addr.is_private:
        return "private"
    if not addr.is_global:
        return "not globally routable"
    return None


def refusal_reason(addr: IPAddress) -> str | None:
    """Why the default policy refuses ``addr`` (e.g. "loopback"), or None."""
    if isinstance(addr, ipaddress.IPv6Address):
        inner = embedded_ipv4(addr)
        if inner is not None:
            reason = _classify(inner)
            if reason is not None:
                return f"{reason} (embedded IPv4 {inner})"
            # 6to4/Teredo/NAT64 wrapping a public address: judge the wrapper's
            # prefix on its own merits, the embedded part is fine.
            if addr.ipv4_mapped is not None or addr in _IPV4_COMPAT:
                return None
            if addr in _SIX_TO_FOUR or addr in _NAT64[0] or addr in _NAT64[1]:
                return None
            if addr.teredo is not None:
                return None
    return _classify(addr)


def _in_allowed_nets(addr: IPAddress, policy: NetPolicy) -> bool:
    candidates: list[IPAddress] = [addr]
    if isinstance(addr, ipaddress.IPv6Address):
        inner = embedded_ipv4(addr)
        if inner is not None:
            candidates.append(inner)
    return any(
        a in net for a in candidates for net in policy.allow_nets if a.version == net.version
    )


def host_allowed(host: str, policy: NetPolicy) -> bool:
    """Whether ``host`` is in the policy's allow_hosts list."""
    name = normalise_host(host)
    return any(name == normalise_host(h) for h in policy.allow_hosts)


def is_allowed(host: str, addr: IPAddress, policy: NetPolicy) -> bool:
    """Whether connecting to ``addr`` (what ``host`` resolved to) is allowed."""
    if host_allowed(host, policy) or _in_allowed_nets(addr, policy):
        return True
    return refusal_reason(addr) is None


def check_address(host: str, addr: IPAddress, policy: NetPolicy) -> None:
    """Raise AddressRefused unless connecting to ``addr`` for ``host`` is allowed."""
    if is_allowed(host, addr, policy):
        return
    reason = refusal_reason(addr) or "refused"
    shown = normalise_host(host)
    where = f"{addr}" if shown == str(addr) else f"{addr} (for host {shown})"
    raise AddressRefused(f"address {where} is {reason}; see --allow-net / --allow-host")


def check_host_literal(host: str, policy: NetPolicy) -> IPAddress | None:
    """Check a host that is itself an address, in any encoding.

    Returns the address when ``host`` is a literal (after checking it) and
    None when it is a name that still has to be resolved and checked.
    """
    addr = parse_ip_literal(host)
    if addr is not None:
        check_address(host, addr, policy)
    return addr


def invalid_host_name(host: str, exc: UnicodeError) -> URLInvalid:
    """The error for a host name the resolver cannot even encode (IDNA: an empty
    label, one over 63 characters): a malformed URL, the same on every attempt."""
    shown = host if len(host) <= 80 else host[:77] + "..."
    return URLInvalid(f"host {shown!r} is not a valid host name ({exc})")

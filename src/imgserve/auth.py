"""API keys: who may call imgserve, and where each caller may read and write.

Pure: no aiohttp, no sockets. api.py asks this module three questions about a
request, all before any download or upload: which key sent it
(:meth:`Keyring.verify`, constant-time), may that key read this source or write
this destination (:meth:`Key.may_read`, :meth:`Key.may_write`), and may it start
another job now (:class:`RateLimiter`). docs/security.md explains the choices.

Keys are random tokens ``isk_`` + 43 URL-safe characters (256 bits) made by
:func:`new_secret`. Only their SHA-256 is stored: a token that random cannot be
guessed from its hash, so a slow password hash (argon2, scrypt: 50-100 ms by
design) would cost every request that much for nothing. A key's secret may
instead be read from an environment variable named in the keys file.

Scopes match URLs component by component, never as raw strings: the scheme and
host must be equal (so ``https://uploads.example.com.evil.net/`` is not under
``https://uploads.example.com/``), the port equal once defaults are filled in,
userinfo, query and fragment play no part, and the path is compared segment by
segment after one percent-decoding, the way the transports read it. A path
with a dot segment (``.``, ``..``, encoded or not), an encoded slash or
backslash, a backslash or a NUL is outside every scope: what it names depends on
who reads it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import math
import os
import re
import secrets
import stat
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from imgserve import errors
from imgserve.config import ImagingLimits, check_webhook_secret

KEY_PREFIX = "isk_"
"""Every key ``imgserve keys add`` makes starts with this (secret scanners can look for it)."""
KEY_BYTES = 32
MIN_ENV_SECRET_CHARS = 32
"""A secret read from the environment must be at least this long: it was not
necessarily made by :func:`new_secret`, and it is only stored as a fast hash."""
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""Key names: they appear in logs, job views and queue index keys."""
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SCHEMES = frozenset({"http", "https", "ftp", "ftps", "file", "s3"})
DEFAULT_PORTS: dict[str, int] = {"http": 80, "https": 443, "ftp": 21, "ftps": 21}
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_ENCODED_SEPARATOR = re.compile(r"%(2f|5c)", re.IGNORECASE)


def new_secret() -> str:
    """A new key: ``isk_`` + 256 random bits, URL-safe base64."""
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def hash_secret(secret: str) -> str:
    """What the keys file stores for a key: the hex SHA-256 of its secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


# --- URLs and scopes ------------------------------------------------------------------


class OutOfScope(ValueError):
    """Why a URL is outside a scope, in words (never holding a credential)."""


@dataclass(frozen=True)
class Place:
    """Where a URL points, as scopes compare it."""

    scheme: str
    host: str
    """Lower-case without a trailing dot; s3's bucket as written; "" for file://."""
    port: int | None
    """The port, the scheme's default filled in (None for file:// and s3://)."""
    segments: tuple[str, ...]
    """The path split on "/", each segment percent-decoded once ("" first: absolute)."""


def _path_segments(path: str) -> tuple[str, ...]:
    if _ENCODED_SEPARATOR.search(path):
        raise OutOfScope("an encoded / or \\ in the path")
    try:
        decoded = unquote(path or "/", errors="strict")
    except UnicodeDecodeError:
        raise OutOfScope("a path that is not UTF-8 once decoded") from None
    if "\x00" in decoded or "\\" in decoded:
        raise OutOfScope("a NUL or a backslash in the path")
    if not decoded.startswith("/"):
        raise OutOfScope("a path that is not absolute")
    segments = tuple(decoded.split("/"))
    if any(segment in (".", "..") for segment in segments):
        raise OutOfScope("a . or .. segment in the path")
    return segments


def place_of(url: str, *, pattern: bool = False) -> Place:
    """Where ``url`` points; OutOfScope when it cannot be placed safely."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise OutOfScope("a malformed URL") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise OutOfScope(f"the scheme {scheme!r}")
    if pattern and (parts.username is not None or "@" in parts.netloc):
        raise OutOfScope("userinfo in a pattern (credentials are the caller's)")
    if pattern and (parts.query or parts.fragment or url.rstrip().endswith(("?", "#"))):
        raise OutOfScope("a query or fragment in a pattern (only paths are matched)")
    if scheme == "file":
        if parts.netloc.lower() not in ("", "localhost"):
            raise OutOfScope("a file:// URL with a host")
        host, port = "", None
    elif scheme == "s3":
        # The s3 transport takes the bucket as written, up to the first "/".
        host, port = parts.netloc, None
        if not host or "@" in host:
            raise OutOfScope("an s3:// URL without a plain bucket")
        if "%" in parts.path:  # the s3 transport writes "%75" as three characters
            raise OutOfScope("a % in an s3:// key (the s3 transport takes keys literally)")
    else:
        host = (parts.hostname or "").rstrip(".")
        if not host:
            raise OutOfScope("a URL without a host")
        port = port if port is not None else DEFAULT_PORTS[scheme]
    if pattern and "*" in host:
        raise OutOfScope("a * in the host (wildcards match paths only)")
    return Place(scheme, host, port, _path_segments(parts.path))


@dataclass(frozen=True)
class Pattern:
    """One entry of a key's ``sources`` or ``destinations``.

    Without ``*`` it is a prefix, segment by segment: ``https://h/thumbs`` and
    ``https://h/thumbs/`` both allow ``/thumbs`` and everything below it, never
    ``/thumbs-private``. With ``*`` it is a glob over the whole path: ``*`` stands
    for any characters within one segment, a segment ``**`` for any number of
    segments (``s3://media/u/*`` allows ``u/a.jpg``, not ``u/a/b.jpg``;
    ``s3://media/u/**`` allows both)."""

    text: str
    place: Place
    glob: re.Pattern[str] | None = field(compare=False)

    @classmethod
    def parse(cls, text: str) -> Pattern:
        """The pattern ``text`` names; ValueError saying what is wrong."""
        try:
            place = place_of(text.strip(), pattern=True)
        except OutOfScope as exc:
            raise ValueError(f"{text!r}: {exc}") from None
        segments = place.segments
        if any("*" in s for s in segments):
            return cls(text, place, _glob(segments))
        if len(segments) > 1 and segments[-1] == "":
            place = dataclasses.replace(place, segments=segments[:-1])
        return cls(text, place, None)

    def matches(self, place: Place) -> bool:
        mine = self.place
        if (mine.scheme, mine.host, mine.port) != (place.scheme, place.host, place.port):
            return False
        if self.glob is not None:
            return self.glob.fullmatch("/".join(place.segments)) is not None
        return place.segments[: len(mine.segments)] == mine.segments


def _glob(segments: tuple[str, ...]) -> re.Pattern[str]:
    parts: list[str] = []
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == "**":
            parts.append(".*" if last else "(?:[^/]*/)*")
            continue
        stars = re.sub(r"\*+", "*", segment)  # "**" inside a segment is one "*"
        parts.append("[^/]*".join(re.escape(piece) for piece in stars.split("*")))
        if not last:
            parts.append("/")
    return re.compile("".join(parts), re.DOTALL)


def check_url(
    patterns: Sequence[Pattern] | None,
    url: str,
    *,
    resolve: Callable[[str], str] | None = None,
) -> None:
    """OutOfScope unless ``url`` is inside one of ``patterns`` (None: no scope, so
    anything the server allows). For file:// URLs ``resolve`` (realpath) gives
    the path the transport will really use; it must be inside the scope too, so a
    symlink inside the scope cannot lead a key elsewhere under the file roots."""
    if patterns is None:
        return
    place = place_of(url)
    if not any(p.matches(place) for p in patterns):
        raise OutOfScope("not inside any of the key's patterns")
    if place.scheme == "file" and resolve is not None:
        real = resolve("/".join(place.segments))
        real_place = dataclasses.replace(place, segments=tuple(real.split("/")))
        if not any(p.matches(real_place) for p in patterns):
            raise OutOfScope("a link inside the scope leads outside it")


# --- keys -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """One caller: its name, its secret's hash and what it may do."""

    name: str
    digest: bytes = field(repr=False)
    """SHA-256 of the secret."""
    sources: tuple[Pattern, ...] | None = None
    """Where it may read sources from; None: anywhere the server allows (an
    uploaded source reads nothing, so it is always allowed)."""
    destinations: tuple[Pattern, ...] | None = None
    """Where it may write outputs (and placeholders); None: anywhere the server allows."""
    max_pixels: int | None = None
    max_download_bytes: int | None = None
    max_outputs: int | None = None
    rate: float | None = None
    """Jobs per second (per node); None: no limit."""
    burst: int = 1
    """Jobs it may start at once after a quiet spell."""
    webhook_secret: str | None = field(default=None, repr=False)
    """Signs its jobs' webhook events instead of the server's secrets."""
    admin: bool = False
    """May read, list and cancel every key's jobs; other keys see only their own."""

    def may_read(self, url: str, resolve: Callable[[str], str] | None = None) -> None:
        """SourceOutOfScope (142) unless the key may read ``url``."""
        try:
            check_url(self.sources, url, resolve=resolve)
        except OutOfScope as exc:
            raise errors.SourceOutOfScope(f"source: {url}: {exc}") from None

    def may_write(
        self, url: str, resolve: Callable[[str], str] | None = None, *, where: str = "destination"
    ) -> None:
        """DestinationOutOfScope (143) unless the key may write ``url``."""
        try:
            check_url(self.destinations, url, resolve=resolve)
        except OutOfScope as exc:
            raise errors.DestinationOutOfScope(f"{where}: {url}: {exc}") from None

    def sees(self, owner: str | None) -> bool:
        """Whether this key may see a job that ``owner`` (a key name) submitted."""
        return self.admin or owner == self.name

    def imaging(self, limits: ImagingLimits) -> ImagingLimits:
        """The server's limits, tightened by this key's ``max_pixels``: the largest
        image its jobs may read, and the largest each of their outputs may make (or
        an SVG be drawn at)."""
        if self.max_pixels is None:
            return limits
        return dataclasses.replace(
            limits,
            max_pixels=min(limits.max_pixels, self.max_pixels),
            max_result_pixels=min(limits.max_result_pixels, self.max_pixels),
        )

    def download_limit(self, server_bytes: int) -> int:
        return min(server_bytes, self.max_download_bytes or server_bytes)

    def outputs_limit(self, server_outputs: int) -> int:
        return min(server_outputs, self.max_outputs or server_outputs)

    def describe(self) -> dict[str, Any]:
        """Its name and scopes (``imgserve keys list``): never the hash or a secret."""
        shown: dict[str, Any] = {"name": self.name, "admin": self.admin}
        for what in ("sources", "destinations"):
            patterns = getattr(self, what)
            shown[what] = None if patterns is None else [p.text for p in patterns]
        for limit in ("max_pixels", "max_download_bytes", "max_outputs", "rate"):
            shown[limit] = getattr(self, limit)
        shown["burst"] = self.burst if self.rate is not None else None
        shown["webhook_secret"] = self.webhook_secret is not None
        return shown


class Keyring:
    """The keys the daemon accepts."""

    def __init__(self, keys: Sequence[Key], source: str = "") -> None:
        self.keys = tuple(keys)
        self.source = source
        """Where they came from (the keys file), for messages."""
        self._by_name = {key.name: key for key in self.keys}

    def __len__(self) -> int:
        return len(self.keys)

    def verify(self, token: str) -> Key:
        """The key whose secret is ``token``; APIKeyUnknown (141) when none is.

        Every key's hash is compared, each with ``hmac.compare_digest``, and the
        loop never stops early: the time taken says nothing about which key, or
        how much of a hash, was close."""
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found: Key | None = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.digest):
                found = key
        if found is None:
            raise errors.APIKeyUnknown("Authorization: the key is not one this server knows")
        return found

    def get(self, name: str) -> Key | None:
        return self._by_name.get(name)


def bearer_token(header: str | None) -> str:
    """The key an ``Authorization: Bearer <key>`` header carries; APIKeyMissing (140)
    when there is none (no header, another scheme, nothing after it)."""
    if header is None:
        raise errors.APIKeyMissing("send Authorization: Bearer <key>")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise errors.APIKeyMissing("Authorization: expected the Bearer scheme")
    token = token.strip()
    if not token:
        raise errors.APIKeyMissing("Authorization: Bearer without a key")
    return token


def webhook_signer(
    keys: Keyring | None, server_secrets: Sequence[str], *, hand_off: bool = True
) -> Callable[[str | None], Sequence[str] | None]:
    """What signs the webhook events of a job submitted with a key (by name): its
    own ``webhook_secret``, else the server's secrets. None: this node cannot tell
    (it has no keys file) and leaves the event to a node that can. ``hand_off``
    False (an API node: keys are configured where jobs are accepted, so one with
    none has turned them off) signs them with the server's secrets instead: they
    would otherwise wait forever."""

    def secrets_for(key_name: str | None) -> Sequence[str] | None:
        if key_name is None:
            return server_secrets
        if keys is None:
            return None if hand_off else server_secrets
        key = keys.get(key_name)
        if key is None or key.webhook_secret is None:
            return server_secrets  # a key removed since: its jobs' events still go
        return (key.webhook_secret,)

    return secrets_for


def exposure_warning(host: str, keys_configured: bool) -> str | None:
    """What ``start`` and ``serve`` warn about when no keys are configured and the
    daemon listens beyond loopback (None: nothing to warn about)."""
    if keys_configured or _loopback(host):
        return None
    shown = host or "every interface"
    return (
        f"no API keys are configured and imgserve listens on {shown}: anyone who can "
        "reach the port can make it read from and write to every network it may reach "
        "and its file roots. Add a key (imgserve keys add NAME) or listen on "
        "127.0.0.1; see docs/security.md"
    )


def _loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


# --- the keys file --------------------------------------------------------------------


class KeysFileError(ValueError):
    """A keys file that cannot be used; the message names the file and the entry."""


_FIELDS = frozenset(
    {
        "name",
        "secret_sha256",
        "secret_env",
        "sources",
        "destinations",
        "max_pixels",
        "max_download_bytes",
        "max_outputs",
        "rate",
        "burst",
        "webhook_secret",
        "webhook_secret_env",
        "admin",
    }
)


def load_keys(path: Path, environ: Mapping[str, str] | None = None) -> Keyring:
    """Read the keys file at ``path`` (TOML: one ``[[keys]]`` table per key).
    Raises KeysFileError naming the file, and the line or the entry at fault."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeysFileError(f"{path}: cannot read the keys file: {exc}") from None
    return parse_keys(text, str(path), os.environ if environ is None else environ)


def parse_keys(text: str, where: str, environ: Mapping[str, str] | None) -> Keyring:
    """The keys in ``text`` (a keys file's content). ``environ`` None checks the
    file without reading secrets from the environment (``imgserve keys add``)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise KeysFileError(f"{where}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {"keys"})
    if unknown:
        raise KeysFileError(f"{where}: unknown table or key {unknown[0]!r}; keys go in [[keys]]")
    entries = data.get("keys", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise KeysFileError(f"{where}: keys must be [[keys]] tables")
    if not entries:
        raise KeysFileError(f"{where}: holds no key (add one with `imgserve keys add NAME`)")
    keys: list[Key] = []
    for index, entry in enumerate(entries):
        label = f"{where}: keys[{index}]"
        if isinstance(entry.get("name"), str):
            label += f" ({entry['name']!r})"
        try:
            key = _key(entry, environ)
        except ValueError as exc:
            raise KeysFileError(f"{label}: {exc}") from None
        for other in keys:
            if other.name == key.name:
                raise KeysFileError(f"{label}: the name is used twice")
            if environ is not None and hmac.compare_digest(other.digest, key.digest):
                raise KeysFileError(f"{label}: the same secret as key {other.name!r}")
        keys.append(key)
    return Keyring(keys, where)


def _key(entry: dict[str, Any], environ: Mapping[str, str] | None) -> Key:
    unknown = sorted(set(entry) - _FIELDS)
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}")
    name = entry.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError("name: 1 to 64 letters, digits, '.', '_' or '-', starting alphanumeric")
    rate = _number(entry, "rate")
    burst = _count(entry, "burst")
    if burst is not None and rate is None:
        raise ValueError("burst: needs a rate")
    return Key(
        name=name,
        digest=_digest(entry, environ),
        sources=_patterns(entry, "sources"),
        destinations=_patterns(entry, "destinations"),
        max_pixels=_count(entry, "max_pixels"),
        max_download_bytes=_count(entry, "max_download_bytes"),
        max_outputs=_count(entry, "max_outputs"),
        rate=rate,
        burst=burst or max(1, math.ceil(rate or 1)),
        webhook_secret=_webhook_secret(entry, environ),
        admin=_flag(entry, "admin"),
    )


def _one_of(entry: dict[str, Any], inline: str, env: str) -> tuple[str, str] | None:
    given = [f for f in (inline, env) if f in entry]
    if len(given) > 1:
        raise ValueError(f"give {inline} or {env}, not both")
    if not given:
        return None
    value = entry[given[0]]
    if not isinstance(value, str):
        raise ValueError(f"{given[0]}: expected a string")
    return given[0], value


def _from_env(field_name: str, var: str, environ: Mapping[str, str]) -> str:
    if not ENV_NAME.fullmatch(var):
        raise ValueError(f"{field_name}: {var!r} is not an environment variable name")
    value = environ.get(var, "")
    if not value:
        raise ValueError(f"{field_name}: the environment variable {var} is not set")
    return value


def _digest(entry: dict[str, Any], environ: Mapping[str, str] | None) -> bytes:
    given = _one_of(entry, "secret_sha256", "secret_env")
    if given is None:
        raise ValueError("needs secret_sha256 (from `imgserve keys add`) or secret_env")
    field_name, value = given
    if field_name == "secret_sha256":
        if not _SHA256_HEX.fullmatch(value):
            raise ValueError("secret_sha256: expected 64 lower-case hex digits")
        return bytes.fromhex(value)
    if environ is None:  # checking the file only
        if not ENV_NAME.fullmatch(value):
            raise ValueError(f"secret_env: {value!r} is not an environment variable name")
        return hashlib.sha256(value.encode()).digest()  # a stand-in, never compared
    secret = _from_env("secret_env", value, environ)
    if len(secret) < MIN_ENV_SECRET_CHARS:
        raise ValueError(
            f"secret_env: the secret in {value} is shorter than {MIN_ENV_SECRET_CHARS} "
            "characters (make one with `imgserve keys add`)"
        )
    return hashlib.sha256(secret.encode()).digest()


def _webhook_secret(entry: dict[str, Any], environ: Mapping[str, str] | None) -> str | None:
    given = _one_of(entry, "webhook_secret", "webhook_secret_env")
    if given is None:
        return None
    field_name, value = given
    if field_name == "webhook_secret_env":
        if environ is None:  # checking the file only: a stand-in, never used to sign
            _from_env(field_name, value, {value: "-"} if ENV_NAME.fullmatch(value) else {})
            return _STAND_IN_WEBHOOK_SECRET
        value = _from_env(field_name, value, environ)
    try:
        check_webhook_secret(value)
    except ValueError as exc:
        raise ValueError(f"{field_name}: {exc}") from None
    return value


_STAND_IN_WEBHOOK_SECRET = "whsec_" + "c3RhbmQtaW4="


def _patterns(entry: dict[str, Any], field_name: str) -> tuple[Pattern, ...] | None:
    if field_name not in entry:
        return None
    value = entry[field_name]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{field_name}: expected a list of URL patterns")
    patterns = []
    for index, text in enumerate(value):
        try:
            patterns.append(Pattern.parse(text))
        except ValueError as exc:
            raise ValueError(f"{field_name}[{index}]: {exc}") from None
    return tuple(patterns)


def _count(entry: dict[str, Any], field_name: str) -> int | None:
    value = entry.get(field_name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field_name}: expected a positive integer, got {value!r}")
    return value


def _number(entry: dict[str, Any], field_name: str) -> float | None:
    value = entry.get(field_name)
    if value is None:
        return None
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{field_name}: expected a positive number, got {value!r}")
    return float(value)


def _flag(entry: dict[str, Any], field_name: str) -> bool:
    value = entry.get(field_name, False)
    if not isinstance(value, bool):
        raise ValueError(f"{field_name}: expected true or false, got {value!r}")
    return value


def loose_permissions(path: Path) -> bool:
    """Whether users other than the owner may read or write the keys file."""
    try:
        return bool(path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))
    except OSError:
        return False


# --- rate limits ----------------------------------------------------------------------


class RateLimiter:
    """A token bucket per key, in this process only: with several API nodes, each
    node allows a key its ``rate`` (docs/security.md)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        """Key name -> (tokens left, when they were counted)."""

    def take(self, key: Key) -> float:
        """Take one job's token from ``key``'s bucket: 0.0 when it had one, else the
        seconds until it will (nothing is taken then)."""
        if key.rate is None:
            return 0.0
        now = self._clock()
        tokens, at = self._buckets.get(key.name, (float(key.burst), now))
        tokens = min(float(key.burst), tokens + max(0.0, now - at) * key.rate)
        if tokens >= 1.0:
            self._buckets[key.name] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key.name] = (tokens, now)
        return (1.0 - tokens) / key.rate

    def check(self, key: Key) -> None:
        """APIKeyRateLimited (144) unless ``key`` may start a job now."""
        wait_s = self.take(key)
        if wait_s > 0:
            raise errors.APIKeyRateLimited(
                f"key {key.name!r}: more than {key.rate:g} jobs/s (burst {key.burst})",
                retry_after_s=wait_s,
            )

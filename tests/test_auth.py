"""auth.py: scope matching (tables and properties), the keys file, verification,
the rate limiter and the webhook signer, all without a server."""

from __future__ import annotations

import hashlib
import re
import string
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imgserve import auth, errors
from imgserve.config import ImagingLimits

SECRET = "isk_" + "a" * 43
WHSEC = "whsec_" + "c2VjcmV0LWtleS1mb3ItdGVzdHM="


def allowed(patterns: list[str], url: str) -> bool:
    parsed = [auth.Pattern.parse(p) for p in patterns]
    try:
        auth.check_url(parsed, url)
    except auth.OutOfScope:
        return False
    return True


@pytest.mark.parametrize(
    ("pattern", "url", "expected"),
    [
        ("https://uploads.example.com/", "https://uploads.example.com/a/b.jpg", True),
        ("https://uploads.example.com/", "https://UPLOADS.example.com./a.jpg", True),
        ("https://uploads.example.com/", "https://uploads.example.com:443/a.jpg", True),
        ("https://uploads.example.com/", "https://uploads.example.com:8443/a.jpg", False),
        ("https://uploads.example.com/", "http://uploads.example.com/a.jpg", False),
        ("https://uploads.example.com/", "https://uploads.example.com.evil.net/a.jpg", False),
        ("https://uploads.example.com", "https://uploads.example.com.evil.net/a.jpg", False),
        ("https://uploads.example.com/", "https://uploads.example.com@evil.net/a.jpg", False),
        ("https://uploads.example.com/", "https://u:p@uploads.example.com/a.jpg", True),
        ("https://uploads.example.com/", "https://evil.net/?https://uploads.example.com/", False),
        ("https://h/thumbs", "https://h/thumbs/a.jpg", True),
        ("https://h/thumbs", "https://h/thumbs", True),
        ("https://h/thumbs", "https://h/thumbs-private/a.jpg", False),
        ("https://h/thumbs/", "https://h/thumbs/a.jpg?sig=1", True),
        ("https://h/thumbs/", "https://h/thumbs/../admin/a.jpg", False),
        ("https://h/thumbs/", "https://h/thumbs/%2e%2e/admin/a.jpg", False),
        ("https://h/thumbs/", "https://h/thumbs/..%2fadmin/a.jpg", False),
        ("https://h/thumbs/", "https://h/thumbs/%2E%2E%2Fadmin", False),
        ("https://h/thumbs/", "https://h/thumbs/.%2e/x", False),
        ("https://h/thumbs/", "https://h/thumbs/a%5c..%5cx", False),
        ("https://h/thumbs/", "https://h/thumbs/a%20b.jpg", True),
        ("https://h/thumbs/", "https://h/thumb%73/a.jpg", True),
        ("https://h/thumbs/", "https://h/%74humbs-x/a.jpg", False),
        ("https://h/thumbs/", "https://h/thumbs/%ff.jpg", False),
        ("https://h/thumbs/", "https://h:99999/thumbs/a.jpg", False),
        ("file:///srv/thumbs/", "file:///srv/thumbs/u/a.jpg", True),
        ("file:///srv/thumbs/", "file://localhost/srv/thumbs/a.jpg", True),
        ("file:///srv/thumbs/", "file:///srv/thumbs/../etc/passwd", False),
        ("file:///srv/thumbs/", "file:///srv/thumbs/%2e%2e/x", False),
        ("file:///srv/thumbs/", "file:///srv/thumbs2/a.jpg", False),
        ("file:///srv/thumbs/", "file:////srv/thumbs/a.jpg", False),
        ("file:///srv/thumbs/", "file://evil/srv/thumbs/a.jpg", False),
        ("file:///srv/thumbs/", "file:///srv/thumbs/a%00.jpg", False),
        ("s3://media/u/*", "s3://media/u/a.jpg", True),
        # the s3 transport writes keys literally: %75 is not "u" (review of #15)
        ("s3://media/u/**", "s3://media/%75/evil.jpg", False),
        ("s3://media/u/**", "s3://media/u/a%20b.jpg", False),
        ("s3://media/u/*", "s3://media/u/a/b.jpg", False),
        ("s3://media/u/*", "s3://media/v/a.jpg", False),
        ("s3://media/u/*", "s3://media2/u/a.jpg", False),
        ("s3://media/u/*", "s3://Media/u/a.jpg", False),
        ("s3://media/u/**", "s3://media/u/a/b.jpg", True),
        ("s3://media/u/**", "s3://media/ua.jpg", False),
        ("s3://media/u/*/avatar.jpg", "s3://media/u/42/avatar.jpg", True),
        ("s3://media/u/*/avatar.jpg", "s3://media/u/42/x/avatar.jpg", False),
        ("s3://media/u/**/avatar.jpg", "s3://media/u/avatar.jpg", True),
        ("s3://media/u/**/avatar.jpg", "s3://media/u/4/2/avatar.jpg", True),
        ("s3://media/*.jpg", "s3://media/a.jpg", True),
        ("s3://media/*.jpg", "s3://media/a.png", False),
        ("s3://media/*.jpg", "s3://media/a.jpg\n.png", False),
        ("ftp://ftp.example.com/in/", "ftp://user:pw@ftp.example.com/in/a.jpg", True),
        ("ftp://ftp.example.com/in/", "ftp://ftp.example.com//etc/a.jpg", False),
        ("ftp://ftp.example.com/in/", "ftp://ftp.example.com:2121/in/a.jpg", False),
        ("ftps://ftp.example.com:2121/in/", "ftps://ftp.example.com:2121/in/a.jpg", True),
        ("http://[::1]:8080/", "http://[::1]:8080/a.jpg", True),
        ("http://127.0.0.1/", "http://127.0.0.1.nip.io/a.jpg", False),
        ("https://h/", "gopher://h/a.jpg", False),
    ],
)
def test_scope_matching(pattern: str, url: str, expected: bool) -> None:
    """Each URL is inside the pattern exactly when the table says (component-wise)."""
    assert allowed([pattern], url) is expected


@pytest.mark.parametrize(
    "pattern",
    [
        "https://user:pw@h/",
        "https://h/?x=1",
        "https://h/#top",
        "https://*.example.com/",
        "https://h/a/../b",
        "gopher://h/",
        "https:///nohost",
        "https://h/%2fx",
        "not a url",
    ],
)
def test_bad_patterns_are_refused(pattern: str) -> None:
    """A pattern with userinfo, a query, a host wildcard, a dot segment, an unknown
    scheme or no host is refused when the file is read."""
    with pytest.raises(ValueError, match="'"):
        auth.Pattern.parse(pattern)


def test_no_scope_allows_anything_and_an_empty_one_nothing() -> None:
    """A key without ``destinations`` may write anywhere; with ``destinations = []``, nowhere."""
    auth.check_url(None, "https://anything.example/x.jpg")
    with pytest.raises(auth.OutOfScope):
        auth.check_url((), "https://anything.example/x.jpg")


def test_a_link_inside_the_scope_that_leads_out_is_refused() -> None:
    """file://: the resolved path must be inside the scope too."""
    patterns = [auth.Pattern.parse("file:///srv/thumbs/u1/")]
    auth.check_url(patterns, "file:///srv/thumbs/u1/a.jpg", resolve=lambda path: path)
    with pytest.raises(auth.OutOfScope, match="link"):
        auth.check_url(
            patterns, "file:///srv/thumbs/u1/link/a.jpg", resolve=lambda _p: "/srv/thumbs/u2/a.jpg"
        )


_SEGMENT = st.text(alphabet=string.ascii_letters + string.digits + "-_.%~", max_size=8)


@given(st.lists(_SEGMENT, max_size=5), st.lists(_SEGMENT, max_size=5))
def test_no_path_escapes_a_prefix(inside: list[str], rest: list[str]) -> None:
    """Whatever segments follow the prefix, an allowed URL's decoded path has no dot
    segment and still starts with the prefix's segments."""
    url = "https://h/u/" + "/".join(inside + rest)
    if allowed(["https://h/u/"], url):
        place = auth.place_of(url)
        assert place.segments[:2] == ("", "u")
        assert not {".", ".."} & set(place.segments)


@given(st.text(min_size=1, max_size=20))
def test_no_host_suffix_or_prefix_tricks(extra: str) -> None:
    """A host that is only a prefix or suffix of the pattern's host never matches."""
    for url in (
        f"https://uploads.example.com{extra}/a.jpg",
        f"https://{extra}uploads.example.com/a.jpg",
    ):
        try:
            host = auth.place_of(url).host
        except auth.OutOfScope:
            continue
        if host != "uploads.example.com":
            assert not allowed(["https://uploads.example.com/"], url)


@given(st.lists(_SEGMENT, min_size=1, max_size=4))
def test_a_single_star_never_crosses_a_slash(segments: list[str]) -> None:
    """``s3://media/u/*`` allows exactly the direct children of u/."""
    url = "s3://media/u/" + "/".join(segments)
    try:
        auth.place_of(url)
    except auth.OutOfScope:
        return
    assert allowed(["s3://media/u/*"], url) is (len(segments) == 1)


def write_keys(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    return path


def test_keys_file_is_read_with_every_field(tmp_path: Path) -> None:
    """A full entry: scopes, limits, rate with its default burst, webhook secret, admin."""
    path = write_keys(
        tmp_path,
        f"""
[[keys]]
name = "uploader"
secret_sha256 = "{auth.hash_secret(SECRET)}"
sources = ["https://cdn.example.com/"]
destinations = ["s3://media/u/*", "file:///srv/thumbs/"]
max_pixels = 1000
max_download_bytes = 2000
max_outputs = 2
rate = 2.5
webhook_secret = "{WHSEC}"

[[keys]]
name = "ops"
secret_env = "OPS_KEY"
admin = true
""",
    )
    keys = auth.load_keys(path, {"OPS_KEY": "o" * 40})
    uploader = keys.verify(SECRET)
    assert uploader.name == "uploader" and uploader.burst == 3 and uploader.rate == 2.5
    assert uploader.webhook_secret == WHSEC and not uploader.admin
    assert keys.verify("o" * 40).admin
    limits = uploader.imaging(ImagingLimits())
    assert limits.max_pixels == 1000 and limits.max_result_pixels == 1000
    assert uploader.download_limit(10**9) == 2000 and uploader.outputs_limit(16) == 2
    shown = uploader.describe()
    assert shown["destinations"] == ["s3://media/u/*", "file:///srv/thumbs/"]
    assert auth.hash_secret(SECRET) not in repr(shown) + repr(uploader)
    assert WHSEC not in repr(shown) + repr(uploader)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[keys]]\nname = 'a'\nsecret_sha256 = 'zz'", r"keys\[0\] \('a'\): secret_sha256"),
        ("[[keys]]\nname = 'a b'\nsecret_env = 'K'", r"keys\[0\] \('a b'\): name"),
        ("[[keys]]\nname = 'a'\nsecret_env = 'MISSING'", "MISSING is not set"),
        ("[[keys]]\nname = 'a'\nsecret_env = 'SHORT'", "shorter than 32"),
        ("[[keys]]\nname = 'a'\nsecret_env = 'K'\ncolour = 1", "unknown field 'colour'"),
        ("[[keys]]\nname = 'a'\nsecret_env = 'K'\ndestinations = ['https://h/?q']", "destinat"),
        ("[[keys]]\nname = 'a'\nsecret_env = 'K'\nrate = 0", "rate: expected a positive"),
        ("[[keys]]\nname = 'a'\nsecret_env = 'K'\nburst = 3", "burst: needs a rate"),
        ("[[keys]]\nname = 'a'\nsecret_env = 'K'\nwebhook_secret = 'nope'", "webhook_secret"),
        ("[[keys]]\nname = 'a'\nsecret_env = 'K'\n[[keys]]\nname = 'a'\nsecret_env = 'K'", "twice"),
        ("[[keys]]\nname = 'a'\nsecret_env = 'K'\n[[keys]]\nname = 'b'\nsecret_env = 'K'", "same"),
        ("[[keys]]\nname = 'a'\nsecret_env = 'K'\nadmin = 'yes'", "admin: expected true"),
        ("[[keys]]\nname = 'a'\n", "needs secret_sha256"),
        ("[[keys]]\nname = = 'a'\n", r"not valid TOML: .*line 2"),
        ("[key]\nname = 'a'\n", "unknown table or key 'key'"),
        ("# nothing yet\n", "holds no key"),
    ],
)
def test_keys_file_problems_name_the_file_and_entry(
    tmp_path: Path, text: str, message: str
) -> None:
    """Every problem is a KeysFileError naming the file, and the entry or TOML line."""
    path = write_keys(tmp_path, text)
    env = {"K": "k" * 40, "SHORT": "short"}
    with pytest.raises(auth.KeysFileError, match=message) as caught:
        auth.load_keys(path, env)
    assert str(path) in str(caught.value)
    assert "k" * 40 not in str(caught.value)


def test_verify_knows_only_the_configured_secrets() -> None:
    """The right secret gives its key; a near miss, a prefix and an empty one are 141."""
    key = auth.Key("a", hashlib.sha256(SECRET.encode()).digest())
    keys = auth.Keyring([key])
    assert keys.verify(SECRET) is key
    for wrong in (SECRET[:-1] + "b", SECRET[:-1], "", SECRET + " ", "\udcff"):
        with pytest.raises(errors.APIKeyUnknown):
            keys.verify(wrong)


@pytest.mark.parametrize(
    ("header", "token"),
    [("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("BEARER abc", "abc")],
)
def test_bearer_token_is_read(header: str, token: str) -> None:
    """The Bearer scheme is case-insensitive and surrounding spaces are dropped."""
    assert auth.bearer_token(header) == token


@pytest.mark.parametrize("header", [None, "", "Basic YTpi", "Bearer", "Bearer   ", "abc"])
def test_no_bearer_token_is_140(header: str | None) -> None:
    """No header, another scheme or an empty Bearer: APIKeyMissing."""
    with pytest.raises(errors.APIKeyMissing):
        auth.bearer_token(header)


def test_rate_limiter_allows_the_burst_then_the_rate() -> None:
    """Burst jobs at once, then one per 1/rate seconds; the wait is exact."""
    now = [100.0]
    limiter = auth.RateLimiter(clock=lambda: now[0])
    key = auth.Key("a", b"", rate=2.0, burst=3)
    assert [limiter.take(key) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take(key) == pytest.approx(0.5)
    now[0] += 0.25
    assert limiter.take(key) == pytest.approx(0.25)
    now[0] += 0.25
    assert limiter.take(key) == 0.0
    now[0] += 100
    assert [limiter.take(key) for _ in range(4)][-1] > 0  # refilled to the burst, no more
    with pytest.raises(errors.APIKeyRateLimited) as caught:
        limiter.check(key)
    assert caught.value.retry_after_s > 0
    other = auth.Key("b", b"", rate=2.0, burst=1)
    assert limiter.take(other) == 0.0  # buckets are per key
    assert limiter.take(auth.Key("c", b"")) == 0.0  # no rate: never limited


@given(st.lists(st.floats(min_value=0, max_value=5), max_size=40))
def test_rate_limiter_never_allows_more_than_burst_plus_rate_times_time(gaps: list[float]) -> None:
    """Over any sequence of requests, allowed <= burst + rate * elapsed."""
    now = [0.0]
    limiter = auth.RateLimiter(clock=lambda: now[0])
    key = auth.Key("a", b"", rate=1.5, burst=2)
    allowed_count = 0
    for gap in gaps:
        now[0] += gap
        if limiter.take(key) == 0.0:
            allowed_count += 1
    assert allowed_count <= 2 + 1.5 * now[0] + 1e-9


def test_webhook_signer_picks_the_key_secret_or_hands_off() -> None:
    """A key's own secret signs its jobs' events; no key or no own secret: the server's;
    a node without keys cannot tell (None: another node sends it)."""
    keys = auth.Keyring([auth.Key("own", b"1", webhook_secret=WHSEC), auth.Key("plain", b"2")])
    server = ("whsec_c2VydmVy",)
    sign = auth.webhook_signer(keys, server)
    assert sign("own") == (WHSEC,)
    assert sign("plain") == server
    assert sign(None) == server
    assert sign("removed") == server
    keyless = auth.webhook_signer(None, server)
    assert keyless(None) == server and keyless("own") is None
    # an API node with keys turned off signs what is left with the server's secrets
    turned_off = auth.webhook_signer(None, server, hand_off=False)
    assert turned_off("own") == server


def test_scope_refusals_are_403_codes_naming_the_url() -> None:
    """may_read / may_write raise 142 / 143 with the refused URL in the detail."""
    key = auth.Key(
        "a",
        b"",
        sources=(auth.Pattern.parse("https://cdn/"),),
        destinations=(auth.Pattern.parse("s3://media/u/"),),
    )
    key.may_read("https://cdn/a.jpg")
    key.may_write("s3://media/u/a.jpg")
    with pytest.raises(errors.SourceOutOfScope, match=re.escape("https://evil/a.jpg")):
        key.may_read("https://evil/a.jpg")
    with pytest.raises(
        errors.DestinationOutOfScope, match=re.escape("outputs[1]: s3://media/v/a.jpg")
    ):
        key.may_write("s3://media/v/a.jpg", where="outputs[1]")


def test_new_secrets_are_prefixed_and_random() -> None:
    """``isk_`` + 43 URL-safe characters, never twice the same."""
    made = {auth.new_secret() for _ in range(100)}
    assert len(made) == 100
    assert all(s.startswith("isk_") and len(s) == 47 for s in made)

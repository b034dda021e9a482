"""Pure URL helpers shared by the request contract, transports and logs.

:func:`redact_url` is the one function every reply, job view and log record
passes URLs through. It hides

- the userinfo of every ``scheme://user:password@`` in the text: the password
  becomes ``***`` (the user stays, so an operator can tell accounts apart),
  and a user-only userinfo (``https://TOKEN@host/``) becomes ``***`` entirely,
  because a lone user name in a URL is nearly always a token;
- the value of every secret query parameter (``?X-Amz-Signature=...``,
  ``&token=...``): the built-in names in :data:`SECRET_PARAMS` plus the names
  given to :func:`configure_redaction`, matched case-insensitively.

It works on any text, not only valid URLs: 0.2's ``URL:filename``
destinations, error details and whole log lines holding several URLs. When in
doubt it hides too much rather than too little.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_SCHEME = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*")  # RFC 3986

# Userinfo runs to the LAST "@" before the authority's first "/": passwords are
# often pasted unencoded, with "@", ":", "%", spaces, "?" or "#" in them. The run
# stops at a line break so one URL cannot swallow the next lines of a traceback.
_USERINFO = re.compile(rf"(?P<scheme>{_SCHEME.pattern}://)(?P<userinfo>[^/\r\n]*)@")

SECRET_PARAMS: frozenset[str] = frozenset(
    {
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "token",
        "sig",
        "signature",
        "key",
        "access_token",
        "password",
    }
)


def _query_pattern(names: Iterable[str]) -> re.Pattern[str]:
    # Longest first, so "token" never wins over "access_token"'s alternatives.
    alternatives = "|".join(re.escape(n) for n in sorted(set(names), key=len, reverse=True))
    return re.compile(rf"(?P<lead>[?&;](?:{alternatives})=)[^&#\s]*", re.IGNORECASE)


_secret_query = _query_pattern(SECRET_PARAMS)


def configure_redaction(extra_params: Iterable[str]) -> None:
    """Also hide the values of these query parameters (case-insensitive).

    Replaces the extra names of any earlier call; the built-in
    :data:`SECRET_PARAMS` always stay. Blank names are ignored.
    """
    global _secret_query
    extra = {name.strip().lower() for name in extra_params if name.strip()}
    _secret_query = _query_pattern(SECRET_PARAMS | extra)


def _hide_userinfo(m: re.Match[str]) -> str:
    user, sep, _password = m["userinfo"].partition(":")
    if not sep or not user:
        return f"{m['scheme']}***@"
    return f"{m['scheme']}{user}:***@"


def redact_url(url: str) -> str:
    """``url`` (or any text holding URLs) with its credentials replaced by ``***``."""
    text = _USERINFO.sub(_hide_userinfo, url)
    return _secret_query.sub(lambda m: f"{m['lead']}***", text)


def scheme_of(url: str) -> str:
    """The lower-case scheme of a URL, or "" when it has none."""
    head, sep, _ = url.partition("://")
    return head.lower() if sep and _SCHEME.fullmatch(head) else ""

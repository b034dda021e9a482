"""Pure URL helpers shared by the request contract, transports and logs."""

from __future__ import annotations

import re

_SCHEME = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*")  # RFC 3986
_USERINFO = re.compile(rf"(?P<scheme>{_SCHEME.pattern}://)(?P<userinfo>[^/@\s]*)@")


def redact_url(url: str) -> str:
    """Replace the password in a URL's userinfo with ``***``.

    Works on strings that are not valid URLs too (0.2's ``URL:filename``
    destinations, log lines), so a credential never reaches a log or a reply.
    """

    def repl(m: re.Match[str]) -> str:
        user, sep, _password = m["userinfo"].partition(":")
        return f"{m['scheme']}{user}{':***' if sep else ''}@"

    return _USERINFO.sub(repl, url)


def scheme_of(url: str) -> str:
    """The lower-case scheme of a URL, or "" when it has none."""
    head, sep, _ = url.partition("://")
    return head.lower() if sep and _SCHEME.fullmatch(head) else ""

"""``imgserve keys add NAME`` and ``imgserve keys list``: manage the API keys file.

``add`` makes a new random key, prints it once on stdout (nothing keeps it: the
file holds only its SHA-256) and appends its entry to the keys file, created
with mode 0600. The whole file, new entry included, is checked before anything
is written, so a bad pattern or a name used twice leaves the file as it was.
``list`` shows names and scopes, never hashes or secrets.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
from pathlib import Path
from typing import Any

import tomli_w

from imgserve import auth


def add_parser(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """The ``keys`` command and its ``add`` and ``list`` subcommands."""
    keys = sub.add_parser("keys", help="add or list API keys (docs/security.md)")
    actions = keys.add_subparsers(
        dest="keys_command", required=True, metavar="ACTION", parser_class=parser_class
    )
    add = actions.add_parser("add", help="make a new key, print it once, store its hash")
    add.add_argument("name", help="the key's name (shown in job views and logs)")
    listing = actions.add_parser("list", help="names and scopes (never secrets)")
    for child in (add, listing):
        child.add_argument("--keys", type=Path, help="the keys file (default: see docs)")
        child.add_argument("--state-dir", "--home", dest="state_dir", type=Path)
        child.add_argument("--config", type=Path, help="TOML settings file")
    many = {"action": "extend", "nargs": "+", "metavar": "URL", "default": None}
    add.add_argument("--sources", **many, help="URL prefixes or patterns it may read")
    add.add_argument("--destinations", **many, help="URL prefixes or patterns it may write")
    add.add_argument("--admin", action="store_true", help="may read and cancel every job")
    add.add_argument("--max-pixels", type=int, help="largest source, tighter than the server's")
    add.add_argument("--max-download-bytes", type=int, help="largest source download")
    add.add_argument("--max-outputs", type=int, help="outputs per job")
    add.add_argument("--rate", type=float, help="jobs per second (per node)")
    add.add_argument("--burst", type=int, help="jobs at once after a quiet spell")
    add.add_argument(
        "--webhook-secret-env",
        metavar="VAR",
        help="environment variable holding its own webhook signing secret",
    )


def run(args: argparse.Namespace, path: Path) -> int:
    """Run ``keys add`` or ``keys list`` on the keys file at ``path``."""
    try:
        if args.keys_command == "add":
            return _add(args, path)
        return _list(path)
    except (auth.KeysFileError, OSError) as exc:
        print(f"imgserve keys: {exc}", file=sys.stderr)
        return 1


def _entry(args: argparse.Namespace, secret: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": args.name, "secret_sha256": auth.hash_secret(secret)}
    for name in ("sources", "destinations"):
        if getattr(args, name) is not None:
            entry[name] = list(getattr(args, name))
    for name in ("max_pixels", "max_download_bytes", "max_outputs", "rate", "burst"):
        if getattr(args, name) is not None:
            entry[name] = getattr(args, name)
    if args.webhook_secret_env:
        entry["webhook_secret_env"] = args.webhook_secret_env
    if args.admin:
        entry["admin"] = True
    return entry


def _add(args: argparse.Namespace, path: Path) -> int:
    secret = auth.new_secret()
    block = tomli_w.dumps({"keys": [_entry(args, secret)]})
    auth.parse_keys(block, str(path), None)  # the new key alone, before the file is opened
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "r+", encoding="utf-8") as out:
        # Two `keys add` at once take turns: each checks the file as the other left it
        # (two keys of one name would make the file unreadable at the next start).
        fcntl.flock(out, fcntl.LOCK_EX)
        existing = out.read()
        joined = existing + ("\n" if existing and not existing.endswith("\n") else "")
        text = joined + ("\n" if joined else "") + block
        auth.parse_keys(text, str(path), None)  # the whole file, before anything is written
        out.write(text[len(existing) :])
    print(secret)
    print(
        f"imgserve keys: key {args.name!r} added to {path}; this is the only time it is "
        "shown. A running daemon reads keys when it starts (imgserve restart).",
        file=sys.stderr,
    )
    if auth.loose_permissions(path):
        print(f"imgserve keys: warning: {path} is readable by other users", file=sys.stderr)
    return 0


def _list(path: Path) -> int:
    keys = auth.parse_keys(path.read_text(encoding="utf-8"), str(path), None)
    for key in keys.keys:
        shown = key.describe()
        name, admin = shown.pop("name"), shown.pop("admin")
        parts = [f"{name}{' (admin)' if admin else ''}"]
        for field, value in shown.items():
            if value is None or value is False:
                continue
            parts.append(f"{field}={json.dumps(value)}")
        print("  ".join(parts))
    return 0

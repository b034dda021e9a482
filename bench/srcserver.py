"""The source-image HTTP server, run in its own process (``python -m bench.srcserver``).

It serves every file of one directory from memory at ``/src/<anything>/<name>``;
the ``<anything>`` segment lets each request use a unique URL for the same file.
Running it in a separate process keeps its work off the client's event loop.
"""

from __future__ import annotations

import argparse
import mimetypes
from pathlib import Path

from aiohttp import web

_TYPES = {".jpg": "image/jpeg", ".png": "image/png", ".svg": "image/svg+xml"}


def make_app(root: Path) -> web.Application:
    """An app serving the files of ``root`` (read once, at start)."""
    files: dict[str, tuple[bytes, str]] = {}
    for path in sorted(root.iterdir()):
        if path.is_file():
            ctype = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0]
            files[path.name] = (path.read_bytes(), ctype or "application/octet-stream")

    async def serve(request: web.Request) -> web.Response:
        found = files.get(request.match_info["name"])
        if found is None:
            raise web.HTTPNotFound()
        body, ctype = found
        return web.Response(body=body, content_type=ctype)

    async def health(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/src/{tag}/{name}", serve)
    app.router.add_get("/health", health)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    web.run_app(make_app(args.root), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()

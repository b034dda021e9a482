"""The dashboard, ``GET /ui``: a page imgserve serves itself (docs/operating.md).

The page is static files in ``static/`` (no build step, nothing from a CDN) and
holds no data: every number on it comes from requests the browser makes with
the API key the user typed (``GET /jobs``, ``GET /jobs/<id>``, ``GET /events``,
``GET /health``, and ``GET /ui/history`` here). So the static files are open
paths (``OPEN_PATHS``, answered without a key), and ``/ui/history`` needs a key
as ``GET /jobs`` does (the API's auth middleware: 401, 140/141).

``/ui/history`` is the hour of queue counts the API process keeps in memory
(``history.History``), sampled by a task that lives as long as the app.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources

from aiohttp import web

from imgserve.ui.history import History, sample_forever

ASSETS: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "thumbhash.js": "text/javascript; charset=utf-8",
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
    "LICENSES.md": "text/markdown; charset=utf-8",
}
"""The files in static/ and their types: the only paths served (no directory listing)."""

OPEN_PATHS = frozenset({"/ui", "/ui/", *(f"/ui/{name}" for name in ASSETS)})
"""Answered without a key: the page and its scripts carry no data."""

HEADERS = {
    # Nothing but this origin: no inline script, no other host (the page is handed
    # an API key; a script injected through a job's field must not run).
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

HISTORY = web.AppKey("ui_history", History)


def add_routes(
    app: web.Application,
    counts: Callable[[], Awaitable[dict[str, int]]],
    history: History | None = None,
) -> None:
    """Serve the dashboard on ``app``, and sample ``counts`` (the queue's) for its
    history while the app runs."""
    app[HISTORY] = history if history is not None else History()
    files = resources.files(__package__) / "static"
    bodies = {name: (files / name).read_bytes() for name in ASSETS}

    def asset(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(_request: web.Request) -> web.Response:
            return web.Response(
                body=bodies[name], headers={**HEADERS, "Content-Type": ASSETS[name]}
            )

        return handler

    app.router.add_get("/ui", asset("index.html"))
    app.router.add_get("/ui/", to_the_page)
    for name in ASSETS:
        app.router.add_get(f"/ui/{name}", asset(name))
    app.router.add_get("/ui/history", history_view)

    async def sampling(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(sample_forever(app[HISTORY], counts))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(sampling)


async def to_the_page(_request: web.Request) -> web.Response:
    """``/ui/`` is the page too: the page's own links are absolute, so one URL is enough."""
    raise web.HTTPFound("/ui")


async def history_view(request: web.Request) -> web.Response:
    """``GET /ui/history``: the queue's counts over the last hour (``History.view``)."""
    return web.json_response(request.app[HISTORY].view(), headers={"Cache-Control": "no-store"})

"""A real webhook receiver on a loopback port (aiohttp, in its own thread), answering
each request as the test scripts it, and recording every request it got."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass(frozen=True)
class Reply:
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    hold_s: float = 0.0
    """Wait this long before answering (a receiver that hangs)."""


class Receiver:
    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.script: list[Reply] = []
        """Replies for the next requests, in order; then ``default``."""
        self.default = Reply(200)
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def answer(self, *replies: Reply) -> None:
        with self._lock:
            self.script.extend(replies)

    def received(self, path: str | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if path is None or r.path == path]

    def wait_for(self, count: int, timeout_s: float = 30.0, path: str = "/hook") -> list[Received]:
        """Block until ``count`` requests came to ``path`` (fails the test if they never do)."""
        until(lambda: len(self.received(path)) >= count, timeout_s, f"{count} requests to {path}")
        return self.received(path)

    def verified(self, secret: str, path: str = "/hook") -> list[dict[str, Any]]:
        """Every request to ``path``, verified with standardwebhooks: their payloads."""
        return [Webhook(secret).verify(r.body, r.headers) for r in self.received(path)]

    # --- the server --------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        with self._lock:
            self.requests.append(Received(request.path, dict(request.headers), body, time.time()))
            reply = self.script.pop(0) if self.script else self.default
        if reply.hold_s:
            await asyncio.sleep(reply.hold_s)
        return web.Response(status=reply.status, headers=dict(reply.headers))

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = runner.addresses[0][1]
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(10)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture(name="receiver")
def receiver_fixture() -> Iterator[Receiver]:
    """A fresh receiver on a free loopback port, answering 200 unless scripted."""
    rx = Receiver()
    rx.start()
    yield rx
    rx.stop()

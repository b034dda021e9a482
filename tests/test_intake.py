"""Intake is bounded by work: intake slots, a source byte budget, one reply deadline.

The API runs in-process (api.make_app around a real SQLite queue and the real
transports) against a loopback source/destination server whose handlers hold
each request until the test lets it go.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pyvips
from aiohttp import web

from imgserve import api
from imgserve.config import NetPolicy, ServerSettings, Settings, TransportSettings
from imgserve.planner import Planner
from tests.inprocess import API, start_api


def _jpeg(width: int = 64, height: int = 48) -> bytes:
    return bytes(pyvips.Image.black(width, height, bands=3).jpegsave_buffer())


@dataclass
class Holding:
    """A loopback server: GET /src/<n> and PUT /dst/<n> wait for ``release``."""

    url: str = ""
    source: bytes = field(default_factory=_jpeg)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: list[str] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def _arrive(self, what: str) -> None:
        async with self.changed:
            self.arrived.append(what)
            self.changed.notify_all()
        await self.release.wait()

    async def get(self, request: web.Request) -> web.Response:
        await self._arrive(f"GET {request.match_info['n']}")
        return web.Response(body=self.source)

    async def get_now(self, request: web.Request) -> web.Response:
        return web.Response(body=self.source)

    async def put(self, request: web.Request) -> web.Response:
        await request.read()
        await self._arrive(f"PUT {request.match_info['n']}")
        return web.Response(status=201)

    async def until(self, count: int) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: len(self.arrived) >= count), 30)


@pytest.fixture
async def holding() -> AsyncIterator[Holding]:
    server = Holding()
    app = web.Application()
    app.router.add_get("/src/{n}", server.get)
    app.router.add_get("/now/{n}", server.get_now)
    app.router.add_put("/dst/{n}", server.put)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    server.url = f"http://127.0.0.1:{port}"
    yield server
    server.release.set()
    await runner.cleanup()


Start = Any


@pytest.fixture
async def imgserve_api(tmp_path: Path, shared_planner: Planner) -> AsyncIterator[Start]:
    """Start the API in-process with server settings; yields (base URL, Service)."""
    started: list[API] = []
    out = tmp_path / "out"
    out.mkdir()

    async def start(**server: Any) -> tuple[str, api.Service]:
        transport = TransportSettings(
            policy=NetPolicy(allow_nets=(ipaddress.ip_network("127.0.0.0/8"),)),
            file_roots=(out,),
        )
        settings = Settings(server=ServerSettings(**server), transport=transport)
        served = await start_api(tmp_path / f"q{len(started)}", shared_planner, settings)
        started.append(served)
        return served.url, served.service

    yield start
    for served in started:
        await served.stop()


def job(src: str, dst: str) -> bytes:
    return json.dumps(
        {"operationType": "resize", "srcURL": src, "dstURL": dst, "args": {"width": 32}}
    ).encode()


async def post(base: str, body: bytes) -> tuple[int, dict[str, Any], Any]:
    async with aiohttp.ClientSession() as session, session.post(base + "/", data=body) as resp:
        return resp.status, await resp.json(), resp.headers


async def test_full_intake_answers_503_with_retry_after_before_downloading(
    imgserve_api: Start, holding: Holding, tmp_path: Path
) -> None:
    """With every intake slot held by a download, a new job gets 503 (611) at once,
    and nothing is fetched for it; the held jobs are still accepted afterwards."""
    base, service = await imgserve_api(intake_max=2)
    dst = f"file://{tmp_path}/out"
    first = [asyncio.create_task(post(base, job(f"{holding.url}/src/{n}", f"{dst}/{n}.jpg")))
             for n in range(2)]  # fmt: skip
    await holding.until(2)
    status, body, headers = await post(base, job(f"{holding.url}/src/3", f"{dst}/3.jpg"))
    assert (status, body["code"]) == (503, 611)
    assert int(headers["Retry-After"]) > 0
    assert sorted(holding.arrived) == ["GET 0", "GET 1"]  # nothing fetched for the third
    holding.release.set()
    for task in first:
        status, body, _ = await task
        assert status == 200, body
    assert (service.intake.jobs, service.intake.bytes) == (0, 0)


async def test_sources_over_the_byte_budget_answer_503(
    imgserve_api: Start, holding: Holding
) -> None:
    """Once the jobs being checked hold intake_max_bytes of sources, a new job gets
    503 (611) naming the budget; once they are replied, the budget is free again."""
    budget = len(holding.source)  # one held source fills it
    base, service = await imgserve_api(intake_max_bytes=budget)
    held = asyncio.create_task(post(base, job(f"{holding.url}/now/1", f"{holding.url}/dst/1.jpg")))
    await holding.until(1)  # downloaded, now uploading its placeholder
    assert service.intake.bytes == budget
    status, body, _ = await post(base, job(f"{holding.url}/now/2", f"{holding.url}/dst/2.jpg"))
    assert (status, body["code"]) == (503, 611)
    assert str(budget) in body["detail"]
    holding.release.set()
    status, body, _ = await held
    assert status == 200, body
    status, body, _ = await post(base, job(f"{holding.url}/now/3", f"{holding.url}/dst/3.jpg"))
    assert status == 200, body
    assert service.intake.bytes == 0


async def test_checking_a_job_has_one_deadline(
    imgserve_api: Start, holding: Holding, tmp_path: Path
) -> None:
    """A source that never finishes gets 504 (612) at the reply deadline, well before
    the download timeout, and frees its intake slot; nothing is queued."""
    base, service = await imgserve_api(reply_timeout_s=1.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, body, _ = await post(base, job(f"{holding.url}/src/1", f"file://{tmp_path}/out/1.jpg"))
    assert (status, body["code"]) == (504, 612)
    assert loop.time() - started < 10  # the download timeout is 30 s
    assert service.intake.jobs == 0
    assert (await service.queue.counts())["queued"] == 0


async def test_a_download_that_would_pass_the_budget_stops_mid_way(
    imgserve_api: Start, holding: Holding
) -> None:
    """The budget is charged as chunks arrive: while one job holds a source, a second
    whose bytes would take the total past the budget is stopped with 611 during its
    download, not after it has been read whole."""
    holding.source = _jpeg(1600, 1200) + bytes(2_000_000)  # big, and several chunks long
    budget = len(holding.source) * 3 // 2
    base, service = await imgserve_api(intake_max_bytes=budget)
    held = asyncio.create_task(post(base, job(f"{holding.url}/now/1", f"{holding.url}/dst/1.jpg")))
    await holding.until(1)
    status, body, _ = await post(base, job(f"{holding.url}/now/2", f"{holding.url}/dst/2.jpg"))
    assert (status, body["code"]) == (503, 611)
    assert "would hold more than" in body["detail"]
    assert service.intake.bytes == len(holding.source)  # the stopped one gave its bytes back
    holding.release.set()
    assert (await held)[0] == 200


async def test_one_source_larger_than_the_budget_is_still_accepted_alone(
    imgserve_api: Start, holding: Holding, tmp_path: Path
) -> None:
    """A budget below the download limit cannot refuse a job for ever: the only job
    holding bytes may pass it (up to max_download_bytes)."""
    base, service = await imgserve_api(intake_max_bytes=len(holding.source) // 2)
    status, body, _ = await post(base, job(f"{holding.url}/now/1", f"file://{tmp_path}/out/1.jpg"))
    assert status == 200, body
    assert service.intake.bytes == 0

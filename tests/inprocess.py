"""The API in-process: api.make_app around a real SQLite queue and the real transports,
served by protocol.make_runner on a free loopback port."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from imgserve import api, protocol
from imgserve.config import Settings
from imgserve.planner import Planner
from imgserve.queue.sqlite import SQLiteQueue
from imgserve.transports import Transports


@dataclass
class API:
    runner: web.AppRunner
    service: api.Service
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        await self.runner.cleanup()
        await self.service.transports.aclose()
        await self.service.queue.close()


async def start_api(state_dir: Path, planner: Planner, settings: Settings | None = None) -> API:
    """Serve the API with ``settings`` (defaults: no outbound address allowed)."""
    settings = settings or Settings()
    service = api.Service(
        settings=settings,
        queue=SQLiteQueue(state_dir / "jobs.db"),
        transports=Transports(settings.transport),
        runner=None,
        planner=planner,
    )
    runner = protocol.make_runner(api.make_app(service), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return API(runner=runner, service=service, port=runner.addresses[0][1])

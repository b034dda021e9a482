"""Blocking transports run on their own sized pools; a deadline starts when the work does.

The event loop's default executor is set to two threads here, so that a few
transfers would fill it the way 6 (two cores) or 32 threads fill it in
production; the tests show that slow FTP transfers never take those threads.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from imgserve.config import TransportSettings
from imgserve.errors import DownloadTimeout
from imgserve.transports import Transports
from tests.servers import FTPTestServer, HTTPTestServer
from tests.transports.conftest import unique

SLOW_NAME = "big.bin"
"""256 KiB on the slow server: about two minutes at its 2 KiB/s."""


async def _until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Return once ``condition()`` holds; fail after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


@pytest.fixture
async def small_default_executor(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """The running loop's default executor (DNS, to_thread) with two threads (or the param)."""
    threads: int = getattr(request, "param", 2)
    executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="default")
    asyncio.get_running_loop().set_default_executor(executor)
    yield
    executor.shutdown(wait=False, cancel_futures=True)


@pytest.fixture
def slow_ftp(ftp_slow_server: FTPTestServer) -> FTPTestServer:
    """The throttled FTP server, holding the slow file."""
    (ftp_slow_server.home / SLOW_NAME).write_bytes(b"s" * 256 * 1024)
    return ftp_slow_server


def _retrs(server: FTPTestServer, since: int) -> int:
    return sum(1 for cmd, _arg in server.state.commands[since:] if cmd == "RETR")


async def test_slow_ftp_transfers_do_not_stall_http_or_file(
    small_default_executor: None,
    slow_ftp: FTPTestServer,
    http_server: HTTPTestServer,
    settings: TransportSettings,
    tmp_path: Path,
) -> None:
    """With more slow FTP transfers in flight than FTP threads, http and file:// still finish."""
    registry = Transports(
        dataclasses.replace(settings, ftp_threads=2, download_timeout_s=60.0, file_threads=1)
    )
    name = unique("prompt")
    http_server.state.files[name] = b"over http"
    (tmp_path / name).write_bytes(b"from a file")
    start = len(slow_ftp.state.commands)
    slow = [asyncio.create_task(registry.download(slow_ftp.url(SLOW_NAME))) for _ in range(4)]
    try:
        await _until(lambda: _retrs(slow_ftp, start) == 2)  # the FTP pool is full
        # "localhost" goes through the resolver, which uses the default executor.
        via_http = registry.download(http_server.url(f"/files/{name}", host="localhost"))
        via_file = registry.download(f"file://{tmp_path / name}")
        async with asyncio.timeout(10):
            got = await asyncio.gather(via_http, via_file)
        assert got == [b"over http", b"from a file"]
        assert not any(task.done() for task in slow)  # still running or queued
        assert _retrs(slow_ftp, start) == 2  # two queued ones never got a thread
    finally:
        for task in slow:
            task.cancel()
        await asyncio.gather(*slow, return_exceptions=True)
        await registry.aclose()


@pytest.mark.parametrize("small_default_executor", [1], indirect=True)
async def test_a_queued_ftp_call_gets_its_full_timeout(
    small_default_executor: None,
    slow_ftp: FTPTestServer,
    ftp_server: FTPTestServer,
    settings: TransportSettings,
) -> None:
    """A call that waits for the only FTP thread still has download_timeout_s once it starts."""
    name = unique("queued")
    (ftp_server.home / name).write_bytes(b"quick")
    registry = Transports(dataclasses.replace(settings, ftp_threads=1, download_timeout_s=1.5))
    ended: list[str] = []

    async def download(label: str, url: str) -> bytes:
        try:
            return await registry.download(url)
        finally:
            ended.append(label)

    try:
        # The slow transfer holds the only thread for its whole 1.5 s deadline;
        # the quick one waits behind it, then needs well under 1.5 s of its own.
        slow = asyncio.create_task(download("slow", slow_ftp.url(SLOW_NAME)))
        quick = asyncio.create_task(download("quick", ftp_server.url(name)))
        with pytest.raises(DownloadTimeout):
            await slow
        assert await quick == b"quick"
    finally:
        await registry.aclose()
    assert ended == ["slow", "quick"]


@pytest.mark.parametrize("small_default_executor", [1], indirect=True)
async def test_cancelling_a_running_ftp_transfer_frees_its_thread(
    small_default_executor: None,
    slow_ftp: FTPTestServer,
    ftp_server: FTPTestServer,
    settings: TransportSettings,
) -> None:
    """A cancelled transfer has its sockets shut, so the next call gets the thread at once."""
    name = unique("after")
    (ftp_server.home / name).write_bytes(b"next")
    registry = Transports(dataclasses.replace(settings, ftp_threads=1, download_timeout_s=60.0))
    start = len(slow_ftp.state.commands)
    try:
        slow = asyncio.create_task(registry.download(slow_ftp.url(SLOW_NAME)))
        await _until(lambda: _retrs(slow_ftp, start) == 1)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        async with asyncio.timeout(10):  # not the slow transfer's 60 s deadline
            assert await registry.download(ftp_server.url(name)) == b"next"
    finally:
        await registry.aclose()

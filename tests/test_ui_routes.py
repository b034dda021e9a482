"""The dashboard's routes in-process (tests/inprocess.py: the real app and SQLite
queue): the static files open to anyone with a strict CSP, ``/ui/history`` behind
the API keys as ``GET /jobs`` is, and every file the page loads being served."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from imgserve import auth, ui
from imgserve.planner import Planner
from tests.inprocess import API, start_api

SECRET = "isk_" + "k" * 40


@pytest.fixture
async def keyed_api(tmp_path: Path, shared_planner: Planner) -> AsyncIterator[API]:
    served = await start_api(tmp_path / "state", shared_planner)
    served.service.keys = auth.Keyring(
        [auth.Key("viewer", hashlib.sha256(SECRET.encode()).digest())]
    )
    yield served
    await served.stop()


async def _get(api: API, path: str, token: str | None = None) -> tuple[int, dict[str, str], bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(api.url + path, headers=headers) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.read()


async def test_the_page_and_its_files_need_no_key_and_forbid_other_origins(keyed_api: API) -> None:
    """``/ui`` and every static file answer without a key, with a CSP allowing only
    this origin (no inline script); the page carries no data."""
    status, headers, body = await _get(keyed_api, "/ui")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert "unsafe-inline" not in headers["Content-Security-Policy"]
    assert b"<script>" not in body  # every script is a file
    async with aiohttp.ClientSession() as session, session.get(keyed_api.url + "/ui/") as resp:
        assert (resp.status, resp.url.path) == (200, "/ui")  # redirected
    for name, kind in ui.ASSETS.items():
        status, headers, _ = await _get(keyed_api, f"/ui/{name}")
        assert (status, headers["Content-Type"]) == (200, kind), name


async def test_every_file_the_page_loads_is_served() -> None:
    """Each ``src``/``href`` in index.html and each import in app.js is in ui.ASSETS."""
    static = Path(ui.__file__).parent / "static"
    page = (static / "index.html").read_text()
    script = (static / "app.js").read_text()
    wanted = re.findall(r'(?:src|href)="/ui/([^"]+)"', page)
    wanted += re.findall(r'from "/ui/([^"]+)"', script)
    assert wanted and set(wanted) <= set(ui.ASSETS)
    assert set(ui.ASSETS) == {path.name for path in static.iterdir()}


async def test_history_needs_a_key_as_the_job_list_does(keyed_api: API) -> None:
    """``GET /ui/history`` is 401 (140) without a key and (141) with a wrong one,
    exactly as ``GET /jobs``; with a key, the samples."""
    for token, code in ((None, 140), ("isk_wrong", 141)):
        history = await _get(keyed_api, "/ui/history", token)
        jobs = await _get(keyed_api, "/jobs", token)
        assert history[0] == jobs[0] == 401
        assert f'"code": {code}'.encode() in history[2]
        assert history[1]["WWW-Authenticate"] == jobs[1]["WWW-Authenticate"]
    async with asyncio.timeout(5.0):  # the first sample is taken as the app starts
        while True:
            status, _, body = await _get(keyed_api, "/ui/history", SECRET)
            assert status == 200
            if json.loads(body)["samples"]:
                break
            await asyncio.sleep(0.02)
    assert json.loads(body)["samples"][0]["queued"] == 0


async def _raw_get(api: API, target: str, token: str | None = None) -> tuple[int, bytes]:
    """GET with the request target sent exactly as written (an HTTP client would
    collapse ``..`` or re-encode it first)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
    try:
        key = f"Authorization: Bearer {token}\r\n" if token else ""
        writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{key}\r\n".encode())
        await writer.drain()
        data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


async def test_a_path_under_ui_that_is_no_file_is_404_not_a_file_read(keyed_api: API) -> None:
    """Only the listed files are served: another name, or ``..`` sent raw or encoded,
    is the API's 404 (606); a target naming ``/jobs`` through ``..`` is refused without
    a key (401) and with one is no path (404), not the job list."""
    for path in ("/ui/history.py", "/ui/static/app.js"):
        status, _, body = await _get(keyed_api, path, SECRET)
        assert status == 404, path
        assert b'"code"' in body
    for target in (
        "/ui/../pyproject.toml",
        "/ui/%2e%2e/pyproject.toml",
        "/ui/%2E%2E/%2E%2E/pyproject.toml",
        "/ui/..%2fpyproject.toml",
        "/ui/static%2fapp.js",
    ):
        status, body = await _raw_get(keyed_api, target, SECRET)
        assert (status, json.loads(body)["code"]) == (404, 606), target
    for target in ("/ui/..%2fjobs", "/ui%2f..%2fjobs", "/ui/app.js/../../jobs", "/ui/../jobs"):
        status, body = await _raw_get(keyed_api, target)
        assert (status, json.loads(body)["code"]) == (401, 140), target  # never 200
        status, body = await _raw_get(keyed_api, target, SECRET)
        assert (status, json.loads(body)["code"]) == (404, 606), target  # not /jobs
        assert b'"jobs"' not in body, target

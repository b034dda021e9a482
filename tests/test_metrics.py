"""``GET /metrics`` in-process: the exposition parses, names follow the Prometheus
conventions, and each request and job is counted where it happens.

The API runs in-process (tests/inprocess.start_api: the real app, SQLite queue,
transports and planner) with no runner; sources are on the loopback HTTP test
server, destinations under a file root. Each exposition is parsed with
prometheus_client's own parser.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from imgserve import config
from imgserve.config import NetPolicy, Settings, TransportSettings
from imgserve.metrics import Metrics
from imgserve.planner import Planner
from tests.e2e.conftest import jpeg, serve
from tests.inprocess import API, start_api
from tests.servers import HTTPTestServer

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """The exposition's families (name -> type) and samples ((name, labels) -> value)."""
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
async def api(tmp_path: Path, shared_planner: Planner) -> AsyncIterator[API]:
    out = tmp_path / "out"
    out.mkdir()
    settings = Settings(
        transport=TransportSettings(
            policy=NetPolicy(allow_nets=(ipaddress.ip_network("127.0.0.0/8"),)),
            file_roots=(out,),
        )
    )
    served = await start_api(tmp_path / "q", shared_planner, settings)
    yield served
    await served.stop()


async def scrape(api: API) -> tuple[str, dict[str, str], Samples]:
    async with aiohttp.ClientSession() as session, session.get(api.url + "/metrics") as resp:
        assert resp.status == 200
        content_type = resp.headers["Content-Type"]
        text = await resp.text()
    return (content_type, *parse(text))


async def request(api: API, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if body is not None else {}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, api.url + path, data=data, headers=headers) as resp,
    ):
        return resp.status, json.loads(await resp.read())


async def test_exposition_is_prometheus_text_with_conventional_names(api: API) -> None:
    """/metrics is the Prometheus text format; imgserve's families carry the prefix,
    counters end in _total, durations in _seconds, sizes in _bytes."""
    content_type, types, samples = await scrape(api)
    assert content_type.startswith("text/plain; version=0.0.4")
    ours = {name: kind for name, kind in types.items() if name.startswith("imgserve_")}
    assert {
        "imgserve_http_request_duration_seconds": "histogram",
        "imgserve_job_phase_duration_seconds": "histogram",
        "imgserve_jobs_accepted": "counter",
        "imgserve_jobs_done": "counter",
        "imgserve_jobs_failed": "counter",
        "imgserve_download_bytes": "counter",
        "imgserve_upload_bytes": "counter",
        "imgserve_queue_jobs": "gauge",
        "imgserve_workers_busy": "gauge",
    }.items() <= ours.items()
    for name, kind in ours.items():
        if kind == "counter":
            assert any(s == f"{name}_total" for s, _ in samples) or not any(
                s.startswith(name) for s, _ in samples
            ), name
        if "duration" in name:
            assert name.endswith("_seconds"), name
    assert value(samples, "imgserve_queue_jobs", state="queued") == 0
    assert "process_resident_memory_bytes" in types  # the API process's own


async def test_an_accepted_job_is_counted_with_its_phases_and_bytes(
    api: API, http_server: HTTPTestServer, tmp_path: Path
) -> None:
    """One accepted POST /jobs: accepted by operation, one download, plan and
    placeholder timing each, its source's bytes by scheme, the placeholder's bytes
    uploaded, the queue one deeper, and the request under its route and status."""
    source = jpeg(320, 240)
    src = serve(http_server, "metrics/Photo.jpg", source)
    job = {"source": src, "outputs": [{"url": f"file://{tmp_path}/out/a.png", "width": 64}]}
    status, body = await request(api, "POST", "/jobs", job)
    assert status == 202, body
    await request(api, "GET", f"/jobs/{body['jobId']}")
    _, _, samples = await scrape(api)
    assert value(samples, "imgserve_jobs_accepted_total", operation="resize") == 1
    for phase in ("download", "plan", "placeholder"):
        count = value(samples, "imgserve_job_phase_duration_seconds_count", phase=phase)
        assert count == 1, phase
    assert value(samples, "imgserve_download_bytes_total", scheme="http") == len(source)
    assert value(samples, "imgserve_upload_bytes_total", scheme="file") > 0
    assert value(samples, "imgserve_queue_jobs", state="queued") == 1
    assert value(samples, "imgserve_queue_lane_jobs", lane="interactive") == 1
    assert value(samples, "imgserve_queue_lane_jobs", lane="batch") == 0
    assert (
        value(
            samples,
            "imgserve_http_request_duration_seconds_count",
            route="/jobs",
            method="POST",
            status="202",
        )
        == 1
    )
    # The route, never the raw path: a job id in a label would grow without bound.
    by_route = value(
        samples,
        "imgserve_http_request_duration_seconds_count",
        route="/jobs/{job_id}",
        method="GET",
        status="200",
    )
    assert by_route == 1
    assert not any(body["jobId"] in str(labels) for _, labels in samples)


async def test_a_refused_job_is_counted_by_its_code(
    api: API, http_server: HTTPTestServer, tmp_path: Path
) -> None:
    """A job whose source is not there is refused (its code in the reply) and counted
    under that code, not as accepted."""
    job = {
        "source": http_server.url("/files/metrics/Missing.jpg"),
        "outputs": [{"url": f"file://{tmp_path}/out/b.png", "width": 64}],
    }
    status, body = await request(api, "POST", "/jobs", job)
    assert status >= 400, body
    _, _, samples = await scrape(api)
    assert value(samples, "imgserve_jobs_refused_total", code=str(body["code"])) == 1
    assert value(samples, "imgserve_jobs_accepted_total", operation="resize") == 0
    refused = value(
        samples,
        "imgserve_http_request_duration_seconds_count",
        route="/jobs",
        method="POST",
        status=str(status),
    )
    assert refused == 1


async def test_an_unmatched_path_is_one_label_not_its_path(api: API) -> None:
    """Requests to paths no route matches share the route label "unmatched" (404)."""
    for n in range(3):
        status, _ = await request(api, "GET", f"/no/such/{n}")
        assert status == 404
    _, _, samples = await scrape(api)
    count = value(
        samples,
        "imgserve_http_request_duration_seconds_count",
        route="unmatched",
        method="GET",
        status="404",
    )
    assert count == 3
    assert not any("/no/such" in str(labels) for _, labels in samples)


def test_each_service_has_its_own_registry() -> None:
    """Two Metrics in one process count apart (no global registry to collide in)."""
    first, second = Metrics(), Metrics()
    first.accepted.labels("resize").inc(3)
    _, one = parse(first.render().decode())
    _, two = parse(second.render().decode())
    assert value(one, "imgserve_jobs_accepted_total", operation="resize") == 3
    assert value(two, "imgserve_jobs_accepted_total", operation="resize") == 0


async def test_queue_depth_goes_missing_when_the_queue_is_down() -> None:
    """A queue that cannot be read leaves out the depth; the rest is still served."""
    metrics = Metrics()

    async def broken() -> dict[str, int]:
        raise ConnectionError("queue down")

    metrics.watch_queue(broken, broken)
    await metrics.refresh()
    types, _ = parse(metrics.render().decode())
    assert "imgserve_queue_jobs" not in types and "imgserve_queue_lane_jobs" not in types
    assert "imgserve_jobs_accepted" in types


def test_pool_gauges_read_at_scrape_time() -> None:
    """The pool's configured and alive processes, their memory and its restarts are
    read when scraped (this process stands in for a worker)."""
    import os

    metrics = Metrics()
    restarts = [0]
    peak: list[int | None] = [None]
    metrics.watch_pool(2, lambda: [os.getpid()], lambda: restarts[0], lambda: peak[0])
    assert "imgserve_vips_memory_peak_bytes" not in parse(metrics.render().decode())[0]
    restarts[0] = 4
    peak[0] = 5 << 20
    _, samples = parse(metrics.render().decode())
    assert value(samples, "imgserve_workers", state="configured") == 2
    assert value(samples, "imgserve_workers", state="alive") == 1
    assert value(samples, "imgserve_workers_resident_memory_bytes") > 1 << 20
    assert value(samples, "imgserve_worker_pool_restarts_total") == 4
    assert value(samples, "imgserve_vips_memory_peak_bytes") == 5 << 20


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.1:0", ":9100", "host:port", "a:70000"])
def test_a_bad_metrics_listen_address_is_refused(address: str) -> None:
    """--metrics-listen wants HOST:PORT with a port 1-65535 (SettingsError naming it)."""
    with pytest.raises(config.SettingsError, match="metrics_listen"):
        config.load({"metrics_listen": address})


def test_metrics_listen_takes_ipv6_in_brackets() -> None:
    """[::1]:9100 is host ::1, port 9100."""
    settings = config.load({"metrics_listen": "[::1]:9100"})
    assert settings.server.metrics_listen == "[::1]:9100"
    assert config.listen_address("[::1]:9100") == ("::1", 9100)


async def test_a_metrics_address_in_use_names_the_flag() -> None:
    """--metrics-listen on a port already taken: a StartupError naming the flag and
    the address (not the main port's "address in use")."""
    import contextlib
    import socket

    from imgserve import daemon

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        async with contextlib.AsyncExitStack() as stack:
            with pytest.raises(daemon.StartupError, match=f"--metrics-listen {address}: "):
                await daemon._serve_metrics(stack, Metrics(), address)


async def test_the_metrics_listener_serves_metrics_alone(unused_tcp_port: int) -> None:
    """The --metrics-listen app answers /metrics with the exposition, nothing else."""
    import contextlib

    from imgserve import daemon

    metrics = Metrics()
    metrics.accepted.labels("rasterize").inc()
    address = f"127.0.0.1:{unused_tcp_port}"
    async with contextlib.AsyncExitStack() as stack:
        await daemon._serve_metrics(stack, metrics, address)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://{address}/metrics") as resp:
                assert resp.status == 200
                _, samples = parse(await resp.text())
            async with session.get(f"http://{address}/health") as resp:
                assert resp.status == 404
    assert value(samples, "imgserve_jobs_accepted_total", operation="rasterize") == 1

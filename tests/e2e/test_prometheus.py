"""A real Prometheus scraping real daemons: Debian's ``prometheus`` (scripts/test.sh
installs it) scrapes ``--metrics-listen`` every second, and its query API must show
the counters reach the number of jobs the test ran; the embedded daemon, then an API
node and a worker node in distributed mode. Also: ``/metrics`` on the main port
takes a key like every endpoint, the ``--metrics-listen`` address none."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import jpeg, resize, serve
from tests.e2e.test_durability import Node, _wait_nodes
from tests.e2e.test_keys import Client, keys_add
from tests.redis_server import RedisServer
from tests.servers import HTTPTestServer, free_port

pytestmark = pytest.mark.slow

SCRAPE_INTERVAL = "1s"
WAIT_S = 60.0


class Prometheus:
    """One ``prometheus`` process scraping ``targets`` (job name -> host:port list)."""

    def __init__(self, directory: Path, targets: dict[str, list[str]]) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus is not installed: run scripts/test.sh (it installs it)")
        directory.mkdir()
        config = {  # JSON is YAML: no YAML writer needed
            "global": {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_INTERVAL},
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": addresses}]}
                for job, addresses in targets.items()
            ],
        }
        (directory / "prometheus.yml").write_text(json.dumps(config))
        self.port = free_port()
        self.log = directory / "prometheus.log"
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "wb"),  # noqa: SIM115 - closed with the process
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-2000:]
            try:
                with urllib.request.urlopen(self._url("/-/ready"), timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"prometheus not ready: {self.log.read_text()[-2000:]}")

    def _url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def query(self, expr: str) -> dict[str, Any]:
        """``/api/v1/query``'s answer to ``expr`` (status, data)."""
        url = self._url("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                answer: dict[str, Any] = json.loads(reply.read())
        except urllib.error.HTTPError as exc:  # a bad query: 400 with the error
            answer = json.loads(exc.read())
        return answer

    def value(self, expr: str) -> float | None:
        """The value of a query answering one sample (None: no sample yet)."""
        answer = self.query(expr)
        assert answer["status"] == "success", answer
        result = answer["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, expr: str, expected: float) -> None:
        """Until ``expr`` equals ``expected`` (scrapes are 1 s apart), else fail."""
        deadline = time.monotonic() + WAIT_S
        seen = None
        while time.monotonic() < deadline:
            seen = self.value(expr)
            if seen == expected:
                return
            time.sleep(0.2)
        raise AssertionError(f"{expr} is {seen}, not {expected}, after {WAIT_S:g} s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Any]:
    """Start Prometheus scraping given targets; stopped at the end."""
    started: list[Prometheus] = []

    def start(targets: dict[str, list[str]]) -> Prometheus:
        server = Prometheus(tmp_path / f"prometheus{len(started)}", targets)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def fetch(url: str, token: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


OPERATING = Path(__file__).parents[2] / "docs" / "operating.md"


def doc_queries() -> list[str]:
    """The PromQL of each dashboard panel in docs/operating.md (that section's table)."""
    section = OPERATING.read_text().split("## A dashboard", 1)[1].split("\n## ", 1)[0]
    queries = []
    for line in section.splitlines():
        cells = line.split(" | ")
        if line.startswith("| ") and len(cells) == 2 and "`" in cells[1]:
            queries += [q.replace("\\|", "|") for q in re.findall(r"`([^`]+)`", cells[1])]
    return queries


def test_prometheus_counts_the_jobs_a_daemon_ran(
    start_daemon: Any, prometheus: Any, http_server: HTTPTestServer, tmp_path: Path
) -> None:
    """Three jobs done and one whose worker crashed (603, one attempt): Prometheus,
    scraping --metrics-listen without a key, reads 3 done, 4 accepted, 1 failed with
    code 603, 1 worker restart and 4 renders; the main port's /metrics wants the key."""
    keys_file = tmp_path / "keys.toml"
    token = keys_add(keys_file, "ops")
    metrics_at = f"127.0.0.1:{free_port()}"
    daemon = start_daemon(
        "--keys", str(keys_file), "--metrics-listen", metrics_at, "--max-attempts", "1"
    )
    server = prometheus({"imgserve": [metrics_at]})
    client = Client(daemon, token, [])
    ids = []
    for n in range(3):
        src = serve(http_server, f"prom/{n}.jpg", jpeg(200, 150))
        reply = client.post(resize(src, f"file://{daemon.out_dir}/prom-{n}.jpg", width=40))
        assert reply.status == 200, reply.body
        ids.append(reply.body["jobId"])
    # The good ones end first: with --max-attempts 1, a job rendering when another's
    # worker crashes may fail with it (a broken pool fails what it held, retryably).
    ends = [client.wait(job_id) for job_id in ids]
    assert [end["state"] for end in ends] == ["done"] * 3, ends
    crash = serve(http_server, "prom/crash.jpg", jpeg(200, 150, b"IMGSERVE-FAULT-SEGV"))
    reply = client.post(resize(crash, f"file://{daemon.out_dir}/crash.jpg", width=40))
    assert reply.status == 200, reply.body
    assert client.wait(reply.body["jobId"])["state"] == "failed"

    server.wait_for('sum(imgserve_jobs_done_total{job="imgserve",operation="resize"})', 3)
    server.wait_for("sum(imgserve_jobs_accepted_total)", 4)
    server.wait_for('sum(imgserve_jobs_failed_total{code="603"})', 1)
    server.wait_for("sum(imgserve_worker_restarts_total)", 1)
    server.wait_for('sum(imgserve_job_phase_duration_seconds_count{phase="render"})', 4)
    server.wait_for('imgserve_queue_jobs{state="done"}', 3)
    server.wait_for('imgserve_workers{state="configured"}', 2)
    server.wait_for('sum(imgserve_queue_lane_jobs{job="imgserve"})', 0)
    # libvips' own accounting, read in the workers: a 200x150 decode holds pixels.
    server.wait_for("imgserve_vips_memory_peak_bytes > bool 100000", 1)
    queries = doc_queries()
    assert len(queries) >= 10
    for expr in queries:  # the documented queries parse and name metrics that exist
        answer = server.query(expr)
        assert answer["status"] == "success", (expr, answer)
        for name in re.findall(r"imgserve_\w+", expr):
            assert server.value(f'count({{__name__="{name}"}})'), (expr, name)

    status, body = fetch(f"{daemon.url}/metrics")
    assert status == 401 and json.loads(body)["code"] == 140
    status, body = fetch(f"{daemon.url}/metrics", token)
    assert status == 200
    names = {family.name for family in text_string_to_metric_families(body)}
    assert "imgserve_jobs_done" in names
    status, _ = fetch(f"http://{metrics_at}/metrics")
    assert status == 200


def test_a_worker_node_serves_its_own_metrics(
    start_daemon: Any,
    private_redis: RedisServer,
    prometheus: Any,
    http_server: HTTPTestServer,
    tmp_path: Path,
) -> None:
    """Distributed mode: the API node counts the jobs it accepted, the worker node
    (``imgserve worker --metrics-listen``) the jobs it ran, each scraped apart."""
    api_at, node_at = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    api = start_daemon("--queue", private_redis.url, "--metrics-listen", api_at)
    extra = ["--file-root", str(api.out_dir), "--metrics-listen", node_at]
    node = Node(private_redis.url, extra, tmp_path / "node.log")
    try:
        _wait_nodes(api, 1)
        server = prometheus({"api": [api_at], "node": [node_at]})
        for n in range(2):
            src = serve(http_server, f"prom/node-{n}.jpg", jpeg(200, 150))
            reply = api.post(resize(src, f"file://{api.out_dir}/node-{n}.jpg", width=40))
            assert reply.status == 200, reply.body
            assert api.wait(reply.body["jobId"])["state"] == "done"
        server.wait_for('sum(imgserve_jobs_accepted_total{job="api"})', 2)
        server.wait_for('sum(imgserve_jobs_done_total{job="node"})', 2)
        server.wait_for(
            'sum(imgserve_job_phase_duration_seconds_count{job="node",phase="render"})', 2
        )
        server.wait_for('imgserve_workers{job="node",state="alive"}', 1)
        # The API node runs no jobs; the node has no queue depth (the API node's is the one).
        assert server.value('sum(imgserve_jobs_done_total{job="api"})') in (None, 0.0)
        assert server.value('imgserve_queue_jobs{job="node"}') is None
    finally:
        node.kill()

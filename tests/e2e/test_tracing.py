"""Tracing with the real daemons: an API node and a worker node in distributed mode
send their spans over OTLP/HTTP to a collector (a loopback HTTP server decoding the
protobuf export requests with opentelemetry-proto), and the job's trace crosses the
Redis queue. Without tracing, the daemon and its processes import no OpenTelemetry
module at all (the interpreter's import log, PYTHONPROFILEIMPORTTIME, says so)."""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from tests.e2e.conftest import jpeg, resize, serve
from tests.e2e.test_durability import Node, _wait_nodes
from tests.redis_server import RedisServer
from tests.servers import HTTPTestServer

pytestmark = pytest.mark.slow

WAIT_S = 60.0


@dataclass(frozen=True)
class Received:
    """One span as the collector got it, with its resource's attributes."""

    resource: dict[str, Any]
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    status_code: int


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind is not None else None


class Collector:
    """An OTLP/HTTP trace receiver on 127.0.0.1 (``url`` is its base URL)."""

    def __init__(self) -> None:
        self.spans: list[Received] = []
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                collector.receive(ExportTraceServiceRequest.FromString(body))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def receive(self, request: ExportTraceServiceRequest) -> None:
        with self.lock:
            for resource_spans in request.resource_spans:
                resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append(
                            Received(
                                resource=resource,
                                name=span.name,
                                trace_id=span.trace_id.hex(),
                                span_id=span.span_id.hex(),
                                parent_span_id=span.parent_span_id.hex(),
                                attributes={a.key: _value(a.value) for a in span.attributes},
                                status_code=span.status.code,
                            )
                        )

    def named(self, name: str) -> list[Received]:
        with self.lock:
            return [span for span in self.spans if span.name == name]

    def wait_for(self, name: str) -> Received:
        deadline = time.monotonic() + WAIT_S
        while not self.named(name):
            assert time.monotonic() < deadline, f"no {name!r} span arrived"
            time.sleep(0.05)
        [span] = self.named(name)
        return span

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def collector() -> Iterator[Collector]:
    receiver = Collector()
    yield receiver
    receiver.close()


def test_a_job_is_one_trace_across_an_api_node_and_a_worker_node(
    start_daemon: Any,
    private_redis: RedisServer,
    collector: Collector,
    http_server: HTTPTestServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """--otlp-endpoint on both nodes: the API node's POST / span and the worker node's
    job span reach the collector in one trace, the job's a child of the request's,
    both with the job id; OTEL_SERVICE_NAME names the service, as the spec says."""
    monkeypatch.setenv("OTEL_SERVICE_NAME", "imgserve-e2e")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # ms: export soon after the end
    tracing = ["--otlp-endpoint", collector.url]
    api = start_daemon("--queue", private_redis.url, *tracing)
    extra = ["--file-root", str(api.out_dir), *tracing]
    node = Node(private_redis.url, extra, tmp_path / "node.log")
    try:
        _wait_nodes(api, 1)
        _run_one_job(api, collector, http_server)
    finally:
        node.kill()


def _run_one_job(api: Any, collector: Collector, http_server: HTTPTestServer) -> None:
    src = serve(http_server, "trace/e2e.jpg", jpeg(320, 240))
    reply = api.post(resize(src, f"file://{api.out_dir}/trace/e2e.jpg", width=64))
    assert reply.status == 200, reply.body
    job_id = reply.body["jobId"]
    assert api.wait(job_id)["state"] == "done"
    request = collector.wait_for("POST /")
    attempt = collector.wait_for("job")
    upload = collector.wait_for("upload")
    assert request.parent_span_id == ""  # the root
    assert attempt.trace_id == request.trace_id == upload.trace_id
    assert attempt.parent_span_id == request.span_id
    assert upload.parent_span_id == attempt.span_id
    assert request.attributes["imgserve.job.id"] == attempt.attributes["imgserve.job.id"] == job_id
    assert attempt.attributes["imgserve.job.outcome"] == "done"
    assert request.resource["service.name"] == attempt.resource["service.name"] == "imgserve-e2e"
    assert {"download", "plan", "placeholder", "enqueue", "queue_wait", "render"} <= {
        span.name for span in collector.spans if span.trace_id == request.trace_id
    }


def test_without_tracing_the_daemon_imports_no_opentelemetry(
    start_daemon: Any, http_server: HTTPTestServer
) -> None:
    """A daemon started without tracing runs a job with OpenTelemetry installed but
    never imported, in the daemon or in its planner and worker processes."""
    daemon = start_daemon(env={"PYTHONPROFILEIMPORTTIME": "1"})
    src = serve(http_server, "trace/off.jpg", jpeg(320, 240))
    reply = daemon.post(resize(src, f"file://{daemon.out_dir}/trace/off.jpg", width=64))
    assert reply.status == 200, reply.body
    assert daemon.wait(reply.body["jobId"])["state"] == "done"
    assert daemon.cli("stop").returncode == 0
    imports = (daemon.state_dir / "imgserve.startup.log").read_text()
    assert "imgserve.worker" in imports and "pyvips" in imports  # the log is the import log
    assert "opentelemetry" not in imports

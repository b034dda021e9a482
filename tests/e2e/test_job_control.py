"""Job control through the real daemon: cancel while the workers are busy, the SSE
stream of a job that really runs, and a stream that does not hold up a stop."""

from __future__ import annotations

import http.client
import json
import time
from typing import Any

import pytest

from tests.e2e.conftest import Daemon, jpeg, post_jobs, serve
from tests.servers import HTTPTestServer

pytestmark = pytest.mark.slow


class EventStream:
    """``GET /events`` read line by line over a plain HTTP connection."""

    def __init__(self, daemon: Daemon, **headers: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=30)
        self.conn.request("GET", "/events", headers=headers)
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200
        assert self.resp.getheader("Content-Type", "").startswith("text/event-stream")

    def next(self) -> dict[str, str] | None:
        """The next event, or None once the daemon ended the stream."""
        event: dict[str, str] = {}
        while True:
            raw = self.resp.readline()
            if not raw:
                return None
            line = raw.decode().rstrip("\r\n")
            if not line:
                if event:
                    return event
            elif not line.startswith(":"):
                name, _, value = line.partition(": ")
                event[name] = value

    def close(self) -> None:
        self.conn.close()


def job(src: str, dst: str, **more: Any) -> dict[str, Any]:
    return {"source": src, "outputs": [{"url": dst, "width": 64}], **more}


def test_a_cancelled_job_is_never_rendered_or_uploaded(
    start_daemon: Any, http_server: HTTPTestServer
) -> None:
    """With every runner slot taken by slow jobs (one worker: two slots, one job
    asleep in a render and one waiting for the worker), a queued job is cancelled
    (200, cancelled); the slow jobs finish, a job queued after it runs, and the
    cancelled one never wrote its destination."""
    daemon: Daemon = start_daemon("--workers", "1")
    slow = serve(http_server, "jc/slow.jpg", jpeg(300, 200, b"IMGSERVE-FAULT-DELAY=2"))
    plain = serve(http_server, "jc/plain.jpg", jpeg(300, 200))
    out = daemon.out_dir
    busy = [
        post_jobs(daemon, job(slow, f"file://{out}/jc-busy{n}.jpg", placeholder=False))
        for n in range(2)
    ]
    for reply in busy:
        assert reply.status == 202, reply.body
        daemon.wait_running(reply.body["jobId"])
    doomed = post_jobs(daemon, job(plain, f"file://{out}/jc-doomed.jpg", placeholder=False))
    assert doomed.status == 202, doomed.body
    doomed_id = doomed.body["jobId"]
    answer = daemon.request("DELETE", f"/jobs/{doomed_id}")
    assert answer.status == 200, answer.body
    assert answer.body["state"] == "cancelled"
    after = post_jobs(daemon, job(plain, f"file://{out}/jc-after.jpg", placeholder=False))
    assert daemon.wait(after.body["jobId"])["state"] == "done"
    for reply in busy:
        assert daemon.wait(reply.body["jobId"])["state"] == "done"
    assert daemon.job(doomed_id)["state"] == "cancelled"
    assert not (out / "jc-doomed.jpg").exists()
    assert (out / "jc-after.jpg").exists()
    again = daemon.request("DELETE", f"/jobs/{after.body['jobId']}")
    assert (again.status, again.body["code"]) == (409, 613)


def test_the_stream_follows_a_real_job_and_a_stop_ends_it(
    start_daemon: Any, http_server: HTTPTestServer
) -> None:
    """An open stream shows job.queued, job.running and job.done for a job the
    daemon renders; resuming from the first id gives the other two; a stop with
    the stream open ends it and the daemon exits within seconds."""
    daemon: Daemon = start_daemon()
    src = serve(http_server, "jc/stream.jpg", jpeg(300, 200))
    stream = EventStream(daemon)
    try:
        reply = post_jobs(daemon, job(src, f"file://{daemon.out_dir}/jc-stream.jpg"))
        assert reply.status == 202, reply.body
        job_id = reply.body["jobId"]
        events = [stream.next() for _ in range(3)]
        assert [e and e["event"] for e in events] == ["job.queued", "job.running", "job.done"]
        assert {json.loads(e["data"])["jobId"] for e in events if e} == {job_id}
        first = events[0]
        assert first is not None
        resumed = EventStream(daemon, **{"Last-Event-ID": first["id"]})
        try:
            assert [resumed.next(), resumed.next()] == events[1:]
        finally:
            resumed.close()
        began = time.monotonic()
        result = daemon.cli("stop")
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - began < 10  # the stream did not hold the stop
        assert stream.next() is None
    finally:
        stream.close()

"""A new job's reply is not held up by slow transfers of other jobs (the real daemon)."""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

import pytest

from tests.e2e.conftest import jpeg, resize, serve
from tests.servers import FTPTestServer, HTTPTestServer

pytestmark = pytest.mark.slow

SLOW_JOBS = 20


def test_slow_ftp_uploads_do_not_stall_a_new_jobs_reply(
    start_daemon: Any, http_server: HTTPTestServer, ftp_slow_server: FTPTestServer
) -> None:
    """With 20 placeholder uploads crawling to a 2 KiB/s FTP server (more than the
    event loop's default thread pool holds), a job from a named host to file://
    still gets its reply while every slow one is still waiting for its own."""
    daemon = start_daemon()
    big = serve(http_server, "iso/big.jpg", jpeg(1200, 900))
    ftp = ftp_slow_server

    def slow(n: int) -> Any:
        return daemon.post(resize(big, ftp.url(f"iso/{n}.jpg"), width=1200))

    with concurrent.futures.ThreadPoolExecutor(SLOW_JOBS) as clients:
        pending = [clients.submit(slow, n) for n in range(SLOW_JOBS)]
        deadline = time.monotonic() + 60
        while daemon.request("GET", "/health").body["intake"]["jobs"] < SLOW_JOBS:
            assert time.monotonic() < deadline, daemon.request("GET", "/health").body
            time.sleep(0.05)
        while sum(1 for cmd, _ in ftp.state.commands if cmd == "STOR") < 6:
            assert time.monotonic() < deadline, "the slow uploads never started"
            time.sleep(0.05)

        # A host name (resolved on the loop's default threads) and a file:// upload.
        quick_src = serve(http_server, "iso/quick.jpg", jpeg(300, 200))
        quick_src = quick_src.replace("127.0.0.1", "localhost")
        reply = daemon.post(resize(quick_src, f"file://{daemon.out_dir}/iso/q.jpg", width=30))
        waiting = sum(1 for future in pending if not future.done())

        assert reply.status == 200, reply.body
        assert waiting == SLOW_JOBS  # none of the slow ones had its reply yet
        assert daemon.wait(reply.body["jobId"])["state"] == "done"
        for future in pending:
            assert future.result().status == 200

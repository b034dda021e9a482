"""API keys through the real daemon: 401 without a key or with a wrong one, scopes
refusing sources and destinations before anything is downloaded or uploaded, the
key's limits, its rate, each key seeing only its own jobs (an admin key all), the
secrets absent from every log line and reply, 0.2's POST / with and without keys,
and Redis mode with a worker node that has no keys file."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import WebhookVerificationError

from tests.e2e.conftest import IMGSERVE, Daemon, Reply, jpeg, post_jobs, resize, serve
from tests.e2e.test_durability import Node
from tests.redis_server import RedisServer
from tests.servers import HTTPTestServer
from tests.webhook_receiver import Receiver, receiver_fixture  # noqa: F401 - a fixture

pytestmark = pytest.mark.slow

KEY_SECRET = "whsec_" + base64.b64encode(b"the hooked key's own signing key").decode()
SERVER_SECRET = "whsec_" + base64.b64encode(b"the server's webhook signing key!").decode()


class Client:
    """Requests to a daemon as one caller (``token`` None: no Authorization header);
    every raw reply is kept, to look for secrets in."""

    def __init__(self, daemon: Daemon, token: str | None, seen: list[bytes]) -> None:
        self.daemon = daemon
        self.token = token
        self.seen = seen

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.daemon.port, timeout=60)
        sent = {"Content-Type": "application/json"} if body is not None else {}
        if self.token is not None:
            sent["Authorization"] = f"Bearer {self.token}"
        sent.update(headers or {})
        try:
            conn.request(method, path, body, sent)
            resp = conn.getresponse()
            raw = resp.read()
            got = dict(resp.getheaders())
        finally:
            conn.close()
        self.seen.append(raw + json.dumps(got).encode())
        return Reply(resp.status, json.loads(raw), got)

    def post(self, job: dict[str, Any], headers: dict[str, str] | None = None) -> Reply:
        return self.request("POST", "/", json.dumps(job).encode(), headers)

    def jobs(self, job: dict[str, Any]) -> Reply:
        return self.request("POST", "/jobs", json.dumps(job).encode())

    def wait(self, job_id: str, timeout_s: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            body = self.request("GET", f"/jobs/{job_id}").body
            if body.get("state") in ("done", "failed"):
                return body
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} did not finish")


def keys_add(keys_file: Path, name: str, *flags: str) -> str:
    """``imgserve keys add`` for real; the key it prints once."""
    done = subprocess.run(
        [*IMGSERVE, "keys", "add", name, "--keys", str(keys_file), *flags],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


@dataclass
class Keyed:
    daemon: Daemon
    files: Path
    """A file root only the ``scoped`` key's file:// scope covers part of."""
    base: str
    """The HTTP test server's /files/ URL."""
    secrets: dict[str, str]
    seen: list[bytes]

    def as_(self, name: str | None) -> Client:
        return Client(self.daemon, self.secrets[name] if name else None, self.seen)


@pytest.fixture(scope="module")
def keyed(
    start_module_daemon: Any, http_server: HTTPTestServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Keyed]:
    """One daemon with a keys file made by ``imgserve keys add``."""
    base = str(http_server.url("/files/"))
    files = tmp_path_factory.mktemp("files")
    keys_file = files.parent / f"{files.name}-keys.toml"
    secrets = {
        "scoped": keys_add(
            keys_file, "scoped",
            "--sources", f"{base}keys/ok/",
            "--destinations", f"{base}keys/out/", f"file://{files}/u/",
            "--max-download-bytes", "30000",
        ),
        "limited": keys_add(keys_file, "limited", "--rate", "0.05", "--burst", "1"),
        "alice": keys_add(keys_file, "alice"),
        "bob": keys_add(keys_file, "bob"),
        "ops": keys_add(keys_file, "ops", "--admin"),
        "small": keys_add(keys_file, "small", "--max-pixels", "10000", "--max-outputs", "1"),
        "redirector": keys_add(
            keys_file, "redirector",
            "--sources", str(http_server.url("/redirect")),
            "--destinations", f"file://{files}/u/",
        ),
    }  # fmt: skip
    daemon = start_module_daemon("--keys", str(keys_file), "--file-root", str(files))
    yield Keyed(daemon, files, base, secrets, [])


def test_no_key_is_401_in_0_2_shape_and_probes_stay_open(keyed: Keyed) -> None:
    """Without Authorization: 401 code 140 with WWW-Authenticate on POST / (0.2's
    reply shape), POST /jobs and GET /jobs; /health and /livez answer without one."""
    anonymous = keyed.as_(None)
    reply = anonymous.post(resize(f"{keyed.base}keys/ok/a.jpg", "file:///tmp/x.jpg", width=8))
    assert reply.status == 401
    assert reply.body["msg"] == "request invalid" and reply.body["code"] == 140
    assert reply.headers["WWW-Authenticate"].startswith("Bearer")
    assert anonymous.request("POST", "/jobs", b"{}").body["code"] == 140
    assert anonymous.request("GET", "/jobs").status == 401
    basic = anonymous.request("GET", "/jobs", headers={"Authorization": "Basic YTpi"})
    assert basic.body["code"] == 140
    assert anonymous.request("GET", "/health").status == 200
    assert anonymous.request("GET", "/livez").body == {"status": "alive"}


def test_wrong_key_is_401_141(keyed: Keyed) -> None:
    """A key the server does not know, or a known one cut short: 401 code 141."""
    for wrong in ("isk_" + "x" * 43, keyed.secrets["alice"][:-1]):
        reply = Client(keyed.daemon, wrong, keyed.seen).request("GET", "/jobs")
        assert (reply.status, reply.body["code"]) == (401, 141)
        assert 'error="invalid_token"' in reply.headers["WWW-Authenticate"]


def test_0_2_post_with_a_key_runs_and_names_the_key(
    keyed: Keyed, http_server: HTTPTestServer
) -> None:
    """0.2's POST / with only the Authorization header added: 0.2's reply, the job
    done inside the key's scope, its view and log line naming the key."""
    scoped = keyed.as_("scoped")
    src = serve(http_server, "keys/ok/a.jpg", jpeg(160, 120))
    reply = scoped.post(resize(src, f"file://{keyed.files}/u/a.jpg", width=32))
    assert reply.status == 200, reply.body
    assert set(reply.body) == {"dstURL", "jobId"}
    final = scoped.wait(reply.body["jobId"])
    assert (final["state"], final["key"]) == ("done", "scoped")
    assert (keyed.files / "u/a.jpg").stat().st_size > 0
    log = (keyed.daemon.state_dir / "imgserve.log").read_text()
    assert f"job {reply.body['jobId']} accepted key=scoped" in log
    assert f"job {reply.body['jobId']} done attempt=1 outputs=1 key=scoped" in log


def test_destination_out_of_scope_gets_nothing_not_even_a_placeholder(
    keyed: Keyed, http_server: HTTPTestServer
) -> None:
    """403 code 143 naming the refused URL (redacted), for an HTTP and a file
    destination, a template with a size tag and a job whose other output is in
    scope: nothing is uploaded anywhere."""
    scoped = keyed.as_("scoped")
    src = serve(http_server, "keys/ok/b.jpg", jpeg(160, 120))
    state = http_server.state
    refused = [
        (f"{keyed.base}keys/elsewhere/b.jpg?token=hunter2", "keys/elsewhere/b.jpg"),
        (f"{keyed.base}keys/elsewhere/{{$width}}.jpg", "keys/elsewhere/32.jpg"),
        (f"{keyed.base}keys/out/../elsewhere/c.jpg", "keys/elsewhere/c.jpg"),
    ]
    for dst, name in refused:
        reply = scoped.post(resize(src, dst, width=32))
        assert (reply.status, reply.body["code"]) == (403, 143), reply.body
        assert "hunter2" not in reply.body["detail"]
        assert name not in state.files and state.attempts[name] == 0
    reply = scoped.post(resize(src, f"file://{keyed.files}/v/b.jpg", width=32))
    assert (reply.status, reply.body["code"]) == (403, 143)
    assert f"file://{keyed.files}/v/b.jpg" in reply.body["detail"]
    assert not (keyed.files / "v").exists()
    two = scoped.jobs(
        {
            "source": src,
            "outputs": [
                {"url": f"{keyed.base}keys/out/ok.jpg", "width": 16},
                {"url": f"{keyed.base}keys/elsewhere/{{$width}}.jpg", "width": 24},
            ],
        }
    )
    assert (two.status, two.body["code"]) == (403, 143)
    assert two.body["detail"].startswith("outputs[1]: ")
    assert "keys/out/ok.jpg" not in state.files and state.attempts["keys/out/ok.jpg"] == 0


def test_source_out_of_scope_is_refused_before_any_download(keyed: Keyed) -> None:
    """403 code 142: the source's server is never connected to."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        src = f"http://127.0.0.1:{port}/keys/ok/a.jpg"
        reply = keyed.as_("scoped").post(resize(src, f"file://{keyed.files}/u/s.jpg", width=8))
        assert (reply.status, reply.body["code"]) == (403, 142), reply.body
        assert src in reply.body["detail"]
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody knocked


def test_a_redirect_out_of_the_key_sources_is_refused(
    keyed: Keyed, http_server: HTTPTestServer
) -> None:
    """An in-scope source that redirects outside the key's sources: 403 code 142 naming
    where it led, nothing written (an open redirect on an allowed host leads nowhere)."""
    serve(http_server, "keys/private/secret.jpg", jpeg(300, 100))
    target = http_server.url("/files/keys/private/secret.jpg")
    src = f"{http_server.url('/redirect')}?to={target}"
    client = keyed.as_("redirector")
    reply = client.post(resize(src, f"file://{keyed.files}/u/redir.jpg", width=30))
    assert (reply.status, reply.body["code"]) == (403, 142), reply.body
    assert "/files/keys/private/secret.jpg" in reply.body["detail"]
    assert not (keyed.files / "u" / "redir.jpg").exists()


def test_source_over_the_key_limit_is_413(keyed: Keyed, http_server: HTTPTestServer) -> None:
    """A source the server would take but over the key's max_download_bytes: 301."""
    big = jpeg(1600, 1200)
    assert 30000 < len(big) < 100 * 1024 * 1024
    src = serve(http_server, "keys/ok/big.jpg", big)
    reply = keyed.as_("scoped").post(resize(src, f"file://{keyed.files}/u/big.jpg", width=8))
    assert (reply.status, reply.body["code"]) == (413, 301), reply.body
    assert "max_download_bytes" in reply.body["detail"]
    other = keyed.as_("alice").post(resize(src, f"file://{keyed.daemon.out_dir}/big.jpg", width=8))
    assert other.status == 200, other.body


def test_key_pixel_and_output_limits_tighten_the_servers(
    keyed: Keyed, http_server: HTTPTestServer
) -> None:
    """A source over the key's max_pixels is 302, two outputs over its max_outputs
    704; the same jobs from a key without limits are accepted."""
    src = serve(http_server, "keys/any/px.jpg", jpeg(160, 120))  # 19,200 pixels
    out = keyed.daemon.out_dir
    job = resize(src, f"file://{out}/px.jpg", width=16)
    small, alice = keyed.as_("small"), keyed.as_("alice")
    refused = small.post(job)
    assert (refused.status, refused.body["code"]) == (422, 302), refused.body
    assert alice.post(job).status == 200
    outputs = [{"url": f"file://{out}/o{i}.jpg", "width": 8} for i in (1, 2)]
    two = {"source": src, "outputs": outputs}
    assert small.jobs(two).body["code"] == 704
    assert alice.jobs(two).status == 202


def test_rate_limited_key_gets_429_with_retry_after(keyed: Keyed) -> None:
    """Its burst of one, then 429 code 144 with Retry-After; other keys are not held."""
    limited = keyed.as_("limited")
    first = limited.request("POST", "/jobs", b"{}")
    assert first.status == 400  # the token is spent on arrival, whatever the body
    second = limited.request("POST", "/jobs", b"{}")
    assert (second.status, second.body["code"]) == (429, 144)
    assert int(second.headers["Retry-After"]) >= 1
    assert keyed.as_("alice").request("POST", "/jobs", b"{}").status == 400


def _stream_job_ids(client: Client, until_job: str, timeout_s: float = 30.0) -> list[str]:
    """Job ids of the change stream from its start until ``until_job`` is done."""
    conn = http.client.HTTPConnection("127.0.0.1", client.daemon.port, timeout=timeout_s)
    assert client.token is not None
    conn.request("GET", "/events?after=0", headers={"Authorization": f"Bearer {client.token}"})
    resp = conn.getresponse()
    assert resp.status == 200
    ids: list[str] = []
    try:
        while True:
            line = resp.fp.readline().decode()
            if line.startswith("data: "):
                data = json.loads(line[6:])
                ids.append(data["jobId"])
                if data["jobId"] == until_job and data["state"] == "done":
                    return ids
    finally:
        conn.close()


def test_keys_see_only_their_own_jobs_and_admin_sees_all(
    keyed: Keyed, http_server: HTTPTestServer
) -> None:
    """alice lists, reads, cancels, re-sends and streams only her jobs (bob's answer
    404 like an unknown one); ops (admin) sees both; one Idempotency-Key value used
    by both keys makes two jobs."""
    alice, bob, ops = keyed.as_("alice"), keyed.as_("bob"), keyed.as_("ops")
    src = serve(http_server, "keys/any/own.jpg", jpeg(160, 120))
    out = keyed.daemon.out_dir
    same = {"Idempotency-Key": "order-1"}
    bobs = bob.post(resize(src, f"file://{out}/own/bob.jpg", width=16), same).body["jobId"]
    assert bob.wait(bobs)["key"] == "bob"
    alices = alice.post(resize(src, f"file://{out}/own/alice.jpg", width=16), same).body["jobId"]
    assert alices != bobs
    assert alice.wait(alices)["key"] == "alice"

    listed = [job["jobId"] for job in alice.request("GET", "/jobs?limit=100").body["jobs"]]
    assert alices in listed and bobs not in listed
    everyone = [job["jobId"] for job in ops.request("GET", "/jobs?limit=100").body["jobs"]]
    assert {alices, bobs} <= set(everyone)
    unknown = alice.request("GET", "/jobs/" + "0" * 32).body
    for method, path in (
        ("GET", f"/jobs/{bobs}"),
        ("DELETE", f"/jobs/{bobs}"),
        ("POST", f"/jobs/{bobs}/webhook"),
    ):
        reply = alice.request(method, path)
        assert (reply.status, reply.body["code"]) == (404, 605)
        assert reply.body["detail"].replace(bobs, "0" * 32) == unknown["detail"]
    assert ops.request("GET", f"/jobs/{bobs}").body["key"] == "bob"
    streamed = _stream_job_ids(alice, alices)
    assert alices in streamed and bobs not in streamed
    assert bobs in _stream_job_ids(ops, alices)


def test_secrets_never_appear_in_logs_or_replies(keyed: Keyed, http_server: HTTPTestServer) -> None:
    """After accepted, refused and listed requests of every kind, no key's secret is in
    the daemon's log or in any reply seen by this module's tests."""
    src = serve(http_server, "keys/ok/s.jpg", jpeg(64, 48))
    for name in keyed.secrets:
        client = keyed.as_(name)
        client.post(resize(src, f"file://{keyed.files}/u/s-{name}.jpg", width=8))
        client.request("GET", "/jobs")
        client.request("GET", "/jobs/" + "f" * 32)
        Client(keyed.daemon, keyed.secrets[name] + "x", keyed.seen).request("GET", "/jobs")
    log = (keyed.daemon.state_dir / "imgserve.log").read_text()
    assert "accepted key=" in log
    assert len(keyed.seen) > 20
    for secret in keyed.secrets.values():
        assert secret not in log
        assert secret[4:] not in log  # nor without its prefix
        assert not any(secret.encode() in raw for raw in keyed.seen)


def test_without_keys_0_2_is_unchanged(start_daemon: Any, http_server: HTTPTestServer) -> None:
    """No keys file: POST / needs no header (one sent is ignored); the view's key is null."""
    daemon: Daemon = start_daemon()
    src = serve(http_server, "keys/nokeys.jpg", jpeg(160, 120))
    reply = daemon.post(resize(src, f"file://{daemon.out_dir}/nokeys.jpg", width=16))
    assert reply.status == 200 and set(reply.body) == {"dstURL", "jobId"}
    assert daemon.wait(reply.body["jobId"])["key"] is None
    listed = Client(daemon, "isk_anything", []).request("GET", "/jobs")
    assert listed.status == 200


def test_start_warns_beyond_loopback_only_without_keys(tmp_path: Path) -> None:
    """``imgserve start`` on 0.0.0.0 without keys names the risk on stderr; with a
    keys file (or on 127.0.0.1) it does not."""
    keys_file = tmp_path / "keys.toml"
    keys_add(keys_file, "k")
    for extra, warned in (([], True), (["--keys", str(keys_file)], False)):
        daemon = Daemon(tmp_path / f"s{len(extra)}", tmp_path / "out", [*extra])
        daemon.args[daemon.args.index("127.0.0.1")] = "0.0.0.0"
        started = daemon.cli("start")
        try:
            assert started.returncode == 0, started.stderr
            assert ("no API keys are configured" in started.stderr) is warned
            assert ("docs/security.md" in started.stderr) is warned
        finally:
            assert daemon.cli("stop").returncode == 0


def test_a_bad_keys_file_stops_start_naming_the_file_and_entry(tmp_path: Path) -> None:
    """``imgserve start --keys FILE`` with a broken entry exits 1 before detaching."""
    bad = tmp_path / "keys.toml"
    bad.write_text('[[keys]]\nname = "k"\nsecret_sha256 = "00"\n')
    daemon = Daemon(tmp_path / "state", tmp_path / "out", ["--keys", str(bad)])
    started = daemon.cli("start")
    assert started.returncode == 1
    assert f"{bad}: keys[0] ('k'): secret_sha256" in started.stderr
    assert not (tmp_path / "state/imgserve.pid").exists()


def test_redis_mode_keys_on_the_api_node_and_a_worker_without_keys(
    start_daemon: Any,
    private_redis: RedisServer,
    http_server: HTTPTestServer,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    """The API node checks keys; a worker node with no keys file runs the job, and
    the job's event reaches the receiver signed with the key's own secret (the
    worker leaves it to the API node, which has the key)."""
    keys_file = tmp_path / "keys.toml"
    token = keys_add(keys_file, "hooked", "--webhook-secret-env", "HOOKED_SECRET")
    secrets_file = tmp_path / "webhook-secrets"
    secrets_file.write_text(SERVER_SECRET)
    flags = ["--webhook-secrets-file", str(secrets_file), "--set", "webhook_timeout_s=2"]
    api: Daemon = start_daemon(
        "--queue", private_redis.url, "--keys", str(keys_file), *flags,
        env={"HOOKED_SECRET": KEY_SECRET},
    )  # fmt: skip
    node = Node(private_redis.url, ["--file-root", str(api.out_dir), *flags], tmp_path / "node.log")
    try:
        assert Client(api, None, []).request("GET", "/jobs").status == 401
        src = serve(http_server, "keys/redis.jpg", jpeg(160, 120))
        job = resize(src, f"file://{api.out_dir}/redis.jpg", width=16)
        job_id = post_jobs_as(api, token, job, receiver.url())
        client = Client(api, token, [])
        final = client.wait(job_id)
        assert (final["state"], final["key"]) == ("done", "hooked")
        assert final["node"] != api.request("GET", "/health").body.get("node")
        receiver.wait_for(1)
        (payload,) = receiver.verified(KEY_SECRET)
        assert payload["data"]["jobId"] == job_id
        with pytest.raises(WebhookVerificationError):
            receiver.verified(SERVER_SECRET)
    finally:
        node.kill()
    assert KEY_SECRET not in (tmp_path / "node.log").read_text()
    assert token not in (api.state_dir / "imgserve.log").read_text()


def post_jobs_as(daemon: Daemon, token: str, job: dict[str, Any], webhook: str) -> str:
    """A 0.2-style job sent to POST /jobs with a webhook, as ``token``; its id."""
    body = {
        "source": job["srcURL"],
        "outputs": [{"url": job["dstURL"], "width": job["args"]["width"]}],
        "webhook": webhook,
    }
    reply = Client(daemon, token, []).jobs(body)
    assert reply.status == 202, reply.body
    return str(reply.body["jobId"])


_ = post_jobs  # the module's own client sends POST /jobs with a header

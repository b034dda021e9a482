"""schemathesis against a live daemon: every response matches the OpenAPI document.

One real ``imgserve start`` on loopback for the module, with a few real jobs in it
(done, failed) so that the job operations meet real jobs, and one with API keys.
schemathesis (4.x) generates requests from the document, each operation a bounded
number of times and derandomized, and checks: no 5xx, only documented statuses,
content types and headers, bodies that match their schemas, schema-invalid
requests refused, a method a path does not have answered 405 with Allow. Its state
machine follows the document's links (GET /jobs to a job's GET, DELETE and
webhook; POST /jobs or POST / to the same, when a generated job is accepted).
``positive_data_acceptance`` is left out: a schema-valid job names a source that is
not there (422, 201), and the validators refuse whole floats the schema's integers
take (tests/test_openapi.py).

``GET /events`` never ends, so it is not fuzzed: its reply and its refusals are
checked below, as is the job view of real jobs against the Job schema.
"""

from __future__ import annotations

import hashlib
import http.client
import json
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi import checks as openapi_checks

from imgserve import openapi
from tests.e2e.conftest import Daemon, jpeg
from tests.test_openapi import schema_of

pytestmark = pytest.mark.slow

SCHEMA = schemathesis.openapi.from_dict(openapi.document()).exclude(path="/events")
CHECKS = [
    schemathesis.checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_headers_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.negative_data_rejection,
    openapi_checks.unsupported_method,
    openapi_checks.allow_header_conformance,
    openapi_checks.missing_required_header,
]
DOC = openapi.document()


def documented_code(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    """A refusal's code is one its operation lists for that status (x-imgserve-codes):
    the Error schema alone takes any integer."""
    if case.method.upper() != case.operation.method.upper():  # a probe of another method
        return None
    operation = DOC["paths"][case.operation.path][case.operation.method.lower()]
    declared = operation["responses"].get(str(response.status_code), {})
    if "x-imgserve-codes" not in declared:
        return None
    code = json.loads(response.content).get("code") if response.content else None
    if code is not None and code not in declared["x-imgserve-codes"]:
        raise AssertionError(
            f"code {code} is not one {case.method} {case.operation.path} documents for "
            f"{response.status_code}: {declared['x-imgserve-codes']}"
        )
    return True


CHECKS.append(documented_code)
MAX_EXAMPLES = 25
"""Per operation (and per stateful run): the module stays within a minute or two."""


@pytest.fixture(scope="module")
def live(start_module_daemon: Any) -> Daemon:
    """A daemon holding a done job and a failed one, each with a webhook event (sent
    to a closed port: its delivery shows failed attempts)."""
    daemon: Daemon = start_module_daemon(
        "--workers", "1", "--webhook-url", "http://127.0.0.1:9/hook"
    )
    src = daemon.out_dir / "src"
    src.mkdir(exist_ok=True)
    (src / "Photo.jpg").write_bytes(jpeg(320, 240))
    (src / "Crash.jpg").write_bytes(jpeg(64, 48, b"IMGSERVE-FAULT-SEGV"))
    done = submit(daemon, src / "Photo.jpg", "done")
    failed = submit(daemon, src / "Crash.jpg", "failed")
    daemon.wait(done)
    daemon.wait(failed, timeout_s=120)
    return daemon


SECRET = "isk_openapi-live-test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def keyed(start_module_daemon: Any, tmp_path_factory: pytest.TempPathFactory) -> Daemon:
    """A daemon with a keys file (one key, whose secret the tests never send)."""
    keys_file = tmp_path_factory.mktemp("openapi-keys") / "keys.toml"
    digest = hashlib.sha256(SECRET.encode()).hexdigest()
    keys_file.write_text(f'[[keys]]\nname = "only"\nsecret_sha256 = "{digest}"\n')
    keys_file.chmod(0o600)
    daemon: Daemon = start_module_daemon("--workers", "1", "--keys", str(keys_file))
    return daemon


def submit(daemon: Daemon, source: Path, name: str) -> str:
    job = {
        "source": f"file://{source}",
        "outputs": [
            {"url": f"file://{daemon.out_dir}/{name}/{{$basename}}-{{$width}}.webp", "width": 64},
            {"url": f"file://{daemon.out_dir}/{name}/{{$basename}}.png", "height": 20},
        ],
        "metadata": {"case": name},
    }
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60)
    try:
        conn.request("POST", "/jobs", json.dumps(job), {"Content-Type": "application/json"})
        reply = conn.getresponse()
        body = json.loads(reply.read())
    finally:
        conn.close()
    assert reply.status == 202, body
    return str(body["jobId"])


@SCHEMA.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_answers_as_documented(case: schemathesis.Case, live: Daemon) -> None:
    """Each operation's generated requests (valid and invalid) get documented answers:
    no 5xx, a documented status, content type, headers and body."""
    case.call_and_validate(base_url=live.url, checks=CHECKS, timeout=30)


@SCHEMA.parametrize()
@settings(
    max_examples=10,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_keyed_daemon_answers_as_documented(case: schemathesis.Case, keyed: Daemon) -> None:
    """With API keys configured and no known key sent (none, or one schemathesis
    makes up), every keyed operation answers its documented 401 with
    WWW-Authenticate, and the open ones answer as without keys."""
    response = case.call_and_validate(base_url=keyed.url, checks=CHECKS, timeout=30)
    if (case.method.lower(), case.path) not in openapi.OPEN_OPERATIONS:
        assert response.status_code in (401, 405), response.text
    else:
        assert response.status_code != 401


def test_stateful_links_hold(live: Daemon) -> None:
    """Following the document's links (a job accepted, then read and cancelled), every
    answer is as documented."""

    class Workflow(SCHEMA.as_state_machine()):
        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"base_url": live.url, "timeout": 30}

        def validate_response(self, response: Any, case: schemathesis.Case, **kwargs: Any) -> None:
            case.validate_response(response, checks=CHECKS)

    Workflow.run(
        settings=settings(
            max_examples=MAX_EXAMPLES,
            stateful_step_count=4,
            derandomize=True,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
    )


def test_real_job_views_match_the_job_schema(live: Daemon) -> None:
    """The views of a done job (outputs with their previews, a webhook delivery) and
    a failed one (its error) are valid Job bodies and use every field it names."""
    listed = live.request("GET", "/jobs?limit=200").body
    schema_of("JobList").validate(listed)
    jobs = {job["metadata"].get("case"): job for job in listed["jobs"]}
    done, failed = jobs["done"], jobs["failed"]
    assert done["state"] == "done" and failed["state"] == "failed"
    for job in (done, failed):
        schema_of("Job").validate(live.job(job["jobId"]))
    named = set(DOC["components"]["schemas"]["Job"]["properties"])
    assert set(done) | set(failed) == named
    output_fields = set(done["outputs"][0])
    assert output_fields == set(DOC["components"]["schemas"]["OutputView"]["properties"])


def test_event_stream_is_as_documented(live: Daemon) -> None:
    """GET /events answers text/event-stream and its first event's data is a Change;
    a bad Last-Event-ID is a documented 400 Error body."""
    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=30)
    try:
        conn.request("GET", "/events?after=0")
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type", "").startswith("text/event-stream")
        data = None
        while data is None:
            line = response.readline().decode()
            if line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
        schema_of("Change").validate(data)
    finally:
        conn.close()
    bad = http.client.HTTPConnection("127.0.0.1", live.port, timeout=30)
    try:
        bad.request("GET", "/events", headers={"Last-Event-ID": "\x7f" * 3})
        refused = bad.getresponse()
        body = json.loads(refused.read())
    finally:
        bad.close()
    assert refused.status == 400
    operation = DOC["paths"]["/events"]["get"]
    assert body["code"] in operation["responses"]["400"]["x-imgserve-codes"]

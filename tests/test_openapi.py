"""The OpenAPI document agrees with the code (src/imgserve/openapi.py keeps it as data).

The kept file is what ``document()`` builds; it is valid OpenAPI 3.1; the app's
routes are exactly the documented operations; every error code has a documented
response with its HTTP status; the documented examples are valid for the schemas
and for the validators; the validators accept every request the schemas accept
(hypothesis-jsonschema) and the schemas every valid request of the property tests.
The live daemon against the document: tests/e2e/test_openapi_live.py.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from imgserve import api, auth, errors, openapi
from imgserve.config import Settings
from imgserve.planner import Planner
from imgserve.queue.sqlite import SQLiteQueue
from imgserve.request import validate
from imgserve.request_jobs import METADATA_MAX_BYTES, validate_jobs
from imgserve.transports import Transports
from tests.inprocess import start_api
from tests.test_property_request_jobs import MAX_OUTPUTS, valid_jobs

ROOT = Path(__file__).resolve().parents[1]
DOC = openapi.document()
METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")


def schema_of(name: str, doc: dict[str, Any] = DOC) -> Draft202012Validator:
    """A validator of ``components.schemas[name]``, its $refs resolved in ``doc``."""
    registry = Registry().with_resource("urn:imgserve", DRAFT202012.create_resource(doc))
    return Draft202012Validator(
        {"$ref": f"urn:imgserve#/components/schemas/{name}"}, registry=registry
    )


def operations(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in doc["paths"].items()
        for method in item
        if method in METHODS
    }


def test_kept_file_is_the_built_document() -> None:
    """src/imgserve/openapi.json is exactly document(): regenerate it after a change
    (python -m imgserve.openapi > src/imgserve/openapi.json)."""
    assert openapi.served().decode() == openapi.render(DOC)


def test_document_is_valid_openapi_31() -> None:
    """openapi-spec-validator takes the document as OpenAPI 3.1."""
    assert DOC["openapi"].startswith("3.1")
    validate_openapi(DOC)


def test_routes_are_the_documented_operations(tmp_path: Path, shared_planner: Planner) -> None:
    """Every route the app registers is an operation of the document, and every
    operation is a route (aiohttp's automatic HEAD beside each GET aside)."""
    settings = Settings()
    service = api.Service(
        settings=settings,
        queue=SQLiteQueue(tmp_path / "jobs.db"),
        transports=Transports(settings.transport),
        runner=None,
        planner=shared_planner,
    )
    app = api.make_app(service)
    routes = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    assert routes == operations(DOC)


def test_open_operations_are_the_open_paths() -> None:
    """The operations documented without security are the ones auth_middleware lets
    through without a key, and every other one takes the bearer key."""
    open_paths = {
        path
        for path, item in DOC["paths"].items()
        for method, op in item.items()
        if method in METHODS and op.get("security") == []
    }
    assert open_paths == api.OPEN_PATHS
    assert DOC["security"] == [{}, {"apiKey": []}]
    assert DOC["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"


def documented_codes(doc: dict[str, Any]) -> dict[int, set[int]]:
    """Each code any operation documents (``x-imgserve-codes``), with the HTTP
    statuses it is documented under."""
    found: dict[int, set[int]] = {}
    for item in doc["paths"].values():
        for method, op in item.items():
            if method not in METHODS:
                continue
            for status, response in op["responses"].items():
                for code in response.get("x-imgserve-codes", []):
                    found.setdefault(code, set()).add(int(status))
    return found


def test_every_refusal_has_an_error_body() -> None:
    """Every response listing codes has an Error body (POST /'s 400 also 0.2's
    ParseError, /health's 503 also the degraded Health)."""
    for item in DOC["paths"].values():
        for method, op in item.items():
            if method not in METHODS:
                continue
            for response in op["responses"].values():
                if "x-imgserve-codes" in response:
                    schema = response["content"]["application/json"]["schema"]
                    assert {"$ref": "#/components/schemas/Error"} in [
                        schema,
                        *schema.get("oneOf", []),
                    ]


def test_every_error_code_is_documented_with_its_status() -> None:
    """Every code errors.py defines is a documented response of some operation under
    its own HTTP status (607, any undocumented method, in x-imgserve-errors only),
    and no code is documented under another status."""
    found = documented_codes(DOC)
    for cls in errors.all_errors():
        if cls.code in openapi.NOT_PER_OPERATION:
            assert cls.code not in found
            continue
        assert found.get(cls.code) == {cls.status}, (cls.__name__, cls.code, found.get(cls.code))
    assert set(found) <= {cls.code for cls in errors.all_errors()}
    catalogue = {(e["code"], e["status"], e["message"]) for e in DOC["x-imgserve-errors"]}
    assert catalogue == {(c.code, c.status, c.message) for c in errors.all_errors()}


def test_operation_errors_name_real_codes() -> None:
    """The table of each operation's codes names only codes errors.py defines."""
    known = {cls.code for cls in errors.all_errors()}
    for codes in openapi.OPERATION_ERRORS.values():
        assert set(codes) <= known
    assert set(openapi.OPERATION_ERRORS) == {(m.lower(), p) for m, p in operations(DOC)}


def _docs_job_example() -> dict[str, Any]:
    """The POST /jobs request of docs/api.md's first example."""
    text = (ROOT / "docs/api.md").read_text()
    body = re.search(
        r"curl -s localhost:8602/jobs -H 'Content-Type: application/json' -d '(.*?)'\n", text, re.S
    )
    assert body is not None
    return json.loads(body[1])  # type: ignore[no-any-return]


def _readme_v02_example() -> dict[str, Any]:
    """The POST / request of the README."""
    body = re.search(
        r"curl -s localhost:8602/ -d '(.*?)'\n", (ROOT / "README.md").read_text(), re.S
    )
    assert body is not None
    return json.loads(body[1])  # type: ignore[no-any-return]


def test_documented_examples_fit_the_schemas_and_the_validators() -> None:
    """The examples of docs/api.md and the README (and the document's own) are valid
    for the request schemas and accepted by the validators."""
    job = _docs_job_example()
    assert job == openapi.JOB_EXAMPLE
    schema_of("JobRequest").validate(job)
    validate_jobs(job, max_outputs=16)
    schema_of("UploadJobRequest").validate(openapi.UPLOAD_JOB_EXAMPLE)
    validate_jobs(openapi.UPLOAD_JOB_EXAMPLE, max_outputs=16, uploaded_name="Beach.jpg")
    v02 = _readme_v02_example()
    assert v02 == openapi.V02_EXAMPLE
    schema_of("V02Request").validate(v02)
    validate(v02)


def _watermarks(job: dict[str, Any]) -> frozenset[str]:
    """The watermark names a job uses: a server configured with them takes it."""
    return frozenset(
        out["watermark"]["name"] for out in job.get("outputs", []) if "watermark" in out
    )


def _metadata_bytes(job: dict[str, Any]) -> int:
    text = json.dumps(job.get("metadata", {}), separators=(",", ":"), ensure_ascii=False)
    return len(text.encode("utf-8", "surrogatepass"))


FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def bodies(method: str, path: str, media_type: str) -> st.SearchStrategy[Any]:
    """Request bodies of ``media_type`` the document accepts for an operation
    (schemathesis' generator; it draws each of the operation's media types)."""
    operation = SCHEMA[path][method]
    cases = operation.as_strategy(media_type=media_type)
    return cases.filter(lambda case: case.media_type == media_type).map(lambda case: case.body)


SCHEMA = schemathesis.openapi.from_dict(DOC)


def spelled_as_integers(value: Any) -> Any:
    """``value`` with every whole float (``640.0``) written as the integer (``640``).

    JSON Schema's ``integer`` takes 640.0 and schemathesis sends it; the validators
    take only an integer literal (703, 106, 107, 121: test_whole_floats_are_refused).
    The schema cannot tell the two apart, so the comparison is made on integers."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: spelled_as_integers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [spelled_as_integers(item) for item in value]
    return value


@FUZZ
@given(bodies("POST", "/jobs", "application/json"))
def test_validator_accepts_what_the_job_schema_accepts(body: dict[str, Any]) -> None:
    """Every body the JobRequest schema accepts passes validate_jobs (on a server
    with the watermarks it names), and without its source as a multipart job part
    (UploadJobRequest: the same fields but source); but one whose metadata is over
    8 KiB: 709, as the schema's description says."""
    job = spelled_as_integers(body)
    upload = {key: value for key, value in job.items() if key != "source"}
    schema_of("UploadJobRequest").validate(upload)
    try:
        validate_jobs(job, max_outputs=openapi.DEFAULT_MAX_OUTPUTS, watermarks=_watermarks(job))
        validate_jobs(
            upload,
            max_outputs=openapi.DEFAULT_MAX_OUTPUTS,
            uploaded_name="Beach.jpg",
            watermarks=_watermarks(job),
        )
    except errors.JobMetadataTooLarge:
        assert _metadata_bytes(job) > METADATA_MAX_BYTES


@FUZZ
@given(bodies("POST", "/", "application/json"))
def test_validator_accepts_what_the_v02_schema_accepts(body: dict[str, Any]) -> None:
    """Every body the V02Request schema accepts passes 0.2's validate."""
    validate(spelled_as_integers(body))


def test_whole_floats_are_refused() -> None:
    """The one known gap: the validators refuse a whole float where an integer goes
    (JSON Schema's integer takes it), in POST /jobs (703) and 0.2's POST / (106)."""
    with pytest.raises(errors.JobFieldInvalid):
        validate_jobs(
            {"source": "s3://b/a.jpg", "outputs": [{"url": "s3://b/a.png", "width": 640.0}]},
            max_outputs=16,
        )
    with pytest.raises(errors.WidthInvalid):
        validate({**openapi.V02_EXAMPLE, "args": {"width": 200.0}})
    assert schema_of("JobRequest").is_valid(
        {"source": "s3://b/a.jpg", "outputs": [{"url": "s3://b/a.png", "width": 640.0}]}
    )


def _lower_gravities(job: dict[str, Any]) -> dict[str, Any]:
    """The job with its gravities in lower case: the schema names them so (the
    validator takes any case, as 0.2 did)."""
    outputs = [
        {**out, "gravity": out["gravity"].lower()} if "gravity" in out else out
        for out in job["outputs"]
    ]
    return {**job, "outputs": outputs}


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(valid_jobs)
def test_job_schema_accepts_what_the_validator_accepts(job: dict[str, Any]) -> None:
    """Every valid job of the property tests (validate_jobs takes it) is valid for the
    JobRequest schema."""
    validate_jobs(job, max_outputs=MAX_OUTPUTS)
    schema_of("JobRequest").validate(_lower_gravities(job))


@pytest.mark.parametrize(
    ("job", "code"),
    [
        ({"source": "gopher://h/a.jpg", "outputs": [{"url": "s3://b/a.png", "width": 1}]}, 705),
        ({"source": "s3://b/a.jpg", "outputs": [{"url": "s3://b/a.bmp", "width": 1}]}, 706),
        ({"source": "s3://b/a.jpg", "outputs": [{"url": "s3://b/{$size}.png", "width": 1}]}, 705),
        ({"source": "s3://b/a.jpg", "outputs": [{"url": "http://h/u:a.png", "width": 1}]}, 705),
        ({"source": "s3://b/a.jpg", "outputs": [{"url": "s3://b/a.png", "rotate": 45, "width": 1}]},
         703),
        ({"source": "s3://b/a.jpg", "outputs": [{"url": "s3://b/a.png", "scale": 2, "height": 1}]},
         703),
        ({"source": "s3://b/a.jpg", "outputs": [{"url": "s3://b/a.png"}]}, 701),
        ({"source": "s3://b/a.jpg", "outputs": []}, 704),
        ({"source": "s3://b/a.jpg", "outputs": [{"url": "s3://b/a.png", "width": 1}], "x": 1}, 702),
        ({"source": "s3://b/a.jpg", "outputs": [{"url": "s3://b/a.png", "width": 1}],
          "webhook": "https://h:99999/"}, 705),
    ],
)  # fmt: skip
def test_schema_refuses_what_the_validator_refuses(job: dict[str, Any], code: int) -> None:
    """Jobs the validator refuses, one rule each, are invalid for the schema too."""
    with pytest.raises(errors.ImgserveError) as refused:
        validate_jobs(job, max_outputs=16)
    assert refused.value.code == code
    assert not schema_of("JobRequest").is_valid(job)


def test_error_bodies_fit_the_error_schema() -> None:
    """api.error_reply's bodies are Error (or, for 100, ParseError) bodies."""
    for cls in errors.all_errors():
        body = json.loads(api.error_reply(cls("what went wrong")).text or "")
        name = "ParseError" if cls is errors.RequestParseError else "Error"
        schema_of(name).validate(body)


def test_served_document_is_read_once() -> None:
    """served() reads the file once and hands out the same bytes."""
    assert openapi.served() is openapi.served()


async def test_served_without_a_key_where_keys_are_configured(
    tmp_path: Path, shared_planner: Planner
) -> None:
    """With API keys, GET /openapi.json answers the kept document without a key, as
    the document says (security: []), while a keyed endpoint answers 401 (140)."""
    served = await start_api(tmp_path, shared_planner)
    served.service.keys = auth.Keyring([auth.Key("a", hashlib.sha256(b"k" * 32).digest())])
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(served.url + "/openapi.json") as reply:
                assert reply.status == 200
                assert reply.content_type == "application/json"
                assert await reply.read() == openapi.served()
            async with session.get(served.url + "/jobs") as reply:
                assert reply.status == 401
                assert (await reply.json())["code"] == errors.APIKeyMissing.code
    finally:
        await served.stop()


async def test_method_not_allowed_names_the_allowed_methods(
    tmp_path: Path, shared_planner: Planner
) -> None:
    """A method a path does not have is 405 (607) with the Allow header RFC 9110 asks
    for and a detail naming the path (schemathesis' allow_header_conformance found
    both missing: the detail named the method twice)."""
    served = await start_api(tmp_path, shared_planner)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.patch(served.url + "/jobs") as reply:
                assert reply.status == 405
                assert reply.headers["Allow"] == "GET, HEAD, POST"
                body = await reply.json()
            async with session.request("TRACE", served.url + "/livez") as traced:
                assert traced.status == 405
                assert traced.headers["Allow"] == "GET, HEAD"
    finally:
        await served.stop()
    assert body["code"] == errors.MethodNotAllowed.code
    assert body["detail"] == "PATCH not allowed on /jobs; allowed: GET, HEAD, POST"

"""Thin HTTP handlers: parse -> validate -> fetch + plan -> placeholder -> enqueue -> reply.

0.2's two-phase contract: a job is answered only once its source was read,
its result size computed and a placeholder of that size uploaded to the
destination. Only this module turns imgserve errors into HTTP replies.

Intake is bounded before any work starts (as imgproxy's workers are): at most
``intake_max`` jobs are checked at once and at most ``intake_max_bytes`` of
their sources held, else 503 (611) with Retry-After; all of a job's checking
shares one deadline, ``reply_timeout_s`` (612).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import BadHttpMessage

from imgserve import __version__, errors
from imgserve.config import Settings
from imgserve.intake import Admission, Intake
from imgserve.planner import Planner
from imgserve.planning import JobPlan, targets
from imgserve.queue.base import JobQueue, JobRecord
from imgserve.request import parse_body, validate
from imgserve.request_jobs import decode_job, validate_jobs
from imgserve.spec import JobSpec
from imgserve.transports import Transports
from imgserve.transports.base import Charge, Chunks, Target
from imgserve.transports.outcomes import TooLarge
from imgserve.urls import redact_url
from imgserve.worker import Runner, upload_failure_images

log = logging.getLogger("imgserve.jobs")
RETRY_AFTER_S = 2


@dataclass
class Service:
    """What the handlers need, built by daemon.py."""

    settings: Settings
    queue: JobQueue
    transports: Transports
    runner: Runner | None
    planner: Planner
    """Reads the untrusted source headers and draws placeholders, out of this process."""
    draining: bool = False
    degraded: str | None = None
    """Why the daemon can no longer run jobs (it is about to exit), or None."""
    intake: Intake = field(init=False)
    """The jobs being checked now and the source bytes they hold."""
    started_at: float = field(default_factory=time.time)
    workers_alive: Callable[[], int] = lambda: 0

    def __post_init__(self) -> None:
        server = self.settings.server
        self.intake = Intake(server.intake_max, server.intake_max_bytes)


SERVICE = web.AppKey("service", Service)


def error_reply(exc: errors.ImgserveError) -> web.Response:
    if isinstance(exc, errors.RequestParseError):
        body: dict[str, Any] = {"msg": "request parse error"}
    else:
        msg = "request invalid" if exc.status < 500 else exc.message
        body = {"msg": msg, "code": exc.code, "detail": redact_url(exc.detail)}
    headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status == 503 else None
    return web.json_response(body, status=exc.status, headers=headers)


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except errors.ImgserveError as exc:
        return error_reply(exc)
    except web.HTTPRequestEntityTooLarge:
        return error_reply(errors.RequestTooLarge())
    except web.RequestPayloadError as exc:  # a body that does not match its encoding
        return error_reply(errors.HTTPRequestMalformed(f"request body: {exc}"[:200]))
    except web.HTTPMethodNotAllowed as exc:
        return error_reply(errors.MethodNotAllowed(f"{request.method} not allowed on {exc.method}"))
    except web.HTTPNotFound:
        return error_reply(errors.NotFound(f"no such path: {request.path}"))
    except web.HTTPException:
        raise
    except Exception as exc:
        log.exception("unexpected error handling %s %s", request.method, request.path)
        return error_reply(errors.InternalError(f"{type(exc).__name__}"))


async def submit(request: web.Request) -> web.Response:
    """0.2's ``POST /``: one output, 0.2's reply."""
    service: Service = request.app[SERVICE]
    body = await request.read()
    if len(body) > service.settings.server.max_request_bytes:
        raise errors.RequestTooLarge()
    spec = validate(parse_body(body)).to_spec()
    _refuse_when_stopping(service)
    with service.intake.admit() as admission:
        record = await _accept(service, spec, admission, None)
    return web.json_response({"dstURL": redact_url(record.dst_url), "jobId": record.id})


async def submit_jobs(request: web.Request) -> web.Response:
    """``POST /jobs``: a JSON job naming its source, or a multipart body carrying
    the source itself; 202 with every output's final URL and size."""
    service: Service = request.app[SERVICE]
    max_outputs = service.settings.server.max_outputs
    if request.content_type == "multipart/form-data":
        _refuse_when_stopping(service)
        with service.intake.admit() as admission:
            spec, data = await _read_upload(request, service, admission)
            record = await _accept(service, spec, admission, data)
    elif request.content_type in ("application/json", "application/octet-stream"):
        # (aiohttp reports a request without Content-Type as application/octet-stream.)
        body = await request.read()
        if len(body) > service.settings.server.max_request_bytes:
            raise errors.RequestTooLarge()
        spec = validate_jobs(decode_job(body), max_outputs=max_outputs)
        _refuse_when_stopping(service)
        with service.intake.admit() as admission:
            record = await _accept(service, spec, admission, None)
    else:
        raise errors.JobMediaTypeUnsupported(
            f"Content-Type {request.content_type!r}: send application/json, "
            "or multipart/form-data with a job part and a source file part"
        )
    reply = {"jobId": record.id, "state": record.state.value, "outputs": _outputs_view(record)}
    return web.json_response(reply, status=202, headers={"Location": f"/jobs/{record.id}"})


def _refuse_when_stopping(service: Service) -> None:
    if service.degraded is not None:
        raise errors.ShuttingDown(service.degraded)
    if service.draining:
        raise errors.ShuttingDown()


async def _read_upload(
    request: web.Request, service: Service, admission: Admission
) -> tuple[JobSpec, bytes]:
    """Read a multipart POST /jobs: its ``job`` part (the job without ``source``)
    and its ``source`` file part, in either order; the source's bytes count
    against the intake budget as they arrive."""
    server, transport = service.settings.server, service.settings.transport
    limit = transport.max_download_bytes
    if service.queue.max_source_bytes is not None:
        limit = min(limit, service.queue.max_source_bytes)  # the queue keeps the only copy
    job: dict[str, Any] | None = None
    data: bytes | None = None
    name: str | None = None
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise errors.JobUploadInvalid("a nested multipart part is not a job or source")
            if part.name == "job" and job is None:
                job = decode_job(
                    await _read_part(part, server.max_request_bytes, "job"), where="job"
                )
            elif part.name == "source" and data is None:
                if not part.filename:
                    raise errors.JobUploadInvalid(
                        "source: the part needs a file name (it gives {$basename})"
                    )
                name = part.filename
                data = await _read_part(part, limit, "source", admission.charge)
            else:
                raise errors.JobUploadInvalid(
                    f"unexpected part {part.name!r}: send one job part and one source part"
                )
    except (ValueError, BadHttpMessage) as exc:  # aiohttp: not a well-formed multipart body
        raise errors.JobUploadInvalid(f"not a well-formed multipart body: {exc}"[:200]) from exc
    if job is None:
        raise errors.JobUploadInvalid("job: missing (a part holding the job as JSON)")
    if data is None or name is None:
        raise errors.JobUploadInvalid("source: missing (a file part holding the image)")
    spec = validate_jobs(job, max_outputs=server.max_outputs, uploaded_name=name)
    return spec, data


async def _read_part(
    part: BodyPartReader, max_bytes: int, what: str, charge: Charge | None = None
) -> bytes:
    chunks = Chunks(max_bytes, charge)
    try:
        while chunk := await part.read_chunk(256 * 1024):
            chunks.add(chunk)
    except TooLarge as exc:
        if what == "source":
            raise errors.SourceTooLarge(f"source: the upload is over {max_bytes} bytes") from exc
        raise errors.RequestTooLarge(f"{what}: over {max_bytes} bytes") from exc
    return chunks.join()


async def _accept(
    service: Service, spec: JobSpec, admission: Admission, uploaded: bytes | None
) -> JobRecord:
    """Check the job (source read, plan, placeholders) within the reply deadline,
    then store it: the job is accepted once ``put`` returns."""
    server = service.settings.server
    counts = await service.queue.counts()
    if counts["queued"] + counts["running"] + service.intake.jobs > server.queue_max:
        raise errors.QueueFull(f"{server.queue_max} jobs waiting or being checked")
    deadline = asyncio.timeout(server.reply_timeout_s)
    try:
        async with deadline:
            if uploaded is not None:
                data = uploaded
            else:
                assert spec.source_url is not None
                data = await service.transports.download(spec.source_url, admission.charge)
            plan = await _check(service, spec, data)
    except TimeoutError as exc:
        if not deadline.expired():
            raise
        raise errors.ReplyTimeout(
            f"not checked within {server.reply_timeout_s:g} s (download, plan, placeholders)"
        ) from exc
    # Outside the deadline: once the commit starts, the job is accepted.
    return await _enqueue(service, spec, plan, data)


async def _check(service: Service, spec: JobSpec, data: bytes) -> JobPlan:
    """Plan the job and put each output's placeholder at its destination.

    Placeholders go up at once. When one is refused, the job is refused (205,
    naming the output) and each output whose placeholder did go up gets the
    failure image instead, so nothing is left saying "being processed".
    """
    plan, images = await service.planner.plan(spec, data, service.settings.imaging)
    if not spec.placeholder:
        return plan
    # Not forced to disk: after a power cut the stored job runs again and writes the result.
    destinations = [dataclasses.replace(t, durable=False) for t in targets(spec, plan)]
    outcomes = await asyncio.gather(
        *(
            service.transports.upload(target, image, rendition.plan.content_type)
            for target, image, rendition in zip(destinations, images, plan.outputs, strict=True)
        ),
        return_exceptions=True,
    )
    failed = [(i, o) for i, o in enumerate(outcomes) if isinstance(o, BaseException)]
    if not failed:
        return plan
    index, exc = failed[0]
    placed = [i for i, o in enumerate(outcomes) if not isinstance(o, BaseException)]
    if placed:
        await _withdraw_placeholders(service, plan, destinations, placed)
    if isinstance(exc, errors.UploadFailed | errors.UploadRefused):
        named = f"outputs[{index}]: " if spec.operation is None else ""
        raise errors.PlaceholderUploadFailed(named + exc.detail) from exc
    raise exc


async def _withdraw_placeholders(
    service: Service, plan: JobPlan, destinations: list[Target], placed: list[int]
) -> None:
    """Replace the placeholders of a refused job with the failure image (best effort)."""
    sub_plan = dataclasses.replace(plan, outputs=tuple(plan.outputs[i] for i in placed))
    try:
        await upload_failure_images(service.transports, sub_plan, [destinations[i] for i in placed])
    except errors.ImgserveError as exc:
        log.warning("placeholder of a refused job left in place: %s", redact_url(exc.detail))


async def _enqueue(service: Service, spec: JobSpec, plan: JobPlan, data: bytes) -> JobRecord:
    job_id = uuid.uuid4().hex
    record = JobRecord(id=job_id, job=spec.to_dict(), plan=plan.to_dict(), dst_url=plan.dst_url)
    await service.queue.put(record, data, max_active=service.settings.server.queue_max)
    log.info(
        "job %s accepted %s %s -> %s %dx%d%s",
        job_id,
        plan.operation,
        spec.source_url or f"(upload {spec.source_name!r}, {len(data)} bytes)",
        plan.dst_url,
        plan.result.width,
        plan.result.height,
        f" +{len(plan.outputs) - 1} outputs" if len(plan.outputs) > 1 else "",
    )
    return record


def _outputs_view(record: JobRecord) -> list[dict[str, Any]]:
    plan = JobPlan.from_dict(record.plan)
    views = []
    for index, rendition in enumerate(plan.outputs):
        view: dict[str, Any] = {
            "url": redact_url(rendition.dst_url),
            "width": rendition.plan.result.width,
            "height": rendition.plan.result.height,
            "format": rendition.plan.output.value,
        }
        if record.output_bytes is not None and index < len(record.output_bytes):
            view["bytes"] = record.output_bytes[index]
        views.append(view)
    return views


def job_view(record: JobRecord) -> dict[str, Any]:
    """``GET /jobs/<id>``: 0.2's fields (about the first output), then every output."""
    spec = JobSpec.from_dict(record.job)
    first = JobPlan.from_dict(record.plan).first
    view: dict[str, Any] = {
        "jobId": record.id,
        "state": record.state.value,
        "operationType": spec.operation or JobPlan.from_dict(record.plan).operation,
        "srcURL": redact_url(spec.source_url) if spec.source_url is not None else None,
        "dstURL": redact_url(record.dst_url),
        "attempts": record.attempts,
        "createdAt": record.created_at,
        "startedAt": record.started_at,
        "finishedAt": record.finished_at,
        "node": record.node,
        "width": first.plan.result.width,
        "height": first.plan.result.height,
        "outputs": _outputs_view(record),
        "metadata": spec.metadata,
    }
    if record.error_code is not None:
        cls = errors.by_code(record.error_code)
        view["error"] = {
            "code": record.error_code,
            "message": cls.message,
            "detail": redact_url(record.error_detail or ""),
        }
    return view


_JOB_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex, as _accept makes them


async def get_job(request: web.Request) -> web.Response:
    service: Service = request.app[SERVICE]
    job_id = request.match_info["job_id"]
    if not _JOB_ID.fullmatch(job_id):
        # Cannot be a job: answered without a trip to the queue (or echoing a long id).
        raise errors.JobNotFound("not a job id: imgserve's are 32 lower-case hex digits")
    record = await service.queue.get(job_id)
    if record is None:
        raise errors.JobNotFound(f"no job {job_id!r} (unknown, or pruned after it finished)")
    return web.json_response(job_view(record))


async def health(request: web.Request) -> web.Response:
    service: Service = request.app[SERVICE]
    counts = await service.queue.counts()
    nodes = await service.queue.nodes()
    status = "degraded" if service.degraded else "draining" if service.draining else "ok"
    body: dict[str, Any] = {
        "status": status,
        "version": __version__,
        "queue": counts,
        "queueDepth": counts["queued"],
        "running": counts["running"],
        "failed": counts["failed"],
        "workers": (service.settings.worker.workers if service.runner else 0)
        + sum(n.get("workers", 0) for n in nodes),
        "workersAlive": service.workers_alive() + sum(n.get("workersAlive", 0) for n in nodes),
        "nodes": nodes,
        "uptimeS": round(time.time() - service.started_at, 1),
        "intake": {"jobs": service.intake.jobs, "bytes": service.intake.bytes},
    }
    if service.degraded:
        body["detail"] = service.degraded
    return web.json_response(body, status=503 if service.degraded else 200)


def make_app(service: Service) -> web.Application:
    # The body limit is enforced here (413 -> code 125) with slack for the check above.
    app = web.Application(
        middlewares=[errors_middleware],
        client_max_size=service.settings.server.max_request_bytes + 1,
    )
    app[SERVICE] = service
    app.router.add_post("/", submit)
    app.router.add_post("/jobs", submit_jobs)
    app.router.add_get("/jobs/{job_id}", get_job)
    app.router.add_get("/health", health)
    return app

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

from aiohttp import web

from imgserve import __version__, errors
from imgserve.config import Settings
from imgserve.destination import destination_target
from imgserve.intake import Intake
from imgserve.planner import Planner
from imgserve.planning import JobPlan
from imgserve.queue.base import JobQueue, JobRecord
from imgserve.request import Job, parse_body, validate
from imgserve.transports import Transports
from imgserve.urls import redact_url
from imgserve.worker import Runner

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
    service: Service = request.app[SERVICE]
    body = await request.read()
    if len(body) > service.settings.server.max_request_bytes:
        raise errors.RequestTooLarge()
    job = validate(parse_body(body))
    if service.degraded is not None:
        raise errors.ShuttingDown(service.degraded)
    if service.draining:
        raise errors.ShuttingDown()
    server = service.settings.server
    with service.intake.admit() as admission:
        counts = await service.queue.counts()
        if counts["queued"] + counts["running"] + service.intake.jobs > server.queue_max:
            raise errors.QueueFull(f"{server.queue_max} jobs waiting or being checked")
        deadline = asyncio.timeout(server.reply_timeout_s)
        try:
            async with deadline:
                data = await service.transports.download(job.src_url, admission.charge)
                plan = await _check(service, job, data)
        except TimeoutError as exc:
            if not deadline.expired():
                raise
            raise errors.ReplyTimeout(
                f"not checked within {server.reply_timeout_s:g} s (download, plan, placeholder)"
            ) from exc
        # Outside the deadline: once the commit starts, the job is accepted.
        return await _enqueue(service, job, plan, data)


async def _check(service: Service, job: Job, data: bytes) -> JobPlan:
    """Plan the job and put each output's placeholder at its destination."""
    plan, images = await service.planner.plan(job, data, service.settings.imaging)
    for rendition, image in zip(plan.outputs, images, strict=True):
        # Not forced to disk: after a power cut the stored job runs again and writes the result.
        target = destination_target(rendition.dst_url, job.form_field)
        try:
            await service.transports.upload(
                dataclasses.replace(target, durable=False), image, rendition.plan.content_type
            )
        except (errors.UploadFailed, errors.UploadRefused) as exc:
            raise errors.PlaceholderUploadFailed(exc.detail) from exc
    return plan


async def _enqueue(service: Service, job: Job, plan: JobPlan, data: bytes) -> web.Response:
    job_id = uuid.uuid4().hex
    record = JobRecord(id=job_id, job=job.to_dict(), plan=plan.to_dict(), dst_url=plan.dst_url)
    await service.queue.put(record, data, max_active=service.settings.server.queue_max)
    log.info(
        "job %s accepted %s %s -> %s %dx%d",
        job_id,
        job.operation,
        job.src_url,
        plan.dst_url,
        plan.result.width,
        plan.result.height,
    )
    return web.json_response({"dstURL": redact_url(plan.dst_url), "jobId": job_id})


def job_view(record: JobRecord) -> dict[str, Any]:
    first = JobPlan.from_dict(record.plan).first  # 0.2's fields: the first output's
    view: dict[str, Any] = {
        "jobId": record.id,
        "state": record.state.value,
        "operationType": record.job.get("operation"),
        "srcURL": redact_url(str(record.job.get("src_url", ""))),
        "dstURL": redact_url(record.dst_url),
        "attempts": record.attempts,
        "createdAt": record.created_at,
        "startedAt": record.started_at,
        "finishedAt": record.finished_at,
        "node": record.node,
        "width": first.plan.result.width,
        "height": first.plan.result.height,
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
    app.router.add_get("/jobs/{job_id}", get_job)
    app.router.add_get("/health", health)
    return app

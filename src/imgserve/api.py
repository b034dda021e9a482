"""Thin HTTP handlers: parse -> validate -> fetch + plan -> placeholder -> enqueue -> reply.

0.2's two-phase contract: a job is answered only once its source was read,
its result size computed and a placeholder of that size uploaded to the
destination. Only this module turns imgserve errors into HTTP replies.

Intake is bounded before any work starts (as imgproxy's workers are): at most
``intake_max`` jobs are checked at once and at most ``intake_max_bytes`` of
their sources held, else 503 (611) with Retry-After; all of a job's checking
shares one deadline, ``reply_timeout_s`` (612).

Job control (docs/api.md): an ``Idempotency-Key`` makes a POST answer once and
replay that reply (the key is held in the queue, so across API nodes); ``DELETE
/jobs/<id>`` cancels a queued job; ``GET /jobs`` lists jobs newest first;
``GET /events`` streams the queue's change feed as Server-Sent Events (at most
``max_streams`` at once, ended when the daemon drains); ``POST
/jobs/<id>/webhook`` re-arms a job's latest webhook event.

API keys (docs/security.md): with keys configured, ``auth_middleware`` makes every
endpoint but ``/health`` and ``/livez`` take ``Authorization: Bearer <key>`` (401,
140/141). A job's key is rate-limited (429, 144) when the request arrives, its
source checked against the key's ``sources`` before the download (403, 142), its
destinations against its ``destinations`` before the download when no size tag is
in them and, filled in, before any placeholder goes up (403, 143); the key's
limits tighten the server's for the job. A key that is not ``admin`` sees only
its own jobs (another's answers 404, as an unknown one).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp_sse import EventSourceResponse, sse_response

from imgserve import __version__, auth, errors, openapi, ui, webhooks
from imgserve.config import Settings
from imgserve.destination import TAG, destination_target, substitute
from imgserve.intake import Admission, Intake
from imgserve.metrics import Metrics, exposition, request_timer
from imgserve.planner import Planner
from imgserve.planning import JobPlan, targets
from imgserve.queue.base import Change, Event, JobQueue, JobRecord
from imgserve.request import parse_body, validate
from imgserve.request_jobs import (
    cursor_param,
    decode_job,
    idempotency_key,
    list_query,
    validate_jobs,
)
from imgserve.spec import JobSpec
from imgserve.transports import Transports, policy
from imgserve.transports.base import Charge, Chunks, Target
from imgserve.transports.http import PolicyResolver
from imgserve.transports.outcomes import TooLarge
from imgserve.urls import redact_url
from imgserve.worker import Runner, upload_failure_images

log = logging.getLogger("imgserve.jobs")
RETRY_AFTER_S = 2

KEY_POLL_S = 0.1
"""How often a request waits on the reply of an earlier one holding its Idempotency-Key."""
KEY_WAIT_SLACK_S = 5.0
"""Waiting on an earlier request lasts its reply deadline plus this (then 409, 614)."""
KEY_HOLD_SLACK_S = 30.0
"""A key held by a request still being answered is freed after its reply deadline plus
this, so one whose API node died does not block retries for the whole key TTL."""

STREAM_POLL_S = 0.2
"""How often an open ``GET /events`` stream reads the change feed."""
STREAM_BATCH = 200
STREAM_HEARTBEAT_S = 15.0
"""A comment line this often keeps proxies from closing an idle stream."""
MAX_STREAMS = 64


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
    on_event: Callable[[], None] = lambda: None
    """Wakes this process's webhook dispatcher after an event was stored."""
    max_streams: int = MAX_STREAMS
    """``GET /events`` streams served at once; past it, 503 (615)."""
    streams: int = field(default=0, init=False)
    closing: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    """Set when the HTTP server shuts down: open event streams end at once."""
    keys: auth.Keyring | None = None
    """The API keys; None: no authentication (0.2's behaviour)."""
    limiter: auth.RateLimiter = field(default_factory=auth.RateLimiter, init=False)
    metrics: Metrics = field(default_factory=Metrics)
    """What ``GET /metrics`` exports (the daemon shares it with the runner)."""

    @property
    def watermarks(self) -> frozenset[str]:
        """The names an output's ``watermark`` may take (--watermark NAME=FILE)."""
        return frozenset(self.settings.imaging.watermark_files())

    def __post_init__(self) -> None:
        server = self.settings.server
        self.intake = Intake(server.intake_max, server.intake_max_bytes)
        self.metrics.watch_queue(self.queue.counts, self.queue.lanes)


SERVICE = web.AppKey("service", Service)


def error_reply(exc: errors.ImgserveError) -> web.Response:
    if isinstance(exc, errors.RequestParseError):
        body: dict[str, Any] = {"msg": "request parse error"}
    else:
        msg = "request invalid" if exc.status < 500 else exc.message
        body = {"msg": msg, "code": exc.code, "detail": redact_url(exc.detail)}
    headers: dict[str, str] = {}
    if exc.status == 503 or isinstance(exc, errors.IdempotencyKeyBusy):
        headers["Retry-After"] = str(RETRY_AFTER_S)
    if isinstance(exc, errors.APIKeyRateLimited):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    if isinstance(exc, errors.APIKeyMissing):
        headers["WWW-Authenticate"] = 'Bearer realm="imgserve"'
    if isinstance(exc, errors.APIKeyUnknown):
        headers["WWW-Authenticate"] = 'Bearer realm="imgserve", error="invalid_token"'
    return web.json_response(body, status=exc.status, headers=headers or None)


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
    except ConnectionResetError:  # the client went away mid-body: nobody reads the reply
        log.info("client closed the connection during %s %s", request.method, request.path)
        return error_reply(errors.HTTPRequestMalformed("request body: the connection closed"))
    except web.RequestPayloadError as exc:  # a body that does not match its encoding
        return error_reply(errors.HTTPRequestMalformed(f"request body: {exc}"[:200]))
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        reply = error_reply(
            errors.MethodNotAllowed(
                f"{request.method[:20]} not allowed on {request.path[:200]}; allowed: {allowed}"
            )
        )
        reply.headers["Allow"] = allowed  # RFC 9110: a 405 names the methods that are
        return reply
    except web.HTTPNotFound:
        return error_reply(errors.NotFound(f"no such path: {request.path}"))
    except web.HTTPException:
        raise
    except Exception as exc:
        log.exception("unexpected error handling %s %s", request.method, request.path)
        return error_reply(errors.InternalError(f"{type(exc).__name__}"))


# --- API keys ---------------------------------------------------------------------------

_CALLER = "imgserve.caller"
OPEN_PATHS = frozenset({"/health", "/livez", "/openapi.json"}) | ui.OPEN_PATHS
"""Answered without a key: probes for load balancers and supervisors, the API's
description (the same public document on every server), and the dashboard's
static files (its data needs a key)."""


@web.middleware
async def auth_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """With keys configured, every request but the probes carries a known key, which
    the handlers read with ``_caller``. The key is never logged or echoed."""
    service: Service = request.app[SERVICE]
    if service.keys is not None and request.path not in OPEN_PATHS:
        try:
            key = service.keys.verify(auth.bearer_token(request.headers.get("Authorization")))
        except errors.ImgserveError as exc:
            log.info("%s %s refused: %s", request.method, request.path[:200], exc.detail)
            raise
        request[_CALLER] = key
    return await handler(request)


def _caller(request: web.Request) -> auth.Key | None:
    """The key the request was made with (None: keys are not configured)."""
    key = request.get(_CALLER)
    return key if isinstance(key, auth.Key) else None


def _admit_job(service: Service, caller: auth.Key | None) -> None:
    """A job arrives: the caller's rate limit (429, 144) before anything else."""
    if caller is not None:
        service.limiter.check(caller)


def _check_source(caller: auth.Key | None, spec: JobSpec) -> None:
    """The source URL against the key's ``sources``, before it is downloaded (an
    uploaded source reads nothing, so it needs no scope)."""
    if caller is not None and spec.source_url is not None:
        caller.may_read(spec.source_url, os.path.realpath)


def _hop_check(caller: auth.Key | None) -> Callable[[str], None] | None:
    """Each URL a keyed source download is redirected to, against the key's
    ``sources`` (an open redirect on an allowed host must not lead outside them)."""
    if caller is None or caller.sources is None:
        return None
    return lambda url: caller.may_read(url, os.path.realpath)


def _check_templates(caller: auth.Key | None, spec: JobSpec) -> None:
    """Each destination whose template the source's name alone fills in, against the
    key's ``destinations``, before the download. A size or extension tag needs the
    plan (``{$ext}`` of an SVG source is png): those are checked by
    ``_check_destinations``, before any placeholder either way."""
    if caller is None or caller.destinations is None:
        return
    for index, out in enumerate(spec.outputs):
        if any(tag in _PLANNED_TAGS for tag in TAG.findall(out.url)):
            continue
        url = substitute(out.url, width=0, height=0, basename=spec.basename, extension="")
        caller.may_write(
            destination_target(url, out.form_field).url,
            os.path.realpath,
            where=_output(spec, index),
        )


_PLANNED_TAGS = frozenset({"width", "height", "ext", "extension"})


def _check_destinations(caller: auth.Key | None, spec: JobSpec, plan: JobPlan) -> None:
    """Every output's upload URL, tags filled in, against the key's ``destinations``."""
    if caller is None or caller.destinations is None:
        return
    for index, target in enumerate(targets(spec, plan)):
        caller.may_write(target.url, os.path.realpath, where=_output(spec, index))


def _output(spec: JobSpec, index: int) -> str:
    return "destination" if spec.operation is not None else f"outputs[{index}]"


def _within_key_limit(charge: Charge, limit_bytes: int) -> Charge:
    """``charge``, refusing a source past the key's ``max_download_bytes`` (301) as
    its chunks arrive (the server's own limit is the transport's)."""
    counted = 0

    def charge_within(size: int) -> None:
        nonlocal counted
        counted += size
        if counted > limit_bytes:
            raise errors.SourceTooLarge(
                f"source: over the key's max_download_bytes ({limit_bytes} bytes)"
            )
        charge(size)

    return charge_within


async def submit(request: web.Request) -> web.Response:
    """0.2's ``POST /``: one output, 0.2's reply."""
    service: Service = request.app[SERVICE]
    caller = _caller(request)
    _admit_job(service, caller)
    key = _idempotency_key(request, caller)
    body = await request.read()
    if len(body) > service.settings.server.max_request_bytes:
        raise errors.RequestTooLarge()
    spec = validate(parse_body(body)).to_spec()
    _refuse_when_stopping(service)

    async def answer() -> Reply:
        with service.intake.admit() as admission:
            record = await _accept(service, spec, admission, None, caller)
        return Reply(200, {"dstURL": redact_url(record.dst_url), "jobId": record.id})

    return await _answer_once(service, key, _fingerprint(b"POST /", body), answer)


async def submit_jobs(request: web.Request) -> web.Response:
    """``POST /jobs``: a JSON job naming its source, or a multipart body carrying
    the source itself; 202 with every output's final URL and size."""
    service: Service = request.app[SERVICE]
    caller = _caller(request)
    _admit_job(service, caller)
    key = _idempotency_key(request, caller)
    max_outputs = service.settings.server.max_outputs
    if caller is not None:
        max_outputs = caller.outputs_limit(max_outputs)
    if request.content_type == "multipart/form-data":
        _refuse_when_stopping(service)
        with service.intake.admit() as admission:
            spec, data, fingerprint = await _read_upload_within(request, service, admission, caller)

            async def accept_upload() -> Reply:
                return _jobs_reply(await _accept(service, spec, admission, data, caller))

            return await _answer_once(service, key, fingerprint, accept_upload)
    if request.content_type in ("application/json", "application/octet-stream"):
        # (aiohttp reports a request without Content-Type as application/octet-stream.)
        body = await request.read()
        if len(body) > service.settings.server.max_request_bytes:
            raise errors.RequestTooLarge()
        spec = validate_jobs(
            decode_job(body), max_outputs=max_outputs, watermarks=service.watermarks
        )
        _refuse_when_stopping(service)

        async def accept_json() -> Reply:
            with service.intake.admit() as admission:
                return _jobs_reply(await _accept(service, spec, admission, None, caller))

        return await _answer_once(service, key, _fingerprint(b"POST /jobs", body), accept_json)
    raise errors.JobMediaTypeUnsupported(
        f"Content-Type {request.content_type!r}: send application/json, "
        "or multipart/form-data with a job part and a source file part"
    )


def _jobs_reply(record: JobRecord) -> Reply:
    return Reply(
        202,
        {"jobId": record.id, "state": record.state.value, "outputs": _outputs_view(record)},
        {"Location": f"/jobs/{record.id}"},
    )


# --- idempotency keys -----------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """A successful POST reply, as an idempotency key keeps it for replays."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    def response(self, *, replayed: bool = False) -> web.Response:
        headers = {**self.headers, "Idempotent-Replayed": "true"} if replayed else self.headers
        return web.json_response(self.body, status=self.status, headers=headers)

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "headers": self.headers, "body": self.body}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Reply:
        return cls(int(data["status"]), dict(data["body"]), dict(data.get("headers") or {}))


def _idempotency_key(request: web.Request, caller: auth.Key | None) -> str | None:
    """The request's Idempotency-Key, in the caller's own namespace: two keys using
    the same value never see each other's replies."""
    value = request.headers.get("Idempotency-Key")
    if value is None:
        return None
    checked = idempotency_key(value)
    return checked if caller is None else f"{caller.name}/{checked}"


def _fingerprint(*parts: bytes) -> str:
    """What makes two requests the same: each part length-prefixed, so no two
    different sequences of parts hash alike."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


async def _answer_once(
    service: Service, key: str | None, fingerprint: str, answer: Callable[[], Awaitable[Reply]]
) -> web.Response:
    """Answer a POST; with an Idempotency-Key, only once: a request that repeats the
    key (and the request) gets the first reply. A request that is refused (an error
    reply, or it never finished) frees the key, so a retry runs afresh."""
    if key is None:
        return (await answer()).response()
    earlier = await _take_key(service, key, fingerprint)
    if earlier is not None:
        return earlier.response(replayed=True)
    try:
        reply = await answer()
    except Exception:  # refused: a retry may try again (not on cancel: the job may be in)
        try:
            await service.queue.release_key(key)
        except errors.ImgserveError as exc:  # held until it expires (KEY_HOLD_SLACK_S)
            log.warning("idempotency key of a refused request not freed: %s", exc.detail)
        raise
    try:
        await service.queue.finish_key(
            key, reply.to_dict(), service.settings.server.idempotency_ttl_s
        )
    except errors.ImgserveError as exc:
        # The job is accepted: say so. A retry with the key waits for the reply, then 614.
        log.warning("reply of an accepted job not kept for its idempotency key: %s", exc.detail)
    return reply.response()


async def _take_key(service: Service, key: str, fingerprint: str) -> Reply | None:
    """Hold ``key`` for this request (None), or the reply of the earlier request that
    used it, waiting while that one is still being answered."""
    server = service.settings.server
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + server.reply_timeout_s + KEY_WAIT_SLACK_S
    hold_s = server.reply_timeout_s + KEY_HOLD_SLACK_S
    while True:
        entry = await service.queue.reserve_key(key, fingerprint, hold_s)
        if entry is None:
            return None
        if entry.fingerprint != fingerprint:
            raise errors.IdempotencyKeyReused(
                "Idempotency-Key: first used with another request (endpoint or body); "
                "send a new key for a new request"
            )
        if entry.reply is not None:
            return Reply.from_dict(entry.reply)
        if loop.time() >= give_up_at:
            raise errors.IdempotencyKeyBusy(
                "Idempotency-Key: the first request with it has not been answered yet"
            )
        await asyncio.sleep(KEY_POLL_S)


def _refuse_when_stopping(service: Service) -> None:
    if service.degraded is not None:
        raise errors.ShuttingDown(service.degraded)
    if service.draining:
        raise errors.ShuttingDown()


async def _read_upload_within(
    request: web.Request, service: Service, admission: Admission, caller: auth.Key | None
) -> tuple[JobSpec, bytes, str]:
    """``_read_upload`` within ``download_timeout_s``, as a download would be: a
    client trickling its upload does not hold an intake slot for longer (305)."""
    timeout_s = service.settings.transport.download_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            return await _read_upload(request, service, admission, caller)
    except TimeoutError as exc:
        raise errors.DownloadTimeout(
            f"source: the upload did not arrive within {timeout_s:g} s"
        ) from exc


async def _read_upload(
    request: web.Request, service: Service, admission: Admission, caller: auth.Key | None
) -> tuple[JobSpec, bytes, str]:
    """Read a multipart POST /jobs: its ``job`` part (the job without ``source``)
    and its ``source`` file part, in either order; the source's bytes count
    against the intake budget as they arrive. Also returns the request's
    fingerprint for its Idempotency-Key: the job part, the file name and the
    source bytes (not the multipart framing, whose boundary a client picks anew
    on a retry)."""
    server, transport = service.settings.server, service.settings.transport
    limit = transport.max_download_bytes
    if service.queue.max_source_bytes is not None:
        limit = min(limit, service.queue.max_source_bytes)  # the queue keeps the only copy
    max_outputs = server.max_outputs
    if caller is not None:
        limit, max_outputs = caller.download_limit(limit), caller.outputs_limit(max_outputs)
    job: dict[str, Any] | None = None
    job_bytes = b""
    data: bytes | None = None
    name: str | None = None
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise errors.JobUploadInvalid("a nested multipart part is not a job or source")
            if part.name == "job" and job is None:
                job_bytes = await _read_part(part, server.max_request_bytes, "job")
                job = decode_job(job_bytes, where="job")
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
    spec = validate_jobs(
        job, max_outputs=max_outputs, uploaded_name=name, watermarks=service.watermarks
    )
    fingerprint = _fingerprint(b"POST /jobs multipart", job_bytes, name.encode(), data)
    return spec, data, fingerprint


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
    service: Service,
    spec: JobSpec,
    admission: Admission,
    uploaded: bytes | None,
    caller: auth.Key | None,
) -> JobRecord:
    """Check the job (the key's scopes, source read, plan, placeholders) within the
    reply deadline, then store it: the job is accepted once ``put`` returns."""
    server = service.settings.server
    _check_source(caller, spec)
    _check_templates(caller, spec)
    charge: Charge = admission.charge
    if caller is not None and caller.max_download_bytes is not None:
        charge = _within_key_limit(charge, caller.max_download_bytes)
    counts = await service.queue.counts()
    if counts["queued"] + counts["running"] + service.intake.jobs > server.queue_max:
        raise errors.QueueFull(f"{server.queue_max} jobs waiting or being checked")
    deadline = asyncio.timeout(server.reply_timeout_s)
    placed = _Placed()
    # The operator's default webhook is fixed with the job here, so a worker node
    # configured otherwise still sends the event where this node said. (Only a
    # caller's own URL is checked now; the policy applies to both at delivery.)
    own_webhook = spec.webhook
    spec = dataclasses.replace(spec, webhook=own_webhook or service.settings.webhook.webhook_url)
    try:
        async with deadline:
            if own_webhook is not None:
                await _check_webhook(service, own_webhook)
            if uploaded is not None:
                data = uploaded
            else:
                assert spec.source_url is not None
                with service.metrics.phase("download"):
                    data = await service.transports.download(
                        spec.source_url, charge, _hop_check(caller)
                    )
                service.metrics.count_download(spec.source_url, len(data))
            plan = await _check(service, spec, data, placed, caller)
        # Outside the deadline: once the commit starts, the job is accepted.
        record = await _enqueue(service, spec, plan, data, caller)
    except Exception as exc:
        # Outside the deadline, which may be what ended the check: a refused job
        # leaves no "being processed" placeholder behind.
        await _withdraw_placeholders(service, placed)
        if isinstance(exc, TimeoutError) and deadline.expired():
            service.metrics.refused.labels(str(errors.ReplyTimeout.code)).inc()
            raise errors.ReplyTimeout(
                f"not checked within {server.reply_timeout_s:g} s (download, plan, placeholders)"
            ) from exc
        code = exc.code if isinstance(exc, errors.ImgserveError) else errors.InternalError.code
        service.metrics.refused.labels(str(code)).inc()
        raise
    service.metrics.accepted.labels(plan.operation).inc()
    return record


async def _check_webhook(service: Service, url: str) -> None:
    """Refuse a webhook URL whose host the outbound address policy refuses (as a
    source's or destination's would be), before the job is accepted. A host that
    does not resolve now is let through: delivery checks it again each time, and
    a failed attempt shows in the job's view."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    net = service.settings.transport.policy
    try:
        if policy.check_host_literal(host, net) is None:
            resolver = PolicyResolver(net)
            try:
                await resolver.resolve(host, parts.port or (443 if parts.scheme == "https" else 80))
            finally:
                await resolver.close()
    except errors.AddressRefused as exc:
        raise errors.AddressRefused(f"webhook: {exc.detail}") from exc
    except errors.URLInvalid as exc:  # a name no lookup can take (PolicyResolver)
        raise errors.JobURLInvalid(f"webhook: {exc.detail}") from exc
    except OSError as exc:  # no address now (DNS): delivery decides
        log.info("webhook host %s does not resolve now: %s", host, exc)


@dataclass
class _Placed:
    """The placeholders of a job being checked that are up, in case it is refused."""

    plan: JobPlan | None = None
    destinations: list[Target] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)


async def _check(
    service: Service, spec: JobSpec, data: bytes, placed: _Placed, caller: auth.Key | None
) -> JobPlan:
    """Plan the job (within the key's limits), check every destination against the
    key's scope, and put each output's placeholder at its destination.

    Placeholders go up at once. When one is refused, the job is refused (205,
    naming the output); the caller then gives each output whose placeholder did
    go up the failure image instead (``_withdraw_placeholders``).
    """
    limits = service.settings.imaging
    if caller is not None:
        limits = caller.imaging(limits)
    with service.metrics.phase("plan"):
        plan, images = await service.planner.plan(spec, data, limits)
    _check_destinations(caller, spec, plan)
    if not spec.placeholder:
        return plan
    # Not forced to disk: after a power cut the stored job runs again and writes the result.
    placed.plan = plan
    placed.destinations = [dataclasses.replace(t, durable=False) for t in targets(spec, plan)]

    async def put(index: int, image: bytes) -> None:
        target, content_type = placed.destinations[index], plan.outputs[index].plan.content_type
        await service.transports.upload(target, image, content_type)
        service.metrics.count_upload(target.url, len(image))
        placed.outputs.append(index)

    with service.metrics.phase("placeholder"):
        outcomes = await asyncio.gather(
            *(put(index, image) for index, image in enumerate(images)), return_exceptions=True
        )
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, errors.UploadFailed | errors.UploadRefused):
            named = f"outputs[{index}]: " if spec.operation is None else ""
            raise errors.PlaceholderUploadFailed(named + outcome.detail) from outcome
        if isinstance(outcome, BaseException):
            raise outcome
    return plan


WITHDRAW_TIMEOUT_S = 10.0
"""How long a refused job's reply waits for its placeholders to be replaced."""


async def _withdraw_placeholders(service: Service, placed: _Placed) -> None:
    """Replace the placeholders of a refused job with the failure image (best effort)."""
    if placed.plan is None or not placed.outputs:
        return
    up = sorted(placed.outputs)
    sub_plan = dataclasses.replace(placed.plan, outputs=tuple(placed.plan.outputs[i] for i in up))
    try:
        async with asyncio.timeout(WITHDRAW_TIMEOUT_S):
            await upload_failure_images(
                service.transports, sub_plan, [placed.destinations[i] for i in up]
            )
    except (errors.ImgserveError, TimeoutError) as exc:
        detail = exc.detail if isinstance(exc, errors.ImgserveError) else "timed out"
        log.warning("placeholder of a refused job left in place: %s", redact_url(detail))


async def _enqueue(
    service: Service, spec: JobSpec, plan: JobPlan, data: bytes, caller: auth.Key | None
) -> JobRecord:
    job_id = uuid.uuid4().hex
    traces = service.metrics.tracing
    record = JobRecord(
        id=job_id,
        job=spec.to_dict(),
        plan=plan.to_dict(),
        dst_url=plan.dst_url,
        priority=spec.priority,
        key=caller.name if caller is not None else None,
        trace_context=traces.carrier(),  # the runner continues this request's trace
    )
    with traces.span("enqueue"):
        await service.queue.put(record, data, max_active=service.settings.server.queue_max)
    traces.describe_job(record)  # accepted: the request's span names its job
    log.info(
        "job %s accepted%s %s %s -> %s %dx%d%s",
        job_id,
        f" key={caller.name}" if caller is not None else "",
        plan.operation,
        spec.source_url or f"(upload {spec.source_name!r}, {len(data)} bytes)",
        plan.dst_url,
        plan.result.width,
        plan.result.height,
        f" +{len(plan.outputs) - 1} outputs" if len(plan.outputs) > 1 else "",
    )
    return record


def _outputs_view(record: JobRecord) -> list[dict[str, Any]]:
    return webhooks.outputs_of(JobPlan.from_dict(record.plan), record.output_bytes, record.previews)


def job_view(record: JobRecord, events: list[Event] | None = None) -> dict[str, Any]:
    """``GET /jobs/<id>``: 0.2's fields (about the first output), then every output,
    and the delivery of the job's latest webhook event (``events``, oldest first)."""
    spec, plan = JobSpec.from_dict(record.job), JobPlan.from_dict(record.plan)
    first = plan.first
    view: dict[str, Any] = {
        "jobId": record.id,
        "state": record.state.value,
        "operationType": spec.operation or plan.operation,
        "srcURL": redact_url(spec.source_url) if spec.source_url is not None else None,
        "dstURL": redact_url(record.dst_url),
        "attempts": record.attempts,
        "createdAt": record.created_at,
        "startedAt": record.started_at,
        "finishedAt": record.finished_at,
        "node": record.node,
        "width": first.plan.result.width,
        "height": first.plan.result.height,
        "outputs": webhooks.outputs_of(plan, record.output_bytes, record.previews),
        "sourceInfo": plan.source_info.view(),
        "metadata": spec.metadata,
        "priority": record.priority,
        "key": record.key,
    }
    if events:
        view["webhook"] = webhook_view(events[-1])
    if record.error_code is not None:
        cls = errors.by_code(record.error_code)
        view["error"] = {
            "code": record.error_code,
            "message": cls.message,
            "detail": redact_url(record.error_detail or ""),
        }
    return view


def webhook_view(event: Event) -> dict[str, Any]:
    """A webhook event's delivery: where (redacted), what, and every attempt."""
    return {
        "url": redact_url(event.url),
        "eventId": event.id,
        "type": event.type,
        "state": event.state,
        "attempts": [
            {
                "at": attempt.get("at"),
                "status": attempt.get("status"),
                "error": redact_url(attempt["error"]) if attempt.get("error") else None,
            }
            for attempt in event.attempts
        ],
    }


async def _full_view(service: Service, record: JobRecord) -> dict[str, Any]:
    return job_view(record, await service.queue.job_events(record.id))


_JOB_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex, as _accept makes them


async def _record(service: Service, request: web.Request) -> JobRecord:
    """The job the path names (605 when there is none)."""
    job_id = request.match_info["job_id"]
    if not _JOB_ID.fullmatch(job_id):
        # Cannot be a job: answered without a trip to the queue (or echoing a long id).
        raise errors.JobNotFound("not a job id: imgserve's are 32 lower-case hex digits")
    record = await service.queue.get(job_id)
    caller = _caller(request)
    if record is None or (caller is not None and not caller.sees(record.key)):
        # Another key's job is answered as an unknown one: its id says nothing.
        raise errors.JobNotFound(f"no job {job_id!r} (unknown, or pruned after it finished)")
    return record


async def get_job(request: web.Request) -> web.Response:
    service: Service = request.app[SERVICE]
    record = await _record(service, request)
    return web.json_response(await _full_view(service, record))


async def cancel_job(request: web.Request) -> web.Response:
    """``DELETE /jobs/<id>``: a queued job ends as cancelled, never runs; 613 for a
    job running or ended."""
    service: Service = request.app[SERVICE]
    record = await _record(service, request)
    event = _cancel_event(service, record)
    record = await service.queue.cancel(record.id, event)
    if event is not None:
        service.on_event()
    caller = _caller(request)
    log.info("job %s cancelled%s", record.id, f" by key={caller.name}" if caller else "")
    return web.json_response(await _full_view(service, record))


def _cancel_event(service: Service, record: JobRecord) -> Event | None:
    """The ``job.cancelled`` webhook event stored with the cancel (None: no webhook)."""
    return webhooks.record_event(record, "job.cancelled", service.settings.webhook)


async def list_jobs(request: web.Request) -> web.Response:
    """``GET /jobs?state=&limit=&cursor=``: jobs newest first, a page at a time."""
    service: Service = request.app[SERVICE]
    state, limit, cursor = list_query(_single_params(request))
    caller = _caller(request)
    own = caller.name if caller is not None and not caller.admin else None
    records, next_cursor = await service.queue.list_jobs(state, limit, cursor, key=own)
    views = await asyncio.gather(*(_full_view(service, record) for record in records))
    return web.json_response({"jobs": list(views), "nextCursor": next_cursor})


def _single_params(request: web.Request) -> dict[str, str]:
    """The query as a dict; a parameter given twice is refused (which would count?)."""
    params: dict[str, str] = {}
    for name, value in request.query.items():
        if name in params:
            raise errors.JobFieldInvalid(f"{name[:40]}: given more than once")
        params[name] = value
    return params


async def redeliver_webhook(request: web.Request) -> web.Response:
    """``POST /jobs/<id>/webhook``: send the job's latest webhook event again (its
    ``webhook-id`` stays the same), from now on its retry schedule."""
    service: Service = request.app[SERVICE]
    record = await _record(service, request)
    events = await service.queue.job_events(record.id)
    if not events:
        raise errors.JobHasNoEvent(
            f"job {record.id} has no webhook event: it has not ended, or no webhook URL was set"
        )
    event = webhooks.redeliver(events[-1], time.time())
    await service.queue.save_event(event)
    service.on_event()
    log.info("job %s: webhook event %s re-armed", record.id, event.id)
    return web.json_response({"jobId": record.id, "webhook": webhook_view(event)}, status=202)


# --- the change stream ----------------------------------------------------------------


async def stream_events(request: web.Request) -> web.StreamResponse:
    """``GET /events``: Server-Sent Events of job state changes, from the change
    after ``Last-Event-ID`` (or ``?after=``), else from now on."""
    service: Service = request.app[SERVICE]
    params = _single_params(request)
    unknown = sorted(set(params) - {"after"})
    if unknown:
        raise errors.JobFieldUnknown(f"{unknown[0][:40]}: unknown parameter; the one is after")
    after = request.headers.get("Last-Event-ID") or params.get("after")
    if after is not None:
        after = cursor_param(
            "Last-Event-ID" if "Last-Event-ID" in request.headers else "after", after
        )
    _refuse_when_stopping(service)
    if service.streams >= service.max_streams:
        raise errors.EventStreamsFull(f"{service.max_streams} event streams open")
    service.streams += 1  # counted before any wait: simultaneous connects see each other
    try:
        # Read before the stream starts, so a bad id (or a queue that is down) is a JSON reply.
        first: list[Change] = []
        if after is None:
            after = await service.queue.change_cursor()
        else:
            first = await service.queue.changes(after, STREAM_BATCH)
        caller = _caller(request)
        owners = _Owners(service.queue, None if caller is None or caller.admin else caller)
        async with sse_response(request, ping_interval=STREAM_HEARTBEAT_S) as stream:
            await _send_changes(service, stream, after, first, owners)
    finally:
        service.streams -= 1
    return stream


def _stream_open(service: Service, stream: EventSourceResponse) -> bool:
    stopping = service.draining or service.degraded is not None or service.closing.is_set()
    return not stopping and stream.is_connected()


class _Owners:
    """Which changes a stream's key may see: its own jobs' (every job's for an admin
    key, or without keys). Each job's owner is read once per stream."""

    MAX_REMEMBERED = 10_000

    def __init__(self, queue: JobQueue, caller: auth.Key | None) -> None:
        self.queue = queue
        self.caller = caller
        self._known: dict[str, str | None] = {}

    async def visible(self, change: Change) -> bool:
        if self.caller is None:
            return True
        if change.job_id not in self._known:
            if len(self._known) >= self.MAX_REMEMBERED:
                self._known.clear()
            record = await self.queue.get(change.job_id)
            self._known[change.job_id] = record.key if record is not None else None
            if record is None:  # pruned: nobody's to show
                return False
        return self.caller.sees(self._known[change.job_id])


async def _send_changes(
    service: Service,
    stream: EventSourceResponse,
    after: str | None,
    changes: list[Change],
    owners: _Owners,
) -> None:
    """Send ``changes``, then each change after them as it is written, until the
    client goes or the daemon drains (the stream ends; the client resumes with
    Last-Event-ID). A key that is not admin is sent only its own jobs' changes."""
    while True:
        for change in changes:
            after = change.id
            try:
                if not await owners.visible(change):
                    continue
            except errors.ImgserveError as exc:  # the queue is down: end; the client resumes
                log.warning("event stream ended: %s", exc.detail)
                return
            try:
                await stream.send(
                    json.dumps(_change_data(change)),
                    id=change.id,
                    event=f"job.{change.state.value}",
                )
            except (ConnectionResetError, TimeoutError):  # gone, or stalled past send_timeout
                return
        if len(changes) < STREAM_BATCH:
            with contextlib.suppress(TimeoutError):  # woken early only to end
                async with asyncio.timeout(STREAM_POLL_S):  # (3.11's wait_for can lose a cancel)
                    await service.closing.wait()
        if not _stream_open(service, stream):
            return
        try:
            changes = await service.queue.changes(after, STREAM_BATCH)
        except errors.ImgserveError as exc:  # the queue is down: end; the client resumes
            log.warning("event stream ended: %s", exc.detail)
            return


def _change_data(change: Change) -> dict[str, Any]:
    return {"jobId": change.job_id, "state": change.state.value, "at": change.at}


async def health(request: web.Request) -> web.Response:
    service: Service = request.app[SERVICE]
    counts = await service.queue.counts()
    service.metrics.queue_counts = counts  # fresh for the next scrape too
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


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: the Prometheus text format (docs/operating.md); with keys
    configured it needs one, as every endpoint but the probes."""
    return await exposition(request.app[SERVICE].metrics)


async def livez(request: web.Request) -> web.Response:
    """``GET /livez``: the process answers (no queue read); never needs a key."""
    return web.json_response({"status": "alive"})


async def openapi_document(request: web.Request) -> web.Response:
    """``GET /openapi.json``: the API's OpenAPI 3.1 document (docs/api.md, "OpenAPI")."""
    return web.Response(body=openapi.served(), content_type="application/json")


def make_app(service: Service) -> web.Application:
    # The body limit is enforced here (413 -> code 125) with slack for the check above.
    app = web.Application(
        middlewares=[
            request_timer(service.metrics),
            errors_middleware,
            auth_middleware,
            # Inside errors_middleware (it sees an error's code) and auth_middleware:
            # a request without a valid key gets no span (it cannot flood a collector).
            *service.metrics.tracing.middlewares(),
        ],
        client_max_size=service.settings.server.max_request_bytes + 1,
    )
    app[SERVICE] = service
    app.router.add_post("/", submit)
    app.router.add_post("/jobs", submit_jobs)
    app.router.add_get("/jobs", list_jobs)
    app.router.add_get("/jobs/{job_id}", get_job)
    app.router.add_delete("/jobs/{job_id}", cancel_job)
    app.router.add_post("/jobs/{job_id}/webhook", redeliver_webhook)
    app.router.add_get("/events", stream_events)
    app.router.add_get("/health", health)
    app.router.add_get("/livez", livez)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi_document)
    ui.add_routes(app, service.queue.counts)

    async def end_streams(_app: web.Application) -> None:
        service.closing.set()  # before aiohttp waits for the handlers still running

    app.on_shutdown.append(end_streams)
    return app

"""``Client``: imgserve's HTTP API from blocking code, on httpx.Client.

Each method is one request, retried as :class:`Retries` says (``submit`` carries an
Idempotency-Key, so a retry never makes a second job; a cancel or a webhook
redelivery whose reply did not come is not sent again); error replies raise the
exception of their code's family (imgserve.client.errors). ``wait`` follows the job
on ``GET /events`` and polls ``GET /jobs/<id>`` when the stream cannot be had.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import httpx
import stamina
from httpx_sse import ServerSentEvent, connect_sse
from httpx_sse._decoders import SSEDecoder  # (not exported: wait reads the pings too)

from imgserve.client import _protocol as p
from imgserve.client.errors import WaitTimeout
from imgserve.client.models import ChangeEvent, Job, JobPage, JobState, WebhookDelivery


class _NoStream(Exception):
    """The event stream cannot be had or ended: poll instead."""


class Client:
    """A connection pool to one imgserve daemon.

    ``base_url`` defaults to ``IMGSERVE_URL`` (else ``http://127.0.0.1:8602``) and
    ``api_key`` to ``IMGSERVE_API_KEY``. ``timeout_s`` bounds each request (100 s:
    ``POST /jobs`` answers once the source was read and the placeholders are up).
    Each ``wait`` (from as many threads as you like) holds an event stream and a
    connection while it waits: at most ``max_streams`` at once, the waits beyond
    them poll (the daemon serves 64 streams in all; ``AsyncClient`` shares one).
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float = p.REQUEST_TIMEOUT_S,
        retries: p.Retries | None = None,
        max_streams: int = 4,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url, api_key = p.resolve(base_url, api_key)
        self.max_streams = max_streams
        self._streams = threading.BoundedSemaphore(max_streams)
        self.timeout_s = timeout_s
        self.retries = retries or p.Retries()
        self._headers = p.headers(api_key)
        self._http = httpx.Client(
            base_url=self.base_url, timeout=timeout_s, transport=transport, headers=self._headers
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, request: p.Request) -> httpx.Response:
        """The request, retried; an error reply that is not retried is raised."""
        try:
            for attempt in stamina.retry_context(**self.retries.stamina_kwargs(request)):
                with attempt:
                    response = self._http.request(request.method, request.path, **request.kwargs())
                    p.raise_for_reply(response)
                    return response
        except httpx.TransportError as exc:
            raise p.transport_error(exc, self.base_url + request.path) from exc
        raise AssertionError("unreachable: stamina retries or raises")  # pragma: no cover

    def submit(
        self,
        source: p.Source,
        outputs: Sequence[Mapping[str, Any]],
        *,
        placeholder: bool | None = None,
        metadata: Mapping[str, Any] | None = None,
        webhook: str | None = None,
        priority: str | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """``POST /jobs``: ``source`` is a URL (``str``), a local file (a path) or an
        :class:`Upload`; ``outputs`` are output objects as docs/api.md gives them
        (``{"url": "file:///out/{$basename}-{$width}.webp", "width": 640}``). The
        reply's job has every output's final URL and size."""
        job = p.job_body(
            outputs, placeholder=placeholder, metadata=metadata, webhook=webhook, priority=priority
        )
        return self.submit_job(source, job, idempotency_key=idempotency_key)

    def submit_job(
        self, source: p.Source, job: Mapping[str, Any], *, idempotency_key: str | None = None
    ) -> Job:
        """``POST /jobs`` of a whole job object (as docs/api.md gives it, without
        ``source``): what a jobs file holds."""
        return p.job_reply(self._send(p.submit_request(source, job, idempotency_key)))

    def get(self, job: Job | str) -> Job:
        """``GET /jobs/<id>``."""
        path = f"/jobs/{p.job_id(job)}"
        return p.job_reply(self._send(p.Request("GET", path, {})))

    def list_jobs(
        self, *, state: JobState | str | None = None, limit: int | None = None,
        cursor: str | None = None,
    ) -> JobPage:  # fmt: skip
        """``GET /jobs``: one page, newest first."""
        request = p.Request("GET", "/jobs", {}, params=p.list_params(state, limit, cursor))
        return JobPage.from_dict(p.json_reply(self._send(request)))

    def iter_jobs(
        self, *, state: JobState | str | None = None, page_size: int | None = None
    ) -> Iterator[Job]:
        """Every job, newest first, page after page."""
        cursor: str | None = None
        while True:
            page = self.list_jobs(state=state, limit=page_size, cursor=cursor)
            yield from page.jobs
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def cancel(self, job: Job | str) -> Job:
        """``DELETE /jobs/<id>``: a queued job ends as cancelled (409, 613, when it
        is running or ended)."""
        return p.job_reply(
            self._send(p.Request("DELETE", f"/jobs/{p.job_id(job)}", {}, resend_unanswered=False))
        )

    def redeliver_webhook(self, job: Job | str) -> WebhookDelivery:
        """``POST /jobs/<id>/webhook``: send the job's latest webhook event again."""
        path = f"/jobs/{p.job_id(job)}/webhook"
        request = p.Request("POST", path, {}, resend_unanswered=False)  # (no key: not twice)
        return WebhookDelivery.from_dict(p.json_reply(self._send(request))["webhook"])

    def health(self) -> dict[str, Any]:
        """``GET /health``: the daemon's state, queue counts and workers."""
        try:
            response = self._http.get("/health")  # 503 (degraded) still says why
        except httpx.TransportError as exc:
            raise p.transport_error(exc, self.base_url + "/health") from exc
        return p.health_reply(response)

    @contextlib.contextmanager
    def events(self, *, after: str | None = None) -> Iterator[Iterator[ChangeEvent]]:
        """``GET /events``, open once the ``with`` is entered: every job state change
        from then on (or after the change ``after``), until the daemon ends the
        stream (it drains or stops; resume with the last change's ``id``)::

            with client.events() as changes:
                for change in changes:
                    print(change.job_id, change.state)

        An error reply (503, 615: every stream taken) raises its exception."""
        headers = {"Last-Event-ID": after} if after is not None else {}
        timeout = httpx.Timeout(self.timeout_s, read=p.STREAM_READ_S)
        try:
            with connect_sse(self._http, "GET", "/events", headers=headers, timeout=timeout) as es:
                if not p.is_event_stream(es.response):
                    es.response.read()
                    p.raise_for_reply(es.response)
                    raise p.not_a_stream(es.response)
                yield _changes(es.iter_sse())
        except httpx.TransportError as exc:
            raise p.transport_error(exc, self.base_url + "/events") from exc

    def wait(self, job: Job | str, *, timeout_s: float | None = None, poll_s: float = 1.0) -> Job:
        """The job once it has ended (done, failed or cancelled), followed on the
        event stream, or by polling every ``poll_s`` when the stream cannot be had.
        :class:`WaitTimeout` after ``timeout_s`` (on a quiet stream, at the daemon's
        next ping: within 15 s), carrying the job as last seen. A failed job is
        returned, not raised: ``wait(job).raise_for_state()`` raises its error."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        job_id = p.job_id(job)
        last: list[Job] = []
        try:
            return self._wait_on_stream(job_id, deadline, last)
        except _NoStream:
            return self._wait_polling(job_id, deadline, poll_s, last)

    def _wait_on_stream(self, job_id: str, deadline: float | None, last: list[Job]) -> Job:
        if not self._streams.acquire(blocking=False):
            raise _NoStream  # as many waits as max_streams hold one each: poll
        try:
            return self._wait_on_a_stream(job_id, deadline, last)
        finally:
            self._streams.release()

    def _wait_on_a_stream(self, job_id: str, deadline: float | None, last: list[Job]) -> Job:
        read_s = p.STREAM_READ_S if deadline is None else _left(deadline, job_id, None)
        timeout = httpx.Timeout(self.timeout_s, read=min(p.STREAM_READ_S, read_s))
        try:
            with connect_sse(self._http, "GET", "/events", timeout=timeout) as es:
                if not p.is_event_stream(es.response):
                    raise _NoStream  # an older daemon, a proxy, 615: every stream taken
                # The stream is open and starts from now: a change from here on is
                # seen, so a job that has not ended yet cannot end unseen.
                last[:] = [self.get(job_id)]
                if last[-1].ended:
                    return last[-1]
                decoder = SSEDecoder()
                # Line by line, pings included (iter_sse skips them): a quiet stream's
                # pings are when the deadline is checked.
                for line in es.response.iter_lines():
                    if deadline is not None:
                        _left(deadline, job_id, last[-1])
                    change = _change(decoder.decode(line))
                    if change is not None and change.job_id == job_id and change.ended:
                        return self.get(job_id)
        except httpx.ReadTimeout as exc:
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"job {job_id} did not end in time", _seen(last)) from exc
            raise _NoStream from exc
        except httpx.TransportError as exc:
            raise _NoStream from exc
        raise _NoStream  # the daemon ended the stream (it drains): poll the rest

    def _wait_polling(
        self, job_id: str, deadline: float | None, poll_s: float, last: list[Job]
    ) -> Job:
        while True:
            last[:] = [self.get(job_id)]
            if last[-1].ended:
                return last[-1]
            pause_s = poll_s if deadline is None else min(poll_s, _left(deadline, job_id, last[-1]))
            time.sleep(pause_s)


def _seen(last: list[Job]) -> Job | None:
    return last[-1] if last else None


def _change(sse: ServerSentEvent | None) -> ChangeEvent | None:
    data = None if sse is None else p.change_data(sse.data)
    return None if sse is None or data is None else ChangeEvent.from_sse(sse.id, data)


def _changes(events: Iterator[ServerSentEvent]) -> Iterator[ChangeEvent]:
    for sse in events:
        change = _change(sse)
        if change is not None:
            yield change


def _left(deadline: float, job_id: str, job: Job | None) -> float:
    """Seconds left before ``deadline``; WaitTimeout when there are none."""
    left_s = deadline - time.monotonic()
    if left_s <= 0:
        raise WaitTimeout(f"job {job_id} did not end in time", job)
    return left_s

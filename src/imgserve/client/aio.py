"""``AsyncClient``: imgserve's HTTP API from asyncio, on httpx.AsyncClient.

The same methods as :class:`imgserve.client.Client`, awaited; the requests, the
retries and the replies are decided in ``_protocol`` for both.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import httpx
import stamina
from httpx_sse import ServerSentEvent, SSEError, aconnect_sse

from imgserve.client import _protocol as p
from imgserve.client.errors import WaitTimeout
from imgserve.client.models import ChangeEvent, Job, JobPage, JobState, WebhookDelivery


class _NoStream(Exception):
    """The event stream cannot be had or ended: poll instead."""


class AsyncClient:
    """A connection pool to one imgserve daemon, for asyncio (see ``Client``)."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float = p.REQUEST_TIMEOUT_S,
        retries: p.Retries | None = None,
        max_connections: int = 100,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url, api_key = p.resolve(base_url, api_key)
        self.timeout_s = timeout_s
        self.retries = retries or p.Retries()
        limits = httpx.Limits(max_connections=max_connections)
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=timeout_s,
            transport=transport,
            headers=p.headers(api_key),
            limits=limits,
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, request: p.Request) -> httpx.Response:
        """The request, retried; an error reply that is not retried is raised."""
        try:
            async for attempt in stamina.retry_context(**self.retries.stamina_kwargs()):
                with attempt:
                    response = await self._http.request(
                        request.method, request.path, **request.kwargs()
                    )
                    p.raise_for_reply(response)
                    return response
        except httpx.TransportError as exc:
            raise p.transport_error(exc, self.base_url + request.path) from exc
        raise AssertionError("unreachable: stamina retries or raises")  # pragma: no cover

    async def submit(
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
        """``POST /jobs`` (see ``Client.submit``)."""
        job = p.job_body(
            outputs, placeholder=placeholder, metadata=metadata, webhook=webhook, priority=priority
        )
        return await self.submit_job(source, job, idempotency_key=idempotency_key)

    async def submit_job(
        self, source: p.Source, job: Mapping[str, Any], *, idempotency_key: str | None = None
    ) -> Job:
        """``POST /jobs`` of a whole job object (as docs/api.md gives it, without
        ``source``): what a jobs file holds."""
        request = p.submit_request(source, job, idempotency_key)
        return p.job_reply(await self._send(request))

    async def get(self, job: Job | str) -> Job:
        """``GET /jobs/<id>``."""
        return p.job_reply(await self._send(p.Request("GET", f"/jobs/{p.job_id(job)}", {})))

    async def list_jobs(
        self, *, state: JobState | str | None = None, limit: int | None = None,
        cursor: str | None = None,
    ) -> JobPage:  # fmt: skip
        """``GET /jobs``: one page, newest first."""
        request = p.Request("GET", "/jobs", {}, params=p.list_params(state, limit, cursor))
        return JobPage.from_dict(p.json_reply(await self._send(request)))

    async def iter_jobs(
        self, *, state: JobState | str | None = None, page_size: int | None = None
    ) -> AsyncIterator[Job]:
        """Every job, newest first, page after page."""
        cursor: str | None = None
        while True:
            page = await self.list_jobs(state=state, limit=page_size, cursor=cursor)
            for job in page.jobs:
                yield job
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def cancel(self, job: Job | str) -> Job:
        """``DELETE /jobs/<id>``."""
        return p.job_reply(await self._send(p.Request("DELETE", f"/jobs/{p.job_id(job)}", {})))

    async def redeliver_webhook(self, job: Job | str) -> WebhookDelivery:
        """``POST /jobs/<id>/webhook``."""
        request = p.Request("POST", f"/jobs/{p.job_id(job)}/webhook", {})
        return WebhookDelivery.from_dict(p.json_reply(await self._send(request))["webhook"])

    async def health(self) -> dict[str, Any]:
        """``GET /health``."""
        try:
            response = await self._http.get("/health")  # 503 (degraded) still says why
        except httpx.TransportError as exc:
            raise p.transport_error(exc, self.base_url + "/health") from exc
        return dict(response.json())

    @contextlib.asynccontextmanager
    async def events(
        self, *, after: str | None = None
    ) -> AsyncIterator[AsyncIterator[ChangeEvent]]:
        """``GET /events``, open once the ``async with`` is entered (see
        ``Client.events``)::

            async with client.events() as changes:
                async for change in changes:
                    print(change.job_id, change.state)
        """
        headers = {"Last-Event-ID": after} if after is not None else {}
        timeout = httpx.Timeout(self.timeout_s, read=p.STREAM_READ_S)
        try:
            async with aconnect_sse(
                self._http, "GET", "/events", headers=headers, timeout=timeout
            ) as es:
                if not p.is_event_stream(es.response):
                    await es.response.aread()
                    p.raise_for_reply(es.response)
                    raise p.not_a_stream(es.response)
                yield _changes(es.aiter_sse())
        except httpx.TransportError as exc:
            raise p.transport_error(exc, self.base_url + "/events") from exc

    async def wait(
        self, job: Job | str, *, timeout_s: float | None = None, poll_s: float = 1.0
    ) -> Job:
        """The job once it has ended (see ``Client.wait``); here ``timeout_s`` is exact."""
        job_id = p.job_id(job)
        last: list[Job] = []
        try:
            async with asyncio.timeout(timeout_s):
                try:
                    return await self._wait_on_stream(job_id, last)
                except _NoStream:
                    return await self._wait_polling(job_id, last, poll_s)
        except TimeoutError as exc:
            raise WaitTimeout(
                f"job {job_id} did not end in {timeout_s:g} s", last[-1] if last else None
            ) from exc

    async def _wait_on_stream(self, job_id: str, last: list[Job]) -> Job:
        timeout = httpx.Timeout(self.timeout_s, read=p.STREAM_READ_S)
        try:
            async with aconnect_sse(self._http, "GET", "/events", timeout=timeout) as es:
                if not p.is_event_stream(es.response):
                    raise _NoStream  # an older daemon, a proxy, 615: every stream taken
                # The stream starts from now: a change from here on is seen.
                last[:] = [await self.get(job_id)]
                if last[-1].ended:
                    return last[-1]
                async for change in _changes(es.aiter_sse()):
                    if change.job_id == job_id and change.state.ended:
                        return await self.get(job_id)
        except (httpx.TransportError, SSEError) as exc:
            raise _NoStream from exc
        raise _NoStream  # the daemon ended the stream (it drains): poll the rest

    async def _wait_polling(self, job_id: str, last: list[Job], poll_s: float) -> Job:
        while True:
            last[:] = [await self.get(job_id)]
            if last[-1].ended:
                return last[-1]
            await asyncio.sleep(poll_s)


async def _changes(events: AsyncIterator[ServerSentEvent]) -> AsyncIterator[ChangeEvent]:
    async for sse in events:
        data = p.change_data(sse.data)
        if data is not None:
            yield ChangeEvent.from_sse(sse.id, data)

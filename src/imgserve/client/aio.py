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
from httpx_sse import ServerSentEvent, aconnect_sse

from imgserve.client import _protocol as p
from imgserve.client.errors import APIError, ClientError, WaitTimeout
from imgserve.client.models import ChangeEvent, Job, JobPage, JobState, WebhookDelivery


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
        self._ends = _Ends(self)

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
        await self._ends.aclose()
        await self._http.aclose()

    async def _send(self, request: p.Request) -> httpx.Response:
        """The request, retried; an error reply that is not retried is raised."""
        try:
            async for attempt in stamina.retry_context(**self.retries.stamina_kwargs(request)):
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
        return p.job_reply(
            await self._send(
                p.Request("DELETE", f"/jobs/{p.job_id(job)}", {}, resend_unanswered=False)
            )
        )

    async def redeliver_webhook(self, job: Job | str) -> WebhookDelivery:
        """``POST /jobs/<id>/webhook``."""
        path = f"/jobs/{p.job_id(job)}/webhook"
        request = p.Request("POST", path, {}, resend_unanswered=False)  # (no key: not twice)
        return WebhookDelivery.from_dict(p.json_reply(await self._send(request))["webhook"])

    async def health(self) -> dict[str, Any]:
        """``GET /health``."""
        try:
            response = await self._http.get("/health")  # 503 (degraded) still says why
        except httpx.TransportError as exc:
            raise p.transport_error(exc, self.base_url + "/health") from exc
        return p.health_reply(response)

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
        """The job once it has ended (see ``Client.wait``); here ``timeout_s`` is exact.
        Every wait of this client hears the ends on one shared ``GET /events``
        stream, so a thousand waits hold one stream and one connection."""
        job_id = p.job_id(job)
        last: list[Job] = []
        try:
            async with asyncio.timeout(timeout_s):
                return await self._ends.wait(job_id, poll_s, last)
        except TimeoutError as exc:
            raise WaitTimeout(
                f"job {job_id} did not end in {timeout_s:g} s", last[-1] if last else None
            ) from exc


class _Ends:
    """The ends of jobs, heard on one ``GET /events`` stream that every ``wait()`` of
    a client shares: open while someone waits (and ``LINGER_S`` after, for the next
    wait), reopened after a pause when it ends or is refused. Meanwhile, and
    every ``SAFETY_POLL_S`` even while it is open, each waiter reads its job."""

    LINGER_S = 5.0
    SAFETY_POLL_S = 30.0
    """A lost event cannot leave a wait waiting for ever."""
    REOPEN_S = 1.0
    """The pause before the stream is asked for again (or its ``Retry-After``)."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self._waiting: dict[str, set[asyncio.Event]] = {}
        self._follower: asyncio.Task[None] | None = None
        self._opened = asyncio.Event()
        self._streaming = False
        self._linger: asyncio.TimerHandle | None = None

    async def wait(self, job_id: str, poll_s: float, last: list[Job]) -> Job:
        woken = asyncio.Event()
        waiting = self._waiting.setdefault(job_id, set())
        waiting.add(woken)  # before the first read: an end from then on is not lost
        self._start()
        try:
            await self._opened.wait()  # the stream is open (or cannot be had yet)
            while True:
                woken.clear()
                last[:] = [await self._client.get(job_id)]
                if last[-1].ended:
                    return last[-1]
                pause_s = self.SAFETY_POLL_S if self._streaming else poll_s
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(pause_s):
                        await woken.wait()
        finally:
            waiting.discard(woken)
            if not waiting:
                self._waiting.pop(job_id, None)
            if not self._waiting and self._follower is not None:
                if self._linger is not None:
                    self._linger.cancel()
                loop = asyncio.get_running_loop()
                self._linger = loop.call_later(self.LINGER_S, self._stop)

    def _start(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self._follower is None or self._follower.done():
            self._opened = asyncio.Event()
            self._streaming = False
            self._follower = asyncio.get_running_loop().create_task(self._follow())

    def _stop(self) -> None:
        if self._follower is not None and not self._waiting:
            self._follower.cancel()
            self._follower = None

    async def aclose(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
        follower, self._follower = self._follower, None
        if follower is not None:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower

    async def _follow(self) -> None:
        try:
            await self._follow_stream()
        finally:  # (cancelled, or a bug): the waiters poll from now on, unless
            # this one was stopped and a newer follower already serves them
            if self._follower in (None, asyncio.current_task()):
                self._streaming = False
                self._opened.set()
                self._wake_all()

    def _wake_all(self) -> None:
        for events in self._waiting.values():
            for woken in events:
                woken.set()

    async def _follow_stream(self) -> None:
        while True:
            pause_s = self.REOPEN_S
            try:
                async with self._client.events() as changes:
                    self._streaming = True
                    self._opened.set()
                    async for change in changes:
                        if change.ended:
                            for woken in self._waiting.get(change.job_id, ()):
                                woken.set()
            except ClientError as exc:  # refused (615: every stream taken), broken
                if isinstance(exc, APIError) and exc.retry_after_s is not None:
                    pause_s = max(pause_s, exc.retry_after_s)
            self._streaming = False
            self._opened.set()
            self._wake_all()  # re-read now: the stream missed a while
            await asyncio.sleep(pause_s)


async def _changes(events: AsyncIterator[ServerSentEvent]) -> AsyncIterator[ChangeEvent]:
    async for sse in events:
        data = p.change_data(sse.data)
        if data is not None:
            yield ChangeEvent.from_sse(sse.id, data)

"""Broken HTTP gets imgserve's JSON error shape too, not aiohttp's plain text.

A request aiohttp cannot parse (a bad request line, an invalid method, a URL
or header past the limits, broken framing) never reaches the application or
its middlewares: aiohttp's low-level protocol, ``web_protocol.RequestHandler``,
answers it itself in ``text/plain`` from ``handle_error``. :func:`make_runner`
returns an ``AppRunner`` whose connections use a ``RequestHandler`` subclass
answering those errors with :func:`imgserve.api.error_reply`: codes 127-129,
and 601 for anything that escaped the application.

aiohttp API this relies on (checked against aiohttp 3.14):

- ``RequestHandler.handle_error(request, status, exc, message)``, a public
  method, is overridden. It is what aiohttp calls for parse errors (status
  400 with the ``HttpProcessingError``), handler timeouts (504) and handler
  exceptions (500).
- ``BaseRunner._make_server()`` (private, the abstract method each runner
  implements) is extended: the ``Server`` the application built is replaced
  by a ``Server`` subclass, built from its public ``request_handler``,
  ``request_factory`` and ``handler_cancellation`` and from ``Server._kwargs``
  (private: the handler arguments such as ``max_line_size`` and ``debug``).
- ``Server.__call__`` (the protocol factory) is overridden to build the
  ``RequestHandler`` subclass with those arguments, as aiohttp's does.

tests/test_protocol.py sends broken requests to a real TCP server, so an
aiohttp upgrade that moves these hooks fails there, not in production.

The request line limit (``URL_MAX_BYTES``) differs from the header field
limit (``FIELD_MAX_BYTES``) on purpose: aiohttp raises the same
``LineTooLong`` for both and only the limit in it says which one was hit.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong

from imgserve import errors
from imgserve.api import error_reply

URL_MAX_BYTES = 8192
"""Longest request target (path and query) accepted; past it, 129 (414)."""
FIELD_MAX_BYTES = 8190
"""Longest header line (name and value) accepted; past it, 128 (431). aiohttp's default."""
MAX_HEADERS = 128
"""Most header lines in one request; past it, 128 (431). aiohttp's default."""

_DETAIL_CHARS = 200

log = logging.getLogger("imgserve.http")


def error_for(
    status: int, exc: BaseException | None, *, url_max_bytes: int
) -> errors.ImgserveError:
    """The imgserve error for what aiohttp's protocol layer refused (pure)."""
    if isinstance(exc, LineTooLong):
        if exc.args[1:2] == (url_max_bytes,):
            return errors.HTTPURLTooLong(f"request line over {url_max_bytes} bytes")
        return errors.HTTPHeadersTooLarge(f"a header line is over {exc.args[1]} bytes")
    if isinstance(exc, HttpProcessingError) and exc.message == "Too many headers received":
        return errors.HTTPHeadersTooLarge("more headers than the limit")
    if isinstance(exc, BadHttpMethod):
        return errors.HTTPRequestMalformed("invalid HTTP method in the request line")
    if isinstance(exc, HttpProcessingError):
        detail = exc.message or type(exc).__name__
        return errors.HTTPRequestMalformed(detail[:_DETAIL_CHARS])
    if status == 504:
        return errors.InternalError("request handler timed out")
    return errors.InternalError(type(exc).__name__ if exc is not None else f"HTTP {status}")


class JSONErrorRequestHandler(web.RequestHandler):
    """aiohttp's connection handler, answering protocol errors in imgserve's JSON shape."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        error = error_for(status, exc, url_max_bytes=self.max_line_size)
        if error.status >= 500:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        else:
            # A client's mistake, common on a public port (scanners, TLS on the
            # plain port): one line, no traceback.
            log.info("refused a request from %s: %d %s", request.remote, error.code, error.detail)
        # As aiohttp's: once a response has started, another cannot be sent.
        if request.writer.output_size > 0:
            raise ConnectionError("response already started, cannot send the error reply")
        reply = error_reply(error)
        reply.force_close()
        return reply


class JSONErrorServer(web.Server):
    """A ``web.Server`` whose connections use :class:`JSONErrorRequestHandler`."""

    def __init__(self, built: web.Server) -> None:
        self._handler_kwargs: dict[str, Any] = dict(built._kwargs)  # see the module docstring
        super().__init__(
            built.request_handler,
            request_factory=built.request_factory,
            handler_cancellation=built.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **self._handler_kwargs,
        )

    def __call__(self) -> web.RequestHandler:
        return JSONErrorRequestHandler(
            self, loop=asyncio.get_running_loop(), **self._handler_kwargs
        )


class JSONErrorAppRunner(web.AppRunner):
    """An ``AppRunner`` serving through :class:`JSONErrorServer`."""

    async def _make_server(self) -> web.Server:
        return JSONErrorServer(await super()._make_server())


def make_runner(app: web.Application, **kwargs: Any) -> web.AppRunner:
    """An ``AppRunner`` for ``app`` whose protocol errors are JSON replies.

    Takes ``web.AppRunner``'s keyword arguments (``access_log``,
    ``handle_signals``, ``shutdown_timeout``, ...); the header and URL limits
    default to this module's constants.
    """
    kwargs.setdefault("max_line_size", URL_MAX_BYTES)
    kwargs.setdefault("max_field_size", FIELD_MAX_BYTES)
    kwargs.setdefault("max_headers", MAX_HEADERS)
    return JSONErrorAppRunner(app, **kwargs)

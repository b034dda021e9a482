"""Transports by URL scheme, and the retrying upload.

:class:`Transports` maps a scheme to a :class:`~imgserve.transports.base.Transport`
implementation by import string and imports it on first use, so a missing
optional dependency only matters to the scheme that needs it. One instance per
implementation class is kept (http and https share one, ftp and ftps too).
"""

from __future__ import annotations

import asyncio
import importlib
import logging

from imgserve.config import TransportSettings
from imgserve.errors import (
    DependencyMissing,
    DstSchemeUnsupported,
    ImgserveError,
    SrcSchemeUnsupported,
    URLInvalid,
)
from imgserve.retry import backoff_s
from imgserve.transports.base import Charge, HopCheck, Target, Transport
from imgserve.urls import redact_url, scheme_of

__all__ = ["SCHEMES", "Target", "Transport", "Transports"]

log = logging.getLogger(__name__)

_REGISTRY: dict[str, str] = {
    "http": "imgserve.transports.http:HTTPTransport",
    "https": "imgserve.transports.http:HTTPTransport",
    "ftp": "imgserve.transports.ftp:FTPTransport",
    "ftps": "imgserve.transports.ftp:FTPTransport",
    "file": "imgserve.transports.file:FileTransport",
    "s3": "imgserve.transports.s3:S3Transport",
}

# Third-party module -> how to get it, for the "missing dependency" message.
_INSTALL_HINT: dict[str, str] = {
    "aiohttp": "pip install 'imgserve' (aiohttp is a core dependency)",
    "boto3": "pip install 'imgserve' (boto3 is a core dependency)",
    "botocore": "pip install 'imgserve' (boto3 is a core dependency)",
}

SCHEMES: frozenset[str] = frozenset(_REGISTRY)


def _load(import_string: str, scheme: str) -> type[Transport]:
    module_name, _, attr = import_string.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        hint = _INSTALL_HINT.get(missing, f"pip install {missing}")
        raise DependencyMissing(
            f"the {scheme}:// transport needs the {missing!r} package, which is not installed: "
            f"{hint}"
        ) from exc
    cls = getattr(module, attr)
    if not (isinstance(cls, type) and issubclass(cls, Transport)):
        raise TypeError(f"{import_string} is not a Transport")
    return cls


class Transports:
    """The registry the daemon uses: download/upload by URL, with retries."""

    def __init__(self, settings: TransportSettings) -> None:
        self.settings = settings
        self._instances: dict[str, Transport] = {}

    def supports(self, scheme: str) -> bool:
        """Whether ``scheme`` (any case) has a transport."""
        return scheme.lower() in _REGISTRY

    def for_url(self, url: str) -> Transport:
        """The transport for ``url``'s scheme; URLInvalid for an unknown scheme."""
        scheme = scheme_of(url)
        import_string = _REGISTRY.get(scheme)
        if import_string is None:
            raise URLInvalid(f"unsupported URL scheme {scheme!r} in {redact_url(url)}")
        transport = self._instances.get(import_string)
        if transport is None:
            transport = _load(import_string, scheme)(self.settings)
            self._instances[import_string] = transport
        return transport

    async def download(
        self, url: str, charge: Charge | None = None, hop_check: HopCheck | None = None
    ) -> bytes:
        """Download ``url`` (SrcSchemeUnsupported for an unknown scheme), calling
        ``charge`` with the size of each chunk as it arrives and ``hop_check`` with
        each URL a redirect leads to, before it is fetched (it raises to refuse)."""
        if not self.supports(scheme_of(url)):
            raise SrcSchemeUnsupported(f"cannot download {redact_url(url)}")
        return await self.for_url(url).download(url, charge, hop_check)

    async def upload(self, target: Target, data: bytes, content_type: str) -> None:
        """Upload, retrying retryable failures with full-jitter backoff.

        Makes at most ``settings.upload_attempts`` attempts; the last error is
        raised unchanged. Non-retryable errors are raised at once.
        """
        if not self.supports(scheme_of(target.url)):
            raise DstSchemeUnsupported(f"cannot upload to {redact_url(target.url)}")
        transport = self.for_url(target.url)
        attempts = max(1, self.settings.upload_attempts)
        for attempt in range(1, attempts + 1):
            try:
                await transport.upload_once(target, data, content_type)
                return
            except ImgserveError as exc:
                if not exc.retryable or attempt == attempts:
                    raise
                delay_s = backoff_s(
                    attempt, base_s=self.settings.retry_base_s, max_s=self.settings.retry_max_s
                )
                log.warning(
                    "upload to %s failed (attempt %d/%d, code %d: %s); retrying in %.2fs",
                    redact_url(target.url),
                    attempt,
                    attempts,
                    exc.code,
                    exc.detail,
                    delay_s,
                )
                await asyncio.sleep(delay_s)

    async def aclose(self) -> None:
        """Close every transport created so far."""
        instances, self._instances = list(self._instances.values()), {}
        for transport in instances:
            await transport.aclose()

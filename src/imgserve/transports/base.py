"""The transport interface: download bytes from a URL, upload bytes to a target.

One implementation per scheme family (http.py, ftp.py, file.py, s3.py), each
constructed with the shared :class:`~imgserve.config.TransportSettings`.
Implementations raise only imgserve errors (errors.py): they run their I/O
inside ``outcomes.translated(direction, url)``, which turns third-party
exceptions and the outcomes they raise themselves into imgserve errors by one
table (outcomes.py), with ``raise ... from exc``. Blocking libraries run on the
transport's own thread pool (threads.py), released by ``aclose()``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from imgserve.config import TransportSettings
from imgserve.transports import outcomes

Charge = Callable[[int], None]
"""Called with the size of each chunk of a download as it arrives (the API's
intake byte budget, intake.Admission.charge); raises to stop the download."""
HopCheck = Callable[[str], None]
"""Called with each URL a download is redirected to, before it is fetched (an API
key's sources scope); raises to refuse the redirect."""


class Chunks:
    """A download's bytes as they arrive: within ``max_bytes`` (TooLarge past it)
    and charged, chunk by chunk, to the caller's ``charge``."""

    def __init__(self, max_bytes: int, charge: Charge | None = None) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._charge = charge
        self._parts: list[bytes] = []

    def add(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.max_bytes:
            raise outcomes.TooLarge(f"more than {self.max_bytes} bytes")
        if self._charge is not None and data:
            self._charge(len(data))
        self._parts.append(data)

    def join(self) -> bytes:
        return b"".join(self._parts)


@dataclass(frozen=True)
class Target:
    """Where to upload a result.

    ``url`` is the URL to connect to. For an HTTP form upload (0.2's
    ``http://host/upload.php:name.png`` syntax) ``form_field`` names the form
    field and ``filename`` the file name sent with it; an http(s) target
    without ``form_field`` is a PUT of the raw bytes to ``url``.
    ``durable=False`` (placeholders) lets a local write skip forcing the data to
    disk: a power cut before the job finishes re-runs it anyway.
    """

    url: str
    form_field: str | None = None
    filename: str | None = None
    durable: bool = True


class Transport(abc.ABC):
    """One scheme family. Instances are cheap and may be shared by jobs."""

    schemes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, settings: TransportSettings) -> None:
        self.settings = settings

    @abc.abstractmethod
    async def download(
        self, url: str, charge: Charge | None = None, hop_check: HopCheck | None = None
    ) -> bytes:
        """Fetch the whole object at ``url``.

        Enforces ``settings.max_download_bytes`` (counted on decoded bytes)
        and ``settings.download_timeout_s`` as one total deadline; ``charge``
        is called for every chunk as it arrives (collect them in :class:`Chunks`).
        """

    @abc.abstractmethod
    async def upload_once(self, target: Target, data: bytes, content_type: str) -> None:
        """One upload attempt, replacing any object already there.

        Raises a retryable error (UploadFailed) for transient failures and a
        non-retryable one (UploadRefused, policy errors) for permanent ones.
        Readers never see a partial object where the protocol allows it.
        """

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release pooled connections."""

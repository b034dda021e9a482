"""imgserve's Python client: ``Client`` and ``AsyncClient`` on httpx (docs/client.md).

    from imgserve.client import Client

    with Client("http://127.0.0.1:8602") as imgserve:
        job = imgserve.submit("https://example.com/a.jpg",
                              [{"url": "file:///out/{$basename}-{$width}.webp", "width": 640}])
        print(imgserve.wait(job).raise_for_state().outputs)

It imports nothing of the daemon (no pyvips, no aiohttp): it needs httpx, httpx-sse,
stamina and standardwebhooks, the ``imgserve[client]`` extra.
"""

from __future__ import annotations

from imgserve.client._protocol import Retries, Source, Upload
from imgserve.client.aio import AsyncClient
from imgserve.client.errors import (
    APIError,
    AuthError,
    ClientError,
    DestinationError,
    JobNotFound,
    LimitError,
    PolicyError,
    RequestError,
    ServiceError,
    SourceError,
    TransportError,
    ValidationError,
    WaitTimeout,
)
from imgserve.client.models import (
    ChangeEvent,
    Job,
    JobError,
    JobPage,
    JobState,
    Output,
    SourceInfo,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEvent,
)
from imgserve.client.sync import Client
from imgserve.client.webhooks import InvalidWebhook, verify_event

__all__ = [
    "APIError",
    "AsyncClient",
    "AuthError",
    "ChangeEvent",
    "Client",
    "ClientError",
    "DestinationError",
    "InvalidWebhook",
    "Job",
    "JobError",
    "JobNotFound",
    "JobPage",
    "JobState",
    "LimitError",
    "Output",
    "PolicyError",
    "RequestError",
    "Retries",
    "ServiceError",
    "Source",
    "SourceError",
    "SourceInfo",
    "TransportError",
    "Upload",
    "ValidationError",
    "WaitTimeout",
    "WebhookAttempt",
    "WebhookDelivery",
    "WebhookEvent",
    "verify_event",
]

"""Verifying imgserve's webhook events (docs/webhooks.md): Standard Webhooks
signatures, checked with the ``standardwebhooks`` library.

``verify_event(headers, body, secret)`` returns the event, typed, or raises
:class:`InvalidWebhook`; give it the raw body bytes as they arrived (a body parsed
and dumped again no longer matches its signature). Pure: no I/O.
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Mapping, Sequence
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from imgserve.client.errors import ClientError
from imgserve.client.models import WebhookEvent


class InvalidWebhook(ClientError):
    """The request is not an event signed with one of the secrets (a signature that
    does not match, a timestamp over five minutes away, a missing header), or its
    payload is not an imgserve event. Answer it 400 and do nothing."""


def verify_event(
    headers: Mapping[str, str], body: bytes | str, secret: str | Sequence[str]
) -> WebhookEvent:
    """The event a webhook request carries, once its signature is checked against
    ``secret`` (``whsec_...``), or any of several during a rotation."""
    secrets = [secret] if isinstance(secret, str) else list(secret)
    if not secrets:
        raise ValueError("verify_event needs at least one secret")
    plain = {str(k).lower(): str(v) for k, v in headers.items()}
    payload: Any = None
    failure = "no secret given"
    for one in secrets:
        try:
            payload = Webhook(one).verify(body, plain)
            break
        except WebhookVerificationError as exc:
            failure = str(exc)
        except (ValueError, binascii.Error, json.JSONDecodeError) as exc:
            # A malformed signature header (no "v1,", bad base64) or a body that is not
            # JSON: the library lets these through as they are.
            failure = f"malformed webhook request: {exc}"
    else:
        raise InvalidWebhook(failure)
    try:
        return WebhookEvent.from_dict(plain["webhook-id"], payload)
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidWebhook(f"not an imgserve event: {exc!r}") from exc

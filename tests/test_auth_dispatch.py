"""Webhook events of keyed jobs: signed with the key's own secret by a process that
has the key, handed off untouched by one without keys (real SQLite queue, real
receiver)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from standardwebhooks.webhooks import WebhookVerificationError

from imgserve import auth, webhooks
from imgserve.queue.base import Event, JobRecord
from imgserve.queue.sqlite import SQLiteQueue
from tests.test_webhooks import LOOPBACK, hook_settings, plan, settled, spec
from tests.webhook_receiver import Receiver, receiver_fixture  # noqa: F401 - a fixture

KEY_SECRET = "whsec_" + base64.b64encode(b"a key's own webhook signing key").decode()


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[SQLiteQueue]:
    q = SQLiteQueue(tmp_path / "jobs.db")
    yield q
    await q.close()


async def keyed_event(queue: SQLiteQueue, url: str) -> Event:
    """A job submitted with key "own" that ended with its event stored (outbox)."""
    rec = JobRecord(
        id=uuid.uuid4().hex, job=spec(url).to_dict(), plan=plan().to_dict(), dst_url="x", key="own"
    )
    await queue.put(rec, b"", max_active=10)
    made = webhooks.record_event(rec, "job.completed", hook_settings())
    assert made is not None and made.key == "own"
    claimed = await queue.claim()
    assert claimed is not None
    await queue.complete(claimed.id, [1, 2], event=made)
    return made


@contextlib.asynccontextmanager
async def dispatching(queue: SQLiteQueue, keys: auth.Keyring | None) -> AsyncIterator[None]:
    settings = hook_settings()
    signer = auth.webhook_signer(keys, settings.webhook_secrets)
    dispatcher = webhooks.Dispatcher(queue, settings, LOOPBACK, poll_s=0.05, secrets_for=signer)
    task = asyncio.create_task(webhooks.supervise(dispatcher))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_process_without_keys_hands_keyed_events_off(
    queue: SQLiteQueue, receiver: Receiver
) -> None:
    """No attempt is made or recorded; the event stays pending, due again later."""
    made = await keyed_event(queue, receiver.url())
    async with dispatching(queue, None):
        deadline = time.monotonic() + 10
        while (await queue.job_events(made.job_id))[0].next_at <= made.next_at:
            assert time.monotonic() < deadline, "never claimed"
            await asyncio.sleep(0.02)
    (stored,) = await queue.job_events(made.job_id)
    assert stored.state == "pending" and stored.attempts == []
    assert stored.next_at >= time.time() - 1.0
    assert receiver.received() == []


async def test_a_process_with_the_key_signs_with_its_own_secret(
    queue: SQLiteQueue, receiver: Receiver
) -> None:
    """The key's webhook_secret signs the event instead of the server's secret."""
    made = await keyed_event(queue, receiver.url())
    keys = auth.Keyring([auth.Key("own", b"x" * 32, webhook_secret=KEY_SECRET)])
    async with dispatching(queue, keys):
        stored = await settled(queue, made.job_id)
    assert stored.state == "delivered"
    (payload,) = receiver.verified(KEY_SECRET)
    assert payload["data"]["jobId"] == made.job_id
    with pytest.raises(WebhookVerificationError):
        receiver.verified(hook_settings().webhook_secrets[0])

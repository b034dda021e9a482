"""The job queue interface: what the API and the job runners need of a backend.

A backend stores each accepted job durably before ``put`` returns, hands jobs
to runners with ``claim`` (at-least-once: a claimed job whose runner vanished
is handed out again), and keeps finished jobs for ``GET /jobs/<id>`` until
``prune`` removes them. tests/queue/test_contract.py runs one suite against
every backend.
"""

from __future__ import annotations

import abc
import enum
import time
from dataclasses import asdict, dataclass, field
from typing import Any


class State(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


ACTIVE_STATES = (State.QUEUED, State.RUNNING)


@dataclass
class JobRecord:
    """One accepted job and everything ``GET /jobs/<id>`` reports about it."""

    id: str
    job: dict[str, Any]
    """The validated request (request.Job.to_dict())."""
    plan: dict[str, Any]
    """What it produces (pipeline.Plan.to_dict())."""
    dst_url: str
    state: State = State.QUEUED
    attempts: int = 0
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    run_at: float = 0.0
    error_code: int | None = None
    error_detail: str | None = None
    source_path: str | None = None
    """Spooled copy of the source, so a job runs without downloading twice."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobRecord:
        values = dict(data)
        values["state"] = State(values["state"])
        return cls(**values)


class JobQueue(abc.ABC):
    """A durable store of jobs with at-least-once delivery to runners."""

    @abc.abstractmethod
    async def put(self, record: JobRecord, *, max_active: int) -> None:
        """Store a new job durably; raise QueueFull when ``max_active`` are unfinished."""

    @abc.abstractmethod
    async def claim(self) -> JobRecord | None:
        """Take the next due job (state -> running, attempts + 1), or None."""

    @abc.abstractmethod
    async def complete(self, job_id: str) -> None:
        """Mark a running job done."""

    @abc.abstractmethod
    async def fail(self, job_id: str, code: int, detail: str) -> None:
        """Mark a job failed for good."""

    @abc.abstractmethod
    async def retry(self, job_id: str, delay_s: float, code: int, detail: str) -> None:
        """Put a running job back, due after ``delay_s``, recording why."""

    @abc.abstractmethod
    async def get(self, job_id: str) -> JobRecord | None: ...

    @abc.abstractmethod
    async def counts(self) -> dict[str, int]:
        """Number of jobs in each state."""

    @abc.abstractmethod
    async def recover(self, stale_after_s: float) -> int:
        """Hand back jobs left running by a runner that is gone; return how many."""

    @abc.abstractmethod
    async def prune(self, older_than_s: float) -> int:
        """Delete finished jobs older than ``older_than_s``; return how many."""

    @abc.abstractmethod
    async def next_due_in(self) -> float | None:
        """Seconds until the next queued job is due (0 when one is), None when empty."""

    async def heartbeat(self, job_id: str) -> None:  # noqa: B027 - optional
        """Tell the backend a running job's runner is alive."""

    async def close(self) -> None:  # noqa: B027 - optional
        """Release connections."""

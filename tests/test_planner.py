"""Planning in planner processes: same plans and errors as in-process, crashes cost one request."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pyvips

from imgserve import errors, planning
from imgserve.config import ImagingLimits
from imgserve.imaging import pipeline
from imgserve.planner import PROCESS_NAME, Planner
from imgserve.pool import FAULT_ENV
from tests.imaging.conftest import (
    CORPUS_SVGS,
    WALLPAPER_JPEG,
    WALLPAPER_PNG,
    corpus,
    job_for,
)
from tests.imaging.test_pipeline import HOSTILE_SVGS, _png_bomb, svg

LIMITS = ImagingLimits()
JPEG_JOB = job_for("resize", "http://h/photo.jpg", "file:///o/{$width}.jpg", width=120)


def _make(processes: int = 1, timeout_s: float = 5.0, faults: bool = True) -> Planner:
    previous = os.environ.pop(FAULT_ENV, None)
    if faults:
        os.environ[FAULT_ENV] = "1"
    try:
        return Planner(processes=processes, timeout_s=timeout_s, memory_limit_mb=1024)
    finally:
        os.environ.pop(FAULT_ENV, None)
        if previous is not None:
            os.environ[FAULT_ENV] = previous


@pytest.fixture
def planner() -> Iterator[Planner]:
    planner = _make()
    yield planner
    planner.close()


@pytest.fixture(scope="module")
def shared() -> Iterator[Planner]:
    """One planner for the tests that never make it misbehave."""
    planner = _make(faults=False)
    yield planner
    planner.close()


def _wait_for(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.02)


def _plan(planner: Planner, data: bytes, job: Any = JPEG_JOB) -> tuple[planning.JobPlan, bytes]:
    """Plan a one-output (0.2) job: its plan and its one placeholder."""
    plan, (placeholder,) = asyncio.run(planner.plan(job, data, LIMITS))
    return plan, placeholder


@pytest.mark.parametrize(
    ("path", "job"),
    [
        (WALLPAPER_JPEG, JPEG_JOB),
        (
            WALLPAPER_PNG,
            job_for("resize", "http://h/p.png", "file:///o/{$basename}.webp", width=90),
        ),
        (CORPUS_SVGS[1], job_for("rasterize", "http://h/w.svg", "file:///o/w.png", width=300)),
    ],
    ids=["jpeg", "png", "svg"],
)
def test_plan_and_placeholder_match_in_process_planning(
    shared: Planner, path: Path, job: Any
) -> None:
    """A planner returns the very plan and placeholder bytes the API process would make."""
    data = corpus(path)
    plan, placeholder = _plan(shared, data, job)
    expected = planning.plan(job, data, LIMITS)
    assert plan == expected
    drawn = pyvips.Image.new_from_buffer(placeholder, "")
    reference = pyvips.Image.new_from_buffer(pipeline.placeholder(expected.result, plan.output), "")
    assert (drawn.width, drawn.height) == (expected.result.width, expected.result.height)
    assert drawn.get("vips-loader") == reference.get("vips-loader")
    assert (drawn - reference).abs().max() <= 2


def _refusals() -> dict[str, tuple[Any, bytes]]:
    jpeg = corpus(WALLPAPER_JPEG)
    rasterize = job_for("rasterize", "http://h/e.svg", "file:///o.png", width=40)
    cases: dict[str, tuple[Any, bytes]] = {
        "empty 202": (JPEG_JOB, b""),
        "text 202": (JPEG_JOB, b"hello, world" * 20),
        "truncated 202": (JPEG_JOB, b"\xff\xd8\xff" + b"\0" * 40),
        "bomb 302": (JPEG_JOB, _png_bomb()),
        "svg for resize 108": (JPEG_JOB, svg('<rect width="4" height="4"/>')),
        "jpeg for rasterize 108": (rasterize, jpeg),
        "enlarge 203": (job_for("resize", "http://h/a.jpg", "file:///o.jpg", width=99_999), jpeg),
        "result pixels 303": (
            job_for("resize", "http://h/a.jpg", "file:///o.jpg", width=60_000, enlarge=True),
            jpeg,
        ),
        "svg pixels 304": (
            job_for("rasterize", "http://h/h.svg", "file:///o.png", scale=1.0),
            svg('<rect width="10" height="10"/>', 1_000_000, 1_000_000),
        ),
        "extension 113": (job_for("resize", "http://h/a.bmp", "file:///o/x.{$ext}", width=9), jpeg),
    }
    for name, data in HOSTILE_SVGS.items():
        cases[f"{name} 204"] = (rasterize, data)
    return cases


REFUSALS = _refusals()


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_imgserve_errors_arrive_unchanged(shared: Planner, case: str) -> None:
    """An error raised in a planner reaches the caller with the class, code and detail
    in-process planning raises."""
    job, data = REFUSALS[case]
    with pytest.raises(errors.ImgserveError) as in_process:
        planning.plan(job, data, LIMITS)
    with pytest.raises(errors.ImgserveError) as planned:
        _plan(shared, data, job)
    assert type(planned.value) is type(in_process.value)
    assert (planned.value.code, planned.value.detail) == (
        in_process.value.code,
        in_process.value.detail,
    )
    assert str(in_process.value.code) == case.rsplit(" ", 1)[1]


@pytest.mark.parametrize("fault", [b"SEGV", b"KILL"])
def test_planner_crash_fails_only_that_request_and_is_replaced(
    planner: Planner, fault: bytes
) -> None:
    """A planner that segfaults or is SIGKILLed mid-plan answers 206; a new one plans the next."""
    jpeg = corpus(WALLPAPER_JPEG)
    before = planner.pids()
    with pytest.raises(errors.LoaderCrashed) as info:
        _plan(planner, jpeg + b"IMGSERVE-FAULT-PLAN-" + fault)
    assert info.value.code == 206 and info.value.status == 422 and not info.value.retryable
    plan, _ = _plan(planner, jpeg)
    assert plan.result.width == 120
    assert planner.pids() and not planner.pids() & before


def test_crash_does_not_fail_a_request_planning_beside_it() -> None:
    """With two planners, one crashing leaves the other's request to finish normally."""
    planner = _make(processes=2)
    try:
        _wait_for(lambda: planner.alive() == 2)
        jpeg = corpus(WALLPAPER_JPEG)

        async def both() -> list[Any]:
            slow = asyncio.ensure_future(
                planner.plan(JPEG_JOB, jpeg + b"IMGSERVE-FAULT-PLAN-DELAY=1", LIMITS)
            )
            await asyncio.sleep(0.3)  # the slow one is on a planner before the crash
            crash = planner.plan(JPEG_JOB, jpeg + b"IMGSERVE-FAULT-PLAN-SEGV", LIMITS)
            return await asyncio.gather(slow, crash, return_exceptions=True)

        slow, crash = asyncio.run(both())
        assert isinstance(crash, errors.LoaderCrashed)
        assert isinstance(slow, tuple) and slow[0].result.width == 120
    finally:
        planner.close()


def test_spinning_loader_is_killed_at_the_deadline() -> None:
    """A planner that never returns is killed at the planning deadline (306); the next plans."""
    planner = _make(timeout_s=1.0)
    try:
        jpeg = corpus(WALLPAPER_JPEG)
        started = time.monotonic()
        with pytest.raises(errors.ProcessingTimeout) as info:
            _plan(planner, jpeg + b"IMGSERVE-FAULT-PLAN-SLEEP")
        assert 1.0 <= time.monotonic() - started < 3.5
        assert info.value.code == 306 and "1 s" in info.value.detail
        assert _plan(planner, jpeg)[0].result.width == 120
    finally:
        planner.close()


def test_waiting_for_a_free_planner_is_not_charged_to_the_plan() -> None:
    """Three requests on one planner, each 1.5 s of a 2 s deadline: the third waits
    3 s for its turn (past 2 s + the grace) and still plans, because its deadline
    runs from when it starts (the reply deadline bounds the wait)."""
    planner = _make(processes=1, timeout_s=2.0)
    try:
        jpeg = corpus(WALLPAPER_JPEG) + b"IMGSERVE-FAULT-PLAN-DELAY=1.5"

        async def three() -> list[Any]:
            plans = [planner.plan(JPEG_JOB, jpeg, LIMITS) for _ in range(3)]
            return await asyncio.gather(*plans, return_exceptions=True)

        results = asyncio.run(three())
        assert [type(r).__name__ for r in results] == ["tuple"] * 3, results
    finally:
        planner.close()


def test_memory_hog_is_307(planner: Planner) -> None:
    """A planner running out of its address-space cap answers 307 and keeps planning."""
    jpeg = corpus(WALLPAPER_JPEG)
    with pytest.raises(errors.WorkerMemoryExceeded) as info:
        _plan(planner, jpeg + b"IMGSERVE-FAULT-PLAN-HOG")
    assert info.value.code == 307
    assert _plan(planner, jpeg)[0].result.width == 120


def test_idle_planners_killed_from_outside_are_replaced(planner: Planner) -> None:
    """SIGKILL of idle planners (pebble's broken-pool case) costs no request: the next plans."""
    jpeg = corpus(WALLPAPER_JPEG)
    for _ in range(3):
        _wait_for(lambda: planner.alive() == 1)
        victims = planner.pids()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        plan, placeholder = _plan(planner, jpeg)
        assert plan.result.width == 120 and placeholder
        assert not planner.pids() & victims


def test_fault_markers_are_inert_without_the_variable(shared: Planner) -> None:
    """Without IMGSERVE_FAULT_INJECTION a crash marker is only trailing bytes."""
    plan, _ = _plan(shared, corpus(WALLPAPER_JPEG) + b"IMGSERVE-FAULT-PLAN-SEGV")
    assert plan.result.width == 120


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def test_planners_are_named_capped_and_at_normal_priority(shared: Planner) -> None:
    """Planners run at the API's niceness, under the address-space cap, named imgserve-plan."""
    _wait_for(lambda: shared.alive() == 1)
    (pid,) = shared.pids()
    assert Path(f"/proc/{pid}/comm").read_text().strip() == PROCESS_NAME
    assert int(_stat(pid)[16]) == os.nice(0)  # stat field 19: niceness
    limits = Path(f"/proc/{pid}/limits").read_text()
    address_space = next(line for line in limits.splitlines() if "address space" in line)
    assert str(1024 * 1024 * 1024) in address_space


def test_close_stops_the_planners() -> None:
    """close() leaves no planner process behind."""
    planner = _make()
    _wait_for(lambda: planner.alive() == 1)
    pids = planner.pids()
    planner.close()

    def gone() -> bool:
        return all(not Path(f"/proc/{p}").exists() or _stat(p)[0] == "Z" for p in pids)

    _wait_for(gone)

"""intake.Intake: the bookkeeping of jobs being checked and the bytes they hold (pure)."""

from __future__ import annotations

import pytest

from imgserve import errors
from imgserve.intake import Intake


def test_admits_up_to_max_jobs_and_frees_a_slot_at_exit() -> None:
    """The job past max_jobs is IntakeBusy; leaving the block frees its slot."""
    intake = Intake(max_jobs=2, max_bytes=100)
    with intake.admit(), intake.admit():
        assert intake.jobs == 2
        with pytest.raises(errors.IntakeBusy), intake.admit():
            pass
    assert intake.jobs == 0
    with intake.admit():
        assert intake.jobs == 1


@pytest.mark.parametrize(
    ("held_by_others", "size", "allowed"),
    [
        (0, 1000, True),  # alone: may pass the budget
        (60, 40, True),  # exactly at the budget
        (60, 41, False),
        (99, 2, False),
    ],
)
def test_charge_refuses_only_past_the_budget_with_others_holding_bytes(
    held_by_others: int, size: int, allowed: bool
) -> None:
    """A chunk is refused when others hold bytes and it would pass max_bytes."""
    intake = Intake(max_jobs=10, max_bytes=100)
    with intake.admit() as other, intake.admit() as mine:
        other.charge(held_by_others)
        if allowed:
            mine.charge(size)
            assert (intake.bytes, mine.bytes) == (held_by_others + size, size)
        else:
            with pytest.raises(errors.IntakeBusy):
                mine.charge(size)
            assert (intake.bytes, mine.bytes) == (held_by_others, 0)
    assert intake.bytes == 0


def test_no_admission_while_the_budget_is_full() -> None:
    """Once the held bytes reach max_bytes, a new job is IntakeBusy before any work."""
    intake = Intake(max_jobs=10, max_bytes=100)
    with intake.admit() as first:
        first.charge(100)
        with pytest.raises(errors.IntakeBusy) as caught, intake.admit():
            pass
        assert "100 bytes" in caught.value.detail
    assert (intake.jobs, intake.bytes) == (0, 0)

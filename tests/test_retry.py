"""Retry backoff: exponential growth, the cap and full jitter."""

from __future__ import annotations

import pytest

from imgserve.retry import backoff_s


@pytest.mark.parametrize(
    ("attempt", "base_s", "max_s", "rand", "expected"),
    [
        (1, 0.5, 30.0, 0.999999, 0.5 * 0.999999),
        (2, 0.5, 30.0, 0.5, 0.5),
        (3, 0.5, 30.0, 0.5, 1.0),
        (4, 0.5, 30.0, 1.0, 4.0),
        (7, 0.5, 30.0, 1.0, 30.0),  # 0.5 * 64 = 32 capped at 30
        (10_000, 0.5, 30.0, 1.0, 30.0),  # no overflow for absurd attempt numbers
        (3, 0.5, 30.0, 0.0, 0.0),  # full jitter reaches zero
        (1, 0.0, 30.0, 0.7, 0.0),
    ],
)
def test_backoff_table(
    attempt: int, base_s: float, max_s: float, rand: float, expected: float
) -> None:
    """backoff_s = min(max_s, base_s * 2**(attempt-1)) * random()."""
    got = backoff_s(attempt, base_s=base_s, max_s=max_s, random=lambda: rand)
    assert got == pytest.approx(expected)


def test_backoff_uses_the_default_random_within_bounds() -> None:
    """Without an injected random the delay stays in [0, ceiling)."""
    delays = [backoff_s(3, base_s=1.0, max_s=10.0) for _ in range(200)]
    assert all(0.0 <= d < 4.0 for d in delays)
    assert len(set(delays)) > 1


@pytest.mark.parametrize("attempt", [0, -1])
def test_backoff_rejects_attempts_below_one(attempt: int) -> None:
    """Attempt numbers start at 1."""
    with pytest.raises(ValueError):
        backoff_s(attempt, base_s=1.0, max_s=1.0)


def test_backoff_rejects_negative_bounds() -> None:
    """Negative base or cap is a programming error."""
    with pytest.raises(ValueError):
        backoff_s(1, base_s=-1.0, max_s=1.0)


@pytest.mark.parametrize(
    ("rand", "expected"),
    [(0.0, 2.0), (0.5, 3.0), (0.999, 3.998)],
)
def test_equal_jitter_waits_at_least_its_fraction(rand: float, expected: float) -> None:
    """With min_fraction=0.5 the delay is in [ceiling/2, ceiling)."""
    delay = backoff_s(3, base_s=1.0, max_s=10.0, min_fraction=0.5, random=lambda: rand)
    assert delay == pytest.approx(expected)


def test_backoff_rejects_a_fraction_outside_zero_to_one() -> None:
    """min_fraction is a share of the ceiling."""
    with pytest.raises(ValueError):
        backoff_s(1, base_s=1.0, max_s=1.0, min_fraction=1.5)

"""Retry backoff: how long to wait before the next attempt.

Pure: no asyncio, no clock. The caller sleeps. "Full jitter" (AWS
Architecture Blog, "Exponential Backoff And Jitter"): the delay before retry
``n`` is uniform in ``[0, min(max_s, base_s * 2**(n-1))]``, which spreads
retries of many clients that failed together.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable


def backoff_s(
    attempt: int,
    *,
    base_s: float,
    max_s: float,
    min_fraction: float = 0.0,
    random: Callable[[], float] = _random.random,
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1 = the first).

    ``min_fraction`` of the ceiling is always waited ("equal jitter" at 0.5), for
    callers that must not come back at once. ``random`` returns a float in
    [0, 1); inject a constant in tests.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    if base_s < 0 or max_s < 0:
        raise ValueError("base_s and max_s must not be negative")
    if not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in [0, 1], got {min_fraction}")
    # Cap the exponent so huge attempt numbers cannot overflow a float.
    ceiling = min(max_s, base_s * 2.0 ** min(attempt - 1, 62))
    return ceiling * (min_fraction + (1.0 - min_fraction) * random())

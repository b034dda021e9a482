"""Summaries of per-round numbers (pure): median, min and max of ratios and rates."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Spread:
    """Median, min and max of a few per-round values."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread | None:
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            return None
        return cls(statistics.median(finite), min(finite), max(finite), len(finite))

    def as_dict(self) -> dict[str, float]:
        return {"median": self.median, "min": self.low, "max": self.high, "n": self.n}


def ratios(numerators: Sequence[float | None], denominators: Sequence[float | None]) -> list[float]:
    """Per-round ratios, skipping rounds where either side is missing or zero."""
    out = []
    for num, den in zip(numerators, denominators, strict=True):
        if num is not None and den:
            out.append(num / den)
    return out


def fmt_spread(spread: Spread | None, digits: int = 2) -> str:
    """``0.93 (0.90-0.97)``, or ``n/a``."""
    if spread is None:
        return "n/a"
    return f"{spread.median:.{digits}f} ({spread.low:.{digits}f}-{spread.high:.{digits}f})"


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"

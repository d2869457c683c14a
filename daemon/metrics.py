"""Latency windows (TTFT, inter-token) and their percentiles, written by any thread."""

from __future__ import annotations

import math
from collections import deque

__all__ = ["LatencyWindow", "percentile"]


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values; 0.0 when empty."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


class LatencyWindow:
    """The most recent `size` samples, in milliseconds (deque appends are atomic)."""

    def __init__(self, size: int = 4096) -> None:
        self._samples: deque[float] = deque(maxlen=size)

    def add(self, ms: float) -> None:
        self._samples.append(ms)

    def percentiles(self) -> tuple[float, float, float]:
        values = sorted(self._samples)
        return percentile(values, 50), percentile(values, 95), percentile(values, 99)

"""Summaries of latency samples (seconds in, milliseconds out)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 95, 99)


def summarize_ms(samples_s: Sequence[float]) -> dict[str, Any] | None:
    """p50/p90/p95/p99/max/mean in milliseconds of samples in seconds; None when there are none."""
    if len(samples_s) == 0:
        return None
    a = np.asarray(samples_s, dtype=np.float64) * 1e3
    out: dict[str, Any] = {f"p{p}": float(np.percentile(a, p)) for p in PERCENTILES}
    out["max"] = float(a.max())
    out["mean"] = float(a.mean())
    out["count"] = int(a.size)
    return out


def cdf_points_ms(samples_s: Sequence[float], points: int = 101) -> list[float]:
    """The 0th..100th percentiles (in ms): enough to draw a latency CDF without every sample."""
    if len(samples_s) == 0:
        return []
    a = np.asarray(samples_s, dtype=np.float64) * 1e3
    return [float(x) for x in np.percentile(a, np.linspace(0, 100, points))]

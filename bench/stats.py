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


def timeline_ms(sent_at: Sequence[float], samples_s: Sequence[float], start: float, bin_s: float = 0.5
                ) -> list[dict[str, Any]]:
    """Latency by when the request was sent: per bin of `bin_s` seconds from `start`, the requests
    sent in it and their p50/p99/max in ms (empty bins left out). A run's p99 can come from a
    phase of a few seconds in which every request is slower; the bins show it."""
    if len(samples_s) == 0:
        return []
    a = np.asarray(samples_s, dtype=np.float64) * 1e3
    bins = np.floor((np.asarray(sent_at, dtype=np.float64) - start) / bin_s).astype(np.int64)
    out = []
    for b in np.unique(bins):
        in_bin = a[bins == b]
        out.append({"t_s": float(b * bin_s), "requests": int(in_bin.size), "p50": float(np.percentile(in_bin, 50)),
                    "p99": float(np.percentile(in_bin, 99)), "max": float(in_bin.max())})
    return out

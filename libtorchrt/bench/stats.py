"""Statistics of a measurement, computed the way Triton's perf_analyzer computes them.

Pure functions on recorded samples (runs in the bench process; no threads, no torch):

* :func:`percentile` -- perf_analyzer's rule: the sorted sample at index
  ``floor(q / 100 * (n - 1) + 0.5)``, i.e. nearest rank on ``n - 1`` rounding halves up;
* :class:`Window` -- what completed in one measurement window: latencies of the
  successful requests, error counts by type, the window's length;
* :func:`is_stable` -- perf_analyzer's stability rule: the last ``count`` windows all
  completed requests, and both their throughput and their average latency are within
  ``threshold`` of each other (``max / min <= 1 + threshold``);
* :func:`summarize` -- merges windows into one :class:`Summary`: throughput is the
  requests completed over the windows' total time (times the batch size for
  inferences/s), latency percentiles are over every request of those windows.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "PERCENTILES",
    "Summary",
    "Window",
    "is_stable",
    "percentile",
    "summarize",
    "throughput",
]

#: The latency percentiles reported for every configuration (as perf_analyzer does).
PERCENTILES: tuple[int, ...] = (50, 90, 95, 99)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (``q`` in [0, 100]) of already sorted values.

    perf_analyzer's rule: the element at index ``floor(q / 100 * (n - 1) + 0.5)``; an
    actual sample, never an interpolation. NaN for no values.

    Raises:
        ValueError: ``q`` is outside [0, 100].
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q!r} is outside [0, 100]")
    n = len(sorted_values)
    if n == 0:
        return math.nan
    index = int(q / 100.0 * (n - 1) + 0.5)
    return float(sorted_values[min(index, n - 1)])


def throughput(count: int, seconds: float, batch_size: int = 1) -> tuple[float, float]:
    """``(requests/s, inferences/s)`` for ``count`` requests completed in ``seconds``.

    A request carries ``batch_size`` inferences (rows). Zero seconds gives NaN.
    """
    if seconds <= 0:
        return math.nan, math.nan
    rps = count / seconds
    return rps, rps * batch_size


@dataclass
class Window:
    """What completed during one measurement window.

    Attributes:
        seconds: the window's length.
        latencies_ns: latency of each request that succeeded in the window (unsorted).
        errors: failed requests by exception type name.
    """

    seconds: float
    latencies_ns: list[int] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def requests(self) -> int:
        """Successful requests completed in the window."""
        return len(self.latencies_ns)

    @property
    def rps(self) -> float:
        """Successful requests per second."""
        return throughput(self.requests, self.seconds)[0]

    @property
    def avg_latency_ns(self) -> float:
        """Mean latency of the successful requests; NaN when none succeeded."""
        return sum(self.latencies_ns) / len(self.latencies_ns) if self.latencies_ns else math.nan

    def brief(self) -> dict[str, Any]:
        """JSON-friendly summary of the window (no samples)."""
        return {
            "seconds": self.seconds,
            "requests": self.requests,
            "req_per_s": self.rps,
            "avg_latency_us": self.avg_latency_ns / 1e3,
            "errors": dict(self.errors),
        }


def _within(values: Sequence[float], threshold: float) -> bool:
    lo, hi = min(values), max(values)
    return lo > 0 and hi / lo <= 1.0 + threshold


def is_stable(windows: Sequence[Window], *, count: int = 3, threshold: float = 0.10) -> bool:
    """Whether the last ``count`` windows form a stable measurement.

    Stable (as in perf_analyzer): there are at least ``count`` windows, each completed
    at least one request, and over those windows both throughput and average latency
    vary by at most ``threshold`` (``max / min <= 1 + threshold``).
    """
    if count < 1 or len(windows) < count:
        return False
    last = windows[-count:]
    if any(w.requests == 0 for w in last):
        return False
    return _within([w.rps for w in last], threshold) and _within([w.avg_latency_ns for w in last], threshold)


@dataclass
class Summary:
    """Merged figures over some windows.

    Latencies are in microseconds. ``infer_per_s`` counts rows: requests/s times the
    batch size. ``errors`` counts failed requests by exception type.
    """

    requests: int
    seconds: float
    req_per_s: float
    infer_per_s: float
    avg_us: float
    min_us: float
    max_us: float
    percentiles_us: dict[int, float]
    errors: dict[str, int]

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def p(self, q: int) -> float:
        """The ``q``-th latency percentile in µs (NaN if it was not computed)."""
        return self.percentiles_us.get(q, math.nan)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly representation."""
        return {
            "requests": self.requests,
            "seconds": self.seconds,
            "req_per_s": self.req_per_s,
            "infer_per_s": self.infer_per_s,
            "latency_us": {
                "avg": self.avg_us,
                "min": self.min_us,
                "max": self.max_us,
                **{f"p{q}": v for q, v in self.percentiles_us.items()},
            },
            "errors": dict(self.errors),
            "error_count": self.error_count,
        }


def summarize(windows: Sequence[Window], *, batch_size: int = 1, percentiles: Sequence[int] = PERCENTILES) -> Summary:
    """Merge ``windows`` into one :class:`Summary` (perf_analyzer merges its stable windows).

    Throughput is the successful requests of all windows over their total length;
    the latency figures are over every successful request of the windows.
    """
    latencies = sorted(ns for w in windows for ns in w.latencies_ns)
    seconds = sum(w.seconds for w in windows)
    errors: Counter[str] = Counter()
    for w in windows:
        errors.update(w.errors)
    rps, ips = throughput(len(latencies), seconds, batch_size)
    us = [ns / 1e3 for ns in latencies]
    return Summary(
        requests=len(latencies),
        seconds=seconds,
        req_per_s=rps,
        infer_per_s=ips,
        avg_us=sum(us) / len(us) if us else math.nan,
        min_us=us[0] if us else math.nan,
        max_us=us[-1] if us else math.nan,
        percentiles_us={q: percentile(us, q) for q in percentiles},
        errors=dict(sorted(errors.items())),
    )


def merge_errors(counters: Sequence[Mapping[str, int]]) -> dict[str, int]:
    """Add up error counts by type."""
    total: Counter[str] = Counter()
    for c in counters:
        total.update(c)
    return dict(sorted(total.items()))

"""Closed-loop load for the scripts of ``benchmarks/``, on ``libtorchrt.bench``'s load generator.

``measure`` runs ``concurrency`` caller threads, each issuing one request and waiting
for its reply in a loop: :func:`libtorchrt.bench.loadgen.measure_windows`, the load
generator of ``python -m libtorchrt.bench``, asked for exactly ``repeat`` windows of
``duration`` seconds after the warm-up (every completed request is attributed to the
window in which it *completed*). Per window we keep the throughput and p50/p99 latency
(perf_analyzer's percentile rule, ``libtorchrt.bench.stats``); the reported figure is
the median over windows, as the scripts' tables and JSON documents always gave it.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Any

from libtorchrt.bench import loadgen, stats


@dataclass
class Window:
    """One measurement window."""

    requests: int
    seconds: float
    rps: float
    p50_us: float
    p99_us: float


@dataclass
class Measurement:
    """Median figures over the windows of one measured row."""

    rps: float
    p50_us: float
    p99_us: float
    windows: list[Window] = field(default_factory=list)
    warmup_calls: int = 0

    @property
    def spread(self) -> float:
        """(max - min) / median of the per-window throughput; 0 with a single window."""
        values = [w.rps for w in self.windows]
        if len(values) < 2 or self.rps <= 0:
            return 0.0
        return (max(values) - min(values)) / self.rps

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly representation."""
        return {
            "rps": self.rps,
            "p50_us": self.p50_us,
            "p99_us": self.p99_us,
            "spread": self.spread,
            "warmup_calls": self.warmup_calls,
            "windows": [asdict(w) for w in self.windows],
        }


def _window(w: stats.Window) -> Window:
    us = sorted(ns / 1e3 for ns in w.latencies_ns)
    return Window(w.requests, w.seconds, w.rps, stats.percentile(us, 50), stats.percentile(us, 99))


def measure(
    call: Callable[[], object],
    *,
    concurrency: int,
    duration: float,
    repeat: int,
    warmup: float = 0.5,
    warmup_calls: int = 20,
    max_warmup: float = 30.0,
    join_timeout: float = 30.0,
    thread_context: Callable[[], AbstractContextManager[object]] | None = None,
    on_start: Callable[[], None] | None = None,
    on_window: Callable[[int, object], None] | None = None,
) -> Measurement:
    """Drive ``call`` from ``concurrency`` closed-loop threads and measure it.

    Warm-up lasts at least ``warmup`` seconds and ``warmup_calls`` successful calls
    (bounded by ``max_warmup`` seconds). ``thread_context``, if given,
    is entered by each caller thread around its loop (e.g. ``torch.inference_mode``).
    ``on_start`` and ``on_window`` go to ``loadgen.measure_windows`` (a
    ``libtorchrt.bench.cpu.MeasuredSpan``'s, to read the CPU over the windows).

    Raises:
        libtorchrt.bench.loadgen.MeasurementError: every warm-up call failed (the first
            error is chained), some measured call failed (the count by type is given),
            or caller threads were still blocked ``join_timeout`` seconds after the end.
    """
    m = loadgen.measure_windows(
        call,
        concurrency=concurrency,
        window_s=duration,
        max_windows=repeat,
        stable_count=repeat,  # never stops before `repeat` windows
        warmup_s=warmup,
        warmup_requests=warmup_calls,
        max_warmup_s=max_warmup,
        join_timeout=join_timeout,
        thread_context=thread_context,
        on_start=on_start,
        on_window=on_window,
    )
    if m.all_errors:
        raise loadgen.MeasurementError(f"calls failed while measuring: {m.all_errors}")
    windows = [_window(w) for w in m.windows]
    return Measurement(
        rps=statistics.median(w.rps for w in windows),
        p50_us=statistics.median(w.p50_us for w in windows),
        p99_us=statistics.median(w.p99_us for w in windows),
        windows=windows,
        warmup_calls=m.warmup_requests,
    )

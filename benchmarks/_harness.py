"""Closed-loop load generation and latency statistics.

``measure`` runs ``concurrency`` caller threads, each issuing one request and
waiting for its reply in a loop.  After a warm-up it records ``repeat``
back-to-back windows of ``duration`` seconds; every completed request is
attributed to the window in which it *completed*.  Per window we compute the
throughput and p50/p99 latency; the reported figure is the median over windows.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Any

_NS = 1_000_000_000


def percentile(sorted_values: list[int], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 100]) of an already sorted list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


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


def _window_stats(latencies_ns: list[int], seconds: float) -> Window:
    latencies_ns.sort()
    return Window(
        requests=len(latencies_ns),
        seconds=seconds,
        rps=len(latencies_ns) / seconds if seconds > 0 else math.nan,
        p50_us=percentile(latencies_ns, 50) / 1e3,
        p99_us=percentile(latencies_ns, 99) / 1e3,
    )


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
) -> Measurement:
    """Drive ``call`` from ``concurrency`` closed-loop threads and measure it.

    Warm-up lasts at least ``warmup`` seconds and ``warmup_calls`` completed
    calls (bounded by ``max_warmup`` seconds).  ``thread_context``, if given,
    is entered by each caller thread around its loop (e.g. ``torch.inference_mode``).
    Caller threads still blocked ``join_timeout`` seconds after the end are
    reported as an error (they are daemon threads, so they never block exit).
    Any exception raised by ``call`` stops the run and is re-raised.
    """
    stop = threading.Event()
    errors: list[BaseException] = []
    records: list[list[tuple[int, int]]] = [[] for _ in range(concurrency)]
    clock = time.perf_counter_ns

    def worker(out: list[tuple[int, int]]) -> None:
        append = out.append
        try:
            with thread_context() if thread_context is not None else contextlib.nullcontext():
                while not stop.is_set():
                    t0 = clock()
                    call()
                    append((t0, clock()))
        except BaseException as exc:  # re-raised in the main thread
            errors.append(exc)
            stop.set()

    threads = [
        threading.Thread(target=worker, args=(records[i],), name=f"caller-{i}", daemon=True) for i in range(concurrency)
    ]
    started = clock()
    for t in threads:
        t.start()
    try:
        # Warm-up: time and call-count based.
        deadline = started + int(max_warmup * _NS)
        while not stop.is_set():
            now = clock()
            done = sum(len(r) for r in records)
            if (now - started >= warmup * _NS and done >= warmup_calls) or now >= deadline:
                break
            time.sleep(0.01)
        t_begin = clock()
        window_ns = int(duration * _NS)
        t_end = t_begin + repeat * window_ns
        while not stop.is_set():
            remaining = t_end - clock()
            if remaining <= 0:
                break
            time.sleep(min(remaining / _NS, 0.05))
    finally:
        stop.set()
        join_deadline = time.monotonic() + join_timeout
        for t in threads:
            t.join(timeout=max(0.0, join_deadline - time.monotonic()))
    if errors:
        raise errors[0]
    stuck = [t.name for t in threads if t.is_alive()]
    if stuck:
        raise RuntimeError(f"caller threads still blocked after {join_timeout:g} s: {stuck}")

    buckets: list[list[int]] = [[] for _ in range(repeat)]
    warm = 0
    for rec in records:
        for t0, t1 in rec:
            if t1 < t_begin:
                warm += 1
            elif t1 < t_end:
                buckets[(t1 - t_begin) // window_ns].append(t1 - t0)
    windows = [_window_stats(b, duration) for b in buckets]
    return Measurement(
        rps=statistics.median(w.rps for w in windows),
        p50_us=statistics.median(w.p50_us for w in windows),
        p99_us=statistics.median(w.p99_us for w in windows),
        windows=windows,
        warmup_calls=warm,
    )

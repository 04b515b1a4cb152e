"""Per-model counters: requests, inferences, executions, durations (front).

Updated as requests finish, under a lock: by the router thread, and by caller threads
(requests refused before they reach it, and the fast lane's, which callers finish
themselves: ``fastlane.py``); read as :class:`~libtorchrt.info.ModelStats`
snapshots by ``Pool.stats()`` and the server's metrics. Counting costs a few integer
additions per request; the clock is read where the request's life already passes.
"""

from __future__ import annotations

import bisect
import dataclasses
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..info import LATENCY_BUCKETS, ModelStats

if TYPE_CHECKING:
    from .call import Call

__all__ = ["Stats"]

#: LATENCY_BUCKETS in nanoseconds (a request's latency is binned without a division)
_BUCKETS_NS = tuple(round(bound * 1e9) for bound in LATENCY_BUCKETS)


class Stats:
    """The counters of one model version."""

    def __init__(self, model: str, version: int) -> None:
        self.model = model
        self.version = version
        self.success = 0
        self.failure = 0
        self.inferences = 0
        self.executions = 0
        self.queue_ns = 0
        self.compute_ns = 0
        self.request_ns = 0
        self.batch_sizes: dict[int, int] = {}
        self._latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self._lock = threading.Lock()

    def succeeded(self, calls: Sequence[Call], sent_ns: int, done_ns: int, execution: int = 0) -> None:
        """Requests answered by one execution, sent at ``sent_ns`` and answered at
        ``done_ns`` (perf_counter_ns, monotonic: each was submitted before it was sent):
        one request, or a batch's members (any thread); with ``execution`` (its rows),
        that execution is counted too (as :meth:`executed` would)."""
        buckets, latency = _BUCKETS_NS, self._latency
        rows = submitted = 0
        bins = []
        for call in calls:
            at = call.submitted_ns
            rows += call.rows
            submitted += at
            bins.append(bisect.bisect_left(buckets, done_ns - at))
        n = len(calls)
        with self._lock:
            for i in bins:
                latency[i] += 1
            self.success += n
            self.inferences += rows
            self.queue_ns += max(0, n * sent_ns - submitted)
            self.compute_ns += n * max(0, done_ns - sent_ns)
            self.request_ns += max(0, n * done_ns - submitted)
            if execution:
                self.executions += 1
                self.batch_sizes[execution] = self.batch_sizes.get(execution, 0) + 1

    def executed(self, rows: int) -> None:
        """One model execution of ``rows`` rows (any thread)."""
        with self._lock:
            self.executions += 1
            self.batch_sizes[rows] = self.batch_sizes.get(rows, 0) + 1

    def failed(self) -> None:
        """One request failed (any thread)."""
        with self._lock:
            self.failure += 1

    def snapshot(self, pending: int, sequences: dict[str, int] | None = None) -> ModelStats:
        with self._lock:  # (one consistent reading)
            counts = list(self._latency)
            stats = ModelStats(
                model=self.model,
                version=self.version,
                success=self.success,
                failure=self.failure,
                inferences=self.inferences,
                executions=self.executions,
                queue_ns=self.queue_ns,
                compute_ns=self.compute_ns,
                request_ns=self.request_ns,
                batch_sizes=dict(self.batch_sizes),
                latency=(),
                pending=pending,
                sequences=sequences or {},
            )
        cumulative, total = [], 0
        for bound, count in zip(LATENCY_BUCKETS, counts):
            total += count
            cumulative.append((bound, total))
        return dataclasses.replace(stats, latency=(*cumulative, (float("inf"), total + counts[-1])))

"""Closed-loop load generation, measured in windows the way perf_analyzer measures.

Runs in the bench process: ``concurrency`` caller threads each keep exactly one request
outstanding (issue, wait for the reply, issue the next) against a ``call`` that
blocks until its request is answered -- ``Pool.infer`` for process-per-instance
serving, the thread server of ``threads.py``, or a running server (``remote.py``).
The main thread only watches the clock and files completed requests into windows.
With ``callers="asyncio"`` the callers are instead ``concurrency`` tasks of one event
loop, run by a thread of its own (``bench-event-loop``), each awaiting a coroutine
function (``Pool.infer_async``) in the same closed loop.

Two modes:

* **time windows** (:func:`measure_windows`): after a warm-up, consecutive windows of
  ``window_s`` seconds; a request belongs to the window in which it *completed*. After
  each window the last ``stable_count`` windows are tested with
  :func:`~libtorchrt.bench.stats.is_stable`; measuring stops at the first stable set
  or after ``max_windows``, and the last ``stable_count`` windows are reported (marked
  unstable in the second case);
* **request count** (:func:`measure_count`): after the warm-up, exactly ``requests``
  completions are counted; the time is from the end of the warm-up to the last of them.

A request that raises is counted as an error of its exception type (or its
``error_name``: ``HTTP 503``) and the caller goes on. If no request at all succeeds
during the warm-up, the measurement fails with :class:`MeasurementError` carrying the
first error, instead of spinning on errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from array import array
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from .stats import Summary, Window, is_stable, merge_errors, summarize

__all__ = ["CALLERS", "Measurement", "MeasurementError", "error_name", "measure_count", "measure_windows"]

_NS = 1_000_000_000
#: After a window ends, wait this long before filing it, so that a caller thread
#: preempted between taking its completion time and recording it is not missed.
_GRACE_S = 0.02

#: A request's record: start ns, end ns, error code (:data:`_OK`, else an index into
#: ``_Callers.error_names``), three numbers in a row of an ``array("q")``: the callers
#: keep no object per request, which the garbage collector would have to go through
#: (as tuples, they set off full collections that stopped every caller: docs/benchmarks.md,
#: "The callers' own garbage").
_OK = -1


class MeasurementError(RuntimeError):
    """A configuration could not be measured (every warm-up request failed, callers hung)."""


@dataclass
class Measurement:
    """The outcome of measuring one configuration.

    Attributes:
        summary: the reported figures (the stable windows merged, or the counted requests).
        windows: every measured window, in order.
        used: how many of the last windows make up ``summary``.
        stable: whether those windows met the stability rule (always True in count mode).
        warmup_requests: requests completed during the warm-up (not reported).
        all_errors: failed requests by type over every measured window.
        kind: ``"windows"`` (time windows) or ``"count"`` (``--requests``).
    """

    summary: Summary
    windows: list[Window]
    used: int
    stable: bool
    warmup_requests: int = 0
    all_errors: dict[str, int] = field(default_factory=dict)
    kind: str = "windows"

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.summary.to_dict(),
            "measurement": self.kind,
            "stable": self.stable,
            "windows_measured": len(self.windows),
            "windows_used": self.used,
            "warmup_requests": self.warmup_requests,
            "all_errors": dict(self.all_errors),
            "windows": [w.brief() for w in self.windows],
        }


WindowCallback = Callable[[int, Window], None]


#: The kinds of callers: threads blocking in ``call()``, or tasks of one event loop
#: awaiting ``call()``.
CALLERS: tuple[str, ...] = ("threads", "asyncio")


class _Callers:
    """The closed-loop callers (threads, or tasks of one event loop) and what they recorded."""

    def __init__(
        self,
        call: Callable[[], Any],
        concurrency: int,
        *,
        count_limit: int | None = None,
        callers: str = "threads",
        thread_context: Callable[[], AbstractContextManager[object]] | None = None,
    ) -> None:
        if callers not in CALLERS:
            raise ValueError(f"callers {callers!r}: expected one of {CALLERS}")
        self.call = call
        self.concurrency = concurrency
        self.thread_context = thread_context
        self.stop = threading.Event()
        self.records = [array("q") for _ in range(concurrency)]
        self.first_error: list[BaseException] = []
        self.ok = [0] * concurrency  # successful requests per caller
        # Count mode: completions after `begin_ns` take a ticket; the first `count_limit` count.
        self.count_limit = count_limit
        self.begin_ns: int | None = None
        self.tickets = itertools.count()
        self.counted = [array("q") for _ in range(concurrency)]
        #: the error names that records' codes index
        self.error_names: list[str] = []
        self._error_codes: dict[str, int] = {}
        self._lock = threading.Lock()
        if callers == "threads":
            self.threads = [
                threading.Thread(target=self._thread_loop, args=(i,), name=f"bench-caller-{i}", daemon=True)
                for i in range(concurrency)
            ]
        else:
            self.threads = [threading.Thread(target=self._event_loop, name="bench-event-loop", daemon=True)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _failed(self, exc: BaseException) -> int:
        """The error code of a failed request (see :data:`_OK`)."""
        if not self.first_error:
            self.first_error.append(exc)
        name = error_name(exc)
        code = self._error_codes.get(name)
        if code is None:
            with self._lock:
                code = self._error_codes.setdefault(name, len(self.error_names))
                if code == len(self.error_names):
                    self.error_names.append(name)
        return code

    def _file(self, i: int, t0: int, t1: int, code: int) -> bool:
        """Keep caller ``i``'s record; False once the count is reached (stop calling)."""
        begin = self.begin_ns
        if self.count_limit is not None and begin is not None and t1 >= begin:
            if next(self.tickets) >= self.count_limit:
                self.stop.set()
                return False
            self.counted[i].extend((t0, t1, code))  # (one call: atomic under the GIL)
        else:
            self.records[i].extend((t0, t1, code))
        return True

    def take(self, rows: array[int]) -> Iterator[tuple[int, int, str | None]]:
        """Remove the records in ``rows`` (a caller's) and yield them as
        (start ns, end ns, error name or None)."""
        end = len(rows)  # (a whole number of records: the callers extend by three)
        taken = rows[:end]
        del rows[:end]  # atomic under the GIL; the caller only ever extends
        names = self.error_names
        for j in range(0, end, 3):
            code = taken[j + 2]
            yield taken[j], taken[j + 1], None if code == _OK else names[code]

    def _thread_loop(self, i: int) -> None:
        clock = time.perf_counter_ns
        call = self.call
        stop = self.stop
        with self.thread_context() if self.thread_context is not None else contextlib.nullcontext():
            while not stop.is_set():
                code = _OK
                t0 = clock()
                try:
                    call()
                except Exception as exc:  # counted by type; the loop goes on
                    code = self._failed(exc)
                else:
                    self.ok[i] += 1
                if not self._file(i, t0, clock(), code):
                    return

    async def _task_loop(self, i: int) -> None:
        clock = time.perf_counter_ns
        call = self.call
        stop = self.stop
        while not stop.is_set():
            code = _OK
            t0 = clock()
            try:
                await call()
            except Exception as exc:  # counted by type; the loop goes on
                code = self._failed(exc)
            else:
                self.ok[i] += 1
            if not self._file(i, t0, clock(), code):
                return

    def _event_loop(self) -> None:
        async def run() -> None:
            await asyncio.gather(*(self._task_loop(i) for i in range(self.concurrency)))

        try:
            with self.thread_context() if self.thread_context is not None else contextlib.nullcontext():
                asyncio.run(run())
        except BaseException as exc:  # the loop itself failed: warm-up reports it
            self._failed(exc)
            self.stop.set()

    def successes(self) -> int:
        return sum(self.ok)

    def warm_up(self, warmup_s: float, min_success: int, max_warmup_s: float) -> None:
        """Return once ``warmup_s`` passed and ``min_success`` requests succeeded.

        Raises:
            MeasurementError: nothing succeeded within ``max_warmup_s`` (the first
                request error is chained), or a caller thread died.
        """
        start = time.monotonic()
        while True:
            elapsed = time.monotonic() - start
            ok = self.successes()
            if elapsed >= warmup_s and ok >= min_success:
                return
            if self.first_error and ok == 0 and (elapsed >= warmup_s or self.stop.is_set()):
                exc = self.first_error[0]
                raise MeasurementError(f"every warm-up request failed: {type(exc).__name__}: {exc}") from exc
            if elapsed >= max_warmup_s:
                if ok > 0:
                    return
                raise MeasurementError(f"no request completed within {max_warmup_s:g} s of warm-up")
            time.sleep(0.005)

    def finish(self, join_timeout: float) -> None:
        """Stop the callers and wait for their last requests.

        Raises:
            MeasurementError: a caller thread is still blocked after ``join_timeout``.
        """
        self.stop.set()
        deadline = time.monotonic() + join_timeout
        for t in self.threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self.threads if t.is_alive()]
        if stuck:
            raise MeasurementError(f"caller threads still blocked {join_timeout:g} s after the end: {stuck}")


def error_name(exc: BaseException) -> str:
    """What a failed request is counted as: its exception type, or the exception's
    ``error_name`` when it has one (``HTTP 503``)."""
    name = getattr(exc, "error_name", None)
    return name if isinstance(name, str) and name else type(exc).__name__


def _sleep_until(deadline_ns: int) -> None:
    while True:
        remaining = deadline_ns - time.perf_counter_ns()
        if remaining <= 0:
            return
        time.sleep(min(remaining / _NS, 0.05))


def measure_windows(
    call: Callable[[], Any],
    *,
    concurrency: int,
    window_s: float,
    max_windows: int,
    warmup_s: float = 0.5,
    stable_count: int = 3,
    threshold: float = 0.10,
    batch_size: int = 1,
    max_warmup_s: float = 60.0,
    join_timeout: float = 60.0,
    on_window: WindowCallback | None = None,
    on_start: Callable[[], None] | None = None,
    callers: str = "threads",
    thread_context: Callable[[], AbstractContextManager[object]] | None = None,
    warmup_requests: int | None = None,
) -> Measurement:
    """Measure ``call`` under closed-loop ``concurrency`` in time windows until stable.

    Args:
        call: issues one request and returns when it is answered (raises on failure).
        concurrency: caller threads, each with one request outstanding.
        window_s: length of a measurement window in seconds.
        max_windows: give up on stability after this many windows.
        warmup_s: warm-up before the first window (at least ``warmup_requests``
            requests, default ``concurrency``, must also have succeeded, within
            ``max_warmup_s``).
        stable_count: consecutive windows that must agree (perf_analyzer: 3).
        threshold: allowed spread, as a fraction (perf_analyzer: 0.10).
        batch_size: inferences per request, for ``infer_per_s``.
        join_timeout: how long to wait for the callers' last requests at the end.
        on_window: called after each window with its index and figures.
        on_start: called as the first window begins (after the warm-up), in this thread.
        callers: ``"threads"``: ``call()`` blocks, one thread per caller;
            ``"asyncio"``: ``call()`` returns an awaitable, one task per caller, all
            in one event loop (:data:`CALLERS`).
        thread_context: entered by each caller thread (by the event loop's thread)
            around its loop, e.g. ``torch.inference_mode``.

    Raises:
        MeasurementError: the warm-up failed or a caller stayed blocked.
    """
    if window_s <= 0 or max_windows < 1 or concurrency < 1:
        raise ValueError("window_s must be > 0, max_windows >= 1 and concurrency >= 1")
    group = _Callers(call, concurrency, callers=callers, thread_context=thread_context)
    group.start()
    windows: list[Window] = []
    stable = False
    warm = 0
    try:
        least = concurrency if warmup_requests is None else warmup_requests
        group.warm_up(warmup_s, min_success=least, max_warmup_s=max_warmup_s)
        window_ns = int(window_s * _NS)
        if on_start is not None:
            on_start()
        begin = time.perf_counter_ns()
        buckets: list[Window] = []

        def file_records() -> int:
            """Move what the callers recorded into the windows; return the warm-up ones."""
            warmup_done = 0
            for rec in group.records:
                for t0, t1, err in group.take(rec):
                    if t1 < begin:
                        warmup_done += 1
                        continue
                    k = (t1 - begin) // window_ns
                    while len(buckets) <= k:
                        buckets.append(Window(seconds=window_s))
                    if err is None:
                        buckets[k].latencies_ns.append(t1 - t0)
                    else:
                        buckets[k].errors[err] += 1
            return warmup_done

        for k in range(max_windows):
            _sleep_until(begin + (k + 1) * window_ns + int(_GRACE_S * _NS))
            warm += file_records()
            while len(buckets) <= k:
                buckets.append(Window(seconds=window_s))
            windows = buckets[: k + 1]
            if on_window is not None:
                on_window(k, windows[-1])
            if is_stable(windows, count=stable_count, threshold=threshold):
                stable = True
                break
    finally:
        group.finish(join_timeout)
    used = min(stable_count, len(windows))
    return Measurement(
        summary=summarize(windows[-used:], batch_size=batch_size),
        windows=windows,
        used=used,
        stable=stable,
        warmup_requests=warm,
        all_errors=merge_errors([w.errors for w in windows]),
    )


def measure_count(
    call: Callable[[], Any],
    *,
    concurrency: int,
    requests: int,
    warmup_s: float = 0.5,
    batch_size: int = 1,
    max_warmup_s: float = 60.0,
    join_timeout: float = 60.0,
    callers: str = "threads",
    thread_context: Callable[[], AbstractContextManager[object]] | None = None,
) -> Measurement:
    """Measure ``call`` under closed-loop ``concurrency`` over exactly ``requests`` completions.

    After the warm-up, the first ``requests`` requests to complete (successful or not)
    are counted; throughput is the successful ones over the time from the end of the
    warm-up to the last counted completion. The result is one window. ``callers`` and
    ``thread_context`` are as for :func:`measure_windows`.

    Raises:
        MeasurementError: the warm-up failed or a caller stayed blocked.
    """
    if requests < 1 or concurrency < 1:
        raise ValueError("requests and concurrency must be >= 1")
    group = _Callers(call, concurrency, count_limit=requests, callers=callers, thread_context=thread_context)
    group.start()
    try:
        group.warm_up(warmup_s, min_success=concurrency, max_warmup_s=max_warmup_s)
        begin = time.perf_counter_ns()
        group.begin_ns = begin
        while not group.stop.is_set():
            group.stop.wait(0.05)
    finally:
        group.finish(join_timeout)
    counted = [r for rec in group.counted for r in group.take(rec)]
    last = max((t1 for _, t1, _ in counted), default=begin)
    window = Window(seconds=(last - begin) / _NS)
    for t0, t1, err in counted:
        if err is None:
            window.latencies_ns.append(t1 - t0)
        else:
            window.errors[err] += 1
    warm = sum(1 for rec in group.records for r in group.take(rec) if r[1] < begin)
    return Measurement(
        summary=summarize([window], batch_size=batch_size),
        windows=[window],
        used=1,
        stable=True,
        warmup_requests=warm,
        all_errors=dict(window.errors),
        kind="count",
    )

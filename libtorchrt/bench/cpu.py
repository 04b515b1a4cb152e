"""CPU time by thread and by process, read from ``/proc`` (bench process; Linux only).

A :class:`CpuMeter` takes :class:`CpuSample` snapshots of this process -- the whole of
it (``getrusage``: threads that have exited included) and each live thread
(``/proc/self/task/TID/schedstat``: nanoseconds on a CPU) -- and of other processes
(the workers of a pool, the processes of a baseline: the sum over their live threads'
``schedstat``, or ``/proc/PID/stat``'s clock ticks where schedstat is missing). The
difference of two samples is a :class:`CpuUsage`, which :meth:`CpuUsage.per_request`
turns into microseconds per request.

The threads of this process are put in groups by name, so that a figure says who paid:

* ``router`` -- libtorchrt's router thread (``libtorchrt-router``);
* ``hub`` -- the native thread of libtorchrt's fast lane (``libtorchrt-hub``);
* ``zmq_io`` -- ZeroMQ's I/O threads (``ZMQbg/...``);
* ``callers`` -- the load generator's caller threads (``bench-caller-N``);
* ``event_loop`` -- the thread that runs the asyncio callers (``bench-event-loop``);
* ``main`` -- the main thread;
* ``other`` -- the rest, and threads that exited during the span (a baseline's
  dispatcher and queue feeders, torch's own threads).

Names are Python's thread names (``threading.enumerate()``), matched to the kernel's
thread ids by ``native_id``; ZeroMQ's threads and the hub's are not Python threads and
are known by their kernel name (``/proc/self/task/TID/comm``).
"""

from __future__ import annotations

import os
import resource
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["THREAD_GROUPS", "CpuMeter", "CpuSample", "CpuUsage", "MeasuredSpan", "process_cpu_ns", "thread_cpu_ns"]

#: The thread groups of this process, in the order they are reported.
THREAD_GROUPS: tuple[str, ...] = ("main", "event_loop", "callers", "router", "hub", "zmq_io", "other")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _schedstat_ns(task_dir: str) -> int:
    """A thread's time on a CPU so far, in ns (the first field of its schedstat)."""
    with open(f"{task_dir}/schedstat") as f:
        return int(f.read().split()[0])


def thread_cpu_ns() -> dict[int, tuple[str, int]]:
    """This process's live threads: ``{tid: (kernel name, cpu ns)}``."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                comm = f.read().strip()
            out[int(tid)] = (comm, _schedstat_ns(f"/proc/self/task/{tid}"))
        except OSError:  # the thread exited meanwhile
            continue
    return out


def _stat_ns(pid: int) -> int:
    """utime + stime of process ``pid`` from ``/proc/PID/stat`` (clock-tick resolution)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // _CLOCK_TICKS


def process_cpu_ns(pid: int) -> int:
    """CPU time of process ``pid`` so far, in ns: its live threads' schedstat summed
    (nanosecond resolution), else ``/proc/PID/stat`` (clock ticks); 0 once it is gone."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    total = 0
    try:
        for tid in tids:
            try:
                total += _schedstat_ns(f"/proc/{pid}/task/{tid}")
            except FileNotFoundError:
                if not os.path.exists(f"/proc/{pid}/task/{tid}"):
                    continue  # the thread exited meanwhile
                raise
    except OSError:  # no schedstat in this kernel
        try:
            return _stat_ns(pid)
        except OSError:
            return 0
    return total


def _self_cpu_ns() -> int:
    """This process's CPU time, threads that have exited included."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return round((r.ru_utime + r.ru_stime) * 1e9)


def _group(tid: int, comm: str, names: Mapping[int, str], main: int | None) -> str:
    if tid == main:
        return "main"
    if comm.startswith("ZMQbg"):
        return "zmq_io"
    if comm == "libtorchrt-hub":
        return "hub"
    name = names.get(tid, "")
    if name == "libtorchrt-router":
        return "router"
    if name.startswith("bench-caller-"):
        return "callers"
    if name == "bench-event-loop":
        return "event_loop"
    return "other"


@dataclass
class CpuSample:
    """One snapshot (see :meth:`CpuMeter.sample`)."""

    wall: float
    front_ns: int
    threads: dict[int, tuple[str, int]]
    groups_of: dict[int, str]
    processes: dict[str, int]


@dataclass
class CpuUsage:
    """CPU spent between two samples, in ns.

    Attributes:
        wall_s: the span's wall-clock length.
        front_ns: this process, all its threads (exited ones included).
        groups_ns: this process by thread group (:data:`THREAD_GROUPS`); ``other`` is
            the front's total less the named groups.
        processes_ns: each measured process by its label.
    """

    wall_s: float
    front_ns: int
    groups_ns: dict[str, int]
    processes_ns: dict[str, int] = field(default_factory=dict)

    @property
    def total_ns(self) -> int:
        """This process and every measured process together."""
        return self.front_ns + sum(self.processes_ns.values())

    def per_request(self, requests: int) -> dict[str, object]:
        """Microseconds of CPU per request: ``total``, ``front``, the front's groups,
        ``processes`` (``{label: µs}``) and ``processes_total``; also the cores busy
        (CPU over wall time). Empty figures (NaN) for no requests."""
        per = 1e3 * requests if requests > 0 else float("nan")
        workers = sum(self.processes_ns.values())
        return {
            "total": self.total_ns / per,
            "front": self.front_ns / per,
            **{g: self.groups_ns.get(g, 0) / per for g in THREAD_GROUPS},
            "processes_total": workers / per,
            "processes": {label: ns / per for label, ns in self.processes_ns.items()},
            "front_cores": self.front_ns / 1e9 / self.wall_s if self.wall_s > 0 else float("nan"),
            "processes_cores": workers / 1e9 / self.wall_s if self.wall_s > 0 else float("nan"),
        }


class CpuMeter:
    """Samples this process's threads and the given processes.

    Args:
        processes: the other processes to measure, ``{label: pid}`` (a pool's workers:
            ``{"w0": pid, ...}``).
    """

    def __init__(self, processes: Mapping[str, int] | None = None) -> None:
        self.processes = dict(processes or {})

    def sample(self) -> CpuSample:
        """Read the counters now (and which group each live thread belongs to)."""
        names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
        main = threading.main_thread().native_id
        threads = thread_cpu_ns()
        return CpuSample(
            wall=time.perf_counter(),
            front_ns=_self_cpu_ns(),
            threads=threads,
            groups_of={tid: _group(tid, comm, names, main) for tid, (comm, _) in threads.items()},
            processes={label: process_cpu_ns(pid) for label, pid in self.processes.items()},
        )

    @staticmethod
    def usage(before: CpuSample, after: CpuSample) -> CpuUsage:
        """What was spent from ``before`` to ``after``.

        A thread is put in the group it had in either sample (threads started in
        between count from zero)."""
        groups = dict.fromkeys(THREAD_GROUPS, 0)
        for tid, (_, ns) in after.threads.items():
            group = after.groups_of.get(tid, "other")
            if group == "other":
                group = before.groups_of.get(tid, "other")
            groups[group] += ns - before.threads.get(tid, ("", 0))[1]
        front = after.front_ns - before.front_ns
        groups["other"] = front - sum(v for g, v in groups.items() if g != "other")
        processes = {label: after.processes[label] - before.processes.get(label, 0) for label in after.processes}
        return CpuUsage(after.wall - before.wall, front, groups, processes)

    @classmethod
    def labels(cls, pids: Sequence[int], prefix: str = "w") -> dict[str, int]:
        """``{"w0": pid0, "w1": pid1, ...}``."""
        return {f"{prefix}{i}": pid for i, pid in enumerate(pids)}


class MeasuredSpan:
    """CPU over the windows of one ``loadgen.measure_windows`` run.

    Pass :meth:`on_start` and :meth:`on_window` to ``measure_windows``: the meter is
    sampled as the first window begins and as the last of ``windows`` ends, together
    with ``extra()`` (the callers' request count, a pool's counters), so that the CPU
    and the requests it is divided by cover the same span.

    Args:
        meter: what to sample.
        windows: the run's ``max_windows`` (with ``stable_count`` equal to it, the run
            measures exactly that many).
        extra: called with each sample; its values are :attr:`extra_before` and
            :attr:`extra_after`.
    """

    def __init__(self, meter: CpuMeter, windows: int, extra: Callable[[], Any] | None = None) -> None:
        self.meter = meter
        self.windows = windows
        self.extra = extra if extra is not None else (lambda: None)
        self.before: CpuSample | None = None
        self.after: CpuSample | None = None
        self.extra_before: Any = None
        self.extra_after: Any = None

    def on_start(self) -> None:
        """``measure_windows(on_start=...)``."""
        self.before, self.extra_before = self.meter.sample(), self.extra()

    def on_window(self, index: int, window: object) -> None:
        """``measure_windows(on_window=...)``: samples after the last window."""
        if index == self.windows - 1:
            self.after, self.extra_after = self.meter.sample(), self.extra()

    def usage(self) -> CpuUsage:
        """The CPU spent over the span.

        Raises:
            RuntimeError: the span was not measured to its end.
        """
        if self.before is None or self.after is None:
            raise RuntimeError("the span was not measured to its last window")
        return CpuMeter.usage(self.before, self.after)

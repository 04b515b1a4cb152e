"""Where a request's CPU goes: the front's threads, the workers, and the router's wake-ups.

The tiny workload of ``benchmarks/batching.py`` (2 instances, 64 closed-loop callers, with
and without dynamic batching), driven by the same callers (``libtorchrt.bench``'s load
generator); as its measured windows begin and end, this script reads, from ``/proc``, the
CPU time of every thread of this process (``schedstat``) and of every worker process (with
``libtorchrt.bench.cpu``), and the router thread's voluntary context switches; it counts
the callers' wake-ups of the router (its eventfd writes). Everything is divided by the
requests answered over the same span (``Pool.stats()``)::

    python benchmarks/front_cpu.py [--seconds 2] [--callers asyncio,threads] [--json PATH]

Columns, per request: the front's CPU (all its threads) and its parts -- the event loop
(asyncio callers: the load generator's ``bench-event-loop`` thread, with the main thread,
which files the requests into windows), the router thread, ZeroMQ's I/O threads, and the
rest (the caller threads, with thread callers); the workers' CPU (both together), and their
busy cores (CPU over wall time); the router's voluntary context switches (it blocked and
was woken: by a caller, a worker's reply or a deadline) and the callers' eventfd wake-ups;
the mean round trip the router sees (sent to answered, ``compute_ns``). Linux only.
``--json`` also records the command, the commit and whether the tree was dirty.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import loadavg, machine_info, provenance
from benchmarks.batching import closed_loop, config
from libtorchrt import Pool
from libtorchrt.bench import loadgen, workloads
from libtorchrt.bench.cpu import CpuMeter, CpuSample

CALLERS = 64


def _voluntary_switches(tid: int) -> int:
    with open(f"/proc/self/task/{tid}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise RuntimeError("no voluntary_ctxt_switches in /proc status")


class _EventfdCounter:
    """Counts ``os.eventfd_write`` calls while installed: in a pool's front only the
    callers' wake-ups of the router (and its own stop) write to an eventfd."""

    def __init__(self) -> None:
        self.count = 0
        self._real = os.eventfd_write

    def __call__(self, fd: int, value: int) -> None:
        self.count += 1  # (not atomic across threads: a count, not an invariant)
        self._real(fd, value)

    @contextmanager
    def installed(self) -> Iterator[_EventfdCounter]:
        os.eventfd_write = self
        try:
            yield self
        finally:
            os.eventfd_write = self._real


@dataclass
class _Snapshot:
    cpu: CpuSample
    router_switches: int
    wakeups: int
    success: int
    executions: int
    inferences: int
    compute_ns: int

    @classmethod
    def take(cls, pool: Pool, router_tid: int, meter: CpuMeter, wakeups: int) -> _Snapshot:
        s = pool.stats()[0]
        return cls(
            meter.sample(),
            _voluntary_switches(router_tid),
            wakeups,
            s.success,
            s.executions,
            s.inferences,
            s.compute_ns,
        )


def _router_tid() -> int:
    for t in threading.enumerate():
        if t.name == "libtorchrt-router" and t.native_id is not None:
            return t.native_id
    raise RuntimeError("no libtorchrt-router thread")


def measure(path: Path, kind: str, batching: bool, seconds: float) -> dict[str, Any]:
    """One drive of the tiny workload, and its CPU and wake-ups per request."""
    counter = _EventfdCounter()
    with counter.installed(), Pool(models=[config("tiny", path, batching)]) as pool:
        meter = CpuMeter(CpuMeter.labels([w.pid for w in pool.workers() if w.pid is not None]))
        router = _router_tid()
        taken: list[_Snapshot] = []

        def take() -> None:
            taken.append(_Snapshot.take(pool, router, meter, counter.count))

        # Sampled while the callers run, so that their threads (the event loop's, with
        # asyncio callers) are in both samples and counted in their groups: a thread that
        # has exited by the second sample only shows in the front's total ("other").
        closed_loop(pool, "tiny", CALLERS, seconds, kind, on_start=take, on_end=take)
    before, after = taken
    requests = after.success - before.success
    executions = after.executions - before.executions
    cpu = CpuMeter.usage(before.cpu, after.cpu)
    front = cpu.front_ns
    loop = cpu.groups_ns["main"] + cpu.groups_ns["event_loop"]
    routed = cpu.groups_ns["router"]
    hub = cpu.groups_ns["hub"]
    zmq_io = cpu.groups_ns["zmq_io"]
    wall = cpu.wall_s
    workers = sum(cpu.processes_ns.values())
    per = 1e3 * requests  # ns -> µs per request
    return {
        "callers": kind,
        "batching": batching,
        "requests": requests,
        "wall_s": wall,
        "req_per_s": requests / wall,
        "mean_batch": (after.inferences - before.inferences) / executions if executions else None,
        "front_us": front / per,
        "main_thread_us": loop / per,
        "router_us": routed / per,
        "hub_us": hub / per,
        "zmq_io_us": zmq_io / per,
        "other_front_us": (front - loop - routed - hub - zmq_io) / per,
        "workers_us": workers / per,
        "workers_cores": workers / 1e9 / wall,
        "front_cores": front / 1e9 / wall,
        "router_switches_per_request": (after.router_switches - before.router_switches) / requests,
        "router_wakeups_per_request": (after.wakeups - before.wakeups) / requests,
        "round_trip_ms": (after.compute_ns - before.compute_ns) / requests / 1e6,
    }


COLUMNS = (
    ("req_per_s", "req/s", "{:,.0f}"),
    ("mean_batch", "batch", "{:.1f}"),
    ("front_us", "front", "{:.1f}"),
    ("main_thread_us", "main/loop", "{:.1f}"),
    ("router_us", "router", "{:.1f}"),
    ("hub_us", "hub", "{:.1f}"),
    ("zmq_io_us", "zmq io", "{:.1f}"),
    ("other_front_us", "other", "{:.1f}"),
    ("workers_us", "workers", "{:.1f}"),
    ("workers_cores", "w cores", "{:.2f}"),
    ("router_switches_per_request", "r sw/req", "{:.3f}"),
    ("router_wakeups_per_request", "wake/req", "{:.3f}"),
    ("round_trip_ms", "rtt ms", "{:.2f}"),
)


def print_row(r: dict[str, Any]) -> None:
    mode = f"{r['callers']} {'batching' if r['batching'] else 'alone'}"
    cells = ["n/a" if r[key] is None else fmt.format(r[key]) for key, _, fmt in COLUMNS]
    print(f"{mode:<18}" + "".join(f"{c:>10}" for c in cells), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=2.0, help="measured seconds per drive (default: 2)")
    p.add_argument("--callers", default="asyncio", help="asyncio, threads or both (default: asyncio)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the figures, machine and commit to PATH")
    args = p.parse_args(argv)
    kinds = [k for k in args.callers.split(",") if k]
    if not kinds or any(k not in loadgen.CALLERS for k in kinds):
        p.error(f"--callers: choose from {', '.join(loadgen.CALLERS)}")
    source = provenance()
    info = machine_info()
    info["loadavg_1min_start"] = loadavg()
    print(f"commit {source['commit']}{' (dirty tree)' if source['dirty'] else ''}, torch {info['torch']}")
    print("µs of CPU per request (front: all its threads), over the measured windows")
    print(f"{'':<18}" + "".join(f"{title:>10}" for _, title, _ in COLUMNS), flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="torchrt-front-cpu-") as tmp:
        path = workloads.build("tiny", tmp)
        for kind in kinds:
            for batching in (False, True):
                row = measure(path, kind, batching, args.seconds)
                print_row(row)
                rows.append(row)
    info["loadavg_1min_end"] = loadavg()
    if args.json is not None:
        doc = {**source, "machine": info, "config": {**vars(args), "json": str(args.json)}, "rows": rows}
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

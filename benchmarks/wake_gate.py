"""The fast lane's wake-up gate: caller threads of a batching model, with and without it.

A batch's replies come together. Woken all at once, its caller threads all wait for the
GIL, and every torch call of theirs hands it to another (``transport/lanes.py``, "the
wake-up gate"). This script serves the tiny model (2 instances, ``max_batch_size`` 32,
500 µs queue delay) to caller threads three ways, in one process, alternated round by
round:

* ``gate``: the library as it is: the hub forms the batches and wakes their callers a
  few at a time (``Hub()``'s defaults);
* ``no gate``: ``Pool(wake_limit=0)``: every caller of a batch woken at once;
* ``router``: threads' requests to the batching model go by the router thread's Python
  batcher (what ``Pool.infer`` did before the gate), event loops' still by the hub.

and two kinds of caller (``libtorchrt.bench``'s load generator, closed loop):

* ``closed``: 64 threads, a clone of the input in and ``float(y.sum())`` out, back to back;
* ``slow``: 32 threads that also sleep 5 ms after each result (time without the GIL, as
  a server thread writing its answer and waiting for its next client): the case the gate
  must not slow down (it turns itself off when most of its grants lapse).

Printed per row: requests/s, CPU per request of this process (callers, hub, router) and
of the workers, and the gate's counts over the measurement. The ``router`` row swaps a
private seam of the library (``FastLane.takes``) for the time of its pool.

    python benchmarks/wake_gate.py [--rounds 2] [--seconds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import workloads
from benchmarks._proc import MALLOC_CHOICES, MALLOC_HELP, choose_malloc
from benchmarks.batching import config
from libtorchrt import Pool
from libtorchrt.bench.cpu import process_cpu_ns
from libtorchrt.bench.loadgen import measure_windows
from libtorchrt.front import fastlane

SETTINGS = ("gate", "no gate", "router")
#: kind of caller -> (threads, seconds slept after each result)
CALLERS = {"closed": (64, 0.0), "slow": (32, 0.005)}
WINDOWS = 3


@contextlib.contextmanager
def setting(name: str) -> Iterator[dict[str, Any]]:
    """The ``Pool`` options that make ``name``, with its seam swapped for the time of the block."""
    takes = fastlane.FastLane.takes
    if name == "router":

        def by_router(self: fastlane.FastLane, call: Any) -> bool:
            return takes(self, call) and not call.model.lane_batches

        fastlane.FastLane.takes = by_router  # type: ignore[method-assign]
    try:
        yield {"wake_limit": 0} if name == "no gate" else {}
    finally:
        fastlane.FastLane.takes = takes  # type: ignore[method-assign]


def caller(pool: Pool, x: torch.Tensor, pause: float, done: Iterator[int]) -> Callable[[], None]:
    """One request as the callers make it; ``next(done)`` counts it once answered."""

    def call() -> None:
        y = pool.infer("tiny", {"INPUT__0": x.clone()})["OUTPUT__0"]
        float(y.sum())
        next(done)
        if pause:
            time.sleep(pause)

    return call


def row(name: str, kind: str, path: Path, x: torch.Tensor, seconds: float) -> str:
    threads, pause = CALLERS[kind]
    with setting(name) as options, Pool(models=[config("tiny", path, True)], **options) as pool:
        pids = [w.pid for w in pool.workers() if w.pid is not None]
        hub = pool._router.fast.hub
        done = itertools.count()
        marks: dict[str, Any] = {}

        def on_start() -> None:
            marks.update(
                n=next(done), cpu=time.process_time(), workers=sum(map(process_cpu_ns, pids)), gate=dict(hub.gate)
            )

        m = measure_windows(
            caller(pool, x, pause, done),
            concurrency=threads,
            window_s=seconds / WINDOWS,
            max_windows=WINDOWS,
            stable_count=WINDOWS,
            threshold=10.0,
            on_start=on_start,
        )
        cpu, workers, gate = time.process_time(), sum(map(process_cpu_ns, pids)), hub.gate
        n = next(done) - marks["n"] - 1  # (from the first window's start to the callers' last request)
    front_us = (cpu - marks["cpu"]) / n * 1e6
    workers_us = (workers - marks["workers"]) / n / 1e3
    counts = ", ".join(f"{k} {gate[k] - marks['gate'][k]}" for k in ("granted", "given_back", "lapsed", "offs"))
    return (
        f"{kind:6s}  {name:8s}  {m.summary.req_per_s:9,.0f} req/s  front {front_us:6.1f} µs/req  "
        f"workers {workers_us:5.1f} µs/req  gate: {counts}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds a row (default 3)")
    parser.add_argument("--kinds", default=",".join(CALLERS), help="closed,slow")
    parser.add_argument("--malloc", choices=MALLOC_CHOICES, default="workers", help=MALLOC_HELP)
    parser.add_argument("--models", default="/tmp/libtorchrt-bench-models")
    a = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(choose_malloc(a.malloc))
    path = workloads.build("tiny", a.models)
    x = workloads.example_input("tiny")
    for rnd in range(1, a.rounds + 1):
        for kind in a.kinds.split(","):
            for name in SETTINGS:
                print(f"round {rnd}  {row(name, kind, path, x, a.seconds)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

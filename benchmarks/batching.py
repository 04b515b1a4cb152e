"""Dynamic batching against one request per execution, in one run.

- **tiny** (MLP 64-64-64, ``[1, 64]`` per request), 2 instances, 64 closed-loop callers:
  requests/s, p50/p99 and mean batch size with ``dynamic_batching``
  (``max_batch_size: 32``, ``max_queue_delay_microseconds: 500``) and without it
  (the same model, each request executed alone). Goal: >= 3x. The callers are 64
  threads calling ``Pool.infer``, and (``--callers``) 64 asyncio tasks of one event
  loop awaiting ``Pool.infer_async``: each pair of rows (alone, batching) uses one kind.
  Both are ``libtorchrt.bench``'s load generator (``loadgen.py``): after a warm-up,
  ``--seconds`` are measured in 3 windows, a request counting in the window in which
  it completed; latency percentiles follow perf_analyzer's rule (``stats.py``).
- **cnn** (``[1, 3, 224, 224]``), 2 instances, 16 callers, the same two ways.
- **overload**: callers that do not wait (each submits every 0.2 ms, far above what
  the model serves), with ``max_queue_size: 64``: requests refused with QueueFullError
  at once, requests served, and the front's resident memory at the start and the end
  of the run, which must stay flat (a bounded queue holds a bounded number of requests).

``--device cuda:0`` puts the instances on a GPU (two processes on one GPU; the callers'
inputs stay on the CPU, as a batch is gathered on the host).

Run: ``python benchmarks/batching.py [--seconds 3] [--device cuda:0] [--json PATH]``.
``--json`` writes every row, the overload figures, the machine, the command and the
commit it ran on (``git rev-parse HEAD``, with a dirty flag).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import loadavg, machine_info, provenance
from libtorchrt import DynamicBatching, ModelConfig, ModelStats, Pool, QueueFullError, QueuePolicy, TensorSpec
from libtorchrt.bench import workloads
from libtorchrt.bench.loadgen import CALLERS, MeasurementError, measure_windows
from libtorchrt.bench.stats import Window

SHAPES = {"tiny": (64,), "cnn": (3, 224, 224)}


def config(name: str, path: Path, batching: bool, device: str = "cpu", **queue: Any) -> ModelConfig:
    return ModelConfig(
        name,
        path,
        instances=2,
        devices=device,
        max_batch_size=32,
        inputs=[TensorSpec("INPUT__0", "float32", SHAPES[name])],
        dynamic_batching=DynamicBatching(max_queue_delay_microseconds=500, default_queue_policy=QueuePolicy(**queue))
        if batching
        else None,
    )


#: The measured seconds are split into this many windows of the load generator, all reported.
WINDOWS = 3


def closed_loop(
    pool: Pool,
    name: str,
    callers: int,
    seconds: float,
    kind: str = "threads",
    *,
    on_start: Callable[[], None] | None = None,
    on_end: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Drive model ``name`` of ``pool`` with ``callers`` closed-loop callers and measure it.

    The callers are ``libtorchrt.bench``'s load generator (:func:`~libtorchrt.bench.loadgen.measure_windows`):
    ``kind`` ``"threads"`` -- threads calling ``Pool.infer``; ``"asyncio"`` -- tasks of one
    event loop awaiting ``Pool.infer_async``. After a warm-up of ``min(1, seconds / 2)`` s,
    ``seconds`` are measured in :data:`WINDOWS` windows, merged (perf_analyzer's rule).
    ``on_start`` and ``on_end`` are called as the first window begins and as the last
    ends, while the callers run (to sample other counters over the same span).

    Returns:
        ``rps``, ``p50_ms``, ``p99_ms`` and ``batch``: the mean batch size over the
        measured windows (``Pool.stats()``; NaN when no execution was counted).

    Raises:
        libtorchrt.bench.loadgen.MeasurementError: the warm-up failed, a measured request
            failed (the count by type is given), or a caller stayed blocked.
    """
    x = torch.randn(1, *SHAPES[name])  # read, never written: the callers share it
    call = functools.partial(pool.infer_async if kind == "asyncio" else pool.infer, name, x)
    counters: list[ModelStats] = []  # at the start of the first window and the end of the last

    def at_start() -> None:
        counters.append(pool.stats()[0])
        if on_start is not None:
            on_start()

    def at_end(k: int, _: Window) -> None:
        if k == WINDOWS - 1:
            counters.append(pool.stats()[0])
            if on_end is not None:
                on_end()

    m = measure_windows(
        call,
        concurrency=callers,
        window_s=seconds / WINDOWS,
        max_windows=WINDOWS,
        stable_count=WINDOWS,  # never stops before the last window
        warmup_s=min(1.0, seconds / 2),
        callers=kind,
        on_start=at_start,
        on_window=at_end,
    )
    if m.all_errors:
        raise MeasurementError(f"requests failed while measuring: {m.all_errors}")
    before, after = counters
    executions = after.executions - before.executions
    s = m.summary
    return {
        "rps": s.req_per_s,
        "p50_ms": s.p(50) / 1e3,
        "p99_ms": s.p(99) / 1e3,
        "batch": (after.inferences - before.inferences) / executions if executions else float("nan"),
    }


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def overload(path: Path, seconds: float) -> dict[str, float]:
    """Open-loop callers far above capacity, against a bounded queue."""
    with Pool(models=[config("cnn", path, True, max_queue_size=64)]) as pool:
        x = torch.randn(1, *SHAPES["cnn"])
        refused = served = 0
        lock = threading.Lock()
        stop = threading.Event()
        futures: list[Any] = []

        def caller() -> None:
            nonlocal refused
            while not stop.is_set():
                try:
                    f = pool.submit("cnn", x)
                except QueueFullError:
                    with lock:
                        refused += 1
                else:
                    with lock:
                        futures.append(f)
                time.sleep(0.0002)

        threads = [threading.Thread(target=caller) for _ in range(4)]
        rss_start = rss_mib()
        for t in threads:
            t.start()
        peak_pending = 0
        start = time.perf_counter()
        rss_samples: list[tuple[float, float]] = []
        while time.perf_counter() < start + seconds:
            peak_pending = max(peak_pending, pool.stats()[0].pending)
            rss_samples.append((time.perf_counter() - start, rss_mib()))
            time.sleep(0.01)
        second_half = [r for t, r in rss_samples if t >= seconds / 2]
        stop.set()
        for t in threads:
            t.join()
        for f in futures:
            f.result(60)
            served += 1
        rss_end = rss_mib()
    return {
        "refused": refused,
        "served": served,
        "peak_pending": peak_pending,
        "rss_start": rss_start,
        "rss_half_min": min(second_half),
        "rss_half_max": max(second_half),
        "rss_end": rss_end,
    }


def json_document(
    args: argparse.Namespace,
    source: dict[str, Any],
    info: dict[str, Any],
    rows: list[tuple[str, int, str, bool, dict[str, float]]],
    over: dict[str, float] | None,
) -> dict[str, Any]:
    """The ``--json`` document: where the figures came from (``command``, ``commit``,
    ``dirty``), the machine, the options, one entry per measured row (``ratio``: batching
    over one request per execution, for the batching rows) and the overload figures. A
    figure that could not be computed (NaN: no execution counted) is null."""
    out = []
    for name, callers, kind, batching, r in rows:
        alone = next((x for n, _, k, b, x in rows if n == name and k == kind and not b), None)
        ratio = r["rps"] / alone["rps"] if batching and alone is not None and alone["rps"] else None
        figures = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()}
        row = {"workload": name, "callers": callers, "kind": kind, "batching": batching}
        out.append({**row, **figures, "ratio": ratio})
    return {
        **source,
        "machine": info,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": out,
        "overload": over,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--workloads", default="tiny,cnn", help="closed-loop workloads to run")
    parser.add_argument("--no-overload", action="store_true", help="skip the overload run")
    parser.add_argument(
        "--callers", default="threads,asyncio", help="kinds of tiny callers: threads, asyncio (cnn: threads)"
    )
    parser.add_argument("--device", default="cpu", help="where the instances run: cpu, or cuda:N")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures, machine and commit to PATH")
    args = parser.parse_args(argv)
    kinds = args.callers.split(",")
    if any(k not in CALLERS for k in kinds):
        parser.error(f"--callers: choose from {', '.join(CALLERS)}")
    source = provenance()  # before the run: the code that runs is the code recorded
    info = machine_info()
    info["loadavg_1min_start"] = loadavg()
    print(f"commit {source['commit']}{' (dirty tree)' if source['dirty'] else ''}, torch {info['torch']}", flush=True)
    chosen = args.workloads.split(",")
    runs = [("tiny", 64, kind) for kind in kinds if "tiny" in chosen]
    runs += [("cnn", 16, "threads")] if "cnn" in chosen else []
    rows: list[tuple[str, int, str, bool, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: workloads.build(name, tmp) for name in SHAPES}
        for name, callers, kind in runs:
            for batching in (False, True):
                with Pool(models=[config(name, paths[name], batching, args.device)]) as pool:
                    r = closed_loop(pool, name, callers, args.seconds, kind)
                rows.append((name, callers, kind, batching, r))
                print(
                    f"{name} x{callers} {kind} {'batching' if batching else 'one per execution'}: "
                    f"{r['rps']:,.0f} req/s, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, "
                    f"mean batch {r['batch']:.1f}",
                    flush=True,
                )
        over = None if args.no_overload else overload(paths["cnn"], args.seconds)
    info["loadavg_1min_end"] = loadavg()
    print()
    print(f"instances on {args.device}")
    print("| workload | callers | mode | req/s | p50 ms | p99 ms | mean batch | batching / alone |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, callers, kind, batching, r in rows:
        alone = next(x for n, _, k, b, x in rows if n == name and k == kind and not b)
        ratio = f"{r['rps'] / alone['rps']:.2f}x" if batching else ""
        mode = "dynamic batching (32, 500 us)" if batching else "one request per execution"
        print(
            f"| {name} | {callers} {kind} | {mode} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['batch']:.1f} | {ratio} |"
        )
    if over is not None:
        print()
        print(
            f"overload (cnn, 4 open-loop callers every 0.2 ms, max_queue_size 64, {args.seconds:.0f} s): "
            f"{over['served']:,} served, {over['refused']:,} refused with QueueFullError, "
            f"peak queue {over['peak_pending']}; front RSS {over['rss_start']:.0f} MiB at the start, "
            f"{over['rss_half_min']:.0f}-{over['rss_half_max']:.0f} MiB over the second half, "
            f"{over['rss_end']:.0f} MiB after draining (the request arena's touched pages count in it, "
            "at most request_arena_bytes)"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(json_document(args, source, info, rows, over), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

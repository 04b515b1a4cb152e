"""``Pool(front_cpus=...)`` against the kernel's placement, side by side in one run.

Thread callers of a pool on a small machine are bimodal (docs/measurements/missed-targets.md):
the same pool serves at full speed for seconds, then at a fifth of it, in CPython's GIL
convoy across CPUs. ``front_cpus`` keeps this process's threads on their own CPUs and the
workers on the others. This script measures what that does, with ``realistic.py``'s
callers (a clone of a prepared input in, ``float(y.sum())`` of every output) and its
tables, alternating within each round:

* ``tiny`` -- 2 instances, 8 threads: libtorchrt; libtorchrt with ``front_cpus``; the
  hand-written multiprocessing-queue pool; the same pool pinned the same way (this
  process's threads on the front's CPUs, its worker processes on the others), so that
  the comparison with it stays fair;
* ``threads64`` -- 64 threads, one request per execution;
* ``batching64`` -- 64 threads, dynamic batching (32, 500 µs: the hub's wake-up gate);
* ``asyncio64`` -- 64 asyncio tasks, one request per execution (one thread: no convoy);
* ``latency`` -- 1 instance, 1 thread, and one thread calling the model in this process;
* ``cnn`` -- 2 instances, 8 threads, and the model called in this process (compute-bound
  workers: the front's CPUs are taken from them).

At the end, per round and by the median of the rounds: each scenario's ``front_cpus``
row against its default row, and tiny's rows against the queue pool's (req/s).

    python benchmarks/front_cpus.py [--seconds 3] [--front-cpus 1] [--rounds 3]
                                    [--scenarios tiny,threads64,...] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._baselines import MpQueuePool
from benchmarks._proc import MALLOC_CHOICES, MALLOC_HELP, choose_malloc, stop_resource_tracker
from benchmarks._report import loadavg, machine_info, provenance
from benchmarks.batching import config as batching_config
from benchmarks.realistic import _TIMEOUT_S, Result, Runner
from libtorchrt import ModelConfig, Pool
from libtorchrt.bench.cpu import CpuMeter
from libtorchrt.cpus import FrontPin

SCENARIOS = ("tiny", "threads64", "batching64", "asyncio64", "latency", "cnn")
HEADLINES = {
    "tiny": "tiny: 2 instances, 8 caller threads -- default placement, front_cpus, the queue pool (and pinned)",
    "threads64": "threads64: tiny, 2 instances, 64 caller threads, one request per execution",
    "batching64": "batching64: tiny, 2 instances, 64 caller threads, dynamic batching (32, 500 µs)",
    "asyncio64": "asyncio64: tiny, 2 instances, 64 asyncio tasks, one request per execution",
    "latency": "latency: tiny, 1 instance, 1 caller thread -- and the model called in this process",
    "cnn": "cnn: 2 instances, 8 caller threads -- and the model called in this process",
}
DEFAULT, PINNED = "libtorchrt", "front_cpus"


def _pin_workers(pids: Sequence[int], cpus: frozenset[int]) -> None:
    """Every thread of each process in ``pids`` on ``cpus`` (the queue pool's workers)."""
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(tid), cpus)


class FrontCpusRunner(Runner):
    """``realistic.py``'s rows, each scenario with and without ``front_cpus``."""

    def variants(self) -> list[tuple[str, dict[str, Any]]]:
        return [(DEFAULT, {}), (PINNED, {"front_cpus": self.args.front_cpus})]

    def each_pool(self, scenario: str, cfg: ModelConfig, callers: str, concurrency: int) -> None:
        for label, kw in self.variants():
            with Pool(models=[cfg], **kw) as pool:
                n = cfg.instances if isinstance(cfg.instances, int) else 1
                self.pool_row(scenario, label, pool, cfg.name, callers=callers, concurrency=concurrency, instances=n)

    def tiny(self) -> None:
        self.each_pool("tiny", ModelConfig("tiny", self.path("tiny"), instances=2), "threads", 8)
        for label, pinned in (("mp-queue", False), ("mp-queue pinned", True)):
            self.queue_row(label, pinned)

    def queue_row(self, label: str, pinned: bool) -> None:
        with MpQueuePool(self.path("tiny"), 2) as mpq, self.pinned(mpq.pids() if pinned else None):
            app = self.application("tiny")

            def send(inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
                return torch.from_numpy(mpq.infer(inputs["INPUT__0"].numpy(), timeout=_TIMEOUT_S))

            meter = CpuMeter(CpuMeter.labels(mpq.pids()))
            self.drive("tiny", label, app, app.call(send), callers="threads", concurrency=8, instances=2, meter=meter)

    @contextmanager
    def pinned(self, workers: Sequence[int] | None) -> Iterator[None]:
        """This process's threads and ``workers``' as ``Pool(front_cpus=...)`` places a
        pool's (None: as they are)."""
        if workers is None:
            yield
            return
        pin = FrontPin(self.args.front_cpus)
        try:
            _pin_workers(workers, pin.workers)
            yield
        finally:
            pin.restore()

    def threads64(self) -> None:
        self.each_pool("threads64", ModelConfig("tiny", self.path("tiny"), instances=2), "threads", 64)

    def batching64(self) -> None:
        self.each_pool("batching64", batching_config("tiny", self.path("tiny"), True), "threads", 64)

    def asyncio64(self) -> None:
        self.each_pool("asyncio64", ModelConfig("tiny", self.path("tiny"), instances=2), "asyncio", 64)

    def latency(self) -> None:
        self.each_pool("latency", ModelConfig("tiny", self.path("tiny"), instances=1), "threads", 1)
        self.direct_row("latency", "tiny")

    def cnn(self) -> None:
        self.each_pool("cnn", ModelConfig("cnn", self.path("cnn"), instances=2), "threads", 8)
        self.direct_row("cnn", "cnn")

    def headline(self, name: str) -> str:
        return HEADLINES[name]


def _rate(rows: Sequence[Result], scenario: str, label: str) -> float | None:
    for r in rows:
        if (r.scenario, r.label) == (scenario, label) and r.ok:
            return r.req_per_s
    return None


def ratios(rows: Sequence[Result]) -> dict[str, float | None]:
    """The req/s ratios of one round's rows."""

    def over(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b is not None and b > 0 else None

    out: dict[str, float | None] = {}
    for name in SCENARIOS:
        out[f"{name}: front_cpus / default"] = over(_rate(rows, name, PINNED), _rate(rows, name, DEFAULT))
    for label in (DEFAULT, PINNED):
        for base in ("mp-queue", "mp-queue pinned"):
            out[f"tiny: {label} / {base}"] = over(_rate(rows, "tiny", label), _rate(rows, "tiny", base))
    for name in ("latency", "cnn"):
        for label in (DEFAULT, PINNED):
            out[f"{name}: {label} / direct"] = over(_rate(rows, name, label), _rate(rows, name, "direct (in-process)"))
    return {k: v for k, v in out.items() if v is not None}


def print_ratios(by_round: Sequence[Mapping[str, float]]) -> dict[str, dict[str, Any]]:
    """Each ratio per round, and its median; returns them."""
    keys = list(dict.fromkeys(k for r in by_round for k in r))
    summary: dict[str, dict[str, Any]] = {}
    median = " (then the median of the rounds)" if len(by_round) > 1 else ""
    print(f"\nreq/s ratios, each from rows of one round{median}")
    width = max([44, *(len(k) + 2 for k in keys)])
    for key in keys:
        values = [r[key] for r in by_round if key in r]
        summary[key] = {"rounds": values, "median": statistics.median(values)}
        each = "  ".join(_figure(key, v) for v in values)
        tail = f"   median {_figure(key, statistics.median(values))}" if len(values) > 1 else ""
        print(f"  {key:<{width}}{each}{tail}")
    return summary


def _figure(key: str, value: float) -> str:
    """A ratio (``1.23x``), or microseconds for a key that says so."""
    return f"{value:5.0f} µs" if key.endswith("(µs)") else f"{value:5.2f}x"


def variants_parser(doc: str | None, scenarios: Sequence[str]) -> argparse.ArgumentParser:
    """The options of a script of variants (this one, ``busy_poll.py``), but its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=3.0, help="measured seconds per row, in 3 windows (default: 3)")
    p.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds per row (default: 0.5)")
    p.add_argument(
        "--scenarios",
        type=lambda s: [x for x in s.split(",") if x],
        default=list(scenarios),
        help=f"comma-separated, out of {','.join(scenarios)} (default: all)",
    )
    p.add_argument("--rounds", type=int, default=1, help="run the scenarios this many times (default: 1)")
    p.add_argument("--malloc", choices=MALLOC_CHOICES, default="workers", help=MALLOC_HELP)
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the rows, ratios, machine and commit to PATH")
    return p


def parse_variants(
    p: argparse.ArgumentParser, argv: Sequence[str] | None, scenarios: Sequence[str]
) -> argparse.Namespace:
    """Parse and check :func:`variants_parser`'s options (``p.error`` on a bad one)."""
    args = p.parse_args(argv)
    unknown = [s for s in args.scenarios if s not in scenarios]
    if unknown or not args.scenarios:
        p.error(f"--scenarios: {unknown or 'none'}; expected some of {','.join(scenarios)}")
    if args.seconds <= 0 or args.warmup < 0 or args.rounds < 1:
        p.error("--seconds must be > 0, --warmup >= 0 and --rounds >= 1")
    args.use, args.fresh = "sum", "clone"  # (realistic.py's callers, as its defaults)
    return args


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = variants_parser(__doc__, SCENARIOS)
    p.add_argument("--front-cpus", type=int, default=1, help="Pool(front_cpus=N) for the pinned rows (default: 1)")
    args = parse_variants(p, argv, SCENARIOS)
    if args.front_cpus < 1:
        p.error("--front-cpus must be >= 1")
    if len(os.sched_getaffinity(0)) <= args.front_cpus:
        p.error(f"--front-cpus {args.front_cpus} leaves no CPU for the workers on this machine")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_variants(args, FrontCpusRunner, f"Pool(front_cpus={args.front_cpus}) against the default", ratios)


def run_variants(
    args: argparse.Namespace,
    runner_type: type[Runner],
    title: str,
    ratios_of: Callable[[Sequence[Result]], dict[str, float | None]],
) -> int:
    """Run ``runner_type``'s scenarios for ``args.rounds`` rounds, print the ratios
    ``ratios_of`` finds in each round's rows and their medians, and write ``args.json``
    (also for ``busy_poll.py``)."""
    torch.set_num_threads(1)  # the direct rows: one intra-op thread, as each worker has
    malloc = choose_malloc(args.malloc)
    source = provenance()
    info = machine_info()
    info["loadavg_1min_start"] = loadavg()
    print(f"{title} -- {info['cpu_count']} CPUs ({info['cpu_model']})")
    print(f"commit {source['commit']}{' (dirty tree)' if source['dirty'] else ''}")
    print(f"1-min load average at the start: {info['loadavg_1min_start']}")
    print(malloc)
    print(f"callers: clone + float(sum); {args.seconds:g} s per row in 3 windows after {args.warmup:g} s of warm-up")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="torchrt-variants-") as tmp:
        runner = runner_type(args, Path(tmp))
        try:
            runner.run()
        finally:
            stop_resource_tracker()
    by_round = [{k: v for k, v in ratios_of(rows).items() if v is not None} for rows in runner.rounds_done()]
    summary = print_ratios(by_round)
    info["loadavg_1min_end"] = loadavg()
    print(f"\n1-min load average at the end: {info['loadavg_1min_end']}; elapsed {time.perf_counter() - started:.0f} s")
    if args.json is not None:
        doc = {
            **source,
            "machine": info,
            "config": {**vars(args), "json": str(args.json)},
            "rows": [r.to_dict() for r in runner.rows],
            "ratios": summary,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

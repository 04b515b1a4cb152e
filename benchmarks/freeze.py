"""FREEZE_MODULE and OPTIMIZE_FOR_INFERENCE on the cnn workload, side by side.

Run from the repository root::

    python benchmarks/freeze.py                        # 3 rounds, ~1.5 min on 2 cores
    python benchmarks/freeze.py --duration 1 --rounds 1 --json out.json

One ``Pool`` serves the cnn workload (five 3x3 stride-2 convolutions on
``[1, 3, 224, 224]``) three times, one instance each with one intra-op thread (the CPU
default): plain scripted, ``FREEZE_MODULE: true`` and ``OPTIMIZE_FOR_INFERENCE: true``.
One caller thread (concurrency 1) drives each in turn: ``--warmup`` seconds, then one
window of ``--duration`` seconds. ``--rounds`` rounds interleave the variants, so that a
busy moment of the machine hits all of them alike; every figure is the median over
rounds, and the ratios compare each variant with the scripted one of the same mode.

The ``direct`` rows call the same three modules in this process (one thread,
``torch.inference_mode``, prepared by the worker's own ``flags.prepare``): what the model
itself gains, without the pool's transport.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from types import FrameType
from typing import Any

# ``python benchmarks/freeze.py``: make the ``benchmarks`` package importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import workloads
from benchmarks._harness import Measurement, measure
from benchmarks._report import fmt_rps, fmt_us, loadavg, machine_info

WORKLOAD = "cnn"
#: variant name -> the model's parameters
VARIANTS: dict[str, dict[str, str]] = {
    "scripted": {},
    "FREEZE_MODULE": {"FREEZE_MODULE": "true"},
    "OPTIMIZE_FOR_INFERENCE": {"OPTIMIZE_FOR_INFERENCE": "true"},
}
MODES = ("libtorchrt", "direct")


@dataclass
class Result:
    """The rounds of one (mode, variant)."""

    mode: str
    variant: str
    rounds: list[Measurement] = field(default_factory=list)
    note: str = ""

    @property
    def p50_us(self) -> float:
        return statistics.median(m.p50_us for m in self.rounds)

    @property
    def p99_us(self) -> float:
        return statistics.median(m.p99_us for m in self.rounds)

    @property
    def rps(self) -> float:
        return statistics.median(m.rps for m in self.rounds)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "variant": self.variant,
            "p50_us": self.p50_us,
            "p99_us": self.p99_us,
            "rps": self.rps,
            "note": self.note,
            "rounds": [m.to_dict() for m in self.rounds],
        }


def _check(out: torch.Tensor, ref: torch.Tensor) -> str:
    """ "" if ``out`` matches the scripted model's output, else a short note."""
    if out.shape != ref.shape or not torch.allclose(out, ref, rtol=1e-3, atol=1e-4):
        return f"OUTPUT MISMATCH (max diff {float((out - ref).abs().max()):.2g})"
    return ""


def _direct_calls(path: Path, x: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """The three variants loaded in this process, as the workers prepare them."""
    from libtorchrt.workers import flags

    calls = {}
    for variant, params in VARIANTS.items():
        module = flags.prepare(workloads.load(path), flags.parse(WORKLOAD, params), model=WORKLOAD)
        calls[variant] = lambda module=module: module(x)
    return calls


def run(args: argparse.Namespace, model_dir: Path) -> list[Result]:
    """Measure every (mode, variant), ``args.rounds`` times, interleaved."""
    from libtorchrt import ModelConfig, Pool

    path = workloads.build(WORKLOAD, model_dir)
    x = workloads.example_input(WORKLOAD)
    direct = _direct_calls(path, x)
    with torch.inference_mode():
        ref = direct["scripted"]().clone()
    results = {(mode, v): Result(mode, v) for mode in args.modes for v in VARIANTS}
    configs = [
        ModelConfig(name=f"{WORKLOAD}-{v}", path=str(path), instances=1, parameters=params)
        for v, params in VARIANTS.items()
    ]
    timing = {"duration": args.duration, "repeat": 1, "warmup": args.warmup, "warmup_calls": 20}
    started = time.perf_counter()
    with Pool(models=configs) as pool:
        print(f"pool started in {time.perf_counter() - started:.1f} s; worker flags:")
        for w in pool.workers():
            f = w.flags
            print(
                f"  {w.model:<28} FREEZE_MODULE={f['FREEZE_MODULE']!s:<5} "
                f"OPTIMIZE_FOR_INFERENCE={f['OPTIMIZE_FOR_INFERENCE']!s:<5} "
                f"INTRA_OP_THREAD_COUNT={f['INTRA_OP_THREAD_COUNT']}"
            )
        calls: dict[tuple[str, str], Callable[[], Any]] = {}
        for v in VARIANTS:
            name = f"{WORKLOAD}-{v}"
            calls[("libtorchrt", v)] = lambda name=name: pool.infer(name, [x])["OUTPUT__0"]
            calls[("direct", v)] = direct[v]
        for key, result in results.items():
            with torch.inference_mode():
                result.note = _check(calls[key](), ref)
        for r in range(args.rounds):
            print(f"round {r + 1} of {args.rounds}", flush=True)
            for key, result in results.items():
                context = torch.inference_mode if key[0] == "direct" else None
                m = measure(calls[key], concurrency=1, thread_context=context, **timing)
                result.rounds.append(m)
                print(f"  {key[0]:<10} {key[1]:<22} p50 {fmt_us(m.p50_us):>9}  {fmt_rps(m.rps):>7} req/s", flush=True)
    return list(results.values())


def print_table(results: Sequence[Result], rounds: int) -> None:
    """The medians, with each variant's ratios to the scripted one of its mode."""
    head = (
        f"{'mode':<10}  {'variant':<22}  {'p50':>9}  {'p99':>9}  {'req/s':>7}  "
        f"{'p50 / scripted':>14}  {'req/s / scripted':>16}  p50 per round"
    )
    print(f"\nmedians of {rounds} round(s)\n{head}\n{'-' * len(head)}")
    base = {r.mode: r for r in results if r.variant == "scripted"}
    for r in results:
        b = base[r.mode]
        per_round = " ".join(fmt_us(m.p50_us) for m in r.rounds)
        print(
            f"{r.mode:<10}  {r.variant:<22}  {fmt_us(r.p50_us):>9}  {fmt_us(r.p99_us):>9}  {fmt_rps(r.rps):>7}  "
            f"{r.p50_us / b.p50_us:>13.2f}x  {r.rps / b.rps:>15.2f}x  {per_round}  {r.note}".rstrip()
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=3.0, help="seconds measured per variant and round (default: 3)")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds before each (default: 1)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; figures are their median (default: 3)")
    p.add_argument(
        "--modes",
        type=lambda t: [m for m in t.split(",") if m],
        default=list(MODES),
        help="comma-separated: libtorchrt, direct (default: both)",
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="write every round and the machine to PATH")
    args = p.parse_args(argv)
    if args.duration <= 0 or args.rounds < 1 or args.warmup < 0:
        p.error("--duration must be > 0, --rounds >= 1 and --warmup >= 0")
    if not args.modes or any(m not in MODES for m in args.modes):
        p.error(f"--modes takes {', '.join(MODES)}")
    return args


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    torch.set_num_threads(1)  # the direct rows: one thread, as a CPU instance runs
    info = machine_info()
    info["loadavg_1min_start"] = loadavg()
    print(
        f"libtorchrt freeze benchmark ({date.today()}) -- {WORKLOAD}, 1 instance, 1 intra-op thread, "
        f"concurrency 1; {info['cpu_count']} CPUs, torch {info['torch']}, {info['platform']}"
    )
    per = args.warmup + args.duration
    print(f"{len(args.modes) * len(VARIANTS)} rows x {args.rounds} rounds x {per:g} s", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="torchrt-freeze-") as tmp:
        try:
            results = run(args, Path(tmp))
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            return 130
    info["loadavg_1min_end"] = loadavg()
    print_table(results, args.rounds)
    elapsed = time.perf_counter() - started
    print(f"\nelapsed {elapsed:.0f} s; load average {info['loadavg_1min_start']} -> {info['loadavg_1min_end']}")
    if args.json is not None:
        doc = {
            "date": str(date.today()),
            "machine": info,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "results": [r.to_dict() for r in results],
            "elapsed_s": elapsed,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

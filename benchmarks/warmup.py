"""First-request latency after start, with and without warm-up, against steady state.

The cnn workload (five stride-2 convs on ``[1, 3, 224, 224]``), one instance, one
intra-op thread. For each variant a fresh pool is started (and timed); then the first
three requests are timed one by one, then 50 more give the steady-state p50. The
profiling executor compiles a TorchScript graph over its first calls, so without
warm-up the first requests pay for it; with ``WARMUP_RUNS`` the instance runs those
calls before it is READY and the first request costs what any does. Each variant is
run ``--rounds`` times (medians shown), all in one run.

Run: ``python benchmarks/warmup.py [--rounds 3] [--runs 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from libtorchrt import ModelConfig, Pool, TensorSpec
from libtorchrt.bench import workloads

SHAPE = (1, 3, 224, 224)


def one_round(path: Path, runs: int) -> dict[str, float]:
    """Start a pool (with ``runs`` warm-up runs), time its first requests and steady state."""
    cfg = ModelConfig(
        "cnn",
        path,
        inputs=[TensorSpec("INPUT__0", "float32", SHAPE)],
        parameters={"WARMUP_RUNS": str(runs)} if runs else {},
    )
    x = torch.randn(SHAPE)
    t0 = time.perf_counter()
    with Pool(models=[cfg]) as pool:
        start = time.perf_counter() - t0
        first = []
        for _ in range(3):
            t = time.perf_counter()
            pool.infer("cnn", x)
            first.append(time.perf_counter() - t)
        steady = []
        for _ in range(50):
            t = time.perf_counter()
            pool.infer("cnn", x)
            steady.append(time.perf_counter() - t)
    return {
        "start_s": start,
        "first_ms": first[0] * 1e3,
        "second_ms": first[1] * 1e3,
        "third_ms": first[2] * 1e3,
        "steady_p50_ms": statistics.median(steady) * 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="fresh pools per variant (medians shown)")
    parser.add_argument("--runs", type=int, default=3, help="WARMUP_RUNS of the warmed-up variant")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = workloads.build("cnn", tmp)
        results: dict[str, list[dict[str, float]]] = {"no warm-up": [], f"WARMUP_RUNS={args.runs}": []}
        for _ in range(args.rounds):  # interleaved, so drift in the machine hits both alike
            results["no warm-up"].append(one_round(path, 0))
            results[f"WARMUP_RUNS={args.runs}"].append(one_round(path, args.runs))
    print(f"cnn workload {list(SHAPE)}, 1 instance, 1 intra-op thread; medians of {args.rounds} fresh pools")
    print()
    print("| variant | pool start s | 1st request ms | 2nd ms | 3rd ms | steady p50 ms | 1st / steady |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, rounds in results.items():
        med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        print(
            f"| {name} | {med['start_s']:.2f} | {med['first_ms']:.1f} | {med['second_ms']:.1f} | "
            f"{med['third_ms']:.1f} | {med['steady_p50_ms']:.2f} | {med['first_ms'] / med['steady_p50_ms']:.1f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

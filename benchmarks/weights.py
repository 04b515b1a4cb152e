"""Memory of N instances of a big model: one copy of the weights, or N (issue #21).

Serves a TorchScript MLP with ~200 MB of weights (three 4096x4096 float32 layers, by
default) from 4 CPU instances, four ways, in one run:

* ``before``: how the pool ran before #21 -- fresh interpreters (``start_method="spawn"``)
  and a private copy of the weights per worker (``ENABLE_WEIGHT_SHARING: false``), with
  1 instance (the reference) and with 4;
* ``fork``: workers forked from the template, weights still private;
* ``after``: forked workers mapping one read-only copy of the weights
  (``ENABLE_WEIGHT_SHARING: true``).

For each: total PSS (``/proc/<pid>/smaps_rollup``) of the pool's processes -- every
descendant of this process: workers, and the template when there is one -- measured
after every instance answered a request; the ratio to one unshared instance; and
whether every instance's output is identical to the unshared pool's. The target of
#21: 4 instances ``after`` <= 1.3x one instance ``before``::

    python benchmarks/weights.py [--layers 3] [--width 4096] [--instances 4] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from libtorchrt import ModelConfig, Pool


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (by the parent field of /proc/<pid>/stat)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents[int(entry)] = int(fields[1])
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        out.extend(kids)
        todo.extend(kids)
    return out


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _model(layers: int, width: int, path: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    body: list[torch.nn.Module] = []
    for _ in range(layers):
        body += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    model = torch.nn.Sequential(*body).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(model).save(str(path))
    return model


def _measure(path: Path, instances: int, start_method: str, share: bool, x: torch.Tensor) -> dict[str, Any]:
    cfg = ModelConfig(
        "big",
        path,
        instances=instances,
        parameters={"ENABLE_WEIGHT_SHARING": "true" if share else "false"},
    )
    t0 = time.perf_counter()
    with Pool(models=[cfg], start_method=start_method) as pool:
        ready = time.perf_counter() - t0
        outputs = []
        # Enough requests that every instance runs the model (least-loaded routing).
        futures = [pool.submit("big", [x]) for _ in range(8 * instances)]
        outputs = [f.result()["OUTPUT__0"] for f in futures]
        time.sleep(0.5)
        pids = _descendants(os.getpid())
        pss = sum(_pss_kib(p) for p in pids)
        flags = [w.flags.get("ENABLE_WEIGHT_SHARING") for w in pool.workers()]
    return {
        "instances": instances,
        "start_method": start_method,
        "share": share,
        "ready_s": ready,
        "processes": len(pids),
        "pss_mib": pss / 1024,
        "sharing_reported": flags,
        "outputs": outputs,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--instances", type=int, default=4)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.pt"
        model = _model(args.layers, args.width, path)
        weights_mib = sum(t.nbytes for t in model.state_dict().values()) / 2**20
        x = torch.randn(2, args.width)
        with torch.no_grad():
            expected = model(x)
        n = args.instances
        runs = [
            ("before, 1 instance", _measure(path, 1, "spawn", False, x)),
            (f"before, {n} instances", _measure(path, n, "spawn", False, x)),
            (f"fork, {n} instances", _measure(path, n, "forkserver", False, x)),
            (f"after, {n} instances", _measure(path, n, "forkserver", True, x)),
        ]
    ref = runs[0][1]["pss_mib"]
    print(
        f"model: {args.layers} x Linear({args.width}, {args.width}), {weights_mib:.0f} MiB of weights; "
        f"{os.cpu_count()} CPUs"
    )
    print(f"{'':24} {'processes':>9} {'PSS MiB':>9} {'x one instance before':>22} {'ready s':>8}  identical  sharing")
    rows = []
    for label, r in runs:
        identical = all(torch.equal(o, expected) for o in r["outputs"])
        print(
            f"{label:24} {r['processes']:>9} {r['pss_mib']:>9.0f} {r['pss_mib'] / ref:>21.2f}x "
            f"{r['ready_s']:>8.2f}  {identical!s:9}  {r['sharing_reported']}"
        )
        rows.append({k: v for k, v in r.items() if k != "outputs"} | {"label": label, "identical": identical})
    after = runs[-1][1]["pss_mib"] / ref
    print(
        f"target: {n} instances after <= 1.3x one instance before: {after:.2f}x ({'met' if after <= 1.3 else 'MISSED'})"
    )
    if args.json:
        args.json.write_text(json.dumps({"weights_mib": weights_mib, "rows": rows, "ratio_after": after}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

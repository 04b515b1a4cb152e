"""Worker start-up: forked from the template (``start_method="forkserver"``) against fresh
interpreters (``"spawn"``), side by side in one run.

For the ``tiny`` workload (``libtorchrt.bench.workloads``, TorchScript), with each start
method, in alternating rounds:

* **pool start**: ``Pool()`` until it returns (every instance READY), for 1 and for 4
  instances; with forkserver also the part after the template said READY (taken from
  the library's own log records: the template's READY, each worker's READY);
* **replacement**: SIGKILL a ready worker of a 4-instance pool, then poll
  ``pool.workers()`` every 2 ms until that instance has a new pid in state ``ready``
  (``--kills`` times per round, one at a time);
* **memory**: the total PSS (``/proc/<pid>/smaps_rollup``) of the pool's processes for
  4 instances (the workers, and the template for forkserver; not the front), after each
  worker served requests.

Figures are medians over ``--rounds`` rounds; ratios are spawn / forkserver.

Run: ``python benchmarks/startup.py [--rounds 3] [--kills 5] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import loadavg, machine_info, provenance
from libtorchrt import ModelConfig, Pool
from libtorchrt.bench import workloads

METHODS = ("spawn", "forkserver")
MODEL = "tiny"
POLL_S = 0.002


class Moments(logging.Handler):
    """When the template and each worker said READY (the library's log records)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.template: list[float] = []
        self.workers: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = str(record.msg)
        if msg.startswith("template process (pid %d) ready"):
            self.template.append(record.created)
        elif msg.startswith("worker %s/%d ready"):
            self.workers.append(record.created)

    def clear(self) -> None:
        self.template.clear()
        self.workers.clear()


def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise RuntimeError(f"no Pss in /proc/{pid}/smaps_rollup")


def pool_processes(pool: Pool) -> tuple[list[int], int | None]:
    """The pool's workers, and its template process (None with spawn)."""
    template = pool._router.supervisor.template
    return [w.pid for w in pool.workers()], template.pid if template is not None else None


def start(path: Path, method: str, instances: int, moments: Moments) -> dict[str, Any]:
    """Start a pool and close it: how long until it was ready (and after the template)."""
    moments.clear()
    t0 = time.time()
    with Pool(models=[ModelConfig(MODEL, path, instances=instances)], start_method=method) as pool:
        ready = time.time()
        pool.infer(MODEL, torch.randn(1, 64))
    out = {"start_s": ready - t0}
    if moments.template and len(moments.workers) == instances:
        out["after_template_s"] = max(moments.workers) - moments.template[0]
    return out


def replace_and_measure(path: Path, method: str, kills: int) -> dict[str, Any]:
    """A 4-instance pool: PSS once each worker served; then ``kills`` replacements."""
    with Pool(models=[ModelConfig(MODEL, path, instances=4)], start_method=method) as pool:
        for _ in range(64):  # (round robin: every instance serves several)
            pool.infer(MODEL, torch.randn(1, 64))
        workers, template = pool_processes(pool)
        pss = {pid: pss_kib(pid) for pid in workers}
        template_kib = pss_kib(template) if template is not None else 0
        times = []
        for k in range(kills):
            victim = pool.workers()[k % 4]
            t0 = time.perf_counter()
            os.kill(victim.pid, signal.SIGKILL)
            deadline = t0 + 60
            while not any(
                w.instance == victim.instance and w.pid != victim.pid and w.state == "ready" for w in pool.workers()
            ):
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"instance {victim.instance} was not replaced within 60 s")
                time.sleep(POLL_S)
            times.append(time.perf_counter() - t0)
            pool.infer(MODEL, torch.randn(1, 64))
    return {
        "pss_total_mib": (sum(pss.values()) + template_kib) / 1024,
        "pss_per_worker_mib": statistics.mean(pss.values()) / 1024,
        "pss_template_mib": template_kib / 1024,
        "replace_s": times,
    }


def run(rounds: int, kills: int) -> dict[str, Any]:
    source = provenance()  # before the run: the code that runs is the code recorded
    load_start = loadavg()
    moments = Moments()
    logger = logging.getLogger("libtorchrt")
    logger.addHandler(moments)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    samples: dict[str, dict[str, list[float]]] = {m: {} for m in METHODS}
    with tempfile.TemporaryDirectory(prefix="libtorchrt-startup-") as tmp:
        path = workloads.build(MODEL, tmp)
        for r in range(rounds):
            for method in METHODS if r % 2 == 0 else reversed(METHODS):
                s = samples[method]
                for n in (1, 4):
                    got = start(path, method, n, moments)
                    s.setdefault(f"start_{n}_s", []).append(got["start_s"])
                    if "after_template_s" in got:
                        s.setdefault(f"after_template_{n}_s", []).append(got["after_template_s"])
                got = replace_and_measure(path, method, kills)
                for key in ("pss_total_mib", "pss_per_worker_mib", "pss_template_mib"):
                    s.setdefault(key, []).append(got[key])
                s.setdefault("replace_s", []).extend(got["replace_s"])
                print(f"round {r + 1}/{rounds} {method}: done", file=sys.stderr, flush=True)
    logger.removeHandler(moments)
    medians = {m: {k: statistics.median(v) for k, v in s.items()} for m, s in samples.items()}
    return {
        **source,
        "machine": machine_info(),
        "load_start": load_start,
        "load_end": loadavg(),
        "rounds": rounds,
        "kills": kills,
        "medians": medians,
        "samples": samples,
    }


ROWS = [
    ("start_1_s", "Pool() to ready, 1 instance", "s"),
    ("start_4_s", "Pool() to ready, 4 instances", "s"),
    ("after_template_1_s", "  of which after the template's READY, 1", "s"),
    ("after_template_4_s", "  of which after the template's READY, 4", "s"),
    ("replace_s", "replace a SIGKILLed worker (to ready)", "s"),
    ("pss_total_mib", "PSS of the pool's processes, 4 instances", "MiB"),
    ("pss_per_worker_mib", "  per worker", "MiB"),
    ("pss_template_mib", "  the template", "MiB"),
]


def _load(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}"


def report(result: dict[str, Any]) -> str:
    med = result["medians"]
    lines = [
        f"tiny (TorchScript), medians of {result['rounds']} rounds ({result['kills']} kills each for replacement); "
        f"load average {_load(result['load_start'])} at the start, {_load(result['load_end'])} at the end; "
        f"{os.cpu_count()} CPUs",
        f"{'':46s} {'spawn':>10s} {'forkserver':>11s} {'spawn/fork':>11s}",
    ]
    for key, label, unit in ROWS:
        a, b = med["spawn"].get(key), med["forkserver"].get(key)
        if a is None and b is None:
            continue

        def fmt(v: float | None, unit: str = unit) -> str:
            if v is None:
                return "-"
            return f"{v * 1e3:.0f} ms" if unit == "s" else f"{v:.0f} MiB"

        ratio = f"{a / b:.1f}x" if a and b else "-"
        lines.append(f"{label:46s} {fmt(a):>10s} {fmt(b):>11s} {ratio:>11s}")
    fork_replace = sorted(result["samples"]["forkserver"]["replace_s"])
    spawn_replace = sorted(result["samples"]["spawn"]["replace_s"])
    lines.append(
        f"replacement, all samples (ms): spawn {[round(x * 1e3) for x in spawn_replace]}; "
        f"forkserver {[round(x * 1e3) for x in fork_replace]}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="rounds per start method (default 3)")
    p.add_argument("--kills", type=int, default=5, help="replacements measured per round (default 5)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures as JSON")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.kills < 1:
        p.error("--rounds and --kills must be positive")
    torch.set_num_threads(1)
    result = run(args.rounds, args.kills)
    print(report(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

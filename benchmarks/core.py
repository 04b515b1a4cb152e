"""Core libtorchrt benchmark: libtorchrt vs. in-process calls vs. a hand-written pool.

Run from the repository root::

    python benchmarks/core.py                        # all workloads, ~4 min on 2 cores
    python benchmarks/core.py --quick                # duration 1 s, repeat 1 (~1.5 min)
    python benchmarks/core.py --workloads tiny,payload --duration 3 --json out.json

For every (workload, mode, instances, concurrency) row it prints requests/s and
p50/p99 latency: closed-loop caller threads, a short warm-up, then ``--repeat``
windows of ``--duration`` seconds, reporting the median over windows.

Modes:

* ``direct``     -- the TorchScript model called in this process (1 intra-op
  thread, ``torch.inference_mode``), concurrency 1: the ceiling of one instance;
* ``mp-queue``   -- a hand-written ``torch.multiprocessing`` (spawn) pool of N
  workers passing numpy arrays over queues (see ``_baselines.py``);
* ``libtorchrt`` -- ``libtorchrt.Pool`` with N instances (skipped, with a
  message, while the library cannot be imported);
* ``floor``      -- the transport floor for the 4 MiB payload (see ``_floor.py``).

A "targets" block at the end compares the rows of the same run. ``--json`` also records
the command, the commit (``git rev-parse HEAD``) and whether the tree was dirty.
"""

from __future__ import annotations

import argparse
import functools
import json
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

# ``python benchmarks/core.py``: make the ``benchmarks`` package importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import workloads
from benchmarks._baselines import MpQueuePool, direct_call
from benchmarks._floor import FLOOR_MODES, run_floor
from benchmarks._harness import Measurement, measure
from benchmarks._libtorchrt import first_output, import_libtorchrt, libtorchrt_caller
from benchmarks._proc import MALLOC_CHOICES, MALLOC_HELP, choose_malloc, stop_resource_tracker
from benchmarks._report import Row, Table, evaluate_targets, loadavg, machine_info, print_targets, provenance

MODES = ("direct", "mp-queue", "libtorchrt", "floor")
POOL_START_ESTIMATE_S = 3.0


# ------------------------------------------------------------------------ running


def _check(out: Any, ref: torch.Tensor) -> str:
    """Return "" if ``out`` matches the reference output, else a short note."""
    try:
        t = torch.as_tensor(out)
        if tuple(t.shape) != tuple(ref.shape):
            return f"OUTPUT MISMATCH: shape {tuple(t.shape)}"
        if not torch.allclose(t.float(), ref, rtol=1e-4, atol=1e-4):
            return "OUTPUT MISMATCH: values"
    except Exception as exc:  # reported in the table
        return f"OUTPUT MISMATCH: {type(exc).__name__}"
    return ""


class Runner:
    """Runs the selected rows and keeps the results."""

    def __init__(self, args: argparse.Namespace, model_dir: Path) -> None:
        self.args = args
        self.model_dir = model_dir
        self.rows: list[Row] = []
        self.table = Table()
        self.lib: ModuleType | None = None
        self.lib_error: str | None = None
        self.lib_start_error: str | None = None
        self.timing: dict[str, Any] = {
            "duration": args.duration,
            "repeat": args.repeat,
            "warmup": args.warmup,
            "warmup_calls": 20,
        }

    def add(self, row: Row) -> None:
        """Record and print a row."""
        self.rows.append(row)
        self.table.row(row)

    def run(self) -> None:
        """Run every selected workload, then the transport floor."""
        if "libtorchrt" in self.args.modes:
            self.lib, self.lib_error = import_libtorchrt()
            if self.lib is None:
                print(f"libtorchrt: not available ({self.lib_error})\n", flush=True)
        print(self.plan_text() + "\n", flush=True)
        for name in self.args.workloads:
            self.run_workload(name)
        if "floor" in self.args.modes:
            x = workloads.example_input("payload")
            for mode in FLOOR_MODES:
                self.add(Row("floor", mode, None, 1, run_floor(mode, x, **self.timing)))

    def plan_text(self) -> str:
        """Describe the plan and estimate its run time."""
        a = self.args
        per = a.warmup + a.duration * a.repeat + 0.2
        pool_modes = [m for m in ("mp-queue", "libtorchrt") if m in a.modes]
        if self.lib is None and "libtorchrt" in pool_modes:
            pool_modes.remove("libtorchrt")
        n_meas = len(a.workloads) * (("direct" in a.modes) + len(pool_modes) * len(a.instances) * len(a.concurrency))
        n_meas += len(FLOOR_MODES) if "floor" in a.modes else 0
        n_starts = len(a.workloads) * len(pool_modes) * len(a.instances) + 3 * ("floor" in a.modes)
        est = n_meas * per + n_starts * POOL_START_ESTIMATE_S + 3 * len(a.workloads)
        return (
            f"{n_meas} rows, each: {a.warmup:g} s warm-up + {a.repeat} x "
            f"{a.duration:g} s (median of {a.repeat}); estimated {est / 60:.1f} min"
        )

    def _timed(self, call: Callable[[], object], concurrency: int, **kw: Any) -> Measurement:
        return measure(call, concurrency=concurrency, **self.timing, **kw)

    def run_workload(self, name: str) -> None:
        """All rows of one workload."""
        a = self.args
        path = workloads.build(name, self.model_dir)
        x = workloads.example_input(name)
        call = direct_call(path, x)
        with torch.inference_mode():
            ref = call().clone()
        if "direct" in a.modes:
            m = self._timed(call, 1, thread_context=torch.inference_mode)
            self.add(Row(name, "direct", 1, 1, m))
        del call

        if "mp-queue" in a.modes:
            xn = x.numpy()
            for n in a.instances:
                with MpQueuePool(path, n) as pool:
                    note = _check(pool.infer(xn), ref)
                    for c in a.concurrency:
                        m = self._timed(functools.partial(pool.infer, xn), c)
                        self.add(Row(name, "mp-queue", n, c, m, note=note))

        if "libtorchrt" in a.modes and self.lib is not None:
            for n in a.instances:
                if self.lib_start_error is not None:  # don't wait for every start to fail
                    for c in a.concurrency:
                        note = f"skipped (an earlier pool failed to start: {self.lib_start_error})"
                        self.add(Row(name, "libtorchrt", n, c, status="error", note=note[:120]))
                    continue
                done: set[int] = set()
                try:
                    options = {"busy_poll_us": a.busy_poll_us} if a.busy_poll_us else {}
                    with libtorchrt_caller(self.lib, name, path, n, x, **options) as lib_call:
                        note = _check(first_output(lib_call()), ref)
                        for c in a.concurrency:
                            self.add(Row(name, "libtorchrt", n, c, self._timed(lib_call, c), note=note))
                            done.add(c)
                except Exception as exc:  # the library is work in progress
                    msg = f"error: {type(exc).__name__}: {exc}".replace("\n", " ")[:120]
                    if not done:
                        self.lib_start_error = f"{type(exc).__name__}"
                    for c in a.concurrency:
                        if c not in done:
                            self.add(Row(name, "libtorchrt", n, c, status="error", note=msg))


# --------------------------------------------------------------------------- main


def _csv(kind: Callable[[str], Any], allowed: Sequence[str] | None = None) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        items = [kind(t.strip()) for t in text.split(",") if t.strip()]
        bad = [i for i in items if allowed is not None and i not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"invalid value(s) {bad or text!r}; choose from {allowed}")
        return items

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--workloads",
        type=_csv(str, workloads.names()),
        default=workloads.names(),
        help="comma-separated workloads (default: %(default)s)",
    )
    p.add_argument(
        "--modes",
        type=_csv(str, MODES),
        default=list(MODES),
        help="comma-separated modes (default: all of %(default)s)",
    )
    p.add_argument("--instances", type=_csv(int), default=[1, 2], help="pool sizes (default: 1,2)")
    p.add_argument(
        "--concurrency",
        type=_csv(int),
        default=[1, 8],
        help="caller threads for the pools (default: 1,8)",
    )
    p.add_argument("--duration", type=float, default=2.0, help="seconds per window (default: 2)")
    p.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="windows per row; the median is reported (default: 3)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=0.5,
        help="warm-up seconds per row (default: 0.5)",
    )
    p.add_argument(
        "--busy-poll-us",
        type=int,
        default=0,
        help="Pool(busy_poll_us=...) for the libtorchrt rows (default: 0, off)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="shorthand for --duration 1 --repeat 1 --warmup 0.3",
    )
    p.add_argument("--malloc", choices=MALLOC_CHOICES, default="workers", help=MALLOC_HELP)
    p.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="write all rows and the machine to PATH",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.repeat, args.warmup = 1.0, 1, 0.3
    if args.duration <= 0 or args.repeat < 1 or args.warmup < 0:
        p.error("--duration must be > 0, --repeat >= 1 and --warmup >= 0")
    if any(n < 1 for n in args.instances + args.concurrency):
        p.error("--instances and --concurrency must be >= 1")
    return args


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    torch.set_num_threads(1)
    malloc = choose_malloc(args.malloc)
    info = machine_info()
    load = loadavg()
    info["loadavg_1min_start"] = load
    info["malloc"] = args.malloc
    source = provenance()  # before the run: the code that runs is the code recorded
    print(f"libtorchrt core benchmark -- {info['cpu_count']} CPUs, torch {info['torch']}, {info['platform']}")
    print(f"commit {source['commit']}{' (dirty tree)' if source['dirty'] else ''}")
    print(malloc)
    if load is not None and info["cpu_count"] and load > 0.25 * info["cpu_count"]:
        print(f"note: the machine is busy (1-min load average {load:.2f}); expect noisy figures")
    started = time.perf_counter()
    status = 0
    with tempfile.TemporaryDirectory(prefix="torchrt-bench-") as tmp:
        runner = Runner(args, Path(tmp))
        try:
            runner.run()
        except KeyboardInterrupt:
            print("\ninterrupted; partial results", file=sys.stderr)
            status = 130
        finally:
            stop_resource_tracker()  # reap it now rather than leave it to init
    info["loadavg_1min_end"] = loadavg()
    if runner.rows:
        print(
            f"\nreq/s, p50, p99: median over {args.repeat} window(s) of {args.duration:g} s each; "
            "spread: (max - min) / median of the windows' req/s"
        )
    targets = evaluate_targets(runner.rows)
    print_targets(targets)
    elapsed = time.perf_counter() - started
    print(f"\nelapsed {elapsed:.0f} s")
    if args.json is not None:
        doc = json_document(args, source, info, runner, targets, elapsed, complete=status == 0)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    return status


def json_document(
    args: argparse.Namespace,
    source: dict[str, Any],
    info: dict[str, Any],
    runner: Runner,
    targets: list[dict[str, Any]],
    elapsed: float,
    complete: bool,
) -> dict[str, Any]:
    """The ``--json`` document: where the figures came from (``command``, ``commit``,
    ``dirty``), the machine, the options, every row and the targets."""
    return {
        **source,
        "machine": info,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "libtorchrt": {
            "available": runner.lib is not None,
            "error": runner.lib_error,
        },
        "rows": [r.to_dict() for r in runner.rows],
        "targets": targets,
        "elapsed_s": elapsed,
        "complete": complete,
    }


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmarks whose callers behave like an application (issue #16, item 3).

The other scripts' callers send one tensor again and again and never touch a result,
which hides what an application pays: every torch call it makes releases the GIL, and
the front's router thread competes for it. Here every request sends a **fresh input**
(a clone of one of 8 prepared inputs, or a new random tensor: ``--fresh``) and every
result is **used** with a torch op (``float(y.sum())`` of each output by default;
``torch.equal`` / ``torch.allclose`` against the model's own answer computed in this
process: ``--use``). The callers are ``libtorchrt.bench``'s: its load generator
(``loadgen.py``: closed-loop threads, or tasks of one event loop) driving
``libtorchrt.bench.callers.Application``.

Scenarios (``--scenarios``), each ratio computed within this run:

* ``tiny`` -- 2 instances, 8 caller threads: ``Pool.infer`` against the hand-written
  multiprocessing-queue pool (``_baselines.MpQueuePool``, numpy arrays through queues).
  Targets: req/s >= 2x, CPU per request (this process and the workers together) <= 50%.
* ``batching`` -- tiny with dynamic batching (``max_batch_size: 32``, 500 µs), 2
  instances, 64 callers: asyncio tasks on ``Pool.infer_async`` whose results are dropped
  against the same callers using them (target >= 80%); batching against one request per
  execution, for 64 threads and for 64 asyncio tasks (target >= 3x each).
* ``cnn`` -- 2 instances, 8 caller threads against one thread calling the model in this
  process (target >= 1.6x).
* ``payload`` -- 4 MiB tensors, 2 instances, 8 caller threads against the transport
  floor (``_floor.floor_premapped``: one stream, no model, no caller work; target >= 80%,
  for callers that do what the floor does: prepared inputs, the result dropped. Two
  pairs, each side sending the same inputs: the 8 prepared sets in turn, and one input
  every time; the realistic callers' rows are printed beside them).
* ``latency`` -- tiny, 1 instance, 1 caller: p50 latency, and its distance from one
  thread calling the model in this process (``core.py``'s target: <= 200 µs).

For every row: req/s, p50/p99 latency and the CPU spent per request, by process (this
one, each worker or baseline process) and by thread group of this process (main, event
loop, callers, the router, ZeroMQ's I/O threads, the rest), read from ``/proc`` over the
measured windows (``libtorchrt.bench.cpu``)::

    python benchmarks/realistic.py [--seconds 3] [--scenarios tiny,batching,cnn,payload,latency]
                                   [--use sum|equal|allclose] [--fresh clone|random] [--rounds N]
                                   [--json PATH]

``--rounds N`` runs the scenarios N times, one after the other, and judges each target by
the median of its N ratios (each ratio still from rows measured side by side in one round),
printing its range and how many rounds passed: some rows are bimodal on a small machine
(threads caught in a GIL convoy, or not), and one round can land on either mode.

``--json`` also records the command, the commit, whether the tree was dirty, the machine
and its load average. Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import workloads
from benchmarks._baselines import MpQueuePool
from benchmarks._floor import floor_premapped
from benchmarks._proc import MALLOC_CHOICES, MALLOC_HELP, choose_malloc, stop_resource_tracker
from benchmarks._report import fmt_rps, fmt_us, loadavg, machine_info, print_targets, provenance
from benchmarks.batching import config as batching_config
from libtorchrt import ModelConfig, Pool
from libtorchrt.bench.callers import Application, Behaviour, Counts
from libtorchrt.bench.cpu import THREAD_GROUPS, CpuMeter, MeasuredSpan
from libtorchrt.bench.loadgen import MeasurementError, measure_windows
from libtorchrt.bench.stats import Window

SCENARIOS = ("tiny", "batching", "cnn", "payload", "latency")
#: prepared inputs per workload (requests take them in turn, each cloned)
SETS = 8
#: the payload scenario's pool rows: (label, whether inputs are made with Pool.empty)
_PAYLOAD_POOLS = (("libtorchrt", False), ("libtorchrt, Pool.empty", True))
#: windows per row (the row's seconds are split between them)
WINDOWS = 3
_TIMEOUT_S = 60.0


@dataclass
class Result:
    """One measured row."""

    scenario: str
    label: str
    callers: str  # "threads" | "asyncio" | "-" (the floor: one stream, no callers of ours)
    concurrency: int
    instances: int | None
    behaviour: str  # in words
    use: str  # Behaviour.use ("-" for the floor)
    req_per_s: float = math.nan
    p50_us: float = math.nan
    p99_us: float = math.nan
    spread: float = math.nan
    errors: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, Any] | None = None  # CpuUsage.per_request(), µs per request
    requests: int = 0  # answered over the span the CPU was read over
    counts: Counts | None = None  # what the callers did, over the whole row
    mean_batch: float | None = None
    note: str = ""
    round: int = 1  # (with --rounds)

    @property
    def ok(self) -> bool:
        return not math.isnan(self.req_per_s)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: a figure that could not be computed (NaN) is null."""
        d: dict[str, Any] = _no_nan(asdict(self))
        return d


def _no_nan(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    return value


def _spread(windows: Sequence[Window]) -> float:
    values = [w.rps for w in windows]
    mid = statistics.median(values) if values else 0.0
    return (max(values) - min(values)) / mid if len(values) > 1 and mid > 0 else 0.0


def _pool_counters(pool: Pool | None) -> tuple[int, int]:
    if pool is None:
        return 0, 0
    s = pool.stats()[0]
    return s.inferences, s.executions


class Runner:
    """Runs the chosen scenarios; keeps the rows."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.behaviour = Behaviour(fresh=args.fresh, use=args.use)
        self.rows: list[Result] = []
        self.round = 1
        self._paths: dict[str, Path] = {}
        self._inputs: dict[str, tuple[list[dict[str, torch.Tensor]], list[Any] | None]] = {}

    # ── what the rows need ──────────────────────────────────────────────────────

    def path(self, name: str) -> Path:
        if name not in self._paths:
            self._paths[name] = workloads.build(name, self.workdir)
        return self._paths[name]

    def inputs(self, name: str) -> tuple[list[dict[str, torch.Tensor]], list[Any] | None]:
        """The prepared input sets of a workload, and the in-process model's answers to
        them when results are checked."""
        if name not in self._inputs:
            sets = [{"INPUT__0": workloads.example_input(name, seed=1 + k)} for k in range(SETS)]
            refs = None
            if self.behaviour.use in ("equal", "allclose"):
                model = workloads.load(self.path(name))
                with torch.inference_mode():
                    refs = [{"OUTPUT__0": model(s["INPUT__0"]).clone()} for s in sets]
            self._inputs[name] = (sets, refs)
        return self._inputs[name]

    def application(
        self,
        name: str,
        behaviour: Behaviour | None = None,
        empty: Callable[[torch.Tensor], torch.Tensor] | None = None,
        sets: int = SETS,
    ) -> Application:
        """Callers of workload ``name`` taking the first ``sets`` of its input sets in turn."""
        inputs, refs = self.inputs(name)
        return Application(
            inputs[:sets], behaviour or self.behaviour, references=refs[:sets] if refs else None, empty=empty
        )

    # ── one row ───────────────────────────────────────────────────────────────

    def drive(
        self,
        scenario: str,
        label: str,
        app: Application,
        call: Callable[[], Any],
        *,
        callers: str,
        concurrency: int,
        instances: int | None,
        meter: CpuMeter,
        pool: Pool | None = None,
        thread_context: Callable[[], AbstractContextManager[object]] | None = None,
    ) -> Result:
        """Measure ``call`` and the CPU it costs over the measured windows."""
        row = Result(scenario, label, callers, concurrency, instances, app.describe(), app.behaviour.use)
        print(f"  ... {label}, {concurrency} {callers}", file=sys.stderr, flush=True)
        span = MeasuredSpan(meter, WINDOWS, lambda: (app.counts, _pool_counters(pool)))
        try:
            m = measure_windows(
                call,
                concurrency=concurrency,
                window_s=self.args.seconds / WINDOWS,
                max_windows=WINDOWS,
                stable_count=WINDOWS,
                warmup_s=self.args.warmup,
                callers=callers,
                thread_context=thread_context,
                join_timeout=_TIMEOUT_S + 5.0,
                on_start=span.on_start,
                on_window=span.on_window,
            )
        except MeasurementError as exc:
            row.note = f"error: {exc}"[:200]
            self.add(row)
            return row
        s = m.summary
        row.req_per_s, row.p50_us, row.p99_us = s.req_per_s, s.p(50), s.p(99)
        row.spread, row.errors, row.counts = _spread(m.windows), dict(m.all_errors), app.counts
        (n0, (inf0, ex0)), (n1, (inf1, ex1)) = span.extra_before, span.extra_after
        row.requests = n1.answered - n0.answered
        row.cpu = span.usage().per_request(row.requests)
        if pool is not None and ex1 > ex0:
            row.mean_batch = (inf1 - inf0) / (ex1 - ex0)
        self.add(row)
        return row

    def add(self, row: Result) -> None:
        row.round = self.round
        self.rows.append(row)

    def pool_row(
        self,
        scenario: str,
        label: str,
        pool: Pool,
        model: str,
        *,
        callers: str,
        concurrency: int,
        instances: int,
        behaviour: Behaviour | None = None,
        lent: bool = False,
        sets: int = SETS,
    ) -> Result:
        """A row of libtorchrt callers: ``Pool.infer`` (threads) or ``Pool.infer_async``
        (asyncio); ``lent``: they make their inputs in the model's request arena
        (``Pool.empty``); ``sets``: how many of the prepared input sets they take in turn."""
        empty = (lambda t: pool.empty(model, t.shape, t.dtype)) if lent else None
        app = self.application(model, behaviour, empty, sets)
        meter = CpuMeter(CpuMeter.labels([w.pid for w in pool.workers() if w.pid is not None]))
        call: Callable[[], Any]
        if callers == "asyncio":
            call = app.call_async(lambda inputs: pool.infer_async(model, inputs, timeout=_TIMEOUT_S))
        else:
            call = app.call(lambda inputs: pool.infer(model, inputs, timeout=_TIMEOUT_S))
        return self.drive(
            scenario,
            label,
            app,
            call,
            callers=callers,
            concurrency=concurrency,
            instances=instances,
            meter=meter,
            pool=pool,
        )

    def direct_row(self, scenario: str, model: str) -> Result:
        """One thread calling the model in this process (one intra-op thread)."""
        module = workloads.load(self.path(model))
        app = self.application(model)
        call = app.call(lambda inputs: module(inputs["INPUT__0"]))
        return self.drive(
            scenario,
            "direct (in-process)",
            app,
            call,
            callers="threads",
            concurrency=1,
            instances=1,
            meter=CpuMeter(),
            thread_context=torch.inference_mode,
        )

    # ── the scenarios ─────────────────────────────────────────────────────────

    def tiny(self) -> None:
        path = self.path("tiny")
        with Pool(models=[ModelConfig("tiny", path, instances=2)]) as pool:
            self.pool_row("tiny", "libtorchrt", pool, "tiny", callers="threads", concurrency=8, instances=2)
        with MpQueuePool(path, 2) as mpq:
            app = self.application("tiny")

            def send(inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
                return torch.from_numpy(mpq.infer(inputs["INPUT__0"].numpy(), timeout=_TIMEOUT_S))

            meter = CpuMeter(CpuMeter.labels(mpq.pids()))
            self.drive(
                "tiny", "mp-queue", app, app.call(send), callers="threads", concurrency=8, instances=2, meter=meter
            )

    def batching(self) -> None:
        path = self.path("tiny")
        dropped = Behaviour(fresh=self.behaviour.fresh, use="none")
        with Pool(models=[batching_config("tiny", path, False)]) as pool:
            for kind in ("threads", "asyncio"):
                self.pool_row("batching", "alone", pool, "tiny", callers=kind, concurrency=64, instances=2)
        with Pool(models=[batching_config("tiny", path, True)]) as pool:
            for kind in ("threads", "asyncio"):
                self.pool_row("batching", "batching", pool, "tiny", callers=kind, concurrency=64, instances=2)
            self.pool_row(
                "batching", "batching", pool, "tiny", callers="asyncio", concurrency=64, instances=2, behaviour=dropped
            )

    def cnn(self) -> None:
        with Pool(models=[ModelConfig("cnn", self.path("cnn"), instances=2)]) as pool:
            self.pool_row("cnn", "libtorchrt", pool, "cnn", callers="threads", concurrency=8, instances=2)
        self.direct_row("cnn", "cnn")

    def payload(self) -> None:
        # The floor's one stream sends prepared inputs and drops its results; so do the
        # rows its targets compare with, taking the same inputs: the 8 sets in turn, or
        # the first one every time (32 MiB of sources leave the cache, one 4 MiB does not:
        # each pair is compared like with like). The realistic callers' rows, beside
        # them, also copy and reduce 4 MiB each request, which the floor does not. The
        # rows "Pool.empty" make their inputs in the request arena: no copy when sent.
        like_floor = Behaviour(fresh="cycle", use="none")
        with Pool(models=[ModelConfig("payload", self.path("payload"), instances=2)]) as pool:
            rows = [(label, lent, b, SETS) for label, lent in _PAYLOAD_POOLS for b in (self.behaviour, like_floor)]
            rows.append(("libtorchrt, one input", False, like_floor, 1))
            for label, lent, behaviour, sets in rows:
                self.pool_row(
                    "payload",
                    label,
                    pool,
                    "payload",
                    callers="threads",
                    concurrency=8,
                    instances=2,
                    behaviour=behaviour,
                    lent=lent,
                    sets=sets,
                )
        inputs = [s["INPUT__0"] for s in self.inputs("payload")[0]]
        for label, sources in (("floor-premapped", inputs), ("floor-premapped, one input", inputs[:1])):
            self.floor_row(label, sources)

    def floor_row(self, label: str, sources: list[torch.Tensor]) -> None:
        """The transport floor, one stream sending ``sources`` in turn."""
        a = self.args
        print(f"  ... {label}, 1 stream", file=sys.stderr, flush=True)
        m = floor_premapped(sources, duration=a.seconds / WINDOWS, repeat=WINDOWS, warmup=a.warmup)
        made = Behaviour(fresh="cycle", use="none").describe(len(sources))
        self.add(
            Result(
                "payload",
                label,
                "-",
                1,
                None,
                made,
                "-",
                req_per_s=m.rps,
                p50_us=m.p50_us,
                p99_us=m.p99_us,
                spread=m.spread,
                note="transport only: a pre-mapped copy and a small ZeroMQ message each way (_floor.py)",
            )
        )

    def latency(self) -> None:
        with Pool(models=[ModelConfig("tiny", self.path("tiny"), instances=1)]) as pool:
            self.pool_row("latency", "libtorchrt", pool, "tiny", callers="threads", concurrency=1, instances=1)
        self.direct_row("latency", "tiny")

    def run(self) -> None:
        rounds = self.args.rounds
        for k in range(1, rounds + 1):
            self.round = k
            if rounds > 1:
                print(f"\n── round {k} of {rounds}")
            for name in self.args.scenarios:
                start = len(self.rows)
                getattr(self, name)()
                print_scenario(name, self.rows[start:], self.headline(name))

    def headline(self, name: str) -> str:
        """The title of scenario ``name``'s tables."""
        return _HEADLINES[name]

    def rounds_done(self) -> list[list[Result]]:
        """The rows of each round that ran (an interrupted run's last may be partial)."""
        return [[r for r in self.rows if r.round == k] for k in range(1, self.round + 1)]


# ── output ──────────────────────────────────────────────────────────────────


_HEADLINES = {
    "tiny": "tiny: 2 instances, 8 caller threads -- libtorchrt against a hand-written multiprocessing-queue pool",
    "batching": "batching: tiny, 2 instances, 64 callers -- dynamic batching (32, 500 µs) or one request per execution",
    "cnn": "cnn: 2 instances, 8 caller threads -- against one thread calling the model in this process",
    "payload": "payload: 4 MiB, 2 instances, 8 caller threads -- against the transport floor (one stream)",
    "latency": "latency: tiny, 1 instance, 1 caller -- against one thread calling the model in this process",
}
_CPU_COLUMNS = (("total", "total"), ("front", "front"), *((g, g.replace("_", " ")) for g in THREAD_GROUPS))


def _num(v: float | None, fmt: str = "{:.1f}") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def _callers(r: Result) -> str:
    if r.callers == "-":
        return "-"
    kind = r.callers if r.concurrency > 1 else {"threads": "thread", "asyncio": "task"}[r.callers]
    return f"{r.concurrency} {kind}"


def print_scenario(name: str, rows: Sequence[Result], headline: str | None = None) -> None:
    """The scenario's two tables: throughput and latency, then CPU per request."""
    print(f"\n{headline or _HEADLINES[name]}")
    head = f"  {'row':<28}{'callers':>12}  {'callers do':<34}{'req/s':>9}{'p50':>10}{'p99':>10}{'spread':>8}"
    print(head + f"{'batch':>7}  errors")
    for r in rows:
        callers = _callers(r)
        errors = ", ".join(f"{k} {v}" for k, v in r.errors.items()) or "0"
        print(
            f"  {r.label:<28}{callers:>12}  {r.behaviour:<34}{fmt_rps(r.req_per_s):>9}{fmt_us(r.p50_us):>10}"
            f"{fmt_us(r.p99_us):>10}{_num(100 * r.spread, '{:.0f}%'):>8}{_num(r.mean_batch):>7}  {errors}"
            + (f"  {r.note}" if r.note else "")
        )
    print("  CPU µs per request, over the windows: total = this process (front, by thread group) + the workers")
    cells = "".join(f"{title:>11}" for _, title in _CPU_COLUMNS)
    print(f"  {'row':<28}{'callers':>12}{cells}{'workers':>11}  each worker")
    for r in rows:
        callers = _callers(r)
        if r.cpu is None:
            print(f"  {r.label:<28}{callers:>12}  n/a")
            continue
        cells = "".join(f"{_num(r.cpu[key]):>11}" for key, _ in _CPU_COLUMNS)
        each = ", ".join(f"{k} {v:.1f}" for k, v in r.cpu["processes"].items()) or "-"
        print(f"  {r.label:<28}{callers:>12}{cells}{_num(r.cpu['processes_total']):>11}  {each}")
    sys.stdout.flush()


def _find(rows: Sequence[Result], scenario: str, label: str, callers: str, use: str | None = None) -> Result | None:
    for r in rows:
        if (r.scenario, r.label, r.callers) == (scenario, label, callers) and r.ok and use in (None, r.use):
            return r
    return None


def _meets(value: float, op: str, bound: float) -> bool:
    return value >= bound if op == ">=" else value <= bound


def _target(name: str, op: str, bound: float, unit: str, value: float | None, measured: str) -> dict[str, Any]:
    """A target: ``value op bound`` (``op`` ">=" or "<="), shown in ``unit`` ("x", "%", "µs")."""
    status = "n/a" if value is None else ("PASS" if _meets(value, op, bound) else "FAIL")
    return {
        "target": name,
        "measured": measured if value is not None else "n/a",
        "goal": f"{op} {_shown(bound, unit)}",
        "status": status,
        "value": value,
        "op": op,
        "bound": bound,
        "unit": unit,
    }


def _shown(value: float, unit: str) -> str:
    if unit == "%":
        return f"{100 * value:.0f}%"
    if unit == "x":
        return f"{value:.1f}x" if value == round(value, 1) else f"{value:.2f}x"
    return f"{value:.0f} µs"


def _rate_target(name: str, goal: float, a: Result | None, b: Result | None, pct: bool) -> dict[str, Any]:
    """``a.req_per_s / b.req_per_s >= goal``."""
    unit = "%" if pct else "x"
    if a is None or b is None or not b.req_per_s > 0:
        return _target(name, ">=", goal, unit, None, "")
    r = a.req_per_s / b.req_per_s
    shown = f"{100 * r:.0f}%" if pct else f"{r:.2f}x"
    return _target(name, ">=", goal, unit, r, f"{fmt_rps(a.req_per_s)} vs {fmt_rps(b.req_per_s)} = {shown}")


def combine_rounds(by_round: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The targets of several rounds as one: each judged by the median of its rounds'
    values, its measured text giving that median, the range and the rounds that passed."""
    if len(by_round) == 1:
        return list(by_round[0])
    combined = []
    for same in zip(*by_round, strict=True):
        first = same[0]
        values = [t["value"] for t in same if t["value"] is not None]
        if not values:
            combined.append({**first, "measured": "n/a", "status": "n/a", "value": None})
            continue
        mid = statistics.median(values)
        unit, op, bound = first["unit"], first["op"], first["bound"]
        passed = sum(_meets(v, op, bound) for v in values)
        measured = (
            f"median {_shown(mid, unit)} ({_shown(min(values), unit)} - {_shown(max(values), unit)}), "
            f"met in {passed} of {len(values)}"
        )
        status = "PASS" if _meets(mid, op, bound) else "FAIL"
        combined.append({**first, "measured": measured, "status": status, "value": mid, "rounds": values})
    return combined


def evaluate_targets(rows: Sequence[Result], use: str) -> list[dict[str, Any]]:
    """The ratios the acceptance of issue #16 asks for, from the rows of this run."""
    lib, mpq = _find(rows, "tiny", "libtorchrt", "threads"), _find(rows, "tiny", "mp-queue", "threads")
    cpu, cpu_text = None, ""
    if lib is not None and mpq is not None and lib.cpu is not None and mpq.cpu is not None and mpq.cpu["total"] > 0:
        cpu = lib.cpu["total"] / mpq.cpu["total"]
        cpu_text = f"{lib.cpu['total']:.0f} vs {mpq.cpu['total']:.0f} µs = {100 * cpu:.0f}%"
    near = _find(rows, "latency", "libtorchrt", "threads")
    direct = _find(rows, "latency", "direct (in-process)", "threads")
    gap, gap_text = None, ""
    if near is not None and direct is not None:
        gap = near.p50_us - direct.p50_us
        gap_text = f"{fmt_us(near.p50_us)} - {fmt_us(direct.p50_us)} = {fmt_us(gap)}"
    return [
        _rate_target("tiny 2i x 8 threads: libtorchrt vs mp-queue req/s", 2.0, lib, mpq, pct=False),
        _target("tiny 2i x 8 threads: libtorchrt vs mp-queue CPU/request", "<=", 0.5, "%", cpu, cpu_text),
        _rate_target(
            f"batching 64 asyncio: {use} vs results dropped req/s",
            0.8,
            _find(rows, "batching", "batching", "asyncio", use),
            _find(rows, "batching", "batching", "asyncio", "none"),
            pct=True,
        ),
        _rate_target(
            "batching vs alone, 64 threads req/s",
            3.0,
            _find(rows, "batching", "batching", "threads", use),
            _find(rows, "batching", "alone", "threads", use),
            pct=False,
        ),
        _rate_target(
            "batching vs alone, 64 asyncio req/s",
            3.0,
            _find(rows, "batching", "batching", "asyncio", use),
            _find(rows, "batching", "alone", "asyncio", use),
            pct=False,
        ),
        _rate_target(
            "cnn 2i x 8 threads vs direct 1 thread req/s",
            1.6,
            _find(rows, "cnn", "libtorchrt", "threads"),
            _find(rows, "cnn", "direct (in-process)", "threads"),
            pct=False,
        ),
        _rate_target(
            f"payload 2i x 8 threads vs floor-premapped, both sending {SETS} inputs in turn, results dropped: req/s",
            0.8,
            _find(rows, "payload", "libtorchrt", "threads", "none"),
            _find(rows, "payload", "floor-premapped", "-"),
            pct=True,
        ),
        _rate_target(
            "the same, both sending one input every time: req/s",
            0.8,
            _find(rows, "payload", "libtorchrt, one input", "threads", "none"),
            _find(rows, "payload", "floor-premapped, one input", "-"),
            pct=True,
        ),
        _rate_target(
            f"the same ({SETS} inputs), inputs made in the request arena (Pool.empty): req/s",
            0.8,
            _find(rows, "payload", "libtorchrt, Pool.empty", "threads", "none"),
            _find(rows, "payload", "floor-premapped", "-"),
            pct=True,
        ),
        _target("tiny 1i x 1 caller: p50 - direct p50 (core.py's)", "<=", 200.0, "µs", gap, gap_text),
    ]


# ── main ────────────────────────────────────────────────────────────────────


def _scenarios(text: str) -> list[str]:
    chosen = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in chosen if t not in SCENARIOS]
    if bad or not chosen:
        raise argparse.ArgumentTypeError(f"{bad or text!r}: choose from {', '.join(SCENARIOS)}")
    return list(dict.fromkeys(chosen))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=3.0, help="measured seconds per row, in 3 windows (default: 3)")
    p.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds per row (default: 0.5)")
    p.add_argument(
        "--scenarios",
        type=_scenarios,
        default=list(SCENARIOS),
        help=f"comma-separated (default: {','.join(SCENARIOS)})",
    )
    p.add_argument(
        "--use",
        choices=("sum", "equal", "allclose"),
        default="sum",
        help="what callers do with each result: float(y.sum()), or compare it with the model's answer "
        "computed in this process (default: sum)",
    )
    p.add_argument(
        "--fresh",
        choices=("clone", "random"),
        default="clone",
        help="each request's input: a clone of one of 8 prepared inputs, or a new random tensor (default: clone)",
    )
    p.add_argument("--malloc", choices=MALLOC_CHOICES, default="workers", help=MALLOC_HELP)
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the scenarios this many times; each target is judged by the median of its rounds (default: 1)",
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the rows, targets, machine and commit to PATH")
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.warmup < 0:
        p.error("--seconds must be > 0 and --warmup >= 0")
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.fresh == "random" and args.use != "sum":
        p.error("--use equal/allclose compares with the answers to the prepared inputs: use --fresh clone")
    return args


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _load_note(info: Mapping[str, Any]) -> str | None:
    loads = [v for v in (info.get("loadavg_1min_start"), info.get("loadavg_1min_end")) if v is not None]
    cpus = info.get("cpu_count") or 1
    if loads and max(loads) > 0.5 * cpus:
        return (
            f"note: the machine was shared with other work (1-min load average {loads[0]:.2f} at the start, "
            f"{loads[-1]:.2f} at the end, on {cpus} CPUs): wall-clock figures are noisier and slower than on an "
            "idle machine; the CPU-per-request figures much less so"
        )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    torch.set_num_threads(1)  # the direct rows: one intra-op thread, as each worker has
    malloc = choose_malloc(args.malloc)  # (the direct rows: the workers' malloc, as their thread count)
    source = provenance()  # before the run: the code that runs is the code recorded
    info = machine_info()
    info["loadavg_1min_start"] = loadavg()
    behaviour = Behaviour(fresh=args.fresh, use=args.use)
    print(
        f"libtorchrt benchmark with realistic callers -- {info['cpu_count']} CPUs ({info['cpu_model']}), "
        f"torch {info['torch']}"
    )
    print(f"commit {source['commit']}{' (dirty tree)' if source['dirty'] else ''}")
    print(f"1-min load average at the start: {info['loadavg_1min_start']}")
    info["malloc"] = args.malloc
    print(malloc)
    print(
        f"callers: {behaviour.describe()} for every request; {args.seconds:g} s per row in {WINDOWS} windows "
        f"after {args.warmup:g} s of warm-up; CPU read over the windows"
    )
    started = time.perf_counter()
    status = 0
    with tempfile.TemporaryDirectory(prefix="torchrt-realistic-") as tmp:
        runner = Runner(args, Path(tmp))
        try:
            runner.run()
        except KeyboardInterrupt:
            print("\ninterrupted; partial results", file=sys.stderr)
            status = 130
        finally:
            stop_resource_tracker()
    info["loadavg_1min_end"] = loadavg()
    by_round = [evaluate_targets(rows, args.use) for rows in runner.rounds_done()]
    if len(by_round) > 1:
        for k, round_targets in enumerate(by_round, 1):
            print_targets(round_targets, f"targets, round {k}")
    targets = combine_rounds(by_round)
    title = f"targets over {len(by_round)} rounds (each judged by its median)" if len(by_round) > 1 else "targets"
    print_targets(targets, title)
    elapsed = time.perf_counter() - started
    print(f"\n1-min load average at the end: {info['loadavg_1min_end']}")
    note = _load_note(info)
    if note is not None:
        print(note)
    print(f"elapsed {elapsed:.0f} s")
    if args.json is not None:
        doc = {
            **source,
            "machine": info,
            "config": {**vars(args), "json": str(args.json), "behaviour": asdict(behaviour), "windows": WINDOWS},
            "rows": [r.to_dict() for r in runner.rows],
            "targets": targets,
            "targets_by_round": by_round,
            "elapsed_s": elapsed,
            "complete": status == 0,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())

"""Sequence batching (issue #20): concurrent sequences of an RNN step, direct against oldest.

The model is one step of a small RNN, scripted with TorchScript: ``h' = tanh(x @ W + h @ U)``,
``y = h' @ V`` (input 16, hidden 64, output 16). ``x`` is its declared input, ``y`` its
output ``OUTPUT__0``, and ``h`` an implicit state (``SequenceState("h", "OUTPUT__1",
"float32", [64])``): the worker holding a sequence keeps ``h'`` and gives it back as
``h`` on the sequence's next request. ``max_batch_size`` is 8.

Every caller is a thread that drives one sequence of ``--steps`` requests at a time
(``sequence_start`` on the first, ``sequence_end`` on the last, then a new sequence):
each request carries a fresh input (drawn from a generator seeded with the sequence's
id) and each result is used (``float(y.sum())``). ``--sequences`` callers run at once.
They are ``libtorchrt.bench``'s load generator (``loadgen.measure_windows``: closed-loop
threads, windows, perf_analyzer's percentiles); what makes them sequences is the
per-thread driver here (:class:`Sequences`), which is all the load generator calls.

Rows, each on a fresh pool, side by side in one run:

* ``in-process`` -- the baseline: one thread running the sequences' steps on the scripted
  module itself (batch 1, one intra-op thread, as a worker has), one sequence after another;
* ``direct`` -- ``sequence_batching { direct { } }``: each instance has 8 slots (one
  sequence each), a batch is the slots with a request waiting, sent at once; with more
  sequences than slots the rest wait in the backlog until a sequence ends;
* ``oldest`` -- ``sequence_batching { oldest { max_candidate_sequences: N / instances
  max_queue_delay_microseconds: 200 } }``: an instance takes N / instances sequences and
  batches the oldest waiting request of each, up to 8, waiting up to 200 µs to fill;

for 1 and 2 instances. Per row: requests/s, p50/p99 latency, the mean batch size
(``Pool.stats()`` ``batch_sizes`` over the measured windows), the CPU per request (this
process and the workers, from ``/proc``: ``libtorchrt.bench.cpu``) and the ratio to the
baseline's requests/s.

Correctness is checked too: the last output of every sequence that ran to its end
during a row is compared with the one computed by running that sequence alone, in this
process, on the same module (``torch.allclose``, ``atol=1e-5``); a mismatch makes the
exit status 1.

Run: ``python benchmarks/sequences.py [--sequences 16] [--steps 20] [--seconds 5]
[--instances 1,2] [--strategies direct,oldest] [--json PATH]`` (under a minute with the
defaults). Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._proc import stop_resource_tracker
from benchmarks._report import fmt_rps, fmt_us, loadavg, machine_info, provenance
from libtorchrt import ModelConfig, ModelStats, Pool, SequenceBatching, SequenceState, TensorSpec
from libtorchrt.bench.cpu import CpuMeter, MeasuredSpan
from libtorchrt.bench.loadgen import MeasurementError, measure_windows
from libtorchrt.bench.stats import Window

INPUT, HIDDEN, OUTPUT = 16, 64, 16
MAX_BATCH = 8
STRATEGIES = ("direct", "oldest")
#: windows per row (the row's seconds are split between them)
WINDOWS = 3
#: the tolerance of the check against the sequence run alone
ATOL = 1e-5
_TIMEOUT_S = 60.0


class RnnStep(torch.nn.Module):
    """One step of an RNN: ``h' = tanh(x @ W + h @ U)``, ``y = h' @ V``; returns ``(y, h')``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        # Scaled so that the state neither saturates nor dies out over many steps.
        self.W = torch.nn.Parameter(torch.randn(INPUT, HIDDEN, generator=g) / INPUT**0.5, requires_grad=False)
        self.U = torch.nn.Parameter(torch.randn(HIDDEN, HIDDEN, generator=g) / HIDDEN**0.5, requires_grad=False)
        self.V = torch.nn.Parameter(torch.randn(HIDDEN, OUTPUT, generator=g) / HIDDEN**0.5, requires_grad=False)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h_new = torch.tanh(x @ self.W + h @ self.U)
        return h_new @ self.V, h_new


def build(directory: Path) -> Path:
    """Script :class:`RnnStep` and save it under ``directory``; returns the file."""
    path = directory / "rnn.pt"
    torch.jit.script(RnnStep()).save(str(path))
    return path


def config(path: Path, strategy: str, instances: int, sequences: int, delay_us: int) -> ModelConfig:
    """The RNN step served with sequence batching (see the module docstring)."""
    options: dict[str, Any] = {}
    if strategy == "oldest":
        options = {"max_candidate_sequences": max(1, sequences // instances), "max_queue_delay_microseconds": delay_us}
    return ModelConfig(
        "rnn",
        path,
        instances=instances,
        max_batch_size=MAX_BATCH,
        inputs=[TensorSpec("x", "float32", [INPUT])],
        outputs=[TensorSpec("OUTPUT__0", "float32", [OUTPUT])],
        sequence_batching=SequenceBatching(
            strategy, states=[SequenceState("h", "OUTPUT__1", "float32", [HIDDEN])], **options
        ),
    )


def step_input(generator: torch.Generator) -> torch.Tensor:
    """A sequence's next input: its generator (seeded with its id) makes them all."""
    return torch.randn(1, INPUT, generator=generator)


#: one request of a sequence: (input, sequence id, start, end) -> y
Step = Callable[[torch.Tensor, int, bool, bool], torch.Tensor]


class _Current(threading.local):
    """The sequence a caller thread is driving."""

    sid = 0
    step = 0
    generator: torch.Generator | None = None


class Sequences:
    """The per-sequence driver: each call is the next request of the calling thread's
    sequence (``loadgen`` calls it from its caller threads).

    A thread's sequence runs ``steps`` requests, then the thread starts a new one
    (ids count from 1). The last output of every sequence that ended is kept
    (:attr:`finals`) for :func:`check`. A request that fails abandons its sequence.

    Args:
        step: sends one request and returns its output ``y``.
        steps: requests per sequence.
    """

    def __init__(self, step: Step, steps: int) -> None:
        self.step = step
        self.steps = steps
        self.ids = itertools.count(1)
        self.finals: dict[int, torch.Tensor] = {}
        self._current = _Current()
        self._lock = threading.Lock()
        self._answered = 0

    @property
    def answered(self) -> int:
        """Requests answered so far."""
        with self._lock:
            return self._answered

    def __call__(self) -> None:
        cur = self._current
        if cur.generator is None:
            cur.sid = next(self.ids)  # (atomic under the GIL)
            cur.step = 0
            cur.generator = torch.Generator().manual_seed(cur.sid)
        x = step_input(cur.generator)
        end = cur.step == self.steps - 1
        try:
            y = self.step(x, cur.sid, cur.step == 0, end)
        except BaseException:
            cur.generator = None
            raise
        total = float(y.sum())  # the result is used
        if not math.isfinite(total):
            cur.generator = None
            raise ValueError(f"sequence {cur.sid}: output is not finite")
        with self._lock:
            self._answered += 1
        cur.step += 1
        if end:
            self.finals[cur.sid] = y.clone()
            cur.generator = None


def alone(module: torch.nn.Module, sid: int, steps: int) -> torch.Tensor:
    """Sequence ``sid``'s last output, computed by running it alone in this process."""
    g = torch.Generator().manual_seed(sid)
    h = torch.zeros(1, HIDDEN)
    y = torch.empty(0)
    with torch.inference_mode():
        for _ in range(steps):
            y, h = module(step_input(g), h)
    return y


@dataclass
class Check:
    """The last outputs of the sequences that ended, against each run alone."""

    sequences: int = 0
    mismatched: int = 0
    max_diff: float = 0.0
    first: int | None = None  # the first mismatched sequence's id

    @property
    def ok(self) -> bool:
        return self.sequences > 0 and self.mismatched == 0

    def describe(self) -> str:
        if not self.sequences:
            return "no sequence ended"
        if self.mismatched:
            return f"MISMATCH {self.mismatched}/{self.sequences} (seq {self.first}, max diff {self.max_diff:.2g})"
        return f"ok {self.sequences}/{self.sequences} (max diff {self.max_diff:.1g})"


def check(module: torch.nn.Module, finals: dict[int, torch.Tensor], steps: int) -> Check:
    """Compare each sequence's last output with the one it gets alone (``atol`` :data:`ATOL`)."""
    out = Check()
    for sid, y in sorted(finals.items()):
        want = alone(module, sid, steps)
        diff = float((y - want).abs().max()) if y.shape == want.shape else math.inf
        out.sequences += 1
        out.max_diff = max(out.max_diff, diff)
        if not (y.shape == want.shape and torch.allclose(y, want, rtol=0.0, atol=ATOL)):
            out.mismatched += 1
            out.first = sid if out.first is None else out.first
    return out


@dataclass
class Row:
    """One measured row."""

    label: str
    instances: int
    settings: str
    req_per_s: float = math.nan
    p50_us: float = math.nan
    p99_us: float = math.nan
    spread: float = math.nan
    mean_batch: float | None = None
    cpu: dict[str, Any] | None = None  # CpuUsage.per_request(): µs per request
    requests: int = 0  # answered over the span the CPU was read over
    errors: dict[str, int] = field(default_factory=dict)
    check: Check | None = None
    sequences: dict[str, int] = field(default_factory=dict)  # ModelStats.sequences as the last window ended
    note: str = ""

    @property
    def ok(self) -> bool:
        return not math.isnan(self.req_per_s)


def _spread(windows: Sequence[Window]) -> float:
    values = [w.rps for w in windows]
    mid = statistics.median(values) if values else 0.0
    return (max(values) - min(values)) / mid if len(values) > 1 and mid > 0 else 0.0


def _stats(pool: Pool | None) -> ModelStats | None:
    return pool.stats()[0] if pool is not None else None


def _mean_batch(before: dict[int, int], after: dict[int, int]) -> float | None:
    counts = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    executions = sum(counts.values())
    return sum(k * n for k, n in counts.items()) / executions if executions else None


def measure(
    row: Row,
    driver: Sequences,
    args: argparse.Namespace,
    *,
    concurrency: int,
    meter: CpuMeter,
    pool: Pool | None = None,
    thread_context: Callable[[], AbstractContextManager[object]] | None = None,
) -> Row:
    """Drive ``driver`` from ``concurrency`` caller threads; fill ``row`` in."""
    print(f"  ... {row.label}, {row.instances} instance(s), {concurrency} caller(s)", file=sys.stderr, flush=True)
    span = MeasuredSpan(meter, WINDOWS, lambda: (driver.answered, _stats(pool)))
    try:
        m = measure_windows(
            driver,
            concurrency=concurrency,
            window_s=args.seconds / WINDOWS,
            max_windows=WINDOWS,
            stable_count=WINDOWS,  # never stops before the last window
            warmup_s=args.warmup,
            thread_context=thread_context,
            join_timeout=_TIMEOUT_S + 5.0,
            on_start=span.on_start,
            on_window=span.on_window,
        )
    except MeasurementError as exc:
        row.note = f"error: {exc}"[:200]
        return row
    s = m.summary
    row.req_per_s, row.p50_us, row.p99_us = s.req_per_s, s.p(50), s.p(99)
    row.spread, row.errors = _spread(m.windows), dict(m.all_errors)
    (n0, s0), (n1, s1) = span.extra_before, span.extra_after
    row.requests = n1 - n0
    row.cpu = span.usage().per_request(row.requests)
    if s0 is not None and s1 is not None:
        row.mean_batch = _mean_batch(s0.batch_sizes, s1.batch_sizes)
        row.sequences = dict(s1.sequences)
    return row


def baseline_row(module: torch.jit.ScriptModule, args: argparse.Namespace) -> Row:
    """One thread running the sequences' steps on the module in this process."""
    states: dict[int, torch.Tensor] = {}

    def step(x: torch.Tensor, sid: int, start: bool, end: bool) -> torch.Tensor:
        h = torch.zeros(1, HIDDEN) if start else states[sid]
        y, h = module(x, h)
        if end:
            states.pop(sid, None)
        else:
            states[sid] = h
        return y

    row = Row("in-process", 1, "1 thread, batch 1")
    return measure(
        row, Sequences(step, args.steps), args, concurrency=1, meter=CpuMeter(), thread_context=torch.inference_mode
    )


def pool_row(
    path: Path, module: torch.jit.ScriptModule, strategy: str, instances: int, args: argparse.Namespace
) -> Row:
    """``args.sequences`` caller threads on a fresh pool; then the check."""
    cfg = config(path, strategy, instances, args.sequences, args.delay_us)
    seq = cfg.sequence_batching
    assert seq is not None
    if strategy == "direct":
        settings = f"{seq.slots(MAX_BATCH)} slots/instance, no delay"
    else:
        settings = f"{seq.max_candidate_sequences} candidates/instance, {seq.max_queue_delay_microseconds} µs"
    row = Row(strategy, instances, settings)
    with Pool(models=[cfg]) as pool:

        def step(x: torch.Tensor, sid: int, start: bool, end: bool) -> torch.Tensor:
            out = pool.infer(
                "rnn", {"x": x}, timeout=_TIMEOUT_S, sequence_id=sid, sequence_start=start, sequence_end=end
            )
            return out["OUTPUT__0"]

        driver = Sequences(step, args.steps)
        meter = CpuMeter(CpuMeter.labels([w.pid for w in pool.workers() if w.pid is not None]))
        measure(row, driver, args, concurrency=args.sequences, meter=meter, pool=pool)
    row.check = check(module, driver.finals, args.steps)
    return row


# ── output ──────────────────────────────────────────────────────────────────


def _num(v: float | None, fmt: str = "{:.1f}") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def print_rows(rows: Sequence[Row], base: Row | None) -> None:
    """The table: throughput, latency, batch, CPU per request, ratio, check."""
    head = (
        f"{'row':<11}{'inst':>4}  {'settings':<32}{'req/s':>8}{'p50':>10}{'p99':>10}{'spread':>7}{'batch':>6}"
        f"{'cpu µs/req':>11}{'front':>7}{'workers':>8}{'vs base':>8}  check"
    )
    print(head)
    print("-" * (len(head) + 24))
    for r in rows:
        cpu = r.cpu or {}
        ratio = r.req_per_s / base.req_per_s if base is not None and base.ok and r.ok and r is not base else None
        checked = "-" if r.check is None else r.check.describe()
        errors = ", ".join(f"{k} {v}" for k, v in r.errors.items())
        print(
            f"{r.label:<11}{r.instances:>4}  {r.settings:<32}{fmt_rps(r.req_per_s):>8}{fmt_us(r.p50_us):>10}"
            f"{fmt_us(r.p99_us):>10}{_num(100 * r.spread, '{:.0f}%'):>7}{_num(r.mean_batch, '{:.2f}'):>6}"
            f"{_num(cpu.get('total'), '{:.0f}'):>11}{_num(cpu.get('front'), '{:.0f}'):>7}"
            f"{_num(cpu.get('processes_total'), '{:.0f}'):>8}{_num(ratio, '{:.2f}x'):>8}  {checked}"
            + (f"  errors: {errors}" if errors else "")
            + (f"  {r.note}" if r.note else "")
        )
    print("\nsequences as the last window ended (ModelStats.sequences: now active, backlog; so far started, ...)")
    for r in rows:
        if r.sequences:
            counts = ", ".join(f"{k} {v}" for k, v in r.sequences.items())
            print(f"  {r.label} {r.instances}i: {counts}")
    if any(r.sequences.get("backlog") for r in rows):
        print(
            "  (a sequence holds its slot from its start to its end: sequences beyond the slots wait in the backlog, "
            "and that wait is in their first request's latency)"
        )
    sys.stdout.flush()


# ── main ────────────────────────────────────────────────────────────────────


def _names(text: str, allowed: Sequence[str]) -> list[str]:
    chosen = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in chosen if t not in allowed]
    if bad or not chosen:
        raise argparse.ArgumentTypeError(f"{bad or text!r}: choose from {', '.join(allowed)}")
    return list(dict.fromkeys(chosen))


def _counts(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers, e.g. 1,2") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers >= 1")
    return list(dict.fromkeys(values))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sequences", type=int, default=16, help="concurrent sequences, one caller thread each (16)")
    p.add_argument("--steps", type=int, default=20, help="requests per sequence (20)")
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per row, in 3 windows (5)")
    p.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds per row (0.5)")
    p.add_argument("--instances", type=_counts, default=[1, 2], help="instance counts (1,2)")
    p.add_argument(
        "--strategies",
        type=lambda t: _names(t, STRATEGIES),
        default=list(STRATEGIES),
        help="direct, oldest (both)",
    )
    p.add_argument("--delay-us", type=int, default=200, help="oldest's max_queue_delay_microseconds (200)")
    p.add_argument("--no-baseline", action="store_true", help="skip the in-process row")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the rows, machine and commit to PATH")
    args = p.parse_args(argv)
    if args.sequences < 1 or args.steps < 1 or args.seconds <= 0 or args.warmup < 0 or args.delay_us < 0:
        p.error("--sequences and --steps must be >= 1, --seconds > 0, --warmup and --delay-us >= 0")
    return args


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _row_dict(r: Row) -> dict[str, Any]:
    d = asdict(r)
    d["check"] = None if r.check is None else {**asdict(r.check), "ok": r.check.ok}
    return _no_nan(d)


def _no_nan(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (1: an output differed from its sequence run alone)."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    torch.set_num_threads(1)  # the in-process row: one intra-op thread, as each worker has
    source = provenance()  # before the run: the code that runs is the code recorded
    info = machine_info()
    info["loadavg_1min_start"] = loadavg()
    print(f"sequence batching: an RNN step (input {INPUT}, hidden {HIDDEN} as implicit state, output {OUTPUT})")
    print(f"{info['cpu_count']} CPUs ({info['cpu_model']}), torch {info['torch']}")
    print(f"commit {source['commit']}{' (dirty tree)' if source['dirty'] else ''}")
    print(f"1-min load average at the start: {_num(info['loadavg_1min_start'], '{:.2f}')}")
    print(
        f"{args.sequences} sequences at once (one caller thread each) of {args.steps} steps, fresh input each step, "
        f"float(y.sum()) of each result; max_batch_size {MAX_BATCH}; {args.seconds:g} s per row in {WINDOWS} windows "
        f"after {args.warmup:g} s of warm-up"
    )
    started = time.perf_counter()
    status = 0
    rows: list[Row] = []
    base: Row | None = None
    with tempfile.TemporaryDirectory(prefix="torchrt-sequences-") as tmp:
        path = build(Path(tmp))
        module = torch.jit.load(str(path)).eval()
        try:
            if not args.no_baseline:
                base = baseline_row(module, args)
                rows.append(base)
            for instances in args.instances:
                for strategy in args.strategies:
                    rows.append(pool_row(path, module, strategy, instances, args))
        except KeyboardInterrupt:
            print("\ninterrupted; partial results", file=sys.stderr)
            status = 130
        finally:
            stop_resource_tracker()
    info["loadavg_1min_end"] = loadavg()
    elapsed = time.perf_counter() - started
    print()
    print_rows(rows, base)
    checked = [r.check for r in rows if r.check is not None]
    good = all(c.ok for c in checked) and bool(checked)
    print(
        f"\nlast output of each sequence vs the sequence run alone in-process (allclose, atol {ATOL:g}): "
        f"{'all equal' if good else 'NOT all equal'} ({sum(c.sequences for c in checked)} sequences checked)"
    )
    if checked and not good and status == 0:
        status = 1
    print(f"1-min load average at the end: {_num(info['loadavg_1min_end'], '{:.2f}')}; elapsed {elapsed:.0f} s")
    if args.json is not None:
        doc = {
            **source,
            "machine": info,
            "config": {
                **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "windows": WINDOWS,
            },
            "rows": [_row_dict(r) for r in rows],
            "all_equal": good,
            "elapsed_s": elapsed,
            "complete": status != 130,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())

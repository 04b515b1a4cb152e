"""The cnn workload in every PyTorch model format, side by side, in one run (issue #17).

Runs in the bench process; the AOTInductor compilation runs in a child process of its
own (so that Inductor's compile workers do not stay in this one), and every instance is
a worker process of a :class:`libtorchrt.Pool`.

One model -- ``libtorchrt.bench.workloads.SmallCNN`` (five stride-2 3x3 convolutions on
``[1, 3, 224, 224]``), one set of seeded weights -- served as (``--formats``):

* ``torchscript``    -- ``torch.jit.script``, as the workload builder makes it;
* ``aoti``           -- an AOTInductor package: ``torch.export`` with
  ``Dim("batch", min=1, max=8)``, then ``torch._inductor.aoti_compile_and_package``
  (compiled once per run in a child process, cached in the work directory: a run
  with the same ``--workdir`` reuses it);
* ``python-compile`` -- a ``model.py`` and its state dict (``model.pt``) with
  ``TORCH_COMPILE_OPTIONAL_PARAMETERS: {}`` (``torch.compile``, Inductor's defaults);
* ``python-eager``   -- the same ``model.py`` without ``torch.compile``: the reference
  for what compiling buys.

Scenarios (``--scenarios``), every ratio computed within this run:

* ``throughput`` -- for each format, 1 and 2 instances, each request executed alone and
  with ``dynamic_batching`` (500 µs); ``max_batch_size`` 8 throughout, requests of one
  row. ``--callers`` closed-loop threads (default 4) that behave like an application
  (``libtorchrt.bench.callers.Application``, driven by ``benchmarks/realistic.py``'s
  runner on ``libtorchrt.bench``'s load generator): a fresh input per request (a clone
  of one of 8 prepared inputs), ``float(y.sum())`` of every answer. Reported: req/s,
  p50/p99 latency, requests per execution, CPU per request (this process and the
  workers, read from ``/proc`` over the measured windows), and each figure's ratio to
  TorchScript in the same configuration. Each pool warms up before it is ready (one-
  and two-row samples, so that a compiled model has compiled for both before the
  callers come), and its answer is compared with TorchScript's.
* ``startup`` -- seconds from ``Pool()`` until every instance is ready, for 1 and 4
  instances, each instance warming up once (``warmup_runs=1`` from the declared input):
  the compiled ``model.py`` with ``compile_cache=False`` (every instance compiles on
  its own), then twice with a fresh cache directory of this run (the first pool fills
  it: *cold*; the second reuses it: *warm*). The AOTInductor package the same three
  ways: its model is compiled already, but loading it compiles Inductor's CPU
  capability probes (a few small C++ files) into the same cache directory. TorchScript
  and the eager ``model.py`` (nothing to compile) beside them.

::

    python benchmarks/formats.py [--seconds 3] [--scenarios throughput,startup] [--callers 4]
                                 [--formats torchscript,aoti,python-compile,python-eager]
                                 [--workdir DIR] [--quick] [--json PATH]

``--quick`` is a smoke test (short windows, 1 instance in ``throughput``, 1 and 2 in
``startup``). ``--json`` also records the command, the commit, whether the tree was
dirty, the machine and its load average. Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import realistic, workloads
from benchmarks._proc import REPO_ROOT, child_env, stop_resource_tracker
from benchmarks._report import fmt_rps, fmt_us, loadavg, machine_info, provenance
from libtorchrt import DynamicBatching, ModelConfig, ModelWarmup, Pool, TensorSpec, WarmupInput
from libtorchrt.bench.callers import Behaviour

SCENARIOS = ("throughput", "startup")
FORMATS = ("torchscript", "aoti", "python-compile", "python-eager")
DESCRIPTIONS = {
    "torchscript": "TorchScript (torch.jit.script)",
    "aoti": "AOTInductor package (.pt2)",
    "python-compile": "model.py + torch.compile",
    "python-eager": "model.py, eager",
}
#: the formats whose workers use the pool's compile cache (start-up: off, cold, warm)
COMPILE_CACHED = ("aoti", "python-compile")
MODEL = "cnn"
#: one request's rows and the batch dimension's range (the AOTInductor package's too)
MAX_BATCH = 8
#: dynamic batching's window
DELAY_US = 500
#: one row of the cnn workload, without the batch dimension
ROW = tuple(workloads.WORKLOADS[MODEL].input_shape[1:])
INPUTS = (TensorSpec("INPUT__0", "float32", ROW),)
#: rows of the example input torch.export traces with (0 and 1 specialize)
EXAMPLE_ROWS = 2
#: an answer further than this from TorchScript's is flagged (compiled kernels round differently)
TOLERANCE = 1e-3
#: seconds a pool may take to start (4 instances compiling at once on 2 cores take minutes)
START_TIMEOUT_S = 900.0
AOTI_TIMEOUT_S = 1800.0

MODEL_PY = '''\
"""SmallCNN of libtorchrt.bench.workloads served as a Python module (benchmarks/formats.py);
its weights are model.pt beside this file."""

from libtorchrt.bench.workloads import SmallCNN

Model = SmallCNN
'''


# ── the artifacts ───────────────────────────────────────────────────────────


@dataclass
class Artifacts:
    """The model in each format, built into the work directory."""

    torchscript: Path
    python: Path  # model.py, with model.pt beside it
    aoti: Path | None = None
    #: seconds the AOTInductor compilation took (in this run, or in the run that made it)
    aoti_compile_s: float | None = None
    aoti_reused: bool = False

    def path(self, fmt: str) -> Path:
        if fmt == "torchscript":
            return self.torchscript
        if fmt == "aoti":
            assert self.aoti is not None
            return self.aoti
        return self.python

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def _weights_key(state: dict[str, torch.Tensor], max_batch: int) -> str:
    """What a cached package was compiled from: torch, the batch range, the weights."""
    h = hashlib.sha256(f"{torch.__version__} batch<={max_batch}".encode())
    for name, t in state.items():
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def build_artifacts(workdir: Path, formats: Sequence[str]) -> Artifacts:
    """Script the workload, write the ``model.py`` directory, and compile (or reuse)
    the AOTInductor package when ``aoti`` is among ``formats``. All three hold the
    TorchScript model's weights."""
    models = workdir / "models"
    ts = workloads.build(MODEL, models)
    state = {k: v.clone() for k, v in workloads.load(ts).state_dict().items()}
    python_dir = models / "cnn-python"
    python_dir.mkdir(parents=True, exist_ok=True)
    (python_dir / "model.py").write_text(MODEL_PY)
    torch.save(state, python_dir / "model.pt")
    out = Artifacts(ts, python_dir / "model.py")
    if "aoti" in formats:
        key = _weights_key(state, MAX_BATCH)
        package = models / f"cnn-aoti-{key}.pt2"
        meta = package.with_suffix(".json")
        if package.is_file() and meta.is_file():
            out.aoti, out.aoti_reused = package, True
            out.aoti_compile_s = json.loads(meta.read_text()).get("compile_s")
            print(f"AOTInductor package reused from {package}", flush=True)
        else:
            print("compiling the AOTInductor package (once per work directory) ...", flush=True)
            started = time.perf_counter()
            _compile_in_child(python_dir / "model.pt", package)
            out.aoti, out.aoti_compile_s = package, time.perf_counter() - started
            meta.write_text(json.dumps({"compile_s": out.aoti_compile_s, "torch": torch.__version__}) + "\n")
            print(f"  compiled in {out.aoti_compile_s:.1f} s: {package}", flush=True)
    return out


def _compile_in_child(state_path: Path, package: Path) -> None:
    """Run :func:`compile_aoti` in a child process (Inductor's compile workers and its
    imports stay out of the process that measures)."""
    code = "import sys; from benchmarks.formats import compile_aoti; compile_aoti(sys.argv[1], sys.argv[2])"
    done = subprocess.run(
        [sys.executable, "-c", code, str(state_path), str(package)],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=AOTI_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-20:])
        raise RuntimeError(f"the AOTInductor compilation failed (exit {done.returncode}):\n{tail}")


def compile_aoti(state_path: str, package: str) -> None:
    """Export SmallCNN with the weights at ``state_path`` and a dynamic batch dimension
    (1..:data:`MAX_BATCH`), and compile it into the AOTInductor package ``package``
    (written under a temporary name, then renamed: an interrupted compile leaves none)."""
    model = workloads.WORKLOADS[MODEL].factory().eval()
    model.load_state_dict(torch.load(state_path, weights_only=True))
    x = torch.randn(EXAMPLE_ROWS, *ROW)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    final = Path(package)
    # (the package's folders are named after its file: compiled under the final name)
    with tempfile.TemporaryDirectory(prefix="partial-", dir=final.parent) as tmp, torch.no_grad():
        program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
        partial = Path(tmp) / final.name
        torch._inductor.aoti_compile_and_package(program, package_path=str(partial))
        os.replace(partial, final)


def config(
    fmt: str, artifacts: Artifacts, instances: int, batching: bool, warmup: Sequence[ModelWarmup]
) -> ModelConfig:
    """The cnn model in format ``fmt``: ``max_batch_size`` 8, requests of one row,
    each executed alone or dynamically batched."""
    parameters = {"TORCH_COMPILE_OPTIONAL_PARAMETERS": "{}"} if fmt == "python-compile" else {}
    return ModelConfig(
        MODEL,
        artifacts.path(fmt),
        format="python" if fmt.startswith("python") else fmt,
        instances=instances,
        inputs=INPUTS,
        max_batch_size=MAX_BATCH,
        dynamic_batching=DynamicBatching(max_queue_delay_microseconds=DELAY_US) if batching else None,
        parameters=parameters,
        warmup=warmup,
    )


def _zeros_sample(name: str, rows: int, runs: int) -> ModelWarmup:
    feeds = {s.name: WarmupInput("float32", list(ROW), zero_data=True) for s in INPUTS}
    return ModelWarmup(name, rows, feeds, runs)


#: the throughput pools' warm-up: one row, then two (a torch.compile'd model compiles a
#: graph for one row, then one with a dynamic batch dimension, at the second size it sees)
THROUGHPUT_WARMUP = (_zeros_sample("one row", 1, 2), _zeros_sample("two rows", 2, 2))
#: the start-up pools' warm-up: ``warmup_runs=1`` from the declared input
STARTUP_WARMUP = (_zeros_sample("WARMUP_RUNS", 1, 1),)


# ── the rows ────────────────────────────────────────────────────────────────


@dataclass
class ThroughputRow:
    """One format, instance count and batching mode under the callers."""

    format: str
    instances: int
    batching: bool
    result: realistic.Result | None = None
    start_s: float = math.nan  # the pool's start (its warm-up included)
    max_abs_diff: float | None = None  # its answer against TorchScript's, for one input
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.result is not None and self.result.ok

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "result"}
        d["result"] = self.result.to_dict() if self.result is not None else None
        return realistic._no_nan(d)


@dataclass
class StartupRow:
    """One pool's start: ``Pool()`` until every instance is ready."""

    format: str
    instances: int
    cache: str  # "-" (nothing compiled), "off" (compile_cache=False), "cold", "warm"
    ready_s: float = math.nan
    close_s: float = math.nan
    #: CPU of the workers and of the processes they waited for, ``Pool()`` to closed
    children_cpu_s: float = math.nan
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return realistic._no_nan(asdict(self))


@dataclass
class Plan:
    """What one run measures."""

    formats: list[str]
    scenarios: list[str]
    throughput_instances: tuple[int, ...]
    startup_instances: tuple[int, ...]
    callers: int
    seconds: float
    warmup: float


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@contextmanager
def timed_pool(cfg: ModelConfig, compile_cache: bool | Path) -> Iterator[tuple[Pool, float]]:
    """A strict pool of ``cfg``, and the seconds ``Pool()`` took (every worker ready)."""
    t0 = time.perf_counter()
    pool = Pool(models=[cfg], strict=True, start_timeout=START_TIMEOUT_S, compile_cache=compile_cache)
    ready = time.perf_counter() - t0
    try:
        yield pool, ready
    finally:
        pool.close()


class Runner:
    """Runs the chosen scenarios; keeps the rows."""

    def __init__(self, plan: Plan, workdir: Path, artifacts: Artifacts) -> None:
        self.plan = plan
        self.workdir = workdir
        self.artifacts = artifacts
        ns = argparse.Namespace(seconds=plan.seconds, warmup=plan.warmup, fresh="clone", use="sum")
        #: realistic.py's runner: its Application callers, load generator and CPU meter
        self.measure = realistic.Runner(ns, workdir)
        self.throughput_rows: list[ThroughputRow] = []
        self.startup_rows: list[StartupRow] = []
        self._reference: torch.Tensor | None = None

    def reference(self) -> torch.Tensor:
        """TorchScript's answer, in this process, to the first prepared input."""
        if self._reference is None:
            sets, _ = self.measure.inputs(MODEL)
            with torch.inference_mode():
                self._reference = workloads.load(self.artifacts.torchscript)(sets[0]["INPUT__0"]).clone()
        return self._reference

    # ── throughput ────────────────────────────────────────────────────────────

    def throughput(self) -> None:
        # What Inductor compiles (the model.py's graphs, the AOTInductor loader's CPU
        # probes) is cached in the work directory: these pools do not measure compiling
        # (the start-up scenario does); only the first pool of each format pays for it.
        cache = self.workdir / "compile-cache-throughput"
        for fmt in self.plan.formats:
            for instances in self.plan.throughput_instances:
                for batching in (False, True):
                    row = ThroughputRow(fmt, instances, batching)
                    label = f"{fmt} {instances}i {'batching' if batching else 'alone'}"
                    print(f"  ... {label}: starting", file=sys.stderr, flush=True)
                    try:
                        cfg = config(fmt, self.artifacts, instances, batching, THROUGHPUT_WARMUP)
                        with timed_pool(cfg, cache) as (pool, ready):
                            row.start_s = ready
                            sets, _ = self.measure.inputs(MODEL)
                            got = pool.infer(MODEL, sets[0], timeout=realistic._TIMEOUT_S)["OUTPUT__0"]
                            row.max_abs_diff = float((got - self.reference()).abs().max())
                            if row.max_abs_diff > TOLERANCE:
                                row.note = f"answer differs from TorchScript's by {row.max_abs_diff:.2g}"
                            row.result = self.measure.pool_row(
                                "formats",
                                label,
                                pool,
                                MODEL,
                                callers="threads",
                                concurrency=self.plan.callers,
                                instances=instances,
                            )
                    except Exception as e:  # one format failing leaves the others' rows
                        row.note = f"error: {type(e).__name__}: {e}"[:300]
                    self.throughput_rows.append(row)
        print_throughput(self.plan, self.throughput_rows)

    # ── start-up ──────────────────────────────────────────────────────────────

    def startup(self) -> None:
        caches = Path(tempfile.mkdtemp(prefix="startup-caches-", dir=self.workdir))
        try:
            for fmt in self.plan.formats:
                for instances in self.plan.startup_instances:
                    if fmt in COMPILE_CACHED:
                        fresh = caches / f"{fmt}-{instances}"  # empty: this run's
                        self.start_one(fmt, instances, "off", False)
                        self.start_one(fmt, instances, "cold", fresh)
                        self.start_one(fmt, instances, "warm", fresh)
                    else:
                        self.start_one(fmt, instances, "-", False)
        finally:
            shutil.rmtree(caches, ignore_errors=True)
        print_startup(self.plan, self.startup_rows)

    def start_one(self, fmt: str, instances: int, cache: str, compile_cache: bool | Path) -> None:
        row = StartupRow(fmt, instances, cache)
        print(f"  ... start-up: {fmt}, {instances} instance(s), compile cache {cache}", file=sys.stderr, flush=True)
        cpu0 = _children_cpu_s()
        try:
            cfg = config(fmt, self.artifacts, instances, False, STARTUP_WARMUP)
            with timed_pool(cfg, compile_cache) as (pool, ready):
                row.ready_s = ready
                states = [w.state for w in pool.workers()]
                if states != ["ready"] * instances:
                    row.note = f"workers {states} after Pool()"
                closing = time.perf_counter()
            row.close_s = time.perf_counter() - closing
        except Exception as e:
            row.note = f"error: {type(e).__name__}: {e}"[:300]
        row.children_cpu_s = _children_cpu_s() - cpu0
        self.startup_rows.append(row)

    def run(self) -> None:
        for name in self.plan.scenarios:
            getattr(self, name)()


# ── output ──────────────────────────────────────────────────────────────────


def _num(v: float | None, fmt: str = "{:.1f}") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b <= 0:
        return None
    return a / b


def _table(head: Sequence[tuple[str, int]], rows: Sequence[Sequence[str]]) -> None:
    """Left-align the first column, right-align the others."""

    def line(cells: Sequence[str]) -> str:
        out = [f"{cells[0]:<{head[0][1]}}"] + [f"{c:>{w}}" for c, (_, w) in zip(cells[1:], head[1:], strict=True)]
        return "  " + " ".join(out)

    print(line([h for h, _ in head]))
    for r in rows:
        print(line(r[: len(head)]) + ("  " + r[len(head)] if len(r) > len(head) and r[len(head)] else ""))


def throughput_ratios(rows: Sequence[ThroughputRow], row: ThroughputRow) -> dict[str, float | None]:
    """``row``'s req/s, p50 and CPU per request over TorchScript's in the same configuration."""
    base = next(
        (
            r
            for r in rows
            if r.format == "torchscript" and (r.instances, r.batching) == (row.instances, row.batching) and r.ok
        ),
        None,
    )
    if base is None or not row.ok:
        return {"req_per_s": None, "p50": None, "cpu_per_request": None}
    a, b = row.result, base.result
    assert a is not None and b is not None
    return {
        "req_per_s": _ratio(a.req_per_s, b.req_per_s),
        "p50": _ratio(a.p50_us, b.p50_us),
        "cpu_per_request": _ratio(a.cpu["total"] if a.cpu else None, b.cpu["total"] if b.cpu else None),
    }


def print_throughput(plan: Plan, rows: Sequence[ThroughputRow]) -> None:
    print(
        f"\nthroughput: cnn, requests of 1 row [1, {', '.join(map(str, ROW))}], max_batch_size {MAX_BATCH}; "
        f"{plan.callers} caller threads (clone + float(sum) for every request); 'alone': each request executed "
        f"alone, 'batching': dynamic_batching ({DELAY_US} µs)"
    )
    print(
        "  CPU µs/req: this process and the workers over the measured windows; x TS: the ratio to TorchScript "
        "in the same configuration (req/s: higher is better; p50 and CPU: lower is better)"
    )
    head = [
        ("format", 16),
        ("inst", 4),
        ("mode", 8),
        ("req/s", 8),
        ("p50", 9),
        ("p99", 9),
        ("spread", 6),
        ("batch", 5),
        ("CPU µs/req", 10),
        ("workers", 8),
        ("x TS req/s", 10),
        ("x TS p50", 8),
        ("x TS CPU", 8),
        ("start s", 7),
    ]
    cells = []
    for r in rows:
        res = r.result
        q = throughput_ratios(rows, r)
        mode = "batching" if r.batching else "alone"
        if res is None:
            cells.append([r.format, str(r.instances), mode, *["n/a"] * 10, _num(r.start_s), r.note])
            continue
        notes = [r.note, res.note, ", ".join(f"{k} {v}" for k, v in res.errors.items())]
        cpu = res.cpu or {}
        cells.append(
            [
                r.format,
                str(r.instances),
                mode,
                fmt_rps(res.req_per_s),
                fmt_us(res.p50_us),
                fmt_us(res.p99_us),
                _num(100 * res.spread, "{:.0f}%"),
                _num(res.mean_batch),
                _num(cpu.get("total"), "{:.0f}"),
                _num(cpu.get("processes_total"), "{:.0f}"),
                _num(q["req_per_s"], "{:.2f}x"),
                _num(q["p50"], "{:.2f}x"),
                _num(q["cpu_per_request"], "{:.2f}x"),
                _num(r.start_s),
                "; ".join(n for n in notes if n),
            ]
        )
    _table(head, cells)
    if any(r.format == "aoti" for r in rows):
        print(
            "  aoti: export compiles Dim(min=1) for >= 2 rows (sizes 0 and 1 specialize), so the worker pads a "
            "1-row execution to 2 rows (docs/formats.md, 'Dynamic batching')"
        )
    sys.stdout.flush()


def startup_ratios(rows: Sequence[StartupRow], row: StartupRow) -> dict[str, float | None]:
    """``warm/cold`` and ``cold/off`` of a format, same instance count;
    the start against TorchScript's and against the same format's first instance count."""

    def find(fmt: str, cache: str, instances: int) -> StartupRow | None:
        return next((r for r in rows if (r.format, r.cache, r.instances) == (fmt, cache, instances)), None)

    def ready(r: StartupRow | None) -> float | None:
        return None if r is None else r.ready_s

    n, first = row.instances, min(r.instances for r in rows)
    ts = find("torchscript", "-", n)
    return {
        "warm_over_cold": _ratio(row.ready_s, ready(find(row.format, "cold", n))) if row.cache == "warm" else None,
        "cold_over_off": _ratio(row.ready_s, ready(find(row.format, "off", n))) if row.cache == "cold" else None,
        "over_torchscript": _ratio(row.ready_s, ready(ts)),
        "over_fewest_instances": _ratio(row.ready_s, ready(find(row.format, row.cache, first))) if n > first else None,
    }


def print_startup(plan: Plan, rows: Sequence[StartupRow]) -> None:
    cores = os.cpu_count()
    print(
        f"\nstart-up: seconds from Pool() until every instance is ready (each warms up once, warmup_runs=1 from "
        f"the declared input), on {cores} CPUs: instances that compile at once share them"
    )
    print(
        "  compile cache: off = compile_cache=False (each instance compiles on its own); cold = a fresh directory "
        "of this run (the pool fills it); warm = the same directory again; - = nothing compiled. aoti: the "
        "model is compiled already; loading it compiles Inductor's CPU capability probes into the cache directory"
    )
    print(
        "  CPU s: the workers and the processes they waited for (compilers), Pool() to closed; "
        "x TS: over TorchScript's start with as many instances"
    )
    fewest = min((r.instances for r in rows), default=1)
    head = [
        ("format", 16),
        ("inst", 4),
        ("cache", 5),
        ("ready s", 8),
        ("CPU s", 7),
        ("warm/cold", 9),
        ("cold/off", 8),
        ("x TS", 7),
        (f"x {fewest}i", 7),
    ]
    cells = []
    for r in rows:
        q = startup_ratios(rows, r)
        cells.append(
            [
                r.format,
                str(r.instances),
                r.cache,
                _num(r.ready_s, "{:.2f}"),
                _num(r.children_cpu_s),
                _num(q["warm_over_cold"], "{:.2f}x"),
                _num(q["cold_over_off"], "{:.2f}x"),
                _num(q["over_torchscript"], "{:.2f}x"),
                _num(q["over_fewest_instances"], "{:.2f}x"),
                r.note,
            ]
        )
    _table(head, cells)
    sys.stdout.flush()


# ── main ────────────────────────────────────────────────────────────────────


def _choices(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        chosen = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in chosen if t not in allowed]
        if bad or not chosen:
            raise argparse.ArgumentTypeError(f"{bad or text!r}: choose from {', '.join(allowed)}")
        return [a for a in allowed if a in chosen]  # in the canonical order

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, help="measured seconds per throughput row, in 3 windows (default: 3)")
    p.add_argument("--warmup", type=float, help="the callers' warm-up seconds per throughput row (default: 0.5)")
    p.add_argument("--callers", type=int, default=4, help="closed-loop caller threads (default: 4)")
    p.add_argument(
        "--scenarios",
        type=_choices(SCENARIOS),
        default=list(SCENARIOS),
        help=f"comma-separated (default: {','.join(SCENARIOS)})",
    )
    p.add_argument(
        "--formats",
        type=_choices(FORMATS),
        default=list(FORMATS),
        help=f"comma-separated (default: {','.join(FORMATS)})",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        help="keep the models here (the AOTInductor package is reused by a later run with the same directory); "
        "default: a temporary directory, removed at the end",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test: 0.6 s per row, 1 instance in throughput, 1 and 2 instances in startup",
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the rows, machine and commit to PATH")
    args = p.parse_args(argv)
    if args.seconds is None:
        args.seconds = 0.6 if args.quick else 3.0
    if args.warmup is None:
        args.warmup = 0.2 if args.quick else 0.5
    if args.seconds <= 0 or args.warmup < 0 or args.callers < 1:
        p.error("--seconds must be > 0, --warmup >= 0 and --callers >= 1")
    return args


def plan_of(args: argparse.Namespace) -> Plan:
    return Plan(
        formats=args.formats,
        scenarios=args.scenarios,
        throughput_instances=(1,) if args.quick else (1, 2),
        startup_instances=(1, 2) if args.quick else (1, 4),
        callers=args.callers,
        seconds=args.seconds,
        warmup=args.warmup,
    )


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def _workdir(given: Path | None) -> Iterator[Path]:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="torchrt-formats-") as tmp:
        yield Path(tmp)


def _load_note(info: dict[str, Any]) -> str | None:
    loads = [v for v in (info.get("loadavg_1min_start"), info.get("loadavg_1min_end")) if v is not None]
    cpus = info.get("cpu_count") or 1
    if loads and max(loads) > 0.5 * cpus:
        return (
            f"note: the machine was shared with other work (1-min load average {loads[0]:.2f} at the start, "
            f"{loads[-1]:.2f} at the end, on {cpus} CPUs): every figure is noisier and slower than on an idle machine"
        )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (1 when a row failed, 130 when interrupted)."""
    args = parse_args(argv)
    plan = plan_of(args)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    # this process's torch ops (the callers' clones and sums, the reference answer): one
    # intra-op thread, as each worker has
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    source = provenance()  # before the run: the code that runs is the code recorded
    info = machine_info()
    info["loadavg_1min_start"] = loadavg()
    print(
        f"libtorchrt model formats -- {info['cpu_count']} CPUs ({info['cpu_affinity']} usable; {info['cpu_model']}), "
        f"torch {info['torch']}"
    )
    print(f"commit {source['commit']}{' (dirty tree)' if source['dirty'] else ''}")
    print(f"1-min load average at the start: {info['loadavg_1min_start']}")
    print(f"formats: {', '.join(f'{f} = {DESCRIPTIONS[f]}' for f in plan.formats)}")
    if "throughput" in plan.scenarios:
        print(
            f"throughput: {plan.seconds:g} s per row in {realistic.WINDOWS} windows after {plan.warmup:g} s of "
            f"warm-up; instances {', '.join(map(str, plan.throughput_instances))}"
        )
    started = time.perf_counter()
    status = 0
    artifacts: Artifacts | None = None
    runner: Runner | None = None
    try:
        with _workdir(args.workdir) as workdir:
            print(f"work directory: {workdir}{' (kept)' if args.workdir else ' (removed at the end)'}", flush=True)
            artifacts = build_artifacts(workdir, plan.formats)
            runner = Runner(plan, workdir, artifacts)
            try:
                runner.run()
            finally:
                stop_resource_tracker()
    except KeyboardInterrupt:
        print("\ninterrupted; partial results", file=sys.stderr)
        status = 130
    finally:
        torch.set_num_threads(threads)
        signal.signal(signal.SIGTERM, previous)
    throughput_rows = runner.throughput_rows if runner is not None else []
    startup_rows = runner.startup_rows if runner is not None else []
    failed = [r for r in throughput_rows if not r.ok] + [r for r in startup_rows if r.note.startswith("error")]
    if failed and status == 0:
        status = 1
    info["loadavg_1min_end"] = loadavg()
    elapsed = time.perf_counter() - started
    if artifacts is not None and artifacts.aoti_compile_s is not None:
        how = "in an earlier run (reused)" if artifacts.aoti_reused else "in this run"
        print(f"\nAOTInductor compilation: {artifacts.aoti_compile_s:.1f} s, {how}")
    print(f"\n1-min load average at the end: {info['loadavg_1min_end']}")
    note = _load_note(info)
    if note is not None:
        print(note)
    if failed:
        print(f"{len(failed)} row(s) failed: see their notes")
    print(f"elapsed {elapsed:.0f} s")
    if args.json is not None:
        doc = {
            **source,
            "machine": info,
            "config": {
                **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "plan": asdict(plan),
                "max_batch_size": MAX_BATCH,
                "max_queue_delay_microseconds": DELAY_US,
                "behaviour": asdict(Behaviour()),
                "windows": realistic.WINDOWS,
            },
            "artifacts": artifacts.to_dict() if artifacts is not None else None,
            "throughput": [
                {**r.to_dict(), "vs_torchscript": throughput_ratios(throughput_rows, r)} for r in throughput_rows
            ],
            "startup": [{**r.to_dict(), "ratios": startup_ratios(startup_rows, r)} for r in startup_rows],
            "elapsed_s": elapsed,
            "complete": status == 0,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())

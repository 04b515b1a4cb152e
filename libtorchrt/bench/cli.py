"""``python -m libtorchrt.bench``: the command line (runs in the bench process).

Parses the options, resolves the model and its inputs (from a file, a repository, or
the running server that ``--endpoint`` names), plans the sweep, runs it with a live
table and progress line, and writes the ``--json`` / ``--csv`` / ``--plot`` files.
Exit status: 0 every configuration was measured; 1 some configuration could not be
measured (its row says why) or the plot failed; 2 a usage error (bad option, model or
input; an endpoint that does not answer or does not serve the model); 130 interrupted
(partial results are still written).
"""

from __future__ import annotations

import argparse
import math
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any

import libtorchrt
from libtorchrt import ConfigError
from libtorchrt.cpus import parse as parse_cpus

from . import workloads
from .callers import Behaviour
from .endpoint import Endpoint, parse_endpoint, resolve_remote
from .inputs import InputError, make_input_sets, parse_shape
from .plot import PlotError, plot
from .progress import Progress
from .remote import HTTP_CLIENTS
from .report import Row, Table, fmt_rate, fmt_us, format_parameters, machine_info, write_csv, write_json
from .serving import InputFeed
from .source import InputOptions, SourceError, Target, resolve
from .sweep import Settings, Sweep, parameter_grid, plan

__all__ = ["main", "parse_args", "parse_duration"]

PROG = "python -m libtorchrt.bench"
#: The client each kind of endpoint is measured through, in words.
_CLIENTS = {
    "stdlib": "the bench's own KServe v2 client (http.client, binary tensor data both ways)",
    "tritonclient": "tritonclient.http (binary tensor data both ways)",
    "grpc": "tritonclient.grpc (one, shared by the caller threads; raw tensor contents both ways)",
    "zmq": "libtorchrt.Client (one, shared by the caller threads)",
}
#: Options that shape the pools the tool starts: a running server's are what they are.
_POOL_OPTIONS = {
    "workload": "--workload",
    "instances": "--instances",
    "parameters": "--parameters",
    "compare": "--compare",
    "fresh_pool_per_row": "--fresh-pool-per-row",
    "front_cpus": "--front-cpus",
    "inputs_in_arena": "--inputs-in-arena",
}
#: Rough time to start a pool or load a thread server, for the plan's estimate.
_START_ESTIMATE_S = 2.5

_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


class UsageError(Exception):
    """A command-line mistake found after parsing (exit status 2)."""


def parse_duration(text: str) -> float:
    """``"10s"``, ``"500ms"``, ``"2m"``, ``"1.5"`` (seconds) → seconds.

    Raises:
        argparse.ArgumentTypeError: not a duration >= 0.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s|min|m|h)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 10s, 500ms, 2m)")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers >= 1, e.g. 1,2,4")
    return list(dict.fromkeys(values))


def _positive_int(text: str) -> int:
    values = _positive_ints(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected one integer >= 1")
    return values[0]


def _key_value(text: str, what: str, seps: str = "=") -> tuple[str, str]:
    """``NAME=VALUE`` (or ``NAME:VALUE`` when ``seps`` has ``:``, perf_analyzer's ``--shape``)."""
    cut = min((i for i in (text.find(c) for c in seps) if i >= 0), default=-1)
    if cut <= 0 or not text[:cut].strip():
        raise UsageError(f"{what} {text!r}: expected NAME{seps[0]}VALUE")
    return text[:cut].strip(), text[cut + 1 :].strip()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Measure throughput and latency of a PyTorch model (TorchScript, AOTInductor .pt2, exported "
            "program or model.py) served by libtorchrt, "
            "perf_analyzer-style, over instance counts, concurrencies, batch sizes and flags; "
            "or of a model served by a running libtorchrt-pool (--endpoint)."
        ),
        epilog="Durations take a unit: 10s, 500ms, 2m (plain numbers are seconds). See docs/bench.md.",
    )
    src = p.add_argument_group("model")
    src.add_argument(
        "model_or_repository",
        nargs="?",
        metavar="MODEL_OR_REPOSITORY",
        help="a model file (.pt, .pt2, model.py), a Triton-style model repository, or one model's directory; "
        "with --endpoint, the served model's name",
    )
    src.add_argument("--model", metavar="NAME", help="the repository's model to benchmark")
    src.add_argument(
        "--workload",
        choices=workloads.names(),
        help="a standard workload instead of a file (those of docs/benchmarks.md)",
    )

    sweep = p.add_argument_group("sweep")
    sweep.add_argument(
        "--instances",
        type=_positive_ints,
        metavar="N,N,...",
        help="instance counts (default: the configuration's, else 1)",
    )
    sweep.add_argument(
        "--concurrency",
        type=_positive_ints,
        default=[1, 4, 16],
        metavar="N,N,...",
        help="closed-loop callers, each with one request outstanding (default: 1,4,16)",
    )
    sweep.add_argument(
        "--batch-size",
        type=_positive_ints,
        metavar="B,B,...",
        help="rows per request, set in dim 0 (default: the shapes as declared)",
    )
    sweep.add_argument(
        "--parameters",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=V1[,V2]",
        help="execution-mode parameters; alternatives are compared (cartesian product over keys)",
    )
    sweep.add_argument(
        "--compare",
        choices=["threads"],
        action="append",
        default=[],
        help="also run the instances as threads of one process (Triton's way)",
    )
    sweep.add_argument(
        "--fresh-pool-per-row",
        action="store_true",
        help="start a fresh pool for every configuration, not per instance count",
    )
    sweep.add_argument(
        "--front-cpus",
        type=_front_cpus,
        metavar="N|LIST",
        help="Pool(front_cpus=): the callers (this process) on N CPUs or a CPU list such as 0,2, "
        'the workers on the others (docs/benchmarks.md, "Front CPUs")',
    )

    meas = p.add_argument_group("measurement")
    how = meas.add_mutually_exclusive_group()
    how.add_argument(
        "--duration",
        type=parse_duration,
        metavar="D",
        help="measuring time per configuration at most (windows of --window)",
    )
    how.add_argument(
        "--requests",
        type=_positive_int,
        metavar="N",
        help="measure exactly N requests per configuration instead of time windows",
    )
    meas.add_argument(
        "--window",
        type=parse_duration,
        metavar="D",
        help="measurement window (default 2s, or --duration / 3 if shorter)",
    )
    meas.add_argument(
        "--max-windows",
        type=_positive_int,
        metavar="N",
        help="windows before giving up on stability (default 10, or what --duration allows)",
    )
    meas.add_argument(
        "--stability-percentage",
        type=float,
        default=10.0,
        metavar="P",
        help="3 consecutive windows within P%% of each other are stable (default 10)",
    )
    meas.add_argument(
        "--warmup",
        type=parse_duration,
        default=0.5,
        metavar="D",
        help="warm-up before each configuration's windows (default 0.5s)",
    )
    meas.add_argument(
        "--request-timeout",
        type=parse_duration,
        default=60.0,
        metavar="D",
        help="a request not answered within D counts as a TimeoutError (default 60s)",
    )
    meas.add_argument(
        "--latency-budget",
        type=parse_duration,
        metavar="D",
        help="report the best throughput whose p99 latency is within D (e.g. 10ms)",
    )

    inp = p.add_argument_group("inputs")
    inp.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="[NAME=]D0,D1,...",
        help="the full shape of an input as sent (needed for a .pt file)",
    )
    inp.add_argument(
        "--input-dtype",
        action="append",
        default=[],
        metavar="[NAME=]DTYPE",
        help="dtype of an input (or of all: float32, int64, TYPE_FP16...; default float32)",
    )
    inp.add_argument(
        "--shape-override",
        "--shape",
        action="append",
        default=[],
        metavar="NAME=D0,D1,...",
        help="dims of a declared input (without the batch dim when max_batch_size > 0); "
        "-1 dims are sent as 1 without it (--shape NAME:D0,D1 as perf_analyzer also works)",
    )
    inp.add_argument(
        "--input-file",
        action="append",
        default=[],
        metavar="NAME=PATH.npy",
        help="send this array instead of generated data",
    )
    inp.add_argument(
        "--input-data", choices=["random", "zero"], default="random", help="generated data (default: random)"
    )
    inp.add_argument(
        "--realistic",
        action="store_true",
        help="callers behave like an application: a fresh copy of the input for every request "
        "(x.clone()), and every output reduced to a Python float (float(y.sum()))",
    )
    inp.add_argument(
        "--inputs-in-arena",
        action="store_true",
        help="the pools' callers make their inputs with Pool.empty, in the model's request arena, "
        "so that requests send them without a copy (with --realistic: each clone is made there)",
    )

    out = p.add_argument_group("output")
    out.add_argument("--json", type=Path, metavar="PATH", help="write every row, the settings and the machine")
    out.add_argument("--csv", type=Path, metavar="PATH", help="write one line per configuration")
    out.add_argument(
        "--plot",
        type=Path,
        metavar="PATH",
        help="throughput vs concurrency and latency vs throughput (needs matplotlib)",
    )
    out.add_argument("--no-progress", action="store_true", help="no progress line on stderr")

    remote = p.add_argument_group("a running server")
    remote.add_argument(
        "--endpoint",
        metavar="URL",
        help="benchmark the model served by a running libtorchrt-pool: http://HOST:PORT (KServe v2), "
        "grpc://HOST:PORT or grpcs://HOST:PORT (KServe v2 / Triton over gRPC, tritonclient.grpc) "
        "or tcp://HOST:PORT, ipc:///PATH (ZeroMQ, libtorchrt.Client)",
    )
    remote.add_argument(
        "--metadata",
        metavar="URL",
        help="with a ZeroMQ --endpoint: read the model's inputs from this HTTP address of the same server",
    )
    remote.add_argument(
        "--http-client",
        choices=HTTP_CLIENTS,
        default="stdlib",
        help="the HTTP client: the bench's own, on http.client (default), or tritonclient.http",
    )
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line (exits with status 2 on a mistake)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # `--parameters A=1 model.pt`: argparse gives the model to --parameters (it takes one
    # or more values); a last value without '=' is the positional the user meant.
    if args.model_or_repository is None and args.parameters and "=" not in args.parameters[-1]:
        args.model_or_repository = args.parameters.pop()
    if args.endpoint is not None:
        given = [flag for dest, flag in _POOL_OPTIONS.items() if getattr(args, dest) not in (None, False, [])]
        if given:
            parser.error(
                f"{', '.join(given)}: a running server's models, instances and parameters are its own; "
                "--endpoint measures them as they are"
            )
    else:
        for dest, flag in (("metadata", "--metadata"), ("http_client", "--http-client")):
            if getattr(args, dest) not in (None, "stdlib"):
                parser.error(f"{flag} applies to --endpoint")
    if args.window is not None and args.window <= 0:
        parser.error("--window must be > 0")
    if args.duration is not None and args.duration <= 0:
        parser.error("--duration must be > 0")
    if args.stability_percentage <= 0:
        parser.error("--stability-percentage must be > 0")
    if args.request_timeout <= 0:
        parser.error("--request-timeout must be > 0")
    return args


def _front_cpus(text: str) -> int | tuple[int, ...]:
    try:
        return parse_cpus(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def settings_from(args: argparse.Namespace) -> Settings:
    """Measurement settings: ``--duration`` fixes the window and the number of windows."""
    window = args.window
    max_windows = args.max_windows
    if args.duration is not None:
        if window is None:
            window = min(2.0, args.duration / 3)
        if max_windows is None:
            max_windows = max(1, math.floor(args.duration / window + 1e-9))
    return Settings(
        window_s=window if window is not None else 2.0,
        max_windows=max_windows if max_windows is not None else 10,
        warmup_s=args.warmup,
        requests=args.requests,
        threshold=args.stability_percentage / 100.0,
        request_timeout=args.request_timeout,
        fresh_per_row=args.fresh_pool_per_row,
        front_cpus=getattr(args, "front_cpus", None),
        inputs_in_arena=getattr(args, "inputs_in_arena", False),
        http_client=getattr(args, "http_client", "stdlib"),
    )


def input_options(args: argparse.Namespace) -> InputOptions:
    """The input options by name (``INPUT__0`` for an unnamed shape, ``""`` for a global dtype)."""
    options = InputOptions()
    for i, text in enumerate(args.input_shape):
        name, shape = _key_value(text, "--input-shape") if "=" in text else (f"INPUT__{i}", text)
        options.shapes[name] = parse_shape(shape)
    for text in args.input_dtype:
        name, dtype = _key_value(text, "--input-dtype") if "=" in text else ("", text)
        options.dtypes[name] = dtype
    for text in args.shape_override:
        name, shape = _key_value(text, "--shape-override", "=:")
        options.overrides[name] = parse_shape(shape)
    for text in args.input_file:
        name, path = _key_value(text, "--input-file")
        if not Path(path).is_file():
            raise UsageError(f"--input-file {text!r}: no such file")
        options.files[name] = Path(path)
    return options


def parameter_alternatives(items: Sequence[str]) -> dict[str, list[str]]:
    """``["A=true,false", "B=1"]`` → ``{"A": ["true", "false"], "B": ["1"]}``."""
    out: dict[str, list[str]] = {}
    for text in items:
        if "=" not in text:
            raise UsageError(
                f"--parameters {text!r}: expected KEY=VALUE[,VALUE...] (put MODEL_OR_REPOSITORY before --parameters)"
            )
        key, values = _key_value(text, "--parameters")
        alternatives = [v.strip() for v in values.split(",")]
        out.setdefault(key, [])
        out[key] += [v for v in alternatives if v not in out[key]]
    return out


def _check_batch(target: Target, batch_sizes: Sequence[int] | None) -> None:
    mbs = target.config.max_batch_size
    if batch_sizes and mbs > 0 and max(batch_sizes) > mbs:
        raise UsageError(f"--batch-size {max(batch_sizes)} exceeds the max_batch_size {mbs} of model {target.name!r}")


def _estimate(points: int, groups: int, s: Settings) -> str:
    if s.requests is not None:
        return f"{points} configuration(s) of {s.requests} requests each"
    low = points * (s.warmup_s + s.window_s * min(s.stable_count, s.max_windows)) + groups * _START_ESTIMATE_S
    high = points * (s.warmup_s + s.window_s * s.max_windows) + groups * _START_ESTIMATE_S
    span = f"{low / 60:.1f}" if high - low < 6 else f"{low / 60:.1f}-{high / 60:.1f}"
    return (
        f"{points} configuration(s), {groups} server start(s); windows of {s.window_s:g} s, "
        f"stable after {s.stable_count} within {100 * s.threshold:g}%, at most {s.max_windows}; "
        f"about {span} min"
    )


def best_row(rows: Sequence[Row], budget_us: float | None) -> Row | None:
    """The measured row with the highest inferences/s (within the p99 budget, if any)."""
    fit = [
        r
        for r in rows
        if r.measurement is not None
        and r.measurement.summary.requests > 0
        and (budget_us is None or r.measurement.summary.p(99) <= budget_us)
    ]
    return max(fit, key=lambda r: r.measurement.summary.infer_per_s if r.measurement else 0.0, default=None)


def _describe_best(row: Row) -> str:
    assert row.measurement is not None
    s = row.measurement.summary
    params = format_parameters(row.parameters)
    return (
        f"{row.mode}, {row.instances} instance(s), concurrency {row.concurrency}, batch {row.batch}"
        + ("" if params == "-" else f", {params}")
        + f": {fmt_rate(s.infer_per_s)} infer/s, p99 {fmt_us(s.p(99))}"
    )


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit status."""
    args = parse_args(argv)
    # SIGTERM ends the sweep like Ctrl-C: pools shut down, partial results written.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    try:
        with tempfile.TemporaryDirectory(prefix="libtorchrt-bench-") as tmp:
            return _run(args, Path(tmp), argv)
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def _target(args: argparse.Namespace, workdir: Path) -> Target:
    """The model to benchmark: a file, a repository, or the one a running server serves.

    Raises:
        UsageError, SourceError, InputError, ConfigError: it cannot be found or reached.
    """
    options = input_options(args)
    if args.endpoint is None:
        return resolve(
            args.model_or_repository, model=args.model, workload=args.workload, options=options, workdir=workdir
        )
    endpoint = parse_endpoint(args.endpoint)
    name = args.model_or_repository
    if args.model is not None and name is not None and args.model != name:
        raise UsageError(f"two model names: {name!r} and --model {args.model!r}")
    metadata: Endpoint | None = None
    if endpoint.protocol != "http" and args.http_client != "stdlib":
        raise UsageError("--http-client applies to an HTTP --endpoint")
    if args.metadata is not None:
        if endpoint.protocol != "zmq":
            raise UsageError(
                "--metadata applies to a ZeroMQ --endpoint; an HTTP or gRPC endpoint describes its models itself"
            )
        metadata = parse_endpoint(args.metadata)
        if metadata.protocol != "http":
            raise UsageError(f"--metadata {args.metadata!r}: expected the server's HTTP address, http://HOST:PORT")
    return resolve_remote(endpoint, model=args.model or name, options=options, metadata=metadata)


def _run(args: argparse.Namespace, workdir: Path, argv: Sequence[str] | None) -> int:
    started = time.monotonic()
    try:
        settings = settings_from(args)
        target = _target(args, workdir)
        _check_batch(target, args.batch_size)
        batch_sizes: list[int | None] = list(args.batch_size) if args.batch_size else [None]
        behaviour = Behaviour(fresh="clone", use="sum") if args.realistic else None
        inputs = {b: InputFeed(make_input_sets(target.inputs, b, data=args.input_data), behaviour) for b in batch_sizes}
        alternatives = parameter_alternatives(args.parameters)
        if target.endpoint is not None:
            modes = [target.endpoint.protocol]
        else:
            modes = ["processes", *(["threads"] if "threads" in args.compare else [])]
        points = plan(
            modes=modes,
            parameter_sets=parameter_grid(alternatives),
            instances=args.instances or [target.config.instances],
            batch_sizes=batch_sizes,
            concurrencies=args.concurrency,
        )
        sweep = Sweep(target, points, inputs, settings)
        sweep.check()
    except (UsageError, SourceError, InputError, ConfigError) as exc:
        return _fail(str(exc))

    machine = machine_info()
    out = sys.stdout
    print(f"libtorchrt.bench {libtorchrt.__version__}: {target.source}", file=out)
    if target.endpoint is not None:
        protocol = target.endpoint.protocol
        print(f"  client: {_CLIENTS[settings.http_client if protocol == 'http' else protocol]}", file=out)
    for spec in target.inputs:
        shapes = sorted({str(list(f.sets[0][spec.name].shape)) for f in inputs.values()})
        dtype = str(spec.dtype).removeprefix("torch.")
        sets = max(len(f) for f in inputs.values())
        origin = (
            f"from {spec.file}" if spec.file else f"{args.input_data} data" + (f", {sets} sets" if sets > 1 else "")
        )
        print(f"  input {spec.name}: {dtype} {', '.join(shapes)} ({origin})", file=out)
    if behaviour is not None:
        print(f"  callers: {behaviour.describe()} for every request (--realistic)", file=out)
    if settings.inputs_in_arena:
        print("  inputs: made with Pool.empty in the model's request arena (--inputs-in-arena)", file=out)
    for note in target.notes:
        print(f"  note: {note}", file=out)
    print(
        f"  machine: {machine['cpus_usable']} CPU(s) ({machine['cpu']}), torch {machine['torch']}, "
        f"{machine['platform']}",
        file=out,
    )
    if machine["loadavg_1min"] is not None and machine["loadavg_1min"] > 0.5 * max(machine["cpus_usable"], 1):
        print(f"  note: the machine is busy (1-min load {machine['loadavg_1min']:.2f}); expect noisy figures", file=out)
    print(f"  plan: {_estimate(len(points), sum(1 for _ in sweep.groups()), settings)}\n", file=out, flush=True)

    progress = Progress(len(points), enabled=not args.no_progress)
    table = Table(out, parameter_sets=parameter_grid(alternatives) if alternatives else ())
    sweep.progress = progress
    sweep.on_row = table.print
    status = 0
    try:
        sweep.run()
    except KeyboardInterrupt:
        progress.clear()
        print("\ninterrupted; writing partial results", file=sys.stderr)
        status = 130
    finally:
        progress.close()
    rows = sweep.rows
    elapsed = time.monotonic() - started
    if status == 0 and any(r.status != "ok" for r in rows):
        status = 1

    budget_us = args.latency_budget * 1e6 if args.latency_budget is not None else None
    best = best_row(rows, budget_us)
    print(file=out)
    if best is not None:
        within = f" (p99 within {fmt_us(budget_us)})" if budget_us is not None else ""
        print(f"best{within}: {_describe_best(best)}", file=out)
    elif budget_us is not None and rows:
        print(f"no configuration kept p99 latency within {fmt_us(budget_us)}", file=out)
    unstable = sum(1 for r in rows if r.measurement is not None and not r.measurement.stable)
    if unstable:
        print(f"{unstable} configuration(s) never became stable: their figures are the last windows", file=out)
    print(f"elapsed {elapsed:.0f} s", file=out)

    if args.json is not None:
        write_json(
            args.json, _document(args, argv, target, inputs, modes, settings, machine, rows, best, elapsed, status)
        )
        print(f"wrote {args.json}", file=out)
    if args.csv is not None:
        write_csv(args.csv, rows)
        print(f"wrote {args.csv}", file=out)
    if args.plot is not None:
        try:
            where = f" at {target.endpoint.url}, measured from" if target.endpoint is not None else " --"
            title = f"{target.name}{where} {machine['cpus_usable']} CPU(s), {machine['cpu']}"
            plot(rows, args.plot, title=title, latency_budget_us=budget_us)
            print(f"wrote {args.plot}", file=out)
        except PlotError as exc:
            print(f"{PROG}: cannot plot: {exc}", file=sys.stderr)
            status = status or 1
    return status


def _document(
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    target: Target,
    inputs: dict[int | None, InputFeed],
    modes: list[str],
    settings: Settings,
    machine: dict[str, Any],
    rows: Sequence[Row],
    best: Row | None,
    elapsed: float,
    status: int,
) -> dict[str, Any]:
    command = [PROG, *(sys.argv[1:] if argv is None else argv)]
    return {
        "tool": "libtorchrt.bench",
        "version": libtorchrt.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "machine": machine,
        "model": {
            "name": target.name,
            "source": target.source,
            "path": str(target.config.path) if args.workload is None and target.endpoint is None else None,
            "endpoint": target.endpoint.url if target.endpoint is not None else None,
            "max_batch_size": target.config.max_batch_size,
            "parameters": dict(target.config.parameters),
            "inputs": [spec.describe(b) for b in inputs for spec in target.inputs],
        },
        "settings": {
            **settings.to_dict(),
            "modes": modes,
            "instances": args.instances or [target.config.instances],
            "concurrency": args.concurrency,
            "batch_sizes": args.batch_size,
            "parameters": parameter_alternatives(args.parameters),
            "input_data": args.input_data,
            "realistic": args.realistic,
            "input_sets": {str(b): len(f) for b, f in inputs.items()},
            "latency_budget_s": args.latency_budget,
            "percentile_rule": "sorted[floor(q/100*(n-1)+0.5)] (perf_analyzer)",
        },
        "rows": [r.to_dict() for r in rows],
        "best": best.to_dict() if best is not None else None,
        "elapsed_s": elapsed,
        "complete": status in (0, 1),
        "exit_status": status,
    }

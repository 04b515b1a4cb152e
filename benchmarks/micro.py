"""Micro-figures quoted in docs/batching.md and docs/benchmarks.md, each piece timed apart.

Run from the repository root (about 45 s on 2 cores, most of it the children's start;
``--quick`` about 20 s)::

    python benchmarks/micro.py [--quick] [--parts batch-wire,request,...] [--json PATH]

Timed pieces are the best of ``--repeat`` timings of many calls each, in CPU time of the
timing thread (other jobs on a shared machine delay it but do not enter it), in this
process with one intra-op thread, as a worker has. The wake-up and the cnn calls are
wall-clock medians (waking up is what they measure); the page faults come from child
processes (four per malloc setting).
Parts:

* ``batch-wire`` -- a batch of 32 tiny requests (float32 ``[1, 64]`` each, small enough
  to travel inside the header), in the two forms the front can send: *joined* (one blob
  and one descriptor per input, what it sends now) and *listed* (each request's own
  descriptor, what it sent before). The front's side: placing the batch
  (``_batch._joined`` / ``_listed``) and ``wire.encode`` of its Request. The worker's
  side: ``wire.decode`` of that header and ``workers.batching.gather`` of the inputs;
  then the tiny model on the ``[32, 64]`` batch.
* ``request`` -- per request in the front: ``transport.tensors.write`` of one tiny input,
  the copy of its 256 bytes (``_bytes_at``'s cached ctypes array against
  ``ctypes.string_at``), and one batch member's share of ``Stats.succeeded`` for 32.
* ``wakeup`` -- the tiny TorchScript call back to back, and right after sleeps of 200 µs
  and 1 ms (the call alone is timed): what waking up costs on this machine.
* ``copy`` -- one copy of the payload workload's 4 MiB tensor (``Tensor.copy_`` and
  ``ctypes.memmove`` into a buffer already touched).
* ``faults`` -- minor page faults and time per cnn call (after 20 calls of warm-up) in
  child processes, four per setting (two with ``--quick``), one after the other: with
  glibc's defaults, and with the malloc settings a worker gets
  (``workers.process.MALLOC_ENV``); every child's figure is listed.
* ``json-size`` -- the payload's float32 ``[1, 1024, 1024]`` tensor as JSON text (one
  ``json.dumps`` of its values as Python floats, as tritonclient sends them).
* ``torch-import`` -- ``import torch`` in a fresh Python process (wall time, three
  processes one after the other): what every worker pays before it loads its model.

It reaches into private modules on purpose (it times the pieces the docs name); if one
is renamed, it fails rather than time something else. ``--json`` also records the command,
the commit and whether the tree was dirty (docs/measurements/README.md).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import workloads
from benchmarks._report import loadavg, machine_info, provenance
from libtorchrt import _batch
from libtorchrt.front.stats import Stats
from libtorchrt.transport import tensors as tensor_io
from libtorchrt.transport import wire
from libtorchrt.workers import batching as worker_batching
from libtorchrt.workers.process import MALLOC_ENV

PARTS = ("batch-wire", "request", "wakeup", "copy", "faults", "json-size", "torch-import")
INLINE_THRESHOLD = 64 << 10  # PoolOptions' default inline_threshold
BATCH = 32


def per_call_us(fn: Callable[[], object], number: int, repeat: int) -> float:
    """The best of ``repeat`` timings of ``number`` calls, in µs of this thread's CPU
    time per call: other processes on a shared machine then delay the timing but do not
    enter it (they still share the caches), and the best of several is what timeit
    advises, since disturbances only ever add time."""
    fn()  # first call outside the timing (caches, lazy imports)
    timer = timeit.Timer(fn, timer=time.thread_time)
    return min(timer.repeat(number=number, repeat=repeat)) / number * 1e6


def _no_arena(d: wire.TensorDesc) -> torch.Tensor:
    raise AssertionError(f"a tiny batch has no arena slot: {d}")


def _batch_form(
    place: Callable[[Sequence[Any]], tensor_io.Placed | None], members: list[Any], n: int, repeat: int
) -> dict[str, float]:
    """The front's and the worker's work on one batch, placed by ``place``."""
    rows = [m.rows for m in members]

    def placed() -> tensor_io.Placed:
        p = place(members)
        assert p is not None
        return p

    def front() -> bytes:
        p = placed()
        return wire.encode(wire.Request(7, p.descs, [], p.blobs, batch=rows))

    header = front()
    p = placed()
    request = wire.Request(7, p.descs, [], p.blobs, batch=rows)

    def encode() -> bytes:
        return wire.encode(request)

    def decode() -> wire.Message:
        return wire.decode(header)

    def worker() -> list[Any]:
        msg = wire.decode(header)
        assert isinstance(msg, wire.Request)
        return worker_batching.gather(msg.tensors, msg.batch, msg.blobs, [], _no_arena)

    (gathered,) = worker()
    assert torch.equal(gathered, torch.cat([m.x for m in members]))
    return {
        "front_place_us": per_call_us(placed, n, repeat),
        "front_encode_us": per_call_us(encode, n, repeat),
        "front_place_and_encode_us": per_call_us(front, n, repeat),
        "worker_decode_us": per_call_us(decode, n, repeat),
        "worker_decode_and_gather_us": per_call_us(worker, n, repeat),
    }


def batch_wire(scale: int, repeat: int, tiny: torch.jit.ScriptModule) -> dict[str, float]:
    members = []
    for _ in range(BATCH):
        x = torch.randn(1, 64)
        p = tensor_io.write([x], None, None, INLINE_THRESHOLD)
        members.append(SimpleNamespace(descs=p.descs, blobs=p.blobs, frames=p.frames, rows=1, x=x))
    out: dict[str, float] = {}
    for form, place in (("joined", _batch._joined), ("listed", _batch._listed)):
        for key, value in _batch_form(place, members, 2000 * scale, repeat).items():
            out[f"{form}_{key}"] = value
    out["listed_decode_per_descriptor_us"] = out["listed_worker_decode_us"] / BATCH
    x = torch.cat([m.x for m in members])
    with torch.inference_mode():
        out["tiny_model_batch_of_32_us"] = per_call_us(lambda: tiny(x), 1000 * scale, repeat)
    for form in ("joined", "listed"):
        work = out[f"{form}_worker_decode_and_gather_us"] + out["tiny_model_batch_of_32_us"]
        out[f"{form}_worker_decode_gather_model_us"] = work
    return out


def request(scale: int, repeat: int) -> dict[str, float]:
    x = torch.randn(1, 64)
    n = 5000 * scale
    out = {"write_tiny_input_us": per_call_us(lambda: tensor_io.write([x], None, None, INLINE_THRESHOLD), n, repeat)}
    address, nbytes = x.data_ptr(), x.nbytes
    assert tensor_io._bytes_at(address, nbytes) == ctypes.string_at(address, nbytes)
    out["copy_256_bytes_cached_array_us"] = per_call_us(lambda: tensor_io._bytes_at(address, nbytes), 4 * n, repeat)
    out["copy_256_bytes_string_at_us"] = per_call_us(lambda: ctypes.string_at(address, nbytes), 4 * n, repeat)
    stats = Stats("tiny", 1)
    now = time.perf_counter_ns()
    calls = [SimpleNamespace(submitted_ns=now - 1_000_000 + i, rows=1) for i in range(BATCH)]
    batch_us = per_call_us(lambda: stats.succeeded(calls, now - 500_000, now), n, repeat)  # type: ignore[arg-type]
    out["stats_per_batch_member_us"] = batch_us / BATCH
    return out


def wakeup(scale: int, tiny: torch.jit.ScriptModule) -> dict[str, float]:
    x = torch.randn(1, 64)
    clock = time.perf_counter_ns
    out: dict[str, float] = {}
    with torch.inference_mode():
        for _ in range(200):  # the profiling executor's first calls
            tiny(x)
        for name, pause, n in (
            ("back_to_back", 0.0, 3000),
            ("after_200us_sleep", 200e-6, 300),
            ("after_1ms_sleep", 1e-3, 200),
        ):
            times = []
            for _ in range(n * scale):
                if pause:
                    time.sleep(pause)
                t0 = clock()
                tiny(x)
                times.append(clock() - t0)
            out[f"tiny_call_{name}_us"] = statistics.median(times) / 1e3
    return out


def copy(scale: int, repeat: int) -> dict[str, float]:
    src = workloads.example_input("payload")
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch its pages
    n = 50 * scale
    return {
        "copy_4mib_tensor_copy_us": per_call_us(lambda: dst.copy_(src), n, repeat),
        "copy_4mib_memmove_us": per_call_us(
            lambda: ctypes.memmove(dst.data_ptr(), src.data_ptr(), src.nbytes), n, repeat
        ),
    }


def faults_child(path: str, calls: int) -> None:
    """In the child: page faults and time per cnn call, printed as one JSON line."""
    torch.set_num_threads(1)
    model = workloads.load(path)
    x = workloads.example_input("cnn")
    times = []
    with torch.inference_mode():
        for _ in range(20):  # warm-up: the profiling executor optimises on the second call
            model(x)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(calls):
            t0 = time.perf_counter_ns()
            model(x)
            times.append(time.perf_counter_ns() - t0)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({"minor_faults_per_call": faults / calls, "call_ms_p50": statistics.median(times) / 1e6}))


def faults(scale: int, cnn_path: Path, runs: int) -> dict[str, Any]:
    """``runs`` child processes per malloc setting, one after the other: with glibc's
    defaults a process either settles with no faults or keeps faulting, by the order of
    its early allocations (glibc raises its mmap threshold when it frees a big mapped
    block), so one child says little."""
    out: dict[str, Any] = {}
    plain = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    for name, env in (("glibc_default", plain), ("worker_malloc_env", {**plain, **MALLOC_ENV})):
        faulted, call_ms = [], []
        for _ in range(runs):
            done = subprocess.run(
                [sys.executable, __file__, "--faults-child", str(cnn_path), "--calls", str(100 * scale)],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            )
            result = json.loads(done.stdout.strip().splitlines()[-1])
            faulted.append(round(result["minor_faults_per_call"], 2))
            call_ms.append(round(result["call_ms_p50"], 3))
        out[f"cnn_minor_faults_per_call_{name}"] = faulted
        out[f"cnn_call_ms_p50_{name}"] = call_ms
    return out


def json_size() -> dict[str, float]:
    x = workloads.example_input("payload")
    text = json.dumps(x.flatten().tolist())
    return {"payload_json_text_mb": len(text.encode()) / 1e6, "payload_binary_mb": x.nbytes / 1e6}


def torch_import(runs: int) -> dict[str, Any]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], timeout=120, check=True)
        times.append(round(time.perf_counter() - t0, 3))
    return {"import_torch_s": times}


def _parts(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in PARTS]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"unknown part(s) {bad or text!r}; choose from {', '.join(PARTS)}")
    return items


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", type=_parts, default=list(PARTS), help="comma-separated (default: all)")
    p.add_argument("--repeat", type=int, default=7, help="timings per figure; the median is reported (default: 7)")
    p.add_argument("--quick", action="store_true", help="fewer calls per timing (about half the time)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the figures, machine and commit to PATH")
    p.add_argument("--faults-child", metavar="MODEL", help=argparse.SUPPRESS)
    p.add_argument("--calls", type=int, default=100, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.faults_child:
        faults_child(args.faults_child, args.calls)
        return 0
    torch.set_num_threads(1)  # as a CPU worker runs
    source = provenance()
    info = machine_info()
    info["loadavg_1min_start"] = loadavg()
    print(f"commit {source['commit']}{' (dirty tree)' if source['dirty'] else ''}, torch {info['torch']}", flush=True)
    scale = 1 if args.quick else 2
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="torchrt-micro-") as tmp:
        tiny = workloads.load(workloads.build("tiny", tmp))
        for part in args.parts:
            if part == "batch-wire":
                got = batch_wire(scale, args.repeat, tiny)
            elif part == "request":
                got = request(scale, args.repeat)
            elif part == "wakeup":
                got = wakeup(scale, tiny)
            elif part == "copy":
                got = copy(scale, args.repeat)
            elif part == "faults":
                got = faults(scale, workloads.build("cnn", tmp), 2 if args.quick else 4)
            elif part == "json-size":
                got = json_size()
            else:
                got = torch_import(3)
            print(f"\n[{part}]")
            for key, value in got.items():
                shown = ", ".join(map(str, value)) if isinstance(value, list) else f"{value:10.3f}"
                print(f"  {key:<44} {shown}")
            sys.stdout.flush()
            figures.update(got)
    info["loadavg_1min_end"] = loadavg()
    if args.json is not None:
        doc = {**source, "machine": info, "config": {**vars(args), "json": str(args.json)}, "figures": figures}
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

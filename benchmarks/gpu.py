"""GPU benchmark: process-per-instance (libtorchrt) vs threads in one process, on one GPU.

For the ``cnn`` workload (``[1, 3, 224, 224]``) and a larger conv net (``bigcnn``,
``[8, 3, 224, 224]``), with 1, 2 and 4 instances on GPU 0, this measures requests/s and
latency of:

* ``processes``: a libtorchrt ``Pool`` with ``devices="cuda:0"`` (one worker process
  per instance), fed by ``2 x instances`` caller threads;
* ``threads``: the same TorchScript file loaded once per instance into this process,
  one thread and one CUDA stream per instance, taking requests from one shared queue
  (how Triton's PyTorch backend runs instances), fed the same way;

each with CUDA inputs (the tensor is already on the GPU; outputs come back on the GPU)
and with CPU inputs (copied to the GPU per request; outputs come back to the CPU).

Run: ``python benchmarks/gpu.py [--seconds 2] [--json out.json]`` (needs CUDA). It
prints a table and the process/thread ratios, side by side from one run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import queue
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from libtorchrt import ModelConfig, Pool
from libtorchrt.bench import workloads


class BigCNN(nn.Module):
    """Four stages of two 3x3 convs (64-128-256-512 channels, stride 2 between), pool, head."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c in (64, 128, 256, 512):
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU()]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


SHAPES = {"cnn": (1, 3, 224, 224), "bigcnn": (8, 3, 224, 224)}


def build(directory: Path) -> dict[str, Path]:
    paths = {"cnn": workloads.build("cnn", directory)}
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated in this torch
        torch.jit.script(BigCNN().eval()).save(str(directory / "bigcnn.pt"))
    paths["bigcnn"] = directory / "bigcnn.pt"
    return paths


class ThreadServer:
    """``n`` module copies in this process, one thread and one CUDA stream each."""

    def __init__(self, path: Path, n: int) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self.modules = [torch.jit.load(str(path), map_location="cuda:0").eval() for _ in range(n)]
        self.queue: queue.Queue[Any] = queue.Queue()
        self.threads = [threading.Thread(target=self._serve, args=(m,), daemon=True) for m in self.modules]
        for t in self.threads:
            t.start()

    def _serve(self, module: Any) -> None:
        stream = torch.cuda.Stream()
        with torch.inference_mode(), torch.cuda.stream(stream):
            while True:
                item = self.queue.get()
                if item is None:
                    return
                x, future = item
                try:
                    on_host = not x.is_cuda
                    out = module(x.to("cuda:0", non_blocking=False) if on_host else x)
                    out = out.cpu() if on_host else out
                    stream.synchronize()
                    future.set_result(out)
                except Exception as e:
                    future.set_exception(e)

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        future: concurrent.futures.Future[torch.Tensor] = concurrent.futures.Future()
        self.queue.put((x, future))
        return future.result()

    def close(self) -> None:
        for _ in self.threads:
            self.queue.put(None)
        for t in self.threads:
            t.join()
        self.modules.clear()


def measure(call: Callable[[torch.Tensor], Any], inputs: list[torch.Tensor], seconds: float) -> dict[str, float]:
    """Each input gets a caller thread that calls back to back; warm up, then count."""
    stop = threading.Event()
    counting = threading.Event()
    latencies: list[list[float]] = [[] for _ in inputs]
    errors: list[BaseException] = []

    def caller(i: int) -> None:
        x = inputs[i]
        mine = latencies[i]
        try:
            while not stop.is_set():
                t0 = time.perf_counter()
                call(x)
                if counting.is_set():
                    mine.append(time.perf_counter() - t0)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    time.sleep(min(1.0, seconds / 2))  # warm-up: profiling executor, cuDNN autotuning
    counting.set()
    start = time.perf_counter()
    time.sleep(seconds)
    counting.clear()
    elapsed = time.perf_counter() - start
    stop.set()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    flat = sorted(v for per in latencies for v in per)
    if not flat:
        return {"rps": 0.0, "p50_ms": float("nan"), "p99_ms": float("nan")}
    return {
        "rps": len(flat) / elapsed,
        "p50_ms": statistics.median(flat) * 1e3,
        "p99_ms": flat[min(len(flat) - 1, int(0.99 * len(flat)))] * 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="measured seconds per row")
    parser.add_argument("--instances", default="1,2,4", help="instance counts to run")
    parser.add_argument("--workloads", default="cnn,bigcnn")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA device", file=sys.stderr)
        return 2
    counts = [int(c) for c in args.instances.split(",")]
    device = torch.cuda.get_device_name(0)
    print(f"device: {device}; torch {torch.__version__}; {args.seconds:.1f} s per row", flush=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = build(Path(tmp))
        for name in args.workloads.split(","):
            shape = SHAPES[name]
            for n in counts:
                callers = 2 * n
                cuda_inputs = [torch.randn(shape, device="cuda:0") for _ in range(callers)]
                cpu_inputs = [x.cpu() for x in cuda_inputs]
                cfg = ModelConfig(name, paths[name], instances=n, devices="cuda:0")
                with Pool(models=[cfg], start_timeout=300) as pool:
                    for kind, inputs in (("cuda", cuda_inputs), ("cpu", cpu_inputs)):
                        r = measure(lambda x, name=name: pool.infer(name, x), inputs, args.seconds)
                        rows.append({"workload": name, "instances": n, "mode": "processes", "inputs": kind, **r})
                        print(_row(rows[-1]), flush=True)
                server = ThreadServer(paths[name], n)
                try:
                    for kind, inputs in (("cuda", cuda_inputs), ("cpu", cpu_inputs)):
                        r = measure(server.infer, inputs, args.seconds)
                        rows.append({"workload": name, "instances": n, "mode": "threads", "inputs": kind, **r})
                        print(_row(rows[-1]), flush=True)
                finally:
                    server.close()
                    torch.cuda.empty_cache()
    print()
    print(f"## {device}: requests/s, p50 and p99 latency ({args.seconds:.0f} s per row, 2 callers per instance)")
    print()
    print("| workload | instances | inputs | processes req/s | threads req/s | processes/threads | p50 ms proc / thr |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.workloads.split(","):
        for n in counts:
            for kind in ("cuda", "cpu"):
                p = _find(rows, name, n, "processes", kind)
                t = _find(rows, name, n, "threads", kind)
                ratio = p["rps"] / t["rps"] if t["rps"] else float("nan")
                print(
                    f"| {name} | {n} | {kind} | {p['rps']:,.0f} | {t['rps']:,.0f} | {ratio:.2f}x "
                    f"| {p['p50_ms']:.2f} / {t['p50_ms']:.2f} |"
                )
    print()
    print("| workload | mode | inputs | 2 inst / 1 inst | 4 inst / 1 inst | cuda / cpu inputs (1 inst) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.workloads.split(","):
        for mode in ("processes", "threads"):
            for kind in ("cuda", "cpu"):
                base = _find(rows, name, counts[0], mode, kind)["rps"] or float("nan")
                scale = [(_find(rows, name, n, mode, kind)["rps"] / base) for n in counts[1:]]
                other = _find(rows, name, counts[0], mode, "cpu")["rps"] or float("nan")
                vs = _find(rows, name, counts[0], mode, "cuda")["rps"] / other
                print(f"| {name} | {mode} | {kind} | " + " | ".join(f"{s:.2f}x" for s in scale) + f" | {vs:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


def _find(rows: list[dict[str, Any]], name: str, n: int, mode: str, kind: str) -> dict[str, Any]:
    return next(r for r in rows if (r["workload"], r["instances"], r["mode"], r["inputs"]) == (name, n, mode, kind))


def _row(r: dict[str, Any]) -> str:
    return (
        f"{r['workload']:>7} x{r['instances']} {r['mode']:>9} {r['inputs']:>4} inputs: "
        f"{r['rps']:9,.0f} req/s  p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms"
    )


if __name__ == "__main__":
    sys.exit(main())

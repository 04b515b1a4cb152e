"""The libtorchrt demo: a model repository, a pool of 2 worker processes, a few hundred
requests from several threads, and what each worker runs with.

Run it with ``make demo`` (or ``python examples/demo.py [repository-dir]``).
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from libtorchrt import Pool

CONFIG = """\
# A Triton-style configuration: the same file works in Triton's PyTorch backend.
name: "tiny"
platform: "pytorch_libtorch"
max_batch_size: 0
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 1, 64 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 1, 10 ] } ]
instance_group [ { count: 2 kind: KIND_CPU } ]
parameters: { key: "DISABLE_OPTIMIZED_EXECUTION" value: { string_value: "false" } }
parameters: { key: "INFERENCE_MODE" value: { string_value: "true" } }
"""


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.body(x), dim=-1)


def write_repository(root: Path) -> Path:
    """Write ``<root>/tiny/config.pbtxt`` and ``<root>/tiny/1/model.pt``."""
    (root / "tiny" / "1").mkdir(parents=True, exist_ok=True)
    (root / "tiny" / "config.pbtxt").write_text(CONFIG)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # TorchScript is deprecated
        torch.jit.script(Tiny().eval()).save(str(root / "tiny" / "1" / "model.pt"))
    return root


def main() -> None:
    root = write_repository(Path(sys.argv[1] if len(sys.argv) > 1 else "demo-repository"))
    threads, per_thread = 8, 50
    print(f"model repository: {root.resolve()}")
    start = time.perf_counter()
    with Pool(root) as pool:
        print(f"pool ready in {time.perf_counter() - start:.1f} s")
        latencies: list[float] = []
        lock = threading.Lock()

        def caller(seed: int) -> None:
            g = torch.Generator().manual_seed(seed)
            mine = []
            for _ in range(per_thread):
                x = torch.randn(1, 64, generator=g)
                t0 = time.perf_counter()
                out = pool.infer("tiny", {"INPUT__0": x}, timeout=30)["OUTPUT__0"]
                mine.append(time.perf_counter() - t0)
                assert abs(out.sum().item() - 1.0) < 1e-4  # softmax rows sum to one
            with lock:
                latencies.extend(mine)

        for _ in range(20):  # warm-up: TorchScript's profiling executor optimizes after a few calls
            pool.infer("tiny", [torch.randn(1, 64)])
        t0 = time.perf_counter()
        workers = [threading.Thread(target=caller, args=(i,)) for i in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        elapsed = time.perf_counter() - t0
        n = len(latencies)
        q = statistics.quantiles(latencies, n=100)
        print(f"{n} requests from {threads} threads in {elapsed:.2f} s: {n / elapsed:,.0f} requests/s")
        print(f"latency p50 {q[49] * 1e6:,.0f} us, p99 {q[98] * 1e6:,.0f} us")
        print("workers (one process per instance):")
        for w in pool.workers():
            flags = ", ".join(f"{k}={v}" for k, v in w.flags.items())
            print(f"  {w.model}/{w.instance} pid {w.pid} {w.device} served {w.served}: {flags}")
    print("pool closed: no worker process, socket or shared memory left")


if __name__ == "__main__":
    main()

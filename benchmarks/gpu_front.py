"""What one request with CUDA inputs costs the front, call by call (needs CUDA).

Times, in this process, the host-side steps that ``Pool.submit`` and the router take
for a CUDA input and output: finding the allocation holding a tensor, asking its
stream whether it is idle, and building a zero-copy output view. Then runs the cnn
workload on one GPU instance with CUDA inputs and reports how busy each front thread
was (CPU time over wall time), to tell a front-bound path from a GPU-bound one.

Run: ``python benchmarks/gpu_front.py``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
import timeit
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from libtorchrt import ModelConfig, Pool
from libtorchrt.bench import workloads
from libtorchrt.transport.cuda import DeviceBuffer, segment_of, wrap


def per_call(label: str, fn: object, n: int = 2000) -> None:
    t = timeit.timeit(fn, number=n) / n  # type: ignore[arg-type]
    print(f"{label:<48} {t * 1e6:8.2f} us")


def _cpu_seconds(stat: str) -> float:
    with open(stat) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds of each thread of this process, and of each given process."""
    out = {}
    for t in threading.enumerate():
        try:
            out[t.name] = _cpu_seconds(f"/proc/self/task/{t.native_id}/stat")
        except OSError:
            pass
    for name, pid in pids.items():
        try:
            out[name] = _cpu_seconds(f"/proc/{pid}/stat")
        except OSError:
            pass
    return out


def load(pool: Pool, n: int) -> None:
    """2n callers for 3 s; print requests/s and the CPU use of each busy front thread
    and of each worker process."""
    inputs = [torch.randn(1, 3, 224, 224, device="cuda") for _ in range(2 * n)]
    stop = threading.Event()
    count = [0]

    def caller(t: torch.Tensor) -> None:
        while not stop.is_set():
            pool.infer("cnn", t)
            count[0] += 1

    threads = [threading.Thread(target=caller, args=(t,), name=f"caller-{i}") for i, t in enumerate(inputs)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    pids = {f"worker-{w.instance}": w.pid for w in pool.workers()}
    c0, before, w0 = count[0], thread_cpu(pids), time.perf_counter()
    time.sleep(3.0)
    c1, after, w1 = count[0], thread_cpu(pids), time.perf_counter()
    stop.set()
    for t in threads:
        t.join()
    wall = w1 - w0
    busy = {k: (after[k] - before.get(k, 0.0)) / wall for k in after}
    print(f"cnn x{n} cuda inputs: {(c1 - c0) / wall:,.0f} req/s; thread CPU use:", end=" ")
    print(", ".join(f"{k} {v:.0%}" for k, v in sorted(busy.items()) if v > 0.02))


def main() -> int:
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    x = torch.randn(1, 3, 224, 224, device="cuda")
    buf = DeviceBuffer(0, 1 << 20)
    stream = torch.cuda.current_stream()
    per_call("segment_of(tensor)", lambda: segment_of(x.data_ptr(), 0))
    per_call("current_stream().query()", lambda: torch.cuda.current_stream(x.device).query())
    per_call("stream.query() (held)", stream.query)
    per_call("wrap(): zero-copy output view", lambda: wrap(buf.address, 40, torch.float32, (1, 10), 0))
    per_call("torch.cuda.Event() + record()", lambda: torch.cuda.Event().record(stream))
    buf.close()
    with tempfile.TemporaryDirectory() as tmp:
        path = workloads.build("cnn", tmp)
        for n in (1, 4):
            with Pool(models=[ModelConfig("cnn", path, instances=n, devices="cuda:0")]) as pool:
                load(pool, n)
    return 0


if __name__ == "__main__":
    sys.exit(main())

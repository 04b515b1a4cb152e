"""Drive the tiny model with realistic callers for a profiler to watch (Linux).

    python benchmarks/profile_tiny.py CALLERS SECONDS INSTANCES

prints the front's and the workers' pids first, so that ``py-spy record -p PID`` can
attach (docs/measurements/front-profile.md), then the requests/s. Each caller thread
sends a fresh clone of its input and reduces every output with ``float(y.sum())``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time

import torch

from libtorchrt import ModelConfig, Pool
from libtorchrt.bench import workloads


def main(argv: list[str]) -> None:
    callers, seconds, instances = int(argv[0]), float(argv[1]), int(argv[2])
    path = workloads.build("tiny", tempfile.mkdtemp())
    x = torch.randn(1, 64)
    with Pool(models=[ModelConfig("tiny", path, instances=instances)]) as pool:
        print("pids", os.getpid(), [w.pid for w in pool.workers()], flush=True)
        stop = time.monotonic() + seconds
        count = [0] * callers

        def run(i: int) -> None:
            n = 0
            while time.monotonic() < stop:
                for y in pool.infer("tiny", x.clone()).values():
                    float(y.sum())
                n += 1
            count[i] = n

        threads = [threading.Thread(target=run, args=(i,)) for i in range(callers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print("req/s", sum(count) / seconds, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

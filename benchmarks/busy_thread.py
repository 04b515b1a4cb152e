"""Latency beside a busy application thread: what embedding costs when the GIL is contended.

An application that embeds a pool usually has other Python threads doing work. Each
time the front gives up the GIL (a torch call that releases it, a socket call), taking
it back waits up to the interpreter's switch interval (5 ms) while such a thread runs.
libtorchrt's request path keeps those hand-offs to the few it cannot avoid (socket
calls in the router thread, the caller's wait); this script shows the effect.

    python benchmarks/busy_thread.py [--duration 3] [--switch-interval 0.0005]

It prints p50/p99 latency and requests/s of the tiny workload at concurrency 1, with and
without one pure-Python busy thread in the calling process, for libtorchrt (1 instance)
and the hand-written torch.multiprocessing pool of benchmarks/core.py.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import workloads
from benchmarks._baselines import MpQueuePool
from benchmarks._harness import measure


@contextlib.contextmanager
def busy_thread(enabled: bool) -> Iterator[None]:
    """A thread that runs pure Python (holds the GIL) until the block ends."""
    stop = threading.Event()

    def spin() -> None:
        n = 0
        while not stop.is_set():
            n += 1

    t = threading.Thread(target=spin, daemon=True)
    if enabled:
        t.start()
    try:
        yield
    finally:
        stop.set()
        if enabled:
            t.join()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="sys.setswitchinterval() for this process, in seconds (Python's default: 0.005)",
    )
    args = p.parse_args()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    print(f"switch interval {sys.getswitchinterval() * 1000:g} ms")
    import libtorchrt

    with tempfile.TemporaryDirectory() as d:
        path = workloads.build("tiny", Path(d))
        x = workloads.example_input("tiny")
        print(f"{'mode':12s} {'busy thread':12s} {'req/s':>8s} {'p50':>10s} {'p99':>10s}")
        cfg = libtorchrt.ModelConfig("tiny", path)
        with libtorchrt.Pool(models=[cfg]) as pool:
            runs: list[tuple[str, Callable[[], object]]] = [("libtorchrt", lambda: pool.infer("tiny", [x]))]
            with MpQueuePool(path, 1) as mp:
                xn = x.numpy()
                runs.append(("mp-queue", lambda: mp.infer(xn)))
                for name, call in runs:
                    for busy in (False, True):
                        with busy_thread(busy):
                            m = measure(call, concurrency=1, duration=args.duration, repeat=1, warmup=0.5)
                        print(
                            f"{name:12s} {'yes' if busy else 'no':12s} {m.rps:8.0f} "
                            f"{m.p50_us / 1000:8.2f}ms {m.p99_us / 1000:8.2f}ms",
                            flush=True,
                        )


if __name__ == "__main__":
    main()

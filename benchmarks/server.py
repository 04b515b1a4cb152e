"""Server-mode benchmark: the payload workload through each way into a pool server.

Run from the repository root::

    python benchmarks/server.py                       # ~1.5 min on 2 cores
    python benchmarks/server.py --duration 5 --repeat 3 --concurrency 1,2,4 --json out.json

One ``libtorchrt-pool`` server (a subprocess, one instance of the payload workload:
``x * 1.0`` on a 4 MiB float32 ``[1, 1024, 1024]`` tensor) is driven, in turn, by:

* ``pool``        -- ``Pool.infer`` in this process (no server; the reference);
* ``zmq-client``  -- ``libtorchrt.Client`` over ZeroMQ on the same host (tensors through
  shared memory), when ``libtorchrt.client`` is there;
* ``http-binary`` -- ``tritonclient.http`` with the binary tensor data extension
  (inputs and outputs as raw bytes after the JSON header);
* ``http-binary-raw`` -- the same requests from ``http.client`` with the body built once
  and the output viewed in place: what the server costs without tritonclient's own
  copies and parsing;
* ``http-json``   -- ``tritonclient.http`` with tensors as JSON lists of numbers;
* ``http-shm``    -- ``tritonclient.http`` with the system shared-memory extension: the
  input and the output in POSIX shared memory registered once per caller thread, the
  request and the response JSON only;
* ``http-binary-tiny``, ``http-shm-tiny`` -- the same two on the tiny workload (an MLP
  on 64 floats: what a request costs apart from its bytes);
* ``grpc``, ``grpc-tiny`` -- ``tritonclient.grpc`` (the same protocol over gRPC: tensors
  in ``raw_input_contents`` / ``raw_output_contents``), on each workload.

Each row is closed-loop caller threads (``benchmarks/_harness.py``): requests/s and
p50/p99 latency, medians over ``--repeat`` windows of ``--duration`` seconds. Every
answer of the warm-up is checked against the input. docs/benchmarks-server.md holds the
figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from benchmarks._harness import Measurement, measure
from benchmarks._report import loadavg, machine_info
from libtorchrt.bench import workloads
from libtorchrt.bench.cpu import CpuMeter, MeasuredSpan

MODES = ("pool", "zmq-client", "http-binary", "http-binary-raw", "http-json", "http-shm", "http-binary-tiny",
         "http-shm-tiny", "grpc", "grpc-tiny")  # fmt: skip
SHAPE = (1, 1024, 1024)
TINY_SHAPE = (1, 64)
TINY_CONFIG = """
name: "tiny"
platform: "pytorch_libtorch"
max_batch_size: 0
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 1, 64 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 1, 64 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""
CONFIG = """
name: "payload"
platform: "pytorch_libtorch"
max_batch_size: 0
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 1, 1024, 1024 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 1, 1024, 1024 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""


def repository(directory: Path) -> Path:
    """A repository holding the payload workload as ``payload`` version 1, and the tiny
    one as ``tiny``."""
    repo = directory / "repo"
    for name, config in (("payload", CONFIG), ("tiny", TINY_CONFIG)):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(config)
        workloads.build(name, repo / name / "1").rename(repo / name / "1" / "model.pt")
    return repo


def has_client() -> bool:
    try:
        import libtorchrt.client
        import libtorchrt.server.zmq_frontend  # noqa: F401
    except ImportError:
        return False
    return True


@contextmanager
def pool_server(repo: Path, zmq: bool) -> Iterator[dict[str, str]]:
    """Run ``python -m libtorchrt.pool`` on free ports; yield its endpoints by name (and
    its process id as ``pid``)."""
    args = [sys.executable, "-m", "libtorchrt.pool", "--model-repository", str(repo), "--http", "127.0.0.1:0",
            "--grpc", "127.0.0.1:0", "--metrics", "off", "--max-request-bytes", "64MiB",
            "--log-level", "warning"]  # fmt: skip
    if zmq:
        args += ["--zmq", "tcp://127.0.0.1:0"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    endpoints: dict[str, str] = {}
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            m = re.match(r"\s+(HTTP|gRPC|ZeroMQ|metrics)\s+(\S+)", line)
            if m:
                endpoints[m.group(1)] = m.group(2)
            if endpoints.get("HTTP") and endpoints.get("gRPC") and (not zmq or endpoints.get("ZeroMQ")):
                break
        else:
            raise RuntimeError(f"the server exited with status {proc.wait()} before it was ready")
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep its pipe drained
        endpoints["pid"] = str(proc.pid)
        yield endpoints
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (a server's template and workers), from ``/proc``."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def _check(out: Any, x: torch.Tensor) -> None:
    got = out if isinstance(out, torch.Tensor) else torch.from_numpy(np.array(out))
    if got.shape != x.shape or not torch.allclose(got, x, rtol=1e-5, atol=1e-6):
        raise AssertionError("the server answered with the wrong tensor")


def http_caller(
    address: str, x: torch.Tensor, binary: bool, model: str = "payload", want: torch.Tensor | None = None
) -> Callable[[], None]:
    """One call per invocation, a ``tritonclient.http`` client per caller thread."""
    import tritonclient.http as th

    local = threading.local()
    arr = x.numpy().copy()

    def call() -> None:
        if not hasattr(local, "client"):
            local.client = th.InferenceServerClient(address.removeprefix("http://"), network_timeout=120.0)
            local.input = th.InferInput("INPUT__0", list(arr.shape), "FP32")
            local.input.set_data_from_numpy(arr, binary_data=binary)
            local.output = th.InferRequestedOutput("OUTPUT__0", binary_data=binary)
            first = local.client.infer(model, [local.input], outputs=[local.output]).as_numpy("OUTPUT__0")
            _check(first, x if want is None else want)
        local.client.infer(model, [local.input], outputs=[local.output]).as_numpy("OUTPUT__0")

    return call


def shm_caller(
    address: str, model: str, x: torch.Tensor, want: torch.Tensor
) -> tuple[Callable[[], None], Callable[[], None]]:
    """``tritonclient.http`` with the input and the output in system shared memory: per
    caller thread a client and two regions, registered once; each call reads its output
    out of the region (as a caller would). The second callable unregisters and destroys
    every region made."""
    import uuid

    import tritonclient.http as th
    import tritonclient.utils.shared_memory as shm

    arr = x.numpy().copy()
    local = threading.local()
    made: list[tuple[Any, str, list[Any]]] = []
    lock = threading.Lock()

    def call() -> None:
        if not hasattr(local, "client"):
            tag = uuid.uuid4().hex[:12]
            local.client = th.InferenceServerClient(address.removeprefix("http://"), network_timeout=120.0)
            handles = [shm.create_shared_memory_region(f"{kind}-{tag}", f"/bench-{kind}-{tag}", arr.nbytes)
                       for kind in ("in", "out")]  # fmt: skip
            with lock:
                made.append((local.client, tag, handles))
            for kind in ("in", "out"):
                local.client.register_system_shared_memory(f"{kind}-{tag}", f"/bench-{kind}-{tag}", arr.nbytes)
            shm.set_shared_memory_region(handles[0], [arr])
            local.input = th.InferInput("INPUT__0", list(arr.shape), "FP32").set_shared_memory(f"in-{tag}", arr.nbytes)
            local.output = th.InferRequestedOutput("OUTPUT__0")
            local.output.set_shared_memory(f"out-{tag}", arr.nbytes)
            local.out = handles[1]
            local.client.infer(model, [local.input], outputs=[local.output])
            _check(shm.get_contents_as_numpy(local.out, np.float32, list(arr.shape)).copy(), want)
        local.client.infer(model, [local.input], outputs=[local.output])
        shm.get_contents_as_numpy(local.out, np.float32, list(arr.shape)).sum()  # (the caller uses its result)

    def close() -> None:
        # (a tritonclient.http client belongs to the thread that made it: gevent)
        client = th.InferenceServerClient(address.removeprefix("http://"))
        try:
            client.unregister_system_shared_memory()  # every region of ours: HTTP clients are one owner
        finally:
            client.close()
            for _, _, handles in made:
                for handle in handles:
                    shm.destroy_shared_memory_region(handle)

    return call, close


def grpc_caller(address: str, model: str, x: torch.Tensor, want: torch.Tensor) -> Callable[[], None]:
    """One call per invocation, a ``tritonclient.grpc`` client per caller thread."""
    import tritonclient.grpc as tg

    local = threading.local()
    arr = x.numpy().copy()

    def call() -> None:
        if not hasattr(local, "client"):
            local.client = tg.InferenceServerClient(address)
            local.input = tg.InferInput("INPUT__0", list(arr.shape), "FP32")
            local.input.set_data_from_numpy(arr)
            local.output = tg.InferRequestedOutput("OUTPUT__0")
            _check(local.client.infer(model, [local.input], outputs=[local.output]).as_numpy("OUTPUT__0"), want)
        local.client.infer(model, [local.input], outputs=[local.output]).as_numpy("OUTPUT__0")

    return call


def raw_caller(address: str, x: torch.Tensor) -> Callable[[], None]:
    """The binary request from ``http.client``: one connection per caller thread."""
    import http.client

    header = json.dumps(
        {
            "inputs": [{"name": "INPUT__0", "shape": list(SHAPE), "datatype": "FP32",
                        "parameters": {"binary_data_size": x.numel() * 4}}],
            "outputs": [{"name": "OUTPUT__0", "parameters": {"binary_data": True}}],
        }
    ).encode()  # fmt: skip
    body = header + x.numpy().tobytes()
    headers = {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}
    host, port = address.removeprefix("http://").rsplit(":", 1)
    local = threading.local()

    def call() -> None:
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection(host, int(port), timeout=120)
        local.conn.request("POST", "/v2/models/payload/infer", body=body, headers=headers)
        response = local.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data[:200]!r}")
        n = int(response.getheader("Inference-Header-Content-Length", "0"))
        np.frombuffer(data, np.float32, offset=n)  # the output, in place

    return call


def client_caller(endpoint: str, x: torch.Tensor) -> tuple[Callable[[], None], Callable[[], None]]:
    """``libtorchrt.Client`` (one, shared by the caller threads: it is thread-safe)."""
    from libtorchrt.client import Client

    client = Client(endpoint)
    _check(client.infer("payload", {"INPUT__0": x})["OUTPUT__0"], x)

    def call() -> None:
        client.infer("payload", {"INPUT__0": x})

    return call, client.close


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from libtorchrt import Pool

    x = torch.rand(SHAPE, generator=torch.Generator().manual_seed(0))
    rows: list[dict[str, Any]] = []

    server_pid: int | None = None  # the server's, once it runs
    local_pids: list[int] = []  # the in-process pool's workers (the pool rows)

    def measured(call: Callable[[], None], concurrency: int, **kw: Any) -> tuple[Measurement, dict[str, float]]:
        """``measure`` of ``call``, and the CPU it cost a request over the windows: this
        process (the client; the pool rows: the callers and the pool's front), the
        server process, and the pool's processes (below the server, or the local pool's
        workers)."""
        if server_pid is not None:
            processes = {"server": server_pid, **CpuMeter.labels(descendants(server_pid))}
        else:
            processes = CpuMeter.labels(local_pids)
        span = MeasuredSpan(CpuMeter(processes), kw["repeat"])
        m = measure(call, concurrency=concurrency, on_start=span.on_start, on_window=span.on_window, **kw)
        per = span.usage().per_request(sum(w.requests for w in m.windows))
        used = cast(dict[str, float], per["processes"])
        cpu = {
            "client": cast(float, per["front"]),
            "server": used.get("server", math.nan),
            "pool": sum(v for k, v in used.items() if k != "server"),
        }
        return m, cpu

    def row(mode: str, concurrency: int, result: tuple[Measurement, dict[str, float]]) -> None:
        m, cpu = result
        rows.append({"mode": mode, "concurrency": concurrency, **m.to_dict(), "cpu_us_per_request": cpu})
        print(
            f"{mode:<17} {concurrency:>4} {m.rps:>9.1f} {m.p50_us / 1e3:>9.2f} {m.p99_us / 1e3:>9.2f}"
            f" {cpu['client']:>9.0f} {cpu['server']:>9.0f} {cpu['pool']:>9.0f}",
            flush=True,
        )

    print(f"{'':<52} {'CPU µs a request':^29}")
    print(f"{'mode':<17} {'conc':>4} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'client':>9} {'server':>9} {'pool':>9}")
    with tempfile.TemporaryDirectory(prefix="libtorchrt-bench-server-") as tmp:
        repo = repository(Path(tmp))
        common = {"duration": args.duration, "repeat": args.repeat, "warmup": 1.0, "warmup_calls": 5}
        if "pool" in args.modes:
            with Pool(repo) as pool:
                _check(pool.infer("payload", x)["OUTPUT__0"], x)
                local_pids = [w.pid for w in pool.workers() if w.pid is not None]
                for c in args.concurrency:
                    row("pool", c, measured(lambda: pool.infer("payload", x), concurrency=c, **common))
        zmq = "zmq-client" in args.modes and has_client()
        if "zmq-client" in args.modes and not zmq:
            print("zmq-client: skipped (libtorchrt.client is not there)")
        with pool_server(repo, zmq) as endpoints:
            server_pid = int(endpoints["pid"])
            if zmq:
                call, close = client_caller(endpoints["ZeroMQ"], x)
                try:
                    for c in args.concurrency:
                        row("zmq-client", c, measured(call, concurrency=c, **common))
                finally:
                    close()
            if "http-binary-raw" in args.modes:
                for c in args.concurrency:
                    row("http-binary-raw", c, measured(raw_caller(endpoints["HTTP"], x), concurrency=c, **common))
            for mode, binary in (("http-binary", True), ("http-json", False)):
                if mode in args.modes:
                    # A JSON request takes seconds: longer windows, or they would hold none.
                    slow = {**common, "duration": max(args.duration, args.json_duration)} if not binary else common
                    for c in args.concurrency:
                        row(mode, c, measured(http_caller(endpoints["HTTP"], x, binary), concurrency=c, **slow))
            tiny_x = torch.rand(TINY_SHAPE, generator=torch.Generator().manual_seed(0))
            tiny_want = torch.jit.load(str(repo / "tiny" / "1" / "model.pt"))(tiny_x).detach()
            for mode, model, xs, want in (("http-shm", "payload", x, x), ("http-shm-tiny", "tiny", tiny_x, tiny_want)):
                if mode in args.modes:
                    for c in args.concurrency:
                        call, close = shm_caller(endpoints["HTTP"], model, xs, want)
                        try:
                            row(mode, c, measured(call, concurrency=c, **common))
                        finally:
                            close()
            if "http-binary-tiny" in args.modes:
                for c in args.concurrency:
                    call = http_caller(endpoints["HTTP"], tiny_x, True, "tiny", tiny_want)
                    row("http-binary-tiny", c, measured(call, concurrency=c, **common))
            for mode, model, xs, want in (("grpc", "payload", x, x), ("grpc-tiny", "tiny", tiny_x, tiny_want)):
                if mode in args.modes:
                    for c in args.concurrency:
                        row(mode, c, measured(grpc_caller(endpoints["gRPC"], model, xs, want), concurrency=c, **common))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--concurrency", default="1,4", help="comma-separated caller threads (default: 1,4)")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per window (default: 3)")
    p.add_argument("--json-duration", type=float, default=15.0, help="seconds per window of http-json (default: 15)")
    p.add_argument("--repeat", type=int, default=3, help="windows per row; the median is reported (default: 3)")
    p.add_argument("--json", metavar="FILE", help="also write the rows and the machine as JSON")
    args = p.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = set(args.modes) - set(MODES)
    if unknown:
        p.error(f"unknown modes {sorted(unknown)}")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    t0 = time.monotonic()
    rows = run(args)
    print(f"({time.monotonic() - t0:.0f} s; load average {loadavg()}; {os.cpu_count()} CPUs)")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_info(), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``libtorchrt.bench``: how many instances, with which flags, give the best throughput?

A perf_analyzer-style benchmark tool for libtorchrt, run in its own (bench) process::

    python -m libtorchrt.bench model.pt --input-shape x=1,3,224,224 --instances 1,2,4 --concurrency 1,4,16
    python -m libtorchrt.bench models/ --model tiny --compare threads --json out.json --plot out.png
    python -m libtorchrt.bench --workload cnn --parameters DISABLE_OPTIMIZED_EXECUTION=true,false
    python -m libtorchrt.bench --endpoint http://127.0.0.1:8000 resnet --concurrency 1,4,16

It sweeps every combination of instance count, concurrency, batch size and parameter
values against fresh pools, measures closed-loop throughput and latency percentiles in
stable windows, and prints a table as it goes. ``--compare threads`` adds the same
instance counts served as threads of one process, the way Triton runs a PyTorch model.
``--endpoint URL`` measures a running ``libtorchrt-pool`` instead, over HTTP or gRPC
(KServe v2) or ZeroMQ (``libtorchrt.Client``), as perf_analyzer measures a running Triton.
It is a consumer of the public ``libtorchrt`` API; see docs/bench.md.

Modules: ``cli`` (command line), ``source`` (what to benchmark), ``endpoint`` (a running
server and its models), ``inputs`` (request tensors), ``workloads`` (the standard
models), ``sweep`` (the combinations), ``serving`` (what a group runs against, callers
that behave like applications), ``callers`` (fresh inputs and used results around each
request: ``--realistic``), ``remote`` (HTTP, gRPC and ZeroMQ callers), ``loadgen``
(closed-loop load from threads or asyncio tasks, windows), ``stats`` (percentiles,
stability), ``cpu`` (CPU time per thread and process, from ``/proc``), ``threads`` (the
one-process baseline), ``report`` (table, JSON, CSV), ``plot``, ``progress``.
"""

from __future__ import annotations

from .cli import main

__all__ = ["main"]

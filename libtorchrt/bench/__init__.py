"""``libtorchrt.bench``: how many instances, with which flags, give the best throughput?

A perf_analyzer-style benchmark tool for libtorchrt, run in its own (bench) process::

    python -m libtorchrt.bench model.pt --input-shape x=1,3,224,224 --instances 1,2,4 --concurrency 1,4,16
    python -m libtorchrt.bench models/ --model tiny --compare threads --json out.json --plot out.png
    python -m libtorchrt.bench --workload cnn --parameters DISABLE_OPTIMIZED_EXECUTION=true,false

It sweeps every combination of instance count, concurrency, batch size and parameter
values against fresh pools, measures closed-loop throughput and latency percentiles in
stable windows, and prints a table as it goes. ``--compare threads`` adds the same
instance counts served as threads of one process, the way Triton runs a PyTorch model.
It is a consumer of the public ``libtorchrt`` API; see docs/bench.md.

Modules: ``cli`` (command line), ``source`` (what to benchmark), ``inputs`` (request
tensors), ``workloads`` (the standard models), ``sweep`` (the combinations),
``loadgen`` (closed-loop load, windows), ``stats`` (percentiles, stability),
``threads`` (the one-process baseline), ``report`` (table, JSON, CSV), ``plot``,
``progress``.
"""

from __future__ import annotations

from .cli import main

__all__ = ["main"]

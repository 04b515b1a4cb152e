"""Benchmarks for libtorchrt (``python benchmarks/core.py --help``).

The workload definitions in :mod:`benchmarks.workloads` are shared with other
tools (e.g. a future ``python -m libtorchrt.bench``).
"""

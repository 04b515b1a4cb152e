"""Benchmark workloads: the standard models of ``libtorchrt.bench`` plus example inputs.

Each workload stresses a different part of a serving stack:

* ``tiny``    -- a 64x64 MLP on a ``[1, 64]`` input: per-request overhead.
* ``payload`` -- ``x * 1.0`` on a 4 MiB ``[1, 1024, 1024]`` tensor: transport.
* ``cnn``     -- five stride-2 3x3 convolutions on ``[1, 3, 224, 224]``: compute.

The models are defined once, in :mod:`libtorchrt.bench.workloads` (so that
``python -m libtorchrt.bench --workload NAME`` measures the same ones)::

    from benchmarks import workloads
    path = workloads.build("tiny", "/tmp/models")    # -> Path to tiny.pt
    x = workloads.example_input("tiny")              # -> torch.Tensor
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from libtorchrt.bench.workloads import WORKLOADS, Workload, build, names

__all__ = ["WORKLOADS", "Workload", "build", "example_input", "load", "names"]


def load(path: str | Path) -> torch.jit.ScriptModule:
    """Load a saved TorchScript model in eval mode (quietly: no DeprecationWarning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = torch.jit.load(str(path), map_location="cpu")
    return model.eval()


def example_input(name: str, *, seed: int = 1) -> torch.Tensor:
    """Return a deterministic float32 example input for workload ``name``.

    Raises:
        KeyError: no such workload.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(WORKLOADS[name].input_shape, generator=generator, dtype=torch.float32)

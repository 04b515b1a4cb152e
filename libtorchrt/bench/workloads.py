"""The standard benchmark workloads, as TorchScript files (runs in the bench process).

The same three models as ``benchmarks/workloads.py`` (the core benchmarks of
docs/benchmarks.md), defined here again because the library never imports from
``benchmarks/``:

* ``tiny``    -- a 64x64 MLP on a ``[1, 64]`` input: per-request overhead;
* ``payload`` -- ``x * 1.0`` on a 4 MiB ``[1, 1024, 1024]`` tensor: transport;
* ``cnn``     -- five stride-2 3x3 convolutions on ``[1, 3, 224, 224]``: compute.

Weights are seeded, so every run scripts the same model.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["WORKLOADS", "Workload", "build", "names"]


class TinyMLP(nn.Module):
    """``Linear(64, 64) -> ReLU -> Linear(64, 64)``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Scale(nn.Module):
    """``x * 1.0``: returns a fresh tensor of the input's size (pure transport)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1.0


class SmallCNN(nn.Module):
    """Five 3x3/2 convs 3->16->32->64->64->64 (ReLU), mean-pool, Linear(64, 10)."""

    def __init__(self) -> None:
        super().__init__()
        channels = [3, 16, 32, 64, 64, 64]
        layers: list[nn.Module] = []
        for c_in, c_out in itertools.pairwise(channels):
            layers += [nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = x.mean(dim=(2, 3))
        return self.head(x)


@dataclass(frozen=True)
class Workload:
    """A named workload: model factory, the shape of one request's input, a description."""

    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    description: str


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("tiny", TinyMLP, (1, 64), "MLP 64-64-64, per-request overhead"),
        Workload("payload", Scale, (1, 1024, 1024), "x * 1.0 on 4 MiB, transport"),
        Workload("cnn", SmallCNN, (1, 3, 224, 224), "5 stride-2 convs on 224x224, compute"),
    )
}


def names() -> list[str]:
    """The workload names, in their canonical order."""
    return list(WORKLOADS)


def build(name: str, directory: str | Path, *, seed: int = 0) -> Path:
    """Script workload ``name`` into ``<directory>/<name>.pt`` and return that path.

    Weights are deterministic (seeded without touching the global RNG state).

    Raises:
        ValueError: no such workload.
    """
    try:
        workload = WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}") from None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.pt"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = workload.factory().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated in this torch
        scripted = torch.jit.script(model)
    scripted.save(str(path))
    return path

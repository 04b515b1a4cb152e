"""Tiny TorchScript models that the tests build themselves (no files are shipped)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor, nn


class Tiny(nn.Module):
    """The benchmarks' per-request workload: MLP 64 -> 64 -> 64."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1 = nn.Linear(64, 64)
        self.l2 = nn.Linear(64, 64)

    def forward(self, x: Tensor) -> Tensor:
        return self.l2(torch.relu(self.l1(x)))


class Add(nn.Module):
    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a + b


class TwoOutputs(nn.Module):
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x + 1, x * 2


class Identity(nn.Module):
    """Returns its input unchanged: any dtype, any shape."""

    def forward(self, x: Tensor) -> Tensor:
        return x


class Raiser(nn.Module):
    """Raises when the input's first element is negative."""

    def forward(self, x: Tensor) -> Tensor:
        if bool(x.reshape(-1)[0] < 0):
            raise RuntimeError("negative input rejected by the model")
        return x * 2


class ListOutputs(nn.Module):
    def forward(self, x: Tensor) -> list[Tensor]:
        return [x, x.sum(dim=-1)]


class Spin(nn.Module):
    """Busy for about ``x[0]`` milliseconds-worth of loop iterations (for timing tests)."""

    def forward(self, x: Tensor) -> Tensor:
        n = int(x.reshape(-1)[0].item())
        acc = torch.zeros(1)
        for _ in range(n):
            acc = acc + torch.ones(1)
        return acc


class SpinDouble(nn.Module):
    """``x * 2 + 1`` per row, after spinning ``x[0, 0]`` loop iterations when it is
    above 1000 (so a request can keep its instance busy, by its first value)."""

    def forward(self, x: Tensor) -> Tensor:
        n = int(x[0, 0].item())
        acc = torch.zeros(1)
        if n > 1000:
            for _ in range(n):
                acc = acc + torch.ones(1)
        return x * 2 + 1 + acc * 0


class Sticky(nn.Module):
    """Fails like a CUDA kernel fault (a sticky error) when the first element is negative."""

    def forward(self, x: Tensor) -> Tensor:
        if bool(x.reshape(-1)[0] < 0):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return x * 2


MODELS = {
    "tiny": Tiny,
    "add": Add,
    "two": TwoOutputs,
    "identity": Identity,
    "raiser": Raiser,
    "listout": ListOutputs,
    "spin": Spin,
    "sticky": Sticky,
}


def save(name: str, directory: Path) -> Path:
    """Script model ``name`` and save it under ``directory``; return the file."""
    path = directory / f"{name}.pt"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.jit.script(MODELS[name]()).save(str(path))
    return path


def reference(name: str) -> nn.Module:
    return MODELS[name]().eval()

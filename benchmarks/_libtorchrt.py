"""The ``libtorchrt`` rows: a closed-loop caller over ``Pool.infer``."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch


def import_libtorchrt() -> tuple[ModuleType | None, str | None]:
    """Import libtorchrt; return ``(module, None)`` or ``(None, why not)``."""
    try:
        return importlib.import_module("libtorchrt"), None
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


def first_output(out: dict[str, torch.Tensor]) -> torch.Tensor:
    """The first output tensor of a ``Pool.infer`` result."""
    return out["OUTPUT__0"]


@contextlib.contextmanager
def libtorchrt_caller(
    module: ModuleType, name: str, path: str | Path, instances: int, x: torch.Tensor, **pool_options: Any
) -> Iterator[Callable[[], Any]]:
    """Start a ``Pool`` serving ``path`` as ``name``; yield ``call()``, one request."""
    cfg = module.ModelConfig(name=name, path=str(path), instances=instances)
    with module.Pool(models=[cfg], **pool_options) as pool:
        infer = pool.infer
        inputs = [x]

        def call() -> Any:
            return infer(name, inputs)

        yield call

"""The ``libtorchrt`` rows: lazy import and a closed-loop caller over ``Pool.infer``.

Written against the public API::

    from libtorchrt import Pool, ModelConfig
    cfg = ModelConfig(name="tiny", path="/tmp/.../tiny.pt", instances=2)
    with Pool(models=[cfg]) as pool:
        out = pool.infer("tiny", [x])  # dict[str, Tensor], e.g. {"OUTPUT__0": y}
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from benchmarks._proc import REPO_ROOT


def _add_path(path: Path) -> None:
    """Put ``path`` on sys.path and PYTHONPATH (inherited by worker processes)."""
    entry = str(path)
    if entry not in sys.path:
        sys.path.insert(0, entry)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if entry not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([entry, *parts])


def import_libtorchrt() -> tuple[ModuleType | None, str | None]:
    """Import libtorchrt (installed or from the checkout).

    Returns ``(module, None)``, or ``(None, error message)``.
    """
    error = "not found"
    for candidate in (None, REPO_ROOT / "src", REPO_ROOT):
        if candidate is not None:
            if not (candidate / "libtorchrt").is_dir():
                continue
            _add_path(candidate)
            sys.modules.pop("libtorchrt", None)
        try:
            module = importlib.import_module("libtorchrt")
        except Exception as exc:  # a half-written package may raise anything
            error = f"{type(exc).__name__}: {exc}"
            continue
        missing = [n for n in ("Pool", "ModelConfig") if not hasattr(module, n)]
        if missing:
            error = f"libtorchrt has no {', '.join(missing)}"
            continue
        return module, None
    return None, error


def first_output(out: Any) -> torch.Tensor:
    """The first output tensor of a ``Pool.infer`` result (``OUTPUT__0`` if present)."""
    if isinstance(out, dict):
        return out["OUTPUT__0"] if "OUTPUT__0" in out else next(iter(out.values()))
    if isinstance(out, (list, tuple)):
        return out[0]
    return out


@contextlib.contextmanager
def libtorchrt_caller(
    module: ModuleType, name: str, path: str | Path, instances: int, x: torch.Tensor
) -> Iterator[Callable[[], Any]]:
    """Start a ``Pool`` serving ``path`` as ``name``; yield ``call()``."""
    cfg = module.ModelConfig(name=name, path=str(path), instances=instances)
    with module.Pool(models=[cfg]) as pool:
        infer = pool.infer
        inputs = [x]

        def call() -> Any:
            return infer(name, inputs)

        yield call

"""Format loaders: a model file in, a :class:`Runner` out (worker process).

One module per format (``torchscript``, ``aoti``, ``exported``, ``python``), each with
``load(LoadRequest) -> Runner``; imported only when a worker serves that format.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from .runner import LoadError, LoadRequest, Output, Runner

__all__ = ["LoadError", "LoadRequest", "Runner", "load"]

_MODULES = {"torchscript": "torchscript", "aoti": "aoti", "exported": "exported", "python": "python"}


def load(fmt: str, req: LoadRequest) -> Runner:
    """Load ``req.path`` as a model of format ``fmt``.

    Raises:
        LoadError: the file cannot be served as configured (says why).
    """
    name = _MODULES.get(fmt)
    if name is None:
        raise LoadError(f"model {req.model!r}: unknown format {fmt!r}; expected one of {sorted(_MODULES)}")
    module = importlib.import_module(f"{__name__}.{name}")
    runner: Runner = module.load(req)
    if req.placed_by_model:  # its outputs may be wherever the model put them
        runner.run = _on_the_cpu(runner.run)
    return runner


def _on_the_cpu(run: Callable[[list[Any]], list[Output]]) -> Callable[[list[Any]], list[Output]]:
    """``run``, its CUDA outputs copied to the CPU: a KIND_MODEL instance's worker has
    no device, so its outputs go back through the CPU's response arena."""

    def on_the_cpu(inputs: list[Any]) -> list[Output]:
        return [o.cpu() if getattr(o, "is_cuda", False) else o for o in run(inputs)]

    return on_the_cpu

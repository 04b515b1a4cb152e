"""Format loaders: a model file in, a :class:`Runner` out (worker process).

One module per format (``torchscript``, ``aoti``, ``exported``, ``python``), each with
``load(LoadRequest) -> Runner``; imported only when a worker serves that format.
"""

from __future__ import annotations

import importlib

from .runner import LoadError, LoadRequest, Runner

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
    return runner

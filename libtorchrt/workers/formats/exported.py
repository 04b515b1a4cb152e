"""``torch.export`` programs (``torch.export.save``, a ``.pt2`` without compiled code):
the loader (worker process).

The program runs as the module ``ExportedProgram.module()`` makes of it, eagerly, or
through ``torch.compile`` when ``TORCH_COMPILE_OPTIONAL_PARAMETERS`` asks for it (the
compiled code lands in Inductor's cache, ``TORCHINDUCTOR_CACHE_DIR``, which the front
sets for the worker: a restarted worker compiles from the cache). The rows one call
accepts are the range export recorded for the symbol of the inputs' first dimension
(``range_constraints``), or the fixed size of a static one.
"""

from __future__ import annotations

import os
import zipfile
from typing import Any

from ...config.formats import COMPILE_KEY, compile_options, zip_kind
from . import pt2call
from .runner import LoadError, LoadRequest, Runner

__all__ = ["load"]


def load(req: LoadRequest) -> Runner:
    """Load, place, optionally compile, and describe a ``torch.export`` program.

    Raises:
        LoadError: torch cannot load the file (says what it is, if recognisably
            something else); ``max_batch_size`` is more than its first dimension takes,
            or it has a static first dimension and ``max_batch_size`` is set.
        ConfigError: ``TORCH_COMPILE_OPTIONAL_PARAMETERS`` is not valid (names it).
    """
    import torch

    # torch.export.load logs a traceback for anything it cannot read (it retries the
    # file as its legacy format); a file that is recognisably something else, or no zip
    # (truncated), is refused before, saying what it is.
    kind = zip_kind(req.path)
    if kind not in ("exported", None) or (kind is None and not zipfile.is_zipfile(req.path)):
        raise LoadError(
            f"model {req.model!r}: {req.path} is not a torch.export program: {pt2call.describe(req.path, 'exported')}"
        )
    try:
        ep = torch.export.load(req.path)
    except Exception as e:  # zip, pickle and schema errors alike: say what the file is
        raise LoadError(
            f"model {req.model!r}: torch.export.load cannot load {req.path}: "
            f"{pt2call.describe(req.path, 'exported', e)}"
        ) from e
    if req.device != "cpu":
        # Moves constants and the devices written into the graph (factory calls'
        # device=...) too, which Module.to() would leave on the export's device.
        from torch.export.passes import move_to_device_pass

        ep = move_to_device_pass(ep, req.device)

    notes: list[str] = []
    batch_range, static = _batch_range(ep, notes)
    pt2call.check_batch(req, batch_range, static=static, artifact="program")

    call: Any = ep.module()
    if req.on_weights is not None:  # before torch.compile
        req.on_weights(call)
    options = compile_options(req.model, req.parameters[COMPILE_KEY]) if COMPILE_KEY in req.parameters else None
    compiled = options is not None and not options.get("disable", False)
    if compiled:
        assert options is not None
        call = torch.compile(call, **options)  # compiles at the first call (the warm-up's)

    return pt2call.make_runner(
        "exported",
        call,
        ep.call_spec.in_spec,
        ep.call_spec.out_spec,
        req,
        batch_range=batch_range,
        notes=notes,
        info={
            "compiled": compiled,
            "compile_options": options,
            "compile_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
            "batch_range": list(batch_range) if batch_range else None,
        },
    )


def _batch_range(ep: Any, notes: list[str]) -> tuple[tuple[int, int] | None, bool]:
    """The rows one call accepts, from the user inputs' first dimension, and whether
    it is static (fixed at export).

    Several inputs: the range all of them accept. A dimension that is an expression
    (``2 * batch``) is bounded by its symbols' ranges; one that cannot be bounded
    leaves the range unknown (None, with a note).
    """
    import torch
    from torch.utils._sympy.value_ranges import bound_sympy

    user = set(ep.graph_signature.user_inputs)
    low, high = 1, pt2call.NO_MAX
    statics: list[int] = []
    batched = False
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in user:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() == 0:
            continue  # a scalar or a non-tensor input: no rows
        batched = True
        dim = val.shape[0]
        if isinstance(dim, int):
            statics.append(dim)
            continue
        try:
            bounds = bound_sympy(dim.node.expr, ep.range_constraints)
            lower = int(bounds.lower)
            # A Dim without max ends at int_oo (which sympy calls finite): no max of ours either.
            upper = int(bounds.upper) if bounds.upper < pt2call.NO_MAX else pt2call.NO_MAX
        except (TypeError, ValueError, AttributeError) as e:
            notes.append(f"the rows one call accepts are not known: input {node.name}'s first dimension {dim} ({e})")
            return None, False
        low = max(low, lower)
        high = min(high, upper)
    if not batched:
        return None, False
    if statics:
        # Two inputs fixed at different sizes cannot be batched together either; the
        # smallest is as good a report as any (check_batch refuses batching them).
        return (min(statics), min(statics)), True
    return (low, high), False

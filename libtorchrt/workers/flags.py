"""Execution-mode flags, applied and read back in each worker (worker process).

They are parsed in the front (``config/flags.py``). Applying happens in the worker
process, once, before the model is loaded: every worker is its own process, so a flag is
exact for its model and never leaks into another. :func:`prepare` then freezes /
optimizes the loaded module when asked to.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any

from ..config.flags import (
    BOOL_KEYS,
    CONFIG_KEYS,
    INT_KEYS,
    OWN_BOOL_KEYS,
    TRITON_BOOL_KEYS,
    Flags,
    parse,
)
from ..errors import ConfigError

__all__ = [
    "BOOL_KEYS",
    "CONFIG_KEYS",
    "INT_KEYS",
    "OWN_BOOL_KEYS",
    "TRITON_BOOL_KEYS",
    "Flags",
    "apply",
    "effective",
    "parse",
    "prepare",
]


def apply(flags: Flags, *, cpu: bool = True) -> list[str]:
    """Apply ``flags`` to this (worker) process; return warnings for the user.

    Must run before the model is loaded: TorchScript reads the executor settings when
    it first compiles a graph. Thread counts default to one intra-op thread on CPU
    instances so that N instances on N cores do not oversubscribe.
    """
    import torch

    notes = flags.notes()
    v = flags.values
    intra = v.get("INTRA_OP_THREAD_COUNT", 1 if cpu else None)
    if intra is not None:
        torch.set_num_threads(int(intra))
    if "INTER_OP_THREAD_COUNT" in v:
        torch.set_num_interop_threads(int(v["INTER_OP_THREAD_COUNT"]))
    if "DISABLE_OPTIMIZED_EXECUTION" in v:
        torch._C._set_graph_executor_optimize(not v["DISABLE_OPTIMIZED_EXECUTION"])
    if "ENABLE_JIT_EXECUTOR" in v:
        torch._C._jit_set_profiling_executor(bool(v["ENABLE_JIT_EXECUTOR"]))
    if "ENABLE_JIT_PROFILING" in v:
        torch._C._jit_set_profiling_mode(bool(v["ENABLE_JIT_PROFILING"]))
    if "ENABLE_TENSOR_FUSER" in v:
        torch._C._jit_set_texpr_fuser_enabled(bool(v["ENABLE_TENSOR_FUSER"]))
    if "DISABLE_CUDNN" in v:
        torch.backends.cudnn.enabled = not v["DISABLE_CUDNN"]
    _schedule(bool(v.get("SCHED_BATCH", True)))
    for note in notes:
        warnings.warn(note, RuntimeWarning, stacklevel=2)
    return notes


def _schedule(batch: bool) -> None:
    """Run this thread, and the threads it starts from now on (torch's), under Linux's
    ``SCHED_BATCH`` policy, or back under ``SCHED_OTHER``.

    A ``SCHED_BATCH`` thread gets its share of the CPU as before, but its wake-ups
    preempt no running thread: a request's arrival no longer stops the front's thread
    that sent it (an event loop sending the next requests, an HTTP server parsing them)
    while the other CPU is busy. Measured in docs/measurements/sched-batch.md. A
    real-time policy the pool was started with is left alone.
    """
    if not hasattr(os, "SCHED_BATCH"):
        return
    with contextlib.suppress(OSError):
        if os.sched_getscheduler(0) in (os.SCHED_OTHER, os.SCHED_BATCH):
            os.sched_setscheduler(0, os.SCHED_BATCH if batch else os.SCHED_OTHER, os.sched_param(0))


#: What only TorchScript's executor reads: not reported for the other formats (the
#: configuration refuses them there, config/formats.py).
_TORCHSCRIPT_ONLY = (
    "DISABLE_OPTIMIZED_EXECUTION",
    "ENABLE_NVFUSER",
    "ENABLE_JIT_EXECUTOR",
    "ENABLE_JIT_PROFILING",
    "ENABLE_TENSOR_FUSER",
    "FREEZE_MODULE",
    "OPTIMIZE_FOR_INFERENCE",
)


def effective(
    flags: Flags, fmt: str = "torchscript", *, shared: bool = False, zero_copy: bool = False
) -> dict[str, bool | int | str]:
    """Read back from torch the values this process really runs with, and its format
    (``FORMAT``); the TorchScript executor's flags only for a TorchScript model.
    ``ENABLE_WEIGHT_SHARING`` is whether this process maps its model's shared weights
    (``shared``, from ``workers/weights.py``), and ``ZERO_COPY_OUTPUTS`` whether its
    model allocates in the response arena (``zero_copy``, ``transport/outheap.py``),
    whatever was asked."""
    values: dict[str, bool | int | str] = {
        "FORMAT": fmt,
        **_effective(flags),
        "ENABLE_WEIGHT_SHARING": shared,
        "ZERO_COPY_OUTPUTS": zero_copy,
    }
    if fmt != "torchscript":
        for key in _TORCHSCRIPT_ONLY:
            values.pop(key, None)
    return values


def _effective(flags: Flags) -> dict[str, bool | int]:
    import torch

    # The profiling setters return the previous value; set it back to read it.
    executor = torch._C._jit_set_profiling_executor(True)
    torch._C._jit_set_profiling_executor(executor)
    profiling = torch._C._jit_set_profiling_mode(True)
    torch._C._jit_set_profiling_mode(profiling)
    return {
        "DISABLE_OPTIMIZED_EXECUTION": not torch._C._get_graph_executor_optimize(),
        "INFERENCE_MODE": bool(flags.values.get("INFERENCE_MODE", True)),
        "ENABLE_NVFUSER": False,  # a no-op in this torch, whatever was asked
        "ENABLE_JIT_EXECUTOR": bool(executor),
        "ENABLE_JIT_PROFILING": bool(profiling),
        "ENABLE_TENSOR_FUSER": bool(torch._C._jit_texpr_fuser_enabled()),
        "DISABLE_CUDNN": not torch.backends.cudnn.enabled,
        "ENABLE_CACHE_CLEANING": bool(flags.values.get("ENABLE_CACHE_CLEANING", False)),
        "FREEZE_MODULE": _freezes(flags),
        "OPTIMIZE_FOR_INFERENCE": bool(flags.values.get("OPTIMIZE_FOR_INFERENCE", False)),
        "CUDA_LAUNCH_BLOCKING": os.environ.get("CUDA_LAUNCH_BLOCKING", "0").strip() == "1",
        "INTRA_OP_THREAD_COUNT": torch.get_num_threads(),
        "INTER_OP_THREAD_COUNT": torch.get_num_interop_threads(),
        "SCHED_BATCH": hasattr(os, "SCHED_BATCH") and os.sched_getscheduler(0) == os.SCHED_BATCH,
    }


def _freezes(flags: Flags) -> bool:
    return bool(flags.values.get("FREEZE_MODULE") or flags.values.get("OPTIMIZE_FOR_INFERENCE"))


def prepare(module: Any, flags: Flags, *, method: str = "forward", model: str = "?") -> Any:
    """Freeze and/or optimize a loaded TorchScript module, as its flags ask.

    ``FREEZE_MODULE``: ``torch.jit.freeze(module.eval())`` (parameters and attributes
    become constants). ``OPTIMIZE_FOR_INFERENCE``: ``torch.jit.optimize_for_inference``
    (freezes first). A ``method`` other than ``forward`` is kept through freezing
    (``preserved_attrs``), which otherwise drops every method but ``forward``.

    Args:
        module: the loaded ``torch.jit.ScriptModule``.
        flags: the model's parsed flags.
        method: the method the worker runs (``MODULE_METHOD_NAME``).
        model: the model's name, for error messages.

    Returns:
        The module to run: ``module`` itself when neither flag is set.

    Raises:
        ConfigError: torch could not freeze or optimize this module (names the flag).
    """
    if not _freezes(flags):
        return module
    import torch

    key = "OPTIMIZE_FOR_INFERENCE" if flags.values.get("OPTIMIZE_FOR_INFERENCE") else "FREEZE_MODULE"
    keep = [method] if method != "forward" else None
    try:
        with warnings.catch_warnings():
            # torch >= 2.9 deprecates torch.jit.*; the model is TorchScript by definition.
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=DeprecationWarning)
            frozen = torch.jit.freeze(module.eval(), preserved_attrs=keep)
            if key == "OPTIMIZE_FOR_INFERENCE":
                frozen = torch.jit.optimize_for_inference(frozen, other_methods=keep)
    except Exception as e:
        raise ConfigError(
            f"model {model!r}: {key} failed: {type(e).__name__}: {e}; set {key} to false for this model",
            model=model,
            key=key,
        ) from e
    return frozen

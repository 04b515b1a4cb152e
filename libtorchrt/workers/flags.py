"""Execution-mode flags: parsed in the front, applied and read back in each worker.

The keys are those of Triton's PyTorch backend (``config.pbtxt`` ``parameters``).
Parsing happens in the front when a model is configured, so a bad value fails the pool
at start with a :class:`~libtorchrt.errors.ConfigError` naming model, key and value.
Applying happens in the worker process, once, before the model is loaded: every worker
is its own process, so a flag is exact for its model and never leaks into another.
:func:`prepare` then freezes / optimizes the loaded module when asked to.
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

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

#: Boolean parameters of Triton's PyTorch backend.
TRITON_BOOL_KEYS = (
    "DISABLE_OPTIMIZED_EXECUTION",
    "INFERENCE_MODE",
    "ENABLE_NVFUSER",
    "ENABLE_JIT_EXECUTOR",
    "ENABLE_JIT_PROFILING",
    "ENABLE_TENSOR_FUSER",
    "DISABLE_CUDNN",
    "ENABLE_CACHE_CLEANING",
    "ENABLE_WEIGHT_SHARING",
)
#: Boolean parameters of libtorchrt's own: freezing, and CUDA_LAUNCH_BLOCKING per model
#: (set in the environment of the model's workers by ModelConfig, not by apply()).
OWN_BOOL_KEYS = ("FREEZE_MODULE", "OPTIMIZE_FOR_INFERENCE", "CUDA_LAUNCH_BLOCKING")
#: Every boolean parameter.
BOOL_KEYS = TRITON_BOOL_KEYS + OWN_BOOL_KEYS
#: Integer parameters (thread counts).
INT_KEYS = ("INTRA_OP_THREAD_COUNT", "INTER_OP_THREAD_COUNT")
#: Parameters that ModelConfig reads (the method to run, warm-up runs): known, so
#: not reported as unused, but not execution-mode flags.
CONFIG_KEYS = ("MODULE_METHOD_NAME", "WARMUP_RUNS", "EXECUTION_TIMEOUT")

# Triton's ParseBoolValue accepts these spellings, case-insensitively.
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})

NVFUSER_NOTE = (
    "ENABLE_NVFUSER is accepted but has no effect: NVFuser was removed from TorchScript in this torch version"
)
WEIGHT_SHARING_NOTE = (
    "ENABLE_WEIGHT_SHARING is accepted but has no effect: every instance is its own worker process and "
    "loads its own copy of the weights, so N instances on one device hold N copies"
)


@dataclass(frozen=True)
class Flags:
    """The parsed execution-mode parameters of one model (None: keep torch's default)."""

    values: dict[str, bool | int] = field(default_factory=dict)
    #: keys that are not execution-mode flags; passed through untouched
    unknown: tuple[str, ...] = ()

    def get(self, key: str) -> Any:
        return self.values.get(key)

    def to_wire(self) -> dict[str, bool | int]:
        return dict(self.values)

    def notes(self) -> list[str]:
        """Warnings for the user: flags that do nothing here, keys nobody reads."""
        notes = []
        if "ENABLE_NVFUSER" in self.values:
            notes.append(NVFUSER_NOTE)
        if self.values.get("ENABLE_WEIGHT_SHARING"):
            notes.append(WEIGHT_SHARING_NOTE)
        if self.unknown:
            notes.append(
                "parameters that are not execution-mode flags were passed through unused: "
                + ", ".join(_with_suggestion(key) for key in sorted(self.unknown))
            )
        return notes


def _with_suggestion(key: str) -> str:
    """``key``, and the known parameter it is probably a misspelling of."""
    known = (*BOOL_KEYS, *INT_KEYS, *CONFIG_KEYS)
    close = difflib.get_close_matches(key.upper(), known, n=1, cutoff=0.75)
    return f"{key} (did you mean {close[0]}?)" if close else key


def parse(model: str, parameters: Mapping[str, Any]) -> Flags:
    """Parse a model's parameters into :class:`Flags`.

    Args:
        model: the model's name, for error messages.
        parameters: key → value; values are strings ("true", "4") or bools/ints.

    Raises:
        ConfigError: a flag has a value that is not a boolean / positive integer.
    """
    values: dict[str, bool | int] = {}
    unknown: list[str] = []
    for key, raw in parameters.items():
        if key in BOOL_KEYS:
            values[key] = _parse_bool(model, key, raw)
        elif key in INT_KEYS:
            values[key] = _parse_int(model, key, raw)
        elif key not in CONFIG_KEYS:
            unknown.append(key)
    return Flags(values, tuple(unknown))


def _parse_bool(model: str, key: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(
        f'model {model!r}: parameter {key} has value {raw!r}; expected "true" or "false"',
        model=model,
        key=key,
    )


def _parse_int(model: str, key: str, raw: Any) -> int:
    try:
        value = int(str(raw).strip()) if not isinstance(raw, bool) else -1
    except ValueError:
        value = -1
    if value < 1:
        raise ConfigError(
            f"model {model!r}: parameter {key} has value {raw!r}; expected a positive integer",
            model=model,
            key=key,
        )
    return value


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
    for note in notes:
        warnings.warn(note, RuntimeWarning, stacklevel=2)
    return notes


def effective(flags: Flags) -> dict[str, bool | int]:
    """Read back from torch the values this process really runs with."""
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
        "ENABLE_WEIGHT_SHARING": False,  # each process owns its weights, whatever was asked
        "FREEZE_MODULE": _freezes(flags),
        "OPTIMIZE_FOR_INFERENCE": bool(flags.values.get("OPTIMIZE_FOR_INFERENCE", False)),
        "CUDA_LAUNCH_BLOCKING": os.environ.get("CUDA_LAUNCH_BLOCKING", "0").strip() == "1",
        "INTRA_OP_THREAD_COUNT": torch.get_num_threads(),
        "INTER_OP_THREAD_COUNT": torch.get_num_interop_threads(),
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

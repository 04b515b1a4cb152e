"""Execution-mode flags: parsed in the front, applied and read back in each worker.

The keys are those of Triton's PyTorch backend (``config.pbtxt`` ``parameters``).
Parsing happens in the front when a model is configured, so a bad value fails the pool
at start with a :class:`~libtorchrt.errors.ConfigError` naming model, key and value.
Applying happens in the worker process, once, before the model is loaded: every worker
is its own process, so a flag is exact for its model and never leaks into another.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

__all__ = ["BOOL_KEYS", "INT_KEYS", "Flags", "apply", "effective", "parse"]

#: Boolean parameters, as in Triton's PyTorch backend.
BOOL_KEYS = (
    "DISABLE_OPTIMIZED_EXECUTION",
    "INFERENCE_MODE",
    "ENABLE_NVFUSER",
    "ENABLE_JIT_EXECUTOR",
    "ENABLE_JIT_PROFILING",
    "ENABLE_TENSOR_FUSER",
    "DISABLE_CUDNN",
    "ENABLE_CACHE_CLEANING",
)
#: Integer parameters (thread counts).
INT_KEYS = ("INTRA_OP_THREAD_COUNT", "INTER_OP_THREAD_COUNT")

# Triton's ParseBoolValue accepts these spellings, case-insensitively.
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})

NVFUSER_NOTE = (
    "ENABLE_NVFUSER is accepted but has no effect: NVFuser was removed from TorchScript in this torch version"
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
        else:
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

    notes: list[str] = []
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
    if "ENABLE_NVFUSER" in v:
        notes.append(NVFUSER_NOTE)
    if flags.unknown:
        notes.append(
            "parameters that are not execution-mode flags were passed through unused: "
            + ", ".join(sorted(flags.unknown))
        )
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
        "INTRA_OP_THREAD_COUNT": torch.get_num_threads(),
        "INTER_OP_THREAD_COUNT": torch.get_num_interop_threads(),
    }

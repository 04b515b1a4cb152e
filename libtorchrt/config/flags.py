"""Execution-mode parameters, parsed (front process; configuration).

The keys are those of Triton's PyTorch backend (``config.pbtxt`` ``parameters``).
Parsing happens in the front when a model is configured, so a bad value fails the pool
at start with a :class:`~libtorchrt.errors.ConfigError` naming model, key and value.
Applying them is the worker's business (``workers/flags.py``).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

__all__ = [
    "BOOL_KEYS",
    "CONFIG_KEYS",
    "INT_ALIASES",
    "INT_KEYS",
    "OWN_BOOL_KEYS",
    "TRITON_BOOL_KEYS",
    "Flags",
    "parse",
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
#: Boolean parameters of libtorchrt's own: freezing, CUDA_LAUNCH_BLOCKING per model (set
#: in the environment of the model's workers by ModelConfig, not by apply()), the
#: worker's scheduling policy (SCHED_BATCH: Linux's, whose wake-ups preempt nobody), and
#: whether a CPU worker's model makes its large outputs in the response arena
#: (ZERO_COPY_OUTPUTS, transport/outheap.py).
OWN_BOOL_KEYS = ("FREEZE_MODULE", "OPTIMIZE_FOR_INFERENCE", "CUDA_LAUNCH_BLOCKING", "SCHED_BATCH", "ZERO_COPY_OUTPUTS")
#: Every boolean parameter.
BOOL_KEYS = TRITON_BOOL_KEYS + OWN_BOOL_KEYS
#: Integer parameters (thread counts).
INT_KEYS = ("INTRA_OP_THREAD_COUNT", "INTER_OP_THREAD_COUNT")
#: The names Triton's Python-based PyTorch runtime gives the thread counts.
INT_ALIASES = {"NUM_THREADS": "INTRA_OP_THREAD_COUNT", "NUM_INTEROP_THREADS": "INTER_OP_THREAD_COUNT"}
#: Parameters that ModelConfig reads (the method to run, warm-up runs): known, so
#: not reported as unused, but not execution-mode flags.
CONFIG_KEYS = ("MODULE_METHOD_NAME", "WARMUP_RUNS", "EXECUTION_TIMEOUT", "TORCH_COMPILE_OPTIONAL_PARAMETERS")

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

    def notes(self) -> list[str]:
        """Warnings for the user: flags that do nothing here, keys nobody reads."""
        notes = []
        if "ENABLE_NVFUSER" in self.values:
            notes.append(NVFUSER_NOTE)
        if self.unknown:
            notes.append(
                "parameters that are not execution-mode flags were passed through unused: "
                + ", ".join(_with_suggestion(key) for key in sorted(self.unknown))
            )
        return notes


def _with_suggestion(key: str) -> str:
    """``key``, and the known parameter it is probably a misspelling of."""
    known = (*BOOL_KEYS, *INT_KEYS, *INT_ALIASES, *CONFIG_KEYS)
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
        elif key in INT_KEYS or key in INT_ALIASES:
            value = _parse_int(model, key, raw)
            canonical = INT_ALIASES.get(key, key)
            if values.get(canonical, value) != value:
                raise ConfigError(
                    f"model {model!r}: parameters {canonical} and its alias "
                    f"{next(a for a, c in INT_ALIASES.items() if c == canonical)} disagree; give one",
                    model=model,
                    key=key,
                )
            values[canonical] = value
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

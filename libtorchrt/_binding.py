"""Binding a request's inputs to the model's arguments, and naming its outputs (front).

Runs in the caller's thread, before anything is copied: a request that does not fit
the model fails here with :class:`InvalidInputError` and no worker ever sees it.

Inputs bind as in Triton's PyTorch backend: a key equal to a ``forward()`` argument
name binds to it; a key ``<anything>__<i>`` binds to argument ``i``; a list binds by
position. Outputs are named by the configured outputs (by their ``__<i>`` suffix, else
in order) and default to ``OUTPUT__<i>``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .config.model import ModelConfig, TensorSpec
from .errors import InvalidInputError
from .transport.wire import DTYPES

__all__ = ["Binder"]

_INDEXED = re.compile(r"^.+__(\d+)$")
_WIRE_DTYPES = frozenset(DTYPES.values())


def _index(name: str) -> int | None:
    m = _INDEXED.match(name)
    return int(m.group(1)) if m else None


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {str(value.dtype).removeprefix('torch.')}{list(value.shape)} on {value.device}"
    return type(value).__name__


class Binder:
    """Binds requests for one model; built once, when its first worker is READY.

    Args:
        cfg: the model's configuration.
        arg_names: the model method's argument names (without ``self``).
    """

    def __init__(self, cfg: ModelConfig, arg_names: Sequence[str]) -> None:
        self.model = cfg.name
        self.arg_names = list(arg_names)
        self.max_batch_size = cfg.max_batch_size
        n = len(self.arg_names)
        self.positions: dict[str, int] = {name: i for i, name in enumerate(self.arg_names)}
        self.specs: list[TensorSpec | None] = [None] * n
        # Triton's precedence: argument name, then the `__<i>` suffix, then the
        # configuration's order, into the positions that no other spec claimed.
        unplaced: list[TensorSpec] = []
        for spec in cfg.inputs:
            pos = self.positions.get(spec.name)
            if pos is None:
                pos = _index(spec.name)
            if pos is None or pos >= n or self.specs[pos] is not None:
                unplaced.append(spec)
                continue
            self.positions[spec.name] = pos
            self.specs[pos] = spec
        free = [i for i in range(n) if self.specs[i] is None]
        for spec, pos in zip(unplaced, free):
            self.positions[spec.name] = pos
            self.specs[pos] = spec
        self._outputs = list(cfg.outputs)
        self._output_names: dict[int, list[str]] = {}

    @property
    def expected(self) -> str:
        return f"inputs {[self.display(i) for i in range(len(self.arg_names))]}"

    def display(self, pos: int) -> str:
        spec = self.specs[pos]
        return spec.name if spec is not None else self.arg_names[pos]

    def bind(self, inputs: Any) -> list[torch.Tensor]:
        """Return the request's tensors in argument order, checked.

        Raises:
            InvalidInputError: an input is unknown, missing, not a tensor, or of the
                wrong dtype, rank or size.
        """
        n = len(self.arg_names)
        if isinstance(inputs, (torch.Tensor, np.ndarray)):
            inputs = [inputs]
        if isinstance(inputs, Mapping):
            bound: list[Any] = [None] * n
            for key, value in inputs.items():
                pos = self.positions.get(key) if isinstance(key, str) else None
                if pos is None and isinstance(key, str):
                    pos = _index(key)
                if pos is None or pos >= n:
                    raise InvalidInputError(self.model, str(key), self.expected, f"unknown input {key!r}")
                if bound[pos] is not None:
                    raise InvalidInputError(
                        self.model, str(key), "each input once", f"{key!r} binds to an input already given"
                    )
                bound[pos] = value
            missing = [self.display(i) for i, v in enumerate(bound) if v is None]
            if missing:
                raise InvalidInputError(self.model, missing[0], self.expected, f"no value for {missing}")
        elif isinstance(inputs, Sequence) and not isinstance(inputs, (str, bytes)):
            bound = list(inputs)
            if len(bound) != n:
                raise InvalidInputError(self.model, None, f"{n} {self.expected}", f"{len(bound)} positional inputs")
        else:
            raise InvalidInputError(
                self.model, None, "a dict of name -> tensor, or a list of tensors", type(inputs).__name__
            )
        return [self._check(i, v) for i, v in enumerate(bound)]

    def _check(self, pos: int, value: Any) -> torch.Tensor:
        name = self.display(pos)
        if isinstance(value, np.ndarray):
            try:
                value = torch.from_numpy(value)
            except TypeError:
                raise InvalidInputError(
                    self.model, name, "a tensor of a supported dtype", f"numpy {value.dtype}"
                ) from None
        if not isinstance(value, torch.Tensor):
            raise InvalidInputError(self.model, name, "a torch.Tensor", _describe(value))
        if value.device.type not in ("cpu", "cuda"):
            raise InvalidInputError(self.model, name, "a CPU or CUDA tensor", _describe(value))
        if value.dtype not in _WIRE_DTYPES or value.layout != torch.strided or value.is_quantized:
            raise InvalidInputError(self.model, name, "a dense tensor of a supported dtype", _describe(value))
        spec = self.specs[pos]
        if spec is not None:
            if value.dtype != spec.torch_dtype:
                raise InvalidInputError(
                    self.model, name, f"dtype {spec.dtype}", f"dtype {str(value.dtype).removeprefix('torch.')}"
                )
            if spec.dims is not None:
                self._check_shape(name, spec, tuple(value.shape))
        return value

    def _check_shape(self, name: str, spec: TensorSpec, shape: tuple[int, ...]) -> None:
        dims = tuple(spec.dims or ())
        if self.max_batch_size > 0:
            dims = (-1, *dims)
        ok = len(shape) == len(dims) and all(d == -1 or d == s for d, s in zip(dims, shape))
        if ok and self.max_batch_size > 0 and shape[0] > self.max_batch_size:
            raise InvalidInputError(
                self.model, name, f"at most max_batch_size={self.max_batch_size} rows", f"{shape[0]} rows"
            )
        if not ok:
            raise InvalidInputError(self.model, name, f"shape {list(dims)} (-1: any size)", f"shape {list(shape)}")

    def output_names(self, count: int) -> list[str]:
        """Names for a result of ``count`` tensors (cached per count)."""
        names = self._output_names.get(count)
        if names is None:
            names = [f"OUTPUT__{i}" for i in range(count)]
            indexed = [(_index(s.name), s.name) for s in self._outputs]
            if indexed and all(i is not None for i, _ in indexed):
                for i, name in indexed:
                    if i is not None and i < count:
                        names[i] = name
            else:
                for i, spec in enumerate(self._outputs[:count]):
                    names[i] = spec.name
            self._output_names[count] = names
        return names

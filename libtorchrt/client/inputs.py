"""A ``Client``'s inputs, checked and converted as they will cross the wire (client process).

Run in the caller's thread, before anything is handed to the I/O thread: an input the
wire cannot carry is the caller's :class:`InvalidInputError` at once. The server checks
the rest against the model's configuration.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import InvalidInputError
from ..transport import tensors as tensor_io
from ..transport.dtypes import DTYPES
from ..transport.values import describe, is_stringlike

__all__ = ["Inputs", "normalize"]

Inputs = Mapping[str, Any] | Sequence[Any] | torch.Tensor | np.ndarray

_WIRE_DTYPES = frozenset(DTYPES.values())


def _strings(model: str, name: str | None, value: Any) -> tensor_io.Strings:
    items = value.reshape(-1).tolist() if isinstance(value, np.ndarray) else value
    encoded = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            try:
                encoded.append(item.encode())
            except UnicodeEncodeError as e:
                raise InvalidInputError(model, name, "strings encodable as UTF-8", f"element {i}: {e.reason}") from None
        else:
            encoded.append(bytes(item))  # the server checks that it is UTF-8
    try:
        return tensor_io.Strings(encoded)
    except ValueError as e:
        raise InvalidInputError(model, name, "strings under 4 GiB each", str(e)) from None


def _value(model: str, name: str | None, value: Any) -> torch.Tensor | tensor_io.Strings:
    """One input as it crosses the wire: a CPU tensor, or encoded strings."""
    if is_stringlike(value):
        return _strings(model, name, value)
    if isinstance(value, np.ndarray):
        try:
            value = torch.from_numpy(value)
        except TypeError:
            raise InvalidInputError(model, name, "a tensor of a supported dtype", f"numpy {value.dtype}") from None
    if not isinstance(value, torch.Tensor):
        raise InvalidInputError(model, name, "a torch.Tensor", describe(value))
    if value.dtype not in _WIRE_DTYPES or value.layout != torch.strided or value.is_quantized:
        raise InvalidInputError(model, name, "a dense tensor of a supported dtype", describe(value))
    return value if value.device.type == "cpu" else value.cpu()


def normalize(model: str, inputs: Any) -> tuple[list[str] | None, bool, list[Any]]:
    """``(names, single, values)`` of a request's inputs, in the shapes the pool takes
    (see ``remote.Infer``), each value checked and converted by :func:`_value`."""
    if isinstance(inputs, (torch.Tensor, np.ndarray)) or (
        isinstance(inputs, (list, tuple)) and inputs and is_stringlike(inputs)
    ):
        return None, True, [_value(model, None, inputs)]
    if isinstance(inputs, Mapping):
        names = []
        for key in inputs:
            if not isinstance(key, str):
                raise InvalidInputError(model, str(key), "inputs named by str", f"a key of type {type(key).__name__}")
            names.append(key)
        return names, False, [_value(model, key, v) for key, v in inputs.items()]
    if isinstance(inputs, Sequence) and not isinstance(inputs, (str, bytes)):
        return None, False, [_value(model, f"INPUT__{i}", v) for i, v in enumerate(inputs)]
    raise InvalidInputError(model, None, "a dict of name -> tensor, or a list of tensors", type(inputs).__name__)

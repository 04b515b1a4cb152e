"""What a caller's input value is, told without knowing any model (any process).

The front's binder and the client both check what callers hand them before anything
crosses a process boundary; their error messages describe a value the same way, and
both tell strings (``TYPE_STRING`` inputs) from tensors the same way.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["describe", "is_stringlike"]


def describe(value: Any) -> str:
    """A value as an error message names it: dtype, shape and device for tensors."""
    if isinstance(value, torch.Tensor):
        return f"tensor {str(value.dtype).removeprefix('torch.')}{list(value.shape)} on {value.device}"
    if isinstance(value, np.ndarray):
        return f"numpy {value.dtype}{list(value.shape)}"
    return type(value).__name__


def is_stringlike(value: Any) -> bool:
    """Whether a value was given as strings: a list or tuple of ``str``/``bytes``, or a
    numpy array of them."""
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, (str, bytes)) for v in value)
    if isinstance(value, np.ndarray):
        kind = value.dtype.kind
        return kind in "US" or (kind == "O" and all(isinstance(v, (str, bytes)) for v in value.flat))
    return False

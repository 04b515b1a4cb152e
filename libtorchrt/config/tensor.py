"""Declared inputs and outputs: :class:`TensorSpec` and the data types (runs in the front).

A spec says what a request must carry (``dims``, Triton's ``dims``) and, when
``reshape`` is given, the shape the model itself takes (Triton's ``reshape``). Data
types are kept by their wire name (``"float32"``); Triton's ``TYPE_STRING`` is
``"string"``, which has no torch dtype: TorchScript takes it as ``List[str]``.
"""

from __future__ import annotations

import difflib
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath, PureWindowsPath

import torch

from ..errors import ConfigError
from ..transport.dtypes import DTYPES, KSERVE_DATATYPES, STRING, TRITON_DTYPES, dtype_name

__all__ = ["MAX_DIMS", "STRING", "TRITON_DTYPES", "TensorSpec", "dtype_of", "normalize_dtype", "triton_dtype"]

# STRING (the dtype name of Triton's TYPE_STRING) and TRITON_DTYPES (Triton's data types
# and the dtype names they stand for) come from the one dtype table, transport/dtypes.py.

# Triton's names without TYPE_, and the KServe names Triton's clients and HTTP/gRPC
# protocol use (the same but BYTES for STRING).
_SHORT = {k.removeprefix("TYPE_"): v for k, v in TRITON_DTYPES.items()} | KSERVE_DATATYPES
_TRITON_NAMES = {v: k for k, v in TRITON_DTYPES.items()}
_EXPECTED = f"expected one of {', '.join(TRITON_DTYPES)} (or a torch dtype)"


def _suggest(value: object) -> str:
    """' did you mean TYPE_FP32?' for a near miss (``TYPE_FLOAT32``, ``TYPE_FP23``), else ''."""
    if not isinstance(value, str):
        return ""
    text = value.strip().upper()
    names = [*TRITON_DTYPES, *(f"TYPE_{n.upper()}" for n in DTYPES), *(n.upper() for n in DTYPES)]
    close = difflib.get_close_matches(text, names, n=1, cutoff=0.7)
    if not close:
        return ""
    name = close[0]
    if not name.startswith("TYPE_"):
        name = name.lower()
    elif name not in TRITON_DTYPES:  # TYPE_FLOAT32: Triton spells it TYPE_FP32
        name = _TRITON_NAMES.get(name.removeprefix("TYPE_").lower(), name)
    return f" did you mean {name}?"


def normalize_dtype(value: str | torch.dtype, *, model: str = "?", where: str = "dtype") -> str:
    """Return the dtype name of a dtype given as torch dtype, wire name or Triton name.

    ``TYPE_STRING`` (also ``STRING``, ``BYTES``, ``string``) becomes ``"string"``.

    Raises:
        ConfigError: the dtype is not one libtorchrt can carry.
    """
    name = _dtype(value)
    if name is None:
        raise ConfigError(
            f"model {model!r}: {where} {value!r} is not supported;{_suggest(value)} {_EXPECTED}", model=model, key=where
        )
    return name


def _dtype(value: object) -> str | None:
    if isinstance(value, torch.dtype):
        try:
            return dtype_name(value)
        except KeyError:
            return None
    if isinstance(value, str):
        text = value.strip()
        if text in DTYPES or text == STRING:
            return text
        if text.upper() in TRITON_DTYPES:
            return TRITON_DTYPES[text.upper()]
        if text.upper() in _SHORT:
            return _SHORT[text.upper()]
        if text.removeprefix("torch.") in DTYPES:
            return text.removeprefix("torch.")
    return None


def dtype_of(value: str | torch.dtype, what: str) -> str:
    """:func:`normalize_dtype` for a field of a tensor or warm-up input (``what`` names it, if not empty).

    Raises:
        ConfigError: with ``key="data_type"``.
    """
    name = _dtype(value)
    if name is None:
        where = f"{what}: " if what else ""
        raise ConfigError(f"{where}data_type {value!r} is not supported;{_suggest(value)} {_EXPECTED}", key="data_type")
    return name


def triton_dtype(name: str) -> str:
    """Triton's name (``TYPE_FP32``) of a dtype name (``float32``).

    Raises:
        ConfigError: Triton has no such type (complex dtypes).
    """
    try:
        return _TRITON_NAMES[name]
    except KeyError:
        raise ConfigError(
            f"dtype {name!r} has no Triton data type; config.pbtxt can hold {', '.join(TRITON_DTYPES)}", key="data_type"
        ) from None


#: The most dimensions a tensor may have on every wire (wire.py, remote.py, kserve.py
#: refuse more): a declared shape with more can never be satisfied.
MAX_DIMS = 32


def _shape(value: Sequence[int], what: str, name: str) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(f"tensor {name!r}: {what} {value!r} must be a list of sizes", key=what)
    out = []
    for d in value:
        try:
            size = operator.index(d)  # ints, numpy ints; not floats or strings
        except TypeError:
            size = -2
        if isinstance(d, bool) or size < -1:
            raise ConfigError(f"tensor {name!r}: {what} {list(value)} may only hold sizes or -1", key=what)
        out.append(size)
    return tuple(out)


def _chunks(shape: Sequence[int]) -> list[int]:
    """Element counts of the runs of fixed sizes between the -1s of ``shape``."""
    out, n = [], 1
    for d in shape:
        if d == -1:
            out.append(n)
            n = 1
        else:
            n *= d
    out.append(n)
    return out


def _label_file(value: object, name: str) -> str | None:
    """A ``label_filename``: a file name inside the model's directory ('' is none, as
    in ``config.pbtxt``, where an unset string is empty)."""
    if not isinstance(value, str):
        raise ConfigError(f"tensor {name!r}: label_filename {value!r} must be a file name", key="label_filename")
    if not value:
        return None
    parts = PurePosixPath(value).parts
    if value.startswith(("/", "\\")) or ".." in parts or PureWindowsPath(value).drive:
        raise ConfigError(
            f"tensor {name!r}: label_filename {value!r} must name a file in the model's directory "
            "(no '/' prefix, no '..')",
            key="label_filename",
        )
    return value


@dataclass
class TensorSpec:
    """One declared input or output: name, dtype, dims (-1: any size), reshape, optional.

    ``dims`` excludes the batch dimension when the model's ``max_batch_size > 0``,
    as in Triton. ``dims=None`` accepts any shape (Python configurations only:
    ``config.pbtxt`` must give dims). ``reshape`` is the shape the model takes
    (outputs: gives) instead of ``dims``, with the same number of elements (as in
    Triton; ``()`` is a scalar, for ``dims=[1]``). ``optional`` inputs may be left
    out of a request. ``label_filename`` (outputs only, Triton's) names a file in the
    model's directory holding one class label per line, which the classification
    extension appends to each class it reports (docs/server.md).

    Raises:
        ConfigError: a bad dtype, dims or reshape (names the tensor).
    """

    name: str
    dtype: str | torch.dtype = "float32"
    dims: Sequence[int] | None = None
    optional: bool = False
    reshape: Sequence[int] | None = None
    label_filename: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"tensor name {self.name!r} is invalid; expected a non-empty string", key="name")
        self.dtype = dtype_of(self.dtype, f"tensor {self.name!r}")
        if self.dims is not None:
            self.dims = _shape(self.dims, "dims", self.name)
        if self.reshape is not None:
            self.reshape = _shape(self.reshape, "reshape", self.name)
            if self.dims is None:
                raise ConfigError(f"tensor {self.name!r}: reshape needs dims", key="reshape")
            self._check_reshape(self.dims, self.reshape)
        self.optional = bool(self.optional)
        if self.label_filename is not None:
            self.label_filename = _label_file(self.label_filename, self.name)

    def _check_reshape(self, dims: tuple[int, ...], reshape: tuple[int, ...]) -> None:
        # Triton's rule (model_config_utils.cc ValidateIOShape): the runs of fixed
        # sizes between -1s hold as many elements in both; reshape [] takes dims [1].
        if not reshape and math.prod(dims) == 1 and -1 not in dims:
            return
        if _chunks(dims) != _chunks(reshape):
            raise ConfigError(
                f"tensor {self.name!r}: reshape {list(reshape)} does not hold the elements of dims {list(dims)} "
                "(each run of sizes between -1s must hold as many elements in both)",
                key="reshape",
            )

    @property
    def is_string(self) -> bool:
        """True for ``TYPE_STRING``: a ``List[str]`` in TorchScript, no torch dtype."""
        return self.dtype == STRING

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype.

        Raises:
            ConfigError: the tensor is ``TYPE_STRING``, which has none.
        """
        if self.dtype == STRING:
            raise ConfigError(
                f"tensor {self.name!r} is TYPE_STRING, which has no torch dtype (TorchScript takes it as List[str])",
                key="data_type",
            )
        return DTYPES[str(self.dtype)]

    def model_shape(self, shape: Sequence[int], batched: bool) -> tuple[int, ...]:
        """The shape the model sees for a request tensor of ``shape`` (``reshape`` applied).

        Args:
            shape: the request tensor's shape (with the batch dimension if ``batched``).
            batched: the model's ``max_batch_size > 0``: dim 0 is kept as the batch.

        The -1s of ``reshape`` take the request's sizes at the -1s of ``dims``, in order.
        """
        shape = tuple(int(s) for s in shape)
        if self.reshape is None or self.dims is None:
            return shape
        lead, rest = (shape[:1], shape[1:]) if batched else ((), shape)
        free = iter([s for d, s in zip(self.dims, rest) if d == -1])
        return lead + tuple(next(free, 1) if d == -1 else d for d in self.reshape)

"""The data types libtorchrt carries, in one table (used in every process).

One row per dtype: its *wire name* (what a tensor descriptor carries and what a
configuration keeps, ``"float32"``), its torch dtype, Triton's ``config.pbtxt`` name
(``TYPE_FP32``), its KServe v2 (Open Inference Protocol) datatype (``FP32``), its numpy
dtype and the size of one element. Every other mapping between these names is derived
from :data:`TABLE`.

A *string tensor* (Triton's ``TYPE_STRING``, KServe's ``BYTES``, TorchScript's
``List[str]``) is the last row, :data:`STRING`: it has no torch or numpy dtype and no
fixed element size. Complex dtypes cross libtorchrt's own wire only: neither Triton nor
KServe has them. numpy has no bfloat16.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "DTYPES",
    "ITEMSIZES",
    "KSERVE_DATATYPES",
    "NUMPY_DTYPES",
    "STRING",
    "TABLE",
    "TRITON_DTYPES",
    "DType",
    "dtype_name",
]

#: The wire name of a string tensor (a ``List[str]``): not a torch dtype, so not in DTYPES.
STRING = "string"


class DType(NamedTuple):
    """One data type under each of its names."""

    #: the wire name
    name: str
    #: None for a string tensor
    torch: torch.dtype | None
    #: Triton's ``data_type`` (``TYPE_FP32``); None: Triton has no such type
    triton: str | None
    #: the KServe v2 ``datatype`` (``FP32``); None: KServe has no such type
    kserve: str | None
    #: None where numpy has no such dtype (bfloat16, strings)
    numpy: np.dtype | None
    #: bytes per element (0 for a string tensor, whose elements vary)
    itemsize: int


#: Every data type, in the order error messages list them.
TABLE: tuple[DType, ...] = (
    DType("bool", torch.bool, "TYPE_BOOL", "BOOL", np.dtype("bool"), 1),
    DType("uint8", torch.uint8, "TYPE_UINT8", "UINT8", np.dtype("uint8"), 1),
    DType("int8", torch.int8, "TYPE_INT8", "INT8", np.dtype("int8"), 1),
    DType("int16", torch.int16, "TYPE_INT16", "INT16", np.dtype("int16"), 2),
    DType("int32", torch.int32, "TYPE_INT32", "INT32", np.dtype("int32"), 4),
    DType("int64", torch.int64, "TYPE_INT64", "INT64", np.dtype("int64"), 8),
    DType("float16", torch.float16, "TYPE_FP16", "FP16", np.dtype("float16"), 2),
    DType("bfloat16", torch.bfloat16, "TYPE_BF16", "BF16", None, 2),
    DType("float32", torch.float32, "TYPE_FP32", "FP32", np.dtype("float32"), 4),
    DType("float64", torch.float64, "TYPE_FP64", "FP64", np.dtype("float64"), 8),
    DType("complex64", torch.complex64, None, None, np.dtype("complex64"), 8),
    DType("complex128", torch.complex128, None, None, np.dtype("complex128"), 16),
    DType(STRING, None, "TYPE_STRING", "BYTES", None, 0),
)

#: The torch dtypes that may cross the wire, by their wire name.
DTYPES: dict[str, torch.dtype] = {d.name: d.torch for d in TABLE if d.torch is not None}
_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
#: Bytes per element of each torch dtype's wire name.
ITEMSIZES: dict[str, int] = {d.name: d.itemsize for d in TABLE if d.torch is not None}
#: The numpy dtype of each torch dtype numpy also has.
NUMPY_DTYPES: dict[torch.dtype, np.dtype] = {
    d.torch: d.numpy for d in TABLE if d.torch is not None and d.numpy is not None
}
#: Triton's data types and the wire names they stand for.
TRITON_DTYPES: dict[str, str] = {d.triton: d.name for d in TABLE if d.triton is not None}
#: KServe's data types and the wire names they stand for.
KSERVE_DATATYPES: dict[str, str] = {d.kserve: d.name for d in TABLE if d.kserve is not None}


def dtype_name(dtype: torch.dtype) -> str:
    """Return the wire name of ``dtype``.

    Raises:
        KeyError: the dtype cannot cross the wire (e.g. quantized types).
    """
    return _NAMES[dtype]

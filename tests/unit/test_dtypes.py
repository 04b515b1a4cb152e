"""The one dtype table (``transport.dtypes``) against torch, numpy, and the names every
other module derives from it (or still keeps a copy of, until it imports it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from libtorchrt.config import tensor as config_tensor
from libtorchrt.transport import dtypes, tensors, wire
from libtorchrt.transport.dtypes import STRING, TABLE, DType

TENSOR_ROWS = [d for d in TABLE if d.torch is not None]


@pytest.mark.parametrize("row", TENSOR_ROWS, ids=lambda d: d.name)
def test_each_row_agrees_with_torch_and_numpy(row: DType) -> None:
    assert row.torch is not None
    assert str(row.torch) == f"torch.{row.name}"
    assert torch.empty((), dtype=row.torch).element_size() == row.itemsize
    if row.numpy is None:
        assert row.name == "bfloat16"  # numpy has none
    else:
        assert row.numpy == np.dtype(row.name) and row.numpy.itemsize == row.itemsize
        assert torch.from_numpy(np.zeros(1, dtype=row.numpy)).dtype == row.torch


def test_each_name_appears_once_per_column() -> None:
    for column in ("name", "torch", "triton", "kserve"):
        values = [getattr(d, column) for d in TABLE if getattr(d, column) is not None]
        assert len(values) == len(set(values)), column


def test_the_string_row_has_no_torch_dtype() -> None:
    assert TABLE[-1] == DType(STRING, None, "TYPE_STRING", "BYTES", None, 0)
    assert STRING not in dtypes.DTYPES and STRING not in dtypes.ITEMSIZES


def test_the_derived_maps() -> None:
    assert list(dtypes.DTYPES) == [d.name for d in TENSOR_ROWS]
    for name, dtype in dtypes.DTYPES.items():
        assert dtypes.dtype_name(dtype) == name
    with pytest.raises(KeyError):
        dtypes.dtype_name(torch.qint8)
    assert torch.bfloat16 not in dtypes.NUMPY_DTYPES and len(dtypes.NUMPY_DTYPES) == len(TENSOR_ROWS) - 1
    # Triton and KServe have no complex types
    assert list(dtypes.TRITON_DTYPES.values()) == [d.name for d in TABLE if not d.name.startswith("complex")]
    assert dtypes.TRITON_DTYPES["TYPE_FP32"] == "float32" and dtypes.KSERVE_DATATYPES["BYTES"] == STRING
    assert {k.removeprefix("TYPE_") for k in dtypes.TRITON_DTYPES} ^ set(dtypes.KSERVE_DATATYPES) == {"STRING", "BYTES"}


def test_the_old_names_are_the_tables() -> None:
    assert wire.DTYPES is dtypes.DTYPES and wire.STRING == STRING and wire.dtype_name is dtypes.dtype_name
    assert config_tensor.TRITON_DTYPES is dtypes.TRITON_DTYPES and config_tensor.STRING == STRING
    assert tensors._NUMPY is dtypes.NUMPY_DTYPES


def test_kserve_and_bench_use_the_table() -> None:
    from libtorchrt.bench.remote import KSERVE_DTYPES
    from libtorchrt.server import kserve

    assert kserve.DATATYPES is dtypes.KSERVE_DATATYPES
    # every KServe tensor type decodes to its torch dtype, and bfloat16 (no numpy dtype)
    # travels as its 16 raw bits
    assert {k: kserve._TORCH[v] for k, v in kserve.DATATYPES.items() if v != STRING} == {
        d.kserve: d.torch for d in TENSOR_ROWS if d.kserve is not None
    }
    assert kserve._NUMPY["bfloat16"].itemsize == 2
    assert {d.torch: d.kserve for d in TENSOR_ROWS if d.kserve is not None} == KSERVE_DTYPES


@pytest.mark.parametrize("name", ["TYPE_FP16", "FP16", "float16", "torch.float16", "BYTES", "TYPE_STRING", "STRING"])
def test_config_still_reads_every_spelling(name: str) -> None:
    expected = STRING if name in ("BYTES", "TYPE_STRING", "STRING") else "float16"
    assert config_tensor.normalize_dtype(name) == expected
    assert config_tensor.triton_dtype(expected) == ("TYPE_STRING" if expected == STRING else "TYPE_FP16")

"""A group's reply cut into its members' rows (front/groups.py, front only)."""

from __future__ import annotations

import pytest
import torch

from libtorchrt.errors import ProtocolError
from libtorchrt.front.groups import split_outputs


def test_each_member_gets_views_of_its_own_rows() -> None:
    out = torch.arange(12.0).reshape(6, 2)
    parts = split_outputs({"y": out, "z": out * 10}, [1, 3, 2])
    assert [p["y"].tolist() for p in parts] == [out[0:1].tolist(), out[1:4].tolist(), out[4:6].tolist()]
    assert [p["z"].shape[0] for p in parts] == [1, 3, 2]
    assert all(p["y"].untyped_storage().data_ptr() == out.untyped_storage().data_ptr() for p in parts)  # (views)


def test_strings_are_cut_by_rows_too() -> None:
    parts = split_outputs({"labels": ["a", "b", "c"]}, [2, 1])
    assert parts == [{"labels": ["a", "b"]}, {"labels": ["c"]}]


def test_a_group_of_one_keeps_its_outputs_as_they_are() -> None:
    out = {"y": torch.ones(3, 2)}
    assert split_outputs(out, [3]) == [out]


@pytest.mark.parametrize(
    ("value", "got"),
    [(torch.ones(4, 2), "shape [4, 2]"), (torch.tensor(1.0), "shape []"), (["a"], "1 strings"), (7, "int")],
    ids=["rows", "scalar", "strings", "other"],
)
def test_an_output_without_a_row_per_row_is_a_protocol_error(value: object, got: str) -> None:
    with pytest.raises(ProtocolError) as e:
        split_outputs({"y": value}, [1, 2])
    assert str(e.value).startswith(f"output 'y' of a request of 3 rows: {got}, not one row per row")

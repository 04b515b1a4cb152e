"""A model's results checked against its declared outputs (no processes)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from libtorchrt.transport.tensors import Strings
from libtorchrt.workers.outputs import DeclaredOutput, OutputMismatchError, check_outputs


def out(
    name: str = "y",
    dtype: str = "float32",
    shape: tuple[int, ...] | None = (1, 64),
    *,
    position: int = 0,
    batched: bool = False,
) -> DeclaredOutput:
    return DeclaredOutput(position, name, dtype, shape, batched)


def refused(outputs: list[Any], declared: list[DeclaredOutput]) -> str:
    with pytest.raises(OutputMismatchError) as info:
        check_outputs(outputs, declared)
    return str(info.value)


# ----------------------------------------------------------------- DeclaredOutput


@pytest.mark.parametrize(
    "declared",
    [
        out(),
        out("z", "int64", (), position=3, batched=True),
        out("s", "string", (-1,), position=1),
        out("any", "bool", None, position=2, batched=True),
    ],
)
def test_declared_output_round_trips_through_json(declared: DeclaredOutput) -> None:
    item = declared.to_json()
    assert DeclaredOutput.from_json(item) == declared


def test_to_json_is_a_plain_list() -> None:
    assert out("y", "float32", (2, -1), position=1, batched=True).to_json() == [1, "y", "float32", [2, -1], True]
    assert out("y", "int8", None).to_json() == [0, "y", "int8", None, False]


def test_from_json_normalises_the_types() -> None:
    d = DeclaredOutput.from_json(("2", b"y".decode(), "int32", ["3", 4.0], 1))
    assert d == DeclaredOutput(2, "y", "int32", (3, 4), True)
    assert type(d.position) is int and type(d.shape) is tuple and type(d.batched) is bool
    assert all(type(x) is int for x in d.shape or ())
    assert DeclaredOutput.from_json([0, "y", "int32", None, 0]).batched is False


def test_from_json_refuses_a_wrong_number_of_fields() -> None:
    with pytest.raises(ValueError):
        DeclaredOutput.from_json([0, "y", "int32", None])


def test_declared_output_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        out().dtype = "int64"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("declared", "text"),
    [
        (out("y", "float32", (1, 64)), "float32[1, 64]"),
        (out("y", "float32", (1, 64), batched=True), "float32[batch, 1, 64]"),
        (out("y", "int64", (-1,)), "int64[-1]"),
        (out("y", "int64", ()), "int64[]"),
        (out("y", "int64", (), batched=True), "int64[batch]"),
        (out("y", "bool", None), "bool (any shape)"),
        (out("y", "bool", None, batched=True), "bool (any shape)"),
    ],
)
def test_describe(declared: DeclaredOutput, text: str) -> None:
    assert declared.describe() == text


# ------------------------------------------------------------------- check_outputs


def test_matching_outputs_pass() -> None:
    check_outputs([torch.zeros(1, 64)], [out()])
    check_outputs([torch.zeros(1, 64), torch.zeros(3, dtype=torch.int64)], [out(), out("z", "int64", (3,), position=1)])


def test_nothing_declared_checks_nothing() -> None:
    check_outputs([], [])
    check_outputs([torch.zeros(2, dtype=torch.int8), Strings.of(["a"])], [])


def test_undeclared_extra_outputs_are_not_checked() -> None:
    check_outputs([torch.zeros(1, 64), torch.zeros(5, dtype=torch.int8)], [out()])


def test_declared_positions_pick_the_result() -> None:
    outputs = [torch.zeros(2, dtype=torch.int8), torch.zeros(1, 64)]
    check_outputs(outputs, [out(position=1)])
    assert "returned int8[2]" in refused(outputs, [out(position=0)])


@pytest.mark.parametrize("returned", [0, 1, 2])
def test_too_few_outputs_name_what_came_back(returned: int) -> None:
    outputs = [torch.zeros(1, 64)] * returned
    message = refused(outputs, [out("z", position=returned)])
    assert message == (f"output 'z' is declared float32[1, 64] but the model returned only {returned} output(s)")


def test_a_missing_output_is_refused_even_when_an_earlier_one_matches() -> None:
    message = refused([torch.zeros(1, 64)], [out(), out("z", "int64", None, position=1)])
    assert message == "output 'z' is declared int64 (any shape) but the model returned only 1 output(s)"


def test_wrong_dtype_is_refused() -> None:
    message = refused([torch.zeros(2, 3, dtype=torch.int64)], [out()])
    assert message == "output 'y' is declared float32[1, 64] but the model returned int64[2, 3]"


@pytest.mark.parametrize(
    ("dtype", "name"),
    [(torch.bool, "bool"), (torch.bfloat16, "bfloat16"), (torch.float16, "float16"), (torch.uint8, "uint8")],
)
def test_dtype_names_are_the_wire_names(dtype: torch.dtype, name: str) -> None:
    check_outputs([torch.zeros(2, dtype=dtype)], [out("y", name, (2,))])
    assert refused([torch.zeros(2, dtype=dtype)], [out("y", "float32", (2,))]).endswith(f"returned {name}[2]")


@pytest.mark.parametrize(
    ("shape", "declared"),
    [
        ((2, 3), (2, 3)),
        ((2, 3), (-1, 3)),
        ((7, 3), (-1, -1)),
        ((), ()),
        ((0, 3), (0, 3)),
        ((0, 3), (-1, 3)),
    ],
)
def test_shapes_that_fit(shape: tuple[int, ...], declared: tuple[int, ...]) -> None:
    check_outputs([torch.zeros(shape)], [out("y", "float32", declared)])


@pytest.mark.parametrize(
    ("shape", "declared"),
    [
        ((2, 3), (3, 2)),
        ((2, 3), (2, 4)),
        ((2, 3), (2, 3, 1)),
        ((2, 3, 1), (2, 3)),
        ((2,), ()),
        ((), (1,)),
        ((2, 3), (-1,)),
        ((1, 2, 3), (-1, 3)),
    ],
)
def test_shapes_that_do_not_fit(shape: tuple[int, ...], declared: tuple[int, ...]) -> None:
    message = refused([torch.zeros(shape)], [out("y", "float32", declared)])
    assert message.endswith(f"returned float32{list(shape)}")


def test_batched_outputs_skip_the_batch_dimension() -> None:
    for batch in (1, 4, 0):
        check_outputs([torch.zeros(batch, 64)], [out("y", "float32", (64,), batched=True)])
        check_outputs([torch.zeros(batch, 2, 5)], [out("y", "float32", (2, -1), batched=True)])
    check_outputs([torch.zeros(3)], [out("y", "float32", (), batched=True)])


def test_batched_outputs_are_refused_when_the_rest_does_not_fit() -> None:
    message = refused([torch.zeros(4, 63)], [out("y", "float32", (64,), batched=True)])
    assert message == "output 'y' is declared float32[batch, 64] but the model returned float32[4, 63]"
    assert refused([torch.zeros(4)], [out("y", "float32", (64,), batched=True)]).endswith("returned float32[4]")
    assert refused([torch.zeros(64)], [out("y", "float32", (1, 64), batched=True)]).endswith("float32[64]")


def test_a_batched_scalar_is_refused() -> None:
    # no batch dimension to skip
    message = refused([torch.zeros(())], [out("y", "float32", (), batched=True)])
    assert message == "output 'y' is declared float32[batch] but the model returned float32[]"


def test_any_shape_still_checks_the_dtype() -> None:
    for shape in [(), (5,), (2, 3, 4)]:
        check_outputs([torch.zeros(shape)], [out("y", "float32", None)])
        check_outputs([torch.zeros(shape)], [out("y", "float32", None, batched=True)])
    message = refused([torch.zeros((2,), dtype=torch.int32)], [out("y", "float32", None)])
    assert message == "output 'y' is declared float32 (any shape) but the model returned int32[2]"


def test_a_list_of_strings_passes_a_string_declaration_whatever_its_shape() -> None:
    strings = Strings.of(["a", "bc", "d"])
    for shape in [(3,), (1, 3), (-1,), (7,), None]:
        check_outputs([strings], [out("s", "string", shape)])
        check_outputs([strings], [out("s", "string", shape, batched=True)])


def test_a_list_of_strings_is_refused_for_a_tensor_declaration() -> None:
    message = refused([Strings.of(["a"])], [out("y", "float32", (1,))])
    assert message == "output 'y' is declared float32[1] but the model returned a list of strings"


def test_a_tensor_is_refused_for_a_string_declaration() -> None:
    message = refused([torch.zeros(2)], [out("s", "string", (2,))])
    assert message == "output 's' is declared string[2] but the model returned float32[2]"


def test_a_later_mismatch_is_found_after_a_string_output() -> None:
    outputs = [Strings.of(["a"]), torch.zeros(2, dtype=torch.int64)]
    declared = [out("s", "string", (1,)), out("z", "float32", (2,), position=1)]
    assert refused(outputs, declared) == "output 'z' is declared float32[2] but the model returned int64[2]"

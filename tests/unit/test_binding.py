"""Binding request inputs to a model's arguments, and naming its outputs (front only)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch

from libtorchrt import ConfigError, InvalidInputError, ModelConfig, TensorSpec
from libtorchrt.front.binding import Binder
from libtorchrt.transport.tensors import Strings
from libtorchrt.transport.wire import decode_strings


def binder(
    args: Sequence[str] = ("a", "b"),
    inputs: Sequence[TensorSpec] = (),
    outputs: Sequence[TensorSpec] = (),
    max_batch_size: int = 0,
    dict_input: bool = False,
) -> Binder:
    cfg = ModelConfig(name="m", path="m.pt", inputs=inputs, outputs=outputs, max_batch_size=max_batch_size)
    return Binder(cfg, list(args), dict_input=dict_input)


def refused(b: Binder, inputs: Any) -> InvalidInputError:
    with pytest.raises(InvalidInputError) as e:
        b.bind(inputs)
    assert e.value.model == "m"
    assert str(e.value).startswith(f"input {e.value.input!r}" if e.value.input else "inputs of model 'm'")
    return e.value


A = torch.ones(2, 3)
B = torch.zeros(4, dtype=torch.int64)


# ---------------------------------------------------------------------- binding


def test_bind_by_argument_name_in_any_key_order() -> None:
    out = binder().bind({"b": B, "a": A})
    assert out[0] is A and out[1] is B


def test_bind_by_index_suffix() -> None:
    out = binder().bind({"INPUT__1": B, "INPUT__0": A})
    assert out[0] is A and out[1] is B
    out = binder().bind({"anything__0": A, "b": B})
    assert out[0] is A and out[1] is B


def test_position_finds_an_input_as_bind_does() -> None:
    b = binder()
    assert [b.position(k) for k in ("a", "b", "INPUT__0", "INPUT__1", "anything__1")] == [0, 1, 0, 1, 1]
    assert [b.position(k) for k in ("c", "INPUT__2", "INPUT")] == [None, None, None]
    declared = binder(inputs=[TensorSpec("x", "float32", [2, 3]), TensorSpec("y", "int64", [4])])
    assert [declared.position(k) for k in ("x", "y", "INPUT__1")] == [0, 1, 1]


@pytest.mark.parametrize("container", [list, tuple])
def test_bind_positionally(container: type) -> None:
    out = binder().bind(container([A, B]))
    assert out[0] is A and out[1] is B


def test_a_single_tensor_binds_to_a_one_argument_model() -> None:
    (out,) = binder(["x"]).bind(A)
    assert out is A


def test_numpy_arrays_become_tensors_sharing_memory() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([True, False])
    out = binder().bind({"a": a, "b": b})
    assert out[0].dtype == torch.float32 and out[0].shape == (2, 3)
    assert out[1].dtype == torch.bool
    a[0, 0] = 42.0
    assert out[0][0, 0].item() == 42.0  # no copy
    (single,) = binder(["x"]).bind(np.zeros(3, dtype=np.int16))
    assert single.dtype == torch.int16


def test_bind_by_declared_input_name() -> None:
    b = binder(["a", "b"], inputs=[TensorSpec("first"), TensorSpec("second", "int64")])
    out = b.bind({"second": B, "first": A})
    assert out[0] is A and out[1] is B


# ----------------------------------------------------------------------- errors


def test_unknown_key() -> None:
    e = refused(binder(), {"a": A, "c": B})
    assert e.input == "c"
    assert "'a'" in e.expected and "'b'" in e.expected
    assert "unknown input 'c'" in e.got


def test_index_beyond_the_arguments_is_unknown() -> None:
    e = refused(binder(), {"a": A, "INPUT__2": B})
    assert e.input == "INPUT__2"


def test_non_string_key_is_unknown() -> None:
    e = refused(binder(), {0: A, "b": B})
    assert e.input == "0"


def test_missing_key() -> None:
    e = refused(binder(), {"a": A})
    assert e.input == "b"
    assert "no value for ['b']" in e.got


def test_duplicate_binding() -> None:
    e = refused(binder(), {"a": A, "INPUT__0": A, "b": B})
    assert e.input == "INPUT__0"
    assert e.expected == "each input once"
    assert "already given" in e.got


def test_a_dict_seen_before_is_still_checked_in_full() -> None:
    # A dict of names whose tensors were accepted before is bound at once (no second
    # check); what that shortcut does not cover must still be refused as before.
    # (each argument has two names: its own, and the INPUT__<i> spec placed on it)
    specs = [TensorSpec("INPUT__0", "float32", [2, 3]), TensorSpec("INPUT__1", "int64", [4])]
    b = binder(args=("a", "b"), inputs=specs)
    assert b.bind({"a": A, "b": B}) == [A, B]
    assert b.bind({"INPUT__1": B, "a": A}) == [A, B]  # (the shortcut: other names, other order)
    assert refused(b, {"a": A, "INPUT__0": A}).expected == "each input once"
    assert refused(b, {"INPUT__0": A, "a": A}).expected == "each input once"
    assert "unknown input 'c'" in refused(b, {"a": A, "c": B}).got
    assert refused(b, {"a": A, "b": B.float()}).input == "INPUT__1"  # (a dtype not accepted there)
    assert refused(b, {"a": B, "b": A}).input == "INPUT__0"  # (each accepted, at the other name)


@pytest.mark.parametrize("inputs", [[A], [A, B, B], []], ids=["1", "3", "0"])
def test_wrong_positional_count(inputs: list[torch.Tensor]) -> None:
    e = refused(binder(), inputs)
    assert e.input is None
    assert e.expected.startswith("2 inputs")
    assert e.got == f"{len(inputs)} positional inputs"


def test_a_single_tensor_for_a_two_argument_model_is_a_wrong_count() -> None:
    e = refused(binder(), A)
    assert e.input is None and e.got == "1 positional inputs"


@pytest.mark.parametrize("inputs", ["ab", b"ab", 3, None, {A}], ids=["str", "bytes", "int", "none", "set"])
def test_neither_mapping_nor_sequence(inputs: Any) -> None:
    e = refused(binder(), inputs)
    assert e.input is None
    assert e.got == type(inputs).__name__


@pytest.mark.parametrize("value, got", [([1.0, 2.0], "list"), (3.0, "float"), ("x", "str"), (np.float32(1), "float32")])
def test_non_tensor_value(value: Any, got: str) -> None:
    e = refused(binder(), {"a": value, "b": B})
    assert e.input == "a"
    assert e.expected == "a torch.Tensor"
    assert e.got == got


def test_meta_device_tensor() -> None:
    e = refused(binder(), {"a": torch.empty(2, device="meta"), "b": B})
    assert e.input == "a"
    assert e.expected == "a CPU or CUDA tensor"
    assert "meta" in e.got


def _unsupported() -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # complex32 is experimental; quantized creation deprecated
        return {
            "complex32": torch.zeros(2, dtype=torch.complex32),
            "uint16": torch.zeros(2, dtype=torch.uint16),
            "float8": torch.zeros(2, dtype=torch.float8_e4m3fn),
            "quantized": torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8),
            "sparse-coo": torch.eye(2).to_sparse(),
        }


@pytest.mark.parametrize("kind", list(_unsupported()))
def test_unsupported_dtype_or_layout(kind: str) -> None:
    value = _unsupported()[kind]
    e = refused(binder(), {"a": value, "b": B})
    assert e.input == "a"
    assert e.expected == "a dense tensor of a supported dtype"


def test_numpy_array_of_an_unsupported_dtype() -> None:
    e = refused(binder(), {"a": np.array(["2020-01-01"], dtype="datetime64[D]"), "b": B})
    assert e.input == "a" and e.got.startswith("numpy ")
    e = refused(binder(), {"a": np.array([1, "x"], dtype=object), "b": B})  # not all strings
    assert e.input == "a" and e.got.startswith("numpy ")
    e = refused(binder(), {"a": np.zeros(2, dtype=np.uint32), "b": B})
    assert e.input == "a"


def test_sparse_csr_tensor_is_refused() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        csr = torch.eye(2).to_sparse_csr()
    with pytest.raises(InvalidInputError):
        binder().bind({"a": csr, "b": B})


# ------------------------------------------------------------- declared inputs

SPECS = [TensorSpec("a", "float32", [2, -1]), TensorSpec("b", "int64", [4])]


def test_declared_specs_accept_matching_tensors() -> None:
    b = binder(inputs=SPECS)
    for width in (0, 1, 3, 100):
        out = b.bind({"a": torch.ones(2, width), "b": B})
        assert out[0].shape == (2, width)


def test_dtype_mismatch() -> None:
    e = refused(binder(inputs=SPECS), {"a": torch.ones(2, 3, dtype=torch.float64), "b": B})
    assert (e.input, e.expected, e.got) == ("a", "dtype float32", "dtype float64")


@pytest.mark.parametrize("shape", [(2,), (2, 3, 1), ()], ids=str)
def test_rank_mismatch(shape: tuple[int, ...]) -> None:
    e = refused(binder(inputs=SPECS), {"a": torch.ones(shape), "b": B})
    assert e.input == "a"
    assert e.expected == "shape [2, -1] (-1: any size)"
    assert e.got == f"shape {list(shape)}"


def test_fixed_dim_mismatch() -> None:
    e = refused(binder(inputs=SPECS), {"a": A, "b": torch.zeros(5, dtype=torch.int64)})
    assert (e.input, e.got) == ("b", "shape [5]")
    e = refused(binder(inputs=SPECS), {"a": torch.ones(3, 3), "b": B})
    assert (e.input, e.got) == ("a", "shape [3, 3]")


def test_spec_without_dims_accepts_any_shape() -> None:
    b = binder(["x"], inputs=[TensorSpec("x", "int8")])
    for shape in [(), (0,), (3, 4, 5)]:
        b.bind([torch.zeros(shape, dtype=torch.int8)])
    e = refused(b, [torch.zeros(3)])
    assert e.got == "dtype float32"


def test_max_batch_size_adds_a_leading_batch_dim() -> None:
    b = binder(["x"], inputs=[TensorSpec("x", "float32", [3])], max_batch_size=4)
    for rows in (0, 1, 4):
        b.bind({"x": torch.ones(rows, 3)})
    e = refused(b, {"x": torch.ones(5, 3)})
    assert (e.input, e.got) == ("x", "5 rows")
    assert "max_batch_size=4" in e.expected
    e = refused(b, {"x": torch.ones(3)})  # the batch dimension is missing
    assert e.expected == "shape [-1, 3] (-1: any size)"
    e = refused(b, {"x": torch.ones(2, 4)})
    assert e.got == "shape [2, 4]"


def test_errors_name_the_declared_input() -> None:
    b = binder(["a", "b"], inputs=[TensorSpec("images", "float32", [3]), TensorSpec("labels", "int64", [1])])
    e = refused(b, {"images": torch.ones(4), "labels": torch.zeros(1, dtype=torch.int64)})
    assert e.input == "images"
    e = refused(b, {"images": torch.ones(3)})
    assert e.input == "labels"
    assert "'images'" in e.expected and "'labels'" in e.expected


def test_declared_indexed_inputs_map_by_their_index() -> None:
    b = binder(["a", "b"], inputs=[TensorSpec("X__1", "int64", [4]), TensorSpec("Y__0", "float32", [2, 3])])
    out = b.bind({"X__1": B, "Y__0": A})
    assert out[0] is A and out[1] is B
    e = refused(b, [B, A])  # positional order is the model's: Y first
    assert e.input == "Y__0"


def test_a_spec_bound_by_name_is_not_replaced_by_a_positional_one() -> None:
    try:
        b = binder(["a", "b"], inputs=[TensorSpec("b", "float32", [2]), TensorSpec("zzz", "float32", [3])])
    except (ConfigError, InvalidInputError):
        return  # refusing the inconsistent configuration is fine too
    out = b.bind({"a": torch.ones(3), "b": torch.ones(2)})  # "b" must be checked against its own spec
    assert out[1].shape == (2,)


# ------------------------------------------------------------------ output names


def test_default_output_names() -> None:
    b = binder()
    assert b.output_names(1) == ["OUTPUT__0"]
    assert b.output_names(3) == ["OUTPUT__0", "OUTPUT__1", "OUTPUT__2"]
    assert b.output_names(0) == []


def test_configured_output_names_in_order() -> None:
    b = binder(outputs=[TensorSpec("sum"), TensorSpec("prod")])
    assert b.output_names(2) == ["sum", "prod"]
    assert b.output_names(3) == ["sum", "prod", "OUTPUT__2"]
    assert b.output_names(1) == ["sum"]


def test_configured_indexed_output_names_map_by_index() -> None:
    b = binder(outputs=[TensorSpec("X__1"), TensorSpec("Y__0")])
    assert b.output_names(2) == ["Y__0", "X__1"]
    assert b.output_names(1) == ["Y__0"]
    assert b.output_names(3) == ["Y__0", "X__1", "OUTPUT__2"]


def test_mixed_output_names_fall_back_to_order() -> None:
    b = binder(outputs=[TensorSpec("X__1"), TensorSpec("plain")])
    assert b.output_names(2) == ["X__1", "plain"]


def test_output_names_are_cached_per_count() -> None:
    b = binder(outputs=[TensorSpec("y")])
    assert b.output_names(2) is b.output_names(2)


# ------------------------------------------------------------------ TYPE_STRING


def strings_of(value: Any) -> list[str]:
    """The elements a bound Strings carries (decoded back from its wire encoding)."""
    assert isinstance(value, Strings)
    return decode_strings(value.blob, value.count)


TEXT = [TensorSpec("text", "TYPE_STRING", [-1])]


@pytest.mark.parametrize(
    "value, expected",
    [
        pytest.param(["ab", "cd"], ["ab", "cd"], id="list"),
        pytest.param(("ab",), ["ab"], id="tuple"),
        pytest.param([], [], id="empty"),
        pytest.param(["", "é", "日本", "a\x00b"], ["", "é", "日本", "a\x00b"], id="non-ascii"),
        pytest.param([b"ab", bytearray(b"c"), "d"], ["ab", "c", "d"], id="bytes"),
        pytest.param(np.array(["ab", "é"]), ["ab", "é"], id="numpy-unicode"),
        pytest.param(np.array([b"ab", b"c"]), ["ab", "c"], id="numpy-bytes"),
        pytest.param(np.array(["ab", b"c"], dtype=object), ["ab", "c"], id="numpy-object"),
    ],
)
def test_string_inputs_accept_lists_tuples_bytes_and_numpy(value: Any, expected: list[str]) -> None:
    (out,) = binder(["text"], inputs=TEXT).bind({"text": value})
    assert strings_of(out) == expected


def test_string_inputs_never_ask_for_a_torch_dtype() -> None:
    # TensorSpec.torch_dtype raises ConfigError for TYPE_STRING: binding must not call it.
    b = binder(["x", "text"], inputs=[TensorSpec("x", "float32", [-1]), *TEXT])
    x, text = b.bind({"x": torch.ones(2), "text": ["a"]})
    assert isinstance(x, torch.Tensor) and strings_of(text) == ["a"]
    e = refused(b, {"x": torch.ones(2), "text": torch.ones(2)})
    assert (e.input, e.expected) == ("text", "a list of str (TYPE_STRING)")


def test_a_list_of_strings_binds_to_a_one_input_model_on_its_own() -> None:
    (out,) = binder(["text"], inputs=TEXT).bind(["a", "b"])
    assert strings_of(out) == ["a", "b"]
    (out,) = binder(["text"], inputs=TEXT).bind([["a", "b"]])  # positionally
    assert strings_of(out) == ["a", "b"]
    (out,) = binder(["text"], inputs=TEXT).bind(np.array(["a"]))
    assert strings_of(out) == ["a"]


def test_undeclared_inputs_bind_to_strings_when_given_strings() -> None:
    a, b = binder().bind({"a": ["x"], "b": B})
    assert strings_of(a) == ["x"] and b is B
    (out,) = binder(["x"]).bind(np.array(["y", "z"]))
    assert strings_of(out) == ["y", "z"]
    (out,) = binder(["x"]).bind(np.array([["a", "b"], ["c", "d"]]))
    assert strings_of(out) == ["a", "b", "c", "d"], "row-major"


@pytest.mark.parametrize(
    "value, expected, got",
    [
        pytest.param(torch.zeros(2), "a list of str (TYPE_STRING)", "tensor float32[2] on cpu", id="tensor"),
        pytest.param("ab", "a list of str (TYPE_STRING)", "str", id="a-bare-str"),
        pytest.param(b"ab", "a list of str (TYPE_STRING)", "bytes", id="a-bare-bytes"),
        pytest.param({"ab"}, "a list of str (TYPE_STRING)", "set", id="set"),
        pytest.param(np.zeros(2), "a list of str (TYPE_STRING)", "numpy float64[2]", id="numpy-float"),
        pytest.param(["a", 1], "a list of str (TYPE_STRING)", "element 1 is int", id="int-element"),
        pytest.param([["a"]], "a list of str (TYPE_STRING)", "element 0 is list", id="nested-list"),
        pytest.param(np.array(["a", 1], dtype=object), "a list of str (TYPE_STRING)", "element 1 is int", id="np-obj"),
        pytest.param([b"\xff"], "str, or bytes in UTF-8", "element 0: invalid start byte at byte 0", id="not-utf8"),
        pytest.param(
            ["ok", "\udc80"], "strings encodable as UTF-8", "element 1: surrogates not allowed", id="surrogate"
        ),
    ],
)
def test_bad_string_values_are_refused_naming_the_input(value: Any, expected: str, got: str) -> None:
    e = refused(binder(["text"], inputs=TEXT), {"text": value})
    assert (e.input, e.expected, e.got) == ("text", expected, got)


def test_fixed_string_dims_check_the_count() -> None:
    b = binder(["text"], inputs=[TensorSpec("text", "TYPE_STRING", [3])])
    assert strings_of(b.bind({"text": ["a", "b", "c"]})[0]) == ["a", "b", "c"]
    for n in (0, 2, 4):
        e = refused(b, {"text": ["a"] * n})
        assert (e.input, e.expected, e.got) == ("text", "3 strings (dims [3])", f"{n} strings")


def test_string_dims_with_a_free_size_take_multiples_of_the_fixed_ones() -> None:
    b = binder(["text"], inputs=[TensorSpec("text", "TYPE_STRING", [-1, 2])])
    for n in (0, 2, 6):
        b.bind({"text": ["a"] * n})
    e = refused(b, {"text": ["a"] * 3})
    assert (e.expected, e.got) == ("a multiple of 2 strings (dims [-1, 2])", "3 strings")


def test_batched_strings_are_rows_up_to_max_batch_size() -> None:
    b = binder(["text"], inputs=[TensorSpec("text", "TYPE_STRING", [1])], max_batch_size=4)
    for n in (0, 1, 4):
        b.bind({"text": ["a"] * n})
    e = refused(b, {"text": ["a"] * 5})
    assert (e.input, e.expected, e.got) == ("text", "at most max_batch_size=4 rows", "5 rows")
    assert strings_of(b.bind({"text": np.array([["a"], ["b"]])})[0]) == ["a", "b"]  # [batch, *dims]
    e = refused(b, {"text": np.array([["a", "b"]])})
    assert (e.expected, e.got) == ("shape [-1, 1] (-1: any size)", "shape [1, 2]")
    e = refused(b, {"text": np.array([["a"]] * 5)})
    assert e.got == "5 rows"
    wide = binder(["text"], inputs=[TensorSpec("text", "TYPE_STRING", [2])], max_batch_size=2)
    wide.bind({"text": ["a"] * 4})
    assert refused(wide, {"text": ["a"] * 3}).got == "3 strings"
    assert refused(wide, {"text": ["a"] * 6}).got == "3 rows"


def test_strings_size_as_their_encoding() -> None:
    (out,) = binder(["text"], inputs=TEXT).bind({"text": ["ab", "é"]})
    assert out.numel() * out.element_size() == (4 + 2) + (4 + 2) and not out.is_cuda


# ------------------------------------------------------------- Dict[str, Tensor]

DICT_SPECS = [
    TensorSpec("a", "float32", [-1]),
    TensorSpec("b", "int64", [4]),
    TensorSpec("c", "float32", [-1], optional=True),
]


def dict_binder(inputs: Sequence[TensorSpec] = DICT_SPECS, **kwargs: Any) -> Binder:
    return binder(["inputs"], inputs=inputs, dict_input=True, **kwargs)


def test_a_dict_model_binds_its_tensors_then_their_keys() -> None:
    a = torch.ones(3)
    *values, keys = dict_binder().bind({"b": B, "a": a})
    assert strings_of(keys) == ["b", "a"]
    assert values[0] is B and values[1] is a
    *values, keys = dict_binder().bind({"a": a, "b": B, "c": a})  # the optional one too
    assert strings_of(keys) == ["a", "b", "c"] and len(values) == 3


def test_a_dict_models_keys_are_encoded_once_per_key_set() -> None:
    b = dict_binder()
    first = b.bind({"a": torch.ones(1), "b": B})[-1]
    assert b.bind({"a": torch.zeros(1), "b": B})[-1] is first
    assert b.bind({"b": B, "a": torch.zeros(1)})[-1] is not first


def test_a_dict_model_checks_the_declared_inputs() -> None:
    b = dict_binder()
    e = refused(b, {"a": torch.ones(1), "b": B, "INPUT__0": B})
    assert e.input == "INPUT__0" and e.got == "unknown input 'INPUT__0'"
    assert "Dict[str, Tensor]" in e.expected and "['a', 'b', 'c']" in e.expected
    e = refused(b, {"a": torch.ones(1)})
    assert (e.input, e.got) == ("b", "no value for ['b']")
    e = refused(b, {"a": torch.ones(1), "b": B.to(torch.int32)})
    assert (e.input, e.expected, e.got) == ("b", "dtype int64", "dtype int32")
    e = refused(b, {"a": torch.ones(1), "b": torch.zeros(5, dtype=torch.int64)})
    assert (e.input, e.got) == ("b", "shape [5]")
    e = refused(b, {"a": ["strings"], "b": B})
    assert (e.input, e.expected) == ("a", "a torch.Tensor")
    e = refused(b, {0: B})
    assert e.input == "0"


@pytest.mark.parametrize("inputs", [[torch.ones(1), B], torch.ones(1), "a"], ids=["list", "tensor", "str"])
def test_a_dict_model_takes_only_a_dict(inputs: Any) -> None:
    e = refused(dict_binder(), inputs)
    assert e.input is None and "Dict[str, Tensor]" in e.expected


def test_an_undeclared_dict_model_takes_any_names() -> None:
    b = dict_binder(inputs=())
    x = np.zeros(2, dtype=np.float32)
    *values, keys = b.bind({"anything": B, "x": x})
    assert strings_of(keys) == ["anything", "x"] and values[0] is B and values[1].dtype == torch.float32
    *values, keys = b.bind({})
    assert strings_of(keys) == [] and values == []
    e = refused(b, {"x": ["strings"]})
    assert (e.input, e.expected) == ("x", "a torch.Tensor")


def test_a_dict_model_refuses_an_input_declared_as_strings() -> None:
    e = refused(dict_binder(inputs=[TensorSpec("s", "TYPE_STRING", [-1])]), {"s": ["x"]})
    assert e.input == "s" and "Dict[str, Tensor]" in e.expected


def test_bound_strings_keep_the_requests_shape_for_row_counting() -> None:
    batched = binder(["text"], inputs=[TensorSpec("text", "TYPE_STRING", [2])], max_batch_size=4)
    (out,) = batched.bind({"text": ["a"] * 6})
    assert (out.shape, out.dim(), out.count) == ((3, 2), 2, 6)
    (out,) = batched.bind({"text": np.array([["a", "b"]], dtype=object)})
    assert out.shape == (1, 2)
    (out,) = binder(["text"], inputs=[TensorSpec("text", "TYPE_STRING", [3])]).bind({"text": ["a", "b", "c"]})
    assert out.shape == (3,)
    (out,) = binder(["text"], inputs=TEXT).bind({"text": ["a", "b"]})  # -1: only the count is known
    assert out.shape == (2,)


# ------------------------------------------------- checks remembered per shape


def test_a_remembered_shape_still_refuses_other_devices_layouts_and_dtypes() -> None:
    """Once a float32 [2, 2] CPU tensor has been accepted (and remembered), a sparse,
    meta-device, float64 or wider tensor in the same place is still refused, by each
    binding path (one tensor, a list, a dict)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparse = torch.eye(2).to_sparse()
    bad = {
        "sparse": sparse,
        "meta": torch.ones(2, 2, device="meta"),
        "float64": torch.ones(2, 2, dtype=torch.float64),
        "wider": torch.ones(2, 3),
    }
    one = binder(args=["a"], inputs=[TensorSpec("a", "float32", [2, 2])])
    two = binder(inputs=[TensorSpec("a", "float32", [2, 2]), TensorSpec("b", "int64", [4])])
    ok = torch.ones(2, 2)
    for _ in range(2):  # the second time from memory
        assert one.bind(ok)[0] is ok
        assert two.bind([ok, B])[0] is ok
    for name, value in bad.items():
        assert refused(one, value).input == "a", name
        assert refused(one, [value]).input == "a", name
        assert refused(two, {"a": value, "b": B}).input == "a", name


def test_a_reshaped_input_is_reshaped_every_time() -> None:
    b = binder(args=["a"], inputs=[TensorSpec("a", "float32", [4], reshape=[2, 2])])
    x = torch.arange(4, dtype=torch.float32)
    for _ in range(3):
        assert b.bind(x)[0].shape == (2, 2)


# ------------------------------- found by the mutation pass (docs/measurements/mutation.md)


def test_a_binder_takes_positional_arguments_unless_told_otherwise() -> None:
    b = Binder(ModelConfig(name="m", path="m.pt"), ["a", "b"])
    assert not b.dict_input
    assert b.bind([A, B]) == [A, B]


def test_declared_inputs_that_claim_a_taken_or_missing_position_take_the_free_ones() -> None:
    b = binder(args=("a", "b", "c"), inputs=[TensorSpec("x__0"), TensorSpec("y__0"), TensorSpec("z__3")])
    assert b.positions == {"a": 0, "b": 1, "c": 2, "x__0": 0, "y__0": 1, "z__3": 2}
    assert [b.display(i) for i in range(3)] == ["x__0", "y__0", "z__3"]
    b = binder(args=("a", "b"), inputs=[TensorSpec("x__2"), TensorSpec("y")])
    assert [b.display(i) for i in range(2)] == ["x__2", "y"]


def test_an_undeclared_numpy_input_binds_to_strings_only_when_it_holds_strings() -> None:
    b = binder(args=("a",))
    (got,) = b.bind({"a": np.array(["x", "yz"], dtype=object)})
    assert isinstance(got, Strings) and decode_strings(got.blob, got.count) == ["x", "yz"]
    (got,) = b.bind({"a": np.zeros(0, dtype=np.float32)})
    assert isinstance(got, torch.Tensor) and got.shape == (0,)


def test_a_single_tensor_is_not_taken_for_all_the_inputs_of_a_two_input_model() -> None:
    b = binder()
    b.bind([A, B])  # A's dtype and shape are now known good at position 0
    e = refused(b, A)
    assert (e.expected, e.got) == ("2 inputs ['a', 'b']", "1 positional inputs")


def test_a_tensor_seen_before_is_not_checked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    b = binder(args=("a",))
    checked: list[int] = []
    check_at = b._check_at

    def spy(pos: int, value: Any) -> Any:
        checked.append(pos)
        return check_at(pos, value)

    monkeypatch.setattr(b, "_check_at", spy)
    assert b.bind(A)[0] is A and b.bind(A)[0] is A and b.bind({"a": A})[0] is A and b.bind([A])[0] is A
    assert checked == [0]
    two = binder()
    monkeypatch.setattr(two, "_check_at", lambda pos, value: checked.append(pos) or value)
    checked.clear()
    two.bind([A, B])
    assert checked == [0, 1]  # the spy does not remember them


def test_strings_are_checked_every_time() -> None:
    b = binder(args=("s",), inputs=[TensorSpec("s", "string", [2])])
    assert b.bind([["a", "b"]])[0].count == 2
    assert refused(b, [["a", "b", "c"]]).got == "3 strings"


def test_what_a_request_that_is_neither_a_dict_nor_a_list_is_told() -> None:
    e = refused(binder(), 5)
    assert (e.input, e.expected, e.got) == (None, "a dict of name -> tensor, or a list of tensors", "int")


def test_what_a_dict_model_is_told() -> None:
    b = binder(args=("d",), inputs=[TensorSpec("x"), TensorSpec("s", "string")], dict_input=True)
    e = refused(b, [A])
    assert (e.input, e.expected, e.got) == (None, b.expected, "list")
    e = refused(b, {"x": A, "s": ["a"]})
    assert (e.input, e.expected, e.got) == (
        "s",
        "a tensor: the model takes one Dict[str, Tensor]",
        "an input declared TYPE_STRING",
    )
    e = refused(b, {})
    assert (e.input, e.expected, e.got) == ("x", b.expected, "no value for ['x', 's']")


def test_a_dict_key_that_is_not_valid_unicode_is_refused() -> None:
    b = binder(args=("d",), dict_input=True)
    e = refused(b, {"\udc80": A})
    assert (e.input, e.expected, e.got) == (None, "input names in valid Unicode", "('\\udc80',)")


def test_an_undeclared_string_input_is_named_in_its_errors() -> None:
    e = refused(binder(args=("a",)), {"a": ["ok", "\udc80"]})
    assert e.input == "a" and e.got.startswith("element 1: ")


def test_numpy_arrays_torch_cannot_hold_are_refused() -> None:
    e = refused(binder(args=("a",)), {"a": np.array(["2024-01-01"], dtype="datetime64[D]")})
    assert (e.input, e.expected, e.got) == ("a", "a tensor of a supported dtype", "numpy datetime64[D]")


def test_what_a_sparse_tensor_is_told() -> None:
    e = refused(binder(args=("a",)), {"a": torch.zeros(2).to_sparse()})
    assert (e.input, e.expected, e.got) == ("a", "a dense tensor of a supported dtype", "tensor float32[2] on cpu")


def test_32_dims_are_accepted_and_33_refused() -> None:
    b = binder(args=("a",))
    assert b.bind(torch.zeros([1] * 32))[0].dim() == 32
    e = refused(b, torch.zeros([1] * 33))
    assert (e.input, e.expected, e.got) == ("a", "at most 32 dims, each under 2**40", f"shape {[1] * 33}")


@pytest.mark.parametrize("size", [2**40, 2**41])
def test_an_empty_tensor_with_a_size_the_wire_cannot_carry_is_refused(size: int) -> None:
    b = binder(args=("a",))
    e = refused(b, torch.empty(0, size))
    assert (e.input, e.expected, e.got) == ("a", "at most 32 dims, each under 2**40", f"shape [0, {size}]")
    assert b.bind(torch.empty(0, 2**40 - 1))[0].shape == (0, 2**40 - 1)


def test_max_batch_size_1_is_a_batching_model() -> None:
    b = binder(args=("a",), inputs=[TensorSpec("a", "float32", [3])], max_batch_size=1)
    assert b.bind(torch.zeros(1, 3))[0].shape == (1, 3)
    e = refused(b, torch.zeros(2, 3))
    assert (e.expected, e.got) == ("at most max_batch_size=1 rows", "2 rows")
    r = binder(args=("a",), inputs=[TensorSpec("a", "float32", [2, 3], reshape=[6])], max_batch_size=1)
    assert r.bind(torch.zeros(1, 2, 3))[0].shape == (1, 6)
    s = binder(args=("s",), inputs=[TensorSpec("s", "string", [2])], max_batch_size=1)
    assert s.bind([["a", "b"]])[0].shape == (1, 2)
    e = refused(s, [["a", "b", "c", "d"]])
    assert (e.expected, e.got) == ("at most max_batch_size=1 rows", "2 rows")


def test_strings_of_a_zero_size_dimension() -> None:
    b = binder(args=("s",), inputs=[TensorSpec("s", "string", [-1, 0])])
    assert b.bind([[]])[0].count == 0
    e = refused(b, [["a"]])
    assert (e.input, e.expected, e.got) == ("s", "a multiple of 0 strings (dims [-1, 0])", "1 strings")
    batched = binder(args=("s",), inputs=[TensorSpec("s", "string", [0])], max_batch_size=4)
    assert batched.bind([[]])[0].shape == (0, 0)


def test_batched_strings_with_a_free_dimension_stay_flat() -> None:
    b = binder(args=("s",), inputs=[TensorSpec("s", "string", [-1])], max_batch_size=4)
    got = b.bind([["a", "b", "c"]])[0]
    assert got.shape == (3,) and got.count == 3


def test_a_string_array_of_the_wrong_shape_names_its_input() -> None:
    b = binder(args=("s",), inputs=[TensorSpec("s", "string", [2])])
    e = refused(b, {"s": np.array([["a"], ["b"], ["c"]])})
    assert (e.input, e.expected, e.got) == ("s", "shape [2] (-1: any size)", "shape [3, 1]")


def test_strings_the_wire_cannot_carry_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # (an element of 4 GiB: Strings refuses it; faked here rather than allocated)
    def too_big(items: Any, shape: Any = None) -> Strings:
        raise ValueError("a string of 4294967296 bytes; at most 4 GiB - 1 fit the wire format")

    monkeypatch.setattr("libtorchrt.front.binding.Strings", too_big)
    e = refused(binder(args=("s",), inputs=[TensorSpec("s", "string")]), [["a"]])
    assert (e.input, e.expected, e.got) == (
        "s",
        "strings under 4 GiB each",
        "a string of 4294967296 bytes; at most 4 GiB - 1 fit the wire format",
    )


# ------------------------------------------------------------------ shape_outputs


def test_reshaped_outputs_get_their_declared_dims_back() -> None:
    outputs = [TensorSpec("y", "float32", [2, 3], reshape=[6]), TensorSpec("z", "float32", [4])]
    b = binder(outputs=outputs)
    assert b.reshapes and not binder(outputs=[TensorSpec("z", "float32", [4])]).reshapes
    z = torch.zeros(4)
    got = b.shape_outputs({"y": torch.arange(6.0), "z": z})
    assert got["y"].shape == (2, 3) and got["y"].flatten().tolist() == list(range(6)) and got["z"] is z


def test_batched_reshaped_outputs_keep_their_batch_dimension() -> None:
    b = binder(outputs=[TensorSpec("y", "float32", [2, 3], reshape=[6])], max_batch_size=4)
    assert b.shape_outputs({"y": torch.zeros(5, 6)})["y"].shape == (5, 2, 3)
    free = binder(outputs=[TensorSpec("y", "float32", [-1, 6], reshape=[-1, 2, 3])], max_batch_size=4)
    assert free.shape_outputs({"y": torch.zeros(2, 4, 2, 3)})["y"].shape == (2, 4, 6)
    one = binder(outputs=[TensorSpec("y", "float32", [2, 3], reshape=[6])], max_batch_size=1)
    assert one.shape_outputs({"y": torch.zeros(1, 6)})["y"].shape == (1, 2, 3)
    scalar = torch.tensor(1.0)
    unbatched = binder(outputs=[TensorSpec("y", "float32", [1], reshape=[])])
    assert unbatched.shape_outputs({"y": scalar})["y"].shape == (1,)


def test_outputs_that_cannot_take_their_dims_are_left_as_the_model_made_them() -> None:
    b = binder(
        outputs=[
            TensorSpec("wrong", "float32", [2, 3], reshape=[6]),
            TensorSpec("two_free", "float32", [-1, -1], reshape=[-1, -1]),
            TensorSpec("s", "string", [2], reshape=[2]),
            TensorSpec("absent", "float32", [2], reshape=[2]),
        ]
    )
    wrong, two_free, s = torch.zeros(5), torch.zeros(3, 2), ["a", "b"]
    got = b.shape_outputs({"wrong": wrong, "two_free": two_free, "s": s})
    assert got == {"wrong": wrong, "two_free": two_free, "s": s}
    assert got["wrong"] is wrong and got["two_free"] is two_free and "absent" not in got

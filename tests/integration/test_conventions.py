"""Triton's binding conventions end to end: TYPE_STRING inputs and outputs, one
``Dict[str, Tensor]`` argument, and FREEZE_MODULE / OPTIMIZE_FOR_INFERENCE, with real
workers on TorchScript models this file defines."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from libtorchrt import InvalidInputError, ModelConfig, ModelError, Pool, TensorSpec, WorkerStartError
from tests import models
from tests.conftest import assert_no_leaks, snapshot

# ── models ─────────────────────────────────────────────────────────────────────


class Upper(nn.Module):
    """Upper-cases ASCII letters (TorchScript's str.upper()); other bytes stay."""

    def forward(self, text: list[str]) -> list[str]:
        return [t.upper() for t in text]


class Mixed(nn.Module):
    """A tensor and strings in; a tensor and strings out."""

    def forward(self, x: Tensor, text: list[str]) -> tuple[Tensor, list[str]]:
        lengths = torch.tensor([len(t) for t in text], dtype=torch.int64)
        return x * 2, [t + "!" for t in text] + [str(int(lengths.sum()))]


class DictInput(nn.Module):
    """Triton's dictionary convention: one Dict[str, Tensor] keyed by input names."""

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        out = inputs["a"] + 2 * inputs["b"]
        if "c" in inputs:
            out = out + 100 * inputs["c"]
        return out


class ConvBn(nn.Module):
    """What OPTIMIZE_FOR_INFERENCE folds: a convolution followed by batch norm."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.bn.running_mean.uniform_(-1, 1)
        self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.bn(self.conv(x)))


MODELS: dict[str, type[nn.Module]] = {"upper": Upper, "mixed": Mixed, "dict": DictInput, "convbn": ConvBn}


def _scripted(name: str) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        return torch.jit.script(MODELS[name]().eval())


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("conventions")
    out = {}
    for name in MODELS:
        out[name] = d / f"{name}.pt"
        _scripted(name).save(str(out[name]))
    return out


STRING = "TYPE_STRING"


@pytest.fixture(scope="module")
def pool(paths: dict[str, Path]) -> Iterator[Pool]:
    before = snapshot()
    configs = [
        ModelConfig(
            "upper",
            paths["upper"],
            inputs=[TensorSpec("text", STRING, [-1])],
            outputs=[TensorSpec("upper", STRING, [-1])],
        ),
        ModelConfig("upper-undeclared", paths["upper"]),
        ModelConfig("upper-three", paths["upper"], inputs=[TensorSpec("text", STRING, [3])]),
        ModelConfig("upper-batched", paths["upper"], inputs=[TensorSpec("text", STRING, [1])], max_batch_size=4),
        ModelConfig("upper-limited", paths["upper"], max_request_bytes=100),
        ModelConfig(
            "mixed",
            paths["mixed"],
            inputs=[TensorSpec("INPUT__0", "TYPE_FP32", [-1]), TensorSpec("INPUT__1", STRING, [-1])],
            outputs=[TensorSpec("doubled", "TYPE_FP32", [-1]), TensorSpec("shouted", STRING, [-1])],
        ),
        ModelConfig(
            "dict",
            paths["dict"],
            inputs=[
                TensorSpec("a", "TYPE_FP32", [-1]),
                TensorSpec("b", "TYPE_FP32", [-1]),
                TensorSpec("c", "TYPE_FP32", [-1], optional=True),
            ],
        ),
        ModelConfig("dict-undeclared", paths["dict"]),
    ]
    with Pool(models=configs) as p:
        yield p
    assert_no_leaks(before)


def refused(pool: Pool, model: str, inputs: object) -> InvalidInputError:
    with pytest.raises(InvalidInputError) as e:
        pool.infer(model, inputs, timeout=30)
    assert e.value.model == model
    return e.value


# ── TYPE_STRING ────────────────────────────────────────────────────────────────

TEXTS = [
    pytest.param(["hello", "world"], id="ascii"),
    pytest.param([], id="empty-list"),
    pytest.param(["", "", "x", ""], id="empty-strings"),
    pytest.param(["straße", "héllo wörld", "日本語", "emoji 🙂", "a\x00b"], id="non-ascii-and-nul"),
    pytest.param(["x" * 100_000, "y"], id="one-long-string"),
    pytest.param([f"item {i}" for i in range(20_000)], id="20k-strings"),  # ~250 KB: beyond the inline threshold
]


@pytest.mark.parametrize("text", TEXTS)
def test_strings_round_trip_as_the_model_computes_them(pool: Pool, text: list[str]) -> None:
    expected = _scripted("upper")(text)
    out = pool.infer("upper", {"text": text}, timeout=30)
    assert list(out) == ["upper"]
    assert out["upper"] == expected
    assert type(out["upper"]) is list and all(type(s) is str for s in out["upper"])


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(("ab", "cd"), id="tuple"),
        pytest.param([b"ab", "cd"], id="bytes-and-str"),
        pytest.param(np.array(["ab", "cd"]), id="numpy-unicode"),
        pytest.param(np.array([b"ab", b"cd"]), id="numpy-bytes"),
        pytest.param(np.array(["ab", b"cd"], dtype=object), id="numpy-object"),
    ],
)
def test_string_inputs_take_lists_tuples_bytes_and_numpy(pool: Pool, value: object) -> None:
    assert pool.infer("upper", {"text": value}, timeout=30)["upper"] == ["AB", "CD"]


def test_a_list_of_strings_binds_positionally_or_alone(pool: Pool) -> None:
    assert pool.infer("upper", [["ab"]], timeout=30)["upper"] == ["AB"]
    assert pool.infer("upper", ["ab", "cd"], timeout=30)["upper"] == ["AB", "CD"]  # a one-input model


def test_undeclared_string_inputs_bind_by_argument_name(pool: Pool) -> None:
    out = pool.infer("upper-undeclared", {"text": ["ab", "é"]}, timeout=30)
    assert out == {"OUTPUT__0": ["AB", "é"]}


def test_mixed_tensor_and_string_inputs_and_outputs(pool: Pool) -> None:
    x = torch.arange(3, dtype=torch.float32)
    text = ["ab", "", "日本"]
    out = pool.infer("mixed", {"INPUT__0": x, "INPUT__1": text}, timeout=30)
    assert list(out) == ["doubled", "shouted"]
    ref_x, ref_text = _scripted("mixed")(x, text)
    torch.testing.assert_close(out["doubled"], ref_x)
    assert out["shouted"] == ref_text == ["ab!", "!", "日本!", "8"]  # TorchScript's len() counts UTF-8 bytes
    out = pool.infer("mixed", [x, ("a",)], timeout=30)  # by position too
    assert out["shouted"] == ["a!", "1"]


def test_a_string_input_given_a_tensor_is_refused_naming_it(pool: Pool) -> None:
    e = refused(pool, "upper", {"text": torch.zeros(2)})
    assert e.input == "text" and "list of str" in e.expected and "tensor" in e.got
    e = refused(pool, "mixed", {"INPUT__0": torch.zeros(1), "INPUT__1": "not a list"})
    assert e.input == "INPUT__1" and e.got == "str"
    e = refused(pool, "mixed", {"INPUT__0": torch.zeros(1), "INPUT__1": np.zeros(2)})
    assert e.input == "INPUT__1" and "numpy float64" in e.got


@pytest.mark.parametrize(
    "value, got",
    [
        pytest.param(["ok", 3], "element 1 is int", id="int-element"),
        pytest.param(["ok", None], "element 1 is NoneType", id="none-element"),
        pytest.param([b"\xff\xfe"], "element 0", id="invalid-utf8-bytes"),
        pytest.param(["\ud800"], "element 0", id="lone-surrogate"),
    ],
)
def test_bad_string_elements_are_refused_naming_the_input(pool: Pool, value: list[object], got: str) -> None:
    e = refused(pool, "upper", {"text": value})
    assert e.input == "text" and e.got.startswith(got)


def test_strings_for_a_tensor_input_are_refused_naming_it(pool: Pool) -> None:
    e = refused(pool, "mixed", {"INPUT__0": ["1.0"], "INPUT__1": ["a"]})
    assert e.input == "INPUT__0" and e.expected == "a torch.Tensor"


def test_wrong_string_count_is_refused_naming_the_input(pool: Pool) -> None:
    assert pool.infer("upper-three", {"text": ["a", "b", "c"]}, timeout=30)["OUTPUT__0"] == ["A", "B", "C"]
    e = refused(pool, "upper-three", {"text": ["a", "b"]})
    assert (e.input, e.expected, e.got) == ("text", "3 strings (dims [3])", "2 strings")


def test_batched_strings_count_rows(pool: Pool) -> None:
    assert pool.infer("upper-batched", {"text": ["a"] * 4}, timeout=30)["OUTPUT__0"] == ["A"] * 4
    rows = np.array([["a"], ["b"]], dtype=object)  # [batch, *dims], as Triton's clients send
    assert pool.infer("upper-batched", {"text": rows}, timeout=30)["OUTPUT__0"] == ["A", "B"]
    e = refused(pool, "upper-batched", {"text": ["a"] * 5})
    assert (e.input, e.got) == ("text", "5 rows") and "max_batch_size=4" in e.expected
    e = refused(pool, "upper-batched", {"text": np.array([["a", "b"]])})
    assert e.input == "text" and e.got == "shape [1, 2]"


def test_undeclared_inputs_of_the_wrong_kind_are_the_callers_error(pool: Pool) -> None:
    # No configuration says what "text" is: the worker checks the method's schema.
    with pytest.raises(InvalidInputError, match="'text': the method takes a List\\[str\\]; got a tensor"):
        pool.infer("upper-undeclared", {"text": torch.zeros(2)}, timeout=30)
    assert pool.infer("upper-undeclared", [["ok"]], timeout=30)["OUTPUT__0"] == ["OK"]  # still serving


def test_max_request_bytes_counts_string_bytes(pool: Pool) -> None:
    # Each element counts its UTF-8 bytes plus its 4-byte length, as on the wire.
    assert pool.infer("upper-limited", [["x" * 96]], timeout=30)["OUTPUT__0"] == ["X" * 96]
    e = refused(pool, "upper-limited", [["x" * 97]])
    assert "max_request_bytes=100" in e.expected and e.got == "101 bytes"
    e = refused(pool, "upper-limited", [["é" * 49]])  # 98 bytes of UTF-8 for 49 characters
    assert e.got == "102 bytes"


# ── Dict[str, Tensor] ──────────────────────────────────────────────────────────


def test_a_dict_model_takes_the_declared_inputs_by_name(pool: Pool) -> None:
    a, b, c = torch.tensor([1.0, 2.0]), torch.tensor([10.0, 20.0]), torch.tensor([1.0, 1.0])
    for inputs in ({"a": a, "b": b}, {"b": b, "a": a}):
        torch.testing.assert_close(pool.infer("dict", inputs, timeout=30)["OUTPUT__0"], a + 2 * b)
    out = pool.infer("dict", {"c": c, "b": b, "a": a}, timeout=30)  # the optional one too
    torch.testing.assert_close(out["OUTPUT__0"], a + 2 * b + 100 * c)
    assert [w.inputs for w in pool.workers() if w.model == "dict"] == [("inputs",)]


def test_a_dict_model_checks_names_dtypes_and_presence(pool: Pool) -> None:
    a = torch.ones(2)
    e = refused(pool, "dict", {"a": a, "b": a, "zzz": a})
    assert e.input == "zzz" and "unknown input 'zzz'" in e.got and "'a'" in e.expected
    e = refused(pool, "dict", {"a": a})
    assert e.input == "b" and e.got == "no value for ['b']"
    e = refused(pool, "dict", {"a": a, "b": torch.ones(2, dtype=torch.float64)})
    assert (e.input, e.expected, e.got) == ("b", "dtype float32", "dtype float64")
    e = refused(pool, "dict", {"a": a, "b": torch.ones(2, 2)})
    assert e.input == "b" and e.got == "shape [2, 2]"
    e = refused(pool, "dict", {"a": a, "b": ["strings"]})
    assert e.input == "b" and e.expected == "a torch.Tensor"
    e = refused(pool, "dict", [a, a])  # a dict model binds by name only
    assert e.input is None and "Dict[str, Tensor]" in e.expected


def test_an_undeclared_dict_model_gets_whatever_names_the_request_gives(pool: Pool) -> None:
    a, b = torch.tensor([1.0]), torch.tensor([3.0])
    out = pool.infer("dict-undeclared", {"b": b, "a": a, "extra": torch.zeros(5, dtype=torch.int8)}, timeout=30)
    torch.testing.assert_close(out["OUTPUT__0"], a + 2 * b)
    with pytest.raises(ModelError):  # the model itself needs "b"
        pool.infer("dict-undeclared", {"a": a}, timeout=30)
    e = refused(pool, "dict-undeclared", {"a": a, "b": ["x"]})
    assert e.input == "b" and e.expected == "a torch.Tensor"


# ── FREEZE_MODULE / OPTIMIZE_FOR_INFERENCE ─────────────────────────────────────


@pytest.mark.parametrize("key", ["FREEZE_MODULE", "OPTIMIZE_FOR_INFERENCE"])
def test_frozen_models_give_the_same_outputs_and_report_it(make_pool, model_dir: Path, paths, key: str) -> None:  # type: ignore[no-untyped-def]
    plain = ModelConfig("plain", paths["convbn"])
    frozen = ModelConfig("frozen", paths["convbn"], parameters={key: "true"})
    tiny = ModelConfig("tiny", model_dir / "tiny.pt", parameters={key: "true"})
    strings = ModelConfig("upper", paths["upper"], parameters={key: "true"})
    pool = make_pool(plain, frozen, tiny, strings)
    flags = {w.model: w.flags for w in pool.workers()}
    assert flags["plain"]["FREEZE_MODULE"] is False and flags["plain"]["OPTIMIZE_FOR_INFERENCE"] is False
    for name in ("frozen", "tiny", "upper"):
        assert flags[name]["FREEZE_MODULE"] is True, "OPTIMIZE_FOR_INFERENCE freezes too"
        assert flags[name]["OPTIMIZE_FOR_INFERENCE"] is (key == "OPTIMIZE_FOR_INFERENCE")
    x = torch.randn(2, 3, 16, 16)
    want = pool.infer("plain", [x], timeout=30)["OUTPUT__0"]
    torch.testing.assert_close(pool.infer("frozen", [x], timeout=30)["OUTPUT__0"], want, rtol=1e-4, atol=1e-5)
    y = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(pool.infer("tiny", [y], timeout=30)["OUTPUT__0"], models.reference("tiny")(y))
    assert pool.infer("upper", [["frozen"]], timeout=30)["OUTPUT__0"] == ["FROZEN"]


def test_a_module_that_cannot_be_frozen_fails_to_start_naming_the_flag(make_pool, paths) -> None:  # type: ignore[no-untyped-def]
    cfg = ModelConfig("broken", paths["convbn"], parameters={"FREEZE_MODULE": "true", "MODULE_METHOD_NAME": "nope"})
    with pytest.raises(WorkerStartError, match="FREEZE_MODULE failed") as e:
        make_pool(cfg)
    assert "set FREEZE_MODULE to false" in str(e.value)


def test_string_and_dict_models_warm_up_with_zero_data(make_pool, paths) -> None:  # type: ignore[no-untyped-def]
    # WARMUP_RUNS builds zero-data requests from the declared inputs: empty strings here.
    upper = ModelConfig("upper", paths["upper"], inputs=[TensorSpec("text", STRING, [-1])], warmup_runs=2)
    dicts = ModelConfig(
        "dict",
        paths["dict"],
        inputs=[TensorSpec("a", "TYPE_FP32", [2]), TensorSpec("b", "TYPE_FP32", [2])],
        warmup_runs=1,
    )
    pool = make_pool(upper, dicts)
    assert pool.infer("upper", [["warm"]], timeout=30)["OUTPUT__0"] == ["WARM"]
    out = pool.infer("dict", {"a": torch.ones(2), "b": torch.ones(2)}, timeout=30)["OUTPUT__0"]
    torch.testing.assert_close(out, torch.full((2,), 3.0))

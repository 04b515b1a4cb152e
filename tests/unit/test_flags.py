"""Parsing execution-mode parameters (front side only; applying them needs a worker)."""

from __future__ import annotations

from typing import Any

import pytest

from libtorchrt import ConfigError, ModelConfig
from libtorchrt.workers import flags
from libtorchrt.workers.flags import BOOL_KEYS, INT_KEYS

TRUE_WORDS = ["true", "1", "yes", "on"]
FALSE_WORDS = ["false", "0", "no", "off"]


def spellings(word: str) -> list[str]:
    return sorted({word, word.upper(), word.capitalize(), word.swapcase(), f"  {word}\t"})


def test_key_lists_are_triton_s() -> None:
    assert set(BOOL_KEYS) == {
        "DISABLE_OPTIMIZED_EXECUTION",
        "INFERENCE_MODE",
        "ENABLE_NVFUSER",
        "ENABLE_JIT_EXECUTOR",
        "ENABLE_JIT_PROFILING",
        "ENABLE_TENSOR_FUSER",
        "DISABLE_CUDNN",
        "ENABLE_CACHE_CLEANING",
    }
    assert set(INT_KEYS) == {"INTRA_OP_THREAD_COUNT", "INTER_OP_THREAD_COUNT"}


@pytest.mark.parametrize("key", BOOL_KEYS)
@pytest.mark.parametrize("word, want", [(w, True) for w in TRUE_WORDS] + [(w, False) for w in FALSE_WORDS])
def test_bool_keys_accept_every_spelling_in_any_case(key: str, word: str, want: bool) -> None:
    for text in spellings(word):
        parsed = flags.parse("m", {key: text})
        assert parsed.values == {key: want}, text
        assert parsed.get(key) is want


@pytest.mark.parametrize("key", BOOL_KEYS)
@pytest.mark.parametrize("value", [True, False])
def test_bool_keys_accept_bool_values(key: str, value: bool) -> None:
    assert flags.parse("m", {key: value}).values == {key: value}


@pytest.mark.parametrize("value, want", [(1, True), (0, False)])
def test_bool_keys_accept_the_integers_one_and_zero(value: int, want: bool) -> None:
    assert flags.parse("m", {"INFERENCE_MODE": value}).values == {"INFERENCE_MODE": want}


@pytest.mark.parametrize("key", BOOL_KEYS)
def test_bad_bool_value_error_names_model_key_and_value(key: str) -> None:
    with pytest.raises(ConfigError) as e:
        flags.parse("resnet", {key: "maybe"})
    message = str(e.value)
    assert "'resnet'" in message
    assert key in message
    assert "'maybe'" in message
    assert (e.value.model, e.value.key) == ("resnet", key)


@pytest.mark.parametrize("value", ["", "2", "-1", "truee", "y", "n", "enabled", None, 2, 1.0, [True]])
def test_other_bool_values_are_refused(value: Any) -> None:
    with pytest.raises(ConfigError, match="INFERENCE_MODE"):
        flags.parse("m", {"INFERENCE_MODE": value})


@pytest.mark.parametrize("key", INT_KEYS)
@pytest.mark.parametrize("value, want", [("4", 4), (" 4 ", 4), ("1", 1), (16, 16), ("128", 128)])
def test_thread_counts_accept_positive_integers(key: str, value: Any, want: int) -> None:
    assert flags.parse("m", {key: value}).values == {key: want}


@pytest.mark.parametrize("key", INT_KEYS)
@pytest.mark.parametrize("value", ["0", "-1", "x", "1.5", "", "4 threads", 0, -3, 1.5, True, None])
def test_thread_counts_refuse_everything_else(key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as e:
        flags.parse("m", {key: value})
    assert key in str(e.value)
    assert repr(value) in str(e.value)
    assert "positive integer" in str(e.value)
    assert (e.value.model, e.value.key) == ("m", key)


def test_unknown_keys_are_passed_through_in_order() -> None:
    parsed = flags.parse("m", {"FOO": "bar", "INFERENCE_MODE": "on", "MODULE_METHOD_NAME": "f", "inference_mode": "x"})
    assert parsed.values == {"INFERENCE_MODE": True}
    assert parsed.unknown == ("FOO", "MODULE_METHOD_NAME", "inference_mode")  # keys are case-sensitive


def test_empty_parameters_give_empty_flags() -> None:
    parsed = flags.parse("m", {})
    assert parsed.values == {} and parsed.unknown == ()
    assert parsed.get("INFERENCE_MODE") is None


def test_to_wire_is_a_copy_of_the_values() -> None:
    parsed = flags.parse("m", {"INFERENCE_MODE": "off", "INTRA_OP_THREAD_COUNT": "2"})
    wire = parsed.to_wire()
    assert wire == {"INFERENCE_MODE": False, "INTRA_OP_THREAD_COUNT": 2}
    wire["INFERENCE_MODE"] = True
    assert parsed.values["INFERENCE_MODE"] is False


def test_model_config_raises_the_same_error_at_construction() -> None:
    with pytest.raises(ConfigError) as e:
        ModelConfig(name="resnet", path="m.pt", parameters={"INFERENCE_MODE": "maybe"})
    assert "'resnet'" in str(e.value) and "INFERENCE_MODE" in str(e.value) and "'maybe'" in str(e.value)
    assert (e.value.model, e.value.key) == ("resnet", "INFERENCE_MODE")
    with pytest.raises(ConfigError) as direct:
        flags.parse("resnet", {"INFERENCE_MODE": "maybe"})
    assert str(e.value) == str(direct.value)


def test_model_config_keeps_parsed_flags() -> None:
    cfg = ModelConfig(
        name="m",
        path="m.pt",
        parameters={"DISABLE_OPTIMIZED_EXECUTION": "Yes", "INTER_OP_THREAD_COUNT": 3, "CUSTOM": "x"},
    )
    assert cfg.flags.values == {"DISABLE_OPTIMIZED_EXECUTION": True, "INTER_OP_THREAD_COUNT": 3}
    assert cfg.flags.unknown == ("CUSTOM",)

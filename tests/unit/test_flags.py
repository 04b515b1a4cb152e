"""Parsing execution-mode parameters (front side only; applying them needs a worker)."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

from libtorchrt import ConfigError, ModelConfig
from libtorchrt.config import flags as config_flags
from libtorchrt.workers import flags
from libtorchrt.workers.flags import BOOL_KEYS, INT_KEYS, OWN_BOOL_KEYS, TRITON_BOOL_KEYS

TRUE_WORDS = ["true", "1", "yes", "on"]
FALSE_WORDS = ["false", "0", "no", "off"]


def spellings(word: str) -> list[str]:
    return sorted({word, word.upper(), word.capitalize(), word.swapcase(), f"  {word}\t"})


def test_key_lists_are_triton_s_and_ours() -> None:
    assert set(TRITON_BOOL_KEYS) == {
        "DISABLE_OPTIMIZED_EXECUTION",
        "INFERENCE_MODE",
        "ENABLE_NVFUSER",
        "ENABLE_JIT_EXECUTOR",
        "ENABLE_JIT_PROFILING",
        "ENABLE_TENSOR_FUSER",
        "DISABLE_CUDNN",
        "ENABLE_CACHE_CLEANING",
        "ENABLE_WEIGHT_SHARING",
    }
    assert set(OWN_BOOL_KEYS) == {
        "FREEZE_MODULE",
        "OPTIMIZE_FOR_INFERENCE",
        "CUDA_LAUNCH_BLOCKING",
        "SCHED_BATCH",
        "ZERO_COPY_OUTPUTS",
    }
    assert BOOL_KEYS == TRITON_BOOL_KEYS + OWN_BOOL_KEYS
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
    assert parsed.unknown == ("FOO", "inference_mode")  # keys are case-sensitive


def test_keys_that_model_config_reads_are_neither_flags_nor_unknown() -> None:
    parsed = flags.parse("m", {"MODULE_METHOD_NAME": "predict", "WARMUP_RUNS": "3"})
    assert parsed.values == {} and parsed.unknown == ()


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


# ------------------------------------------------------------ notes and effective


def test_weight_sharing_is_a_flag_without_a_note() -> None:
    parsed = flags.parse("m", {"ENABLE_WEIGHT_SHARING": "true"})
    assert parsed.values == {"ENABLE_WEIGHT_SHARING": True}
    assert parsed.notes() == []
    assert flags.parse("m", {"ENABLE_WEIGHT_SHARING": "false"}).values == {"ENABLE_WEIGHT_SHARING": False}


def test_notes_name_nvfuser_and_unknown_keys() -> None:
    notes = flags.parse("m", {"ENABLE_NVFUSER": "false", "TYPO_KEY": "1"}).notes()
    assert notes[0] == config_flags.NVFUSER_NOTE
    assert "TYPO_KEY" in notes[1]


def test_effective_reports_every_key_including_freezing_and_launch_blocking(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_LAUNCH_BLOCKING", "1")
    got = flags.effective(flags.parse("m", {"OPTIMIZE_FOR_INFERENCE": "true", "ENABLE_WEIGHT_SHARING": "true"}))
    assert set(got) == set(BOOL_KEYS) | set(INT_KEYS) | {"FORMAT"}
    assert got["FORMAT"] == "torchscript"
    assert got["FREEZE_MODULE"] is True, "optimize_for_inference freezes first"
    assert got["OPTIMIZE_FOR_INFERENCE"] is True
    assert got["ENABLE_WEIGHT_SHARING"] is False, "asked for, but this process maps nothing shared"
    assert flags.effective(flags.parse("m", {}), shared=True)["ENABLE_WEIGHT_SHARING"] is True
    assert got["CUDA_LAUNCH_BLOCKING"] is True
    monkeypatch.delenv("CUDA_LAUNCH_BLOCKING")
    got = flags.effective(flags.parse("m", {}))
    assert (got["FREEZE_MODULE"], got["OPTIMIZE_FOR_INFERENCE"], got["CUDA_LAUNCH_BLOCKING"]) == (False, False, False)


def test_cuda_launch_blocking_goes_to_the_model_s_environment_only() -> None:
    on = ModelConfig(name="m", path="m.pt", parameters={"CUDA_LAUNCH_BLOCKING": "true"})
    off = ModelConfig(name="m", path="m.pt", parameters={"CUDA_LAUNCH_BLOCKING": "0"}, env={"X": "1"})
    assert on.env == {"CUDA_LAUNCH_BLOCKING": "1"} and on.flags.unknown == ()
    assert off.env == {"X": "1", "CUDA_LAUNCH_BLOCKING": "0"}
    assert ModelConfig(name="m", path="m.pt").env == {}


def test_cuda_launch_blocking_in_parameters_and_env_must_agree() -> None:
    same = ModelConfig(
        name="m", path="m.pt", parameters={"CUDA_LAUNCH_BLOCKING": "1"}, env={"CUDA_LAUNCH_BLOCKING": "1"}
    )
    assert same.env == {"CUDA_LAUNCH_BLOCKING": "1"}
    with pytest.raises(ConfigError, match="CUDA_LAUNCH_BLOCKING") as e:
        ModelConfig(name="m", path="m.pt", parameters={"CUDA_LAUNCH_BLOCKING": "1"}, env={"CUDA_LAUNCH_BLOCKING": "0"})
    assert e.value.key == "CUDA_LAUNCH_BLOCKING"
    with pytest.raises(ConfigError, match="CUDA_LAUNCH_BLOCKING"):
        ModelConfig(name="m", path="m.pt", parameters={"CUDA_LAUNCH_BLOCKING": "sometimes"})


# ----------------------------------------------------------------------- prepare


class _Scaled(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((3,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight

    @torch.jit.export
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + 1


def _scripted() -> torch.jit.ScriptModule:
    return torch.jit.script(_Scaled())


def test_prepare_without_the_flags_returns_the_module_itself() -> None:
    module = _scripted()
    assert flags.prepare(module, flags.parse("m", {"FREEZE_MODULE": "false"})) is module


@pytest.mark.parametrize("key", ["FREEZE_MODULE", "OPTIMIZE_FOR_INFERENCE"])
def test_prepare_freezes_and_keeps_results(key: str) -> None:
    module = _scripted().train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # prepare filters torch.jit's own
        frozen = flags.prepare(module, flags.parse("m", {key: "true"}))
    assert frozen is not module
    assert not module.training, "freezing needs eval mode: prepare sets it"
    assert not list(frozen.parameters()), "parameters became constants"
    x = torch.arange(3.0)
    torch.testing.assert_close(frozen(x), x * 2)


@pytest.mark.parametrize("key", ["FREEZE_MODULE", "OPTIMIZE_FOR_INFERENCE"])
def test_prepare_keeps_the_module_method_to_run(key: str) -> None:
    parsed = flags.parse("m", {key: "true"})
    frozen = flags.prepare(_scripted(), parsed, method="predict")
    torch.testing.assert_close(frozen.predict(torch.ones(3)), torch.full((3,), 3.0))
    assert not hasattr(flags.prepare(_scripted(), parsed), "predict"), "freezing drops other methods by default"


def test_prepare_failure_is_a_config_error_naming_model_and_flag() -> None:
    with pytest.raises(ConfigError, match=r"model 'm': FREEZE_MODULE failed") as e:
        flags.prepare(_scripted(), flags.parse("m", {"FREEZE_MODULE": "1"}), method="no_such_method", model="m")
    assert (e.value.model, e.value.key) == ("m", "FREEZE_MODULE")


def test_effective_of_a_pt2_model_names_its_format_and_leaves_out_the_torchscript_executor() -> None:
    got = flags.effective(flags.parse("m", {"NUM_THREADS": "1"}), "aoti")
    assert got["FORMAT"] == "aoti"
    assert "INTRA_OP_THREAD_COUNT" in got and "INFERENCE_MODE" in got
    assert not {"ENABLE_JIT_EXECUTOR", "DISABLE_OPTIMIZED_EXECUTION", "FREEZE_MODULE", "ENABLE_NVFUSER"} & set(got)


def test_num_threads_is_an_alias_of_the_thread_counts_and_may_not_disagree() -> None:
    parsed = flags.parse("m", {"NUM_THREADS": "3", "NUM_INTEROP_THREADS": "2"})
    assert parsed.values == {"INTRA_OP_THREAD_COUNT": 3, "INTER_OP_THREAD_COUNT": 2}
    assert flags.parse("m", {"NUM_THREADS": "3", "INTRA_OP_THREAD_COUNT": "3"}).values == {"INTRA_OP_THREAD_COUNT": 3}
    with pytest.raises(ConfigError, match="disagree"):
        flags.parse("m", {"NUM_THREADS": "3", "INTRA_OP_THREAD_COUNT": "4"})

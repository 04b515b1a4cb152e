"""The configuration's building blocks in Python: TensorSpec (strings, reshape),
InstanceGroup (KIND_AUTO), DynamicBatching, VersionPolicy, and ModelConfig's
parameter-backed fields."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import libtorchrt.config as config
from libtorchrt import ConfigError, ModelConfig, TensorSpec
from libtorchrt.config import DynamicBatching, InstanceGroup, ModelWarmup, QueuePolicy, VersionPolicy, WarmupInput
from libtorchrt.config.model import normalize_dtype

# ------------------------------------------------------------------ exports


def test_config_package_exports() -> None:
    assert set(config.__all__) == {
        "ControlInput",
        "DynamicBatching",
        "InstanceGroup",
        "ModelConfig",
        "ModelWarmup",
        "QueuePolicy",
        "SequenceBatching",
        "SequenceState",
        "TensorSpec",
        "VersionPolicy",
        "WarmupInput",
        "load_repository",
        "warmup_tensors",
    }
    for name in config.__all__:
        assert getattr(config, name) is not None


# --------------------------------------------------------------- TYPE_STRING


@pytest.mark.parametrize("value", ["TYPE_STRING", "STRING", "BYTES", "string", " type_string "])
def test_type_string_is_the_dtype_string(value: str) -> None:
    assert normalize_dtype(value) == "string"
    spec = TensorSpec("text", value, [-1])
    assert spec.dtype == "string" and spec.is_string


def test_a_string_tensor_has_no_torch_dtype() -> None:
    spec = TensorSpec("text", "TYPE_STRING", [-1])
    with pytest.raises(ConfigError, match=r"'text' is TYPE_STRING.*List\[str\]") as e:
        _ = spec.torch_dtype
    assert e.value.key == "data_type"
    assert not TensorSpec("x", "TYPE_FP32").is_string


def test_every_other_triton_type_keeps_its_torch_dtype() -> None:
    for name, dtype in config.model.TRITON_DTYPES.items():
        if dtype != "string":
            assert TensorSpec("x", name).torch_dtype == getattr(torch, dtype)


def test_bad_tensor_dtype_names_the_tensor_and_value() -> None:
    with pytest.raises(ConfigError, match=r"tensor 'x': data_type 'TYPE_UINT32' is not supported") as e:
        TensorSpec("x", "TYPE_UINT32")
    assert e.value.key == "data_type"


# ------------------------------------------------------------------- reshape


@pytest.mark.parametrize(
    ("dims", "reshape"),
    [
        ([1], []),  # a scalar
        ([1, 1], []),
        ([4, 4], [16]),
        ([2, 4, -1, 6], [8, -1, 1, 6]),  # Triton's own example: runs between -1s match
        ([-1], [-1]),
        ([3, -1], [1, 3, -1]),
    ],
)
def test_reshape_holding_the_same_elements_is_accepted(dims: list[int], reshape: list[int]) -> None:
    spec = TensorSpec("x", "float32", dims, reshape=reshape)
    assert spec.reshape == tuple(reshape)


@pytest.mark.parametrize(
    ("dims", "reshape"),
    [([4, 4], [8]), ([2], []), ([-1], [4]), ([4], [-1]), ([-1, -1], [-1]), ([2, -1], [-1, 2, 2])],
)
def test_reshape_with_other_elements_is_refused(dims: list[int], reshape: list[int]) -> None:
    with pytest.raises(ConfigError, match="does not hold the elements") as e:
        TensorSpec("x", "float32", dims, reshape=reshape)
    assert e.value.key == "reshape"


def test_reshape_needs_dims() -> None:
    with pytest.raises(ConfigError, match="reshape needs dims"):
        TensorSpec("x", reshape=[3])


@pytest.mark.parametrize(
    ("dims", "reshape", "batched", "shape", "want"),
    [
        ([1], [], True, (5, 1), (5,)),
        ([4, 4], [16], True, (2, 4, 4), (2, 16)),
        ([2, 4, -1, 6], [8, -1, 1, 6], False, (2, 4, 7, 6), (8, 7, 1, 6)),
        ([3, -1], [1, 3, -1], True, (2, 3, 9), (2, 1, 3, 9)),
        ([3], None, True, (2, 3), (2, 3)),
    ],
)
def test_model_shape_applies_reshape(
    dims: list[int], reshape: list[int] | None, batched: bool, shape: tuple[int, ...], want: tuple[int, ...]
) -> None:
    assert TensorSpec("x", "float32", dims, reshape=reshape).model_shape(shape, batched) == want


@pytest.mark.parametrize("dims", [[3, "4"], [1.5], [True], [-2], "34"])
def test_dims_must_be_sizes(dims: Any) -> None:
    with pytest.raises(ConfigError, match="dims"):
        TensorSpec("x", dims=dims)


def test_numpy_integers_are_sizes() -> None:
    np = pytest.importorskip("numpy")
    assert TensorSpec("x", dims=[np.int64(3), -1]).dims == (3, -1)


# ------------------------------------------------------------- instance groups


def test_kind_auto_with_gpus_goes_to_the_cpu_when_one_is_missing() -> None:
    group = InstanceGroup(2, "KIND_AUTO", [0, 3])
    assert group.devices("m", 4) == ["cuda:0", "cuda:0", "cuda:3", "cuda:3"]
    assert group.devices("m", 2) == ["cpu", "cpu"]  # GPU 3 is not there: Triton falls back
    assert group.devices("m", 0) == ["cpu", "cpu"]


@pytest.mark.parametrize("kind", ["cpu", "GPU", "kind_auto"])
def test_kind_spellings(kind: str) -> None:
    assert InstanceGroup(kind=kind).kind.startswith("KIND_")


# ----------------------------------------------------------- dynamic batching


def test_dynamic_batching_defaults_are_triton_s() -> None:
    b = DynamicBatching()
    assert (b.preferred_batch_size, b.max_queue_delay_microseconds, b.preserve_ordering) == ((), 0, False)
    assert b.default_queue_policy == QueuePolicy("REJECT", 0, False, 0)
    assert b.priority_queue_policy == {}


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"preferred_batch_size": [0]}, "preferred_batch_size"),
        ({"preferred_batch_size": [4, -1]}, "preferred_batch_size"),
        ({"max_queue_delay_microseconds": -5}, "max_queue_delay_microseconds"),
        ({"priority_levels": 2}, "default_priority_level"),  # default level must be 1..2
        ({"priority_levels": 2, "default_priority_level": 3}, "default_priority_level"),
        (
            {"priority_levels": 2, "default_priority_level": 1, "priority_queue_policy": {3: QueuePolicy()}},
            "priority_queue_policy",
        ),
        ({"preserve_ordering": True, "priority_levels": 2, "default_priority_level": 1}, "preserve_ordering"),
        (
            {"preserve_ordering": True, "default_queue_policy": QueuePolicy("DELAY", 100)},
            "preserve_ordering",
        ),
    ],
)
def test_dynamic_batching_follows_triton_s_rules(kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        DynamicBatching(**kwargs)
    assert e.value.key == key


def test_queue_policy_checks_its_action() -> None:
    assert QueuePolicy("delay").timeout_action == "DELAY"
    with pytest.raises(ConfigError, match="timeout_action"):
        QueuePolicy("DROP")


def test_preferred_batch_size_above_max_batch_size_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"\[16\] exceeds max_batch_size 8") as e:
        ModelConfig("m", "m.pt", max_batch_size=8, dynamic_batching=DynamicBatching([4, 16]))
    assert (e.value.model, e.value.key) == ("m", "preferred_batch_size")


# ------------------------------------------------------------ version policy


@pytest.mark.parametrize(
    ("policy", "available", "want"),
    [
        (VersionPolicy(), [1, 2, 10], [10]),
        (VersionPolicy("latest", 2), [3, 1, 2], [2, 3]),
        (VersionPolicy("latest", 5), [1, 2], [1, 2]),
        (VersionPolicy("all"), [2, 1], [1, 2]),
        (VersionPolicy("specific", versions=[3, 1]), [1, 2, 3], [1, 3]),
        (VersionPolicy("specific", versions=[4]), [1, 2], []),
    ],
)
def test_version_policy_selects(policy: VersionPolicy, available: list[int], want: list[int]) -> None:
    assert policy.select(available) == want


def test_version_policy_names_missing_specific_versions() -> None:
    assert VersionPolicy("specific", versions=[1, 4]).missing([1, 2]) == [4]
    assert VersionPolicy("latest", 3).missing([]) == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "newest"},
        {"kind": "latest", "num_versions": 0},
        {"kind": "specific"},
        {"kind": "specific", "versions": [0]},
        {"kind": "all", "versions": [1]},
        {"kind": "all", "num_versions": 2},
    ],
)
def test_bad_version_policy_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="version_policy"):
        VersionPolicy(**kwargs)


# ------------------------------------------------------- parameters <-> fields


def test_method_and_its_parameter_agree_both_ways() -> None:
    assert ModelConfig("m", "m.pt", method="predict").parameters == {"MODULE_METHOD_NAME": "predict"}
    cfg = ModelConfig("m", "m.pt", parameters={"MODULE_METHOD_NAME": "predict"})
    assert cfg.method == "predict"
    same = ModelConfig("m", "m.pt", method="predict", parameters={"MODULE_METHOD_NAME": "predict"})
    assert same == cfg
    with pytest.raises(ConfigError, match="give one") as e:
        ModelConfig("m", "m.pt", method="run", parameters={"MODULE_METHOD_NAME": "predict"})
    assert e.value.key == "MODULE_METHOD_NAME"
    with pytest.raises(ConfigError, match="not a method name"):
        ModelConfig("m", "m.pt", parameters={"MODULE_METHOD_NAME": "pre dict"})


def test_warmup_runs_and_its_parameter_agree_both_ways() -> None:
    inputs = [TensorSpec("x", "float32", [3])]
    assert ModelConfig("m", "m.pt", inputs=inputs, warmup_runs=2).parameters == {"WARMUP_RUNS": "2"}
    cfg = ModelConfig("m", "m.pt", inputs=inputs, parameters={"WARMUP_RUNS": " 2 "})
    assert cfg.warmup_runs == 2 and cfg.flags.unknown == ()
    assert ModelConfig("m", "m.pt", parameters={"WARMUP_RUNS": "0"}).warmup_runs == 0
    with pytest.raises(ConfigError, match="give one"):
        ModelConfig("m", "m.pt", inputs=inputs, warmup_runs=3, parameters={"WARMUP_RUNS": "2"})


@pytest.mark.parametrize("value", ["-1", "two", "1.5", True])
def test_bad_warmup_runs_parameter_is_refused(value: Any) -> None:
    with pytest.raises(ConfigError, match="WARMUP_RUNS") as e:
        ModelConfig("m", "m.pt", inputs=[TensorSpec("x", dims=[1])], parameters={"WARMUP_RUNS": value})
    assert e.value.key == "WARMUP_RUNS"


@pytest.mark.parametrize("value", [-1, True, 1.0])
def test_bad_warmup_runs_field_is_refused(value: Any) -> None:
    with pytest.raises(ConfigError, match="warmup_runs"):
        ModelConfig("m", "m.pt", warmup_runs=value)


def test_warmup_runs_need_declared_inputs_with_dims() -> None:
    with pytest.raises(ConfigError, match="needs declared inputs"):
        ModelConfig("m", "m.pt", warmup_runs=1)
    with pytest.raises(ConfigError, match="dims of input 'x'"):
        ModelConfig("m", "m.pt", inputs=[TensorSpec("x")], warmup_runs=1)


def test_python_warmup_is_checked_against_the_model() -> None:
    sample = ModelWarmup("w", 4, {"x": WarmupInput("float32", [3], zero_data=True)})
    inputs = [TensorSpec("x", "float32", [3])]
    assert ModelConfig("m", "m.pt", inputs=inputs, max_batch_size=4, warmup=[sample]).warmup_count == 1
    with pytest.raises(ConfigError, match="batch_size 4 > max_batch_size 2"):
        ModelConfig("m", "m.pt", inputs=inputs, max_batch_size=2, warmup=[sample])
    with pytest.raises(ConfigError, match="expected ModelWarmup"):
        ModelConfig("m", "m.pt", warmup=["w"])  # type: ignore[list-item]


def test_notes_do_not_count_in_equality() -> None:
    assert ModelConfig("m", "m.pt", notes=["a note"]) == ModelConfig("m", "m.pt")
    assert ModelConfig("m", "m.pt", notes=["a note"]).notes == ("a note",)

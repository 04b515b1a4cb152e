"""ModelConfig / TensorSpec validation, config.pbtxt parsing, and model repositories."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from libtorchrt import ConfigError, ModelConfig, TensorSpec
from libtorchrt.config import load_repository
from libtorchrt.config.model import normalize_dtype

# ===================================================================== ModelConfig


@pytest.mark.parametrize("name", ["", "has space", "a/b", "naïve", "x;rm", None, 3])
def test_bad_model_name_is_a_config_error(name: Any) -> None:
    with pytest.raises(ConfigError, match="name") as e:
        ModelConfig(name=name, path="m.pt")
    assert e.value.key == "name"


@pytest.mark.parametrize("name", ["m", "resnet-50", "bert_base.v2", "A1"])
def test_good_model_names_are_accepted(name: str) -> None:
    assert ModelConfig(name=name, path="m.pt").name == name


@pytest.mark.parametrize("instances", [0, -1, True, False, 1.0, "2", None])
def test_bad_instances_is_a_config_error(instances: Any) -> None:
    with pytest.raises(ConfigError, match="instances") as e:
        ModelConfig(name="m", path="m.pt", instances=instances)
    assert (e.value.model, e.value.key) == ("m", "instances")


def test_negative_max_batch_size_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="max_batch_size") as e:
        ModelConfig(name="m", path="m.pt", max_batch_size=-1)
    assert e.value.key == "max_batch_size"


@pytest.mark.parametrize("value", ["4", 1.5, True], ids=["str", "float", "bool"])
def test_non_integer_max_batch_size_is_a_config_error(value: Any) -> None:
    with pytest.raises(ConfigError, match="max_batch_size"):
        ModelConfig(name="m", path="m.pt", max_batch_size=value)


@pytest.mark.parametrize("kind", ["inputs", "outputs"])
def test_repeated_tensor_names_are_a_config_error(kind: str) -> None:
    specs = [TensorSpec("x"), TensorSpec("y"), TensorSpec("x")]
    with pytest.raises(ConfigError, match=r"repeat.*'x'"):
        ModelConfig(name="m", path="m.pt", **{kind: specs})


def test_defaults() -> None:
    cfg = ModelConfig(name="m", path="m.pt")
    assert (cfg.instances, cfg.max_batch_size, cfg.method, cfg.version) == (1, 0, "forward", 1)
    assert cfg.inputs == () and cfg.outputs == () and cfg.parameters == {} and cfg.env == {}
    assert cfg.flags.values == {} and cfg.flags.unknown == ()


def test_module_method_name_parameter_sets_the_method() -> None:
    cfg = ModelConfig(name="m", path="m.pt", parameters={"MODULE_METHOD_NAME": "predict"})
    assert cfg.method == "predict"
    assert cfg.flags.values == {} and cfg.flags.unknown == ()  # read by ModelConfig: known, not a flag


def test_parameters_and_env_are_normalised_to_strings() -> None:
    cfg = ModelConfig(name="m", path="m.pt", env={"OMP_NUM_THREADS": 2}, parameters={"INFERENCE_MODE": True})
    assert cfg.env == {"OMP_NUM_THREADS": "2"}
    assert cfg.flags.values == {"INFERENCE_MODE": True}


def test_check_files(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    cfg = ModelConfig(name="m", path=path)
    with pytest.raises(ConfigError, match="no model file"):
        cfg.check_files()
    path.write_bytes(b"not really torchscript")
    cfg.check_files()


# ====================================================================== TensorSpec


@pytest.mark.parametrize(
    "value",
    ["TYPE_FP32", "FP32", "fp32", "float32", "torch.float32", " float32 ", "type_fp32", torch.float32],
    ids=str,
)
def test_float32_spellings_normalise(value: Any) -> None:
    assert TensorSpec("x", value).dtype == "float32"
    assert TensorSpec("x", value).torch_dtype is torch.float32


@pytest.mark.parametrize(
    "value, want",
    [
        ("TYPE_BOOL", "bool"),
        ("TYPE_UINT8", "uint8"),
        ("TYPE_INT8", "int8"),
        ("TYPE_INT16", "int16"),
        ("TYPE_INT32", "int32"),
        ("TYPE_INT64", "int64"),
        ("TYPE_FP16", "float16"),
        ("TYPE_BF16", "bfloat16"),
        ("TYPE_FP64", "float64"),
        ("BF16", "bfloat16"),
        (torch.int64, "int64"),
        (torch.bool, "bool"),
        ("complex64", "complex64"),
    ],
    ids=str,
)
def test_dtype_normalisation(value: Any, want: str) -> None:
    assert normalize_dtype(value) == want


def test_default_dtype_is_float32() -> None:
    assert TensorSpec("x").dtype == "float32"


@pytest.mark.parametrize("value", ["complex", "TYPE_UINT16", "TYPE_UINT64", "float", "", torch.quint8, 32])
def test_unsupported_dtype_is_a_config_error_naming_the_value(value: Any) -> None:
    with pytest.raises(ConfigError) as e:
        TensorSpec("x", value)
    assert repr(value) in str(e.value)
    assert "'x'" in str(e.value)


def test_dims_become_a_tuple_and_accept_minus_one() -> None:
    assert TensorSpec("x", dims=[3, -1]).dims == (3, -1)
    assert TensorSpec("x").dims is None


def test_dims_below_minus_one_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="dims"):
        TensorSpec("x", dims=[3, -2])


# ================================================================= config.pbtxt

FULL = """\
name: "m"
platform: "pytorch_libtorch"
max_batch_size: 8
input [
  {
    name: "INPUT__0"
    data_type: TYPE_FP32
    dims: [ 3, -1 ]
  },
  {
    name: "INPUT__1"
    data_type: TYPE_INT64
    dims: [ 1 ]
  }
]
output [
  {
    name: "OUTPUT__0"
    data_type: TYPE_FP16
    dims: [ -1 ]
  }
]
instance_group [ { count: 2, kind: KIND_CPU } ]
parameters: {
  key: "INFERENCE_MODE"
  value: { string_value: "false" }
}
parameters { key: "INTRA_OP_THREAD_COUNT" value: { string_value: "2" } }
parameters { key: "MODULE_METHOD_NAME" value: { string_value: "predict" } }
"""


def test_full_pbtxt_gives_the_right_fields() -> None:
    cfg = ModelConfig.from_pbtxt(FULL)
    assert cfg.name == "m"
    assert cfg.max_batch_size == 8
    assert cfg.placements(0) == ["cpu", "cpu"]
    assert cfg.inputs == (
        TensorSpec("INPUT__0", "float32", (3, -1)),
        TensorSpec("INPUT__1", "int64", (1,)),
    )
    assert cfg.outputs == (TensorSpec("OUTPUT__0", "float16", (-1,)),)
    assert cfg.parameters == {
        "INFERENCE_MODE": "false",
        "INTRA_OP_THREAD_COUNT": "2",
        "MODULE_METHOD_NAME": "predict",
    }
    assert cfg.flags.values == {"INFERENCE_MODE": False, "INTRA_OP_THREAD_COUNT": 2}
    assert cfg.method == "predict"
    assert cfg.path == Path("model.pt") and cfg.version == 1


def test_backend_pytorch_is_accepted_and_defaults_apply() -> None:
    cfg = ModelConfig.from_pbtxt('name: "m"\nbackend: "pytorch"\n')
    assert (cfg.placements(0), cfg.max_batch_size, cfg.inputs, cfg.outputs) == (["cpu"], 0, (), ())


def test_instance_groups_place_their_counts() -> None:
    text = 'name: "m"\ninstance_group [ { count: 2 kind: KIND_CPU }, { count: 3 } ]\n'
    cfg = ModelConfig.from_pbtxt(text)
    assert cfg.placements(0) == ["cpu"] * 5  # KIND_AUTO without CUDA: the CPU
    assert cfg.placements(2) == ["cpu"] * 2 + ["cuda:0"] * 3 + ["cuda:1"] * 3  # with: count on each GPU


def test_instance_group_without_count_means_one() -> None:
    assert ModelConfig.from_pbtxt('name: "m"\ninstance_group [ { kind: KIND_CPU } ]\n').placements(4) == ["cpu"]


def test_no_instance_group_means_one_per_gpu_else_one_cpu() -> None:
    cfg = ModelConfig.from_pbtxt('name: "m"\n')
    assert (cfg.placements(0), cfg.placements(2)) == (["cpu"], ["cuda:0", "cuda:1"])


def test_kind_gpu_lists_its_gpus() -> None:
    text = 'name: "m"\ninstance_group [ { count: 2 kind: KIND_GPU gpus: [1, 3] } ]\n'
    assert ModelConfig.from_pbtxt(text).placements(4) == ["cuda:1", "cuda:1", "cuda:3", "cuda:3"]


def test_kind_gpu_without_cuda_is_a_config_error_naming_the_gpu() -> None:
    cfg = ModelConfig.from_pbtxt('name: "m"\ninstance_group [ { count: 1 kind: KIND_GPU gpus: [1] } ]\n')
    with pytest.raises(ConfigError, match="model 'm' asks for GPU 1; this machine has no CUDA device") as e:
        cfg.placements(0)
    assert e.value.key == "gpus"
    with pytest.raises(ConfigError, match=r"asks for GPU 1; this machine has 1 CUDA device\(s\)"):
        cfg.placements(1)
    with pytest.raises(ConfigError, match="KIND_GPU instances; this machine has no CUDA device"):
        ModelConfig.from_pbtxt('name: "m"\ninstance_group [ { kind: KIND_GPU } ]\n').placements(0)


def test_kind_model_instances_are_cpu_workers_that_place_the_model_themselves() -> None:
    cfg = ModelConfig.from_pbtxt('name: "m"\ninstance_group [ { count: 2 kind: KIND_MODEL }, { kind: KIND_CPU } ]\n')
    assert [g.kind for g in cfg.groups] == ["KIND_MODEL", "KIND_CPU"]
    assert cfg.placements(0) == cfg.placements(2) == ["cpu", "cpu", "cpu"]
    assert cfg.placed_by_model(2) == [True, True, False]
    assert ModelConfig.from_pbtxt(cfg.to_pbtxt()).groups == cfg.groups
    with pytest.raises(ConfigError, match=r":2: .*gpus but its kind is KIND_MODEL"):
        ModelConfig.from_pbtxt('name: "m"\ninstance_group [ { kind: KIND_MODEL gpus: [0] } ]\n')


@pytest.mark.parametrize(
    ("devices", "want"),
    [
        (None, ["cpu", "cpu"]),
        ("cpu", ["cpu", "cpu"]),
        (["cuda:0", "cuda:1"], ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]),
        ("cuda", ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]),
        ("auto", ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]),
    ],
)
def test_python_devices_start_instances_on_each(devices: Any, want: list[str]) -> None:
    assert ModelConfig(name="m", path="m.pt", instances=2, devices=devices).placements(2) == want


def test_python_auto_without_cuda_is_the_cpu_and_cuda_is_an_error() -> None:
    assert ModelConfig(name="m", path="m.pt", devices="auto").placements(0) == ["cpu"]
    with pytest.raises(ConfigError, match="asks for GPU 0; this machine has no CUDA device"):
        ModelConfig(name="m", path="m.pt", devices=["cuda:0"]).placements(0)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu", "cuda:-1"])
def test_bad_device_is_a_config_error(device: str) -> None:
    with pytest.raises(ConfigError, match="is not one of") as e:
        ModelConfig(name="m", path="m.pt", devices=[device])
    assert e.value.key == "devices"


def test_unknown_field_is_a_config_error_with_its_line() -> None:
    text = 'name: "m"\nplatform: "pytorch_libtorch"\nnot_a_field: 1\n'
    with pytest.raises(ConfigError, match=r":3:\d+") as e:
        ModelConfig.from_pbtxt(text)
    assert "not_a_field" in str(e.value)


def test_syntax_error_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r":2:"):
        ModelConfig.from_pbtxt('name: "m"\nmax_batch_size: "eight"\n')


@pytest.mark.parametrize(
    "field, block, key",
    [
        (
            "iterative_sequence",
            "sequence_batching { iterative_sequence: true }",
            "sequence_batching.iterative_sequence",
        ),
        ("runtime", 'runtime: "libtriton_tensorrt.so"', "runtime"),
        ("batch_input", 'batch_input [ { kind: BATCH_ELEMENT_COUNT target_name: "N" source_input: "x" } ]', None),
        ("cc_model_filenames", 'cc_model_filenames { key: "7.5" value: "model_t4.pt" }', None),
        ("model_repository_agents", 'model_repository_agents { agents [ { name: "checksum" } ] }', None),
        ("decoupled", "model_transaction_policy { decoupled: true }", "model_transaction_policy.decoupled"),
    ],
)
def test_refused_field_is_a_config_error_naming_field_and_line(field: str, block: str, key: str | None) -> None:
    text = f'name: "m"\nplatform: "pytorch_libtorch"\n{block}\n'
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_pbtxt(text)
    assert field in str(e.value)
    assert "<config.pbtxt>:3:" in str(e.value)
    assert e.value.key == (key or field)


def test_line_number_of_a_refused_field_after_blank_lines() -> None:
    text = 'name: "m"\n\n\nbatch_input [ { kind: BATCH_ELEMENT_COUNT target_name: "N" source_input: "x" } ]\n'
    with pytest.raises(ConfigError, match=r"<config\.pbtxt>:4:"):
        ModelConfig.from_pbtxt(text)


@pytest.mark.parametrize(
    "line", ['platform: "tensorflow_savedmodel"', 'platform: "onnxruntime_onnx"', 'backend: "onnxruntime"']
)
def test_bad_platform_or_backend_is_a_config_error(line: str) -> None:
    with pytest.raises(ConfigError, match=r"<config\.pbtxt>:2: (platform|backend) .* is not served"):
        ModelConfig.from_pbtxt(f'name: "m"\n{line}\n')


def test_tensor_without_data_type_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="has no data_type"):
        ModelConfig.from_pbtxt('name: "m"\ninput [ { name: "x" dims: [ 3 ] } ]\n')


def test_unsupported_tensor_data_type_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="TYPE_UINT32") as e:
        ModelConfig.from_pbtxt('name: "m"\noutput [ { name: "y" data_type: TYPE_UINT32 dims: [ 1 ] } ]\n')
    assert "<config.pbtxt>:2:" in str(e.value)
    assert e.value.key == "output.data_type"


def test_bad_parameter_value_is_a_config_error_naming_key_and_value() -> None:
    text = 'name: "m"\nparameters { key: "INFERENCE_MODE" value: { string_value: "maybe" } }\n'
    with pytest.raises(ConfigError, match=r"INFERENCE_MODE.*'maybe'") as e:
        ModelConfig.from_pbtxt(text)
    assert e.value.model == "m"


def test_bad_parameter_value_error_has_a_line_number() -> None:
    text = 'name: "m"\nparameters {\n  key: "INFERENCE_MODE"\n  value: { string_value: "maybe" }\n}\n'
    with pytest.raises(ConfigError, match=r"<config\.pbtxt>:[2-5]:"):
        ModelConfig.from_pbtxt(text)


def test_unsupported_input_sub_field_is_refused() -> None:
    text = 'name: "m"\ninput [ { name: "x" data_type: TYPE_FP32 dims: [ 3 ] is_shape_tensor: true } ]\n'
    with pytest.raises(ConfigError, match="is_shape_tensor") as e:
        ModelConfig.from_pbtxt(text)
    assert e.value.key == "input.is_shape_tensor"


def test_long_single_line_config_text_parses() -> None:
    text = 'name: "m" ' + " ".join(f'parameters {{ key: "K{i}" value: {{ string_value: "v" }} }}' for i in range(10))
    assert len(text) > 255 and "\n" not in text
    assert len(ModelConfig.from_pbtxt(text).parameters) == 10


# ------------------------------------------------------------------ from a file


def write_model(root: Path, name: str, config: str, versions: dict[str, str] | None = None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "config.pbtxt").write_text(textwrap.dedent(config))
    for version, filename in (versions or {"1": "model.pt"}).items():
        (d / version).mkdir(exist_ok=True)
        if filename:
            (d / version / filename).write_bytes(b"\x00 not a model, never loaded")
    return d


def test_from_pbtxt_path_uses_the_directory(tmp_path: Path) -> None:
    d = write_model(tmp_path, "m", 'platform: "pytorch_libtorch"\n', {"1": "model.pt", "2": "model.pt"})
    cfg = ModelConfig.from_pbtxt(d / "config.pbtxt")
    assert cfg.name == "m"  # taken from the directory when the file has none
    assert (cfg.version, Path(cfg.path)) == (2, d / "2" / "model.pt")
    assert ModelConfig.from_pbtxt(str(d / "config.pbtxt")).version == 2


def test_name_not_matching_the_directory_is_a_config_error(tmp_path: Path) -> None:
    d = write_model(tmp_path, "other", 'name: "m"\nplatform: "pytorch_libtorch"\n')
    with pytest.raises(ConfigError, match="does not match the model directory 'other'") as e:
        ModelConfig.from_pbtxt(d / "config.pbtxt")
    assert f"{d / 'config.pbtxt'}:1:" in str(e.value)


def test_explicit_model_dir_overrides_the_file_location(tmp_path: Path) -> None:
    d = write_model(tmp_path, "m", 'name: "m"\n', {"4": "model.pt"})
    cfg = ModelConfig.from_pbtxt('name: "m"\n', model_dir=d)
    assert (cfg.version, Path(cfg.path)) == (4, d / "4" / "model.pt")


# =================================================================== repository


def test_repository_picks_the_highest_version_and_ignores_other_dirs(tmp_path: Path) -> None:
    a = write_model(
        tmp_path,
        "alpha",
        """\
        name: "alpha"
        platform: "pytorch_libtorch"
        max_batch_size: 4
        """,
        {"1": "model.pt", "3": "model.pt", "latest": "model.pt", "7": ""},  # 7 holds no model file
    )
    b = write_model(tmp_path, "beta", 'backend: "pytorch"\ninstance_group [ { count: 3 } ]\n', {"2": "model.pt"})
    (tmp_path / "not_a_model").mkdir()  # no config.pbtxt: ignored
    (tmp_path / "README.md").write_text("a file, ignored")
    models = load_repository(tmp_path)
    assert [m.name for m in models] == ["alpha", "beta"]
    alpha, beta = models
    assert (alpha.version, Path(alpha.path), alpha.max_batch_size) == (3, a / "3" / "model.pt", 4)
    assert (beta.version, Path(beta.path), len(beta.placements(0))) == (2, b / "2" / "model.pt", 3)


def test_versions_compare_as_numbers(tmp_path: Path) -> None:
    write_model(tmp_path, "m", 'name: "m"\n', {"2": "model.pt", "10": "model.pt", "9": "model.pt"})
    (cfg,) = load_repository(tmp_path)
    assert cfg.version == 10


def test_unicode_digit_dir_is_ignored(tmp_path: Path) -> None:
    write_model(tmp_path, "m", 'name: "m"\n', {"1": "model.pt", "²": "model.pt"})
    (cfg,) = load_repository(tmp_path)
    assert cfg.version == 1


def test_specific_version_policy_is_honoured_or_refused(tmp_path: Path) -> None:
    write_model(
        tmp_path,
        "m",
        'name: "m"\nversion_policy: { specific: { versions: [ 1 ] } }\n',
        {"1": "model.pt", "3": "model.pt"},
    )
    try:
        (cfg,) = load_repository(tmp_path)
    except ConfigError as e:
        assert "version_policy" in str(e)
    else:
        assert cfg.version == 1


def test_default_model_filename_is_honoured(tmp_path: Path) -> None:
    d = write_model(
        tmp_path,
        "m",
        'name: "m"\ndefault_model_filename: "traced.ts"\n',
        {"1": "traced.ts", "2": "model.pt"},  # 2 has only the default name: not a version of this model
    )
    (cfg,) = load_repository(tmp_path)
    assert (cfg.version, Path(cfg.path)) == (1, d / "1" / "traced.ts")


def test_model_without_any_model_file_is_a_config_error(tmp_path: Path) -> None:
    write_model(tmp_path, "m", 'name: "m"\n', {"1": ""})
    with pytest.raises(ConfigError, match=re.escape("'model.pt'")):
        load_repository(tmp_path)


def test_empty_repository_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="holds no"):
        load_repository(tmp_path)


def test_missing_repository_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a directory"):
        load_repository(tmp_path / "nope")


def test_invalid_model_in_repository_names_its_file(tmp_path: Path) -> None:
    d = write_model(tmp_path, "m", 'name: "m"\nbogus_field: 1\n')
    with pytest.raises(ConfigError, match=re.escape(str(d / "config.pbtxt")) + r":2:"):
        load_repository(tmp_path)


def test_a_config_path_may_contain_a_colon(tmp_path: Path) -> None:
    directory = tmp_path / "runs:2026" / "resnet"
    (directory / "1").mkdir(parents=True)
    (directory / "1" / "model.pt").write_bytes(b"not loaded here")
    (directory / "config.pbtxt").write_text('platform: "pytorch_libtorch"\n')
    cfg = ModelConfig.from_pbtxt(str(directory / "config.pbtxt"))  # a path, not config text
    assert (cfg.name, cfg.path) == ("resnet", directory / "1" / "model.pt")

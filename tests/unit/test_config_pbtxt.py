"""config.pbtxt parsing: every spelling of the text format, the fields read, the fields
noted or refused, and lines in errors."""

from __future__ import annotations

import pytest

from libtorchrt import ConfigError, ModelConfig, TensorSpec
from libtorchrt.config import DynamicBatching, InstanceGroup, ModelWarmup, QueuePolicy, VersionPolicy, WarmupInput
from libtorchrt.config.locations import Locations

LISTS = """
name: "m"
platform: "pytorch_libtorch"
max_batch_size: 4
input [
  { name: "a", data_type: TYPE_FP32, dims: [ 2, -1 ] },
  { name: "b", data_type: TYPE_INT64, dims: [ 1 ], reshape: { shape: [ ] } }
]
output [ { name: "y", data_type: TYPE_FP32, dims: [ -1 ] } ]
instance_group [ { count: 2, kind: KIND_CPU }, { kind: KIND_GPU, gpus: [ 0, 1 ] } ]
parameters [
  { key: "INFERENCE_MODE", value: { string_value: "false" } },
  { key: "X", value: { string_value: "1" } }
]
"""

REPEATED = """
# the same configuration, every repeated field as repeated entries
name: "m"
platform: "pytorch_libtorch"
max_batch_size: 4
input {
  name: "a"
  data_type: TYPE_FP32
  dims: 2
  dims: -1
}
input <
  name: "b"
  data_type: TYPE_INT64
  dims: 1
  reshape { }
>
output: {
  name: "y"
  data_type: TYPE_FP32
  dims: -1
}
instance_group { count: 2 kind: KIND_CPU }
instance_group: { kind: KIND_GPU gpus: 0 gpus: 1 }
parameters { key: "INFERENCE_MODE" value { string_value: "false" } }
parameters: { key: "X"; value: { string_value: "1" } }
"""


def test_lists_and_repeated_entries_mean_the_same() -> None:
    a, b = ModelConfig.from_pbtxt(LISTS), ModelConfig.from_pbtxt(REPEATED)
    assert a == b
    assert a.inputs == (TensorSpec("a", "float32", (2, -1)), TensorSpec("b", "int64", (1,), reshape=()))
    assert a.instance_groups == (InstanceGroup(2, "KIND_CPU"), InstanceGroup(1, "KIND_GPU", (0, 1)))
    assert a.parameters == {"INFERENCE_MODE": "false", "X": "1"}


def test_strings_optional_and_reshape_are_read() -> None:
    cfg = ModelConfig.from_pbtxt(
        'name: "m"\nmax_batch_size: 2\n'
        'input { name: "t" data_type: TYPE_STRING dims: [ -1 ] optional: true }\n'
        'input { name: "s" data_type: TYPE_FP32 dims: [ 1 ] reshape { shape: [ ] } }\n'
        'output { name: "o" data_type: TYPE_STRING dims: [ -1 ] reshape: { shape: [ -1 ] } }\n'
    )
    t, s = cfg.inputs
    assert (t.dtype, t.optional, t.reshape) == ("string", True, None)
    assert (s.optional, s.reshape) == (False, ())
    assert cfg.outputs[0].reshape == (-1,) and cfg.outputs[0].is_string


def test_dynamic_batching_is_read_with_every_field() -> None:
    cfg = ModelConfig.from_pbtxt("""
name: "m"
max_batch_size: 16
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 300
  priority_levels: 3
  default_priority_level: 2
  default_queue_policy { timeout_action: DELAY default_timeout_microseconds: 10 allow_timeout_override: true }
  priority_queue_policy [
    { key: 1 value { max_queue_size: 4 } },
    { key: 3 value { timeout_action: REJECT default_timeout_microseconds: 50 } }
  ]
}
""")
    assert cfg.dynamic_batching == DynamicBatching(
        (4, 8),
        300,
        False,
        3,
        2,
        QueuePolicy("DELAY", 10, True, 0),
        {1: QueuePolicy(max_queue_size=4), 3: QueuePolicy("REJECT", 50)},
    )
    assert not any("dynamic_batching" in n for n in cfg.notes)  # acted on: nothing to warn


def test_an_empty_dynamic_batching_block_turns_it_on() -> None:
    assert ModelConfig.from_pbtxt('name: "m"\nmax_batch_size: 8\ndynamic_batching { }\n').dynamic_batching == (
        DynamicBatching()
    )
    assert ModelConfig.from_pbtxt('name: "m"\n').dynamic_batching is None


@pytest.mark.parametrize(
    ("block", "want"),
    [
        ("", VersionPolicy()),
        ("version_policy: { latest: { num_versions: 3 } }", VersionPolicy("latest", 3)),
        ("version_policy { all { } }", VersionPolicy("all")),
        ("version_policy { specific { versions: [ 4, 2 ] } }", VersionPolicy("specific", versions=(2, 4))),
        ("version_policy { specific { versions: 4 versions: 2 } }", VersionPolicy("specific", versions=(2, 4))),
    ],
)
def test_version_policy_forms(block: str, want: VersionPolicy) -> None:
    assert ModelConfig.from_pbtxt(f'name: "m"\n{block}\n').version_policy == want


def test_version_policy_without_a_policy_is_refused() -> None:
    with pytest.raises(ConfigError, match=r":2: version_policy names no policy"):
        ModelConfig.from_pbtxt('name: "m"\nversion_policy { }\n')


WARMUP = """
name: "m"
max_batch_size: 8
input [ { name: "a" data_type: TYPE_FP32 dims: [ 3 ] }, { name: "b" data_type: TYPE_STRING dims: [ 1 ] } ]
model_warmup [
  {
    name: "w"
    batch_size: 8
    count: 2
    inputs { key: "a" value { data_type: TYPE_FP32 dims: [ 3 ] zero_data: false } }
    inputs: [ { key: "b", value: { data_type: TYPE_STRING, dims: [ 1 ], input_data_file: "b.bin" } } ]
  },
  {
    name: "skipped"
    inputs { key: "a" value { data_type: TYPE_FP32 dims: [ 3 ] random_data: true } }
  }
]
"""


def test_model_warmup_is_read() -> None:
    cfg = ModelConfig.from_pbtxt(WARMUP)
    w, skipped = cfg.warmup
    # Triton: a data source that is set is used, whatever its value ("zero_data: false" is zeros).
    assert w == ModelWarmup(
        "w",
        8,
        {"a": WarmupInput("float32", (3,), zero_data=True), "b": WarmupInput("string", (1,), input_data_file="b.bin")},
        2,
    )
    assert (skipped.batch_size, skipped.runs, w.runs) == (0, 0, 2)
    assert cfg.warmup_count == 2
    assert any("'skipped' has batch_size 0 and is skipped" in n for n in cfg.notes)


def test_warmup_input_without_data_names_its_line() -> None:
    text = WARMUP.replace("random_data: true", "")
    with pytest.raises(ConfigError, match=r":15: model_warmup 'skipped': input 'a' needs one of zero_data"):
        ModelConfig.from_pbtxt(text)


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        ('output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] is_non_linear_format_io: true } ]', 2, "output"),
        ("instance_group [ { kind: KIND_GPU secondary_devices [ { kind: KIND_NVDLA } ] } ]", 2, "instance_group"),
        ("instance_group [ { count: 2 passive: true } ]", 2, "instance_group.passive"),
        ('input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] reshape { shape: [ ] } } ]', 2, "input.reshape"),
        ('default_model_filename: "../other/model.pt"', 2, "default_model_filename"),
        ('input [ { name: "" data_type: TYPE_FP32 dims: [ 1 ] } ]', 2, "input"),
        ("max_batch_size: -1", 2, "max_batch_size"),
        (
            'input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
            'input [ { name: "x" data_type: TYPE_FP32 dims: [ 2 ] } ]',
            3,
            "input.name",
        ),
        (
            'output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] },\n'
            '  { name: "y" data_type: TYPE_FP32 dims: [ 2 ] } ]',
            3,
            "output.name",
        ),
    ],
)
def test_refused_values_name_their_line_and_key(text: str, line: int, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_pbtxt(f'name: "m"\n{text}\n')
    assert str(e.value).startswith(f"<config.pbtxt>:{line}: "), str(e.value)
    assert (e.value.key or "").startswith(key)


@pytest.mark.parametrize(
    "line",
    [
        'input [ { name: "x" data_type: TYPE_FP32 format: FORMAT_NHWC dims: [ 8, 8, 3 ] } ]',
        "model_transaction_policy { decoupled: false }",
        'runtime: "libtriton_pytorch.so"',
        "response_cache { enable: false }",
        'backend: "pytorch"\nplatform: "pytorch_libtorch"',
    ],
)
def test_fields_that_change_nothing_are_accepted_silently(line: str) -> None:
    assert ModelConfig.from_pbtxt(f'name: "m"\n{line}\n').notes == ()


def test_unknown_nested_field_says_which_message_lacks_it() -> None:
    with pytest.raises(ConfigError, match=r"<config\.pbtxt>:3:\d+: ModelInstanceGroup has no field 'cout'") as e:
        ModelConfig.from_pbtxt('name: "m"\ninstance_group [ {\n  cout: 2\n} ]\n')
    assert e.value.key == "cout"


@pytest.mark.parametrize("field", ["ensemble_scheduling", "model_operations", "model_metrics"])
def test_triton_fields_outside_the_schema_say_they_are_not_supported(field: str) -> None:
    with pytest.raises(ConfigError, match=rf":2:1: field '{field}' is not supported: ") as e:
        ModelConfig.from_pbtxt(f'name: "m"\n{field} {{ }}\n')
    assert e.value.key == field


def test_a_parameter_error_points_at_its_value() -> None:
    text = 'name: "m"\nparameters {\n  key: "INFERENCE_MODE"\n  value: { string_value: "maybe" }\n}\n'
    with pytest.raises(ConfigError, match=r"<config\.pbtxt>:4: ") as e:
        ModelConfig.from_pbtxt(text)
    assert e.value.key == "INFERENCE_MODE"


def test_text_without_name_or_directory_is_refused() -> None:
    with pytest.raises(ConfigError, match="no 'name'"):
        ModelConfig.from_pbtxt('platform: "pytorch_libtorch"\n')


def test_default_model_filename_becomes_the_path_without_a_directory() -> None:
    assert str(ModelConfig.from_pbtxt('name: "m"\ndefault_model_filename: "traced.ts"\n').path) == "traced.ts"


# ---------------------------------------------------------------- Locations


def _line(text: str, snippet: str) -> int:
    """The line of the first occurrence of ``snippet`` in ``text``."""
    return text[: text.index(snippet)].count("\n") + 1


def test_locations_find_fields_however_they_are_written() -> None:
    loc = Locations(REPEATED)
    assert loc.line("input", 1, "reshape") == _line(REPEATED, "reshape { }")
    assert loc.line("input", 0, "dims") == _line(REPEATED, "dims: 2")
    assert loc.line("instance_group", 1, "gpus") == _line(REPEATED, "instance_group: {")
    assert loc.line("parameters", "X") == _line(REPEATED, 'parameters: { key: "X"')
    assert loc.line("parameters", "INFERENCE_MODE", "value") == _line(REPEATED, 'parameters { key: "INF')
    lists = Locations(LISTS)
    assert lists.line("input", 1, "reshape") == _line(LISTS, '{ name: "b"')
    assert lists.line("parameters", "X", "value") == _line(LISTS, '{ key: "X"')
    assert lists.line("max_batch_size") == _line(LISTS, "max_batch_size")
    warmup = Locations(WARMUP)
    assert warmup.line("model_warmup", 0, "inputs", "b", "value", "input_data_file") == _line(WARMUP, '"b.bin"')
    assert warmup.line("model_warmup", 1, "inputs", "a", "value", "random_data") == _line(WARMUP, "random_data")


def test_locations_fall_back_to_the_enclosing_field() -> None:
    loc = Locations('name: "m"\ndynamic_batching {\n  max_queue_delay_microseconds: 1\n}\n')
    assert loc.line("dynamic_batching", "max_queue_delay_microseconds") == 3
    assert loc.line("dynamic_batching", "preferred_batch_size") == 2
    assert loc.line("nothing") is None


def test_locations_survive_odd_text() -> None:
    assert Locations('name: "a" "b"  # comment with { braces\nmax_batch_size: 2\n').line("max_batch_size") == 2
    assert Locations("{{{ ][ ").line("x") is None

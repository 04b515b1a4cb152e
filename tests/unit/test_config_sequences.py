"""Triton's sequence_batching block, read from config.pbtxt and built in Python."""

from __future__ import annotations

from pathlib import Path

import pytest

from libtorchrt import ConfigError, ControlInput, SequenceBatching, SequenceState
from libtorchrt.config import pbtxt

HEAD = """
name: "acc"
platform: "pytorch_libtorch"
max_batch_size: 4
input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 1 ] } ]
"""


def _parse(block: str, tmp_path: Path) -> SequenceBatching:
    (tmp_path / "acc").mkdir(exist_ok=True)
    cfg = pbtxt.parse(HEAD + block, model_dir=tmp_path / "acc")
    assert cfg.sequence_batching is not None
    return cfg.sequence_batching


def test_every_field_is_read(tmp_path: Path) -> None:
    (tmp_path / "acc" / "initial_state").mkdir(parents=True)
    (tmp_path / "acc" / "initial_state" / "init.bin").write_bytes(b"\0" * 12)
    seq = _parse(
        """
sequence_batching {
  max_sequence_idle_microseconds: 5000
  control_input [
    { name: "START" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] },
    { name: "END" control [ { kind: CONTROL_SEQUENCE_END fp32_false_true: [ 0, 1 ] } ] },
    { name: "READY" control [ { kind: CONTROL_SEQUENCE_READY bool_false_true: [ false, true ] } ] },
    { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_STRING } ] }
  ]
  state [ {
    input_name: "IN_STATE" output_name: "OUT_STATE" data_type: TYPE_FP32 dims: [ 3 ]
    initial_state { data_type: TYPE_FP32 dims: [ 3 ] data_file: "init.bin" name: "init" }
    use_same_buffer_for_input_output: true use_growable_memory: true
  } ]
  oldest {
    max_candidate_sequences: 8 preferred_batch_size: [ 2, 4 ] max_queue_delay_microseconds: 100
    preserve_ordering: true
  }
}""",
        tmp_path,
    )
    assert seq.strategy == "oldest"
    assert seq.max_sequence_idle_microseconds == 5000
    assert [(c.name, c.kind, c.data_type, c.false_true) for c in seq.control_inputs] == [
        ("START", "CONTROL_SEQUENCE_START", "int32", (0, 1)),
        ("END", "CONTROL_SEQUENCE_END", "float32", (0.0, 1.0)),
        ("READY", "CONTROL_SEQUENCE_READY", "bool", (False, True)),
        ("CORRID", "CONTROL_SEQUENCE_CORRID", "string", (0, 1)),
    ]
    (state,) = seq.states
    assert (state.input_name, state.output_name, state.dims, state.start_shape) == (
        "IN_STATE",
        "OUT_STATE",
        (3,),
        (3,),
    )
    assert state.data_file == str(tmp_path / "acc" / "initial_state" / "init.bin")  # where Triton looks
    assert state.use_same_buffer_for_input_output and state.use_growable_memory
    assert (seq.max_candidate_sequences, seq.preferred_batch_size, seq.preserve_ordering) == (8, (2, 4), True)
    assert seq.hidden_inputs == ("START", "END", "READY", "CORRID", "IN_STATE")
    assert seq.slots(4) == 8


def test_defaults_are_tritons(tmp_path: Path) -> None:
    seq = _parse("sequence_batching { }", tmp_path)
    assert seq.strategy == "direct"
    assert seq.max_sequence_idle_microseconds == 1_000_000
    assert seq.slots(4) == 4 and seq.slots(0) == 1
    direct = _parse(
        "sequence_batching { direct { max_queue_delay_microseconds: 7 minimum_slot_utilization: 0.5 } }", tmp_path
    )
    assert (direct.max_queue_delay_microseconds, direct.minimum_slot_utilization) == (7, 0.5)


@pytest.mark.parametrize(
    ("block", "error"),
    [
        (
            "sequence_batching { control_input [ { name: 'S' control [ { kind: CONTROL_SEQUENCE_START } ] } ] }",
            "exactly one of int32_false_true",
        ),
        (
            "sequence_batching { control_input [ { name: 'S' control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 1 ] } ] } ] }",  # noqa: E501
            "exactly two values",
        ),
        (
            "sequence_batching { control_input [ { name: 'C' control [ { kind: CONTROL_SEQUENCE_CORRID } ] } ] }",
            "needs a data_type",
        ),
        (
            "sequence_batching { control_input [ { name: 'C' control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_FP32 } ] } ] }",  # noqa: E501
            "CORRID input's data_type must be one of",
        ),
        (
            "sequence_batching { control_input [ { name: 'A' control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] },"  # noqa: E501
            " { name: 'B' control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] } ] }",
            "on more than one control input",
        ),
        (
            "sequence_batching { control_input [ { name: 'x' control [ { kind: CONTROL_SEQUENCE_READY int32_false_true: [ 0, 1 ] } ] } ] }",  # noqa: E501
            "both a declared input",
        ),
        (
            "sequence_batching { state [ { input_name: 'S' output_name: 'T' data_type: TYPE_FP32 dims: [ -1 ] } ] }",
            "variable size",
        ),
        ("sequence_batching { state [ { input_name: 'S' output_name: 'T' dims: [ 1 ] } ] }", "has no data_type"),
        (
            "sequence_batching { state [ { input_name: 'S' output_name: 'T' data_type: TYPE_STRING dims: [ 1 ] } ] }",
            "must be a tensor",
        ),
        ("sequence_batching { iterative_sequence: true }", "iterative_sequence"),
        ("sequence_batching { direct { minimum_slot_utilization: 1.5 } }", "minimum_slot_utilization"),
        ("sequence_batching { oldest { preferred_batch_size: [ 8 ] } }", "exceeds max_batch_size"),
        ("sequence_batching { } dynamic_batching { }", "another member of oneof"),
    ],
)
def test_what_triton_refuses_is_refused_with_its_line(tmp_path: Path, block: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error) as info:
        _parse(block, tmp_path)
    assert "<config.pbtxt>" in str(info.value)


def test_python_configuration_checks() -> None:
    with pytest.raises(ConfigError, match="strategy"):
        SequenceBatching("newest")
    with pytest.raises(ConfigError, match="kind"):
        ControlInput("s", "CONTROL_SEQUENCE_BEGIN")
    with pytest.raises(ConfigError, match="names input 's' twice"):
        SequenceBatching(
            control_inputs=[ControlInput("s", "CONTROL_SEQUENCE_START")],
            states=[SequenceState("s", "o", "float32", [1])],
        )
    with pytest.raises(ConfigError, match="oldest"):
        SequenceBatching("direct", preferred_batch_size=[2])
    assert ControlInput("c", "CONTROL_SEQUENCE_CORRID", "TYPE_UINT64").data_type == "uint64"
    assert SequenceBatching(max_sequence_idle_microseconds=0).max_sequence_idle_microseconds == 1_000_000


def test_written_back_as_config_pbtxt_it_reads_the_same(tmp_path: Path) -> None:
    from libtorchrt.config import writer

    (tmp_path / "acc" / "1").mkdir(parents=True)
    text = (
        HEAD
        + """
sequence_batching {
  control_input [
    { name: "S" control [ { kind: CONTROL_SEQUENCE_START fp32_false_true: [ 0, 1 ] } ] },
    { name: "C" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] }
  ]
  state [ { input_name: "I" output_name: "O" data_type: TYPE_FP32 dims: [ 2 ] } ]
  direct { max_queue_delay_microseconds: 10 minimum_slot_utilization: 0.5 }
}"""
    )
    cfg = pbtxt.parse(text, model_dir=tmp_path / "acc")
    again = pbtxt.parse(writer.to_pbtxt(cfg), model_dir=tmp_path / "acc")
    assert again.sequence_batching == cfg.sequence_batching


def test_an_initial_state_file_is_checked_when_read(tmp_path: Path) -> None:
    (tmp_path / "acc" / "initial_state").mkdir(parents=True)
    block = """
sequence_batching { state [ {
  input_name: "I" output_name: "O" data_type: TYPE_FP32 dims: [ 2 ]
  initial_state { data_type: TYPE_FP32 dims: [ 2 ] data_file: "init.bin" name: "i" }
} ] }"""
    with pytest.raises(ConfigError, match=r"init\.bin.* cannot be read"):
        _parse(block, tmp_path)
    (tmp_path / "acc" / "initial_state" / "init.bin").write_bytes(b"\0" * 4)
    with pytest.raises(ConfigError, match="holds 4 bytes; expected 8"):
        _parse(block, tmp_path)
    (tmp_path / "acc" / "initial_state" / "init.bin").write_bytes(b"\0" * 8)
    assert _parse(block, tmp_path).states[0].data_file is not None


def test_a_variable_size_state_needs_max_batch_size_0(tmp_path: Path) -> None:
    block = """
sequence_batching { state [ {
  input_name: "I" output_name: "O" data_type: TYPE_FP32 dims: [ -1 ]
  initial_state { data_type: TYPE_FP32 dims: [ 0 ] zero_data: true name: "i" }
} ] }"""
    with pytest.raises(ConfigError, match=r"variable size .* needs max_batch_size 0"):
        _parse(block, tmp_path)

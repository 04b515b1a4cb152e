"""The worker's side of sequence batching: where filled-in inputs go, and the states."""

from __future__ import annotations

import pytest
import torch

from libtorchrt.errors import ProtocolError
from libtorchrt.workers.sequences import END, START, SequenceSide, place


def test_place_by_name_then_suffix_then_free_positions() -> None:
    assert place(["x", "start", "state"], ["x", "start", "state"]) == {"x": 0, "start": 1, "state": 2}
    assert place(["a", "b", "c"], ["INPUT__2", "S", "T"]) == {"INPUT__2": 2, "S": 0, "T": 1}
    assert place(["a", "b"], ["x", "y", "z"]) == {"x": 0, "y": 1}  # z finds no argument


CONFIG = {
    "controls": [
        ["start", "CONTROL_SEQUENCE_START", "int32", [0, 1]],
        ["corrid", "CONTROL_SEQUENCE_CORRID", "uint64", [0, 1]],
    ],
    "states": [["state", "OUTPUT__1", "float32", [2], None]],
}


def _side(batching: bool = True) -> SequenceSide:
    return SequenceSide(CONFIG, ["x", "start", "corrid", "state"], ["x"], [], ["OUTPUT__0"], batching)


def test_arguments_and_states_follow_each_sequence() -> None:
    side = _side()
    x = torch.ones(2, 2)
    args = side.arguments([x], [1, START, 2, START], [7, 2**64 - 1])
    assert args[0] is x
    assert args[1].tolist() == [[1], [1]]
    assert args[2].tolist() == [[7], [-1]]  # a uint64 over 2**63 arrives wrapped in an int64
    assert args[3].tolist() == [[0.0, 0.0], [0.0, 0.0]]
    out = side.results([x * 10, torch.tensor([[1.0, 2.0], [3.0, 4.0]])], [1, START, 2, START])
    assert len(out) == 1  # the state output is not the caller's
    # the second sequence alone, then both in the other order, then the first ends
    args = side.arguments([x[:1]], [2, 0], [2])
    assert args[1].tolist() == [[0]] and args[3].tolist() == [[3.0, 4.0]]
    side.results([x[:1], torch.tensor([[5.0, 5.0]])], [2, 0])
    args = side.arguments([x], [2, 0, 1, END], [2, 7])
    assert args[3].tolist() == [[5.0, 5.0], [1.0, 2.0]]
    side.results([x, torch.zeros(2, 2)], [2, 0, 1, END])
    assert set(side.kept) == {2}
    side.forget([2])
    assert not side.kept


def test_a_start_resets_a_running_sequence_and_rows_must_fit() -> None:
    side = _side()
    side.results([torch.ones(1, 2), torch.full((1, 2), 9.0)], [1, START])
    assert side.arguments([torch.ones(1, 2)], [1, START], [1])[3].tolist() == [[0.0, 0.0]]
    with pytest.raises(ProtocolError):
        side.arguments([torch.ones(2, 2)], [1, 0], [1])  # two rows for one sequence
    with pytest.raises(ProtocolError):
        side.arguments([torch.ones(1, 2)], [1, 0], ["one"])  # a string id for an integer CORRID


def test_a_missing_argument_or_initial_file_fails_at_start(tmp_path: object) -> None:
    with pytest.raises(ValueError, match="'start' has no argument"):
        SequenceSide(CONFIG, ["x", "state"], ["x"], [], [], True)
    bad = {"states": [["state", "OUTPUT__1", "float32", [2], "/nonexistent/init.bin"]]}
    with pytest.raises(ValueError, match="initial_state data_file"):
        SequenceSide(bad, ["x", "state"], ["x"], [], [], True)

"""Triton's ``sequence_batching`` block: :class:`SequenceBatching` and its parts.

Runs in the front (and the worker reads the parts it acts on from its spec). The
settings are checked with Triton's rules, so that a file Triton refuses is refused
here too; the scheduler that acts on them is ``front/sequences.py``, and the worker's
side (control inputs, implicit state) is ``workers/sequences.py``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..transport.dtypes import ITEMSIZES
from .tensor import dtype_of

__all__ = [
    "CONTROL_KINDS",
    "STRATEGIES",
    "ControlInput",
    "SequenceBatching",
    "SequenceState",
]

#: Triton's control kinds (``ModelSequenceBatching.Control.Kind``).
CONTROL_KINDS = ("CONTROL_SEQUENCE_START", "CONTROL_SEQUENCE_READY", "CONTROL_SEQUENCE_END", "CONTROL_SEQUENCE_CORRID")
#: The scheduling strategies (Triton's ``strategy_choice``; direct when none is given).
STRATEGIES = ("direct", "oldest")
#: Triton's default of ``max_sequence_idle_microseconds`` (0 or absent: one second).
DEFAULT_IDLE_MICROSECONDS = 1_000_000
_CORRID_DTYPES = ("uint64", "int64", "uint32", "int32", "string")

_FLAG_DTYPES = {"int32_false_true": "int32", "fp32_false_true": "float32", "bool_false_true": "bool"}


def _count(key: str, value: Any, lo: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"sequence_batching {key} is {value!r}; expected an integer >= {lo}", key=key)
    return int(value)


@dataclass(frozen=True)
class ControlInput:
    """One control input the sequence batcher fills in (Triton's ``control_input``).

    Args:
        name: the model input it feeds (not a declared ``input``).
        kind: one of :data:`CONTROL_KINDS`.
        data_type: its dtype: for START/READY/END the dtype of ``false_true``
            (int32, float32 or bool); for CORRID one of uint64, int64, uint32,
            int32 or string (the correlation ID's type; torch has no general
            unsigned 64- and 32-bit tensors, so the model gets those as int64).
        false_true: the values meaning false and true (START/READY/END).

    Raises:
        ConfigError: a kind, type or pair Triton would refuse (names the input).
    """

    name: str
    kind: str
    data_type: str = "int32"
    false_true: tuple[Any, Any] = (0, 1)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"control_input name {self.name!r} is invalid; expected a non-empty string", key="name")
        if self.kind not in CONTROL_KINDS:
            raise ConfigError(
                f"control_input {self.name!r}: kind {self.kind!r} is not one of {', '.join(CONTROL_KINDS)}",
                key="kind",
            )
        if self.kind == "CONTROL_SEQUENCE_CORRID":
            given = str(self.data_type).removeprefix("TYPE_").lower()
            dtype = given if given in ("uint64", "uint32") else dtype_of(self.data_type, f"control_input {self.name!r}")
            object.__setattr__(self, "data_type", dtype)
            if dtype not in _CORRID_DTYPES:
                raise ConfigError(
                    f"control_input {self.name!r}: a CONTROL_SEQUENCE_CORRID input's data_type must be one of "
                    f"TYPE_UINT64, TYPE_INT64, TYPE_UINT32, TYPE_INT32, TYPE_STRING; got {dtype}",
                    key="data_type",
                )
            return
        dtype = dtype_of(self.data_type, f"control_input {self.name!r}")
        object.__setattr__(self, "data_type", dtype)
        if dtype not in _FLAG_DTYPES.values():
            raise ConfigError(
                f"control_input {self.name!r}: {self.kind} takes int32_false_true, fp32_false_true or "
                f"bool_false_true (data_type int32, float32 or bool); got {dtype}",
                key="data_type",
            )
        pair = tuple(self.false_true)
        if len(pair) != 2:
            raise ConfigError(
                f"control_input {self.name!r}: {self.kind} needs exactly two values (false, true); got {list(pair)}",
                key="false_true",
            )
        object.__setattr__(self, "false_true", pair)

    @property
    def is_corrid(self) -> bool:
        return self.kind == "CONTROL_SEQUENCE_CORRID"


@dataclass(frozen=True)
class SequenceState:
    """One implicit state (Triton's ``state``): the model's ``output_name`` after one
    request of a sequence is its ``input_name`` in the next.

    Args:
        input_name, output_name: the model input and output that carry it.
        data_type, dims: its dtype and shape (without the batch dimension; -1: any
            size, which the state may change from request to request).
        initial: what a sequence starts from: ``"zero"`` (zeros of ``initial_dims``),
            or the path of a file of raw little-endian values (Triton's
            ``initial_state { data_file }``); None: zeros of ``dims``.
        initial_dims: the initial state's shape (default: ``dims``, which must then
            be fixed).
        use_same_buffer_for_input_output, use_growable_memory: Triton's buffer hints,
            accepted: a state lives in its instance's process, and each request's
            state output becomes the next one's input without a copy, whatever its size.

    Raises:
        ConfigError: a bad name, type or shape (names the state).
    """

    input_name: str
    output_name: str
    data_type: str = "float32"
    dims: Sequence[int] = ()
    initial: str | None = None
    initial_dims: Sequence[int] | None = None
    use_same_buffer_for_input_output: bool = False
    use_growable_memory: bool = False

    def __post_init__(self) -> None:
        for key in ("input_name", "output_name"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"state {key} {value!r} is invalid; expected a non-empty string", key=key)
        label = f"state {self.input_name!r}"
        dtype = dtype_of(self.data_type, label)
        if dtype == "string":
            raise ConfigError(f"{label}: a state must be a tensor; TYPE_STRING is not one", key="data_type")
        object.__setattr__(self, "data_type", dtype)
        object.__setattr__(self, "dims", _dims(self.dims, label, "dims", allow_any=True))
        shape = self.dims if self.initial_dims is None else _dims(self.initial_dims, label, "initial_state dims")
        if any(d < 0 for d in shape):
            raise ConfigError(
                f"{label}: dims {list(self.dims)} has a variable size; give initial_state dims to start from",
                key="initial_state",
            )
        if self.initial_dims is not None:
            object.__setattr__(self, "initial_dims", shape)
        if self.initial is not None and not isinstance(self.initial, str):
            raise ConfigError(f"{label}: initial_state {self.initial!r}: expected 'zero' or a file path", key="initial")
        path = self.data_file
        if path is not None:
            size = math.prod(shape) * ITEMSIZES[dtype]
            try:
                got = os.stat(path).st_size
            except OSError as e:
                raise ConfigError(
                    f"{label}: initial_state data_file {path!r} cannot be read: {e.strerror}", key="initial_state"
                ) from None
            if got != size:
                raise ConfigError(
                    f"{label}: initial_state data_file {os.path.basename(path)!r} holds {got} bytes; expected {size} "
                    f"({list(shape)} of {dtype})",
                    key="initial_state",
                )

    @property
    def start_shape(self) -> tuple[int, ...]:
        """The shape a sequence's state starts with (without the batch dimension)."""
        return tuple(self.dims if self.initial_dims is None else self.initial_dims)

    @property
    def data_file(self) -> str | None:
        return None if self.initial in (None, "zero") else self.initial


@dataclass(frozen=True)
class SequenceBatching:
    """Triton's ``sequence_batching``: stateful models (see docs/sequences.md).

    Every request names its sequence (``sequence_id``); a sequence sticks to the
    instance that took its first request, and the state it builds lives in that
    instance's process.

    Args:
        strategy: ``"direct"`` (each sequence holds one of ``max(1, max_batch_size)``
            slots of an instance; a batch is made of the slots with a request ready)
            or ``"oldest"`` (an instance takes up to ``max_candidate_sequences``, and
            batches their oldest requests, one per sequence).
        max_sequence_idle_microseconds: a sequence with nothing queued for this long
            is ended and its slot freed (0: Triton's default, one second).
        control_inputs: the inputs the batcher fills in per request.
        states: the implicit states kept between a sequence's requests.
        max_queue_delay_microseconds: how long a batch may wait to grow.
        minimum_slot_utilization: direct: the share of an instance's slots that must
            have a request ready before a batch leaves early (0: at once).
        max_candidate_sequences: oldest: the sequences an instance takes at once
            (0: ``max(1, max_batch_size)``).
        preferred_batch_size: oldest: batch sizes to aim for.
        preserve_ordering: oldest: responses leave in the order requests came.

    Raises:
        ConfigError: a value breaks one of Triton's rules (names the field).
    """

    strategy: str = "direct"
    max_sequence_idle_microseconds: int = DEFAULT_IDLE_MICROSECONDS
    control_inputs: Sequence[ControlInput] = ()
    states: Sequence[SequenceState] = ()
    max_queue_delay_microseconds: int = 0
    minimum_slot_utilization: float = 0.0
    max_candidate_sequences: int = 0
    preferred_batch_size: Sequence[int] = ()
    preserve_ordering: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"sequence_batching strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}", key="strategy"
            )
        idle = _count("max_sequence_idle_microseconds", self.max_sequence_idle_microseconds)
        object.__setattr__(self, "max_sequence_idle_microseconds", idle or DEFAULT_IDLE_MICROSECONDS)
        for key in ("max_queue_delay_microseconds", "max_candidate_sequences"):
            object.__setattr__(self, key, _count(key, getattr(self, key)))
        util = self.minimum_slot_utilization
        if isinstance(util, bool) or not isinstance(util, (int, float)) or not 0.0 <= util <= 1.0 or math.isnan(util):
            raise ConfigError(
                f"sequence_batching minimum_slot_utilization is {util!r}; expected a number from 0 to 1",
                key="minimum_slot_utilization",
            )
        object.__setattr__(self, "minimum_slot_utilization", float(util))
        sizes = tuple(self.preferred_batch_size)
        for size in sizes:
            if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                raise ConfigError(
                    f"sequence_batching preferred_batch_size {list(sizes)} must hold positive integers",
                    key="preferred_batch_size",
                )
        object.__setattr__(self, "preferred_batch_size", sizes)
        object.__setattr__(self, "preserve_ordering", bool(self.preserve_ordering))
        controls = tuple(self.control_inputs)
        states = tuple(self.states)
        for c in controls:
            if not isinstance(c, ControlInput):
                raise ConfigError(f"sequence_batching control_inputs holds {c!r}; expected ControlInput", key="control")
        for s in states:
            if not isinstance(s, SequenceState):
                raise ConfigError(f"sequence_batching states holds {s!r}; expected SequenceState", key="state")
        object.__setattr__(self, "control_inputs", controls)
        object.__setattr__(self, "states", states)
        kinds = [c.kind for c in controls]
        for kind in set(kinds):
            if kinds.count(kind) > 1:
                raise ConfigError(f"sequence_batching has {kind} on more than one control input", key="control_input")
        names = [c.name for c in controls] + [s.input_name for s in states]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"sequence_batching names input {dup[0]!r} twice", key="control_input")
        outs = [s.output_name for s in states]
        dup = sorted({n for n in outs if outs.count(n) > 1})
        if dup:
            raise ConfigError(f"sequence_batching names state output {dup[0]!r} twice", key="state")
        if self.strategy == "direct" and (self.preferred_batch_size or self.preserve_ordering):
            raise ConfigError(
                "sequence_batching: preferred_batch_size and preserve_ordering belong to the oldest strategy",
                key="strategy",
            )

    @property
    def hidden_inputs(self) -> tuple[str, ...]:
        """The model inputs the batcher fills in: control inputs, then state inputs."""
        return tuple(c.name for c in self.control_inputs) + tuple(s.input_name for s in self.states)

    @property
    def state_outputs(self) -> tuple[str, ...]:
        return tuple(s.output_name for s in self.states)

    @property
    def corrid(self) -> ControlInput | None:
        return next((c for c in self.control_inputs if c.is_corrid), None)

    def slots(self, max_batch_size: int) -> int:
        """The sequences one instance holds at once."""
        if self.strategy == "oldest" and self.max_candidate_sequences:
            return self.max_candidate_sequences
        return max(1, max_batch_size)

    def check(self, model: str, max_batch_size: int, inputs: Sequence[str], outputs: Sequence[str]) -> None:
        """Check against the rest of the model's configuration.

        Raises:
            ConfigError: a control or state input that is also a declared input, a
                preferred size over ``max_batch_size``.
        """
        clash = sorted(set(self.hidden_inputs) & set(inputs))
        if clash:
            raise ConfigError(
                f"model {model!r}: {clash[0]!r} is both a declared input and a sequence_batching control or state "
                "input; the batcher fills it in, so remove it from input",
                model=model,
                key="sequence_batching",
            )
        growing = [s.input_name for s in self.states if any(d < 0 for d in s.dims)]
        if growing and max_batch_size > 0:
            raise ConfigError(
                f"model {model!r}: state {growing[0]!r} has a variable size (-1 in dims), which needs max_batch_size "
                "0: the rows of a batch share their states' shape",
                model=model,
                key="sequence_batching",
            )
        over = [s for s in self.preferred_batch_size if s > max(1, max_batch_size)]
        if over:
            raise ConfigError(
                f"model {model!r}: sequence_batching preferred_batch_size {over} exceeds max_batch_size "
                f"{max_batch_size}",
                model=model,
                key="preferred_batch_size",
            )

    def to_json(self) -> dict[str, Any]:
        """What a worker needs (see ``workers/sequences.py``), as plain values."""
        return {
            "controls": [[c.name, c.kind, c.data_type, list(c.false_true)] for c in self.control_inputs],
            "states": [
                [s.input_name, s.output_name, s.data_type, list(s.start_shape), s.data_file] for s in self.states
            ],
        }


def _dims(value: Any, label: str, key: str, allow_any: bool = False) -> tuple[int, ...]:
    try:
        dims = tuple(value)
    except TypeError:
        raise ConfigError(f"{label}: {key} {value!r} is not a list of integers", key="dims") from None
    lo = -1 if allow_any else 0
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int) or d < lo:
            raise ConfigError(f"{label}: {key} {list(dims)} must hold integers >= {lo}", key="dims")
    return dims

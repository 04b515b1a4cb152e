"""Sequence batching in the worker: control inputs and implicit state (worker process).

The front (``front/sequences.py``) sends every request of a sequence to the one
instance that holds it, one at a time, with its row's sequence *handle* (a number the
front gives each sequence it starts), its flags (start, end) and its correlation ID.
Here, per execution:

- the **control inputs** (``CONTROL_SEQUENCE_START``, ``_READY``, ``_END``,
  ``_CORRID``) are made for every row: shape ``[rows, 1]`` when the model batches,
  ``[1]`` when it does not, with the values of the configured ``false_true`` pair;
- each **implicit state** input is the state the row's sequence left after its last
  request (or its initial state at a start), stacked over the rows; after the
  execution each row's slice of the state output is kept for its next request, and
  the state output is taken out of what goes back to the caller (unless it is also a
  declared output). A sequence's state is dropped at its end, when the front says it
  was freed (``forget``), and never updated by a failed execution.

Where the filled-in inputs go among the model's arguments is decided as for declared
inputs (:func:`place`): an argument of the same name, else the ``__<i>`` suffix, else
the free positions in order, declared inputs first. The front's binder places the
caller's inputs with the same function, so both sides agree.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import ProtocolError
from ..transport.dtypes import DTYPES

__all__ = ["END", "START", "SequenceSide", "place"]

#: a row's flags (``wire.Request.sequence``)
START, END = 1, 2
_INDEXED = re.compile(r"^.+__(\d+)$")
_INT_CORRIDS = {"uint64": torch.int64, "int64": torch.int64, "uint32": torch.int64, "int32": torch.int32}
#: sequences whose state one worker keeps at most (the front frees idle ones long before)
MAX_SEQUENCES = 1 << 16


def _index(name: str) -> int | None:
    m = _INDEXED.match(name)
    return int(m.group(1)) if m else None


def place(arg_names: Sequence[str], names: Sequence[str]) -> dict[str, int]:
    """The argument position of each of ``names`` (Triton's rules): the argument of the
    same name, else the ``__<i>`` suffix, else the positions no other name claimed, in
    order. A name that finds no position is left out."""
    n = len(arg_names)
    by_name = {a: i for i, a in enumerate(arg_names)}
    taken: dict[int, str] = {}
    out: dict[str, int] = {}
    unplaced = []
    for name in names:
        pos = by_name.get(name)
        if pos is None:
            pos = _index(name)
        if pos is None or pos >= n or pos in taken:
            unplaced.append(name)
            continue
        taken[pos] = name
        out[name] = pos
    free = [i for i in range(n) if i not in taken]
    for name, pos in zip(unplaced, free):
        out[name] = pos
    return out


class SequenceSide:
    """One worker's sequences: fills in control and state inputs, keeps the states.

    Args:
        config: ``SequenceBatching.to_json()`` (from the worker's spec).
        arg_names: the model's argument names (``Runner.inputs``).
        input_names: the declared inputs' names.
        output_names: the names the model gives its outputs (empty: unnamed).
        declared_outputs: the declared outputs' names.
        batching: the model batches (``max_batch_size > 0``).
        dict_input: the model takes one ``Dict[str, Tensor]``.

    Raises:
        ValueError: a control or state input that has no argument to go to, or an
            initial state file that cannot be read (at start-up).
    """

    def __init__(
        self,
        config: dict[str, Any],
        arg_names: Sequence[str],
        input_names: Sequence[str],
        output_names: Sequence[str],
        declared_outputs: Sequence[str],
        batching: bool,
        dict_input: bool = False,
    ) -> None:
        self.batching = batching
        self.dict_input = dict_input
        #: (name, kind, dtype, (false, true)) per control input
        self.controls: list[tuple[str, str, str, tuple[Any, Any]]] = [
            (name, kind, dtype, (pair[0], pair[1]) if len(pair) == 2 else (0, 1))
            for name, kind, dtype, pair in config.get("controls", [])
        ]
        #: (input name, output name, dtype, initial tensor) per state
        self.states: list[tuple[str, str, torch.dtype, torch.Tensor]] = [
            (inp, out, DTYPES[dtype], _initial(inp, DTYPES[dtype], tuple(shape), path))
            for inp, out, dtype, shape, path in config.get("states", [])
        ]
        hidden = [c[0] for c in self.controls] + [s[0] for s in self.states]
        if dict_input:
            self.positions: dict[str, int] = {}
            self.visible = 1
        else:
            placed = place(arg_names, [*input_names, *hidden])
            missing = [name for name in hidden if name not in placed]
            if missing:
                raise ValueError(
                    f"sequence_batching input {missing[0]!r} has no argument to go to: the method takes "
                    f"{list(arg_names)}; name an argument after it, or give it a __<i> suffix"
                )
            self.positions = {name: placed[name] for name in hidden}
            self.visible = len(arg_names) - len(hidden)
        self._output_names = list(output_names)
        self._declared = list(declared_outputs)
        #: positions of the state outputs among the model's results (known at the first)
        self._state_outputs: list[int] | None = None
        self._strip: set[int] = set()
        #: handle -> the states a sequence left after its last request
        self.kept: dict[int, list[torch.Tensor]] = {}

    def forget(self, handles: Sequence[int]) -> None:
        for handle in handles:
            self.kept.pop(handle, None)

    # ── one execution ──────────────────────────────────────────────────────────

    def arguments(self, inputs: list[Any], pairs: Sequence[int], corrids: Sequence[Any]) -> list[Any]:
        """The model's arguments: the request's ``inputs`` with the control and state
        inputs put in their places, for the rows ``pairs`` (handle, flags) describe.

        Raises:
            ProtocolError: rows that do not match the request.
        """
        rows = len(pairs) // 2
        if not rows or len(pairs) % 2 or len(corrids) != rows or (not self.batching and rows != 1):
            raise ProtocolError(f"a sequence request's rows do not fit: {len(pairs)} flags, {len(corrids)} ids")
        if self.batching and inputs and isinstance(inputs[0], torch.Tensor) and len(inputs[0]) != rows:
            raise ProtocolError(f"a sequence batch of {rows} sequences carries {len(inputs[0])} rows")
        handles = pairs[0::2]
        flags = pairs[1::2]
        hidden: dict[str, Any] = {}
        for name, kind, dtype, pair in self.controls:
            hidden[name] = self._control(kind, dtype, pair, flags, corrids)
        for k, (name, _, _dtype, initial) in enumerate(self.states):
            parts = []
            for handle, flag in zip(handles, flags):
                kept = None if flag & START else self.kept.get(handle)
                parts.append(initial if kept is None else kept[k])
            hidden[name] = torch.stack(parts) if self.batching else parts[0]
        if self.dict_input:
            args = list(inputs)
            args[0] = {**args[0], **hidden}
            return args
        if len(inputs) != self.visible:
            raise ProtocolError(f"a sequence request carries {len(inputs)} inputs; the model takes {self.visible}")
        out: list[Any] = [None] * (len(inputs) + len(hidden))
        for name, pos in self.positions.items():
            out[pos] = hidden[name]
        it = iter(inputs)
        for i, value in enumerate(out):
            if value is None:
                out[i] = next(it)
        return out

    def _control(
        self, kind: str, dtype: str, pair: tuple[Any, Any], flags: Sequence[int], corrids: Sequence[Any]
    ) -> Any:
        if kind == "CONTROL_SEQUENCE_CORRID":
            if dtype == "string":
                return [str(c) for c in corrids]
            if any(not isinstance(c, int) for c in corrids):
                raise ProtocolError("a string sequence id for a model whose CONTROL_SEQUENCE_CORRID is an integer")
            # A uint64 id over 2**63 keeps its 64 bits in an int64 (torch has no uint64
            # tensors to speak of): the model sees it wrapped, as a C cast would give it.
            t = torch.tensor([c - (1 << 64) if c >= 1 << 63 else c for c in corrids], dtype=_INT_CORRIDS[dtype])
        else:
            bit = {"CONTROL_SEQUENCE_START": START, "CONTROL_SEQUENCE_END": END}.get(kind)
            values = [pair[1] if bit is None or f & bit else pair[0] for f in flags]  # READY: every row is
            t = torch.tensor(values, dtype=DTYPES[dtype])
        return t.reshape(-1, 1) if self.batching else t.reshape(1)

    def results(self, outputs: list[Any], pairs: Sequence[int]) -> list[Any]:
        """Keep each row's new state, drop ended sequences', and return the outputs
        the caller gets (the state outputs taken out)."""
        positions = self._positions(len(outputs))
        handles = pairs[0::2]
        flags = pairs[1::2]
        for row, (handle, flag) in enumerate(zip(handles, flags)):
            if flag & END:
                self.kept.pop(handle, None)
                continue
            values = []
            for pos in positions:
                value = outputs[pos]
                if not isinstance(value, torch.Tensor):
                    raise ValueError(f"state output {pos} is not a tensor")
                # A row of a batch is cloned: a view would keep the whole batch alive.
                values.append(value[row].clone() if self.batching else value.detach())
            if handle not in self.kept and len(self.kept) >= MAX_SEQUENCES:
                raise ValueError(f"this instance keeps the state of {MAX_SEQUENCES} sequences already")
            self.kept[handle] = values
        if not self._strip:
            return outputs
        return [o for i, o in enumerate(outputs) if i not in self._strip]

    def _positions(self, count: int) -> list[int]:
        """Where each state output is among ``count`` results: by the model's output
        names, else by the ``__<i>`` suffix, else after the declared outputs in order."""
        if self._state_outputs is not None:
            return self._state_outputs
        found = []
        after = len(self._declared)
        for _, out, _, _ in self.states:
            suffix = _index(out)
            if out in self._output_names:
                pos = self._output_names.index(out)
            elif suffix is not None:
                pos = suffix
            else:
                pos, after = after, after + 1
            if pos >= count:
                raise ValueError(
                    f"state output {out!r}: the model returned {count} outputs, so it has no output {pos}; "
                    "name it OUTPUT_STATE__<i> after its position, or declare the model's other outputs"
                )
            found.append(pos)
        self._state_outputs = found
        self._strip = {pos for pos, (_, out, _, _) in zip(found, self.states) if out not in self._declared}
        return found


def _initial(name: str, dtype: torch.dtype, shape: tuple[int, ...], path: str | None) -> torch.Tensor:
    if path is None:
        return torch.zeros(shape, dtype=dtype)
    size = torch.empty((), dtype=dtype).element_size()
    for d in shape:
        size *= d
    try:
        with open(path, "rb") as f:
            data = f.read(size + 1)
    except OSError as e:
        raise ValueError(f"state {name!r}: cannot read its initial_state data_file: {e}") from None
    if len(data) != size:
        raise ValueError(
            f"state {name!r}: initial_state data_file {os.path.basename(path)!r} holds {len(data)} bytes; "
            f"expected {size} ({list(shape)} of {dtype})"
        )
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape).clone()

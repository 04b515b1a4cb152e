"""Callers that behave like an application around each request (bench process).

A benchmark whose callers send the same tensor again and again and drop every result
measures less than an application pays: an application makes a new input for each
request and does something with the answer, and each of those torch calls releases and
takes back the GIL that the front's router thread and the other callers compete for.

An :class:`Application` wraps a ``send`` function (one request: ``Pool.infer``, a
baseline's call) into the ``call`` a load generator drives (``loadgen.py``, threads or
asyncio tasks). Every call:

1. **makes a fresh input** (:attr:`Behaviour.fresh`): ``"clone"`` -- a clone of the next
   of a few prepared input sets (taken in turn); ``"random"`` -- a new random tensor of
   each input's shape and dtype; ``"cycle"`` -- the prepared set itself, not copied
   (what callers that do not make inputs do);
2. sends it and waits for the answer;
3. **uses the result** (:attr:`Behaviour.use`): ``"sum"`` -- ``float(y.sum())`` of every
   output tensor; ``"equal"`` / ``"allclose"`` -- ``torch.equal`` / ``torch.allclose``
   against the reference answer for that input set (a mismatch raises
   :class:`ResultMismatchError`, counted as a failed request); ``"read"`` -- ``y.sum()``
   of every output, value dropped (what ``serving.consume`` does); ``"none"`` -- the
   result is dropped untouched.

What the callers did is counted (:attr:`Application.counts`): inputs made, answers
received, answers used -- so that a test can tell that it really happened.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["FRESH", "USES", "Application", "Behaviour", "Counts", "ResultMismatchError", "outputs_of"]

#: How a request's input is made (see the module docstring).
FRESH: tuple[str, ...] = ("clone", "random", "cycle")
#: What a caller does with a result (see the module docstring).
USES: tuple[str, ...] = ("sum", "equal", "allclose", "read", "none")

Inputs = Mapping[str, torch.Tensor]


class ResultMismatchError(RuntimeError):
    """An answer differs from the reference answer for its input (``use`` equal/allclose)."""


@dataclass(frozen=True)
class Behaviour:
    """What a caller does around each request.

    Attributes:
        fresh: how each request's input is made (:data:`FRESH`).
        use: what is done with each result (:data:`USES`).
        rtol, atol: the tolerances of ``use="allclose"``.
    """

    fresh: str = "clone"
    use: str = "sum"
    rtol: float = 1e-4
    atol: float = 1e-5

    def __post_init__(self) -> None:
        if self.fresh not in FRESH:
            raise ValueError(f"fresh {self.fresh!r}: expected one of {FRESH}")
        if self.use not in USES:
            raise ValueError(f"use {self.use!r}: expected one of {USES}")

    def describe(self, sets: int = 1) -> str:
        """In words, for a table: ``"clone + float(sum)"``; ``sets``: how many prepared
        input sets ``fresh="cycle"`` sends in turn (``"same input"`` for one)."""
        made = {"clone": "clone", "random": "random", "cycle": "same input"}[self.fresh]
        if self.fresh == "cycle" and sets > 1:
            made = f"{sets} inputs in turn"
        used = {
            "sum": "float(sum)",
            "equal": "torch.equal",
            "allclose": "allclose",
            "read": "sum",
            "none": "result dropped",
        }[self.use]
        return f"{made} + {used}"


@dataclass(frozen=True)
class Counts:
    """What the callers of an :class:`Application` did so far.

    Attributes:
        made: inputs made (fresh ones, or prepared sets taken with ``fresh="cycle"``).
        answered: requests answered (``send`` returned).
        used: answers used as :attr:`Behaviour.use` says (0 with ``use="none"``).
    """

    made: int
    answered: int
    used: int


class _Tally:
    """Counters kept per thread, so that the callers' hot path takes no lock; summed
    on demand. (Tasks of one event loop share their thread's cell: they never run at
    the same time.)"""

    def __init__(self) -> None:
        self._local = threading.local()
        self._cells: list[list[int]] = []
        self._lock = threading.Lock()

    def cell(self) -> list[int]:
        cell: list[int] | None = getattr(self._local, "cell", None)
        if cell is None:
            cell = [0, 0, 0]
            self._local.cell = cell
            with self._lock:
                self._cells.append(cell)
        return cell

    def counts(self) -> Counts:
        with self._lock:
            cells = list(self._cells)
        return Counts(*(sum(c[i] for c in cells) for i in range(3)))


def outputs_of(result: Any) -> list[torch.Tensor | np.ndarray]:
    """The tensors of a result (a dict, a sequence, one tensor or array), in order;
    strings and other values are left out."""
    if isinstance(result, (torch.Tensor, np.ndarray)):
        return [result]
    if isinstance(result, Mapping):
        return [t for v in result.values() for t in outputs_of(v)]
    if isinstance(result, (list, tuple)):
        return [t for v in result if not isinstance(v, (str, bytes)) for t in outputs_of(v)]
    return []


def _random_like(t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    if t.dtype.is_floating_point:
        return torch.randn(t.shape, dtype=t.dtype, out=out)
    if t.dtype == torch.bool:
        made = torch.randint(0, 2, t.shape).bool()
        return made if out is None else out.copy_(made)
    return torch.randint(0, 16, t.shape, dtype=t.dtype, out=out)


class Application:
    """Application-like requests over prepared input sets.

    Args:
        sets: the input sets, ``{input name: tensor}`` each (at least one); requests
            take them in turn.
        behaviour: how inputs are made and results used.
        references: with ``use`` equal/allclose, the expected answer of each set, in
            the same order (``{output name: tensor}``, or any result
            :func:`outputs_of` reads, compared output by output).
        empty: where inputs are made: a function returning an uninitialised tensor
            like the one it is given (``lambda t: pool.empty(model, t.shape,
            t.dtype)``: in the model's request arena); fresh inputs are made in what
            it returns, and ``fresh="cycle"``'s sets are copied into it once. Default:
            torch's own memory.

    Raises:
        ValueError: no sets; a check without references, or with ``fresh="random"``
            (a random input has no reference answer).
    """

    def __init__(
        self,
        sets: Sequence[Inputs],
        behaviour: Behaviour | None = None,
        *,
        references: Sequence[Any] | None = None,
        empty: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if not sets:
            raise ValueError("an Application needs at least one input set")
        self.behaviour = behaviour if behaviour is not None else Behaviour()
        self._empty = empty
        if empty is not None and self.behaviour.fresh == "cycle":
            sets = [{name: empty(t).copy_(t) for name, t in s.items()} for s in sets]
        self.sets = [dict(s) for s in sets]
        checking = self.behaviour.use in ("equal", "allclose")
        if checking and self.behaviour.fresh == "random":
            raise ValueError(f"use={self.behaviour.use!r} needs known inputs: fresh 'clone' or 'cycle', not 'random'")
        if checking and (references is None or len(references) != len(self.sets)):
            raise ValueError(f"use={self.behaviour.use!r} needs one reference answer per input set")
        self.references = [outputs_of(r) for r in references] if references is not None else None
        # next() on itertools.count is one C call: atomic under the GIL, so the callers
        # share one counter without a lock.
        self._counter = itertools.count()
        self._tally = _Tally()

    def describe(self) -> str:
        """What the callers do, in words (:meth:`Behaviour.describe` of these sets)."""
        return self.behaviour.describe(len(self.sets))

    @property
    def counts(self) -> Counts:
        """What the callers did so far."""
        return self._tally.counts()

    def next_inputs(self) -> tuple[int, dict[str, torch.Tensor]]:
        """The next request's input set index and its tensors, made as the behaviour says."""
        k = next(self._counter) % len(self.sets)
        chosen = self.sets[k]
        fresh = self.behaviour.fresh
        empty = self._empty
        if fresh == "cycle":
            inputs = chosen
        elif empty is not None:
            if fresh == "clone":
                inputs = {name: empty(t).copy_(t) for name, t in chosen.items()}
            else:
                inputs = {name: _random_like(t, empty(t)) for name, t in chosen.items()}
        elif fresh == "clone":
            inputs = {name: t.clone() for name, t in chosen.items()}
        else:
            inputs = {name: _random_like(t) for name, t in chosen.items()}
        return k, inputs

    def use(self, k: int, result: Any) -> None:
        """Use the answer to input set ``k`` as the behaviour says.

        Raises:
            ResultMismatchError: ``use`` equal/allclose and the answer differs.
        """
        use = self.behaviour.use
        if use == "none":
            return
        if use == "sum" or use == "read":
            # (a dict of tensors, as the pool answers, without outputs_of's walk: the
            # harness's own Python is not what a row should measure)
            values = result.values() if type(result) is dict else (result,)
            for v in values:
                for y in (v,) if type(v) is torch.Tensor else outputs_of(v):
                    s = y.sum()
                    if use == "sum":
                        float(s)
        else:
            assert self.references is not None
            self._check(outputs_of(result), self.references[k], k)

    def _check(self, outputs: list[Any], expected: list[Any], k: int) -> None:
        b = self.behaviour
        if len(outputs) != len(expected):
            raise ResultMismatchError(f"input set {k}: {len(outputs)} output(s), expected {len(expected)}")
        for i, (y, ref) in enumerate(zip(outputs, expected, strict=True)):
            y = torch.from_numpy(y) if isinstance(y, np.ndarray) else y
            ref = torch.from_numpy(ref) if isinstance(ref, np.ndarray) else ref
            if y.shape != ref.shape:
                got, want = list(y.shape), list(ref.shape)
                raise ResultMismatchError(f"input set {k}, output {i}: shape {got}, expected {want}")
            same = torch.equal(y, ref) if b.use == "equal" else torch.allclose(y, ref, rtol=b.rtol, atol=b.atol)
            if not same:
                raise ResultMismatchError(f"input set {k}, output {i}: differs from the reference ({b.use})")

    def call(self, send: Callable[[dict[str, torch.Tensor]], Any]) -> Callable[[], None]:
        """A blocking ``call()`` for thread callers: make an input, ``send`` it, use the answer."""
        next_inputs, use, cell = self.next_inputs, self.use, self._tally.cell
        counting = self.behaviour.use != "none"

        def call() -> None:
            tally = cell()
            k, inputs = next_inputs()
            tally[0] += 1
            result = send(inputs)
            tally[1] += 1
            if counting:
                use(k, result)
                tally[2] += 1

        return call

    def call_async(self, send: Callable[[dict[str, torch.Tensor]], Awaitable[Any]]) -> Callable[[], Awaitable[None]]:
        """As :meth:`call`, for asyncio callers: ``send`` returns an awaitable (``Pool.infer_async``)."""
        next_inputs, use, cell = self.next_inputs, self.use, self._tally.cell
        counting = self.behaviour.use != "none"

        async def call() -> None:
            tally = cell()
            k, inputs = next_inputs()
            tally[0] += 1
            result = await send(inputs)
            tally[1] += 1
            if counting:
                use(k, result)
                tally[2] += 1

        return call

"""A batch: requests of one model sent to a worker as one execution (front).

It is a :class:`~libtorchrt._call.Call` to the router (dispatch, retries, deaths work the
same), whose descriptors are its members' own, in order: the worker finds each input's
rows for every member and runs them as one tensor. Its outputs are split back by rows,
each member getting views of its own rows (no copy), made by the thread that reads its
result (see ``_Outputs``); their memory is released when the last member's view is freed.
"""

from __future__ import annotations

import _thread
import itertools
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..transport import tensors as tensor_io
from ..transport.wire import BLOB, FRAME, tensor_desc
from .call import Call

if TYPE_CHECKING:
    from .binding import Binder
    from .records import _Model

__all__ = ["Batch"]


class Batch(Call):
    """Requests executed together; ``members`` in row order."""

    __slots__ = ("members",)

    def __init__(self, model: _Model, members: Sequence[Call]) -> None:
        placed = _joined(members)
        if placed is None:
            placed = _listed(members)
        super().__init__(model, placed)
        self.members = list(members)
        self.dispatched = True
        self.rows = sum(c.rows for c in members)
        self.priority = members[0].priority
        for call in members:  # from now on a caller cannot cancel them
            if not call.dispatched:
                call.dispatched = True
                call.future.set_running_or_notify_cancel()

    @property
    def member_rows(self) -> list[int]:
        return [c.rows for c in self.members]

    def free(self) -> None:
        for call in self.members:
            call.free()
        self.frames = self.blobs = []

    def resolve_error(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)
        for call in self.members:
            call.resolve_error(exc)

    def resolve(self, result: Any) -> None:
        """Resolve each member with its rows of ``{name: batched output}``.

        The router only hands each member a :class:`_Rows`; the tensors are made by
        the thread that reads each result (see :class:`_Outputs`): a router thread
        that let go of the GIL for them waited for it back behind dozens of caller
        threads, per batch.
        """
        if not self.future.done():
            self.future.set_result({})
        binder = self.model.binder
        reshaper = binder if binder is not None and binder.reshapes else None
        sent_ns = self.sent_ns
        members = self.members
        # Split once when one event loop reads every member (see _Outputs); caller
        # threads each make their own views.
        waker = members[0].future.waker
        split = waker is not None and all(c.future.waker is waker for c in members)
        shared = _Outputs(result, [c.rows for c in members], reshaper, split)
        if self.model.orderer is not None:
            for i, call in enumerate(members):
                call.sent_ns = sent_ns
                call.resolve(_Rows(shared, i))
            return
        # Counted first, all together (see Call.deliver); only this thread finishes a
        # dispatched request, so none finishes in between.
        live = [call for call in members if not call.future.done()]
        self.model.stats.succeeded(live, sent_ns, time.perf_counter_ns())
        for i, call in enumerate(members):
            call.sent_ns = sent_ns
            future = call.future
            if not future.done():
                future.set_result_by(_Rows(shared, i))


def _joined(members: Sequence[Call]) -> tensor_io.Placed | None:
    """The batch's inputs as one blob each, holding every member's rows in order, when
    all of them travel inside the header (small inputs): the worker then reads one
    descriptor per input, as for a single request of all the rows. None otherwise."""
    if len(members) < 2:
        return None
    first = members[0].descs
    parts: list[list[bytes]] = [[] for _ in first]
    rows = 0
    for call in members:
        blobs = call.blobs
        for part, d in zip(parts, call.descs):
            if d.kind != BLOB:
                return None
            part.append(blobs[d.where])
        rows += call.rows
    descs = [tensor_desc(d.dtype, (rows, *d.shape[1:]), BLOB, i) for i, d in enumerate(first)]
    return tensor_io.Placed(descs, [b"".join(part) for part in parts], [], [])


def _listed(members: Sequence[Call]) -> tensor_io.Placed:
    """The batch's inputs as its members' own descriptors, member after member (their
    blob and frame numbers shifted to the batch's lists)."""
    descs: list[Any] = []
    blobs: list[bytes] = []
    frames: list[Any] = []
    for call in members:
        nblobs, nframes = len(blobs), len(frames)
        for d in call.descs:
            kind = d.kind
            if kind == BLOB and nblobs:
                d = tensor_desc(d.dtype, d.shape, kind, d.where + nblobs)
            elif kind == FRAME and nframes:
                d = tensor_desc(d.dtype, d.shape, kind, d.where + nframes)
            descs.append(d)
        if call.blobs:
            blobs += call.blobs
        if call.frames:
            frames += call.frames
    return tensor_io.Placed(descs, blobs, frames, [])


class _Outputs:
    """A batch's outputs, handed to each member as views of its own rows.

    Freeing a tensor lets go of the GIL: once per tensor, and once more when it frees
    memory it owns (measured with uprobes on CPython's ``take_gil``), as does every
    torch op. When one event loop reads every member (``split``), one ``from_numpy``
    and one ``split_with_sizes`` per output, by the first read, give every member a view
    of one storage: about one GIL release per member (its view's deallocation), where a
    ``from_numpy`` per member costs two. Caller threads each make their own views
    (``from_numpy`` of their rows): one thread splitting for all of them held the GIL
    for the whole batch and let it go midway, and cost them ~6% (A/B, 64 threads). The
    memory is released with the last view either way (the root array's finalizer)."""

    __slots__ = ("binder", "lock", "outputs", "parts", "rows", "split", "starts")

    def __init__(self, outputs: dict[str, Any], rows: list[int], binder: Binder | None, split: bool = True) -> None:
        self.outputs = outputs
        self.rows = rows
        self.binder = binder
        self.split = split
        self.parts: dict[str, list[Any]] | None = None
        self.starts: list[int] | None = None  # see _starts
        self.lock = _thread.allocate_lock()

    def member(self, i: int) -> dict[str, Any]:
        if not self.split:
            return self._shaped(self._own(i))
        parts = self.parts
        if parts is None:
            # Never wait for another thread's split (one event loop reads every member
            # here, so it is only a guard): splitting lets go of the GIL, and waiters
            # would wake one after another. A member that finds it under way makes its
            # own views.
            if not self.lock.acquire(False):
                return self._shaped(self._own(i))
            try:
                parts = self.parts
                if parts is None:
                    parts = self.parts = {name: self._split(value) for name, value in self.outputs.items()}
            finally:
                self.lock.release()
        result = {}
        for name, values in parts.items():
            result[name], values[i] = values[i], None  # the member's own, from now on
        return self._shaped(result)

    def _shaped(self, result: dict[str, Any]) -> dict[str, Any]:
        binder = self.binder
        return result if binder is None else binder.shape_outputs(result)

    def _starts(self) -> list[int]:
        """Each member's first row, then the total."""
        starts = self.starts
        if starts is None:  # (two threads may both make it: the same list)
            starts = self.starts = [0, *itertools.accumulate(self.rows)]
        return starts

    def _own(self, i: int) -> dict[str, Any]:
        """Member ``i``'s rows of each output, made apart from the split."""
        starts = self._starts()
        start, end = starts[i], starts[i + 1]
        return {
            name: torch.from_numpy(value[start:end]) if isinstance(value, np.ndarray) else value[start:end]
            for name, value in self.outputs.items()
        }

    def _split(self, value: Any) -> list[Any]:
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        if isinstance(value, torch.Tensor):
            return list(value.split_with_sizes(self.rows))
        return [value[a:b] for a, b in itertools.pairwise(self._starts())]  # strings: a list each


class _Rows:
    """One member's outputs (the ``i``-th of a batch's), made when called."""

    __slots__ = ("i", "shared")

    def __init__(self, shared: _Outputs, i: int) -> None:
        self.shared = shared
        self.i = i

    def __call__(self) -> dict[str, Any]:
        return self.shared.member(self.i)

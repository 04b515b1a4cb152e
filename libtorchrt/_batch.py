"""A batch: requests of one model sent to a worker as one execution (front).

It is a :class:`~libtorchrt._call.Call` to the router (dispatch, retries, deaths work the
same), whose descriptors are its members' own, in order: the worker finds each input's
rows for every member and runs them as one tensor. Its outputs are split back by rows,
each member getting views of its own rows (no copy), made in the member's caller thread;
their memory is released when the last member's view is freed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ._call import Call
from .transport import tensors as tensor_io
from .transport.wire import BLOB, FRAME, TensorDesc

if TYPE_CHECKING:
    from ._binding import Binder
    from ._state import _Model

__all__ = ["Batch"]


class Batch(Call):
    """Requests executed together; ``members`` in row order."""

    __slots__ = ("members",)

    def __init__(self, model: _Model, members: Sequence[Call]) -> None:
        descs: list[Any] = []
        blobs: list[bytes] = []
        frames: list[Any] = []
        for call in members:
            nblobs, nframes = len(blobs), len(frames)
            for d in call.descs:
                kind = d.kind
                if kind == BLOB and nblobs:
                    d = TensorDesc(d.dtype, d.shape, kind, d.where + nblobs)
                elif kind == FRAME and nframes:
                    d = TensorDesc(d.dtype, d.shape, kind, d.where + nframes)
                descs.append(d)
            if call.blobs:
                blobs += call.blobs
            if call.frames:
                frames += call.frames
        super().__init__(model, tensor_io.Placed(descs, blobs, frames, []))
        self.members = list(members)
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

        The router only hands each member a :class:`_Rows`; the member's tensors are
        made by the thread that reads its result: every torch call that makes a tensor
        lets go of the GIL, and a router thread that did so once per member waited
        for it back behind dozens of caller threads, once per member, per batch.
        """
        if not self.future.done():
            self.future.set_result({})
        binder = self.model.binder
        reshaper = binder if binder is not None and binder.reshapes else None
        sent_ns = self.sent_ns
        start = 0
        for call in self.members:
            end = start + call.rows
            call.sent_ns = sent_ns
            call.resolve(_Rows(result, start, end, reshaper))
            start = end


class _Rows:
    """One member's outputs: rows ``[start, end)`` of each batched output (numpy
    arrays where the dtype allows, else tensors or lists of str), made into tensors
    when called. A numpy slice keeps its array's root alive, and so the output's
    shared-memory slot (see ``tensors.as_array``)."""

    __slots__ = ("binder", "end", "outputs", "start")

    def __init__(self, outputs: dict[str, Any], start: int, end: int, binder: Binder | None) -> None:
        self.outputs = outputs
        self.start = start
        self.end = end
        self.binder = binder

    def __call__(self) -> dict[str, Any]:
        start, end = self.start, self.end
        result = {
            name: torch.from_numpy(value[start:end]) if isinstance(value, np.ndarray) else value[start:end]
            for name, value in self.outputs.items()
        }
        return self.binder.shape_outputs(result) if self.binder is not None else result

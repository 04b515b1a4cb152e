"""A batch: requests of one model sent to a worker as one execution (front).

It is a :class:`~libtorchrt._call.Call` to the router (dispatch, retries, deaths work the
same), whose descriptors are its members' own, in order: the worker finds each input's
rows for every member and runs them as one tensor. Its outputs are split back by rows,
each member getting views of its own rows (no copy); their memory is released when the
last member's view is freed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ._call import Call
from .transport import tensors as tensor_io
from .transport.wire import BLOB, FRAME

if TYPE_CHECKING:
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
                if d.kind == BLOB:
                    d = d._replace(where=d.where + nblobs)
                elif d.kind == FRAME:
                    d = d._replace(where=d.where + nframes)
                descs.append(d)
            blobs += call.blobs
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
        """Split ``{name: batched tensor}`` by rows and resolve each member."""
        if not self.future.done():
            self.future.set_result({})
        outputs = {name: _sliceable(value) for name, value in result.items()}
        start = 0
        for call in self.members:
            end = start + call.rows
            call.sent_ns = self.sent_ns
            call.resolve({name: _rows(value, start, end) for name, value in outputs.items()})
            start = end


def _sliceable(value: Any) -> Any:
    """An output as something to slice rows of: a numpy view of a CPU tensor (numpy
    slicing keeps the GIL; torch's indexing releases and re-takes it, which waits for
    the switch interval beside busy threads), else the value itself."""
    if isinstance(value, torch.Tensor) and value.dtype != torch.bfloat16 and value.device.type == "cpu":
        return value.numpy()
    return value


def _rows(value: Any, start: int, end: int) -> Any:
    """Rows ``[start, end)`` of one output, as a view (a list of str: a copy). A numpy
    slice's base keeps the whole output, and so its shared-memory slot, alive."""
    part = value[start:end]
    return torch.from_numpy(part) if isinstance(part, np.ndarray) else part

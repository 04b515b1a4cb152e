"""One request on its way through the front: placement, future, deadline, retries."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..transport import tensors as tensor_io
from .future import LoopFuture, RequestFuture

if TYPE_CHECKING:
    from .gpu import InputBuffer
    from .records import _Model
    from .sequences import SequenceTag

__all__ = ["Call"]

#: the GPU fields' value until set (most requests have none: no list to make for them)
_EMPTY: tuple[Any, ...] = ()


class Call:
    """A request: where its tensors are, the caller's future, and its bookkeeping.

    Its arena slots and blobs are kept until the request is finished (answered, failed
    or expired), so that a request whose worker died can be sent again.
    """

    __slots__ = (
        "__weakref__",
        "attempts",
        "blobs",
        "cuda_outputs",
        "deadline",
        "descs",
        "device",
        "device_buffer",
        "device_exports",
        "device_ids",
        "device_offsets",
        "dispatched",
        "frames",
        "future",
        "gated",
        "holder",
        "id",
        "keep",
        "key",
        "lost_on",
        "model",
        "offsets",
        "priority",
        "queued_at",
        "rows",
        "sent_ns",
        "seq",
        "sequence",
        "sequences",
        "submitted_ns",
        "warmup",
    )

    def __init__(
        self,
        model: _Model,
        placed: tensor_io.Placed,
        deadline: float | None = None,
        future: LoopFuture | None = None,
    ) -> None:
        self.model = model
        self.descs, self.blobs, self.frames, self.offsets = placed
        #: the GPU whose workers must run it (its inputs are in that GPU's buffer)
        self.device: int | None = None
        self.device_buffer: InputBuffer | None = None
        self.device_offsets: Sequence[int] = _EMPTY
        #: for each DEVICE descriptor, the export holding it; the caller allocations
        #: among them; the caller tensors the worker reads in place (kept alive)
        self.device_ids: Sequence[int] = _EMPTY
        self.device_exports: Sequence[Any] = _EMPTY
        self.keep: Sequence[torch.Tensor] = _EMPTY
        #: outputs should come back as CUDA tensors (the inputs were)
        self.cuda_outputs = False
        #: the caller's future: a RequestFuture, or an asyncio caller's LoopFuture
        self.future: RequestFuture[dict[str, torch.Tensor]] | LoopFuture = RequestFuture() if future is None else future
        self.id = 0
        #: monotonic time after which the request fails with TimeoutError
        self.deadline = deadline
        #: how many workers died while running it (not while it waited behind another)
        self.attempts = 0
        #: whether its future was marked running (it can no longer be cancelled)
        self.dispatched = False
        #: a warm-up request of the router's own (no caller waits for it)
        self.warmup = False
        #: rows of the batch dimension it carries (1 for a model without batching)
        self.rows = 1
        #: its priority level (dynamic batching; 0: the model's default)
        self.priority = 0
        #: when the batcher first queued it (monotonic), and what it may be batched
        #: with (see Batcher.add); None until queued
        self.queued_at = 0.0
        self.key: Any = None
        #: when it was submitted, and last sent to a worker (perf_counter_ns)
        self.submitted_ns = time.perf_counter_ns()
        self.sent_ns = 0
        #: its place in the model's order of requests (preserve_ordering; -1: none)
        self.seq = -1
        #: sequence batching: the caller's sequence id and flags; the running sequence
        #: it belongs to (set when queued); and, for a unit about to be sent, the
        #: worker's fields: (handle, flags) pairs, ids, handles to forget
        self.sequence: SequenceTag | None = None
        self.holder: Any = None
        self.sequences: tuple[list[int], list[Any], list[int]] | None = None
        #: the worker whose death lost it on the fast lane (the supervisor decides its
        #: fate with that worker's other requests: see Router.lost)
        self.lost_on: Any = None
        #: bytes counted in its model's CopyGate, released by the caller (Pool.infer)
        self.gated = 0

    def free(self) -> None:
        """Give the request's arena slots and buffers back (once no worker reads them)."""
        if self.offsets:
            offsets, self.offsets = self.offsets, []
            for offset in offsets:
                self.model.allocator.free(offset)
        self.frames = self.blobs = []
        self.keep = _EMPTY
        if self.device_offsets:
            taken, self.device_offsets = self.device_offsets, _EMPTY
            assert self.device_buffer is not None
            for offset in taken:
                self.device_buffer.allocator.free(offset)

    def fail(self, exc: BaseException) -> None:
        """Free the request and fail its future (unless it already resolved)."""
        self.free()
        self.resolve_error(exc)

    def resolve_error(self, exc: BaseException) -> None:
        """Fail the future without freeing (a worker may still be reading the slots)."""
        if not self.future.done():
            try:
                self.future.set_exception(exc)
            except Exception:  # resolved concurrently (cancelled by the caller)
                return
            if not self.warmup:
                self.model.stats.failed()
        if self.seq >= 0:
            self.model.ordered_skip(self)

    def resolve(self, result: Any) -> None:
        """Hand the caller its outputs (router thread), in order if the model keeps it."""
        orderer = self.model.orderer
        if orderer is not None and self.seq >= 0:
            orderer.arrive(self, result)
        else:
            self.deliver(result)

    def deliver(self, result: Any) -> None:
        """Resolve the future with ``result`` (a dict of outputs, or a function that
        makes it in the reading thread), counted first, so that a caller who reads the
        stats once it has its outputs finds its request in them: only the router thread
        finishes a dispatched request, so it cannot be finished in between."""
        if not self.future.done():
            self.model.stats.succeeded((self,), self.sent_ns, time.perf_counter_ns())
            try:
                if callable(result):
                    self.future.set_result_by(result)
                else:
                    self.future.set_result(result)
            except Exception:
                return

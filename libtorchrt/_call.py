"""One request on its way through the front: placement, future, deadline, retries."""

from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch

from .transport import tensors as tensor_io

if TYPE_CHECKING:
    from ._gpu import InputBuffer
    from ._state import _Model

__all__ = ["Call"]


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
        "id",
        "keep",
        "model",
        "offsets",
        "warmup",
    )

    def __init__(self, model: _Model, placed: tensor_io.Placed, deadline: float | None = None) -> None:
        self.model = model
        self.descs, self.blobs, self.frames, self.offsets = placed
        #: the GPU whose workers must run it (its inputs are in that GPU's buffer)
        self.device: int | None = None
        self.device_buffer: InputBuffer | None = None
        self.device_offsets: list[int] = []
        #: for each DEVICE descriptor, the export holding it; the caller allocations
        #: among them; the caller tensors the worker reads in place (kept alive)
        self.device_ids: list[int] = []
        self.device_exports: list[Any] = []
        self.keep: list[torch.Tensor] = []
        #: outputs should come back as CUDA tensors (the inputs were)
        self.cuda_outputs = False
        self.future: Future[dict[str, torch.Tensor]] = Future()
        self.id = 0
        #: monotonic time after which the request fails with TimeoutError
        self.deadline = deadline
        #: how many workers died while running it (not while it waited behind another)
        self.attempts = 0
        #: whether its future was marked running (it can no longer be cancelled)
        self.dispatched = False
        #: a warm-up request of the router's own (no caller waits for it)
        self.warmup = False

    def free(self) -> None:
        """Give the request's arena slots and buffers back (once no worker reads them)."""
        offsets, self.offsets = self.offsets, []
        for offset in offsets:
            self.model.allocator.free(offset)
        self.frames = self.blobs = []
        self.keep = []
        if self.device_offsets:
            offsets, self.device_offsets = self.device_offsets, []
            assert self.device_buffer is not None
            for offset in offsets:
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
                pass

    def resolve(self, result: Any) -> None:
        if not self.future.done():
            try:
                self.future.set_result(result)
            except Exception:
                pass

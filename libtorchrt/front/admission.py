"""A request's way into the pool, in the caller's thread (front process).

Lookup of the model, the checks that refuse a request at once (an unknown or failed
model, inputs that do not fit, a full queue), binding of the inputs to the model's
arguments, and their placement: small tensors inline, bigger ones copied into the
model's request arena (or a GPU's buffer) here, so that the copies of concurrent
requests run in parallel, in their callers' threads. Then the call is handed to the
router.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..deadlines import check_timeout
from ..errors import (
    InvalidInputError,
    ModelUnavailableError,
    QueueFullError,
    TorchRTError,
    UnknownModelError,
)
from ..info import ModelStatus
from ..transport import lending
from ..transport import tensors as tensor_io
from .call import Call
from .copygate import CopyGate

if TYPE_CHECKING:
    from .future import LoopFuture, RequestFuture
    from .records import _Model
    from .router import Router
    from .sequences import SequenceTag

__all__ = ["Admission", "Inputs", "request_timeout"]

Inputs = Mapping[str, Any] | Sequence[Any] | torch.Tensor


def request_timeout(model: str, timeout: object) -> float | None:
    """A request's ``timeout`` argument, checked (huge ones capped; see deadlines.py).

    Raises:
        InvalidInputError: not a number of seconds >= 0 (nor None).
    """
    try:
        return check_timeout(timeout)
    except ValueError:
        raise InvalidInputError(
            model, None, "timeout: a number of seconds >= 0, or None", f"timeout={timeout!r}"
        ) from None


class Admission:
    """Checks, binds and places requests, and hands them to the router (any thread)."""

    def __init__(
        self,
        router: Router,
        load_errors: list[ModelStatus],
        *,
        inline_threshold: int,
        cuda_outputs: bool,
        max_pending: int | None,
    ) -> None:
        self.router = router
        #: models left out before any worker started (their requests are told why)
        self.load_errors = load_errors
        self.inline_threshold = inline_threshold
        self.cuda_outputs = cuda_outputs
        self.max_pending = max_pending

    def submit(
        self,
        model: str,
        inputs: Inputs,
        version: int | None,
        timeout: float | None,
        priority: int | None,
        future: LoopFuture | None = None,
        sequence: SequenceTag | None = None,
    ) -> RequestFuture[dict[str, torch.Tensor]] | LoopFuture:
        """Take one request; return its future (``future``, an asyncio caller's, if given).

        Raises:
            UnknownModelError, ModelUnavailableError, InvalidInputError,
            QueueFullError, PoolClosedError: see ``Pool.submit``.
        """
        call = self.take(model, inputs, version, timeout, priority, future, sequence)
        self.router.submit(call)
        return call.future

    def take(
        self,
        model: str,
        inputs: Inputs,
        version: int | None,
        timeout: float | None,
        priority: int | None,
        future: LoopFuture | None = None,
        sequence: SequenceTag | None = None,
        gated: bool = False,
    ) -> Call:
        """Check and place one request: its call, not handed to anybody yet.

        ``gated``: the caller waits for room in the model's :class:`CopyGate` before its
        large inputs are copied (``Pool.infer``); it releases ``call.gated`` bytes there
        when done.

        Raises:
            see :meth:`submit`; TimeoutError, PoolClosedError: while waiting at the gate.
        """
        m = self.lookup(model, version)
        queue = m.queue
        try:
            timeout = m.cfg.timeout if timeout is None else request_timeout(model, timeout)
            binder = m.binder
            assert binder is not None  # set before the pool finished starting
            tensors = binder.bind(inputs)
            limit = m.cfg.max_request_bytes
            if limit is not None:
                total = sum(t.numel() * t.element_size() for t in tensors)
                if total > limit:
                    raise InvalidInputError(model, None, f"at most max_request_bytes={limit} bytes", f"{total} bytes")
            level = queue.level(priority)
            sequence = queue.tag(sequence)
            queue.admit(level, tensors)
            if self.max_pending is not None and self.router.pending() >= self.max_pending:
                raise QueueFullError(model, self.max_pending, "max_pending")
        except TorchRTError:
            m.stats.failed()
            raise
        deadline = None if timeout is None else time.monotonic() + timeout
        gate = m.gate if gated else None
        if gate is None:
            call = self.place(m, tensors, deadline, future, queue.host_only)
        else:
            call = self._place_gated(m, gate, tensors, deadline, queue.host_only)
        if m.cfg.max_batch_size > 0 and tensors:
            shape = tensors[0].shape  # (shape, not dim(): keeps the GIL)
            if shape:
                call.rows = shape[0]
        call.priority = level
        call.sequence = sequence
        call.deadline = queue.deadline(call, timeout)
        return call

    def lookup(self, model: str, version: int | None) -> _Model:
        """The model version a request names, if it can take requests.

        Raises:
            UnknownModelError, ModelUnavailableError: see ``Pool.submit``.
        """
        try:
            m = self.router.lookup(model, version)
        except UnknownModelError:
            failed = next((s for s in self.load_errors if s.name == model), None)
            if failed is not None and failed.error is not None:
                raise ModelUnavailableError(model, failed.error, loaded=False) from None
            raise
        if m.failed is not None:
            raise ModelUnavailableError(model, m.failed, loaded=False)
        if m.unavailable is not None:
            raise ModelUnavailableError(model, m.unavailable)
        return m

    def large_bytes(self, values: Iterable[Any], m: _Model | None = None) -> int:
        """The bytes of the CPU tensors among ``values`` that would be copied into the
        request arena (more than the inline threshold each, and, given the model ``m``,
        not lent from its arena by :meth:`empty`)."""
        big = 0
        for t in values:
            if isinstance(t, torch.Tensor):
                n = t.nbytes
                if n > self.inline_threshold and not t.is_cuda and (m is None or not m.allocator.lends(t)):
                    big += n
        return big

    async def enter_gate(
        self, model: str, version: int | None, timeout: float | None, values: Iterable[Any]
    ) -> tuple[CopyGate | None, int]:
        """Wait in the model's copy gate for room for the inputs ``values`` will copy
        (an ``infer_async`` caller, in its event loop); the gate to release the bytes
        to, and how many (None, 0: nothing to wait for).

        Raises:
            UnknownModelError, ModelUnavailableError, InvalidInputError (the timeout):
            as :meth:`take`; TimeoutError, PoolClosedError: while waiting.
        """
        m = self.lookup(model, version)
        gate = m.gate
        nbytes = self.large_bytes(values, m) if gate is not None else 0
        if gate is None or not nbytes:
            return None, 0
        timeout = m.cfg.timeout if timeout is None else request_timeout(model, timeout)
        await gate.acquire_async(nbytes, None if timeout is None else time.monotonic() + timeout)
        return gate, nbytes

    def empty(self, model: str, version: int | None, shape: Any, dtype: Any) -> torch.Tensor:
        """A tensor for ``model``'s inputs, in its request arena when it is large enough
        to be copied there and there is room (see ``Pool.empty``), else in ordinary memory.

        Raises:
            UnknownModelError, ModelUnavailableError: as :meth:`take`.
            InvalidInputError: ``shape`` is not a sequence of non-negative ints, or
                ``dtype`` is not a torch dtype that requests carry.
        """
        return lending.empty(self.lookup(model, version).allocator, self.inline_threshold, model, shape, dtype)

    def _place_gated(
        self, m: _Model, gate: CopyGate, tensors: list[torch.Tensor], deadline: float | None, host_only: bool
    ) -> Call:
        big = self.large_bytes(tensors, m)
        if not big:
            return self.place(m, tensors, deadline, None, host_only)
        gate.acquire(big, deadline)
        try:
            call = self.place(m, tensors, deadline, None, host_only)
        except BaseException:
            gate.release(big)
            raise
        call.gated = big
        return call

    def place(
        self,
        m: _Model,
        tensors: list[torch.Tensor],
        deadline: float | None,
        future: LoopFuture | None,
        host_only: bool,
    ) -> Call:
        """A call with its inputs placed: CUDA ones go device to device into the
        model's GPU buffer when it runs on a GPU (and its queue takes them), the others
        inline or into its request arena."""
        cuda = False
        for t in tensors:
            if t.is_cuda:
                cuda = True
                break
        if cuda and (host_only or not m.gpus):  # (batches are gathered on the host: docs/batching.md)
            tensors, cuda = [t.cpu() for t in tensors], False
        if not cuda:
            return Call(m, tensor_io.write(tensors, m.arena, m.allocator, self.inline_threshold), deadline, future)
        gpu = self.router.gpu.place(m.name, m.gpus, tensors, m.arena, m.allocator, self.inline_threshold)
        call = Call(m, gpu.placed, deadline, future)
        call.device, call.device_buffer, call.device_offsets = gpu.device, gpu.buffer, gpu.device_offsets
        call.device_ids, call.device_exports, call.keep = gpu.device_ids, gpu.exports, gpu.keep
        call.cuda_outputs = self.cuda_outputs
        return call

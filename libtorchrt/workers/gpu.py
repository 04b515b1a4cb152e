"""A GPU worker's CUDA side: its device and stream, the front's buffers, output placement.

Runs in a worker whose instance is on ``cuda:N``. The device is selected explicitly
(``torch.cuda.set_device``), not through ``CUDA_VISIBLE_DEVICES``, so every worker sees
the same device numbering as the front. All of the worker's work runs on its own
stream. The CUDA allocations a request names (the front's buffers, the caller's own
memory holding its inputs) are mapped the first time and kept, the caller's ones in a
bounded least-recently-used cache (a mapping costs far more than a request). The host arenas are
registered with CUDA (page-locked in place), so host inputs and outputs move by DMA
straight from and to shared memory, without a staging copy.

Every request ends with a synchronisation of the worker's stream before its reply:
the front frees the request's slots and reads its outputs when the reply arrives.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import ProtocolError
from ..transport import tensors as tensor_io
from ..transport import wire
from ..transport.arena import Allocator, Arena, Slots
from ..transport.cuda import OpenedBuffer
from ..transport.wire import ARENA, BLOB, DEVICE, FRAME, TensorDesc, dtype_name

__all__ = ["MAX_SEGMENTS", "GpuSide"]

#: Caller allocations a worker keeps mapped (least recently used ones are unmapped).
MAX_SEGMENTS = 128


def _pin(arena: Arena) -> bool:
    """Page-lock ``arena``'s mapping for DMA; False if CUDA refuses."""
    try:
        rc = torch.cuda.cudart().cudaHostRegister(arena.address, arena.size, 0)
    except (RuntimeError, AttributeError):
        return False
    return int(rc) == 0


def _unpin(arena: Arena) -> None:
    with contextlib.suppress(RuntimeError, AttributeError):
        torch.cuda.cudart().cudaHostUnregister(arena.address)


class GpuSide:
    """CUDA state of one GPU worker.

    Args:
        device: ``"cuda:N"``.
        requests: the model's request arena (host shared memory).
        responses: this worker's response arena (host shared memory).
    """

    def __init__(self, device: str, requests: Arena, responses: Arena) -> None:
        self.device = torch.device(device)
        torch.cuda.set_device(self.device)
        self.index = self.device.index if self.device.index is not None else 0
        self.stream = torch.cuda.Stream(self.device)
        #: the front's buffers (request buffers, this worker's response buffer), kept
        self.buffers: dict[int, OpenedBuffer] = {}
        self.events: dict[int, torch.cuda.Event] = {}
        #: caller allocations, least recently used first
        self.segments: collections.OrderedDict[int, OpenedBuffer] = collections.OrderedDict()
        #: the front's response buffer for this worker, and our allocator over it
        self.out_id = -1
        self.out_allocator: Allocator | None = None
        self.pinned = [a for a in (requests, responses) if _pin(a)]
        self.notes = [] if len(self.pinned) == 2 else ["host arenas could not be page-locked: host copies are staged"]

    # ── the front's buffers ────────────────────────────────────────────────────

    def open(self, exports: Sequence[wire.Export], device_out: int) -> None:
        """Map the allocations this worker does not hold yet.

        ``device_out`` tells which export is this worker's response buffer; one with an
        event is a request buffer; the others are the caller's allocations.

        Raises:
            ProtocolError: an export for another GPU, or a second response buffer.
            CudaError: the driver cannot map one.
        """
        for e in exports:
            if e.id in self.buffers:
                continue
            if e.id in self.segments:
                self.segments.move_to_end(e.id)
                continue
            if e.device != self.index:
                raise ProtocolError(f"allocation {e.id} is on cuda:{e.device}; this worker is on {self.device}")
            if e.id == device_out:
                if self.out_allocator is not None:
                    raise ProtocolError(f"a second response buffer ({e.id}) for this worker")
                self.buffers[e.id] = OpenedBuffer(self.index, e.handle, e.nbytes)
                self.out_id = e.id
                self.out_allocator = Allocator(e.nbytes)
            elif e.event:
                self.buffers[e.id] = OpenedBuffer(self.index, e.handle, e.nbytes)
                self.events[e.id] = torch.cuda.Event.from_ipc_handle(self.device, e.event)
            else:
                while len(self.segments) >= MAX_SEGMENTS:  # between requests: none is in use
                    _, old = self.segments.popitem(last=False)
                    old.close()
                self.segments[e.id] = OpenedBuffer(self.index, e.handle, e.nbytes)

    def release(self, offsets: Sequence[int]) -> int:
        """Give back response-buffer slots; return how many were unknown."""
        unknown = 0
        for offset in offsets:
            try:
                if self.out_allocator is None:
                    raise ValueError(offset)
                self.out_allocator.free(offset)
            except ValueError:
                unknown += 1
        return unknown

    def input_view(self, buffer_id: int, d: TensorDesc) -> torch.Tensor:
        buf = self.buffers.get(buffer_id) or self.segments.get(buffer_id)
        if buf is None:
            raise ValueError(f"no allocation {buffer_id} was exported to this worker")
        return buf.view(d.where, d.nbytes, wire.DTYPES[d.dtype], d.shape)

    def wait_inputs(self, buffer_id: int) -> None:
        """Make this worker's stream wait for the front's copies into ``buffer_id``."""
        event = self.events.get(buffer_id)
        if event is None:
            raise ProtocolError(f"no request buffer {buffer_id} was exported to this worker")
        event.wait(self.stream)

    def to_device(self, args: list[Any]) -> list[Any]:
        """The method's arguments with their host tensors moved to this GPU (strings
        stay as they are; a ``Dict[str, Tensor]``'s values move)."""
        return [self._moved(a) for a in args]

    def _moved(self, arg: Any) -> Any:
        if isinstance(arg, torch.Tensor):
            return arg if arg.is_cuda else arg.to(self.device, non_blocking=True)
        if isinstance(arg, dict):
            return {k: self._moved(v) for k, v in arg.items()}
        return arg

    # ── outputs ────────────────────────────────────────────────────────────────

    def place(
        self,
        outputs: Sequence[torch.Tensor | tensor_io.Strings],
        device_out: int,
        responses: Arena,
        allocator: Slots,
        inline_threshold: int,
    ) -> tuple[tensor_io.Placed, list[int]]:
        """Put the outputs where the front reads them: the front's response buffer
        when it asked for CUDA outputs (``device_out``), else host memory (the big ones
        copied by DMA straight into the response arena). Copies are queued on this
        worker's stream; the caller synchronises it before replying. String outputs
        go as blobs, as from a CPU worker.

        Returns:
            The placement, and the response-buffer slots it took.
        """
        if device_out >= 0 and device_out != self.out_id:
            raise ProtocolError(f"device_out names buffer {device_out}; this worker's is {self.out_id}")
        descs: list[TensorDesc] = []
        blobs: list[bytes] = []
        frames: list[object] = []
        offsets: list[int] = []
        device_offsets: list[int] = []
        try:
            for t in outputs:
                if isinstance(t, torch.Tensor) and t.is_cuda:
                    nbytes = t.numel() * t.element_size()
                    name, shape = dtype_name(t.dtype), tuple(t.shape)
                    if device_out >= 0 and nbytes and self.out_allocator is not None:
                        offset = self.out_allocator.alloc(nbytes)
                        if offset is not None:
                            device_offsets.append(offset)
                            self.buffers[device_out].view(offset, nbytes, t.dtype, shape).copy_(t)
                            descs.append(TensorDesc(name, shape, DEVICE, offset))
                            continue
                    if nbytes > inline_threshold:
                        offset = allocator.alloc(nbytes)
                        if offset is not None:
                            offsets.append(offset)
                            responses.view(offset, nbytes, t.dtype, shape).copy_(t, non_blocking=bool(self.pinned))
                            descs.append(TensorDesc(name, shape, ARENA, offset))
                            continue
                # Small, or no room: bring it to the host and place it as any output.
                one = tensor_io.write([t.cpu()], responses, allocator, inline_threshold)
                (d,) = one.descs
                if d.kind == BLOB:
                    d = d._replace(where=len(blobs))
                elif d.kind == FRAME:
                    d = d._replace(where=len(frames))
                descs.append(d)
                blobs.extend(one.blobs)
                frames.extend(one.frames)
                offsets.extend(one.offsets)
        except BaseException:
            for offset in offsets:
                allocator.free(offset)
            if self.out_allocator is not None:
                for offset in device_offsets:
                    self.out_allocator.free(offset)
            raise
        return tensor_io.Placed(descs, blobs, frames, offsets), device_offsets

    def close(self, requests: Arena, responses: Arena) -> None:
        with contextlib.suppress(Exception):
            self.stream.synchronize()
        for arena in (requests, responses):
            if arena in self.pinned:
                _unpin(arena)
        for buf in [*self.buffers.values(), *self.segments.values()]:
            with contextlib.suppress(Exception):
                buf.close()
        self.buffers.clear()
        self.segments.clear()

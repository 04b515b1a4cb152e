"""The front's CUDA side: how CUDA tensors reach GPU workers and come back (front).

On one GPU without MPS, the processes that use it take turns: work that the front
queues on the GPU waits until the GPU switches to the front's context, while the
workers' kernels run. So the request path does no GPU work in the front at all:

- **Inputs** are read by the worker in place, from the caller's own memory. The front
  looks up the allocation holding each contiguous CUDA input (a segment of torch's
  caching allocator, found with host-side driver calls), sends its IPC handle with the
  request (the worker maps each allocation once and caches it) and the offset. The
  caller's current stream is synchronised first if it still has work queued (the
  tensor may not be written yet), and the call keeps the tensors alive until it is
  finished. Inputs that cannot go this way (non-contiguous, on another GPU, or in
  memory that cannot be exported) are copied device to device into the model's
  request buffer on that GPU, on a stream of the front's, whose interprocess event the
  worker waits for.
- **Outputs** are written by the worker into its response buffer, which the front
  allocated and owns, and synchronised before the reply; the caller gets views of it
  (no copy). A slot is given back once its last tensor is freed *and* the work queued
  at that moment on the freeing thread's current stream has finished (an event, when
  that stream is busy), so that kernels still reading an output are never overwritten.

Buffers are created on first use, so a pool that only ever sees CPU tensors never
creates a CUDA context in the front. The router owns this object and closes it after
its workers have exited.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..transport import tensors as tensor_io
from ..transport import wire
from ..transport.arena import Allocator, Arena
from ..transport.cuda import CudaError, DeviceBuffer, export_handle, segment_of, wrap
from ..transport.wire import DEVICE, TensorDesc, dtype_name

__all__ = ["DeviceBuffers", "InputBuffer", "OutputBuffer", "Placement"]

#: Exported caller allocations remembered (each costs the front nothing but an entry).
_MAX_SEGMENTS = 4096
_UNSEEN = object()


class InputBuffer:
    """One model's request buffer on one GPU, for inputs that must be copied."""

    def __init__(self, buffer_id: int, device: int, nbytes: int) -> None:
        self.device = device
        self.buffer = DeviceBuffer(device, nbytes)
        try:
            self.allocator = Allocator(nbytes)
            with torch.cuda.device(device):
                self.stream = torch.cuda.Stream(device)
                self.event = torch.cuda.Event(interprocess=True)
                self.event.record(self.stream)  # creates it, on this device
                event_handle = bytes(self.event.ipc_handle())
        except BaseException:
            self.buffer.close()
            raise
        self.export = wire.Export(buffer_id, device, nbytes, self.buffer.handle, event_handle)
        #: orders the copies and event records of concurrent callers
        self.lock = threading.Lock()

    def close(self) -> None:
        self.stream.synchronize()
        self.buffer.close()


class OutputBuffer:
    """One GPU worker's response buffer, which the worker writes and the front reads.

    Callers' output tensors view it, so it is freed only once it is retired (its
    worker exited, or the pool closed) *and* no output tensor views it any more.
    """

    def __init__(self, buffer_id: int, device: int, nbytes: int) -> None:
        self.device = device
        self.buffer = DeviceBuffer(device, nbytes)
        self.export = wire.Export(buffer_id, device, nbytes, self.buffer.handle, b"")
        self.lock = threading.Lock()
        self.views = 0
        self.retired = False

    def add_view(self) -> None:
        with self.lock:
            self.views += 1

    def drop_view(self) -> None:
        with self.lock:
            self.views -= 1
            free = self.retired and self.views == 0
        if free:
            self.buffer.close()

    def retire(self) -> None:
        with self.lock:
            self.retired = True
            free = self.views == 0
        if free:
            self.buffer.close()


@dataclass
class Placement:
    """Where a request's tensors went."""

    placed: tensor_io.Placed
    #: the GPU whose workers must run it
    device: int
    #: for each DEVICE descriptor, in order, the export holding it
    device_ids: list[int] = field(default_factory=list)
    #: caller allocations the worker reads from (sent with the request)
    exports: list[wire.Export] = field(default_factory=list)
    #: the request buffer, if some inputs were copied into it
    buffer: InputBuffer | None = None
    device_offsets: list[int] = field(default_factory=list)
    #: the caller's tensors the worker reads in place (kept alive until finished)
    keep: list[torch.Tensor] = field(default_factory=list)


class DeviceBuffers:
    """The pool's CUDA state, created on first use.

    Args:
        request_bytes: size of each model's request buffer on each GPU.
        response_bytes: size of each GPU worker's response buffer.
    """

    def __init__(self, request_bytes: int, response_bytes: int) -> None:
        self.request_bytes = request_bytes
        self.response_bytes = response_bytes
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._inputs: dict[tuple[str, int], InputBuffer] = {}
        self._outputs: dict[bytes, OutputBuffer] = {}
        #: (device, driver buffer id) of caller allocations → their export
        self._segments: collections.OrderedDict[tuple[int, int], Any] = collections.OrderedDict()
        #: output slots whose last tensor died: (buffer, worker, offset, event to wait for
        #: or None); any thread appends, the router collects
        self.released: collections.deque[tuple[OutputBuffer, bytes, int, torch.cuda.Event | None]] = collections.deque()
        self._closed = False

    # ── caller threads ─────────────────────────────────────────────────────────

    def _input_buffer(self, model: str, device: int) -> InputBuffer:
        key = (model, device)
        buf = self._inputs.get(key)
        if buf is None:
            with self._lock:
                if self._closed:
                    raise RuntimeError("the pool is closed")
                buf = self._inputs.get(key)
                if buf is None:
                    buf = self._inputs[key] = InputBuffer(next(self._ids), device, self.request_bytes)
        return buf

    def _export(self, t: torch.Tensor, device: int) -> tuple[wire.Export, int] | None:
        """The export of the allocation holding ``t``, and ``t``'s offset in it (None:
        it cannot be exported)."""
        ptr = t.data_ptr()
        try:
            seg = segment_of(ptr, device)
        except CudaError:
            return None
        key = (device, seg.buffer_id)
        export = self._segments.get(key, _UNSEEN)
        if export is _UNSEEN:
            try:
                handle = export_handle(seg.base, device)
                export = wire.Export(next(self._ids), device, seg.size, handle, b"")
            except CudaError:
                export = None  # remembered: no second try per request
            with self._lock:
                self._segments[key] = export
                while len(self._segments) > _MAX_SEGMENTS:
                    self._segments.popitem(last=False)
        if not isinstance(export, wire.Export):
            return None
        return export, ptr - seg.base

    def place(
        self,
        model: str,
        devices: Sequence[int],
        tensors: Sequence[torch.Tensor],
        arena: Arena,
        allocator: Allocator,
        inline_threshold: int,
    ) -> Placement:
        """Place a request with CUDA tensors for a model whose GPU instances are on ``devices``.

        It runs on the GPU of its first CUDA input if the model runs there, else on the
        model's first GPU. CUDA inputs on that GPU are read in place; the others are
        copied into the model's request buffer (or, if it is full, go through host
        memory); CPU inputs go the host way, as for any model.
        """
        first = next(t.device.index for t in tensors if t.is_cuda)
        device = first if first in devices else devices[0]
        out = Placement(tensor_io.Placed([], [], [], []), device)
        descs: list[TensorDesc | None] = [None] * len(tensors)
        owners: dict[int, int] = {}  # position of a DEVICE descriptor → its export id
        host: dict[int, torch.Tensor] = {}
        copies: list[int] = []
        synced: set[int] = set()
        for pos, t in enumerate(tensors):
            nbytes = t.numel() * t.element_size()
            if not t.is_cuda or not nbytes:
                host[pos] = t.cpu() if t.is_cuda else t
                continue
            found = self._export(t, device) if t.device.index == device and tensor_io.plain(t) else None
            if found is None:
                copies.append(pos)
                continue
            export, offset = found
            if t.device.index not in synced:  # the tensor may still be being written
                synced.add(t.device.index)
                stream = torch.cuda.current_stream(t.device)
                if not stream.query():
                    stream.synchronize()
            if export not in out.exports:
                out.exports.append(export)
            owners[pos] = export.id
            out.keep.append(t)
            descs[pos] = TensorDesc(dtype_name(t.dtype), tuple(t.shape), DEVICE, offset)
        if copies:
            self._copy(model, device, [(pos, tensors[pos]) for pos in copies], descs, owners, host, out)
        out.device_ids = [owners[pos] for pos in sorted(owners)]
        order = [pos for pos in range(len(tensors)) if descs[pos] is None]
        placed = tensor_io.write([host[pos] for pos in order], arena, allocator, inline_threshold)
        for pos, d in zip(order, placed.descs):
            descs[pos] = d
        out.placed = tensor_io.Placed(descs, placed.blobs, placed.frames, placed.offsets)  # type: ignore[arg-type]
        return out

    def _copy(
        self,
        model: str,
        device: int,
        copies: list[tuple[int, torch.Tensor]],
        descs: list[TensorDesc | None],
        owners: dict[int, int],
        host: dict[int, torch.Tensor],
        out: Placement,
    ) -> None:
        """Copy ``copies`` into the model's request buffer (device to device, after the
        caller's stream), recording the buffer's event after them; what finds it full
        goes to ``host``."""
        buf = self._input_buffer(model, device)
        out.buffer = buf
        with buf.lock:
            try:
                for pos, t in copies:
                    nbytes = t.numel() * t.element_size()
                    offset = buf.allocator.alloc(nbytes)
                    if offset is None:  # full: through host memory
                        host[pos] = t.cpu()
                        continue
                    out.device_offsets.append(offset)
                    shape = tuple(t.shape)
                    buf.stream.wait_stream(torch.cuda.current_stream(t.device))
                    with torch.cuda.stream(buf.stream):
                        buf.buffer.view(offset, nbytes, t.dtype, shape).copy_(t)
                    with contextlib.suppress(RuntimeError):  # memory not from torch's allocator
                        t.record_stream(buf.stream)
                    descs[pos] = TensorDesc(dtype_name(t.dtype), shape, DEVICE, offset)
                    owners[pos] = buf.export.id
                if out.device_offsets:
                    buf.event.record(buf.stream)
            except BaseException:
                for offset in out.device_offsets:
                    buf.allocator.free(offset)
                out.device_offsets = []
                raise

    # ── the router thread ──────────────────────────────────────────────────────

    def output_buffer(self, worker: bytes, device: int) -> OutputBuffer:
        """The response buffer of ``worker`` (a GPU worker on ``device``), made on first use."""
        buf = self._outputs.get(worker)
        if buf is None:
            buf = self._outputs[worker] = OutputBuffer(next(self._ids), device, self.response_bytes)
            # Its outputs may come back as inputs (model chains): send them by this export.
            seg = segment_of(buf.buffer.address, device)
            with self._lock:
                self._segments[(device, seg.buffer_id)] = buf.export
        return buf

    def output_view(self, worker: bytes, d: TensorDesc) -> torch.Tensor:
        """A tensor viewing one output slot of ``worker``'s response buffer (no copy).

        When the last tensor sharing its memory is freed, the slot is queued in
        :attr:`released` (see the module docstring).
        """
        buf = self._outputs[worker]
        nbytes = d.nbytes
        if d.where + nbytes > buf.buffer.nbytes:
            raise ValueError(f"output slot [{d.where}, {d.where + nbytes}) lies outside the response buffer")
        tensor, owner = wrap(buf.buffer.address + d.where, nbytes, wire.DTYPES[d.dtype], d.shape, buf.device)
        buf.add_view()
        weakref.finalize(owner, _released, self.released, buf, worker, d.where).atexit = False
        return tensor

    def collect(self, ready: Callable[[bytes, int], None]) -> None:
        """Hand ``ready`` each released output slot whose readers have finished, as
        ``(worker, offset)``; keep the others for a later call."""
        pending = []
        released = self.released
        while released:
            item = released.popleft()
            buf, worker, offset, event = item
            if event is None or event.query():
                ready(worker, offset)
                buf.drop_view()
            else:
                pending.append(item)
        released.extend(pending)

    def drop_worker(self, worker: bytes) -> None:
        """Retire the response buffer of a worker that exited (freed once no output
        tensor views it)."""
        buf = self._outputs.pop(worker, None)
        if buf is not None:
            buf.retire()

    def close(self) -> None:
        """Free every buffer (the workers that mapped them have exited); response
        buffers that output tensors still view are freed with the last of them."""
        with self._lock:
            self._closed = True
            inputs = list(self._inputs.values())
            outputs = list(self._outputs.values())
            self._inputs.clear()
            self._outputs.clear()
            self._segments.clear()
        for buf in inputs:
            with contextlib.suppress(Exception):  # a broken device must not stop the close
                buf.close()
        for out in outputs:
            with contextlib.suppress(Exception):
                out.retire()
        while self.released:  # already free, perhaps still read by queued kernels
            view_of, _, _, event = self.released.popleft()
            with contextlib.suppress(Exception):
                if event is not None:
                    event.synchronize()
                view_of.drop_view()


def _released(
    queue: collections.deque[tuple[OutputBuffer, bytes, int, torch.cuda.Event | None]],
    buf: OutputBuffer,
    worker: bytes,
    offset: int,
) -> None:
    """The last tensor viewing an output slot was freed (any thread)."""
    # Kernels queued on this thread's current stream may still read the slot: give it
    # back only once they have run.
    event = None
    with contextlib.suppress(Exception):
        stream = torch.cuda.current_stream(buf.device)
        if not stream.query():
            event = torch.cuda.Event()
            event.record(stream)
    with buf.lock:  # against retire(): an item queued before it is drained after it
        if not buf.retired:
            queue.append((buf, worker, offset, event))
            return
    # Its worker (or the pool) is gone and nobody collects for it: let go here.
    with contextlib.suppress(Exception):
        if event is not None:
            event.synchronize()
        buf.drop_view()

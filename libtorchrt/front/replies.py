"""Workers' answers turned into callers' outputs and errors (front, router thread).

A RESPONSE's outputs are views of the worker's response arena (no copy): each view's
slot is released when the last tensor sharing its storage dies, and its offset rides
back to the worker on the next request. A batch's outputs stay numpy arrays here;
each member makes its tensors in its own thread (see ``batch.py``). An ERROR fails
its request with the model's error; READY and FAILED go to the supervisor.
"""

from __future__ import annotations

import collections
import logging
import time
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import zmq

from ..errors import InvalidInputError, ModelError, ProtocolError, TorchRTError
from ..transport import tensors as tensor_io
from ..transport import wire
from ..transport.dtypes import DTYPES
from .batch import Batch
from .call import Call
from .records import READY, _Model, _Worker

if TYPE_CHECKING:
    from .router import Router
    from .supervisor import Supervisor

__all__ = ["Replies", "one_line", "worker_error"]

log = logging.getLogger("libtorchrt")

#: distinct unknown peers remembered (each is logged once)
_MAX_UNKNOWN_PEERS = 1024


def one_line(text: str) -> str:
    """A message on one line: its first line, and its last when they differ (a
    TorchScript error says where first and what last)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    return f"{lines[0]} ... {lines[-1]}"


def worker_error(m: _Model, msg: wire.Error) -> TorchRTError:
    """The caller's error for a worker's ERROR message."""
    if msg.input_error:
        return InvalidInputError(m.name, None, "a well-formed request", msg.message)
    return ModelError(m.name, msg.error_type, msg.message, msg.traceback)


class Replies:
    """Reads the ROUTER socket for the router thread and settles what it answers."""

    def __init__(self, router: Router) -> None:
        self.router = router
        #: (worker, offset) of response slots whose last tensor died; any thread appends
        self.released: collections.deque[tuple[_Worker, int]] = collections.deque()
        self._unknown_peers: set[bytes] = set()

    def read(self) -> set[_Model]:
        """Handle every message waiting on the socket; return the models they touched."""
        touched: set[_Model] = set()
        held = self.router.held
        if held is None:
            return touched
        by_identity = self.router.supervisor.by_identity
        supervisor = self.router.supervisor
        while True:
            got = held.recv()
            if got is None:
                break
            identity, header, frames = got
            w = by_identity.get(identity)
            if w is None or not header:
                self._unknown_peer(identity)
                continue
            self._handle(w, header, frames, supervisor)
            touched.add(w.model)
        return touched

    def read_channel(self, w: _Worker) -> None:
        """Handle every reply waiting on ``w``'s channel (see ``transport/channel.py``)."""
        channel = w.channel
        if channel is None:
            return
        supervisor = self.router.supervisor
        while (header := channel.recv()) is not None:
            self._handle(w, header, [], supervisor)
        if channel.closed and self.router.loop.watching(channel.fd):
            self.router.loop.unwatch(channel.fd)  # (its exit follows: the pidfd says so)

    def _handle(self, w: _Worker, header: bytes, frames: list[zmq.Frame], supervisor: Supervisor) -> None:
        try:
            msg = wire.decode(header)
        except ProtocolError as e:
            log.warning("dropped a malformed message from worker %s/%d: %s", w.model.name, w.instance, e)
            return
        if (
            isinstance(msg, (wire.Response, wire.Error))
            and w.lane_key
            and msg.id not in w.inflight
            and self.router.fast.complete(w, msg.id, header, frames)
        ):
            return  # (a fast lane request's, sent back over ZeroMQ: see fastlane.py)
        if isinstance(msg, wire.Response):
            self._on_response(w, msg, frames)
        elif isinstance(msg, wire.Error):
            self._on_error(w, msg)
        elif isinstance(msg, wire.Ready):
            supervisor.on_ready(w, msg)
        elif isinstance(msg, wire.Failed):
            supervisor.on_failed(w, msg)

    def collect_releases(self) -> None:
        """Queue the freed response slots on their workers (they ride on the next request)."""
        released = self.released
        while released:
            w, offset = released.popleft()
            if w.state == READY:
                w.releases.append(offset)
        gpu = self.router.gpu
        if gpu.released:
            gpu.collect(self._device_released)

    def _device_released(self, identity: bytes, offset: int) -> None:
        w = self.router.supervisor.by_identity.get(identity)
        if w is not None and w.state == READY:
            w.device_releases.append(offset)

    def _unknown_peer(self, identity: bytes) -> None:
        # Once per peer (a bounded memory of them), so a noisy peer cannot flood the log.
        if identity not in self._unknown_peers:
            if len(self._unknown_peers) < _MAX_UNKNOWN_PEERS:
                self._unknown_peers.add(identity)
            log.warning("dropped a message from an unknown peer %r", identity[:32])

    def _answered(self, w: _Worker, req_id: int) -> Call | None:
        if w.serial == req_id:
            w.serial = 0  # the request sent over ZeroMQ is answered: the channel is free again
        call = w.inflight.pop(req_id, None)
        if call is None:
            log.warning("worker %s/%d answered unknown request %d", w.model.name, w.instance, req_id)
            return None
        w.served += 1
        w.busy_since = time.monotonic() if w.inflight else None
        call.free()
        w.model.queue.finished(call)
        return call

    def _on_response(self, w: _Worker, msg: wire.Response, frames: list[zmq.Frame]) -> None:
        call = self._answered(w, msg.id)
        if call is None:
            return
        if call.warmup:
            self.router.supervisor.warmed(w, msg)
            return
        w.model.stats.executed(call.rows)
        batch = isinstance(call, Batch)
        try:
            if w.gpu is None:
                # A batch's outputs stay numpy arrays here: its members make their
                # tensors in their own threads (see Batch.resolve).
                slot = self._output_array if batch else self._output_slot
                outputs = tensor_io.read(msg.tensors, msg.blobs, frames, lambda d: slot(w, d), arrays=batch)
            else:
                outputs = self._gpu_outputs(w, call, msg, frames)
        except Exception as e:  # a reply we cannot rebuild fails its request, not the router
            call.resolve_error(e if isinstance(e, ProtocolError) else ProtocolError(f"unreadable reply: {e!r}"))
            return
        binder = w.model.binder
        assert binder is not None
        result = dict(zip(binder.output_names(len(outputs)), outputs))
        call.resolve(binder.shape_outputs(result) if binder.reshapes and not batch else result)

    def _on_error(self, w: _Worker, msg: wire.Error) -> None:
        if msg.fatal:
            # It exits after this (sticky CUDA error): the requests queued in it did
            # not run, and are re-sent elsewhere when its exit is seen.
            w.doomed = True
            log.error(
                "worker %s/%d reported a sticky error and is being replaced: %s", w.model.name, w.instance, msg.message
            )
        call = self._answered(w, msg.id)
        if call is None:
            return
        if call.warmup:
            self.router.supervisor.warmup_failed(w, one_line(msg.message), f"{msg.message}\n{msg.traceback}")
            return
        w.model.stats.executed(call.rows)
        call.resolve_error(worker_error(w.model, msg))

    def _output_slot(self, w: _Worker, d: wire.TensorDesc) -> torch.Tensor:
        tensor, owner = tensor_io.as_tensor(_slot_bytes(w, d), DTYPES[d.dtype], d.shape)
        # The slot is the caller's until the last tensor sharing its storage dies; then
        # its offset is queued and rides back to the worker on the next request.
        weakref.finalize(owner, self.released.append, (w, d.where)).atexit = False
        return tensor

    def _output_array(self, w: _Worker, d: wire.TensorDesc) -> Any:
        """An output slot as a numpy array where its dtype allows (else as a tensor),
        released like :meth:`_output_slot`'s once the last view of it is freed."""
        made = tensor_io.as_array(_slot_bytes(w, d), DTYPES[d.dtype], d.shape)
        if made is None:
            return self._output_slot(w, d)
        weakref.finalize(made[1], self.released.append, (w, d.where)).atexit = False
        return made[0]

    def _gpu_outputs(self, w: _Worker, call: Call, msg: wire.Response, frames: list[zmq.Frame]) -> list[torch.Tensor]:
        """A GPU worker's outputs: ``DEVICE`` ones view its response buffer (no copy);
        the others are read as from any worker, and moved to the GPU if the caller
        asked for CUDA outputs (only when the response buffer was full)."""
        if not call.cuda_outputs and any(d.kind == wire.DEVICE for d in msg.tensors):
            raise ProtocolError("device outputs for a request that did not ask for them")
        gpu = self.router.gpu
        outputs = tensor_io.read(
            msg.tensors,
            msg.blobs,
            frames,
            lambda d: self._output_slot(w, d),
            lambda d: gpu.output_view(w.identity, d),
        )
        if call.cuda_outputs:  # (strings stay lists)
            outputs = [t.to(f"cuda:{w.gpu}") if isinstance(t, torch.Tensor) and not t.is_cuda else t for t in outputs]
        return outputs


def _slot_bytes(w: _Worker, d: wire.TensorDesc) -> np.ndarray:
    base = w.outputs
    assert base is not None
    end = d.where + d.nbytes
    if end > base.size:
        raise ValueError(f"output slot [{d.where}, {end}) lies outside the response arena")
    return base[d.where : end]

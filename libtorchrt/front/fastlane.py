"""The fast lane: ``Pool.infer`` to a CPU worker without the router thread (front).

::

    caller thread                           hub thread (native, no GIL)      worker
    ─────────────                           ───────────────────────────      ──────
    admission (as for any request)
    encode the request ──► hub.submit ──── send(2) on the least-busy lane ──► runs it
    (no lane free: queued in the hub)
    ticket.wait() (futex, GIL let go) ◄──── reads the reply, wakes its   ◄──── reply on
    decode; outputs view the response        caller; sends the lane the          the lane
    arena; stats                             next queued request

A request takes the lane when its model has a plain FIFO queue (no dynamic or sequence
batching), every instance on the CPU and no ``execution_timeout`` (the router's watchdog
times executions), and the request has no deadline, data frames or inline bytes past
``MAX_CHANNEL_BLOBS``. Everything else, and ``submit``/``infer_async`` (whose futures
need a thread to run their callbacks), goes by the router as before.

The router still owns the workers' lives: it adds a worker's lane once the worker is
READY, pauses it when the worker is stopped, and removes it when the worker exits. A
request the hub cannot finish comes back to the caller, who hands it to the router: one
that did not run (``RETRY``) as it is; one whose worker died while running it (``LOST``)
after counting the try, as the router counts a re-sent request's.

Replies that come over ZeroMQ instead (an error, or outputs with data frames) are read
by the router, which completes the ticket with them (:meth:`FastLane.complete`).
"""

from __future__ import annotations

import itertools
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import zmq

from ..errors import PoolClosedError, ProtocolError, TimeoutError, WorkerDiedError
from ..transport import lanes, wire
from ..transport import tensors as tensor_io
from ..transport.dtypes import DTYPES
from .call import Call
from .queues import Fifo
from .records import _Model, _Worker
from .replies import worker_error

if TYPE_CHECKING:
    from .router import Router

__all__ = ["FastLane"]

#: how long a lane's record outlives its worker's exit: a caller woken by a reply read
#: before the exit still finds the worker's response arena (seconds)
_RETIRED_S = 30.0


class FastLane:
    """The pool's hub, and the lanes of its workers."""

    def __init__(self, router: Router, max_blobs: int) -> None:
        self.router = router
        self.max_blobs = max_blobs
        self.hub = lanes.Hub() if lanes.available else None
        self.closed = False
        self._keys = itertools.count(1)
        #: lane key → its worker and response arena (kept a while after its exit)
        self._lanes: dict[int, tuple[_Worker, np.ndarray]] = {}
        self._retired: deque[tuple[float, int]] = deque()
        #: data frames of lane replies that came over ZeroMQ, by request id
        self._frames: dict[int, list[zmq.Frame]] = {}
        #: requests sent whose callers stopped waiting (their inputs are freed with the reply)
        self._abandoned: dict[int, Call] = {}

    # ── the router thread: models and workers ─────────────────────────────────

    def add_model(self, m: _Model) -> None:
        """Give ``m`` a queue in the hub if its requests can take the lane."""
        if (
            self.hub is not None
            and not self.closed
            and isinstance(m.queue, Fifo)
            and m.slots
            and all(s.device == "cpu" for s in m.slots)
            and m.cfg.execution_timeout is None
        ):
            m.lane = self.hub.add_model()

    def drop_model(self, m: _Model) -> None:
        """``m`` is retiring: no more of its requests take the lane (queued ones go to
        the router; those in flight finish)."""
        if m.lane >= 0 and self.hub is not None and not self.closed:
            self.hub.drop_model(m.lane)
        m.lane = -1

    def lane_for(self, m: _Model) -> Any:
        """The worker's end of a new lane for a worker of ``m`` (None: it gets none);
        the front's end waits in the worker's record until it is READY."""
        return lanes.pair() if m.lane >= 0 else None

    def ready(self, w: _Worker) -> None:
        """``w`` is READY: its lane takes requests."""
        sock, w.lane_sock = w.lane_sock, None
        m = w.model
        if sock is None or self.hub is None or self.closed or m.lane < 0 or w.outputs is None:
            if sock is not None:
                sock.close()
            return
        key = next(self._keys)
        self._lanes[key] = (w, w.outputs)
        limit = max(1, min(m.queue.per_worker, lanes.MAX_LIMIT))
        self.hub.add_lane(m.lane, sock.detach(), limit, key)
        w.lane_key = key

    def pause(self, w: _Worker) -> None:
        """``w`` is being stopped: send it nothing new."""
        if w.lane_key and self.hub is not None:
            self.hub.pause_lane(w.lane_key)

    def exited(self, w: _Worker) -> None:
        """``w`` exited: its lane is closed; what it held comes back to its callers."""
        if w.lane_sock is not None:
            w.lane_sock.close()
            w.lane_sock = None
        key, w.lane_key = w.lane_key, 0
        if key and self.hub is not None:
            self.hub.remove_lane(key)
            now = time.monotonic()
            self._retired.append((now + _RETIRED_S, key))
            while self._retired and self._retired[0][0] <= now:
                self._lanes.pop(self._retired.popleft()[1], None)

    def complete(self, w: _Worker, req_id: int, header: bytes, frames: list[zmq.Frame]) -> bool:
        """A reply to one of ``w``'s lane requests that came over ZeroMQ: hand it to
        its caller. False if ``w``'s lane holds no such request."""
        if not w.lane_key or self.hub is None:
            return False
        if frames:
            self._frames[req_id] = frames
        if self.hub.complete(w.lane_key, req_id, header):
            return True
        self._frames.pop(req_id, None)
        return False

    def counts(self, w: _Worker) -> tuple[int, int]:
        """``w``'s lane requests in flight, and served."""
        return (self.inflight(w), self.served(w)) if w.lane_key else (0, 0)

    def inflight(self, w: _Worker) -> int:
        return self.hub.inflight(w.lane_key) if w.lane_key and self.hub is not None else 0

    def served(self, w: _Worker) -> int:
        return self.hub.served(w.lane_key) if w.lane_key and self.hub is not None else 0

    def pending(self) -> int:
        """Requests the hub holds (queued or in flight), any thread."""
        return self.hub.pending() if self.hub is not None else 0

    def close(self) -> None:
        """Fail what the hub holds (its callers raise PoolClosedError); stop its thread."""
        if self.hub is not None and not self.closed:
            self.closed = True
            self.hub.close()
            for key, (w, _) in list(self._lanes.items()):
                self._lanes.pop(key, None)
                w.lane_key = 0
            self._frames.clear()

    # ── caller threads ─────────────────────────────────────────────────────────

    def takes(self, call: Call) -> bool:
        """Whether ``call`` can go by the lane."""
        return (
            call.model.lane >= 0
            and not call.frames
            and call.device is None
            and call.sequence is None
            and (not call.blobs or sum(map(len, call.blobs)) <= self.max_blobs)
        )

    def infer(self, call: Call) -> dict[str, torch.Tensor]:
        """Run ``call`` by the lane (or, if the hub cannot, by the router) and return
        its outputs."""
        hub = self.hub
        assert hub is not None
        if hub.orphaned:
            self._read_orphans()
        call.id = self.router.next_id()
        header = wire.encode(wire.Request(call.id, call.descs, [], call.blobs))
        ticket = hub.submit(call.model.lane, call.id, header) if len(header) <= lanes.MAX_DATAGRAM else None
        if ticket is None:
            return self._by_router(call)
        call.dispatched = True
        call.sent_ns = time.perf_counter_ns()
        try:
            state, key, reply = ticket.wait(None if call.deadline is None else call.deadline - time.monotonic())
        except BaseException:  # (KeyboardInterrupt)
            if not self._abandon(call, ticket) and ticket.wait()[0] == lanes.DONE:
                self._answer(call, *ticket.wait()[1:])  # (its outputs' slots go back at once)
            raise
        if state == 0:  # its deadline passed
            exc = TimeoutError(f"model {call.model.name!r}: the request's deadline passed before it completed")
            if self._abandon(call, ticket):
                call.resolve_error(exc)
                return call.future.result()  # type: ignore[no-any-return]
            state, key, reply = ticket.wait()  # (it finished meanwhile)
        if state == lanes.DONE:
            return self._answer(call, key, reply)
        m = call.model
        if state == lanes.CLOSED:
            call.fail(PoolClosedError("the pool was closed before this request completed"))
        elif state == lanes.LOST:
            call.attempts += 1
            if call.attempts >= 2 or call.attempts > m.cfg.max_retries:
                entry = self._lanes.get(key)
                pid, instance = (entry[0].proc.pid, entry[0].instance) if entry else (-1, -1)
                code = entry[0].proc.returncode if entry else None
                call.fail(WorkerDiedError(m.name, instance, pid, code, "", poison=call.attempts >= 2))
        if call.future.done():
            return call.future.result()  # (raises its error)
        call.dispatched = False
        return self._by_router(call)

    def _by_router(self, call: Call) -> dict[str, torch.Tensor]:
        """Hand ``call`` to the router, and wait for it (the router fails it at its deadline)."""
        self.router.submit(call)
        return call.future.result()  # type: ignore[no-any-return]

    def _abandon(self, call: Call, ticket: Any) -> bool:
        """Stop waiting for ``call``; False if it finished meanwhile (its ticket has the
        answer). One sent keeps its inputs until its reply comes (an orphan)."""
        how = ticket.abandon()
        if how == 0:
            return False
        if how == 2:
            self._abandoned[call.id] = call
        else:
            call.free()
        return True

    def _answer(self, call: Call, key: int, reply: bytes) -> dict[str, torch.Tensor]:
        m = call.model
        entry = self._lanes.get(key)
        frames = self._frames.pop(call.id, []) if self._frames else []
        call.free()
        try:
            msg = wire.decode(reply)
            if entry is None:
                raise ProtocolError("a reply from a worker the pool no longer knows")
        except ProtocolError as e:
            call.resolve_error(e)
            return call.future.result()  # type: ignore[no-any-return]
        arena = entry[1]
        m.stats.executed(1)
        if isinstance(msg, wire.Error):
            call.resolve_error(worker_error(m, msg))
            return call.future.result()  # type: ignore[no-any-return]
        if not isinstance(msg, wire.Response):
            call.resolve_error(ProtocolError(f"a {type(msg).__name__} message for a request"))
            return call.future.result()  # type: ignore[no-any-return]
        release = self.hub.release  # type: ignore[union-attr]

        def slot(d: wire.TensorDesc) -> torch.Tensor:
            end = d.where + d.nbytes
            if end > arena.size:
                raise ProtocolError(f"output slot [{d.where}, {end}) lies outside the response arena")
            tensor, owner = tensor_io.as_tensor(arena[d.where : end], DTYPES[d.dtype], d.shape)
            weakref.finalize(owner, release, key, d.where).atexit = False
            return tensor

        try:
            outputs = tensor_io.read(msg.tensors, msg.blobs, frames, slot)
        except Exception as e:  # a reply we cannot rebuild fails its request
            call.resolve_error(e if isinstance(e, ProtocolError) else ProtocolError(f"unreadable reply: {e!r}"))
            return call.future.result()  # type: ignore[no-any-return]
        binder = m.binder
        assert binder is not None
        result = dict(zip(binder.output_names(len(outputs)), outputs))
        if binder.reshapes:
            result = binder.shape_outputs(result)
        m.stats.succeeded((call,), call.sent_ns, time.perf_counter_ns())
        return result

    def _read_orphans(self) -> None:
        """Give back the response slots of replies whose caller stopped waiting."""
        assert self.hub is not None
        for key, reply in self.hub.orphans():
            try:
                msg = wire.decode(reply)
            except ProtocolError:
                continue
            call = self._abandoned.pop(getattr(msg, "id", -1), None)
            if call is not None:
                call.free()
                self._frames.pop(call.id, None)
            if isinstance(msg, wire.Response):
                for d in msg.tensors:
                    if d.kind == wire.ARENA:
                        self.hub.release(key, d.where)

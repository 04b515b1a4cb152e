"""The fast lane: ``Pool.infer`` and ``infer_async`` to CPU workers without the router
thread (front).

::

    caller thread                           hub thread (native, no GIL)      worker
    ─────────────                           ───────────────────────────      ──────
    admission (as for any request)
    encode; ticket.wait() lets go of the
    GIL, sends on the least-busy lane ─────────────────────────────────────► runs it
    (none free: queued in the hub)
    sleeps on a futex              ◄──────  reads the reply, wakes its   ◄──── reply on
    decode; outputs view the response        caller; sends the lane the          the lane
    arena; stats                             next queued request

An asyncio caller's request is placed at once, and the hub lists it in its loop's
mailbox when it finishes (an eventfd the loop watches); the loop's thread settles it. To
a batching model, the requests of one turn of the loop go as one request of all their
rows, each caller getting a view of its own (``front/groups.py``).

A request takes the lane when its model has a plain FIFO queue or a dynamic batcher of
one queue (no priority levels, ordering or queue policy: the hub forms its batches by the
same rules, and wakes the caller threads of a batch's replies a few at a time through its
wake-up gate, ``transport/lanes.py``; see :meth:`FastLane.takes`),
every instance on the CPU and no ``execution_timeout`` (the router's watchdog times
executions), and the request has no data frames and at most ``MAX_CHANNEL_BLOBS`` of
inline bytes. A batch's execution is
counted in the stats with the reply that carries its rows (``wire.Response.batch``), or
with its orphan. Everything else, and ``submit`` (whose future runs callbacks), goes by
the router as before. A deadline is the caller's: a request whose deadline has passed
is not sent; one still queued in the hub is taken out; one already sent leaves an
*orphan* reply, whose slots the next caller gives back.

The router still owns the workers' lives: it adds a worker's lane once the worker is
READY, stops sending to it when its model retires, and removes it when the worker exits.
A request the hub cannot finish is handed over by its caller: one that did not run
(``RETRY``) to the router as it is; one whose worker died while it may have been running
it (``LOST``) to the supervisor, which decides it with that worker's other requests
(retries, the poison rule, the exit code in the error); on close, it fails.

Replies that come over ZeroMQ instead (an error, or outputs with data frames) are read
by the router, which completes the ticket with them (:meth:`FastLane.complete`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import weakref
from collections import deque
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, cast

import torch
import zmq

from ..errors import PoolClosedError, ProtocolError
from ..transport import lanes, wire
from ..transport import tensors as tensor_io
from ..transport.dtypes import DTYPES
from .batcher import Batcher
from .call import Call
from .future import RequestFuture
from .groups import Group, LoopGroups, groupable
from .queues import Fifo
from .records import _Model, _Worker
from .replies import worker_error
from .settling import BY_ROUTER, deadline_passed, expired, outcome

if TYPE_CHECKING:
    from .router import Router

__all__ = ["FastLane"]

log = logging.getLogger("libtorchrt")


class _Mailbox:
    """One event loop's mailbox in the hub: its id, eventfd and waiting requests."""

    def __init__(self, loop: asyncio.AbstractEventLoop, box: int, fd: int) -> None:
        self.loop = loop
        self.id = box
        self.fd = fd
        #: request id → its call, ticket and the awaiting caller's future
        self.waiting: dict[int, tuple[Call, Any, asyncio.Future[Any]]] = {}
        #: the groups of this turn of the loop, by model and batch key (sent when it ends)
        self.open: dict[tuple[_Model, int], Group] = {}
        self.flush_scheduled = False
        #: groups sent, by their request id
        self.sent: dict[int, Group] = {}


def _hub_batching(batcher: Batcher) -> bool:
    """Whether the hub forms ``batcher``'s batches as it would: one queue without a
    size limit or queue timeout, results in any order (priority levels, queue policies
    and preserve_ordering stay the router's)."""
    db = batcher.model.cfg.dynamic_batching
    assert db is not None
    policy = db.default_queue_policy
    return (
        not db.priority_levels
        and not db.preserve_ordering
        and not db.priority_queue_policy
        and not policy.max_queue_size
        and not policy.default_timeout_microseconds
        and batcher.max_rows <= lanes.MAX_BATCH
    )


#: distinct batch keys (input dtypes and non-batch dimensions) the lane tells apart;
#: requests of more go by the router
_MAX_BATCH_KEYS = 4096


#: how long a lane's worker is remembered after its exit: a caller that its death woke
#: hands its request to the supervisor with it (seconds)
_RETIRED_S = 60.0


class FastLane:
    """The pool's hub, and the lanes of its workers."""

    def __init__(self, router: Router, max_blobs: int) -> None:
        self.router = router
        self.max_blobs = max_blobs
        options = router.options
        self.hub = lanes.Hub(awake=options.wake_limit, spin_us=options.busy_poll_us) if lanes.available else None
        self.closed = False
        self._keys = itertools.count(1)
        #: lane key → its worker (remembered for _RETIRED_S after its exit)
        self._lanes: dict[int, _Worker] = {}
        self._retired: deque[tuple[float, int]] = deque()
        #: data frames of lane replies that came over ZeroMQ, by request id
        self._frames: dict[int, list[zmq.Frame]] = {}
        #: requests sent whose callers stopped waiting (their inputs are freed with the reply)
        self._abandoned: dict[int, Call] = {}
        #: each event loop's mailbox (asyncio callers); a closed loop's is closed when
        #: the next loop opens one, or with the pool
        self._boxes: dict[asyncio.AbstractEventLoop, _Mailbox] = {}
        #: batch keys (what must match for requests to share a batch) → the hub's number
        self._batch_keys: dict[Any, int] = {}
        self._next_batch_key = itertools.count(1)
        #: event loops' turns of requests to batching models, each sent as one
        self.groups = LoopGroups(self)

    # ── the router thread: models and workers ─────────────────────────────────

    def add_model(self, m: _Model) -> None:
        """Give ``m`` a queue in the hub if its requests can take the lane: a FIFO, or
        a dynamic batcher that the hub's batching matches (see :func:`_hub_batching`)."""
        if (
            self.hub is None
            or self.closed
            or not m.slots
            or any(s.device != "cpu" for s in m.slots)
            or m.cfg.execution_timeout is not None
        ):
            return
        if isinstance(m.queue, Fifo):
            m.lane = self.hub.add_model()
        elif isinstance(m.queue, Batcher) and _hub_batching(m.queue):
            db = m.cfg.dynamic_batching
            assert db is not None
            m.lane = self.hub.add_model(m.cfg.max_batch_size, db.max_queue_delay_microseconds, m.queue.preferred)
            m.lane_batches = True

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
        limit = max(1, min(m.queue.per_worker, lanes.MAX_LIMIT))
        try:
            self.hub.add_lane(m.lane, sock.detach(), limit, key)  # (the hub owns the descriptor now)
        except (OSError, RuntimeError, ValueError) as e:  # (its requests go by the router)
            log.warning("worker %s/%d: no fast lane: %s", m.name, w.instance, e)
            return
        self._lanes[key] = w
        w.lane_key = key

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
        """``w``'s lane requests in flight, and served (any thread)."""
        key = w.lane_key
        return self.hub.counts(key) if key and self.hub is not None else (0, 0)

    def inflight(self, w: _Worker) -> int:
        return self.counts(w)[0]

    def served(self, w: _Worker) -> int:
        return self.counts(w)[1]

    def queued(self, m: _Model) -> int:
        """``m``'s requests waiting in the hub, not sent to a worker yet (any thread; an
        event loop's group of requests counts once)."""
        return self.hub.queued(m.lane) if m.lane >= 0 and self.hub is not None else 0

    def pending(self) -> int:
        """Requests the hub holds: queued, in flight, or finished and not read yet by
        their callers (a drain waits for those too: the lanes' arenas hold their
        outputs), any thread."""
        return self.hub.pending() if self.hub is not None else 0

    def close(self) -> None:
        """Fail what the hub holds (its callers raise PoolClosedError); stop its thread."""
        if self.hub is not None and not self.closed:
            self.closed = True
            # (the loops' mailboxes first: a loop running in another thread then shuts
            # its mailbox before anything the hub's close finishes can end its run, and
            # its thread close it with that callback still unrun)
            self._close_boxes()
            self.hub.close()
            for key, w in list(self._lanes.items()):
                self._lanes.pop(key, None)
                w.lane_key = 0
            self._frames.clear()

    # ── caller threads ─────────────────────────────────────────────────────────

    def serves(self, model: str, version: int | None) -> bool:
        """Whether requests to ``model`` may take the lane (any thread)."""
        router = self.router
        m = router.default.get(model) if version is None else router.models.get((model, version))
        return m is not None and m.lane >= 0

    def takes(self, call: Call) -> bool:
        """Whether ``call`` can go by the lane. (A batch's replies to caller threads are
        woken a few at a time by the hub's wake-up gate: ``transport/lanes.py``.)"""
        m = call.model
        return (
            m.lane >= 0
            and not call.frames
            and call.device is None
            and call.sequence is None
            and (not call.blobs or sum(map(len, call.blobs)) <= self.max_blobs)
            and (not m.lane_batches or self._batch_key(call) > 0)
        )

    def _batch_key(self, call: Call) -> int:
        """The hub's number for what must match for ``call`` to share a batch (its
        inputs' dtypes and non-batch dimensions, as ``Batcher._key``); 0: too many
        distinct ones already. Sets ``call.key``."""
        key = tuple([(d.dtype, d.shape[1:]) for d in call.descs])
        number = self._batch_keys.get(key)
        if number is None:
            if len(self._batch_keys) >= _MAX_BATCH_KEYS:
                return 0
            number = self._batch_keys.setdefault(key, next(self._next_batch_key))
        call.key = number  # (until _hub_key: the router's batcher keys its own calls)
        return number

    @staticmethod
    def hub_key(call: Call) -> int:
        """``call``'s batch key for the hub (0: it does not batch); the router's batcher
        never sees it (a call handed over is keyed afresh)."""
        key, call.key = call.key, None
        return key or 0

    def infer(self, call: Call) -> dict[str, torch.Tensor]:
        """Run ``call`` by the lane (or, if the hub cannot, by the router) and return
        its outputs."""
        hub = self.hub
        assert hub is not None
        header = self._header(call)
        if header is None:
            return outcome(call)
        if len(header) > lanes.MAX_REQUEST:
            return self._by_router(call)
        # (placed by its wait, which lets go of the GIL first: the send and the hub's
        # mutex are not paid holding it)
        ticket = hub.request(call.model.lane, call.id, header, -1, call.rows, self.hub_key(call))
        call.dispatched = True
        call.sent_ns = time.perf_counter_ns()
        try:
            state, key, reply = ticket.wait(None if call.deadline is None else call.deadline - time.monotonic())
        except BaseException:  # (KeyboardInterrupt)
            if not self.abandon(call, ticket):
                state, key, reply = ticket.wait()  # (it finished meanwhile: its outputs' slots go back at once)
                if state == lanes.DONE:
                    self.answer(call, key, reply)
            raise
        if state == 0:  # its deadline passed
            if self.abandon(call, ticket):
                call.resolve_error(deadline_passed(call))
                return outcome(call)
            state, key, reply = ticket.wait()  # (it finished meanwhile)
        result = self._conclude(call, state, key, reply)
        return outcome(call) if result is BY_ROUTER else result

    def hand_over(self, call: Call, state: int, key: int) -> None:
        """``call``'s ticket ended without an answer it can use (``state``): it goes to
        the router (it did not run), to the supervisor (its worker died while it may
        have been running it: decided with that worker's other requests), or fails (the
        pool closed). Its future tells the rest."""
        call.dispatched = False
        w = self._lanes.get(key) if state == lanes.LOST else None
        try:
            if state == lanes.CLOSED:
                call.fail(PoolClosedError("the pool was closed before this request completed"))
            elif w is not None:
                self.router.lost(call, w)
            else:
                self.router.submit(call)
        except PoolClosedError as e:
            call.fail(e)

    def _header(self, call: Call) -> bytes | None:
        """Give ``call`` its id and encode it (None: its deadline has passed, and it failed);
        first give back the slots of replies nobody waited for."""
        assert self.hub is not None
        if self.hub.orphaned:
            self.read_orphans()
        if expired(call):
            return None
        call.id = self.router.next_id()
        return wire.encode(wire.Request(call.id, call.descs, [], call.blobs))

    def _by_router(self, call: Call) -> dict[str, torch.Tensor]:
        """Hand ``call`` to the router, and wait for it (the router fails it at its deadline)."""
        self.router.submit(call)
        return outcome(call)

    # ── asyncio callers ────────────────────────────────────────────────────────

    def infer_async(self, call: Call) -> Coroutine[Any, Any, dict[str, torch.Tensor]]:
        """As :meth:`infer`, for a caller in an event loop (in its thread): what to
        await. The hub lists the finished request in the loop's mailbox, whose eventfd
        the loop watches; the loop's thread decodes the reply (the router thread runs
        nothing for it). (Not a coroutine itself: one frame fewer for every await.)"""
        loop = asyncio.get_running_loop()
        box = self._box(loop)
        if box is None:
            return self._by_router_async(call, loop)
        if call.model.lane_batches and groupable(call):
            return self.groups.join(call, box, loop)
        return self._alone_async(call, box, loop)

    def join(self, call: Call) -> Coroutine[Any, Any, dict[str, torch.Tensor]]:
        """As :meth:`infer_async`, for a call known to take the lane and, if the hub
        batches its model, to be joinable with others (``front/shortcut.py``'s)."""
        loop = asyncio.get_running_loop()
        box = self._box(loop)
        if box is None:
            return self._by_router_async(call, loop)
        if call.model.lane_batches:
            return self.groups.join(call, box, loop)
        return self._alone_async(call, box, loop)

    def _box(self, loop: asyncio.AbstractEventLoop) -> _Mailbox | None:
        """``loop``'s mailbox (opened on its first request); None once the lane is closed."""
        if self.closed:
            return None
        box = self._boxes.get(loop)
        return box if box is not None else self._open_box(loop)

    async def _alone_async(self, call: Call, box: _Mailbox, loop: asyncio.AbstractEventLoop) -> dict[str, torch.Tensor]:
        """One request of its own to the hub, listed in ``box`` when it finishes."""
        hub = self.hub
        assert hub is not None
        header = self._header(call)
        if header is None:
            return outcome(call)
        ticket = (
            hub.submit(call.model.lane, call.id, header, box.id, call.rows, self.hub_key(call))
            if len(header) <= lanes.MAX_REQUEST
            else None
        )
        if ticket is None:
            return await self._by_router_async(call, loop)
        call.dispatched = True
        call.sent_ns = time.perf_counter_ns()
        waiter: asyncio.Future[Any] = loop.create_future()
        box.waiting[call.id] = (call, ticket, waiter)
        timer = (
            None
            if call.deadline is None
            else loop.call_later(call.deadline - time.monotonic(), self._expire, box, call.id)
        )
        try:
            result = await waiter
        except asyncio.CancelledError:
            if box.waiting.pop(call.id, None) is not None and not self.abandon(call, ticket):
                # (it finished meanwhile: its outputs' slots go back at once)
                with contextlib.suppress(Exception):
                    if self._settle(call, ticket) is BY_ROUTER:
                        call.future.cancel()
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if result is BY_ROUTER:  # (handed over: its future tells the rest)
            return await asyncio.wrap_future(cast("RequestFuture[Any]", call.future), loop=loop)
        return result

    def _open_box(self, loop: asyncio.AbstractEventLoop) -> _Mailbox:
        assert self.hub is not None
        self.drop_closed_loops()  # (asyncio.run() after asyncio.run())
        box = _Mailbox(loop, *self.hub.add_mailbox())
        loop.add_reader(box.fd, self._drain, box)
        self._boxes[loop] = box
        return box

    def drop_closed_loops(self) -> None:
        """Forget the mailboxes of the event loops closed since they used the lane (any
        thread: a closed loop runs nothing more). Their callers can never read a reply:
        each of their requests is abandoned, or, if it finished, its reply is read and
        dropped (its outputs' slots given back), so that a drained close does not wait
        for it."""
        for loop in list(self._boxes):  # (a copy: loops add theirs meanwhile)
            box = self._boxes.pop(loop, None) if loop.is_closed() else None
            if box is None:
                continue  # (open, or another thread dropped it)
            self.groups.drop(box)
            for call, ticket, _ in box.waiting.values():
                self.drop(call, ticket)
            box.waiting.clear()
            self._remove_box(box)

    def drop(self, call: Call, ticket: Any) -> None:
        """Nobody will read ``call``'s reply: abandon it, or read a finished one and
        drop its outputs (not counted as a success: no caller got them)."""
        if not self.abandon(call, ticket):
            state, key, reply = ticket.wait(0.0)
            if state == lanes.DONE:
                with contextlib.suppress(Exception):  # (its error, too, has nobody to reach)
                    self.answer(call, key, reply, [])
            call.free()

    def _drain(self, box: _Mailbox) -> None:
        """The loop's reader: settle the requests the hub finished."""
        assert self.hub is not None
        for req_id in self.hub.drain(box.id):
            entry = box.waiting.pop(req_id, None)
            if entry is None:
                g = box.sent.pop(req_id, None)
                if g is not None:
                    self.groups.settle(g)
                continue  # (or its caller stopped waiting)
            call, ticket, waiter = entry
            try:
                result = self._settle(call, ticket)
            except BaseException as e:
                if not waiter.done():
                    waiter.set_exception(e)
                continue
            if not waiter.done():
                waiter.set_result(result)

    def _settle(self, call: Call, ticket: Any) -> Any:
        """A finished ticket's outputs; raises its error; BY_ROUTER: it was handed over."""
        return self._conclude(call, *ticket.wait(0.0))

    def _conclude(self, call: Call, state: int, key: int, reply: bytes | None) -> Any:
        """The outputs of ``call``, whose ticket ended in ``state``; raises its error;
        BY_ROUTER: it was handed over (its future tells the rest)."""
        if state == lanes.DONE:
            result = self.answer(call, key, reply)
            if result is not BY_ROUTER:
                return result
            state = lanes.RETRY
        self.hand_over(call, state, key)
        return BY_ROUTER

    def _expire(self, box: _Mailbox, req_id: int) -> None:
        entry = box.waiting.get(req_id)
        if entry is None:
            return
        call, ticket, waiter = entry
        if not self.abandon(call, ticket):
            return  # (it finished: the mailbox lists it)
        del box.waiting[req_id]
        exc = deadline_passed(call)
        call.resolve_error(exc)
        if not waiter.done():
            waiter.set_exception(exc)

    async def _by_router_async(self, call: Call, loop: asyncio.AbstractEventLoop) -> dict[str, torch.Tensor]:
        self.router.submit(call)
        return await asyncio.wrap_future(cast("RequestFuture[Any]", call.future), loop=loop)

    def _close_boxes(self) -> None:
        """Stop watching every loop's mailbox (in its loop's thread), then close it."""
        for loop, box in list(self._boxes.items()):
            del self._boxes[loop]
            try:
                loop.call_soon_threadsafe(self._shut_box, box)
            except RuntimeError:  # its loop is closed, and its selector with it
                self._remove_box(box)

    def _shut_box(self, box: _Mailbox) -> None:
        self.groups.flush(box)
        self._drain(box)  # (what the hub finished; its close, if that came first: PoolClosedError)
        self.groups.close(box)
        for call, _, waiter in box.waiting.values():
            if not waiter.done():
                waiter.set_exception(PoolClosedError("the pool was closed before this request completed"))
            call.free()
        box.waiting.clear()
        box.loop.remove_reader(box.fd)
        self._remove_box(box)

    def _remove_box(self, box: _Mailbox) -> None:
        assert self.hub is not None
        if box.fd >= 0:
            self.hub.remove_mailbox(box.id)
            box.fd = -1

    def abandon(self, call: Call, ticket: Any) -> bool:
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

    def answer(self, call: Call, key: int, reply: bytes | None, counted: list[Call] | None = None) -> Any:
        """``call``'s outputs from its reply (raises its error); BY_ROUTER if its worker
        was dropped before the reply could be read (its response arena is gone)."""
        m = call.model
        frames = self._frames.pop(call.id, []) if self._frames else []
        try:
            msg = wire.decode(reply or b"")  # (a DONE ticket always holds its reply)
        except ProtocolError as e:
            call.fail(e)
            return outcome(call)
        w = self._lanes.get(key)
        arena = w.outputs if w is not None else None
        del w  # (an error raised from here must not keep the worker in its traceback)
        if arena is None and isinstance(msg, wire.Response):
            return BY_ROUTER
        call.free()
        # (a lane batch's execution is counted once, with the reply that says its rows)
        rows = getattr(msg, "batch", 0) if m.lane_batches else call.rows
        if not isinstance(msg, wire.Response):
            arena = None  # (a kept error's traceback holds this frame: not the worker's arena)
        if isinstance(msg, wire.Error):
            if rows:
                m.stats.executed(rows)
            call.resolve_error(worker_error(m, msg))
            return outcome(call)
        if not isinstance(msg, wire.Response):
            m.stats.executed(call.rows)
            call.resolve_error(ProtocolError(f"a {type(msg).__name__} message for a request"))
            return outcome(call)
        release = self.hub.release  # type: ignore[union-attr]

        def slot(d: wire.TensorDesc) -> torch.Tensor:
            assert arena is not None
            end = d.where + d.nbytes
            if end > arena.size:
                raise ProtocolError(f"output slot [{d.where}, {end}) lies outside the response arena")
            tensor, owner = tensor_io.as_tensor(arena[d.where : end], DTYPES[d.dtype], d.shape)
            weakref.finalize(owner, release, key, d.where).atexit = False
            return tensor

        try:
            outputs = tensor_io.read(msg.tensors, msg.blobs, frames, slot)
        except Exception as e:  # a reply we cannot rebuild fails its request
            arena = None  # (as above; ``slot`` reads the same variable)
            if rows:
                m.stats.executed(rows)
            call.resolve_error(e if isinstance(e, ProtocolError) else ProtocolError(f"unreadable reply: {e!r}"))
            return outcome(call)
        binder = m.binder
        assert binder is not None
        result = dict(zip(binder.output_names(len(outputs)), outputs))
        if binder.reshapes:
            result = binder.shape_outputs(result)
        m.stats.succeeded((call,) if counted is None else counted, call.sent_ns, time.perf_counter_ns(), execution=rows)
        return result

    def read_orphans(self) -> None:
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
            rows = getattr(msg, "batch", 0)
            w = self._lanes.get(key)
            if rows and w is not None:  # (its batch's execution: counted with this reply)
                w.model.stats.executed(rows)
            if isinstance(msg, wire.Response):
                for d in msg.tensors:
                    if d.kind == wire.ARENA:
                        self.hub.release(key, d.where)

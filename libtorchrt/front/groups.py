"""An event loop's requests to one batching model, sent as one (front).

Every asyncio caller whose request the hub batches (``front/fastlane.py``) runs the same
Python for it: encode a header, a ticket, a mailbox entry, decode a reply, rebuild its
outputs and count it. With dozens of tasks in one loop, that per-request share is what
bounds a batching model's throughput, not the model. So the requests that the loop's
tasks make in one turn of the loop, for one model and one batch key (input dtypes and
non-batch dimensions), join a :class:`Group`; when the turn ends (or the next request
would overfill it), the group goes to the hub as **one request** of all its members'
rows, their inputs joined in order (:func:`joined_request`). To the hub and the worker
it is an ordinary request of that many rows: the hub still batches it with others up to
``max_batch_size`` by the model's rules, and the worker runs it as it would any request.
Its outputs come back as one reply, and each member gets a view of its own rows
(:func:`split_outputs`); the response slot goes back once the last view is gone.

Only inputs that travel inline (in the header) are joined: a request with arena or
frame inputs, or a string tensor, goes on its own. A member whose caller stops waiting
(cancelled, or its deadline) leaves a group not yet sent; once sent, the group is
abandoned only when none of its members still waits, and its rows run for those who do.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..errors import PoolClosedError, ProtocolError
from ..transport import lanes, wire
from ..transport import tensors as tensor_io
from ..transport.dtypes import STRING
from .call import Call
from .settling import BY_ROUTER, deadline_passed, expired, outcome

if TYPE_CHECKING:
    from .fastlane import FastLane, _Mailbox
    from .records import _Model

__all__ = ["Group", "LoopGroups", "groupable", "joined_request", "split_outputs"]


def groupable(call: Call) -> bool:
    """Whether ``call``'s inputs can be joined with others': every one inline in its
    header, none a string tensor, and its outputs not reshaped by the model's config."""
    binder = call.model.binder
    if binder is None or binder.reshapes or call.frames or call.offsets:
        return False
    return all(d.kind == wire.BLOB and d.dtype != STRING and d.shape for d in call.descs)


class Group:
    """Requests of one loop turn to one model and batch key: its members in order (each
    call with its caller's asyncio future), their rows and inline bytes; once sent, the
    ticket of its one request and the call that carries it."""

    __slots__ = ("carrier", "key", "members", "model", "nbytes", "rows", "ticket", "timer")

    def __init__(self, model: _Model, key: int) -> None:
        self.model = model
        self.key = key
        self.members: list[tuple[Call, asyncio.Future[Any]]] = []
        self.rows = 0
        self.nbytes = 0
        self.ticket: Any = None
        self.carrier: Call | None = None
        #: the loop's timer for the earliest deadline of its members (once sent)
        self.timer: asyncio.TimerHandle | None = None

    def add(self, call: Call, waiter: asyncio.Future[Any], nbytes: int) -> None:
        self.members.append((call, waiter))
        self.rows += call.rows
        self.nbytes += nbytes

    def remove(self, call: Call) -> None:
        """Take ``call`` out (before the group is sent)."""
        for i, (c, _) in enumerate(self.members):
            if c is call:
                del self.members[i]
                self.rows -= call.rows
                self.nbytes -= sum(map(len, call.blobs))
                return

    def drop_done(self) -> None:
        """Take out (and free) the members whose callers stopped waiting."""
        if all(not w.done() for _, w in self.members):
            return
        for c, w in self.members:
            if w.done():
                c.free()
        self.members = [(c, w) for c, w in self.members if not w.done()]
        self.rows = sum(c.rows for c, _ in self.members)
        self.nbytes = sum(sum(map(len, c.blobs)) for c, _ in self.members)

    def earliest(self) -> float | None:
        """The earliest deadline of the members still waiting (None: none has one)."""
        deadlines = [c.deadline for c, w in self.members if c.deadline is not None and not w.done()]
        return min(deadlines) if deadlines else None


def joined_request(request_id: int, g: Group) -> wire.Request:
    """One request of all ``g``'s rows: each input's blobs joined in member order, its
    batch dimension the group's rows (a group of one is its member's own request)."""
    members = g.members
    first = members[0][0]
    if len(members) == 1:
        return wire.Request(request_id, first.descs, [], first.blobs)
    descs = []
    blobs = []
    for i, d in enumerate(first.descs):
        descs.append(wire.tensor_desc(d.dtype, (g.rows, *d.shape[1:]), wire.BLOB, i))
        blobs.append(b"".join([c.blobs[c.descs[i].where] for c, _ in members]))
    return wire.Request(request_id, descs, [], blobs)


def split_outputs(outputs: dict[str, Any], rows: list[int]) -> list[dict[str, Any]]:
    """Each member's outputs, in member order: its ``rows`` of each of the group's
    ``outputs`` (views of a tensor, slices of a list of strings).

    Raises:
        ProtocolError: an output without one row per row of the group.
    """
    if len(rows) == 1:
        return [outputs]
    parts = {name: _parts(name, value, rows) for name, value in outputs.items()}
    if len(parts) == 1:
        [(name, each)] = parts.items()
        return [{name: part} for part in each]
    return [{name: p[k] for name, p in parts.items()} for k in range(len(rows))]


def _parts(name: str, value: Any, rows: list[int]) -> Sequence[Any]:
    """One output of a group cut into its members' ``rows``."""
    total = sum(rows)
    if isinstance(value, torch.Tensor):
        if value.dim() and value.shape[0] == total:
            return value.split_with_sizes(rows)  # (Tensor.split is a Python wrapper around it)
        got = f"shape {list(value.shape)}"
    elif isinstance(value, list):  # (strings)
        if len(value) == total:
            out, at = [], 0
            for n in rows:
                out.append(value[at : at + n])
                at += n
            return out
        got = f"{len(value)} strings"
    else:
        got = type(value).__name__
    raise ProtocolError(f"output {name!r} of a request of {total} rows: {got}, not one row per row")


class LoopGroups:
    """The groups of every event loop that uses ``lane`` (the loop's thread runs all
    of it): a request joins its loop's open group, the group goes to the hub when the
    turn ends, and its reply is split among its members."""

    def __init__(self, lane: FastLane) -> None:
        self.lane = lane

    async def join(self, call: Call, box: _Mailbox, loop: asyncio.AbstractEventLoop) -> dict[str, torch.Tensor]:
        """Run ``call`` as a member of its loop's open group for its model and batch key
        (``front/groups.py``): the group goes to the hub when the loop's turn ends, or
        at once when ``call`` would overfill it."""
        if expired(call):
            return outcome(call)
        m = call.model
        key = self.lane.hub_key(call)
        size = sum(map(len, call.blobs))
        g = box.open.get((m, key))
        if g is not None and (g.rows + call.rows > m.cfg.max_batch_size or g.nbytes + size > self.lane.max_blobs):
            del box.open[(m, key)]
            self._send(box, g)
            g = None
        if g is None:
            g = box.open[(m, key)] = Group(m, key)
            if not box.flush_scheduled:
                box.flush_scheduled = True
                loop.call_soon(self.flush, box)
        waiter: asyncio.Future[Any] = loop.create_future()
        g.add(call, waiter, size)
        try:
            result = await waiter
        except asyncio.CancelledError:
            self._leave(box, g, call)
            raise
        if result is BY_ROUTER:  # (handed over: its future tells the rest)
            return await asyncio.wrap_future(call.future, loop=loop)  # type: ignore[arg-type]
        return result

    def flush(self, box: _Mailbox) -> None:
        """The loop's turn ended: send its open groups."""
        box.flush_scheduled = False
        groups = list(box.open.values())
        box.open.clear()
        for g in groups:
            self._send(box, g)

    def _send(self, box: _Mailbox, g: Group) -> None:
        """Send ``g`` to the hub as one request of its members' rows (its members go by
        the router if the hub does not take it)."""
        assert self.lane.hub is not None
        g.drop_done()  # (cancelled, or past their deadline, in the turn they were made)
        if not g.members:
            return
        if self.lane.hub.orphaned:
            self.lane.read_orphans()
        m = g.model
        next_id = self.lane.router.next_id
        gid = next_id()
        for c, _ in g.members:
            c.id = next_id()
        header = wire.encode(joined_request(gid, g))
        ticket = (
            self.lane.hub.submit(m.lane, gid, header, box.id, g.rows, g.key)
            if m.lane >= 0 and len(header) <= lanes.MAX_REQUEST and not self.lane.closed
            else None
        )
        if ticket is None:
            self._hand_over(g, lanes.RETRY, 0)
            return
        now = time.perf_counter_ns()
        g.carrier = Call(m, tensor_io.Placed([], [], [], []))
        g.carrier.id, g.carrier.rows, g.carrier.sent_ns = gid, g.rows, now
        g.carrier.warmup = True  # (no caller of its own: its members are counted, not it)
        g.ticket = ticket
        for c, _ in g.members:
            c.dispatched = True
            c.sent_ns = now
        box.sent[gid] = g
        self._arm(box, g)

    def _arm(self, box: _Mailbox, g: Group) -> None:
        """Time out ``g``'s members at the earliest deadline of those still waiting
        (one timer a group, not one a member)."""
        earliest = g.earliest()
        if earliest is None:
            g.timer = None
        else:
            g.timer = box.loop.call_later(earliest - time.monotonic(), self._expire, box, g)

    def _expire(self, box: _Mailbox, g: Group) -> None:
        """Fail the members of ``g`` whose deadline passed (they leave it), then wait
        for the next deadline."""
        now = time.monotonic()
        for c, w in g.members:
            if not w.done() and c.deadline is not None and c.deadline <= now:
                exc = deadline_passed(c)
                c.resolve_error(exc)
                w.set_exception(exc)
                self._leave(box, g, c)
        self._arm(box, g)

    def settle(self, g: Group) -> None:
        """``g``'s ticket finished: each member still waiting gets its rows of the
        outputs, or the error, or goes to the router or the supervisor."""
        if g.timer is not None:
            g.timer.cancel()
        state, key, reply = g.ticket.wait(0.0)
        carrier = g.carrier
        assert carrier is not None
        if state == lanes.DONE:
            live = [c for c, w in g.members if not w.done()]
            try:
                outputs = self.lane.answer(carrier, key, reply, live)
            except BaseException as e:
                self._fail(g, e)
                return
            if outputs is not BY_ROUTER:
                members = g.members
                try:
                    results = split_outputs(outputs, [c.rows for c, _ in members])
                except ProtocolError as e:  # (each member fails: none waits forever)
                    self._fail(g, e)
                    return
                for (c, w), result in zip(members, results):
                    c.free()
                    if not w.done():
                        w.set_result(result)
                return
            state = lanes.RETRY
        self._hand_over(g, state, key)

    @staticmethod
    def _fail(g: Group, exc: BaseException) -> None:
        """Every member of ``g`` still waiting fails with ``exc``."""
        for c, w in g.members:
            c.free()
            if not w.done():
                c.resolve_error(exc)
                w.set_exception(exc)

    def _hand_over(self, g: Group, state: int, key: int) -> None:
        for c, w in g.members:
            if w.done():
                c.free()
                continue
            self.lane.hand_over(c, state, key)
            w.set_result(BY_ROUTER)

    def _leave(self, box: _Mailbox, g: Group, call: Call) -> None:
        """``call``'s caller stopped waiting: it leaves a group not sent yet; a group
        sent is abandoned once none of its members waits (it still runs if one does)."""
        carrier = g.carrier
        if carrier is None:
            g.remove(call)
            call.free()
            return
        if all(w.done() for _, w in g.members) and box.sent.pop(carrier.id, None) is not None:
            if self.lane.abandon(carrier, g.ticket):
                for c, _ in g.members:
                    c.free()
            else:  # (it finished meanwhile: read now, not when the loop drains its mailbox,
                # which a loop about to close may never do, and a pool's close waits for it)
                self.settle(g)

    def drop(self, box: _Mailbox) -> None:
        """``box``'s loop was closed: nobody will read its groups' replies (see
        ``FastLane.drop_closed_loops``)."""
        for g in box.open.values():
            for c, _ in g.members:
                c.free()
        box.open.clear()
        for g in box.sent.values():
            assert g.carrier is not None
            self.lane.drop(g.carrier, g.ticket)
            for c, _ in g.members:
                c.free()
        box.sent.clear()

    def close(self, box: _Mailbox) -> None:
        """The pool closed: the members of ``box``'s groups still waiting fail."""
        for g in box.sent.values():
            if g.timer is not None:
                g.timer.cancel()
            for c, w in g.members:
                if not w.done():
                    w.set_exception(PoolClosedError("the pool was closed before this request completed"))
                c.free()
        box.sent.clear()

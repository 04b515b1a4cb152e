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
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..transport import wire
from ..transport.dtypes import STRING

if TYPE_CHECKING:
    from .call import Call
    from .records import _Model

__all__ = ["Group", "groupable", "joined_request", "split_outputs"]


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

    def calls(self) -> Iterator[Call]:
        return (c for c, _ in self.members)


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


def split_outputs(outputs: dict[str, torch.Tensor], rows: Sequence[int]) -> list[dict[str, torch.Tensor]]:
    """Each member's outputs: views of its ``rows`` of the group's ``outputs``, in
    member order."""
    if len(rows) == 1:
        return [outputs]
    parts = {name: t.split(list(rows)) for name, t in outputs.items()}
    return [{name: p[k] for name, p in parts.items()} for k in range(len(rows))]

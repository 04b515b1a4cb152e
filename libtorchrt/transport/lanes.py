"""The fast lane's transport: a native hub over one socket pair per CPU worker (Linux).

The hub (``_lanes.c``, built at install) owns the front's end of every lane and one
thread that never takes the GIL. A caller thread hands it a request datagram; the hub
sends it at once to the model's least-busy lane, or queues it; its thread reads each
reply, wakes the one caller waiting for it (a futex) and sends that lane the next queued
request. So a request crosses two thread hand-offs in the front (caller → worker, and
the hub's thread → caller), and no Python runs for it outside the caller's thread.

:class:`Hub` methods (thread-safe; lanes are named by the caller's ``key``, never reused)::

    Hub(awake=2, grace_us=1000, spin_us=0)  gate -> {held, granted, given_back, lapsed, offs, on}
    add_model(max_rows=0, delay_us=0, preferred=()) -> mid        drop_model(mid)
    add_lane(mid, fd, limit, key)           pause_lane(key)        remove_lane(key)
    request(mid, id, header, box=-1, rows=1, batch_key=0) -> Ticket   (placed by its first wait(), without the GIL)
    submit(mid, id, header, box=-1, rows=1, batch_key=0) -> Ticket | None   (placed now; None: no lane takes it)
    release(key, offset)                    complete(key, id, reply) -> bool
    pending() -> int    counts(key) -> (in flight, served)    queued(mid) -> int (not sent yet)
    orphans()    orphaned    thread_id (its thread's native id)    close()
    add_mailbox() -> (box, eventfd)    drain(box) -> [request ids]    remove_mailbox(box)

``Ticket.wait(timeout=None)`` returns ``(state, key, reply)``: :data:`DONE` with the
reply's bytes; :data:`LOST`, the worker died while it may have been running it;
:data:`RETRY`, it did not run (its worker died before it, or the model has no lane left);
:data:`CLOSED`; 0, the timeout passed (then ``Ticket.abandon()``: 1, taken back before it
was sent; 2, sent: its reply will be one of ``orphans()``; 0, it finished meanwhile). A
ticket submitted with a mailbox wakes nobody: its id is listed by ``drain(box)``, and the
mailbox's eventfd becomes readable.

**The wake-up gate.** A batch's replies come together; waking all their caller threads
at once would have them all wait for the GIL, handing it around at every torch call of
theirs (a convoy that lasts as long as they queue for it). So the hub wakes at most
``awake`` of the callers of batch replies at a time, and holds the other wakes in order;
a caller gives its *grant* back when it comes back with its next request (the next held
caller wakes then), and a grant not given back within ``grace_us`` lapses, its place
going to the next. Callers that do not come back soon (a server thread that answers its
client and waits for the next) would then be woken one a grace: when most of a 20 ms
window's grants lapse, the gate wakes everyone it holds and stays off for 500 ms before
it tries again. A caller that finds its reply finished before it sleeps takes it at
once, and so does one whose wait's timeout runs out. Replies to single requests, to
mailboxes, failures and a closing hub are never held.
``awake=0``: no gate. Measured in docs/measurements/wake-gate.md.

**Busy polling.** A thread asleep on its ticket wakes up slowly when the hub's thread
wakes it. With ``spin_us``, a caller whose request is the only one in flight, with none
queued, polls its ticket that long (at most until its timeout, or until another request
is sent) before it sleeps; one caller polls at a time. With more requests in flight,
polling would take CPU from the callers and workers that make progress.

A model added with ``max_rows`` batches dynamically, as ``front/batcher.py``'s Batcher
does with one queue: its requests (``rows`` each; only those of equal ``batch_key`` are merged)
wait in the hub, and leave as one ``wire.Batch`` message when they fill ``max_rows``
(or the next does not fit), make up a ``preferred`` size exactly, or the oldest has waited
``delay_us`` (the hub's timerfd). A batch goes to an idle lane; a full one also to a lane
that runs one (``limit`` counts sends, a batch being one). The worker answers with
``wire.Replies``, one reply per request; if the worker dies, the whole oldest send is LOST.

The datagrams are ``wire``'s (the hub reads only a reply's request id, and writes only
``Release`` and ``Batch`` messages, the latter joining request datagrams unread), so a
worker reads its lane as it reads its channel.
"""

from __future__ import annotations

import socket
import sys

from .channel import _BUFFER

try:
    from ._lanes import (
        CLOSED,
        DONE,
        LOST,
        MAX_AWAKE,
        MAX_BATCH,
        MAX_DATAGRAM,
        MAX_LIMIT,
        MAX_REQUEST,
        MAX_SPIN_US,
        RETRY,
        Hub,
        Ticket,
    )
except ImportError:  # (not Linux, or built without it: every request goes by the router)
    if sys.platform.startswith("linux"):
        import warnings

        warnings.warn(
            "libtorchrt's native fast lane (libtorchrt/transport/_lanes.c) is not built: requests go by the "
            "router thread; reinstall with a C compiler to build it",
            RuntimeWarning,
            stacklevel=2,
        )
    Hub = Ticket = None  # type: ignore[assignment,misc]
    CLOSED, DONE, LOST, RETRY = 6, 3, 4, 5
    MAX_DATAGRAM, MAX_LIMIT, MAX_BATCH, MAX_AWAKE = 48 << 10, 64, 4096, 16
    MAX_REQUEST = MAX_DATAGRAM - 10
    MAX_SPIN_US = 1_000_000

__all__ = [
    "CLOSED",
    "DONE",
    "LOST",
    "MAX_AWAKE",
    "MAX_BATCH",
    "MAX_DATAGRAM",
    "MAX_LIMIT",
    "MAX_REQUEST",
    "MAX_SPIN_US",
    "RETRY",
    "Hub",
    "Ticket",
    "available",
    "pair",
]


#: whether the native hub is built here
available = Hub is not None


def pair() -> tuple[socket.socket, socket.socket]:
    """A new lane: the front's end (for :meth:`Hub.add_lane`, by ``detach()``) and the
    worker's (to pass to it, then close in the front)."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (mine, theirs):
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            s.setsockopt(socket.SOL_SOCKET, option, _BUFFER)
    mine.setblocking(False)
    return mine, theirs

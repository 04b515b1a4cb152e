"""One thread owns the sockets: how other threads reach it, and how it waits.

Three threads in libtorchrt are built the same way -- the pool's router, a client's
I/O thread and the ZeroMQ frontend of a server. Each is the only user of its sockets;
other threads hand it work through an :class:`Inbox` and wake it with a
:class:`Waker`; it keeps its timers in :class:`Deadlines` and waits on everything at
once in a :class:`Loop`. Nothing here knows about models or requests.

* :class:`Waker` -- an eventfd any thread may bump, ordered against its close (a write
  to a closed, possibly reused descriptor number would write into someone else's file).
* :class:`Inbox` -- a deque other threads append to. The owner says when it may be
  about to sleep; a producer wakes it only then, and only one producer pays for the
  syscall. Under load the owner is awake and producers take no lock at all.
* :class:`Deadlines` -- a heap of ``(when, key)`` whose entries may become moot before
  they are due (a request answered long before its deadline). Moot entries never
  decide a wake-up: they are dropped when they reach the top, and swept out when they
  pile up, so the heap stays as small as what is live.
* :class:`Loop` -- a ``zmq.Poller`` with one handler per socket or descriptor, called
  in the order they were watched; every wait is capped by :func:`~..deadlines.poll_ms`.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import os
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import zmq

from ..deadlines import poll_ms

__all__ = ["Deadlines", "Inbox", "Loop", "Waker"]

T = TypeVar("T")
K = TypeVar("K")

#: Deadlines' heap is swept of moot entries when it reaches this size (or twice the
#: live entries found by the last sweep, whichever is more).
SWEEP_AT = 1024


class Waker:
    """An eventfd the owning thread polls and any thread may bump."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def wake(self) -> bool:
        """Wake the owner (any thread). False, and nothing written, once closed."""
        with self._lock:
            if self.fd < 0:
                return False
            os.eventfd_write(self.fd, 1)
            return True

    def clear(self) -> None:
        """Reset the counter (the owner, after poll reported it readable)."""
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass

    def close(self) -> None:
        """Close the eventfd (idempotent); later :meth:`wake` calls do nothing."""
        with self._lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


class Inbox(Generic[T]):
    """Items for the owning thread, from any thread, with as few wake-ups as it takes.

    The owner calls :meth:`may_sleep` right before it blocks: it publishes that it may
    be asleep and then looks at the inbox, so either it sees an item appended
    meanwhile or the producer sees the flag and wakes it. After its poll it calls
    :meth:`woke` (it reads the eventfd, so the next producer wakes it again), then
    :meth:`take` or iterates :attr:`items`.
    """

    def __init__(self, waker: Waker | None = None) -> None:
        self.waker = waker if waker is not None else Waker()
        self.items: collections.deque[T] = collections.deque()
        self.closed = False
        self._idle = True  # the owner may be blocked in poll
        self._waking = False  # a producer has woken it since it last looked

    def __len__(self) -> int:
        return len(self.items)

    def __bool__(self) -> bool:
        return bool(self.items)

    def put(self, item: T) -> bool:
        """Hand ``item`` to the owner (any thread).

        Returns False, with the item not taken, when the inbox was closed before the
        owner could see it; the caller then answers it itself.
        """
        if self.closed:
            return False
        self.items.append(item)
        if self._idle and not self._waking:
            # One wake-up is enough: the others see _waking and skip the syscall.
            self._waking = True
            self.waker.wake()
        if self.closed:  # closed meanwhile: the owner's last sweep may be past
            try:
                self.items.remove(item)
            except ValueError:
                return True  # the owner took it, and answers it
            return False
        return True

    def wake(self) -> None:
        """Wake the owner without an item (e.g. to make it look at a flag)."""
        self.waker.wake()

    def may_sleep(self) -> bool:
        """The owner is about to block: True if nothing is waiting (owner only)."""
        self._idle = True
        return not self.items

    def woke(self, readable: bool) -> None:
        """The owner is back from its poll; ``readable``: the eventfd fired."""
        self._idle = False
        if readable:
            self._waking = False
            self.waker.clear()

    def take(self) -> list[T]:
        """Everything waiting, in the order it came (owner only)."""
        items = self.items
        out = []
        while items:
            out.append(items.popleft())
        return out

    def close(self) -> list[T]:
        """Refuse further items and return those still waiting (owner, at the end);
        the eventfd is closed too."""
        self.closed = True
        self.waker.close()
        return self.take()


class Deadlines(Generic[K]):
    """Timers keyed by anything, some of which may become moot before they are due.

    Args:
        live: whether a key's timer still has something to do; asked of the earliest
            timer before it decides a wake-up, and of every timer in a sweep.
    """

    def __init__(self, live: Callable[[K], bool]) -> None:
        self._live = live
        self._heap: list[tuple[float, int, K]] = []
        self._seq = itertools.count()
        self._sweep_at = SWEEP_AT

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, when: float, key: K) -> None:
        heap = self._heap
        if len(heap) >= self._sweep_at:
            live = self._live
            heap[:] = [entry for entry in heap if live(entry[2])]
            heapq.heapify(heap)
            self._sweep_at = max(SWEEP_AT, 2 * len(heap))
        heapq.heappush(heap, (when, next(self._seq), key))

    def next(self) -> float | None:
        """When the earliest live timer is due (moot ones above it are dropped)."""
        heap, live = self._heap, self._live
        while heap and not live(heap[0][2]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def due(self, now: float) -> list[K]:
        """Remove and return the keys due by ``now`` (moot ones are dropped)."""
        heap, live = self._heap, self._live
        out = []
        while heap and heap[0][0] <= now:
            key = heapq.heappop(heap)[2]
            if live(key):
                out.append(key)
        return out


class Loop:
    """Wait on sockets and descriptors together; call each one's handler.

    Handlers run in the order their targets were first watched, so an owner can say
    what comes first (replies before a disconnection that would fail them).
    """

    def __init__(self) -> None:
        self.poller = zmq.Poller()
        self._handlers: dict[Any, tuple[int, Callable[[], None]]] = {}
        self._order = itertools.count()

    def watch(self, target: Any, handler: Callable[[], None]) -> None:
        """Call ``handler()`` whenever ``target`` (a zmq socket or a descriptor) is readable."""
        self.poller.register(target, zmq.POLLIN)
        known = self._handlers.get(target)
        self._handlers[target] = (next(self._order) if known is None else known[0], handler)

    def unwatch(self, target: Any) -> None:
        if self._handlers.pop(target, None) is not None:
            self.poller.unregister(target)

    def watching(self, target: Any) -> bool:
        return target in self._handlers

    def poll(self, wait_s: float | None) -> list[Any]:
        """Block until a target is readable or ``wait_s`` passed (None: no limit);
        return the readable targets in handler order."""
        events = self.poller.poll(poll_ms(wait_s))
        handlers = self._handlers
        if len(events) > 1:
            events.sort(key=lambda event: handlers[event[0]][0] if event[0] in handlers else -1)
        return [target for target, _ in events]

    def wait(self, wait_s: float | None, inbox: Inbox[Any]) -> list[Any]:
        """:meth:`poll` for an owner with an :class:`Inbox` whose waker fd it watches.

        It does not sleep while items wait; it tells the inbox it woke; and it counts
        the waker as readable whenever items wait, although producers do not wake an
        owner that is awake, so that the inbox's handler runs, in its place in the
        watch order, on every turn that has something for it.
        """
        if not inbox.may_sleep():
            wait_s = 0.0
        ready = self.poll(wait_s)
        fd = inbox.waker.fd
        fired = fd in ready
        inbox.woke(fired)
        if not fired and inbox.items and fd in self._handlers:
            ready.append(fd)
            if len(ready) > 1:
                handlers = self._handlers
                ready.sort(key=lambda target: handlers[target][0] if target in handlers else -1)
        return ready

    def dispatch(self, targets: list[Any]) -> None:
        """Call the handlers of ``targets`` (a handler may unwatch a later target)."""
        handlers = self._handlers
        for target in targets:
            entry = handlers.get(target)
            if entry is not None:
                entry[1]()

"""How many bytes of large inputs ``Pool.infer`` and ``infer_async`` callers may have
copied ahead (front, any thread).

An input of more than the inline threshold is copied into the model's request arena when
the request is admitted, and the worker reads it there when it runs the request. With
more callers than instances, most of those copies wait in the queue, and with inputs of
megabytes, a copy made early is out of the CPU's caches by the time the worker reads it:
the caller wrote it to memory, the worker reads it back, and both pay. One model's
:class:`CopyGate` bounds the bytes that its callers have copied and not had answered
(``Pool(max_inflight_bytes=...)``, per instance); a caller that would pass it waits for
room before it copies. Two requests an instance always go, however large: one running
and the next one ready, so a worker does not wait for a caller to wake up and copy
(docs/benchmarks.md, "Large inputs and outputs", has the figures). ``infer`` callers
wait in their thread, ``infer_async`` callers in their event loop
(:meth:`CopyGate.acquire_async`). ``submit``'s callers are neither held back (``submit``
does not block) nor counted.

The gate is released by the caller itself when its ``infer`` returns, however it
returns, so a waiting caller never depends on anybody but other callers that are already
past it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable

from ..errors import PoolClosedError, TimeoutError

__all__ = ["CopyGate"]


class _Waiter:
    __slots__ = ("granted", "nbytes", "wake")

    def __init__(self, nbytes: int, wake: Callable[[], object]) -> None:
        self.nbytes = nbytes
        #: called (under the gate's lock) when the waiter gets in or the gate closes
        self.wake = wake
        self.granted = False


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _waker(loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> Callable[[], None]:
    def wake() -> None:
        try:
            loop.call_soon_threadsafe(_settle, future)
        except RuntimeError:  # (its loop is closed: nobody waits any more)
            pass

    return wake


class CopyGate:
    """A bound on the bytes one model's callers have copied ahead.

    Waiters queue in order, and a release hands the room to them directly, first come
    first served: only a waiter that gets in is woken (a thread on a lock of its own, a
    task by its event loop).
    """

    def __init__(self, model: str, budget: int, free_requests: int = 1) -> None:
        self.model = model
        self.budget = budget
        #: requests let in whatever their bytes (two an instance: one running, one ready)
        self.free_requests = free_requests
        #: bytes admitted and not released, and by how many requests
        self.held = 0
        self.count = 0
        self._closed = False
        self._lock = threading.Lock()
        #: the waiting callers, in order
        self._waiting: deque[_Waiter] = deque()

    @property
    def idle(self) -> bool:
        """Nobody holds or waits for room."""
        return not self.count and not self._waiting

    @property
    def waiting(self) -> int:
        """Callers waiting to get in (they count as pending requests)."""
        return len(self._waiting)

    def acquire(self, nbytes: int, deadline: float | None) -> None:
        """Count ``nbytes``, after waiting while others hold so much that they would pass
        the budget (or wait before us).

        Raises:
            TimeoutError: the deadline (monotonic) passed while waiting.
            PoolClosedError: the pool closed while waiting.
        """
        lock = threading.Lock()
        lock.acquire()
        me = self._enter(nbytes, lock.release)
        if me is None:
            return
        lock.acquire(timeout=-1.0 if deadline is None else max(0.0, deadline - time.monotonic()))
        self._leave(me)

    async def acquire_async(self, nbytes: int, deadline: float | None) -> None:
        """:meth:`acquire` for a task of an event loop, which it does not block.

        Raises:
            as :meth:`acquire`; CancelledError: the task was cancelled while waiting
            (it holds nothing then).
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        me = self._enter(nbytes, _waker(loop, future))
        if me is None:
            return
        try:
            if deadline is None:
                await future
            else:
                await asyncio.wait_for(asyncio.shield(future), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            pass  # (_leave says which)
        except asyncio.CancelledError:
            with self._lock:
                if me.granted:
                    self._give_back(nbytes)
                elif me in self._waiting:
                    self._waiting.remove(me)
                    self._admit()
            raise
        self._leave(me)

    def release(self, nbytes: int) -> None:
        """Give back what :meth:`acquire` counted, and let the next callers in."""
        with self._lock:
            self._give_back(nbytes)

    def close(self) -> None:
        """Wake every waiting caller with :class:`PoolClosedError`."""
        with self._lock:
            self._closed = True
            waiting, self._waiting = self._waiting, deque()
            for waiter in waiting:
                waiter.wake()

    def _enter(self, nbytes: int, wake: Callable[[], object]) -> _Waiter | None:
        """Count ``nbytes`` at once (None), or queue a waiter that ``wake`` wakes.

        Raises:
            PoolClosedError: the gate is closed and ``nbytes`` do not fit.
        """
        with self._lock:
            if not self._waiting and self._fits(nbytes):
                self.held += nbytes
                self.count += 1
                return None
            if self._closed:
                raise PoolClosedError("the pool is closed")
            me = _Waiter(nbytes, wake)
            self._waiting.append(me)
            return me

    def _leave(self, me: _Waiter) -> None:
        """After a waiter woke or gave up: return if it got in, else raise why not."""
        with self._lock:
            if me.granted:
                return
            if me in self._waiting:  # (timed out; a close empties the queue itself)
                self._waiting.remove(me)
                self._admit()  # (the next one may fit now that we do not wait first)
            if self._closed:
                raise PoolClosedError("the pool is closed")
        raise TimeoutError(
            f"model {self.model!r}: the request's timeout passed while it waited for room to copy its inputs "
            f"({self.held} bytes of other requests in flight; Pool(max_inflight_bytes=...))"
        )

    def _give_back(self, nbytes: int) -> None:
        self.held -= nbytes
        self.count -= 1
        self._admit()

    def _fits(self, nbytes: int) -> bool:
        return self.count < self.free_requests or self.held + nbytes <= self.budget

    def _admit(self) -> None:
        """Let in the waiters at the head of the queue that fit (under the lock)."""
        while self._waiting:
            waiter = self._waiting[0]
            if not self._fits(waiter.nbytes):
                return
            self._waiting.popleft()
            self.held += waiter.nbytes
            self.count += 1
            waiter.granted = True
            waiter.wake()

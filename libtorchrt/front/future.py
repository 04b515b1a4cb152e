"""The future a caller of :meth:`Pool.submit` waits on, and how asyncio callers wake.

A ``concurrent.futures.Future`` in every respect (``wait``, ``as_completed``,
callbacks, ``asyncio.wrap_future`` work as usual), except how ``result()`` and
``exception()`` wait: on one lock, held from creation until the future is done, rather
than on the base class's condition variable. Waiting on the condition costs a fresh lock
per wait, Python-level bookkeeping on both sides, and a second blocking acquire once
woken (the resolving thread still holds the condition); with dozens of caller threads
resolved one batch at a time, that was a large share of the front's cost per request
(docs/batching.md).

An asyncio caller (:meth:`Pool.infer_async`) waits on an asyncio future instead, settled
in its event loop by a :class:`LoopWaker`: one loop wake-up (one ``call_soon_threadsafe``)
for all the requests that finished together, such as a batch's, where
``asyncio.wrap_future`` costs a wake-up, two callbacks and three lock round trips per
request. Its request carries a :class:`LoopFuture` rather than a ``RequestFuture``: only
the router and the awaiting coroutine ever hold it, so it needs none of the locks that
make a ``RequestFuture`` safe to share (A/B, 64 asyncio callers with batching: 6-17%
more requests per second).
"""

from __future__ import annotations

import _thread
import asyncio
import collections
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError
from concurrent.futures import TimeoutError as FuturesTimeoutError
from concurrent.futures._base import (
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    LOGGER,
    PENDING,
    RUNNING,
)
from typing import Any, TypeVar, cast

__all__ = ["LoopFuture", "LoopWaker", "RequestFuture"]

T = TypeVar("T")

#: the base class's result of a future resolved with :meth:`RequestFuture.set_result_by`
_DEFERRED: Any = object()
_CANCELLED = frozenset((CANCELLED, CANCELLED_AND_NOTIFIED))
_DONE = frozenset((CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED))


class RequestFuture(Future[T]):
    """A future whose waiters block on one lock, released when it is done.

    It keeps the base class's state in the base class's attributes (``_state``,
    ``_result``, ``_exception``, ``_waiters``, ``_done_callbacks``), which
    ``concurrent.futures.wait`` and ``as_completed`` read under ``_condition``; that
    condition is made only if something asks for it, over the same lock that guards
    every change of state here (the base class makes a ``threading.Condition``, a
    Python object over an RLock, for every future).
    """

    # Defaults read from the class until set (fewer assignments per request).
    _cond: threading.Condition | None = None
    _result: Any = None
    _exception: BaseException | None = None
    _make: Callable[[], T] | None = None
    _made: T | None = None
    #: the waker of an event loop awaiting it: none (see LoopFuture)
    waker: LoopWaker | None = None

    def __init__(self) -> None:  # (not Future.__init__: see the class docstring)
        self._mutex = _thread.allocate_lock()
        self._finished = _thread.allocate_lock()
        self._finished.acquire()
        self._state = PENDING
        self._waiters: list[Any] = []
        self._done_callbacks: list[Callable[[Future[T]], object]] = []

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        cond = self._cond
        if cond is None:  # (two made at once would be alike: both over _mutex)
            cond = self._cond = threading.Condition(self._mutex)
        return cond

    # ── reading it ─────────────────────────────────────────────────────────────

    def cancelled(self) -> bool:
        return self._state in _CANCELLED

    def running(self) -> bool:
        return self._state == RUNNING

    def done(self) -> bool:
        return self._state in _DONE

    def _wait(self, timeout: float | None) -> str:
        """Wait until done or ``timeout``; the state then."""
        # Acquire and hand straight back: every waiter (there may be several) passes.
        if self._state not in _DONE and self._finished.acquire(True, -1 if timeout is None else max(0.0, timeout)):
            self._finished.release()
        return self._state

    def result(self, timeout: float | None = None) -> T:
        state = self._wait(timeout)
        if state == FINISHED:
            if self._exception is not None:
                raise self._exception
            value = self._result
            return self._build() if value is _DEFERRED else value
        if state in _CANCELLED:
            raise CancelledError()
        raise FuturesTimeoutError()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        state = self._wait(timeout)
        if state == FINISHED:
            if self._make is not None:  # a deferred value: whether it can be made tells
                try:
                    self._build()
                except BaseException:
                    pass
            return self._exception
        if state in _CANCELLED:
            raise CancelledError()
        raise FuturesTimeoutError()

    def _build(self) -> T:
        """The deferred value, made once; if making it fails, that is the future's
        exception from then on."""
        with self._mutex:
            make = self._make
            if make is not None:
                self._make = None
                try:
                    self._made = make()
                except BaseException as e:
                    self._exception = e
            if self._exception is not None:
                raise self._exception
            return cast(T, self._made)

    def add_done_callback(self, fn: Callable[[Future[T]], object]) -> None:
        with self._mutex:
            if self._state not in _DONE:
                self._done_callbacks.append(fn)
                return
        try:
            fn(self)
        except Exception:
            LOGGER.exception("exception calling callback for %r", self)

    # ── changing it ────────────────────────────────────────────────────────────

    def cancel(self) -> bool:
        with self._mutex:
            state = self._state
            if state in (RUNNING, FINISHED):
                return False
            if state in _CANCELLED:
                return True
            self._state = CANCELLED
        self._done()
        return True

    def set_running_or_notify_cancel(self) -> bool:
        with self._mutex:
            if self._state == CANCELLED:
                self._state = CANCELLED_AND_NOTIFIED
                for waiter in self._waiters:
                    waiter.add_cancelled(self)
                return False
            if self._state == PENDING:
                self._state = RUNNING
                return True
            raise RuntimeError(f"Future in unexpected state: {self._state}")

    def set_result(self, result: T) -> None:
        self._finish(result, None)

    def set_result_by(self, make: Callable[[], T]) -> None:
        """Resolve the future with the value ``make()`` returns, called by the first
        thread that reads the result (the caller's, usually, rather than the
        resolving one)."""
        self._finish(_DEFERRED, make)

    def _finish(self, result: Any, make: Callable[[], T] | None) -> None:
        with self._mutex:
            state = self._state
            if state not in _DONE:
                self._result = result
                self._make = make
                self._state = FINISHED
                for waiter in self._waiters:
                    waiter.add_result(self)
        if state in _DONE:  # (repr takes the lock: not under it)
            raise InvalidStateError(f"{state}: {self!r}")
        self._done()

    def set_exception(self, exception: BaseException | None) -> None:
        with self._mutex:
            state = self._state
            if state not in _DONE:
                self._exception = exception
                self._state = FINISHED
                for waiter in self._waiters:
                    waiter.add_exception(self)
        if state in _DONE:
            raise InvalidStateError(f"{state}: {self!r}")
        self._done()

    def _done(self) -> None:
        self._finished.release()
        for fn in self._done_callbacks:
            try:
                fn(self)
            except Exception:
                LOGGER.exception("exception calling callback for %r", self)


class LoopFuture:
    """The future of one :meth:`Pool.infer_async` request, as the router sees it: it
    settles an asyncio future in that future's loop (through the loop's
    :class:`LoopWaker`) and does nothing else, so it needs no lock.

    Nobody but the router and the awaiting coroutine ever holds it: no other thread
    waits on it or adds callbacks to it. The router is the only thread that finishes
    it; the coroutine may cancel it while it is queued (``cancel``, in the loop's
    thread). Those two can race only between a queued request's dispatch and its
    cancellation, and either outcome is sound: the awaiting task is cancelled all the
    same, and a result nobody awaits is dropped.
    """

    __slots__ = ("_exception", "_make", "_result", "_state", "_waiter", "_waker")

    def __init__(self, waker: LoopWaker, waiter: asyncio.Future[Any]) -> None:
        self._waker = waker
        self._waiter = waiter
        self._state = PENDING
        self._result: Any = None
        self._make: Callable[[], Any] | None = None
        self._exception: BaseException | None = None

    @property
    def waker(self) -> LoopWaker:
        return self._waker

    def done(self) -> bool:
        return self._state in _DONE

    def cancelled(self) -> bool:
        return self._state in _CANCELLED

    def running(self) -> bool:
        return self._state == RUNNING

    def cancel(self) -> bool:
        """Cancel the request if it has not been sent to a worker (loop thread)."""
        if self._state != PENDING:
            return self._state in _CANCELLED
        self._state = CANCELLED
        return True

    def set_running_or_notify_cancel(self) -> bool:
        state = self._state
        if state == PENDING:
            self._state = RUNNING
            return True
        if state in _CANCELLED:
            self._state = CANCELLED_AND_NOTIFIED
            return False
        raise RuntimeError(f"Future in unexpected state: {state}")  # (as concurrent.futures)

    def set_result(self, result: Any) -> None:
        self._finish(result, None, None)

    def set_result_by(self, make: Callable[[], Any]) -> None:
        """As :meth:`RequestFuture.set_result_by`: ``make()`` runs in the loop."""
        self._finish(None, make, None)

    def set_exception(self, exception: BaseException | None) -> None:
        self._finish(None, None, exception)

    def _finish(self, result: Any, make: Callable[[], Any] | None, exception: BaseException | None) -> None:
        if self._state in _DONE:
            raise InvalidStateError(f"{self._state}: {self!r}")
        self._result, self._make, self._exception = result, make, exception
        self._state = FINISHED
        self._waker.add(self)

    def settle(self) -> None:
        """Give the asyncio waiter the outcome (in the waiter's loop)."""
        waiter = self._waiter
        if waiter.done():
            return
        if self._state != FINISHED:
            waiter.cancel()
            return
        exc = self._exception
        if exc is None:
            make = self._make
            try:
                value = make() if make is not None else self._result
            except BaseException as e:  # building its outputs failed
                exc = e
            else:
                waiter.set_result(value)
                return
        waiter.set_exception(exc)


class LoopWaker:
    """Settles the asyncio waiters of one event loop whose futures finished in other
    threads, waking the loop once per burst rather than once per future."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._ready: collections.deque[LoopFuture] = collections.deque()
        self._scheduled = False

    def add(self, future: LoopFuture) -> None:
        """Queue ``future`` to be settled (any thread)."""
        self._ready.append(future)
        if not self._scheduled:
            # Cleared by _drain before it looks at the queue: it sees this future, or
            # we see the flag down and schedule another drain.
            self._scheduled = True
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed: nobody awaits these any more
                self._ready.clear()

    def _drain(self) -> None:
        self._scheduled = False
        ready = self._ready
        while ready:
            ready.popleft().settle()

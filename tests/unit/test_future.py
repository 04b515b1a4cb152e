"""RequestFuture behaves as a concurrent.futures.Future (waiting, timeouts, errors,
cancelling, wait/as_completed/callbacks, wrap_future), resolves lazily with
set_result_by, and settles asyncio waiters through a LoopWaker (threads, no pool)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

from libtorchrt.front.future import LoopFuture, LoopWaker, RequestFuture

T = TypeVar("T")
WAIT = 5.0  # seconds anything that should happen at once may take


def in_thread(fn: Callable[[], T], timeout: float = WAIT) -> T:
    """``fn()`` run in another thread: its value, or its exception raised here; fails
    (rather than hangs) if it does not return within ``timeout``."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(("value", fn()))
        except BaseException as e:
            out.append(("error", e))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{fn} did not return within {timeout} s"
    kind, value = out[0]
    if kind == "error":
        raise value
    result: T = value
    return result


def later(delay: float, fn: Callable[..., Any], *args: Any) -> threading.Thread:
    """Call ``fn(*args)`` from another thread after ``delay`` seconds."""
    t = threading.Timer(delay, fn, args)
    t.daemon = True
    t.start()
    return t


def run_async(coro: Coroutine[Any, Any, T], timeout: float = WAIT) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


# ══════════════════════════════════════════════════════════ as a concurrent future


def test_result_waits_for_a_result_set_in_another_thread() -> None:
    """result() blocks until another thread sets the result, then returns it."""
    f: RequestFuture[str] = RequestFuture()
    later(0.1, f.set_result, "value")
    start = time.monotonic()
    assert not f.done()
    assert f.result(WAIT) == "value"
    assert 0.05 < time.monotonic() - start < WAIT
    assert f.done() and not f.cancelled() and f.exception(0) is None
    assert f.result() == "value" and f.result(0) == "value"  # and again, at once


def test_every_waiting_thread_is_woken() -> None:
    """Several threads blocked in result() (and exception()) all get the outcome."""
    f: RequestFuture[int] = RequestFuture()
    got: list[Any] = []
    lock = threading.Lock()

    def wait(kind: str) -> None:
        value = f.result(WAIT) if kind == "result" else f.exception(WAIT)
        with lock:
            got.append((kind, value))

    threads = [threading.Thread(target=wait, args=("result" if i % 2 else "exception",)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    assert not got
    f.set_result(7)
    for t in threads:
        t.join(WAIT)
    assert sorted(got, key=repr) == sorted([("result", 7)] * 4 + [("exception", None)] * 4, key=repr)


@pytest.mark.parametrize("method", ["result", "exception"])
def test_waiting_times_out_when_not_done(method: str) -> None:
    """result(timeout) and exception(timeout) raise concurrent.futures.TimeoutError
    after about ``timeout`` when the future is not done; timeout=0 at once."""
    f: RequestFuture[int] = RequestFuture()
    start = time.monotonic()
    with pytest.raises(concurrent.futures.TimeoutError):
        getattr(f, method)(0.2)
    assert 0.15 < time.monotonic() - start < 2.0
    with pytest.raises(concurrent.futures.TimeoutError):
        getattr(f, method)(0)
    f.set_result(1)  # still usable afterwards
    assert getattr(f, method)(0) == (1 if method == "result" else None)


def test_set_exception_reaches_every_reader() -> None:
    """An exception set in another thread is raised by result() and returned by
    exception(): the very object."""
    f: RequestFuture[int] = RequestFuture()
    error = ValueError("bad request")
    later(0.05, f.set_exception, error)
    with pytest.raises(ValueError) as info:
        f.result(WAIT)
    assert info.value is error
    assert f.exception(0) is error and f.done() and not f.cancelled()


def test_cancel_before_done() -> None:
    """cancel() of a pending future returns True and wakes a blocked reader with
    CancelledError; cancelling again also returns True; the router's
    set_running_or_notify_cancel() then says False."""
    f: RequestFuture[int] = RequestFuture()
    blocked: list[BaseException] = []

    def reader() -> None:
        try:
            f.result(WAIT)
        except BaseException as e:
            blocked.append(e)

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.05)
    assert f.cancel() is True
    t.join(WAIT)
    assert len(blocked) == 1 and isinstance(blocked[0], concurrent.futures.CancelledError)
    assert f.cancelled() and f.done() and not f.running()
    with pytest.raises(concurrent.futures.CancelledError):
        f.result(0)
    with pytest.raises(concurrent.futures.CancelledError):
        f.exception(0)
    assert in_thread(f.cancel) is True
    assert f.set_running_or_notify_cancel() is False
    assert f.cancel() is True and f.cancelled()


def test_cancel_fails_once_running_or_done() -> None:
    """A future marked running, or already resolved, cannot be cancelled."""
    running: RequestFuture[int] = RequestFuture()
    assert running.set_running_or_notify_cancel() is True
    assert running.running()
    assert running.cancel() is False and not running.cancelled()
    running.set_result(3)
    assert running.result(0) == 3
    done: RequestFuture[int] = RequestFuture()
    done.set_result(4)
    assert done.cancel() is False and done.result(0) == 4


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("set_result", "set_result"),
        ("set_result", "set_exception"),
        ("set_exception", "set_result"),
        ("cancel", "set_result"),
        ("set_result_by", "set_result_by"),
    ],
)
def test_resolving_a_done_future_raises_and_keeps_the_first_outcome(first: str, second: str) -> None:
    """A second resolution raises InvalidStateError (and does not hang) and the first
    outcome stands."""
    f: RequestFuture[str] = RequestFuture()

    def resolve(how: str, tag: str) -> None:
        if how == "set_result":
            f.set_result(tag)
        elif how == "set_exception":
            f.set_exception(RuntimeError(tag))
        elif how == "set_result_by":
            f.set_result_by(lambda: tag)
        else:
            assert f.cancel()

    resolve(first, "first")
    with pytest.raises(concurrent.futures.InvalidStateError):
        in_thread(lambda: resolve(second, "second"), 2.0)
    if first == "cancel":
        assert f.cancelled()
    elif first == "set_exception":
        assert str(in_thread(lambda: f.exception(0))) == "first"
    else:
        assert in_thread(lambda: f.result(0)) == "first"


def test_concurrent_futures_wait_works_with_it() -> None:
    """concurrent.futures.wait: FIRST_COMPLETED returns once one is resolved in
    another thread, a timeout leaves the rest not done, ALL_COMPLETED waits for all,
    FIRST_EXCEPTION stops at an error (each call fails, rather than hangs, if it
    does not return)."""
    fs: list[RequestFuture[int]] = [RequestFuture() for _ in range(4)]

    def wait(timeout: float, return_when: str = concurrent.futures.ALL_COMPLETED) -> Any:
        return in_thread(lambda: concurrent.futures.wait(fs, timeout, return_when))

    later(0.05, fs[2].set_result, 2)
    done, not_done = wait(WAIT, concurrent.futures.FIRST_COMPLETED)
    assert done == {fs[2]} and not_done == {fs[0], fs[1], fs[3]}
    done, not_done = wait(0.05)
    assert done == {fs[2]} and len(not_done) == 3
    later(0.05, fs[0].set_exception, KeyError("k"))
    done, not_done = wait(WAIT, concurrent.futures.FIRST_EXCEPTION)
    assert done == {fs[0], fs[2]}
    later(0.02, fs[1].set_result, 1)
    later(0.06, fs[3].set_result, 3)
    done, not_done = wait(WAIT)
    assert done == set(fs) and not not_done


def test_as_completed_yields_in_completion_order() -> None:
    """as_completed yields futures as other threads resolve them, and the ones
    already done first."""
    fs: list[RequestFuture[int]] = [RequestFuture() for _ in range(5)]
    fs[4].set_result(4)
    for delay, i in ((0.05, 1), (0.10, 3), (0.15, 0), (0.20, 2)):
        later(delay, fs[i].set_result, i)
    pending: list[concurrent.futures.Future[int]] = list(fs)
    order = in_thread(lambda: [f.result(0) for f in concurrent.futures.as_completed(pending, timeout=WAIT)], WAIT + 1)
    assert order == [4, 1, 3, 0, 2]


def test_done_callbacks_run_once_with_the_future() -> None:
    """Callbacks run once each when the future resolves (even if one raises), with the
    future as argument; one added afterwards runs at once; cancel runs them too."""
    f: RequestFuture[int] = RequestFuture()
    calls: list[tuple[str, Any]] = []

    def bad(fut: Any) -> None:
        raise RuntimeError("callback failure must not stop the others")

    f.add_done_callback(lambda fut: calls.append(("a", fut)))
    f.add_done_callback(bad)
    f.add_done_callback(lambda fut: calls.append(("b", fut.result(0))))
    assert not calls
    in_thread(lambda: f.set_result(9))
    assert calls == [("a", f), ("b", 9)]
    f.add_done_callback(lambda fut: calls.append(("late", fut.result(0))))
    assert calls[-1] == ("late", 9) and len(calls) == 3
    c: RequestFuture[int] = RequestFuture()
    seen: list[bool] = []
    c.add_done_callback(lambda fut: seen.append(fut.cancelled()))
    c.cancel()
    c.cancel()
    assert seen == [True]


def test_asyncio_wrap_future_works_with_it() -> None:
    """asyncio.wrap_future gets results (plain and lazy), exceptions and
    cancellations set in another thread."""

    async def main() -> None:
        plain: RequestFuture[int] = RequestFuture()
        later(0.02, plain.set_result, 5)
        assert await asyncio.wrap_future(plain) == 5
        lazy: RequestFuture[list[int]] = RequestFuture()
        later(0.02, lazy.set_result_by, lambda: [1, 2])
        assert await asyncio.wrap_future(lazy) == [1, 2]
        failed: RequestFuture[int] = RequestFuture()
        later(0.02, failed.set_exception, KeyError("x"))
        with pytest.raises(KeyError):
            await asyncio.wrap_future(failed)
        cancelled: RequestFuture[int] = RequestFuture()
        later(0.02, cancelled.cancel)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wrap_future(cancelled)

    run_async(main())


# ═════════════════════════════════════════════════════════════════ set_result_by


def test_set_result_by_builds_the_value_once_in_a_reading_thread() -> None:
    """make() is not called by the resolving thread but by the first reader, once;
    every reader gets the same object."""
    f: RequestFuture[dict[str, int]] = RequestFuture()
    made_in: list[threading.Thread] = []

    def make() -> dict[str, int]:
        made_in.append(threading.current_thread())
        time.sleep(0.05)  # a second reader arrives while it is being built
        return {"x": 1}

    resolver = threading.Thread(target=f.set_result_by, args=(make,))
    resolver.start()
    resolver.join(WAIT)
    assert f.done() and not made_in
    got: dict[threading.Thread, Any] = {}

    def read() -> None:
        got[threading.current_thread()] = f.result(WAIT)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers:
        t.start()
    for t in readers:
        t.join(WAIT)
    assert len(made_in) == 1 and made_in[0] in readers
    a, b = got.values()
    assert a is b and a == {"x": 1}
    assert f.result(0) is a and len(made_in) == 1


def test_set_result_by_wakes_a_blocked_reader() -> None:
    """A reader blocked in result() before set_result_by gets the built value."""
    f: RequestFuture[str] = RequestFuture()
    later(0.05, f.set_result_by, lambda: "built")
    assert f.result(WAIT) == "built"


def test_a_make_that_raises_fails_the_reader() -> None:
    """If make() raises, the reader's result() raises that exception."""
    f: RequestFuture[int] = RequestFuture()
    error = ValueError("could not build the outputs")

    def make() -> int:
        raise error

    f.set_result_by(make)
    with pytest.raises(ValueError) as info:
        in_thread(lambda: f.result(WAIT))
    assert info.value is error


def test_a_make_that_raises_reaches_a_wrap_future_awaiter() -> None:
    """asyncio.wrap_future's awaiter of a future whose make() raises gets the error
    (rather than waiting forever)."""

    def make() -> int:
        raise ValueError("could not build the outputs")

    async def main() -> None:
        f: RequestFuture[int] = RequestFuture()
        waiter = asyncio.wrap_future(f)
        later(0.02, f.set_result_by, make)
        with pytest.raises(ValueError, match="could not build"):
            await asyncio.wait_for(waiter, 2.0)

    run_async(main())


# ═══════════════════════════════════════════════ asyncio: LoopFuture and LoopWaker


def _awaited(waker: LoopWaker) -> tuple[LoopFuture, Coroutine[Any, Any, Any]]:
    """A LoopFuture as Pool.infer_async makes one, and the awaiting of its waiter."""
    waiter: asyncio.Future[Any] = waker.loop.create_future()
    return LoopFuture(waker, waiter), asyncio.wait_for(waiter, WAIT)


def test_a_loop_future_settles_its_waiter_in_the_loop() -> None:
    """LoopFuture (infer_async's): finished by another thread with a value, a value
    built in the loop's thread, an error; cancelled while queued (the router then
    learns it must not send it); not cancelled once running (its result still
    arrives)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        waker = LoopWaker(loop)
        waiters: list[asyncio.Future[Any]] = [loop.create_future() for _ in range(5)]
        futures = [LoopFuture(waker, w) for w in waiters]
        built_in: list[int] = []

        def make() -> str:
            built_in.append(threading.get_ident())
            return "built"

        later(0.02, futures[0].set_result, 7)
        later(0.02, futures[1].set_result_by, make)
        later(0.02, futures[2].set_exception, KeyError("failed"))
        assert await asyncio.wait_for(waiters[0], WAIT) == 7
        assert await asyncio.wait_for(waiters[1], WAIT) == "built"
        assert built_in == [threading.get_ident()]
        with pytest.raises(KeyError, match="failed"):
            await asyncio.wait_for(waiters[2], WAIT)
        assert all(f.done() and not f.cancelled() for f in futures[:3])

        queued, running = futures[3], futures[4]
        assert queued.cancel() and queued.cancelled() and queued.done()
        assert not queued.set_running_or_notify_cancel()  # the router drops it
        assert running.set_running_or_notify_cancel() and running.running()
        assert not running.cancel()
        later(0.02, running.set_result, "late")
        assert await asyncio.wait_for(waiters[4], WAIT) == "late"
        with pytest.raises(concurrent.futures.InvalidStateError):
            running.set_result("twice")
        with pytest.raises(RuntimeError, match="unexpected state"):
            running.set_running_or_notify_cancel()  # finished: as a concurrent future

    run_async(main())


def test_a_burst_from_many_threads_settles_every_awaiter() -> None:
    """A thousand futures resolved at once by several threads (as routers of several
    pools would): every awaiter gets its own value, with one loop wake-up per burst."""
    n, nthreads = 1000, 4

    async def main() -> list[int]:
        waker = LoopWaker(asyncio.get_running_loop())
        pairs = [_awaited(waker) for _ in range(n)]
        tasks = [asyncio.ensure_future(awaiting) for _, awaiting in pairs]

        def resolve(k: int) -> None:
            for i in range(k, n, nthreads):
                if i % 3:
                    pairs[i][0].set_result(i)
                else:
                    pairs[i][0].set_result_by(functools.partial(int, i))

        threads = [threading.Thread(target=resolve, args=(k,)) for k in range(nthreads)]
        for t in threads:
            t.start()
        out = await asyncio.gather(*tasks)
        for t in threads:
            t.join(WAIT)
        return out

    assert run_async(main(), timeout=30) == list(range(n))


def test_exceptions_reach_the_awaiter() -> None:
    """set_exception, and a set_result_by whose make() raises, fail the awaiter with
    that exception."""

    async def main() -> None:
        waker = LoopWaker(asyncio.get_running_loop())
        failed, awaiting = _awaited(waker)
        error = ValueError("model failed")
        later(0.02, failed.set_exception, error)
        with pytest.raises(ValueError) as info:
            await awaiting
        assert info.value is error

        def make() -> int:
            raise LookupError("outputs could not be built")

        lazy, awaiting = _awaited(waker)
        later(0.02, lazy.set_result_by, make)
        with pytest.raises(LookupError, match="could not be built"):
            await awaiting

    run_async(main())


def test_a_waiter_already_cancelled_is_left_alone() -> None:
    """If the awaiting task is cancelled first, resolving the future later reports
    nothing to the loop and the loop keeps settling other waiters."""
    errors: list[dict[str, Any]] = []

    async def main() -> int:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda loop, context: errors.append(context))
        waker = LoopWaker(loop)
        f, awaiting = _awaited(waker)
        task = asyncio.ensure_future(awaiting)
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert f.set_running_or_notify_cancel()  # (it was sent before the cancel)
        in_thread(lambda: f.set_result(1))
        other, awaiting = _awaited(waker)
        later(0.02, other.set_result, 2)
        value = await awaiting
        await asyncio.sleep(0.02)
        return value

    assert run_async(main()) == 2
    assert not errors, errors


def test_a_closed_loop_does_not_make_resolving_raise() -> None:
    """Futures whose waiters belong to a closed loop still resolve without error for
    the resolving thread (the router's): nobody awaits them any more."""
    loop = asyncio.new_event_loop()
    waker = LoopWaker(loop)
    f = LoopFuture(waker, loop.create_future())
    g = LoopFuture(waker, loop.create_future())
    loop.close()
    in_thread(lambda: f.set_result(1))
    in_thread(lambda: g.set_exception(KeyError("late")))
    assert f.done() and g.done()

"""resolve_in_turn: a batch's futures resolved together, their blocked threads woken one
after another. Whatever the waiters do (wait, time out, wait twice, not wait at all),
every future's value reaches every reader and no thread is left blocked."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from libtorchrt._future import RequestFuture, resolve_in_turn

WAIT = 10.0


def _blocked(futures: list[RequestFuture[Any]], per_future: int = 1, timeout: float | None = None) -> tuple:
    """Threads blocked in result() on each future (daemons: one never woken fails the
    test in _join, rather than hanging it); their outcomes by future index."""
    out: dict[int, list[Any]] = {i: [] for i in range(len(futures))}
    lock = threading.Lock()

    def wait(i: int) -> None:
        try:
            value: Any = futures[i].result(timeout)
        except BaseException as e:  # recorded, and asserted on by the test
            value = e
        with lock:
            out[i].append(value)

    threads = [
        threading.Thread(target=wait, args=(i,), daemon=True) for i in range(len(futures)) for _ in range(per_future)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + (WAIT if timeout is None else timeout / 2)
    while time.monotonic() < deadline:  # until each thread is asleep in result() or
        with lock:  # has its answer (or for half its timeout)
            answered = sum(len(v) for v in out.values())
        if sum(f._sleepers for f in futures) + answered >= len(threads):
            break
        time.sleep(0.002)
    return threads, out


def _join(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads), "a waiter was never woken"


def test_every_blocked_waiter_gets_its_own_value() -> None:
    futures: list[RequestFuture[Any]] = [RequestFuture() for _ in range(40)]
    threads, out = _blocked(futures)
    assert resolve_in_turn([(f, lambda i=i: ("value", i)) for i, f in enumerate(futures)]) == [True] * 40
    _join(threads)
    assert out == {i: [("value", i)] for i in range(40)}


def test_several_waiters_on_one_future_and_none_on_others() -> None:
    """Futures nobody waits on are passed over; a future with three waiters wakes all
    three, and the chain goes on after them."""
    futures: list[RequestFuture[Any]] = [RequestFuture() for _ in range(6)]
    waited = [futures[1], futures[4]]
    threads, out = _blocked(waited, per_future=3)
    resolve_in_turn([(f, lambda i=i: i) for i, f in enumerate(futures)])
    _join(threads)
    assert out == {0: [1, 1, 1], 1: [4, 4, 4]}
    assert [f.result(0) for f in futures] == list(range(6))


def test_a_waiter_that_timed_out_does_not_stop_the_chain() -> None:
    """The first future's waiter gave up before the batch was resolved; those after it
    are still woken."""
    futures: list[RequestFuture[Any]] = [RequestFuture() for _ in range(5)]
    early, early_out = _blocked(futures[:1], timeout=0.05)
    _join(early)
    assert isinstance(early_out[0][0], TimeoutError)
    threads, out = _blocked(futures[1:])
    resolve_in_turn([(f, lambda i=i: i) for i, f in enumerate(futures)])
    _join(threads)
    assert out == {0: [1], 1: [2], 2: [3], 3: [4]}


def test_a_waiter_timing_out_while_handed_the_turn_passes_it_on() -> None:
    """Waiters whose timeouts fall while the chain reaches them still pass it on (each
    got the value or a TimeoutError, and none is left blocked)."""
    for _ in range(20):
        futures: list[RequestFuture[Any]] = [RequestFuture() for _ in range(8)]
        threads, out = _blocked(futures, timeout=0.02)
        time.sleep(0.015)
        resolve_in_turn([(f, lambda i=i: i) for i, f in enumerate(futures)])
        _join(threads)
        for i, got in out.items():
            assert got == [i] or isinstance(got[0], TimeoutError)
        late, late_out = _blocked(futures)  # and the values are there for anyone after
        _join(late)
        assert late_out == {i: [i] for i in range(8)}


def test_futures_already_done_are_skipped_and_keep_their_outcome() -> None:
    futures: list[RequestFuture[Any]] = [RequestFuture() for _ in range(3)]
    assert futures[1].cancel()
    threads, out = _blocked([futures[0], futures[2]])
    assert resolve_in_turn([(f, lambda i=i: i) for i, f in enumerate(futures)]) == [True, False, True]
    _join(threads)
    assert out == {0: [0], 1: [2]}
    assert futures[1].cancelled()


def test_a_value_that_cannot_be_made_fails_its_reader_only() -> None:
    futures: list[RequestFuture[Any]] = [RequestFuture() for _ in range(3)]
    threads, out = _blocked(futures)

    def broken() -> Any:
        raise ValueError("cannot make it")

    resolve_in_turn([(futures[0], lambda: 0), (futures[1], broken), (futures[2], lambda: 2)])
    _join(threads)
    assert out[0] == [0] and out[2] == [2]
    assert isinstance(out[1][0], ValueError)
    with pytest.raises(ValueError):
        futures[1].result(0)
    assert isinstance(futures[1].exception(0), ValueError)

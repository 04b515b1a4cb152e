"""``transport.loop``: the waker, inbox, deadlines and loop that every socket-owning
thread is built on -- with real eventfds, real ZeroMQ sockets and real threads."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from libtorchrt.transport import loop as loop_module
from libtorchrt.transport.loop import Deadlines, Inbox, Loop, Waker
from tests.conftest import wait_for

#: poll(2) and ppoll(2) on x86-64, ppoll(2) on arm64 (which has no poll)
_POLL_SYSCALLS = {"7", "271", "73"}


def _in_poll(thread: threading.Thread) -> bool:
    """Whether ``thread`` is blocked in poll(2) now (the kernel says where it sleeps)."""
    task = f"/proc/self/task/{thread.native_id}"
    try:
        with open(f"{task}/wchan") as f:
            if "poll" in f.read():
                return True
        with open(f"{task}/syscall") as f:
            return f.read().split()[0] in _POLL_SYSCALLS
    except (OSError, IndexError):
        return False


def _readable(fd: int) -> bool:
    poller = zmq.Poller()
    poller.register(fd, zmq.POLLIN)
    return bool(poller.poll(0))


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket, zmq.Socket]]:
    """Two connected PAIR sockets: what one sends, the other can read."""
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.linger = b.linger = 0
    a.bind("inproc://test-loop")
    b.connect("inproc://test-loop")
    yield a, b
    a.close()
    b.close()
    ctx.term()


# ── Waker ──────────────────────────────────────────────────────────────────────


def test_a_waker_makes_its_fd_readable_until_cleared() -> None:
    waker = Waker()
    try:
        assert not _readable(waker.fd)
        assert waker.wake() and waker.wake()
        assert _readable(waker.fd)
        waker.clear()
        assert not _readable(waker.fd)
        waker.clear()  # nothing to clear: no error
    finally:
        waker.close()


def test_a_closed_waker_writes_nothing_and_closes_once() -> None:
    waker = Waker()
    fd = waker.fd
    waker.close()
    assert waker.closed and waker.fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)  # the descriptor is gone
    # A descriptor number reused since (here: at once) is never written to.
    reused = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        assert not waker.wake()
        waker.close()  # idempotent: does not close the reused number
        os.fstat(reused)
        assert not _readable(reused)
    finally:
        os.close(reused)


# ── Inbox ──────────────────────────────────────────────────────────────────────


def test_an_inbox_wakes_a_sleeping_owner_once_for_many_puts() -> None:
    inbox: Inbox[int] = Inbox()
    try:
        inbox.woke(False)  # the owner is awake: puts do not write
        for i in range(10):
            assert inbox.put(i)
        assert not _readable(inbox.waker.fd)
        assert not inbox.may_sleep()  # it would sleep, but items wait: it takes them
        assert inbox.take() == list(range(10))
        assert inbox.may_sleep()  # now it is about to block
        threads = [threading.Thread(target=lambda k=k: [inbox.put(k * 250 + i) for i in range(250)]) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert len(inbox) == 1000
        # one write for 1000 items from 4 threads: the counter says how many were made
        assert os.eventfd_read(inbox.waker.fd) == 1
        inbox.woke(True)
        items = inbox.take()
        assert sorted(items) == list(range(1000)) and not inbox
        for k in range(4):  # each producer's items in its order
            mine = [i for i in items if i // 250 == k]
            assert mine == sorted(mine)
    finally:
        inbox.close()


def test_an_inbox_wakes_a_thread_blocked_in_the_loop_and_not_again_while_it_is_awake() -> None:
    inbox: Inbox[int] = Inbox()
    loop = Loop()
    loop.watch(inbox.waker.fd, lambda: None)
    woken: list[Any] = []
    owner = threading.Thread(target=lambda: woken.append(loop.wait(30, inbox)))
    try:
        owner.start()
        wait_for(lambda: _in_poll(owner), 10, "the owner to block in poll")
        started = time.monotonic()
        assert inbox.put(1)
        owner.join(10)
        assert not owner.is_alive() and time.monotonic() - started < 5
        assert woken == [[inbox.waker.fd]]
        # The owner is awake (it has not asked to sleep again): nobody writes.
        for i in range(2, 1002):
            assert inbox.put(i)
        assert not _readable(inbox.waker.fd)
        # Items wait, so the loop does not sleep, and reports the inbox ready although
        # its eventfd did not fire.
        started = time.monotonic()
        assert loop.wait(30, inbox) == [inbox.waker.fd]
        assert time.monotonic() - started < 5
        assert inbox.take() == list(range(1, 1002))
        # Nothing waits, nothing fired: a wait is a wait.
        assert loop.wait(0.05, inbox) == []
        # And the next sleep is woken again, by the next put.
        woken.clear()
        owner = threading.Thread(target=lambda: woken.append(loop.wait(30, inbox)))
        owner.start()
        wait_for(lambda: _in_poll(owner), 10, "the owner to block in poll again")
        assert inbox.put(0)
        owner.join(10)
        assert woken == [[inbox.waker.fd]] and inbox.take() == [0]
    finally:
        owner.join(10)
        inbox.close()


def test_a_put_after_close_returns_false_and_keeps_nothing() -> None:
    inbox: Inbox[str] = Inbox()
    assert inbox.put("a") and inbox.put("b")
    assert inbox.close() == ["a", "b"]  # what waited goes back to the owner, who answers it
    assert inbox.closed and inbox.waker.closed
    assert not inbox.put("c")  # the caller answers it itself
    assert not inbox and inbox.take() == []
    inbox.wake()  # no error, no write
    assert inbox.close() == []


def test_a_put_racing_the_close_is_either_taken_or_refused() -> None:
    """What the owner's close() returns is all it answers: a put that returned True
    must be in it, one that returned False must not (its caller answers it)."""
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: hit the race
    try:
        for _ in range(300):
            inbox: Inbox[int] = Inbox()
            results: list[bool] = []
            go = threading.Event()

            def produce(inbox: Inbox[int] = inbox, results: list[bool] = results, go: threading.Event = go) -> None:
                go.set()
                results.extend(inbox.put(i) for i in range(200))

            producer = threading.Thread(target=produce)
            producer.start()
            go.wait(10)
            taken = inbox.close()
            producer.join(10)
            accepted = [i for i, ok in enumerate(results) if ok]
            assert sorted(taken) == accepted  # nothing lost, nothing twice
            assert not inbox
    finally:
        sys.setswitchinterval(switch)


# ── Deadlines ──────────────────────────────────────────────────────────────────


def test_deadlines_come_due_in_time_order_and_drop_moot_ones() -> None:
    live = {"a", "b", "c", "d"}
    deadlines: Deadlines[str] = Deadlines(live.__contains__)
    assert deadlines.next() is None and deadlines.due(1e9) == []
    for when, key in ((3.0, "c"), (1.0, "a"), (2.0, "b"), (4.0, "d"), (2.0, "b2")):
        deadlines.add(when, key)
    assert deadlines.next() == 1.0
    live.discard("a")  # answered long before its deadline
    assert deadlines.next() == 2.0  # the moot one never decides a wake-up...
    assert len(deadlines) == 4  # ...and is gone from the top
    assert deadlines.due(1.5) == []
    assert deadlines.due(3.0) == ["b", "c"]  # "b2" was never live: dropped, not returned
    assert len(deadlines) == 1 and deadlines.next() == 4.0
    live.clear()
    assert deadlines.next() is None and len(deadlines) == 0


def test_deadlines_with_the_same_time_keep_their_order_and_any_key() -> None:
    deadlines: Deadlines[object] = Deadlines(lambda key: True)
    keys: list[object] = [{"unorderable": 1}, {"unorderable": 2}, 3]
    for key in keys:
        deadlines.add(5.0, key)
    assert deadlines.due(5.0) == keys


def test_deadlines_sweep_moot_entries_when_they_pile_up() -> None:
    live: set[int] = set(range(10))
    deadlines: Deadlines[int] = Deadlines(live.__contains__)
    for i in range(10):
        deadlines.add(1e9 + i, i)  # far: they stay live below the moot ones
    n = loop_module.SWEEP_AT
    for i in range(10, n):
        deadlines.add(float(i), i)  # answered at once: moot (and nobody asks next())
    assert len(deadlines) == n
    deadlines.add(1e9 + n, n)  # the heap is full: sweep first
    live.add(n)
    assert len(deadlines) == 11  # the ten live ones, and the new one
    assert deadlines.next() == 1e9
    assert deadlines.due(2e9) == [*range(10), n]


# ── Loop ───────────────────────────────────────────────────────────────────────


def test_handlers_run_in_watch_order_whatever_became_readable_first(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    a, b = pair
    first, last = Waker(), Waker()
    loop = Loop()
    calls: list[str] = []
    try:
        loop.watch(last.fd, lambda: calls.append("last"))
        loop.watch(b, lambda: calls.append(b.recv().decode()))
        loop.watch(first.fd, lambda: calls.append("first"))
        first.wake()
        a.send(b"socket")
        last.wake()
        deadline = time.monotonic() + 5
        ready: list[Any] = []
        while len(ready) < 3 and time.monotonic() < deadline:  # (inproc delivers at once, or nearly)
            ready = loop.poll(1)
        assert ready == [last.fd, b, first.fd]
        loop.dispatch(ready)
        assert calls == ["last", "socket", "first"]
    finally:
        first.close()
        last.close()


def test_a_handler_may_unwatch_a_later_target(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    a, b = pair
    waker = Waker()
    loop = Loop()
    calls: list[str] = []
    try:

        def on_waker() -> None:
            calls.append("waker")
            loop.unwatch(b)

        loop.watch(waker.fd, on_waker)
        loop.watch(b, lambda: calls.append("socket"))
        waker.wake()
        a.send(b"x")
        deadline = time.monotonic() + 5
        ready: list[Any] = []
        while len(ready) < 2 and time.monotonic() < deadline:
            ready = loop.poll(1)
        loop.dispatch(ready)
        assert calls == ["waker"] and not loop.watching(b)
        assert loop.poll(0) == [waker.fd]  # b is no longer polled (and waker not cleared)
        loop.unwatch(b)  # idempotent
    finally:
        waker.close()


def test_the_inbox_counts_as_ready_in_its_place_when_items_wait(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    a, b = pair
    inbox: Inbox[int] = Inbox()
    loop = Loop()
    calls: list[Any] = []
    try:
        loop.watch(b, lambda: calls.append(b.recv()))
        loop.watch(inbox.waker.fd, lambda: calls.append(inbox.take()))
        inbox.woke(False)  # the owner is awake: a put does not wake it
        inbox.put(7)
        assert not _readable(inbox.waker.fd)
        a.send(b"x")
        assert b.poll(5000)
        ready = loop.wait(30, inbox)  # (at once: an item waits)
        assert ready == [b, inbox.waker.fd]
        loop.dispatch(ready)
        assert calls == [b"x", [7]]
    finally:
        inbox.close()


def test_the_inbox_watched_first_comes_first_although_it_did_not_fire(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    a, b = pair
    inbox: Inbox[int] = Inbox()
    loop = Loop()
    try:
        loop.watch(inbox.waker.fd, lambda: None)
        loop.watch(b, lambda: None)
        inbox.woke(False)
        inbox.put(1)
        a.send(b"x")
        assert b.poll(5000)
        assert loop.wait(30, inbox) == [inbox.waker.fd, b]
    finally:
        inbox.close()


def test_a_wait_without_anything_ready_lasts_its_time() -> None:
    loop = Loop()
    waker = Waker()
    try:
        loop.watch(waker.fd, lambda: None)
        started = time.monotonic()
        assert loop.poll(0.1) == []
        assert 0.09 <= time.monotonic() - started < 5
        assert loop.poll(0) == []
    finally:
        waker.close()

"""The native hub of the fast lane (transport/lanes.py, _lanes.c) on real socket pairs:
each test plays the worker on the other end with ``wire`` messages."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from libtorchrt.transport import lanes, wire
from tests.conftest import wait_for

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.skipif(not lanes.available, reason="the native hub is not built here"),
]


def request(i: int) -> bytes:
    return wire.encode(wire.Request(i, [], [], []))


def answer(i: int, blob: bytes = b"") -> bytes:
    return wire.encode(wire.Response(i, [], [blob]))


@pytest.fixture
def hub() -> Iterator[lanes.Hub]:
    h = lanes.Hub()
    yield h
    h.close()


def lane(hub: lanes.Hub, mid: int, key: int, limit: int = 2) -> socket.socket:
    """A lane of model ``mid``: returns the worker's end."""
    mine, theirs = lanes.pair()
    hub.add_lane(mid, mine.detach(), limit, key)
    theirs.settimeout(5)
    return theirs


def read(worker: socket.socket) -> wire.Message:
    return wire.decode(worker.recv(lanes.MAX_DATAGRAM + 1))


def test_the_hub_thread_blocks_signals_and_leaves_this_thread_s_mask_as_it_was(hub: lanes.Hub) -> None:
    """A signal sent to the process then goes to a thread that runs Python (whose main
    thread runs the handler at once), never to the hub's."""
    import signal

    def hub_threads() -> list[Path]:  # (named by the thread itself, once it runs; other pools' too)
        tasks = Path("/proc/self/task").iterdir()
        return [t for t in tasks if (t / "comm").read_text().strip() == "libtorchrt-hub"]

    wait_for(hub_threads, 10, "the hub's thread to name itself")
    for task in hub_threads():
        status = (task / "status").read_text().splitlines()
        blocked = int(next(line for line in status if line.startswith("SigBlk:")).split()[1], 16)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1):
            assert blocked & (1 << (sig - 1)), signal.Signals(sig).name
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == set()


def test_the_hub_says_which_thread_is_its_own(hub: lanes.Hub) -> None:
    # (known once Hub() returns, named already: Pool(front_cpus=) lets that thread run anywhere)
    task = Path("/proc/self/task") / str(hub.thread_id)
    assert (task / "comm").read_text().strip() == "libtorchrt-hub"
    assert hub.thread_id != threading.get_native_id()


def test_a_request_is_sent_and_its_reply_wakes_its_ticket(hub: lanes.Hub) -> None:
    mid = hub.add_model()
    worker = lane(hub, mid, key=7)
    ticket = hub.submit(mid, 1, request(1))
    msg = read(worker)
    assert isinstance(msg, wire.Request) and msg.id == 1
    assert hub.counts(7)[0] == 1 and hub.pending() == 1
    worker.send(answer(1, b"out"))
    state, key, reply = ticket.wait(5.0)
    assert (state, key) == (lanes.DONE, 7)
    assert wire.decode(reply).blobs == [b"out"]
    assert hub.pending() == 0 and hub.counts(7)[1] == 1


def test_requests_past_the_limit_wait_and_go_in_order_as_replies_free_the_lane(hub: lanes.Hub) -> None:
    mid = hub.add_model()
    worker = lane(hub, mid, key=1, limit=2)
    tickets = [hub.submit(mid, i, request(i)) for i in range(1, 6)]
    assert hub.counts(1)[0] == 2 and hub.pending() == 5
    seen = []
    for _ in range(5):
        msg = read(worker)
        seen.append(msg.id)
        worker.send(answer(msg.id, bytes([msg.id])))
    assert seen == [1, 2, 3, 4, 5]
    for i, t in enumerate(tickets, 1):
        state, _, reply = t.wait(5.0)
        assert state == lanes.DONE and wire.decode(reply).blobs == [bytes([i])]


def test_the_least_busy_lane_gets_the_request(hub: lanes.Hub) -> None:
    mid = hub.add_model()
    a, b = lane(hub, mid, key=1, limit=4), lane(hub, mid, key=2, limit=4)
    hub.submit(mid, 1, request(1))
    hub.submit(mid, 2, request(2))
    hub.submit(mid, 3, request(3))
    assert sorted([hub.counts(1)[0], hub.counts(2)[0]]) == [1, 2]
    assert {read(a).id, read(b).id} <= {1, 2, 3}


def test_a_requested_ticket_is_placed_by_its_wait(hub: lanes.Hub) -> None:
    mid = hub.add_model()
    worker = lane(hub, mid, key=2)
    ticket = hub.request(mid, 4, request(4))
    assert hub.pending() == 0  # (not placed yet)
    replier = threading.Thread(target=lambda: worker.send(answer(read(worker).id, b"ok")))
    replier.start()
    state, key, reply = ticket.wait(5.0)
    replier.join(5)
    assert (state, key, wire.decode(reply).blobs) == (lanes.DONE, 2, [b"ok"])
    # Without a lane to take it, its wait says so at once.
    hub.pause_lane(2)
    assert hub.request(mid, 5, request(5)).wait(5.0)[:2] == (lanes.RETRY, 0)
    assert hub.request(mid, 6, request(6)).abandon() == 1  # (never placed: nothing to undo)


def test_a_model_without_a_lane_is_told_so(hub: lanes.Hub) -> None:
    mid = hub.add_model()
    assert hub.submit(mid, 1, request(1)) is None
    worker = lane(hub, mid, key=3)
    hub.pause_lane(3)
    assert hub.submit(mid, 2, request(2)) is None
    worker.close()


def test_releases_ride_ahead_of_the_next_request_as_a_release_message(hub: lanes.Hub) -> None:
    mid = hub.add_model()
    worker = lane(hub, mid, key=1)
    for offset in (0, 64, 2**40):
        hub.release(1, offset)
    hub.submit(mid, 9, request(9))
    first, second = read(worker), read(worker)
    assert isinstance(first, wire.Release) and first.offsets == [0, 64, 2**40]
    assert isinstance(second, wire.Request) and second.id == 9


def test_a_dead_worker_loses_the_running_request_and_returns_the_others(hub: lanes.Hub) -> None:
    mid = hub.add_model()
    worker = lane(hub, mid, key=5, limit=3)
    tickets = [hub.submit(mid, i, request(i)) for i in range(1, 5)]  # (the 4th waits)
    worker.close()
    states = [t.wait(5.0)[:2] for t in tickets]
    # Only the oldest can have been running; the others never ran; the queued one
    # has no lane left.
    assert states == [(lanes.LOST, 5), (lanes.RETRY, 5), (lanes.RETRY, 5), (lanes.RETRY, 0)]
    assert hub.pending() == 0
    assert hub.submit(mid, 9, request(9)) is None


def test_a_ticket_that_times_out_can_be_abandoned(hub: lanes.Hub) -> None:
    mid = hub.add_model()
    worker = lane(hub, mid, key=1, limit=1)
    sent, queued = hub.submit(mid, 1, request(1)), hub.submit(mid, 2, request(2))
    started = time.monotonic()
    assert sent.wait(0.05)[0] == 0
    assert time.monotonic() - started >= 0.05
    assert queued.abandon() == 1  # taken out: it never ran
    assert sent.abandon() == 2  # sent: its reply becomes an orphan
    assert read(worker).id == 1
    worker.send(answer(1, b"late"))
    deadline = time.monotonic() + 5
    while not hub.orphaned and time.monotonic() < deadline:
        time.sleep(0.005)
    assert [(k, wire.decode(r).id) for k, r in hub.orphans()] == [(1, 1)]
    assert hub.pending() == 0
    worker.settimeout(0.2)
    with pytest.raises(TimeoutError):
        worker.recv(100)  # (the abandoned queued request was never sent)


def test_a_reply_that_came_another_way_completes_its_ticket(hub: lanes.Hub) -> None:
    mid = hub.add_model()
    worker = lane(hub, mid, key=4)
    ticket = hub.submit(mid, 3, request(3))
    read(worker)
    error = wire.encode(wire.Error(3, "RuntimeError", "boom"))
    assert hub.complete(4, 3, error)
    assert not hub.complete(4, 3, error)  # (no longer held)
    state, _, reply = ticket.wait(5.0)
    assert state == lanes.DONE and wire.decode(reply).message == "boom"


def test_close_fails_what_the_hub_holds_and_wakes_waiters(hub: lanes.Hub) -> None:
    mid = hub.add_model()
    worker = lane(hub, mid, key=1, limit=1)  # (kept open: it never answers)
    tickets = [hub.submit(mid, i, request(i)) for i in (1, 2)]
    results: list[int] = []
    waiter = threading.Thread(target=lambda: results.append(tickets[0].wait()[0]))
    waiter.start()
    time.sleep(0.05)
    hub.close()
    waiter.join(5)
    assert results == [lanes.CLOSED]
    assert tickets[1].wait(1.0)[0] == lanes.CLOSED
    with pytest.raises(RuntimeError, match="closed"):
        hub.add_model()
    worker.close()


def test_many_threads_get_their_own_replies(hub: lanes.Hub) -> None:
    mid = hub.add_model()
    workers = [lane(hub, mid, key=k, limit=3) for k in (1, 2)]
    stop = threading.Event()

    def echo(w: socket.socket) -> None:
        w.settimeout(0.1)
        while not stop.is_set():
            try:
                msg = read(w)
            except (TimeoutError, OSError):
                continue
            if isinstance(msg, wire.Request):
                w.send(answer(msg.id, msg.id.to_bytes(8, "little")))

    echoes = [threading.Thread(target=echo, args=(w,)) for w in workers]
    for t in echoes:
        t.start()
    errors: list[str] = []
    ids = iter(range(1, 10**6))
    lock = threading.Lock()

    def caller() -> None:
        for _ in range(200):
            with lock:
                i = next(ids)
            state, _, reply = hub.submit(mid, i, request(i)).wait(5.0)
            if state != lanes.DONE or wire.decode(reply).blobs != [i.to_bytes(8, "little")]:
                errors.append(f"request {i}: {state}")

    callers = [threading.Thread(target=caller) for _ in range(8)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(20)
    stop.set()
    for t in echoes:
        t.join(5)
    assert not errors
    assert hub.counts(1)[1] + hub.counts(2)[1] == 1600 and hub.pending() == 0


def test_a_refused_lane_closes_the_descriptor_it_was_given(hub: lanes.Hub) -> None:
    mid = hub.add_model()
    # (mid, limit, key): key 0; a limit past MAX_LIMIT; no such model
    for model, limit, key in ((mid, 1, 0), (mid, lanes.MAX_LIMIT + 1, 5), (mid + 1, 1, 6)):
        mine, theirs = lanes.pair()
        fd = mine.detach()
        with pytest.raises(ValueError):
            hub.add_lane(model, fd, limit, key)
        with pytest.raises(OSError):
            os.fstat(fd)  # (closed by the hub)
        theirs.close()


def test_a_dropped_models_id_is_never_another_models(hub: lanes.Hub) -> None:
    old = hub.add_model()
    hub.drop_model(old)
    new = hub.add_model()
    worker = lane(hub, new, key=1)
    assert new != old
    # A caller that read the old id before the drop is told to go by the router.
    assert hub.request(old, 1, request(1)).wait(5.0)[0] == lanes.RETRY
    assert hub.counts(1) == (0, 0)
    worker.close()

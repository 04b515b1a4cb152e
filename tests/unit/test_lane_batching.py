"""Dynamic batching in the native hub (transport/_lanes.c) on real socket pairs: each test
plays the worker on the other end, reading ``wire.Batch`` messages and answering with
``wire.Replies``; the batches must leave as the router's Batcher would send them."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator, Sequence

import pytest

from libtorchrt.transport import lanes, wire

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.skipif(not lanes.available, reason="the native hub is not built here"),
]

#: a delay no test comes near: batches leave by their size alone
FOREVER_US = 600_000_000


def request(i: int) -> bytes:
    return wire.encode(wire.Request(i, [], [], []))


@pytest.fixture
def hub() -> Iterator[lanes.Hub]:
    h = lanes.Hub()
    yield h
    h.close()
    _held.clear()


def lane(hub: lanes.Hub, mid: int, key: int, limit: int = 2) -> socket.socket:
    mine, theirs = lanes.pair()
    hub.add_lane(mid, mine.detach(), limit, key)
    theirs.settimeout(5)
    return theirs


#: tickets the tests do not look at again, kept alive (a ticket dropped is abandoned)
_held: list[lanes.Ticket] = []


def submit(hub: lanes.Hub, mid: int, i: int, rows: int = 1, key: int = 1) -> lanes.Ticket:
    ticket = hub.submit(mid, i, request(i), -1, rows, key)
    assert ticket is not None
    _held.append(ticket)
    return ticket


def batch(worker: socket.socket) -> list[int]:
    """The ids of the next batch the worker is sent."""
    msg = wire.decode(worker.recv(lanes.MAX_DATAGRAM + 1))
    assert isinstance(msg, wire.Batch), msg
    return [wire.decode(r).id for r in msg.requests]  # type: ignore[union-attr]


def nothing_sent(worker: socket.socket, wait: float = 0.1) -> bool:
    return not select.select([worker], [], [], wait)[0]


def reply(worker: socket.socket, ids: Sequence[int]) -> None:
    worker.send(wire.encode(wire.Replies([wire.encode(wire.Response(i, [], [bytes([i])])) for i in ids])))


def answered(ticket: lanes.Ticket, i: int) -> bool:
    state, _, data = ticket.wait(5.0)
    return state == lanes.DONE and wire.decode(data).blobs == [bytes([i])]


def test_requests_that_fill_a_batch_leave_together_and_each_gets_its_own_reply(hub: lanes.Hub) -> None:
    mid = hub.add_model(4, FOREVER_US)
    worker = lane(hub, mid, key=1)
    tickets = [submit(hub, mid, i) for i in range(1, 4)]
    assert nothing_sent(worker)  # 3 rows of 4: they wait
    tickets.append(submit(hub, mid, 4))
    assert batch(worker) == [1, 2, 3, 4]
    reply(worker, [3, 1, 4, 2])  # (any order)
    assert all(answered(t, i) for i, t in enumerate(tickets, 1))
    assert hub.pending() == 0 and hub.counts(1) == (0, 4)


def test_a_batch_leaves_when_its_oldest_request_has_waited_the_delay(hub: lanes.Hub) -> None:
    mid = hub.add_model(8, 150_000)
    worker = lane(hub, mid, key=1)
    start = time.monotonic()
    tickets = [submit(hub, mid, i) for i in (1, 2)]
    assert nothing_sent(worker, 0.05)
    assert batch(worker) == [1, 2]
    assert time.monotonic() - start >= 0.14
    reply(worker, [1, 2])
    assert all(answered(t, i) for i, t in zip((1, 2), tickets))


def test_a_delay_of_zero_sends_what_is_queued_at_once(hub: lanes.Hub) -> None:
    mid = hub.add_model(8, 0)
    worker = lane(hub, mid, key=1)
    ticket = submit(hub, mid, 1)
    assert batch(worker) == [1]
    reply(worker, [1])
    assert answered(ticket, 1)


def test_rows_count_toward_the_batch_and_a_request_that_does_not_fit_waits(hub: lanes.Hub) -> None:
    mid = hub.add_model(4, FOREVER_US)
    worker = lane(hub, mid, key=1)
    submit(hub, mid, 1, rows=3)
    assert nothing_sent(worker)
    submit(hub, mid, 2, rows=2)  # 5 rows: the first leaves alone (waiting cannot grow it)
    assert batch(worker) == [1]


def test_the_largest_preferred_size_made_up_exactly_leaves_at_once(hub: lanes.Hub) -> None:
    mid = hub.add_model(8, FOREVER_US, [2, 3])
    worker = lane(hub, mid, key=1)
    submit(hub, mid, 1)
    assert nothing_sent(worker)
    submit(hub, mid, 2)
    assert batch(worker) == [1, 2]  # 2 rows: preferred
    reply(worker, [1, 2])
    for i in (3, 4):
        submit(hub, mid, i, rows=2)  # 2, then 4 rows: 2 is preferred, and leaves
    assert batch(worker) == [3]
    assert nothing_sent(worker)  # (the lane runs one that is not full: the next waits for it)
    submit(hub, mid, 5)  # 3 rows queued: preferred, but the lane is busy
    assert nothing_sent(worker)
    reply(worker, [3])
    assert batch(worker) == [4, 5]


def test_requests_of_other_keys_are_never_merged(hub: lanes.Hub) -> None:
    mid = hub.add_model(2, FOREVER_US)
    worker = lane(hub, mid, key=1)
    submit(hub, mid, 1, key=10)
    submit(hub, mid, 2, key=20)
    submit(hub, mid, 3, key=10)
    assert batch(worker) == [1, 3]
    submit(hub, mid, 4, key=20)
    reply(worker, [1, 3])
    assert batch(worker) == [2, 4]


def test_a_busy_lane_takes_only_a_full_batch(hub: lanes.Hub) -> None:
    mid = hub.add_model(2, 0)
    worker = lane(hub, mid, key=1, limit=2)
    submit(hub, mid, 1)
    assert batch(worker) == [1]  # idle lane, delay 0: at once
    submit(hub, mid, 2)
    assert nothing_sent(worker)  # not full: it waits for the running batch
    submit(hub, mid, 3)
    assert batch(worker) == [2, 3]  # full: it goes ahead, ready when the first ends
    submit(hub, mid, 4)
    submit(hub, mid, 5)
    assert nothing_sent(worker)  # (the lane's limit: two sends)
    reply(worker, [1])
    assert batch(worker) == [4, 5]


def test_the_least_busy_lane_gets_the_batch(hub: lanes.Hub) -> None:
    mid = hub.add_model(2, 0)
    a, b = lane(hub, mid, key=1), lane(hub, mid, key=2)
    submit(hub, mid, 1)
    submit(hub, mid, 2)
    sent = [batch(w) for w in (a, b) if not nothing_sent(w, 0.5)]
    assert sorted(sent) == [[1], [2]]


def test_an_abandoned_queued_request_is_taken_out_of_its_batch(hub: lanes.Hub) -> None:
    mid = hub.add_model(3, FOREVER_US)
    worker = lane(hub, mid, key=1)
    first = submit(hub, mid, 1)
    submit(hub, mid, 2)
    assert first.abandon() == 1  # still queued: it will never run
    submit(hub, mid, 3)
    assert nothing_sent(worker)
    submit(hub, mid, 4)
    assert batch(worker) == [2, 3, 4]


def test_a_dead_worker_loses_the_running_batch_and_returns_the_next(hub: lanes.Hub) -> None:
    mid = hub.add_model(3, FOREVER_US)
    worker = lane(hub, mid, key=1, limit=2)
    tickets = [submit(hub, mid, i) for i in range(1, 7)]
    assert batch(worker) == [1, 2, 3] and batch(worker) == [4, 5, 6]
    reply(worker, [2])  # one of the running batch answered before the worker died
    worker.close()
    states = [t.wait(5.0)[0] for t in tickets]
    assert states == [lanes.LOST, lanes.DONE, lanes.LOST, lanes.RETRY, lanes.RETRY, lanes.RETRY]


def test_replies_may_hold_errors_and_come_in_several_messages(hub: lanes.Hub) -> None:
    mid = hub.add_model(3, FOREVER_US)
    worker = lane(hub, mid, key=1)
    tickets = [submit(hub, mid, i) for i in (1, 2, 3)]
    assert batch(worker) == [1, 2, 3]
    err = wire.encode(wire.Error(2, "RuntimeError", "boom", batch=3))
    worker.send(wire.encode(wire.Replies([wire.encode(wire.Response(1, [], [b"\x01"])), err])))
    reply(worker, [3])
    assert answered(tickets[0], 1) and answered(tickets[2], 3)
    state, _, data = tickets[1].wait(5.0)
    msg = wire.decode(data)
    assert state == lanes.DONE and isinstance(msg, wire.Error) and msg.message == "boom" and msg.batch == 3
    assert hub.counts(1) == (0, 3)


def test_a_batch_holds_no_more_than_a_datagram(hub: lanes.Hub) -> None:
    mid = hub.add_model(64, FOREVER_US)
    worker = lane(hub, mid, key=1)
    big = lanes.MAX_DATAGRAM // 3
    for i in range(1, 4):  # three of a third each cannot share one datagram
        _held.append(hub.submit(mid, i, wire.encode(wire.Request(i, [], [], [b"x" * big])), -1, 1, 1))
    assert batch(worker) == [1, 2]  # (waiting cannot grow it: it leaves)


def test_a_request_too_big_for_a_batch_is_refused(hub: lanes.Hub) -> None:
    mid = hub.add_model(4, 0)
    with pytest.raises(ValueError, match="does not fit a lane"):
        hub.submit(mid, 1, b"x" * (lanes.MAX_REQUEST + 1), -1, 1, 1)


def test_add_model_checks_its_batching(hub: lanes.Hub) -> None:
    with pytest.raises(ValueError, match="max_rows"):
        hub.add_model(lanes.MAX_BATCH + 1, 0)
    with pytest.raises(ValueError, match="delay_us"):
        hub.add_model(4, -1)

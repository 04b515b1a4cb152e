"""Busy polling in the native hub (``Hub(spin_us=)``, what ``Pool(busy_poll_us=)`` sets):
a caller polls its ticket instead of sleeping only while its request is the hub's one in
flight, one caller at a time, and never past its wait's timeout. Real socket pairs; each
test plays the worker on the other end. What a wait polled shows as the CPU time of the
thread that waited (``time.thread_time``): a sleeping wait costs almost none."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from libtorchrt.transport import lanes, wire
from tests.conftest import wait_for

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.skipif(not lanes.available, reason="the native hub is not built here"),
]

#: how long the worker end takes to answer; the least CPU a wait that polled shows (a
#: quarter: on a busy machine the poller shares its CPU), and the most one that slept does
_ANSWER_S = 0.4
_POLLED_CPU_S = _ANSWER_S / 4
_ASLEEP_CPU_S = 0.05


def request(i: int) -> bytes:
    return wire.encode(wire.Request(i, [], [], []))


def answer_later(worker: socket.socket, ids: list[int], after: float) -> threading.Thread:
    """Answer requests ``ids`` (read first) from another thread, ``after`` seconds later."""

    def run() -> None:
        for _ in ids:
            wire.decode(worker.recv(lanes.MAX_DATAGRAM + 1))
        time.sleep(after)
        for i in ids:
            worker.send(wire.encode(wire.Response(i, [], [b""])))

    t = threading.Thread(target=run)
    t.start()
    return t


@pytest.fixture
def polling_hub() -> Iterator[lanes.Hub]:
    h = lanes.Hub(spin_us=lanes.MAX_SPIN_US)  # (polls as long as it may: up to 1 s)
    yield h
    h.close()


def lane(hub: lanes.Hub, limit: int = 4) -> tuple[int, socket.socket]:
    mid = hub.add_model()
    mine, theirs = lanes.pair()
    hub.add_lane(mid, mine.detach(), limit, 1)
    theirs.settimeout(5)
    return mid, theirs


def timed_wait(ticket: lanes.Ticket, timeout: float = 5.0) -> tuple[int, float]:
    """The ticket's state and the CPU time this thread spent waiting for it."""
    cpu = time.thread_time()
    state, _, _ = ticket.wait(timeout)
    return state, time.thread_time() - cpu


def test_the_one_request_in_flight_polls_its_ticket_until_the_reply(polling_hub: lanes.Hub) -> None:
    mid, worker = lane(polling_hub)
    ticket = polling_hub.request(mid, 1, request(1))
    answering = answer_later(worker, [1], _ANSWER_S)
    state, cpu = timed_wait(ticket)
    answering.join()
    assert state == lanes.DONE
    assert cpu > _POLLED_CPU_S, f"the wait slept ({cpu:.3f} s of CPU): it should have polled"


def test_without_spin_us_a_wait_sleeps() -> None:
    hub = lanes.Hub()
    try:
        mid, worker = lane(hub)
        ticket = hub.request(mid, 1, request(1))
        answering = answer_later(worker, [1], _ANSWER_S)
        state, cpu = timed_wait(ticket)
        answering.join()
    finally:
        hub.close()
    assert state == lanes.DONE and cpu < _ASLEEP_CPU_S


def test_callers_sleep_while_several_requests_are_in_flight(polling_hub: lanes.Hub) -> None:
    mid, worker = lane(polling_hub)
    tickets = [polling_hub.submit(mid, i, request(i)) for i in (1, 2)]
    answering = answer_later(worker, [1, 2], _ANSWER_S)
    waits = [timed_wait(t) for t in tickets]  # (the first waits for both replies)
    answering.join()
    assert [state for state, _ in waits] == [lanes.DONE, lanes.DONE]
    assert all(cpu < _ASLEEP_CPU_S for _, cpu in waits), waits


def test_a_caller_stops_polling_when_another_request_is_sent(polling_hub: lanes.Hub) -> None:
    mid, worker = lane(polling_hub)
    first = polling_hub.request(mid, 1, request(1))
    answering = answer_later(worker, [1, 2], _ANSWER_S)  # (both answered once the second came)

    def second_later() -> None:
        time.sleep(_ANSWER_S / 4)
        polling_hub.submit(mid, 2, request(2))

    sender = threading.Thread(target=second_later)
    sender.start()
    state, cpu = timed_wait(first)
    sender.join()
    answering.join()
    assert state == lanes.DONE
    assert cpu < _ANSWER_S * 0.6, f"the first caller polled on ({cpu:.3f} s of CPU) beside the second request"


def test_callers_sleep_while_a_request_is_queued(polling_hub: lanes.Hub) -> None:
    mid, worker = lane(polling_hub, limit=1)
    first = polling_hub.submit(mid, 1, request(1))
    second = polling_hub.submit(mid, 2, request(2))  # (queued: the lane takes one)
    assert polling_hub.queued(mid) == 1
    answering = answer_later(worker, [1], _ANSWER_S)
    state, cpu = timed_wait(first)
    answering.join()
    assert state == lanes.DONE and cpu < _ASLEEP_CPU_S
    answering = answer_later(worker, [2], 0.0)  # (once the first's reply has sent it on)
    assert second.wait(5.0)[0] == lanes.DONE
    answering.join()


def test_one_caller_polls_at_a_time(polling_hub: lanes.Hub) -> None:
    """Two threads wait on the one ticket in flight at once: the second finds the first
    polling, and sleeps."""
    mid, worker = lane(polling_hub)
    ticket = polling_hub.request(mid, 1, request(1))
    results: list[tuple[int, float]] = []
    first = threading.Thread(target=lambda: results.append(timed_wait(ticket)))
    first.start()
    wait_for(lambda: polling_hub.pending() == 1, 10, "the first caller to place it (it polls then)")
    answering = answer_later(worker, [1], _ANSWER_S)
    second = timed_wait(ticket)
    first.join()
    answering.join()
    assert second[0] == lanes.DONE and results[0][0] == lanes.DONE
    assert results[0][1] > _POLLED_CPU_S, "the first caller should have polled"
    assert second[1] < _ASLEEP_CPU_S, "a second caller polled while the first did"


def test_polling_stops_at_the_wait_s_timeout(polling_hub: lanes.Hub) -> None:
    mid, _worker = lane(polling_hub)  # (kept open: it never answers)
    ticket = polling_hub.request(mid, 1, request(1))
    started = time.monotonic()
    state, _, _ = ticket.wait(0.1)  # (no reply comes; spin_us is a whole second)
    assert state == 0 and time.monotonic() - started < 0.6
    assert ticket.abandon() == 2  # (sent: its reply would be an orphan)


@pytest.mark.parametrize("spin_us", [-1, lanes.MAX_SPIN_US + 1])
def test_a_spin_out_of_range_is_refused(spin_us: int) -> None:
    with pytest.raises(ValueError, match=r"spin_us must be 0 \(no busy polling\) to 1000000; got"):
        lanes.Hub(spin_us=spin_us)

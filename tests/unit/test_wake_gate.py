"""The native hub's wake-up gate (transport/_lanes.c): the callers a batch's replies
wake come out a few at a time, each when one before it comes back with its next
request or its grant lapses, and never when the gate does not apply. Real socket pairs,
real caller threads sleeping in ``Ticket.wait``; each test plays the worker."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from libtorchrt.transport import lanes, wire
from tests.unit.test_lane_batching import FOREVER_US, lane, reply, request

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.skipif(not lanes.available, reason="the native hub is not built here"),
]

#: a grace no test waits out
LONG_US = 30_000_000
#: how long a test gives something that should happen (or should not have happened yet)
SOON = 5.0


class Caller(threading.Thread):
    """A caller thread: sends request ``i`` and sleeps in ``wait`` for its answer; once
    told to come back (:meth:`come_back`), sends another request (its next one)."""

    def __init__(self, hub: lanes.Hub, mid: int, i: int, timeout: float = 2 * SOON) -> None:
        super().__init__(daemon=True)
        self.hub, self.mid, self.i, self.timeout = hub, mid, i, timeout
        self.answer: tuple[int, bytes] | None = None
        self.done = threading.Event()
        self.when = self.started = 0.0
        self._back = threading.Event()
        self.next_ticket: lanes.Ticket | None = None

    def run(self) -> None:
        ticket = self.hub.request(self.mid, self.i, request(self.i), -1, 1, 1)
        self.started = time.monotonic()
        state, _, data = ticket.wait(self.timeout)
        self.answer = (state, wire.decode(data).blobs[0] if data else b"")
        self.when = time.monotonic()
        self.done.set()
        if self._back.wait(2 * SOON):
            self.next_ticket = self.hub.submit(self.mid, 1000 + self.i, request(1000 + self.i), -1, 1, 1)

    def come_back(self) -> None:
        self._back.set()


@pytest.fixture
def gated() -> Iterator[lanes.Hub]:
    h = lanes.Hub(awake=1, grace_us=LONG_US)
    yield h
    h.close()


def start_batch(hub: lanes.Hub, n: int, timeout: float = 2 * SOON) -> tuple[socket.socket, list[Caller]]:
    """``n`` caller threads (waiting ``timeout`` at most) whose requests make one batch,
    asleep in ``wait`` when their replies come (all in one datagram)."""
    mid = hub.add_model(n, FOREVER_US)
    worker = lane(hub, mid, key=1, limit=4)
    callers = [Caller(hub, mid, i, timeout) for i in range(1, n + 1)]
    for c in callers:
        c.start()
    msg = wire.decode(worker.recv(lanes.MAX_DATAGRAM + 1))
    assert isinstance(msg, wire.Batch)
    time.sleep(0.2)  # (each caller placed its request in its wait, and sleeps there now)
    reply(worker, list(range(1, n + 1)))
    return worker, callers


def finished(callers: list[Caller], wait: float = 0.3) -> list[Caller]:
    time.sleep(wait)
    return [c for c in callers if c.done.is_set()]


def test_a_batchs_callers_wake_one_at_a_time_each_as_the_one_before_comes_back(gated: lanes.Hub) -> None:
    _, callers = start_batch(gated, 3)
    order = []
    for left in (2, 1, 0):
        awake = [c for c in finished(callers) if c not in order]
        assert len(awake) == 1, f"{len(awake)} callers woke at once"
        assert gated.gate["held"] == left
        order += awake
        awake[0].come_back()  # (its next request gives its grant back: the next one wakes)
    for c in callers:
        c.join(SOON)
        assert c.answer == (lanes.DONE, bytes([c.i]))  # each its own reply
    gate = gated.gate
    assert (gate["granted"], gate["given_back"], gate["lapsed"], gate["held"]) == (3, 3, 0, 0)


def test_a_grant_not_given_back_lapses_after_the_grace() -> None:
    hub = lanes.Hub(awake=1, grace_us=150_000)
    try:
        _, callers = start_batch(hub, 3)
        for c in callers:
            assert c.done.wait(SOON)
        times = sorted(c.when for c in callers)
        # (nobody came back: each next caller woke when the grant before it lapsed)
        assert times[1] - times[0] >= 0.12 and times[2] - times[1] >= 0.12
        assert hub.gate["lapsed"] >= 2 and hub.gate["held"] == 0
        assert all(c.answer == (lanes.DONE, bytes([c.i])) for c in callers)
    finally:
        hub.close()


def test_a_caller_whose_timeout_runs_out_while_held_takes_its_reply(gated: lanes.Hub) -> None:
    _, callers = start_batch(gated, 3, timeout=1.0)
    for c in callers:
        assert c.done.wait(SOON)
        assert c.answer == (lanes.DONE, bytes([c.i]))  # its reply, not a timeout
    late = sorted(c.when - c.started for c in callers)[1:]
    assert all(0.9 <= t < 1.0 + SOON for t in late)  # (the two held: at their timeouts)
    assert gated.gate["held"] == 0


def test_two_awake_at_once_when_the_gate_allows_two() -> None:
    hub = lanes.Hub(awake=2, grace_us=LONG_US)
    try:
        _, callers = start_batch(hub, 4)
        first = finished(callers)
        assert len(first) == 2 and hub.gate["held"] == 2
        first[0].come_back()
        assert len(finished(callers)) == 3
    finally:
        hub.close()


def test_the_gate_turns_off_when_most_of_its_grants_lapse() -> None:
    """40 callers that never come back, a grace of 1 ms: once a window of the gate's
    (20 ms) has seen most of its grants lapse, it wakes the rest at once rather than one
    a grace, and stays off a while."""
    hub = lanes.Hub(awake=1, grace_us=1_000)
    try:
        _, callers = start_batch(hub, 40)
        for c in callers:
            assert c.done.wait(SOON)
        gate = hub.gate
        assert gate["offs"] >= 1
        assert gate["lapsed"] < 39  # (not each of them waited for the one before to lapse)
        assert gate["held"] == 0
        assert all(c.answer == (lanes.DONE, bytes([c.i])) for c in callers)
    finally:
        hub.close()


def test_closing_the_hub_wakes_the_callers_it_holds_with_their_replies(gated: lanes.Hub) -> None:
    _, callers = start_batch(gated, 3)
    assert len(finished(callers)) == 1 and gated.gate["held"] == 2
    gated.close()
    for c in callers:
        assert c.done.wait(SOON)
        assert c.answer == (lanes.DONE, bytes([c.i]))


def test_replies_to_single_requests_and_to_mailboxes_are_never_held(gated: lanes.Hub) -> None:
    mid = gated.add_model()  # (no batching)
    worker = lane(gated, mid, key=1, limit=8)
    callers = [Caller(gated, mid, i) for i in range(1, 4)]
    for c in callers:
        c.start()
    got = [wire.decode(worker.recv(lanes.MAX_DATAGRAM + 1)).id for _ in callers]  # type: ignore[union-attr]
    time.sleep(0.2)
    for i in got:
        worker.send(wire.encode(wire.Response(i, [], [bytes([i])])))
    assert len(finished(callers)) == 3

    box, _ = gated.add_mailbox()
    batching = gated.add_model(3, FOREVER_US)
    worker = lane(gated, batching, key=2)
    tickets = [gated.submit(batching, 10 + i, request(10 + i), box, 1, 1) for i in range(3)]
    assert isinstance(wire.decode(worker.recv(lanes.MAX_DATAGRAM + 1)), wire.Batch)
    reply(worker, [10, 11, 12])
    deadline = time.monotonic() + SOON
    listed: list[int] = []
    while len(listed) < 3 and time.monotonic() < deadline:
        listed += gated.drain(box)
        time.sleep(0.01)
    assert sorted(listed) == [10, 11, 12]
    assert all(t is not None and t.wait(0)[0] == lanes.DONE for t in tickets)
    assert gated.gate["granted"] == 0 and gated.gate["held"] == 0
    gated.remove_mailbox(box)


def test_a_hub_without_the_gate_wakes_every_caller_of_a_batch_at_once() -> None:
    hub = lanes.Hub(awake=0)
    try:
        _, callers = start_batch(hub, 3)
        assert len(finished(callers)) == 3
        assert hub.gate["on"] is False and hub.gate["granted"] == 0
    finally:
        hub.close()


@pytest.mark.parametrize("kw", [{"awake": -1}, {"awake": 17}, {"grace_us": 0}, {"grace_us": 60_000_001}])
def test_the_gate_refuses_settings_out_of_range(kw: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="awake must be 0"):
        lanes.Hub(**kw)

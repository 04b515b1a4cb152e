"""CopyGate: the bound on the bytes of large inputs Pool.infer callers copy ahead, with
real threads."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from libtorchrt.errors import PoolClosedError, TimeoutError
from libtorchrt.front.copygate import CopyGate


def _waiting(gate: CopyGate, n: int) -> None:
    deadline = time.monotonic() + 10
    while len(gate._waiting) != n:
        assert time.monotonic() < deadline, "the callers never queued"
        time.sleep(0.001)


def test_callers_past_the_budget_wait_and_get_in_first_come_first_served() -> None:
    gate = CopyGate("m", budget=8)
    gate.acquire(4, None)
    gate.acquire(4, None)
    order: list[int] = []

    def caller(k: int) -> None:
        gate.acquire(4, None)
        order.append(k)

    threads = []
    for k in range(3):
        t = threading.Thread(target=caller, args=(k,))
        t.start()
        threads.append(t)
        _waiting(gate, k + 1)  # (in this order)
    assert order == [] and gate.held == 8
    for k in range(3):  # each release lets in the one that came first, and only it
        gate.release(4)
        threads[k].join(10)
        assert order == list(range(k + 1)) and gate.held == 8
        _waiting(gate, 2 - k)


def test_a_request_alone_goes_however_large() -> None:
    gate = CopyGate("m", budget=8)
    gate.acquire(100, None)
    assert gate.held == 100
    gate.release(100)
    assert gate.held == 0


def test_a_small_waiter_does_not_pass_an_earlier_large_one() -> None:
    gate = CopyGate("m", budget=8)
    gate.acquire(6, None)
    big = threading.Thread(target=gate.acquire, args=(8, None))
    big.start()
    _waiting(gate, 1)
    small = threading.Thread(target=gate.acquire, args=(1, None))
    small.start()
    _waiting(gate, 2)  # (1 byte would fit, but the large one came first)
    gate.release(6)
    big.join(10)
    assert not big.is_alive() and gate.held == 8
    _waiting(gate, 1)  # (the small one does not fit beside it)
    gate.release(8)
    small.join(10)
    assert not small.is_alive() and gate.held == 1


def test_the_deadline_ends_the_wait_with_a_timeout_that_says_why() -> None:
    gate = CopyGate("m", budget=8)
    gate.acquire(8, None)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="max_inflight_bytes"):
        gate.acquire(4, time.monotonic() + 0.2)
    assert 0.15 <= time.monotonic() - start < 5
    assert gate.held == 8 and not gate._waiting
    gate.release(8)
    gate.acquire(4, time.monotonic() + 0.2)  # (nothing left behind by the one that gave up)


def test_close_fails_the_waiting_callers() -> None:
    gate = CopyGate("m", budget=8)
    gate.acquire(8, None)
    errors: list[BaseException] = []

    def caller() -> None:
        try:
            gate.acquire(4, None)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=caller) for _ in range(3)]
    for t in threads:
        t.start()
    _waiting(gate, 3)
    gate.close()
    for t in threads:
        t.join(10)
    assert len(errors) == 3 and all(isinstance(e, PoolClosedError) for e in errors)


def test_the_first_requests_get_in_whatever_their_bytes() -> None:
    # Two an instance (one running, the next ready): a worker never waits for a caller
    # to wake and copy.
    gate = CopyGate("m", budget=8, free_requests=2)
    gate.acquire(100, None)
    gate.acquire(100, None)
    with pytest.raises(TimeoutError):
        gate.acquire(1, time.monotonic() + 0.05)
    gate.release(100)
    gate.acquire(100, None)
    assert gate.count == 2 and gate.held == 200


def test_asyncio_waiters_queue_with_threads_and_a_cancelled_one_leaves_no_trace() -> None:
    gate = CopyGate("m", budget=8)
    gate.acquire(8, None)

    async def main() -> None:
        first = asyncio.ensure_future(gate.acquire_async(8, None))
        second = asyncio.ensure_future(gate.acquire_async(8, None))
        await asyncio.sleep(0.01)
        assert gate.waiting == 2 and not first.done()
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        assert gate.waiting == 1
        threading.Thread(target=gate.release, args=(8,)).start()  # (released from another thread)
        await asyncio.wait_for(first, 10)
        assert gate.held == 8 and gate.count == 1
        late = asyncio.ensure_future(gate.acquire_async(4, time.monotonic() + 0.05))
        with pytest.raises(TimeoutError, match="max_inflight_bytes"):
            await late
        closing = asyncio.ensure_future(gate.acquire_async(4, None))
        await asyncio.sleep(0.01)
        gate.close()
        with pytest.raises(PoolClosedError):
            await asyncio.wait_for(closing, 10)
        assert gate.held == 8 and gate.waiting == 0

    asyncio.run(main())


def test_a_task_cancelled_as_it_gets_in_gives_its_room_back() -> None:
    gate = CopyGate("m", budget=8)
    gate.acquire(8, None)

    async def main() -> None:
        task = asyncio.ensure_future(gate.acquire_async(8, None))
        await asyncio.sleep(0.01)
        gate.release(8)  # (granted: its wake-up is queued in the loop)
        task.cancel()  # (before it runs again)
        with pytest.raises(asyncio.CancelledError):
            await task
        assert gate.held == 0 and gate.count == 0 and gate.idle

    asyncio.run(main())

"""``Pool.infer`` to CPU workers by the fast lane (front/fastlane.py): real pools, real
worker processes, the native hub's socket pairs. The router thread sends none of these
requests; what the hub cannot finish (a dead worker, a closed pool) still ends the way
the router would end it."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from libtorchrt import (
    ModelConfig,
    ModelError,
    Pool,
    PoolClosedError,
    TimeoutError,
    WorkerDiedError,
)
from libtorchrt.transport import lanes
from tests.conftest import assert_no_leaks, open_fds, snapshot, wait_for
from tests.models import reference, save

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not lanes.available, reason="the native hub is not built here"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("lane-models")
    return {name: save(name, d) for name in ("tiny", "raiser", "spin")}


@pytest.fixture(scope="module")
def pool(files: dict[str, Path]) -> Iterator[Pool]:
    with Pool(
        models=[
            ModelConfig("tiny", files["tiny"], instances=2),
            ModelConfig("raiser", files["raiser"]),
            # (unoptimized: a spin of N iterations takes as long on every call)
            ModelConfig("spin", files["spin"], parameters={"DISABLE_OPTIMIZED_EXECUTION": "true"}),
        ]
    ) as p:
        yield p


def lane_served(pool: Pool, model: str) -> int:
    fast = pool._router.fast
    return sum(fast.served(w) for w in pool._router.supervisor.by_identity.values() if w.model.name == model)


def channel_sends(pool: Pool) -> int:
    return sum(w.channel.sent for w in pool._router.supervisor.by_identity.values() if w.channel is not None)


def test_infer_goes_by_the_lane_and_every_caller_gets_its_own_answer(pool: Pool) -> None:
    model = reference("tiny")
    sends, served = channel_sends(pool), lane_served(pool, "tiny")
    success = next(s.success for s in pool.stats() if s.model == "tiny")
    errors: list[str] = []

    def caller(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for i in range(50):
            x = torch.randn(1, 64, generator=g)
            y = pool.infer("tiny", x)["OUTPUT__0"]
            with torch.no_grad():
                if not torch.allclose(y, model(x), atol=1e-6):
                    errors.append(f"caller {seed} request {i}")

    threads = [threading.Thread(target=caller, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert lane_served(pool, "tiny") - served == 400
    assert channel_sends(pool) == sends  # (the router thread sent none of them)
    stats = next(s for s in pool.stats() if s.model == "tiny")
    assert stats.success - success == 400 and stats.pending == 0
    assert all(w.inflight == 0 for w in pool.workers())


def test_submit_still_goes_by_the_router(pool: Pool) -> None:
    sends, served = channel_sends(pool), lane_served(pool, "tiny")
    pool.submit("tiny", torch.randn(1, 64)).result(10)
    assert (channel_sends(pool) - sends, lane_served(pool, "tiny") - served) == (1, 0)


def test_a_model_error_comes_back_to_its_caller_and_the_lane_goes_on(pool: Pool) -> None:
    with pytest.raises(ModelError, match="negative input rejected"):
        pool.infer("raiser", torch.tensor([-1.0, 2.0]))
    assert torch.equal(pool.infer("raiser", torch.tensor([1.0, 2.0]))["OUTPUT__0"], torch.tensor([2.0, 4.0]))
    assert next(s.failure for s in pool.stats() if s.model == "raiser") >= 1


def test_a_passed_deadline_fails_that_request_and_frees_its_inputs_once_answered(pool: Pool) -> None:
    m = pool._router.lookup("spin")
    slow = torch.zeros(1, 32768)  # (128 KiB: placed in the request arena)
    slow[0, 0] = 300_000.0
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="deadline"):
        pool.infer("spin", slow, timeout=0.2)
    assert time.monotonic() - started < 2.0
    assert m.allocator.used > 0  # (the worker may still read them)
    # The next request waits behind the slow one, then finds its reply an orphan and
    # frees the slow request's inputs.
    assert pool.infer("spin", torch.ones(1, 32768), timeout=60)["OUTPUT__0"].item() == 1.0
    pool.infer("spin", torch.ones(1, 4))
    assert m.allocator.used == 0


def test_requests_waiting_in_the_hub_are_pending_in_the_stats(files: dict[str, Path]) -> None:
    """Stats and the server's pending gauge count a request queued in the hub, not yet
    sent to a worker, as one in the router's queue: spin's one worker takes max_inflight
    requests, the rest wait in the hub."""
    with Pool(models=[ModelConfig("spin", files["spin"])], max_inflight=2) as pool:

        def pending() -> tuple[int, int]:
            [s] = pool.stats()
            [w] = pool.workers()
            return w.inflight, s.pending

        results: list[float] = []

        def infer(n: float) -> None:
            results.append(pool.infer("spin", torch.tensor([n]))["OUTPUT__0"].item())

        threads = [threading.Thread(target=infer, args=(n,)) for n in (300_000.0, 5.0, 5.0, 5.0, 5.0)]
        threads[0].start()
        wait_for(lambda: pending() == (1, 0), what="the long request sent")
        for t in threads[1:]:
            t.start()
        wait_for(lambda: pending() == (2, 3), what="two requests sent and three waiting in the hub")
        for t in threads:
            t.join(120)
        assert sorted(results) == [5.0] * 4 + [300_000.0]
        assert pending() == (0, 0)


def test_a_killed_worker_costs_no_caller_a_wrong_answer_and_is_replaced(files: dict[str, Path]) -> None:
    model = reference("tiny")
    with Pool(models=[ModelConfig("tiny", files["tiny"], instances=2)]) as pool:
        victim = pool.workers()[0].pid
        errors: list[str] = []
        died: list[BaseException] = []
        stop = threading.Event()

        def caller(seed: int) -> None:
            g = torch.Generator().manual_seed(seed)
            while not stop.is_set():
                x = torch.randn(1, 64, generator=g)
                try:
                    y = pool.infer("tiny", x)["OUTPUT__0"]
                except WorkerDiedError as e:
                    died.append(e)
                    continue
                with torch.no_grad():
                    if not torch.allclose(y, model(x), atol=1e-6):
                        errors.append(f"caller {seed}: a wrong answer")

        threads = [threading.Thread(target=caller, args=(s,)) for s in range(8)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ws = pool.workers()
            if len(ws) == 2 and victim not in {w.pid for w in ws} and all(w.state == "ready" for w in ws):
                break
            time.sleep(0.05)
        served = lane_served(pool, "tiny")
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(30)
        assert not errors
        assert len(died) <= 1  # (only a request the dead worker was running may fail)
        assert victim not in {w.pid for w in pool.workers()}
        assert lane_served(pool, "tiny") > served  # (the replacement's lane serves)
        assert pool._router.fast.pending() == 0


def test_close_ends_every_caller_and_leaves_nothing_behind(files: dict[str, Path]) -> None:
    before = snapshot()
    pool = Pool(models=[ModelConfig("spin", files["spin"], instances=2)])
    outcomes: list[str] = []
    lock = threading.Lock()

    def caller() -> None:
        x = torch.tensor([20_000.0])
        for _ in range(20):
            try:
                pool.infer("spin", x)
                outcome = "ok"
            except PoolClosedError:
                outcome = "closed"
            with lock:
                outcomes.append(outcome)
            if outcome == "closed":
                return

    threads = [threading.Thread(target=caller) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    pool.close(grace=0.0)
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert outcomes.count("closed") == 6  # (each caller learnt of it, none hangs)
    assert_no_leaks(before)


def test_a_drained_close_finishes_what_the_lane_holds(files: dict[str, Path]) -> None:
    pool = Pool(models=[ModelConfig("spin", files["spin"])])
    results: list[float] = []
    t = threading.Thread(
        target=lambda: results.append(pool.infer("spin", torch.tensor([50_000.0]))["OUTPUT__0"].item())
    )
    t.start()
    deadline = time.monotonic() + 5
    while pool._router.fast.pending() == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    pool.close(grace=30.0)
    t.join(30)
    assert results == [50_000.0]


def test_a_drained_close_waits_for_a_reply_its_caller_has_not_read_yet(files: dict[str, Path]) -> None:
    # The hub stopped counting a request once its reply came in: a close then found the
    # pool drained and took the lanes (and their response arenas) away before the caller
    # had read its reply, which failed with PoolClosedError (seen once in CI: a caller
    # thread slow to wake). Here the caller is an event loop that reads nothing for a
    # while, on purpose, after the reply came in and the close began.
    pool = Pool(models=[ModelConfig("spin", files["spin"])])
    fast = pool._router.fast
    (worker,) = pool._router.default["spin"].workers
    closer = threading.Thread(target=pool.close, kwargs={"grace": 30.0})

    async def main() -> float:
        task = asyncio.ensure_future(pool.infer_async("spin", torch.tensor([50_000.0])))
        await asyncio.sleep(0)  # (its first step: the request is in the hub)
        deadline = time.monotonic() + 30
        while fast.served(worker) == 0:  # (this thread sleeps: the loop reads nothing)
            assert time.monotonic() < deadline, "the reply never came"
            time.sleep(0.005)
        closer.start()
        time.sleep(0.5)  # (long enough for a close that thinks the pool drained)
        assert closer.is_alive(), "the close did not wait for the reply to be read"
        return float((await task)["OUTPUT__0"])

    assert asyncio.run(main()) == 50_000.0
    closer.join(30)
    assert not closer.is_alive() and pool.closed


@pytest.mark.parametrize("then", ["close", "another loop"])
def test_a_loop_closed_with_its_reply_unread_does_not_hold_up_a_drained_close(
    files: dict[str, Path], then: str
) -> None:
    # A loop closed with a request in it (loop.close(); asyncio.run() cancels its tasks
    # first): its reply came in, and nobody can ever read it. A drained close waited out
    # its whole grace for that reply. Now the close, or the next loop to use the lane,
    # reads it and drops it.
    before = snapshot()
    pool = Pool(models=[ModelConfig("spin", files["spin"])])
    fast = pool._router.fast
    (worker,) = pool._router.default["spin"].workers

    async def infer(value: float) -> float:
        return float((await pool.infer_async("spin", torch.tensor([value])))["OUTPUT__0"])

    loop = asyncio.new_event_loop()
    task = loop.create_task(infer(50_000.0))
    loop.run_until_complete(asyncio.sleep(0))  # (the task's first step: the request is in the hub)
    wait_for(lambda: fast.served(worker) == 1, what="the reply")
    assert fast.pending() == 1  # (read by nobody yet)
    task._log_destroy_pending = False  # type: ignore[attr-defined]  # (its loop is closed under it on purpose)
    loop.close()
    if then == "another loop":
        assert asyncio.run(infer(3.0)) == 3.0
        assert fast.pending() == 0
    start = time.monotonic()
    pool.close(grace=30.0)
    assert time.monotonic() - start < 10, "the close waited for a reply nobody could read"
    del task
    assert_no_leaks(before)


# ── asyncio callers: the loop's mailbox ─────────────────────────────────────────


def test_asyncio_callers_go_by_the_lane_and_get_their_own_answers(pool: Pool) -> None:
    model = reference("tiny")
    sends, served = channel_sends(pool), lane_served(pool, "tiny")

    async def caller(seed: int) -> list[str]:
        g = torch.Generator().manual_seed(seed)
        wrong = []
        for i in range(20):
            x = torch.randn(1, 64, generator=g)
            y = (await pool.infer_async("tiny", x, timeout=30))["OUTPUT__0"]
            with torch.no_grad():
                if not torch.allclose(y, model(x), atol=1e-6):
                    wrong.append(f"task {seed} request {i}")
        return wrong

    async def main() -> list[str]:
        return [w for ws in await asyncio.gather(*(caller(s) for s in range(32))) for w in ws]

    assert asyncio.run(main()) == []
    assert lane_served(pool, "tiny") - served == 640
    assert channel_sends(pool) == sends


def test_an_asyncio_deadline_or_cancel_ends_that_request_only(pool: Pool) -> None:
    m = pool._router.lookup("spin")
    slow = torch.zeros(1, 32768)
    slow[0, 0] = 300_000.0

    async def main() -> None:
        with pytest.raises(TimeoutError, match="deadline"):
            await pool.infer_async("spin", slow, timeout=0.2)
        task = asyncio.ensure_future(pool.infer_async("spin", slow.clone()))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        out = await pool.infer_async("spin", torch.ones(1, 32768), timeout=60)
        assert out["OUTPUT__0"].item() == 1.0

    asyncio.run(main())
    pool.infer("spin", torch.ones(1, 4))  # (reads the orphans: the slow inputs are freed)
    assert m.allocator.used == 0


def test_an_asyncio_pool_closes_its_mailboxes(files: dict[str, Path]) -> None:
    before = snapshot()
    pool = Pool(models=[ModelConfig("tiny", files["tiny"])])

    async def main() -> None:
        await asyncio.gather(*(pool.infer_async("tiny", torch.randn(1, 64)) for _ in range(50)))

    asyncio.run(main())
    pool.close()
    assert_no_leaks(before)


def test_one_loop_after_another_keeps_one_mailbox(pool: Pool) -> None:
    fds = len(open_fds())
    for _ in range(5):  # (each asyncio.run() is a new event loop)
        asyncio.run(pool.infer_async("tiny", torch.randn(1, 64)))
    assert len(pool._router.fast._boxes) == 1
    assert len(open_fds()) <= fds + 1  # (the last loop's eventfd)


def test_a_request_whose_deadline_has_passed_is_not_sent(pool: Pool) -> None:
    served = lane_served(pool, "tiny")
    with pytest.raises(TimeoutError):
        pool.infer("tiny", torch.randn(1, 64), timeout=0)

    async def main() -> None:
        with pytest.raises(TimeoutError):
            await pool.infer_async("tiny", torch.randn(1, 64), timeout=0)

    asyncio.run(main())
    assert lane_served(pool, "tiny") == served
    assert pool.infer("tiny", torch.randn(1, 64))["OUTPUT__0"].shape == (1, 64)


def test_outputs_too_big_for_the_response_arena_come_back_over_zeromq(tmp_path: Path) -> None:
    # A 64 KiB response arena cannot hold a 256 KiB output: the worker sends it as a
    # ZeroMQ data frame, the router reads it and completes the lane request's ticket.
    with Pool(models=[ModelConfig("identity", save("identity", tmp_path))], response_arena_bytes=64 << 10) as pool:
        served = lane_served(pool, "identity")
        for _ in range(3):
            x = torch.randn(1, 65536)
            assert torch.equal(pool.infer("identity", x)["OUTPUT__0"], x)
        assert lane_served(pool, "identity") == served + 3  # (completed by the router: counted as served)
        assert pool._router.fast.pending() == 0 and not pool._router.fast._frames


def test_an_error_the_caller_keeps_does_not_keep_the_workers_memory_after_close(files: dict[str, Path]) -> None:
    """A ModelError from the lane, kept by its caller (traceback and all) past close():
    the pool still leaves nothing behind (the frame that read the reply held the
    worker's response arena in its locals)."""
    before = snapshot()
    with Pool(models=[ModelConfig("raiser", files["raiser"])]) as pool:
        assert pool._router.default["raiser"].lane >= 0
        with pytest.raises(ModelError) as caught:
            pool.infer("raiser", torch.tensor([-1.0, 2.0]))
    kept = caught.value
    assert kept.__traceback__ is not None
    assert_no_leaks(before)

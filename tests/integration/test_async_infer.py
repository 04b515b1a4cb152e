"""Pool.infer_async end to end: every awaiting coroutine gets its own rows back (with
and without dynamic batching, from one or two event loops), cancelling a queued
request removes it, bad inputs fail at once, and outputs give their shared memory back."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from libtorchrt import DynamicBatching, InvalidInputError, ModelConfig, Pool, TensorSpec
from tests.conftest import assert_no_leaks, snapshot
from tests.models import SpinDouble

WAIT = 30.0  # seconds any one round of requests may take, at most


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("async") / "affine.pt"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.jit.script(SpinDouble()).save(str(path))
    return path


@pytest.fixture
def affine_pool(model_file: Path, make_pool: Callable[..., Pool]) -> Callable[..., Pool]:
    """A pool serving model "m" (SpinDouble), with dynamic batching unless
    ``max_batch_size`` is 0."""

    def make(
        instances: int = 1,
        max_batch_size: int = 8,
        width: int = 4,
        pool_options: dict[str, Any] | None = None,
        **db: Any,
    ) -> Pool:
        if max_batch_size:
            cfg = ModelConfig(
                "m",
                model_file,
                instances=instances,
                max_batch_size=max_batch_size,
                inputs=[TensorSpec("INPUT__0", "float32", [width])],
                dynamic_batching=DynamicBatching(**db),
            )
        else:
            cfg = ModelConfig("m", model_file, instances=instances)
        return make_pool(cfg, **(pool_options or {}))

    return make


def request(k: int, rows: int = 1, width: int = 4) -> Tensor:
    """Request ``k``'s input: ``rows`` rows, each of one value unique to (k, row), all
    negative (no spin)."""
    return torch.stack([torch.full((width,), -float(k * 10 + r + 1)) for r in range(rows)])


async def infer_all(pool: Pool, xs: Sequence[Tensor]) -> list[Tensor]:
    """Every input sent at once with infer_async; their outputs in order."""
    outs = await asyncio.wait_for(asyncio.gather(*(pool.infer_async("m", x) for x in xs)), WAIT)
    return [o["OUTPUT__0"] for o in outs]


def eventually(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def check_own_rows(xs: Sequence[Tensor], outs: Sequence[Tensor]) -> None:
    wrong = [
        f"request {k}: got {out[:, 0].tolist()} for {x[:, 0].tolist()}"
        for k, (x, out) in enumerate(zip(xs, outs, strict=True))
        if out.shape != x.shape or not torch.equal(out, x * 2 + 1)
    ]
    assert not wrong, wrong[:5]


def test_concurrent_calls_on_a_batching_model_each_get_their_own_rows(affine_pool: Callable[..., Pool]) -> None:
    """64 concurrent infer_async calls of 1 to 3 rows on a batching model: each gets
    exactly its own rows back, and requests were batched together."""
    pool = affine_pool(max_batch_size=8, max_queue_delay_microseconds=20_000)
    xs = [request(k, rows=1 + k % 3) for k in range(64)]
    check_own_rows(xs, asyncio.run(infer_all(pool, xs)))
    (stats,) = pool.stats()
    assert stats.success == 64 and stats.failure == 0
    assert stats.inferences == sum(x.shape[0] for x in xs)
    assert stats.executions < stats.success  # batches were formed
    assert max(stats.batch_sizes) <= 8


def test_concurrent_calls_on_a_model_without_batching_each_get_their_own_result(
    affine_pool: Callable[..., Pool],
) -> None:
    """64 concurrent infer_async calls on a model without batching (two instances):
    each gets its own result, one execution per request."""
    pool = affine_pool(instances=2, max_batch_size=0)
    xs = [request(k, rows=1 + k % 3) for k in range(64)]
    check_own_rows(xs, asyncio.run(infer_all(pool, xs)))
    (stats,) = pool.stats()
    assert stats.success == 64 and stats.executions == 64


def test_two_event_loops_in_two_threads_share_a_pool(affine_pool: Callable[..., Pool]) -> None:
    """Two threads, each running its own event loop, call infer_async on the same
    batching pool at the same time; every call of both gets its own rows."""
    pool = affine_pool(max_batch_size=8, max_queue_delay_microseconds=5_000)
    start = threading.Barrier(2)
    results: dict[int, Any] = {}

    def loop_thread(t: int) -> None:
        xs = [request(t * 1000 + k, rows=1 + k % 2) for k in range(40)]

        async def main() -> list[Tensor]:
            out: list[Tensor] = []
            for i in range(0, len(xs), 10):  # several rounds, interleaving with the other loop
                out += await infer_all(pool, xs[i : i + 10])
            return out

        start.wait(WAIT)
        try:
            results[t] = (xs, asyncio.run(main()))
        except BaseException as e:
            results[t] = e

    threads = [threading.Thread(target=loop_thread, args=(t,)) for t in range(2)]
    for th in threads:
        th.start()
    deadline = time.monotonic() + 2 * WAIT
    for th in threads:
        th.join(max(0.0, deadline - time.monotonic()))
    assert not any(th.is_alive() for th in threads), "an event loop thread is still running"
    assert sorted(results) == [0, 1]
    for outcome in results.values():
        assert not isinstance(outcome, BaseException), outcome
        check_own_rows(*outcome)
    assert pool.stats()[0].success == 80


def test_cancelling_a_request_waiting_for_its_batch_removes_it(affine_pool: Callable[..., Pool]) -> None:
    """A request waiting in the batch queue (long delay, preferred size 4) whose
    awaiting task is cancelled raises CancelledError there, is never executed, gives
    its arena slot back, and the pool keeps serving."""
    width = 20_000  # 80 KB a row: inputs travel in the request arena
    # (a delay no wait here comes near: the four below leave by their preferred size alone)
    pool = affine_pool(
        max_batch_size=8, width=width, preferred_batch_size=[4], max_queue_delay_microseconds=600_000_000
    )
    m = pool._router.default["m"]

    async def main() -> list[Tensor]:
        lone = asyncio.ensure_future(pool.infer_async("m", request(99, width=width)))
        await asyncio.sleep(0.2)
        assert not lone.done()  # it waits: 1 row, neither the preferred size nor the delay
        lone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await lone
        return await infer_all(pool, [request(k, width=width) for k in range(4)])

    xs = [request(k, width=width) for k in range(4)]
    check_own_rows(xs, asyncio.run(main()))
    stats = pool.stats()[0]
    assert stats.inferences == 4 and stats.executions == 1 and stats.batch_sizes == {4: 1}
    eventually(lambda: m.allocator.used == 0, "the cancelled request's input slot was not given back")


def test_cancelling_a_request_queued_behind_a_busy_instance_removes_it(affine_pool: Callable[..., Pool]) -> None:
    """A request queued in the front behind a busy instance (max_inflight=1), whose
    awaiting task is cancelled, raises CancelledError and never reaches the worker."""
    pool = affine_pool(max_batch_size=0, pool_options={"max_inflight": 1})
    pool.infer("m", request(0))  # warm up

    async def main() -> Tensor:
        # about a second of spinning (0.1 s per 150_000 iterations here)
        busy = asyncio.ensure_future(pool.infer_async("m", torch.full((1, 4), 1_500_000.0)))
        deadline = time.monotonic() + WAIT
        while not pool.workers()[0].inflight:
            assert time.monotonic() < deadline, "the busy request never reached the worker"
            await asyncio.sleep(0.005)
        queued = asyncio.ensure_future(pool.infer_async("m", request(1)))
        await asyncio.sleep(0.05)
        assert not busy.done(), "the instance finished too soon for the test to mean anything"
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        out = await asyncio.wait_for(busy, WAIT)
        return out["OUTPUT__0"]

    assert torch.equal(asyncio.run(main()), torch.full((1, 4), 3_000_001.0))
    after = request(2)
    check_own_rows([after], asyncio.run(infer_all(pool, [after])))
    assert pool.workers()[0].served == 3  # warm-up, busy, after: never the cancelled one


def test_invalid_inputs_fail_at_once_and_the_pool_keeps_serving(affine_pool: Callable[..., Pool]) -> None:
    """Inputs that do not fit the model raise InvalidInputError from infer_async
    without waiting for the batch delay; valid calls around them are served."""
    pool = affine_pool(max_batch_size=4, max_queue_delay_microseconds=2_000_000, preferred_batch_size=[1, 2])

    async def main() -> list[Tensor]:
        ok_before = await infer_all(pool, [request(1)])
        bad: list[Any] = [
            torch.zeros(1, 5),  # wrong width
            torch.zeros(5, 4),  # more rows than max_batch_size
            {"nope": torch.zeros(1, 4)},  # no such input
            torch.zeros(1, 4, dtype=torch.int64),  # wrong dtype
        ]
        for x in bad:
            # raised by the coroutine's first step: before it ever waited for anything
            step = pool.infer_async("m", x)
            with pytest.raises(InvalidInputError):
                step.send(None)
        return ok_before + await infer_all(pool, [request(2), request(3, rows=2)])

    check_own_rows([request(1), request(2), request(3, rows=2)], asyncio.run(main()))
    stats = pool.stats()[0]
    assert stats.success == 3 and stats.failure == 4


def test_dropped_batched_outputs_give_their_slots_back_and_close_leaves_nothing(
    affine_pool: Callable[..., Pool],
) -> None:
    """Batched outputs are views of the worker's response arena; once dropped, their
    slots are reused: rounds of outputs over three times the arena's size all
    still land in it. After close() no child process, descriptor or mapping is left."""
    before = snapshot()
    width = 20_000  # 80 KB a row: every batch's output goes through the response arena
    arena_bytes = 3 << 20
    pool = affine_pool(
        max_batch_size=8,
        width=width,
        max_queue_delay_microseconds=10_000,
        pool_options={"response_arena_bytes": arena_bytes},
    )
    m = pool._router.default["m"]
    (worker,) = m.workers
    assert worker.outputs is not None
    base, size = worker.outputs.ctypes.data, worker.outputs.nbytes
    total = 0
    for r in range(8):
        xs = [request(r * 100 + k, width=width) for k in range(16)]
        outs = asyncio.run(infer_all(pool, xs))
        check_own_rows(xs, outs)
        outside = [k for k, o in enumerate(outs) if not base <= o.data_ptr() < base + size]
        assert not outside, f"round {r}: outputs {outside} not in the response arena (its slots were not freed)"
        total += sum(o.numel() * o.element_size() for o in outs)
        del outs, xs
        gc.collect()
    assert total > 3 * arena_bytes  # the rounds together far exceed the arena
    stats = pool.stats()[0]
    assert stats.executions < stats.success == 128
    allocator = m.allocator
    eventually(lambda: allocator.used == 0, "request arena slots were not given back")
    del m, worker
    pool.close()
    assert_no_leaks(before)

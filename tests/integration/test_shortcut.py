"""Requests to a model of the hub (batched there, or one per execution) that are
like the ones admitted before take the shortcut (front/shortcut.py), from event loops
and threads, on a real pool: each still gets its own rows and is counted; anything the
full path would refuse, or handle differently, goes the full way and gets the full
path's answer; a model unloaded or a pool closed is not served from what the shortcut
remembers; inputs whose shapes vary are not learnt anew each time."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from libtorchrt import DynamicBatching, ModelConfig, Pool, TensorSpec
from libtorchrt.errors import InvalidInputError, PoolClosedError, TimeoutError, UnknownModelError
from libtorchrt.transport import lanes
from tests.conftest import closing_pool
from tests.integration.test_async_infer import check_own_rows, request
from tests.integration.test_lane_batching import SOON, batching, files, stats_of

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not lanes.available, reason="the native hub is not built here"),
]

__all__ = ["files"]  # (the module-scoped fixture, shared)


@pytest.fixture(scope="module")
def pool(files: dict[str, Path]) -> Iterator[Pool]:
    """``m`` and ``n``: SpinDouble (``x * 2 + 1``), up to 8 rows of 4 floats, 20 ms delay."""
    db = DynamicBatching(max_queue_delay_microseconds=20_000)
    with closing_pool(models=[batching("m", files["spin_double"], db), batching("n", files["spin_double"], db)]) as p:
        yield p


async def each(pool: Pool, model: str, inputs: list[Any], **kwargs: Any) -> list[Any]:
    """Every request sent at once (one turn); each one's first output, or its exception."""
    outs = await asyncio.wait_for(
        asyncio.gather(*(pool.infer_async(model, x, **kwargs) for x in inputs), return_exceptions=True), SOON
    )
    return [o if isinstance(o, BaseException) else o["OUTPUT__0"] for o in outs]


def named(xs: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    return [{"INPUT__0": x} for x in xs]


def test_requests_like_one_admitted_before_take_the_shortcut_and_get_their_own_rows(pool: Pool) -> None:
    asyncio.run(each(pool, "m", named([request(0), request(1)])))  # (two alike, the full way: remembered)
    taken, before = pool._shortcut.taken, stats_of(pool, "m")
    xs = [request(k, rows=1 + k % 3) for k in range(1, 13)]  # 1 to 3 rows each
    check_own_rows(xs, asyncio.run(each(pool, "m", named(xs), timeout=SOON)))
    check_own_rows(xs, asyncio.run(each(pool, "m", named(xs))))  # (no timeout: the model's)
    check_own_rows(xs, asyncio.run(each(pool, "m", named(xs), timeout=20)))  # (an int)
    assert pool._shortcut.taken - taken == 3 * len(xs)
    after = stats_of(pool, "m")
    assert after.success - before.success == 3 * len(xs)
    assert after.inferences - before.inferences == 3 * sum(x.shape[0] for x in xs)


def test_what_the_full_path_would_refuse_is_refused_as_it_would_be(pool: Pool) -> None:
    asyncio.run(each(pool, "m", named([request(0)])))
    taken, failed = pool._shortcut.taken, stats_of(pool, "m").failure
    bad: list[tuple[Any, dict[str, Any]]] = [
        ({"INPUT__0": request(1).double()}, {}),  # another dtype
        ({"INPUT__0": request(1, width=5)}, {}),  # another row shape
        ({"INPUT__0": request(1, rows=9)}, {}),  # more rows than a batch
        ({"INPUT__0": torch.empty(0, 4)}, {}),  # no rows
        ({"INPUT__1": request(1)}, {}),  # an input the model does not have
        ({"INPUT__0": request(1), "INPUT__1": request(1)}, {}),  # one too many
        ({"INPUT__0": request(1)}, {"timeout": -1.0}),
        ({"INPUT__0": request(1)}, {"timeout": float("nan")}),
        ({"INPUT__0": request(1)}, {"timeout": "1"}),
        ({"INPUT__0": request(1)}, {"timeout": -1}),
        ({"INPUT__0": request(1)}, {"timeout": True}),
    ]
    for inputs, kwargs in bad:
        [out] = asyncio.run(each(pool, "m", [inputs], **kwargs))
        assert isinstance(out, InvalidInputError), (inputs, kwargs, out)
    assert pool._shortcut.taken == taken
    assert stats_of(pool, "m").failure - failed == len(bad)
    xs = [request(k) for k in range(2, 6)]  # (and the model still serves, by the shortcut)
    check_own_rows(xs, asyncio.run(each(pool, "m", named(xs))))
    assert pool._shortcut.taken - taken == len(xs)


def test_requests_it_does_not_take_are_answered_the_full_way(pool: Pool) -> None:
    asyncio.run(each(pool, "m", named([request(0)])))
    taken = pool._shortcut.taken
    x = request(3, rows=2)
    strided = torch.cat([x, x], dim=1)[:, ::2]  # (not contiguous: the full path copies it)
    assert not strided.is_contiguous() and torch.equal(strided, x)
    [out] = asyncio.run(each(pool, "m", [{"INPUT__0": strided}]))
    check_own_rows([x], [out])
    [out] = asyncio.run(each(pool, "m", [{"INPUT__0": x}], timeout=np.float64(3.0)))  # (not a float itself)
    check_own_rows([x], [out])
    [out] = asyncio.run(each(pool, "m", [{"INPUT__0": x}], priority=None, version=1))
    check_own_rows([x], [out])
    [out] = asyncio.run(each(pool, "m", [{"INPUT__0": x}], timeout=0.0))  # (already past)
    assert isinstance(out, TimeoutError)
    assert pool._shortcut.taken == taken


def test_an_unloaded_model_is_not_served_from_what_was_remembered(files: dict[str, Path]) -> None:
    db = DynamicBatching(max_queue_delay_microseconds=1_000)
    with closing_pool(models=[batching("m", files["spin_double"], db)]) as pool:
        xs = [request(k) for k in range(4)]
        check_own_rows(xs, asyncio.run(each(pool, "m", named(xs))))
        assert pool._shortcut.taken > 0
        pool.unload("m")
        [out] = asyncio.run(each(pool, "m", named(xs[:1])))
        assert isinstance(out, UnknownModelError)
        pool.load(batching("m", files["spin_double"], db))
        taken = pool._shortcut.taken
        check_own_rows(xs, asyncio.run(each(pool, "m", named(xs))))  # (the new model's, learnt again)
        assert pool._shortcut.taken > taken
        pool.close()
        [out] = asyncio.run(each(pool, "m", named(xs[:1])))
        assert isinstance(out, PoolClosedError)


def test_event_loops_in_several_threads_share_it_and_each_caller_gets_its_own_rows(pool: Pool) -> None:
    asyncio.run(each(pool, "n", named([request(0)])))
    taken = pool._shortcut.taken
    results: dict[int, list[Any]] = {}
    inputs = {i: [request(100 * i + k, rows=1 + k % 3) for k in range(40)] for i in range(4)}

    def loop_thread(i: int) -> None:
        async def run() -> list[Any]:
            outs: list[Any] = []
            for start in range(0, 40, 10):  # (four turns of ten requests each)
                outs += await each(pool, "n", named(inputs[i][start : start + 10]), timeout=SOON)
            return outs

        results[i] = asyncio.run(run())

    threads = [threading.Thread(target=loop_thread, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(2 * SOON)
    assert sorted(results) == [0, 1, 2, 3]
    for i in range(4):
        check_own_rows(inputs[i], results[i])
    assert pool._shortcut.taken > taken  # (its counter is not exact across threads)


def test_a_pool_with_max_pending_admits_every_request_the_full_way(files: dict[str, Path]) -> None:
    db = DynamicBatching(max_queue_delay_microseconds=1_000)
    with closing_pool(models=[batching("m", files["spin_double"], db)], max_pending=1000) as pool:
        xs = [request(k) for k in range(6)]
        check_own_rows(xs, asyncio.run(each(pool, "m", named(xs))))
        check_own_rows(xs, asyncio.run(each(pool, "m", named(xs))))
        assert pool._shortcut.taken == 0  # (the full path counts what is pending)


# ── caller threads (Pool.infer) ──────────────────────────────────────────────


def test_caller_threads_take_it_too_and_each_gets_its_own_rows(pool: Pool) -> None:
    pool.infer("n", {"INPUT__0": request(0)}, timeout=SOON)  # (admitted the full way: remembered)
    taken, before = pool._shortcut.taken, stats_of(pool, "n")
    inputs = {i: [request(100 * i + k, rows=1 + k % 3) for k in range(12)] for i in range(6)}
    results: dict[int, list[Any]] = {}

    def caller(i: int) -> None:
        timeouts = (SOON, None, 20)  # (a float, the model's, an int)
        results[i] = [
            pool.infer("n", {"INPUT__0": x}, timeout=timeouts[k % 3])["OUTPUT__0"] for k, x in enumerate(inputs[i])
        ]

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(2 * SOON)
    assert sorted(results) == list(range(6))
    for i in range(6):
        check_own_rows(inputs[i], results[i])
    assert pool._shortcut.taken > taken  # (its counter is not exact across threads)
    after = stats_of(pool, "n")
    assert after.success - before.success == 6 * 12
    assert after.inferences - before.inferences == sum(x.shape[0] for xs in inputs.values() for x in xs)
    assert after.executions - before.executions < 6 * 12  # (batched with each other)


def test_from_a_thread_what_the_full_path_would_refuse_is_refused_as_it_would_be(pool: Pool) -> None:
    pool.infer("m", {"INPUT__0": request(0)})
    taken, failed = pool._shortcut.taken, stats_of(pool, "m").failure
    bad: list[tuple[Any, dict[str, Any]]] = [
        ({"INPUT__0": request(1).double()}, {}),  # another dtype
        ({"INPUT__0": request(1, width=5)}, {}),  # another row shape
        ({"INPUT__0": request(1, rows=9)}, {}),  # more rows than a batch
        ({"INPUT__1": request(1)}, {}),  # an input the model does not have
        ({"INPUT__0": request(1), "INPUT__1": request(1)}, {}),  # one too many
        ({"INPUT__0": request(1)}, {"timeout": -1.0}),
        ({"INPUT__0": request(1)}, {"timeout": "1"}),
        ({"INPUT__0": request(1)}, {"timeout": True}),
    ]
    for inputs, kwargs in bad:
        with pytest.raises(InvalidInputError):
            pool.infer("m", inputs, **kwargs)
    assert pool._shortcut.taken == taken
    assert stats_of(pool, "m").failure - failed == len(bad)  # (as infer_async's are counted)
    x = request(2, rows=2)
    strided = torch.cat([x, x], dim=1)[:, ::2]  # (not contiguous: the full path copies it)
    check_own_rows([x, x], [pool.infer("m", {"INPUT__0": t})["OUTPUT__0"] for t in (strided, x.clone())])
    assert pool._shortcut.taken == taken + 1  # (the contiguous one)
    with pytest.raises(TimeoutError):
        pool.infer("m", {"INPUT__0": x}, timeout=0.0)  # (already past: the full path says so)
    assert pool._shortcut.taken == taken + 1


# ── models the hub serves one request per execution ────────────────────────────


def one_per_execution(name: str, path: Path, max_batch_size: int, dims: list[int]) -> ModelConfig:
    """SpinDouble without dynamic_batching: the hub sends each request on its own."""
    return ModelConfig(name, path, max_batch_size=max_batch_size, inputs=[TensorSpec("INPUT__0", "float32", dims)])


@pytest.fixture(scope="module")
def alone(files: dict[str, Path]) -> Iterator[Pool]:
    """``rows``: up to 8 rows of 4 floats a request; ``whole``: no batch dimension, any
    number of rows of 4 floats (``[-1, 4]``)."""
    models = [
        one_per_execution("rows", files["spin_double"], 8, [4]),
        one_per_execution("whole", files["spin_double"], 0, [-1, 4]),
    ]
    with closing_pool(models=models) as p:
        yield p


@pytest.mark.parametrize("model", ["rows", "whole"])
def test_a_model_without_batching_is_served_by_it_from_threads_and_event_loops(alone: Pool, model: str) -> None:
    xs = [request(k, rows=2) for k in range(24)]
    first = [alone.infer(model, {"INPUT__0": x})["OUTPUT__0"] for x in xs[:2]]  # (two alike: remembered)
    taken, before = alone._shortcut.taken, stats_of(alone, model)
    from_thread = [alone.infer(model, {"INPUT__0": x}, timeout=SOON)["OUTPUT__0"] for x in xs[2:12]]
    assert alone._shortcut.taken - taken == 10
    from_loop = asyncio.run(each(alone, model, named(xs[12:]), timeout=SOON))
    assert alone._shortcut.taken - taken == 22
    check_own_rows(xs, first + from_thread + from_loop)
    after = stats_of(alone, model)
    assert after.success - before.success == 22
    assert after.executions - before.executions == 22  # (one request per execution)


def test_without_a_batch_dimension_another_shape_goes_the_full_way_and_shapes_that_vary_are_not_learnt(
    alone: Pool,
) -> None:
    two, three = request(1, rows=2), request(2, rows=3)
    for _ in range(2):
        alone.infer("whole", {"INPUT__0": two})
    taken = alone._shortcut.taken
    check_own_rows([three, two], [alone.infer("whole", {"INPUT__0": x})["OUTPUT__0"] for x in (three, two)])
    assert alone._shortcut.taken == taken + 1  # (the two rows, as learnt; three went the full way)
    for k in range(9):  # (1, 2, 3 rows in turn: the 1 and 3 go the full way, never alike in a row)
        x = request(k, rows=1 + k % 3)
        check_own_rows([x], [alone.infer("whole", {"INPUT__0": x})["OUTPUT__0"]])
    assert alone._shortcut.taken == taken + 1 + 3  # (the 2-row ones: what was learnt stayed)
    for k in range(6):  # (now 4 rows, again and again: learnt on the second)
        x = request(k, rows=4)
        check_own_rows([x], [alone.infer("whole", {"INPUT__0": x})["OUTPUT__0"]])
    assert alone._shortcut.taken == taken + 1 + 3 + 4

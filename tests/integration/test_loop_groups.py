"""The requests an event loop makes in one turn to a batching model reach the hub as one
request of all their rows (front/groups.py), on real pools: each caller still gets its
own rows, a turn that overfills a batch is split, arena inputs go on their own, and a
caller that stops waiting leaves its group (or, when it was the last, abandons it)."""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from libtorchrt import DynamicBatching, ModelConfig, Pool, TensorSpec
from libtorchrt.errors import InvalidInputError, TimeoutError
from libtorchrt.transport import lanes
from tests.conftest import assert_no_leaks, closing_pool, snapshot, wait_for
from tests.integration.test_fast_lane import lane_served
from tests.integration.test_lane_batching import (
    SOON,
    WIDE,
    batches_since,
    batching,
    check_answers,
    files,
    gather_on,
    request,
    stats_of,
)
from tests.models import save

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not lanes.available, reason="the native hub is not built here"),
]

__all__ = ["files"]  # (the module-scoped fixture, shared)


class Labels(torch.nn.Module):
    """One string a row: ``"row<k>"`` for a row whose first value is k."""

    def forward(self, x: torch.Tensor) -> list[str]:
        out: list[str] = []
        for i in range(x.size(0)):
            out.append("row" + str(int(x[i, 0])))
        return out


@pytest.fixture(scope="module")
def pool(files: dict[str, Path]) -> Iterator[Pool]:
    """``m``: SpinDouble, up to 8 rows, a 50 ms delay; ``wide``: the same on rows of
    ``WIDE`` floats (its inputs travel in the request arena); ``one``: one instance, no
    delay (a batch waits only for its worker); ``add``: Add (a + b), a 50 ms delay;
    ``labels``: Labels (strings out), a 50 ms delay."""
    spin = files["spin_double"]
    labels = spin.parent / "labels.pt"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # (TorchScript's)
        torch.jit.script(Labels()).save(str(labels))
    add = ModelConfig(
        "add",
        save("add", files["spin_double"].parent),
        max_batch_size=8,
        inputs=[TensorSpec("INPUT__0", "float32", [4]), TensorSpec("INPUT__1", "float32", [4])],
        dynamic_batching=DynamicBatching(max_queue_delay_microseconds=50_000),
    )
    with closing_pool(
        models=[
            batching("m", spin, DynamicBatching(max_queue_delay_microseconds=50_000)),
            batching("wide", spin, DynamicBatching(max_queue_delay_microseconds=50_000), [WIDE]),
            batching("one", spin, DynamicBatching()),
            add,
            batching("labels", labels, DynamicBatching(max_queue_delay_microseconds=50_000), [2]),
        ]
    ) as p:
        yield p


def test_a_turns_requests_reach_the_hub_as_one_and_each_gets_its_own_rows(pool: Pool) -> None:
    before, served = stats_of(pool, "m"), lane_served(pool, "m")
    xs = [request(k, rows=1 + k % 2) for k in range(5)]  # 1+2+1+2+1 = 7 rows
    check_answers(xs, asyncio.run(gather_on(pool, "m", xs, timeout=SOON)))
    after = stats_of(pool, "m")
    assert lane_served(pool, "m") - served == 1  # one request of 7 rows, not five
    assert (after.success - before.success, after.inferences - before.inferences) == (5, 7)
    assert batches_since(before, after) == {7: 1}


def test_a_turns_string_outputs_are_split_among_its_callers_too(pool: Pool) -> None:
    # (the group's reply holds a list of strings, one per row, not a tensor to split:
    # its members' callers once waited forever, the loop's reader having raised)
    before, served = stats_of(pool, "labels"), lane_served(pool, "labels")
    xs = [torch.tensor([[float(k), 0.0]] * (1 + k % 2)) for k in range(4)]  # 1+2+1+2 rows
    outs = asyncio.run(gather_on(pool, "labels", xs))
    assert outs == [[f"row{k}"] * (1 + k % 2) for k in range(4)]
    assert lane_served(pool, "labels") - served == 1
    assert stats_of(pool, "labels").success - before.success == 4


def test_a_turn_that_overfills_a_batch_is_split(pool: Pool) -> None:
    before, served = stats_of(pool, "m"), lane_served(pool, "m")
    xs = [request(100 + k) for k in range(20)]
    check_answers(xs, asyncio.run(gather_on(pool, "m", xs, timeout=SOON)))
    after = stats_of(pool, "m")
    assert lane_served(pool, "m") - served == 3  # 8 + 8 + 4 rows
    assert after.success - before.success == 20
    sizes = batches_since(before, after)
    assert max(sizes) <= 8 and sum(n * k for n, k in sizes.items()) == 20


def test_requests_whose_inputs_travel_in_the_arena_go_on_their_own(pool: Pool) -> None:
    before, served = stats_of(pool, "wide"), lane_served(pool, "wide")
    xs = [request(200 + k, width=WIDE) for k in range(3)]
    check_answers(xs, asyncio.run(gather_on(pool, "wide", xs, timeout=SOON)))
    assert lane_served(pool, "wide") - served == 3
    assert batches_since(before, stats_of(pool, "wide")) == {3: 1}  # (the hub still batched them)


def test_a_caller_cancelled_in_the_turn_it_asked_never_runs(pool: Pool) -> None:
    before, served = stats_of(pool, "m"), lane_served(pool, "m")
    xs = [request(300 + k) for k in range(3)]

    async def main() -> list[Any]:
        tasks = [asyncio.ensure_future(pool.infer_async("m", x, timeout=SOON)) for x in xs]
        await asyncio.sleep(0)  # (their first steps: each joined the turn's group)
        tasks[1].cancel()  # (before the group is sent, at the end of that turn)
        return await asyncio.gather(*tasks, return_exceptions=True)

    outs = asyncio.run(main())
    assert isinstance(outs[1], asyncio.CancelledError)
    check_answers([xs[0], xs[2]], [outs[0]["OUTPUT__0"], outs[2]["OUTPUT__0"]])
    after = stats_of(pool, "m")
    assert lane_served(pool, "m") - served == 1
    assert (after.success - before.success, after.inferences - before.inferences) == (2, 2)
    assert batches_since(before, after) == {2: 1}


async def _until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + SOON
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.002)


def test_a_group_whose_callers_all_stop_waiting_never_runs_and_the_others_still_do(pool: Pool) -> None:
    """Behind a slow request on the one worker, a group of three waits in the hub. A
    deadline passing for one member leaves the others waiting: the group runs, and they
    get their rows. Cancelling every member of a second group abandons it: it never
    runs, and the pool keeps serving."""
    fast = pool._router.fast
    (worker,) = pool._router.default["one"].workers
    before = stats_of(pool, "one")

    async def main() -> tuple[list[Any], list[Any]]:
        slow = torch.full((1, 4), 300_000.0)  # (a second or less of spinning)
        busy = asyncio.ensure_future(pool.infer_async("one", slow, timeout=SOON))
        await _until(lambda: fast.inflight(worker) == 1, "the slow request to reach the worker")
        xs = [request(400 + k) for k in range(3)]
        timeouts = [SOON, 0.05, SOON]
        kept = [asyncio.ensure_future(pool.infer_async("one", x, timeout=t)) for x, t in zip(xs, timeouts)]
        await _until(lambda: fast.pending() == 2, "the first group to wait in the hub")
        dropped = [asyncio.ensure_future(pool.infer_async("one", request(500 + k), timeout=SOON)) for k in range(3)]
        await _until(lambda: fast.pending() == 3, "the second group to wait in the hub")
        for t in dropped:
            t.cancel()
        await _until(lambda: fast.pending() == 2, "the second group to be abandoned")
        assert not busy.done()
        outs = await asyncio.gather(*kept, return_exceptions=True)
        assert torch.equal((await busy)["OUTPUT__0"], slow * 2 + 1)
        gone = await asyncio.gather(*dropped, return_exceptions=True)
        return [xs, outs], gone

    (xs, outs), gone = asyncio.run(main())
    assert isinstance(outs[1], TimeoutError), outs[1]
    check_answers([xs[0], xs[2]], [outs[0]["OUTPUT__0"], outs[2]["OUTPUT__0"]])
    assert all(isinstance(o, asyncio.CancelledError) for o in gone), gone
    after = stats_of(pool, "one")
    assert batches_since(before, after) == {1: 1, 3: 1}  # the slow one, and the first group's three rows
    assert (after.success - before.success, after.failure - before.failure) == (3, 1)
    assert fast.pending() == 0
    x = request(600)
    assert torch.equal(asyncio.run(pool.infer_async("one", x, timeout=SOON))["OUTPUT__0"], x * 2 + 1)


def test_a_request_whose_inputs_disagree_on_their_rows_is_refused_alone(pool: Pool) -> None:
    """Add would broadcast ``a`` of 2 rows with ``b`` of 1, but a batching model's
    inputs share their first dimension: that request is refused with a typed error
    naming it, before it can join (and fail) a batch; the others of its turn get their
    sums."""
    g = torch.Generator().manual_seed(7)
    good = [(torch.randn(1, 4, generator=g), torch.randn(1, 4, generator=g)) for _ in range(3)]
    odd = (torch.randn(2, 4, generator=g), torch.randn(1, 4, generator=g))

    async def main() -> list[Any]:
        pairs = [good[0], odd, good[1], good[2]]
        return await asyncio.gather(
            *(pool.infer_async("add", {"INPUT__0": a, "INPUT__1": b}, timeout=SOON) for a, b in pairs),
            return_exceptions=True,
        )

    outs = asyncio.run(main())
    assert isinstance(outs[1], InvalidInputError) and "input 1 of shape [1, 4]" in str(outs[1]), outs[1]
    for k, (a, b) in zip((0, 2, 3), good):
        assert not isinstance(outs[k], BaseException), outs[k]
        assert torch.equal(outs[k]["OUTPUT__0"], a + b), k
    with pytest.raises(InvalidInputError, match="same rows"):
        pool.infer("add", {"INPUT__0": odd[0], "INPUT__1": odd[1]}, timeout=SOON)  # (threads: the router's batcher)


def test_a_loop_closed_with_its_groups_reply_unread_does_not_hold_up_a_drained_close(files: dict[str, Path]) -> None:
    """As for a request alone (test_fast_lane.py): a group's reply that came in after its
    loop's last turn is read by nobody, and the pool's drained close drops it at once."""
    before = snapshot()
    pool = Pool(models=[batching("m", files["spin_double"], DynamicBatching())])
    fast = pool._router.fast
    (worker,) = pool._router.default["m"].workers
    loop = asyncio.new_event_loop()
    tasks = [loop.create_task(gather_on(pool, "m", [request(5_000 + k)])) for k in range(3)]
    loop.run_until_complete(asyncio.sleep(0.01))  # (the turn ended: its group went to the hub)
    wait_for(lambda: fast.served(worker) == 1, what="the group's reply")
    assert fast.pending() == 1
    for t in tasks:
        t._log_destroy_pending = False  # type: ignore[attr-defined]  # (its loop is closed under it on purpose)
    loop.close()
    start = time.monotonic()
    pool.close(grace=30.0)
    assert time.monotonic() - start < 10, "the close waited for a reply nobody could read"
    del tasks
    assert_no_leaks(before)

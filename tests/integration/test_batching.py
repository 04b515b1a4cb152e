"""Dynamic batching: batches formed by Triton's rules, each request getting its own
rows back, ordering, the delay bound, preferred sizes, shapes never merged, bounded
queues, queue timeouts (REJECT and DELAY), priorities and the statistics."""

from __future__ import annotations

import os
import signal
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from libtorchrt import (
    DynamicBatching,
    InvalidInputError,
    ModelConfig,
    ModelError,
    Pool,
    QueueFullError,
    QueuePolicy,
    TensorSpec,
    TimeoutError,
)
from tests.conftest import run_threads, wait_for
from tests.models import SpinDouble

#: max_queue_delay_microseconds no wait of these tests comes near: a batch that leaves
#: before it left for another reason (a preferred size, a full batch)
NEVER = 600_000_000
#: seconds allowed for what happens without waiting for a delay (generous: a busy VM)
SOON = 10.0


class DropsARow(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x[1:]


class Kinds(nn.Module):
    """Outputs of three kinds: float32 rows, bfloat16 rows (no numpy dtype: the
    front splits a tensor, not an array) and one int64 per row."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return x * 2, (x + 0.5).to(torch.bfloat16), x.sum(1).to(torch.int64)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("batching")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        for name, cls in (("spin", SpinDouble), ("drops", DropsARow), ("kinds", Kinds)):
            torch.jit.script(cls()).save(str(d / f"{name}.pt"))
    return d


@pytest.fixture
def batching_pool(models_dir: Path, make_pool: Callable[..., Pool]) -> Callable[..., Pool]:
    def make(
        instances: int = 1,
        max_batch_size: int = 8,
        dims: list[int] | None = None,
        model: str = "spin",
        inline_threshold: int | None = None,
        **db: Any,
    ) -> Pool:
        cfg = ModelConfig(
            "m",
            models_dir / f"{model}.pt",
            instances=instances,
            max_batch_size=max_batch_size,
            inputs=[TensorSpec("INPUT__0", "float32", dims or [4])],
            dynamic_batching=DynamicBatching(**db),
        )
        return make_pool(cfg) if inline_threshold is None else make_pool(cfg, inline_threshold=inline_threshold)

    return make


def rows(*values: float, width: int = 4) -> Tensor:
    return torch.tensor([[float(v)] * width for v in values])


def test_every_request_gets_its_own_rows_under_concurrency(batching_pool: Callable[..., Pool]) -> None:
    pool = batching_pool(instances=2, max_batch_size=16, max_queue_delay_microseconds=2000)
    errors: list[str] = []

    def caller(k: int) -> None:
        for i in range(40):
            n = 1 + (k + i) % 4  # 1..4 rows, each row unique to this request
            x = torch.tensor([[-float(k * 10_000 + i * 10 + r)] * 4 for r in range(n)])  # < 0: no spin
            out = pool.infer("m", x)["OUTPUT__0"]
            if out.shape != x.shape or not torch.equal(out, x * 2 + 1):
                errors.append(f"caller {k} request {i}: {out[:, 0].tolist()} for {x[:, 0].tolist()}")

    run_threads(caller, 12)
    assert not errors, errors[:5]
    (stats,) = pool.stats()
    assert stats.success == 480 and stats.failure == 0
    assert stats.inferences == sum(1 + (k + i) % 4 for k in range(12) for i in range(40))
    assert stats.executions < stats.success  # requests were batched together
    assert max(stats.batch_sizes) <= 16
    assert sum(stats.batch_sizes.values()) == stats.executions


@pytest.mark.parametrize("big", [False, True], ids=["all-in-header", "one-in-the-arena"])
def test_a_batch_reads_each_members_rows_however_they_travel(batching_pool: Callable[..., Pool], big: bool) -> None:
    # Inputs of up to 32 bytes travel inside the header: four one-row requests are
    # joined by the front into one input of four rows; a four-row request (64 bytes)
    # goes to the arena instead, and the worker then gathers the members' own inputs.
    pool = batching_pool(
        max_batch_size=8,
        inline_threshold=32,
        preferred_batch_size=[7 if big else 4],
        max_queue_delay_microseconds=5_000_000,
    )
    pool.infer("m", rows(-1))  # started: the next requests wait together for a batch
    sizes = [1, 1, 4, 1] if big else [1, 1, 1, 1]
    xs = [torch.tensor([[-float(10 * i + r)] * 4 for r in range(n)]) for i, n in enumerate(sizes)]
    futures = [pool.submit("m", x) for x in xs]
    for x, f in zip(xs, futures):
        assert torch.equal(f.result(10)["OUTPUT__0"], x * 2 + 1)
    assert pool.stats()[0].batch_sizes == {1: 1, sum(sizes): 1}


def test_outputs_of_every_kind_are_split_back_by_rows(batching_pool: Callable[..., Pool]) -> None:
    pool = batching_pool(model="kinds", instances=1, max_batch_size=16, max_queue_delay_microseconds=20_000)
    errors: list[str] = []

    def caller(k: int) -> None:
        for i in range(15):
            n = 1 + (k + i) % 3
            x = torch.tensor([[float(k * 100 + i * 4 + r)] * 4 for r in range(n)])
            out = pool.infer("m", x)
            want = (x * 2, (x + 0.5).to(torch.bfloat16), x.sum(1).to(torch.int64))
            got = (out["OUTPUT__0"], out["OUTPUT__1"], out["OUTPUT__2"])
            for g, w in zip(got, want):
                if g.dtype != w.dtype or g.shape != w.shape or not torch.equal(g, w):
                    errors.append(f"caller {k} request {i}: {g.tolist()} for {w.tolist()}")

    run_threads(caller, 8)
    assert not errors, errors[:5]
    assert pool.stats()[0].executions < 120  # requests were batched together


def test_the_statistics_time_every_member_of_a_batch(batching_pool: Callable[..., Pool]) -> None:
    pool = batching_pool(preferred_batch_size=[4], max_queue_delay_microseconds=5_000_000)
    start = time.perf_counter_ns()
    futures = [pool.submit("m", rows(-i - 1)) for i in range(4)]  # one batch of four
    for f in futures:
        f.result(10)
    wall = time.perf_counter_ns() - start
    (stats,) = pool.stats()
    assert (stats.success, stats.inferences, stats.executions) == (4, 4, 1)
    # each request's time is its queueing (until the batch left) plus the batch's run
    assert stats.queue_ns + stats.compute_ns == stats.request_ns
    assert 0 < stats.compute_ns <= stats.request_ns <= 4 * wall
    assert stats.latency[-1][1] == 4  # the histogram counts every request, within the wall time
    assert all(count == 4 for bound, count in stats.latency if bound * 1e9 >= wall)


def test_members_views_share_the_batch_memory_and_outlive_each_other(batching_pool: Callable[..., Pool]) -> None:
    pool = batching_pool(preferred_batch_size=[4], max_queue_delay_microseconds=5_000_000)
    pool.infer("m", rows(*range(4)))  # warm up: one execution
    futures = [pool.submit("m", rows(-i - 1)) for i in range(4)]  # one batch of four
    outs = [f.result(10)["OUTPUT__0"] for f in futures]
    assert pool.stats()[0].executions == 2
    # Views of one output, no copies: each member's rows lie where the worker wrote them.
    base = outs[0].data_ptr()
    assert [o.data_ptr() - base for o in outs] == [i * 4 * 4 for i in range(4)]
    kept = outs.pop(2)
    del outs, futures
    # The batch's memory is still held by the kept view: later responses go elsewhere.
    for _ in range(20):
        assert pool.infer("m", rows(*range(4)))["OUTPUT__0"][:, 0].tolist() == [1.0, 3.0, 5.0, 7.0]
    assert torch.equal(kept, rows(-5.0))  # -3 * 2 + 1, untouched


def test_a_lone_request_waits_at_most_the_queue_delay(batching_pool: Callable[..., Pool]) -> None:
    pool = batching_pool(max_queue_delay_microseconds=300_000)
    pool.infer("m", rows(1), timeout=SOON)  # warm the model up
    start = time.monotonic()
    # It leaves once the delay is over, though nothing else happens (no request, no
    # reply): the router wakes for it by itself.
    assert pool.submit("m", rows(2)).result(SOON)["OUTPUT__0"][0, 0].item() == 5.0
    assert time.monotonic() - start >= 0.3  # it waited for others to join it
    assert pool.stats()[0].batch_sizes == {1: 2}


def test_a_preferred_size_leaves_at_once(batching_pool: Callable[..., Pool]) -> None:
    pool = batching_pool(preferred_batch_size=[4], max_queue_delay_microseconds=NEVER)
    pool.infer("m", rows(*range(4)), timeout=SOON)  # one request of 4 rows: preferred, at once
    futures = [pool.submit("m", rows(i)) for i in range(4)]  # four of one row each
    outs = [f.result(SOON)["OUTPUT__0"] for f in futures]
    assert [o[0, 0].item() for o in outs] == [1.0, 3.0, 5.0, 7.0]
    assert pool.stats()[0].batch_sizes == {4: 2}


def test_a_batch_the_next_request_does_not_fit_leaves_at_once(batching_pool: Callable[..., Pool]) -> None:
    pool = batching_pool(max_batch_size=4, max_queue_delay_microseconds=NEVER)
    pool.infer("m", rows(*range(4)), timeout=SOON)  # warm up (4 rows: full, at once)
    three = pool.submit("m", rows(1, 2, 3))
    two = pool.submit("m", rows(4, 5))  # 3 + 2 > 4: the first batch cannot grow
    assert three.result(SOON)["OUTPUT__0"][:, 0].tolist() == [3.0, 5.0, 7.0]
    assert not two.done()  # it waits for rows to join it, up to the delay
    pool.submit("m", rows(6, 7)).result(SOON)  # 2 + 2 = 4 rows: full
    assert two.result(SOON)["OUTPUT__0"][:, 0].tolist() == [9.0, 11.0]
    assert pool.stats()[0].batch_sizes == {4: 2, 3: 1}


def test_requests_of_other_shapes_are_never_merged(batching_pool: Callable[..., Pool]) -> None:
    pool = batching_pool(dims=[-1], max_queue_delay_microseconds=100_000)
    futures = [pool.submit("m", rows(i, width=3 if i % 2 else 5)) for i in range(6)]
    for i, f in enumerate(futures):
        out = f.result(10)["OUTPUT__0"]
        assert out.shape == (1, 3 if i % 2 else 5) and torch.all(out == 2 * i + 1)
    stats = pool.stats()[0]
    assert stats.executions >= 2 and stats.inferences == 6


def test_more_rows_than_max_batch_size_are_refused(batching_pool: Callable[..., Pool]) -> None:
    pool = batching_pool(max_batch_size=4)
    with pytest.raises(InvalidInputError, match="max_batch_size=4"):
        pool.infer("m", rows(*range(5)))
    assert pool.stats()[0].failure == 1


def test_a_full_queue_refuses_at_once(batching_pool: Callable[..., Pool]) -> None:
    pool = batching_pool(max_queue_delay_microseconds=2_000_000, default_queue_policy=QueuePolicy(max_queue_size=2))
    futures = [pool.submit("m", rows(i)) for i in range(2)]
    wait_for(lambda: pool.health()["m"].queued == 2, SOON, "the router to queue both")
    with pytest.raises(QueueFullError, match="max_queue_size=2"):
        pool.submit("m", rows(9))  # refused at once: submit() itself raises
    assert [f.result(10)["OUTPUT__0"][0, 0].item() for f in futures] == [1.0, 3.0]


def test_max_pending_bounds_the_whole_pool(models_dir: Path, make_pool: Callable[..., Pool]) -> None:
    cfg = ModelConfig("m", models_dir / "spin.pt", max_batch_size=8, inputs=[TensorSpec("INPUT__0", "float32", [4])])
    pool = make_pool(cfg, max_pending=3)
    slow = [pool.submit("m", rows(300_000)) for _ in range(3)]
    with pytest.raises(QueueFullError, match="max_pending=3"):
        pool.submit("m", rows(1))
    for f in slow:
        f.result(60)
    assert pool.infer("m", rows(1))["OUTPUT__0"][0, 0].item() == 3.0  # room again


@pytest.mark.parametrize("action", ["REJECT", "DELAY"])
def test_queue_timeout_rejects_or_delays(batching_pool: Callable[..., Pool], action: str) -> None:
    pool = batching_pool(
        max_queue_delay_microseconds=NEVER if action == "REJECT" else 600_000,
        default_queue_policy=QueuePolicy(timeout_action=action, default_timeout_microseconds=100_000),
    )
    start = time.monotonic()
    if action == "REJECT":
        with pytest.raises(TimeoutError, match="deadline"):  # at its queue timeout: the delay never ends
            pool.submit("m", rows(2)).result(SOON)
        assert pool.health()["m"].queued == 0  # and dropped
    else:
        assert pool.infer("m", rows(2))["OUTPUT__0"][0, 0].item() == 5.0  # waited on, then served
        assert time.monotonic() - start >= 0.5


def test_a_request_timeout_override_is_honoured_when_allowed(batching_pool: Callable[..., Pool]) -> None:
    pool = batching_pool(
        max_queue_delay_microseconds=NEVER,
        default_queue_policy=QueuePolicy(default_timeout_microseconds=60_000_000, allow_timeout_override=True),
    )
    # (its own 0.1 s, not the queue's 60 s: the wait for it is far shorter than that)
    # A request's own deadline applies whatever allow_timeout_override says (see
    # docs/batching.md), so this passes without the override too: the flag has no
    # effect of its own for a test to see.
    with pytest.raises(TimeoutError, match="deadline"):
        pool.submit("m", rows(2), timeout=0.1).result(SOON)


def test_higher_priority_requests_go_first(batching_pool: Callable[..., Pool]) -> None:
    pool = batching_pool(max_batch_size=1, priority_levels=2, default_priority_level=2)
    busy = [pool.submit("m", rows(400_000, width=4)) for _ in range(2)]  # fills the instance's two slots
    wait_for(lambda: pool.workers()[0].inflight == 2, SOON, "both to reach the worker")
    done: list[str] = []
    low = pool.submit("m", rows(1))
    high = pool.submit("m", rows(2), priority=1)
    low.add_done_callback(lambda f: done.append("low"))
    high.add_done_callback(lambda f: done.append("high"))
    for f in [*busy, low, high]:
        f.result(60)
    assert done == ["high", "low"]
    with pytest.raises(InvalidInputError, match="priority"):
        pool.infer("m", rows(1), priority=3)


@pytest.mark.parametrize("preserve", [True, False])
def test_preserve_ordering_hands_results_out_in_request_order(
    batching_pool: Callable[..., Pool], preserve: bool
) -> None:
    # Two instances, one request per batch: a slow first request and fast ones after it.
    pool = batching_pool(instances=2, max_batch_size=1, preserve_ordering=preserve)
    done: list[int] = []
    futures = [pool.submit("m", rows(600_000 if i == 0 else i)) for i in range(6)]
    for i, f in enumerate(futures):
        f.add_done_callback(lambda f, i=i: done.append(i))
    for f in futures:
        f.result(60)
    if preserve:
        assert done == list(range(6))
    else:
        assert done[0] != 0  # the fast ones overtook it: the test can tell the difference


def test_a_model_that_drops_rows_fails_the_batch_clearly(batching_pool: Callable[..., Pool]) -> None:
    pool = batching_pool(model="drops")
    with pytest.raises(ModelError, match="one row per input row"):
        pool.infer("m", rows(1, 2))


def test_a_batch_whose_worker_dies_is_sent_again_whole(batching_pool: Callable[..., Pool]) -> None:
    pool = batching_pool(instances=2, max_batch_size=8, preferred_batch_size=[4], max_queue_delay_microseconds=NEVER)
    # A slow batch of exactly four requests (the preferred size; the first row makes a
    # fresh worker spin for a second or two), then its worker is killed while it runs.
    futures = [pool.submit("m", rows(200_000 if i == 0 else -i)) for i in range(4)]
    wait_for(lambda: any(w.inflight for w in pool.workers()), SOON, "the batch to reach a worker")
    busy = next(w for w in pool.workers() if w.inflight)
    os.kill(busy.pid, signal.SIGKILL)
    outs = [f.result(120)["OUTPUT__0"] for f in futures]  # re-sent once (max_retries=1), as a batch
    assert [o[0, 0].item() for o in outs] == [400_001.0, -1.0, -3.0, -5.0]
    assert pool.health()["m"].instances[0].restarts + pool.health()["m"].instances[1].restarts == 1
    # One execution was answered: the same four together (the killed one is never counted).
    assert pool.stats()[0].batch_sizes == {4: 1}

"""A model's request queues behind one interface (front/queues.py, front/batcher.py).

Real records: a model with a real (memfd) request arena, calls whose inputs are placed
in it, and their real futures; no worker process is needed to ask a queue what it
sends next.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from libtorchrt import DynamicBatching, InvalidInputError, ModelConfig, QueueFullError, QueuePolicy
from libtorchrt.front.batch import Batch
from libtorchrt.front.batcher import Batcher
from libtorchrt.front.call import Call
from libtorchrt.front.queues import Fifo, RequestQueue
from libtorchrt.front.records import _Model
from libtorchrt.transport import tensors as tensor_io
from libtorchrt.transport.arena import Allocator, Arena


@pytest.fixture
def model() -> Iterator[_Model]:
    arena = Arena(1 << 20, name="test-queues")
    cfg = ModelConfig(
        name="m",
        path="m.pt",
        max_batch_size=8,
        dynamic_batching=DynamicBatching(
            max_queue_delay_microseconds=0, default_queue_policy=QueuePolicy(max_queue_size=2)
        ),
    )
    m = _Model(cfg, arena, Allocator(arena.size))
    yield m
    arena.close()


def _call(m: _Model, rows: int = 1, numel: int = 4096) -> Call:
    """A call whose input (16 KiB a row: placed in the arena, not inline) is in ``m``'s arena."""
    x = torch.zeros(rows, numel)
    call = Call(m, tensor_io.write([x], m.arena, m.allocator, inline_threshold=1024))
    call.rows = rows  # (as admission sets it for a model with max_batch_size)
    return call


def _used(m: _Model) -> int:
    return m.allocator.used


def test_both_queues_are_request_queues(model: _Model) -> None:
    queues: list[RequestQueue] = [Fifo("m", 4), Batcher(model)]
    assert [q.per_worker for q in queues] == [4, 2]
    assert [q.host_only for q in queues] == [False, True]


def test_fifo_sends_in_order_and_marks_each_running(model: _Model) -> None:
    q = Fifo("m", 4)
    calls = [_call(model) for _ in range(3)]
    for c in calls:
        q.add(c, 0.0)
    assert len(q) == 3 and q.head_device() is None
    taken = [q.take(0.0) for _ in range(3)]
    assert taken == calls
    assert all(c.dispatched and c.future.running() for c in calls)
    assert q.take(0.0) is None and q.wake_at() is None


def test_fifo_drops_a_cancelled_request_and_frees_its_slot(model: _Model) -> None:
    q = Fifo("m", 4)
    first, second = _call(model), _call(model)
    q.add(first, 0.0)
    q.add(second, 0.0)
    before = _used(model)
    assert first.future.cancel()
    assert q.take(0.0) is second
    assert _used(model) < before, "the cancelled request's arena slot was not freed"
    assert not first.dispatched


def test_fifo_head_device_skips_finished_heads_without_marking_the_next(model: _Model) -> None:
    q = Fifo("m", 4)
    first, second = _call(model), _call(model)
    second.device = 1
    q.add(first, 0.0)
    q.add(second, 0.0)
    first.future.cancel()
    assert q.head_device() == 1
    assert not second.future.running(), "asking where the head goes must not make it uncancellable"
    assert second.future.cancel()


def test_fifo_requeues_ahead_of_newer_requests_in_order(model: _Model) -> None:
    q = Fifo("m", 4)
    a, b, c = _call(model), _call(model), _call(model)
    q.add(a, 0.0)
    q.add(b, 0.0)
    assert q.take(0.0) is a and q.take(0.0) is b
    q.add(c, 0.0)
    q.requeue([a, b], 0.0)  # their worker died before running them
    assert [q.take(0.0) for _ in range(3)] == [a, b, c]


def test_fifo_requeued_request_whose_deadline_passed_is_not_sent(model: _Model) -> None:
    q = Fifo("m", 4)
    a = _call(model)
    q.add(a, 0.0)
    assert q.take(0.0) is a
    a.future.set_exception(TimeoutError("deadline"))
    q.requeue([a], 0.0)
    assert q.take(0.0) is None


def test_fifo_refuses_a_priority_and_remove_and_drain(model: _Model) -> None:
    q = Fifo("m", 4)
    with pytest.raises(InvalidInputError, match="priority"):
        q.level(1)
    assert q.level(None) == 0
    a, b = _call(model), _call(model)
    q.add(a, 0.0)
    q.add(b, 0.0)
    assert q.remove(a) and not q.remove(a)
    assert q.drain() == [b] and len(q) == 0


def test_batcher_takes_a_batch_through_the_same_interface(model: _Model) -> None:
    q = Batcher(model)
    calls = [_call(model, rows=2) for _ in range(3)]
    for c in calls:
        q.add(c, 0.0)
    assert q.head_device() is None and q.wake_at() == 0.0
    batch = q.take(0.0)
    assert isinstance(batch, Batch) and batch.members == calls and batch.rows == 6
    assert batch.dispatched and batch.id == 0  # the router numbers it as it leaves
    assert all(c.future.running() for c in calls)


def test_batcher_requeue_puts_members_back_at_the_head(model: _Model) -> None:
    q = Batcher(model)
    a, b = _call(model), _call(model)
    q.add(a, 0.0)
    batch = q.take(0.0)
    assert batch is not None
    q.add(b, 1.0)
    q.requeue([batch], 2.0)
    again = q.take(2.0)
    assert isinstance(again, Batch) and again.members == [a, b]


def test_batcher_admission_refuses_empty_and_full(model: _Model) -> None:
    q = Batcher(model)
    with pytest.raises(InvalidInputError, match="at least 1 row"):
        q.admit(0, [torch.zeros(0, 3)])
    q.add(_call(model), 0.0)
    q.add(_call(model), 0.0)
    with pytest.raises(QueueFullError):
        q.admit(0, [torch.zeros(1, 3)])

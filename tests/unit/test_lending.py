"""LendingAllocator: blocks of a real request arena lent as tensors (transport/lending.py)."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

from libtorchrt.transport.arena import Arena
from libtorchrt.transport.lending import LendingAllocator

KIB = 1024


@pytest.fixture
def slots() -> LendingAllocator:
    arena = Arena(1 << 20)
    return LendingAllocator(arena, lend_limit=512 * KIB)


def _where(slots: LendingAllocator, t: torch.Tensor) -> int:
    return t.data_ptr() - slots._arena.flat.data_ptr()


def test_a_lent_tensor_is_the_arena_memory(slots: LendingAllocator) -> None:
    t = slots.lend(64 * KIB, torch.float32, (16, KIB))
    assert t is not None and t.shape == (16, KIB) and t.dtype == torch.float32
    t.fill_(1.5)
    at = _where(slots, t)
    assert torch.equal(slots._arena.view(at, 64 * KIB, torch.float32, (16, KIB)), t)
    assert slots.lent_bytes == 64 * KIB and slots.used == 64 * KIB


def test_adopt_names_lent_memory_and_nothing_else(slots: LendingAllocator) -> None:
    t = slots.lend(64 * KIB, torch.float32, (16, KIB))
    assert t is not None
    at = _where(slots, t)
    assert slots.adopt(t) == at
    assert slots.adopt(t[4:]) == at + 4 * KIB * 4  # a contiguous view: its own bytes
    assert slots.adopt(t.t()) is None  # not contiguous: copied
    assert slots.adopt(torch.ones(16, KIB)) is None  # elsewhere
    copied = slots.alloc(64 * KIB)
    assert copied is not None
    assert slots.adopt(slots._arena.view(copied, 64 * KIB, torch.float32, (16, KIB))) is None  # a slot, not lent
    assert slots.lends(t) and slots.lends(t[1:]) and not slots.lends(torch.ones(4))
    assert not slots.lends(t.t())  # (copied: not contiguous)


def test_the_block_lives_while_the_tensor_or_a_request_holds_it(slots: LendingAllocator) -> None:
    t = slots.lend(64 * KIB, torch.float32, (16, KIB))
    assert t is not None
    first = slots.adopt(t)
    second = slots.adopt(t[8:])
    assert first is not None and second is not None
    view = t[2:3]
    del t
    gc.collect()
    assert slots.lent_bytes == 64 * KIB  # a view and two requests hold it
    slots.free(first)
    del view
    gc.collect()
    assert slots.lent_bytes == 64 * KIB  # one request still does
    slots.free(second)
    assert slots.lent_bytes == 0 and slots.used == 0
    with pytest.raises(ValueError, match="no allocated slot"):
        slots.free(second)


def test_ordinary_slots_free_as_before(slots: LendingAllocator) -> None:
    t = slots.lend(64 * KIB, torch.uint8, (64 * KIB,))
    a = slots.alloc(1000)
    assert a is not None
    slots.free(a)
    with pytest.raises(ValueError, match="no allocated slot"):
        slots.free(a)
    assert slots.lent_bytes == 64 * KIB
    del t


def test_the_lend_limit_and_a_full_arena(slots: LendingAllocator) -> None:
    held = [slots.lend(128 * KIB, torch.uint8, (128 * KIB,)) for _ in range(5)]
    assert [t is not None for t in held] == [True] * 4 + [False]  # 512 KiB at most
    rest = slots.alloc(512 * KIB)
    assert rest is not None
    del held[0]
    gc.collect()
    assert slots.lent_bytes == 384 * KIB
    assert slots.lend(128 * KIB, torch.uint8, (128 * KIB,)) is not None
    assert slots.lend(0, torch.uint8, (0,)) is None


def test_many_threads_lending_and_letting_go(slots: LendingAllocator) -> None:
    def worker() -> None:
        for _ in range(300):
            t = slots.lend(16 * KIB, torch.float32, (4 * KIB,))
            if t is None:
                continue
            at = slots.adopt(t)
            del t
            assert at is not None
            slots.free(at)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    gc.collect()
    assert slots.lent_bytes == 0 and slots.used == 0 and slots._starts == [0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int64, torch.bool, torch.complex64])
def test_every_dtype_is_lent_and_given_back(slots: LendingAllocator, dtype: torch.dtype) -> None:
    # (numpy has no bfloat16: that one is viewed by torch, the others by numpy)
    nbytes = 64 * KIB
    t = slots.lend(nbytes, dtype, (4, nbytes // 4 // dtype.itemsize))
    assert t is not None and t.dtype == dtype and t.shape == (4, nbytes // 4 // dtype.itemsize)
    assert t.is_contiguous() and slots.adopt(t) == _where(slots, t)
    t.fill_(1)
    assert bool((t == 1).all())
    slots.free(_where(slots, t))
    del t
    gc.collect()
    assert slots.lent_bytes == 0 and slots.used == 0

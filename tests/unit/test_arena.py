"""Shared-memory arenas and their first-fit allocator (no processes)."""

from __future__ import annotations

import ctypes
import gc
import itertools
import mmap
import os
import uuid
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from libtorchrt.transport.arena import ALIGN, Allocator, Arena

PAGE = mmap.PAGESIZE


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def mapped(label: str) -> bool:
    """Whether a memfd named ``label`` is mapped into this process."""
    with open("/proc/self/maps") as f:
        return any(f"memfd:{label}" in line for line in f)


def unique_label() -> str:
    return f"libtorchrt-test-{uuid.uuid4().hex[:12]}"


# ======================================================================= Allocator


def test_offsets_are_aligned_and_slots_do_not_overlap() -> None:
    a = Allocator(10_000)
    slots = []
    for n in (1, 63, 64, 65, 100, 0, 129, 7, 500):
        off = a.alloc(n)
        assert off is not None
        assert off % ALIGN == 0
        slots.append((off, off + _rounded(n)))
    slots.sort()
    for (_, end), (start, _) in itertools.pairwise(slots):
        assert end <= start
    assert all(end <= a.capacity for _, end in slots)


def test_every_slot_is_rounded_up_to_the_alignment() -> None:
    a = Allocator(4096)
    assert a.alloc(1) == 0
    assert a.alloc(64) == 64
    assert a.alloc(65) == 128
    assert a.alloc(0) == 256  # even an empty slot takes one aligned unit
    assert a.used == 64 + 64 + 128 + 64


def test_custom_alignment() -> None:
    a = Allocator(1024, align=256)
    offs = [a.alloc(1), a.alloc(300), a.alloc(10)]
    assert offs == [0, 256, 768]
    assert a.alloc(1) is None


def test_alloc_returns_none_when_full_and_succeeds_after_free() -> None:
    a = Allocator(4 * ALIGN)
    offs = [a.alloc(ALIGN) for _ in range(4)]
    assert offs == [0, 64, 128, 192]
    assert a.alloc(1) is None
    assert a.alloc(ALIGN) is None
    a.free(128)
    assert a.alloc(ALIGN) == 128
    assert a.alloc(1) is None


def test_alloc_larger_than_capacity_is_none_and_changes_nothing() -> None:
    a = Allocator(1000)
    assert a.alloc(1001) is None
    assert a.used == 0 and len(a) == 0
    assert a.alloc(960) == 0  # 960 = 15 * 64 fits; the 40-byte tail never can
    assert a.alloc(1) is None


def test_a_hole_too_small_is_skipped_first_fit() -> None:
    a = Allocator(1024)
    x, y, _ = a.alloc(64), a.alloc(64), a.alloc(64)
    a.free(x)  # hole of 64 at 0
    assert a.alloc(128) == 192  # does not fit the hole
    assert a.alloc(64) == 0  # first fit takes the hole
    a.free(y)
    assert a.alloc(32) == 64


@pytest.mark.parametrize("order", ["forward", "backward", "middle-out", "interleaved"])
def test_freeing_everything_coalesces_into_one_full_block(order: str) -> None:
    capacity = 16 * ALIGN
    a = Allocator(capacity)
    offs = [a.alloc(ALIGN) for _ in range(16)]
    assert a.alloc(1) is None
    if order == "backward":
        offs.reverse()
    elif order == "middle-out":
        offs = offs[8:] + offs[:8][::-1]
    elif order == "interleaved":
        offs = offs[::2] + offs[1::2]
    for off in offs:
        a.free(off)
    assert a.used == 0 and len(a) == 0
    assert a.alloc(capacity) == 0


def test_freeing_neighbours_merges_with_both_sides() -> None:
    a = Allocator(3 * ALIGN)
    left, mid, right = a.alloc(ALIGN), a.alloc(ALIGN), a.alloc(ALIGN)
    a.free(left)
    a.free(right)
    assert a.alloc(2 * ALIGN) is None  # two separate holes of 64
    a.free(mid)
    assert a.alloc(3 * ALIGN) == 0


def test_double_free_raises_value_error() -> None:
    a = Allocator(1024)
    off = a.alloc(10)
    assert off is not None
    a.free(off)
    with pytest.raises(ValueError, match="no allocated slot"):
        a.free(off)


@pytest.mark.parametrize("bad", [1, 32, 64, -64, 1024, 10**9])
def test_freeing_an_offset_that_is_no_slot_start_raises_value_error(bad: int) -> None:
    a = Allocator(1024)
    assert a.alloc(10) == 0
    with pytest.raises(ValueError):
        a.free(bad)
    assert len(a) == 1 and a.used == 64  # the bad free changed nothing


def test_used_and_len_track_live_slots() -> None:
    a = Allocator(4096)
    assert (a.used, len(a)) == (0, 0)
    x = a.alloc(100)
    y = a.alloc(10)
    assert (a.used, len(a)) == (128 + 64, 2)
    a.free(x)  # type: ignore[arg-type]
    assert (a.used, len(a)) == (64, 1)
    a.free(y)  # type: ignore[arg-type]
    assert (a.used, len(a)) == (0, 0)


def test_reset_frees_every_slot() -> None:
    a = Allocator(1024)
    for _ in range(5):
        a.alloc(100)
    a.reset()
    assert (a.used, len(a)) == (0, 0)
    assert a.alloc(1024) == 0


def _first_fit(live: dict[int, int], capacity: int, size: int) -> int | None:
    """Reference: the lowest gap between live intervals that holds ``size`` bytes."""
    cursor = 0
    for start in sorted(live):
        if start - cursor >= size:
            return cursor
        cursor = start + live[start]
    return cursor if capacity - cursor >= size else None


def _rounded(n: int) -> int:
    return max(ALIGN, -(-n // ALIGN) * ALIGN)


@settings(max_examples=150, deadline=None)
@given(
    capacity=st.integers(min_value=0, max_value=4096),
    ops=st.lists(st.tuples(st.booleans(), st.integers(min_value=0, max_value=700)), max_size=60),
)
def test_random_alloc_free_sequences_match_a_first_fit_reference(capacity: int, ops: list[tuple[bool, int]]) -> None:
    a = Allocator(capacity)
    live: dict[int, int] = {}  # reference model: offset -> rounded size
    for is_alloc, n in ops:
        if is_alloc or not live:
            expected = _first_fit(live, capacity, _rounded(n))
            got = a.alloc(n)
            assert got == expected
            if got is not None:
                live[got] = _rounded(n)
        else:
            victim = sorted(live)[n % len(live)]
            a.free(victim)
            del live[victim]
        assert len(a) == len(live)
        assert a.used == sum(live.values())
    for off in list(live):
        a.free(off)
    full = capacity // ALIGN * ALIGN
    if full:
        assert a.alloc(full) == 0


class AllocatorMachine(RuleBasedStateMachine):
    """Stateful check: live slots never overlap, stay aligned and inside the capacity."""

    def __init__(self) -> None:
        super().__init__()
        self.capacity = 2048 + 40  # a tail that no aligned slot can use
        self.alloc = Allocator(self.capacity)
        self.live: dict[int, int] = {}

    @rule(n=st.integers(min_value=0, max_value=600))
    def allocate(self, n: int) -> None:
        off = self.alloc.alloc(n)
        if off is None:
            assert _first_fit(self.live, self.capacity, _rounded(n)) is None
        else:
            self.live[off] = _rounded(n)  # the whole aligned slot is reserved

    @precondition(lambda self: bool(self.live))
    @rule(i=st.integers(min_value=0))
    def free(self, i: int) -> None:
        off = sorted(self.live)[i % len(self.live)]
        self.alloc.free(off)
        del self.live[off]

    @precondition(lambda self: bool(self.live))
    @rule()
    def double_free_is_refused(self) -> None:
        off = next(iter(self.live))
        self.alloc.free(off)
        with pytest.raises(ValueError):
            self.alloc.free(off)
        self.live.pop(off)

    @rule()
    def free_everything_then_whole_capacity_fits(self) -> None:
        for off in list(self.live):
            self.alloc.free(off)
        self.live.clear()
        whole = self.alloc.alloc(2048)
        assert whole == 0
        self.alloc.free(whole)

    @invariant()
    def no_overlap(self) -> None:
        spans = sorted((off, off + n) for off, n in self.live.items())
        for off, end in spans:
            assert off % ALIGN == 0
            assert end <= self.capacity
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start
        assert len(self.alloc) == len(self.live)


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# =========================================================================== Arena


@pytest.fixture
def fds_unchanged() -> Iterator[None]:
    before = open_fds()
    yield
    gc.collect()
    assert open_fds() == before


@pytest.mark.parametrize(
    "asked, size", [(0, PAGE), (1, PAGE), (PAGE, PAGE), (PAGE + 1, 2 * PAGE), (5 * PAGE - 3, 5 * PAGE)]
)
def test_memfd_size_is_rounded_up_to_a_page(asked: int, size: int, fds_unchanged: None) -> None:
    a = Arena(asked)
    try:
        assert a.size == size
        assert a.fd is not None
        assert os.fstat(a.fd).st_size == size
        assert a.flat.numel() == size and a.flat.dtype == torch.uint8
    finally:
        a.close()


def test_memfd_is_close_on_exec_and_named(fds_unchanged: None) -> None:
    label = unique_label()
    a = Arena(PAGE, name=label)
    try:
        assert a.fd is not None
        assert not os.get_inheritable(a.fd)
        assert os.readlink(f"/proc/self/fd/{a.fd}").startswith(f"/memfd:{label}")
        assert mapped(label)
    finally:
        a.close()
    assert not mapped(label)


def test_views_of_two_mappings_of_the_same_fd_alias(fds_unchanged: None) -> None:
    front = Arena(3 * PAGE)
    assert front.fd is not None
    worker = Arena(front.size, fd=os.dup(front.fd))  # how the worker maps it
    try:
        src = front.view(128, 4 * 6, torch.float32, (2, 3))
        src.copy_(torch.arange(6, dtype=torch.float32).reshape(2, 3))
        dst = worker.view(128, 4 * 6, torch.float32, (2, 3))
        assert torch.equal(dst, torch.arange(6, dtype=torch.float32).reshape(2, 3))
        dst[1, 2] = -1.0  # and back the other way
        assert src[1, 2].item() == -1.0
        assert front.flat[128:152].data_ptr() == src.data_ptr()
        del src, dst
    finally:
        worker.close()
        front.close()


def test_view_at_the_very_end_is_allowed(fds_unchanged: None) -> None:
    a = Arena(PAGE)
    try:
        v = a.view(PAGE - 8, 8, torch.int64, ())
        v.fill_(7)
        assert a.flat[-8:].view(torch.int64).item() == 7
        assert a.view(PAGE, 0, torch.float32, (0,)).shape == (0,)
        del v
    finally:
        a.close()


@pytest.mark.parametrize(
    "offset, nbytes",
    [(PAGE - 4, 8), (PAGE, 1), (-64, 8), (0, PAGE + 1), (0, -1), (10 * PAGE, 8)],
)
def test_view_outside_the_arena_raises_value_error(offset: int, nbytes: int, fds_unchanged: None) -> None:
    a = Arena(PAGE)
    try:
        with pytest.raises(ValueError, match="outside"):
            a.view(offset, nbytes, torch.uint8, (max(nbytes, 0),))
    finally:
        a.close()


def test_close_is_idempotent_and_releases_fd_and_mapping(fds_unchanged: None) -> None:
    label = unique_label()
    a = Arena(2 * PAGE, name=label)
    fd = a.fd
    a.close()
    assert a.fd is None
    assert not mapped(label)
    with pytest.raises(OSError):
        os.fstat(fd)  # type: ignore[arg-type]
    a.close()
    a.close_fd()
    assert a.fd is None


def test_mapping_an_existing_fd_takes_ownership_of_it(fds_unchanged: None) -> None:
    front = Arena(PAGE)
    assert front.fd is not None
    dup = os.dup(front.fd)
    worker = Arena(PAGE, fd=dup)
    assert worker.fd == dup
    worker.close()
    front.close()  # no fd left: the fixture checks that dup was closed too


def test_close_fd_keeps_the_mapping_usable(fds_unchanged: None) -> None:
    a = Arena(PAGE)
    a.close_fd()
    assert a.fd is None
    v = a.view(0, 16, torch.int32, (4,))
    v.copy_(torch.tensor([1, 2, 3, 4], dtype=torch.int32))
    assert a.flat[:16].view(torch.int32).tolist() == [1, 2, 3, 4]
    del v
    a.close()


def test_many_arenas_leave_no_fd_behind(fds_unchanged: None) -> None:
    arenas = [Arena(PAGE) for _ in range(20)]
    for a in arenas:
        a.close()


def test_closing_with_no_live_view_unmaps(fds_unchanged: None) -> None:
    label = unique_label()
    a = Arena(PAGE, name=label)
    v = a.view(0, 8, torch.float64, ())
    del v
    gc.collect()
    a.close()
    assert not mapped(label)


def test_closing_while_a_view_is_alive_keeps_the_memory_readable(fds_unchanged: None) -> None:
    label = unique_label()
    a = Arena(PAGE, name=label)
    v = a.view(64, 16, torch.float32, (4,))
    v.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    a.close()  # must not crash
    a.close()
    assert a.fd is None
    # Check the mapping is still there BEFORE touching the tensor: reading an unmapped
    # view would kill the test process with SIGSEGV instead of failing this test.
    if not mapped(label):
        del v  # nothing may touch it again, not even a traceback printer
        pytest.fail("the arena was unmapped while a tensor still views it")
    assert v.tolist() == [1.0, 2.0, 3.0, 4.0]
    del v
    gc.collect()
    assert not mapped(label)  # the last view takes the mapping with it


# ---------------------------------- found by the mutation pass (docs/measurements/mutation.md)


def test_default_memfd_name_is_the_label_the_leak_checks_look_for(fds_unchanged: None) -> None:
    # tests/conftest.py finds leaked arenas in /proc/self/maps by this label
    a = Arena(PAGE)
    try:
        assert a.fd is not None
        assert os.readlink(f"/proc/self/fd/{a.fd}") == "/memfd:libtorchrt (deleted)"
        assert mapped("libtorchrt")
    finally:
        a.close()


def test_a_failed_resize_closes_the_new_memfd(monkeypatch: pytest.MonkeyPatch, fds_unchanged: None) -> None:
    def no_space(fd: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "ftruncate", no_space)
    with pytest.raises(OSError, match="No space left"):
        Arena(PAGE)


def test_a_failed_mapping_closes_the_fd_it_was_given(fds_unchanged: None) -> None:
    r, w = os.pipe()  # a pipe cannot be mapped
    try:
        with pytest.raises(OSError):
            Arena(PAGE, fd=r)
    finally:
        os.close(w)
    # the fixture checks that r was closed: the arena owned it from the call on


def test_address_is_where_the_arena_is_mapped(fds_unchanged: None) -> None:
    a = Arena(PAGE)
    try:
        assert a.address == a.flat.data_ptr() == a.bytes.ctypes.data
        ctypes.memmove(a.address + 64, b"abcd", 4)
        assert bytes(a.flat[64:68].tolist()) == b"abcd"
    finally:
        a.close()


def test_view_refusals_say_where_and_why(fds_unchanged: None) -> None:
    a = Arena(PAGE)
    try:
        with pytest.raises(ValueError, match=rf"^slot \[{PAGE - 4}, {PAGE + 4}\) lies outside the {PAGE}-byte arena$"):
            a.view(PAGE - 4, 8, torch.uint8, (8,))
        with pytest.raises(ValueError, match=r"^slot offset 2 is not aligned for torch.float32 \(4-byte elements\)$"):
            a.view(2, 4, torch.float32, (1,))
        assert a.view(4, 4, torch.float32, (1,)).shape == (1,)
    finally:
        a.close()


def test_close_leaves_empty_uint8_views_behind(fds_unchanged: None) -> None:
    a = Arena(PAGE)
    a.close()
    assert a.flat.dtype == torch.uint8 and a.flat.numel() == 0
    assert a.bytes.dtype.name == "uint8" and a.bytes.size == 0

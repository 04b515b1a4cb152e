"""tensors.write / tensors.read without processes: ZeroMQ frames built by hand, and a
second mapping of the same memfd standing in for the peer process."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import zmq

from libtorchrt.errors import ProtocolError
from libtorchrt.transport import tensors, wire
from libtorchrt.transport.arena import Allocator, Arena
from libtorchrt.transport.wire import DTYPES, TensorDesc

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

HUGE = 1 << 40  # inline threshold: everything inline
SHAPES = [(), (0,), (3, 0), (5,), (4, 7)]
MODES = ["inline", "arena"]


@dataclass
class Shm:
    front: Arena  # the sender's mapping
    peer: Arena  # the receiver's mapping of the same memfd
    alloc: Allocator

    def slot(self, d: TensorDesc) -> torch.Tensor:
        return self.peer.view(d.where, d.nbytes, DTYPES[d.dtype], d.shape)

    def owns(self, t: torch.Tensor) -> bool:
        base = self.peer.flat.data_ptr()
        return base <= t.data_ptr() < base + self.peer.size


@pytest.fixture
def shm() -> Iterator[Shm]:
    front = Arena(1 << 16)
    assert front.fd is not None
    peer = Arena(front.size, fd=os.dup(front.fd))
    yield Shm(front, peer, Allocator(front.size))
    # Tests drop their received tensors before returning: closing unmaps (see test_arena).
    peer.close()
    front.close()


def sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Distinct, exactly representable values of any wire dtype."""
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    base = torch.arange(n, dtype=torch.int64)
    if dtype == torch.bool:
        t = (base % 3) == 1
    elif dtype.is_complex:
        t = torch.complex(base.double(), -base.double() - 0.5).to(dtype)
    else:
        t = ((base * 7) % 101 - 50 if dtype.is_signed else (base * 7) % 101).to(dtype)
    return t.reshape(shape)


def send(
    ts: Sequence[torch.Tensor], shm: Shm | None, threshold: int
) -> tuple[list[torch.Tensor], list[TensorDesc], list[Any], list[int]]:
    """write → header through the wire codec → frames as ZeroMQ would deliver them → read."""
    arena, alloc = (shm.front, shm.alloc) if shm else (None, None)
    descs, frames, offsets = tensors.write(ts, arena, alloc, threshold)
    msg = wire.decode(wire.encode(wire.Request(1, descs)))
    assert isinstance(msg, wire.Request)
    zframes = [zmq.Frame(bytes(f)) for f in frames]
    out = tensors.read(msg.tensors, zframes, shm.slot if shm else None)
    return out, descs, frames, offsets


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype
    assert tuple(got.shape) == tuple(want.shape)
    assert torch.equal(got.resolve_conj().resolve_neg(), want.resolve_conj().resolve_neg())


# ------------------------------------------------------------------- round trips


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", sorted(DTYPES))
def test_round_trip_every_dtype_and_shape(name: str, shape: tuple[int, ...], mode: str, shm: Shm) -> None:
    t = sample(DTYPES[name], shape)
    out, descs, frames, offsets = send([t], shm, HUGE if mode == "inline" else 0)
    assert_same(out[0], t)
    (d,) = descs
    assert d.dtype == name and d.shape == shape
    nbytes = t.numel() * t.element_size()
    if mode == "arena" and nbytes > 0:
        assert (d.inline, d.where) == (False, offsets[0])
        assert frames == []
        assert shm.alloc.used >= nbytes and len(shm.alloc) == 1
        assert shm.owns(out[0]), "an arena tensor must be a view of the receiver's mapping"
    else:  # inline, and empty tensors even at threshold 0
        assert (d.inline, d.where) == (True, 0)
        assert offsets == [] and len(shm.alloc) == 0
        assert len(frames) == 1 and len(bytes(frames[0])) == nbytes
    del out


NON_CONTIGUOUS: dict[str, Callable[[], torch.Tensor]] = {
    "transposed": lambda: torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),
    "stepped": lambda: torch.arange(40, dtype=torch.int64).reshape(5, 8)[::2, 1::3],
    "expanded": lambda: torch.tensor([1.5, -2.5], dtype=torch.float64).expand(3, 2),
    "storage-offset": lambda: torch.arange(10, dtype=torch.int16)[3:7],
    "conj-view": lambda: torch.complex(torch.arange(6.0), torch.ones(6)).conj(),
    "neg-view": lambda: torch.complex(torch.arange(6.0), torch.arange(6.0)).conj().imag,
    "bool-permuted": lambda: (torch.arange(24).reshape(2, 3, 4) % 2 == 0).permute(2, 0, 1),
    "bfloat16-sliced": lambda: torch.arange(32, dtype=torch.bfloat16).reshape(4, 8)[:, ::4],
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("make", list(NON_CONTIGUOUS.values()), ids=list(NON_CONTIGUOUS))
def test_round_trip_non_contiguous_tensors(make: Callable[[], torch.Tensor], mode: str, shm: Shm) -> None:
    t = make()
    out, descs, _, _ = send([t], shm, HUGE if mode == "inline" else 0)
    assert_same(out[0], t)
    assert out[0].is_contiguous()
    assert descs[0].inline is (mode == "inline")
    del out


def test_several_tensors_split_between_frames_and_arena(shm: Shm) -> None:
    small_a = sample(torch.float32, (4,))  # 16 bytes
    big = sample(torch.float64, (64,))  # 512 bytes
    small_b = sample(torch.int8, (3,))
    empty = sample(torch.float32, (0, 3))
    big2 = sample(torch.int32, (40,))  # 160 bytes
    ts = [small_a, big, small_b, empty, big2]
    out, descs, frames, offsets = send(ts, shm, 64)
    for got, want in zip(out, ts):
        assert_same(got, want)
    assert [d.inline for d in descs] == [True, False, True, True, False]
    assert [d.where for d in descs if d.inline] == [0, 1, 2]  # consecutive frame numbers
    assert [d.where for d in descs if not d.inline] == offsets
    assert len(frames) == 3 and len(offsets) == 2 and len(shm.alloc) == 2
    del out


def test_no_arena_means_everything_inline() -> None:
    t = sample(torch.float32, (100,))
    out, descs, frames, offsets = send([t], None, 0)
    assert_same(out[0], t)
    assert descs[0].inline and offsets == [] and len(frames) == 1


def test_writes_are_snapshots_of_the_source(shm: Shm) -> None:
    small = torch.zeros(4)
    big = torch.zeros(256)
    descs, frames, _ = tensors.write([small, big], shm.front, shm.alloc, 64)
    small.fill_(9)
    big.fill_(9)
    out = tensors.read(descs, [zmq.Frame(bytes(f)) for f in frames], shm.slot)
    assert torch.equal(out[0], torch.zeros(4))
    assert torch.equal(out[1], torch.zeros(256))
    del out


def test_arena_read_is_zero_copy(shm: Shm) -> None:
    t = sample(torch.float32, (100,))
    out, _, _, offsets = send([t], shm, 0)
    view = shm.front.view(offsets[0], 400, torch.float32, (100,))
    view[5] = -123.0  # a write through the sender's mapping shows in the received tensor
    assert out[0][5].item() == -123.0
    del out, view


def test_inline_read_aliases_the_frame() -> None:
    t = sample(torch.int32, (8,))
    descs, frames, _ = tensors.write([t], None, None, HUGE)
    frame = zmq.Frame(bytes(frames[0]))
    (out,) = tensors.read(descs, [frame], None)
    assert out.data_ptr() == np.frombuffer(frame.buffer, dtype=np.uint8).ctypes.data
    assert_same(out, t)


# ---------------------------------------------------------------- arena pressure


def test_arena_full_falls_back_inline_and_leaves_the_allocator_unchanged(shm: Shm) -> None:
    shm.alloc = Allocator(256)
    hog = shm.alloc.alloc(192)
    assert hog == 0
    used, live = shm.alloc.used, len(shm.alloc)
    t = sample(torch.float32, (100,))  # 400 bytes: more than is left
    out, descs, frames, offsets = send([t], shm, 0)
    assert_same(out[0], t)
    assert descs[0].inline and offsets == [] and len(frames) == 1
    assert (shm.alloc.used, len(shm.alloc)) == (used, live)
    assert shm.alloc.alloc(64) == 192  # the free space is intact
    del out


def test_partially_full_arena_places_what_fits(shm: Shm) -> None:
    shm.alloc = Allocator(512)
    fits = sample(torch.float64, (60,))  # 480 bytes
    too_big = sample(torch.float64, (60,))
    out, descs, _, offsets = send([fits, too_big], shm, 0)
    assert [d.inline for d in descs] == [False, True]
    assert len(offsets) == 1
    assert_same(out[0], fits)
    assert_same(out[1], too_big)
    del out


def test_exception_mid_write_frees_slots_already_taken(shm: Shm) -> None:
    capacity = shm.alloc.capacity
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized creation is deprecated; still a non-wire dtype
        quantized = torch.quantize_per_tensor(torch.ones(64), 0.1, 0, torch.quint8)
    with pytest.raises(KeyError):
        tensors.write([sample(torch.float32, (64,)), sample(torch.int64, (64,)), quantized], shm.front, shm.alloc, 0)
    assert (shm.alloc.used, len(shm.alloc)) == (0, 0)
    assert shm.alloc.alloc(capacity) == 0  # coalesced back into one block


def test_exception_from_the_arena_frees_slots_already_taken(shm: Shm) -> None:
    # An allocator larger than its arena: the second slot lies outside the mapping.
    alloc = Allocator(shm.front.size * 2)
    first = sample(torch.uint8, (shm.front.size - 64,))
    second = sample(torch.uint8, (128,))
    with pytest.raises(ValueError):
        tensors.write([first, second], shm.front, alloc, 0)
    assert (alloc.used, len(alloc)) == (0, 0)


# ------------------------------------------------------------------ read errors


def test_frame_of_the_wrong_size_raises_protocol_error() -> None:
    d = TensorDesc("float32", (4,), True, 0)
    with pytest.raises(ProtocolError, match="12 bytes for a 16-byte"):
        tensors.read([d], [zmq.Frame(b"x" * 12)], None)
    with pytest.raises(ProtocolError):
        tensors.read([d], [zmq.Frame(b"x" * 20)], None)


def test_empty_tensor_with_a_non_empty_frame_raises_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        tensors.read([TensorDesc("float32", (0,), True, 0)], [zmq.Frame(b"abcd")], None)


def test_missing_frame_raises_protocol_error() -> None:
    d0 = TensorDesc("int8", (2,), True, 0)
    d1 = TensorDesc("int8", (2,), True, 1)
    with pytest.raises(ProtocolError, match="data frame 1 of 1"):
        tensors.read([d0, d1], [zmq.Frame(b"ab")], None)
    with pytest.raises(ProtocolError):
        tensors.read([d0], [], None)


def test_arena_descriptor_without_an_arena_raises_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="no arena"):
        tensors.read([TensorDesc("float32", (4,), False, 0)], [], None)


@pytest.mark.parametrize("where, shape", [(1 << 16, (4,)), ((1 << 16) - 8, (4,)), (0, (1 << 15,))])
def test_arena_descriptor_outside_the_arena_raises_protocol_error(where: int, shape: tuple[int, ...], shm: Shm) -> None:
    with pytest.raises(ProtocolError, match="outside"):
        tensors.read([TensorDesc("float32", shape, False, where)], [], shm.slot)


# ---------------------------------------------------------------------- as_frame


@pytest.mark.parametrize("make", list(NON_CONTIGUOUS.values()), ids=list(NON_CONTIGUOUS))
def test_as_frame_holds_the_contiguous_bytes(make: Callable[[], torch.Tensor]) -> None:
    t = make()
    want = t.resolve_conj().resolve_neg().contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
    assert bytes(tensors.as_frame(t)) == want


def test_as_frame_of_an_empty_tensor_is_empty() -> None:
    assert bytes(tensors.as_frame(torch.empty(3, 0))) == b""

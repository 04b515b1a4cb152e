"""tensors.write / tensors.read without processes: headers through the wire codec, ZeroMQ
frames built by hand, and a second mapping of the same memfd standing in for the peer
process."""

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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libtorchrt.errors import ProtocolError
from libtorchrt.transport import tensors, wire
from libtorchrt.transport.arena import Allocator, Arena
from libtorchrt.transport.wire import DTYPES, TensorDesc

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

HUGE = 1 << 40  # inline threshold: everything a blob
SHAPES = [(), (0,), (3, 0), (5,), (4, 7)]
MODES = ["blob", "frame", "arena"]
DEFAULT = tensors.DEFAULT_INLINE_THRESHOLD
KINDS = {"blob": wire.BLOB, "frame": wire.FRAME, "arena": wire.ARENA}


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


def route(mode: str, shm: Shm) -> tuple[Shm | None, int]:
    """The arena and inline threshold that make ``write`` place a non-empty tensor by ``mode``."""
    return {"blob": (shm, HUGE), "frame": (None, 0), "arena": (shm, 0)}[mode]


def send(ts: Sequence[torch.Tensor], shm: Shm | None, threshold: int) -> tuple[list[torch.Tensor], tensors.Placed]:
    """write → header (carrying the blobs) through the wire codec → frames as ZeroMQ
    would deliver them → read."""
    arena, alloc = (shm.front, shm.alloc) if shm else (None, None)
    placed = tensors.write(ts, arena, alloc, threshold)
    assert isinstance(placed, tensors.Placed)
    msg = wire.decode(wire.encode(wire.Request(1, placed.descs, [], placed.blobs)))
    assert isinstance(msg, wire.Request)
    assert msg.blobs == [bytes(b) for b in placed.blobs]
    zframes = [zmq.Frame(bytes(f)) for f in placed.frames]
    out = tensors.read(msg.tensors, msg.blobs, zframes, shm.slot if shm else None)
    return out, placed


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype
    assert tuple(got.shape) == tuple(want.shape)
    assert torch.equal(got.resolve_conj().resolve_neg(), want.resolve_conj().resolve_neg())


def contiguous_bytes(t: torch.Tensor) -> bytes:
    return t.resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def address(buf: Any) -> int:
    """The address of the first byte of a (possibly read-only) buffer."""
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data


# ------------------------------------------------------------------- round trips


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", sorted(DTYPES))
def test_round_trip_every_dtype_and_shape(name: str, shape: tuple[int, ...], mode: str, shm: Shm) -> None:
    t = sample(DTYPES[name], shape)
    out, placed = send([t], *route(mode, shm))
    assert_same(out[0], t)
    (d,) = placed.descs
    assert d.dtype == name and d.shape == shape
    nbytes = t.numel() * t.element_size()
    # An empty tensor is a blob whatever the mode: 0 bytes is within any threshold.
    kind = KINDS[mode] if nbytes > 0 else wire.BLOB
    assert d.kind == kind
    if kind == wire.ARENA:
        assert d.where == placed.offsets[0]
        assert placed.blobs == [] and placed.frames == []
        assert shm.alloc.used >= nbytes and len(shm.alloc) == 1
        assert shm.owns(out[0]), "an arena tensor must be a view of the receiver's mapping"
    elif kind == wire.FRAME:
        assert d.where == 0
        assert placed.blobs == [] and placed.offsets == [] and len(shm.alloc) == 0
        assert len(placed.frames) == 1 and bytes(placed.frames[0]) == contiguous_bytes(t)
    else:
        assert d.where == 0
        assert placed.frames == [] and placed.offsets == [] and len(shm.alloc) == 0
        assert placed.blobs == [contiguous_bytes(t)]
        assert type(placed.blobs[0]) is bytes
    del out


NON_CONTIGUOUS: dict[str, Callable[[], torch.Tensor]] = {
    "transposed": lambda: torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),
    "stepped": lambda: torch.arange(40, dtype=torch.int64).reshape(5, 8)[::2, 1::3],
    "expanded": lambda: torch.tensor([1.5, -2.5], dtype=torch.float64).expand(3, 2),
    "storage-offset": lambda: torch.arange(10, dtype=torch.int16)[3:7],
    "conj-view": lambda: torch.complex(torch.arange(6.0), torch.ones(6)).conj(),
    "neg-view": lambda: torch.complex(torch.arange(6.0), torch.arange(6.0)).conj().imag,
    "neg-view-float": lambda: torch._neg_view(torch.arange(6.0)),
    "neg-view-inference": lambda: _inference_neg_view(),
    "bool-permuted": lambda: (torch.arange(24).reshape(2, 3, 4) % 2 == 0).permute(2, 0, 1),
    "bfloat16-sliced": lambda: torch.arange(32, dtype=torch.bfloat16).reshape(4, 8)[:, ::4],
}


def _inference_neg_view() -> torch.Tensor:
    """A negated view made in inference mode: no view bookkeeping (``_is_view()`` is
    False), only the negation bit says its memory holds the opposite values."""
    with torch.inference_mode():
        t = torch._neg_view(torch.arange(6.0))
    assert not t._is_view() and t.is_neg()
    return t


@pytest.mark.parametrize("name", list(NON_CONTIGUOUS))
@pytest.mark.parametrize("read_keys", [True, False], ids=["dispatch-keys", "is_neg-is_conj"])
def test_plain_is_false_for_every_tensor_whose_bytes_differ(
    name: str, read_keys: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not read_keys:  # a torch without the dispatch keys: plain() asks the tensor
        monkeypatch.setattr(tensors, "_FLIPPED", None)
    t = NON_CONTIGUOUS[name]()
    # (a contiguous slice's bytes start at its data_ptr(): plain)
    assert tensors.plain(t) is (name == "storage-offset")
    assert tensors.plain(t.resolve_conj().resolve_neg().contiguous())
    assert tensors.plain(torch.zeros(2, 3)) and tensors.plain(torch.zeros(0))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("make", list(NON_CONTIGUOUS.values()), ids=list(NON_CONTIGUOUS))
def test_round_trip_non_contiguous_tensors(make: Callable[[], torch.Tensor], mode: str, shm: Shm) -> None:
    t = make()
    out, placed = send([t], *route(mode, shm))
    assert_same(out[0], t)
    assert out[0].is_contiguous()
    assert placed.descs[0].kind == KINDS[mode]
    del out


def test_several_tensors_split_between_blobs_frames_and_arena(shm: Shm) -> None:
    shm.alloc = Allocator(512)
    small_a = sample(torch.float32, (4,))  # 16 bytes
    big = sample(torch.float64, (64,))  # 512 bytes: fills the arena
    small_b = sample(torch.int8, (3,))
    empty = sample(torch.float32, (0, 3))
    big2 = sample(torch.int32, (40,))  # 160 bytes: the arena is full by now
    big3 = sample(torch.int16, (50,))  # 100 bytes
    ts = [small_a, big, small_b, empty, big2, big3]
    out, placed = send(ts, shm, 64)
    for got, want in zip(out, ts):
        assert_same(got, want)
    B, F, A = wire.BLOB, wire.FRAME, wire.ARENA
    assert [d.kind for d in placed.descs] == [B, A, B, B, F, F]
    assert [d.where for d in placed.descs if d.kind == B] == [0, 1, 2]  # consecutive blob numbers
    assert [d.where for d in placed.descs if d.kind == F] == [0, 1]  # and frame numbers, on their own
    assert [d.where for d in placed.descs if d.kind == A] == placed.offsets == [0]
    assert placed.blobs == [contiguous_bytes(t) for t in (small_a, small_b, empty)]
    assert len(placed.frames) == 2 and len(shm.alloc) == 1
    del out


def test_no_arena_means_frames_above_the_threshold() -> None:
    t = sample(torch.float32, (100,))
    out, placed = send([t], None, 0)
    assert_same(out[0], t)
    assert placed.descs[0].kind == wire.FRAME
    assert placed.offsets == [] and placed.blobs == [] and len(placed.frames) == 1


# ---------------------------------------------------------------------- placement


@pytest.mark.parametrize(
    "nbytes, threshold, arena, expected",
    [
        pytest.param(64, 64, "free", wire.BLOB, id="at-threshold-blob"),
        pytest.param(1, 64, "free", wire.BLOB, id="below-threshold-blob"),
        pytest.param(0, 0, "free", wire.BLOB, id="empty-at-zero-threshold-blob"),
        pytest.param(0, 0, "none", wire.BLOB, id="empty-no-arena-blob"),
        pytest.param(64, 64, "none", wire.BLOB, id="blob-needs-no-arena"),
        pytest.param(64, 64, "full", wire.BLOB, id="blob-ignores-a-full-arena"),
        pytest.param(65, 64, "free", wire.ARENA, id="above-threshold-arena"),
        pytest.param(65, 64, "full", wire.FRAME, id="above-threshold-arena-full-frame"),
        pytest.param(65, 64, "none", wire.FRAME, id="above-threshold-no-arena-frame"),
        pytest.param(65, 64, "no-allocator", wire.FRAME, id="arena-without-allocator-frame"),
        pytest.param(1, 0, "free", wire.ARENA, id="zero-threshold-arena"),
        pytest.param(DEFAULT, DEFAULT, "none", wire.BLOB, id="default-blob"),
        pytest.param(DEFAULT + 1, DEFAULT, "none", wire.FRAME, id="default-frame"),
    ],
)
def test_placement_follows_threshold_and_arena_state(
    nbytes: int, threshold: int, arena: str, expected: int, shm: Shm
) -> None:
    if arena == "full":
        assert shm.alloc.alloc(shm.alloc.capacity) == 0
    used, live = shm.alloc.used, len(shm.alloc)
    t = sample(torch.uint8, (nbytes,))
    front = None if arena == "none" else shm.front
    alloc = None if arena in ("none", "no-allocator") else shm.alloc
    placed = tensors.write([t], front, alloc, threshold)
    (d,) = placed.descs
    assert d.kind == expected
    assert len(placed.blobs) == (expected == wire.BLOB)
    assert len(placed.frames) == (expected == wire.FRAME)
    assert len(placed.offsets) == (expected == wire.ARENA)
    if expected == wire.ARENA:
        assert (shm.alloc.used, len(shm.alloc)) == (used + shm.alloc.align * -(-nbytes // shm.alloc.align), live + 1)
    else:
        assert (shm.alloc.used, len(shm.alloc)) == (used, live)
    out = tensors.read(placed.descs, placed.blobs, [zmq.Frame(bytes(f)) for f in placed.frames], shm.slot)
    assert_same(out[0], t)
    del out


def test_default_inline_threshold_is_64_kib() -> None:
    assert tensors.DEFAULT_INLINE_THRESHOLD == 64 * 1024


# ------------------------------------------------------------- copies and aliases


def test_blob_and_arena_writes_are_snapshots_of_the_source(shm: Shm) -> None:
    small = torch.zeros(4)
    big = torch.zeros(256)
    placed = tensors.write([small, big], shm.front, shm.alloc, 64)
    assert [d.kind for d in placed.descs] == [wire.BLOB, wire.ARENA]
    small.fill_(9)
    big.fill_(9)
    out = tensors.read(placed.descs, placed.blobs, [], shm.slot)
    assert torch.equal(out[0], torch.zeros(4))
    assert torch.equal(out[1], torch.zeros(256))
    del out


def test_blobs_of_many_sizes_hold_their_tensors_bytes() -> None:
    # The copy into a blob keeps a ctypes array type per size for a few sizes, and
    # copies the others another way: every size, before and after, is exact.
    for n in [*range(1, 200), 7, 64, 199]:
        t = torch.arange(n, dtype=torch.uint8) ^ 0x5A
        placed = tensors.write([t], None, None, HUGE)
        assert placed.blobs == [t.numpy().tobytes()]
        t.fill_(0)  # a copy: the caller may change its tensor at once
        assert placed.blobs[0] != t.numpy().tobytes()


def test_frame_write_refers_to_the_source_memory() -> None:
    # Only the arena-full fallback sends the caller's memory itself (ZeroMQ holds it).
    t = torch.zeros(256)
    placed = tensors.write([t], None, None, 64)
    assert placed.descs[0].kind == wire.FRAME
    assert address(placed.frames[0]) == t.data_ptr()
    t.fill_(9)
    assert bytes(placed.frames[0]) == t.numpy().tobytes()


def test_blob_read_is_a_writable_copy_independent_of_the_header() -> None:
    t = sample(torch.int32, (8,))
    placed = tensors.write([t], None, None, HUGE)
    header = wire.encode(wire.Response(1, placed.descs, placed.blobs))
    original = bytes(header)
    msg = wire.decode(header)
    assert isinstance(msg, wire.Response)
    blob = msg.blobs[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it wraps a read-only buffer
        (out,) = tensors.read(msg.tensors, msg.blobs, [], None)
    assert_same(out, t)
    assert not address(blob) <= out.data_ptr() < address(blob) + len(blob)
    out.fill_(-1)  # the caller owns its outputs
    assert torch.equal(out, torch.full((8,), -1, dtype=torch.int32))
    assert msg.blobs[0] == placed.blobs[0] == contiguous_bytes(t)
    assert header == original
    (again,) = tensors.read(msg.tensors, msg.blobs, [], None)
    assert_same(again, t)


def test_descriptors_sharing_a_blob_read_as_independent_tensors() -> None:
    d = TensorDesc("int16", (3,), wire.BLOB, 0)
    blob = torch.tensor([1, 2, 3], dtype=torch.int16).numpy().tobytes()
    a, b = tensors.read([d, d], [blob], [], None)
    a.zero_()
    assert b.tolist() == [1, 2, 3]
    assert blob == torch.tensor([1, 2, 3], dtype=torch.int16).numpy().tobytes()


def test_arena_read_is_zero_copy(shm: Shm) -> None:
    t = sample(torch.float32, (100,))
    out, placed = send([t], shm, 0)
    view = shm.front.view(placed.offsets[0], 400, torch.float32, (100,))
    view[5] = -123.0  # a write through the sender's mapping shows in the received tensor
    assert out[0][5].item() == -123.0
    del out, view


def test_frame_read_aliases_the_frame() -> None:
    t = sample(torch.int32, (8,))
    placed = tensors.write([t], None, None, 0)
    assert placed.descs[0].kind == wire.FRAME
    frame = zmq.Frame(bytes(placed.frames[0]))
    (out,) = tensors.read(placed.descs, [], [frame], None)
    assert out.data_ptr() == address(frame.buffer)
    assert_same(out, t)


# ---------------------------------------------------------------- arena pressure


def test_arena_full_falls_back_to_a_frame_and_leaves_the_allocator_unchanged(shm: Shm) -> None:
    shm.alloc = Allocator(256)
    hog = shm.alloc.alloc(192)
    assert hog == 0
    used, live = shm.alloc.used, len(shm.alloc)
    t = sample(torch.float32, (100,))  # 400 bytes: more than is left
    out, placed = send([t], shm, 0)
    assert_same(out[0], t)
    assert placed.descs[0].kind == wire.FRAME
    assert placed.offsets == [] and placed.blobs == [] and len(placed.frames) == 1
    assert (shm.alloc.used, len(shm.alloc)) == (used, live)
    assert shm.alloc.alloc(64) == 192  # the free space is intact
    del out


def test_partially_full_arena_places_what_fits(shm: Shm) -> None:
    shm.alloc = Allocator(512)
    fits = sample(torch.float64, (60,))  # 480 bytes
    too_big = sample(torch.float64, (60,))
    out, placed = send([fits, too_big], shm, 0)
    assert [d.kind for d in placed.descs] == [wire.ARENA, wire.FRAME]
    assert len(placed.offsets) == 1 and len(placed.frames) == 1
    assert_same(out[0], fits)
    assert_same(out[1], too_big)
    del out


def test_exception_mid_write_frees_slots_already_taken(shm: Shm) -> None:
    capacity = shm.alloc.capacity
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized creation is deprecated; still a non-wire dtype
        quantized = torch.quantize_per_tensor(torch.ones(64), 0.1, 0, torch.quint8)
    ts = [sample(torch.int8, (4,)), sample(torch.float32, (64,)), sample(torch.int64, (64,)), quantized]
    with pytest.raises(KeyError):
        tensors.write(ts, shm.front, shm.alloc, 8)  # a blob, two arena slots, then the failure
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


def test_blob_of_the_wrong_size_raises_protocol_error() -> None:
    d = TensorDesc("float32", (4,), wire.BLOB, 0)
    with pytest.raises(ProtocolError, match="12 bytes for a 16-byte"):
        tensors.read([d], [b"x" * 12], [], None)
    with pytest.raises(ProtocolError):
        tensors.read([d], [b"x" * 20], [], None)


def test_empty_tensor_with_a_non_empty_blob_raises_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        tensors.read([TensorDesc("float32", (0,), wire.BLOB, 0)], [b"abcd"], [], None)


def test_missing_blob_raises_protocol_error() -> None:
    d0 = TensorDesc("int8", (2,), wire.BLOB, 0)
    d1 = TensorDesc("int8", (2,), wire.BLOB, 1)
    with pytest.raises(ProtocolError, match="blob 1 of 1"):
        tensors.read([d0, d1], [b"ab"], [], None)
    with pytest.raises(ProtocolError):
        tensors.read([d0], [], [], None)
    with pytest.raises(ProtocolError):  # a blob descriptor never reads a data frame
        tensors.read([d0], [], [zmq.Frame(b"ab")], None)


def test_frame_of_the_wrong_size_raises_protocol_error() -> None:
    d = TensorDesc("float32", (4,), wire.FRAME, 0)
    with pytest.raises(ProtocolError, match="12 bytes for a 16-byte"):
        tensors.read([d], [], [zmq.Frame(b"x" * 12)], None)
    with pytest.raises(ProtocolError):
        tensors.read([d], [], [zmq.Frame(b"x" * 20)], None)


def test_empty_tensor_with_a_non_empty_frame_raises_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        tensors.read([TensorDesc("float32", (0,), wire.FRAME, 0)], [], [zmq.Frame(b"abcd")], None)


def test_missing_frame_raises_protocol_error() -> None:
    d0 = TensorDesc("int8", (2,), wire.FRAME, 0)
    d1 = TensorDesc("int8", (2,), wire.FRAME, 1)
    with pytest.raises(ProtocolError, match="data frame 1 of 1"):
        tensors.read([d0, d1], [], [zmq.Frame(b"ab")], None)
    with pytest.raises(ProtocolError):
        tensors.read([d0], [], [], None)
    with pytest.raises(ProtocolError):  # a frame descriptor never reads a blob
        tensors.read([d0], [b"ab"], [], None)


def test_arena_descriptor_without_an_arena_raises_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="arena descriptor, but there is no such buffer"):
        tensors.read([TensorDesc("float32", (4,), wire.ARENA, 0)], [b"x" * 16], [zmq.Frame(b"x" * 16)], None)


def test_device_descriptor_without_a_device_buffer_raises_protocol_error() -> None:
    # A CPU worker (or the front reading a CPU worker's reply) has no device buffer.
    host = lambda d: torch.zeros(4)  # noqa: E731
    with pytest.raises(ProtocolError, match="device descriptor, but there is no such buffer"):
        tensors.read([TensorDesc("float32", (4,), wire.DEVICE, 0)], [], [], host)


def test_device_descriptor_errors_become_protocol_errors() -> None:
    def missing(d: TensorDesc) -> torch.Tensor:
        raise KeyError(d.where)

    with pytest.raises(ProtocolError, match="bad device descriptor"):
        tensors.read([TensorDesc("float32", (4,), wire.DEVICE, 64)], [], [], None, missing)


@pytest.mark.parametrize("where, shape", [(1 << 16, (4,)), ((1 << 16) - 8, (4,)), (0, (1 << 15,))])
def test_arena_descriptor_outside_the_arena_raises_protocol_error(where: int, shape: tuple[int, ...], shm: Shm) -> None:
    with pytest.raises(ProtocolError, match="outside"):
        tensors.read([TensorDesc("float32", shape, wire.ARENA, where)], [], [], shm.slot)


# ---------------------------------------------------------------------- property


_tensor_specs = st.tuples(
    st.sampled_from(sorted(DTYPES)),
    st.lists(st.integers(0, 6), max_size=3).map(tuple),
    st.booleans(),  # transposed (non-contiguous when 2-D or more)
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(_tensor_specs, max_size=6),
    threshold=st.sampled_from([0, 1, 8, 64, HUGE]) | st.integers(0, 600),
    capacity=st.none() | st.integers(0, 2048),
)
def test_any_mix_of_tensors_round_trips_and_frees(
    specs: list[tuple[str, tuple[int, ...], bool]], threshold: int, capacity: int | None
) -> None:
    ts = []
    for name, shape, transpose in specs:
        t = sample(DTYPES[name], shape)
        ts.append(t.transpose(0, -1) if transpose and t.dim() >= 2 else t)
    front = Arena(1 << 16)
    assert front.fd is not None
    peer = Arena(front.size, fd=os.dup(front.fd))
    try:
        shm = Shm(front, peer, Allocator(capacity if capacity is not None else 0))
        out, placed = send(ts, shm if capacity is not None else None, threshold)
        for got, want in zip(out, ts, strict=True):
            assert_same(got, want)
        del out
        counts = {wire.BLOB: 0, wire.FRAME: 0, wire.ARENA: 0}
        for t, d in zip(ts, placed.descs, strict=True):
            nbytes = t.numel() * t.element_size()
            assert (d.kind == wire.BLOB) == (nbytes <= threshold)
            if capacity is None:
                assert d.kind != wire.ARENA
            if d.kind == wire.ARENA:
                assert d.where == placed.offsets[counts[d.kind]]
            else:
                assert d.where == counts[d.kind]
            counts[d.kind] += 1
        assert (len(placed.blobs), len(placed.frames), len(placed.offsets)) == tuple(counts.values())
        assert len(shm.alloc) == len(placed.offsets)
        for offset in placed.offsets:
            shm.alloc.free(offset)
        assert shm.alloc.used == 0
    finally:
        peer.close()
        front.close()


# ---------------------------------------------------------------------- as_frame


@pytest.mark.parametrize("make", list(NON_CONTIGUOUS.values()), ids=list(NON_CONTIGUOUS))
def test_as_frame_holds_the_contiguous_bytes(make: Callable[[], torch.Tensor]) -> None:
    t = make()
    assert bytes(tensors.as_frame(t)) == contiguous_bytes(t)


def test_as_frame_of_an_empty_tensor_is_empty() -> None:
    assert bytes(tensors.as_frame(torch.empty(3, 0))) == b""


# ------------------------------------------------------------------ string tensors


def test_strings_are_written_as_blobs_and_read_back_as_lists_of_str(shm: Shm) -> None:
    big = [f"element {i}" for i in range(10_000)]  # ~150 KB: beyond the inline threshold, still a blob
    values = [tensors.Strings.of(["a", "", "日本"]), sample(torch.float32, (2, 3)), tensors.Strings.of(big)]
    placed = tensors.write(values, shm.front, shm.alloc, DEFAULT)
    assert [d.kind for d in placed.descs] == [wire.BLOB, wire.BLOB, wire.BLOB]
    assert placed.descs[0] == TensorDesc("string", (3,), wire.BLOB, 0)
    assert placed.descs[2] == TensorDesc("string", (10_000,), wire.BLOB, 2)
    assert not placed.offsets and not placed.frames
    msg = wire.decode(wire.encode(wire.Request(1, placed.descs, [], placed.blobs)))
    assert isinstance(msg, wire.Request)
    out = tensors.read(msg.tensors, msg.blobs, [], shm.slot)
    assert out[0] == ["a", "", "日本"] and out[2] == big
    torch.testing.assert_close(out[1], values[1])


def test_strings_answer_the_fronts_size_questions_with_their_encoding() -> None:
    s = tensors.Strings([b"ab", "é".encode()])
    assert (len(s), s.numel(), s.element_size(), s.is_cuda) == (2, 4 + 2 + 4 + 2, 1, False)
    assert s.cpu() is s
    empty = tensors.Strings.of([])
    assert (len(empty), empty.numel(), empty.blob) == (0, 0, b"")
    with pytest.raises(UnicodeEncodeError):
        tensors.Strings.of(["\ud800"])


@pytest.mark.parametrize(
    "desc, blobs",
    [
        pytest.param(TensorDesc("string", (1,), wire.BLOB, 1), [b"\x00" * 4], id="missing-blob"),
        pytest.param(TensorDesc("string", (2,), wire.BLOB, 0), [b"\x00" * 4], id="count-mismatch"),
        pytest.param(TensorDesc("string", (1,), wire.BLOB, 0), [b"\x01\x00\x00\x00\xff"], id="invalid-utf8"),
        pytest.param(TensorDesc("string", (1,), wire.ARENA, 0), [], id="in-the-arena"),
        pytest.param(TensorDesc("string", (1, 1), wire.BLOB, 0), [b"\x00" * 4], id="two-dims"),
    ],
)
def test_malformed_string_tensors_raise_protocol_error(desc: TensorDesc, blobs: list[bytes], shm: Shm) -> None:
    with pytest.raises(ProtocolError):
        tensors.read([desc], blobs, [], shm.slot)


def test_strings_keep_a_shape_of_their_size() -> None:
    s = tensors.Strings([b"a", b"b", b"c", b"d"], (2, 2))
    assert (s.shape, s.dim(), s.count, s.nbytes) == ((2, 2), 2, 4, 4 * 5)
    with pytest.raises(ValueError, match="does not hold"):
        tensors.Strings([b"a"], (2,))
    placed = tensors.write([s], None, None, DEFAULT)
    assert placed.descs == [TensorDesc("string", (4,), wire.BLOB, 0)], "the wire carries [count]"

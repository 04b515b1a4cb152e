"""Moving tensors in and out of messages (used in both processes).

``write`` places each tensor one of three ways, recorded in its descriptor's ``kind``:

- ``BLOB``: up to the inline threshold (``DEFAULT_INLINE_THRESHOLD``, 64 KiB), its bytes
  ride inside the msgpack header itself, so a small request is a single ZeroMQ frame:
  every extra frame is one more send/recv call, and each such call lets go of the GIL
  and takes it back, a wait of its own beside busy caller threads;
- ``ARENA``: larger tensors are copied once, straight from the source whatever its
  strides, into a slot of the sender's shared-memory arena, which the receiver views in
  place (a tensor that lies in the arena already is named where it is, with no copy:
  an input the application made in a block that ``Pool.empty`` lent, ``lending.py``;
  a CPU worker's output that its model made there, ``outheap.py``);
- ``FRAME``: a larger tensor that finds its arena full (or no arena) travels as its own
  ZeroMQ frame, so nothing ever blocks on arena space.

``read`` turns descriptors back into tensors: blobs are copied out of the header (they
are small), frames and arena slots are viewed without copying. (``DEVICE`` descriptors,
CUDA buffers, are placed by the GPU path; ``read`` views them through ``device_slot``.)

String tensors (``List[str]``) are the exception: ``write`` takes them as
:class:`Strings`, already encoded, and always sends them as a ``BLOB``, however large
(see ``wire``); ``read`` gives them back as ``list[str]``.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import zmq

from ..errors import ProtocolError
from .arena import Arena, Slots
from .dtypes import DTYPES, NUMPY_DTYPES, STRING, dtype_name
from .wire import ARENA, BLOB, FRAME, TensorDesc, decode_strings, encode_strings

__all__ = [
    "DEFAULT_INLINE_THRESHOLD",
    "Placed",
    "Strings",
    "as_array",
    "as_frame",
    "as_tensor",
    "plain",
    "read",
    "write",
]

#: Tensors at most this large travel inside the message header.
DEFAULT_INLINE_THRESHOLD = 64 * 1024


class Strings:
    """A string tensor (``TYPE_STRING``; TorchScript's ``List[str]``), encoded for the wire.

    The front binds a request's string inputs to this, and the worker a model's string
    outputs, so that each is encoded once. The model always gets (and gives) a flat list;
    ``shape`` keeps the request's shape (``[batch, *dims]``, as Triton's clients send
    ``[N, 1]`` arrays), for the front's row counting; the wire carries ``[count]``.

    A request carries it beside its tensors, so it answers the few tensor questions the
    front asks of every input: ``is_cuda`` (False), ``cpu()`` (itself), ``shape``,
    ``dim()``, and its size as the ``uint8`` buffer of its encoding: ``nbytes``, and
    ``numel()`` (the encoding's length) times ``element_size()`` (1). Byte limits
    (``max_request_bytes``) therefore count what crosses the wire: each element's UTF-8
    bytes plus 4.

    Args:
        items: the elements, each already UTF-8 encoded.
        shape: the request's shape, holding ``len(items)`` elements (default: 1-D).

    Raises:
        ValueError: an element of 4 GiB or more, or a ``shape`` of another size.
    """

    __slots__ = ("blob", "count", "shape")
    is_cuda = False

    def __init__(self, items: Sequence[bytes], shape: Sequence[int] | None = None) -> None:
        #: Triton's ``BYTES`` serialization of the elements
        self.blob = encode_strings(items)
        #: the number of elements
        self.count = len(items)
        self.shape: tuple[int, ...] = (self.count,) if shape is None else tuple(shape)
        if math.prod(self.shape) != self.count:
            raise ValueError(f"shape {list(self.shape)} does not hold {self.count} strings")

    @classmethod
    def of(cls, values: Sequence[str]) -> Strings:
        """Encode ``values`` (``str`` elements), 1-D.

        Raises:
            UnicodeEncodeError: an element holds a lone surrogate.
        """
        return cls([v.encode() for v in values])

    @property
    def nbytes(self) -> int:
        return len(self.blob)

    def numel(self) -> int:
        return len(self.blob)

    def element_size(self) -> int:
        return 1

    def dim(self) -> int:
        return len(self.shape)

    def cpu(self) -> Strings:
        return self

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"<Strings {list(self.shape)}, {len(self.blob)} bytes>"


#: builds a NamedTuple from a tuple in C (the class's own ``__new__`` is Python code)
_new = tuple.__new__


class Placed(NamedTuple):
    """Where ``write`` put a message's tensors."""

    descs: list[TensorDesc]
    #: small tensors' bytes, embedded in the header
    blobs: list[bytes]
    #: big tensors' buffers, sent as extra frames (arena full)
    frames: list[Any]
    #: arena slots taken, which the sender frees once the receiver is done
    offsets: list[int]


def as_frame(t: torch.Tensor) -> Any:
    """Return a buffer over the bytes of CPU tensor ``t`` (copied only if strided)."""
    if t.numel() == 0:
        return b""
    flat = t.detach().reshape(-1)
    if not flat.is_contiguous() or flat.is_conj() or flat.is_neg():
        flat = flat.resolve_conj().resolve_neg().contiguous()
    return flat.view(torch.uint8).numpy()


# The front runs in the caller's process, beside threads we do not know. Most torch
# calls (view, reshape, empty, ...) release the GIL and take it back, and taking it
# back waits for CPython's switch interval (5 ms by default) whenever another thread is
# busy in Python (docs/measurements/transport-notes.md). So the per-request paths below
# move bytes with plain pointer copies and build tensors with torch.from_numpy over
# numpy views, which keep the GIL. (numpy has no bfloat16: those go through torch.)
_NUMPY: dict[torch.dtype, np.dtype] = NUMPY_DTYPES


def _flipped_mask() -> int | None:
    """The bits of a tensor's dispatch key set that mark a lazily negated or conjugated
    view (None: a torch without the key sets' raw form; plain() then asks the tensor)."""
    try:
        keys = torch._C.DispatchKeySet(torch._C.DispatchKey.Negative).add(torch._C.DispatchKey.Conjugate)
        return int(keys.raw_repr())
    except (AttributeError, TypeError):
        return None


_dispatch_keys = getattr(torch._C, "_dispatch_keys", None)
_FLIPPED = _flipped_mask()


def plain(t: torch.Tensor) -> bool:
    """Whether ``t``'s bytes are exactly ``nbytes`` at ``data_ptr()``: contiguous, and no
    lazy negation or conjugation (a view that flips its values when read).

    Those two bits are read from the tensor's dispatch keys: ``is_neg()`` and
    ``is_conj()`` are generated bindings, each of which lets go of the GIL.
    """
    if not t.is_contiguous():
        return False
    if _dispatch_keys is not None and _FLIPPED is not None:
        return not _dispatch_keys(t).raw_repr() & _FLIPPED
    return not t.is_conj() and not t.is_neg()


def as_tensor(buf: Any, dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[torch.Tensor, Any]:
    """A tensor of ``dtype``/``shape`` over writable buffer ``buf``, without copying.

    Returns:
        ``(tensor, owner)``: ``owner`` is the object the tensor's storage keeps alive,
        and lets go of when the last tensor sharing that storage is freed. (numpy
        collapses a view's base to the memory's owner, so a weak reference to ``buf``
        itself could fire while the tensor still lives.)
    """
    np_dtype = _NUMPY.get(dtype)
    if np_dtype is not None:
        owner = np.frombuffer(buf, dtype=np_dtype).reshape(shape)
        return torch.from_numpy(owner), owner
    owner = np.frombuffer(buf, dtype=np.uint8)  # bfloat16: numpy has no such dtype
    return torch.from_numpy(owner).view(dtype).view(shape), owner


def as_array(buf: Any, dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    """A numpy array of ``dtype``/``shape`` over buffer ``buf``, without copying or
    torch calls (each torch call that makes a tensor lets go of the GIL, which with many
    busy threads is a wait for it back); None for a dtype numpy lacks (bfloat16).

    Returns:
        ``(array, root)``: every view of ``array`` (a slice, a reshape) keeps ``root``
        alive, and nothing else does; a weak reference to ``root`` tells when the last
        view of the memory is gone. (numpy points a view's base at the first array of
        the chain that owns its memory or views a non-array, so ``buf`` is wrapped in a
        memoryview to make the root this array rather than one ``buf`` came from.)
    """
    np_dtype = _NUMPY.get(dtype)
    if np_dtype is None:
        return None
    root = np.frombuffer(memoryview(buf), dtype=np_dtype)
    return root.reshape(shape), root


def _numpy(t: torch.Tensor) -> np.ndarray | None:
    """``t`` as a numpy array sharing its memory, or None (bfloat16, conjugate or
    negative views, a tensor that requires grad, not on the CPU)."""
    if t.dtype not in _NUMPY:
        return None
    try:
        return t.numpy()
    except (RuntimeError, TypeError, ValueError):  # ValueError: shapes numpy cannot hold
        return None


def _copy_array(arena: Arena, offset: int, arr: np.ndarray) -> None:
    """Copy ``arr`` (any strides) into the arena at ``offset``, in C order.

    numpy lets go of the GIL for a big copy, and keeps it for a small one.
    """
    nbytes = arr.nbytes
    if offset < 0 or offset + nbytes > arena.size:
        raise ValueError(f"slot [{offset}, {offset + nbytes}) lies outside the {arena.size}-byte arena")
    dest = arena.bytes[offset : offset + nbytes].view(arr.dtype).reshape(arr.shape)
    np.copyto(dest, arr)


def _copy_into(arena: Arena, offset: int, nbytes: int, t: torch.Tensor) -> None:
    if offset < 0 or offset + nbytes > arena.size:  # a raw copy has no bounds of its own
        raise ValueError(f"slot [{offset}, {offset + nbytes}) lies outside the {arena.size}-byte arena")
    if plain(t):
        # A plain memcpy (ctypes releases the GIL for it, worth it for a big copy: an
        # arena slot holds more than the inline threshold).
        # torch's copy_ would also split a big copy over its intra-op threads, and
        # with many caller threads doing so at once the OpenMP workers spin against
        # each other (docs/measurements/transport-notes.md).
        ctypes.memmove(arena.address + offset, t.data_ptr(), nbytes)
        return
    arr = _numpy(t)  # strided: numpy copies it on one thread, without the GIL
    if arr is not None:
        _copy_array(arena, offset, arr)
    else:
        arena.view(offset, nbytes, t.dtype, tuple(t.shape)).copy_(t)


#: ctypes array types by size, for _bytes_at (a few sizes recur: one per input shape)
_CHAR_ARRAYS: dict[int, Any] = {}
_MAX_CHAR_ARRAYS = 64


def _bytes_at(address: int, nbytes: int) -> bytes:
    """A copy of ``nbytes`` bytes at ``address``, keeping the GIL: a ctypes array's
    ``raw``, or, for a size not kept, ``ctypes.string_at`` (slower: its foreign-call
    argument conversion)."""
    array = _CHAR_ARRAYS.get(nbytes)
    if array is None:
        if len(_CHAR_ARRAYS) >= _MAX_CHAR_ARRAYS:
            return ctypes.string_at(address, nbytes)
        array = _CHAR_ARRAYS[nbytes] = ctypes.c_char * nbytes
    raw: bytes = array.from_address(address).raw
    return raw


def inline(t: torch.Tensor, dtype: str, nbytes: int) -> Placed:
    """One tensor placed as :func:`write` places it below the inline threshold, without
    its checks: ``t`` must be :func:`plain`, of wire dtype ``dtype`` and ``nbytes`` bytes."""
    return _new(Placed, ([_new(TensorDesc, (dtype, t.shape, BLOB, 0))], [_bytes_at(t.data_ptr(), nbytes)], [], []))


def write(
    tensors: Sequence[torch.Tensor | Strings],
    arena: Arena | None,
    allocator: Slots | None,
    inline_threshold: int,
) -> Placed:
    """Place ``tensors`` for sending (see the module docstring).

    Blobs and copied arena slots are copies, so the caller may change those tensors as
    soon as this returns. A ``FRAME`` (arena full) still refers to the caller's memory
    until ZeroMQ has sent it, and a tensor ``allocator.adopt`` names where it lies (in
    the arena already) until the slot is freed. :class:`Strings` always go as a ``BLOB``.

    Raises:
        KeyError: a tensor's dtype cannot cross the wire.
    """
    descs: list[TensorDesc] = []
    blobs: list[bytes] = []
    frames: list[Any] = []
    offsets: list[int] = []
    try:
        for t in tensors:
            if isinstance(t, Strings):
                descs.append(_new(TensorDesc, (STRING, (t.count,), BLOB, len(blobs))))
                blobs.append(t.blob)
                continue
            name = dtype_name(t.dtype)
            shape = t.shape  # (a torch.Size is a tuple, packed as one: no tuple() copy)
            nbytes = t.nbytes
            if nbytes <= inline_threshold:
                # (keeps the GIL; t.numpy() would let go of it)
                blob = _bytes_at(t.data_ptr(), nbytes) if nbytes and plain(t) else bytes(as_frame(t))
                descs.append(_new(TensorDesc, (name, shape, BLOB, len(blobs))))
                blobs.append(blob)
                continue
            if arena is None or allocator is None:
                offset = None
            else:
                offset = allocator.adopt(t)  # (made in the arena already: no copy)
                if offset is not None:
                    offsets.append(offset)
                    descs.append(_new(TensorDesc, (name, shape, ARENA, offset)))
                    continue
                offset = allocator.alloc(nbytes)
            if offset is None:
                descs.append(_new(TensorDesc, (name, shape, FRAME, len(frames))))
                frames.append(as_frame(t))
            else:
                offsets.append(offset)
                _copy_into(arena, offset, nbytes, t)  # type: ignore[arg-type]
                descs.append(_new(TensorDesc, (name, shape, ARENA, offset)))
    except BaseException:
        if allocator is not None:
            for offset in offsets:
                allocator.free(offset)
        raise
    return _new(Placed, (descs, blobs, frames, offsets))


def read(
    descs: Sequence[TensorDesc],
    blobs: Sequence[bytes],
    frames: Sequence[zmq.Frame],
    slot: Callable[[TensorDesc], Any] | None,
    device_slot: Callable[[TensorDesc], torch.Tensor] | None = None,
    arrays: bool = False,
) -> list[Any]:
    """Rebuild tensors from descriptors (string tensors as ``list[str]``).

    Args:
        descs: the descriptors, in order.
        blobs: the byte strings embedded in the header.
        frames: the message's data frames (after the header).
        slot: returns the tensor viewing an arena descriptor's slot; None if the
            sender has no arena.
        device_slot: the same for a ``DEVICE`` descriptor (a CUDA buffer); None if
            the message may not carry any.
        arrays: give blob and frame tensors of a dtype numpy has as numpy arrays
            (``slot`` then returns arrays too), so that no torch call is made.

    Raises:
        ProtocolError: a descriptor names a missing blob or frame, one of the wrong
            size, or a slot outside the arena; or a string blob is malformed.
    """
    out: list[Any] = []
    for d in descs:
        kind = d.kind
        if d.dtype == STRING:
            if kind != BLOB or len(d.shape) != 1:  # wire.decode refuses these too
                raise ProtocolError(f"a string tensor must be a 1-D blob, got shape {list(d.shape)} of kind {kind}")
            if d.where >= len(blobs):
                raise ProtocolError(f"descriptor names blob {d.where} of {len(blobs)}")
            out.append(decode_strings(blobs[d.where], d.shape[0]))
            continue
        dtype = DTYPES[d.dtype]
        if kind == BLOB:
            if d.where >= len(blobs):
                raise ProtocolError(f"descriptor names blob {d.where} of {len(blobs)}")
            blob = blobs[d.where]
            if len(blob) != d.nbytes:
                raise ProtocolError(f"blob of {len(blob)} bytes for a {d.nbytes}-byte tensor")
            if not blob:
                out.append(_empty(d.shape, dtype))
            else:  # a writable copy: the caller owns its outputs
                out.append(_from_buffer(bytearray(blob), dtype, d.shape, arrays))
        elif kind == FRAME:
            if d.where >= len(frames):
                raise ProtocolError(f"descriptor names data frame {d.where} of {len(frames)}")
            buf = frames[d.where].buffer
            if buf.nbytes != d.nbytes:
                raise ProtocolError(f"data frame of {buf.nbytes} bytes for a {d.nbytes}-byte tensor")
            if d.nbytes == 0:
                out.append(_empty(d.shape, dtype))
            else:
                out.append(_from_buffer(buf, dtype, d.shape, arrays))
        else:
            view = slot if kind == ARENA else device_slot
            if view is None:
                raise ProtocolError(f"{'arena' if kind == ARENA else 'device'} descriptor, but there is no such buffer")
            try:
                out.append(view(d))
            except (ValueError, RuntimeError, KeyError) as e:
                raise ProtocolError(f"bad {'arena' if kind == ARENA else 'device'} descriptor: {e}") from None
    return out


def _from_buffer(buf: Any, dtype: torch.dtype, shape: tuple[int, ...], arrays: bool) -> Any:
    made = as_array(buf, dtype, shape) if arrays else None
    return made[0] if made is not None else as_tensor(buf, dtype, shape)[0]


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor of ``shape``, even one whose other dims would overflow strides."""
    try:
        return torch.empty(shape, dtype=dtype)
    except RuntimeError as e:  # e.g. (0, 2**39, 2**39): "Stride calculation overflowed"
        raise ProtocolError(f"cannot build an empty tensor of shape {list(shape)}: {e}") from None

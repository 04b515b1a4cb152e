"""Moving tensors in and out of messages (used in both processes).

``write`` turns tensors into descriptors plus data frames, placing each tensor either
in a shared-memory arena slot (one copy, straight from the source tensor, whatever
its strides) or, below the inline threshold or when the arena is full, in a ZeroMQ
frame. ``read`` turns descriptors and frames back into tensors without copying:
inline tensors alias the received frame, arena tensors alias the arena.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import zmq

from ..errors import ProtocolError
from .arena import Allocator, Arena
from .wire import DTYPES, TensorDesc, dtype_name

__all__ = ["as_frame", "read", "write"]

#: Tensors at most this large travel inline in ZeroMQ frames.
DEFAULT_INLINE_THRESHOLD = 64 * 1024


def as_frame(t: torch.Tensor) -> Any:
    """Return a buffer over the bytes of CPU tensor ``t`` (copied only if strided)."""
    if t.numel() == 0:
        return b""
    flat = t.detach().reshape(-1)
    if not flat.is_contiguous() or flat.is_conj() or flat.is_neg():
        flat = flat.resolve_conj().resolve_neg().contiguous()
    return flat.view(torch.uint8).numpy()


def _snapshot(t: torch.Tensor, nbytes: int, inline_threshold: int) -> Any:
    # Small tensors are copied now, so a caller may reuse its buffer as soon as
    # submit() returns, exactly as with arena slots; only the arena-full fallback for
    # big tensors sends the caller's memory itself (ZeroMQ holds a reference).
    frame = as_frame(t)
    return frame.tobytes() if nbytes <= inline_threshold and nbytes else frame


def _copy_into(arena: Arena, offset: int, nbytes: int, t: torch.Tensor) -> None:
    if t.is_contiguous() and not t.is_conj() and not t.is_neg():
        # A plain memcpy (numpy releases the GIL for it). torch's copy_ would split a
        # big copy over its intra-op threads, and with many caller threads each doing
        # so at once the OpenMP workers spin against each other (measured: payload at
        # concurrency 8 ran at a third of the speed).
        src = t.detach().reshape(-1).view(torch.uint8).numpy()
        arena.bytes[offset : offset + nbytes] = src
    else:
        arena.view(offset, nbytes, t.dtype, tuple(t.shape)).copy_(t)


def write(
    tensors: Sequence[torch.Tensor],
    arena: Arena | None,
    allocator: Allocator | None,
    inline_threshold: int,
    snapshot: bool = True,
) -> tuple[list[TensorDesc], list[Any], list[int]]:
    """Place ``tensors`` for sending.

    ``snapshot`` copies small inline tensors at once, so the caller may change its
    tensors as soon as this returns; a sender that sends at once (the worker) skips it.

    Returns:
        ``(descriptors, frames, offsets)``: ``offsets`` are the arena slots taken,
        which the caller frees once the receiver is done with them.

    Raises:
        KeyError: a tensor's dtype cannot cross the wire.
    """
    descs: list[TensorDesc] = []
    frames: list[Any] = []
    offsets: list[int] = []
    try:
        for t in tensors:
            name = dtype_name(t.dtype)
            shape = tuple(t.shape)
            nbytes = t.numel() * t.element_size()
            offset = None
            if nbytes > inline_threshold and arena is not None and allocator is not None:
                offset = allocator.alloc(nbytes)
            if offset is None:
                descs.append(TensorDesc(name, shape, True, len(frames)))
                frames.append(_snapshot(t, nbytes, inline_threshold) if snapshot else as_frame(t))
            else:
                offsets.append(offset)
                _copy_into(arena, offset, nbytes, t)  # type: ignore[arg-type]
                descs.append(TensorDesc(name, shape, False, offset))
    except BaseException:
        if allocator is not None:
            for offset in offsets:
                allocator.free(offset)
        raise
    return descs, frames, offsets


def read(
    descs: Sequence[TensorDesc],
    frames: Sequence[zmq.Frame],
    slot: Callable[[TensorDesc], torch.Tensor] | None,
) -> list[torch.Tensor]:
    """Rebuild tensors from descriptors without copying.

    Args:
        descs: the descriptors, in order.
        frames: the message's data frames (after the header).
        slot: returns the tensor viewing an arena descriptor's slot; None if the
            sender has no arena (every tensor must then be inline).

    Raises:
        ProtocolError: a descriptor names a missing frame, a frame of the wrong size,
            or a slot outside the arena.
    """
    out: list[torch.Tensor] = []
    for d in descs:
        dtype = DTYPES[d.dtype]
        if d.inline:
            if d.where >= len(frames):
                raise ProtocolError(f"descriptor names data frame {d.where} of {len(frames)}")
            buf = frames[d.where].buffer
            if buf.nbytes != d.nbytes:
                raise ProtocolError(f"data frame of {buf.nbytes} bytes for a {d.nbytes}-byte tensor")
            if d.nbytes == 0:
                out.append(torch.empty(d.shape, dtype=dtype))
            else:
                out.append(torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(d.shape))
        else:
            if slot is None:
                raise ProtocolError("arena descriptor, but the sender has no arena")
            try:
                out.append(slot(d))
            except ValueError as e:
                raise ProtocolError(str(e)) from None
    return out

"""A request arena lent to the application as tensors (front process; a client's).

A request's large inputs are copied into the model's request arena, where the worker
reads them. An application that makes its input anyway (decodes an image, stacks
frames, normalises a batch) can make it in that arena instead: ``Pool.empty`` hands it a
tensor whose memory is a block of the arena, and a request that names such a tensor
sends where it lies, not a copy (:meth:`LendingAllocator.adopt`).

A lent block is held by the application's tensor (and its views) and by every request
in flight that names it; it goes back to the arena when the last of them lets go, so a
caller may drop its tensor right after ``submit``. What the worker reads is the
application's memory itself: a change made to the tensor before the reply arrives is
seen by the worker, and a model that changes its inputs in place changes the tensor.

At most ``lend_limit`` bytes are lent at once, so that the arena keeps room for the
copies of other requests. A remote ``Client`` lends its own request arena the same way
(``Client.empty``).
"""

from __future__ import annotations

import bisect
import functools
import weakref
from typing import Any

import torch

from ..errors import InvalidInputError
from .arena import Allocator, Arena
from .dtypes import DTYPES, NUMPY_DTYPES

__all__ = ["LendingAllocator", "empty"]

#: the torch dtypes requests carry
_CARRIED = frozenset(DTYPES.values())


def empty(slots: LendingAllocator | None, inline_threshold: int, model: str, shape: Any, dtype: Any) -> torch.Tensor:
    """An uninitialised tensor for ``model``'s inputs (``Pool.empty``, ``Client.empty``):
    lent by ``slots`` when it is larger than ``inline_threshold`` and there is room,
    else in torch's own memory.

    Raises:
        InvalidInputError: ``shape`` is not an int or a sequence of non-negative ints,
            or ``dtype`` is not a torch dtype that requests carry.
    """
    dims = (shape,) if isinstance(shape, int) else shape
    try:
        size = torch.Size(dims)
    except TypeError:
        size = None
    if size is None or any(type(d) is bool or d < 0 for d in dims):
        raise InvalidInputError(model, None, "a shape of non-negative ints", repr(shape))
    if not isinstance(dtype, torch.dtype) or dtype not in _CARRIED:
        wanted = ", ".join(str(d) for d in DTYPES.values())
        raise InvalidInputError(model, None, f"a dtype among {wanted}", repr(dtype))
    nbytes = size.numel() * dtype.itemsize
    t = slots.lend(nbytes, dtype, tuple(size)) if slots is not None and nbytes > inline_threshold else None
    return t if t is not None else torch.empty(size, dtype=dtype)


class LendingAllocator(Allocator):
    """The allocator of a model's request arena that also lends blocks as tensors.

    Args:
        arena: the request arena (its mapping in this process).
        lend_limit: the most bytes lent at once.
    """

    def __init__(self, arena: Arena, lend_limit: int) -> None:
        super().__init__(arena.size)
        self._arena = arena
        self._base = arena.flat.data_ptr()
        self.lend_limit = lend_limit
        #: lent blocks: their starts, sorted, and start -> [size, holds]; one hold is the
        #: application's tensor (until it is freed), one each request in flight naming it
        self._lent_starts: list[int] = []
        self._lent: dict[int, list[int]] = {}
        #: start -> a weak reference to the array under each lent tensor, whose
        #: callback gives the tensor's hold back (kept until the block is freed)
        self._watch: dict[int, weakref.ref[Any]] = {}
        self.lent_bytes = 0

    def lend(self, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor | None:
        """A tensor of ``dtype``/``shape`` (``nbytes`` bytes) in a block of the arena,
        or None: the arena has no room, or ``lend_limit`` is reached."""
        if nbytes <= 0 or self.lent_bytes + nbytes > self.lend_limit:
            return None
        offset = self.alloc(nbytes)
        if offset is None:
            return None
        with self._lock:  # (the limit judged again with the slot's size: callers lend from many threads)
            size = self._used[offset]
            if self.lent_bytes + size > self.lend_limit:
                self._free_locked(offset)
                return None
            self.lent_bytes += size
            bisect.insort(self._lent_starts, offset)
            self._lent[offset] = [size, 1]
        try:
            # An array of its own over the block: the tensor's storage keeps it alive, so
            # it dies with the last view of the tensor, and then gives the hold back.
            block = self._arena.bytes[offset : offset + nbytes]
            as_numpy = NUMPY_DTYPES.get(dtype)
            if as_numpy is not None:  # (numpy's views cost less than torch's)
                block = block.view(as_numpy).reshape(shape)
            self._watch[offset] = weakref.ref(block, functools.partial(self._dropped, offset))
            t = torch.from_numpy(block)
            return t if as_numpy is not None else t.view(dtype).view(shape)
        except BaseException:
            self._let_go(offset)
            raise

    def adopt(self, t: torch.Tensor) -> int | None:
        """The offset of ``t``'s data if it lies in a lent block (then the block is held
        until :meth:`free` of that offset), else None: ``t`` is to be copied."""
        return self._named(t, hold=True)

    def free(self, offset: int) -> None:
        """Free the slot at ``offset``, or let go of a request's hold on the lent block
        that holds it.

        Raises:
            ValueError: no slot starts at ``offset`` and no lent block holds it.
        """
        with self._lock:
            if offset in self._used and offset not in self._lent:
                self._free_locked(offset)
                return
            start = self._lent_block(offset, 0)
            if start is None:
                raise ValueError(f"no allocated slot at offset {offset}")
            self._release_locked(start)

    def lends(self, t: torch.Tensor) -> bool:
        """Whether a request would name ``t`` where it lies (:meth:`adopt`), not copy it."""
        return self._named(t, hold=False) is not None

    def _named(self, t: torch.Tensor, hold: bool) -> int | None:
        """Where a request would name ``t`` (None: ``t`` is not contiguous in a lent
        block); with ``hold``, the block is held for that request."""
        # Every copied input asks: no lock unless something is lent and t lies in the arena.
        if not self._lent:
            return None
        offset = t.data_ptr() - self._base
        if offset < 0 or offset >= self.capacity or not t.is_contiguous():
            return None
        with self._lock:
            start = self._lent_block(offset, t.nbytes)
            if start is None:
                return None
            if hold:
                self._lent[start][1] += 1
        return offset

    def _lent_block(self, offset: int, nbytes: int) -> int | None:
        i = bisect.bisect(self._lent_starts, offset) - 1
        if i < 0:
            return None
        start = self._lent_starts[i]
        if offset + max(nbytes, 1) > start + self._lent[start][0]:
            return None
        return start

    def _dropped(self, start: int, _ref: weakref.ref[Any]) -> None:
        self._let_go(start)

    def _let_go(self, start: int) -> None:
        with self._lock:
            self._release_locked(start)

    def _release_locked(self, start: int) -> None:
        held = self._lent[start]
        held[1] -= 1
        if held[1]:
            return
        del self._lent[start]
        self._watch.pop(start, None)
        del self._lent_starts[bisect.bisect_left(self._lent_starts, start)]
        self.lent_bytes -= held[0]
        self._free_locked(start)

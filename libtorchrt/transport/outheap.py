"""A CPU worker's response arena as the heap its model allocates large tensors in
(``ZERO_COPY_OUTPUTS``; worker process).

Without it, a worker copies each output of more than the inline threshold into a slot of
its response arena. With it, torch's CPU allocations of at least ``min_bytes`` made while
the model runs come from that arena (``_outheap.c`` redirects libc10's
``posix_memalign`` and ``free``), so an output is usually there already: the reply names
where it is (:meth:`OutputHeap.adopt`), and the worker keeps the tensor alive until the
front releases the slot, as it does a copied slot. An output that is not in the arena
(small, a view of an input, not contiguous, or made when the arena was full) is copied
into a slot of the same heap, as before. The front sees no difference.

Intermediate tensors of at least ``min_bytes`` live in the arena too while the model
runs; they are freed as torch frees them. Hooked allocations may hold at most
``hook_limit`` bytes at once, so copies always find room. Memory allocated before
:meth:`OutputHeap.enable` (the model's weights, torch's caches made at load) stays in
glibc's heap.

One heap per process: ``install`` redirects the process's libc10 for good.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from .arena import Arena

_outheap: Any
try:
    from . import _outheap
except ImportError:  # (not built: not Linux, or an install without a compiler)
    _outheap = None

__all__ = ["MIN_BYTES", "OutputHeap", "install"]

#: Allocations below this stay in glibc's heap (an output this small is cheap to copy).
MIN_BYTES = 64 << 10

#: References to an output nobody else holds, as ``adopt`` sees it from ``tensors.write``:
#: the outputs list, write's loop variable, adopt's parameter, getrefcount's argument
_OWN_REFS = 4


class OutputHeap:
    """The allocator of a worker's response arena when the model allocates in it.

    ``tensors.write``'s :class:`~.arena.Slots` (``adopt``, ``alloc``, ``free``), over
    the native heap, and the switch of the model's allocations (:meth:`enable`). Use
    :func:`install` to make one.
    """

    def __init__(self, arena: Arena, address: int) -> None:
        #: the arena's address in the native heap's own mapping of it
        self.address = address
        self.size = arena.size
        #: offset -> [tensor, how many replies named it]: outputs kept for the front
        self._adopted: dict[int, list[Any]] = {}
        #: offsets of the slots copied into (alloc), freed by offset
        self._slots: set[int] = set()

    @property
    def used(self) -> int:
        """Bytes held in the arena: outputs kept for the front, copies, and the
        blocks the model holds right now."""
        return int(_outheap.stats()["used"])

    def adopt(self, t: torch.Tensor) -> int | None:
        """The offset of ``t``'s data if the model made it in the arena and holds it no
        more (then it is kept alive until :meth:`free` of that offset), else None.

        An output the model still holds (a module attribute, TorchScript state) is
        copied instead: the model could change it in place while the caller reads it.
        Either way the Python object has more references than ours (torch holds one on
        it while C++ code holds the tensor too).
        """
        if not t.is_contiguous() or sys.getrefcount(t) > _OWN_REFS:
            return None
        offset = t.data_ptr() - self.address
        if offset < 0 or offset + t.nbytes > self.size:
            return None
        held = self._adopted.get(offset)
        if held is None:
            self._adopted[offset] = [t, 1]
        else:  # (the same data named twice: each name is released once)
            held[1] += 1
        return offset

    def alloc(self, nbytes: int) -> int | None:
        """A slot of at least ``nbytes`` to copy an output into, or None if full."""
        offset = _outheap.alloc(nbytes)
        if offset < 0:
            return None
        self._slots.add(offset)
        return offset

    def free(self, offset: int) -> None:
        """Release what the front was handed at ``offset``.

        Raises:
            ValueError: nothing was handed out there.
        """
        held = self._adopted.get(offset)
        if held is not None:
            held[1] -= 1
            if not held[1]:
                del self._adopted[offset]  # torch frees the block when the tensor dies
            return
        if offset not in self._slots:
            raise ValueError(f"no allocated slot at offset {offset}")
        self._slots.discard(offset)
        _outheap.free(offset)

    @staticmethod
    def enable(on: bool) -> None:
        """Serve the model's large allocations from the arena (True) or glibc (False).
        (A plain call, not a context manager: the worker switches it twice a request.)"""
        _outheap.enable(on)


def install(arena: Arena, min_bytes: int = MIN_BYTES) -> tuple[OutputHeap | None, str]:
    """Make ``arena`` (its descriptor still open) this process's output heap.

    Returns:
        The heap, or None and why not (the note the worker reports).
    """
    if _outheap is None:
        return None, "ZERO_COPY_OUTPUTS: off: the native module _outheap is not built on this platform"
    if arena.fd is None:
        raise ValueError("the arena's descriptor is closed: install before close_fd()")
    try:
        info = _outheap.install(arena.fd, arena.size, min_bytes, arena.size * 3 // 4)
    except OSError as e:
        return None, f"ZERO_COPY_OUTPUTS: off: torch's allocator could not be redirected: {e}"
    if not info["alloc_slots"] or not info["free_slots"]:
        return None, "ZERO_COPY_OUTPUTS: off: this torch's libc10 does not import posix_memalign and free"
    return OutputHeap(arena, int(info["address"])), ""

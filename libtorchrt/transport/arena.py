"""Shared-memory arenas and their allocator (used in both processes).

An :class:`Arena` is an anonymous ``memfd`` mapped into the process that creates it and
into the processes it hands the descriptor to. The front creates every arena of a pool
and hands the descriptors to each worker at start (``pass_fds``), so nothing is ever
named in ``/dev/shm``: when the last process holding the descriptor or a mapping exits,
however it exits, the kernel frees the memory. (A remote client's arenas cross a Unix
socket instead: see ``fdpass``.)

A pool has two kinds of arena:

- each model's *request* arena, shared by the workers of all its instances: the front
  allocates and writes inputs (or names an input the application made there, in a
  block lent by ``Pool.empty``: ``lending.py``), the worker that runs the request reads
  them in place; the front frees a slot once no worker reads it (its reply arrived, or
  its worker is gone);
- each worker's *response* arena: the worker allocates and writes outputs (a CPU
  worker's model makes its large tensors there in the first place: ``outheap.py``), the
  front hands them to the caller as zero-copy tensors; a slot is freed when the caller
  drops the last tensor that uses it, and its offset travels back piggybacked on the
  next request to that worker (``Request.releases``).

Arenas are reused across requests, because touching fresh shared pages costs a page
fault each (a segment per request was measured slower: see
docs/measurements/transport-notes.md). When an arena is full the sender falls back to
inline ZeroMQ frames; an arena never grows.
"""

from __future__ import annotations

import bisect
import mmap
import os
import threading
from typing import Protocol

import torch

__all__ = ["ALIGN", "Allocator", "Arena", "Slots"]

#: Slot alignment: a cache line, enough for every dtype and for vectorised copies.
ALIGN = 64


class Arena:
    """A shared-memory mapping backed by a memfd.

    Args:
        size: bytes to map (rounded up to a page).
        fd: an existing memfd to map (in the worker); if None, a new one is created.
        name: a label for the memfd (shows in ``/proc/<pid>/fd``).
    """

    def __init__(self, size: int, fd: int | None = None, name: str = "libtorchrt") -> None:
        page = mmap.PAGESIZE
        self.size = (max(size, page) + page - 1) // page * page
        if fd is None:
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, self.size)
            except BaseException:
                os.close(fd)
                raise
        self.fd: int | None = fd
        try:
            self._mmap: mmap.mmap | None = mmap.mmap(fd, self.size)
        except BaseException:
            os.close(fd)
            raise
        #: the whole arena as one uint8 tensor; slices of it are the slots' views
        # Through a memoryview: torch.frombuffer does not keep the buffer export of the
        # mmap itself, so close() could unmap memory under live tensors (a segfault);
        # the memoryview export makes close() refuse (BufferError) until they die.
        self.flat = torch.frombuffer(memoryview(self._mmap), dtype=torch.uint8)
        #: the same bytes as a numpy array, for views that keep the GIL
        self.bytes = self.flat.numpy()
        #: the arena's address in this process, for plain copies
        self.address: int = self.bytes.ctypes.data

    def view(self, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """Return a tensor of ``dtype``/``shape`` that aliases ``nbytes`` at ``offset``.

        Raises:
            ValueError: the slot does not lie inside the arena, or is not aligned for
                ``dtype``.
        """
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise ValueError(f"slot [{offset}, {offset + nbytes}) lies outside the {self.size}-byte arena")
        itemsize = dtype.itemsize
        if offset % itemsize:
            raise ValueError(f"slot offset {offset} is not aligned for {dtype} ({itemsize}-byte elements)")
        return self.flat[offset : offset + nbytes].view(dtype).view(shape)

    def close_fd(self) -> None:
        """Close the descriptor; the mapping stays valid until :meth:`close`."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def close(self) -> None:
        """Close the descriptor and drop this object's mapping (idempotent).

        Tensors still viewing the arena keep the mapping alive until they are freed
        (the kernel unmaps it with the last one), so closing never invalidates memory
        a caller still holds.
        """
        self.close_fd()
        mm, self._mmap = self._mmap, None
        self.flat = torch.empty(0, dtype=torch.uint8)
        self.bytes = self.flat.numpy()
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # exported to live tensors: freed when the last of them dies


class Slots(Protocol):
    """What ``tensors.write`` places tensors with: :class:`Allocator` (the front's
    ``lending.LendingAllocator``), or a CPU worker's ``outheap.OutputHeap``."""

    def adopt(self, t: torch.Tensor) -> int | None: ...

    def alloc(self, nbytes: int) -> int | None: ...

    def free(self, offset: int) -> None: ...


class Allocator:
    """First-fit allocator of aligned slots in a fixed-size region, with coalescing.

    Thread-safe: callers of the front allocate from many threads while the router
    thread frees. Operations are O(number of free blocks), which stays small because
    neighbours coalesce and slots are short-lived.
    """

    def __init__(self, capacity: int, align: int = ALIGN) -> None:
        self.capacity = capacity
        self.align = align
        self._starts: list[int] = [0]  # free blocks, sorted by offset
        self._sizes: list[int] = [capacity]
        self._used: dict[int, int] = {}  # offset -> slot size
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        """Bytes currently allocated (rounded up to the alignment)."""
        return sum(self._used.values())

    def __len__(self) -> int:
        """Number of live slots."""
        return len(self._used)

    def adopt(self, t: torch.Tensor) -> int | None:
        """None: a tensor is never in this arena already (those that lend or make
        tensors there say otherwise: ``lending.LendingAllocator``, ``outheap.OutputHeap``)."""
        return None

    def alloc(self, nbytes: int) -> int | None:
        """Allocate a slot of at least ``nbytes``; return its offset, or None if full."""
        size = max(self.align, (nbytes + self.align - 1) // self.align * self.align)
        with self._lock:
            for i, free in enumerate(self._sizes):
                if free >= size:
                    offset = self._starts[i]
                    if free == size:
                        del self._starts[i], self._sizes[i]
                    else:
                        self._starts[i] = offset + size
                        self._sizes[i] = free - size
                    self._used[offset] = size
                    return offset
        return None

    def free(self, offset: int) -> None:
        """Free the slot at ``offset``.

        Raises:
            ValueError: no slot starts at ``offset`` (double free or a bad offset).
        """
        with self._lock:
            self._free_locked(offset)

    def _free_locked(self, offset: int) -> None:
        size = self._used.pop(offset, None)
        if size is None:
            raise ValueError(f"no allocated slot at offset {offset}")
        i = bisect.bisect(self._starts, offset)
        end = offset + size
        # Coalesce with the following block, then with the preceding one.
        if i < len(self._starts) and self._starts[i] == end:
            size += self._sizes[i]
            del self._starts[i], self._sizes[i]
        if i > 0 and self._starts[i - 1] + self._sizes[i - 1] == offset:
            self._sizes[i - 1] += size
        else:
            self._starts.insert(i, offset)
            self._sizes.insert(i, size)

    def reset(self) -> None:
        """Free every slot (used when the peer process is replaced)."""
        with self._lock:
            self._starts, self._sizes, self._used = [0], [self.capacity], {}

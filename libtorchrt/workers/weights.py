"""One copy of a model's weights for all its CPU instances (worker process).

Each instance is a process, so each would hold its own copy of the model's parameters
and buffers. With ``ENABLE_WEIGHT_SHARING``, the front makes one memfd per model
(``front/weights.py``) and hands it to every CPU instance of that model; here:

1. The worker loads its model as usual (a private copy).
2. Under an exclusive lock (``flock`` on the process's own description of the memfd:
   instances that start together take turns), the first instance finds the memfd empty and **fills**
   it: a small header (the layout: each tensor's name, dtype, shape, offset, as JSON),
   then every tensor's bytes, 64-byte aligned. It then seals the memfd against writes,
   growth and shrinking (``F_SEAL_WRITE``...): from then on nobody, the front included,
   can change a byte of it.
3. Every instance (the first one too) maps it **read-only** and points each parameter
   and buffer at its bytes there (``Tensor.set_``), after checking that its own copy
   is byte-for-byte the same (the same file, loaded the same way; otherwise it keeps
   its copy and says why). Its private copy is freed, and ``malloc_trim`` gives the
   memory back to the system.

A model that writes into its weights faults (SIGSEGV) in its own process: the mapping
is read-only, so the write can never reach its siblings. The worker dies, the front
replaces it, and the replacement maps the same, unchanged, weights.

What cannot be shared is served unshared with a note naming why: a tensor that is not
dense and contiguous, or a weight whose bytes differ between instances. Sharing happens
before ``FREEZE_MODULE`` / ``OPTIMIZE_FOR_INFERENCE``: freezing turns parameters into
constants and may fold them into new tensors (conv + batch norm), which are then
private again; :func:`shared_bytes` measures what stayed shared.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import mmap
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Shared", "share", "shared_bytes", "tensors_of"]

_ALIGN = 64
_MAGIC = b"LTRTW1\0\0"
#: header: magic, then the layout's length (8 bytes, little endian), then the layout
_HEAD = len(_MAGIC) + 8
_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL


@dataclass
class Shared:
    """What :func:`share` did: the mapping (kept open while the model lives), the
    bytes now shared, whether this process filled the memfd, and notes for the user."""

    mapping: mmap.mmap | None
    nbytes: int
    filled: bool
    notes: list[str]


def tensors_of(module: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """A module's parameters and buffers by name, each storage once (a tied weight is
    shared under its first name)."""
    seen: set[int] = set()
    for name, t in (*module.named_parameters(), *module.named_buffers()):
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        yield name, t


def share(module: Any, fd: int, model: str) -> Shared:
    """Point ``module``'s weights at the model's shared, read-only memfd ``fd``
    (filling it first if this process is the first instance).

    Returns:
        What was shared; ``notes`` say what could not be, and why.
    """
    notes: list[str] = []
    named = dict(tensors_of(module))
    skipped = [n for n, t in named.items() if not t.is_contiguous() or t.storage_offset() != 0 or t.is_sparse]
    for n in skipped:
        named.pop(n)
    if skipped:
        notes.append(f"weights {skipped[:5]} are not dense and contiguous: they are not shared")
    if not named:
        return Shared(None, 0, False, notes)  # (no weights: nothing to share, nothing to say)
    with _locked(fd):
        filled = os.fstat(fd).st_size == 0
        if filled:
            _fill(fd, named)
    size = os.fstat(fd).st_size
    mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    layout = _layout(mapping)
    nbytes = 0
    mismatched: list[str] = []
    with warnings.catch_warnings(), torch.no_grad():
        # torch warns that the buffer is not writable: that is the point.
        warnings.simplefilter("ignore", UserWarning)
        for name, dtype, shape, offset in layout:
            t = named.get(name)
            if t is None:
                mismatched.append(name)
                continue
            view = _view(mapping, offset, dtype, shape)
            if view.dtype != t.dtype or view.shape != t.shape or not torch.equal(view, t):
                mismatched.append(name)
                continue
            t.set_(view.untyped_storage(), 0, view.shape, view.stride())
            nbytes += view.nbytes
    missing = sorted(set(named) - {entry[0] for entry in layout})
    if mismatched or missing:
        notes.append(
            f"weights {(mismatched + missing)[:5]} differ from the shared copy (another file, or a model that "
            "changes its weights when loaded): this instance keeps its own copy of them"
        )
    _trim()
    return Shared(mapping, nbytes, filled, notes)


@contextlib.contextmanager
def _locked(fd: int) -> Iterator[None]:
    """Hold the model's fill lock: an exclusive ``flock`` on a description of the memfd
    of this process's own.

    Not ``lockf`` on ``fd``: a POSIX record lock is released when the process closes
    *any* descriptor of the file, and ``mmap`` closes the duplicate it makes, so a
    sibling would map the memfd before it is sealed (and sealing it then fails). Not
    ``flock`` on ``fd`` either: every instance received the same open description, and
    flock excludes descriptions, not processes. Reopening ``/proc/self/fd/N`` makes a
    description that is this process's alone.
    """
    own = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(own, fcntl.LOCK_EX)
        yield
    finally:
        os.close(own)  # (releases the lock)


def shared_bytes(module: Any, mapping: mmap.mmap | None) -> int:
    """Bytes of ``module``'s weights (and a frozen module's tensor constants) that live
    in ``mapping``."""
    if mapping is None:
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (a read-only buffer)
        base = torch.frombuffer(mapping, dtype=torch.uint8, count=1).data_ptr()
    end = base + len(mapping)
    tensors = [t for _, t in (*module.named_parameters(), *module.named_buffers())]
    graph = getattr(module, "graph", None)
    if graph is not None:  # a frozen TorchScript module keeps its weights as constants
        for node in graph.findAllNodes("prim::Constant"):
            if node.output().type().kind() == "TensorType":
                value = node.output().toIValue()
                if isinstance(value, torch.Tensor):
                    tensors.append(value)
    total = 0
    seen: set[int] = set()
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen and base <= ptr < end:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def _fill(fd: int, named: dict[str, torch.Tensor]) -> None:
    entries: list[list[Any]] = []
    offsets: list[int] = []
    offset = 0
    for name, t in named.items():
        entries.append([name, str(t.dtype).removeprefix("torch."), list(t.shape), offset])
        offsets.append(offset)
        offset = _aligned(offset + t.nbytes)
    layout = json.dumps(entries).encode()
    data_start = _aligned(_HEAD + len(layout))
    size = max(data_start + offset, 1)
    os.ftruncate(fd, size)
    with mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE) as out:
        out[: len(_MAGIC)] = _MAGIC
        out[len(_MAGIC) : _HEAD] = len(layout).to_bytes(8, "little")
        out[_HEAD : _HEAD + len(layout)] = layout
        for at, t in zip(offsets, named.values()):
            dest = torch.frombuffer(out, dtype=torch.uint8, count=t.nbytes, offset=data_start + at)
            dest.copy_(t.detach().reshape(-1).view(torch.uint8))
            del dest
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)


def _layout(mapping: mmap.mmap) -> list[tuple[str, torch.dtype, tuple[int, ...], int]]:
    """The layout a filled memfd holds: (name, dtype, shape, absolute offset)."""
    if mapping[: len(_MAGIC)] != _MAGIC:
        raise ValueError("the shared weights memfd holds no layout")
    n = int.from_bytes(mapping[len(_MAGIC) : _HEAD], "little")
    entries = json.loads(mapping[_HEAD : _HEAD + n])
    data_start = _aligned(_HEAD + n)
    return [(name, getattr(torch, dtype), tuple(shape), data_start + at) for name, dtype, shape, at in entries]


def _view(mapping: mmap.mmap, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    count = 1
    for d in shape:
        count *= d
    return torch.frombuffer(mapping, dtype=dtype, count=count, offset=offset).view(shape)


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _trim() -> None:
    """Give freed heap memory (the private copy) back to the system."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass

"""A batch request's inputs, assembled in the worker (see ``_batcher.py`` in the front).

When every input of every request travels inside the header (small inputs), the front
joins them: one blob and one descriptor per input, holding all the rows (its first
dimension is then the batch's total; a request's own descriptors hold its own rows,
fewer when there are several requests, so the two forms cannot be confused). The worker
reads those as it reads a single request's.

Otherwise a batch's descriptors are its requests' own, request after request; for each
input the worker builds one tensor of all their rows:

- requests whose rows lie back to back in the request arena (consecutive slots, as the
  allocator hands them out to requests that arrive together) are viewed as one tensor,
  without copying;
- small inputs that travel inside the header (not joined: a batch of one) are joined
  once into one buffer;
- otherwise the rows are gathered with one copy (``torch.cat``).

The front never concatenates tensors (it joins only the bytes of small inputs, which it
copies into the header anyway); every path costs at most one copy of each row here.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import zmq

from ..errors import ProtocolError
from ..transport import tensors as tensor_io
from ..transport import wire
from ..transport.wire import ARENA, BLOB, DTYPES, TensorDesc

__all__ = ["check_rows", "gather", "join", "member_rows", "rows_of"]


def gather(
    descs: Sequence[TensorDesc],
    rows: Sequence[int],
    blobs: Sequence[bytes],
    frames: Sequence[zmq.Frame],
    slot: Callable[[TensorDesc], torch.Tensor],
    device_slot: Callable[[TensorDesc], torch.Tensor] | None = None,
) -> list[Any]:
    """One input per model argument, each holding the rows of every request in order.

    Raises:
        ProtocolError: the descriptors do not make up ``len(rows)`` requests of the same
            inputs with those row counts and matching non-batch dimensions.
    """
    k = len(rows)
    total = sum(rows)
    if k > 1 and descs and descs[0].shape and descs[0].shape[0] == total:  # joined by the front
        for d in descs:
            if not d.shape or d.shape[0] != total or d.dtype not in DTYPES:
                raise ProtocolError(f"a joined input of a batch of {total} rows: {d.dtype}{list(d.shape)}")
        return tensor_io.read(descs, blobs, frames, slot, device_slot)
    if not k or len(descs) % k:
        raise ProtocolError(f"a batch of {k} requests cannot hold {len(descs)} input descriptors")
    n = len(descs) // k
    out: list[Any] = []
    for i in range(n):
        group = [descs[j * n + i] for j in range(k)]
        first = group[0]
        for d, r in zip(group, rows):
            if d.dtype != first.dtype or not d.shape or d.shape[0] != r or d.shape[1:] != first.shape[1:]:
                raise ProtocolError(f"input {i} of a batch: {d.dtype}{list(d.shape)} does not fit {r} rows")
        shape = (total, *first.shape[1:])
        dtype = DTYPES.get(first.dtype)
        if first.kind == ARENA and all(d.kind == ARENA for d in group) and _adjacent(group):
            out.append(slot(TensorDesc(first.dtype, shape, ARENA, first.where)))
        elif dtype is not None and all(d.kind == BLOB for d in group):
            for d in group:
                if d.where >= len(blobs) or len(blobs[d.where]) != d.nbytes:
                    raise ProtocolError(f"input {i} of a batch names a missing or wrong-sized blob")
            joined = bytearray(b"".join(blobs[d.where] for d in group))
            out.append(tensor_io.as_tensor(joined, dtype, shape)[0] if joined else torch.empty(shape, dtype=dtype))
        else:
            parts = tensor_io.read(group, blobs, frames, slot, device_slot)
            if parts and isinstance(parts[0], list):  # strings
                out.append([s for part in parts for s in part])
            else:
                out.append(torch.cat(parts))
    return out


def _adjacent(group: Sequence[TensorDesc]) -> bool:
    return all(b.where == a.where + a.nbytes for a, b in itertools.pairwise(group))


def check_rows(outputs: Sequence[Any], total: int) -> None:
    """Each output of a batch must have one row per input row.

    Raises:
        ValueError: an output whose first dimension is not ``total``.
    """
    for i, t in enumerate(outputs):
        got = len(t) if isinstance(t, list) else (t.shape[0] if t.dim() else None)
        if got != total:
            raise ValueError(
                f"output {i} of a batch of {total} rows has shape "
                f"{list(t.shape) if isinstance(t, torch.Tensor) else [len(t)]}; a batching model "
                "(max_batch_size > 0) must return one row per input row"
            )


def member_rows(msg: wire.Request) -> int:
    """The rows of one request of a lane batch (its first input's first dimension).

    Raises:
        ProtocolError: a request without inputs, or with a 0-dimensional first one.
    """
    if not msg.tensors or not msg.tensors[0].shape:
        raise ProtocolError("a request of a batch must have inputs with a batch dimension")
    return msg.tensors[0].shape[0]


def join(members: Sequence[wire.Request], rows: Sequence[int]) -> wire.Request:
    """The requests of a batch the front's hub formed (``wire.Batch``), of ``rows`` rows
    each (:func:`member_rows`), as one batch request: their descriptors in turn (each
    ``BLOB`` renumbered into the joined blobs), which :func:`gather` reads as any batch's."""
    descs: list[TensorDesc] = []
    blobs: list[bytes] = []
    for m in members:
        base = len(blobs)
        if base:
            descs += [
                wire.tensor_desc(d.dtype, d.shape, BLOB, d.where + base) if d.kind == BLOB else d for d in m.tensors
            ]
        else:
            descs += m.tensors
        blobs += m.blobs
    return wire.Request(-1, descs, [], blobs, batch=list(rows))


def rows_of(output: Any, start: int, end: int) -> Any:
    """Rows ``[start, end)`` of one output of a batch (a view of a tensor)."""
    if isinstance(output, tensor_io.Strings):
        return tensor_io.Strings.of(wire.decode_strings(output.blob, output.count)[start:end])
    return output[start:end]

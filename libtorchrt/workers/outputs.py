"""What a model returns, checked against its declared outputs (worker process).

A model declared to return FP32 ``[1, 64]`` that returns INT64 ``[2, 3]`` must not be
answered as if all were well (a server would advertise FP32 in its metadata and send
INT64 data). The front hands each worker the declared outputs as plain values
(:class:`DeclaredOutput`, in its JSON spec); the worker checks every result before it
writes it to shared memory, and a mismatch fails that request as the model's error
(``ModelError`` in the front), naming output, declaration and what came back. The
check runs in the worker, off the front's hot path: a few comparisons per output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..transport import tensors as tensor_io
from ..transport.wire import STRING

__all__ = ["DeclaredOutput", "OutputMismatchError", "check_outputs"]


class OutputMismatchError(Exception):
    """The model returned something other than its configuration declares."""


@dataclass(frozen=True)
class DeclaredOutput:
    """One declared output, as the worker checks it.

    ``position``: which of the model's results it is; ``dtype``: a wire dtype name or
    ``"string"``; ``shape``: the sizes the model itself gives (a spec's ``reshape`` if it
    has one, else its ``dims``; -1 is any size; None: any shape), without the batch
    dimension; ``batched``: a leading batch dimension comes first (``max_batch_size > 0``).
    """

    position: int
    name: str
    dtype: str
    shape: tuple[int, ...] | None
    batched: bool

    def to_json(self) -> list[Any]:
        return [self.position, self.name, self.dtype, None if self.shape is None else list(self.shape), self.batched]

    @classmethod
    def from_json(cls, item: Sequence[Any]) -> DeclaredOutput:
        position, name, dtype, shape, batched = item
        dims = None if shape is None else tuple(int(d) for d in shape)
        return cls(int(position), str(name), str(dtype), dims, bool(batched))

    def describe(self) -> str:
        if self.shape is None:
            return f"{self.dtype} (any shape)"
        dims = ["batch", *self.shape] if self.batched else list(self.shape)
        return f"{self.dtype}[{', '.join(str(d) for d in dims)}]"


def check_outputs(outputs: Sequence[torch.Tensor | tensor_io.Strings], declared: Sequence[DeclaredOutput]) -> None:
    """Raise :class:`OutputMismatchError` unless every declared output is there as declared.

    Outputs the configuration does not declare are not checked (they are named
    ``OUTPUT__<i>`` for the caller, as before).
    """
    for d in declared:
        if d.position >= len(outputs):
            raise OutputMismatchError(
                f"output {d.name!r} is declared {d.describe()} but the model returned only {len(outputs)} output(s)"
            )
        value = outputs[d.position]
        if isinstance(value, tensor_io.Strings):
            if d.dtype != STRING:
                raise OutputMismatchError(
                    f"output {d.name!r} is declared {d.describe()} but the model returned a list of strings"
                )
            continue  # (a flat list: its shape is the request's, not the model's)
        got_dtype = str(value.dtype).removeprefix("torch.")
        shape = tuple(value.shape)
        if d.dtype != got_dtype or not _fits(shape, d):
            raise OutputMismatchError(
                f"output {d.name!r} is declared {d.describe()} but the model returned {got_dtype}{list(shape)}"
            )


def _fits(shape: tuple[int, ...], d: DeclaredOutput) -> bool:
    if d.shape is None:
        return True
    if d.batched:
        if not shape:
            return False
        shape = shape[1:]
    if len(shape) != len(d.shape):
        return False
    return all(want == -1 or want == got for want, got in zip(d.shape, shape))

"""Request inputs for the benchmark: declared shapes and dtypes, random data or files.

Runs in the bench process. An :class:`InputSpec` says what one request carries for one
model input; :func:`make_inputs` turns the specs into tensors for a batch size, and
:func:`make_input_sets` makes a few such sets with different seeds, once per
configuration: requests take them in turn (``serving.InputFeed``), so that
consecutive requests never send the same data, and no caller spends its measured time
making data.

Batch size ``B``:

* a *batched* input (a repository model with ``max_batch_size > 0``, whose dims exclude
  the batch dimension) gets ``B`` prepended to its dims (``1`` when no ``--batch-size``);
* any other input has its dim 0 set to ``B`` when ``--batch-size`` is given, and keeps
  its shape as declared otherwise;
* an input read from a file is sent as it is, except that a file with one row is
  repeated to ``B`` rows; a file with another number of rows than ``B`` is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["INPUT_SETS", "INPUT_SETS_BYTES", "InputError", "InputSpec", "make_input_sets", "make_inputs", "parse_shape"]

#: Input sets per batch size that requests take in turn (different seeds)...
INPUT_SETS = 8
#: ...as long as they stay under this many bytes together (there are always two).
INPUT_SETS_BYTES = 64 << 20


class InputError(ValueError):
    """Inputs cannot be made as asked (a usage error: the CLI exits with status 2)."""


@dataclass(frozen=True)
class InputSpec:
    """One input of a request.

    Attributes:
        name: the input's name (``forward()`` argument name or ``INPUT__<i>``).
        shape: its shape (without the batch dimension when ``batched``).
        dtype: its torch dtype.
        batched: the batch dimension is not part of ``shape`` and is prepended.
        file: a ``.npy`` file holding the data instead of generated data.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    batched: bool = False
    file: Path | None = None

    def describe(self, batch_size: int | None) -> dict[str, object]:
        """JSON-friendly description (shape as sent at ``batch_size``)."""
        return {
            "name": self.name,
            "shape": list(self.request_shape(batch_size)) if self.file is None else None,
            "dtype": str(self.dtype).removeprefix("torch."),
            "batched": self.batched,
            "source": str(self.file) if self.file is not None else "generated",
        }

    def request_shape(self, batch_size: int | None) -> tuple[int, ...]:
        """The shape one request sends at ``batch_size`` (None: no ``--batch-size``).

        Raises:
            InputError: a batch size was asked for a scalar input.
        """
        if self.batched:
            return (batch_size or 1, *self.shape)
        if batch_size is None:
            return self.shape
        if not self.shape:
            raise InputError(f"input {self.name!r} is a scalar; --batch-size needs a leading batch dimension")
        return (batch_size, *self.shape[1:])


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) → ``(1, 3, 224, 224)``; ``""`` → ``()``.

    Raises:
        InputError: not a list of integers >= 0 (or -1).
    """
    text = text.strip().strip("[]()")
    if not text:
        return ()
    try:
        dims = tuple(int(t) for t in text.replace("x", ",").split(","))
    except ValueError:
        raise InputError(f"shape {text!r} is not a comma-separated list of integers") from None
    if any(d < -1 for d in dims):
        raise InputError(f"shape {text!r} may only hold sizes >= 0 or -1")
    return dims


def _generate(shape: Sequence[int], dtype: torch.dtype, data: str, gen: torch.Generator) -> torch.Tensor:
    if data == "zero":
        return torch.zeros(tuple(shape), dtype=dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, tuple(shape), generator=gen).bool()
    if dtype.is_floating_point:
        return torch.randn(tuple(shape), generator=gen, dtype=torch.float32).to(dtype)
    if dtype == torch.uint8:
        return torch.randint(0, 256, tuple(shape), generator=gen, dtype=torch.uint8)
    # Other integers: small non-negative values, so that index-like inputs stay in range.
    return torch.randint(0, 16, tuple(shape), generator=gen, dtype=dtype)


def _load(spec: InputSpec, batch_size: int | None) -> torch.Tensor:
    assert spec.file is not None
    try:
        array = np.load(spec.file, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"--input-file {spec.name}={spec.file}: {exc}") from None
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if batch_size is None or (batch_size == 1 and not spec.batched):
        return tensor
    rows = tensor.shape[0] if tensor.dim() else None
    if rows == batch_size:
        return tensor
    if rows == 1:
        return tensor.expand(batch_size, *tensor.shape[1:]).contiguous()
    raise InputError(
        f"--input-file {spec.name}={spec.file} holds {rows} row(s) (shape {list(tensor.shape)}); "
        f"batch size {batch_size} needs {batch_size} rows or one row to repeat"
    )


def make_inputs(
    specs: Sequence[InputSpec], batch_size: int | None, *, data: str = "random", seed: int = 0
) -> dict[str, torch.Tensor]:
    """The tensors of one request, by input name.

    Args:
        specs: the model's inputs.
        batch_size: rows per request (None: no ``--batch-size`` was given).
        data: ``"random"`` (normal floats, small non-negative integers) or ``"zero"``.
        seed: seed of the generated data.

    Raises:
        InputError: a shape still holds -1, or a file does not fit the batch size.
    """
    if data not in ("random", "zero"):
        raise InputError(f"input data {data!r}: expected 'random' or 'zero'")
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for spec in specs:
        if spec.file is not None:
            out[spec.name] = _load(spec, batch_size)
            continue
        shape = spec.request_shape(batch_size)
        if any(d < 0 for d in shape):
            raise InputError(
                f"input {spec.name!r} has a variable dimension (shape {list(shape)}); "
                f"give it with --shape-override {spec.name}=..."
            )
        out[spec.name] = _generate(shape, spec.dtype, data, gen)
    return out


def make_input_sets(
    specs: Sequence[InputSpec], batch_size: int | None, *, data: str = "random", count: int = INPUT_SETS
) -> list[dict[str, torch.Tensor]]:
    """Up to ``count`` input sets for one batch size, generated with seeds 0, 1, ...

    There are as many as fit in :data:`INPUT_SETS_BYTES`, and at least two; one when
    nothing would differ between them (``data="zero"``, every input from a file).
    Inputs read from a file are the same tensor in every set.

    Raises:
        InputError: as :func:`make_inputs`.
    """
    first = make_inputs(specs, batch_size, data=data, seed=0)
    generated = [s for s in specs if s.file is None]
    if count <= 1 or data == "zero" or not generated:
        return [first]
    nbytes = sum(t.numel() * t.element_size() for t in first.values())
    n = max(2, min(count, INPUT_SETS_BYTES // max(nbytes, 1)))
    sets = [first]
    for seed in range(1, n):
        fresh = make_inputs(generated, batch_size, data=data, seed=seed)
        sets.append({s.name: fresh[s.name] if s.file is None else first[s.name] for s in specs})
    return sets

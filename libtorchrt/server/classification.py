"""Triton's classification extension: an output's top classes, as strings (server process).

A request asks for it per output: over HTTP ``"parameters": {"classification": N}`` on
the requested output, over gRPC the output's ``classification`` int64 parameter
(tritonclient's ``InferRequestedOutput(name, class_count=N)`` sends either). Instead of
the tensor, the output is then a ``BYTES`` tensor of the N largest values, each
``"value:index"``, or ``"value:index:label"`` when the output has a ``label_filename``
(one label per line; the label of class i is line i) and that line is not empty.

As in Triton's server (``classification.cc``, ``http_server.cc``): a batching model's
output (``max_batch_size > 0``) is classified per batch row, over the row's elements
flattened, giving shape ``[batch, min(N, row size)]``; any other output is classified
over all its elements, giving ``[min(N, size)]``. Values are written as C's ``%f``
(``0.500000``) for floating-point outputs and as integers for integer outputs.
Differences: ties keep index order (Triton's sort leaves them unspecified), and FP16
and BF16 outputs are classified too (Triton refuses them); BOOL and BYTES are refused.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from ..config import ModelConfig

__all__ = ["MAX_LABEL_FILE_BYTES", "ClassificationError", "Labels", "top_classes"]

#: label files larger than this are refused (a label file is a few KiB to a few MiB)
MAX_LABEL_FILE_BYTES = 64 << 20
_REFUSED = (torch.bool, torch.complex64, torch.complex128)


class ClassificationError(ValueError):
    """An output that cannot be classified (its data type), or a label file that cannot
    be read."""


def top_classes(
    value: torch.Tensor, count: int, *, batched: bool, labels: Sequence[str] | None = None, name: str = "output"
) -> tuple[list[bytes], list[int]]:
    """The ``count`` largest elements of ``value`` as Triton's classification strings.

    Args:
        value: the model's output.
        count: how many classes (N >= 1).
        batched: the model batches (``max_batch_size > 0``): dimension 0 is the batch,
            each row classified apart.
        labels: the output's labels, by class index (None: no labels).
        name: the output's name, for messages.

    Returns:
        The strings (UTF-8, row-major) and their shape: ``[batch, k]`` or ``[k]``,
        ``k = min(count, row size)``.

    Raises:
        ClassificationError: ``value`` is not a tensor of numbers.
    """
    if not isinstance(value, torch.Tensor) or value.dtype in _REFUSED:
        kind = str(value.dtype).removeprefix("torch.") if isinstance(value, torch.Tensor) else "strings"
        raise ClassificationError(
            f"output {name!r} is {kind}: classification needs an output of numbers (integers or floating point)"
        )
    t = value.detach().cpu()
    per_row = batched and t.dim() > 0
    rows = t.reshape(t.shape[0], -1) if per_row else t.reshape(1, -1)
    k = min(count, rows.shape[1])
    floating = t.dtype.is_floating_point
    if floating and t.dtype != torch.float64:
        rows = rows.float()  # (FP16 and BF16 sort and print as float)
    top, index = torch.sort(rows, dim=1, descending=True, stable=True)
    out: list[bytes] = []
    for values, indices in zip(top[:, :k].tolist(), index[:, :k].tolist()):
        for v, i in zip(values, indices):
            text = f"{v:f}:{i}" if floating else f"{int(v)}:{i}"
            label = labels[i] if labels is not None and i < len(labels) else ""
            out.append((f"{text}:{label}" if label else text).encode())
    return out, [rows.shape[0], k] if per_row else [k]


class Labels:
    """The label files of models' outputs, read once and kept while the file is
    unchanged (a model loaded again with new labels gets them). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: path -> ((mtime_ns, size), labels); guarded by _lock
        self._cache: dict[str, tuple[tuple[int, int], list[str]]] = {}

    def of(self, cfg: ModelConfig, output: str) -> list[str] | None:
        """The labels of ``cfg``'s output ``output`` (its ``label_filename`` in the
        model's directory), or None if it has none.

        Raises:
            ClassificationError: the file cannot be read, or is too large.
        """
        spec = next((s for s in cfg.outputs if s.name == output), None)
        if spec is None or spec.label_filename is None:
            return None
        path = Path(cfg.model_dir) / spec.label_filename
        try:
            st = os.stat(path)
            stamp = (st.st_mtime_ns, st.st_size)
            with self._lock:
                cached = self._cache.get(str(path))
            if cached is not None and cached[0] == stamp:
                return cached[1]
            if st.st_size > MAX_LABEL_FILE_BYTES:
                raise ClassificationError(
                    f"model {cfg.name!r}: label file {spec.label_filename!r} of output {output!r} is "
                    f"{st.st_size} bytes, more than {MAX_LABEL_FILE_BYTES}"
                )
            text = path.read_bytes()[:MAX_LABEL_FILE_BYTES].decode("utf-8", errors="replace")
        except OSError as e:
            raise ClassificationError(
                f"model {cfg.name!r}: cannot read label file {spec.label_filename!r} of output {output!r}: {e.strerror}"
            ) from None
        lines = text.split("\n")  # (Triton's std::getline: '\n' only; a trailing '\r' is dropped here)
        if lines and lines[-1] == "":
            lines.pop()
        labels = [line.removesuffix("\r") for line in lines]
        with self._lock:
            self._cache[str(path)] = (stamp, labels)
        return labels

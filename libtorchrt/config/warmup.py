"""Warm-up requests: :class:`ModelWarmup`, :class:`WarmupInput` and their tensors.

The configuration (Triton's ``model_warmup``) is read in the front; the tensors are
built by :func:`warmup_tensors`, a pure function that any process may call (the
worker runs them before it says it is ready). Data follows Triton's rules:

- ``zero_data``: zeros (empty strings for ``TYPE_STRING``);
- ``random_data``: floats in [0, 1), integers 0 or 1, random booleans (Triton sends raw
  random bytes; these stay valid as indices), the same at every start (seeded); empty
  strings for ``TYPE_STRING``, as in Triton;
- ``input_data_file``: a file under ``<model>/warmup/`` holding the tensor's raw
  bytes in row-major order (native byte order); for ``TYPE_STRING``, each element
  as a 4-byte little-endian length followed by its bytes (UTF-8 text here).

For a batching model (``max_batch_size > 0``) a sample of ``batch_size`` is the
sample repeated ``batch_size`` times along a new first dimension, as Triton sends
``batch_size`` copies of it in one batch. ``TYPE_STRING`` values are flat lists of
``str``, every element in row-major order: TorchScript takes strings as a 1-D
``List[str]`` (and Triton's PyTorch backend serves 1-D strings only).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch

from ..errors import ConfigError
from ..transport.wire import DTYPES
from .tensor import STRING, TensorSpec, dtype_of

__all__ = [
    "WARMUP_DIR",
    "ModelWarmup",
    "WarmupInput",
    "WarmupValue",
    "check_input",
    "declared_warmup",
    "sample_value",
    "warmup_tensors",
]

#: The directory of a model (beside its version directories) that holds warm-up files.
WARMUP_DIR = "warmup"

#: A warm-up value: a tensor, or a flat list of str (row-major) for TYPE_STRING.
WarmupValue = torch.Tensor | list[str]


@dataclass(frozen=True)
class WarmupInput:
    """One input of a warm-up sample (Triton's ``ModelWarmup.Input``).

    Exactly one of ``zero_data``, ``random_data`` and ``input_data_file`` says
    where the data comes from.

    Args:
        data_type: dtype, as in :class:`TensorSpec` (``"float32"``, ``TYPE_FP32``,
            ``TYPE_STRING``, a torch dtype).
        dims: the shape of one sample, without the batch dimension; no -1.
        zero_data: zeros.
        random_data: random values.
        input_data_file: a relative path under the model's ``warmup/`` directory.

    Raises:
        ConfigError: not exactly one data source, a -1 in dims, or a file path that
            is absolute or leaves the ``warmup/`` directory.
    """

    data_type: str | torch.dtype
    dims: Sequence[int] = ()
    zero_data: bool = False
    random_data: bool = False
    input_data_file: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_type", dtype_of(self.data_type, ""))
        dims = tuple(int(d) for d in self.dims)
        if any(d < 0 for d in dims):
            raise ConfigError(
                f"dims {list(dims)} must give every size (no -1: a warm-up tensor has a shape)",
                key="dims",
            )
        object.__setattr__(self, "dims", dims)
        sources = [bool(self.zero_data), bool(self.random_data), self.input_data_file is not None]
        if sum(sources) != 1:
            raise ConfigError("give exactly one of zero_data, random_data, input_data_file", key="input_data_type")
        object.__setattr__(self, "zero_data", bool(self.zero_data))
        object.__setattr__(self, "random_data", bool(self.random_data))
        if self.input_data_file is not None:
            name = str(self.input_data_file)
            parts = PurePosixPath(name).parts
            if not name or name.startswith(("/", "\\")) or Path(name).is_absolute() or ".." in parts:
                raise ConfigError(
                    f"input_data_file {name!r} must be a relative path inside the model's "
                    f"{WARMUP_DIR}/ directory (no leading '/', no '..')",
                    key="input_data_file",
                )
            object.__setattr__(self, "input_data_file", name)

    @property
    def elements(self) -> int:
        """Elements in one sample."""
        return math.prod(self.dims)


@dataclass(frozen=True)
class ModelWarmup:
    """One warm-up sample (Triton's ``model_warmup`` entry).

    Args:
        name: the sample's name (for messages).
        batch_size: samples per request; 0 skips the sample (as Triton does); must
            be 1 for a model that does not batch.
        inputs: input name -> :class:`WarmupInput`.
        count: how many times the request runs (0 means once, as in Triton).

    Raises:
        ConfigError: a negative batch_size or count, or no inputs.
    """

    name: str = ""
    batch_size: int = 1
    inputs: Mapping[str, WarmupInput] = field(default_factory=dict)
    count: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", str(self.name))
        for key in ("batch_size", "count"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"model_warmup {self.name!r}: {key} is {value!r}; expected an integer >= 0", key=key)
        inputs = dict(self.inputs)
        for name, value in inputs.items():
            if not isinstance(value, WarmupInput):
                raise ConfigError(f"model_warmup {self.name!r}: input {name!r} is not a WarmupInput", key="inputs")
        if not inputs:
            raise ConfigError(f"model_warmup {self.name!r} has no inputs", key="inputs")
        object.__setattr__(self, "inputs", inputs)

    @property
    def runs(self) -> int:
        """How many times the sample runs: ``count``, at least once; 0 if skipped."""
        return max(self.count, 1) if self.batch_size else 0

    def check(self, model: str, max_batch_size: int, declared: Sequence[TensorSpec]) -> None:
        """Check the sample against the model's batch size and declared inputs.

        Raises:
            ConfigError: the batch does not fit, or an input is not declared or has
                another dtype than declared.
        """
        where = f"model {model!r}: model_warmup {self.name!r}"
        if max_batch_size == 0 and self.batch_size > 1:
            raise ConfigError(
                f"{where} has batch_size {self.batch_size}; a model with max_batch_size 0 takes batch_size 1",
                model=model,
                key="batch_size",
            )
        if max_batch_size > 0 and self.batch_size > max_batch_size:
            raise ConfigError(
                f"{where} has batch_size {self.batch_size} > max_batch_size {max_batch_size}",
                model=model,
                key="batch_size",
            )
        for name, value in self.inputs.items():
            check_input(model, self.name, name, value, declared)


def check_input(model: str, sample: str, name: str, value: WarmupInput, declared: Sequence[TensorSpec]) -> None:
    """Check one input of warm-up ``sample`` against the declared inputs (none: anything goes).

    Raises:
        ConfigError: the input is not declared, or has another dtype.
    """
    if not declared:
        return
    where = f"model {model!r}: model_warmup {sample!r}"
    specs = {s.name: s for s in declared}
    spec = specs.get(name)
    if spec is None:
        raise ConfigError(
            f"{where} feeds input {name!r}, which the model does not declare (inputs: {sorted(specs)})",
            model=model,
            key="inputs",
        )
    if spec.dtype != value.data_type:
        raise ConfigError(
            f"{where}: input {name!r} is {value.data_type}; the model declares {spec.dtype}",
            model=model,
            key="data_type",
        )


def warmup_tensors(
    warmup: ModelWarmup, model_dir: str | Path | None = None, max_batch_size: int = 0
) -> list[dict[str, WarmupValue]]:
    """Build the requests of a warm-up sample: one dict of inputs per run.

    Args:
        warmup: the sample.
        model_dir: the model's directory (holding ``warmup/``); needed only for
            ``input_data_file``.
        max_batch_size: the model's; > 0 adds the batch dimension.

    Returns:
        ``warmup.runs`` dicts (the same one repeated: Triton reuses one sample),
        input name -> tensor, or -> flat list of str for ``TYPE_STRING``. Shapes
        are those of a request (``dims``, before any ``reshape``: see
        :meth:`TensorSpec.model_shape`).

    Raises:
        ConfigError: a data file is missing, too short, or not valid for its type.
    """
    if not warmup.runs:
        return []
    gen = torch.Generator().manual_seed(0)  # reproducible "random" warm-up data
    inputs: dict[str, WarmupValue] = {}
    for name, spec in warmup.inputs.items():
        sample = _sample(warmup, name, spec, model_dir, gen)
        if max_batch_size > 0:
            if isinstance(sample, torch.Tensor):
                inputs[name] = sample.unsqueeze(0).expand(warmup.batch_size, *sample.shape).contiguous()
            else:
                inputs[name] = sample * warmup.batch_size
        else:
            inputs[name] = sample
    return [inputs] * warmup.runs


def declared_warmup(inputs: Sequence[TensorSpec], runs: int) -> ModelWarmup | None:
    """A zero-data warm-up sample built from declared inputs (``WARMUP_RUNS``).

    Optional inputs are left out; a -1 in ``dims`` becomes 1. ``None`` when
    ``runs`` is 0.

    Raises:
        ConfigError: an input has no dims (``dims=None``) to build it from.
    """
    if runs <= 0:
        return None
    feeds = {}
    for spec in inputs:
        if spec.optional:
            continue
        if spec.dims is None:
            raise ConfigError(
                f"warm-up runs need the dims of input {spec.name!r} to build zeros from; give dims or a "
                "model_warmup block",
                key="WARMUP_RUNS",
            )
        feeds[spec.name] = WarmupInput(str(spec.dtype), [1 if d == -1 else d for d in spec.dims], zero_data=True)
    return ModelWarmup("WARMUP_RUNS", 1, feeds, runs)


def sample_value(warmup: ModelWarmup, name: str, model_dir: str | Path | None = None) -> WarmupValue:
    """One sample of input ``name`` of ``warmup`` (no batch dimension).

    Reading an ``input_data_file`` this way checks it (e.g. when a repository is read).

    Raises:
        ConfigError: the data file is missing, too short, or not valid for its type.
    """
    return _sample(warmup, name, warmup.inputs[name], model_dir, torch.Generator().manual_seed(0))


def _sample(
    warmup: ModelWarmup, name: str, spec: WarmupInput, model_dir: str | Path | None, gen: torch.Generator
) -> WarmupValue:
    """One sample of one input: a tensor of ``spec.dims``, or a flat list of str."""
    dtype = str(spec.data_type)
    if spec.input_data_file is None:
        if dtype == STRING:  # Triton sends empty strings for zero and random data alike
            return [""] * spec.elements
        torch_dtype = DTYPES[dtype]
        if spec.zero_data:
            return torch.zeros(spec.dims, dtype=torch_dtype)
        if torch_dtype.is_floating_point:
            return torch.rand(spec.dims, generator=gen).to(torch_dtype)
        # Integers 0 or 1, not raw random bytes as Triton sends: an index input
        # (an embedding's) must stay in range, or warm-up fails where serving would not.
        return torch.randint(0, 2, spec.dims, generator=gen).to(torch_dtype)
    data = _read(warmup, name, spec, model_dir)
    if dtype == STRING:
        return _strings(warmup, name, spec, data)
    torch_dtype = DTYPES[dtype]
    size = torch.empty((), dtype=torch_dtype).element_size() * spec.elements
    if len(data) < size:
        raise ConfigError(
            f"model_warmup {warmup.name!r}: input {name!r} needs {size} bytes ({spec.elements} x {dtype}) "
            f"but {spec.input_data_file!r} holds {len(data)}",
            key="input_data_file",
        )
    flat = torch.frombuffer(bytearray(data[:size]), dtype=torch_dtype) if size else torch.empty(0, dtype=torch_dtype)
    return flat.reshape(spec.dims).clone()


def _read(warmup: ModelWarmup, name: str, spec: WarmupInput, model_dir: str | Path | None) -> bytes:
    if model_dir is None:
        raise ConfigError(
            f"model_warmup {warmup.name!r}: input {name!r} reads {spec.input_data_file!r}, but the model has no "
            "directory to find warmup/ in",
            key="input_data_file",
        )
    path = Path(model_dir) / WARMUP_DIR / str(spec.input_data_file)
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(
            f"model_warmup {warmup.name!r}: input {name!r}: cannot read {str(path)!r}: {e.strerror or e}",
            key="input_data_file",
        ) from None


def _strings(warmup: ModelWarmup, name: str, spec: WarmupInput, data: bytes) -> list[str]:
    out: list[str] = []
    pos = 0
    where = f"model_warmup {warmup.name!r}: input {name!r}: {spec.input_data_file!r}"
    while pos < len(data):
        if pos + 4 > len(data):
            raise ConfigError(f"{where} ends inside a 4-byte length at byte {pos}", key="input_data_file")
        (n,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if pos + n > len(data):
            raise ConfigError(f"{where}: element {len(out)} claims {n} bytes past the end", key="input_data_file")
        try:
            out.append(data[pos : pos + n].decode("utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(
                f"{where}: element {len(out)} is not UTF-8 text (TorchScript strings are)", key="input_data_file"
            ) from None
        pos += n
    if len(out) != spec.elements:
        raise ConfigError(
            f"{where} holds {len(out)} strings; dims {list(spec.dims)} take {spec.elements}", key="input_data_file"
        )
    return out

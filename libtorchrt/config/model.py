"""A model's configuration in Python: :class:`ModelConfig` and :class:`TensorSpec`.

Runs in the front. The fields follow Triton's ``ModelConfig`` where they exist there
(``max_batch_size``, ``input``/``output`` as :class:`TensorSpec`, ``parameters``), so that
a ``config.pbtxt`` and a Python configuration mean the same thing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..transport.wire import DTYPES, dtype_name
from ..workers import flags as flag_mod

__all__ = ["TRITON_DTYPES", "ModelConfig", "TensorSpec", "normalize_dtype"]

#: Triton's data types and the torch dtypes they stand for.
TRITON_DTYPES: dict[str, str] = {
    "TYPE_BOOL": "bool",
    "TYPE_UINT8": "uint8",
    "TYPE_INT8": "int8",
    "TYPE_INT16": "int16",
    "TYPE_INT32": "int32",
    "TYPE_INT64": "int64",
    "TYPE_FP16": "float16",
    "TYPE_BF16": "bfloat16",
    "TYPE_FP32": "float32",
    "TYPE_FP64": "float64",
}
_SHORT = {k.removeprefix("TYPE_"): v for k, v in TRITON_DTYPES.items()}
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


def normalize_dtype(value: str | torch.dtype, *, model: str = "?", where: str = "dtype") -> str:
    """Return the wire name of a dtype given as torch dtype, wire name or Triton name.

    Raises:
        ConfigError: the dtype is not one libtorchrt can carry.
    """
    if isinstance(value, torch.dtype):
        try:
            return dtype_name(value)
        except KeyError:
            pass
    elif isinstance(value, str):
        text = value.strip()
        if text in DTYPES:
            return text
        if text.upper() in TRITON_DTYPES:
            return TRITON_DTYPES[text.upper()]
        if text.upper() in _SHORT:
            return _SHORT[text.upper()]
        if text.removeprefix("torch.") in DTYPES:
            return text.removeprefix("torch.")
    raise ConfigError(
        f"model {model!r}: {where} {value!r} is not supported; expected one of "
        f"{', '.join(TRITON_DTYPES)} (or a torch dtype)",
        model=model,
        key=where,
    )


@dataclass
class TensorSpec:
    """One declared input or output: name, dtype and dims (-1: any size).

    ``dims`` excludes the batch dimension when the model's ``max_batch_size > 0``,
    as in Triton. ``dims=None`` accepts any shape.
    """

    name: str
    dtype: str | torch.dtype = "float32"
    dims: Sequence[int] | None = None
    optional: bool = False

    def __post_init__(self) -> None:
        self.dtype = normalize_dtype(self.dtype, where=f"data_type of {self.name!r}")
        if self.dims is not None:
            self.dims = tuple(int(d) for d in self.dims)
            if any(d < -1 for d in self.dims):
                raise ConfigError(f"tensor {self.name!r}: dims {list(self.dims)} may only hold sizes or -1")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[str(self.dtype)]


@dataclass
class ModelConfig:
    """How to serve one TorchScript model.

    Args:
        name: the model's name, used in requests.
        path: the TorchScript file (``torch.jit.save`` output).
        instances: worker processes to start for this model (one process each).
        parameters: execution-mode parameters, as in Triton's ``parameters`` block
            (e.g. ``{"DISABLE_OPTIMIZED_EXECUTION": "true"}``); see docs/flags.md.
        inputs: declared inputs; requests are checked against them in the front.
            Empty: inputs are bound to the model's ``forward()`` arguments only.
        outputs: declared outputs; their names key the result dict
            (default ``OUTPUT__0``, ``OUTPUT__1``, ...).
        max_batch_size: > 0 makes dim 0 a batch dimension not listed in ``dims``.
        method: the module method to run (Triton's ``MODULE_METHOD_NAME``).
        env: extra environment variables for this model's workers only.
        version: the model version (from a repository's version directory).
        max_retries: how often a request is sent again after the worker running it
            died before answering (requests queued behind it in that worker are
            always re-sent: they never ran). A request that was running in two
            workers that died fails as a poison request whatever this says.
        timeout: default deadline of a request, in seconds (None: no deadline);
            ``infer``/``submit`` take their own ``timeout``.
        execution_timeout: seconds one execution may take (None: no limit); past it
            the request fails with ``TimeoutError`` and the worker is killed and
            replaced (a hung model cannot be interrupted otherwise).
        max_request_bytes: refuse requests whose tensors add up to more (None: no
            limit), before anything is allocated.

    Raises:
        ConfigError: a field or parameter value is invalid (names model, key, value).
    """

    name: str
    path: str | os.PathLike[str]
    instances: int = 1
    parameters: Mapping[str, Any] = field(default_factory=dict)
    inputs: Sequence[TensorSpec] = ()
    outputs: Sequence[TensorSpec] = ()
    max_batch_size: int = 0
    method: str = "forward"
    env: Mapping[str, str] = field(default_factory=dict)
    version: int = 1
    max_retries: int = 1
    timeout: float | None = None
    execution_timeout: float | None = None
    max_request_bytes: int | None = None
    #: the parsed execution-mode flags (derived from ``parameters``)
    flags: flag_mod.Flags = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ConfigError(
                f"model name {self.name!r} is invalid; expected letters, digits, '_', '.', '-'",
                model=str(self.name),
                key="name",
            )
        if not isinstance(self.instances, int) or isinstance(self.instances, bool) or self.instances < 1:
            raise ConfigError(
                f"model {self.name!r}: instances is {self.instances!r}; expected an integer >= 1",
                model=self.name,
                key="instances",
            )
        mbs = self.max_batch_size
        if not isinstance(mbs, int) or isinstance(mbs, bool) or mbs < 0:
            raise ConfigError(
                f"model {self.name!r}: max_batch_size is {self.max_batch_size!r}; expected an integer >= 0",
                model=self.name,
                key="max_batch_size",
            )
        for key in ("max_retries",):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(
                    f"model {self.name!r}: {key} is {value!r}; expected an integer >= 0", model=self.name, key=key
                )
        for key in ("timeout", "execution_timeout", "max_request_bytes"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ConfigError(
                    f"model {self.name!r}: {key} is {value!r}; expected a positive number or None",
                    model=self.name,
                    key=key,
                )
        self.parameters = {str(k): v for k, v in dict(self.parameters).items()}
        self.inputs = tuple(self.inputs)
        self.outputs = tuple(self.outputs)
        self.env = {str(k): str(v) for k, v in dict(self.env).items()}
        method = self.parameters.get("MODULE_METHOD_NAME")
        if method:
            self.method = str(method)
        self.flags = flag_mod.parse(self.name, self.parameters)
        for specs, kind in ((self.inputs, "input"), (self.outputs, "output")):
            names = [s.name for s in specs]
            dup = {n for n in names if names.count(n) > 1}
            if dup:
                raise ConfigError(f"model {self.name!r}: {kind} names repeat: {sorted(dup)}", model=self.name)

    def check_files(self) -> None:
        """Check that the model file exists.

        Raises:
            ConfigError: it does not.
        """
        if not Path(self.path).is_file():
            raise ConfigError(
                f"model {self.name!r}: no model file at {os.fspath(self.path)!r}", model=self.name, key="path"
            )

    @classmethod
    def from_pbtxt(cls, source: str | os.PathLike[str], model_dir: str | os.PathLike[str] | None = None) -> ModelConfig:
        """Read a Triton ``config.pbtxt`` (a path, or its text).

        Args:
            source: the file's path, or the configuration text itself.
            model_dir: the model's directory in a repository (default: the file's
                directory); the model file is looked up in its version directories.

        Raises:
            ConfigError: the file does not parse or uses an unsupported field.
        """
        from .pbtxt import load

        return load(source, model_dir)

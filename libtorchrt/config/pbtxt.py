"""Reading Triton ``config.pbtxt`` files into :class:`ModelConfig` (runs in the front).

The text is parsed by protobuf's ``text_format`` against ``model_config.proto``, which
has the field names and numbers of Triton's own schema, so a file parses here exactly
as Triton parses it. Fields that libtorchrt does not act on are refused with an error
naming the field and its line, never silently ignored.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from google.protobuf import text_format

from ..errors import ConfigError
from . import model_config_pb2 as pb
from .model import ModelConfig, TensorSpec

__all__ = ["load", "parse_text"]

_PLATFORMS = {"pytorch_libtorch"}
_BACKENDS = {"pytorch"}
#: Top-level fields that this version acts on.
_SUPPORTED = {
    "name",
    "platform",
    "backend",
    "max_batch_size",
    "input",
    "output",
    "instance_group",
    "parameters",
    "default_model_filename",
}
#: Fields of an input or output that this version acts on.
_TENSOR_FIELDS = {"name", "data_type", "dims"}


def parse_text(text: str, where: str = "<config.pbtxt>") -> pb.ModelConfig:
    """Parse config text into the protobuf message.

    Raises:
        ConfigError: a syntax error or an unknown field (with line and column).
    """
    msg = pb.ModelConfig()
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as e:
        line, col = e.GetLine(), e.GetColumn()
        text_ = str(e)
        if line is not None:  # str(e) starts with "line:col : "
            text_ = text_.split(" : ", 1)[-1]
        loc = f"{where}:{line}:{col}" if line is not None else where
        raise ConfigError(f"{loc}: {text_}") from None
    return msg


def _line_of(text: str, field: str) -> int:
    m = re.search(rf"^[ \t]*{re.escape(field)}\s*[:{{\[]", text, re.MULTILINE)
    return text.count("\n", 0, m.start()) + 1 if m else 0


def _dtype_name(value: int) -> str:
    return pb.DataType.Name(value)


def _is_file(source: str) -> bool:
    if "\n" in source or "{" in source:
        return False  # configuration text, not a path
    try:
        return Path(source).is_file()
    except OSError:  # e.g. too long to be a file name
        return False


def load(source: str | os.PathLike[str], model_dir: str | os.PathLike[str] | None = None) -> ModelConfig:
    """Load a ``config.pbtxt`` (path or text) into a :class:`ModelConfig`.

    See :meth:`ModelConfig.from_pbtxt`.
    """
    path: Path | None = None
    if isinstance(source, os.PathLike) or (isinstance(source, str) and _is_file(source)):
        path = Path(source)
        text = path.read_text()
        where = str(path)
    else:
        text = str(source)
        where = "<config.pbtxt>"
    msg = parse_text(text, where)
    directory = Path(model_dir) if model_dir is not None else (path.parent if path else None)

    def fail(message: str, field: str) -> ConfigError:
        line = _line_of(text, field)
        loc = f"{where}:{line}" if line else where
        return ConfigError(f"{loc}: {message}", model=msg.name or None, key=field)

    for fd, _ in msg.ListFields():
        if fd.name not in _SUPPORTED:
            raise fail(f"field {fd.name!r} is not supported by libtorchrt yet", fd.name)

    name = msg.name or (directory.name if directory else "")
    if not name:
        raise fail("the configuration has no 'name' and no model directory to take it from", "name")
    if directory is not None and msg.name and msg.name != directory.name:
        raise fail(f"name {msg.name!r} does not match the model directory {directory.name!r}", "name")
    if msg.platform and msg.platform not in _PLATFORMS:
        raise fail(f"platform {msg.platform!r} is not served; expected 'pytorch_libtorch'", "platform")
    if msg.backend and msg.backend not in _BACKENDS:
        raise fail(f"backend {msg.backend!r} is not served; expected 'pytorch'", "backend")

    instances = 0
    for group in msg.instance_group:
        if group.kind == pb.ModelInstanceGroup.KIND_GPU:
            raise fail(f"model {name!r} asks for KIND_GPU instances; this machine has no CUDA device", "instance_group")
        if group.kind == pb.ModelInstanceGroup.KIND_MODEL:
            raise fail("instance_group kind KIND_MODEL is not supported; use KIND_CPU", "instance_group")
        instances += group.count if group.count > 0 else 1
    instances = instances or 1

    def specs(tensors: object, kind: str) -> list[TensorSpec]:
        out = []
        for t in tensors:  # type: ignore[attr-defined]
            for fd, _ in t.ListFields():
                if fd.name not in _TENSOR_FIELDS:
                    raise fail(f"{kind} {t.name!r}: field {fd.name!r} is not supported by libtorchrt yet", fd.name)
            dtype = _dtype_name(t.data_type)
            if dtype == "TYPE_INVALID":
                raise fail(f"{kind} {t.name!r} has no data_type", kind)
            try:
                out.append(TensorSpec(t.name, dtype, list(t.dims)))
            except ConfigError as e:
                raise fail(f"{kind} {t.name!r}: {e}", kind) from None
        return out

    inputs = specs(msg.input, "input")
    outputs = specs(msg.output, "output")
    parameters = {key: p.string_value for key, p in msg.parameters.items()}
    filename = msg.default_model_filename or "model.pt"
    version = 1
    model_path = Path(filename)
    if directory is not None:
        versions = sorted(
            (int(p.name) for p in directory.iterdir() if p.is_dir() and re.fullmatch(r"[0-9]+", p.name)), reverse=True
        )
        available = [v for v in versions if (directory / str(v) / filename).is_file()]
        if not available:
            raise fail(f"no version directory of {str(directory)!r} holds {filename!r}", "default_model_filename")
        version = available[0]
        model_path = directory / str(version) / filename
    try:
        return ModelConfig(
            name=name,
            path=model_path,
            instances=instances,
            parameters=parameters,
            inputs=inputs,
            outputs=outputs,
            max_batch_size=msg.max_batch_size,
            version=version,
        )
    except ConfigError as e:
        # A bad parameter value: point at that key inside the parameters block.
        m = re.search(rf'key\s*:\s*"{re.escape(e.key or "")}"', text) if e.key else None
        line = text.count("\n", 0, m.start()) + 1 if m else _line_of(text, e.key or "parameters")
        loc = f"{where}:{line}" if line else where
        raise ConfigError(f"{loc}: {e}", model=e.model, key=e.key) from None

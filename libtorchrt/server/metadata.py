"""The KServe v2 / Triton documents that describe the server and its models (server process).

Server metadata (``GET /v2``), model metadata (``GET /v2/models/{name}``), the model
configuration in Triton's JSON form (``GET /v2/models/{name}/config``), the repository
index and the statistics extension -- all built from the pool's public snapshots and
the models' :class:`ModelConfig`, as plain JSON-ready dicts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from .. import __version__
from ..config import ModelConfig, TensorSpec
from ..config.writer import to_message
from ..errors import ConfigError
from ..info import ModelStats, ModelStatus
from .kserve import datatype_of

__all__ = [
    "EXTENSIONS",
    "SERVER_NAME",
    "model_config",
    "model_metadata",
    "model_statistics",
    "repository_index",
    "server_metadata",
]

SERVER_NAME = "libtorchrt"
#: the protocol extensions this server implements fully
EXTENSIONS = ("binary_tensor_data", "classification", "model_configuration", "statistics", "system_shared_memory")


def server_metadata() -> dict[str, Any]:
    """``GET /v2``: name, version and extensions."""
    return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}


#: What a model's metadata calls its platform, by format (Triton's names; a model.py
#: and an exported program are served by its "pytorch" backend).
_PLATFORMS = {"torchscript": "pytorch_libtorch", "aoti": "torch_aoti", "exported": "pytorch", "python": "pytorch"}


def _tensor(spec: TensorSpec, batched: bool) -> dict[str, Any]:
    dims = list(spec.dims) if spec.dims is not None else [-1]
    return {
        "name": spec.name,
        "datatype": datatype_of(str(spec.dtype)),
        "shape": [-1, *dims] if batched else dims,
    }


def model_metadata(cfg: ModelConfig, versions: Iterable[int]) -> dict[str, Any]:
    """``GET /v2/models/{name}``: the model's versions, platform, inputs and outputs.

    Shapes include the batch dimension (-1) when the model batches, as Triton's do;
    ``-1`` is any size. A model configured without declared inputs lists none.
    """
    batched = cfg.max_batch_size > 0
    return {
        "name": cfg.name,
        "versions": [str(v) for v in sorted(versions)],
        "platform": _PLATFORMS.get(cfg.format or "", "pytorch_libtorch"),
        "inputs": [_tensor(s, batched) for s in cfg.inputs],
        "outputs": [_tensor(s, batched) for s in cfg.outputs],
    }


def model_config(cfg: ModelConfig) -> dict[str, Any]:
    """``GET /v2/models/{name}/config``: the configuration as Triton prints it (protobuf's
    JSON form of ``model_config.proto``, field names as in ``config.pbtxt``, 64-bit
    integers as numbers, fields at their defaults included)."""
    try:
        msg = to_message(cfg)
    except ConfigError:  # a Python configuration without dims: what config.pbtxt can say
        msg = to_message(_with_dims(cfg))
    return message_dict(msg)


def message_dict(msg: Any) -> dict[str, Any]:
    """``msg`` in protobuf's JSON form, field names as in the ``.proto``, fields at their
    defaults included and 64-bit integers as numbers, on any protobuf runtime from 4.21:
    the options that say so are newer than that (``unquote_int64_if_possible`` came
    with protobuf 7), so an older runtime gets the same document by another way."""
    try:
        return dict(
            json_format.MessageToDict(
                msg,
                preserving_proto_field_name=True,
                always_print_fields_with_no_presence=True,
                unquote_int64_if_possible=True,
            )
        )
    except TypeError:  # an older protobuf
        pass
    named = {"preserving_proto_field_name": True}
    try:
        doc = json_format.MessageToDict(msg, always_print_fields_with_no_presence=True, **named)
    except TypeError:  # (before protobuf 5.26 the option had its old name)
        doc = json_format.MessageToDict(msg, including_default_value_fields=True, **named)
    return unquote_int64(doc, msg.DESCRIPTOR)


_INT64_TYPES = frozenset(
    (
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    )
)


def unquote_int64(doc: dict[str, Any], descriptor: Any) -> dict[str, Any]:
    """``doc`` (a message's JSON form, proto field names) with its 64-bit integers,
    which protobuf's JSON quotes, as numbers (in place; returned)."""
    for f in descriptor.fields:
        value = doc.get(f.name)
        if value is None:
            continue
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            item = f.message_type.fields_by_name["value"]
            for key, v in value.items():
                value[key] = _unquoted(v, item)
        elif isinstance(value, list):  # (a repeated field: JSON has no other lists)
            doc[f.name] = [_unquoted(v, f) for v in value]
        else:
            doc[f.name] = _unquoted(value, f)
    return doc


def _unquoted(value: Any, f: Any) -> Any:
    if f.message_type is not None and isinstance(value, dict):
        return unquote_int64(value, f.message_type)
    if f.type in _INT64_TYPES and isinstance(value, str):
        return int(value)
    return value


def _with_dims(cfg: ModelConfig) -> ModelConfig:
    import dataclasses

    def fix(specs: Sequence[TensorSpec]) -> list[TensorSpec]:
        return [dataclasses.replace(s, dims=(-1,)) if s.dims is None else s for s in specs]

    return dataclasses.replace(cfg, inputs=fix(cfg.inputs), outputs=fix(cfg.outputs))


_INDEX_STATES = {"ready": "READY", "loading": "LOADING", "unloading": "UNLOADING", "unavailable": "UNAVAILABLE",
                 "failed": "UNAVAILABLE"}  # fmt: skip


def repository_index(statuses: Iterable[ModelStatus]) -> list[dict[str, Any]]:
    """``POST /v2/repository/index``: every model version with its state and reason."""
    out = []
    for s in statuses:
        entry: dict[str, Any] = {"name": s.name, "state": _INDEX_STATES.get(s.state, "UNAVAILABLE")}
        if s.version is not None:
            entry["version"] = str(s.version)
        entry["reason"] = s.error or ""
        out.append(entry)
    return out


def _duration(count: int, ns: int) -> dict[str, int]:
    return {"count": count, "ns": ns}


def model_statistics(stats: Iterable[ModelStats]) -> dict[str, Any]:
    """``GET /v2/models/{name}/stats``: Triton's statistics document.

    Only the success count carries the request time; ``compute_infer`` is the whole
    hand-over to a worker and back (Triton splits it into input, infer and output).
    """
    out = []
    for s in stats:
        out.append(
            {
                "name": s.model,
                "version": str(s.version),
                "inference_count": s.inferences,
                "execution_count": s.executions,
                "inference_stats": {
                    "success": _duration(s.success, s.request_ns),
                    "fail": _duration(s.failure, 0),
                    "queue": _duration(s.success, s.queue_ns),
                    "compute_input": _duration(s.success, 0),
                    "compute_infer": _duration(s.success, s.compute_ns),
                    "compute_output": _duration(s.success, 0),
                },
                "batch_stats": [
                    {"batch_size": size, "compute_infer": _duration(n, 0)} for size, n in sorted(s.batch_sizes.items())
                ],
            }
        )
    return {"model_stats": out}

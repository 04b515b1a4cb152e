"""The KServe v2 tensor codec over gRPC (server process: the serving thread, or a worker
thread for large messages).

A ``ModelInferRequest`` is turned into what ``kserve.decode_document`` takes -- the
request's JSON document and its binary tensor data -- so that HTTP and gRPC requests
are checked by the same code with the same messages: datatypes against the model's,
shapes against the bytes, BYTES elements, parameters (``timeout``, ``priority``, ...).
Tensors in ``raw_input_contents`` are copied once, into one writable buffer the inputs
are views of (the HTTP body is such a buffer too); typed ``contents`` become the
document's ``data`` lists, BYTES elements the binary form; an input in system shared
memory (its ``shared_memory_region`` parameter) has neither, and no raw contents either
(as tritonclient sends it). The pool's outputs come back as ``raw_output_contents``,
encoded by ``kserve.encode_response`` as binary data, in the order of the outputs; an
output written into shared memory has an empty entry there, to keep that order.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from typing import Any

from ..transport.dtypes import ITEMSIZES
from . import grpc_service_pb2 as pb
from .kserve import DATATYPES, MAX_DIMS, MAX_ELEMENTS, InferRequest, RequestError, encode_response
from .sysshm import Regions

__all__ = ["CONTENTS", "parameter_value", "request_document", "response_message"]

#: The ``InferTensorContents`` field that holds each datatype's elements (FP16 and BF16
#: have none: they travel as raw bytes only, as in Triton).
CONTENTS: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_LENGTH = struct.Struct("<I")
#: parameters the gRPC protocol decides, whatever the client says: every output comes
#: back in raw_output_contents, and inputs' sizes are those of their raw contents
_IMPOSED = ("binary_data_output", "binary_data", "binary_data_size")


def _bad(message: str) -> RequestError:
    return RequestError(400, message)


def parameter_value(parameter: pb.InferParameter) -> Any:
    """The value an ``InferParameter`` holds (None when it holds none)."""
    which = parameter.WhichOneof("parameter_choice")
    return None if which is None else getattr(parameter, which)


def _parameters(parameters: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    return {key: parameter_value(p) for key, p in parameters.items() if key not in _IMPOSED}


def _elements(shape: list[int]) -> int | None:
    """The elements ``shape`` holds; None for a shape ``decode_document`` refuses itself."""
    if len(shape) > MAX_DIMS or any(d < 0 for d in shape) or math.prod(d for d in shape if d) > MAX_ELEMENTS:
        return None
    return math.prod(shape)


def request_document(request: pb.ModelInferRequest) -> tuple[dict[str, Any], bytearray]:
    """The request as ``kserve.decode_document`` takes it: its document, and the binary
    tensor data its inputs take in turn.

    Raises:
        RequestError: 400 when ``raw_input_contents`` does not give one tensor per input,
            an input has both raw and typed contents, typed contents in another field
            than its datatype's or of another length than its shape's, or raw contents
            of another byte count than its shape's.
    """
    raw = request.raw_input_contents
    carried = [t for t in request.inputs if "shared_memory_region" not in t.parameters]
    if raw and len(raw) != len(carried):
        shared = len(request.inputs) - len(carried)
        note = f" ({shared} in shared memory)" if shared else ""
        raise _bad(
            f"the request has {len(request.inputs)} inputs{note} and {len(raw)} raw_input_contents; send one "
            "raw_input_contents per input not in shared memory, in the order of the inputs, or none (typed contents)"
        )
    blobs: list[bytes] = []
    inputs: list[dict[str, Any]] = []
    i = 0  # (the raw_input_contents of the next input that has one)
    for tensor in request.inputs:
        name = tensor.name
        shape = list(tensor.shape)
        entry: dict[str, Any] = {"name": name, "datatype": tensor.datatype, "shape": shape}
        parameters = _parameters(tensor.parameters)
        typed = tensor.contents.ListFields() if tensor.HasField("contents") else []
        numel = _elements(shape)
        if "shared_memory_region" in parameters:  # read from its region (kserve.read_shared_inputs)
            if typed:
                entry["data"] = []  # (refused by decode_document: in shared memory, and data)
        elif raw:
            if typed:
                raise _bad(f"input {name!r} has both contents and raw_input_contents[{i}]; send one")
            blob = raw[i]
            dtype = DATATYPES.get(tensor.datatype)
            itemsize = ITEMSIZES.get(dtype or "", 0)  # (0: BYTES, or a datatype decode refuses)
            if itemsize and numel is not None and numel * itemsize != len(blob):
                raise _bad(
                    f"input {name!r}: shape {shape} of {tensor.datatype} is {numel * itemsize} bytes, "
                    f"raw_input_contents[{i}] has {len(blob)}"
                )
            parameters["binary_data_size"] = len(blob)
            blobs.append(blob)
            i += 1
        else:
            _typed(entry, parameters, blobs, typed, numel)
        entry["parameters"] = parameters
        inputs.append(entry)
    parameters = {**_parameters(request.parameters), "binary_data_output": True}
    doc: dict[str, Any] = {"inputs": inputs, "parameters": parameters}
    if request.id:
        doc["id"] = request.id
    if request.outputs:
        doc["outputs"] = [
            {"name": o.name, "parameters": {**_parameters(o.parameters), "binary_data": True}} for o in request.outputs
        ]
    return doc, bytearray().join(blobs)


def _typed(entry: dict[str, Any], parameters: dict[str, Any], blobs: list[bytes], typed: list[Any],
           numel: int | None) -> None:  # fmt: skip
    """Put an input's typed contents in ``entry`` as its ``data``, or (BYTES) in
    ``blobs`` in the binary form, with its ``binary_data_size``."""
    name, datatype = entry["name"], entry["datatype"]
    if len(typed) > 1:
        fields = " and ".join(f.name for f, _ in typed)
        raise _bad(f"input {name!r} has elements in {fields}; send them in one field, its datatype's")
    field = CONTENTS.get(datatype)
    if datatype in ("FP16", "BF16"):
        raise _bad(f"input {name!r}: {datatype} has no typed contents; send it in raw_input_contents")
    values: Any = []
    if typed:
        [(descriptor, values)] = typed
        if field is not None and descriptor.name != field:
            raise _bad(f"input {name!r} is {datatype}: its elements go in contents.{field}, not {descriptor.name}")
    if numel is not None and field is not None and len(values) != numel:
        raise _bad(f"input {name!r}: shape {entry['shape']} holds {numel} elements, its contents has {len(values)}")
    if datatype == "BYTES":
        blob = b"".join(_LENGTH.pack(len(v)) + v for v in values)
        parameters["binary_data_size"] = len(blob)
        blobs.append(blob)
    else:
        entry["data"] = list(values)


def _parameter(value: Any) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    return pb.InferParameter(string_param=str(value))


def response_message(
    model: str,
    version: int,
    request: InferRequest,
    outputs: Mapping[str, Any],
    *,
    regions: Regions | None = None,
    owner: str = "",
) -> pb.ModelInferResponse:
    """The pool's ``outputs`` for ``request`` (classified already, where it asks so):
    each in ``raw_output_contents``, or written into its shared-memory region.

    Raises:
        RequestError: 400 for an output the model does not give, or one that does not
            fit its region; 500 for one the protocol cannot carry (see
            ``kserve.encode_response``).
    """
    encoded = encode_response(model, version, request, outputs, regions=regions, owner=owner)
    header = json.loads(encoded.header)
    response = pb.ModelInferResponse(model_name=model, model_version=str(version), id=request.id or "")
    chunks = iter(encoded.chunks)
    for doc in header["outputs"]:
        tensor = response.outputs.add(name=doc["name"], datatype=doc["datatype"], shape=doc["shape"])
        parameters = dict(doc.get("parameters") or {})
        if parameters.pop("binary_data_size", None) is not None:  # (every output not in shared memory)
            response.raw_output_contents.append(bytes(next(chunks)))
        else:
            response.raw_output_contents.append(b"")  # (tritonclient finds an output's bytes by its index)
        for key, value in parameters.items():
            tensor.parameters[key].CopyFrom(_parameter(value))
    return response

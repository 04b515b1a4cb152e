"""The KServe v2 (Open Inference Protocol) tensor codec over HTTP (server process).

Decodes an inference request -- its JSON header and, with the binary tensor data
extension, the raw tensor bytes that follow it (``Inference-Header-Content-Length``)
-- into the inputs ``Pool.submit`` takes, and encodes the pool's outputs back, as JSON
``data`` or as binary (``binary_data`` output parameters). Nothing here allocates
from a size the client states: every byte count and element count is checked against
the body already received before a tensor is made, and binary inputs are zero-copy
views of the body.

Data types travel by their KServe names:

=========  ===============  ==========================================
KServe     config.pbtxt     here
=========  ===============  ==========================================
BOOL       TYPE_BOOL        ``torch.bool`` (binary: one byte, 0 or 1)
UINT8 ...  TYPE_UINT8 ...   ``torch.uint8``, ``int8``, ``int16``, ``int32``, ``int64``
FP16       TYPE_FP16        ``torch.float16``
BF16       TYPE_BF16        ``torch.bfloat16`` (binary: 2 bytes, as tritonclient sends it)
FP32/FP64  TYPE_FP32/FP64   ``torch.float32`` / ``torch.float64``
BYTES      TYPE_STRING      ``list[str]`` (binary: 4-byte little-endian length + bytes each)
=========  ===============  ==========================================

``UINT16``, ``UINT32`` and ``UINT64`` are refused (torch has no general support for
them). Binary data is little-endian, as the protocol says.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..config import TensorSpec
from ..deadlines import check_timeout
from ..transport.dtypes import DTYPES, ITEMSIZES, KSERVE_DATATYPES, STRING, TABLE

__all__ = [
    "DATATYPES",
    "EncodedResponse",
    "InferRequest",
    "OutputRequest",
    "RequestError",
    "data_bytes",
    "datatype_of",
    "decode_request",
    "encode_response",
]

#: KServe data type -> the dtype name used by libtorchrt's configuration.
DATATYPES: dict[str, str] = KSERVE_DATATYPES
_NAMES = {v: k for k, v in DATATYPES.items()}
_UNSUPPORTED = {"UINT16", "UINT32", "UINT64"}
#: numpy types that carry each dtype's bytes (bfloat16, which numpy lacks, as its 16 raw bits)
_NUMPY: dict[str, Any] = {
    d.name: d.numpy if d.numpy is not None else np.dtype(np.int16) for d in TABLE if d.kserve and d.torch is not None
}
_TORCH: dict[str, torch.dtype] = {name: DTYPES[name] for name in _NUMPY}
_ITEMSIZE = {name: ITEMSIZES[name] for name in _NUMPY}
#: numpy kinds accepted as JSON data of each family
_JSON_KINDS = {"bool": "b", "int": "iu", "float": "iuf"}
_LENGTH = struct.Struct("<I")
#: shapes deeper than this are refused (the wire format's own bound)
MAX_DIMS = 32
#: the most elements a shape may describe, its zero sizes left out: a non-empty tensor
#: is bounded by the bytes received anyway, but ``[0, 2**62]`` is empty and would carry
#: its absurd strides into byte arithmetic downstream (int64 overflow, a 500)
MAX_ELEMENTS = 1 << 48


class RequestError(Exception):
    """A request the server answers with an error status (``{"error": message}``).

    ``headers`` go with the answer; ``Connection: close`` among them tells the HTTP
    server not to read the rest of a body it will not use.
    """

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def _bad(message: str) -> RequestError:
    return RequestError(400, message)


def _show(value: Any) -> str:
    """``repr(value)``, cut short: an error message must not echo a megabyte back."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def datatype_of(dtype: str) -> str:
    """The KServe name (``FP32``) of a configuration dtype name (``float32``, ``string``).

    Raises:
        KeyError: the protocol has no such type (complex dtypes).
    """
    return _NAMES[dtype]


def _family(dtype: str) -> str:
    if dtype == "bool":
        return "bool"
    return "float" if dtype.startswith(("float", "bfloat")) else "int"


@dataclass(frozen=True)
class OutputRequest:
    """One entry of a request's ``outputs``: which output, and whether as binary."""

    name: str
    binary: bool | None = None


@dataclass
class InferRequest:
    """A decoded inference request.

    Attributes:
        id: the request's ``id`` (echoed in the response), or None.
        inputs: input name -> tensor (``list[bytes]`` for ``BYTES``), in request order.
        outputs: the outputs asked for, or None for all of them.
        binary_output: the ``binary_data_output`` parameter (outputs' default).
        timeout: the ``timeout`` parameter, in seconds (it travels in microseconds).
        priority: the ``priority`` parameter (None for 0, the model's default level).
    """

    id: str | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: list[OutputRequest] | None = None
    binary_output: bool = False
    timeout: float | None = None
    priority: int | None = None


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _parameters(doc: dict[str, Any], what: str) -> dict[str, Any]:
    params = doc.get("parameters", {})
    return _object(params, f"the parameters of {what}") if params is not None else {}


def _flag(params: dict[str, Any], key: str, what: str) -> bool | None:
    value = params.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise _bad(f"parameter {key!r} of {what} must be true or false, got {_show(value)}")
    return value


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad(f"{what} must be an integer >= 0, got {_show(value)}")
    return value


def _timeout(value: Any) -> float | None:
    """The ``timeout`` parameter (microseconds, as Triton takes it) in seconds; 0 is none.

    Checked here, not only by the pool, so that the client hears which parameter was
    wrong; a huge one is capped (see ``deadlines.py``: a far deadline once reached a poll
    call as an overflowing int and killed the pool).
    """
    expected = "parameter 'timeout' must be a number of microseconds >= 0"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"{expected}, got {_show(value)} ({type(value).__name__})")
    try:
        seconds = value / 1e6
    except OverflowError:  # an integer beyond a float's range: as far off as it gets
        seconds = math.inf
    try:
        timeout = check_timeout(seconds)
    except ValueError:  # NaN (JSON's NaN literal parses) or negative
        raise _bad(f"{expected}, got {_show(value)}") from None
    return timeout or None


def decode_request(
    body: bytearray | bytes,
    header_length: int | None,
    model: str,
    declared: Mapping[str, TensorSpec] = {},
) -> InferRequest:
    """Decode an inference request body.

    Args:
        body: the whole (decompressed) body; binary inputs become views of it, so a
            ``bytearray`` gives writable tensors without a copy.
        header_length: the ``Inference-Header-Content-Length`` header: the JSON
            part's length, the binary data following it; None when the body is JSON only.
        model: the model's name (for messages).
        declared: the model's declared inputs by name; a request datatype that
            differs from a declared one is refused here, naming both.

    Raises:
        RequestError: 400 with a message naming the input and what is wrong.
    """
    size = len(body)
    if header_length is None:
        header_length = size
    elif header_length > size:
        raise _bad(f"Inference-Header-Content-Length is {header_length} but the body has only {size} bytes")
    view = memoryview(body)
    try:
        doc = json.loads(view[:header_length].tobytes() if header_length < size else body)
    except (ValueError, UnicodeDecodeError) as e:
        raise _bad(f"the request is not valid JSON: {e}") from None
    except RecursionError:  # json's C parser bounds its nesting by the recursion limit
        raise _bad("the request's JSON is nested too deeply") from None
    doc = _object(doc, "the request")
    request = InferRequest()
    rid = doc.get("id")
    if rid is not None:
        if not isinstance(rid, str):
            raise _bad(f"'id' must be a string, got {rid!r}")
        request.id = rid
    params = _parameters(doc, "the request")
    request.binary_output = bool(_flag(params, "binary_data_output", "the request"))
    for key in ("sequence_id", "sequence_start", "sequence_end"):
        if params.get(key) not in (None, 0, "", False):
            raise _bad(f"parameter {key!r}: sequence batching is not supported (stateful models are not served)")
    if "classification" in params:
        raise _bad("parameter 'classification': the classification extension is not supported")
    timeout = params.get("timeout")
    if timeout is not None:
        request.timeout = _timeout(timeout)
    priority = params.get("priority")
    if priority is not None:
        request.priority = _count(priority, "parameter 'priority'") or None
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _bad("the request has no 'inputs' (a non-empty list of tensors)")
    offset = header_length
    for i, item in enumerate(inputs):
        entry = _object(item, f"inputs[{i}]")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise _bad(f"inputs[{i}] has no 'name'")
        if name in request.inputs:
            raise _bad(f"input {name!r} is given twice")
        dtype, shape = _header(entry, name, model, declared.get(name))
        binary = _parameters(entry, f"input {name!r}").get("binary_data_size")
        if binary is not None:
            nbytes = _count(binary, f"binary_data_size of input {name!r}")
            if offset + nbytes > size:
                raise _bad(
                    f"input {name!r}: binary_data_size is {nbytes} but only {size - offset} bytes of binary data "
                    "are left in the body"
                )
            request.inputs[name] = _from_binary(view[offset : offset + nbytes], dtype, shape, name)
            offset += nbytes
        elif "data" in entry:
            request.inputs[name] = _from_json(entry["data"], dtype, shape, name)
        else:
            raise _bad(f"input {name!r} has neither 'data' nor a binary_data_size parameter")
    if offset != size:
        raise _bad(
            f"the body has {size - offset} bytes after the inputs' binary data; "
            "Inference-Header-Content-Length or a binary_data_size is wrong"
        )
    outputs = doc.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise _bad("'outputs' must be a list")
        request.outputs = []
        asked: set[str] = set()
        for i, item in enumerate(outputs):
            entry = _object(item, f"outputs[{i}]")
            name = entry.get("name")
            if not isinstance(name, str) or not name:
                raise _bad(f"outputs[{i}] has no 'name'")
            if name in asked:  # each copy would be encoded again, past --max-json-response-bytes
                raise _bad(f"output {name!r} is asked for twice")
            asked.add(name)
            out_params = _parameters(entry, f"output {name!r}")
            if "classification" in out_params:
                raise _bad(f"output {name!r}: the classification extension is not supported")
            request.outputs.append(OutputRequest(name, _flag(out_params, "binary_data", f"output {name!r}")))
    return request


def _header(entry: dict[str, Any], name: str, model: str, spec: TensorSpec | None) -> tuple[str, tuple[int, ...]]:
    datatype = entry.get("datatype")
    if not isinstance(datatype, str):
        raise _bad(f"input {name!r} has no 'datatype'")
    if datatype in _UNSUPPORTED:
        raise _bad(f"input {name!r}: datatype {datatype} is not supported; use one of {', '.join(DATATYPES)}")
    dtype = DATATYPES.get(datatype)
    if dtype is None:
        raise _bad(f"input {name!r}: unknown datatype {datatype!r}; expected one of {', '.join(DATATYPES)}")
    if spec is not None and spec.dtype != dtype:
        raise _bad(f"input {name!r} of model {model!r}: expected datatype {_NAMES[str(spec.dtype)]}, got {datatype}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise _bad(f"input {name!r} has no 'shape' (a list of at most {MAX_DIMS} sizes)")
    dims = tuple(_count(d, f"the shape of input {name!r}") for d in shape)
    if math.prod(d for d in dims if d) > MAX_ELEMENTS:
        raise _bad(
            f"input {name!r}: shape {_show(list(dims))} is too large "
            f"(its sizes other than 0 multiply to more than 2**48 elements)"
        )
    return dtype, dims


def _from_binary(data: memoryview, dtype: str, shape: tuple[int, ...], name: str) -> Any:
    numel = math.prod(shape)
    if dtype == STRING:
        items = _strings(data, name)
        if len(items) != numel:
            raise _bad(f"input {name!r}: shape {list(shape)} holds {numel} elements, the binary data has {len(items)}")
        return items
    itemsize = _ITEMSIZE[dtype]
    if len(data) != numel * itemsize:
        raise _bad(
            f"input {name!r}: shape {list(shape)} of {_NAMES[dtype]} is {numel * itemsize} bytes, "
            f"binary_data_size is {len(data)}"
        )
    arr = np.frombuffer(data, dtype=_NUMPY[dtype])
    if arr.ctypes.data % itemsize:  # torch kernels may assume aligned elements
        arr = arr.copy()
    if dtype == "bool" and arr.size and arr.view(np.uint8).max() > 1:
        raise _bad(f"input {name!r}: BOOL binary data must be bytes 0 or 1")
    t = torch.from_numpy(arr)
    if dtype == "bfloat16":
        t = t.view(torch.bfloat16)
    return t.reshape(shape)


def _strings(data: memoryview, name: str) -> list[bytes]:
    out, offset, size = [], 0, len(data)
    while offset < size:
        if offset + 4 > size:
            raise _bad(f"input {name!r}: BYTES binary data ends inside an element's 4-byte length")
        (n,) = _LENGTH.unpack_from(data, offset)
        offset += 4
        if offset + n > size:
            raise _bad(f"input {name!r}: a BYTES element of {n} bytes runs past the end of its binary data")
        out.append(data[offset : offset + n].tobytes())
        offset += n
    return out


def _from_json(data: Any, dtype: str, shape: tuple[int, ...], name: str) -> Any:
    numel = math.prod(shape)
    if not isinstance(data, list):
        data = [data]
    if dtype == STRING:
        items = _flatten(data)
        if not all(isinstance(s, str) for s in items):
            raise _bad(f"input {name!r}: BYTES data must be strings")
        if len(items) != numel:
            raise _bad(f"input {name!r}: shape {list(shape)} holds {numel} elements, 'data' has {len(items)}")
        try:
            return [s.encode() for s in items]
        except UnicodeEncodeError:  # JSON's "\udc80" parses to a lone surrogate, which UTF-8 cannot hold
            raise _bad(f"input {name!r}: BYTES data must be valid Unicode (a string holds a lone surrogate)") from None
    try:
        arr = np.asarray(data)
    except ValueError:
        raise _bad(f"input {name!r}: 'data' is a ragged list, or nested deeper than numpy's 64 dimensions") from None
    kind = arr.dtype.kind
    if arr.size != numel:
        raise _bad(f"input {name!r}: shape {list(shape)} holds {numel} elements, 'data' has {arr.size}")
    family = _family(dtype)
    if numel and kind not in _JSON_KINDS[family]:
        want = {"bool": "true/false", "int": "integers", "float": "numbers"}[family]
        raise _bad(f"input {name!r}: {_NAMES[dtype]} data must be {want}, got {_describe(arr)}")
    if family == "int" and numel:
        info = np.iinfo(_NUMPY[dtype])
        if arr.min() < info.min or arr.max() > info.max:
            raise _bad(f"input {name!r}: a value is out of the range of {_NAMES[dtype]} ({info.min}..{info.max})")
    if dtype == "bfloat16":
        return torch.from_numpy(arr.astype(np.float32)).to(torch.bfloat16).reshape(shape)
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=_NUMPY[dtype])).reshape(shape)


def _flatten(data: list[Any]) -> list[Any]:
    out: list[Any] = []
    stack = [iter(data)]
    while stack:  # iterative: a deeply nested list must not exhaust the stack
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _describe(arr: np.ndarray) -> str:
    return {"U": "strings", "f": "floats", "b": "booleans", "O": "mixed values"}.get(arr.dtype.kind, str(arr.dtype))


# ── responses ─────────────────────────────────────────────────────────────────


@dataclass
class EncodedResponse:
    """An inference response: its JSON header and the binary chunks after it.

    ``header_length`` is the ``Inference-Header-Content-Length`` value when binary
    chunks follow, else None (the body is the JSON alone).
    """

    header: bytes
    chunks: list[Any]
    header_length: int | None

    @property
    def size(self) -> int:
        return len(self.header) + sum(memoryview(c).nbytes for c in self.chunks)


def data_bytes(value: Any) -> int:
    """An output's size as binary data: a tensor's bytes; for ``BYTES`` (a list of
    strings), each element's length and its 4-byte length prefix."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, list):
        return sum(4 + (len(v.encode()) if isinstance(v, str) else len(v)) for v in value)
    return 0


def encode_response(
    model: str,
    version: int,
    request: InferRequest,
    outputs: Mapping[str, Any],
    max_json_bytes: int | None = None,
) -> EncodedResponse:
    """Encode the pool's outputs for ``request``.

    Args:
        max_json_bytes: the most tensor data (:func:`data_bytes`) returned as JSON
            ``data``, all outputs together; None: no limit. JSON costs the server
            about 25 times the tensor's size while it is built, and holds the
            interpreter (every other request) meanwhile, so large outputs are refused
            as JSON before any of it is built; binary outputs are not limited.

    Raises:
        RequestError: 400 for an output the model does not give, or JSON outputs over
            ``max_json_bytes`` (the message says how to ask for binary data); 500 for
            an output the protocol cannot carry (a complex tensor).
    """
    wanted: Sequence[OutputRequest] = request.outputs or [OutputRequest(name) for name in outputs]
    binary_of: dict[str, bool] = {}
    for want in wanted:
        if want.name not in outputs:
            raise _bad(f"model {model!r} has no output {want.name!r}; it gives {sorted(outputs)}")
        binary_of[want.name] = request.binary_output if want.binary is None else want.binary
    if max_json_bytes is not None:
        as_json = [name for name, binary in binary_of.items() if not binary]
        size = sum(data_bytes(outputs[name]) for name in as_json)
        if size > max_json_bytes:
            raise _bad(
                f"outputs {as_json} of model {model!r} hold {size} bytes of tensor data, more than this server "
                f"returns as JSON ({max_json_bytes} bytes, --max-json-response-bytes); ask for them as binary "
                'data (binary tensor data extension): parameters {"binary_data": true} on each output, or '
                '{"binary_data_output": true} on the request (tritonclient: '
                "InferRequestedOutput(name, binary_data=True))"
            )
    docs: list[dict[str, Any]] = []
    chunks: list[Any] = []
    for want in wanted:
        binary = binary_of[want.name]
        doc, chunk = _output(want.name, outputs[want.name], binary)
        docs.append(doc)
        if chunk is not None:
            chunks.append(chunk)
    response: dict[str, Any] = {"model_name": model, "model_version": str(version)}
    if request.id is not None:
        response["id"] = request.id
    response["outputs"] = docs
    header = json.dumps(response, separators=(",", ":")).encode()
    return EncodedResponse(header, chunks, len(header) if chunks else None)


def _output(name: str, value: Any, binary: bool) -> tuple[dict[str, Any], Any]:
    if isinstance(value, list):  # BYTES (a List[str] output)
        doc: dict[str, Any] = {"name": name, "datatype": "BYTES", "shape": [len(value)]}
        items = [v.encode() if isinstance(v, str) else bytes(v) for v in value]
        if not binary:
            doc["data"] = [v.decode(errors="replace") if isinstance(v, bytes) else v for v in value]
            return doc, None
        blob = b"".join(_LENGTH.pack(len(v)) + v for v in items)
        doc["parameters"] = {"binary_data_size": len(blob)}
        return doc, blob
    if not isinstance(value, torch.Tensor):
        raise RequestError(500, f"output {name!r} is a {type(value).__name__}, not a tensor")
    dtype = str(value.dtype).removeprefix("torch.")
    if dtype not in _NUMPY:
        raise RequestError(500, f"output {name!r} is {dtype}, which the KServe protocol cannot carry")
    t = value.detach().cpu()
    doc = {"name": name, "datatype": _NAMES[dtype], "shape": list(t.shape)}
    if not binary:
        if dtype in ("float16", "bfloat16"):
            t = t.float()
        doc["data"] = t.reshape(-1).tolist()
        return doc, None
    t = t.contiguous()
    if dtype == "bfloat16":
        t = t.view(torch.int16)
    arr = t.numpy().reshape(-1)
    chunk = memoryview(arr.view(np.uint8)) if arr.size else b""  # type: ignore[arg-type]
    doc["parameters"] = {"binary_data_size": arr.nbytes}
    return doc, chunk

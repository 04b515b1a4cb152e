"""The KServe v2 (Open Inference Protocol) tensor codec over HTTP (server process).

Decodes an inference request -- its JSON header and, with the binary tensor data
extension, the raw tensor bytes that follow it (``Inference-Header-Content-Length``)
-- into the inputs ``Pool.submit`` takes, and encodes the pool's outputs back, as JSON
``data`` or as binary (``binary_data`` output parameters). Nothing here allocates
from a size the client states: every byte count and element count is checked against
the body already received before a tensor is made, and binary inputs are zero-copy
views of the body. Two extensions ride on the same documents: tensors whose parameters
name a registered shared-memory region are read from it and written into it
(:func:`read_shared_inputs`, :func:`write_shared_output`; the regions are
``sysshm.py``'s), and outputs asked for with ``classification`` are replaced by their
top classes (:func:`classify_outputs`; ``classification.py``).

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
from .classification import ClassificationError, top_classes
from .sysshm import Regions, SharedMemoryError, ShmRef

__all__ = [
    "DATATYPES",
    "EncodedResponse",
    "InferRequest",
    "OutputRequest",
    "RequestError",
    "SharedInput",
    "StringTensor",
    "classify_outputs",
    "data_bytes",
    "datatype_of",
    "decode_document",
    "decode_request",
    "encode_response",
    "read_shared_inputs",
    "shared_input_bytes",
    "write_shared_output",
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
    """One entry of a request's ``outputs``: which output, and whether as binary.

    ``class_count`` > 0 asks for its top classes instead of the tensor (the
    classification extension, ``classification.py``); ``shm`` for it to be written
    into a registered shared-memory region (the system shared-memory extension).
    """

    name: str
    binary: bool | None = None
    class_count: int = 0
    shm: ShmRef | None = None


@dataclass(frozen=True)
class SharedInput:
    """An input whose bytes are in a shared-memory region, to be read (with
    :func:`read_shared_inputs`) once the request is decoded."""

    ref: ShmRef
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class StringTensor:
    """A ``BYTES`` output of any shape (a model's ``List[str]`` is 1-D; classification
    gives ``[batch, N]``): its elements in row-major order."""

    items: list[bytes]
    shape: list[int]


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
        shared_inputs: the inputs given in shared memory (their ``inputs`` entry is None
            until :func:`read_shared_inputs` reads them).
    """

    id: str | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    shared_inputs: dict[str, SharedInput] = field(default_factory=dict)
    outputs: list[OutputRequest] | None = None
    binary_output: bool = False
    timeout: float | None = None
    priority: int | None = None
    #: the ``sequence_id``, ``sequence_start`` and ``sequence_end`` parameters
    #: (sequence batching; an id of 0 or "" is none, as in Triton)
    sequence_id: int | str | None = None
    sequence_start: bool = False
    sequence_end: bool = False


def sequence_parameters(sequence_id: Any, start: bool | None, end: bool | None) -> tuple[int | str | None, bool, bool]:
    """A request's sequence parameters, checked (0 or "" for the id is none).

    Raises:
        RequestError: 400 for an id that is not an unsigned 64-bit integer or a string.
    """
    if sequence_id in (None, 0, ""):
        sequence_id = None
    elif isinstance(sequence_id, bool) or not isinstance(sequence_id, (int, str)):
        raise _bad(f"parameter 'sequence_id' must be an integer or a string, got {_show(sequence_id)}")
    elif isinstance(sequence_id, int) and not 0 < sequence_id < 1 << 64:
        raise _bad(f"parameter 'sequence_id' must be an unsigned 64-bit integer, got {sequence_id}")
    return sequence_id, bool(start), bool(end)


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
    return decode_document(doc, view[header_length:], model, declared)


def decode_document(
    doc: Any,
    tensor_data: memoryview,
    model: str,
    declared: Mapping[str, TensorSpec] = {},
) -> InferRequest:
    """Decode an inference request whose JSON is parsed already: the part of
    :func:`decode_request` that every protocol shares (the gRPC front builds ``doc``
    and ``tensor_data`` from its message, see ``grpc_codec.py``).

    Args:
        doc: the request's JSON document.
        tensor_data: the binary tensor data, which the inputs with a
            ``binary_data_size`` parameter take in turn, all of it; they become views of it.
        model: the model's name (for messages).
        declared: the model's declared inputs by name (see :func:`decode_request`).

    Raises:
        RequestError: 400 with a message naming the input and what is wrong.
    """
    view, size = tensor_data, len(tensor_data)
    doc = _object(doc, "the request")
    request = InferRequest()
    rid = doc.get("id")
    if rid is not None:
        if not isinstance(rid, str):
            raise _bad(f"'id' must be a string, got {rid!r}")
        request.id = rid
    params = _parameters(doc, "the request")
    request.binary_output = bool(_flag(params, "binary_data_output", "the request"))
    request.sequence_id, request.sequence_start, request.sequence_end = sequence_parameters(
        params.get("sequence_id"),
        _flag(params, "sequence_start", "the request"),
        _flag(params, "sequence_end", "the request"),
    )
    if "classification" in params:
        raise _bad(
            "parameter 'classification' is an output's: give it in the parameters of each output to classify "
            '("outputs": [{"name": ..., "parameters": {"classification": N}}])'
        )
    timeout = params.get("timeout")
    if timeout is not None:
        request.timeout = _timeout(timeout)
    priority = params.get("priority")
    if priority is not None:
        request.priority = _count(priority, "parameter 'priority'") or None
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _bad("the request has no 'inputs' (a non-empty list of tensors)")
    offset = 0
    for i, item in enumerate(inputs):
        entry = _object(item, f"inputs[{i}]")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise _bad(f"inputs[{i}] has no 'name'")
        if name in request.inputs:
            raise _bad(f"input {name!r} is given twice")
        dtype, shape = _header(entry, name, model, declared.get(name))
        in_params = _parameters(entry, f"input {name!r}")
        binary = in_params.get("binary_data_size")
        shared = _shm_ref(in_params, f"input {name!r}")
        if shared is not None:
            if binary is not None or "data" in entry:
                other = "data" if binary is None else "binary data"
                raise _bad(f"input {name!r} is in shared memory and also has {other}; give one")
            if dtype != STRING and shared.byte_size != math.prod(shape) * _ITEMSIZE[dtype]:
                raise _bad(
                    f"input {name!r}: shape {list(shape)} of {_NAMES[dtype]} is {math.prod(shape) * _ITEMSIZE[dtype]} "
                    f"bytes, shared_memory_byte_size is {shared.byte_size}"
                )
            request.shared_inputs[name] = SharedInput(shared, dtype, shape)
            request.inputs[name] = None  # (read by read_shared_inputs; the place keeps the request's order)
        elif binary is not None:
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
            raise _bad(f"input {name!r} has neither 'data' nor a binary_data_size or shared_memory_region parameter")
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
            classes = _count(out_params.get("classification", 0), f"parameter 'classification' of output {name!r}")
            shared = _shm_ref(out_params, f"output {name!r}")
            if classes and shared is not None:
                raise _bad(
                    f"output {name!r}: a classification cannot be written to shared memory; ask for one or the other"
                )
            binary = _flag(out_params, "binary_data", f"output {name!r}")
            request.outputs.append(OutputRequest(name, binary, classes, shared))
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


def _shm_ref(params: dict[str, Any], what: str) -> ShmRef | None:
    try:
        return ShmRef.from_parameters(params, what)
    except SharedMemoryError as e:
        raise _bad(e.message) from None


def _from_binary(
    data: memoryview, dtype: str, shape: tuple[int, ...], name: str, size_name: str = "binary_data_size"
) -> Any:
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
            f"{size_name} is {len(data)}"
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
    if isinstance(value, StringTensor):
        value = value.items
    if isinstance(value, list):
        return sum(4 + (len(v.encode()) if isinstance(v, str) else len(v)) for v in value)
    return 0


# ── the classification and system shared-memory extensions ──────────────────


def shared_input_bytes(request: InferRequest) -> int:
    """The bytes :func:`read_shared_inputs` would read for ``request``."""
    return sum(s.ref.byte_size for s in request.shared_inputs.values())


def _shm_failure(e: SharedMemoryError) -> RequestError:
    # In a request, a region that is not there is the request's fault (400), not a
    # missing URL; a closed registry (the server is stopping) is 503.
    return RequestError(503 if e.code == "UNAVAILABLE" else 400, e.message)


def read_shared_inputs(request: InferRequest, regions: Regions, owner: str) -> None:
    """Read ``request``'s shared-memory inputs from their regions into ``request.inputs``
    (a copy each: see ``sysshm.py``), checked as binary data is.

    Raises:
        RequestError: 400 naming the input: no such region for ``owner``, a window past
            its end, a region its client removed or shrank, BYTES elements that do not
            fill the bytes; 503 once the server is stopping.
    """
    for name, shared in request.shared_inputs.items():
        ref = shared.ref
        try:
            data = regions.read(ref.region, ref.offset, ref.byte_size, owner, f"input {name!r}")
        except SharedMemoryError as e:
            raise _shm_failure(e) from None
        request.inputs[name] = _from_binary(
            memoryview(data), shared.dtype, shared.shape, name, "shared_memory_byte_size"
        )


def write_shared_output(regions: Regions, owner: str, ref: ShmRef, name: str, value: Any) -> dict[str, Any]:
    """Write output ``name`` into its region (its binary form: a tensor's bytes, BYTES
    elements each with its 4-byte length); return its response entry, which carries no
    data: ``name``, ``datatype``, ``shape`` and the ``shared_memory_*`` parameters, with
    ``shared_memory_byte_size`` the bytes written.

    Raises:
        RequestError: 400 when the region is too small for the output (naming the
            output, the bytes it needs and the bytes given), or gone; 500 for an output
            the protocol cannot carry.
    """
    doc, chunk = _output(name, value, True)
    try:
        written = regions.write(ref.region, ref.offset, ref.byte_size, chunk, owner, f"output {name!r}")
    except SharedMemoryError as e:
        raise _shm_failure(e) from None
    parameters: dict[str, Any] = {"shared_memory_region": ref.region, "shared_memory_byte_size": written}
    if ref.offset:
        parameters["shared_memory_offset"] = ref.offset
    doc["parameters"] = parameters
    return doc


def classify_outputs(
    request: InferRequest,
    outputs: Mapping[str, Any],
    *,
    batched: bool,
    labels: Any = None,
) -> dict[str, Any]:
    """``outputs`` with each output the request asks to classify replaced by its top
    classes (a :class:`StringTensor`; see ``classification.py``).

    Args:
        batched: the model batches (``max_batch_size > 0``): each batch row is classified.
        labels: ``labels(output name)``: the output's labels, or None.

    Raises:
        RequestError: 400 for an output that is not numbers (or that the model does not
            give); 500 for a label file that cannot be read.
    """
    out = dict(outputs)
    for want in request.outputs or ():
        if not want.class_count or want.name not in out:
            continue
        try:
            names = labels(want.name) if labels is not None else None
        except ClassificationError as e:
            raise RequestError(500, str(e)) from None
        try:
            items, shape = top_classes(out[want.name], want.class_count, batched=batched, labels=names, name=want.name)
        except ClassificationError as e:
            raise _bad(str(e)) from None
        out[want.name] = StringTensor(items, shape)
    return out


def encode_response(
    model: str,
    version: int,
    request: InferRequest,
    outputs: Mapping[str, Any],
    max_json_bytes: int | None = None,
    *,
    regions: Regions | None = None,
    owner: str = "",
) -> EncodedResponse:
    """Encode the pool's outputs for ``request``.

    Args:
        max_json_bytes: the most tensor data (:func:`data_bytes`) returned as JSON
            ``data``, all outputs together; None: no limit. JSON costs the server
            about 25 times the tensor's size while it is built, and holds the
            interpreter (every other request) meanwhile, so large outputs are refused
            as JSON before any of it is built; binary outputs are not limited.
        regions: where the outputs asked for in shared memory go (for ``owner``):
            they are written there, and their entries carry no data
            (:func:`write_shared_output`). Classified outputs are replaced before
            (:func:`classify_outputs`).

    Raises:
        RequestError: 400 for an output the model does not give, or JSON outputs over
            ``max_json_bytes`` (the message says how to ask for binary data), or one
            that does not fit its shared memory; 500 for an output the protocol
            cannot carry (a complex tensor).
    """
    wanted: Sequence[OutputRequest] = request.outputs or [OutputRequest(name) for name in outputs]
    binary_of: dict[str, bool] = {}
    for want in wanted:
        if want.name not in outputs:
            raise _bad(f"model {model!r} has no output {want.name!r}; it gives {sorted(outputs)}")
        binary_of[want.name] = request.binary_output if want.binary is None else want.binary
        if want.shm is not None:
            if regions is None:
                raise RequestError(400, f"output {want.name!r}: this server takes no shared memory here")
            binary_of[want.name] = True  # (not JSON: nothing of it is in the response)
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
        if want.shm is not None and regions is not None:
            docs.append(write_shared_output(regions, owner, want.shm, want.name, outputs[want.name]))
            continue
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
    shape = [len(value)] if isinstance(value, list) else None
    if isinstance(value, StringTensor):  # BYTES of any shape (classification)
        value, shape = value.items, value.shape
    if isinstance(value, list):  # BYTES (a List[str] output)
        doc: dict[str, Any] = {"name": name, "datatype": "BYTES", "shape": shape}
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

"""The wire format between the front and its workers (used in both processes).

Every ZeroMQ message is multipart: one msgpack *header* frame, then zero or more raw
*data* frames holding small tensors' bytes. A header is a msgpack array whose first
element is the message kind; the remaining elements are the fields of the message's
dataclass, in order. Fields are only ever appended, with defaults, so an older peer's
shorter header still decodes. The protocol version travels in the READY handshake and
the front refuses a worker of another version.

A tensor is described by :class:`TensorDesc` ``(dtype, shape, inline, where)``: its
bytes are either data frame number ``where`` (``inline``) or ``nbytes`` bytes at offset
``where`` of the sender's shared-memory arena. Nothing is pickled, ever: the decoder
only accepts msgpack's plain types and checks every field's type and range.

A *string tensor* (Triton's ``TYPE_STRING``, TorchScript's ``List[str]``) has dtype
``"string"`` and a 1-D shape ``[n]``, and always travels as a ``BLOB``, however large:
its blob is Triton's ``BYTES`` serialization, each element a 4-byte little-endian length
followed by that many bytes of UTF-8 (:func:`encode_strings`). :func:`decode_strings`
checks it strictly (the lengths add up to the blob exactly, the bytes are UTF-8). Its size
is bounded like any header's: by the front's ``max_request_bytes`` on the way in.

A request for a model whose method takes one ``Dict[str, Tensor]`` (``Ready.dict_input``)
carries one tensor per key, then the dictionary's keys, in the same order, as a last
string tensor (last, so that a request's first tensor is still its first input).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, NamedTuple

import msgpack
import torch

from ..errors import ProtocolError

__all__ = [
    "DTYPES",
    "PROTOCOL_VERSION",
    "STRING",
    "Error",
    "Export",
    "Failed",
    "Message",
    "Ready",
    "Release",
    "Request",
    "Response",
    "Shutdown",
    "TensorDesc",
    "decode",
    "decode_strings",
    "dtype_name",
    "encode",
    "encode_strings",
]

PROTOCOL_VERSION = 1

#: The dtypes that may cross the wire, by their wire name.
DTYPES: dict[str, torch.dtype] = {
    "bool": torch.bool,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
}
_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
_ITEMSIZE: dict[str, int] = {k: torch.empty((), dtype=v).element_size() for k, v in DTYPES.items()}
#: The wire name of a string tensor (a ``List[str]``): not a torch dtype, so not in DTYPES.
STRING = "string"

# Bounds that keep a hostile header from making the receiver allocate absurd amounts.
_MAX_DIMS = 32
_MAX_TENSORS = 4096
#: The most dimensions, and the bound on each size, that a tensor descriptor may carry:
#: a sender checks its tensors against them (what a receiver refuses is lost otherwise).
MAX_DIMS = _MAX_DIMS
MAX_SIZE = 2**40


def dtype_name(dtype: torch.dtype) -> str:
    """Return the wire name of ``dtype``.

    Raises:
        KeyError: the dtype cannot cross the wire (e.g. quantized types).
    """
    return _NAMES[dtype]


#: Where a tensor's bytes travel (``TensorDesc.kind``): inside the header, as a
#: separate frame, in the sender's shared-memory arena, or in a CUDA device buffer
#: (the request's ``device_in`` buffer, or the reply's ``device_out`` one).
BLOB, FRAME, ARENA, DEVICE = 0, 1, 2, 3
_KINDS_OF_PLACE = (BLOB, FRAME, ARENA, DEVICE)


class TensorDesc(NamedTuple):
    """Where one tensor's bytes are: blob ``where`` of the header (``BLOB``), data
    frame ``where`` (``FRAME``), or offset ``where`` of the sender's arena (``ARENA``).

    A NamedTuple, so it packs as a msgpack array as it is and costs little to build.
    """

    dtype: str
    shape: tuple[int, ...]
    kind: int
    where: int

    @property
    def nbytes(self) -> int:
        """The tensor's size in bytes (not for a string tensor, whose size is its blob's)."""
        return math.prod(self.shape) * _ITEMSIZE[self.dtype]


def _desc(raw: Any) -> TensorDesc:
    if not isinstance(raw, list) or len(raw) < 4:
        raise ProtocolError(f"tensor descriptor must be a 4-element array, got {raw!r:.80}")
    dtype, shape, kind, where = raw[0], raw[1], raw[2], raw[3]
    if type(dtype) is not str or (dtype not in _ITEMSIZE and dtype != STRING):
        raise ProtocolError(f"unknown dtype {dtype!r:.40} in tensor descriptor")
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_DIMS
        or not all(type(d) is int and 0 <= d < MAX_SIZE for d in shape)
    ):
        raise ProtocolError(f"bad shape {shape!r:.80} in tensor descriptor")
    if type(kind) is not int or kind not in _KINDS_OF_PLACE or type(where) is not int or where < 0:
        raise ProtocolError(f"bad location {kind!r:.20}/{where!r:.20} in tensor descriptor")
    if dtype == STRING and (kind != BLOB or len(shape) != 1):
        raise ProtocolError(f"a string tensor must be a 1-D blob, got shape {shape!r:.40} of kind {kind}")
    return TensorDesc(dtype, tuple(shape), kind, where)


_LENGTH = struct.Struct("<I")


def encode_strings(items: Sequence[bytes]) -> bytes:
    """Triton's ``BYTES`` serialization of ``items`` (each already UTF-8 encoded).

    Raises:
        ValueError: an element of 4 GiB or more, whose length has no 4-byte encoding.
    """
    parts = []
    pack = _LENGTH.pack
    for item in items:
        if len(item) > 0xFFFFFFFF:
            raise ValueError(f"a string of {len(item)} bytes; at most 4 GiB - 1 fit the wire format")
        parts.append(pack(len(item)))
        parts.append(item)
    return b"".join(parts)


def decode_strings(blob: bytes, count: int) -> list[str]:
    """The ``count`` strings of a ``BYTES`` blob (see :func:`encode_strings`).

    Raises:
        ProtocolError: the blob does not hold exactly ``count`` length-prefixed
            elements (one too long, too short, bytes left over), or one is not UTF-8.
    """
    size = len(blob)
    if count > size // _LENGTH.size:  # before allocating anything for a hostile count
        raise ProtocolError(f"a blob of {size} bytes cannot hold {count} strings")
    out: list[str] = []
    unpack = _LENGTH.unpack_from
    pos = 0
    for i in range(count):
        if pos + 4 > size:
            raise ProtocolError(f"string blob ends inside the length of element {i} of {count}")
        (length,) = unpack(blob, pos)
        pos += 4
        end = pos + length
        if end > size:
            raise ProtocolError(f"element {i} of a string blob claims {length} bytes; {size - pos} are left")
        try:
            out.append(str(blob[pos:end], "utf-8"))
        except UnicodeDecodeError as e:
            raise ProtocolError(f"element {i} of a string blob is not UTF-8: {e.reason} at byte {e.start}") from None
        pos = end
    if pos != size:
        raise ProtocolError(f"{size - pos} bytes left over after the {count} elements of a string blob")
    return out


@dataclass(slots=True)
class Ready:
    """Worker → front, once: the model is loaded and the flags are applied."""

    KIND: ClassVar[int] = 1
    protocol: int
    pid: int
    flags: dict[str, Any] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    device: str = "cpu"
    warnings: list[str] = field(default_factory=list)
    #: the method takes one ``Dict[str, Tensor]`` (``inputs`` is its one argument's
    #: name): requests carry the keys last (see the module docstring)
    dict_input: bool = False


@dataclass(slots=True)
class Failed:
    """Worker → front, once, instead of READY: start-up failed."""

    KIND: ClassVar[int] = 2
    protocol: int
    pid: int
    error_type: str
    message: str
    traceback: str = ""


class Export(NamedTuple):
    """A CUDA buffer of the front's, for a GPU worker to map once (see ``transport.cuda``).

    ``event`` is the buffer's interprocess CUDA event (recorded after the front's
    copies into it; empty for an output buffer, which the worker writes).
    """

    id: int
    device: int
    nbytes: int
    handle: bytes
    event: bytes


def _export(raw: Any) -> Export:
    if (
        not isinstance(raw, list)
        or len(raw) < 5
        or not all(type(x) is int and x >= 0 for x in raw[:3])
        or type(raw[3]) is not bytes
        or len(raw[3]) != 64
        or type(raw[4]) is not bytes
        or len(raw[4]) not in (0, 64)
    ):
        raise ProtocolError(f"malformed device buffer export {raw!r:.80}")
    return Export(raw[0], raw[1], raw[2], raw[3], raw[4])


@dataclass(slots=True)
class Request:
    """Front → worker: run the model on these tensors.

    ``releases`` piggybacks the offsets of response-arena slots that the front no
    longer uses, so that freeing needs no message of its own.

    GPU workers only: ``exports`` carries CUDA allocations (:class:`Export`) the
    worker maps the first time it sees them and keeps; ``device_ids`` names, for each
    ``DEVICE`` descriptor in order, the export holding it; ``device_in`` is an export
    whose event the worker waits for before reading (-1: none); ``device_out`` the
    buffer to write outputs into (-1: outputs go to host memory).
    """

    KIND: ClassVar[int] = 3
    id: int
    tensors: list[TensorDesc]
    releases: list[int] = field(default_factory=list)
    #: the bytes of small tensors (``BLOB`` descriptors index into it)
    blobs: list[bytes] = field(default_factory=list)
    exports: list[Export] = field(default_factory=list)
    device_in: int = -1
    device_out: int = -1
    #: offsets of ``device_out`` slots the front no longer uses
    device_releases: list[int] = field(default_factory=list)
    device_ids: Sequence[int] = field(default_factory=list)
    #: a batch of requests run as one execution: the rows of each, in order (empty:
    #: one request); ``tensors`` then holds each request's inputs in turn, or, joined,
    #: one descriptor per input holding every request's rows (workers/batching.py)
    batch: list[int] = field(default_factory=list)


@dataclass(slots=True)
class Response:
    """Worker → front: the outputs of request ``id``, in the model's order."""

    KIND: ClassVar[int] = 4
    id: int
    tensors: list[TensorDesc]
    blobs: list[bytes] = field(default_factory=list)


@dataclass(slots=True)
class Error:
    """Worker → front: request ``id`` failed (``id`` is -1 if it was undecodable)."""

    KIND: ClassVar[int] = 5
    id: int
    error_type: str
    message: str
    traceback: str = ""
    #: the error came from the caller's input (bad binding), not from the model
    input_error: bool = False
    #: the worker cannot go on (a sticky CUDA error) and exits after this message
    fatal: bool = False


@dataclass(slots=True)
class Release:
    """Front → worker: response-arena slots the front no longer uses."""

    KIND: ClassVar[int] = 6
    offsets: list[int] = field(default_factory=list)


@dataclass(slots=True)
class Shutdown:
    """Front → worker: finish what you are doing and exit."""

    KIND: ClassVar[int] = 7


Message = Ready | Failed | Request | Response | Error | Release | Shutdown
_KINDS: dict[int, type] = {cls.KIND: cls for cls in (Ready, Failed, Request, Response, Error, Release, Shutdown)}
_FIELDS: dict[type, tuple[str, ...]] = {cls: tuple(f.name for f in fields(cls)) for cls in _KINDS.values()}


def encode(msg: Message) -> bytes:
    """Encode a message as a header frame (its data frames are sent separately)."""
    if isinstance(msg, Request):  # the hot path, without generic field walking
        if (
            msg.device_in < 0
            and msg.device_out < 0
            and not (msg.exports or msg.device_releases or msg.device_ids or msg.batch)
        ):
            return msgpack.packb([3, msg.id, msg.tensors, msg.releases, msg.blobs])
        return msgpack.packb(
            [
                3,
                msg.id,
                msg.tensors,
                msg.releases,
                msg.blobs,
                msg.exports,
                msg.device_in,
                msg.device_out,
                msg.device_releases,
                msg.device_ids,
                msg.batch,
            ]
        )
    if isinstance(msg, Response):
        return msgpack.packb([4, msg.id, msg.tensors, msg.blobs])
    return msgpack.packb([msg.KIND, *(getattr(msg, f) for f in _FIELDS[type(msg)])])


def decode(header: bytes | memoryview) -> Message:
    """Decode a header frame into its message.

    Raises:
        ProtocolError: the header is not a well-formed message of this protocol.
    """
    try:
        raw = msgpack.unpackb(header, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"undecodable header ({type(e).__name__}: {e})") from None
    if not isinstance(raw, list) or not raw or type(raw[0]) is not int:
        raise ProtocolError(f"header must be an array starting with a kind, got {raw!r:.80}")
    cls = _KINDS.get(raw[0])
    if cls is None:
        raise ProtocolError(f"unknown message kind {raw[0]}")
    names = _FIELDS[cls]
    values = raw[1 : 1 + len(names)]  # newer peers may append fields we do not know
    if cls is Request:
        return _request(values)
    if cls is Response:
        return _response(values)
    try:
        msg = cls(*values)
    except TypeError as e:
        raise ProtocolError(f"malformed {cls.__name__} message: {e}") from None
    _check_types(msg)
    return msg


def request_id(header: bytes | memoryview) -> int:
    """The id of a Request whose header :func:`decode` refused, if it can be read (else
    -1): the worker answers the refusal to that request, so its caller is not left
    waiting for an answer that never comes."""
    try:
        raw = msgpack.unpackb(header, raw=False, strict_map_key=True)
    except Exception:
        return -1
    if (
        isinstance(raw, list)
        and len(raw) > 1
        and type(raw[0]) is int
        and raw[0] == Request.KIND
        and type(raw[1]) is int
        and raw[1] >= 0
    ):
        return raw[1]
    return -1


def _tensors(raw: Any) -> list[TensorDesc]:
    if not isinstance(raw, list) or len(raw) > _MAX_TENSORS:
        raise ProtocolError(f"tensor list must be an array of at most {_MAX_TENSORS}")
    return [_desc(t) for t in raw]


def _request(values: list[Any]) -> Request:
    if len(values) < 2 or type(values[0]) is not int:
        raise ProtocolError("malformed Request message")
    releases = _offsets(values, 2, "releases")
    request = Request(values[0], _tensors(values[1]), releases, _blobs(values, 3))
    if len(values) > 4:
        exports = values[4]
        if not isinstance(exports, list) or len(exports) > _MAX_TENSORS:
            raise ProtocolError("malformed Request message: exports must be an array")
        request.exports = [_export(e) for e in exports]
        for name, i in (("device_in", 5), ("device_out", 6)):
            value = values[i] if len(values) > i else -1
            if type(value) is not int or value < -1:
                raise ProtocolError(f"malformed Request message: {name} must be a buffer id or -1")
            setattr(request, name, value)
        request.device_releases = _offsets(values, 7, "device_releases")
        request.device_ids = _offsets(values, 8, "device_ids")
        request.batch = _offsets(values, 9, "batch")
        if len(request.batch) > _MAX_TENSORS or any(rows == 0 for rows in request.batch):
            raise ProtocolError("malformed Request message: batch must list at most 4096 positive row counts")
    return request


def _offsets(values: list[Any], i: int, name: str) -> list[int]:
    offsets = values[i] if len(values) > i else []
    if not isinstance(offsets, list) or not all(type(o) is int and o >= 0 for o in offsets):
        raise ProtocolError(f"malformed Request message: {name} must be offsets")
    return offsets


def _response(values: list[Any]) -> Response:
    if len(values) < 2 or type(values[0]) is not int:
        raise ProtocolError("malformed Response message")
    return Response(values[0], _tensors(values[1]), _blobs(values, 2))


def _blobs(values: list[Any], i: int) -> list[bytes]:
    blobs = values[i] if len(values) > i else []
    if not isinstance(blobs, list) or not all(type(b) is bytes for b in blobs):
        raise ProtocolError("malformed message: blobs must be an array of binary strings")
    return blobs


_TYPES: dict[str, tuple[type, ...]] = {
    "protocol": (int,),
    "pid": (int,),
    "id": (int,),
    "flags": (dict,),
    "inputs": (list,),
    "device": (str,),
    "warnings": (list,),
    "error_type": (str,),
    "message": (str,),
    "traceback": (str,),
    "input_error": (bool,),
    "fatal": (bool,),
    "dict_input": (bool,),
    "offsets": (list,),
}


def _check_types(msg: Message) -> None:
    for name in _FIELDS[type(msg)]:
        value = getattr(msg, name)
        # type() rather than isinstance(): a bool is not an acceptable int here
        ok = type(value) in _TYPES[name]
        if ok and name in ("inputs", "warnings"):
            ok = all(type(x) is str for x in value)
        if not ok:
            raise ProtocolError(f"malformed {type(msg).__name__} message: field {name!r} is {type(value).__name__}")
    if isinstance(msg, Release) and not all(type(o) is int and o >= 0 for o in msg.offsets):
        raise ProtocolError("malformed Release message: offsets must be non-negative integers")

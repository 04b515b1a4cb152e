"""The wire format between the front and its workers (used in both processes).

Every ZeroMQ message is multipart: one msgpack *header* frame, then zero or more raw
*data* frames, each the bytes of one ``FRAME`` tensor. A header is a msgpack array: the
message's kind, then the fields of its class, in their declared order (messages are
declared with ``codec``, which writes their encoder and decoder). Fields are only ever
appended, with defaults, so an older peer's shorter header still decodes. The protocol
version travels in the READY handshake and the front refuses a worker of another
version.

A tensor is described by :class:`TensorDesc` ``(dtype, shape, kind, where)``: its bytes
are blob ``where`` of the header's ``blobs`` (``BLOB``), data frame ``where``
(``FRAME``), or ``nbytes`` bytes at offset ``where`` of the sender's shared-memory arena
(``ARENA``) or of a CUDA buffer (``DEVICE``). Nothing is pickled, ever: the decoder only
accepts msgpack's plain types and checks every field's type and range.

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
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

from ..errors import ProtocolError
from .codec import Bool, Bytes, Codec, Convert, Int, List, Map, Plain, Str, Struct, message, spec, unpack
from .dtypes import DTYPES, ITEMSIZES, STRING, dtype_name

__all__ = [
    "CODEC",
    "DTYPES",
    "PROTOCOL_VERSION",
    "STRING",
    "Batch",
    "Error",
    "Export",
    "Failed",
    "Message",
    "Ready",
    "Release",
    "Replies",
    "Request",
    "Response",
    "Shutdown",
    "TensorDesc",
    "decode",
    "decode_strings",
    "descriptors",
    "dtype_name",
    "encode",
    "encode_strings",
    "tensor_desc",
]

PROTOCOL_VERSION = 1

# Bounds that keep a hostile header from making the receiver allocate absurd amounts.
_MAX_DIMS = 32
_MAX_TENSORS = 4096
#: The most dimensions, and the bound on each size, that a tensor descriptor may carry:
#: a sender checks its tensors against them (what a receiver refuses is lost otherwise).
MAX_DIMS = _MAX_DIMS
MAX_SIZE = 2**40

#: Where a tensor's bytes travel (``TensorDesc.kind``): inside the header, as a
#: separate frame, in the sender's shared-memory arena, or in a CUDA device buffer
#: (the request's ``device_in`` buffer, or the reply's ``device_out`` one).
BLOB, FRAME, ARENA, DEVICE = 0, 1, 2, 3
_KINDS_OF_PLACE = (BLOB, FRAME, ARENA, DEVICE)


class TensorDesc(NamedTuple):
    """Where one tensor's bytes are: blob ``where`` of the header (``BLOB``), data
    frame ``where`` (``FRAME``), offset ``where`` of the sender's arena (``ARENA``) or
    of a CUDA buffer (``DEVICE``).

    A NamedTuple, so it packs as a msgpack array as it is and costs little to build.
    """

    dtype: str
    shape: tuple[int, ...]
    kind: int
    where: int

    @property
    def nbytes(self) -> int:
        """The tensor's size in bytes (not for a string tensor, whose size is its blob's)."""
        return math.prod(self.shape) * ITEMSIZES[self.dtype]


def tensor_desc(dtype: str, shape: tuple[int, ...], kind: int, where: int) -> TensorDesc:
    """A :class:`TensorDesc`, built in C (a NamedTuple's own ``__new__`` is Python code)."""
    return tuple.__new__(TensorDesc, (dtype, shape, kind, where))


_WIRE_NAMES = frozenset([*DTYPES, STRING])


def descriptors(places: Sequence[int]) -> Callable[[Any], list[TensorDesc]]:
    """The decoder of a list of tensor descriptors whose bytes may be at ``places``
    (``BLOB``, ``FRAME``, ...): it checks each ``[dtype, shape, kind, where]`` array
    (fields a newer peer appends are ignored) and returns them as TensorDescs.

    The returned function raises ProtocolError for a list of more than 4096, or a
    descriptor that is not such an array, of an unknown dtype, a shape of more than 32
    dimensions or a size not in ``[0, 2**40)``, a place not in ``places`` or a negative
    ``where``, or a string tensor that is not a 1-D ``BLOB``.
    """
    allowed = tuple(places)
    names = _WIRE_NAMES
    new = tuple.__new__

    def read_descriptors(raw: Any) -> list[TensorDesc]:
        if type(raw) is not list or len(raw) > _MAX_TENSORS:
            raise ProtocolError(f"tensor list must be an array of at most {_MAX_TENSORS}")
        out = []
        for d in raw:
            if type(d) is not list or len(d) < 4:
                raise ProtocolError(f"tensor descriptor must be a 4-element array, got {d!r:.80}")
            dtype, shape, kind, where = d[0], d[1], d[2], d[3]
            if type(dtype) is not str or dtype not in names:
                raise ProtocolError(f"unknown dtype {dtype!r:.40} in tensor descriptor")
            if type(shape) is not list or len(shape) > _MAX_DIMS:
                raise ProtocolError(f"bad shape {shape!r:.80} in tensor descriptor")
            for size in shape:
                if type(size) is not int or not 0 <= size < MAX_SIZE:
                    raise ProtocolError(f"bad shape {shape!r:.80} in tensor descriptor")
            if type(kind) is not int or kind not in allowed or type(where) is not int or where < 0:
                raise ProtocolError(f"bad location {kind!r:.20}/{where!r:.20} in tensor descriptor")
            if dtype == STRING and (kind != BLOB or len(shape) != 1):
                raise ProtocolError(f"a string tensor must be a 1-D blob, got shape {shape!r:.40} of kind {kind}")
            # (tuple.__new__: a NamedTuple's own __new__ is Python code)
            out.append(new(TensorDesc, (dtype, tuple(shape), kind, where)))
        return out

    return read_descriptors


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


# The refusals' texts (templates for the codec; tests pin them).
_TERSE = "malformed {cls} message"
_OFFSETS = "malformed {cls} message: {name} must be offsets"
_BLOBS = "malformed message: blobs must be an array of binary strings"
_BUFFER = "malformed {cls} message: {name} must be a buffer id or -1"
_EXPORTS = "malformed {cls} message: exports must be an array"

_TENSORS = Convert(descriptors(_KINDS_OF_PLACE))
_OFFSET_LIST = List(Int(lo=0))
_BLOB_LIST = List(Bytes())


@message
class Ready:
    """Worker → front, once: the model is loaded and the flags are applied."""

    KIND: ClassVar[int] = 1
    protocol: int = spec(Int())
    pid: int = spec(Int())
    flags: dict[str, Any] = spec(Map(), default_factory=dict)
    inputs: list[str] = spec(List(Str()), default_factory=list)
    device: str = spec(Str(), default="cpu")
    warnings: list[str] = spec(List(Str()), default_factory=list)
    #: the method takes one ``Dict[str, Tensor]`` (``inputs`` is its one argument's
    #: name): requests carry the keys last (see the module docstring)
    dict_input: bool = spec(Bool(), default=False)
    #: the model's format: torchscript, aoti, exported or python
    format: str = spec(Str(), default="torchscript")
    #: the outputs' names, in order, when the model names them (a PT2 call spec's
    #: "RESULT[logits]"); empty: unnamed
    outputs: list[str] = spec(List(Str()), default_factory=list)
    #: the rows one call accepts, [min, max], when the model says (a PT2 artifact); empty: any
    batch: list[int] = spec(List(Int()), default_factory=list)
    #: what the loader reports of its format (package device, compile cache, ...)
    info: dict[str, Any] = spec(Map(), default_factory=dict)


@message
class Failed:
    """Worker → front, once, instead of READY: start-up failed."""

    KIND: ClassVar[int] = 2
    protocol: int = spec(Int())
    pid: int = spec(Int())
    error_type: str = spec(Str())
    message: str = spec(Str())
    traceback: str = spec(Str(), default="")


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


_EXPORT = Struct(
    Export,
    Int(lo=0),
    Int(lo=0),
    Int(lo=0),
    Bytes(sizes=(64,)),
    Bytes(sizes=(0, 64)),
    error="malformed device buffer export {value!r:.80}",
)


@message(missing=_TERSE, tail="exports")
class Request:
    """Front → worker: run the model on these tensors.

    ``releases`` piggybacks the offsets of response-arena slots that the front no
    longer uses, so that freeing needs no message of its own.

    GPU workers only: ``exports`` carries CUDA allocations (:class:`Export`) the
    worker maps the first time it sees them and keeps; ``device_ids`` names, for each
    ``DEVICE`` descriptor in order, the export holding it; ``device_in`` is an export
    whose event the worker waits for before reading (-1: none); ``device_out`` the
    buffer to write outputs into (-1: outputs go to host memory). A request with none
    of these (nor ``batch``) goes as five fields.
    """

    KIND: ClassVar[int] = 3
    id: int = spec(Int(), error=_TERSE)
    tensors: list[TensorDesc] = spec(_TENSORS)
    releases: list[int] = spec(_OFFSET_LIST, default_factory=list, error=_OFFSETS)
    #: the bytes of small tensors (``BLOB`` descriptors index into it)
    blobs: list[bytes] = spec(_BLOB_LIST, default_factory=list, error=_BLOBS)
    exports: list[Export] = spec(List(_EXPORT, max_len=_MAX_TENSORS), default_factory=list, error=_EXPORTS)
    device_in: int = spec(Int(lo=-1), default=-1, error=_BUFFER)
    device_out: int = spec(Int(lo=-1), default=-1, error=_BUFFER)
    #: offsets of ``device_out`` slots the front no longer uses
    device_releases: list[int] = spec(_OFFSET_LIST, default_factory=list, error=_OFFSETS)
    device_ids: Sequence[int] = spec(_OFFSET_LIST, default_factory=list, error=_OFFSETS)
    #: a batch of requests run as one execution: the rows of each, in order (empty:
    #: one request); ``tensors`` then holds each request's inputs in turn, or, joined,
    #: one descriptor per input holding every request's rows (workers/batching.py)
    batch: list[int] = spec(
        _OFFSET_LIST,
        List(
            Int(lo=1),
            max_len=_MAX_TENSORS,
            error="malformed {cls} message: batch must list at most 4096 positive row counts",
        ),
        default_factory=list,
        error=_OFFSETS,
    )
    #: sequence batching (workers/sequences.py): per row of the request or batch, its
    #: sequence's handle and flags (1: start, 2: end), in pairs; empty: no sequences
    sequence: list[int] = spec(
        List(Int(lo=0), max_len=2 * _MAX_TENSORS),
        default_factory=list,
        error="malformed {cls} message: sequence must list (handle, flags) pairs of integers >= 0",
    )
    #: per row, its sequence's correlation ID (an integer or a string)
    corrids: list[Any] = spec(
        List(Plain(depth=0), max_len=_MAX_TENSORS),
        default_factory=list,
        error="malformed {cls} message: corrids must list integers or strings",
    )
    #: handles of sequences whose state the worker drops (ended elsewhere, or idle)
    forget: list[int] = spec(_OFFSET_LIST, default_factory=list, error=_OFFSETS)


@message(missing=_TERSE, tail="batch")
class Response:
    """Worker → front: the outputs of request ``id``, in the model's order."""

    KIND: ClassVar[int] = 4
    id: int = spec(Int(), error=_TERSE)
    tensors: list[TensorDesc] = spec(_TENSORS)
    blobs: list[bytes] = spec(_BLOB_LIST, default_factory=list, error=_BLOBS)
    #: on the reply to a lane :class:`Batch`'s first request, the rows of the batch's
    #: execution (the front counts that execution once); 0 otherwise
    batch: int = spec(Int(lo=0), default=0)


@message(tail="batch")
class Error:
    """Worker → front: request ``id`` failed (``id`` is -1 if it was undecodable)."""

    KIND: ClassVar[int] = 5
    id: int = spec(Int())
    error_type: str = spec(Str())
    message: str = spec(Str())
    traceback: str = spec(Str(), default="")
    #: the error came from the caller's input (bad binding), not from the model
    input_error: bool = spec(Bool(), default=False)
    #: the worker cannot go on (a sticky CUDA error) and exits after this message
    fatal: bool = spec(Bool(), default=False)
    #: as :attr:`Response.batch`
    batch: int = spec(Int(lo=0), default=0)


@message
class Release:
    """Front → worker: response-arena slots the front no longer uses."""

    KIND: ClassVar[int] = 6
    offsets: list[int] = spec(
        _OFFSET_LIST, default_factory=list, error="malformed {cls} message: offsets must be non-negative integers"
    )


@message
class Shutdown:
    """Front → worker: finish what you are doing and exit."""

    KIND: ClassVar[int] = 7


@message
class Batch:
    """Front's hub → worker, on the fast lane: requests of a dynamic-batching model to
    run as one execution, each an encoded :class:`Request` (the hub joins them without
    reading them: ``transport/_lanes.c``). Answered by :class:`Replies`."""

    KIND: ClassVar[int] = 8
    requests: list[bytes] = spec(
        List(Bytes(), max_len=_MAX_TENSORS),
        default_factory=list,
        error="malformed {cls} message: requests must be an array of at most 4096 binary strings",
    )


@message
class Replies:
    """Worker → front's hub, on the fast lane: a batch's replies, each an encoded
    :class:`Response` or :class:`Error` (as many as fit one datagram; the hub hands
    each to its caller)."""

    KIND: ClassVar[int] = 9
    replies: list[bytes] = spec(
        List(Bytes(), max_len=_MAX_TENSORS),
        default_factory=list,
        error="malformed {cls} message: replies must be an array of at most 4096 binary strings",
    )


Message = Ready | Failed | Request | Response | Error | Release | Shutdown | Batch | Replies

#: The codec of these messages (the ones sent per request first: encode tests them in order).
CODEC: Codec[Message] = Codec("wire", [Request, Response, Release, Error, Batch, Replies, Ready, Failed, Shutdown])
encode = CODEC.encode
decode = CODEC.decode


def request_id(header: bytes | memoryview) -> int:
    """The id of a Request whose header :func:`decode` refused, if it can be read (else
    -1): the worker answers the refusal to that request, so its caller is not left
    waiting for an answer that never comes."""
    try:
        raw = unpack(header)  # as strictly as decode() reads it
    except ProtocolError:
        return -1
    if raw[0] == Request.KIND and len(raw) > 1 and type(raw[1]) is int and raw[1] >= 0:
        return raw[1]
    return -1

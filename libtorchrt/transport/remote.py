"""The wire format between remote clients and a server's frontend (used in both processes).

``libtorchrt.Client`` talks to ``libtorchrt.server.zmq_frontend.ZmqFrontend`` over one
ZeroMQ DEALER → ROUTER connection. Like the front ↔ worker format (``wire``), every
message is multipart: one msgpack *header* frame, then raw *data* frames for big tensors
that do not travel through shared memory. A header is a msgpack array
``[kind, field, field, ...]`` (the messages are declared with ``codec``, which writes
their encoder and decoder); fields are only ever appended, with defaults, and a
decoder ignores fields it does not know. Nothing is pickled: the decoder accepts only
msgpack's plain types and checks every field's type and range, so a hostile peer gets a
:class:`~libtorchrt.errors.ProtocolError`, never an object of its choosing.

The protocol version travels in the handshake: the client's first message is HELLO
``[1, protocol, ...]`` and the server answers WELCOME ``[2, protocol, ...]``. Those two
kinds, and the place of ``protocol`` right after the kind, never change, so peers of
any two versions can always tell each other's version and fail with a clear error.

Tensors are :class:`~libtorchrt.transport.wire.TensorDesc` ``(dtype, shape, kind,
where)`` as between front and workers, with three kinds of place:

- ``BLOB``: small tensors (and every string tensor), bytes inside the header;
- ``FRAME``: data frame number ``where`` after the header (sent without copying);
- ``ARENA``: offset ``where`` of a shared-memory arena: in a request, the client's
  arena; in a result, the session's response arena of the server (see ``fdpass``).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from ..deadlines import check_timeout
from ..errors import ProtocolError
from .codec import (
    Anything,
    Bool,
    Bytes,
    Codec,
    Convert,
    Int,
    List,
    Map,
    Number,
    OneOf,
    Optional,
    Plain,
    Str,
    message,
    spec,
    unpack,
)
from .dtypes import ITEMSIZES, STRING
from .wire import ARENA, BLOB, FRAME, MAX_DIMS, TensorDesc, descriptors

__all__ = [
    "CODEC",
    "MAX_FRAMES",
    "PROTOCOL_VERSION",
    "Answer",
    "Attach",
    "Attached",
    "Bye",
    "Cancel",
    "Failure",
    "Hello",
    "Infer",
    "Message",
    "Query",
    "Refused",
    "Release",
    "Result",
    "Welcome",
    "boot_id",
    "decode",
    "encode",
    "payload_bytes",
    "peek_protocol",
    "request_id",
]

#: The version of this protocol (client ↔ frontend); independent of ``wire``'s.
PROTOCOL_VERSION = 1

# Bounds that keep a hostile header from making the receiver allocate absurd amounts
# (the header's own size is bounded by the socket's maximum message size).
_MAX_DIMS = MAX_DIMS  # (a descriptor's bound, wire's)
_MAX_TENSORS = 4096
_MAX_RELEASES = 1 << 16
_MAX_NAME = 1024
#: The most frames a message may have: its header and one data frame per tensor. The
#: frontend refuses a longer message before it decodes anything (see docs/client.md).
MAX_FRAMES = 1 + _MAX_TENSORS


def boot_id() -> str:
    """This machine's boot id: equal in two processes exactly when they run on the same
    kernel (the same host, or containers of one host), where memfds can be shared."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:  # not Linux, or /proc hidden: never claim to share a host
        return ""


#: The refusal of a field: ``malformed Infer message: bad 'id' (bool)``.
_BAD = "malformed {cls} message: bad {name!r} ({type})"

_ID = Int(lo=0)
_NAMES = List(Str(max_len=_MAX_NAME), max_len=_MAX_TENSORS)
_OFFSETS = List(Int(lo=0), max_len=_MAX_RELEASES)
_BLOBS = List(Bytes())
# Tensors of a remote peer are never in a CUDA buffer of ours (no DEVICE).
_TENSORS = Convert(descriptors((BLOB, FRAME, ARENA)))
# A NaN, a negative number or a string is refused; a huge one (inf included) is capped at
# deadlines.MAX_TIMEOUT_S, as a caller's would be: a deadline past what any wait can hold
# must never reach a poll call.
_TIMEOUT = Optional(Number(), Convert(check_timeout, error="malformed {cls} message: bad {name!r} ({value!r:.40})"))


def _paired(msg: Infer | Result) -> None:
    """Refuse a message whose names and tensors are not as many."""
    if msg.names is not None and len(msg.names) != len(msg.tensors):
        kind = type(msg).__name__
        raise ProtocolError(f"malformed {kind} message: {len(msg.names)} names for {len(msg.tensors)} tensors")


def _single(msg: Infer) -> None:
    """Refuse a ``single`` request that has names or other than one tensor."""
    if msg.single and (msg.names is not None or len(msg.tensors) != 1):
        raise ProtocolError("malformed Infer message: bad 'single' (bool)")


@message
class Hello:
    """Client → server, first: its protocol version and where it runs."""

    KIND: ClassVar[int] = 1
    protocol: int = spec(Int())
    pid: int = spec(Int(), default=0, label="protocol")  # (refused as the version's, with it)
    #: the client's :func:`boot_id`; the server offers shared memory when it is its own
    boot_id: str = spec(Str(max_len=64), default="")
    #: the client wants shared memory if the server is on the same host
    shared_memory: bool = spec(Bool(), default=True)


@message
class Welcome:
    """Server → client, the answer to HELLO.

    ``session`` is empty when the server refuses the session (another protocol
    version): the client then raises a :class:`ProtocolError` naming both versions.
    """

    KIND: ClassVar[int] = 2
    protocol: int = spec(Int())
    #: a random token naming this session; it authenticates the shared-memory hand-off
    session: bytes = spec(Bytes(), default=b"")
    #: the server's Unix socket for the shared-memory hand-off ("" if not offered)
    shm_path: str = spec(Str(), default="")
    #: the largest request the server accepts, in bytes of tensor data (0: no limit)
    max_request_bytes: int = spec(Int(), default=0)
    #: the server's libtorchrt version, for error messages
    server: str = spec(Str(), default="")


@message(rules=(_paired, _single))
class Infer:
    """Client → server: run ``model`` on these tensors.

    ``names`` are the inputs' names (a dict of inputs), or None (a list, in argument
    order); ``single``: the caller gave one value, not a list (a tensor, or the strings
    of a one-input model), which the server hands to the pool as it is. ``releases``
    piggybacks the offsets of response-arena slots the client no longer uses.
    """

    KIND: ClassVar[int] = 3
    id: int = spec(_ID)
    model: str = spec(Str(max_len=_MAX_NAME))
    version: int | None = spec(Optional(Int(lo=0)))
    timeout: float | None = spec(_TIMEOUT)
    names: list[str] | None = spec(Optional(_NAMES))
    tensors: list[TensorDesc] = spec(_TENSORS)
    blobs: list[bytes] = spec(_BLOBS, default_factory=list)
    releases: list[int] = spec(_OFFSETS, default_factory=list)
    single: bool = spec(Bool(), default=False)
    #: the request's priority level (``Pool.submit(priority=)``); None: the model's default
    priority: int | None = spec(Optional(Int(lo=0, hi=2**31 - 1)), default=None)
    #: the request's sequence (``Pool.submit(sequence_id=, sequence_start=,
    #: sequence_end=)``); None: none (the pool checks the id's type)
    sequence_id: int | str | None = spec(Plain(depth=0), default=None)
    sequence_start: bool = spec(Bool(), default=False)
    sequence_end: bool = spec(Bool(), default=False)


@message(rules=(_paired,))
class Result:
    """Server → client: the outputs of request ``id``, by name."""

    KIND: ClassVar[int] = 4
    id: int = spec(_ID)
    names: list[str] = spec(_NAMES)
    tensors: list[TensorDesc] = spec(_TENSORS)
    blobs: list[bytes] = spec(_BLOBS, default_factory=list)


@message
class Failure:
    """Server → client: request (or query) ``id`` failed with a libtorchrt error.

    ``error_type`` is the error's class name, ``fields`` its attributes as plain data
    (see ``libtorchrt._plain``); the client raises the same typed error. ``id`` is -1
    for a message the server could not attribute to a request.
    """

    KIND: ClassVar[int] = 5
    id: int = spec(Int(lo=-1))
    error_type: str = spec(Str())
    message: str = spec(Str())
    fields: dict[str, Any] = spec(Map(Plain(depth=2)), default_factory=dict)
    traceback: str = spec(Str(), default="")


@message
class Release:
    """Client → server: response-arena slots the client no longer uses."""

    KIND: ClassVar[int] = 6
    offsets: list[int] = spec(_OFFSETS, default_factory=list)


@message
class Cancel:
    """Client → server: the caller gave up on request ``id`` (cancelled or timed out)."""

    KIND: ClassVar[int] = 7
    id: int = spec(_ID)


@message
class Query:
    """Client → server: ``what`` is ``"models"`` or ``"health"``; answered by ANSWER."""

    KIND: ClassVar[int] = 8
    id: int = spec(_ID)
    what: str = spec(OneOf("models", "health"))


@message
class Answer:
    """Server → client: the plain-data answer to query ``id``."""

    KIND: ClassVar[int] = 9
    id: int = spec(_ID)
    data: Any = spec(Anything(), default=None)


@message
class Bye:
    """Client → server: the client is closing; the session's resources can go now."""

    KIND: ClassVar[int] = 10


# The shared-memory hand-off, over the server's Unix socket (see ``fdpass``), not ZeroMQ.


@message
class Attach:
    """Client → server, with the client's request-arena memfd attached: map it for the
    session named by ``session`` (the token of its WELCOME)."""

    KIND: ClassVar[int] = 11
    # (any of the three refused is refused as the size)
    protocol: int = spec(Int(), label="size")
    session: bytes = spec(Bytes(), label="size")
    #: the arena's size in bytes
    size: int = spec(Int(lo=1))


@message
class Attached:
    """Server → client, with the session's response-arena memfd attached."""

    KIND: ClassVar[int] = 12
    size: int = spec(Int(lo=1))


@message
class Refused:
    """Server → client: the hand-off failed (the client goes on without shared memory)."""

    KIND: ClassVar[int] = 13
    message: str = spec(Str())


Message = (
    Hello | Welcome | Infer | Result | Failure | Release | Cancel | Query | Answer | Bye | Attach | Attached | Refused
)

#: The codec of these messages (the ones sent per request first: encode tests them in order).
CODEC: Codec[Message] = Codec(
    "remote",
    [Infer, Result, Release, Failure, Cancel, Query, Answer, Hello, Welcome, Bye, Attach, Attached, Refused],
    error=_BAD,
)
encode = CODEC.encode
decode = CODEC.decode


def peek_protocol(header: bytes | memoryview) -> tuple[int, int | None]:
    """The kind of a header and, for HELLO and WELCOME, the protocol version it carries,
    read without checking the rest (which another version may lay out differently).

    Raises:
        ProtocolError: the header is not a msgpack array starting with a kind.
    """
    raw = unpack(header)
    if raw[0] in (Hello.KIND, Welcome.KIND):
        if len(raw) < 2 or type(raw[1]) is not int:
            raise ProtocolError("handshake message without a protocol version")
        return raw[0], raw[1]
    return raw[0], None


def request_id(header: bytes | memoryview) -> int:
    """The id of the request (INFER, QUERY or CANCEL) a header names, read without
    checking the rest: a header that does not decode is then answered with a FAILURE
    for that request, so that its caller fails at once rather than at its deadline.

    Returns:
        The id, or -1 when the header names none (or cannot be read at all).
    """
    try:
        raw = unpack(header)
    except ProtocolError:
        return -1
    if raw[0] in (Infer.KIND, Query.KIND, Cancel.KIND) and len(raw) > 1:
        ident = raw[1]
        if type(ident) is int and ident >= 0:
            return ident
    return -1


def payload_bytes(descs: list[TensorDesc], blobs: list[bytes]) -> int:
    """The bytes of tensor data that ``descs`` describe (a string tensor counts its blob):
    what a size limit is checked against, before anything is allocated for them."""
    total = 0
    for d in descs:
        if d.dtype == STRING:
            total += len(blobs[d.where]) if d.where < len(blobs) else 0
        else:
            total += math.prod(d.shape) * ITEMSIZES[d.dtype]
    return total

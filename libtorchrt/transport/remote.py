"""The wire format between remote clients and a server's frontend (used in both processes).

``libtorchrt.Client`` talks to ``libtorchrt.server.zmq_frontend.ZmqFrontend`` over one
ZeroMQ DEALER → ROUTER connection. Like the front ↔ worker format (``wire``), every
message is multipart: one msgpack *header* frame, then raw *data* frames for big tensors
that do not travel through shared memory. A header is a msgpack array
``[kind, field, field, ...]``; fields are only ever appended, with defaults, and a
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
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import msgpack

from ..deadlines import check_timeout
from ..errors import ProtocolError
from .wire import ARENA, BLOB, DTYPES, FRAME, STRING, TensorDesc

__all__ = [
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
_MAX_DIMS = 32
_MAX_TENSORS = 4096
_MAX_RELEASES = 1 << 16
_MAX_NAME = 1024
_ITEMSIZE = {name: dtype.itemsize for name, dtype in DTYPES.items()}
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


@dataclass(slots=True)
class Hello:
    """Client → server, first: its protocol version and where it runs."""

    KIND: ClassVar[int] = 1
    protocol: int
    pid: int = 0
    #: the client's :func:`boot_id`; the server offers shared memory when it is its own
    boot_id: str = ""
    #: the client wants shared memory if the server is on the same host
    shared_memory: bool = True


@dataclass(slots=True)
class Welcome:
    """Server → client, the answer to HELLO.

    ``session`` is empty when the server refuses the session (another protocol
    version): the client then raises a :class:`ProtocolError` naming both versions.
    """

    KIND: ClassVar[int] = 2
    protocol: int
    #: a random token naming this session; it authenticates the shared-memory hand-off
    session: bytes = b""
    #: the server's Unix socket for the shared-memory hand-off ("" if not offered)
    shm_path: str = ""
    #: the largest request the server accepts, in bytes of tensor data (0: no limit)
    max_request_bytes: int = 0
    #: the server's libtorchrt version, for error messages
    server: str = ""


@dataclass(slots=True)
class Infer:
    """Client → server: run ``model`` on these tensors.

    ``names`` are the inputs' names (a dict of inputs), or None (a list, in argument
    order); ``single``: the caller gave one value, not a list (a tensor, or the strings
    of a one-input model), which the server hands to the pool as it is. ``releases``
    piggybacks the offsets of response-arena slots the client no longer uses.
    """

    KIND: ClassVar[int] = 3
    id: int
    model: str
    version: int | None
    timeout: float | None
    names: list[str] | None
    tensors: list[TensorDesc]
    blobs: list[bytes] = field(default_factory=list)
    releases: list[int] = field(default_factory=list)
    single: bool = False
    #: the request's priority level (``Pool.submit(priority=)``); None: the model's default
    priority: int | None = None


@dataclass(slots=True)
class Result:
    """Server → client: the outputs of request ``id``, by name."""

    KIND: ClassVar[int] = 4
    id: int
    names: list[str]
    tensors: list[TensorDesc]
    blobs: list[bytes] = field(default_factory=list)


@dataclass(slots=True)
class Failure:
    """Server → client: request (or query) ``id`` failed with a libtorchrt error.

    ``error_type`` is the error's class name, ``fields`` its attributes as plain data
    (see ``libtorchrt._plain``); the client raises the same typed error. ``id`` is -1
    for a message the server could not attribute to a request.
    """

    KIND: ClassVar[int] = 5
    id: int
    error_type: str
    message: str
    fields: dict[str, Any] = field(default_factory=dict)
    traceback: str = ""


@dataclass(slots=True)
class Release:
    """Client → server: response-arena slots the client no longer uses."""

    KIND: ClassVar[int] = 6
    offsets: list[int] = field(default_factory=list)


@dataclass(slots=True)
class Cancel:
    """Client → server: the caller gave up on request ``id`` (cancelled or timed out)."""

    KIND: ClassVar[int] = 7
    id: int


@dataclass(slots=True)
class Query:
    """Client → server: ``what`` is ``"models"`` or ``"health"``; answered by ANSWER."""

    KIND: ClassVar[int] = 8
    id: int
    what: str


@dataclass(slots=True)
class Answer:
    """Server → client: the plain-data answer to query ``id``."""

    KIND: ClassVar[int] = 9
    id: int
    data: Any = None


@dataclass(slots=True)
class Bye:
    """Client → server: the client is closing; the session's resources can go now."""

    KIND: ClassVar[int] = 10


# The shared-memory hand-off, over the server's Unix socket (see ``fdpass``), not ZeroMQ.


@dataclass(slots=True)
class Attach:
    """Client → server, with the client's request-arena memfd attached: map it for the
    session named by ``session`` (the token of its WELCOME)."""

    KIND: ClassVar[int] = 11
    protocol: int
    session: bytes
    #: the arena's size in bytes
    size: int


@dataclass(slots=True)
class Attached:
    """Server → client, with the session's response-arena memfd attached."""

    KIND: ClassVar[int] = 12
    size: int


@dataclass(slots=True)
class Refused:
    """Server → client: the hand-off failed (the client goes on without shared memory)."""

    KIND: ClassVar[int] = 13
    message: str


Message = (
    Hello | Welcome | Infer | Result | Failure | Release | Cancel | Query | Answer | Bye | Attach | Attached | Refused
)
_KINDS: dict[int, type] = {
    cls.KIND: cls
    for cls in (Hello, Welcome, Infer, Result, Failure, Release, Cancel, Query, Answer, Bye, Attach, Attached, Refused)
}
_FIELDS: dict[type, tuple[str, ...]] = {cls: tuple(f.name for f in fields(cls)) for cls in _KINDS.values()}
_QUERIES = ("models", "health")


def encode(msg: Message) -> bytes:
    """Encode a message as its header frame (its data frames are sent separately)."""
    return msgpack.packb([msg.KIND, *(getattr(msg, f) for f in _FIELDS[type(msg)])])


def _unpack(header: bytes | memoryview) -> list[Any]:
    try:
        raw = msgpack.unpackb(header, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"undecodable header ({type(e).__name__}: {e})") from None
    if not isinstance(raw, list) or not raw or type(raw[0]) is not int:
        raise ProtocolError(f"header must be an array starting with a kind, got {raw!r:.80}")
    return raw


def peek_protocol(header: bytes | memoryview) -> tuple[int, int | None]:
    """The kind of a header and, for HELLO and WELCOME, the protocol version it carries,
    read without checking the rest (which another version may lay out differently).

    Raises:
        ProtocolError: the header is not a msgpack array starting with a kind.
    """
    raw = _unpack(header)
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
        raw = _unpack(header)
    except ProtocolError:
        return -1
    if raw[0] in (Infer.KIND, Query.KIND, Cancel.KIND) and len(raw) > 1:
        ident = raw[1]
        if type(ident) is int and ident >= 0:
            return ident
    return -1


def decode(header: bytes | memoryview) -> Message:
    """Decode a header frame into its message.

    Raises:
        ProtocolError: the header is not a well-formed message of this protocol.
    """
    raw = _unpack(header)
    cls = _KINDS.get(raw[0])
    if cls is None:
        raise ProtocolError(f"unknown message kind {raw[0]}")
    names = _FIELDS[cls]
    values = raw[1 : 1 + len(names)]  # a newer peer may append fields we do not know
    try:
        msg = cls(*values)
    except TypeError as e:
        raise ProtocolError(f"malformed {cls.__name__} message: {e}") from None
    _check(msg)
    return msg


def _is(value: Any, *types: type) -> bool:
    # type() rather than isinstance(): a bool is not an acceptable int here
    return type(value) in types


def _fail(msg: Message, name: str) -> ProtocolError:
    value = getattr(msg, name)
    return ProtocolError(f"malformed {type(msg).__name__} message: bad {name!r} ({type(value).__name__})")


def _check(msg: Message) -> None:
    """Check every field of a decoded message; turn descriptor arrays into TensorDescs."""
    if isinstance(msg, Hello):
        if not _is(msg.protocol, int) or not _is(msg.pid, int):
            raise _fail(msg, "protocol")
        if not _is(msg.boot_id, str) or len(msg.boot_id) > 64:
            raise _fail(msg, "boot_id")
        if not _is(msg.shared_memory, bool):
            raise _fail(msg, "shared_memory")
    elif isinstance(msg, Welcome):
        for name, types in (
            ("protocol", (int,)),
            ("session", (bytes,)),
            ("shm_path", (str,)),
            ("max_request_bytes", (int,)),
            ("server", (str,)),
        ):
            if not _is(getattr(msg, name), *types):
                raise _fail(msg, name)
    elif isinstance(msg, Infer):
        _check_id(msg)
        if not _is(msg.model, str) or len(msg.model) > _MAX_NAME:
            raise _fail(msg, "model")
        if msg.version is not None and not (_is(msg.version, int) and msg.version >= 0):
            raise _fail(msg, "version")
        if msg.timeout is not None:
            # NaN, a negative number or a string is refused; a huge one (inf included)
            # is capped at deadlines.MAX_TIMEOUT_S, as a caller's would be: a deadline
            # past what any wait can hold must never reach a poll call.
            if not _is(msg.timeout, int, float):
                raise _fail(msg, "timeout")
            try:
                msg.timeout = check_timeout(msg.timeout)
            except ValueError:
                raise ProtocolError(f"malformed Infer message: bad 'timeout' ({msg.timeout!r:.40})") from None
        if msg.names is not None and not _names(msg.names):
            raise _fail(msg, "names")
        msg.tensors = _tensors(msg.tensors)
        if msg.names is not None and len(msg.names) != len(msg.tensors):
            raise ProtocolError(f"malformed Infer message: {len(msg.names)} names for {len(msg.tensors)} tensors")
        _check_blobs(msg)
        if not _offsets(msg.releases):
            raise _fail(msg, "releases")
        if not _is(msg.single, bool) or (msg.single and (msg.names is not None or len(msg.tensors) != 1)):
            raise _fail(msg, "single")
        if msg.priority is not None and not (_is(msg.priority, int) and 0 <= msg.priority < 2**31):
            raise _fail(msg, "priority")
    elif isinstance(msg, Result):
        _check_id(msg)
        if not _names(msg.names):
            raise _fail(msg, "names")
        msg.tensors = _tensors(msg.tensors)
        if len(msg.names) != len(msg.tensors):
            raise ProtocolError(f"malformed Result message: {len(msg.names)} names for {len(msg.tensors)} tensors")
        _check_blobs(msg)
    elif isinstance(msg, Failure):
        if not _is(msg.id, int) or msg.id < -1:
            raise _fail(msg, "id")
        for name in ("error_type", "message", "traceback"):
            if not _is(getattr(msg, name), str):
                raise _fail(msg, name)
        if not _is(msg.fields, dict) or not all(type(k) is str and _plain(v) for k, v in msg.fields.items()):
            raise _fail(msg, "fields")
    elif isinstance(msg, Release):
        if not _offsets(msg.offsets):
            raise _fail(msg, "offsets")
    elif isinstance(msg, Cancel):
        _check_id(msg)
    elif isinstance(msg, Query):
        _check_id(msg)
        if msg.what not in _QUERIES:
            raise _fail(msg, "what")
    elif isinstance(msg, Answer):
        _check_id(msg)
    elif isinstance(msg, Attach):
        if not _is(msg.protocol, int) or not _is(msg.session, bytes) or not (_is(msg.size, int) and msg.size > 0):
            raise _fail(msg, "size")
    elif isinstance(msg, Attached):
        if not (_is(msg.size, int) and msg.size > 0):
            raise _fail(msg, "size")
    elif isinstance(msg, Refused) and not _is(msg.message, str):
        raise _fail(msg, "message")


def _check_id(msg: Infer | Result | Cancel | Query | Answer) -> None:
    if not _is(msg.id, int) or msg.id < 0:
        raise _fail(msg, "id")


def _names(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) <= _MAX_TENSORS
        and all(type(n) is str and len(n) <= _MAX_NAME for n in value)
    )


def _offsets(value: Any) -> bool:
    return isinstance(value, list) and len(value) <= _MAX_RELEASES and all(type(o) is int and o >= 0 for o in value)


def _check_blobs(msg: Infer | Result) -> None:
    if not isinstance(msg.blobs, list) or not all(type(b) is bytes for b in msg.blobs):
        raise _fail(msg, "blobs")


def _plain(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` is plain data: None, bool, int, float, str or a list of them."""
    if value is None or type(value) in (bool, int, float, str):
        return True
    if type(value) is list and depth < 2:
        return all(_plain(v, depth + 1) for v in value)
    return False


def _tensors(raw: Any) -> list[TensorDesc]:
    if not isinstance(raw, list) or len(raw) > _MAX_TENSORS:
        raise ProtocolError(f"tensor list must be an array of at most {_MAX_TENSORS}")
    return [_desc(t) for t in raw]


def _desc(raw: Any) -> TensorDesc:
    if not isinstance(raw, list) or len(raw) < 4:
        raise ProtocolError(f"tensor descriptor must be a 4-element array, got {raw!r:.80}")
    dtype, shape, kind, where = raw[0], raw[1], raw[2], raw[3]
    if type(dtype) is not str or (dtype not in _ITEMSIZE and dtype != STRING):
        raise ProtocolError(f"unknown dtype {dtype!r:.40} in tensor descriptor")
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_DIMS
        or not all(type(d) is int and 0 <= d < 2**40 for d in shape)
    ):
        raise ProtocolError(f"bad shape {shape!r:.80} in tensor descriptor")
    if type(kind) is not int or kind not in (BLOB, FRAME, ARENA) or type(where) is not int or where < 0:
        raise ProtocolError(f"bad location {kind!r:.20}/{where!r:.20} in tensor descriptor")
    if dtype == STRING and (kind != BLOB or len(shape) != 1):
        raise ProtocolError(f"a string tensor must be a 1-D blob, got shape {shape!r:.40} of kind {kind}")
    return TensorDesc(dtype, tuple(shape), kind, where)


def payload_bytes(descs: list[TensorDesc], blobs: list[bytes]) -> int:
    """The bytes of tensor data that ``descs`` describe (a string tensor counts its blob):
    what a size limit is checked against, before anything is allocated for them."""
    total = 0
    for d in descs:
        if d.dtype == STRING:
            total += len(blobs[d.where]) if d.where < len(blobs) else 0
        else:
            total += math.prod(d.shape) * _ITEMSIZE[d.dtype]
    return total

"""The declared codec (``transport.codec``): the checks each declaration writes, the
layouts and bytes of the wire and remote messages, and refusals of bad declarations."""

from __future__ import annotations

import dataclasses
import traceback
from typing import Any, ClassVar, NamedTuple

import msgpack
import pytest

from libtorchrt.errors import ProtocolError
from libtorchrt.transport import codec, remote, wire
from libtorchrt.transport.codec import (
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
    Struct,
    message,
    spec,
)
from libtorchrt.transport.wire import ARENA, BLOB, DEVICE, FRAME, Export, TensorDesc

# ------------------------------------------------------------- the wire formats, pinned

# Fields are only ever appended: add a name at the end of a list when a field is
# appended to its message; any other change to these lists breaks older peers.
WIRE_LAYOUT = {
    1: (
        "Ready",
        [
            "protocol",
            "pid",
            "flags",
            "inputs",
            "device",
            "warnings",
            "dict_input",
            "format",
            "outputs",
            "batch",
            "info",
        ],
    ),
    2: ("Failed", ["protocol", "pid", "error_type", "message", "traceback"]),
    3: (
        "Request",
        [
            "id",
            "tensors",
            "releases",
            "blobs",
            "exports",
            "device_in",
            "device_out",
            "device_releases",
            "device_ids",
            "batch",
            "sequence",
            "corrids",
            "forget",
        ],
    ),
    4: ("Response", ["id", "tensors", "blobs", "batch"]),
    5: ("Error", ["id", "error_type", "message", "traceback", "input_error", "fatal", "batch"]),
    6: ("Release", ["offsets"]),
    7: ("Shutdown", []),
    8: ("Batch", ["requests"]),
    9: ("Replies", ["replies"]),
}
REMOTE_LAYOUT = {
    1: ("Hello", ["protocol", "pid", "boot_id", "shared_memory"]),
    2: ("Welcome", ["protocol", "session", "shm_path", "max_request_bytes", "server"]),
    3: (
        "Infer",
        [
            "id",
            "model",
            "version",
            "timeout",
            "names",
            "tensors",
            "blobs",
            "releases",
            "single",
            "priority",
            "sequence_id",
            "sequence_start",
            "sequence_end",
        ],
    ),
    4: ("Result", ["id", "names", "tensors", "blobs"]),
    5: ("Failure", ["id", "error_type", "message", "fields", "traceback"]),
    6: ("Release", ["offsets"]),
    7: ("Cancel", ["id"]),
    8: ("Query", ["id", "what"]),
    9: ("Answer", ["id", "data"]),
    10: ("Bye", []),
    11: ("Attach", ["protocol", "session", "size"]),
    12: ("Attached", ["size"]),
    13: ("Refused", ["message"]),
}


@pytest.mark.parametrize(("module", "layout"), [(wire, WIRE_LAYOUT), (remote, REMOTE_LAYOUT)], ids=["wire", "remote"])
def test_the_message_layouts_only_grow_at_the_end(module: Any, layout: dict[int, tuple[str, list[str]]]) -> None:
    got = {
        kind: (cls.__name__, [f.name for f in dataclasses.fields(cls)]) for kind, cls in module.CODEC.messages.items()
    }
    assert got == layout


_T = TensorDesc
_EXPORT = Export(3, 1, 1 << 20, bytes(range(64)), b"\x01" * 64)

# Headers as the hand-written encoders of commit 59826ef wrote them (before the codec);
# Ready's four trailing fields (format, outputs, batch, info: PT2 models), Request's
# three (sequence, corrids, forget) and Infer's three (the sequence's) came later.
WIRE_BYTES = [
    (
        wire.Ready(1, 4242, {"INFERENCE_MODE": True}, ["x"], "cuda:0", ["note"], True),
        "9c0101cd109281ae494e464552454e43455f4d4f4445c391a178a6637564613a3091a46e6f7465c3"
        "ab746f726368736372697074909080",
    ),
    (
        wire.Failed(1, 4242, "RuntimeError", "bad file", "Traceback"),
        "960201cd1092ac52756e74696d654572726f72a86261642066696c65a954726163656261636b",
    ),
    (
        wire.Request(7, [_T("float32", (2, 3), BLOB, 0), _T("int64", (4096,), ARENA, 128)], [64], [b"\x00" * 24]),
        "9503079294a7666c6f61743332920203000094a5696e74363491cd100002cc80914091c418"
        "000000000000000000000000000000000000000000000000",
    ),
    (
        wire.Request(8, [_T("float32", (2,), DEVICE, 256)], [], [], [_EXPORT], 3, -1, [0], [3], [2]),
        "9e03089194a7666c6f61743332910203cd0100909091950301ce00100000c440000102030405060708090a0b0c0d0e0f10111213"
        "1415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3fc440010101010101"
        "01010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101"
        "01010101010103ff910091039102909090",
    ),
    (
        wire.Request(9, [_T("string", (2,), BLOB, 0)], [], [b"\x01\x00\x00\x00a\x00\x00\x00\x00"], batch=[1, 1]),
        "9e03099194a6737472696e67910200009091c40901000000610000000090ffff9090920101909090",
    ),
    (wire.Response(7, [_T("bfloat16", (1, 16), FRAME, 0)], []), "9404079194a862666c6f61743136920110010090"),
    (wire.Error(7, "ModelError", "boom", "tb", False, True), "970507aa4d6f64656c4572726f72a4626f6f6da27462c2c3"),
    (wire.Release([0, 4096]), "92069200cd1000"),
    (wire.Shutdown(), "9107"),
    # (later: the fast lane's batches; the hub in _lanes.c writes and reads these bytes)
    (wire.Response(7, [], [b"y"], 3), "9504079091c4017903"),
    (wire.Error(7, "ModelError", "boom", "", False, False, 2), "980507aa4d6f64656c4572726f72a4626f6f6da0c2c202"),
    (wire.Batch([b"ab", b"c"]), "920892c4026162c40163"),
    (wire.Replies([b"xyz"]), "920991c40378797a"),
]
REMOTE_BYTES = [
    (remote.Hello(1, 99, "boot", False), "95010163a4626f6f74c2"),
    (
        remote.Welcome(1, b"token", "/tmp/s.sock", 1 << 20, "0.1.0"),
        "960201c405746f6b656eab2f746d702f732e736f636bce00100000a5302e312e30",
    ),
    (
        remote.Infer(7, "tiny", 2, 1.5, ["a"], [_T("float32", (2,), BLOB, 0)], [b"\x00" * 8], [64], False, 3),
        "9e0307a474696e7902cb3ff800000000000091a1619194a7666c6f617433329102000091c40800000000000000009140c203c0c2c2",
    ),
    (remote.Result(7, ["y"], [_T("int32", (1,), ARENA, 64)], []), "95040791a1799194a5696e7433329101024090"),
    (
        remote.Failure(7, "InvalidInputError", "bad", {"model": "m", "known": ["a"]}, "tb"),
        "960507b1496e76616c6964496e7075744572726f72a362616482a56d6f64656ca16da56b6e6f776e91a161a27462",
    ),
    (remote.Release([64]), "92069140"),
    (remote.Cancel(7), "920707"),
    (remote.Query(8, "health"), "930808a66865616c7468"),
    (remote.Answer(8, {"tiny": {"state": "ready"}}), "93090881a474696e7981a57374617465a57265616479"),
    (remote.Bye(), "910a"),
    (remote.Attach(1, b"token", 4096), "940b01c405746f6b656ecd1000"),
    (remote.Attached(4096), "920ccd1000"),
    (remote.Refused("unknown session"), "920daf756e6b6e6f776e2073657373696f6e"),
]


@pytest.mark.parametrize(
    ("module", "msg", "header"),
    [(wire, m, h) for m, h in WIRE_BYTES] + [(remote, m, h) for m, h in REMOTE_BYTES],
    ids=[f"wire-{type(m).__name__}" for m, _ in WIRE_BYTES] + [f"remote-{type(m).__name__}" for m, _ in REMOTE_BYTES],
)
def test_headers_are_byte_for_byte_those_of_the_hand_written_codec(module: Any, msg: Any, header: str) -> None:
    assert module.encode(msg).hex() == header
    assert module.decode(bytes.fromhex(header)) == msg


def test_every_wire_and_remote_kind_has_a_pinned_header() -> None:
    assert {type(m) for m, _ in WIRE_BYTES} == set(wire.CODEC.messages.values())
    assert {type(m) for m, _ in REMOTE_BYTES} == set(remote.CODEC.messages.values())


# ----------------------------------------------------------------- a codec of its own


class Pair(NamedTuple):
    a: int
    b: bytes


def _halve(value: int) -> int:
    if value % 2:
        raise ValueError("odd")
    return value // 2


def _checked(value: Any) -> str:
    if value == "bad":
        raise ProtocolError("a text of its own")
    return str(value).upper()


def _names_fit(msg: Any) -> None:
    if len(msg.names) > msg.count:
        raise ProtocolError(f"{len(msg.names)} names for {msg.count}")


@message
class Ping:
    KIND: ClassVar[int] = 1
    id: int = spec(Int(lo=0, hi=9))
    name: str = spec(Str(max_len=3), default="")
    tags: list[str] = spec(List(Str(), max_len=2), default_factory=list)


@message(missing="short {cls}", tail="pairs", rules=(_names_fit,))
class Pong:
    KIND: ClassVar[int] = 2
    count: int = spec(Int(), label="amount", error="{cls}: {name} is {type} {value!r}")
    names: list[str] = spec(List(Str()), default_factory=list)
    pairs: list[Pair] = spec(
        List(Struct(Pair, Int(), Bytes(sizes=(1,)), error="bad pair {value!r}")), default_factory=list
    )
    flag: bool = spec(Bool(), default=False)


@message
class Every:
    KIND: ClassVar[int] = 3
    number: float | None = spec(Optional(Number()), default=None)
    even: int | None = spec(Optional(Int(), Convert(_halve, error="{name} {value} is odd")), default=None)
    text: str = spec(Convert(_checked), default="")
    blob: bytes = spec(Bytes(sizes=(0, 2)), default=b"")
    choice: str = spec(OneOf("a", "b"), default="a")
    plain: Any = spec(Plain(depth=1), default=None)
    table: dict[str, Any] = spec(Map(Int()), default_factory=dict)
    anything: Any = spec(Anything(), default=None)
    two: int = spec(Int(lo=0), Int(hi=5, error="{name} above 5"), default=0)
    flags: list[bool] = spec(List(Bool()), default_factory=list)


@message
class Empty:
    KIND: ClassVar[int] = 4


TOY: Codec[Ping | Pong | Every | Empty] = Codec("toy", [Ping, Pong, Every, Empty])


def _decode(*raw: Any) -> Any:
    return TOY.decode(msgpack.packb(list(raw)))


def _refused(message: str, *raw: Any) -> None:
    with pytest.raises(ProtocolError, match=message):
        _decode(*raw)


@pytest.mark.parametrize(
    "msg",
    [
        Ping(0),
        Ping(9, "abc", ["x", "y"]),
        Pong(3, ["a"], [Pair(1, b"x")], True),
        Pong(0),
        Every(),
        Every(1.5, 4, "x", b"ab", "b", [None, 1, "s"], {"k": 1}, {"any": [1]}, 5, [True]),
        Empty(),
    ],
)
def test_declared_messages_round_trip(msg: Any) -> None:
    back = TOY.decode(TOY.encode(msg))
    if isinstance(msg, Every):
        msg.even = None if msg.even is None else msg.even // 2  # (decoding converts it)
        msg.text = msg.text.upper()
    assert back == msg


def test_a_header_is_the_kind_then_the_fields_in_order() -> None:
    assert msgpack.unpackb(TOY.encode(Ping(1, "ab", ["t"]))) == [1, 1, "ab", ["t"]]
    assert msgpack.unpackb(TOY.encode(Empty())) == [4]


def test_the_tail_is_sent_only_when_a_field_of_it_is_not_its_default() -> None:
    assert msgpack.unpackb(TOY.encode(Pong(3, ["a"]))) == [2, 3, ["a"]]
    assert msgpack.unpackb(TOY.encode(Pong(3, [], [], True))) == [2, 3, [], [], True]
    assert msgpack.unpackb(TOY.encode(Pong(3, [], [Pair(0, b"y")]))) == [2, 3, [], [[0, b"y"]], False]


def test_shorter_headers_take_the_defaults_and_longer_ones_lose_their_extra_fields() -> None:
    assert _decode(1, 5) == Ping(5)
    assert _decode(1, 5, "a") == Ping(5, "a")
    assert _decode(1, 5, "a", ["t"], "a newer field", {"and": 1}) == Ping(5, "a", ["t"])
    assert _decode(4, "anything") == Empty()
    assert _decode(2, 1, ["n"], [[7, b"z", "a newer field"]]) == Pong(1, ["n"], [Pair(7, b"z")])


def test_a_header_without_the_required_fields_is_refused() -> None:
    _refused(r"^malformed Ping message: missing 1 required positional argument: 'id'$", 1)
    _refused(r"^short Pong$", 2)


def test_missing_names_are_listed_as_python_lists_them() -> None:
    refusal = codec._Missing(codec.DEFAULT_MISSING, "M", ["a", "b", "c"])
    assert str(refusal(1)) == "malformed M message: missing 3 required positional arguments: 'a', 'b', and 'c'"
    assert str(refusal(2)) == "malformed M message: missing 2 required positional arguments: 'b' and 'c'"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ((1, -1), r"^malformed Ping message: field 'id' is int$"),
        ((1, 10), r"^malformed Ping message: field 'id' is int$"),
        ((1, True), r"^malformed Ping message: field 'id' is bool$"),
        ((1, 1.0), r"^malformed Ping message: field 'id' is float$"),
        ((1, 1, "abcd"), r"^malformed Ping message: field 'name' is str$"),
        ((1, 1, b"ab"), r"^malformed Ping message: field 'name' is bytes$"),
        ((1, 1, "", ["a", "b", "c"]), r"^malformed Ping message: field 'tags' is list$"),
        ((1, 1, "", ["a", 1]), r"^malformed Ping message: field 'tags' is list$"),
        ((1, 1, "", "ab"), r"^malformed Ping message: field 'tags' is str$"),
        ((2, "3"), r"^Pong: amount is str '3'$"),  # a label, and an error of the field's
        ((2, 1, ["a", "b"]), r"^2 names for 1$"),  # a rule, on a header that stops early
        ((2, 1, [], [[1]]), r"^bad pair \[1\]$"),
        ((2, 1, [], [[1, b"xy"]]), r"^bad pair \[1, b'xy'\]$"),
        ((2, 1, [], [{"a": 1}]), r"^bad pair \{'a': 1\}$"),
        ((2, 1, [], [], 1), r"^malformed Pong message: field 'flag' is int$"),
        ((3, "1"), r"^malformed Every message: field 'number' is str$"),
        ((3, True), r"^malformed Every message: field 'number' is bool$"),
        ((3, None, 3), r"^even 3 is odd$"),  # a conversion's ValueError, with the check's text
        ((3, None, 2.0), r"^malformed Every message: field 'even' is float$"),
        ((3, None, None, "bad"), r"^a text of its own$"),  # a conversion's own ProtocolError
        ((3, None, None, "", b"x"), r"^malformed Every message: field 'blob' is bytes$"),
        ((3, None, None, "", b"", "c"), r"^malformed Every message: field 'choice' is str$"),
        ((3, None, None, "", b"", "a", [[1]]), r"^malformed Every message: field 'plain' is list$"),
        ((3, None, None, "", b"", "a", {"k": 1}), r"^malformed Every message: field 'plain' is dict$"),
        ((3, None, None, "", b"", "a", None, {"k": "1"}), r"^malformed Every message: field 'table' is dict$"),
        ((3, None, None, "", b"", "a", None, [1]), r"^malformed Every message: field 'table' is list$"),
        ((3, None, None, "", b"", "a", None, {}, None, -1), r"^malformed Every message: field 'two' is int$"),
        ((3, None, None, "", b"", "a", None, {}, None, 6), r"^two above 5$"),  # the second check's text
        ((3, None, None, "", b"", "a", None, {}, None, 0, [1]), r"^malformed Every message: field 'flags' is list$"),
    ],
)
def test_each_check_refuses_with_its_text(raw: tuple[Any, ...], message: str) -> None:
    _refused(message, *raw)


def test_each_check_accepts_its_edges() -> None:
    assert _decode(1, 0, "abc", ["a", "b"]) == Ping(0, "abc", ["a", "b"])
    assert _decode(1, 9) == Ping(9)
    every = _decode(3, 7, 0, "x", b"", "b", "s", {}, [1, {"a": b""}], 5, [])
    assert every == Every(7, 0, "X", b"", "b", "s", {}, [1, {"a": b""}], 5, [])
    assert _decode(3, 2**64 - 1).number == 2**64 - 1
    assert _decode(3, None, None, "", b"", "a", [None, True, 1, 1.5, "s"]).plain == [None, True, 1, 1.5, "s"]


def test_a_refused_conversion_does_not_chain_its_value_error() -> None:
    with pytest.raises(ProtocolError) as caught:
        _decode(3, None, 3)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b"\xc1", r"^undecodable header \("),
        (msgpack.packb([1]) + b"\x00", r"^undecodable header \(ExtraData: "),
        (msgpack.packb({"a": 1}), r"^header must be an array starting with a kind"),
        (msgpack.packb([]), r"^header must be an array starting with a kind"),
        (msgpack.packb([True, 1]), r"^header must be an array starting with a kind"),  # not kind 1
        (msgpack.packb([1, {1: 2}]), r"^undecodable header \(ValueError: "),  # strict_map_key
    ],
)
def test_the_envelope_is_checked_before_any_message(header: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        TOY.decode(header)
    with pytest.raises(ProtocolError, match=message):
        codec.unpack(header)


def test_an_unknown_kind_is_refused() -> None:
    _refused(r"^unknown message kind 9$", 9)
    assert codec.unpack(msgpack.packb([9, "x"])) == [9, "x"]


def test_encode_refuses_what_is_not_one_of_its_messages() -> None:
    with pytest.raises(TypeError, match="not a message of this codec: Shutdown"):
        TOY.encode(wire.Shutdown())  # type: ignore[arg-type]


def test_the_generated_code_is_shown_in_tracebacks() -> None:
    assert "def decode_Ping(v, n):" in TOY.source and "def encode(msg):" in TOY.source
    try:
        _decode(1, "x")
    except ProtocolError:
        text = traceback.format_exc()
    assert 'File "<codec toy>"' in text and "raise refuse_Ping_id(f0) from None" in text


# ------------------------------------------------------------- bad declarations


def test_a_codec_refuses_what_is_not_a_declared_message() -> None:
    class Plain:
        KIND: ClassVar[int] = 5

    with pytest.raises(TypeError, match="Plain is not a message"):
        Codec("bad", [Plain])

    @message
    class NoKind:
        x: int = spec(Int())

    with pytest.raises(TypeError, match="NoKind is not a message"):
        Codec("bad", [NoKind])


def test_a_codec_refuses_two_messages_of_one_kind() -> None:
    @message
    class Other:
        KIND: ClassVar[int] = 1

    with pytest.raises(TypeError, match="Other and Ping are both kind 1"):
        Codec("bad", [Ping, Other])


def test_every_field_must_be_declared() -> None:
    @message
    class Half:
        KIND: ClassVar[int] = 1
        x: int = spec(Int())
        y: int = dataclasses.field(default=0)

    with pytest.raises(TypeError, match=r"Half\.y is not declared with spec\(\)"):
        Codec("bad", [Half])


def test_a_tail_must_hold_defaults() -> None:
    @message(tail="x")
    class Required:
        KIND: ClassVar[int] = 1
        x: int = spec(Int())

    with pytest.raises(TypeError, match="the tail field x has no default"):
        Codec("bad", [Required])

    @message(tail="x")
    class Full:
        KIND: ClassVar[int] = 1
        x: list[int] = spec(List(Int()), default_factory=lambda: [1])

    with pytest.raises(TypeError, match="must default to an empty collection"):
        Codec("bad", [Full])


def test_a_list_of_struct_needs_the_structs_own_error() -> None:
    @message
    class Loose:
        KIND: ClassVar[int] = 1
        x: list[Any] = spec(List(Map(error=None)), default_factory=list)  # a predicate: the field's text

    assert Codec("ok", [Loose]).decode(msgpack.packb([1, [{}]])) == Loose([{}])
    bare = Struct(Pair, Int(), Bytes(), error="x")
    bare.error = None

    @message
    class Strict:
        KIND: ClassVar[int] = 1
        x: list[Pair] = spec(List(bare), default_factory=list)

    with pytest.raises(TypeError, match="Struct inside a List needs an error of its own"):
        Codec("bad", [Strict])

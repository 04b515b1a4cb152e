"""The msgpack wire format: round trips, compatibility, and refusal of malformed headers."""

from __future__ import annotations

import math
import pickle
from typing import Any

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from libtorchrt.errors import ProtocolError
from libtorchrt.transport import wire
from libtorchrt.transport.wire import (
    ARENA,
    BLOB,
    DEVICE,
    DTYPES,
    FRAME,
    PROTOCOL_VERSION,
    Batch,
    Error,
    Export,
    Failed,
    Ready,
    Release,
    Replies,
    Request,
    Response,
    Shutdown,
    TensorDesc,
    decode,
    encode,
)

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj)


def assert_protocol_error(header: bytes | memoryview) -> None:
    with pytest.raises(ProtocolError):
        decode(header)


def decodes_or_refuses(header: bytes | memoryview) -> None:
    """The decoder's contract: a Message, or ProtocolError; never any other exception."""
    try:
        msg = decode(header)
    except ProtocolError:
        return
    assert isinstance(msg, (Ready, Failed, Request, Response, Error, Release, Shutdown, Batch, Replies))


# --------------------------------------------------------------------------- round trips

MESSAGES = [
    pytest.param(Ready(PROTOCOL_VERSION, 1234), id="ready-defaults"),
    pytest.param(
        Ready(
            PROTOCOL_VERSION,
            99,
            flags={"INFERENCE_MODE": True, "INTRA_OP_THREAD_COUNT": 4},
            inputs=["a", "b"],
            device="cpu",
            warnings=["ENABLE_NVFUSER has no effect"],
        ),
        id="ready-full",
    ),
    pytest.param(Ready(PROTOCOL_VERSION, 5, inputs=["inputs"], dict_input=True), id="ready-dict-input"),
    pytest.param(Failed(PROTOCOL_VERSION, 7, "RuntimeError", "bad model file"), id="failed-defaults"),
    pytest.param(Failed(PROTOCOL_VERSION, 7, "RuntimeError", "boom", "Traceback ...\n  line 1"), id="failed-tb"),
    pytest.param(
        Request(
            42,
            [
                TensorDesc("float32", (2, 3), FRAME, 0),
                TensorDesc("int64", (), ARENA, 4096),
                TensorDesc("bool", (0, 5), FRAME, 1),
            ],
            releases=[0, 64, 128],
        ),
        id="request-tensors-releases",
    ),
    pytest.param(
        Request(
            45,
            [
                TensorDesc("int8", (3,), BLOB, 0),
                TensorDesc("float64", (1 << 20,), ARENA, 0),
                TensorDesc("float32", (0, 2), BLOB, 1),
                TensorDesc("uint8", (70000,), FRAME, 0),
                TensorDesc("int16", (2, 2), BLOB, 2),
            ],
            releases=[64],
            blobs=[b"\x01\x02\x03", b"", bytes(range(256)) * 4],
        ),
        id="request-all-kinds-blobs",
    ),
    pytest.param(Request(0, []), id="request-empty"),
    pytest.param(
        Request(47, [TensorDesc("string", (2,), BLOB, 0), TensorDesc("float32", (1,), BLOB, 1)], [], [b"", b""]),
        id="request-string",
    ),
    pytest.param(Request(1, [], [], [b"\x00" * 70000]), id="request-big-blob"),
    pytest.param(Response(43, [TensorDesc("bfloat16", (7,), ARENA, 192)]), id="response"),
    pytest.param(
        Response(46, [TensorDesc("bool", (2,), BLOB, 1), TensorDesc("int32", (), BLOB, 0)], [b"\xff" * 4, b"\x00\x01"]),
        id="response-blobs",
    ),
    pytest.param(Response(44, []), id="response-empty"),
    pytest.param(Error(-1, "ProtocolError", "undecodable"), id="error-defaults"),
    pytest.param(Error(5, "InvalidInputError", "bad x", "tb", input_error=True), id="error-input"),
    pytest.param(Release([0, 64, 1 << 33]), id="release"),
    pytest.param(Release(), id="release-empty"),
    pytest.param(Shutdown(), id="shutdown"),
]


@pytest.mark.parametrize("msg", MESSAGES)
def test_every_message_kind_round_trips(msg: Any) -> None:
    header = encode(msg)
    assert isinstance(header, bytes)
    back = decode(header)
    assert type(back) is type(msg)
    assert back == msg


@pytest.mark.parametrize("msg", MESSAGES)
def test_decode_accepts_a_memoryview(msg: Any) -> None:
    assert decode(memoryview(encode(msg))) == msg


def test_header_is_an_array_starting_with_the_kind() -> None:
    raw = msgpack.unpackb(encode(Release([64])))
    assert raw == [Release.KIND, [64]]
    kinds = [cls.KIND for cls in (Ready, Failed, Request, Response, Error, Release, Shutdown)]
    assert len(set(kinds)) == len(kinds)


def test_request_and_response_headers_carry_blobs_last() -> None:
    desc = TensorDesc("int8", (2,), BLOB, 0)
    assert msgpack.unpackb(encode(Request(9, [desc], [64], [b"ab"]))) == [
        Request.KIND,
        9,
        [["int8", [2], BLOB, 0]],
        [64],
        [b"ab"],
    ]
    raw = msgpack.unpackb(encode(Response(9, [desc], [b"ab"])))
    assert raw == [Response.KIND, 9, [["int8", [2], BLOB, 0]], [b"ab"]]


def test_tensor_kinds_are_fixed_wire_values() -> None:
    assert (BLOB, FRAME, ARENA, DEVICE) == (0, 1, 2, 3)


def test_gpu_request_fields_round_trip() -> None:
    export = Export(3, 1, 1 << 20, bytes(range(64)), b"\x01" * 64)
    out = Export(4, 1, 1 << 16, b"\x02" * 64, b"")
    msg = Request(9, [TensorDesc("float32", (2,), DEVICE, 128)], [64], [], [export, out], 3, 4, [0, 256], [3])
    back = decode(encode(msg))
    assert back == msg
    assert isinstance(back.exports[0], Export) and back.exports[0].handle == bytes(range(64))  # type: ignore[union-attr]


def test_batch_rows_round_trip() -> None:
    msg = Request(4, [TensorDesc("float32", (2, 3), BLOB, 0), TensorDesc("float32", (1, 3), BLOB, 1)], batch=[2, 1])
    assert decode(encode(msg)) == msg


def test_cpu_request_stays_five_fields_on_the_wire() -> None:
    assert len(msgpack.unpackb(encode(Request(1, [], [8])))) == 5


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param([[[1, 0, 64, b"x" * 63, b""]], -1, -1, []], id="short-handle"),
        pytest.param([[[1, 0, 64, b"x" * 64, b"e"]], -1, -1, []], id="short-event"),
        pytest.param([[[-1, 0, 64, b"x" * 64, b""]], -1, -1, []], id="negative-id"),
        pytest.param([[["1", 0, 64, b"x" * 64, b""]], -1, -1, []], id="string-id"),
        pytest.param([[[1, 0, 64]], -1, -1, []], id="short-export"),
        pytest.param(["exports"], id="exports-not-array"),
        pytest.param([[], -2, -1, []], id="device-in-below-minus-one"),
        pytest.param([[], -1, True, []], id="device-out-bool"),
        pytest.param([[], -1, -1, [-8]], id="negative-device-release"),
        pytest.param([[], -1, -1, [], [-1]], id="negative-device-id"),
        pytest.param([[], -1, -1, [], "3"], id="device-ids-not-array"),
        pytest.param([[], -1, -1, [], [], [2, 0]], id="batch-of-zero-rows"),
        pytest.param([[], -1, -1, [], [], [-1]], id="batch-negative-rows"),
        pytest.param([[], -1, -1, [], [], [1] * 4097], id="batch-too-long"),
        pytest.param([[[1, 0, 64, "x" * 64, b""]], -1, -1, []], id="handle-str"),
        pytest.param([[[1, 0, 64, b"x" * 64, "e" * 64]], -1, -1, []], id="event-str"),
        pytest.param([{}], id="exports-map"),
        pytest.param([5], id="exports-int"),
        pytest.param([[[1, 0, 64, b"x" * 64, b""]] * 4097], id="exports-too-long"),
    ],
)
def test_malformed_gpu_request_fields_raise_protocol_error(tail: list[Any]) -> None:
    with pytest.raises(ProtocolError):
        decode(pack([Request.KIND, 1, [], [], [], *tail]))


@pytest.mark.parametrize("kind", [BLOB, FRAME, ARENA, DEVICE])
def test_request_tensor_descriptors_keep_their_fields(kind: int) -> None:
    desc = TensorDesc("complex128", (3, 1, 2), kind, 640)
    (back,) = decode(encode(Request(1, [desc]))).tensors  # type: ignore[union-attr]
    assert back == desc
    assert back.shape == (3, 1, 2) and isinstance(back.shape, tuple)
    assert type(back.kind) is int and back.kind == kind and back.where == 640


@pytest.mark.parametrize("cls", [Request, Response])
def test_blobs_decode_as_bytes(cls: type) -> None:
    blobs = [b"", b"\x00", bytes(range(256)), b"\xff" * 70000]
    msg = cls(3, [], blobs=blobs)
    back = decode(encode(msg))
    assert back == msg
    assert all(type(b) is bytes for b in back.blobs)  # type: ignore[union-attr]


# ------------------------------------------------------------------- compatibility


@pytest.mark.parametrize(
    "header, expected",
    [
        (
            [Ready.KIND, 1, 10, {}, ["x"], "cpu", [], True, "aoti", ["RESULT"], [1, 8], {}, "new", 3],
            Ready(1, 10, {}, ["x"], "cpu", [], True, "aoti", ["RESULT"], [1, 8]),
        ),
        ([Failed.KIND, 1, 10, "E", "m", "tb", {"new": 1}], Failed(1, 10, "E", "m", "tb")),
        (
            [Request.KIND, 5, [], [64], [b"x"], [], -1, -1, [], [], [], [], [], [], "priority", 9],
            Request(5, [], [64], [b"x"]),
        ),
        ([Response.KIND, 6, [], [b"y"], 2, ["future"]], Response(6, [], [b"y"], 2)),
        ([Error.KIND, 7, "E", "m", "", True, False, 2, 123], Error(7, "E", "m", "", True, False, 2)),
        ([Release.KIND, [0], None], Release([0])),
        ([Shutdown.KIND, "grace", 5.0], Shutdown()),
    ],
    ids=["ready", "failed", "request", "response", "error", "release", "shutdown"],
)
def test_header_from_a_newer_peer_with_extra_trailing_fields_decodes(header: list[Any], expected: Any) -> None:
    assert decode(pack(header)) == expected


def test_tensor_descriptor_with_extra_trailing_fields_decodes() -> None:
    msg = decode(pack([Request.KIND, 1, [["int8", [2], FRAME, 0, "layout", 1]]]))
    assert msg == Request(1, [TensorDesc("int8", (2,), FRAME, 0)])


@pytest.mark.parametrize(
    "header, expected",
    [
        ([Ready.KIND, 1, 10], Ready(1, 10, {}, [], "cpu", [])),
        ([Failed.KIND, 1, 10, "E", "m"], Failed(1, 10, "E", "m", "")),
        ([Request.KIND, 5, []], Request(5, [], [], [])),
        ([Request.KIND, 5, [], [64]], Request(5, [], [64], [])),
        ([Response.KIND, 6, [["int8", [2], ARENA, 0]]], Response(6, [TensorDesc("int8", (2,), ARENA, 0)], [])),
        ([Error.KIND, 7, "E", "m"], Error(7, "E", "m", "", False)),
        ([Release.KIND], Release([])),
        ([Shutdown.KIND], Shutdown()),
    ],
    ids=["ready", "failed", "request", "request-no-blobs", "response", "error", "release", "shutdown"],
)
def test_shorter_header_from_an_older_peer_takes_the_defaults(header: list[Any], expected: Any) -> None:
    assert decode(pack(header)) == expected


# --------------------------------------------------------------------- TensorDesc


@pytest.mark.parametrize("name", sorted(DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (5,), (3, 0), (4, 7), (2, 3, 4)])
def test_tensor_desc_nbytes_matches_torch(name: str, shape: tuple[int, ...]) -> None:
    t = torch.empty(shape, dtype=DTYPES[name])
    assert TensorDesc(name, shape, BLOB, 0).nbytes == t.numel() * t.element_size()
    assert TensorDesc(name, shape, ARENA, 0).nbytes == math.prod(shape) * t.element_size()


def test_dtype_names_cover_dtypes_both_ways() -> None:
    for name, dtype in DTYPES.items():
        assert wire.dtype_name(dtype) == name
    with pytest.raises(KeyError):
        wire.dtype_name(torch.quint8)


# ----------------------------------------------------------------- malformed input

GOOD_DESC = ["float32", [2, 2], FRAME, 0]


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xc1", id="reserved-byte"),
        pytest.param(b"\x93\x01", id="truncated-array"),
        pytest.param(b"\xff\xfe\xfd garbage \x00\x01", id="garbage"),
        pytest.param(pack([Shutdown.KIND]) + b"\x00", id="trailing-bytes"),
        pytest.param(pack(7), id="not-an-array-int"),
        pytest.param(pack({"kind": 3}), id="not-an-array-map"),
        pytest.param(pack("Shutdown"), id="not-an-array-str"),
        pytest.param(pack(None), id="nil"),
        pytest.param(pack([]), id="empty-array"),
        pytest.param(pack([0]), id="kind-0"),
        pytest.param(pack([10]), id="kind-10"),
        pytest.param(pack([-1]), id="kind-negative"),
        pytest.param(pack(["3", 1, []]), id="kind-str"),
        pytest.param(pack([True]), id="kind-bool"),
        pytest.param(pack([3.0, 1, []]), id="kind-float"),
        pytest.param(pack({1: 2}), id="map-with-int-keys"),
    ],
)
def test_malformed_envelope_raises_protocol_error(header: bytes) -> None:
    assert_protocol_error(header)


@pytest.mark.parametrize(
    "header",
    [
        pytest.param([Ready.KIND], id="ready-missing-fields"),
        pytest.param([Ready.KIND, "1", 10], id="ready-protocol-str"),
        pytest.param([Ready.KIND, 1, 10, [], [], "cpu"], id="ready-flags-not-map"),
        pytest.param([Ready.KIND, 1, 10, {}, "x"], id="ready-inputs-not-array"),
        pytest.param([Ready.KIND, 1, 10, {}, [], 0], id="ready-device-int"),
        pytest.param([Ready.KIND, 1, 10, {}, [], "cpu", [], 1], id="ready-dict-input-int"),
        pytest.param([Ready.KIND, 1, 10, {}, [], "cpu", [], "true"], id="ready-dict-input-str"),
        pytest.param([Failed.KIND, 1, 10, "E"], id="failed-missing-message"),
        pytest.param([Failed.KIND, 1, 10, "E", None], id="failed-message-nil"),
        pytest.param([Error.KIND, "7", "E", "m"], id="error-id-str"),
        pytest.param([Error.KIND, 7, "E", "m", "", 1], id="error-input-flag-int"),
        pytest.param([Release.KIND, 0], id="release-not-array"),
        pytest.param([Release.KIND, [-64]], id="release-negative"),
        pytest.param([Release.KIND, ["0"]], id="release-str"),
        pytest.param([Release.KIND, [True]], id="release-bool"),
        pytest.param([Release.KIND, [1.5]], id="release-float"),
        pytest.param([Request.KIND], id="request-no-id"),
        pytest.param([Request.KIND, 1], id="request-no-tensors"),
        pytest.param([Request.KIND, "1", []], id="request-id-str"),
        pytest.param([Request.KIND, True, []], id="request-id-bool"),
        pytest.param([Request.KIND, 1, {}], id="request-tensors-map"),
        pytest.param([Request.KIND, 1, [], 64], id="request-releases-not-array"),
        pytest.param([Request.KIND, 1, [], [-1]], id="request-release-negative"),
        pytest.param([Request.KIND, 1, [], [False]], id="request-release-bool"),
        pytest.param([Response.KIND, 1.0, []], id="response-id-float"),
        pytest.param([Response.KIND, 1], id="response-no-tensors"),
        pytest.param([Response.KIND, 1, [GOOD_DESC] * 4097], id="too-many-tensors"),
    ],
)
def test_malformed_fields_raise_protocol_error(header: list[Any]) -> None:
    assert_protocol_error(pack(header))


@pytest.mark.parametrize(
    "desc",
    [
        pytest.param("float32", id="not-an-array"),
        pytest.param(["float32", [2], FRAME], id="three-elements"),
        pytest.param(["float99", [2], FRAME, 0], id="unknown-dtype"),
        pytest.param(["quint8", [2], FRAME, 0], id="quantized-dtype"),
        pytest.param(["FLOAT32", [2], FRAME, 0], id="dtype-wrong-case"),
        pytest.param([b"float32", [2], FRAME, 0], id="dtype-bytes"),
        pytest.param([None, [2], FRAME, 0], id="dtype-nil"),
        pytest.param([11, [2], FRAME, 0], id="dtype-int"),
        pytest.param(["float32", 2, FRAME, 0], id="shape-not-array"),
        pytest.param(["float32", [2, -1], FRAME, 0], id="negative-dim"),
        pytest.param(["float32", [2.0], FRAME, 0], id="float-dim"),
        pytest.param(["float32", ["2"], FRAME, 0], id="str-dim"),
        pytest.param(["float32", [True], FRAME, 0], id="bool-dim"),
        pytest.param(["float32", [2**40], FRAME, 0], id="huge-dim"),
        pytest.param(["float32", [1] * 33, FRAME, 0], id="33-dims"),
        pytest.param(["float32", [2], 4, 0], id="kind-4"),
        pytest.param(["float32", [2], -1, 0], id="kind-negative"),
        pytest.param(["float32", [2], 2**32, 0], id="kind-huge"),
        pytest.param(["float32", [2], True, 0], id="kind-true"),
        pytest.param(["float32", [2], False, 0], id="kind-false"),
        pytest.param(["float32", [2], "x", 0], id="kind-str"),
        pytest.param(["float32", [2], "0", 0], id="kind-digit-str"),
        pytest.param(["float32", [2], b"\x00", 0], id="kind-bytes"),
        pytest.param(["float32", [2], 1.0, 0], id="kind-float"),
        pytest.param(["float32", [2], None, 0], id="kind-nil"),
        pytest.param(["float32", [2], [0], 0], id="kind-array"),
        pytest.param(["float32", [2], ARENA, -64], id="negative-offset"),
        pytest.param(["float32", [2], FRAME, -1], id="negative-frame"),
        pytest.param(["float32", [2], BLOB, -1], id="negative-blob"),
        pytest.param(["float32", [2], ARENA, 1.0], id="float-offset"),
        pytest.param(["float32", [2], ARENA, True], id="bool-offset"),
        pytest.param(["float32", [2], ARENA, "0"], id="str-offset"),
        pytest.param(["string", [2], ARENA, 0], id="string-in-arena"),
        pytest.param(["string", [2], FRAME, 0], id="string-as-frame"),
        pytest.param(["string", [2], DEVICE, 0], id="string-on-device"),
        pytest.param(["string", [], BLOB, 0], id="string-scalar"),
        pytest.param(["string", [2, 1], BLOB, 0], id="string-2d"),
        pytest.param(["String", [2], BLOB, 0], id="string-wrong-case"),
        pytest.param(["bytes", [2], BLOB, 0], id="string-as-bytes"),
    ],
)
@pytest.mark.parametrize("kind", [Request.KIND, Response.KIND])
def test_malformed_tensor_descriptor_raises_protocol_error(kind: int, desc: Any) -> None:
    assert_protocol_error(pack([kind, 1, [GOOD_DESC, desc]]))


@pytest.mark.parametrize(
    "blobs",
    [
        pytest.param(b"ab", id="binary"),
        pytest.param("ab", id="str"),
        pytest.param(0, id="int"),
        pytest.param(None, id="nil"),
        pytest.param({"0": b"ab"}, id="map"),
        pytest.param(["ab"], id="array-of-str"),
        pytest.param([1], id="array-of-int"),
        pytest.param([b"ab", "cd"], id="array-binary-then-str"),
        pytest.param([b"ab", 7], id="array-binary-then-int"),
        pytest.param([None], id="array-of-nil"),
        pytest.param([True], id="array-of-bool"),
        pytest.param([[b"ab"]], id="nested-array"),
    ],
)
@pytest.mark.parametrize("kind", [Request.KIND, Response.KIND])
def test_malformed_blobs_raise_protocol_error(kind: int, blobs: Any) -> None:
    header = [kind, 1, [["int8", [2], BLOB, 0]]] + ([[]] if kind == Request.KIND else []) + [blobs]
    assert_protocol_error(pack(header))


def test_32_dims_are_accepted_and_33_refused() -> None:
    ok = decode(pack([Request.KIND, 1, [["uint8", [1] * 32, FRAME, 0]]]))
    assert ok.tensors[0].shape == (1,) * 32  # type: ignore[union-attr]
    assert_protocol_error(pack([Request.KIND, 1, [["uint8", [1] * 33, FRAME, 0]]]))


def test_4096_tensors_are_accepted() -> None:
    msg = decode(pack([Response.KIND, 1, [GOOD_DESC] * 4096]))
    assert len(msg.tensors) == 4096  # type: ignore[union-attr]


# Regression: `dtype not in _ITEMSIZE` on an array/map dtype used to raise TypeError.
@pytest.mark.parametrize("dtype", [["float32"], {"x": 1}], ids=["array", "map"])
def test_unhashable_dtype_in_descriptor_raises_protocol_error(dtype: Any) -> None:
    assert_protocol_error(pack([Request.KIND, 1, [[dtype, [2], FRAME, 0]]]))


@pytest.mark.parametrize(
    "header",
    [
        [Ready.KIND, True, 10],
        [Ready.KIND, 1, False],
        [Failed.KIND, True, 10, "E", "m"],
        [Error.KIND, True, "E", "m"],
    ],
    ids=["ready-protocol", "ready-pid", "failed-protocol", "error-id"],
)
def test_bool_where_int_expected_raises_protocol_error(header: list[Any]) -> None:
    assert_protocol_error(pack(header))


@pytest.mark.parametrize(
    "header",
    [[Ready.KIND, 1, 10, {}, [1, None]], [Ready.KIND, 1, 10, {}, [], "cpu", [{"a": 1}]]],
    ids=["inputs", "warnings"],
)
def test_ready_lists_of_non_strings_raise_protocol_error(header: list[Any]) -> None:
    assert_protocol_error(pack(header))


class _Detonator:
    """Unpickling this calls _record_unpickle: proof that something unpickled."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (_record_unpickle, ())


_UNPICKLED: list[bool] = []


def _record_unpickle() -> None:
    _UNPICKLED.append(True)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize(
    "payload",
    [[Shutdown.KIND], [Release.KIND, [64]], {"kind": 7}, _Detonator()],
    ids=["shutdown-list", "release-list", "dict", "reduce"],
)
def test_decode_never_unpickles(payload: Any, protocol: int) -> None:
    _UNPICKLED.clear()
    data = pickle.dumps(payload, protocol=protocol)
    with pytest.raises(ProtocolError):
        decode(data)
    assert not _UNPICKLED


# ---------------------------------------------------------------------- properties


@FAST
@given(st.binary(max_size=256))
@example(b"")
@example(b"\x91\x07")  # [7]: a valid Shutdown
@example(b"\x93\x03\x01\x91\x94\xa7float32\x91\x02\x01\x00")  # a valid Request
@example(b"\x95\x03\x01\x91\x94\xa4int8\x91\x02\x00\x00\x90\x91\xc4\x02ab")  # one with a blob
def test_random_bytes_decode_or_raise_protocol_error(data: bytes) -> None:
    decodes_or_refuses(data)


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=12)
    | st.binary(max_size=12)
    | st.sampled_from(sorted(DTYPES))
)
_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
_descriptor_like = st.lists(_values, max_size=3).flatmap(
    lambda tail: st.tuples(
        st.sampled_from(sorted(DTYPES)) | _scalars,
        st.lists(st.integers(-2, 2**41), max_size=34) | _values,
        st.sampled_from([BLOB, FRAME, ARENA]) | st.integers(-2, 5) | st.booleans() | _scalars,
        st.integers(-5, 2**40) | _scalars,
    ).map(lambda head: [*head, *tail])
)
# Headers that start with a real kind, so the field checks themselves are exercised.
_blobs_like = st.lists(st.binary(max_size=8) | _scalars, max_size=3)
_near_valid = st.tuples(
    st.integers(min_value=0, max_value=8),
    st.lists(_values | st.lists(_descriptor_like, max_size=3) | _blobs_like, max_size=8),
).map(lambda kv: [kv[0], *kv[1]])


@settings(FAST, max_examples=120)
@given(_values | _near_valid)
@example([Response.KIND, 1, [[[1], [2], FRAME, 0]]])  # unhashable dtype (a fixed bug)
@example([Request.KIND, 1, [[{"a": 1}, [2], FRAME, 0]]])
@example([Request.KIND, 1, [["int8", [2], BLOB, 0]], [], [b"ab", "cd"]])
@example([Response.KIND, 1, [["int8", [2], BLOB, 0]], [b"ab", [b"cd"]]])
def test_random_msgpack_structures_decode_or_raise_protocol_error(raw: Any) -> None:
    decodes_or_refuses(pack(raw))


_descs = st.lists(
    st.builds(
        TensorDesc,
        st.sampled_from(sorted(DTYPES)),
        st.lists(st.integers(0, 2**20), max_size=5).map(tuple),
        st.sampled_from([BLOB, FRAME, ARENA]),
        st.integers(0, 2**40),
    ),
    max_size=5,
)
_blob_lists = st.lists(st.binary(max_size=64), max_size=4)
_valid_messages = (
    st.sampled_from([p.values[0] for p in MESSAGES])
    | st.builds(
        Request,
        st.integers(0, 2**63 - 1),
        _descs,
        st.lists(st.integers(0, 2**40), max_size=5),
        _blob_lists,
    )
    | st.builds(Response, st.integers(-(2**63), 2**63 - 1), _descs, _blob_lists)
)


@FAST
@given(_valid_messages, st.data())
def test_truncated_valid_headers_decode_or_raise_protocol_error(msg: Any, data: st.DataObject) -> None:
    header = encode(msg)
    cut = data.draw(st.integers(min_value=0, max_value=len(header) - 1), label="cut")
    decodes_or_refuses(header[:cut])


@FAST
@given(_valid_messages)
def test_generated_requests_round_trip(msg: Any) -> None:
    assert decode(encode(msg)) == msg


# -------------------------------------------------------------------- string tensors

STRING_LISTS = [
    pytest.param([], id="empty-list"),
    pytest.param([""], id="one-empty-string"),
    pytest.param(["", "", ""], id="empty-strings"),
    pytest.param(["hello", "world"], id="ascii"),
    pytest.param(["straße", "日本語", "emoji 🙂", "\u200b"], id="non-ascii"),
    pytest.param(["a\x00b", "\x00", "\n\r\t"], id="control-characters"),
    pytest.param(["x" * 70_000, ""], id="longer-than-the-inline-threshold"),
]


@pytest.mark.parametrize("values", STRING_LISTS)
def test_strings_round_trip(values: list[str]) -> None:
    blob = wire.encode_strings([v.encode() for v in values])
    assert wire.decode_strings(blob, len(values)) == values


def test_strings_are_tritons_bytes_serialization() -> None:
    # Each element: a 4-byte little-endian length, then its UTF-8 bytes.
    assert (
        wire.encode_strings([b"ab", b"", "é".encode()]) == b"\x02\x00\x00\x00ab\x00\x00\x00\x00\x02\x00\x00\x00\xc3\xa9"
    )
    assert wire.encode_strings([]) == b""
    assert wire.encode_strings([b"x" * 256]) == b"\x00\x01\x00\x00" + b"x" * 256


def test_a_string_descriptor_round_trips_as_a_one_dimensional_blob() -> None:
    msg = Response(3, [TensorDesc("string", (0,), BLOB, 0)], [b""])
    assert decode(encode(msg)) == msg
    assert wire.STRING == "string" and "string" not in DTYPES


OK_BLOB = b"\x01\x00\x00\x00a"


@pytest.mark.parametrize(
    "blob, count",
    [
        pytest.param(b"", 1, id="no-bytes-for-one-string"),
        pytest.param(b"\x01\x00\x00", 1, id="truncated-length"),
        pytest.param(b"\x02\x00\x00\x00a", 1, id="element-one-byte-short"),
        pytest.param(b"\xff\xff\xff\xffa", 1, id="element-claims-4-gib"),
        pytest.param(OK_BLOB + b"\x00", 1, id="one-byte-left-over"),
        pytest.param(OK_BLOB + b"\x00\x00\x00\x00", 1, id="one-element-more-than-declared"),
        pytest.param(OK_BLOB, 2, id="one-element-fewer-than-declared"),
        pytest.param(OK_BLOB, 0, id="elements-for-an-empty-list"),
        pytest.param(OK_BLOB, 2**40 - 1, id="huge-count"),
        pytest.param(b"\x00" * 16, 5, id="count-beyond-the-blob"),
        pytest.param(b"\x01\x00\x00\x00\xff", 1, id="invalid-utf8"),
        pytest.param(b"\x02\x00\x00\x00\xc0\x80", 1, id="overlong-utf8-nul"),
        pytest.param(b"\x03\x00\x00\x00\xed\xa0\x80", 1, id="utf8-encoded-surrogate"),
        pytest.param(b"\x01\x00\x00\x00\xc3", 1, id="truncated-utf8-sequence"),
        pytest.param(b"\x04\x00\x00\x00\xf4\x90\x80\x80", 1, id="beyond-u10ffff"),
    ],
)
def test_malformed_string_blobs_raise_protocol_error(blob: bytes, count: int) -> None:
    with pytest.raises(ProtocolError):
        wire.decode_strings(blob, count)


def test_an_element_of_4_gib_cannot_be_encoded() -> None:
    class Huge(bytes):
        def __len__(self) -> int:
            return 2**32

    with pytest.raises(ValueError, match="4 GiB"):
        wire.encode_strings([Huge(b"x")])


@FAST
@given(st.lists(st.text(max_size=20), max_size=20))
def test_generated_strings_round_trip(values: list[str]) -> None:
    blob = wire.encode_strings([v.encode() for v in values])
    assert wire.decode_strings(blob, len(values)) == values
    assert len(blob) == sum(4 + len(v.encode()) for v in values)


@FAST
@given(st.binary(max_size=64), st.integers(0, 2**40))
@example(b"\x00\x00\x00\x00", 1)
@example(b"\x01\x00\x00\x00\x80", 1)
def test_random_string_blobs_decode_or_raise_protocol_error(blob: bytes, count: int) -> None:
    try:
        values = wire.decode_strings(blob, count)
    except ProtocolError:
        return
    assert len(values) == count and all(type(v) is str for v in values)
    assert wire.encode_strings([v.encode() for v in values]) == blob, "a blob decodes only if it is exact"


@FAST
@given(st.lists(st.text(max_size=8), min_size=1, max_size=8), st.data())
def test_damaged_string_blobs_decode_or_raise_protocol_error(values: list[str], data: st.DataObject) -> None:
    blob = bytearray(wire.encode_strings([v.encode() for v in values]))
    how = data.draw(st.sampled_from(["cut", "extend", "flip", "count"]), label="how")
    count = len(values)
    if how == "cut":
        del blob[data.draw(st.integers(0, len(blob) - 1), label="at") :]
    elif how == "extend":
        blob += data.draw(st.binary(min_size=1, max_size=8), label="extra")
    elif how == "flip":
        i = data.draw(st.integers(0, len(blob) - 1), label="at")
        blob[i] ^= data.draw(st.integers(1, 255), label="bits")
    else:
        count += data.draw(st.sampled_from([-1, 1, 2**31]), label="delta")
    try:
        out = wire.decode_strings(bytes(blob), count)
    except ProtocolError:
        return
    assert how == "flip" and len(out) == count  # a flipped byte may still spell valid strings


# ------------------------------------------- boundaries and refusal messages
# (added by the mutation pass, see docs/measurements/mutation.md)

_EXPORT = Export(3, 1, 1 << 20, bytes(range(64)), b"\x01" * 64)


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"device_in": 0}, id="device-in-0"),
        pytest.param({"device_out": 0}, id="device-out-0"),
        pytest.param({"exports": [_EXPORT]}, id="exports"),
        pytest.param({"exports": [Export(0, 0, 0, b"\x00" * 64, b"")]}, id="export-of-zeros"),
        pytest.param({"device_releases": [0]}, id="device-releases"),
        pytest.param({"device_ids": [0]}, id="device-ids"),
        pytest.param({"batch": [1]}, id="batch"),
        pytest.param({"sequence": [0, 3], "corrids": ["s"]}, id="sequence"),
        pytest.param({"forget": [7]}, id="forget"),
    ],
)
def test_each_gpu_or_batch_field_alone_survives_the_round_trip(fields: dict[str, Any]) -> None:
    # Buffer id 0 and export 0 are real buffers: encode must not take them for "none".
    msg = Request(8, [TensorDesc("float32", (2,), DEVICE, 0)], **fields)
    assert decode(encode(msg)) == msg
    assert len(msgpack.unpackb(encode(msg))) == 14


@pytest.mark.parametrize(
    "header, expected",
    [
        ([Request.KIND, 1, [], [], [], []], Request(1, [])),
        ([Request.KIND, 1, [], [], [], [], 2], Request(1, [], device_in=2)),
        ([Request.KIND, 1, [], [], [], [], 2, 0], Request(1, [], device_in=2, device_out=0)),
    ],
    ids=["exports-only", "device-in-only", "device-in-and-out"],
)
def test_gpu_request_missing_device_fields_takes_the_defaults(header: list[Any], expected: Request) -> None:
    assert decode(pack(header)) == expected


def test_4096_exports_and_4096_batch_entries_are_accepted() -> None:
    exports = [[i, 0, 64, b"x" * 64, b""] for i in range(4096)]
    msg = decode(pack([Request.KIND, 1, [], [], [], exports, -1, -1, [], [], [1] * 4096]))
    assert isinstance(msg, Request)
    assert len(msg.exports) == 4096 and len(msg.batch) == 4096


def test_a_map_with_integer_keys_is_refused_anywhere_in_a_header() -> None:
    # strict_map_key: msgpack then refuses non-string keys (and the hash flooding they allow)
    with pytest.raises(ProtocolError, match="strict_map_key"):
        decode(pack([Ready.KIND, 1, 10, {1: True}]))


@pytest.mark.parametrize(
    "header, message",
    [
        (b"", r"^undecodable header \(ValueError: Unpack failed: incomplete input\)$"),
        (pack([Shutdown.KIND]) + b"\x00", r"^undecodable header \(ExtraData: "),
        (pack(7), r"^header must be an array starting with a kind, got 7$"),
        (pack([99]), r"^unknown message kind 99$"),
        (pack([Ready.KIND]), r"^malformed Ready message: .*missing 2 required positional arguments"),
        (pack([Ready.KIND, "1", 10]), r"^malformed Ready message: field 'protocol' is str$"),
        (pack([Failed.KIND, 1, 10, "E", None]), r"^malformed Failed message: field 'message' is NoneType$"),
        (pack([Release.KIND, [-64]]), r"^malformed Release message: offsets must be non-negative integers$"),
        (pack([Request.KIND]), r"^malformed Request message$"),
        (pack([Response.KIND, 1]), r"^malformed Response message$"),
        (pack([Response.KIND, 1, {}]), r"^tensor list must be an array of at most 4096$"),
        (pack([Request.KIND, 1, [], 64]), r"^malformed Request message: releases must be offsets$"),
        (pack([Request.KIND, 1, [], [], "ab"]), r"^malformed message: blobs must be an array of binary strings$"),
        (pack([Request.KIND, 1, [], [], [], "x"]), r"^malformed Request message: exports must be an array$"),
        (pack([Request.KIND, 1, [], [], [], [[1, 0, 64]]]), r"^malformed device buffer export \[1, 0, 64\]$"),
        (
            pack([Request.KIND, 1, [], [], [], [], -2]),
            r"^malformed Request message: device_in must be a buffer id or -1$",
        ),
        (
            pack([Request.KIND, 1, [], [], [], [], -1, -2]),
            r"^malformed Request message: device_out must be a buffer id or -1$",
        ),
        (
            pack([Request.KIND, 1, [], [], [], [], -1, -1, [-8]]),
            r"^malformed Request message: device_releases must be offsets$",
        ),
        (
            pack([Request.KIND, 1, [], [], [], [], -1, -1, [], [-1]]),
            r"^malformed Request message: device_ids must be offsets$",
        ),
        (pack([Request.KIND, 1, [], [], [], [], -1, -1, [], [], [-1]]), r"^malformed Request message: batch must be"),
        (
            pack([Request.KIND, 1, [], [], [], [], -1, -1, [], [], [0]]),
            r"^malformed Request message: batch must list at most 4096 positive row counts$",
        ),
        (pack([Request.KIND, 1, ["float32"]]), r"^tensor descriptor must be a 4-element array, got 'float32'$"),
        (pack([Request.KIND, 1, [["float99", [2], FRAME, 0]]]), r"^unknown dtype 'float99' in tensor descriptor$"),
        (pack([Request.KIND, 1, [["float32", [2, -1], FRAME, 0]]]), r"^bad shape \[2, -1\] in tensor descriptor$"),
        (pack([Request.KIND, 1, [["float32", [2], 4, 0]]]), r"^bad location 4/0 in tensor descriptor$"),
        (
            pack([Request.KIND, 1, [["string", [2], ARENA, 0]]]),
            r"^a string tensor must be a 1-D blob, got shape \[2\] of kind 2$",
        ),
    ],
)
def test_refusals_say_what_is_wrong(header: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode(header)


@pytest.mark.parametrize(
    "blob, count, message",
    [
        (b"", 1, r"^a blob of 0 bytes cannot hold 1 strings$"),
        (OK_BLOB + b"\x01\x00\x00", 2, r"^string blob ends inside the length of element 1 of 2$"),
        (b"\x0a\x00\x00\x00ab", 1, r"^element 0 of a string blob claims 10 bytes; 2 are left$"),
        (b"\x01\x00\x00\x00\xff", 1, r"^element 0 of a string blob is not UTF-8: invalid start byte at byte 0$"),
        (OK_BLOB + b"\x00", 1, r"^1 bytes left over after the 1 elements of a string blob$"),
    ],
)
def test_string_blob_refusals_say_what_is_wrong(blob: bytes, count: int, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        wire.decode_strings(blob, count)


def test_an_element_of_4_gib_minus_1_can_be_encoded() -> None:
    class Largest(bytes):
        def __len__(self) -> int:
            return 0xFFFFFFFF

    assert wire.encode_strings([Largest(b"")]) == b"\xff\xff\xff\xff"


@pytest.mark.parametrize(
    "header, expected",
    [
        pytest.param(pack([Request.KIND, 7, "not tensors"]), 7, id="refused-request"),
        pytest.param(pack([Request.KIND, 0]), 0, id="id-0"),
        pytest.param(pack([Request.KIND, 2**63 - 1, [], 5]), 2**63 - 1, id="largest-id"),
        pytest.param(pack([Request.KIND]), -1, id="no-id"),
        pytest.param(pack([Request.KIND, -5, []]), -1, id="negative-id"),
        pytest.param(pack([Request.KIND, "7", []]), -1, id="str-id"),
        pytest.param(pack([Request.KIND, 7.5, []]), -1, id="float-id"),
        pytest.param(pack([Request.KIND, True, []]), -1, id="bool-id"),
        pytest.param(pack([Response.KIND, 7, []]), -1, id="response"),
        pytest.param(pack([float(Request.KIND), 7, []]), -1, id="kind-float"),
        pytest.param(pack([str(Request.KIND), 7, []]), -1, id="kind-str"),
        pytest.param(pack(7), -1, id="not-an-array-int"),
        pytest.param(pack("37"), -1, id="not-an-array-str"),
        pytest.param(pack({"3": 7}), -1, id="not-an-array-map"),
        pytest.param(b"\xc1", -1, id="undecodable"),
        pytest.param(b"", -1, id="empty"),
        # read exactly as strictly as decode() reads it
        pytest.param(pack([Request.KIND, 7, {1: 2}]), -1, id="int-map-key"),
        pytest.param(b"\x93\x03\x07\xa1\xff", -1, id="str-not-utf8"),
    ],
)
def test_request_id_reads_the_id_of_a_refused_request(header: bytes, expected: int) -> None:
    assert wire.request_id(header) == expected
    assert wire.request_id(memoryview(header)) == expected

"""The remote client's wire format (``transport.remote``), errors and snapshots as plain
data (``_plain``) and the shared-memory hand-off (``transport.fdpass``): no processes."""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import socket
import tempfile
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libtorchrt import errors
from libtorchrt._plain import (
    error_from_plain,
    error_to_plain,
    health_from_plain,
    health_to_plain,
    statuses_from_plain,
    statuses_to_plain,
)
from libtorchrt.deadlines import MAX_TIMEOUT_S
from libtorchrt.errors import ProtocolError, TorchRTError
from libtorchrt.info import InstanceHealth, ModelHealth, ModelStatus
from libtorchrt.transport import fdpass, remote
from libtorchrt.transport.wire import ARENA, BLOB, FRAME, TensorDesc

MESSAGES: list[remote.Message] = [
    remote.Hello(remote.PROTOCOL_VERSION, 123, "boot", True),
    remote.Welcome(remote.PROTOCOL_VERSION, b"token", "/tmp/x/shm.sock", 1 << 20, "0.1.0"),
    remote.Infer(
        7,
        "tiny",
        2,
        1.5,
        ["a", "b"],
        [TensorDesc("float32", (2, 3), BLOB, 0), TensorDesc("string", (2,), BLOB, 1)],
        [b"x" * 24, b"\x01\x00\x00\x00a\x00\x00\x00\x00"],
        [64, 128],
    ),
    remote.Infer(8, "tiny", None, None, None, [TensorDesc("int64", (1 << 20,), ARENA, 4096)], [], [], True),
    remote.Result(7, ["OUTPUT__0"], [TensorDesc("bfloat16", (4, 4), FRAME, 0)]),
    remote.Failure(7, "InvalidInputError", "bad", {"model": "m", "input": None, "known": ["a", "b"]}, ""),
    remote.Failure(-1, "ProtocolError", "undecodable"),
    remote.Release([0, 64]),
    remote.Cancel(3),
    remote.Query(4, "health"),
    remote.Answer(4, {"tiny": {"state": "ready"}}),
    remote.Bye(),
    remote.Attach(remote.PROTOCOL_VERSION, b"token", 1 << 20),
    remote.Attached(1 << 20),
    remote.Refused("unknown session token"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: remote.Message) -> None:
    assert remote.decode(remote.encode(msg)) == msg


def test_fields_appended_by_a_newer_peer_are_ignored() -> None:
    raw = msgpack.unpackb(remote.encode(MESSAGES[3]))
    assert remote.decode(msgpack.packb([*raw, "a new field", {"and": "another"}])) == MESSAGES[3]


def test_an_older_peers_shorter_message_takes_the_defaults() -> None:
    msg = remote.decode(msgpack.packb([remote.Infer.KIND, 1, "tiny", None, None, None, []]))
    assert isinstance(msg, remote.Infer) and msg.blobs == [] and msg.releases == [] and msg.single is False


def test_the_handshakes_protocol_is_read_whatever_follows() -> None:
    future_hello = msgpack.packb([remote.Hello.KIND, 99, {"a": "map"}, [1, 2, 3]])
    assert remote.peek_protocol(future_hello) == (remote.Hello.KIND, 99)
    assert remote.peek_protocol(remote.encode(MESSAGES[2])) == (remote.Infer.KIND, None)
    with pytest.raises(ProtocolError):
        remote.peek_protocol(msgpack.packb([remote.Welcome.KIND, "1"]))


BAD: list[Any] = [
    b"",
    b"\xc1",
    msgpack.packb({"kind": 3}),
    msgpack.packb([]),
    msgpack.packb([1.5]),
    msgpack.packb([999]),
    msgpack.packb([remote.Hello.KIND, True]),
    msgpack.packb([remote.Hello.KIND, 1, 1, "x" * 100]),
    msgpack.packb([remote.Welcome.KIND, 1, "not bytes"]),
    msgpack.packb([remote.Infer.KIND, -1, "m", None, None, None, []]),
    msgpack.packb([remote.Infer.KIND, True, "m", None, None, None, []]),
    msgpack.packb([remote.Infer.KIND, 1, 5, None, None, None, []]),
    msgpack.packb([remote.Infer.KIND, 1, "m" * 2000, None, None, None, []]),
    msgpack.packb([remote.Infer.KIND, 1, "m", -1, None, None, []]),
    msgpack.packb([remote.Infer.KIND, 1, "m", None, float("nan"), None, []]),
    msgpack.packb([remote.Infer.KIND, 1, "m", None, -1.0, None, []]),
    msgpack.packb([remote.Infer.KIND, 1, "m", None, None, [1], [["float32", [1], BLOB, 0]]]),
    msgpack.packb([remote.Infer.KIND, 1, "m", None, None, ["a", "b"], [["float32", [1], BLOB, 0]]]),
    msgpack.packb([remote.Infer.KIND, 1, "m", None, None, None, [["float32", [1], 3, 0]]]),  # DEVICE
    msgpack.packb([remote.Infer.KIND, 1, "m", None, None, None, [["float32", [-1], BLOB, 0]]]),
    msgpack.packb([remote.Infer.KIND, 1, "m", None, None, None, [["float32", [1] * 33, BLOB, 0]]]),
    msgpack.packb([remote.Infer.KIND, 1, "m", None, None, None, [["qint8", [1], BLOB, 0]]]),
    msgpack.packb([remote.Infer.KIND, 1, "m", None, None, None, [["string", [1, 2], BLOB, 0]]]),
    msgpack.packb([remote.Infer.KIND, 1, "m", None, None, None, [["string", [1], ARENA, 0]]]),
    msgpack.packb([remote.Infer.KIND, 1, "m", None, None, None, [["float32", [1], BLOB]]]),
    msgpack.packb([remote.Infer.KIND, 1, "m", None, None, None, [[]] * 5000]),
    msgpack.packb([remote.Infer.KIND, 1, "m", None, None, None, [], ["not bytes"]]),
    msgpack.packb([remote.Infer.KIND, 1, "m", None, None, None, [], [], [-1]]),
    msgpack.packb([remote.Infer.KIND, 1, "m", None, None, None, [], [], [], True]),  # single, no tensor
    msgpack.packb([remote.Infer.KIND, 1, "m", None, None, None, [], [], [], 1]),
    msgpack.packb([remote.Result.KIND, 1, ["a"], []]),
    msgpack.packb([remote.Failure.KIND, 1, "E", "m", {"f": {"nested": "map"}}]),
    msgpack.packb([remote.Failure.KIND, 1, "E", "m", {"f": [[[["deep"]]]]}]),
    msgpack.packb([remote.Failure.KIND, -2, "E", "m"]),
    msgpack.packb([remote.Release.KIND, [1.5]]),
    msgpack.packb([remote.Release.KIND, list(range(70_000))]),
    msgpack.packb([remote.Query.KIND, 1, "workers"]),
    msgpack.packb([remote.Attach.KIND, 1, b"t", 0]),
    msgpack.packb([remote.Attached.KIND, "big"]),
    msgpack.packb([remote.Refused.KIND, 5]),
    remote.encode(MESSAGES[2])[:-3],  # truncated
]


@pytest.mark.parametrize("header", BAD)
def test_malformed_headers_are_protocol_errors(header: bytes) -> None:
    with pytest.raises(ProtocolError):
        remote.decode(header)


plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(kind=st.integers(0, 14), fields=st.lists(plain, max_size=10))
def test_decode_raises_only_protocol_errors(kind: int, fields: list[Any]) -> None:
    try:
        remote.decode(msgpack.packb([kind, *fields]))
    except ProtocolError:
        pass


def _infer_with_timeout(timeout: Any) -> bytes:
    return msgpack.packb([remote.Infer.KIND, 1, "m", None, timeout, None, []])


@pytest.mark.parametrize(
    ("timeout", "expected"),
    [(0, 0.0), (5, 5.0), (1.5, 1.5), (1e300, MAX_TIMEOUT_S), (math.inf, MAX_TIMEOUT_S), (2**64 - 1, MAX_TIMEOUT_S)],
)
def test_a_far_timeout_is_capped_as_a_callers_would_be(timeout: Any, expected: float) -> None:
    msg = remote.decode(_infer_with_timeout(timeout))
    assert isinstance(msg, remote.Infer) and msg.timeout == expected and type(msg.timeout) is float


@pytest.mark.parametrize("timeout", [math.nan, -1.0, -(2**63), "5", True, [1], {"s": 1}, b"5"])
def test_a_timeout_that_is_not_one_is_a_protocol_error(timeout: Any) -> None:
    with pytest.raises(ProtocolError, match="timeout"):
        remote.decode(_infer_with_timeout(timeout))


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (_infer_with_timeout(math.nan), 1),
        (msgpack.packb([remote.Query.KIND, 7, "secrets"]), 7),
        (msgpack.packb([remote.Cancel.KIND, 2**63 - 1, "extra"]), 2**63 - 1),
        (msgpack.packb([remote.Infer.KIND, -5, "m"]), -1),
        (msgpack.packb([remote.Infer.KIND, True, "m"]), -1),
        (msgpack.packb([remote.Infer.KIND, 2**64 - 1, "m"]), 2**64 - 1),
        (msgpack.packb([remote.Infer.KIND]), -1),
        (msgpack.packb([remote.Release.KIND, 3]), -1),
        (msgpack.packb([remote.Hello.KIND, 1]), -1),
        (b"\xc1garbage", -1),
        (b"", -1),
    ],
)
def test_request_id_names_the_request_of_a_header_that_does_not_decode(header: bytes, expected: int) -> None:
    assert remote.request_id(header) == expected


def test_payload_bytes_counts_tensors_and_string_blobs() -> None:
    descs = [TensorDesc("float32", (10, 10), ARENA, 0), TensorDesc("string", (2,), BLOB, 0)]
    assert remote.payload_bytes(descs, [b"123456789012"]) == 400 + 12


# ── errors and snapshots as plain data ────────────────────────────────────────

ERRORS: list[BaseException] = [
    errors.UnknownModelError("m", ["a", "b"], version=3, versions=[1, 2]),
    errors.UnknownModelError("m", ["a"]),
    errors.InvalidInputError("m", "x", "dtype float32", "dtype int64"),
    errors.ModelError("m", "RuntimeError", "boom\nat line 2", "Traceback (most recent call last): ..."),
    errors.WorkerDiedError("m", 1, 4242, -9, "segfault", poison=True),
    errors.ModelUnavailableError("m", "bad file", loaded=False),
    errors.WorkerStartError("m", 0, "no such file", "tail"),
    errors.ConfigError("bad key", model="m", key="k"),
    errors.ProtocolError("garbage"),
    errors.PoolClosedError("the pool is closed"),
    errors.TimeoutError("late"),
    errors.ServerConnectionError("gone", endpoint="tcp://h:1"),
    ValueError("plain"),
    KeyError("key"),
]


@pytest.mark.parametrize("exc", ERRORS, ids=lambda e: type(e).__name__)
def test_errors_cross_as_themselves(exc: BaseException) -> None:
    error_type, message, fields, tb = error_to_plain(exc)
    assert tb == ""
    # through msgpack, as on the wire
    back = error_from_plain(*msgpack.unpackb(msgpack.packb([error_type, message, fields, tb])))
    assert type(back) is type(exc)
    assert str(back) == str(exc)
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in vars(exc).items()} == vars(back)


def test_other_errors_cross_as_text_with_the_servers_traceback() -> None:
    try:
        raise RuntimeError("unexpected")
    except RuntimeError as e:
        plain = error_to_plain(e)
    back = error_from_plain(*plain)
    assert type(back) is TorchRTError
    assert "RuntimeError: unexpected" in str(back) and "Server traceback" in str(back)


def test_an_error_type_name_is_never_imported() -> None:
    back = error_from_plain("os.system", "x", {"__class__": "evil"}, "")
    assert type(back) is TorchRTError
    back = error_from_plain("ModelError", "x", {"_private": 1, "model": "m"}, "")
    assert not hasattr(back, "_private") and back.model == "m"  # type: ignore[attr-defined]


def test_snapshots_round_trip() -> None:
    statuses = [ModelStatus("a", 1, "ready", None, 1, 1), ModelStatus("b", None, "failed", "bad", 0, 2)]
    raw = msgpack.unpackb(msgpack.packb(statuses_to_plain(statuses)))
    assert statuses_from_plain(raw) == statuses
    health = {
        "a": ModelHealth(
            "a", "ready", 1, (InstanceHealth(0, 12, "ready"), InstanceHealth(1, None, "restarting", 2, "x"))
        ),
    }
    raw = msgpack.unpackb(msgpack.packb(health_to_plain(health)))
    assert health_from_plain(raw) == health
    raw["a"]["a field from the future"] = 1
    assert health_from_plain(raw) == health


@pytest.mark.parametrize("raw", [None, {"a": 1}, [1], [{"name": "a"}]])
def test_malformed_statuses(raw: Any) -> None:
    with pytest.raises(ProtocolError):
        statuses_from_plain(raw)


def test_unknown_status_fields_are_dropped() -> None:
    (status,) = statuses_from_plain([{"name": "a", "version": 1, "state": "x", "from the future": 1}])
    assert status == ModelStatus("a", 1, "x")


@pytest.mark.parametrize("raw", [None, [1], {"a": 1}, {"a": {"instances": "x"}}, {"a": {"instances": [{}]}}])
def test_malformed_health(raw: Any) -> None:
    with pytest.raises(ProtocolError):
        health_from_plain(raw)


# ── the shared-memory hand-off ────────────────────────────────────────────────


def _fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def test_a_sealed_arena_crosses_a_unix_socket() -> None:
    before = _fds()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    arena = fdpass.sealed_arena(100_000, "libtorchrt-test")
    assert arena.size % mmap.PAGESIZE == 0 and arena.fd is not None
    arena.bytes[:5] = list(b"hello")
    fdpass.send_message(a, b"payload", [arena.fd])
    payload, fds = fdpass.recv_message(b)
    assert payload == b"payload" and len(fds) == 1
    mapped = fdpass.take_arena(fds[0], arena.size, 1 << 30)
    assert mapped.fd is None  # closed once mapped
    assert bytes(mapped.bytes[:5]) == b"hello"
    mapped.bytes[5] = ord("!")
    assert arena.bytes[5] == ord("!")  # the same memory
    a.close()
    assert fdpass.recv_message(b) == (b"", [])  # end-of-file: the peer is gone
    b.close()
    arena.close()
    mapped.close()
    assert _fds() == before


def _memfd(size: int, seals: int = 0, sealing: bool = True) -> int:
    import fcntl

    fd = os.memfd_create("libtorchrt-test", os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealing else 0))
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def test_take_arena_refuses_what_could_be_shrunk_or_lies_about_its_size() -> None:
    import fcntl

    before = _fds()
    page = mmap.PAGESIZE
    sealed = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
    with pytest.raises(ValueError, match="not sealed"):
        fdpass.take_arena(_memfd(page), page, 1 << 30)
    with pytest.raises(ValueError, match="not sealed"):  # it can never be sealed
        fdpass.take_arena(_memfd(page, sealing=False), page, 1 << 30)
    with pytest.raises(ValueError, match="announced"):
        fdpass.take_arena(_memfd(page, sealed), 2 * page, 1 << 30)
    with pytest.raises(ValueError, match="at most"):
        fdpass.take_arena(_memfd(4 * page, sealed), 4 * page, page)
    with tempfile.TemporaryFile() as f:
        f.truncate(page)
        with pytest.raises(ValueError):
            fdpass.take_arena(os.dup(f.fileno()), page, 1 << 30)
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(ValueError, match="not a memfd"):
        fdpass.take_arena(r, page, 1 << 30)
    assert _fds() == before


def test_recv_message_refuses_extra_descriptors_and_closes_them() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    before = _fds()
    r, w = os.pipe()
    fdpass.send_message(a, b"x", [r, w, r])
    os.close(r)
    os.close(w)
    with pytest.raises(ValueError, match="too many descriptors"):
        fdpass.recv_message(b, maxfds=1)
    assert _fds() == before
    a.sendall(b"y" * (fdpass.MAX_MESSAGE + 1))
    with pytest.raises(ValueError, match="too long"):
        fdpass.recv_message(b)
    a.close()
    b.close()


# ── every field check of decode(), one at a time (the mutation pass found them untested) ──

_HELLO, _WELCOME, _INFER, _INFER_SINGLE, _RESULT, _FAILURE = MESSAGES[:6]
_RELEASE, _CANCEL, _QUERY, _ANSWER = MESSAGES[7], MESSAGES[8], MESSAGES[9], MESSAGES[10]
_ATTACH, _ATTACHED, _REFUSED = MESSAGES[12], MESSAGES[13], MESSAGES[14]
_LONG = "n" * (remote._MAX_NAME + 1)


def _with(msg: remote.Message, **fields: Any) -> bytes:
    """``msg`` with some fields replaced, encoded as a peer would send it (unchecked)."""
    return remote.encode(dataclasses.replace(msg, **fields))


@pytest.mark.parametrize(
    "header, field",
    [
        (_with(_HELLO, protocol="1"), "protocol"),
        (_with(_HELLO, pid=True), "protocol"),
        (_with(_HELLO, boot_id=7), "boot_id"),
        (_with(_HELLO, boot_id="b" * 65), "boot_id"),
        (_with(_HELLO, shared_memory=1), "shared_memory"),
        (_with(_WELCOME, protocol=1.0), "protocol"),
        (_with(_WELCOME, session="token"), "session"),
        (_with(_WELCOME, shm_path=b"/x"), "shm_path"),
        (_with(_WELCOME, max_request_bytes=None), "max_request_bytes"),
        (_with(_WELCOME, server=1), "server"),
        (_with(_INFER, id=-1), "id"),
        (_with(_INFER, id=True), "id"),
        (_with(_INFER, model=b"tiny"), "model"),
        (_with(_INFER, model=_LONG), "model"),
        (_with(_INFER, version=-1), "version"),
        (_with(_INFER, version="2"), "version"),
        (_with(_INFER, timeout="1"), "timeout"),
        (_with(_INFER, names="ab"), "names"),
        (_with(_INFER, names=["a", 1]), "names"),
        (_with(_INFER, names=["a", _LONG]), "names"),
        (_with(_INFER, blobs=[b"x", "y"]), "blobs"),
        (_with(_INFER, blobs=b"x"), "blobs"),
        (_with(_INFER, releases=[-64]), "releases"),
        (_with(_INFER, releases=[1.0]), "releases"),
        (_with(_INFER, releases=[0] * (remote._MAX_RELEASES + 1)), "releases"),
        (_with(_INFER, single=1), "single"),
        (_with(_INFER, single=True), "single"),  # a single tensor, but with names
        (_with(_INFER_SINGLE, single=True, tensors=[]), "single"),
        (_with(_INFER, priority=-1), "priority"),
        (_with(_INFER, priority=2**31), "priority"),
        (_with(_INFER, priority=True), "priority"),
        (_with(_RESULT, id=-1), "id"),
        (_with(_RESULT, names=None), "names"),
        (_with(_RESULT, blobs=None), "blobs"),
        (_with(_FAILURE, id=-2), "id"),
        (_with(_FAILURE, id="7"), "id"),
        (_with(_FAILURE, error_type=None), "error_type"),
        (_with(_FAILURE, message=b"bad"), "message"),
        (_with(_FAILURE, traceback=None), "traceback"),
        (_with(_FAILURE, fields=[]), "fields"),
        (_with(_FAILURE, fields={"k": b"x"}), "fields"),
        (_with(_RELEASE, offsets=[-1]), "offsets"),
        (_with(_CANCEL, id=-1), "id"),
        (_with(_QUERY, id=None), "id"),
        (_with(_QUERY, what="stats"), "what"),
        (_with(_ANSWER, id=-5), "id"),
        (_with(_ATTACH, protocol="1"), "size"),
        (_with(_ATTACH, session="token"), "size"),
        (_with(_ATTACH, size=0), "size"),
        (_with(_ATTACH, size=True), "size"),
        (_with(_ATTACHED, size=0), "size"),
        (_with(_ATTACHED, size=1.0), "size"),
        (_with(_REFUSED, message=None), "message"),
    ],
)
def test_each_field_is_checked(header: bytes, field: str) -> None:
    with pytest.raises(ProtocolError, match=f"bad '{field}'"):
        remote.decode(header)


@pytest.mark.parametrize(
    "msg",
    [
        dataclasses.replace(_HELLO, boot_id="b" * 64),
        dataclasses.replace(_INFER, id=0, version=0, priority=0, model="m" * remote._MAX_NAME),
        dataclasses.replace(_INFER, priority=2**31 - 1, releases=[0] * remote._MAX_RELEASES),
        dataclasses.replace(_INFER_SINGLE, single=True),
        dataclasses.replace(_FAILURE, id=-1),
        dataclasses.replace(_ATTACH, size=1),
        dataclasses.replace(_ATTACHED, size=1),
        dataclasses.replace(_QUERY, what="models"),
    ],
    ids=[
        "boot_id-64",
        "zeros-and-longest-name",
        "highest-priority",
        "single",
        "failure-id--1",
        "attach-1",
        "attached-1",
        "query-models",
    ],
)
def test_the_edges_of_each_field_are_accepted(msg: remote.Message) -> None:
    assert remote.decode(remote.encode(msg)) == msg


def test_names_and_tensors_must_pair_up() -> None:
    with pytest.raises(ProtocolError, match="malformed Infer message: 1 names for 2 tensors"):
        remote.decode(_with(_INFER, names=["a"]))
    with pytest.raises(ProtocolError, match="malformed Result message: 2 names for 1 tensors"):
        remote.decode(_with(_RESULT, names=["a", "b"]))


# ── exact refusals and the edges of every bound (the mutation pass's survivors) ──


@pytest.mark.parametrize(
    "header, message",
    [
        (b"\xc1", r"^undecodable header \(\w+Error: "),  # (msgpack's exception, by name)
        (msgpack.packb([1]) + b"\x00", r"^undecodable header \(ExtraData: "),
        (msgpack.packb({"a": 1}), r"^header must be an array starting with a kind, got \{'a': 1\}$"),
        (msgpack.packb([99]), r"^unknown message kind 99$"),
        (msgpack.packb([remote.Cancel.KIND]), r"^malformed Cancel message: .+"),
        (
            msgpack.packb([remote.Infer.KIND, 1, "m", None, None, None, {"a": 1}]),
            r"^tensor list must be an array of at most 4096$",
        ),
        (_with(_INFER, id=True), r"^malformed Infer message: bad 'id' \(bool\)$"),
        (_with(_RESULT, names=None), r"^malformed Result message: bad 'names' \(NoneType\)$"),
    ],
)
def test_a_refusal_says_what_was_wrong(header: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        remote.decode(header)


def _infer_desc(desc: list[Any]) -> bytes:
    return msgpack.packb([remote.Infer.KIND, 1, "m", None, None, None, [desc], [b"\x00" * 4]])


@pytest.mark.parametrize(
    "desc, message",
    [
        (["float32", [1]], r"^tensor descriptor must be a 4-element array, got \['float32', \[1\]\]$"),
        (["float128", [1], BLOB, 0], r"^unknown dtype 'float128' in tensor descriptor$"),
        (["float32", [1] * 33, BLOB, 0], r"^bad shape \[1, 1, 1, [1, ]+ in tensor descriptor$"),
        (["float32", [2**40], BLOB, 0], r"^bad shape \[1099511627776\] in tensor descriptor$"),
        (["float32", [-1], BLOB, 0], r"^bad shape \[-1\] in tensor descriptor$"),
        (["float32", [1], 7, 0], r"^bad location 7/0 in tensor descriptor$"),
        (["float32", [1], BLOB, -1], r"^bad location 0/-1 in tensor descriptor$"),
        (["float32", [1], BLOB, "0"], r"^bad location 0/'0' in tensor descriptor$"),
        (["string", [1, 1], BLOB, 0], r"^a string tensor must be a 1-D blob, got shape \[1, 1\] of kind 0$"),
    ],
)
def test_a_bad_descriptor_says_what_was_wrong(desc: list[Any], message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        remote.decode(_infer_desc(desc))


@pytest.mark.parametrize(
    "desc",
    [
        ["float32", [1] * 32, BLOB, 0],
        ["float32", [0], BLOB, 0],
        ["float32", [0, 2**40 - 1], BLOB, 0],
        ["float32", [1], ARENA, 0],
    ],
    ids=["32-dims", "size-0", "largest-size", "where-0"],
)
def test_the_edges_of_a_descriptor_are_accepted(desc: list[Any]) -> None:
    (got,) = remote.decode(_infer_desc(desc)).tensors  # type: ignore[union-attr]
    assert got == TensorDesc(desc[0], tuple(desc[1]), desc[2], desc[3])


def test_the_edges_of_the_lists_are_accepted() -> None:
    n = remote._MAX_TENSORS
    descs = [TensorDesc("float32", (1,), ARENA, 64 * i) for i in range(n)]
    names = ["n" * remote._MAX_NAME] + [f"t{i}" for i in range(n - 1)]
    msg = remote.Infer(1, "m", None, None, names, descs)
    assert remote.decode(remote.encode(msg)) == msg
    too_many = dataclasses.replace(msg, names=[*names, "x"], tensors=[*descs, descs[0]])
    with pytest.raises(ProtocolError):
        remote.decode(remote.encode(too_many))
    with pytest.raises(ProtocolError, match="bad 'names'"):
        remote.decode(remote.encode(dataclasses.replace(msg, names=["n" * (remote._MAX_NAME + 1), *names[1:]])))


def test_failure_fields_take_lists_two_deep() -> None:
    ok = dataclasses.replace(_FAILURE, fields={"known": [["a", 1], [None]]})
    assert remote.decode(remote.encode(ok)) == ok
    with pytest.raises(ProtocolError, match="bad 'fields'"):
        remote.decode(remote.encode(dataclasses.replace(_FAILURE, fields={"known": [[["a"]]]})))


def test_handshake_and_request_ids_are_read_at_their_edges() -> None:
    assert remote.peek_protocol(msgpack.packb([remote.Hello.KIND, 3])) == (remote.Hello.KIND, 3)
    with pytest.raises(ProtocolError, match=r"^handshake message without a protocol version$"):
        remote.peek_protocol(msgpack.packb([remote.Hello.KIND]))
    assert remote.request_id(msgpack.packb([remote.Infer.KIND, 0])) == 0
    assert remote.request_id(msgpack.packb([remote.Cancel.KIND, 5])) == 5


def test_payload_bytes_counts_each_tensor_once() -> None:
    descs = [TensorDesc("float32", (2, 3), ARENA, 0), TensorDesc("int64", (4,), BLOB, 0)]
    assert remote.payload_bytes(descs, []) == 24 + 32
    strings = [TensorDesc("string", (2,), BLOB, 0), TensorDesc("string", (1,), BLOB, 5)]
    assert remote.payload_bytes(strings, [b"\x00" * 9]) == 9  # a blob it does not have counts 0
    assert remote.payload_bytes([TensorDesc("string", (1,), BLOB, 1)], [b"\x00" * 9]) == 0  # just past the end


def test_a_map_with_a_non_string_key_is_refused_anywhere() -> None:
    # msgpack's strict_map_key: an int key could collide with what a peer reads as a name
    with pytest.raises(ProtocolError, match=r"^undecodable header \(ValueError: "):
        remote.decode(msgpack.packb([remote.Answer.KIND, 4, {1: "x"}]))


def test_boot_id_is_the_kernels() -> None:
    with open("/proc/sys/kernel/random/boot_id") as f:
        assert remote.boot_id() == f.read().strip() != ""

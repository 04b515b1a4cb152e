"""The remote client's wire format (``transport.remote``), errors and snapshots as plain
data (``_plain``) and the shared-memory hand-off (``transport.fdpass``): no processes."""

from __future__ import annotations

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

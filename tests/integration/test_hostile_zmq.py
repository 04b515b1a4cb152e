"""Hostile peers against a real ``libtorchrt-pool --zmq`` server process.

One server process serves the module, on an ``ipc://`` endpoint, with
``--max-request-bytes 1MiB`` and its temporary directory (``TMPDIR``) in the test's own
directory, so that its private directories can be watched. It is started the hard way:
a first server on the same endpoint is SIGKILLed, and the module's server must clean up
after it (its workers die with it; its private directories and socket file go).

The attacks talk to it with raw ZeroMQ sockets and Unix sockets, or with a real
``Client`` given absurd arguments. After each one, a fresh ``Client`` must get a correct
answer. The last tests check that the attacks left nothing behind in the server
(descriptors and resident memory back near the baseline taken after warm-up) and that
stopping it leaves no child process and no file.

Two failure paths cannot be reached by a peer once the bugs that led there are fixed
(an unexpected exception in the client's or the frontend's I/O thread): they are
reached by handing that thread an item it cannot handle, in this process.

Every wait is bounded: replies by the sockets' receive timeout, states by a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
import zmq

from libtorchrt import ConfigError, InvalidInputError, Pool, PoolClosedError
from libtorchrt.client import Client
from libtorchrt.deadlines import MAX_TIMEOUT_S
from libtorchrt.errors import ServerConnectionError
from libtorchrt.server.zmq_frontend import ZmqFrontend
from libtorchrt.transport import fdpass, remote
from libtorchrt.transport.wire import BLOB, FRAME
from tests import models
from tests.server_util import IDENTITY_CONFIG, ServerProcess, alive

pytestmark = pytest.mark.timeout(300)

MB = 1 << 20
#: the server's --max-request-bytes
LIMIT = MB
#: every reply is awaited this long at most (a server that does not answer has hung)
ANSWER_MS = 20_000
START_TIMEOUT = 180.0
#: how far the server's resident memory may be above its baseline after the attacks
RSS_SLACK = 100 * MB

SPIN_CONFIG = """
name: "spin"
platform: "pytorch_libtorch"
max_batch_size: 0
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""


def _repository(directory: Path, *, spin: bool = True) -> Path:
    """A repository of ``identity`` (and ``spin``), one instance each."""
    repo = directory / "repo"
    for name, config in (("identity", IDENTITY_CONFIG), ("spin", SPIN_CONFIG))[: 2 if spin else 1]:
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(config)
        models.save(name, repo / name / "1").rename(repo / name / "1" / "model.pt")
    return repo


def _wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)


def _memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid``, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _settled_fds(pid: int, timeout: float = 5.0) -> int:
    """The descriptor count of ``pid`` once it stops changing (sessions that just
    ended are released by the server's thread a moment later)."""
    deadline = time.monotonic() + timeout
    readings = [_fds(pid)]
    while len(readings) < 3 or len(set(readings[-3:])) > 1:
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
        readings.append(_fds(pid))
    return min(readings[-3:])


def _inode(path: Path) -> tuple[int, int]:
    """Which file is at ``path`` (tmpfs reuses inode numbers at once: with its ctime)."""
    st = path.lstat()
    return st.st_ino, st.st_ctime_ns


@dataclass
class Served:
    """The module's server and what its SIGKILLed predecessor left."""

    proc: ServerProcess
    endpoint: str
    socket_path: Path
    tmpdir: Path
    repo: Path
    dead_pid: int
    dead_workers: set[int]
    dead_dirs: set[str]
    dead_inode: tuple[int, int]
    baseline: dict[str, int] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.proc.pid

    def private_dirs(self) -> set[str]:
        return {name for name in os.listdir(self.tmpdir) if name.startswith("libtorchrt-")}


def _start(repo: Path, endpoint: str, tmpdir: Path) -> ServerProcess:
    return ServerProcess(
        "--model-repository", str(repo), "--http", "off", "--metrics", "off", "--zmq", endpoint,
        "--max-request-bytes", str(LIMIT), "--grace", "5",
        env={"TMPDIR": str(tmpdir)},
    )  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("hostile")
    repo = _repository(base)
    tmpdir = base / "tmp"
    tmpdir.mkdir()
    socket_path = base / "zmq" / "pool.sock"
    endpoint = f"ipc://{socket_path}"
    # The predecessor: SIGKILLed, it leaves its socket file and private directories.
    dead = _start(repo, endpoint, tmpdir)
    proc: ServerProcess | None = None
    try:
        dead.wait_for(r"libtorchrt-pool \S+ ready", START_TIMEOUT)
        dead_workers = dead.workers()
        dead_dirs = {name for name in os.listdir(tmpdir) if name.startswith("libtorchrt-")}
        assert dead_workers and dead_dirs, dead.output
        dead_inode = _inode(socket_path)
        assert dead.stop(signal.SIGKILL) == -signal.SIGKILL
        # Its workers remove the router's directory as they exit (they see the front
        # gone); the frontend's directory and its ipc:// socket file stay behind.
        _wait_until(lambda: not any(alive(pid) for pid in dead_workers), 30, "the dead server's workers to exit")
        dead_dirs = {d for d in dead_dirs if (tmpdir / d).exists()}
        assert socket_path.exists() and dead_dirs, "the SIGKILLed server left nothing to clean: the test proves nothing"
        proc = _start(repo, endpoint, tmpdir)
        proc.wait_for(r"libtorchrt-pool \S+ ready", START_TIMEOUT)
        served = Served(proc, endpoint, socket_path, tmpdir, repo, dead.proc.pid, dead_workers, dead_dirs, dead_inode)
        _assert_serves(served)  # warm up: the first session, the pool's first request
        served.baseline = {"fds": _settled_fds(served.pid), **_memory(served.pid)}
        yield served
    finally:
        dead.kill()
        if proc is not None:
            proc.kill()


def _assert_serves(server: Served) -> None:
    """A fresh Client gets a correct answer (shared memory and frames)."""
    x = torch.arange(100_000, dtype=torch.float32)  # above the inline threshold
    for shared_memory in (None, False):
        with Client(server.endpoint, connect_timeout=20, timeout=30, shared_memory=shared_memory) as client:
            assert torch.equal(client.infer("identity", x)["OUTPUT__0"], x)


class Peer:
    """A raw DEALER socket speaking the wire by hand: the hostile client."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context(1)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.rcvtimeo = ANSWER_MS
        self.sock.sndtimeo = ANSWER_MS
        self.sock.connect(endpoint)

    def hello(self, shared_memory: bool = False) -> remote.Welcome:
        boot = remote.boot_id() if shared_memory else "another host"
        welcome = self.ask(remote.encode(remote.Hello(remote.PROTOCOL_VERSION, os.getpid(), boot, shared_memory)))
        assert isinstance(welcome, remote.Welcome) and welcome.session
        return welcome

    def ask(self, *frames: Any) -> remote.Message:
        """Send one message; return the server's answer."""
        self.sock.send_multipart(frames, copy=False)
        return self.answer()

    def answer(self) -> remote.Message:
        return remote.decode(self.sock.recv())

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.sock.send(remote.encode(remote.Bye()), zmq.NOBLOCK)
        self.sock.close()
        self.ctx.term()


@contextlib.contextmanager
def peer(server: Served) -> Iterator[Peer]:
    p = Peer(server.endpoint)
    try:
        yield p
    finally:
        p.close()


def _infer_header(request_id: int, timeout: Any = None, tensors: list[Any] | None = None, blobs: Any = None) -> bytes:
    """An INFER header for ``identity``, by hand (any field may be hostile)."""
    if tensors is None:
        tensors, blobs = [["float32", [4], BLOB, 0]], [np.arange(4, dtype=np.float32).tobytes()]
    return msgpack.packb([remote.Infer.KIND, request_id, "identity", None, timeout, None, tensors, blobs or []])


def _failure(msg: remote.Message, request_id: int, error_type: str | tuple[str, ...]) -> remote.Failure:
    assert isinstance(msg, remote.Failure), msg
    types = (error_type,) if isinstance(error_type, str) else error_type
    assert msg.id == request_id and msg.error_type in types, msg
    return msg


# ── leftovers of a dead server, and a live one's endpoint ─────────────────────────


def test_a_sigkilled_servers_leftovers_are_removed_by_the_next(server: Served) -> None:
    # its workers die with it (PR_SET_PDEATHSIG, and the watch pipe)
    _wait_until(lambda: not any(alive(pid) for pid in server.dead_workers), 30, "the dead server's workers exit")
    # its private directories (the pool's ipc sockets, the frontend's shm.sock) are gone
    assert not server.dead_dirs & server.private_dirs()
    assert server.private_dirs(), "the live server has its own"
    # its socket file was replaced by the live server's, whose lock names it
    assert _inode(server.socket_path) != server.dead_inode
    lock = Path(f"{server.socket_path}.lock")
    assert lock.read_text().split() == [str(server.pid)]
    _assert_serves(server)


# ── far, NaN and hostile deadlines ─────────────────────────────────────────────


def test_hostile_timeouts_on_the_wire_are_answered_and_capped(server: Served) -> None:
    with peer(server) as p:
        p.hello()
        # refused, answered as the request they name
        for request_id, timeout in ((11, math.nan), (12, -1.0), (13, "soon"), (14, [1]), (15, -(2**63))):
            failure = _failure(p.ask(_infer_header(request_id, timeout)), request_id, "ProtocolError")
            assert "timeout" in failure.message
        # far ones are capped (30 days) and served
        for request_id, timeout in ((21, 1e300), (22, math.inf), (23, 2**64 - 1), (24, 3e6)):
            result = p.ask(_infer_header(request_id, timeout))
            assert isinstance(result, remote.Result) and result.id == request_id, result
    _assert_serves(server)


def test_a_client_with_far_deadlines_keeps_serving(server: Served) -> None:
    x = torch.arange(16, dtype=torch.float32)
    with Client(server.endpoint, timeout=3e6, connect_timeout=20) as client:
        assert client.timeout == MAX_TIMEOUT_S
        assert torch.equal(client.infer("identity", x)["OUTPUT__0"], x)
        for timeout in (3e6, math.inf, 1e300, 2**70):
            assert torch.equal(client.infer("identity", x, timeout=timeout)["OUTPUT__0"], x)
            assert torch.equal(client.submit("identity", x, timeout=timeout).result(30)["OUTPUT__0"], x)
        out = asyncio.run(asyncio.wait_for(client.infer_async("identity", x, timeout=math.inf), 30))
        assert torch.equal(out["OUTPUT__0"], x)
        assert client.models(timeout=math.inf)
        # the I/O thread lives, and answered requests leave no timer behind
        connection = client._connection
        assert connection.alive
        _wait_until(lambda: not connection.requests.timers, 10, "the answered requests' timers are dropped")
        assert torch.equal(client.infer("identity", x, timeout=5)["OUTPUT__0"], x)
        # a deadline that is not one is the caller's error, raised before anything is sent
        for bad in (math.nan, -1, "10", True, [1]):
            with pytest.raises(InvalidInputError, match="timeout") as refused:
                client.infer("identity", x, timeout=bad)
            assert refused.value.model == "identity"
            with pytest.raises(InvalidInputError, match="timeout"):
                client.submit("identity", x, timeout=bad)
            with pytest.raises(ConfigError, match="timeout"):
                client.health(timeout=bad)
        assert connection.alive and torch.equal(client.infer("identity", x)["OUTPUT__0"], x)
    for bad in (math.nan, -1.0, "1"):
        with pytest.raises(ConfigError, match="timeout"):
            Client(server.endpoint, timeout=bad)
    with pytest.raises(ConfigError, match="connect_timeout"):
        Client(server.endpoint, connect_timeout=0)
    with Client(server.endpoint, timeout=math.inf, connect_timeout=math.inf) as client:
        assert torch.equal(client.infer("identity", x)["OUTPUT__0"], x)
        with pytest.raises(ConfigError, match="grace"):
            client.close(grace=math.nan)
        client.close(grace=1e300)  # capped: returns as soon as nothing is in flight
    _assert_serves(server)


class _Unhandled:
    """Not a request: the client's I/O thread cannot handle it (a stand-in for a bug)."""


def test_a_failed_client_io_thread_fails_every_caller_at_once(server: Served, caplog: pytest.LogCaptureFixture) -> None:
    with Client(server.endpoint, connect_timeout=20) as client:
        connection = client._connection
        running = client.submit("spin", torch.tensor([2_000_000.0]))  # ~3 s of work
        _wait_until(lambda: bool(connection.requests.pending), 10, "the request is sent")
        with caplog.at_level(logging.CRITICAL, logger="libtorchrt.client"):
            connection.submit(_Unhandled())  # type: ignore[arg-type]
            # the request in flight fails now, naming why, not at its deadline
            with pytest.raises(ServerConnectionError, match="I/O thread failed") as failed:
                running.result(10)
            assert isinstance(failed.value.__cause__, AttributeError)
            _wait_until(lambda: not connection.alive, 10, "the I/O thread ends")
        assert any(r.levelno == logging.CRITICAL and "I/O thread failed" in r.getMessage() for r in caplog.records)
        # later calls raise at once
        started = time.monotonic()
        with pytest.raises(ServerConnectionError, match="I/O thread failed"):
            client.infer("identity", torch.zeros(4))
        with pytest.raises(ServerConnectionError, match="I/O thread failed"):
            client.submit("identity", torch.zeros(4))
        with pytest.raises(ServerConnectionError, match="I/O thread failed"):
            client.models()
        assert time.monotonic() - started < 2
    _assert_serves(server)


def test_a_failed_frontend_thread_is_visible_and_answers_what_it_held(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """In this process (see the module docstring), with a real pool."""
    repo = tmp_path / "spin"
    (repo / "spin" / "1").mkdir(parents=True)
    (repo / "spin" / "config.pbtxt").write_text(SPIN_CONFIG)
    models.save("spin", repo / "spin" / "1").rename(repo / "spin" / "1" / "model.pt")
    with Pool(repo) as pool:
        frontend = ZmqFrontend(pool, "ipc://*").start()
        try:
            assert frontend.alive and frontend.failure is None
            with Client(frontend.endpoint, connect_timeout=20) as client:
                running = client.submit("spin", torch.tensor([1_000_000.0]))
                _wait_until(lambda: any(s.pending for s in frontend._server.sessions), 10, "in the pool")
                with caplog.at_level(logging.CRITICAL, logger="libtorchrt.server"):
                    completions = frontend._server.completions
                    assert completions is not None
                    completions.put((_Unhandled(), 0, None))  # type: ignore[arg-type]
                    _wait_until(lambda: not frontend.alive, 10, "the frontend's thread ends")
                assert "failed" in repr(frontend)
                assert isinstance(frontend.failure, AttributeError)
                assert any(r.levelno == logging.CRITICAL for r in caplog.records)
                # what it held was answered before it closed its sockets
                with pytest.raises(PoolClosedError, match="frontend failed"):
                    running.result(10)
            started = time.monotonic()
            frontend.close()
            assert time.monotonic() - started < 5
            assert "closed" in repr(frontend) and not frontend.alive
            assert pool.infer("spin", torch.tensor([1.0]))["OUTPUT__0"].shape == (1,)
        finally:
            frontend.close(grace=0)


# ── size limits: the whole message, not each frame ─────────────────────────────


def test_a_message_of_many_big_frames_is_refused_and_released(server: Served) -> None:
    frame = np.ones(MB, dtype=np.uint8)  # one buffer, sent 200 times without copying
    header = _infer_header(31, tensors=[["uint8", [MB], FRAME, 0]])
    before = _memory(server.pid)
    with peer(server) as p:
        p.hello()
        p.sock.send(header, zmq.SNDMORE)
        for i in range(200):
            p.sock.send(frame, zmq.SNDMORE if i < 199 else 0, copy=False)
        failure = _failure(p.answer(), 31, "InvalidInputError")
        assert "max_request_bytes" in failure.message and "201 frames" in failure.message, failure
        # the session lives on: a correct request on it is served
        result = p.ask(_infer_header(32))
        assert isinstance(result, remote.Result) and result.id == 32
    after = _memory(server.pid)
    assert after["VmRSS"] - before["VmRSS"] < 64 * MB, (before, after)
    _assert_serves(server)


def test_a_message_of_many_tiny_frames_is_refused(server: Served) -> None:
    with peer(server) as p:
        p.hello()
        frames = [_infer_header(41), *([b""] * 100_000)]
        failure = _failure(p.ask(*frames), 41, "ProtocolError")
        assert f"at most {remote.MAX_FRAMES} frames" in failure.message
        # before HELLO (another peer, no session) as well
        with peer(server) as stranger:
            _failure(stranger.ask(_infer_header(42), *([b""] * 5_000)), 42, "ProtocolError")
        # data frames the header does not refer to
        failure = _failure(p.ask(_infer_header(43), b"\0" * 16), 43, "ProtocolError")
        assert "refers to 0" in failure.message
    _assert_serves(server)


def test_a_frame_above_the_limit_drops_the_connection(server: Served) -> None:
    """libzmq refuses the frame as it is announced (ZMQ_MAXMSGSIZE): no answer, the
    connection is dropped, and a peer that reconnects gets a new session."""
    with peer(server) as p:
        p.hello()
        p.sock.rcvtimeo = 500
        p.sock.send_multipart([_infer_header(51, tensors=[["uint8", [3 * MB], FRAME, 0]]), b"\0" * (3 * MB)])
        with pytest.raises(zmq.Again):
            p.sock.recv()
        p.sock.rcvtimeo = ANSWER_MS
        p.hello()  # (the DEALER reconnected by itself)
    _assert_serves(server)


def test_a_header_describing_more_than_the_limit_is_refused(server: Served) -> None:
    with peer(server) as p:
        p.hello()
        header = _infer_header(61, tensors=[["float32", [2**20], FRAME, 0]])
        failure = _failure(p.ask(header, b"\0" * 16), 61, "InvalidInputError")
        assert "max_request_bytes" in failure.message
        # a frame that does not match its descriptor
        _failure(p.ask(_infer_header(62, tensors=[["float32", [4], FRAME, 0]]), b"\0" * 15), 62, "ProtocolError")
    _assert_serves(server)


# ── attacks refused before these fixes: kept refused ───────────────────────────


def test_garbage_and_requests_before_hello(server: Served) -> None:
    with peer(server) as p:
        for garbage in (b"\xc1garbage", b"", msgpack.packb("not an array"), msgpack.packb([99])):
            _failure(p.ask(garbage), -1, "ProtocolError")
        failure = _failure(p.ask(_infer_header(71)), 71, "ProtocolError")
        assert failure.message.startswith("no session")
        _failure(p.ask(msgpack.packb([remote.Hello.KIND, "one"])), -1, "ProtocolError")
        # cancels and releases of what does not exist are ignored
        p.sock.send(remote.encode(remote.Cancel(12345)))
        p.sock.send(remote.encode(remote.Release([0, 64, 2**40])))
        p.hello()
        p.sock.send(remote.encode(remote.Cancel(12345)))
        p.sock.send(remote.encode(remote.Release([0, 64, 2**40])))
        result = p.ask(_infer_header(72))
        assert isinstance(result, remote.Result) and result.id == 72
    _assert_serves(server)


def test_another_protocol_version_is_refused(server: Served) -> None:
    with peer(server) as p:
        welcome = p.ask(msgpack.packb([remote.Hello.KIND, 99, os.getpid(), "x", False, "from the future"]))
        assert isinstance(welcome, remote.Welcome) and welcome.session == b""
        assert welcome.protocol == remote.PROTOCOL_VERSION
        _failure(p.ask(_infer_header(81)), 81, "ProtocolError")
    _assert_serves(server)


def test_malformed_requests_are_refused(server: Served) -> None:
    hostile = [
        msgpack.packb([remote.Infer.KIND, "id", "identity"]),
        msgpack.packb([remote.Infer.KIND, 91, "identity", None, None, None, [["float32", [4], 2, 0]]]),  # ARENA
        _infer_header(92, tensors=[["float32", [2**39, 2**39], BLOB, 0]], blobs=[b""]),
        _infer_header(93, tensors=[["float32", [4], BLOB, 0]], blobs=[b"12"]),
        _infer_header(94, tensors=[["complex7", [4], BLOB, 0]], blobs=[b""]),
        _infer_header(95, tensors=[[]] * 5000),
        msgpack.packb([remote.Query.KIND, 96, "secrets"]),
        msgpack.packb([remote.Failure.KIND, 97, "x", "y", {"__class__": {"nested": 1}}]),
        msgpack.packb([remote.Welcome.KIND, 1, b"token"]),
    ]
    with peer(server) as p:
        p.hello()
        for header in hostile:
            answer = p.ask(header)
            assert isinstance(answer, remote.Failure), (header, answer)
            assert answer.error_type in ("ProtocolError", "InvalidInputError"), (header, answer)
            assert answer.id in (-1, remote.request_id(header)), (header, answer)
    _assert_serves(server)


def test_bogus_shared_memory_hand_offs_are_refused(server: Served) -> None:
    sealed = fdpass.sealed_arena(MB, "libtorchrt-test")
    unsealed = os.memfd_create("libtorchrt-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(unsealed, MB)
    pipe_r, pipe_w = os.pipe()
    try:
        with peer(server) as p:
            welcome = p.hello(shared_memory=True)
            assert welcome.shm_path
            token = welcome.session
            attach = remote.encode(remote.Attach(remote.PROTOCOL_VERSION, token, MB))
            attempts: list[tuple[bytes, list[int], str]] = [
                (remote.encode(remote.Attach(remote.PROTOCOL_VERSION, b"wrong token", MB)), [sealed.fd], "token"),
                (attach, [unsealed], "sealed"),
                (attach, [pipe_r], "memfd"),
                (remote.encode(remote.Attach(remote.PROTOCOL_VERSION, token, 2 * MB)), [sealed.fd], "announced"),
                (attach, [], "descriptor"),
                (attach, [sealed.fd, sealed.fd], "too many"),
                (b"\xc1garbage", [sealed.fd], "undecodable"),
            ]
            for payload, fds, why in attempts:
                with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
                    conn.settimeout(ANSWER_MS / 1000)
                    conn.connect(welcome.shm_path)
                    fdpass.send_message(conn, payload, fds)
                    answer, received = fdpass.recv_message(conn)
                    if why == "too many":  # dropped without a word
                        assert (answer, received) == (b"", [])
                        continue
                    refused = remote.decode(answer)
                    assert isinstance(refused, remote.Refused) and why in refused.message, (why, refused)
                    assert fdpass.recv_message(conn) == (b"", [])  # and it hung up
            # the session is unharmed: a request on it is served
            result = p.ask(_infer_header(101))
            assert isinstance(result, remote.Result) and result.id == 101
    finally:
        sealed.close()
        for fd in (unsealed, pipe_r, pipe_w):
            os.close(fd)
    _assert_serves(server)


def test_a_flood_of_unattached_unix_connections_is_bounded(server: Served) -> None:
    with peer(server) as p:
        welcome = p.hello(shared_memory=True)
    conns = []
    try:
        for _ in range(200):  # the server keeps at most 64 that did not attach
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            conns.append(conn)
            conn.setblocking(False)
            _wait_until(lambda c=conn: c.connect_ex(welcome.shm_path) == 0, 20, "the server accepts")
        _wait_until(lambda: _fds(server.pid) < server.baseline["fds"] + 100, 20, "the oldest are dropped")
    finally:
        for conn in conns:
            conn.close()
    _assert_serves(server)


def test_a_second_server_on_a_live_ones_endpoint_is_refused(server: Served, tmp_path: Path) -> None:
    inode = _inode(server.socket_path)
    dirs = server.private_dirs()
    second = _start(_repository(tmp_path, spin=False), server.endpoint, server.tmpdir)
    try:
        assert second.wait(START_TIMEOUT) == 1, second.output
    finally:
        second.kill()
    assert f"is in use by another server (pid {server.pid}" in second.output, second.output
    # nothing of the live server was touched, and the second one left nothing
    assert _inode(server.socket_path) == inode
    assert server.private_dirs() == dirs
    _assert_serves(server)


# ── afterwards ─────────────────────────────────────────────────────────────────


def test_after_the_attacks_the_server_is_back_to_its_baseline(server: Served) -> None:
    baseline = server.baseline
    _wait_until(lambda: _fds(server.pid) <= baseline["fds"], 20, f"descriptors back to {baseline['fds']}")
    rss = _memory(server.pid)["VmRSS"]
    assert rss - baseline["VmRSS"] < RSS_SLACK, (baseline, rss)
    _assert_serves(server)


def test_stopping_the_server_leaves_nothing(server: Served) -> None:
    workers = server.proc.workers()
    assert workers
    assert server.proc.stop(signal.SIGTERM) == 0, server.proc.output
    _wait_until(lambda: not any(alive(pid) for pid in workers), 30, "the workers exit")
    assert not server.private_dirs()
    assert not os.listdir(server.socket_path.parent), "the socket file and its lock are removed"

"""Remote clients end to end: ``Client`` ↔ ``ZmqFrontend`` ↔ ``Pool``.

One pool and one frontend serve the module; clients run in this process and in
subprocesses (several at once, one killed mid-request). Both tensor paths are checked
against the pool's own answers: shared memory (same host, the default) and zero-copy
frames (``shared_memory=False``, as across hosts). Every test that makes clients checks
that closing them leaves nothing behind, here or in the server (descriptors, shared
memory mappings, sessions).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
import zmq

from libtorchrt import (
    ConfigError,
    InvalidInputError,
    ModelConfig,
    ModelError,
    ModelUnavailableError,
    Pool,
    PoolClosedError,
    ProtocolError,
    TimeoutError,
    UnknownModelError,
)
from libtorchrt.client import Client
from libtorchrt.errors import ServerConnectionError
from libtorchrt.server.zmq_frontend import ZmqFrontend
from libtorchrt.transport import remote
from libtorchrt.transport.wire import ARENA, BLOB, FRAME
from tests.conftest import assert_no_leaks, snapshot, wait_for

ROOT = Path(__file__).resolve().parents[2]
MB = 1 << 20


def _start_pyzmq_gc() -> None:
    """Zero-copy sends start pyzmq's garbage-collector thread (with its own context and
    descriptors) once per process; start it before any snapshot, so that it does not
    count as a leak."""
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://gc-warmup")
    b.connect("inproc://gc-warmup")
    a.send(np.zeros(1 << 17, dtype=np.uint8), copy=False)
    b.recv()
    a.close()
    b.close()
    ctx.term()


@pytest.fixture(scope="module")
def string_model(model_dir: Path) -> Path:
    from torch import nn

    class Upper(nn.Module):
        def forward(self, x: list[str]) -> list[str]:
            return [s.upper() for s in x]

    path = model_dir / "upper.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(Upper()).save(str(path))
    return path


@pytest.fixture(scope="module")
def pool(model_dir: Path, string_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    _start_pyzmq_gc()
    before = snapshot()
    broken = tmp_path_factory.mktemp("broken") / "broken.pt"
    broken.write_bytes(b"not a TorchScript file")
    configs = [
        ModelConfig("tiny", model_dir / "tiny.pt"),
        ModelConfig("add", model_dir / "add.pt"),
        ModelConfig("two", model_dir / "two.pt"),
        ModelConfig("identity", model_dir / "identity.pt", instances=2),
        ModelConfig("raiser", model_dir / "raiser.pt"),
        ModelConfig("spin", model_dir / "spin.pt"),
        ModelConfig("upper", string_model),
        ModelConfig("broken", broken),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "broken" is not served
        p = Pool(models=configs)
    with p:
        yield p
    assert_no_leaks(before)


@pytest.fixture(scope="module")
def server(pool: Pool) -> Iterator[ZmqFrontend]:
    with ZmqFrontend(pool, "tcp://127.0.0.1:0") as frontend:
        yield frontend
    assert not frontend._server.sessions


@pytest.fixture
def clean(server: ZmqFrontend) -> Iterator[None]:
    """Nothing a test's clients made may outlive them, here or in the server."""
    before = snapshot()
    yield
    deadline = time.monotonic() + 5
    while server._server.sessions and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not server._server.sessions, "sessions left in the server"
    assert_no_leaks(before)


def _sessions(frontend: ZmqFrontend) -> list[Any]:
    return list(frontend._server.sessions)


# ── both tensor paths ─────────────────────────────────────────────────────────

PATHS = [pytest.param(None, id="shared-memory"), pytest.param(False, id="frames")]


@pytest.mark.parametrize("shm", PATHS)
def test_results_match_the_pool(pool: Pool, server: ZmqFrontend, clean: None, shm: bool | None) -> None:
    with Client(server.endpoint, shared_memory=shm) as client:
        assert client.shared_memory is (shm is None)
        x = torch.randn(8, 64)
        assert torch.equal(client.infer("tiny", x)["OUTPUT__0"], pool.infer("tiny", x)["OUTPUT__0"])
        a, b = torch.randn(3, 5), torch.randn(3, 5)
        for inputs in ({"a": a, "b": b}, [a, b], (a.numpy(), b.numpy()), {"INPUT__0": a, "INPUT__1": b}):
            assert torch.equal(client.infer("add", inputs)["OUTPUT__0"], a + b)
        out = client.infer("two", x)
        assert set(out) == {"OUTPUT__0", "OUTPUT__1"}
        assert torch.equal(out["OUTPUT__0"], x + 1) and torch.equal(out["OUTPUT__1"], x * 2)
        # Every dtype, inline and big (shared memory or frames), and non-contiguous.
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.uint8):
            for shape in ((4, 4), (1024, 300)):
                t = (torch.rand(shape) * 100).to(dtype)
                got = client.infer("identity", t)["OUTPUT__0"]
                assert got.dtype == dtype and torch.equal(got, t)
        t = torch.rand(300, 1000).t()
        assert torch.equal(client.infer("identity", t)["OUTPUT__0"], t)
        assert client.infer("identity", torch.zeros(0, 3))["OUTPUT__0"].shape == (0, 3)
        assert torch.equal(
            client.infer("identity", torch.tensor([True, False]))["OUTPUT__0"], torch.tensor([True, False])
        )
        # Strings, as lists of str both ways.
        assert client.infer("upper", ["ab", "cd"]) == pool.infer("upper", ["ab", "cd"])
        assert client.infer("upper", {"x": ["é", ""]}) == pool.infer("upper", {"x": ["é", ""]})
        # Large: 32 MiB each way.
        big = torch.randn(8 * MB // 4 * 4)
        assert torch.equal(client.infer("identity", big)["OUTPUT__0"], big)


def test_shared_memory_carries_the_big_tensors(server: ZmqFrontend, clean: None) -> None:
    """Same host: big inputs sit in the client's arena, big outputs in the session's
    response arena; their slots are recycled once the answer came and the caller
    dropped the outputs."""
    with Client(server.endpoint) as client:
        assert client.shared_memory
        (session,) = _sessions(server)
        connection = client._connection
        t = torch.randn(256, 1024)
        outs = [client.infer("identity", t + i)["OUTPUT__0"] for i in range(8)]
        for i, out in enumerate(outs):
            assert torch.equal(out, t + i)
        # The outputs view the response arena (no copy), which the server filled.
        arena = connection.session.response_arena
        address = arena.address
        assert all(address <= out.data_ptr() < address + arena.size for out in outs)
        assert len(session.response_allocator) == 8
        assert connection.allocator is not None and len(connection.allocator) == 0
        del outs, out
        # Released slots ride on the next request.
        deadline = time.monotonic() + 5
        while len(session.response_allocator) and time.monotonic() < deadline:
            client.infer("tiny", torch.zeros(1, 64))
        assert len(session.response_allocator) == 0


def test_empty_makes_inputs_in_the_client_arena(server: ZmqFrontend, clean: None) -> None:
    """Client.empty: a tensor in the client's request arena, which requests name where
    it lies instead of copying it there (the server still copies it into the pool's)."""
    with Client(server.endpoint) as client:
        connection = client._connection
        arena, slots = connection.arena, connection.allocator
        assert arena is not None and slots is not None
        x = client.empty("identity", (256, 1024)).normal_()
        assert arena.address <= x.data_ptr() < arena.address + arena.size
        copies = [0]
        alloc = slots.alloc

        def counted(nbytes: int) -> int | None:
            copies[0] += 1
            return alloc(nbytes)

        slots.alloc = counted  # type: ignore[method-assign]
        futures = [client.submit("identity", x) for _ in range(3)] + [client.submit("identity", x[128:])]
        outs = [f.result(30)["OUTPUT__0"] for f in futures]
        assert all(torch.equal(out, x) for out in outs[:3]) and torch.equal(outs[3], x[128:])
        assert copies[0] == 0, "a lent input was copied into the client's arena"
        client.infer("identity", torch.randn(256, 1024))
        assert copies[0] == 1  # (an ordinary tensor is)
        small = client.empty("identity", (4,), torch.int64)
        assert not arena.address <= small.data_ptr() < arena.address + arena.size
        with pytest.raises(InvalidInputError, match="expected a shape"):
            client.empty("identity", (-1, 3))
        del x, outs, futures
        wait_for(lambda: slots.lent_bytes == 0 and len(slots) == 0, timeout=5)
    with pytest.raises(PoolClosedError):
        client.empty("identity", (256, 1024))
    with Client(server.endpoint, shared_memory=False) as client:
        y = client.empty("identity", (256, 1024)).fill_(1.0)  # (no arena: an ordinary tensor)
        assert torch.equal(client.infer("identity", y)["OUTPUT__0"], y)


def test_frames_travel_without_shared_memory(server: ZmqFrontend, clean: None) -> None:
    with Client(server.endpoint, shared_memory=False) as client:
        (session,) = _sessions(server)
        assert session.request_arena is None and session.response_arena is None
        t = torch.randn(512, 512)
        assert torch.equal(client.infer("identity", t)["OUTPUT__0"], t)


def test_shared_memory_required_but_not_offered(pool: Pool, clean: None) -> None:
    with ZmqFrontend(pool, "tcp://127.0.0.1:0", shared_memory=False) as frontend:
        with pytest.raises(ServerConnectionError, match="does not offer it"):
            Client(frontend.endpoint, shared_memory=True)
        with Client(frontend.endpoint) as client:  # auto: frames
            assert not client.shared_memory
            t = torch.randn(100_000)
            assert torch.equal(client.infer("identity", t)["OUTPUT__0"], t)


def test_an_arena_too_small_falls_back_to_frames(server: ZmqFrontend, clean: None) -> None:
    with Client(server.endpoint, request_arena_bytes=1 * MB) as client:
        assert client.shared_memory
        t = torch.randn(2 * MB // 4)  # larger than the request arena
        assert torch.equal(client.infer("identity", t)["OUTPUT__0"], t)


# ── concurrency ───────────────────────────────────────────────────────────────


@pytest.mark.parametrize("shm", PATHS)
def test_many_threads_share_one_client(server: ZmqFrontend, clean: None, shm: bool | None) -> None:
    errors: list[BaseException] = []
    with Client(server.endpoint, shared_memory=shm) as client:

        def work(seed: int) -> None:
            try:
                g = torch.Generator().manual_seed(seed)
                for i in range(30):
                    n = 16 if i % 3 else 40_000  # inline, and big
                    t = torch.randn(n, generator=g)
                    out = client.infer("identity", {"x": t}, timeout=30)["OUTPUT__0"]
                    assert torch.equal(out, t)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert not any(th.is_alive() for th in threads), "a caller thread is still waiting"
    assert not errors, errors[0]


def test_infer_async(server: ZmqFrontend, clean: None) -> None:
    async def main(client: Client) -> list[dict[str, torch.Tensor]]:
        return await asyncio.gather(*(client.infer_async("tiny", torch.full((1, 64), float(i))) for i in range(20)))

    with Client(server.endpoint) as client:
        outs = asyncio.run(main(client))
        for i, out in enumerate(outs):
            assert torch.equal(out["OUTPUT__0"], client.infer("tiny", torch.full((1, 64), float(i)))["OUTPUT__0"])


CLIENT_SCRIPT = textwrap.dedent(
    """
    import json, sys, threading, torch
    from libtorchrt.client import Client
    endpoint, shm, seed = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    errors = []
    with Client(endpoint, shared_memory=shm) as client:
        def work(k):
            try:
                g = torch.Generator().manual_seed(seed * 100 + k)
                for i in range(20):
                    t = torch.randn(16 if i % 2 else 100_000, generator=g)
                    assert torch.equal(client.infer("identity", t, timeout=60)["OUTPUT__0"], t)
                    a, b = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
                    assert torch.equal(client.infer("add", [a, b])["OUTPUT__0"], a + b)
            except BaseException as e:
                errors.append(repr(e))
        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        [t.start() for t in threads]
        [t.join(120) for t in threads]
        print(json.dumps({"shm": client.shared_memory, "errors": errors}))
    """
)


def _client_process(endpoint: str, shm: bool | None, seed: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CLIENT_SCRIPT, endpoint, json.dumps(shm), str(seed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def test_several_client_processes_at_once(server: ZmqFrontend, clean: None) -> None:
    procs = [_client_process(server.endpoint, shm, i) for i, shm in enumerate((None, None, False))]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    assert [r["shm"] for r in reports] == [True, True, False]
    assert all(not r["errors"] for r in reports), reports


# ── errors ────────────────────────────────────────────────────────────────────


def test_errors_are_the_pools_typed_errors(server: ZmqFrontend, clean: None) -> None:
    with Client(server.endpoint) as client:
        with pytest.raises(UnknownModelError) as unknown:
            client.infer("nope", torch.zeros(1))
        assert unknown.value.model == "nope" and "tiny" in unknown.value.known
        assert isinstance(unknown.value, KeyError)
        with pytest.raises(UnknownModelError, match="has no version 7") as version:
            client.infer("tiny", torch.zeros(1, 64), version=7)
        assert version.value.version == 7
        with pytest.raises(InvalidInputError) as invalid:
            client.infer("add", {"a": torch.zeros(1), "c": torch.zeros(1)})
        assert invalid.value.model == "add" and invalid.value.input == "c"
        with pytest.raises(InvalidInputError) as local:  # refused here, before sending
            client.infer("add", {"a": torch.zeros(1), "b": object()})
        assert local.value.input == "b"
        with pytest.raises(ModelError) as model_error:
            client.infer("raiser", -torch.ones(3))
        assert model_error.value.model == "raiser"
        assert "negative input rejected by the model" in model_error.value.remote_traceback
        assert "Worker traceback" in str(model_error.value)
        with pytest.raises(InvalidInputError, match="priority"):  # the priority reached the pool
            client.infer("tiny", torch.zeros(1, 64), priority=1)
        with pytest.raises(ModelUnavailableError) as unavailable:
            client.infer("broken", torch.zeros(1))
        assert unavailable.value.model == "broken"
        with pytest.raises(TimeoutError):  # (a second or more of spinning: only the deadline can end it)
            client.infer("spin", torch.tensor([1_000_000.0]), timeout=0.2)
        # still serving after all of that
        assert client.infer("tiny", torch.zeros(1, 64))["OUTPUT__0"].shape == (1, 64)


def test_models_and_health(pool: Pool, server: ZmqFrontend, clean: None) -> None:
    with Client(server.endpoint) as client:
        assert client.models() == pool.models()
        states = {s.name: s.state for s in client.models()}
        assert states["broken"] == "failed" and states["tiny"] == "ready"
        health = client.health()
        assert health == pool.health()
        assert health["identity"].instances[1].state == "ready"


def test_a_closed_client_refuses_requests(server: ZmqFrontend, clean: None) -> None:
    client = Client(server.endpoint)
    client.close()
    client.close()  # idempotent
    with pytest.raises(PoolClosedError):
        client.infer("tiny", torch.zeros(1, 64))


def test_an_unclosed_client_warns_and_closes(server: ZmqFrontend, clean: None) -> None:
    client = Client(server.endpoint)
    client.infer("tiny", torch.zeros(1, 64))
    with pytest.warns(ResourceWarning, match="not closed"):
        del client
        import gc

        gc.collect()


def test_an_unclosed_frontend_warns_and_closes(pool: Pool, clean: None) -> None:
    frontend = ZmqFrontend(pool, "tcp://127.0.0.1:0").start()
    with Client(frontend.endpoint) as client:
        assert client.infer("tiny", torch.zeros(1, 64))["OUTPUT__0"].shape == (1, 64)
    with pytest.warns(ResourceWarning, match="ZmqFrontend was not closed"):
        del frontend
        import gc

        gc.collect()


def test_cancel_drops_a_queued_request(model_dir: Path, clean: None) -> None:
    """A cancelled request never runs: the server drops it from the pool's queue.

    (The client's future is a plain one, so ``cancel()`` alone proves nothing: the
    count of executions does.) One instance that takes one request at a time, so the
    second request waits in the front's queue, where a cancellation can reach it.
    """
    spin = ModelConfig("spin", model_dir / "spin.pt")
    with (
        Pool(models=[spin], max_inflight=1) as pool,
        ZmqFrontend(pool, "tcp://127.0.0.1:0") as frontend,
        Client(frontend.endpoint) as client,
    ):

        def spin_stats() -> Any:
            return next(s for s in pool.stats() if s.model == "spin")

        slow = client.submit("spin", torch.tensor([1_000_000.0]))  # a second or more of spinning
        wait_for(lambda: pool.workers()[0].inflight == 1, what="the slow request to run")
        queued = client.submit("spin", torch.tensor([5.0]))
        wait_for(lambda: pool.health()["spin"].queued == 1, what="the second request to queue in the pool")
        assert queued.cancel()
        assert not slow.done(), "the slow request finished first: the test proves nothing"
        slow.result(60)  # (the pool skips a cancelled request when its turn comes)
        # A request behind where the cancelled one was: when it is answered, the
        # cancelled one would have run before it.
        assert float(client.infer("spin", torch.tensor([7.0]), timeout=60)["OUTPUT__0"]) == 7.0
        stats = spin_stats()
        assert (stats.success, stats.executions) == (2, 2), stats


# ── limits and hostile peers ──────────────────────────────────────────────────


def test_request_size_limit(pool: Pool, clean: None) -> None:
    with ZmqFrontend(pool, "tcp://127.0.0.1:0", max_request_bytes=MB) as frontend, Client(frontend.endpoint) as client:
        assert client.infer("identity", torch.zeros(MB // 8))["OUTPUT__0"].numel() == MB // 8
        with pytest.raises(InvalidInputError, match="max_request_bytes"):
            client.infer("identity", torch.zeros(MB // 2))  # refused by the client
        client._connection.session.max_request_bytes = None  # pretend it did not know
        with pytest.raises(InvalidInputError, match="max_request_bytes"):
            client.infer("identity", torch.zeros(MB // 2))  # refused by the server
        assert client.infer("tiny", torch.zeros(1, 64))["OUTPUT__0"].shape == (1, 64)


def _raw(endpoint: str) -> tuple[zmq.Context, zmq.Socket]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvtimeo = 5000
    sock.connect(endpoint)
    return ctx, sock


def test_protocol_version_mismatch_refused_by_the_server(server: ZmqFrontend, clean: None) -> None:
    ctx, sock = _raw(server.endpoint)
    try:
        sock.send(msgpack.packb([remote.Hello.KIND, 99, os.getpid(), "x", False, "a field from the future"]))
        welcome = remote.decode(sock.recv())
        assert isinstance(welcome, remote.Welcome)
        assert welcome.protocol == remote.PROTOCOL_VERSION and welcome.session == b""
        assert not server._server.sessions
        # without a session, a request is refused and nothing runs
        sock.send(remote.encode(remote.Infer(5, "tiny", None, None, None, [])))
        failure = remote.decode(sock.recv())
        assert isinstance(failure, remote.Failure) and failure.id == 5 and failure.error_type == "ProtocolError"
    finally:
        sock.close()
        ctx.term()


def test_protocol_version_mismatch_refused_by_the_client(clean: None) -> None:
    """A server of another version answers HELLO with its own: the client says so."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")

    def fake_server() -> None:
        if router.poll(10_000):
            identity, _ = router.recv_multipart()
            router.send_multipart([identity, msgpack.packb([remote.Welcome.KIND, 99, b"token", "", 0, "9.9"])])

    thread = threading.Thread(target=fake_server)
    thread.start()
    try:
        with pytest.raises(ProtocolError, match="protocol 99; this client speaks 1"):
            Client(f"tcp://127.0.0.1:{port}", connect_timeout=10)
    finally:
        thread.join(10)
        router.close()
        ctx.term()


HOSTILE: list[Any] = [
    b"\xc1garbage",
    msgpack.packb("not an array"),
    msgpack.packb([99]),
    msgpack.packb([remote.Infer.KIND, "id", "tiny"]),
    msgpack.packb([remote.Infer.KIND, 1, "tiny", None, None, None, [["float32", [4], ARENA, 0]]]),  # no shm
    msgpack.packb([remote.Infer.KIND, 2, "identity", None, None, None, [["float32", [4], FRAME, 3]]]),
    msgpack.packb([remote.Infer.KIND, 3, "identity", None, None, None, [["float32", [2**39, 2**39], BLOB, 0]], [b""]]),
    msgpack.packb([remote.Infer.KIND, 4, "identity", None, None, None, [["float32", [4], BLOB, 0]], [b"12"]]),
    msgpack.packb([remote.Infer.KIND, 5, "identity", None, None, None, [["complex7", [4], BLOB, 0]], [b""]]),
    msgpack.packb([remote.Infer.KIND, 6, "identity", None, None, ["a", "b"], [["float32", [1], BLOB, 0]], [b"1234"]]),
    msgpack.packb([remote.Query.KIND, 7, "secrets"]),
    msgpack.packb([remote.Failure.KIND, 8, "x", "y", {"__class__": {"nested": 1}}]),
]


def test_hostile_messages_are_refused_and_serving_goes_on(server: ZmqFrontend, clean: None) -> None:
    ctx, sock = _raw(server.endpoint)
    try:
        sock.send(remote.encode(remote.Hello(remote.PROTOCOL_VERSION, os.getpid(), "another host", False)))
        assert isinstance(remote.decode(sock.recv()), remote.Welcome)
        for header in HOSTILE:
            sock.send(header)
            failure = remote.decode(sock.recv())
            assert isinstance(failure, remote.Failure), header
            assert failure.error_type in ("ProtocolError", "InvalidInputError"), (header, failure)
        with Client(server.endpoint) as client:
            assert client.infer("tiny", torch.zeros(1, 64))["OUTPUT__0"].shape == (1, 64)
        sock.send(remote.encode(remote.Bye()))
    finally:
        sock.close()
        ctx.term()


def test_hostile_shared_memory_hand_offs_are_refused(server: ZmqFrontend, clean: None) -> None:
    """Only the session's token, with a sealed memfd of the size it claims, attaches."""
    import fcntl

    from libtorchrt.transport import fdpass

    ctx, sock = _raw(server.endpoint)
    try:
        sock.send(remote.encode(remote.Hello(remote.PROTOCOL_VERSION, os.getpid(), remote.boot_id(), True)))
        welcome = remote.decode(sock.recv())
        assert isinstance(welcome, remote.Welcome) and welcome.shm_path
        assert stat.S_IMODE(os.stat(os.path.dirname(welcome.shm_path)).st_mode) == 0o700
        sealed = fdpass.sealed_arena(1 << 20, "libtorchrt-test")
        unsealed = os.memfd_create("libtorchrt-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(unsealed, 1 << 20)
        shrinkable = os.memfd_create("libtorchrt-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(shrinkable, 1 << 20)
        fcntl.fcntl(shrinkable, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW)
        attempts: list[tuple[bytes, list[int], str]] = [
            (remote.encode(remote.Attach(remote.PROTOCOL_VERSION, b"wrong token", 1 << 20)), [sealed.fd], "token"),
            (remote.encode(remote.Attach(remote.PROTOCOL_VERSION, welcome.session, 1 << 20)), [unsealed], "sealed"),
            (remote.encode(remote.Attach(remote.PROTOCOL_VERSION, welcome.session, 1 << 20)), [shrinkable], "sealed"),
            (remote.encode(remote.Attach(remote.PROTOCOL_VERSION, welcome.session, 2 << 20)), [sealed.fd], "announced"),
            (remote.encode(remote.Attach(remote.PROTOCOL_VERSION, welcome.session, 1 << 20)), [], "descriptor"),
            (remote.encode(remote.Attach(99, welcome.session, 1 << 20)), [sealed.fd], "protocol"),
            (b"\xc1garbage", [sealed.fd], "undecodable"),
        ]
        for payload, fds, why in attempts:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
                conn.settimeout(5)
                conn.connect(welcome.shm_path)
                fdpass.send_message(conn, payload, fds)
                answer, received = fdpass.recv_message(conn)
                assert received == []
                refused = remote.decode(answer)
                assert isinstance(refused, remote.Refused) and why in refused.message, (why, refused)
                assert fdpass.recv_message(conn) == (b"", [])  # and it hung up
        (session,) = _sessions(server)
        assert session.request_arena is None
        # the real thing still works, once
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
            conn.settimeout(5)
            conn.connect(welcome.shm_path)
            attach = remote.encode(remote.Attach(remote.PROTOCOL_VERSION, welcome.session, 1 << 20))
            fdpass.send_message(conn, attach, [sealed.fd])
            answer, received = fdpass.recv_message(conn)
            assert isinstance(remote.decode(answer), remote.Attached) and len(received) == 1
            os.close(received[0])
            deadline = time.monotonic() + 5
            while session.request_arena is None:  # set just after the answer left
                assert time.monotonic() < deadline
                time.sleep(0.01)
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as again:
                again.settimeout(5)
                again.connect(welcome.shm_path)
                fdpass.send_message(again, attach, [sealed.fd])
                assert "token" in remote.decode(fdpass.recv_message(again)[0]).message  # type: ignore[union-attr]
        # closing the Unix connection ends the session
        deadline = time.monotonic() + 5
        while server._server.sessions and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not server._server.sessions
        for fd in (unsealed, shrinkable):
            os.close(fd)
        sealed.close()
    finally:
        sock.close()
        ctx.term()


# ── lifetime and leaks ────────────────────────────────────────────────────────

KILLED_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from libtorchrt.client import Client
    client = Client(sys.argv[1], shared_memory={"auto": None, "frames": False}[sys.argv[2]])
    client.infer("identity", torch.randn(1 << 20))              # shared-memory slots in use
    keep = client.infer("identity", torch.randn(1 << 20))   # and an output still held
    running = client.submit("spin", torch.tensor([200_000.0]))  # in flight when killed
    queued = [client.submit("identity", torch.randn(1 << 18)) for _ in range(4)]
    print("ready", client.shared_memory, flush=True)
    sys.stdin.read()
    """
)


@pytest.mark.parametrize("mode", ["auto", "frames"])
def test_a_killed_client_leaks_nothing_in_the_server(pool: Pool, server: ZmqFrontend, clean: None, mode: str) -> None:
    before = snapshot()
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_SCRIPT, server.endpoint, mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.split() == ["ready", str(mode == "auto")], proc.stderr.read() if proc.stderr else ""
        (session,) = _sessions(server)
        assert (session.request_arena is not None) == (mode == "auto")
        # requests in flight (the client's last sends may still be on their way)
        deadline = time.monotonic() + 10
        while not session.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        assert session.pending
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdin.close()  # type: ignore[union-attr]
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
    deadline = time.monotonic() + 10
    while server._server.sessions and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not server._server.sessions
    # the spin request finishes in the pool; its output is dropped, nothing stays mapped
    assert_no_leaks(before, timeout=30)
    with Client(server.endpoint) as client:  # and the server goes on
        assert client.infer("tiny", torch.zeros(1, 64))["OUTPUT__0"].shape == (1, 64)


def test_close_drains_requests_in_flight(pool: Pool, clean: None, tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/run/pool.sock"
    frontend = ZmqFrontend(pool, endpoint).start()
    client = Client(frontend.endpoint, connect_timeout=2)
    try:
        assert client.shared_memory
        running = client.submit("spin", torch.tensor([2_000_000.0]))  # a second or more of work
        deadline = time.monotonic() + 10
        while not any(s.pending for s in _sessions(frontend)):  # it reached the pool
            assert time.monotonic() < deadline
            time.sleep(0.01)
        frontend.close(grace=30)
        assert running.result(10)["OUTPUT__0"].shape == (1,)
        assert not frontend._server.sessions
        with pytest.raises(ServerConnectionError):
            client.infer("tiny", torch.zeros(1, 64))
        # a new server on the same endpoint: the client starts a new session
        frontend = ZmqFrontend(pool, endpoint).start()
        deadline = time.monotonic() + 10
        while True:
            try:
                out = client.infer("identity", torch.ones(MB // 4))
                break
            except ServerConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert torch.equal(out["OUTPUT__0"], torch.ones(MB // 4)) and client.shared_memory
        del out
    finally:
        client.close()
        frontend.close()


# ── security ──────────────────────────────────────────────────────────────────


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_non_loopback_tcp_needs_curve_or_insecure(pool: Pool, clean: None) -> None:
    for endpoint in ("tcp://0.0.0.0:0", "tcp://*:0"):
        with pytest.raises(ConfigError, match="reachable from other machines"):
            ZmqFrontend(pool, endpoint).start()
        ZmqFrontend(pool, endpoint, insecure=True).start().close()
        ZmqFrontend(pool, endpoint, curve_secret_key=zmq.curve_keypair()[1]).start().close()
    loopbacks = ["tcp://localhost:0", "tcp://127.0.0.2:0"]
    if _has_ipv6_loopback():
        loopbacks.append("tcp://[::1]:0")
    for endpoint in loopbacks:
        ZmqFrontend(pool, endpoint).start().close()
    with pytest.raises(ConfigError, match="expected tcp"):
        ZmqFrontend(pool, "udp://127.0.0.1:5").start()


def test_a_taken_endpoint_is_a_clear_error(pool: Pool, server: ZmqFrontend, clean: None, tmp_path: Path) -> None:
    with pytest.raises(OSError, match="in use") as taken:
        ZmqFrontend(pool, server.endpoint).start()
    assert taken.value.errno == errno.EADDRINUSE
    endpoint = f"ipc://{tmp_path}/private/pool.sock"
    with ZmqFrontend(pool, endpoint), pytest.raises(OSError, match="in use"):
        ZmqFrontend(pool, endpoint).start()


def test_ipc_sockets_are_private(pool: Pool, clean: None, tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "pool.sock"
    with ZmqFrontend(pool, f"ipc://{path}") as frontend:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        with Client(frontend.endpoint) as client:
            assert client.shared_memory
            assert client.infer("tiny", torch.zeros(1, 64))["OUTPUT__0"].shape == (1, 64)
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)
    with pytest.raises(ConfigError, match="open to other users"):
        ZmqFrontend(pool, f"ipc://{open_dir}/pool.sock").start()


def test_curve(pool: Pool, clean: None) -> None:
    public, secret = zmq.curve_keypair()
    with ZmqFrontend(pool, "tcp://127.0.0.1:0", curve_secret_key=secret) as frontend:
        assert frontend.curve_public_key == public
        with Client(frontend.endpoint, curve_server_key=public) as client:
            assert client.infer("tiny", torch.zeros(1, 64))["OUTPUT__0"].shape == (1, 64)
        with pytest.raises(ServerConnectionError):
            Client(frontend.endpoint, connect_timeout=2)  # no key: the handshake is refused
        with pytest.raises(ServerConnectionError):
            Client(frontend.endpoint, curve_server_key=zmq.curve_keypair()[0], connect_timeout=2)  # wrong key
    # only listed client keys
    allowed = zmq.curve_keypair()
    with ZmqFrontend(pool, "tcp://127.0.0.1:0", curve_secret_key=secret, curve_client_keys=[allowed[0]]) as frontend:
        with Client(frontend.endpoint, curve_server_key=public, curve_client_key=allowed) as client:
            assert client.infer("tiny", torch.zeros(1, 64))["OUTPUT__0"].shape == (1, 64)
        with pytest.raises(ServerConnectionError):
            Client(frontend.endpoint, curve_server_key=public, connect_timeout=2)


def test_no_server_is_a_clear_error(clean: None) -> None:
    started = time.monotonic()
    with pytest.raises(ServerConnectionError, match="no libtorchrt server answered"):
        Client("tcp://127.0.0.1:1", connect_timeout=0.5)
    assert time.monotonic() - started < 3

"""HeldSocket: non-blocking ROUTER receives and sends through libzmq that keep the GIL,
checked against a real ROUTER and DEALER over ipc:// (no workers, no pool)."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from libtorchrt.transport.heldgil import HeldSocket, PyzmqSocket, held

IDENTITY = b"worker-7"
WAIT = 5.0  # seconds any single message may take to arrive


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def _pair(ctx: zmq.Context, tmp_path: Path, **router_options: int) -> tuple[zmq.Socket, zmq.Socket, HeldSocket]:
    """A ROUTER bound on ipc:// (with ``router_options``), a DEALER connected to it with
    identity ``IDENTITY``, and the HeldSocket over the ROUTER."""
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    for option, value in router_options.items():
        router.setsockopt(getattr(zmq, option), value)
    endpoint = f"ipc://{tmp_path}/router.sock"
    router.bind(endpoint)
    dealer = ctx.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.setsockopt(zmq.IDENTITY, IDENTITY)
    dealer.connect(endpoint)
    sock = held(router)
    assert isinstance(sock, HeldSocket), "libzmq's symbols should be reachable through pyzmq here"
    return router, dealer, sock


@pytest.fixture(params=["held", "pyzmq"])
def pair(request: pytest.FixtureRequest, context: zmq.Context, tmp_path: Path) -> tuple[zmq.Socket, zmq.Socket, Any]:
    """The pair, with the HeldSocket, or with the pyzmq fallback (the same calls) that
    the router uses where libzmq's symbols cannot be found."""
    router, dealer, sock = _pair(context, tmp_path)
    return router, dealer, sock if request.param == "held" else PyzmqSocket(router)


def _next(sock: HeldSocket, timeout: float = WAIT) -> tuple[bytes, bytes, list[Any]]:
    """The next message HeldSocket.recv() gives, polling until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = sock.recv()
        if got is not None:
            return got
        assert time.monotonic() < deadline, "no message arrived"
        sock.sock.poll(50)


def _dealer_recv(dealer: zmq.Socket, timeout: float = WAIT) -> list[bytes]:
    assert dealer.poll(int(timeout * 1000)), "the dealer received nothing"
    return dealer.recv_multipart()


def _connected(router: zmq.Socket, dealer: zmq.Socket, sock: HeldSocket) -> None:
    """Wait until the ROUTER knows the dealer (a first message went through)."""
    dealer.send(b"hello")
    assert _next(sock) == (IDENTITY, b"hello", [])


def test_recv_returns_none_when_nothing_waits(pair: tuple[zmq.Socket, zmq.Socket, HeldSocket]) -> None:
    """recv() does not block: None at once, with and without a connected peer."""
    router, dealer, sock = pair
    start = time.monotonic()
    assert sock.recv() is None
    _connected(router, dealer, sock)
    assert sock.recv() is None  # the one message was taken; nothing else waits
    assert time.monotonic() - start < WAIT


def test_a_header_only_message_arrives_with_its_identity(pair: tuple[zmq.Socket, zmq.Socket, HeldSocket]) -> None:
    """[header] from a DEALER arrives as (identity, header, [])."""
    _, dealer, sock = pair
    dealer.send(b"\x93\x01\x02header")
    assert _next(sock) == (IDENTITY, b"\x93\x01\x02header", [])


@pytest.mark.parametrize("size", [0, 1, 29, 64, 1000, 100_000, 3_000_000])
def test_headers_of_any_size_arrive_whole(pair: tuple[zmq.Socket, zmq.Socket, HeldSocket], size: int) -> None:
    """Headers below and above libzmq's in-message storage (and empty) come back
    byte for byte."""
    _, dealer, sock = pair
    header = bytes((i * 7 + size) % 256 for i in range(size))
    dealer.send(header)
    identity, got, frames = _next(sock)
    assert identity == IDENTITY and got == header and frames == []


def test_data_frames_arrive_as_zmq_frames(pair: tuple[zmq.Socket, zmq.Socket, HeldSocket]) -> None:
    """[header, big frame, small frame] arrives with the data as zmq.Frames whose
    bytes match what was sent."""
    _, dealer, sock = pair
    big = bytes(range(256)) * 8192  # 2 MiB
    dealer.send_multipart([b"hdr", big, b"tail"])
    identity, header, frames = _next(sock)
    assert (identity, header) == (IDENTITY, b"hdr")
    assert len(frames) == 2
    assert all(isinstance(f, zmq.Frame) for f in frames)
    assert frames[0].bytes == big and frames[1].bytes == b"tail"


def test_send_reaches_the_dealer(pair: tuple[zmq.Socket, zmq.Socket, HeldSocket]) -> None:
    """send(identity, header) arrives at that dealer as [header]; send with frames
    arrives as [header, *frames]."""
    router, dealer, sock = pair
    _connected(router, dealer, sock)
    sock.send(IDENTITY, b"reply")
    assert _dealer_recv(dealer) == [b"reply"]
    sock.send(IDENTITY, b"")
    assert _dealer_recv(dealer) == [b""]
    big = b"\xab" * 1_500_000
    sock.send(IDENTITY, b"with-frames", [big, zmq.Frame(b"second")])
    assert _dealer_recv(dealer) == [b"with-frames", big, b"second"]


def test_send_to_an_unknown_peer_raises_with_router_mandatory(context: zmq.Context, tmp_path: Path) -> None:
    """With ROUTER_MANDATORY, a send to an identity nobody has raises
    ZMQError(EHOSTUNREACH), with or without frames, and the socket keeps working."""
    router, dealer, sock = _pair(context, tmp_path, ROUTER_MANDATORY=1)
    _connected(router, dealer, sock)
    with pytest.raises(zmq.ZMQError) as info:
        sock.send(b"nobody", b"lost")
    assert info.value.errno == errno.EHOSTUNREACH
    with pytest.raises(zmq.ZMQError) as info:
        sock.send(b"nobody", b"lost", [b"x" * 100_000])
    assert info.value.errno == errno.EHOSTUNREACH
    sock.send(IDENTITY, b"still fine")
    assert _dealer_recv(dealer) == [b"still fine"]
    assert sock.recv() is None


def test_many_messages_back_to_back_arrive_in_order(pair: tuple[zmq.Socket, zmq.Socket, HeldSocket]) -> None:
    """Hundreds of messages, some with data frames read through pyzmq between held
    reads, arrive complete and in order both ways."""
    router, dealer, sock = pair
    _connected(router, dealer, sock)
    n = 500
    for i in range(n):
        parts = [f"m{i}".encode()]
        if i % 7 == 0:
            parts.append(i.to_bytes(4, "little") * 20_000)
        dealer.send_multipart(parts)
    for i in range(n):
        identity, header, frames = _next(sock)
        assert identity == IDENTITY and header == f"m{i}".encode()
        if i % 7 == 0:
            assert [f.bytes for f in frames] == [i.to_bytes(4, "little") * 20_000]
        else:
            assert frames == []
    assert sock.recv() is None
    for i in range(n):
        sock.send(IDENTITY, f"r{i}".encode(), [b"f" * 70_000] if i % 11 == 0 else ())
    for i in range(n):
        expected = [f"r{i}".encode()] + ([b"f" * 70_000] if i % 11 == 0 else [])
        assert _dealer_recv(dealer) == expected


def test_sends_past_the_high_water_mark_wait_and_lose_nothing(context: zmq.Context, tmp_path: Path) -> None:
    """With tiny high-water marks and ROUTER_MANDATORY, a burst of sends to a slow
    reader fills its queue; every message still arrives, whole and in order."""
    router, dealer, sock = _pair(context, tmp_path, ROUTER_MANDATORY=1, SNDHWM=1)
    dealer.setsockopt(zmq.RCVHWM, 1)
    _connected(router, dealer, sock)
    n = 2000
    errors: list[BaseException] = []

    def send_all() -> None:
        try:
            for i in range(n):
                sock.send(IDENTITY, i.to_bytes(4, "little") * 256)
        except BaseException as e:
            errors.append(e)

    sender = threading.Thread(target=send_all, daemon=True)
    sender.start()
    time.sleep(0.2)  # let the queues fill while nobody reads
    got = [_dealer_recv(dealer) for _ in range(n)]
    sender.join(WAIT)
    assert not sender.is_alive() and not errors, errors
    assert got == [[i.to_bytes(4, "little") * 256] for i in range(n)]
    assert not dealer.poll(50)

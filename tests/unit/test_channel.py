"""A worker's request channel (transport/channel.py): real socket pairs, real datagrams."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from libtorchrt.transport.channel import MAX_DATAGRAM, Channel, pair


@pytest.fixture
def ends() -> tuple[Channel, socket.socket]:
    mine, theirs = pair()
    yield mine, theirs
    mine.close()
    theirs.close()


def test_a_message_keeps_its_bounds_both_ways(ends: tuple[Channel, socket.socket]) -> None:
    mine, theirs = ends
    mine.send(b"one")
    mine.send(b"two" * 1000)
    assert theirs.recv(MAX_DATAGRAM + 1) == b"one"
    assert theirs.recv(MAX_DATAGRAM + 1) == b"two" * 1000
    theirs.send(b"reply")
    theirs.send(b"x" * MAX_DATAGRAM)
    assert mine.recv() == b"reply"
    assert mine.recv() == b"x" * MAX_DATAGRAM
    assert mine.recv() is None and not mine.closed
    assert mine.sent == 2


def test_a_closed_peer_is_seen_and_its_last_messages_are_read(ends: tuple[Channel, socket.socket]) -> None:
    mine, theirs = ends
    theirs.send(b"last words")
    theirs.close()
    assert mine.recv() == b"last words"
    assert mine.recv() is None and mine.closed
    with pytest.raises(OSError):
        mine.send(b"anyone?")


def test_a_full_buffer_waits_instead_of_dropping(ends: tuple[Channel, socket.socket]) -> None:
    mine, theirs = ends
    n = 400  # 400 x 40 KiB: many times what the socket buffers hold
    got: list[bytes] = []

    def drain() -> None:
        time.sleep(0.2)  # the sender finds the buffer full first
        while len(got) < n:
            got.append(theirs.recv(MAX_DATAGRAM + 1))

    reader = threading.Thread(target=drain)
    reader.start()
    for i in range(n):
        mine.send(i.to_bytes(4, "little") * (10 << 10))
    reader.join(30)
    assert [int.from_bytes(m[:4], "little") for m in got] == list(range(n))
    assert mine.sent == n

"""``transport.sockets``: owner locks, private directories that outlive a killed owner
only until the next one is made, and bounded receipt of multipart messages (no
processes: a lock held by "another process" is a second open file description, which
``flock`` treats the same way; sockets are ``inproc``)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from libtorchrt.transport.sockets import Bounded, PrivateDir, hold_lock, lock_owner, recv_bounded


@pytest.fixture
def tmpdir_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Private directories are made (and swept) in ``tmp_path``, not the real /tmp."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_a_held_lock_is_not_taken_twice_and_names_its_holder(tmp_path: Path) -> None:
    path = str(tmp_path / "x.lock")
    fd = hold_lock(path)
    assert fd is not None
    try:
        assert lock_owner(path) == os.getpid()
        assert hold_lock(path) is None  # another open file description: refused
    finally:
        os.close(fd)
    again = hold_lock(path)  # released with its descriptor, as at a process's death
    assert again is not None
    os.close(again)


def test_a_lock_on_a_file_unlinked_by_its_last_holder_is_not_kept(tmp_path: Path) -> None:
    path = str(tmp_path / "x.lock")
    first = hold_lock(path)
    assert first is not None
    stale = os.open(path, os.O_RDWR)  # a contender opened it before the holder let go
    os.unlink(path)
    os.close(first)
    try:
        fd = hold_lock(path)  # makes a new file: a lock on the unlinked one guards nothing
        assert fd is not None
        assert os.fstat(fd).st_ino == os.stat(path).st_ino != os.fstat(stale).st_ino
        os.close(fd)
    finally:
        os.close(stale)
    with pytest.raises(FileNotFoundError):
        hold_lock(str(tmp_path / "missing.lock"), create=False)


def test_a_lock_file_is_never_followed_through_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("not yours")
    (tmp_path / "x.lock").symlink_to(target)
    with pytest.raises(OSError):
        hold_lock(str(tmp_path / "x.lock"))
    assert target.read_text() == "not yours"


def test_a_dead_owners_private_directory_is_removed_by_the_next(tmpdir_here: Path) -> None:
    dead = PrivateDir(prefix="libtorchrt-test-")
    (Path(dead.path) / "router").write_text("a socket file")
    os.close(dead._lock_fd)  # its owner died: the kernel dropped its lock
    dead._lock_fd = -1
    live = PrivateDir(prefix="libtorchrt-test-")
    no_lock = tempfile.mkdtemp(prefix="libtorchrt-test-")  # being made, or by an older version
    (tmpdir_here / "libtorchrt-test-link").symlink_to(live.path)
    other_prefix = PrivateDir(prefix="other-")
    os.close(other_prefix._lock_fd)
    other_prefix._lock_fd = -1
    try:
        newest = PrivateDir(prefix="libtorchrt-test-")
        assert not os.path.exists(dead.path)
        assert os.path.isdir(live.path) and os.path.isdir(no_lock) and os.path.isdir(other_prefix.path)
        assert os.path.islink(tmpdir_here / "libtorchrt-test-link")
        assert (os.stat(newest.path).st_mode & 0o777) == 0o700
        newest.close()
        newest.close()  # idempotent
        assert not os.path.exists(newest.path)
    finally:
        live.close()
        other_prefix.close()
        os.rmdir(no_lock)


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket, zmq.Socket]]:
    ctx = zmq.Context(1)
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    router.rcvtimeo = dealer.rcvtimeo = 5000
    router.bind("inproc://bounded")
    dealer.connect("inproc://bounded")
    yield router, dealer
    router.close(linger=0)
    dealer.close(linger=0)
    ctx.term()


def _next(router: zmq.Socket, max_frames: int, max_bytes: int | None) -> Bounded:
    assert router.poll(5000)
    return recv_bounded(router, max_frames, max_bytes)


def test_recv_bounded_takes_a_message_within_bounds(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    router, dealer = pair
    dealer.send_multipart([b"header", b"a" * 10, b"b" * 20])
    got = _next(router, 3, 40)
    assert not got.refused and [f.bytes for f in got.frames] == [b"header", b"a" * 10, b"b" * 20]
    assert (got.count, got.nbytes) == (3, 36)
    with pytest.raises(zmq.Again):
        recv_bounded(router, 3, 40)


@pytest.mark.parametrize(
    ("frames", "max_frames", "max_bytes", "why"),
    [
        ([b"header", *([b""] * 10)], 4, None, "11 frames"),
        ([b"header", b"x" * 100, b"y" * 100], 10, 150, "206 bytes"),
        ([b"h" * 200, b"x"], 10, 150, "201 bytes"),
    ],
)
def test_recv_bounded_refuses_a_message_over_its_bounds_and_reads_on(
    pair: tuple[zmq.Socket, zmq.Socket], frames: list[bytes], max_frames: int, max_bytes: int | None, why: str
) -> None:
    router, dealer = pair
    dealer.send_multipart(frames)
    dealer.send_multipart([b"next", b"message"])
    got = _next(router, max_frames, max_bytes)
    assert got.refused and why in got.refused, got.refused
    # at most the header is kept (to name the request), and only if it was within bounds
    kept = [f.bytes for f in got.frames]
    assert kept == ([frames[0]] if max_bytes is None or len(frames[0]) <= max_bytes else [])
    assert got.count == len(frames)
    # the whole message was consumed: the next one arrives intact
    following = _next(router, max_frames, max_bytes)
    assert not following.refused and [f.bytes for f in following.frames] == [b"next", b"message"]
    assert following.identity == got.identity

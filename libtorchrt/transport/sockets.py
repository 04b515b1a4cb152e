"""ZeroMQ helpers shared by the front and the workers (used in both processes).

Endpoints live in a private directory (mode 0700) so that no other user can connect
to a worker's socket; sockets are used by exactly one thread each.

A process that is SIGKILLed cannot remove its directories and socket files, so each
one it makes is marked by an ``flock`` that it holds for its whole life: the kernel
drops the lock when the process dies, however it dies. A later process takes the lock
of what it finds: if it gets it, the owner is gone and the leftovers are removed; if
not, the owner lives and nothing of it is touched (see :func:`hold_lock`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

__all__ = ["COPY_THRESHOLD", "Bounded", "PrivateDir", "hold_lock", "lock_owner", "recv", "recv_bounded", "send"]

#: With ``zero_copy``, frames at least this large are sent without copying.
COPY_THRESHOLD = 64 * 1024


def _nbytes(frame: Any) -> int:
    return frame.nbytes if hasattr(frame, "nbytes") else len(frame)


def send(
    sock: zmq.Socket,
    header: bytes,
    frames: Sequence[Any] = (),
    identity: bytes | None = None,
    zero_copy: bool = False,
) -> None:
    """Send one multipart message: ``[identity,] header, *frames``.

    ``zero_copy`` lets ZeroMQ send big frames from the caller's memory. pyzmq then
    starts a process-wide helper thread (with its own context) to learn when libzmq is
    done with each buffer; workers use it, the front does not (it runs in the user's
    process, where a pool must leave nothing behind), so the front copies instead. Big
    frames only occur in the front when an arena is full.
    """
    if identity is not None:
        sock.send(identity, zmq.SNDMORE)
    if not frames:
        sock.send(header)
        return
    sock.send(header, zmq.SNDMORE)
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        copy = not zero_copy or _nbytes(frame) < COPY_THRESHOLD
        sock.send(frame, zmq.SNDMORE if i < last else 0, copy=copy)


def recv(sock: zmq.Socket, flags: int = 0, routed: bool = False) -> tuple[bytes, bytes, list[zmq.Frame]]:
    """Receive one multipart message as ``(identity, header, [data frames])``.

    The identity (only ``routed``, on a ROUTER socket; else ``b""``) and the header are
    copied into bytes, cheaper than zero-copy frames for a few dozen bytes; data
    frames (big tensors) are kept as zero-copy frames.

    Raises:
        zmq.Again: with ``zmq.NOBLOCK``, no message is waiting.
    """
    identity = b""
    if routed:
        identity = sock.recv(flags)
        if not sock.get(zmq.RCVMORE):
            return identity, b"", []
        flags = 0  # the rest of a message is already there
    header = sock.recv(flags)
    rest: list[zmq.Frame] = []
    while sock.get(zmq.RCVMORE):
        rest.append(sock.recv(copy=False))
    return identity, header, rest


@dataclass(slots=True)
class Bounded:
    """One message of a ROUTER socket, read by :func:`recv_bounded`.

    ``frames`` are the message's frames after the identity (the header first). When
    the message was refused, ``refused`` says why and ``frames`` holds at most its
    header (to name the request in the answer); the rest was released as it was read.
    ``count`` and ``nbytes`` are the frames (after the identity) and bytes it had.
    """

    identity: bytes
    frames: list[zmq.Frame] = field(default_factory=list)
    refused: str = ""
    count: int = 0
    nbytes: int = 0


def recv_bounded(sock: zmq.Socket, max_frames: int, max_bytes: int | None) -> Bounded:
    """Receive one message from a ROUTER socket, refusing it once it has more than
    ``max_frames`` frames or more than ``max_bytes`` bytes in all (None: no limit).

    libzmq bounds each frame (``ZMQ_MAXMSGSIZE``) but not their number or their sum, and
    delivers a message whole: by the time its first frame can be read, all of it is in
    libzmq's memory. So this is the earliest point to judge it: frames past the bound
    are released one by one as they are read, those kept so far are dropped, and the
    caller decodes or allocates nothing for it.

    Raises:
        zmq.Again: no message is waiting.
    """
    identity = sock.recv(zmq.NOBLOCK)
    out = Bounded(identity)
    if not sock.get(zmq.RCVMORE):
        return out
    frames = out.frames
    count = total = 0
    more = True
    while more:
        frame = sock.recv(copy=False)
        more = frame.more
        count += 1
        total += len(frame)
        if count > max_frames or (max_bytes is not None and total > max_bytes):
            del frame, frames[1:]  # release what was kept, but the header
            while more:  # each further frame is released as soon as it is read
                frame = sock.recv(copy=False)
                more = frame.more
                count += 1
                total += len(frame)
            limit = "" if max_bytes is None else f" and {max_bytes} bytes"
            out.refused = f"a message of {count} frames and {total} bytes; at most {max_frames} frames{limit} are taken"
            break
        frames.append(frame)
    out.count, out.nbytes = count, total
    return out


#: the lock file that marks a private directory as its owner's (see the module docstring)
_OWNER = ".owner.lock"
#: its public name: a worker whose front died removes it with the front's directory
OWNER_LOCK = _OWNER


def hold_lock(path: str, *, create: bool = True) -> int | None:
    """Take the exclusive ``flock`` on the file ``path`` (created mode 0600 when missing
    and ``create``); it is held until the returned descriptor is closed, or the process
    dies. The file holds the holder's pid, for error messages (:func:`lock_owner`).

    Returns:
        The descriptor holding the lock, or None: another (live) process holds it.

    Raises:
        FileNotFoundError: ``path`` does not exist and not ``create``.
        OSError: the file cannot be opened (e.g. another user's, or a symbolic link).
    """
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    while True:
        fd = os.open(path, flags, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        # The last holder may have unlinked the file as it let go, after we opened it:
        # a lock on a file no longer at ``path`` guards nothing; take the one there now.
        try:
            now = os.stat(path, follow_symlinks=False)
            held = os.fstat(fd)
            same = (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)
        except FileNotFoundError:
            same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            except OSError:
                pass  # the pid is only for messages
            return fd
        os.close(fd)
        if not create:
            raise FileNotFoundError(errno.ENOENT, "lock file removed", path)


def lock_owner(path: str) -> int | None:
    """The pid written in a lock file by its holder (None if unreadable)."""
    try:
        with open(path, "rb") as f:
            return int(f.read(32).split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _sweep(prefix: str) -> None:
    """Remove the private directories of dead processes: this user's directories named
    ``prefix...`` in the temporary directory whose owner lock nobody holds. A directory
    without a lock file (being made right now, or by an older version) is left alone."""
    uid = os.getuid()
    try:
        entries = list(os.scandir(tempfile.gettempdir()))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
                continue
            fd = hold_lock(os.path.join(entry.path, _OWNER), create=False)
        except OSError:
            continue
        if fd is None:
            continue  # its owner lives
        try:
            shutil.rmtree(entry.path, ignore_errors=True)
        finally:
            os.close(fd)


class PrivateDir:
    """A temporary directory of mode 0700 for ``ipc://`` endpoints; removed by close().

    Its owner holds an ``flock`` on a file in it for as long as the directory exists, so
    that a directory left by a process that was killed is recognised and removed by the
    next ``PrivateDir`` made with the same prefix (in any process of the same user),
    while a live process's directory is never touched.
    """

    def __init__(self, prefix: str = "libtorchrt-") -> None:
        _sweep(prefix)
        self.path = tempfile.mkdtemp(prefix=prefix)  # mkdtemp creates it 0700
        self._lock_fd = -1
        try:
            os.chmod(self.path, 0o700)
            # Locked under a temporary name, then renamed: a sweeper that finds the
            # lock file always finds it held (it skips a directory without one).
            staging = os.path.join(self.path, _OWNER + ".new")
            fd = hold_lock(staging)
            if fd is None:  # a new file in a new directory: nobody else can hold it
                raise OSError(errno.EBUSY, "the lock of a new private directory is taken", staging)
            self._lock_fd = fd
            os.rename(staging, os.path.join(self.path, _OWNER))
        except BaseException:
            self.close()
            raise

    def endpoint(self, name: str) -> str:
        return f"ipc://{os.path.join(self.path, name)}"

    def close(self) -> None:
        """Remove the directory, then let go of its lock. Idempotent."""
        shutil.rmtree(self.path, ignore_errors=True)
        fd, self._lock_fd = self._lock_fd, -1
        if fd >= 0:
            os.close(fd)

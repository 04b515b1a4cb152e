"""ZeroMQ helpers shared by the front and the workers (used in both processes).

Endpoints live in a private directory (mode 0700) so that no other user can connect
to a worker's socket; sockets are used by exactly one thread each.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import zmq

__all__ = ["COPY_THRESHOLD", "PrivateDir", "recv", "send"]

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


class PrivateDir:
    """A temporary directory of mode 0700 for ``ipc://`` endpoints; removed by close()."""

    def __init__(self, prefix: str = "libtorchrt-") -> None:
        self.path = tempfile.mkdtemp(prefix=prefix)  # mkdtemp creates it 0700
        os.chmod(self.path, 0o700)

    def endpoint(self, name: str) -> str:
        return f"ipc://{os.path.join(self.path, name)}"

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

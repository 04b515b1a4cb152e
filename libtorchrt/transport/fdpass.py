"""Handing shared-memory arenas to an unrelated process (used by remote clients and the
server's frontend).

The front gives its workers their arenas at start (``pass_fds``). A remote client on the
same host is not our child, so its arenas cross a Unix socket instead, as ``SCM_RIGHTS``
ancillary data (``socket.send_fds``). The socket is ``SOCK_SEQPACKET``: each message
arrives whole, with its descriptors, and a closed peer reads as end-of-file, so the
connection doubles as the peer's death notice.

A peer may be hostile. A memfd it hands over could be shrunk after we map it, and
touching a page beyond its end kills the reader with SIGBUS; so arenas that cross are
*sealed* (``F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL``) before they are sent, and the
receiver refuses a descriptor that is not sealed so, not a memfd, or not of the size it
claims.
"""

from __future__ import annotations

import array
import fcntl
import mmap
import os
import socket
import stat

from .arena import Arena

__all__ = ["MAX_MESSAGE", "peer_closed", "recv_message", "sealed_arena", "send_message", "take_arena"]

#: The largest hand-off message (a small msgpack header); longer ones are refused.
MAX_MESSAGE = 4096
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def sealed_arena(size: int, name: str) -> Arena:
    """A new memfd arena of ``size`` bytes (rounded up to a page) whose size is sealed,
    so that a process it is handed to can map it safely."""
    page = mmap.PAGESIZE
    size = (max(size, page) + page - 1) // page * page
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return Arena(size, fd=fd, name=name)


def take_arena(fd: int, size: int, max_size: int) -> Arena:
    """Map a memfd received from a peer, checking it first; the descriptor is closed
    either way (the mapping is all the receiver keeps).

    Raises:
        ValueError: ``fd`` is not a memfd of exactly ``size`` bytes (at most
            ``max_size``) whose size is sealed.
    """
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("the descriptor is not a memfd")
        if not 0 < size <= max_size or info.st_size != size or size % mmap.PAGESIZE:
            raise ValueError(f"an arena of {info.st_size} bytes, announced as {size} (at most {max_size})")
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            raise ValueError("the descriptor is not a sealable memfd") from None
        if seals & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL) != fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL:
            raise ValueError("the arena's size is not sealed (F_SEAL_SHRINK, F_SEAL_SEAL)")
        arena = Arena(size, fd=fd)  # closes fd if mapping fails
    except BaseException:
        try:
            os.close(fd)
        except OSError:
            pass  # already closed by Arena
        raise
    arena.close_fd()
    return arena


def send_message(sock: socket.socket, payload: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
    """Send one hand-off message with ``fds`` attached (blocking)."""
    if fds:
        socket.send_fds(sock, [payload], list(fds))
    else:
        sock.sendall(payload)


def recv_message(sock: socket.socket, maxfds: int = 1) -> tuple[bytes, list[int]]:
    """Receive one hand-off message and the descriptors attached to it.

    Returns ``(b"", [])`` at end-of-file (the peer closed or died).

    Raises:
        ValueError: the message was too long or carried more than ``maxfds``
            descriptors (any received are closed first).
        BlockingIOError: a non-blocking socket has nothing to read.
    """
    fds = array.array("i")
    msg, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(maxfds * fds.itemsize))
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    received = list(fds)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(received) > maxfds:
        for fd in received:
            os.close(fd)
        raise ValueError("hand-off message too long, or with too many descriptors")
    return msg, received


def peer_closed(conn: socket.socket | None) -> bool:
    """Whether the other end of a non-blocking connection that carries nothing more
    (once the hand-off is done) closed it: readable with no data, or an error."""
    try:
        return not (conn.recv(1) if conn is not None else b"")
    except BlockingIOError:
        return False
    except OSError:
        return True

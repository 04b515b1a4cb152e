"""A worker's request channel: a ``SOCK_SEQPACKET`` socket pair beside its ZeroMQ socket.

Requests from the front to one of its own workers, and the replies, travel here as one
datagram each (the wire header: ``wire.encode`` of a REQUEST or a RESPONSE). A message
over ZeroMQ ``ipc://`` passes the libzmq I/O thread of the sender and of the receiver,
two wake-ups more each way; here a send wakes the receiving thread itself
(docs/measurements/front-profile.md has the cost of each). ZeroMQ keeps everything
else: READY and FAILED, RELEASE and SHUTDOWN, warm-up requests, and any message with
data frames (a big tensor whose arena was full) or a header too big for a datagram.

The front's end sends and receives keeping the GIL (libc's ``send``/``recv`` through
ctypes prototypes that do not let it go, as ``heldgil.py`` does for libzmq): the router
thread that let go of it would wait to get it back behind the callers' threads.

Used by the front's router thread (its end) and by the worker's main thread (the other).
"""

from __future__ import annotations

import ctypes
import errno
import socket

from .heldgil import _prototype

__all__ = ["MAX_DATAGRAM", "Channel", "pair"]

#: The largest message sent over a channel; a bigger one goes over ZeroMQ. Both ends'
#: buffers hold a few of them (the front sends at most ``max_inflight`` ahead).
MAX_DATAGRAM = 48 << 10
#: Socket buffer asked for on both ends (the kernel may cap it at ``wmem_max``).
_BUFFER = 1 << 20

_libc: tuple[object, object] | None = None


def _functions() -> tuple[object, object]:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None)
        args = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        send = _prototype(ctypes.c_ssize_t, *args)(("send", libc))
        recv = _prototype(ctypes.c_ssize_t, *args)(("recv", libc))
        _libc = (send, recv)
    return _libc


def pair() -> tuple[Channel, socket.socket]:
    """A new channel: the front's end, and the worker's socket (to pass to the worker,
    and close in the front once it is started)."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (mine, theirs):
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            s.setsockopt(socket.SOL_SOCKET, option, _BUFFER)
    return Channel(mine), theirs


class Channel:
    """The front's end of one worker's channel (router thread only)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        self._send, self._recv = _functions()
        self._buffer = ctypes.create_string_buffer(MAX_DATAGRAM + 1)
        #: the peer closed its end (it exited): nothing more will come
        self.closed = False
        #: messages sent so far
        self.sent = 0

    def send(self, data: bytes) -> None:
        """Send one message (at most :data:`MAX_DATAGRAM` bytes).

        Raises:
            OSError: the worker is gone (``EPIPE``, ``ECONNRESET``).
        """
        while True:
            n = self._send(self.fd, data, len(data), socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)  # type: ignore[operator]
            if n >= 0:
                self.sent += 1
                return
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue
            if err == errno.EAGAIN:  # its buffer is full (a worker far behind): wait for room
                self.sock.setblocking(True)
                try:
                    self.sock.send(data, socket.MSG_NOSIGNAL)
                finally:
                    self.sock.setblocking(False)
                self.sent += 1
                return
            raise OSError(err, f"worker channel: {errno.errorcode.get(err, err)}")

    def recv(self) -> bytes | None:
        """The next message, or None when none is waiting or the peer is gone
        (:attr:`closed` then becomes True)."""
        if self.closed:
            return None
        while True:
            n = self._recv(self.fd, self._buffer, MAX_DATAGRAM + 1, socket.MSG_DONTWAIT)  # type: ignore[operator]
            if n > 0:
                return ctypes.string_at(self._buffer, n)
            if n == 0:
                self.closed = True
                return None
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue
            if err == errno.EAGAIN:
                return None
            self.closed = True  # ECONNRESET: the worker died
            return None

    def close(self) -> None:
        self.sock.close()
        self.closed = True

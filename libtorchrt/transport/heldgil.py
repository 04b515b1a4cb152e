"""Non-blocking ZeroMQ sends and receives that keep the GIL (the front's router thread).

pyzmq lets go of the GIL around every send and receive, even a non-blocking one that
returns at once. In a process with dozens of busy caller threads that is costly for the
thread that serves them all: each time it lets go, a caller takes the GIL, and the
router waits for it back behind the others, often for CPython's whole switch interval
(5 ms by default). What that cost the router when measured is in
docs/measurements/transport-notes.md.

:class:`HeldSocket` makes the same calls straight into the libzmq pyzmq loaded, through
ctypes prototypes that keep the GIL (``PYFUNCTYPE``), with ``ZMQ_DONTWAIT``: nothing here
can block. A send that would block (the peer's queue is full), and messages with data
frames (big tensors, which stay zero-copy frames), go through pyzmq as before. Where
libzmq's symbols cannot be found, :func:`held` returns a :class:`PyzmqSocket`, the same
calls through pyzmq.
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Sequence
from typing import Any

import zmq

from .sockets import recv as pyzmq_recv
from .sockets import send as pyzmq_send

__all__ = ["HeldSocket", "PyzmqSocket", "held"]

#: size of libzmq's zmq_msg_t (``unsigned char _[64]``, 8-byte aligned)
_MSG_WORDS = 8


def _prototype(restype: Any, *argtypes: Any) -> Any:
    """A ctypes function type that keeps the GIL (like ``ctypes.PYFUNCTYPE``) and saves
    errno right after the call (``ctypes.get_errno()``), before anything can change it."""
    flags = ctypes._FUNCFLAG_CDECL | ctypes._FUNCFLAG_PYTHONAPI | ctypes._FUNCFLAG_USE_ERRNO  # type: ignore[attr-defined]

    class Function(ctypes._CFuncPtr):  # type: ignore[name-defined]
        _argtypes_ = argtypes
        _restype_ = restype
        _flags_ = flags

    return Function


class _Lib:
    """libzmq's message functions, resolved through pyzmq's own extension module."""

    def __init__(self) -> None:
        from zmq.backend.cython import _zmq  # the module that links libzmq

        lib = ctypes.CDLL(_zmq.__file__)
        p = ctypes.c_void_p
        self.msg_init = _prototype(ctypes.c_int, p)(("zmq_msg_init", lib))
        self.msg_recv = _prototype(ctypes.c_int, p, p, ctypes.c_int)(("zmq_msg_recv", lib))
        self.msg_data = _prototype(p, p)(("zmq_msg_data", lib))
        self.msg_more = _prototype(ctypes.c_int, p)(("zmq_msg_more", lib))
        self.msg_close = _prototype(ctypes.c_int, p)(("zmq_msg_close", lib))
        self.send = _prototype(ctypes.c_int, p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int)(("zmq_send", lib))


_lib: _Lib | None = None
_tried = False


def held(sock: zmq.Socket) -> HeldSocket | PyzmqSocket:
    """A :class:`HeldSocket` over ``sock``, or a :class:`PyzmqSocket` (the same calls
    through pyzmq) if libzmq cannot be reached."""
    global _lib, _tried
    if not _tried:
        _tried = True
        try:
            _lib = _Lib()
        except (ImportError, OSError, AttributeError):
            _lib = None
    return PyzmqSocket(sock) if _lib is None else HeldSocket(sock, _lib)


class PyzmqSocket:
    """:class:`HeldSocket`'s two calls through pyzmq, which lets go of the GIL around
    each: where libzmq's own symbols cannot be found."""

    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock

    def recv(self) -> tuple[bytes, bytes, list[Any]] | None:
        try:
            return pyzmq_recv(self.sock, zmq.NOBLOCK, routed=True)
        except zmq.Again:
            return None

    def send(self, identity: bytes, header: bytes, frames: Sequence[Any] = ()) -> None:
        pyzmq_send(self.sock, header, frames, identity=identity)


class HeldSocket:
    """One ROUTER socket's non-blocking receive and send, keeping the GIL. Used by the
    thread that owns the socket, beside its ordinary pyzmq calls."""

    def __init__(self, sock: zmq.Socket, lib: _Lib) -> None:
        self.sock = sock
        self._lib = lib
        self._handle = ctypes.c_void_p(sock.underlying)
        self._msg = (ctypes.c_uint64 * _MSG_WORDS)()
        self._msg_ref = ctypes.byref(self._msg)

    def _part(self) -> tuple[bytes, bool] | None:
        """One message part and whether more follow; None if no message is waiting."""
        lib, msg = self._lib, self._msg_ref
        lib.msg_init(msg)
        while True:
            size = lib.msg_recv(msg, self._handle, zmq.DONTWAIT)
            if size >= 0:
                break
            err = ctypes.get_errno()
            if err != errno.EINTR:
                lib.msg_close(msg)
                if err == errno.EAGAIN:
                    return None
                raise zmq.ZMQError(err)
        data = ctypes.string_at(lib.msg_data(msg), size) if size else b""
        more = bool(lib.msg_more(msg))
        lib.msg_close(msg)
        return data, more

    def recv(self) -> tuple[bytes, bytes, list[Any]] | None:
        """The next message as ``(identity, header, [data frames])`` (as
        :func:`~libtorchrt.transport.sockets.recv` with ``routed``), or None if none is
        waiting. Data frames, if any, are received through pyzmq (zero-copy)."""
        first = self._part()
        if first is None:
            return None
        identity, more = first
        if not more:
            return identity, b"", []
        second = self._part()  # a message's parts arrive together: it is there
        if second is None:
            return identity, b"", []
        header, more = second
        rest: list[Any] = []
        while more:
            rest.append(self.sock.recv(copy=False))
            more = bool(self.sock.get(zmq.RCVMORE))
        return identity, header, rest

    def send(self, identity: bytes, header: bytes, frames: Sequence[Any] = ()) -> None:
        """Send ``identity, header, *frames``; like the pyzmq helper, it raises
        ``zmq.ZMQError`` for a peer that is gone (``ROUTER_MANDATORY``)."""
        if frames:
            pyzmq_send(self.sock, header, frames, identity=identity)
            return
        lib, handle = self._lib, self._handle
        if lib.send(handle, identity, len(identity), zmq.DONTWAIT | zmq.SNDMORE) < 0:
            err = ctypes.get_errno()
            if err not in (errno.EAGAIN, errno.EINTR):
                raise zmq.ZMQError(err)
            pyzmq_send(self.sock, header, identity=identity)  # the peer's queue is full: wait
            return
        while lib.send(handle, header, len(header), zmq.DONTWAIT) < 0:
            err = ctypes.get_errno()
            if err == errno.EAGAIN:
                self.sock.send(header)  # completes the message the identity began
                return
            if err != errno.EINTR:
                raise zmq.ZMQError(err)

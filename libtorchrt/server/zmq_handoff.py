"""The shared-memory hand-off with same-host clients (server process, I/O thread).

::

    client                                    this process
    Unix socket ──ATTACH + request memfd────► listener (in a private directory, 0600)
                ◄─ATTACHED + response memfd──  map the client's arena, make the session's

A client whose HELLO shows the server's boot id is told the listener's path in its
WELCOME. It connects, sends ATTACH with its session token and its request arena's
memfd, and receives the session's response arena. The connection is then the
session's (see :mod:`.zmq_sessions`): kept open, so that its end-of-file says the
client is gone.

A peer is bounded before anything is mapped for it: only this user (or root) may
connect, at most :data:`_MAX_UNATTACHED` connections wait to attach (the oldest is
dropped), and an arena larger than ``max_client_arena_bytes`` is refused.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import struct

from ..errors import ProtocolError
from ..transport import fdpass, remote
from ..transport.loop import Loop
from ..transport.sockets import PrivateDir
from .zmq_sessions import Sessions

__all__ = ["Handoff"]

log = logging.getLogger("libtorchrt.server")

#: Unix connections that have not attached yet, at most (the oldest is dropped).
_MAX_UNATTACHED = 64
_UCRED = struct.Struct("3i")


class Handoff:
    """The Unix listener and the connections that have not attached yet (I/O thread,
    but for :meth:`open` and :meth:`close`).

    Args:
        loop: the I/O thread's loop, which watches the listener and the connections.
        sessions: where a token is looked up, and an attached session recorded.
        response_arena_bytes: each session's response arena.
        max_client_arena_bytes: the largest request arena a client may hand over.
    """

    def __init__(self, loop: Loop, sessions: Sessions, response_arena_bytes: int, max_client_arena_bytes: int) -> None:
        self._loop = loop
        self._sessions = sessions
        self._response_arena_bytes = response_arena_bytes
        self._max_client_arena = max_client_arena_bytes
        self._dir: PrivateDir | None = None
        self._listener: socket.socket | None = None
        self._unattached: dict[int, socket.socket] = {}

    @property
    def path(self) -> str:
        """The listener's path, for WELCOME ("" once closed)."""
        return self._listener.getsockname() if self._listener is not None else ""

    def open(self) -> None:
        """Listen in a private directory, and watch the listener."""
        self._dir = PrivateDir(prefix="libtorchrt-server-")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._listener = listener
        path = os.path.join(self._dir.path, "shm.sock")
        listener.bind(path)
        os.chmod(path, 0o600)
        listener.listen(64)
        listener.setblocking(False)
        self._loop.watch(listener.fileno(), self._on_accept)

    def _on_accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. out of descriptors: refuse this one, keep serving
                log.warning("could not accept a shared-memory connection: %s", e)
                return
            conn.setblocking(False)
            _, uid, _ = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
            if uid not in (os.getuid(), 0):  # the directory is 0700; this is a second lock
                conn.close()
                continue
            if len(self._unattached) >= _MAX_UNATTACHED:
                oldest = next(iter(self._unattached))
                self._drop(oldest)
            fd = conn.fileno()
            self._unattached[fd] = conn
            self._loop.watch(fd, functools.partial(self._on_unattached, fd))

    def _drop(self, fd: int) -> None:
        conn = self._unattached.pop(fd, None)
        if conn is not None:
            self._loop.unwatch(fd)
            conn.close()

    def _on_unattached(self, fd: int) -> None:
        conn = self._unattached.get(fd)
        if conn is None:
            return
        try:
            payload, fds = fdpass.recv_message(conn)
        except BlockingIOError:
            return
        except (OSError, ValueError):
            self._drop(fd)
            return
        if not payload:
            for received in fds:
                os.close(received)
            self._drop(fd)
            return
        try:
            self._attach(conn, payload, fds)
        except (ProtocolError, ValueError, OSError) as e:
            for received in fds:
                try:
                    os.close(received)
                except OSError:
                    pass  # taken (and closed) by take_arena
            try:
                fdpass.send_message(conn, remote.encode(remote.Refused(str(e))))
            except OSError:
                pass
            self._drop(fd)
            return
        del self._unattached[fd]  # now the session's, watched as such

    def _attach(self, conn: socket.socket, payload: bytes, fds: list[int]) -> None:
        msg = remote.decode(payload)
        if not isinstance(msg, remote.Attach) or msg.protocol != remote.PROTOCOL_VERSION:
            raise ProtocolError("expected an ATTACH message of this protocol")
        session = self._sessions.by_token(msg.session)
        if session is None:
            raise ProtocolError("unknown session token")
        if len(fds) != 1:
            raise ProtocolError("an ATTACH message carries exactly one descriptor")
        fd = fds.pop()
        request_arena = fdpass.take_arena(fd, msg.size, self._max_client_arena)
        try:
            response_arena = fdpass.sealed_arena(self._response_arena_bytes, "libtorchrt-server-response")
        except BaseException:
            request_arena.close()
            raise
        try:
            assert response_arena.fd is not None
            conn.setblocking(True)
            conn.settimeout(5.0)  # a local peer that does not read its reply is not waited on
            fdpass.send_message(conn, remote.encode(remote.Attached(response_arena.size)), [response_arena.fd])
            conn.setblocking(False)
        except BaseException:
            request_arena.close()
            response_arena.close()
            raise
        response_arena.close_fd()  # the client has it; our mapping is all we keep
        self._sessions.attached(session, conn, request_arena, response_arena)
        log.debug("client %s attached %d bytes of shared memory", session.identity.hex(), msg.size)

    def drop_unattached(self) -> None:
        """Close the connections that did not attach (at shutdown)."""
        for fd in list(self._unattached):
            self._drop(fd)

    def close(self) -> None:
        """Close the listener and its directory (idempotent)."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._dir is not None:
            self._dir.close()
            self._dir = None

"""The ZeroMQ frontend's sessions with its clients (server process, I/O thread).

A session begins with a client's HELLO and is known by three keys: the client's
ZeroMQ identity, the token it shows to attach shared memory, and the descriptor of its
ZeroMQ connection in libzmq (which the ROUTER's monitor names when the connection
closes). It ends on BYE, on a new HELLO from the same identity, when its connection
closes, when its Unix connection reads end-of-file, or when the frontend closes:
requests still queued in the pool are cancelled, outputs of those still running are
dropped when they finish, and its arenas are released.
"""

from __future__ import annotations

import functools
import logging
import secrets
import socket
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from typing import Any

import torch

from ..transport import fdpass
from ..transport import tensors as tensor_io
from ..transport.arena import Allocator, Arena
from ..transport.loop import Loop
from ..transport.wire import DTYPES, TensorDesc

__all__ = ["Session", "Sessions"]

log = logging.getLogger("libtorchrt.server")


class Session:
    """One client connection: its token, its arenas, its requests in the pool."""

    __slots__ = (
        "conn",
        "fd",
        "identity",
        "pending",
        "request_arena",
        "response_allocator",
        "response_arena",
        "token",
    )

    def __init__(self, identity: bytes, fd: int) -> None:
        self.identity = identity
        #: the descriptor of its ZeroMQ connection in libzmq (-1: unknown)
        self.fd = fd
        self.token = secrets.token_bytes(16)
        #: its Unix connection, once it attached shared memory
        self.conn: socket.socket | None = None
        #: the client's request arena, mapped here; the session's response arena
        self.request_arena: Arena | None = None
        self.response_arena: Arena | None = None
        self.response_allocator: Allocator | None = None
        #: request id -> the pool's future
        self.pending: dict[int, Future[Any]] = {}

    def input_slot(self, d: TensorDesc) -> torch.Tensor:
        """A tensor viewing an ``ARENA`` input in the client's arena (no copy)."""
        arena = self.request_arena
        if arena is None:
            raise ValueError("the session has no shared memory")
        nbytes = d.nbytes
        dtype = DTYPES[d.dtype]
        if d.where + nbytes > arena.size or d.where % dtype.itemsize:
            raise ValueError(f"slot [{d.where}, {d.where + nbytes}) does not fit the {arena.size}-byte arena")
        # numpy views keep the GIL (see transport.tensors)
        return tensor_io.as_tensor(arena.bytes[d.where : d.where + nbytes], dtype, d.shape)[0]

    def release(self, offsets: list[int]) -> None:
        allocator = self.response_allocator
        if allocator is None:
            return
        for offset in offsets:
            try:
                allocator.free(offset)
            except ValueError:  # a client's mistake hurts only its own session
                log.debug("session released unknown response slot %d", offset)

    def close(self) -> None:
        """Release what the session holds (its requests are the frontend's to cancel)."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        for arena in (self.request_arena, self.response_arena):
            if arena is not None:
                arena.close()  # a tensor the pool still holds keeps its mapping until freed
        self.request_arena = self.response_arena = None
        self.response_allocator = None


class Sessions:
    """The live sessions, by identity, token and connection descriptor (I/O thread only).

    Iterating gives the sessions; a session's Unix connection, once attached, is
    watched in ``loop`` (its end-of-file ends the session).
    """

    def __init__(self, loop: Loop) -> None:
        self._loop = loop
        self._by_identity: dict[bytes, Session] = {}
        self._by_token: dict[bytes, Session] = {}
        self._by_fd: dict[int, set[bytes]] = {}

    def __len__(self) -> int:
        return len(self._by_identity)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._by_identity.values()))

    def get(self, identity: bytes) -> Session | None:
        return self._by_identity.get(identity)

    def by_token(self, token: bytes) -> Session | None:
        """The live session that ``token`` names, if it has not attached shared memory yet."""
        session = self._by_token.get(token)
        if session is None or session.conn is not None or self._by_identity.get(session.identity) is not session:
            return None
        return session

    def busy(self) -> bool:
        """Whether a session has requests in the pool."""
        return any(s.pending for s in self._by_identity.values())

    def begin(self, identity: bytes, fd: int) -> Session:
        """A new session for the client ``identity`` (whose earlier one has ended) on
        the ZeroMQ connection ``fd``."""
        session = Session(identity, fd)
        self._by_identity[identity] = session
        self._by_token[session.token] = session
        self._by_fd.setdefault(fd, set()).add(identity)
        return session

    def attached(self, session: Session, conn: socket.socket, request_arena: Arena, response_arena: Arena) -> None:
        """The session attached shared memory over ``conn``, which it keeps."""
        session.conn = conn
        session.request_arena = request_arena
        session.response_arena = response_arena
        session.response_allocator = Allocator(response_arena.size)
        self._loop.watch(conn.fileno(), functools.partial(self._on_conn, session))

    def _on_conn(self, session: Session) -> None:
        # An attached session's connection carries nothing more: readable means the
        # client closed it or died.
        if fdpass.peer_closed(session.conn):
            log.debug("client %s closed its shared-memory connection", session.identity.hex())
            self.end(session)

    def disconnected(self, fds: Iterable[int]) -> None:
        """End the sessions of the ZeroMQ connections ``fds``, which closed."""
        for fd in fds:
            for identity in self._by_fd.pop(fd, set()):
                session = self._by_identity.get(identity)
                if session is not None:
                    log.debug("client %s disconnected", identity.hex())
                    self.end(session)

    def end(self, session: Session) -> None:
        """The session is over (BYE, disconnection, or the frontend closing)."""
        if self._by_identity.get(session.identity) is session:
            del self._by_identity[session.identity]
        self._by_token.pop(session.token, None)
        same_fd = self._by_fd.get(session.fd)
        if same_fd is not None:
            same_fd.discard(session.identity)
            if not same_fd:
                del self._by_fd[session.fd]
        for future in session.pending.values():
            future.cancel()  # queued ones are dropped; running ones finish, unread
        session.pending.clear()
        if session.conn is not None:
            self._loop.unwatch(session.conn.fileno())
        session.close()

"""A client's sessions with the server: handshake, shared memory, end (client process, I/O thread).

A session starts with the HELLO handshake, sent each time the ZeroMQ handshake with
the server succeeds (the DEALER's monitor says so): WELCOME checks the protocol
version and, when the server runs on the same kernel (same boot id) and
``shared_memory`` allows, names the Unix socket over which the client hands its
request arena over (ATTACH) and receives the session's response arena (ATTACHED).
The Unix connection stays open: the server closing it ends the session.

A session ends when the ZeroMQ connection drops, the server closes the Unix
connection, or a new connection starts another. Its requests in flight fail with
:class:`ServerConnectionError` once replies already sent have had :data:`_SETTLE` to
arrive, and the next connection starts a new session; requests made meanwhile wait
for it (see :mod:`.requests`).
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import zmq
from zmq.utils.monitor import recv_monitor_message

from ..errors import ProtocolError, ServerConnectionError
from ..transport import fdpass, remote
from ..transport.arena import Arena
from ..transport.loop import Deadlines, Loop

if TYPE_CHECKING:
    from .requests import Requests

__all__ = ["HANDSHAKE_FAILED", "Session", "Sessions"]

log = logging.getLogger("libtorchrt.client")

#: After the connection drops, replies already received are still read this long
#: before the requests still in flight fail.
_SETTLE = 0.2
#: The monitor events of a ZeroMQ handshake that failed (CURVE refused, mostly).
HANDSHAKE_FAILED = {
    getattr(zmq, name)
    for name in ("EVENT_HANDSHAKE_FAILED_NO_DETAIL", "EVENT_HANDSHAKE_FAILED_PROTOCOL", "EVENT_HANDSHAKE_FAILED_AUTH")
}


class Session:
    """One server session: its token and, with shared memory, the server's response
    arena mapped here and the Unix connection that goes with it."""

    def __init__(self, welcome: remote.Welcome, generation: int) -> None:
        self.token = welcome.session
        self.max_request_bytes = welcome.max_request_bytes or None
        self.generation = generation
        self.conn: socket.socket | None = None
        self.response_arena: Arena | None = None
        self.lost = False

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.response_arena is not None:
            self.response_arena.close()  # outputs still alive keep their mapping
            self.response_arena = None


class Sessions:
    """The current session, those lost whose requests settle soon, and the handshake
    that starts the next (I/O thread only, but :attr:`ready`, :attr:`last_error`,
    :attr:`current` and :attr:`shm`, which callers read).

    Args:
        endpoint: the server's endpoint, for error messages.
        sock: the connection's DEALER socket; ``monitor``: its monitor socket.
        loop: the I/O thread's loop, which watches each session's Unix connection.
        requests: the requests, sent when a session begins and failed when it is lost.
        arena: the request arena to hand over, or None (no shared memory).
        shared_memory: the client's ``shared_memory`` argument (None: when possible).
        fail: called with the error when the connection fails for good (another
            protocol, a refused handshake, shared memory required but not had).
        serving: whether a new session may start (the client is neither closing nor broken).
    """

    def __init__(
        self,
        endpoint: str,
        sock: zmq.Socket,
        monitor: zmq.Socket,
        loop: Loop,
        requests: Requests,
        arena: Arena | None,
        shared_memory: bool | None,
        fail: Callable[[BaseException], None],
        serving: Callable[[], bool],
    ) -> None:
        self.endpoint = endpoint
        self.sock = sock
        self.monitor = monitor
        self.loop = loop
        self.requests = requests
        self.arena = arena
        self.shared_memory = shared_memory
        self._fail = fail
        self._serving = serving
        self.current: Session | None = None
        self.lost: list[Session] = []  # sessions whose in-flight requests settle soon
        self.generation = 0
        #: the ZeroMQ handshake succeeded and the connection did not drop since
        self.connected = False
        self.hello_sent = False
        #: whether requests are placed in the arena: the current session attached it
        self.shm = False
        self.last_error = ""
        #: set once the first session began, or the connection failed for good
        self.ready = threading.Event()
        #: generation -> when its lost session's requests fail (always live: settling
        #: may start a new session)
        self._settles: Deadlines[int] = Deadlines(lambda generation: True)

    @property
    def _want_shm(self) -> bool:
        return self.shared_memory is not False and self.arena is not None

    def _failed(self, error: BaseException) -> None:
        self._fail(error)
        self.ready.set()

    # ── the ZeroMQ connection ──────────────────────────────────────────────────

    def on_monitor(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind = event["event"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected = True
                self.hello_sent = False
                if self.current is not None:  # a new connection: the old session is gone
                    self.lose(self.current, settle_now=True)  # (which says HELLO)
                if not self.hello_sent:
                    self.hello()
            elif kind == zmq.EVENT_DISCONNECTED:
                self.connected = False
                self.hello_sent = False
                if self.current is not None:
                    self.lose(self.current)
            elif kind in HANDSHAKE_FAILED:
                self.last_error = (
                    "the ZeroMQ handshake failed: the server requires CURVE (curve_server_key), or the key is wrong"
                )
                if not self.ready.is_set():
                    self._failed(
                        ServerConnectionError(
                            f"the server at {self.endpoint} refused the connection: {self.last_error}",
                            endpoint=self.endpoint,
                        )
                    )

    def hello(self) -> None:
        if self._serving():
            self.sock.send(
                remote.encode(remote.Hello(remote.PROTOCOL_VERSION, os.getpid(), remote.boot_id(), self._want_shm))
            )
            self.hello_sent = True

    # ── the server's answer ────────────────────────────────────────────────────

    def refused(self, protocol: int | None) -> None:
        """The server speaks another protocol version."""
        self._failed(
            ProtocolError(
                f"the server at {self.endpoint} speaks libtorchrt client protocol {protocol}; this client speaks "
                f"{remote.PROTOCOL_VERSION}: use the same libtorchrt version on both sides"
            )
        )

    def on_welcome(self, welcome: remote.Welcome) -> None:
        if not self.hello_sent or not welcome.session:
            return
        self.hello_sent = False
        self.generation += 1
        session = Session(welcome, self.generation)
        self.shm = False
        if welcome.shm_path and self._want_shm:
            try:
                self._attach(session, welcome.shm_path)
                self.shm = True
            except (OSError, ValueError, ProtocolError) as e:
                session.close()
                if self.shared_memory:
                    self._failed(
                        ServerConnectionError(
                            f"shared memory with the server at {self.endpoint} failed: {e}", endpoint=self.endpoint
                        )
                    )
                    return
                log.info("no shared memory with the server at %s (%s); tensors travel as frames", self.endpoint, e)
        elif self.shared_memory:
            why = "the server does not offer it" if self._want_shm else "this client has no arena"
            self._failed(
                ServerConnectionError(
                    f"shared_memory=True, but {why} (it runs on another host?)", endpoint=self.endpoint
                )
            )
            return
        self.current = session
        if session.conn is not None:
            self.loop.watch(session.conn.fileno(), functools.partial(self._on_conn, session))
        self.ready.set()
        self.requests.resume(session)

    def _attach(self, session: Session, path: str) -> None:
        """Hand the request arena over and map the session's response arena."""
        arena = self.arena
        assert arena is not None and arena.fd is not None
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        session.conn = conn
        conn.settimeout(5.0)
        conn.connect(path)
        fdpass.send_message(
            conn, remote.encode(remote.Attach(remote.PROTOCOL_VERSION, session.token, arena.size)), [arena.fd]
        )
        payload, fds = fdpass.recv_message(conn)
        if not payload:
            raise ProtocolError("the server closed the shared-memory connection")
        try:
            reply = remote.decode(payload)
            if isinstance(reply, remote.Refused):
                raise ProtocolError(f"refused: {reply.message}")
            if not isinstance(reply, remote.Attached) or len(fds) != 1:
                raise ProtocolError("expected ATTACHED with one descriptor")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        session.response_arena = fdpass.take_arena(fds[0], reply.size, 1 << 40)
        conn.setblocking(False)

    def _on_conn(self, session: Session) -> None:
        """The session's Unix connection is readable: the server ended the session."""
        if fdpass.peer_closed(session.conn):
            self.lose(session)

    # ── the end of a session ───────────────────────────────────────────────────

    def lose(self, session: Session, settle_now: bool = False) -> None:
        """The session is over; its requests in flight fail once replies already sent
        have had a moment to arrive (see _SETTLE)."""
        if session is self.current:
            self.current = None
            self.shm = False
        if session.conn is not None:
            self.loop.unwatch(session.conn.fileno())
        if not session.lost:
            session.lost = True
            self.lost.append(session)
            self._settles.add(time.monotonic() + _SETTLE, session.generation)
        if settle_now:
            self._settle(session.generation)

    def _settle(self, generation: int) -> None:
        for session in [s for s in self.lost if s.generation == generation]:
            self.lost.remove(session)
            error = ServerConnectionError(
                f"the connection to the server at {self.endpoint} was lost before the request was answered",
                endpoint=self.endpoint,
            )
            self.requests.fail_lost(session, error)
            session.close()
        if self.current is None and self.connected and not self.hello_sent:
            # the server ended the session, but the connection stands: start a new one
            self.hello()

    def next_due(self) -> float | None:
        return self._settles.next()

    def run_timers(self, now: float) -> None:
        for generation in self._settles.due(now):
            self._settle(generation)

    def close(self) -> None:
        """Close every session (at shutdown; their requests were failed already)."""
        for session in [self.current, *self.lost]:
            if session is not None:
                session.close()
        self.current = None
        self.lost = []

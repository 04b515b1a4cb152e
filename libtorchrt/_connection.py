"""The I/O side of a ``Client``: its connection, sessions and thread (client process).

::

    caller threads                        client I/O thread                  server (ZmqFrontend)
    ──────────────                        ─────────────────                  ────────────────────
    check inputs, copy tensors > 64 KiB
    into the request arena (a memfd the
    server maps), or keep them as frames
    request(future) ──► inbox ──eventfd─► encode, piggyback releases ─DEALER─► ROUTER ─► pool.submit
    future.result() ◄── set_result ◄───── outputs viewed in the server's ◄─────── RESULT
                                          response arena (or zero-copy frames)
    dropping outputs frees their slots ──► offsets ride on the next request

One I/O thread owns the DEALER socket, its monitor, an eventfd that callers bump and,
on the same host, the Unix connection over which the arenas were handed over. Callers
never touch a socket (a ZeroMQ socket belongs to one thread); they check their inputs
and copy tensors into shared memory in their own thread, so many caller threads copy
in parallel, then hand the request over.

A session starts with the HELLO handshake, sent each time the ZeroMQ handshake with the
server succeeds: it checks the protocol version and, when the server runs on the same
kernel (same boot id) and ``shared_memory`` allows, hands over the arenas. When the
connection drops, requests in flight fail with :class:`ServerConnectionError`, and the
next connection starts a new session; requests made meanwhile wait for it (up to
``connect_timeout``).
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import logging
import os
import socket
import threading
import time
import weakref
from concurrent.futures import Future
from typing import Any

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from ._plain import error_from_plain
from .deadlines import poll_ms
from .errors import PoolClosedError, ProtocolError, ServerConnectionError, TimeoutError
from .transport import fdpass, remote
from .transport import tensors as tensor_io
from .transport.arena import Allocator, Arena
from .transport.sockets import send
from .transport.wire import DTYPES, TensorDesc

__all__ = ["MARGIN", "Connection", "Request"]

log = logging.getLogger("libtorchrt.client")

#: The client waits this much past a request's timeout for the server's own
#: TimeoutError before it gives up on the server.
MARGIN = 2.0
#: After the connection drops, replies already received are still read this long
#: before the requests still in flight fail.
_SETTLE = 0.2
_HANDSHAKE_FAILED = {
    getattr(zmq, name)
    for name in ("EVENT_HANDSHAKE_FAILED_NO_DETAIL", "EVENT_HANDSHAKE_FAILED_PROTOCOL", "EVENT_HANDSHAKE_FAILED_AUTH")
}
_MAX_RELEASES = 1 << 15


class Request:
    """A request (or query) on its way: its placement, future, session and deadline."""

    __slots__ = (
        "expired",
        "frames",
        "future",
        "header_fields",
        "id",
        "model",
        "offsets",
        "session",
        "timeout",
        "what",
    )

    def __init__(self, request_id: int, future: Future[Any], model: str = "", what: str = "") -> None:
        self.id = request_id
        self.future = future
        self.model = model
        #: a query's subject ("models", "health"); "" for an inference request
        self.what = what
        #: the fields of its INFER header, but for the releases added when it is sent
        self.header_fields: tuple[Any, ...] = ()
        self.frames: list[Any] = []
        #: request-arena slots it holds until the server answers
        self.offsets: list[int] = []
        self.timeout: float | None = None
        self.session: _Session | None = None
        #: the caller got a TimeoutError; the server's answer is still awaited (to free
        #: the slots, which the server may still be reading)
        self.expired = False


class _Session:
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


class Connection:
    """Everything a Client owns: its sockets, thread, arena and requests.

    Kept apart from the Client so that a finalizer can close it when a Client is
    dropped unclosed (a finalizer must not hold the object it finalizes).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        curve_server_key: bytes | None,
        curve_client_key: tuple[bytes, bytes] | None,
        shared_memory: bool | None,
        connect_timeout: float,
        request_arena_bytes: int,
        inline_threshold: int,
    ) -> None:
        self.endpoint = endpoint
        self.shared_memory_wanted = shared_memory
        self.connect_timeout = connect_timeout
        self.inline_threshold = inline_threshold
        self.inbox: collections.deque[Request | int] = collections.deque()
        #: (session generation, offset) of response slots whose last tensor died
        self.releases: collections.deque[tuple[int, int]] = collections.deque()
        self.ids = itertools.count(1)
        self.pending: dict[int, Request] = {}  # sent, awaiting an answer
        #: awaiting a session, by id, in the order they came (a dict: a "wait" timer
        #: finds and removes its request at once)
        self.waiting: dict[int, Request] = {}
        self.session: _Session | None = None
        self.lost: list[_Session] = []  # sessions whose in-flight requests settle soon
        self.generation = 0
        self.connected = False
        self.hello_sent = False
        self.fatal: BaseException | None = None
        self.last_error = ""
        self.ready = threading.Event()
        self.closed = False
        self.closing_at: float | None = None
        self.lock = threading.Lock()
        self._timers: list[tuple[float, int, str, int]] = []
        self._timer_seq = itertools.count()
        #: the request arena (shared memory, handed to the server) and its allocator
        self.arena: Arena | None = None
        self.allocator: Allocator | None = None
        #: whether requests are placed in the arena: the session attached it
        self.shm = False
        self.wake_fd = -1
        self.ctx = zmq.Context(1)
        try:
            self.sock = self.ctx.socket(zmq.DEALER)
            self.sock.linger = 100
            self.sock.sndhwm = 0  # never block the I/O thread, never drop a request
            self.sock.rcvhwm = 0
            self.sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)
            self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10000)
            self.sock.setsockopt(zmq.HEARTBEAT_TTL, 10000)
            if curve_server_key is not None:
                public, secret = curve_client_key if curve_client_key is not None else zmq.curve_keypair()
                self.sock.curve_serverkey = curve_server_key
                self.sock.curve_publickey = public
                self.sock.curve_secretkey = secret
            if endpoint.startswith("tcp://["):
                self.sock.ipv6 = True
            events = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
            for event in _HANDSHAKE_FAILED:
                events |= event
            self.monitor = self.sock.get_monitor_socket(events)
            self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            if shared_memory is not False:
                self.arena = fdpass.sealed_arena(request_arena_bytes, "libtorchrt-client-request")
                self.allocator = Allocator(self.arena.size)
            try:
                self.sock.connect(endpoint)
            except zmq.ZMQError as e:
                raise ValueError(f"cannot connect to {endpoint!r}: {e.strerror}") from None
            self.poller = zmq.Poller()
            self.poller.register(self.sock, zmq.POLLIN)
            self.poller.register(self.monitor, zmq.POLLIN)
            self.poller.register(self.wake_fd, zmq.POLLIN)
        except BaseException:
            self._close_resources()
            raise
        self.thread = threading.Thread(target=self._run, name="libtorchrt-client", daemon=True)
        self.thread.start()

    # ── called from caller threads ─────────────────────────────────────────────

    def wait_ready(self, timeout: float) -> None:
        """Block until the first session is established.

        Raises:
            ProtocolError: the server speaks another protocol version.
            ServerConnectionError: no server answered, or the handshake was refused.
        """
        if not self.ready.wait(timeout):
            hint = f" (last error: {self.last_error})" if self.last_error else ""
            raise ServerConnectionError(
                f"no libtorchrt server answered at {self.endpoint} within {timeout:g} s{hint}; is it running, "
                "and does it need curve_server_key?",
                endpoint=self.endpoint,
            )
        if self.fatal is not None:
            raise self.fatal

    def submit(self, request: Request) -> None:
        """Hand a request (or a cancellation: a request id) to the I/O thread.

        Raises:
            ServerConnectionError, ProtocolError: the connection failed for good
                (:attr:`broken`), e.g. the I/O thread died.
            PoolClosedError: the client is closed.
        """
        with self.lock:  # ordered against closing the eventfd
            if self.closed:
                if isinstance(request, Request):
                    self.free(request)
                broken = self.broken
                if broken is not None:
                    raise broken
                raise PoolClosedError("the client is closed")
            self.inbox.append(request)
            os.eventfd_write(self.wake_fd, 1)

    def cancel(self, request_id: int) -> None:
        """Tell the server a request was given up (any thread; a no-op once closed)."""
        with self.lock:
            if not self.closed:
                self.inbox.append(request_id)
                os.eventfd_write(self.wake_fd, 1)

    def free(self, request: Request) -> None:
        offsets, request.offsets = request.offsets, []
        request.frames = []
        if self.allocator is not None:
            for offset in offsets:
                self.allocator.free(offset)

    def stop(self, grace: float) -> None:
        """Let requests in flight finish for up to ``grace`` seconds, then close."""
        with self.lock:
            if self.closing_at is None:
                self.closing_at = time.monotonic() + max(grace, 0.0)
            if self.wake_fd >= 0:
                os.eventfd_write(self.wake_fd, 1)
        if threading.current_thread() is not self.thread:
            self.thread.join(grace + 10.0)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    @property
    def broken(self) -> BaseException | None:
        """Why the client cannot serve any more although the caller did not close it
        (the server's protocol, a refused handshake, the I/O thread's death), or None."""
        return self.fatal if self.closing_at is None else None

    # ── the I/O thread ─────────────────────────────────────────────────────────

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # a bug: every caller must learn it now, not hang
            log.critical("the libtorchrt client's I/O thread failed (server %s)", self.endpoint, exc_info=True)
            if self.fatal is None:
                fatal = ServerConnectionError(
                    f"the client's I/O thread failed ({e!r}); this Client cannot be used any more: close it and "
                    "make a new one",
                    endpoint=self.endpoint,
                )
                fatal.__cause__ = e
                self.fatal = fatal
        finally:
            try:
                self._shutdown()
            except BaseException:
                log.critical("the libtorchrt client could not shut down cleanly", exc_info=True)
                self._fail_everything()
                with contextlib.suppress(Exception):
                    self._close_resources()

    def _loop(self) -> None:
        sock, monitor, wake_fd = self.sock, self.monitor, self.wake_fd
        while True:
            now = time.monotonic()
            if self.closing_at is not None:
                self._fail_waiting(PoolClosedError("the client was closed"))
                if not self.pending or now >= self.closing_at:
                    return
            events = dict(self.poller.poll(poll_ms(self._next_wake(now))))
            # Replies first: a disconnection below must not fail a request whose
            # answer already arrived.
            if sock in events:
                self._on_messages()
            if monitor in events:
                self._on_monitor()
            if wake_fd in events:
                try:
                    os.eventfd_read(wake_fd)
                except BlockingIOError:
                    pass
            if self.inbox:
                self._on_inbox()
            session = self.session
            if session is not None and session.conn is not None and session.conn.fileno() in events:
                self._on_conn(session)
            self._run_timers(time.monotonic())

    # timers: (when, seq, kind, id); kinds: "deadline" (a request's safety net),
    # "wait" (a request waiting too long for a session), "settle" (a lost session)

    def _timer_live(self, kind: str, ident: int) -> bool:
        """Whether a timer still has something to do: its request was not answered."""
        if kind == "deadline":
            request = self.pending.get(ident)
            return request is not None and not request.expired
        if kind == "wait":
            return ident in self.waiting
        return True

    def _add_timer(self, when: float, kind: str, ident: int) -> None:
        timers = self._timers
        if len(timers) > 2 * (len(self.pending) + len(self.waiting)) + 1024:
            # Requests answered long before their deadline leave their timers behind:
            # drop those, so that the heap stays as small as what is in flight.
            self._timers = timers = [t for t in timers if self._timer_live(t[2], t[3])]
            heapq.heapify(timers)
        heapq.heappush(timers, (when, next(self._timer_seq), kind, ident))

    def _next_wake(self, now: float) -> float | None:
        # Timers of requests already answered are dropped as they reach the top, so
        # they never decide a wake-up (a far deadline's timer would sit there for days).
        timers = self._timers
        while timers and not self._timer_live(timers[0][2], timers[0][3]):
            heapq.heappop(timers)
        wake = timers[0][0] - now if timers else None
        if self.closing_at is not None:
            left = self.closing_at - now
            wake = left if wake is None else min(wake, left)
        return None if wake is None else max(wake, 0.0)

    def _run_timers(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, kind, ident = heapq.heappop(timers)
            if kind == "deadline":
                request = self.pending.get(ident)
                if request is not None and not request.expired:
                    self._expire(request)
            elif kind == "wait":
                request = self.waiting.pop(ident, None)
                if request is not None:
                    self._fail(request, self._no_connection())
            elif kind == "settle":
                self._settle(ident)

    def _expire(self, request: Request) -> None:
        request.expired = True
        if not request.future.done():
            what = f"model {request.model!r}" if request.model else f"{request.what}()"
            request.future.set_exception(
                TimeoutError(f"{what}: no answer from the server at {self.endpoint} within {request.timeout} s")
            )
        self._send(remote.Cancel(request.id))

    def _no_connection(self) -> ServerConnectionError:
        hint = f" (last error: {self.last_error})" if self.last_error else ""
        return ServerConnectionError(
            f"no session with the server at {self.endpoint} for {self.connect_timeout:g} s{hint}",
            endpoint=self.endpoint,
        )

    def _on_inbox(self) -> None:
        inbox = self.inbox
        while inbox:
            item = inbox.popleft()
            if isinstance(item, int):  # a cancellation
                if item in self.pending:
                    self._send(remote.Cancel(item))
                continue
            if self.fatal is not None:
                self._fail(item, self.fatal)
            elif self.closing_at is not None:
                self._fail(item, PoolClosedError("the client was closed"))
            elif self.session is None or self.session.lost:
                self.waiting[item.id] = item
                wait = self.connect_timeout if item.timeout is None else min(self.connect_timeout, item.timeout)
                self._add_timer(time.monotonic() + wait, "wait", item.id)
            else:
                self._dispatch(item)

    def _dispatch(self, request: Request) -> None:
        session = self.session
        assert session is not None
        if request.offsets and session.response_arena is None:
            # placed in shared memory that this session (a new one) did not attach
            self._fail(request, ServerConnectionError("the session with the server changed", endpoint=self.endpoint))
            return
        request.session = session
        if request.what:
            header = remote.encode(remote.Query(request.id, request.what))
        else:
            releases = self._collect_releases(session)
            request_id, model, version, timeout, names, descs, blobs, single, priority = request.header_fields
            infer = remote.Infer(request_id, model, version, timeout, names, descs, blobs, releases, single, priority)
            try:
                header = remote.encode(infer)
            except Exception as e:  # checked in submit(); this request fails, not the client
                self.releases.extend((session.generation, offset) for offset in releases)
                self._fail(request, ProtocolError(f"cannot encode the request: {e!r}"))
                return
        self.pending[request.id] = request
        send(self.sock, header, request.frames, zero_copy=True)
        request.frames = []  # ZeroMQ holds them until sent
        if request.timeout is not None:
            self._add_timer(time.monotonic() + request.timeout + MARGIN, "deadline", request.id)

    def _collect_releases(self, session: _Session) -> list[int]:
        releases = self.releases
        out: list[int] = []
        while releases and len(out) < _MAX_RELEASES:
            generation, offset = releases.popleft()
            if generation == session.generation:
                out.append(offset)
        return out

    def _send(self, msg: remote.Message) -> None:
        self.sock.send(remote.encode(msg))

    def _on_messages(self) -> None:
        sock = self.sock
        while True:
            try:
                header = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            frames: list[zmq.Frame] = []
            while sock.get(zmq.RCVMORE):
                frames.append(sock.recv(copy=False))
            try:
                self._on_message(header, frames)
            except Exception:
                log.exception("failed to handle a message from the server at %s", self.endpoint)
        if len(self.releases) > _MAX_RELEASES and self.session is not None and not self.session.lost:
            self._send(remote.Release(self._collect_releases(self.session)))

    def _on_message(self, header: bytes, frames: list[zmq.Frame]) -> None:
        try:
            kind, protocol = remote.peek_protocol(header)
            if kind == remote.Welcome.KIND and protocol != remote.PROTOCOL_VERSION:
                self._refused(protocol)
                return
            msg = remote.decode(header)
        except ProtocolError as e:
            log.warning("undecodable message from the server at %s: %s", self.endpoint, e)
            return
        if isinstance(msg, remote.Welcome):
            self._on_welcome(msg)
        elif isinstance(msg, remote.Result):
            self._on_result(msg, frames)
        elif isinstance(msg, remote.Failure):
            self._on_failure(msg)
        elif isinstance(msg, remote.Answer):
            request = self._answered(msg.id)
            if request is not None and not request.future.done():
                request.future.set_result(msg.data)

    def _answered(self, request_id: int) -> Request | None:
        request = self.pending.pop(request_id, None)
        if request is not None:
            self.free(request)
        return request

    def _on_result(self, msg: remote.Result, frames: list[zmq.Frame]) -> None:
        request = self._answered(msg.id)
        session = request.session if request is not None else None
        if request is None or session is None or request.future.done():
            if session is not None:  # nobody will read these outputs: free their slots now
                self.releases.extend((session.generation, d.where) for d in msg.tensors if d.kind == remote.ARENA)
            return
        try:
            outputs = tensor_io.read(msg.tensors, msg.blobs, frames, lambda d: self._output_slot(session, d))
        except Exception as e:  # a reply we cannot rebuild fails its request, not the client
            request.future.set_exception(
                e if isinstance(e, ProtocolError) else ProtocolError(f"unreadable reply: {e!r}")
            )
            return
        request.future.set_result(dict(zip(msg.names, outputs)))

    def _output_slot(self, session: _Session, d: TensorDesc) -> torch.Tensor:
        arena = session.response_arena
        if arena is None:
            raise ValueError("a shared-memory output, but this session has no shared memory")
        nbytes = d.nbytes
        dtype = DTYPES[d.dtype]
        if d.where + nbytes > arena.size or d.where % dtype.itemsize:
            raise ValueError(f"slot [{d.where}, {d.where + nbytes}) does not fit the {arena.size}-byte arena")
        tensor, owner = tensor_io.as_tensor(arena.bytes[d.where : d.where + nbytes], dtype, d.shape)
        # When the caller's last tensor over the slot dies, its offset goes back to the
        # server with the next request.
        weakref.finalize(owner, self.releases.append, (session.generation, d.where)).atexit = False
        return tensor

    def _on_failure(self, msg: remote.Failure) -> None:
        if msg.id < 0:
            log.warning("the server at %s refused a message: %s: %s", self.endpoint, msg.error_type, msg.message)
            return
        request = self._answered(msg.id)
        if request is None or request.future.done():
            return
        if msg.error_type == "ProtocolError" and msg.message.startswith("no session"):
            # the server forgot us (it restarted): this request never ran
            error: BaseException = ServerConnectionError(
                f"the server at {self.endpoint} lost this client's session (did it restart?)", endpoint=self.endpoint
            )
        else:
            error = error_from_plain(msg.error_type, msg.message, msg.fields, msg.traceback)
        request.future.set_exception(error)

    # sessions

    def _on_monitor(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind = event["event"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected = True
                self.hello_sent = False
                if self.session is not None:  # a new connection: the old session is gone
                    self._lose(self.session, settle_now=True)  # (which says HELLO)
                if not self.hello_sent:
                    self._hello()
            elif kind == zmq.EVENT_DISCONNECTED:
                self.connected = False
                self.hello_sent = False
                if self.session is not None:
                    self._lose(self.session)
            elif kind in _HANDSHAKE_FAILED:
                self.last_error = (
                    "the ZeroMQ handshake failed: the server requires CURVE (curve_server_key), or the key is wrong"
                )
                if not self.ready.is_set():
                    self.fatal = ServerConnectionError(
                        f"the server at {self.endpoint} refused the connection: {self.last_error}",
                        endpoint=self.endpoint,
                    )
                    self.ready.set()

    @property
    def _want_shm(self) -> bool:
        return self.shared_memory_wanted is not False and self.arena is not None

    def _refused(self, protocol: int | None) -> None:
        self.fatal = ProtocolError(
            f"the server at {self.endpoint} speaks libtorchrt client protocol {protocol}; this client speaks "
            f"{remote.PROTOCOL_VERSION}: use the same libtorchrt version on both sides"
        )
        self._fail_waiting(self.fatal)
        self.ready.set()

    def _on_welcome(self, welcome: remote.Welcome) -> None:
        if not self.hello_sent or not welcome.session:
            return
        self.hello_sent = False
        self.generation += 1
        session = _Session(welcome, self.generation)
        self.shm = False
        if welcome.shm_path and self._want_shm:
            try:
                self._attach(session, welcome.shm_path)
                self.shm = True
            except (OSError, ValueError, ProtocolError) as e:
                session.close()
                if self.shared_memory_wanted:
                    self.fatal = ServerConnectionError(
                        f"shared memory with the server at {self.endpoint} failed: {e}", endpoint=self.endpoint
                    )
                    self._fail_waiting(self.fatal)
                    self.ready.set()
                    return
                log.info("no shared memory with the server at %s (%s); tensors travel as frames", self.endpoint, e)
        elif self.shared_memory_wanted:
            why = "the server does not offer it" if self._want_shm else "this client has no arena"
            self.fatal = ServerConnectionError(
                f"shared_memory=True, but {why} (it runs on another host?)", endpoint=self.endpoint
            )
            self._fail_waiting(self.fatal)
            self.ready.set()
            return
        self.session = session
        if session.conn is not None:
            self.poller.register(session.conn.fileno(), zmq.POLLIN)
        self.ready.set()
        waiting, self.waiting = self.waiting, {}
        for request in waiting.values():
            self._dispatch(request)

    def _attach(self, session: _Session, path: str) -> None:
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

    def _on_conn(self, session: _Session) -> None:
        """The session's Unix connection is readable: the server ended the session."""
        if fdpass.peer_closed(session.conn):
            self._lose(session)

    def _lose(self, session: _Session, settle_now: bool = False) -> None:
        """The session is over; its requests in flight fail once replies already sent
        have had a moment to arrive (see _SETTLE)."""
        if session is self.session:
            self.session = None
            self.shm = False
        if session.conn is not None:
            try:
                self.poller.unregister(session.conn.fileno())
            except KeyError:
                pass
        if not session.lost:
            session.lost = True
            self.lost.append(session)
            self._add_timer(time.monotonic() + _SETTLE, "settle", session.generation)
        if settle_now:
            self._settle(session.generation)

    def _settle(self, generation: int) -> None:
        for session in [s for s in self.lost if s.generation == generation]:
            self.lost.remove(session)
            error = ServerConnectionError(
                f"the connection to the server at {self.endpoint} was lost before the request was answered",
                endpoint=self.endpoint,
            )
            for request in [r for r in self.pending.values() if r.session is session]:
                del self.pending[request.id]
                self._fail(request, error)
            session.close()
        if self.session is None and self.connected and not self.hello_sent:
            # the server ended the session, but the connection stands: start a new one
            self._hello()

    def _hello(self) -> None:
        if self.fatal is None and self.closing_at is None:
            self._send(remote.Hello(remote.PROTOCOL_VERSION, os.getpid(), remote.boot_id(), self._want_shm))
            self.hello_sent = True

    def _fail(self, request: Request, error: BaseException) -> None:
        self.free(request)
        if not request.future.done():
            request.future.set_exception(error)

    def _fail_waiting(self, error: BaseException) -> None:
        waiting, self.waiting = self.waiting, {}
        for request in waiting.values():
            self._fail(request, error)

    # shutdown

    def _shutdown(self) -> None:
        """Fail what is left, say BYE, close everything (I/O thread)."""
        with self.lock:
            self.closed = True
        error = self.fatal if self.fatal is not None and self.closing_at is None else None
        closed = error or PoolClosedError("the client was closed before the request was answered")
        for request in list(self.inbox):
            if isinstance(request, Request):
                self._fail(request, closed)
        self.inbox.clear()
        self._fail_waiting(closed)
        for request in list(self.pending.values()):
            self._fail(request, closed)
        self.pending.clear()
        if self.session is not None and self.connected:
            try:
                self._send(remote.Bye())
            except zmq.ZMQError:
                pass
        for session in [self.session, *self.lost]:
            if session is not None:
                session.close()
        self.session = None
        self.lost = []
        self.ready.set()
        self._close_resources()

    def _fail_everything(self) -> None:
        """The last resort of a failed shutdown: fail every future still unanswered."""
        with self.lock:
            self.closed = True
        error = self.fatal or PoolClosedError("the client was closed before the request was answered")
        requests = [r for r in self.inbox if isinstance(r, Request)]
        requests += [*self.waiting.values(), *self.pending.values()]
        self.inbox.clear()
        self.waiting = {}
        self.pending = {}
        for request in requests:
            if not request.future.done():
                request.future.set_exception(error)
        self.ready.set()

    def _close_resources(self) -> None:
        with self.lock:
            self.closed = True
            if self.wake_fd >= 0:
                os.close(self.wake_fd)
                self.wake_fd = -1
        sock = getattr(self, "sock", None)
        monitor = getattr(self, "monitor", None)
        if sock is not None and monitor is not None:
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
        for s in (monitor, sock):
            if s is not None:
                s.close()
        self.ctx.term()
        if self.arena is not None:
            self.arena.close()
            self.arena = None
        self.allocator = None

"""The I/O side of a ``Client``: its connection and thread (client process).

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

One I/O thread owns the DEALER socket, its monitor, the inbox's eventfd that callers
bump and, on the same host, the Unix connection over which the arenas were handed
over; it waits on all of them at once in a :class:`~..transport.loop.Loop`. Callers
never touch a socket (a ZeroMQ socket belongs to one thread); they check their inputs
and copy tensors into shared memory in their own thread, so many caller threads copy
in parallel, then hand the request over through the :class:`~..transport.loop.Inbox`.

The thread's work is split by job: :class:`~.session.Sessions` (the HELLO handshake,
shared memory, a session's end; see :mod:`.session`) and :class:`~.requests.Requests`
(requests waiting, in flight, answered; see :mod:`.requests`). This module owns the
resources, routes the server's messages and runs the loop.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time

import zmq

from ..errors import PoolClosedError, ProtocolError, ServerConnectionError
from ..transport import fdpass, remote
from ..transport.arena import Arena
from ..transport.lending import LendingAllocator
from ..transport.loop import Inbox, Loop
from .requests import MARGIN, Request, Requests
from .session import HANDSHAKE_FAILED, Session, Sessions

__all__ = ["MARGIN", "Connection", "Request"]

log = logging.getLogger("libtorchrt.client")


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
        self.connect_timeout = connect_timeout
        self.inline_threshold = inline_threshold
        self.ids = itertools.count(1)
        #: why the client cannot serve any more (see :attr:`broken`)
        self.fatal: BaseException | None = None
        #: when stop() was called: the end of the grace period
        self.closing_at: float | None = None
        #: the request arena (shared memory, handed to the server) and its allocator
        self.arena: Arena | None = None
        self.allocator: LendingAllocator | None = None
        self.ctx = zmq.Context(1)
        try:
            #: requests, and cancellations (request ids), from caller threads
            self.inbox: Inbox[Request | int] = Inbox()
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
            for event in HANDSHAKE_FAILED:
                events |= event
            self.monitor = self.sock.get_monitor_socket(events)
            if shared_memory is not False:
                self.arena = fdpass.sealed_arena(request_arena_bytes, "libtorchrt-client-request")
                self.allocator = LendingAllocator(self.arena, self.arena.size // 2)
            try:
                self.sock.connect(endpoint)
            except zmq.ZMQError as e:
                raise ValueError(f"cannot connect to {endpoint!r}: {e.strerror}") from None
            #: what the I/O thread waits on, with its handler
            self.loop = Loop()
            self.requests = Requests(endpoint, self.sock, self.free, connect_timeout)
            self.sessions = Sessions(
                endpoint,
                self.sock,
                self.monitor,
                self.loop,
                self.requests,
                self.arena,
                shared_memory,
                fail=self._fail_for_good,
                serving=self._serving,
            )
            # Replies first: a disconnection the monitor reports must not fail a request
            # whose answer already arrived. Then callers' requests; each session's Unix
            # connection, watched as the session begins, comes last.
            self.loop.watch(self.sock, self._on_messages)
            self.loop.watch(self.monitor, self.sessions.on_monitor)
            self.loop.watch(self.inbox.waker.fd, self._on_inbox)
        except BaseException:
            self._close_resources()
            raise
        self.thread = threading.Thread(target=self._run, name="libtorchrt-client", daemon=True)
        self.thread.start()

    # ── called from caller threads ─────────────────────────────────────────────

    @property
    def session(self) -> Session | None:
        """The current session (None between sessions)."""
        return self.sessions.current

    @property
    def shm(self) -> bool:
        """Whether requests are placed in the arena: the current session attached it."""
        return self.sessions.shm

    @property
    def closed(self) -> bool:
        """The I/O thread takes no more requests (it is shutting down, or has)."""
        return self.inbox.closed

    def wait_ready(self, timeout: float) -> None:
        """Block until the first session is established.

        Raises:
            ProtocolError: the server speaks another protocol version.
            ServerConnectionError: no server answered, or the handshake was refused.
        """
        if not self.sessions.ready.wait(timeout):
            last_error = self.sessions.last_error
            hint = f" (last error: {last_error})" if last_error else ""
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
        if not self.inbox.put(request):
            if isinstance(request, Request):
                self.free(request)
            broken = self.broken
            if broken is not None:
                raise broken
            raise PoolClosedError("the client is closed")

    def cancel(self, request_id: int) -> None:
        """Tell the server a request was given up (any thread; a no-op once closed)."""
        self.inbox.put(request_id)

    def free(self, request: Request) -> None:
        """Give the request's slots in the request arena back (any thread)."""
        offsets, request.offsets = request.offsets, []
        request.frames = []
        allocator = self.allocator
        if allocator is not None:
            for offset in offsets:
                allocator.free(offset)

    def stop(self, grace: float) -> None:
        """Let requests in flight finish for up to ``grace`` seconds, then close."""
        if self.closing_at is None:
            self.closing_at = time.monotonic() + max(grace, 0.0)
        self.inbox.wake()  # (a no-op once the thread closed the inbox)
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
        loop, inbox = self.loop, self.inbox
        while True:
            now = time.monotonic()
            if self.closing_at is not None:
                self.requests.fail_waiting(PoolClosedError("the client was closed"))
                if not self.requests.pending or now >= self.closing_at:
                    return
            loop.dispatch(loop.wait(self._next_wake(now), inbox))
            now = time.monotonic()
            self.requests.run_timers(now, self._no_session)
            self.sessions.run_timers(now)

    def _next_wake(self, now: float) -> float | None:
        """How long the loop may sleep: until the next timer, or the end of the grace."""
        due = [t for t in (self.requests.next_due(), self.sessions.next_due(), self.closing_at) if t is not None]
        return max(min(due) - now, 0.0) if due else None

    def _serving(self) -> bool:
        return self.fatal is None and self.closing_at is None

    def _fail_for_good(self, error: BaseException) -> None:
        """The connection cannot serve any more (see Sessions' ``fail``)."""
        self.fatal = error
        self.requests.fail_waiting(error)

    def _no_session(self) -> ServerConnectionError:
        last_error = self.sessions.last_error
        hint = f" (last error: {last_error})" if last_error else ""
        return ServerConnectionError(
            f"no session with the server at {self.endpoint} for {self.connect_timeout:g} s{hint}",
            endpoint=self.endpoint,
        )

    def _on_inbox(self) -> None:
        # (popped one at a time: should handling one fail, the rest are failed at shutdown)
        items = self.inbox.items
        while items:
            item = items.popleft()
            if isinstance(item, int):  # a cancellation
                self.requests.cancel(item)
            elif self.fatal is not None:
                self.requests.fail(item, self.fatal)
            elif self.closing_at is not None:
                self.requests.fail(item, PoolClosedError("the client was closed"))
            else:
                self.requests.admit(item, self.sessions.current)

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
        self.requests.flush_releases(self.sessions.current)

    def _on_message(self, header: bytes, frames: list[zmq.Frame]) -> None:
        try:
            kind, protocol = remote.peek_protocol(header)
            if kind == remote.Welcome.KIND and protocol != remote.PROTOCOL_VERSION:
                self.sessions.refused(protocol)
                return
            msg = remote.decode(header)
        except ProtocolError as e:
            log.warning("undecodable message from the server at %s: %s", self.endpoint, e)
            return
        if isinstance(msg, remote.Welcome):
            self.sessions.on_welcome(msg)
        elif isinstance(msg, remote.Result):
            self.requests.on_result(msg, frames)
        elif isinstance(msg, remote.Failure):
            self.requests.on_failure(msg)
        elif isinstance(msg, remote.Answer):
            self.requests.on_answer(msg)

    # ── shutdown ───────────────────────────────────────────────────────────────

    def _shutdown(self) -> None:
        """Fail what is left, say BYE, close everything (I/O thread)."""
        left = self.inbox.close()  # callers are refused from now on
        error = self.fatal if self.fatal is not None and self.closing_at is None else None
        closed = error or PoolClosedError("the client was closed before the request was answered")
        for request in left:
            if isinstance(request, Request):
                self.requests.fail(request, closed)
        self.requests.fail_all(closed)
        if self.sessions.current is not None and self.sessions.connected:
            try:
                self.sock.send(remote.encode(remote.Bye()))
            except zmq.ZMQError:
                pass
        self.sessions.close()
        self.sessions.ready.set()
        self._close_resources()

    def _fail_everything(self) -> None:
        """The last resort of a failed shutdown: fail every future still unanswered."""
        error = self.fatal or PoolClosedError("the client was closed before the request was answered")
        requests = [r for r in self.inbox.close() if isinstance(r, Request)]
        requests += [*self.requests.waiting.values(), *self.requests.pending.values()]
        self.requests.waiting = {}
        self.requests.pending = {}
        for request in requests:
            if not request.future.done():
                request.future.set_exception(error)
        self.sessions.ready.set()

    def _close_resources(self) -> None:
        """Close what __init__ made (also when it failed half-way)."""
        inbox = getattr(self, "inbox", None)
        if inbox is not None:
            inbox.close()
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

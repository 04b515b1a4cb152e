"""``ZmqFrontend``: a running ``Pool`` served to remote clients over ZeroMQ (server process).

::

    client process (libtorchrt.Client)         this process
    ──────────────────────────────────         ────────────
    DEALER ──HELLO──────────────────────────►  ROUTER ─► session (token, shm path)
    Unix socket ──ATTACH + request memfd────►  listener ─► map the client's arena
                ◄─ATTACHED + response memfd──               (kept open: EOF = client gone)
    INFER (descriptors: blob / frame /   ──►  tensors viewed in place ─► pool.submit()
           offset in the client's arena)                                     │
    RESULT (outputs in the session's    ◄───  outputs copied into the  ◄─ future done
            response arena, or frames)        response arena (or zero-copy frames)

One I/O thread owns every socket: it waits in a single
:class:`~..transport.loop.Loop` on the ROUTER, the ROUTER's monitor (connections
closing), the eventfd of the :class:`~..transport.loop.Inbox` that pool futures put
their completions into, the Unix listener and each session's Unix connection. Nothing
sleep-polls, and a client that vanishes is an event: its ZeroMQ connection closes (the
monitor names the connection's descriptor, which each session recorded from its HELLO)
and, for a same-host client, its Unix connection reads end-of-file. Either way the
session ends at once: requests still queued in the pool are cancelled, outputs of
those still running are dropped when they finish, and its mapping of the client's
arena and its own response arena are released.

The thread's work is split by job, one module each: ``zmq_endpoint.py`` (checking and
binding the endpoint, CURVE and ZAP), ``zmq_sessions.py`` (the sessions),
``zmq_handoff.py`` (the shared-memory hand-off) and ``zmq_requests.py`` (reading
requests, bounded against hostile peers, the pool's answers). This module starts,
runs and stops the thread.

An unexpected exception in the thread is a bug: it is logged as CRITICAL, the requests
in flight are answered with ``PoolClosedError``, everything is closed, and ``alive``
turns False (the server watches it, to exit rather than keep a dead endpoint).

The frontend only calls the pool's public API (``submit``, ``models``, ``health``); it
does not own the pool and does not close it.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
import weakref
from typing import Any

from ..deadlines import check_timeout
from ..errors import ConfigError
from ..transport import tensors as tensor_io
from ..transport.loop import Inbox, Loop
from .zmq_endpoint import Endpoint
from .zmq_handoff import Handoff
from .zmq_requests import Completion, Requests
from .zmq_sessions import Sessions

__all__ = ["ZmqFrontend"]

log = logging.getLogger("libtorchrt.server")


class _Server:
    """The frontend's I/O thread and what it owns (see the module docstring); owned by
    a :class:`ZmqFrontend`, which a finalizer closes it for if the frontend is dropped."""

    def __init__(
        self,
        pool: Any,
        endpoint: str,
        *,
        curve_secret_key: bytes | None = None,
        insecure: bool = False,
        max_request_bytes: int | None = None,
        curve_client_keys: list[bytes] | None = None,
        shared_memory: bool = True,
        response_arena_bytes: int = 128 << 20,
        max_client_arena_bytes: int = 4 << 30,
        inline_threshold: int = tensor_io.DEFAULT_INLINE_THRESHOLD,
    ) -> None:
        self.pool = pool
        #: the ROUTER, its monitor and ZAP handler (checks its arguments here)
        self.endpoint = Endpoint(
            endpoint,
            curve_secret_key=curve_secret_key,
            insecure=insecure,
            max_request_bytes=max_request_bytes,
            curve_client_keys=curve_client_keys,
        )
        self._inline_threshold = inline_threshold
        #: every socket and descriptor the thread waits on, with its handler
        self.loop = Loop()
        self.sessions = Sessions(self.loop)
        #: the Unix listener and connections not attached yet (None: not offered)
        self.handoff = (
            Handoff(self.loop, self.sessions, response_arena_bytes, max_client_arena_bytes) if shared_memory else None
        )
        #: finished pool futures, from any thread, and the eventfd that wakes the thread
        #: (made by start(), closed when the thread ends)
        self.completions: Inbox[Completion] | None = None
        self.requests: Requests | None = None
        self._thread: threading.Thread | None = None
        self._closing_at: float | None = None
        self._close_lock = threading.Lock()
        self._closed = False
        #: the unexpected exception that stopped the I/O thread (a bug), if one did
        self.failure: BaseException | None = None

    # ── public API ─────────────────────────────────────────────────────────────

    @property
    def max_request_bytes(self) -> int | None:
        return self.endpoint.max_request_bytes

    def start(self) -> None:
        """Bind the endpoint and start serving.

        Raises:
            ConfigError: a ``tcp://`` endpoint that is not loopback without
                ``curve_secret_key`` or ``insecure``; an ``ipc://`` path in a directory
                open to others; a malformed endpoint.
            OSError: the endpoint is in use (``errno.EADDRINUSE``) or cannot be bound.
        """
        if self._thread is not None or self._closed:
            raise RuntimeError("a ZmqFrontend can be started once")
        endpoint = self.endpoint.check()
        try:
            self._open(endpoint)
        except BaseException:
            self._close_resources()
            raise
        self._thread = threading.Thread(target=self._run, name="libtorchrt-zmq-frontend", daemon=True)
        self._thread.start()
        log.info("serving on %s", self.endpoint.address)

    def close(self, grace: float = 5.0) -> None:
        """Stop taking requests, let those in flight finish for up to ``grace`` seconds
        (the rest fail with :class:`PoolClosedError`), then close every socket, thread,
        descriptor and shared-memory arena the frontend owns. Idempotent."""
        grace = _grace(grace)
        with self._close_lock:
            if self._closed:  # closing already: a shorter grace hurries it (a second signal)
                at = time.monotonic() + max(grace, 0.0)
                alive = self._thread is not None and self._thread.is_alive()
                if alive and self._closing_at is not None and at < self._closing_at:
                    self._closing_at = at
                    self._wake()
                return
            self._closed = True
            if self._thread is None:
                self._close_resources()
                return
            self._closing_at = time.monotonic() + max(grace, 0.0)
            self._wake()
        self._thread.join(grace + 30.0)
        if self._thread.is_alive():
            log.warning("the ZmqFrontend thread did not stop within %.0f s", grace + 30.0)

    @property
    def alive(self) -> bool:
        """Whether the I/O thread runs (False before start, after close, and once it
        failed: see :attr:`failure`)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def state(self) -> str:
        if self._closed:
            return "closed"
        if self.failure is not None:
            return "failed"
        return "serving" if self._thread is not None else "not started"

    # ── start-up (caller's thread) ─────────────────────────────────────────────

    def _open(self, endpoint: str) -> None:
        self.endpoint.open(endpoint)
        self.completions = Inbox()
        self.requests = requests = Requests(
            self.pool,
            self.endpoint,
            self.sessions,
            self.handoff,
            self.completions,
            closing=lambda: self._closing_at is not None,
            inline_threshold=self._inline_threshold,
        )
        assert self.endpoint.sock is not None and self.endpoint.monitor is not None
        # The order in which handlers run. Disconnections first: a descriptor they name
        # may already be reused by a connection whose HELLO waits below (see
        # Requests._on_hello). Then completions, then new messages; the Unix listener
        # and connections (watched by the hand-off as they come) last.
        self.loop.watch(self.endpoint.monitor, self._on_monitor)
        self.loop.watch(self.completions.waker.fd, requests.on_completions)
        self.loop.watch(self.endpoint.sock, requests.on_messages)
        if self.endpoint.zap is not None:
            self.loop.watch(self.endpoint.zap, self.endpoint.on_zap)
        if self.handoff is not None:
            self.handoff.open()

    def _wake(self) -> None:
        """Make the thread look at ``_closing_at`` (any thread)."""
        if self.completions is not None:
            self.completions.wake()  # (a no-op once closed)

    # ── the I/O thread ─────────────────────────────────────────────────────────

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # a bug: say so loudly; ``alive`` turns False
            self.failure = e
            log.critical(
                "the ZmqFrontend thread failed; ZeroMQ clients are no longer served (%s)",
                self.endpoint.address,
                exc_info=True,
            )
        finally:
            try:
                self._shutdown()
            finally:
                self._close_resources()

    def _loop(self) -> None:
        loop, completions, sessions = self.loop, self.completions, self.sessions
        assert completions is not None
        while True:
            wait: float | None = None
            if self._closing_at is not None:
                if not sessions.busy() and not completions:
                    return
                wait = self._closing_at - time.monotonic()
                if wait <= 0:
                    return
            loop.dispatch(loop.wait(wait, completions))

    def _on_monitor(self) -> None:
        self.sessions.disconnected(self.endpoint.disconnections())

    # ── shutdown ───────────────────────────────────────────────────────────────

    def _shutdown(self) -> None:
        """Fail what did not finish in the grace period, end every session (I/O thread)."""
        if self.failure is None:
            why = "the server closed before the request finished"
        else:
            why = f"the server's ZeroMQ frontend failed ({self.failure!r}) before the request finished"
        if self.requests is not None:
            self.requests.end_all(why)
        if self.handoff is not None:
            self.handoff.drop_unattached()

    def _close_resources(self) -> None:
        if self.completions is not None:
            self.completions.close()  # what pool futures put from now on is dropped
        self.endpoint.close()
        if self.handoff is not None:
            self.handoff.close()


class ZmqFrontend:
    """Serve ``pool`` to :class:`libtorchrt.Client` s on a ZeroMQ endpoint.

    Args:
        pool: a started :class:`libtorchrt.Pool` (anything with its ``submit``,
            ``models`` and ``health``); the frontend does not close it.
        endpoint: ``tcp://HOST:PORT`` (port 0 or ``*``: any free port) or
            ``ipc:///PATH`` (``ipc://*``: a private temporary path).
        curve_secret_key: the server's CURVE secret key (Z85, as from
            ``zmq.curve_keypair()``): connections are encrypted, and only clients that
            know the server's public key (:attr:`curve_public_key`) can connect.
        insecure: allow a ``tcp://`` endpoint that is not loopback without CURVE (and an
            ``ipc://`` socket in a directory others can enter).
        max_request_bytes: refuse requests whose tensor data exceeds this many bytes,
            before anything is allocated for them (ZeroMQ drops the connection of a
            peer that sends a larger frame at all).
        curve_client_keys: with CURVE, the public keys of the only clients allowed
            (checked by a ZAP handler); None admits any client that knows the server key.
        shared_memory: offer same-host clients shared memory (memfds over a Unix socket).
        response_arena_bytes: each same-host session's response arena.
        max_client_arena_bytes: the largest request arena a client may hand over.
        inline_threshold: outputs up to this many bytes travel inside the header.

    Raises:
        ConfigError: an endpoint that is not loopback without CURVE or ``insecure``, a
            malformed endpoint or key (by :meth:`start`, or here for the arguments).
    """

    def __init__(
        self,
        pool: Any,
        endpoint: str,
        *,
        curve_secret_key: bytes | None = None,
        insecure: bool = False,
        max_request_bytes: int | None = None,
        curve_client_keys: list[bytes] | None = None,
        shared_memory: bool = True,
        response_arena_bytes: int = 128 << 20,
        max_client_arena_bytes: int = 4 << 30,
        inline_threshold: int = tensor_io.DEFAULT_INLINE_THRESHOLD,
    ) -> None:
        self.pool = pool
        self._server = _Server(
            pool,
            endpoint,
            curve_secret_key=curve_secret_key,
            insecure=insecure,
            max_request_bytes=max_request_bytes,
            curve_client_keys=curve_client_keys,
            shared_memory=shared_memory,
            response_arena_bytes=response_arena_bytes,
            max_client_arena_bytes=max_client_arena_bytes,
            inline_threshold=inline_threshold,
        )
        self._finalizer = weakref.finalize(self, _finalize, self._server)

    @property
    def endpoint(self) -> str:
        """The bound endpoint (with the real port when port 0 or ``*`` was asked)."""
        return self._server.endpoint.address

    @property
    def curve_public_key(self) -> bytes | None:
        """The server's CURVE public key (Z85), for clients' ``curve_server_key``."""
        return self._server.endpoint.curve_public_key

    @property
    def max_request_bytes(self) -> int | None:
        return self._server.max_request_bytes

    @property
    def alive(self) -> bool:
        """Whether the frontend serves: its I/O thread runs. False before :meth:`start`,
        after :meth:`close`, and once the thread failed on an unexpected exception (a
        bug, logged as CRITICAL; :attr:`failure` holds it). A server watches it to exit
        rather than keep a port that no longer answers."""
        return self._server.alive

    @property
    def failure(self) -> BaseException | None:
        """The unexpected exception that stopped the I/O thread, or None."""
        return self._server.failure

    @property
    def thread(self) -> threading.Thread | None:
        """The I/O thread (None before :meth:`start`): joining it waits, without polling,
        until the frontend stops serving (closed, or failed)."""
        return self._server._thread

    def start(self) -> ZmqFrontend:
        """Bind the endpoint and start serving; returns ``self``.

        Raises:
            ConfigError: a ``tcp://`` endpoint that is not loopback without
                ``curve_secret_key`` or ``insecure``; an ``ipc://`` path in a directory
                open to others; a malformed endpoint.
            OSError: the endpoint is in use (``errno.EADDRINUSE``) or cannot be bound.
        """
        self._server.start()
        return self

    def close(self, grace: float = 5.0) -> None:
        """Stop taking requests, let those in flight finish for up to ``grace`` seconds
        (the rest fail with :class:`PoolClosedError`), then close every socket, thread,
        descriptor and shared-memory arena the frontend owns. Idempotent. The pool is
        not closed.

        Raises:
            ConfigError: ``grace`` is not a number of seconds >= 0 (a huge one is capped).
        """
        self._server.close(grace)
        self._finalizer.detach()

    def __enter__(self) -> ZmqFrontend:
        if self._server.state == "not started":
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(grace=0.0 if exc[0] is not None else 5.0)

    def __repr__(self) -> str:
        return f"<libtorchrt ZmqFrontend {self._server.state} on {self.endpoint}>"


def _finalize(server: _Server) -> None:
    if server.alive:
        warnings.warn(
            "ZmqFrontend was not closed; closing it now (use `with ZmqFrontend(...)` or call close())",
            ResourceWarning,
            stacklevel=2,
        )
        server.close(grace=0.0)


def _grace(grace: float) -> float:
    try:
        seconds = check_timeout(grace)
    except ValueError as e:
        raise ConfigError(f"grace: {e}", key="grace") from None
    return 0.0 if seconds is None else seconds

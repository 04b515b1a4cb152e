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

One I/O thread owns every socket: it waits in a single ``zmq.Poller.poll`` on the
ROUTER, the ROUTER's monitor (connections closing), an eventfd bumped when a pool
future completes, the Unix listener and each session's Unix connection. Nothing
sleep-polls, and a client that vanishes is an event: its ZeroMQ connection closes (the
monitor names the connection's descriptor, which each session recorded from its HELLO)
and, for a same-host client, its Unix connection reads end-of-file. Either way the
session ends at once: requests still queued in the pool are cancelled, outputs of
those still running are dropped when they finish, and its mapping of the client's
arena and its own response arena are released.

A hostile peer is bounded before anything is allocated for it: libzmq refuses a frame
above ``max_request_bytes`` (``ZMQ_MAXMSGSIZE``) as it is announced, and the thread
reads each message frame by frame, refusing one of more frames than a request can use
or more bytes in all than the limit allows (releasing each frame as it is read) before
it decodes anything; a header's timeout, sizes and fields are checked by ``remote``.
libzmq hands over a multipart message only once all of it has arrived, so what it
buffers meanwhile is bounded per frame, not per message: see docs/client.md, Security.

An unexpected exception in the thread is a bug: it is logged as CRITICAL, the requests
in flight are answered with ``PoolClosedError``, everything is closed, and ``alive``
turns False (the server watches it, to exit rather than keep a dead endpoint).

An ``ipc:///PATH`` endpoint is locked (``flock`` on ``PATH.lock``) for the frontend's
life: a second server is refused while the first lives, and the socket file of one
that was SIGKILLed is recognised as stale and replaced (see ``transport.sockets``).

The frontend only calls the pool's public API (``submit``, ``models``, ``health``); it
does not own the pool and does not close it.
"""

from __future__ import annotations

import collections
import errno
import functools
import ipaddress
import logging
import os
import secrets
import socket
import stat
import struct
import threading
import time
import warnings
import weakref
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch
import zmq
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from .. import __version__
from .._plain import error_to_plain, health_to_plain, statuses_to_plain
from ..deadlines import check_timeout, poll_ms
from ..errors import ConfigError, InvalidInputError, PoolClosedError, ProtocolError
from ..transport import fdpass, remote
from ..transport import tensors as tensor_io
from ..transport.arena import Allocator, Arena
from ..transport.sockets import Bounded, PrivateDir, hold_lock, lock_owner, recv_bounded, send
from ..transport.wire import DTYPES, FRAME, TensorDesc

__all__ = ["ZmqFrontend"]

log = logging.getLogger("libtorchrt.server")

#: ZeroMQ heartbeats (seconds): a peer silent for HEARTBEAT_TIMEOUT is disconnected,
#: which ends its session, even when its host vanished without closing the connection.
HEARTBEAT_INTERVAL = 2.0
HEARTBEAT_TIMEOUT = 10.0
#: Unix connections that have not attached yet, at most (the oldest is dropped).
_MAX_UNATTACHED = 64
#: Messages handled per wake-up before the other sources get a turn.
_BATCH = 256
#: What a message may carry beyond ``max_request_bytes`` of tensor data: its header's
#: own fields (names, descriptors). Also the per-frame margin of ``ZMQ_MAXMSGSIZE``.
_HEADER_MARGIN = 1 << 20
_UCRED = struct.Struct("3i")


class _Session:
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


def _curve_key(key: bytes | str, what: str) -> bytes:
    raw = key.encode() if isinstance(key, str) else bytes(key)
    if len(raw) == 40:
        try:
            z85.decode(raw)
        except (ValueError, KeyError, IndexError, struct.error):
            raise ConfigError(f"{what} is not a Z85-encoded CURVE key", key=what) from None
        return raw
    if len(raw) == 32:
        return z85.encode(raw)
    raise ConfigError(f"{what} must be a CURVE key: 40 Z85 characters or 32 bytes, got {len(raw)}", key=what)


def _tcp_host(endpoint: str) -> str:
    rest = endpoint.removeprefix("tcp://")
    if rest.startswith("["):
        host, sep, port = rest[1:].partition("]:")
    else:
        host, sep, port = rest.rpartition(":")
    if not sep or not host or not (port.isdigit() or port == "*"):
        raise ConfigError(f"endpoint {endpoint!r}: expected tcp://HOST:PORT", key="endpoint")
    return host


def _is_loopback(host: str) -> bool:
    """Whether every address ``host`` stands for is a loopback one; ``*``, an interface
    name other than ``lo`` and a name that does not resolve are not."""
    if host == "*":
        return False
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return host == "lo"
    addresses = {str(info[4][0]).split("%")[0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def _grace(grace: float) -> float:
    try:
        seconds = check_timeout(grace)
    except ValueError as e:
        raise ConfigError(f"grace: {e}", key="grace") from None
    return 0.0 if seconds is None else seconds


def _prepare_ipc(path: str, insecure: bool) -> int:
    """An ``ipc://`` socket file must sit in a private directory (0700, ours): create
    it so, refuse one open to others. Then take the endpoint's lock, ``PATH.lock``,
    held for the frontend's life (see ``transport.sockets``): a live server holding it
    means the path is taken (ZeroMQ would silently take it over); a dead one's socket
    file is stale and removed here.

    Returns:
        The descriptor holding the lock (the caller closes it, after removing both files).
    """
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        st = os.stat(directory)
    except OSError as e:
        raise ConfigError(f"ipc://{path}: cannot make its directory {directory!r}: {e.strerror}", key="endpoint") from e
    if not insecure and (st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077):
        raise ConfigError(
            f"ipc://{path}: its directory {directory!r} is open to other users (mode {stat.S_IMODE(st.st_mode):o}); "
            "put the socket in a directory of your own with mode 0700, or pass insecure=True (--insecure)",
            key="endpoint",
        )
    lock_path = path + ".lock"
    try:
        lock = hold_lock(lock_path)
    except OSError as e:
        raise ConfigError(f"ipc://{path}: cannot open its lock file {lock_path!r}: {e.strerror}", key="endpoint") from e
    if lock is None:
        owner = lock_owner(lock_path)
        raise OSError(
            errno.EADDRINUSE,
            f"ipc://{path} is in use by another server (pid {owner if owner is not None else '?'}, "
            f"which holds {lock_path})",
        )
    try:
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise ConfigError(f"ipc://{path} exists and is not a socket", key="endpoint")
            # A server that holds no lock (an older version, another program) may
            # listen there: ask before removing.
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # nobody listens: the stale file of a server that died
            else:
                raise OSError(errno.EADDRINUSE, f"ipc://{path} is in use by another server")
            finally:
                probe.close()
    except BaseException:
        _release_ipc_lock(lock_path, lock)
        raise
    return lock


def _release_ipc_lock(lock_path: str, fd: int) -> None:
    # Unlinked while still held, so that nobody takes a lock on a file about to go
    # (hold_lock checks that the file it locked is still the one at the path).
    try:
        os.unlink(lock_path)
    except OSError:
        pass
    os.close(fd)


class _Server:
    """The frontend's I/O state and thread (see the module docstring); owned by a
    :class:`ZmqFrontend`, which a finalizer closes it for if the frontend is dropped."""

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
        self._asked = endpoint
        self._secret = _curve_key(curve_secret_key, "curve_secret_key") if curve_secret_key is not None else None
        if curve_client_keys is not None and self._secret is None:
            raise ConfigError("curve_client_keys needs curve_secret_key", key="curve_client_keys")
        self._client_keys = (
            None
            if curve_client_keys is None
            else {z85.decode(_curve_key(k, "curve_client_keys")) for k in curve_client_keys}
        )
        self._insecure = insecure
        if max_request_bytes is not None and max_request_bytes <= 0:
            raise ConfigError("max_request_bytes must be positive", key="max_request_bytes")
        self.max_request_bytes = max_request_bytes
        self._shared_memory = shared_memory
        self._response_arena_bytes = response_arena_bytes
        self._max_client_arena = max_client_arena_bytes
        self._inline_threshold = inline_threshold
        self._endpoint = ""
        self._boot_id = remote.boot_id()
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._zap: zmq.Socket | None = None
        self._ipc_dir: PrivateDir | None = None
        self._ipc_path: str | None = None
        #: the flock on ``ipc:///PATH``'s ``PATH.lock``; the socket file, once bound here
        self._ipc_lock = -1
        self._ipc_bound = False
        self._shm_dir: PrivateDir | None = None
        self._listener: socket.socket | None = None
        self._wake_fd = -1
        self._wake_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closing_at: float | None = None
        self._close_lock = threading.Lock()
        self._closed = False
        #: the unexpected exception that stopped the I/O thread (a bug), if one did
        self.failure: BaseException | None = None
        #: (session, request id, future) of finished pool futures; any thread appends
        self._completions: collections.deque[tuple[_Session, int, Future[Any]]] = collections.deque()
        self._sessions: dict[bytes, _Session] = {}
        self._by_token: dict[bytes, _Session] = {}
        self._by_fd: dict[int, set[bytes]] = {}
        self._conns: dict[int, _Session] = {}  # Unix connection fd -> its session
        self._unattached: dict[int, socket.socket] = {}
        self._poller = zmq.Poller()

    # ── public API ─────────────────────────────────────────────────────────────

    @property
    def endpoint(self) -> str:
        """The bound endpoint (with the real port when port 0 or ``*`` was asked)."""
        return self._endpoint or self._asked

    @property
    def curve_public_key(self) -> bytes | None:
        """The server's CURVE public key (Z85) for clients' ``curve_server_key``."""
        return None if self._secret is None else zmq.curve_public(self._secret)

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
        endpoint = self._check_endpoint(self._asked)
        try:
            self._open(endpoint)
        except BaseException:
            self._close_resources()
            raise
        self._thread = threading.Thread(target=self._run, name="libtorchrt-zmq-frontend", daemon=True)
        self._thread.start()
        log.info("serving on %s", self._endpoint)

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

    def _check_endpoint(self, endpoint: str) -> str:
        scheme, sep, rest = endpoint.partition("://")
        if not sep or scheme not in ("tcp", "ipc") or not rest:
            raise ConfigError(f"endpoint {endpoint!r}: expected tcp://HOST:PORT or ipc:///PATH", key="endpoint")
        if scheme == "tcp":
            host = _tcp_host(endpoint)
            if self._secret is None and not self._insecure and not _is_loopback(host):
                raise ConfigError(
                    f"endpoint {endpoint} is reachable from other machines; give the server CURVE keys "
                    "(curve_secret_key=..., --zmq-curve-secret-key-file) or pass insecure=True (--insecure) "
                    "to serve it without authentication",
                    key="endpoint",
                )
            return endpoint
        if rest == "*":
            self._ipc_dir = PrivateDir(prefix="libtorchrt-server-")
            path = os.path.join(self._ipc_dir.path, "zmq.sock")
        elif rest.startswith("@"):
            if not self._insecure:
                raise ConfigError(
                    f"endpoint {endpoint}: an abstract socket has no permissions (any local user could connect); "
                    "use a path, or pass insecure=True (--insecure)",
                    key="endpoint",
                )
            return endpoint
        else:
            path = os.path.abspath(rest)
            self._ipc_lock = _prepare_ipc(path, self._insecure)
        self._ipc_path = path
        return f"ipc://{path}"

    def _open(self, endpoint: str) -> None:
        self._ctx = ctx = zmq.Context(1)
        if self._client_keys is not None:
            # The ZAP handler must be bound before the first connection's handshake.
            self._zap = ctx.socket(zmq.ROUTER)
            self._zap.linger = 0
            self._zap.bind("inproc://zeromq.zap.01")
        self._sock = sock = ctx.socket(zmq.ROUTER)
        sock.linger = 1000  # bounded: the last replies get a second to leave at close
        sock.sndhwm = 0  # a ROUTER drops replies beyond its HWM: never lose one
        sock.setsockopt(zmq.HEARTBEAT_IVL, int(HEARTBEAT_INTERVAL * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(HEARTBEAT_TIMEOUT * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TTL, int(HEARTBEAT_TIMEOUT * 1000))
        if self.max_request_bytes is not None:
            # Enforced by libzmq on each frame, before it allocates it (the margin is the
            # header's); the frames' number and sum are bounded by _on_messages.
            sock.setsockopt(zmq.MAXMSGSIZE, self.max_request_bytes + _HEADER_MARGIN)
        if self._secret is not None:
            sock.curve_server = True
            sock.curve_secretkey = self._secret
            if self._client_keys is not None:
                sock.zap_domain = b"libtorchrt"
        if endpoint.startswith("tcp://["):
            sock.ipv6 = True
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as e:
            if e.errno == zmq.EADDRINUSE:
                raise OSError(errno.EADDRINUSE, f"{endpoint} is in use by another process") from None
            raise OSError(e.errno, f"cannot bind {endpoint}: {e.strerror}") from None
        last = sock.last_endpoint
        self._endpoint = last.decode() if isinstance(last, bytes) else str(last)
        if self._ipc_path is not None:
            self._ipc_bound = True
            os.chmod(self._ipc_path, 0o600)  # its directory is 0700, so nobody got in before
        self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        if self._shared_memory:
            self._shm_dir = PrivateDir(prefix="libtorchrt-server-")
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            self._listener = listener
            path = os.path.join(self._shm_dir.path, "shm.sock")
            listener.bind(path)
            os.chmod(path, 0o600)
            listener.listen(64)
            listener.setblocking(False)
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._poller.register(self._wake_fd, zmq.POLLIN)
        if self._listener is not None:
            self._poller.register(self._listener.fileno(), zmq.POLLIN)
        if self._zap is not None:
            self._poller.register(self._zap, zmq.POLLIN)

    def _wake(self) -> None:
        # The lock orders this against closing the eventfd (a write to a closed,
        # possibly reused descriptor would be a bug); any thread may call it.
        with self._wake_lock:
            if self._wake_fd >= 0:
                os.eventfd_write(self._wake_fd, 1)

    # ── the I/O thread ─────────────────────────────────────────────────────────

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # a bug: say so loudly; ``alive`` turns False
            self.failure = e
            log.critical(
                "the ZmqFrontend thread failed; ZeroMQ clients are no longer served (%s)", self._endpoint, exc_info=True
            )
        finally:
            try:
                self._shutdown()
            finally:
                self._close_resources()

    def _loop(self) -> None:
        sock, monitor, listener = self._sock, self._monitor, self._listener
        assert sock is not None and monitor is not None
        listener_fd = listener.fileno() if listener is not None else -1
        while True:
            wait_ms: int | None = None
            if self._closing_at is not None:
                if not any(s.pending for s in self._sessions.values()) and not self._completions:
                    return
                left = self._closing_at - time.monotonic()
                if left <= 0:
                    return
                wait_ms = poll_ms(left)
            events = dict(self._poller.poll(wait_ms))
            # Disconnections first: a descriptor they name may already be reused by a
            # connection whose HELLO waits below (see _on_hello).
            if monitor in events:
                self._on_monitor()
            if self._wake_fd in events:
                try:
                    os.eventfd_read(self._wake_fd)
                except BlockingIOError:
                    pass
            self._on_completions()
            if sock in events:
                self._on_messages(sock)
            if self._zap is not None and self._zap in events:
                self._on_zap(self._zap)
            if listener_fd in events:
                self._on_accept()
            for fd in events:
                if isinstance(fd, int) and fd != listener_fd and fd != self._wake_fd:
                    self._on_conn(fd)

    def _on_monitor(self) -> None:
        assert self._monitor is not None
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                for identity in self._by_fd.pop(event["value"], set()):
                    session = self._sessions.get(identity)
                    if session is not None:
                        log.debug("client %s disconnected", identity.hex())
                        self._end(session)

    def _on_messages(self, sock: zmq.Socket) -> None:
        limit = self.max_request_bytes
        max_bytes = None if limit is None else limit + _HEADER_MARGIN
        for _ in range(_BATCH):
            try:
                message = recv_bounded(sock, remote.MAX_FRAMES, max_bytes)
            except zmq.Again:
                return
            identity, parts = message.identity, message.frames
            try:
                if message.refused:
                    self._refuse(message)
                elif parts:
                    self._on_message(identity, parts[0], parts[1:])
            except Exception:  # one bad message must not take the frontend down
                log.exception("failed to handle a message from client %s", identity.hex())

    def _refuse(self, message: Bounded) -> None:
        """A message over the bounds of :meth:`_on_messages` (already released): answer
        its request, named by its header if that could be kept, with an error: too many
        frames is a ProtocolError, too many bytes for an INFER an InvalidInputError."""
        identity, why = message.identity, message.refused
        header = message.frames[0] if message.frames else None
        log.warning("refused %s from client %s", why, identity.hex())
        request_id = remote.request_id(header.bytes) if header is not None else -1
        limit = self.max_request_bytes
        error: Exception = ProtocolError(f"message refused: {why}")
        if message.count <= remote.MAX_FRAMES and limit is not None and header is not None and request_id >= 0:
            try:
                msg = remote.decode(header.bytes)
            except ProtocolError:
                pass
            else:
                if isinstance(msg, remote.Infer):
                    error = InvalidInputError(msg.model, None, f"at most max_request_bytes={limit} bytes", why)
        self._reply_error(identity, request_id, error)

    def _on_message(self, identity: bytes, first: zmq.Frame, frames: list[zmq.Frame]) -> None:
        header = first.bytes
        try:
            kind, protocol = remote.peek_protocol(header)
        except ProtocolError as e:
            self._reply_error(identity, -1, e)
            return
        if kind == remote.Hello.KIND:
            self._on_hello(identity, header, protocol, first)
            return
        session = self._sessions.get(identity)
        try:
            msg = remote.decode(header)
        except ProtocolError as e:
            # (answered as the request it names, if it names one: its caller fails now)
            self._reply_error(identity, remote.request_id(header), e)
            return
        if session is None:
            if isinstance(msg, (remote.Infer, remote.Query)):
                self._reply_error(
                    identity,
                    msg.id,
                    ProtocolError("no session: a client says HELLO first (did the server restart?)"),
                )
            return
        if isinstance(msg, remote.Infer):
            self._on_infer(session, msg, frames)
        elif isinstance(msg, remote.Query):
            self._on_query(session, msg)
        elif isinstance(msg, remote.Release):
            session.release(msg.offsets)
        elif isinstance(msg, remote.Cancel):
            future = session.pending.get(msg.id)
            if future is not None:
                future.cancel()  # only while queued in the pool; its reply follows
        elif isinstance(msg, remote.Bye):
            self._end(session)
        else:
            self._reply_error(identity, -1, ProtocolError(f"unexpected {type(msg).__name__} message"))

    def _on_hello(self, identity: bytes, header: bytes, protocol: int | None, frame: zmq.Frame) -> None:
        if protocol != remote.PROTOCOL_VERSION:
            log.warning(
                "refused a client speaking protocol %s (this server speaks %d)", protocol, remote.PROTOCOL_VERSION
            )
            self._send(identity, remote.Welcome(remote.PROTOCOL_VERSION, b"", "", 0, __version__))
            return
        try:
            hello = remote.decode(header)
        except ProtocolError as e:
            self._reply_error(identity, -1, e)
            return
        assert isinstance(hello, remote.Hello)
        old = self._sessions.get(identity)
        if old is not None:
            self._end(old)
        try:
            fd = int(frame.get(zmq.SRCFD))
        except (zmq.ZMQError, AttributeError, ValueError):
            fd = -1
        # Disconnections of earlier connections that used this descriptor were queued
        # before this connection existed: handle them before recording the new one.
        self._on_monitor()
        session = _Session(identity, fd)
        self._sessions[identity] = session
        self._by_token[session.token] = session
        self._by_fd.setdefault(fd, set()).add(identity)
        shm_path = ""
        if self._listener is not None and hello.shared_memory and hello.boot_id and hello.boot_id == self._boot_id:
            shm_path = self._listener.getsockname()
        welcome = remote.Welcome(
            remote.PROTOCOL_VERSION, session.token, shm_path, self.max_request_bytes or 0, __version__
        )
        self._send(identity, welcome)

    def _on_infer(self, session: _Session, msg: remote.Infer, frames: list[zmq.Frame]) -> None:
        if msg.releases:
            session.release(msg.releases)
        if self._closing_at is not None:
            self._reply_error(session.identity, msg.id, PoolClosedError("the server is closing"))
            return
        if msg.id in session.pending:
            self._reply_error(session.identity, msg.id, ProtocolError(f"request id {msg.id} is already in flight"))
            return
        referenced = sum(1 for d in msg.tensors if d.kind == FRAME)
        if len(frames) > referenced:
            extra = ProtocolError(f"{len(frames)} data frames, but the header refers to {referenced}")
            self._reply_error(session.identity, msg.id, extra)
            return
        limit = self.max_request_bytes
        if limit is not None:
            total = remote.payload_bytes(msg.tensors, msg.blobs)
            if total > limit:
                error = InvalidInputError(msg.model, None, f"at most max_request_bytes={limit} bytes", f"{total} bytes")
                self._reply_error(session.identity, msg.id, error)
                return
        try:
            values = tensor_io.read(msg.tensors, msg.blobs, frames, session.input_slot)
        except ProtocolError as e:
            self._reply_error(session.identity, msg.id, e)
            return
        inputs: Any = values[0] if msg.single else dict(zip(msg.names, values)) if msg.names is not None else values
        try:
            if msg.priority is None:  # (a pool without priorities takes no such argument)
                future = self.pool.submit(msg.model, inputs, version=msg.version, timeout=msg.timeout)
            else:
                future = self.pool.submit(
                    msg.model, inputs, version=msg.version, timeout=msg.timeout, priority=msg.priority
                )
        except Exception as e:
            self._reply_error(session.identity, msg.id, e)
            return
        session.pending[msg.id] = future
        future.add_done_callback(functools.partial(self._done, session, msg.id))

    def _done(self, session: _Session, request_id: int, future: Future[Any]) -> None:
        """A pool future finished (in the pool's router thread, or here)."""
        with self._wake_lock:
            if self._wake_fd < 0:
                return  # the frontend is closed: nobody will read it, so do not keep it
            self._completions.append((session, request_id, future))
            os.eventfd_write(self._wake_fd, 1)

    def _on_completions(self) -> None:
        completions = self._completions
        while completions:
            session, request_id, future = completions.popleft()
            if self._sessions.get(session.identity) is not session:
                continue  # the client went away: its outputs are dropped here
            session.pending.pop(request_id, None)
            if future.cancelled():
                self._send(session.identity, remote.Failure(request_id, "CancelledError", "cancelled"))
                continue
            exc = future.exception()
            if exc is not None:
                self._reply_error(session.identity, request_id, exc)
                continue
            try:
                self._reply_result(session, request_id, future.result())
            except Exception as e:  # e.g. an output dtype that cannot cross the wire
                self._reply_error(session.identity, request_id, e)

    def _reply_result(self, session: _Session, request_id: int, outputs: dict[str, Any]) -> None:
        names = list(outputs)
        values: list[Any] = []
        for value in outputs.values():
            if isinstance(value, torch.Tensor):
                values.append(value if not value.is_cuda else value.cpu())
            elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                values.append(tensor_io.Strings.of(value))
            elif isinstance(value, np.ndarray):
                values.append(torch.from_numpy(value))
            else:
                raise ProtocolError(f"output {len(values)} is a {type(value).__name__}, which cannot be sent")
        placed = tensor_io.write(values, session.response_arena, session.response_allocator, self._inline_threshold)
        header = remote.encode(remote.Result(request_id, names, placed.descs, placed.blobs))
        assert self._sock is not None
        # Zero-copy: the frames are the outputs' own memory, kept alive until sent.
        send(self._sock, header, placed.frames, identity=session.identity, zero_copy=True)

    def _on_query(self, session: _Session, msg: remote.Query) -> None:
        try:
            if msg.what == "models":
                data: Any = statuses_to_plain(self.pool.models())
            else:
                data = health_to_plain(self.pool.health())
        except Exception as e:
            self._reply_error(session.identity, msg.id, e)
            return
        self._send(session.identity, remote.Answer(msg.id, data))

    def _reply_error(self, identity: bytes, request_id: int, exc: BaseException) -> None:
        error_type, message, fields, tb = error_to_plain(exc)
        self._send(identity, remote.Failure(request_id, error_type, message, fields, tb))

    def _send(self, identity: bytes, msg: remote.Message) -> None:
        assert self._sock is not None
        self._sock.send_multipart([identity, remote.encode(msg)])

    # ── the shared-memory hand-off ─────────────────────────────────────────────

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
                self._drop_conn(oldest)
            self._unattached[conn.fileno()] = conn
            self._poller.register(conn.fileno(), zmq.POLLIN)

    def _drop_conn(self, fd: int) -> None:
        conn = self._unattached.pop(fd, None)
        if conn is not None:
            self._poller.unregister(fd)
            conn.close()

    def _on_conn(self, fd: int) -> None:
        session = self._conns.get(fd)
        if session is not None:
            # An attached session's connection carries nothing more: readable means
            # the client closed it or died.
            if fdpass.peer_closed(session.conn):
                log.debug("client %s closed its shared-memory connection", session.identity.hex())
                self._end(session)
            return
        conn = self._unattached.get(fd)
        if conn is None:
            return
        try:
            payload, fds = fdpass.recv_message(conn)
        except BlockingIOError:
            return
        except (OSError, ValueError):
            self._drop_conn(fd)
            return
        if not payload:
            for received in fds:
                os.close(received)
            self._drop_conn(fd)
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
            self._drop_conn(fd)
            return
        del self._unattached[fd]  # now the session's, still registered in the poller

    def _attach(self, conn: socket.socket, payload: bytes, fds: list[int]) -> None:
        msg = remote.decode(payload)
        if not isinstance(msg, remote.Attach) or msg.protocol != remote.PROTOCOL_VERSION:
            raise ProtocolError("expected an ATTACH message of this protocol")
        session = self._by_token.get(msg.session)
        if session is None or session.conn is not None or self._sessions.get(session.identity) is not session:
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
        session.conn = conn
        session.request_arena = request_arena
        session.response_arena = response_arena
        session.response_allocator = Allocator(response_arena.size)
        self._conns[conn.fileno()] = session
        log.debug("client %s attached %d bytes of shared memory", session.identity.hex(), msg.size)

    # ── ZAP (client keys) ──────────────────────────────────────────────────────

    def _on_zap(self, zap: zmq.Socket) -> None:
        while True:
            try:
                frames = zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            # [routing id, b"", version, request id, domain, address, identity, mechanism, credentials...]
            if len(frames) < 8:
                continue
            request_id, mechanism = frames[3], frames[7]
            allowed = self._client_keys is not None and (
                mechanism == b"CURVE" and len(frames) > 8 and frames[8] in self._client_keys
            )
            status = (b"200", b"OK") if allowed else (b"400", b"client key not allowed")
            zap.send_multipart([frames[0], b"", b"1.0", request_id, *status, b"", b""])

    # ── shutdown ───────────────────────────────────────────────────────────────

    def _end(self, session: _Session) -> None:
        """The session is over (BYE, disconnection, or the frontend closing)."""
        if self._sessions.get(session.identity) is session:
            del self._sessions[session.identity]
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
            fd = session.conn.fileno()
            self._conns.pop(fd, None)
            self._poller.unregister(fd)
        session.close()

    def _shutdown(self) -> None:
        """Fail what did not finish in the grace period, end every session (I/O thread)."""
        self._on_completions()
        if self.failure is None:
            why = "the server closed before the request finished"
        else:
            why = f"the server's ZeroMQ frontend failed ({self.failure!r}) before the request finished"
        for session in list(self._sessions.values()):
            for request_id in list(session.pending):
                self._reply_error(session.identity, request_id, PoolClosedError(why))
            self._end(session)
        for fd in list(self._unattached):
            self._drop_conn(fd)

    def _close_resources(self) -> None:
        with self._wake_lock:
            if self._wake_fd >= 0:
                os.close(self._wake_fd)
                self._wake_fd = -1
            self._completions.clear()
        if self._sock is not None and self._monitor is not None:
            try:
                self._sock.disable_monitor()
            except zmq.ZMQError:
                pass
        for sock in (self._monitor, self._zap, self._sock):
            if sock is not None:
                sock.close()
        self._monitor = self._zap = self._sock = None
        if self._ctx is not None:
            self._ctx.term()  # waits at most the ROUTER's linger for the last replies
            self._ctx = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._ipc_lock >= 0:
            # Still holding the endpoint's lock, so a socket file at the path is the one
            # bound here (if libzmq did not remove it at close already): remove it, then
            # the lock file, then let go of the lock.
            assert self._ipc_path is not None
            if self._ipc_bound:
                try:
                    if stat.S_ISSOCK(os.lstat(self._ipc_path).st_mode):
                        os.unlink(self._ipc_path)
                except OSError:
                    pass
            _release_ipc_lock(self._ipc_path + ".lock", self._ipc_lock)
            self._ipc_lock = -1
        for directory in (self._shm_dir, self._ipc_dir):
            if directory is not None:
                directory.close()
        self._shm_dir = self._ipc_dir = None


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
        return self._server.endpoint

    @property
    def curve_public_key(self) -> bytes | None:
        """The server's CURVE public key (Z85), for clients' ``curve_server_key``."""
        return self._server.curve_public_key

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

"""The ZeroMQ frontend's endpoint: checked, bound, closed; CURVE keys and ZAP (server process).

A ``tcp://`` endpoint that is not loopback is refused without CURVE or ``insecure``.
An ``ipc:///PATH`` endpoint must sit in a private directory (0700) and is locked
(``flock`` on ``PATH.lock``) for the frontend's life: a second server is refused while
the first lives, and the socket file of one that was SIGKILLed is recognised as stale
and replaced (see ``transport.sockets``).

The ROUTER is bounded before any peer reaches it: heartbeats drop a silent peer, and
with ``max_request_bytes`` libzmq refuses a frame above the limit (plus
:data:`HEADER_MARGIN`) as it is announced. Its monitor reports closed connections
(:meth:`Endpoint.disconnections`); with ``curve_client_keys``, a ZAP handler admits
only the clients named (:meth:`Endpoint.on_zap`).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import stat
import struct

import zmq
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from ..errors import ConfigError
from ..transport.sockets import PrivateDir, hold_lock, lock_owner

__all__ = ["HEADER_MARGIN", "Endpoint"]

#: ZeroMQ heartbeats (seconds): a peer silent for HEARTBEAT_TIMEOUT is disconnected,
#: which ends its session, even when its host vanished without closing the connection.
HEARTBEAT_INTERVAL = 2.0
HEARTBEAT_TIMEOUT = 10.0
#: What a message may carry beyond ``max_request_bytes`` of tensor data: its header's
#: own fields (names, descriptors). Also the per-frame margin of ``ZMQ_MAXMSGSIZE``.
HEADER_MARGIN = 1 << 20


class Endpoint:
    """The frontend's ROUTER, bound to its endpoint, with its monitor and ZAP handler.

    The arguments are checked here (a malformed key is the caller's ConfigError at
    once); :meth:`check` and :meth:`open` bind; :meth:`close` releases everything,
    also after a failed :meth:`open`. See :class:`~.zmq_frontend.ZmqFrontend` for
    the arguments.
    """

    def __init__(
        self,
        asked: str,
        *,
        curve_secret_key: bytes | None,
        insecure: bool,
        max_request_bytes: int | None,
        curve_client_keys: list[bytes] | None,
    ) -> None:
        self.asked = asked
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
        self._bound = ""
        self._ctx: zmq.Context | None = None
        self.sock: zmq.Socket | None = None
        self.monitor: zmq.Socket | None = None
        self.zap: zmq.Socket | None = None
        self._ipc_dir: PrivateDir | None = None
        self._ipc_path: str | None = None
        #: the flock on ``ipc:///PATH``'s ``PATH.lock``; the socket file, once bound here
        self._ipc_lock = -1
        self._ipc_bound = False

    @property
    def address(self) -> str:
        """The bound endpoint (with the real port when port 0 or ``*`` was asked)."""
        return self._bound or self.asked

    @property
    def curve_public_key(self) -> bytes | None:
        """The server's CURVE public key (Z85) for clients' ``curve_server_key``."""
        return None if self._secret is None else zmq.curve_public(self._secret)

    def check(self) -> str:
        """The endpoint to bind, checked; for ``ipc://``, its directory made private
        and its lock taken (the caller's thread, before :meth:`open`).

        Raises:
            ConfigError: see :meth:`ZmqFrontend.start`.
            OSError: the ``ipc://`` path is in use (``errno.EADDRINUSE``).
        """
        endpoint = self.asked
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

    def open(self, endpoint: str) -> None:
        """Bind the ROUTER to ``endpoint`` (from :meth:`check`), with its monitor and,
        for ``curve_client_keys``, the ZAP handler.

        Raises:
            OSError: the endpoint is in use (``errno.EADDRINUSE``) or cannot be bound.
        """
        self._ctx = ctx = zmq.Context(1)
        if self._client_keys is not None:
            # The ZAP handler must be bound before the first connection's handshake.
            self.zap = ctx.socket(zmq.ROUTER)
            self.zap.linger = 0
            self.zap.bind("inproc://zeromq.zap.01")
        self.sock = sock = ctx.socket(zmq.ROUTER)
        sock.linger = 1000  # bounded: the last replies get a second to leave at close
        sock.sndhwm = 0  # a ROUTER drops replies beyond its HWM: never lose one
        sock.setsockopt(zmq.HEARTBEAT_IVL, int(HEARTBEAT_INTERVAL * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(HEARTBEAT_TIMEOUT * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TTL, int(HEARTBEAT_TIMEOUT * 1000))
        if self.max_request_bytes is not None:
            # Enforced by libzmq on each frame, before it allocates it (the margin is the
            # header's); the frames' number and sum are bounded as they are read.
            sock.setsockopt(zmq.MAXMSGSIZE, self.max_request_bytes + HEADER_MARGIN)
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
        self._bound = last.decode() if isinstance(last, bytes) else str(last)
        if self._ipc_path is not None:
            self._ipc_bound = True
            os.chmod(self._ipc_path, 0o600)  # its directory is 0700, so nobody got in before
        self.monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)

    def disconnections(self) -> list[int]:
        """The descriptors of the ZeroMQ connections closed since last asked (I/O thread)."""
        assert self.monitor is not None
        closed: list[int] = []
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return closed
            if event["event"] == zmq.EVENT_DISCONNECTED:
                closed.append(event["value"])

    def on_zap(self) -> None:
        """Answer ZAP requests: admit the clients whose CURVE key was named (I/O thread)."""
        zap = self.zap
        assert zap is not None
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

    def close(self) -> None:
        """Close the sockets and remove the ``ipc://`` socket file and lock (idempotent)."""
        if self.sock is not None and self.monitor is not None:
            try:
                self.sock.disable_monitor()
            except zmq.ZMQError:
                pass
        for sock in (self.monitor, self.zap, self.sock):
            if sock is not None:
                sock.close()
        self.monitor = self.zap = self.sock = None
        if self._ctx is not None:
            self._ctx.term()  # waits at most the ROUTER's linger for the last replies
            self._ctx = None
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
        if self._ipc_dir is not None:
            self._ipc_dir.close()
            self._ipc_dir = None


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

"""Who may reach the server: addresses, loopback checks, tokens and keys (server process).

The rule: an endpoint reachable from other machines must say who may use it. Binding
HTTP or gRPC to an address that is not loopback needs a bearer token
(``--http-token-file``; TLS encrypts, it does not say who connects), binding a ZeroMQ
``tcp://`` endpoint to one needs CURVE keys (``--zmq-curve-secret-key-file``);
``--insecure`` waives both, explicitly. ``ipc://``
endpoints are files: their directory must be private (mode 0700; created so when
missing) and the socket is made mode 0600. The checks run before anything is loaded, so
a refused command line costs nothing.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import socket
import stat
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "MIN_TOKEN_LENGTH",
    "Address",
    "BearerAuth",
    "TlsFiles",
    "UsageError",
    "bearer_matches",
    "check_http",
    "check_zmq",
    "is_loopback",
    "parse_address",
    "prepare_ipc",
    "read_curve_secret_key",
    "read_tls_files",
    "read_token",
]

#: tokens shorter than this are refused (a guessable token is no protection)
MIN_TOKEN_LENGTH = 16
_TOKEN_HINT = "python -c 'import secrets; print(secrets.token_urlsafe(32))' > token"

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class UsageError(Exception):
    """A command line the server refuses before starting (exit status 2)."""


@dataclass(frozen=True)
class Address:
    """A TCP address to listen on (port 0: any free port)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str, option: str) -> Address | None:
    """Parse ``HOST:PORT``, ``[IPv6]:PORT`` or ``PORT`` (host 127.0.0.1); ``off`` is None.

    Raises:
        UsageError: not an address.
    """
    text = text.strip()
    if text.lower() in ("off", "none", ""):
        return None
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise UsageError(f"{option} {text!r}: expected [IPv6]:PORT")
    elif ":" in text:
        host, _, port = text.rpartition(":")
        if ":" in host:
            raise UsageError(f"{option} {text!r}: write an IPv6 address in brackets, e.g. [::1]:{port}")
    else:
        host, port = "127.0.0.1", text
    if not host:
        raise UsageError(f"{option} {text!r}: give the host (127.0.0.1:{port}, or 0.0.0.0:{port} for every address)")
    if not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:  # not "²"
        raise UsageError(f"{option} {text!r}: the port must be a number from 0 to 65535")
    return Address(host, int(port))


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` resolves to is a loopback address.

    Raises:
        UsageError: the host does not resolve.
    """
    if host == "*":
        return False
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UsageError(f"host {host!r} does not resolve: {e.strerror}") from None
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in addresses)


def check_http(address: Address, option: str, *, token: bytes | None, insecure: bool) -> None:
    """Refuse a non-loopback HTTP address without a token or ``--insecure``.

    Raises:
        UsageError: naming the option and the two ways out.
    """
    if token is None and not insecure and not is_loopback(address.host):
        raise UsageError(
            f"{option} {address} is reachable from other machines; give a bearer token "
            "(--http-token-file FILE, or LIBTORCHRT_HTTP_TOKEN) or pass --insecure to serve it without one"
        )


def _zmq_host(endpoint: str) -> str | None:
    """The host of a ``tcp://HOST:PORT`` endpoint; None for ``ipc://``.

    Raises:
        UsageError: another transport, or no port.
    """
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme not in ("tcp", "ipc"):
        raise UsageError(f"--zmq {endpoint!r}: expected tcp://HOST:PORT or ipc:///PATH")
    if scheme == "ipc":
        if not rest:
            raise UsageError(f"--zmq {endpoint!r}: give the socket's path, e.g. ipc:///run/libtorchrt/pool.sock")
        return None
    if rest.startswith("["):
        host, sep, port = rest[1:].partition("]:")
    else:
        host, sep, port = rest.rpartition(":")
    if not sep or not host or not ((port.isascii() and port.isdigit()) or port == "*"):
        raise UsageError(f"--zmq {endpoint!r}: expected tcp://HOST:PORT")
    return host


def check_zmq(endpoint: str, *, curve_secret_key: bytes | None, insecure: bool) -> None:
    """Refuse a non-loopback ``tcp://`` endpoint without CURVE keys or ``--insecure``.

    ZeroMQ also binds interface names (``tcp://eth0:8003``) and ``*``: those count as
    not loopback.

    Raises:
        UsageError: naming the two ways out.
    """
    host = _zmq_host(endpoint)
    if host is None or curve_secret_key is not None or insecure:
        return
    try:
        loopback = is_loopback(host)
    except UsageError:  # an interface name, not a host name
        loopback = host == "lo"
    if not loopback:
        raise UsageError(
            f"--zmq {endpoint} is reachable from other machines; give CURVE keys "
            "(--zmq-curve-secret-key-file FILE) or pass --insecure to serve it without authentication"
        )


def prepare_ipc(endpoint: str, *, insecure: bool) -> None:
    """Make sure an ``ipc://`` endpoint's directory is private: create it with mode
    0700 when missing; refuse one that others may enter (unless ``insecure``), and an
    abstract socket (``ipc://@name``: no permissions at all) unless ``insecure``.
    ``ipc://*`` (a private temporary path) needs nothing.

    Raises:
        UsageError: the directory is open to others, or cannot be made.
    """
    rest = endpoint.removeprefix("ipc://")
    if not endpoint.startswith("ipc://") or rest == "*":
        return
    if rest.startswith("@"):
        if not insecure:
            raise UsageError(
                f"--zmq {endpoint}: an abstract socket has no permissions (any local user could connect); "
                "use a path, or pass --insecure"
            )
        return
    directory = Path(rest).absolute().parent
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = directory.stat()
    except OSError as e:
        raise UsageError(f"--zmq {endpoint}: cannot make the directory {str(directory)!r}: {e.strerror}") from None
    if not insecure and (st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077):
        raise UsageError(
            f"--zmq {endpoint}: the directory {str(directory)!r} is open to other users "
            f"(mode {stat.S_IMODE(st.st_mode):o}); put the socket in a directory of your own with mode 0700, "
            "or pass --insecure"
        )


def read_token(path: str | None, env: dict[str, str] | os._Environ[str] = os.environ) -> bytes | None:
    """The HTTP bearer token: the file's content (stripped), else ``LIBTORCHRT_HTTP_TOKEN``.

    It is read from a file or the environment, never from the command line, where
    every user of the machine could read it (``ps``).

    Raises:
        UsageError: the file cannot be read, or the token is too short.
    """
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--http-token-file {path!r}: cannot read it: {e}") from None
        where = f"--http-token-file {path!r}"
    else:
        text = env.get("LIBTORCHRT_HTTP_TOKEN", "").strip()
        where = "LIBTORCHRT_HTTP_TOKEN"
        if not text:
            return None
    if len(text) < MIN_TOKEN_LENGTH or any(c.isspace() for c in text):
        raise UsageError(
            f"{where}: a token must be at least {MIN_TOKEN_LENGTH} characters without spaces; "
            f"make one with: {_TOKEN_HINT}"
        )
    return text.encode()


def read_curve_secret_key(path: str | None) -> bytes | None:
    """The server's CURVE secret key from a file: ZeroMQ's certificate format (as
    ``zmq.auth.create_certificates`` writes), or the Z85 text alone (40 characters).

    Raises:
        UsageError: the file cannot be read or holds no key.
    """
    if path is None:
        return None
    try:
        text = Path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--zmq-curve-secret-key-file {path!r}: cannot read it: {e}") from None
    key = text.strip()
    for line in text.splitlines():
        name, sep, value = line.strip().partition("=")
        if sep and name.strip() == "secret-key":
            key = value.strip().strip('"')
    if len(key) != 40:
        raise UsageError(
            f"--zmq-curve-secret-key-file {path!r}: expected a Z85 secret key (40 characters) or a ZeroMQ "
            "secret certificate; make one with: "
            'python -c \'import zmq.auth; zmq.auth.create_certificates(".", "server")\''
        )
    return key.encode()


@dataclass(frozen=True)
class TlsFiles:
    """What an endpoint serves TLS with: a PEM certificate chain and its private key."""

    certificate: bytes
    key: bytes


def read_tls_files(certificate: str | None, key: str | None, option: str = "--grpc-tls") -> TlsFiles | None:
    """The certificate chain and private key of ``--grpc-tls-cert`` and ``--grpc-tls-key``
    (None when neither is given).

    Raises:
        UsageError: only one is given, a file cannot be read, or it is not PEM.
    """
    if certificate is None and key is None:
        return None
    if certificate is None or key is None:
        raise UsageError(f"{option}-cert and {option}-key go together: give both, or neither")
    out = []
    for path, what, marker in ((certificate, "cert", b"BEGIN CERTIFICATE"), (key, "key", b"PRIVATE KEY")):
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise UsageError(f"{option}-{what} {path!r}: cannot read it: {e.strerror}") from None
        if marker not in data:
            raise UsageError(f"{option}-{what} {path!r}: expected a PEM file (-----{marker.decode()}-----)")
        out.append(data)
    return TlsFiles(out[0], out[1])


def bearer_matches(authorization: bytes, token: bytes) -> bool:
    """Whether an ``Authorization`` value (an HTTP header, gRPC metadata) is
    ``Bearer <token>``. The comparison takes the same time whatever the guess
    (``hmac.compare_digest``)."""
    scheme, _, credentials = authorization.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), token)


class BearerAuth:
    """ASGI middleware: every HTTP request but those to ``exempt`` paths must carry
    ``Authorization: Bearer <token>``; others get 401 with ``{"error": ...}``.

    The comparison takes the same time whatever the token (``hmac.compare_digest``).
    """

    def __init__(self, app: ASGIApp, token: bytes, exempt: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.token = token
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        body = json.dumps({"error": "missing or wrong bearer token (send 'Authorization: Bearer <token>')"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Bearer realm="libtorchrt"'),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _allowed(self, scope: Scope) -> bool:
        for key, value in scope["headers"]:
            if key == b"authorization":
                return bearer_matches(bytes(value), self.token)
        return False

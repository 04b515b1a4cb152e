"""``Client``: a pool served by another process, maybe on another host (client process).

The public side: inputs are checked and converted (``inputs.py``), and big tensors
copied into shared memory, in the caller's thread; the I/O thread of
``connection.Connection`` does the rest (its module docstring shows the data flow),
with its sessions (``session.py``) and requests (``requests.py``). See docs/client.md.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import warnings
import weakref
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import torch

from .._plain import health_from_plain, statuses_from_plain
from ..deadlines import check_timeout
from ..errors import ConfigError, InvalidInputError, PoolClosedError, TimeoutError
from ..info import ModelHealth, ModelStatus
from ..transport import lending
from ..transport import tensors as tensor_io
from .connection import MARGIN, Connection, Request
from .inputs import Inputs, normalize

__all__ = ["Client"]


def _setting(name: str, value: Any, *, allow_zero: bool = True) -> float | None:
    """A duration argument (``timeout``, ``grace``), checked; huge ones are capped.

    Raises:
        ConfigError: not a number of seconds or None, NaN, negative.
    """
    try:
        return check_timeout(value, allow_zero=allow_zero)
    except ValueError as e:
        raise ConfigError(f"{name}: {e}", key=name) from None


def _request_timeout(model: str, value: Any) -> float | None:
    """A request's ``timeout``, checked (huge ones, ``inf`` included, are capped at
    ``deadlines.MAX_TIMEOUT_S``: no wait may overflow a poll call).

    Raises:
        InvalidInputError: not a number of seconds or None, NaN, negative.
    """
    try:
        return check_timeout(value)
    except ValueError:
        raise InvalidInputError(model, None, "timeout: a number of seconds >= 0, or None", repr(value)) from None


def _finalize(connection: Connection) -> None:
    if connection.alive:
        warnings.warn(
            "libtorchrt.Client was not closed; closing it now (use `with Client(...)` or call close())",
            ResourceWarning,
            stacklevel=2,
        )
        connection.stop(grace=0.0)


def _check_endpoint(endpoint: object) -> None:
    """Refuse, with what to do instead, an endpoint that is not libtorchrt's ZeroMQ."""
    if not isinstance(endpoint, str):
        raise ConfigError(f"endpoint {endpoint!r}: expected a string such as 'tcp://HOST:PORT'", key="endpoint")
    scheme, sep, _ = endpoint.partition("://")
    if sep and scheme in ("tcp", "ipc"):
        return
    if scheme in ("http", "https"):
        hint = (
            "Client speaks libtorchrt's ZeroMQ protocol: start the server with --zmq tcp://HOST:PORT and "
            "connect to that; for its HTTP endpoint use tritonclient.http (KServe v2) instead"
        )
    elif scheme in ("grpc", "grpcs"):
        hint = (
            "Client speaks libtorchrt's ZeroMQ protocol (tcp:// or ipc://): start the server with --zmq and connect "
            "to that; for its gRPC endpoint (--grpc) use tritonclient.grpc (KServe v2) instead"
        )
    elif not sep:
        hint = f"give a ZeroMQ endpoint with its transport: 'tcp://{endpoint}' or 'ipc:///path/to/socket'"
    else:
        hint = "expected tcp://HOST:PORT or ipc:///PATH"
    raise ConfigError(f"endpoint {endpoint!r}: {hint}", key="endpoint")


class Client:
    """A pool served by a :class:`~libtorchrt.server.zmq_frontend.ZmqFrontend`, maybe on
    another host, with the same calls as :class:`~libtorchrt.Pool`.

    Thread-safe and asyncio-friendly: many threads may share one client. On the same
    host, tensors travel through shared memory (memfds handed over a Unix socket);
    across hosts, as zero-copy ZeroMQ frames.

    Args:
        endpoint: the server's ZeroMQ endpoint, ``tcp://HOST:PORT`` or ``ipc:///PATH``.
        timeout: the default deadline of each request, in seconds (None: none).
        curve_server_key: the server's CURVE public key (Z85), for a server started
            with ``curve_secret_key``.
        shared_memory: None: use shared memory when the server runs on the same host
            (and lets us), else frames; True: require it; False: always frames.
        connect_timeout: how long to wait for the server's handshake, here and after
            the connection drops.
        curve_client_key: this client's ``(public, secret)`` CURVE keys, for a server
            that admits only some clients; default, a fresh pair.
        request_arena_bytes: the shared memory for request tensors (address space;
            pages are used only when touched). Larger tensors travel as frames.
        inline_threshold: tensors up to this many bytes travel inside the header.

    Raises:
        ConfigError: ``timeout`` or ``connect_timeout`` is not a number of seconds (NaN,
            negative; huge ones, ``inf`` included, are capped at 30 days).
        ServerConnectionError: no server answered within ``connect_timeout``, it
            refused the ZeroMQ handshake (CURVE), or shared memory was required and
            could not be set up.
        ProtocolError: the server speaks another protocol version.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        timeout: float | None = None,
        curve_server_key: bytes | None = None,
        shared_memory: bool | None = None,
        connect_timeout: float = 10.0,
        curve_client_key: tuple[bytes, bytes] | None = None,
        request_arena_bytes: int = 128 << 20,
        inline_threshold: int = tensor_io.DEFAULT_INLINE_THRESHOLD,
    ) -> None:
        _check_endpoint(endpoint)
        self.endpoint = endpoint
        self.timeout = _setting("timeout", timeout)
        checked = _setting("connect_timeout", connect_timeout, allow_zero=False)
        if checked is None:
            raise ConfigError("connect_timeout: expected a number of seconds > 0, got None", key="connect_timeout")
        connect_timeout = checked
        self._connection = Connection(
            endpoint,
            curve_server_key=curve_server_key,
            curve_client_key=curve_client_key,
            shared_memory=shared_memory,
            connect_timeout=connect_timeout,
            request_arena_bytes=request_arena_bytes,
            inline_threshold=inline_threshold,
        )
        self._finalizer = weakref.finalize(self, _finalize, self._connection)
        try:
            self._connection.wait_ready(connect_timeout)
        except BaseException:
            self.close(grace=0.0)
            raise

    @property
    def shared_memory(self) -> bool:
        """Whether the current session moves tensors through shared memory."""
        return self._connection.shm

    # ── requests ───────────────────────────────────────────────────────────────

    def empty(
        self, model: str, shape: int | Sequence[int], dtype: torch.dtype = torch.float32, *, version: int | None = None
    ) -> torch.Tensor:
        """An uninitialised CPU tensor to make an input in, as ``Pool.empty``: in this
        client's request arena, the shared memory the server reads same-host requests
        from, so that requests naming it (or a contiguous view of it) go without the
        client's copy into that arena while the session uses shared memory (the server
        still copies inputs into its pool's request arena).

        One arena serves every model: ``model`` and ``version`` are taken for the same
        calls as ``Pool``'s and name the model in errors. Without shared memory (another
        host, ``shared_memory=False``), and for tensors of up to ``inline_threshold`` or
        past half the arena, it is an ordinary tensor, copied as usual when sent. Do not
        change it until the replies of the requests naming it have come.

        Raises:
            InvalidInputError: a bad ``shape`` or ``dtype``.
            PoolClosedError: the client is closed.
        """
        if self.closed:
            raise PoolClosedError("the client is closed")
        connection = self._connection
        return lending.empty(connection.allocator, connection.inline_threshold, model, shape, dtype)

    def submit(
        self,
        model: str,
        inputs: Inputs,
        *,
        version: int | None = None,
        timeout: float | None = None,
        priority: int | None = None,
        sequence_id: int | str | None = None,
        sequence_start: bool = False,
        sequence_end: bool = False,
    ) -> concurrent.futures.Future[dict[str, torch.Tensor]]:
        """Send a request; return a future of its outputs (see ``Pool.submit``).

        Args:
            model: the model's name.
            inputs: a dict keyed by input name, a list in argument order, or a single
                tensor; values are tensors (CUDA ones are copied to the CPU), numpy
                arrays, or lists of ``str`` for string inputs.
            version: the model version (default: the highest version served).
            timeout: the request's deadline in seconds (default: the client's); one
                beyond 30 days (``inf`` too) is capped there.
            priority: its priority level, for a model with ``dynamic_batching``
                ``priority_levels`` (see ``Pool.submit``).
            sequence_id, sequence_start, sequence_end: the request's sequence, for
                a model with ``sequence_batching`` (see ``Pool.submit``).

        Returns:
            A ``concurrent.futures.Future`` resolving to ``{output name: tensor}``
            (``list[str]`` for string outputs). Output tensors may view shared memory,
            recycled once they are freed. Cancelling the future tells the server,
            which drops the request unless it already runs.

        Raises:
            InvalidInputError: an input cannot cross the wire, the request exceeds
                the server's ``max_request_bytes``, or ``timeout`` is not a number of
                seconds >= 0. The server checks the rest (unknown model, shapes, ...)
                and the future fails with its error.
            ServerConnectionError, ProtocolError: the client cannot serve any more
                (its I/O thread failed, the server speaks another protocol, ...).
            PoolClosedError: the client is closed.
        """
        connection = self._connection
        broken = connection.broken
        if broken is not None:
            raise broken
        if connection.closed:
            raise PoolClosedError("the client is closed")
        if not isinstance(model, str):
            raise TypeError(f"model must be a str, got {type(model).__name__}")
        timeout = self.timeout if timeout is None else _request_timeout(model, timeout)
        version = None if version is None else int(version)
        priority = None if priority is None else int(priority)
        names, single, values = normalize(model, inputs)
        session = connection.session
        limit = session.max_request_bytes if session is not None else None
        if limit is not None:
            total = sum(v.numel() * v.element_size() for v in values)
            if total > limit:
                raise InvalidInputError(model, None, f"at most max_request_bytes={limit} bytes", f"{total} bytes")
        future: Future[dict[str, torch.Tensor]] = Future()
        request = Request(next(connection.ids), future, model)
        request.timeout = timeout
        if connection.shm:
            placed = tensor_io.write(values, connection.arena, connection.allocator, connection.inline_threshold)
        else:
            placed = tensor_io.write(values, None, None, connection.inline_threshold)
        request.offsets = placed.offsets
        request.frames = placed.frames
        # every field of INFER but releases (added when it is sent)
        request.header_fields = (
            request.id, model, version, timeout, names, placed.descs, placed.blobs, single, priority,
            sequence_id, bool(sequence_start), bool(sequence_end),
        )  # fmt: skip
        connection.submit(request)
        future.add_done_callback(_cancel_on_done(connection, request.id))
        return future

    def infer(
        self,
        model: str,
        inputs: Inputs,
        *,
        version: int | None = None,
        timeout: float | None = None,
        priority: int | None = None,
        sequence_id: int | str | None = None,
        sequence_start: bool = False,
        sequence_end: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Run one request and wait for its outputs (see ``Pool.infer``).

        Raises:
            UnknownModelError, InvalidInputError, ModelError, ModelUnavailableError,
            WorkerDiedError, TimeoutError: as the pool raised them in the server.
            ServerConnectionError: the connection was lost before the answer came.
            PoolClosedError: the client is closed.
        """
        timeout = self.timeout if timeout is None else _request_timeout(model, timeout)
        future = self.submit(
            model,
            inputs,
            version=version,
            timeout=timeout,
            priority=priority,
            sequence_id=sequence_id,
            sequence_start=sequence_start,
            sequence_end=sequence_end,
        )
        try:
            return future.result(None if timeout is None else timeout + 2 * MARGIN)
        except concurrent.futures.TimeoutError:
            if future.done():  # the request's own error (ours derives from TimeoutError)
                raise
            future.cancel()
            raise TimeoutError(f"model {model!r} did not answer within {timeout} s") from None

    async def infer_async(
        self,
        model: str,
        inputs: Inputs,
        *,
        version: int | None = None,
        timeout: float | None = None,
        priority: int | None = None,
        sequence_id: int | str | None = None,
        sequence_start: bool = False,
        sequence_end: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Run one request from asyncio; see :meth:`infer`."""
        future = self.submit(
            model,
            inputs,
            version=version,
            timeout=timeout,
            priority=priority,
            sequence_id=sequence_id,
            sequence_start=sequence_start,
            sequence_end=sequence_end,
        )
        return await asyncio.wrap_future(future)

    # ── introspection ──────────────────────────────────────────────────────────

    def _query(self, what: str, timeout: float | None) -> Any:
        connection = self._connection
        broken = connection.broken
        if broken is not None:
            raise broken
        timeout = _setting("timeout", timeout)
        future: Future[Any] = Future()
        request = Request(next(connection.ids), future, what=what)
        if timeout is None:
            timeout = self.timeout if self.timeout is not None else connection.connect_timeout
        request.timeout = timeout
        connection.submit(request)
        try:
            return future.result(timeout + 2 * MARGIN)
        except concurrent.futures.TimeoutError:
            if future.done():
                raise
            raise TimeoutError(f"{what}(): no answer from the server within {timeout} s") from None

    def models(self, *, timeout: float | None = None) -> list[ModelStatus]:
        """Every model version the server's pool serves, with its state and error
        (see ``Pool.models``)."""
        return statuses_from_plain(self._query("models", timeout))

    def health(self, *, timeout: float | None = None) -> dict[str, ModelHealth]:
        """Each model's and instance's state in the server's pool (see ``Pool.health``)."""
        return health_from_plain(self._query("health", timeout))

    # ── lifetime ───────────────────────────────────────────────────────────────

    def close(self, grace: float = 5.0) -> None:
        """Let requests in flight finish for up to ``grace`` seconds (the rest fail with
        :class:`PoolClosedError`), end the session and release every socket, thread,
        descriptor and arena of the client. Idempotent. Output tensors still held keep
        their shared memory mapped until they are freed.

        Raises:
            ConfigError: ``grace`` is not a number of seconds >= 0.
        """
        self._connection.stop(_setting("grace", grace) or 0.0)
        self._finalizer.detach()

    @property
    def closed(self) -> bool:
        return self._connection.closed or self._connection.closing_at is not None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(grace=0.0 if exc[0] is not None else 5.0)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "shared memory" if self.shared_memory else "frames"
        return f"<libtorchrt.Client {self.endpoint} ({state})>"


def _cancel_on_done(connection: Connection, request_id: int) -> Any:
    """A done-callback that tells the server when the caller cancelled the future."""

    def done(future: Future[Any]) -> None:
        if future.cancelled():
            connection.cancel(request_id)

    return done

"""The KServe v2 / Open Inference Protocol over HTTP: the ASGI application (server process).

::

    uvicorn (event loop thread)                 worker threads (big bodies)
    ───────────────────────────                 ───────────────────────────
    POST /v2/models/m/infer
      read the body, ≤ --max-request-bytes
      (Content-Length checked first),
      within --body-timeout
      take an in-flight slot (--max-inflight)
      decompress, decode (kserve.py)      or ──► the same
      pool.infer_async (serving.infer)    or ──► pool.submit: bind, copy into shared
        ─► the pool's fast lane or router            memory ─► the router
      await the outputs, watching for the
      client going away (cancel)
      encode (JSON ≤ --max-json-response- or ──► the same
      bytes, or binary)
      send header JSON, then the tensors' bytes as they are

Small requests (up to 64 KiB) are decoded, run by ``Pool.infer_async`` and encoded on the
event loop: a request to a CPU model then takes the pool's fast lane, and the router
thread runs no Python for it (``serving.infer``). A step on more bytes runs in a worker
thread instead (for inputs, ``Pool.submit``, which copies them into shared memory there),
so a big body never stalls the health checks.
A slot is taken only once the whole body has arrived, so clients that send their
bodies slowly cannot hold every slot; they are bounded instead by --body-timeout
(408) and, with everything being received, by --max-inflight times --max-request-bytes.
Errors are ``{"error": "..."}`` with the status codes of :data:`STATUS`, one line each:
a model's traceback goes to the server's log (one record per failed request), never to
the client. A client that disconnects while its body is read or its request runs
leaves nothing behind: the body is dropped, a request not yet sent to a worker is
cancelled, and the outputs of one that ran are freed when the response is dropped.

The application serves from the moment the server listens, before the pool exists
(``ServerState.pool`` is None while the repository loads): the probes answer (live 200,
ready 400), and inference and model metadata answer 503 until the pool is there. The
shared-memory extensions' endpoints are ``http_shm.py``'s; the regions they register
(``ServerState.regions``) are read and written by inference here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ..config import ModelConfig
from ..errors import (
    ConfigError,
    InvalidInputError,
    ModelError,
    ModelUnavailableError,
    PoolClosedError,
    QueueFullError,
    TimeoutError,
    TorchRTError,
    UnknownModelError,
    WorkerDiedError,
)
from ..front.pool import Pool
from ..info import ModelHealth, ModelStatus
from . import http_repository, http_shm, metadata
from .classification import Labels
from .control import RepositoryControl
from .kserve import (
    EncodedResponse,
    InferRequest,
    RequestError,
    classify_outputs,
    decode_request,
    encode_response,
    read_shared_inputs,
    shared_input_bytes,
)
from .security import BearerAuth
from .serving import LOADING, Models, infer, inflight, input_bytes, log_failure, not_live, server_ready, submit
from .sysshm import Regions, owner_for_token

__all__ = ["HEALTH_PATHS", "STATUS", "Limits", "ServerState", "build_app", "summary"]

log = logging.getLogger("libtorchrt.server")

#: HTTP status of each error the pool raises (anything else: 500)
STATUS: dict[type[BaseException], int] = {
    InvalidInputError: 400,
    UnknownModelError: 404,
    ModelUnavailableError: 503,
    PoolClosedError: 503,
    QueueFullError: 503,
    TimeoutError: 504,
    ModelError: 500,
    WorkerDiedError: 500,
    ConfigError: 500,
}
#: paths open without the bearer token (probes carry none; they reveal nothing)
HEALTH_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
#: requests and responses up to this size are handled on the event loop
_INLINE_BYTES = 64 * 1024
_HEADER_LENGTH = "inference-header-content-length"
#: a number in a header or a path: ASCII digits only (``str.isdigit`` takes '²', which
#: ``int`` refuses, and Arabic-Indic digits, which ``int`` reads), few enough to fit an int64
_NUMBER = re.compile(r"[0-9]{1,18}")
#: answers after which the rest of the request body is not read: the connection closes
_CLOSE = {"Connection": "close"}
#: TorchScript's message for an exception raised in a scripted model starts with this line,
#: then its two tracebacks (serialized code, then the author's source: paths and code), and
#: ends with the exception itself (``builtins.RuntimeError: ...``)
_TORCHSCRIPT = "The following operation failed in the TorchScript interpreter."
#: the last line of a TorchScript message: the exception's (qualified) type and message
_RAISED = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*): (.*)$")
#: the answer to a request that needs the pool while the repository loads
_LOADING = LOADING


@dataclass(frozen=True)
class Limits:
    """What one client may ask of the server.

    Attributes:
        max_request_bytes: the largest request body (after decompression), checked
            against ``Content-Length`` before anything is read.
        max_inflight: inference requests handled at once, counted from when their
            body has arrived; more get 503 at once. Bodies being received are bounded
            apart, by their bytes: all of them together may hold at most this times
            ``max_request_bytes`` (the memory bodies in flight hold).
        body_timeout: seconds the whole request body may take to arrive, from when
            its headers did; a slower one gets 408 and the connection is closed.
        max_json_response_bytes: the most tensor data returned as JSON ``data`` in one
            response (binary outputs are not limited); more gets 400 naming the binary
            data extension.
    """

    max_request_bytes: int = 64 << 20
    max_inflight: int = 64
    body_timeout: float = 30.0
    max_json_response_bytes: int = 4 << 20


@dataclass
class ServerState:
    """What the HTTP handlers share: the pool, the limits, and whether it is draining.

    ``pool`` is None while the repository loads (the service sets it once the pool, and
    the ZeroMQ frontend if any, are up); ``starting`` then gives each model's health,
    from the moment the pool's router exists.
    """

    pool: Pool | None
    limits: Limits
    draining: bool = False
    #: inference requests holding a slot (their body has arrived)
    inflight: int = 0
    #: bytes of the request bodies being received
    receiving: int = 0
    #: a thread the server depends on that stopped unexpectedly (the service sets it)
    broken: str | None = None
    #: while the pool loads: each model's health (``Pool.health()``), once its router exists
    starting: Callable[[], dict[str, ModelHealth]] | None = None
    #: set while draining: called (on the event loop) when the last in-flight request ends
    on_idle: Callable[[], None] | None = None
    #: the system shared-memory regions clients registered (closed by the service on shutdown)
    regions: Regions = field(default_factory=Regions)
    #: the repository index, and models loaded and unloaded while serving (set with ``pool``)
    control: RepositoryControl | None = None

    def loading_models(self) -> list[ModelStatus]:
        """While the pool loads: each model version known so far, as ``Pool.models()``
        would list it (none before the pool's router exists)."""
        snapshot = self.starting
        if snapshot is None:
            return []
        seen = {(h.model, h.version): h for h in snapshot().values()}  # (a default version is listed twice)
        return [ModelStatus(h.model, h.version, h.state, h.error, h.ready, len(h.instances))
                for _, h in sorted(seen.items())]  # fmt: skip


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def summary(e: BaseException) -> str:
    """One line saying what went wrong, for the client: never a traceback, a path or code.

    A :class:`ModelError` gives the model's exception type and the first line of its
    message (for a TorchScript model, the exception its interpreter reports on its last
    line: ``model 'm' raised RuntimeError: negative input``); any other error the first
    line of its message (a :class:`WorkerDiedError` without the worker's stderr).
    """
    if isinstance(e, ModelError):
        lines = [line.strip() for line in e.message.strip().splitlines() if line.strip()]
        kind, text = e.error_type, lines[0] if lines else ""
        if lines and lines[0] == _TORCHSCRIPT:
            raised = _RAISED.match(lines[-1])
            kind, text = (raised.group(1), raised.group(2)) if raised else (kind, lines[-1])
        return f"model {e.model!r} raised {kind}: {text}"
    if isinstance(e, WorkerDiedError):  # its stderr is in the log, line by line
        return _first_line(str(e)).removesuffix("; last lines of its stderr:")
    return _first_line(str(e))


def _failure(e: BaseException) -> JSONResponse:
    if isinstance(e, RequestError):
        return _error(e.status, e.message, e.headers)
    status = next((code for cls, code in STATUS.items() if isinstance(e, cls)), 500)
    message = summary(e)
    log_failure(e, status, f"inference failed ({status}): {message}")  # one log record per failed request
    return _error(status, message, {"Retry-After": "1"} if isinstance(e, QueueFullError) else None)


def _version(request: Request) -> int | None:
    text = request.path_params.get("version")
    if text is None or text == "":
        return None
    if not _NUMBER.fullmatch(text):
        raise RequestError(400, f"model version {text[:40]!r} is not a number (ASCII digits, at most 18)")
    return int(text)


async def _in_thread(size: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if size <= _INLINE_BYTES:
        return fn(*args, **kwargs)
    return await run_in_threadpool(fn, *args, **kwargs)


def _too_big(limit: int) -> str:
    return f"the request body is larger than this server takes ({limit} bytes, --max-request-bytes)"


def _encoding(request: Request) -> str:
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip", "deflate"):
        raise RequestError(
            415, f"Content-Encoding {encoding[:40]!r} is not supported; send identity, gzip or deflate", _CLOSE
        )
    return encoding


async def _receive_body(request: Request, state: ServerState) -> bytearray:
    """The request body as sent (still compressed, if it is), holding no slot.

    Raises:
        RequestError: 413 as soon as it is known to exceed ``--max-request-bytes``;
            408 when it has not all arrived within ``--body-timeout``; 503 when the
            bodies being received would hold more than ``--max-inflight`` times
            ``--max-request-bytes``. Each closes the connection (its rest is not read).
        ClientDisconnect: the client went away.
    """
    limits = state.limits
    limit = limits.max_request_bytes
    declared = request.headers.get("content-length")
    if declared is not None:  # (h11 has checked it too; this does not depend on that)
        if not re.fullmatch(r"[0-9]+", declared):
            raise RequestError(400, f"Content-Length {declared[:40]!r} is not a number", _CLOSE)
        if len(declared) > 18 or int(declared) > limit:
            raise RequestError(413, f"{_too_big(limit)}: Content-Length is {declared}", _CLOSE)
    budget = limits.max_inflight * limit
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limits.body_timeout
    # Memory follows what was received, never what the client announced; the chunks
    # are joined once at the end (growing one buffer would copy it again and again).
    chunks: list[bytes] = []
    size = 0
    try:
        while True:
            try:
                message = await asyncio.wait_for(request.receive(), deadline - loop.time())
            except asyncio.TimeoutError:
                raise RequestError(
                    408,
                    f"the request body did not arrive within {limits.body_timeout:g} s (--body-timeout); "
                    f"{size} bytes came",
                    _CLOSE,
                ) from None
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                state.receiving += len(chunk)
                if size > limit:
                    raise RequestError(413, _too_big(limit), _CLOSE)
                if state.receiving > budget:
                    raise RequestError(
                        503,
                        f"the server is receiving {budget} bytes of request bodies already "
                        "(--max-inflight times --max-request-bytes); retry",
                        {"Retry-After": "1", **_CLOSE},
                    )
                chunks.append(chunk)
            if not message.get("more_body", False):
                return bytearray().join(chunks)
    finally:
        state.receiving -= size


def _decompress(data: bytearray, encoding: str, limit: int) -> bytearray:
    """``data`` decompressed: never more than ``limit`` bytes are made (a bomb is
    refused as it inflates), and it must be one whole stream, nothing after it."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        out = d.decompress(data, limit + 1)  # never more than the limit allows
    except zlib.error as e:
        raise RequestError(400, f"the {encoding} body does not decompress: {e}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise RequestError(413, f"{_too_big(limit)} once decompressed")
    if not d.eof:  # all the input used, the stream unfinished: it was cut short
        raise RequestError(400, f"the {encoding} body is truncated: its compressed stream does not end")
    if d.unused_data:  # silently dropping what follows would serve another request than was sent
        raise RequestError(
            400,
            f"the {encoding} body has {len(d.unused_data)} bytes after the end of its compressed stream "
            "(another gzip member, or garbage); send a single stream",
        )
    return bytearray(out)


def _header_length(request: Request) -> int | None:
    value = request.headers.get(_HEADER_LENGTH)
    if value is None:
        return None
    if not _NUMBER.fullmatch(value):
        raise RequestError(400, f"Inference-Header-Content-Length {value[:40]!r} is not a number (ASCII digits)")
    return int(value)


async def _until_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _outputs(result: asyncio.Future[Any], receive: Receive) -> Any:
    """The request's outputs; if the client goes away first, cancel the request (which
    cancels it in the pool if it was not sent to a worker yet)."""
    watch = asyncio.ensure_future(_until_disconnected(receive))
    try:
        await asyncio.wait({result, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        result.cancel()
        raise
    finally:
        watch.cancel()
    if not result.done():
        result.cancel()
        raise ClientDisconnect()
    return result.result()


def _output_bytes(outputs: dict[str, Any]) -> int:
    return sum(v.numel() * v.element_size() if hasattr(v, "numel") else 64 * len(v) for v in outputs.values())


class TensorResponse(Response):
    """An inference response: the JSON header, then each binary output's bytes as a
    body chunk of its own (they are views of the worker's output memory, not copied)."""

    def __init__(self, encoded: EncodedResponse) -> None:
        self.encoded = encoded
        self.status_code = 200
        self.background = None
        content_type = b"application/octet-stream" if encoded.header_length is not None else b"application/json"
        self.raw_headers = [(b"content-type", content_type), (b"content-length", str(encoded.size).encode())]
        if encoded.header_length is not None:
            self.raw_headers.append((_HEADER_LENGTH.encode(), str(encoded.header_length).encode()))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        parts = [self.encoded.header, *self.encoded.chunks]
        for i, part in enumerate(parts):
            await send({"type": "http.response.body", "body": part, "more_body": i < len(parts) - 1})


class _Endpoints:
    def __init__(self, state: ServerState, owner: str = "anonymous") -> None:
        self.state = state
        self.models = Models(state)
        #: whose shared-memory regions this application's requests use (sysshm.py)
        self.owner = owner
        #: the outputs' label files (classification)
        self.labels = Labels()

    # ── health and metadata ────────────────────────────────────────────────

    async def live(self, request: Request) -> Response:
        # The pool's router thread died (a bug): every request would fail, so ask to be
        # restarted. A normal drain stays live: it ends by itself; so does a load.
        why = not_live(self.state)
        if why is not None:
            return _error(503, why)
        return Response(status_code=200)

    def server_ready(self) -> bool:
        return server_ready(self.state)

    async def ready(self, request: Request) -> Response:
        return Response(status_code=200 if self.server_ready() else 400)

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse(metadata.server_metadata())

    async def model_metadata(self, request: Request) -> Response:
        name = request.path_params["name"]
        try:
            cfg = self.models.config(name, _version(request))
            versions = [s.version for s in self.models.statuses(name) if s.version is not None]
            return JSONResponse(metadata.model_metadata(cfg, versions))
        except (RequestError, TorchRTError) as e:
            return _failure(e)

    async def model_ready(self, request: Request) -> Response:
        try:
            status = self.models.status(request.path_params["name"], _version(request))
        except RequestError as e:
            if e.status == 503:  # loading (any name), or known but its configuration could not be read
                return Response(status_code=400)
            return _failure(e)
        ready = status.state == "ready" and not self.state.draining
        return Response(status_code=200 if ready else 400)

    async def model_config(self, request: Request) -> Response:
        try:
            cfg = self.models.config(request.path_params["name"], _version(request))
            return JSONResponse(metadata.model_config(cfg))
        except (RequestError, TorchRTError) as e:
            return _failure(e)

    async def statistics(self, request: Request) -> Response:
        try:
            stats_of = getattr(self.models.pool, "stats", None)
            if stats_of is None:
                return _error(501, "statistics are not available from this version of libtorchrt")
            name = request.path_params.get("name")
            version = _version(request)
            if name is not None:
                version = self.models.status(name, version).version
        except RequestError as e:
            return _failure(e)
        stats = [s for s in stats_of() if name is None or (s.model == name and s.version == version)]
        return JSONResponse(metadata.model_statistics(stats))

    # ── inference ──────────────────────────────────────────────────────────

    async def infer(self, request: Request) -> Response:
        state = self.state
        if state.draining or (state.pool is not None and state.pool.closed):
            return _error(503, "the server is shutting down; send the request to another instance")
        if state.pool is None:
            return _error(503, _LOADING, {"Retry-After": "1"})
        try:
            return await self._infer(request)
        except ClientDisconnect:
            log.debug("client went away during %s", request.url.path)
            return Response(status_code=400)  # nobody reads it
        except (RequestError, TorchRTError) as e:
            return _failure(e)

    def _slot(self) -> contextlib.AbstractContextManager[None]:
        """One of the ``--max-inflight`` slots, or 503 at once (shared with gRPC)."""
        return inflight(self.state)

    async def _infer(self, request: Request) -> Response:
        # What the headers tell is checked before the body is read; the body is read
        # before a slot is taken (a slow sender must not hold one).
        name = request.path_params["name"]
        version = _version(request)
        try:
            cfg = self.models.config(name, version)
        except UnknownModelError as e:  # gone between the two looks (it cannot, today)
            raise RequestError(404, str(e)) from None
        header_length = _header_length(request)
        encoding = _encoding(request)
        limits = self.state.limits
        body = await _receive_body(request, self.state)
        with self._slot():
            if encoding != "identity":
                body = await _in_thread(len(body), _decompress, body, encoding, limits.max_request_bytes)
            declared = {s.name: s for s in cfg.inputs}
            received = len(body)
            req: InferRequest = await _in_thread(len(body), decode_request, body, header_length, name, declared)
            del body  # the inputs hold what they need of it
            if req.shared_inputs:  # copied out of their regions: they count as a body would
                shared = shared_input_bytes(req)
                if received + shared > limits.max_request_bytes:
                    raise RequestError(
                        413,
                        f"{_too_big(limits.max_request_bytes)}: its inputs in shared memory are {shared} bytes",
                    )
                await _in_thread(shared, read_shared_inputs, req, self.state.regions, self.owner)
            pool, copied = self.models.pool, input_bytes(req)
            result: asyncio.Future[Any]
            if copied <= _INLINE_BYTES:  # (by the fast lane: serving.infer)
                result = asyncio.ensure_future(infer(pool, name, cfg, req))
            else:
                result = asyncio.wrap_future(await _in_thread(copied, submit, pool, name, cfg, req))
            outputs = await _outputs(result, request.receive)
            encoded = await _in_thread(_output_bytes(outputs), self._encode, cfg, req, outputs)
            del outputs
            return TensorResponse(encoded)

    def _encode(self, cfg: ModelConfig, req: InferRequest, outputs: dict[str, Any]) -> EncodedResponse:
        if req.outputs is not None and any(o.class_count for o in req.outputs):
            outputs = classify_outputs(
                req, outputs, batched=cfg.max_batch_size > 0, labels=lambda output: self.labels.of(cfg, output)
            )
        return encode_response(
            cfg.name,
            cfg.version,
            req,
            outputs,
            self.state.limits.max_json_response_bytes,
            regions=self.state.regions,
            owner=self.owner,
        )


async def _not_found(request: Request, exc: Exception) -> Response:
    if isinstance(exc, HTTPException):
        headers = dict(exc.headers) if exc.headers else None
        if exc.status_code == 404:
            return _error(404, f"no such endpoint: {request.method} {request.url.path}", headers)
        if exc.status_code == 405:
            allowed = headers.get("Allow", "") if headers else ""
            return _error(405, f"{request.method} is not allowed on {request.url.path}; use {allowed}", headers)
        return _error(exc.status_code, str(exc.detail), headers)
    return _error(500, "internal error")


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("internal error handling %s %s", request.method, request.url.path, exc_info=exc)
    return _error(500, f"internal error: {type(exc).__name__}: {_first_line(str(exc))}")


class _Answered:
    """The application, minus the re-raise: Starlette re-raises an unexpected exception
    once ``_internal_error`` has logged and answered it ("so that servers can log it"),
    and uvicorn would log it a second time, traceback and all."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except Exception:  # logged and answered (500) by _internal_error already
            pass


def build_app(state: ServerState, *, token: bytes | None = None) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The ASGI application serving ``state.pool`` over the KServe v2 protocol.

    Args:
        state: the pool, the limits, and the draining flag (set it to refuse new
            inference requests and report not ready).
        token: when given, every request except the health probes must carry
            ``Authorization: Bearer <token>``.
    """
    owner = owner_for_token(token)  # (one token at most: every HTTP client is one owner)
    ep = _Endpoints(state, owner)
    model = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    routes = [
        Route("/v2/health/live", ep.live, methods=["GET"]),
        Route("/v2/health/ready", ep.ready, methods=["GET"]),
        Route("/v2", ep.server_metadata, methods=["GET"]),
        Route("/v2/models/stats", ep.statistics, methods=["GET"]),
    ]
    for prefix in (model, versioned):
        routes += [
            Route(prefix, ep.model_metadata, methods=["GET"]),
            Route(prefix + "/ready", ep.model_ready, methods=["GET"]),
            Route(prefix + "/config", ep.model_config, methods=["GET"]),
            Route(prefix + "/stats", ep.statistics, methods=["GET"]),
            Route(prefix + "/infer", ep.infer, methods=["POST"]),
        ]
    routes += http_shm.routes(state, owner)
    routes += http_repository.routes(state)
    app = _Answered(
        Starlette(
            routes=routes,
            exception_handlers={HTTPException: _not_found, Exception: _internal_error},
        )
    )
    if token is None:
        return app
    return BearerAuth(app, token, HEALTH_PATHS)

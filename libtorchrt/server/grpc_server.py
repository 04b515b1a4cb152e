"""The KServe v2 / Triton protocol over gRPC: ``inference.GRPCInferenceService`` on
grpcio's asyncio server (server process: the serving thread's event loop; large
messages are decoded and encoded in worker threads).

::

    tritonclient.grpc ──HTTP/2──► grpc.aio server (the serving thread's event loop)
                                    message ≤ --max-request-bytes (grpc refuses more)
                                    bearer token in the metadata, when the server has one
                                    take an in-flight slot (--max-inflight, shared with HTTP)
                                    ModelInferRequest → document (grpc_codec.py)
                                      → decode_document (kserve.py, as HTTP's)
                                    pool.infer_async (serving.infer; pool.submit in a
                                      worker thread for inputs over 64 KiB) ──► worker
                                    await the outputs (a cancelled RPC cancels them) ◄──┘
                                    outputs → ModelInferResponse (raw_output_contents)

The service answers as the HTTP application does (``serving.py`` holds what they
share): from the moment the server listens, live while it loads, not ready until
the pool serves nor while it drains, inference ``UNAVAILABLE`` meanwhile. Errors are
gRPC statuses with the HTTP application's one-line messages (:data:`CODES`);
``ModelStreamInfer`` answers each request on the stream, a failed one with its
``error_message``. Nothing but protobuf messages crosses the wire.

The RPCs are registered under Triton's service name (:data:`SERVICE`) by hand, from
the service that ``grpc_service.proto`` declares: the message classes live in
package ``libtorchrt.inference`` so as not to clash with tritonclient's, and
protoc's ``_pb2_grpc`` would register them under that package's name.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import re
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, NoReturn

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from ..config import ModelConfig as Config  # (the service has an RPC named ModelConfig)
from ..errors import TorchRTError
from . import grpc_service_pb2 as pb
from . import metadata
from .classification import Labels
from .control import NOT_ALLOWED, ControlError, RepositoryControl, index_json
from .grpc_codec import request_document, response_message
from .http import STATUS, ServerState, summary
from .kserve import (
    InferRequest,
    RequestError,
    classify_outputs,
    decode_document,
    read_shared_inputs,
    shared_input_bytes,
)
from .security import Address, TlsFiles, bearer_matches
from .serving import BusyError, Models, infer, inflight, input_bytes, log_failure, not_live, server_ready, submit
from .sysshm import SharedMemoryError, is_local_peer, owner_for_token

__all__ = ["CODES", "OPEN_METHODS", "SERVICE", "GrpcServer"]

log = logging.getLogger("libtorchrt.server")

#: the service's name on the wire (Triton's): clients call /inference.GRPCInferenceService/<RPC>
SERVICE = "inference.GRPCInferenceService"
#: RPCs open without the bearer token (probes carry none; they reveal nothing), as HTTP's
OPEN_METHODS = frozenset({"ServerLive", "ServerReady"})
#: the gRPC status of each HTTP status the shared code answers with (anything else: UNKNOWN)
CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
#: messages and outputs up to this size are decoded and encoded on the event loop
_INLINE_BYTES = 64 * 1024
#: a version: ASCII digits, few enough to fit an int64 ("" is the highest served)
_NUMBER = re.compile(r"[0-9]{1,18}")
_SHUTTING_DOWN = "the server is shutting down; send the request to another instance"
_NO_CUDA = (
    "CUDA shared memory regions are not supported by this server (its workers are separate processes, and "
    "its front holds no CUDA context); use system shared memory (SystemSharedMemoryRegister), or send the "
    "tensors in the request"
)
#: the gRPC status of each of sysshm.py's error codes (Triton's)
_SHM_CODES = {
    "INVALID_ARG": grpc.StatusCode.INVALID_ARGUMENT,
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "ALREADY_EXISTS": grpc.StatusCode.ALREADY_EXISTS,
    "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
}
#: grpc's channel arguments take a C int
_INT_MAX = 2**31 - 1
#: seconds an idle connection is kept open (as HTTP's, service.KEEP_ALIVE_S)
IDLE_CONNECTION_S = 75


class _Answered(Exception):
    """A failure the RPC answers with a status (see :func:`_status`)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _status(e: BaseException) -> _Answered:
    """The status and one-line message ``e`` answers with; logged once as HTTP's are."""
    if isinstance(e, _Answered):
        return e
    if isinstance(e, BusyError):  # flow control: the client retries (RESOURCE_EXHAUSTED, as grpc's own limits)
        return _Answered(grpc.StatusCode.RESOURCE_EXHAUSTED, e.message)
    if isinstance(e, RequestError):
        return _Answered(CODES.get(e.status, grpc.StatusCode.UNKNOWN), e.message)
    if isinstance(e, TorchRTError):
        status = next((code for cls, code in STATUS.items() if isinstance(e, cls)), 500)
        code = CODES.get(status, grpc.StatusCode.INTERNAL)
        message = summary(e)
        log_failure(e, status, f"inference failed (gRPC {code.name}): {message}")
        return _Answered(code, message)
    log.error("internal error in a gRPC call", exc_info=e)
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return _Answered(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {first}")


@contextlib.contextmanager
def _shared_memory() -> Iterator[None]:
    """Answer a ``SharedMemoryError`` with its status."""
    try:
        yield
    except SharedMemoryError as e:
        raise _Answered(_SHM_CODES.get(e.code, grpc.StatusCode.INTERNAL), e.message) from None


def _peer_host(peer: str) -> str | None:
    """The host of grpc's peer string (``ipv4:127.0.0.1:5000``, ``ipv6:%5B::1%5D:5000``,
    ``unix:/path``: None)."""
    scheme, _, rest = urllib.parse.unquote(peer or "").partition(":")
    if scheme not in ("ipv4", "ipv6"):
        return None if scheme == "unix" else peer
    host = rest.rpartition(":")[0]
    return host[1:-1] if host.startswith("[") else host


def _version(text: str) -> int | None:
    if not text:
        return None
    if not _NUMBER.fullmatch(text):
        raise RequestError(400, f"model version {text[:40]!r} is not a number (ASCII digits, at most 18)")
    return int(text)


async def _in_thread(size: int, fn: Callable[..., Any], *args: Any) -> Any:
    if size <= _INLINE_BYTES:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def _output_bytes(outputs: dict[str, Any]) -> int:
    return sum(v.numel() * v.element_size() if hasattr(v, "numel") else 64 * len(v) for v in outputs.values())


async def _outputs(future: concurrent.futures.Future[Any]) -> Any:
    """The request's outputs; if the RPC is cancelled first (the client went away, or
    its deadline passed), cancel the request too."""
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        future.cancel()  # (a request not yet sent to a worker never runs)
        raise


class _Service:
    """The RPCs, each answering from ``state`` as the HTTP application does.

    Args:
        owner: whose shared-memory regions its calls see and use (``sysshm.py``): the
            HTTP clients' too, for they hold the same token, as in Triton.
    """

    def __init__(self, state: ServerState, owner: str) -> None:
        self.state = state
        self.owner = owner
        self.models = Models(state)
        #: the label files of classified outputs (classification.py)
        self.labels = Labels()

    # ── health and metadata ────────────────────────────────────────────────

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=not_live(self.state) is None)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=server_ready(self.state))

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        try:
            status = self.models.status(request.name, _version(request.version))
        except RequestError as e:
            if e.status == 503:  # loading (any name), or known but its configuration could not be read
                return pb.ModelReadyResponse(ready=False)
            raise
        return pb.ModelReadyResponse(ready=status.state == "ready" and not self.state.draining)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return json_format.ParseDict(metadata.server_metadata(), pb.ServerMetadataResponse())

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        cfg = self.models.config(request.name, _version(request.version))
        versions = [s.version for s in self.models.statuses(request.name) if s.version is not None]
        return json_format.ParseDict(metadata.model_metadata(cfg, versions), pb.ModelMetadataResponse())

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        cfg = self.models.config(request.name, _version(request.version))
        return json_format.ParseDict({"config": metadata.model_config(cfg)}, pb.ModelConfigResponse())

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        stats_of = getattr(self.models.pool, "stats", None)
        if stats_of is None:
            raise RequestError(501, "statistics are not available from this version of libtorchrt")
        name = request.name or None
        version = _version(request.version)
        if name is not None:
            version = self.models.status(name, version).version
        stats = [s for s in stats_of() if name is None or (s.model == name and s.version == version)]
        return json_format.ParseDict(metadata.model_statistics(stats), pb.ModelStatisticsResponse())

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        pool, control = self.state.pool, self.state.control
        if pool is not None and control is not None:  # (control.py: it reads the repository)
            entries = await asyncio.get_running_loop().run_in_executor(None, control.index, request.ready)
            return json_format.ParseDict({"models": index_json(entries)}, pb.RepositoryIndexResponse())
        statuses = self.state.loading_models() if pool is None else pool.models()
        models = metadata.repository_index(statuses)
        if request.ready:
            models = [m for m in models if m["state"] == "READY"]
        return json_format.ParseDict({"models": models}, pb.RepositoryIndexResponse())

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        parameters = {key: getattr(p, p.WhichOneof("parameter_choice") or "string_param")
                      for key, p in request.parameters.items()}  # fmt: skip
        await self._model_control("load", request.model_name, lambda c: c.load(request.model_name, parameters))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        await self._model_control("unload", request.model_name, lambda c: c.unload(request.model_name))
        return pb.RepositoryModelUnloadResponse()

    async def _model_control(self, what: str, name: str, change: Callable[[RepositoryControl], None]) -> None:
        """Run ``change`` in a worker thread (control.py; HTTP's endpoints do the same)."""
        state = self.state
        try:
            if state.draining:
                raise ControlError(503, "the server is shutting down; models are not loaded or unloaded")
            control = state.control
            if control is None:
                raise ControlError(503, "the server is loading its models" if state.pool is None else NOT_ALLOWED)
            await asyncio.get_running_loop().run_in_executor(None, change, control)
        except ControlError as e:
            log.warning("%s of model %r refused (gRPC): %s", what, name, e.message)
            raise _Answered(CODES.get(e.status, grpc.StatusCode.UNKNOWN), e.message) from None
        log.info("model %r %sed (gRPC Repository%s)", name, what, "ModelLoad" if what == "load" else "ModelUnload")

    # ── inference ──────────────────────────────────────────────────────────

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        return await self.infer(request, context)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest | _Answered], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Each request answered on the stream as it completes (requests run at once, up
        to ``--max-inflight`` of one stream; the stream reads no more meanwhile)."""
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        window = asyncio.Semaphore(self.state.limits.max_inflight)
        running: set[asyncio.Task[None]] = set()

        async def answer(request: pb.ModelInferRequest | _Answered) -> None:
            try:
                if isinstance(request, _Answered):  # (a message that did not parse)
                    raise request
                response = pb.ModelStreamInferResponse(infer_response=await self.infer(request, context))
            except asyncio.CancelledError:
                raise
            except Exception as e:
                failure = _status(e)
                echo = pb.ModelInferResponse()
                if not isinstance(request, _Answered):  # (the id tells the client which request failed)
                    echo = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version,
                                                 id=request.id)  # fmt: skip
                response = pb.ModelStreamInferResponse(error_message=failure.message, infer_response=echo)
            finally:
                window.release()
            answers.put_nowait(response)

        async def read() -> None:
            try:
                async for request in requests:
                    await window.acquire()
                    task = asyncio.create_task(answer(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if running:
                    await asyncio.wait(set(running))
            except Exception as e:  # the stream broke (its status is the transport's)
                log.debug("gRPC stream ended: %r", e)
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await answers.get()) is not None:
                yield item
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    async def infer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        state = self.state
        if state.draining or (state.pool is not None and state.pool.closed):
            raise RequestError(503, _SHUTTING_DOWN)
        name = request.model_name
        cfg = self.models.config(name, _version(request.model_version))  # (503 while loading)
        size = sum(len(blob) for blob in request.raw_input_contents)
        with inflight(state):
            doc, data = await _in_thread(size, request_document, request)
            declared = {s.name: s for s in cfg.inputs}
            req: InferRequest = await _in_thread(size, decode_document, doc, memoryview(data), name, declared)
            del data  # the inputs hold what they need of it
            if req.shared_inputs:  # copied out of their regions: they count as the message would
                shared = shared_input_bytes(req)
                limit = state.limits.max_request_bytes
                if size + shared > limit:
                    raise RequestError(
                        413, f"the request is larger than this server takes ({limit} bytes, --max-request-bytes): "
                        f"its inputs in shared memory are {shared} bytes",
                    )  # fmt: skip
                await _in_thread(shared, read_shared_inputs, req, state.regions, self.owner)
            remaining = context.time_remaining()  # the client's deadline bounds the pool's too
            if remaining is not None and (req.timeout is None or remaining < req.timeout):
                req.timeout = max(remaining, 1e-3)
            pool, copied = self.models.pool, input_bytes(req)
            if copied <= _INLINE_BYTES:  # (by the fast lane: serving.infer)
                outputs = await infer(pool, name, cfg, req)
            else:
                outputs = await _outputs(await _in_thread(copied, submit, pool, name, cfg, req))
            return await _in_thread(_output_bytes(outputs), self._respond, cfg, req, outputs)

    def _respond(self, cfg: Config, req: InferRequest, outputs: dict[str, Any]) -> pb.ModelInferResponse:
        if req.outputs is not None and any(o.class_count for o in req.outputs):
            outputs = classify_outputs(
                req, outputs, batched=cfg.max_batch_size > 0, labels=lambda output: self.labels.of(cfg, output)
            )
        return response_message(cfg.name, cfg.version, req, outputs, regions=self.state.regions, owner=self.owner)

    # ── shared memory (sysshm.py: the regions HTTP registers too) ──────────

    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Any
    ) -> pb.SystemSharedMemoryStatusResponse:
        with _shared_memory():
            found = self.state.regions.status(request.name or None, self.owner)
        response = pb.SystemSharedMemoryStatusResponse()
        for s in found:
            response.regions[s.name].CopyFrom(response.RegionStatus(**s.to_json()))
        return response

    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Any
    ) -> pb.SystemSharedMemoryRegisterResponse:
        host = _peer_host(context.peer())
        if not is_local_peer(host):  # (as HTTP's: a remote client could make the server open any object)
            raise _Answered(
                grpc.StatusCode.PERMISSION_DENIED,
                f"cannot register shared memory region {request.name!r}: the call came from {host}, and only a "
                "client on this host (a loopback address) can share memory with the server",
            )
        with _shared_memory():
            self.state.regions.register(request.name, request.key, request.offset, request.byte_size, self.owner)
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Any
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        with _shared_memory():
            self.state.regions.unregister(request.name or None, self.owner)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: Any
    ) -> pb.CudaSharedMemoryStatusResponse:
        if request.name:
            raise _Answered(grpc.StatusCode.NOT_FOUND, f"no CUDA shared memory region {request.name!r}: {_NO_CUDA}")
        return pb.CudaSharedMemoryStatusResponse()

    async def CudaSharedMemoryRegister(self, request: pb.CudaSharedMemoryRegisterRequest, context: Any) -> NoReturn:
        raise _Answered(
            grpc.StatusCode.INVALID_ARGUMENT, f"cannot register CUDA shared memory region {request.name!r}: {_NO_CUDA}"
        )

    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: Any
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        return pb.CudaSharedMemoryUnregisterResponse()  # (none is registered: a no-op, as in Triton)

    # ── what this server does not do ───────────────────────────────────────

    async def TraceSetting(self, request: pb.TraceSettingRequest, context: Any) -> NoReturn:
        raise _Answered(grpc.StatusCode.UNIMPLEMENTED, "tracing is not supported by this server")

    async def LogSettings(self, request: pb.LogSettingsRequest, context: Any) -> NoReturn:
        raise _Answered(
            grpc.StatusCode.UNIMPLEMENTED, "log settings are not changed over gRPC; use --log-level at start"
        )


class _Handlers:
    """Every RPC of the service, as grpc's method handlers: each checks the bearer
    token (when the server has one) and answers a failure with its status."""

    def __init__(self, service: _Service, token: bytes | None) -> None:
        self.service = service
        self.token = token

    def generic(self) -> grpc.GenericRpcHandler:
        methods = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods
        handlers = {}
        for method in methods:
            request_type = getattr(pb, method.input_type.name)
            serializer = getattr(pb, method.output_type.name).SerializeToString
            behaviour = getattr(self.service, method.name)  # (a test checks every RPC has one)
            # Requests arrive as bytes and are parsed here: a message that does not parse
            # is the client's error (INVALID_ARGUMENT), which grpc's own deserializer would
            # answer with UNKNOWN and log with a traceback, once per call.
            if method.client_streaming and method.server_streaming:
                stream = self._stream(method.name, request_type, behaviour)
                handlers[method.name] = grpc.stream_stream_rpc_method_handler(stream, response_serializer=serializer)
            else:
                unary = self._unary(method.name, request_type, behaviour)
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(unary, response_serializer=serializer)
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    async def _check(self, method: str, context: Any) -> None:
        if self.token is None or method in OPEN_METHODS:
            return
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                if bearer_matches(value.encode() if isinstance(value, str) else bytes(value), self.token):
                    return
                break
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            "missing or wrong bearer token (send metadata 'authorization: Bearer <token>')",
        )

    def _unary(self, method: str, kind: type[Message],
               behaviour: Callable[[Any, Any], Awaitable[Message]]) -> Callable[..., Any]:  # fmt: skip
        async def handle(data: bytes, context: Any) -> Message:
            await self._check(method, context)
            try:
                return await behaviour(_parse(kind, data), context)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                failure = _status(e)
            await context.abort(failure.code, failure.message)
            raise AssertionError("abort returns no more")  # (grpc.aio's abort raises)

        return handle

    def _stream(self, method: str, kind: type[Message],
                behaviour: Callable[[Any, Any], AsyncIterator[Message]]) -> Callable[..., Any]:  # fmt: skip
        async def handle(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[Message]:
            await self._check(method, context)

            async def parsed() -> AsyncIterator[Message | _Answered]:
                async for data in requests:
                    try:
                        yield _parse(kind, data)
                    except _Answered as e:  # answered on the stream, which goes on
                        yield e

            async for response in behaviour(parsed(), context):
                yield response

        return handle


def _parse(kind: type[Message], data: bytes) -> Any:
    """``data`` as a ``kind`` message.

    Raises:
        _Answered: INVALID_ARGUMENT, it is not one.
    """
    try:
        return kind.FromString(data)
    except Exception as e:  # (protobuf's DecodeError; its C and Python runtimes differ in what else)
        raise _Answered(
            grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a {kind.__name__} message: {e}"
        ) from None


class GrpcServer:
    """The gRPC endpoint: grpcio's asyncio server serving ``state``'s pool.

    Created and used on the serving thread's event loop. :meth:`start` binds and
    serves; :meth:`stop` stops serving (call it once the drain is over).

    Args:
        state: what the HTTP application serves from too (pool, limits, draining).
        token: when given, every RPC but ServerLive and ServerReady must carry the
            metadata ``authorization: Bearer <token>``.
        tls: serve TLS with these instead of plaintext.
    """

    def __init__(self, state: ServerState, *, token: bytes | None = None, tls: TlsFiles | None = None) -> None:
        self.state = state
        self.token = token
        self.tls = tls
        self.port = 0
        self._server: Any = None

    async def start(self, address: Address) -> int:
        """Bind ``address`` and serve; return the port bound (``address.port`` unless 0).

        Raises:
            OSError: the address cannot be bound (taken, or not this machine's); the
                message names ``--grpc``.
        """
        limits = self.state.limits
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", min(limits.max_request_bytes, _INT_MAX)),
                ("grpc.max_send_message_length", -1),
                # grpc binds with SO_REUSEPORT by default: a second server on a taken port
                # would then share it silently instead of failing.
                ("grpc.so_reuseport", 0),
                # As HTTP's keep-alive: an idle connection costs a descriptor; a client
                # reconnects by itself (grpc closes it with GOAWAY, between calls only).
                ("grpc.max_connection_idle_ms", IDLE_CONNECTION_S * 1000),
            ]
        )
        service = _Service(self.state, owner_for_token(self.token))
        server.add_generic_rpc_handlers((_Handlers(service, self.token).generic(),))
        try:
            if self.tls is not None:
                credentials = grpc.ssl_server_credentials([(self.tls.key, self.tls.certificate)])
                port = server.add_secure_port(str(address), credentials)
            else:
                port = server.add_insecure_port(str(address))
        except RuntimeError as e:  # (grpc says only "Failed to bind")
            raise OSError(
                f"cannot listen on {address} (--grpc): {e}; is another server running? choose another port"
            ) from None
        if not port:  # (older grpcio returns 0 instead of raising)
            raise OSError(f"cannot listen on {address} (--grpc); is another server running? choose another port")
        await server.start()
        self._server = server
        self.port = port
        return int(port)

    async def stop(self, grace: float) -> None:
        """Stop serving: RPCs still running (open streams, calls that arrived as the
        drain ended) get ``grace`` seconds, then are cancelled. Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(Exception):  # (a failure to stop cleanly must not mask the exit)
                await server.stop(grace)

"""The shared-memory extensions' HTTP endpoints (server process: the serving thread's
event loop).

Triton's spelling, which ``tritonclient.http`` calls:

=========================================================  ===============================
``GET  /v2/systemsharedmemory/status``                     every region: ``[{name, key,
                                                           offset, byte_size}]``
``GET  /v2/systemsharedmemory/region/{name}/status``       that region (404 if unknown)
``POST /v2/systemsharedmemory/region/{name}/register``     body ``{"key", "offset",
                                                           "byte_size"}``
``POST /v2/systemsharedmemory/unregister``                 every region
``POST /v2/systemsharedmemory/region/{name}/unregister``   that region (unknown: no error)
``/v2/cudasharedmemory/...``                               no CUDA regions: the status is
                                                           ``[]``, registering is refused
=========================================================  ===============================

The regions are the server's :class:`~libtorchrt.server.sysshm.Regions`, shared with the
gRPC front; every HTTP client is one owner (there is one bearer token at most). Only a
client on this host can share memory with the server, so a registration from another
address is refused (403): a remote client holding the token could otherwise make the
server read and write any shared-memory object its user may open.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .sysshm import Regions, SharedMemoryError, is_local_peer

if TYPE_CHECKING:  # (http.py imports this module)
    from .http import ServerState

__all__ = ["MAX_REGISTER_BYTES", "routes"]

#: the largest registration body taken (it is a small JSON object)
MAX_REGISTER_BYTES = 64 * 1024
_SYSTEM = "/v2/systemsharedmemory"
_CUDA = "/v2/cudasharedmemory"
_NO_CUDA = (
    "CUDA shared memory regions are not supported by this server (its workers are separate processes, and "
    "the HTTP front holds no CUDA context); use system shared memory (/v2/systemsharedmemory), or send the "
    "tensors in the request"
)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _failure(e: SharedMemoryError) -> JSONResponse:
    return _error(e.http_status, e.message)


async def _body(request: Request) -> bytes:
    """The request body, at most :data:`MAX_REGISTER_BYTES` (more: ValueError)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_REGISTER_BYTES:
            raise ValueError(f"the body is larger than {MAX_REGISTER_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class _Endpoints:
    def __init__(self, state: ServerState, owner: str) -> None:
        self.state = state
        self.owner = owner

    @property
    def regions(self) -> Regions:
        return self.state.regions

    async def status(self, request: Request) -> Response:
        name = request.path_params.get("name")
        try:
            found = self.regions.status(name, self.owner)
        except SharedMemoryError as e:
            return _failure(e)
        return JSONResponse([s.to_json() for s in found])

    async def register(self, request: Request) -> Response:
        name = request.path_params["name"]
        client = request.client
        host = client.host if client is not None else None
        if not is_local_peer(host):
            return _error(
                403,
                f"cannot register shared memory region {name!r}: the request came from {host}, and only a "
                "client on this host (a loopback address) can share memory with the server",
            )
        try:
            body = await _body(request)
        except ValueError as e:
            return _error(413, f"cannot register shared memory region {name!r}: {e}")
        except ClientDisconnect:
            return Response(status_code=400)  # nobody reads it
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError) as e:
            return _error(400, f"cannot register shared memory region {name!r}: the body is not JSON: {e}")
        if not isinstance(doc, dict) or "key" not in doc or "byte_size" not in doc:
            return _error(
                400,
                f"cannot register shared memory region {name!r}: expected a JSON object "
                '{"key": "/name", "offset": 0, "byte_size": N}',
            )
        try:
            self.regions.register(name, doc["key"], doc.get("offset", 0), doc["byte_size"], self.owner)
        except SharedMemoryError as e:
            return _failure(e)
        return Response(status_code=200)

    async def unregister(self, request: Request) -> Response:
        self.regions.unregister(request.path_params.get("name"), self.owner)
        return Response(status_code=200)

    async def cuda_status(self, request: Request) -> Response:
        name = request.path_params.get("name")
        if name is not None:
            return _error(404, f"no CUDA shared memory region {name!r} is registered: {_NO_CUDA}")
        return JSONResponse([])

    async def cuda_register(self, request: Request) -> Response:
        return _error(400, f"cannot register CUDA shared memory region {request.path_params['name']!r}: {_NO_CUDA}")

    async def cuda_unregister(self, request: Request) -> Response:
        return Response(status_code=200)  # (none is registered: unregistering any is a no-op, as in Triton)


def routes(state: ServerState, owner: str) -> list[Route]:
    """The shared-memory routes, for the regions in ``state.regions`` of ``owner``."""
    ep = _Endpoints(state, owner)
    return [
        Route(f"{_SYSTEM}/status", ep.status, methods=["GET"]),
        Route(f"{_SYSTEM}/region/{{name}}/status", ep.status, methods=["GET"]),
        Route(f"{_SYSTEM}/region/{{name}}/register", ep.register, methods=["POST"]),
        Route(f"{_SYSTEM}/unregister", ep.unregister, methods=["POST"]),
        Route(f"{_SYSTEM}/region/{{name}}/unregister", ep.unregister, methods=["POST"]),
        Route(f"{_CUDA}/status", ep.cuda_status, methods=["GET"]),
        Route(f"{_CUDA}/region/{{name}}/status", ep.cuda_status, methods=["GET"]),
        Route(f"{_CUDA}/region/{{name}}/register", ep.cuda_register, methods=["POST"]),
        Route(f"{_CUDA}/unregister", ep.cuda_unregister, methods=["POST"]),
        Route(f"{_CUDA}/region/{{name}}/unregister", ep.cuda_unregister, methods=["POST"]),
    ]

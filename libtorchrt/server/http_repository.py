"""The model repository extension's HTTP endpoints (server process: the serving thread's
event loop; a load or an unload waits in a worker thread).

Triton's spelling, which ``tritonclient.http`` calls (``get_model_repository_index``,
``load_model``, ``unload_model``):

==============================================  ==========================================
``POST /v2/repository/index``                   every model of the repository and every
                                                version served, with its state and reason;
                                                body ``{"ready": true}``: the ready ones
``POST /v2/repository/models/{name}/load``      load the model, or load it anew; body
                                                ``{"parameters": {"config": "<JSON>"}}``
                                                gives its configuration instead of its
                                                ``config.pbtxt``
``POST /v2/repository/models/{name}/unload``    unload it (``unload_dependents``, a
                                                parameter about ensembles, is ignored)
==============================================  ==========================================

What they do is ``control.py``'s, which the gRPC service shares; a load or unload is
refused (503) unless the server runs with ``--model-control-mode explicit``.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import metadata
from .control import NOT_ALLOWED, ControlError, index_json

if TYPE_CHECKING:  # (http.py imports this module)
    from .http import ServerState

__all__ = ["MAX_BODY_BYTES", "routes"]

log = logging.getLogger("libtorchrt.server")

#: the largest body taken (a model's configuration as JSON, at most)
MAX_BODY_BYTES = 1 << 20
_LOADING = "the server is loading its models; retry when /v2/health/ready answers 200"
_SHUTTING_DOWN = "the server is shutting down"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _document(request: Request) -> dict[str, Any]:
    """The body as a JSON object ({} when empty).

    Raises:
        ControlError: 413 over :data:`MAX_BODY_BYTES`, 400 not a JSON object.
        ClientDisconnect: the client went away.
    """
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ControlError(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        return {}
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise ControlError(400, f"the body is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ControlError(400, "the body is not a JSON object")
    return doc


def _parameters(doc: dict[str, Any]) -> dict[str, object]:
    parameters = doc.get("parameters", {})
    if not isinstance(parameters, dict):
        raise ControlError(400, '"parameters" is not a JSON object')
    return parameters


class _Endpoints:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def index(self, request: Request) -> Response:
        try:
            doc = await _document(request)
        except ControlError as e:
            return _error(e.status, e.message)
        except ClientDisconnect:
            return Response(status_code=400)  # nobody reads it
        ready = doc.get("ready", False)
        if not isinstance(ready, bool):
            return _error(400, f'"ready" is {ready!r}; expected true or false')
        state = self.state
        if state.pool is not None and state.control is not None:
            entries = await run_in_threadpool(state.control.index, ready)  # (it reads the repository)
            return JSONResponse(index_json(entries))
        # Loading (what the pool's router knows so far), or a pool served without a repository's control.
        statuses = state.loading_models() if state.pool is None else state.pool.models()
        models = metadata.repository_index(statuses)
        return JSONResponse([m for m in models if m["state"] == "READY"] if ready else models)

    async def load(self, request: Request) -> Response:
        return await self._change(request, "load")

    async def unload(self, request: Request) -> Response:
        return await self._change(request, "unload")

    async def _change(self, request: Request, what: str) -> Response:
        name = request.path_params["name"]
        state = self.state
        try:
            parameters = _parameters(await _document(request))
            if state.draining:
                raise ControlError(503, f"{_SHUTTING_DOWN}; models are not loaded or unloaded")
            control = state.control
            if control is None:
                raise ControlError(503, _LOADING if state.pool is None else NOT_ALLOWED)
            if what == "load":
                await run_in_threadpool(control.load, name, parameters)
            else:
                await run_in_threadpool(control.unload, name)
        except ControlError as e:
            log.warning("%s of model %r refused (%d): %s", what, name, e.status, e.message)
            return _error(e.status, e.message)
        except ClientDisconnect:
            return Response(status_code=400)  # nobody reads it
        log.info("model %r %sed (POST /v2/repository/models/%s/%s)", name, what, name, what)
        return Response(status_code=200)


def routes(state: ServerState) -> list[Route]:
    """The repository extension's routes, answering from ``state.control``."""
    ep = _Endpoints(state)
    return [
        Route("/v2/repository/index", ep.index, methods=["POST"]),
        Route("/v2/repository/models/{name}/load", ep.load, methods=["POST"]),
        Route("/v2/repository/models/{name}/unload", ep.unload, methods=["POST"]),
    ]

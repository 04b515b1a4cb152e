"""What the protocol fronts share: model lookups, the in-flight slots, health, and how a
failed request is logged (server process: the serving thread's event loop).

HTTP (``http.py``) and gRPC (``grpc_server.py``) answer the same questions about the same
pool with the same rules; each only says them in its own protocol. So a request counts
against one ``--max-inflight`` whichever way it came, and the drain waits for both.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..config import ModelConfig
from ..errors import ModelError, QueueFullError
from ..front.pool import Pool
from ..info import ModelStatus
from .kserve import InferRequest, RequestError

if TYPE_CHECKING:  # (http.py imports this module)
    from .http import ServerState

__all__ = ["LOADING", "BusyError", "Models", "inflight", "log_failure", "not_live", "server_ready", "submit"]

log = logging.getLogger("libtorchrt.server")

#: the answer to a request that needs the pool while the repository loads
LOADING = "the server is loading its models; retry when /v2/health/ready answers 200"


class BusyError(RequestError):
    """More than ``--max-inflight`` requests at once: HTTP answers 503 with
    ``Retry-After``, gRPC ``RESOURCE_EXHAUSTED``."""


class Models:
    """Model lookups against the pool's public snapshots."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    @property
    def pool(self) -> Pool:
        """The pool.

        Raises:
            RequestError: 503 while the repository loads.
        """
        pool = self.state.pool
        if pool is None:
            raise RequestError(503, LOADING, {"Retry-After": "1"})
        return pool

    def statuses(self, name: str) -> list[ModelStatus]:
        found = [s for s in self.pool.models() if s.name == name]
        if not found:
            known = sorted({s.name for s in self.pool.models()})
            raise RequestError(404, f"unknown model {name!r}; this server serves {known}")
        return found

    def status(self, name: str, version: int | None) -> ModelStatus:
        found = self.statuses(name)
        served = [s for s in found if s.version is not None]
        if not served:  # its configuration could not be read
            raise RequestError(503, f"model {name!r} is unavailable: {found[0].error}")
        if version is None:
            return max(served, key=lambda s: s.version or 0)
        for s in served:
            if s.version == version:
                return s
        versions = sorted(s.version for s in served if s.version is not None)
        raise RequestError(404, f"model {name!r} has no version {version}; it serves versions {versions}")

    def config(self, name: str, version: int | None) -> ModelConfig:
        status = self.status(name, version)
        return self.pool.config(name, status.version)


@contextlib.contextmanager
def inflight(state: ServerState) -> Iterator[None]:
    """One of the ``--max-inflight`` slots, held while a request is handled.

    Raises:
        BusyError: every slot is taken (at once: the request does not wait).
    """
    if state.inflight >= state.limits.max_inflight:
        raise BusyError(
            503,
            f"the server is handling {state.limits.max_inflight} requests already (--max-inflight); retry",
            {"Retry-After": "1"},
        )
    state.inflight += 1
    try:
        yield
    finally:
        state.inflight -= 1
        if not state.inflight and state.on_idle is not None:
            state.on_idle()


def not_live(state: ServerState) -> str | None:
    """Why the server should be restarted, or None while it is live.

    The pool's router thread died, or another thread the server depends on stopped
    (bugs): every request would fail. A drain, or a load, ends by itself: still live.
    """
    pool = state.pool
    if pool is not None and pool.failure is not None:
        return f"the pool failed: {pool.failure!r}"
    if state.broken is not None:
        return f"{state.broken} stopped unexpectedly"
    return None


def server_ready(state: ServerState) -> bool:
    """Whether every model that loaded has a ready instance, the server neither loading
    nor draining (models that failed to load do not count, nor those being unloaded).
    With model control (explicit, poll) a server without a model is ready: it takes
    loads, or waits for models to come."""
    pool = state.pool
    if pool is None or state.draining or pool.closed:
        return False
    loaded = [s for s in pool.models() if s.state not in ("failed", "unloading")]
    control = state.control
    empty_ok = control is not None and control.mode != "none"
    return (bool(loaded) or empty_ok) and all(s.state == "ready" for s in loaded)


def log_failure(e: BaseException, status: int, text: str) -> None:
    """Log a failed request once: ``text`` (what the client was told), at ERROR with the
    model's traceback as the record's exception for a model's error (not the front's own
    stack, which says nothing); at ERROR on one line for another 500 (a dead worker's
    stderr was logged line by line as it came, and its death once by the pool); at
    WARNING for an unavailable model, a closed pool or a timeout. A full queue is flow
    control and the client's errors are told to the client: neither is logged.

    Args:
        status: the HTTP status the failure answers (gRPC's status maps from it).
    """
    if isinstance(e, ModelError):
        log.error("%s", text, exc_info=(type(e), e, None))
    elif status >= 500 and not isinstance(e, QueueFullError):
        log.log(logging.ERROR if status == 500 else logging.WARNING, "%s", text)


def submit(pool: Pool, name: str, cfg: ModelConfig, request: InferRequest) -> concurrent.futures.Future[Any]:
    """``Pool.submit`` of a decoded request, with its options (version, deadline,
    priority); its inputs are dropped once copied into shared memory. (For inputs too
    big to copy in the event loop's thread: the frontends call it in a worker thread.)

    Raises:
        RequestError: 400 for an output the model's configuration does not declare
            (before the model runs).
        TorchRTError: what ``Pool.submit`` raises (a shape the model does not take, a
            full queue, ...).
    """
    _check_outputs(name, cfg, request)
    future = pool.submit(name, request.inputs, **_options(cfg, request))
    request.inputs.clear()  # copied into shared memory by submit
    return future


async def infer(pool: Pool, name: str, cfg: ModelConfig, request: InferRequest) -> dict[str, Any]:
    """``Pool.infer_async`` of a decoded request, with :func:`submit`'s options, in the
    event loop's thread (for inputs small enough to copy there): a request to a CPU
    model takes the pool's fast lane, and the loop settles its reply, with no Python
    in the router thread (docs/server.md, "Which path a request takes"). Cancelling
    the awaiting task cancels a request not yet sent to a worker.

    Raises:
        RequestError, TorchRTError: as :func:`submit`; and what the request fails
        with (``ModelError``, a deadline, ...).
    """
    _check_outputs(name, cfg, request)
    return await pool.infer_async(name, request.inputs, **_options(cfg, request))


def input_bytes(request: InferRequest) -> int:
    """The bytes of ``request``'s inputs as decoded (what the pool will copy)."""
    return sum(v.numel() * v.element_size() if hasattr(v, "numel") else len(v) for v in request.inputs.values())


def _check_outputs(name: str, cfg: ModelConfig, request: InferRequest) -> None:
    if request.outputs is not None and cfg.outputs:
        names = [s.name for s in cfg.outputs]
        unknown = [o.name for o in request.outputs if o.name not in names]
        if unknown:
            raise RequestError(400, f"model {name!r} has no output {unknown[0]!r}; it gives {names}")


def _options(cfg: ModelConfig, request: InferRequest) -> dict[str, Any]:
    options: dict[str, Any] = {"version": cfg.version, "timeout": request.timeout}
    if request.priority is not None:
        options["priority"] = request.priority
    if request.sequence_id is not None or request.sequence_start or request.sequence_end:
        options["sequence_id"] = request.sequence_id
        options["sequence_start"] = request.sequence_start
        options["sequence_end"] = request.sequence_end
    return options

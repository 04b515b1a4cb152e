"""``Pool``: serve TorchScript models from one worker process per instance (front).

::

    with Pool("models/") as pool:                       # a Triton-style repository
        out = pool.infer("tiny", {"INPUT__0": x})       # {"OUTPUT__0": tensor}

The pool is thread-safe and asyncio-friendly. Calls are checked and their tensors
copied into shared memory in the caller's thread (``admission.py``); the router thread
(``router.py``) sends them to the least-loaded ready worker and resolves the caller's
future.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import warnings
import weakref
from collections.abc import Iterable
from dataclasses import replace
from typing import cast

import torch

from ..config import ModelConfig, load_repository
from ..deadlines import check_timeout
from ..errors import (
    ConfigError,
    PoolClosedError,
    TimeoutError,
)
from ..info import ModelHealth, ModelStats, ModelStatus, WorkerInfo
from ..transport import tensors as tensor_io
from .admission import Admission, Inputs, request_timeout
from .future import LoopFuture, LoopWaker, RequestFuture
from .router import Router, RouterOptions
from .supervisor import START_METHODS

__all__ = ["Pool"]


def _finalize(router: Router) -> None:
    if router.alive:
        warnings.warn(
            "libtorchrt.Pool was not closed; closing it now (use `with Pool(...)` or call close())",
            ResourceWarning,
            stacklevel=2,
        )
        router.stop(grace=0.0, timeout=10.0)


class Pool:
    """A pool of worker processes serving PyTorch models (TorchScript, AOTInductor
    packages, exported programs, ``model.py`` modules: docs/formats.md).

    Args:
        repository: a Triton-style model repository
            (``<repo>/<model>/config.pbtxt``, ``<repo>/<model>/<version>/model.pt``).
        models: models configured in Python (alone or in addition to ``repository``).
        start_timeout: seconds to wait for every worker to load its model.
        request_arena_bytes: shared memory per model for request tensors.
        response_arena_bytes: shared memory per worker for output tensors.
        inline_threshold: tensors up to this many bytes travel inside the ZeroMQ
            message instead of shared memory.
        max_inflight: requests sent ahead to one worker, so it finds the next one
            waiting when it finishes; more only deepens the queue in a worker (docs/benchmarks.md,
            "Requests sent ahead", says how 4 was chosen).
        busy_poll_us: after a reply, workers (and the router thread, while it awaits
            one) poll this long without sleeping before they block. A process that
            sleeps between requests wakes up slowly; polling trades CPU for latency,
            and takes CPU from models that compute (docs/benchmarks.md, "Busy polling").
            Off (0) by default; turn it on for short models on machines with spare
            cores.
        max_pending: requests the pool holds at most (waiting or running, all
            models together); one more fails at once with ``QueueFullError``, so an
            overload cannot grow memory without bound (None: no limit). Per model,
            ``dynamic_batching``'s ``max_queue_size`` does the same.
        strict: any model that cannot be loaded (a bad configuration in the
            repository, or workers that fail to start) fails the pool. By default
            such a model is left out, listed as failed by :meth:`models`, and the
            others are served (as Triton does with ``--exit-on-error=false``).
        cuda_outputs: a request whose inputs are CUDA tensors, to a model running on
            a GPU, gets CUDA tensors back (on the model's GPU); False: CPU tensors.
            Without CUDA inputs, outputs are always CPU tensors.
        execution_timeout: the ``execution_timeout`` (seconds) of every model that
            sets none itself (neither the field nor the ``EXECUTION_TIMEOUT``
            parameter): an execution that takes longer fails, and its worker is
            killed and replaced. None: no default limit.
        compile_cache: where PT2 workers (``torch.compile``d ``model.py`` files and
            exported programs) keep what Inductor compiles, so that N instances and
            every replaced worker compile once between them: True (default), a
            per-user directory shared by the machine's pools; a path; or False, a
            private directory per worker (each compiles on its own). See
            docs/formats.md.
        start_method: how worker processes start. ``"forkserver"`` (default): the
            pool starts one template process that imports torch, and forks each
            worker from it (tens of milliseconds instead of a second or more, and
            the interpreter's and torch's pages shared between workers); a worker
            whose environment sets what only a fresh process reads (``LD_*``,
            ``PYTHON*``, OpenMP/MKL settings other than the thread counts, ...) is
            started fresh. ``"spawn"``: every worker is a fresh interpreter.
            docs/startup.md says what fork changes and how each is handled.

    GPU instances (``devices=["cuda:0"]`` or ``instance_group { kind: KIND_GPU }``):
    ``request_arena_bytes`` is also the size of each model's request buffer on each
    of its GPUs, and ``response_arena_bytes`` that of each GPU worker's response
    buffer; both are made on the first request with CUDA inputs.

    Raises:
        ConfigError: a model's configuration is invalid (a repository's model only
            with ``strict``; else it is left out).
        WorkerStartError: no model could be loaded, or (``strict``) one could not
            (the failing worker's stderr tail is attached).
    """

    def __init__(
        self,
        repository: str | os.PathLike[str] | None = None,
        *,
        models: Iterable[ModelConfig] = (),
        start_timeout: float = 120.0,
        request_arena_bytes: int = 256 << 20,
        response_arena_bytes: int = 64 << 20,
        inline_threshold: int = tensor_io.DEFAULT_INLINE_THRESHOLD,
        max_inflight: int = 4,
        busy_poll_us: int = 0,
        cuda_outputs: bool = True,
        strict: bool = False,
        max_pending: int | None = None,
        execution_timeout: float | None = None,
        compile_cache: bool | str | os.PathLike[str] = True,
        start_method: str = "forkserver",
    ) -> None:
        if start_method not in START_METHODS:
            raise ConfigError(
                f"Pool: start_method is {start_method!r}; expected one of {list(START_METHODS)}", key="start_method"
            )
        errors: list[tuple[str, ConfigError]] = []
        configs = list(load_repository(repository, None if strict else errors)) if repository is not None else []
        configs += list(models)
        if execution_timeout is not None:
            try:
                limit = check_timeout(execution_timeout, allow_zero=False)
            except ValueError as e:
                raise ConfigError(f"Pool: execution_timeout: {e}", key="execution_timeout") from None
            configs = [c if c.execution_timeout is not None else replace(c, execution_timeout=limit) for c in configs]
        keys = [(c.name, c.version) for c in configs]
        if len(set(keys)) != len(keys):
            repeated = sorted({f"{n} version {v}" for n, v in keys if keys.count((n, v)) > 1})
            raise ValueError(f"models repeat: {repeated}")
        if not configs and not errors:
            raise ValueError("Pool needs a model repository or models=[ModelConfig(...)]")
        #: models that could not be loaded before any worker started: a repository's
        #: whose configuration could not be read (version None), and any whose file is
        #: missing; each fails alone, unless strict
        self._load_errors = [ModelStatus(name, None, "failed", str(e)) for name, e in errors]
        usable = []
        for cfg in configs:
            try:
                cfg.check_files()
            except ConfigError as e:
                if strict:
                    raise
                errors.append((cfg.name, e))
                self._load_errors.append(ModelStatus(cfg.name, cfg.version, "failed", str(e)))
                continue
            usable.append(cfg)
        configs = usable
        if not configs:
            raise errors[0][1]
        self._closed = False
        #: per event loop, what wakes it for finished requests (infer_async)
        self._wakers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopWaker] = weakref.WeakKeyDictionary()
        self._waker: LoopWaker | None = None
        self._close_lock = threading.Lock()
        options = RouterOptions(
            request_arena_bytes=request_arena_bytes,
            response_arena_bytes=response_arena_bytes,
            inline_threshold=inline_threshold,
            max_inflight=max_inflight,
            start_timeout=start_timeout,
            busy_poll_us=busy_poll_us,
            compile_cache=compile_cache,
            start_method=start_method,
        )
        if max_pending is not None and (isinstance(max_pending, bool) or max_pending < 1):
            raise ValueError(f"max_pending is {max_pending!r}; expected a positive integer or None")
        self._router = Router(configs, options)
        self._admission = Admission(
            self._router,
            self._load_errors,
            inline_threshold=inline_threshold,
            cuda_outputs=bool(cuda_outputs),
            max_pending=max_pending,
        )
        self._finalizer = weakref.finalize(self, _finalize, self._router)
        try:
            self._router.wait_started(start_timeout + 10.0)
            if strict:
                failed = next((m for m in self._router.models.values() if m.start_error is not None), None)
                if failed is not None:
                    raise failed.start_error  # type: ignore[misc]
        except BaseException:
            self.close()
            raise
        for model, notes in self._startup_warnings().items():
            for note in notes:
                warnings.warn(f"model {model!r}: {note}", RuntimeWarning, stacklevel=2)

    def _startup_warnings(self) -> dict[str, list[str]]:
        notes: dict[str, list[str]] = {}
        for status in self._load_errors:
            notes.setdefault(status.name, []).append(f"not served: {status.error}")
        for m in self._router.models.values():
            mine = notes.setdefault(m.name, [])
            if m.failed is not None:
                mine.append(f"version {m.version} not served: it failed to load: {m.failed}")
            mine += [n for n in m.cfg.notes if n not in mine]
            ready = next((w.ready for w in m.workers if w.ready is not None), None)
            if ready and ready.warnings:
                mine += [n for n in ready.warnings if n not in mine]
        return {k: v for k, v in notes.items() if v}

    # ── requests ───────────────────────────────────────────────────────────────

    def submit(
        self,
        model: str,
        inputs: Inputs,
        *,
        version: int | None = None,
        timeout: float | None = None,
        priority: int | None = None,
    ) -> concurrent.futures.Future[dict[str, torch.Tensor]]:
        """Send a request; return a future of its outputs.

        Args:
            model: the model's name.
            inputs: a dict keyed by ``forward()`` argument name or ``INPUT__<i>``, a
                list of tensors in argument order, or a single tensor.
            version: the model version (default: the highest version served).
            priority: its priority level, for a model with ``dynamic_batching``
                ``priority_levels`` (1 is the highest; default: the model's
                ``default_priority_level``).
            timeout: the request's deadline in seconds (default: the model's
                ``timeout``, else none). Past it the future fails with
                :class:`TimeoutError`; a request not yet sent to a worker is dropped.

        Returns:
            A ``concurrent.futures.Future`` resolving to ``{output name: tensor}``.
            Output tensors may alias shared memory; it is recycled once they are freed.
            Cancelling the future before the request is sent removes it.

        Raises:
            UnknownModelError: no such model.
            InvalidInputError: the inputs do not fit the model (or exceed its
                ``max_request_bytes``).
            ModelUnavailableError: every instance of the model keeps failing to start.
            QueueFullError: the model's queue (``max_queue_size``) or the pool's
                (``max_pending``) is full: the request was not taken.
            PoolClosedError: the pool is closed.
        """
        return cast(RequestFuture[dict[str, torch.Tensor]], self._submit(model, inputs, version, timeout, priority))

    def _submit(
        self,
        model: str,
        inputs: Inputs,
        version: int | None,
        timeout: float | None,
        priority: int | None,
        future: LoopFuture | None = None,
    ) -> RequestFuture[dict[str, torch.Tensor]] | LoopFuture:
        if self._closed:
            raise PoolClosedError("the pool is closed")
        return self._admission.submit(model, inputs, version, timeout, priority, future)

    def infer(
        self,
        model: str,
        inputs: Inputs,
        *,
        version: int | None = None,
        timeout: float | None = None,
        priority: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run one request and wait for its outputs.

        Args:
            model: the model's name.
            inputs: as for :meth:`submit`.
            timeout: seconds to wait; None waits as long as it takes.

        Returns:
            ``{output name: tensor}``.

        Raises:
            UnknownModelError, InvalidInputError, PoolClosedError: as for :meth:`submit`.
            ModelError: the model raised (the worker's traceback is attached).
            WorkerDiedError: the worker died while running the request.
            TimeoutError: no result within ``timeout``.
        """
        timeout = request_timeout(model, timeout)
        future = self.submit(model, inputs, version=version, timeout=timeout, priority=priority)
        try:
            # The router fails the future at the deadline; the margin only guards
            # against a router that cannot (it never blocks for long).
            return future.result(None if timeout is None else timeout + 5.0)
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
    ) -> dict[str, torch.Tensor]:
        """Run one request from asyncio; see :meth:`infer`.

        The event loop is woken once for all the requests that finish together (a
        batch's, say), not once per request. Cancelling the awaiting task cancels the
        request if it has not been sent to a worker yet.
        """
        loop = asyncio.get_running_loop()
        waker = self._waker
        if waker is None or waker.loop is not loop:
            waker = self._wakers.get(loop)
            if waker is None:
                waker = self._wakers.setdefault(loop, LoopWaker(loop))
            self._waker = waker  # the last loop's, found again without a weak reference
        waiter: asyncio.Future[dict[str, torch.Tensor]] = loop.create_future()
        future = self._submit(model, inputs, version, timeout, priority, LoopFuture(waker, waiter))
        try:
            return await waiter
        except asyncio.CancelledError:
            future.cancel()
            raise

    # ── introspection ──────────────────────────────────────────────────────────

    def workers(self) -> list[WorkerInfo]:
        """One entry per worker process: model, instance, pid, device, state, flags."""
        return self._router.workers()

    def models(self) -> list[ModelStatus]:
        """Every model version the pool was asked to serve, with its state and error:
        ``"ready"``, ``"loading"``, ``"unavailable"``, ``"failed"`` (with why) or
        ``"stopped"``; a repository model whose configuration could not be read is
        listed as failed with version None. Sorted by name, then version."""
        out = [*self._router.statuses(), *self._load_errors]
        return sorted(out, key=lambda s: (s.name, -1 if s.version is None else s.version))

    def stats(self) -> list[ModelStats]:
        """Each model version's counters since the pool started: requests that
        succeeded and failed, inferences and executions, queue/compute/request time,
        batch sizes and a latency histogram (see :class:`ModelStats`). Sorted by name,
        then version."""
        return sorted(self._router.stats(), key=lambda s: (s.model, s.version))

    def config(self, model: str, version: int | None = None) -> ModelConfig:
        """The configuration a served model runs with (its highest version by default).

        Raises:
            UnknownModelError: no such model or version.
        """
        return self._router.lookup(model, version).cfg

    def health(self) -> dict[str, ModelHealth]:
        """Each model's state and each instance's (ready, restarting, failed), with
        restart counts and the last error; see :class:`ModelHealth`."""
        return self._router.health()

    # ── lifetime ───────────────────────────────────────────────────────────────

    def close(self, grace: float = 5.0) -> None:
        """Stop accepting requests, drain for up to ``grace`` seconds, stop the workers.

        Requests still unfinished after ``grace`` fail with :class:`PoolClosedError`.
        Idempotent; returns once every worker has exited and every socket, descriptor
        and shared-memory arena of the pool is released.
        """
        with self._close_lock:
            self._closed = True
            self._router.stop(grace=grace, timeout=grace + 30.0)
            self._finalizer.detach()
            self._waker = None  # (it holds its event loop)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called, or once the pool failed (see :attr:`failure`)."""
        return self._closed or self._router.failure is not None

    @property
    def failure(self) -> BaseException | None:
        """The unexpected exception that stopped the pool's router thread, or None.

        It is a bug when it happens: the pool then fails every request with
        :class:`PoolClosedError`, and a server exits so that its supervisor restarts it.
        """
        return self._router.failure

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        # Leaving on an exception: do not wait for queued work to drain.
        self.close(grace=0.0 if exc[0] is not None else 5.0)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<libtorchrt.Pool {state} models={sorted(self._router.default)}>"

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
from collections.abc import Iterable, Sequence
from typing import cast

import torch

from ..config import ModelConfig
from ..cpus import FrontPin
from ..errors import (
    ConfigError,
    PoolClosedError,
    TimeoutError,
    TorchRTError,
    UnknownModelError,
)
from ..info import ModelHealth, ModelStats, ModelStatus, WorkerInfo
from ..transport import tensors as tensor_io
from .admission import Admission, Inputs, request_timeout
from .catalog import Catalog
from .control import Load, Unload
from .future import LoopFuture, LoopWaker, RequestFuture
from .router import Router, RouterOptions
from .sequences import SequenceTag
from .shortcut import Shortcut
from .supervisor import START_METHODS

__all__ = ["Pool"]


def _tag(sequence_id: int | str | None, start: bool, end: bool) -> SequenceTag | None:
    """A request's sequence arguments (None: it names no sequence)."""
    if sequence_id is None and not start and not end:
        return None
    return SequenceTag(sequence_id, bool(start), bool(end))  # type: ignore[arg-type]


def _finalize(router: Router, pin: FrontPin | None) -> None:
    if router.alive:
        warnings.warn(
            "libtorchrt.Pool was not closed; closing it now (use `with Pool(...)` or call close())",
            ResourceWarning,
            stacklevel=2,
        )
        router.stop(grace=0.0, timeout=10.0)
    if pin is not None:
        pin.restore()


class Pool:
    """A pool of worker processes serving PyTorch models (TorchScript, AOTInductor
    packages, exported programs, ``model.py`` modules: docs/formats.md).

    Args:
        repository: a Triton-style model repository
            (``<repo>/<model>/config.pbtxt``, ``<repo>/<model>/<version>/model.pt``).
        models: models configured in Python (alone or in addition to ``repository``).
        start_timeout: seconds to wait for every worker to load its model.
        request_arena_bytes: shared memory per model for request tensors (up to
            half of it lent to the application by :meth:`empty`).
        response_arena_bytes: shared memory per worker for output tensors.
        inline_threshold: tensors up to this many bytes travel inside the ZeroMQ
            message instead of shared memory.
        max_inflight: requests sent ahead to one worker, so it finds the next one
            waiting when it finishes; more only deepens the queue in a worker (docs/benchmarks.md,
            "Requests sent ahead", says how 4 was chosen).
        max_inflight_bytes: bytes of large inputs (those copied into shared memory)
            that :meth:`infer` and :meth:`infer_async` callers of a model may have
            copied and not had answered, per instance; a caller past it waits for room
            before it copies, so that the workers read inputs still in the CPU's
            caches (two requests an instance always go). None: no bound. ``submit``
            and a sequence's requests are not held back (docs/benchmarks.md, "Large
            inputs and outputs").
        busy_poll_us: microseconds (0 to 1,000,000) that a thread polls before it
            sleeps, since one that sleeps wakes up slowly: a worker after each reply
            (unless requests are waiting for it one behind the other), a caller thread
            of ``infer`` for its reply while its request is the pool's only one in
            flight, and the router thread while it awaits a reply. This trades CPU for
            latency, and takes CPU from models that compute and from other callers:
            turn it on for short models on machines with cores to spare
            (docs/benchmarks.md, "Busy polling"). Off (0) by default.
        wake_limit: the most caller threads that the replies of one batch wake at once
            (CPU models batched by the fast lane's hub; 0: all of them). The others
            wake one by one as those come back with their next request, so that they
            do not all wait for the GIL at once. A caller that does not come back within
            1 ms gives its turn to the next one, and when most do not, the hub stops
            pacing for 500 ms. Raise it when callers do a lot of work between requests
            without the GIL (docs/batching.md).
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
        front_cpus: keep this process's threads (the application's, the pool's
            router; not the fast lane's hub, which never takes the GIL) on these
            CPUs, and the workers on the others: a number of CPUs (the
            lowest-numbered this process may run on), or their numbers. None
            (default): the kernel places every thread. Threads that call ``infer``
            then wait for the GIL on several CPUs at once, and a convoy of GIL
            hand-offs can slow the front for seconds at a time; on the
            front's own CPUs it does not form (docs/benchmarks.md, "Front CPUs",
            has the figures). Worth it when many threads call small models; it
            takes those CPUs from the workers, and gains nothing for asyncio
            callers. Threads started while the pool is open inherit the pin;
            :meth:`close` gives every thread back its CPUs. One open pool of a
            process may set it.
        load_models: the names of the ``repository``'s models to load (None: all of
            them). Others can be loaded later with :meth:`load`; so can these, again.
            An empty list starts a pool with no model (as ``tritonserver
            --model-control-mode=explicit`` without ``--load-model``).

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
        max_inflight_bytes: int | None = 4 << 20,
        busy_poll_us: int = 0,
        wake_limit: int = 2,
        cuda_outputs: bool = True,
        strict: bool = False,
        max_pending: int | None = None,
        execution_timeout: float | None = None,
        compile_cache: bool | str | os.PathLike[str] = True,
        start_method: str = "forkserver",
        load_models: Iterable[str] | None = None,
        front_cpus: int | Iterable[int] | None = None,
    ) -> None:
        if start_method not in START_METHODS:
            raise ConfigError(
                f"Pool: start_method is {start_method!r}; expected one of {list(START_METHODS)}", key="start_method"
            )
        #: where configurations come from, and the models that failed to load
        self._catalog = Catalog(repository, execution_timeout)
        configs = self._catalog.starting(models, load_models, strict)
        self._closed = False
        #: one load() or unload() at a time
        self._control_lock = threading.Lock()
        self._start_timeout = start_timeout
        #: per event loop, what wakes it for finished requests (infer_async)
        self._wakers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopWaker] = weakref.WeakKeyDictionary()
        self._waker: LoopWaker | None = None
        self._close_lock = threading.Lock()
        options = RouterOptions(
            request_arena_bytes=request_arena_bytes,
            response_arena_bytes=response_arena_bytes,
            inline_threshold=inline_threshold,
            max_inflight=max_inflight,
            max_inflight_bytes=max_inflight_bytes,
            start_timeout=start_timeout,
            busy_poll_us=busy_poll_us,
            wake_limit=wake_limit,
            compile_cache=compile_cache,
            start_method=start_method,
        )
        if max_pending is not None and (isinstance(max_pending, bool) or max_pending < 1):
            raise ValueError(f"max_pending is {max_pending!r}; expected a positive integer or None")
        #: this process's threads on the front's CPUs (libtorchrt/cpus.py); None: not pinned
        self._pin: FrontPin | None = None
        if front_cpus is not None:
            self._pin = FrontPin(front_cpus)  # (before the router's threads start: they inherit it)
            options.worker_cpus = tuple(sorted(self._pin.workers))
        try:
            self._router = Router(configs, options)
        except BaseException:
            if self._pin is not None:
                self._pin.restore()
            raise
        hub = self._router.fast.hub
        if self._pin is not None and hub is not None:
            self._pin.exempt(hub.thread_id)  # (native: it never waits for the GIL)
        self._admission = Admission(
            self._router,
            self._catalog.errors,
            inline_threshold=inline_threshold,
            cuda_outputs=bool(cuda_outputs),
            max_pending=max_pending,
        )
        self._shortcut = Shortcut(self._admission, self._router.fast)
        self._finalizer = weakref.finalize(self, _finalize, self._router, self._pin)
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
        for status in self._catalog.errors:
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
        sequence_id: int | str | None = None,
        sequence_start: bool = False,
        sequence_end: bool = False,
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
            sequence_id: for a model with ``sequence_batching``, the sequence the
                request belongs to (an int from 1 to 2**64-1, or a str), which keeps
                its instance and its state from request to request (see
                docs/sequences.md); required by such a model, refused by others.
            sequence_start: the request starts the sequence (its state starts anew).
            sequence_end: the request ends the sequence (its state is dropped after).

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
            SequenceError: ``sequence_id`` missing for a model with sequence
                batching, given for one without, or of the wrong type; the future
                fails with it for a request of a sequence that is not running (not
                started, ended, or freed after idling).
            PoolClosedError: the pool is closed.

        The future fails with :class:`SequenceLostError` when the process holding the
        request's sequence died (its state is gone).
        """
        tag = _tag(sequence_id, sequence_start, sequence_end)
        return cast(
            RequestFuture[dict[str, torch.Tensor]], self._submit(model, inputs, version, timeout, priority, None, tag)
        )

    def empty(
        self, model: str, shape: int | Sequence[int], dtype: torch.dtype = torch.float32, *, version: int | None = None
    ) -> torch.Tensor:
        """An uninitialised CPU tensor to make ``model``'s input in, which its requests
        then send without a copy.

        Its memory is a block of the model's request arena, the shared memory its
        workers read inputs from: fill it (``torch.randn(..., out=x)``, ``x.copy_(...)``,
        ``x.numpy()[...] = ...``) and pass it, or a contiguous view of it, to
        :meth:`infer`, :meth:`infer_async` or :meth:`submit`. Any number of requests
        may name it. The block goes back to the arena once the tensor, its views and
        the requests naming it are gone.

        Until a request's reply has come, its worker reads the tensor's memory itself:
        do not change the tensor meanwhile, and know that a model that changes its
        inputs in place changes it. Tensors of up to the inline threshold, and any
        once half of the arena is lent (``request_arena_bytes``), are ordinary tensors,
        copied as usual when sent.

        Args:
            model: the model's name (its version: ``version``, default the highest);
                another model's requests copy the tensor as any other.
            shape: the tensor's shape.
            dtype: its dtype (any that requests carry).

        Raises:
            UnknownModelError, ModelUnavailableError: as :meth:`submit`.
            InvalidInputError: a bad ``shape`` or ``dtype``.
            PoolClosedError: the pool is closed.
        """
        if self._closed:
            raise PoolClosedError("the pool is closed")
        return self._admission.empty(model, version, shape, dtype)

    def _submit(
        self,
        model: str,
        inputs: Inputs,
        version: int | None,
        timeout: float | None,
        priority: int | None,
        future: LoopFuture | None = None,
        sequence: SequenceTag | None = None,
    ) -> RequestFuture[dict[str, torch.Tensor]] | LoopFuture:
        if self._closed:
            raise PoolClosedError("the pool is closed")
        return self._admission.submit(model, inputs, version, timeout, priority, future, sequence)

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
        """Run one request and wait for its outputs.

        A request to a CPU model without dynamic or sequence batching takes the fast
        lane: this thread sends it and the pool's native hub wakes it with the reply,
        with no other Python thread in between (docs/architecture.md). (From asyncio,
        :meth:`infer_async` takes it with dynamic batching too: docs/batching.md.)

        Args:
            model: the model's name.
            inputs: as for :meth:`submit`.
            timeout: seconds to wait; None waits as long as it takes.
            version, priority, sequence_id, sequence_start, sequence_end: as for
                :meth:`submit`.

        Returns:
            ``{output name: tensor}``.

        Raises:
            UnknownModelError, InvalidInputError, PoolClosedError: as for :meth:`submit`.
            ModelError: the model raised (the worker's traceback is attached).
            WorkerDiedError: the worker died while running the request
                (:class:`SequenceLostError` if it held the request's sequence).
            SequenceError: as for :meth:`submit`.
            TimeoutError: no result within ``timeout``.
        """
        if sequence_id is None and not sequence_start and not sequence_end:
            if self._closed:
                raise PoolClosedError("the pool is closed")
            plain = type(inputs) is dict and version is None and priority is None
            if plain:
                call = self._shortcut.take(model, inputs, timeout)  # type: ignore[arg-type]
                if call is not None:  # (like one admitted before: front/shortcut.py)
                    return self._router.fast.infer(call)
            call = self._admission.take(model, inputs, version, timeout, priority, gated=True)  # (checks timeout)
            try:
                fast = self._router.fast
                if fast.takes(call):
                    if plain:
                        self._shortcut.learn(model, inputs, call)  # type: ignore[arg-type]
                    return fast.infer(call)  # (no router thread: front/fastlane.py)
                self._router.submit(call)
                routed = cast(RequestFuture[dict[str, torch.Tensor]], call.future)
                return _result(routed, model, request_timeout(model, timeout))
            finally:
                if call.gated:  # (large inputs: the room it took in its model's copy gate)
                    call.model.gate.release(call.gated)  # type: ignore[union-attr]
        timeout = request_timeout(model, timeout)
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
        return _result(future, model, timeout)

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
        """Run one request from asyncio; see :meth:`infer`.

        The event loop is woken once for all the requests that finish together (a
        batch's, say), not once per request. Cancelling the awaiting task cancels the
        request if it has not been sent to a worker yet.
        """
        fast = self._router.fast
        plain = (
            type(inputs) is dict
            and version is None
            and priority is None
            and sequence_id is None
            and not sequence_start
            and not sequence_end
        )
        if plain:
            if self._closed:
                raise PoolClosedError("the pool is closed")
            call = self._shortcut.take(model, inputs, timeout)  # type: ignore[arg-type]
            if call is not None:  # (like one admitted before: front/shortcut.py)
                return await fast.join(call)
        if sequence_id is None and not sequence_start and not sequence_end and fast.serves(model, version):
            if self._closed:
                raise PoolClosedError("the pool is closed")
            big = self._admission.large_bytes(inputs.values()) if type(inputs) is dict else 0
            if big:  # (front/copygate.py: wait for room before copying, without blocking the loop)
                values = cast("dict[str, torch.Tensor]", inputs).values()
                gate, big = await self._admission.enter_gate(model, version, timeout, values)
                try:
                    return await self._infer_async_taken(model, inputs, version, timeout, priority, False)
                finally:
                    if gate is not None:
                        gate.release(big)
            return await self._infer_async_taken(model, inputs, version, timeout, priority, plain)
        loop = asyncio.get_running_loop()
        waker = self._waker
        if waker is None or waker.loop is not loop:
            waker = self._wakers.get(loop)
            if waker is None:
                waker = self._wakers.setdefault(loop, LoopWaker(loop))
            self._waker = waker  # the last loop's, found again without a weak reference
        waiter: asyncio.Future[dict[str, torch.Tensor]] = loop.create_future()
        tag = _tag(sequence_id, sequence_start, sequence_end)
        future = self._submit(model, inputs, version, timeout, priority, LoopFuture(waker, waiter), tag)
        try:
            return await waiter
        except asyncio.CancelledError:
            future.cancel()
            raise

    async def _infer_async_taken(
        self, model: str, inputs: Inputs, version: int | None, timeout: float | None, priority: int | None, plain: bool
    ) -> dict[str, torch.Tensor]:
        call = self._admission.take(model, inputs, version, timeout, priority)
        fast = self._router.fast
        if fast.takes(call):
            if plain:
                self._shortcut.learn(model, inputs, call)  # type: ignore[arg-type]
            return await fast.infer_async(call)  # (no router thread: front/fastlane.py)
        self._router.submit(call)
        return await asyncio.wrap_future(call.future)  # type: ignore[arg-type]

    # ── introspection ──────────────────────────────────────────────────────────

    def workers(self) -> list[WorkerInfo]:
        """One entry per worker process: model, instance, pid, device, state, flags."""
        return self._router.workers()

    def models(self) -> list[ModelStatus]:
        """Every model version the pool was asked to serve, with its state and error:
        ``"ready"``, ``"loading"``, ``"unavailable"``, ``"failed"`` (with why) or
        ``"stopped"``; a repository model whose configuration could not be read is
        listed as failed with version None. A model that :meth:`load` starts is
        ``"loading"`` until it serves (one it loads anew stays as it was meanwhile),
        and one that :meth:`unload` stops is ``"unloading"`` until its workers are
        gone. Sorted by name, then version."""
        out = [*self._router.statuses(), *self._router.control.statuses(), *self._catalog.errors]
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

    # ── models, while the pool serves ──────────────────────────────────────────

    def load(self, model: str | ModelConfig | Iterable[ModelConfig]) -> None:
        """Load a model while the pool serves, or load it anew (a changed configuration,
        a new model file, versions added or removed).

        The versions given start (each instance's worker loads and warms up the model)
        while what the pool served of that model goes on serving; once every new worker
        is ready, requests go to the new versions, and the old ones finish what they
        were given, then their workers exit. So loading a model anew drops no request.
        A version served before and not given is unloaded.

        Args:
            model: the name of a model of the pool's repository (its directory is read
                now: configuration, versions, files); or its configuration, one
                ``ModelConfig`` per version served (e.g. ``ModelConfig.from_pbtxt``).

        Raises:
            ConfigError: the repository has no such model, or its configuration is
                invalid (the model is served as before).
            WorkerStartError: a worker failed to start or warm up, or the load took
                longer than ``start_timeout`` (the model is served as before; one never
                served is listed by :meth:`models` as failed).
            ValueError: configurations of several models, or a version repeated.
            PoolClosedError: the pool is closed, or was closed meanwhile.
        """
        name = model if isinstance(model, str) else None
        with self._control_lock:
            try:
                configs = self._catalog.configs_of(model)
                name = configs[0].name
                change = Load(name, configs)
                self._router.control.submit(change)
                try:
                    change.future.result(self._start_timeout + 30.0)
                except concurrent.futures.TimeoutError:
                    raise TimeoutError(f"model {name!r} did not load within {self._start_timeout + 30.0:g} s") from None
            except (ConfigError, TorchRTError) as e:
                if name is not None and name not in self._router.default and not isinstance(e, PoolClosedError):
                    self._catalog.failed(name, e)
                raise
            self._catalog.failed(name, None)
        for note in dict.fromkeys(n for cfg in configs for n in cfg.notes):
            warnings.warn(f"model {name!r}: {note}", RuntimeWarning, stacklevel=2)

    def unload(self, model: str, *, grace: float | None = None) -> None:
        """Stop serving a model, every version of it, while the pool serves the others.

        New requests to it fail at once with :class:`UnknownModelError`; those it took
        finish (for up to ``grace`` seconds, None: as long as they take; then they fail
        with :class:`ModelUnavailableError`); then its workers exit and its shared memory
        is released. Returns once they have.

        Raises:
            UnknownModelError: the pool does not serve ``model``.
            PoolClosedError: the pool is closed.
        """
        if grace is not None and not grace >= 0:
            raise ValueError(f"Pool.unload: grace is {grace!r}; expected seconds >= 0, or None")
        with self._control_lock:
            if model not in self._router.default and not self._catalog.has_failed(model):
                raise UnknownModelError(model, sorted(self._router.default))
            change = Unload(model, grace)
            self._router.control.submit(change)
            change.future.result()
            self._catalog.failed(model, None)

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
            if self._pin is not None:
                self._pin.restore()
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


def _result(
    future: concurrent.futures.Future[dict[str, torch.Tensor]], model: str, timeout: float | None
) -> dict[str, torch.Tensor]:
    """The outputs of ``Pool.infer``'s future, waited for."""
    try:
        # The router fails the future at the deadline; the margin only guards
        # against a router that cannot (it never blocks for long).
        return future.result(None if timeout is None else timeout + 5.0)
    except concurrent.futures.TimeoutError:
        if future.done():  # the request's own error (ours derives from TimeoutError)
            raise
        future.cancel()
        raise TimeoutError(f"model {model!r} did not answer within {timeout} s") from None

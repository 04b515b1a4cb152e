"""The router thread: owns the ROUTER socket and the worker processes (front process).

::

    caller threads                         router thread                     workers
    ──────────────                         ─────────────                     ───────
    bind + check inputs
    copy tensors → model's request arena
    Call(future) ──► inbox ──(eventfd)──►  per-model queue
                                           dispatch to the least-loaded ──► DEALER (one per
                                           ready worker (≤ max_inflight)     worker process)
    future ◄── set_result(outputs) ◄────── ROUTER ◄──────────────────────── reply: outputs in
    outputs alias the response arena;                                       its response arena
    dropping them frees the slot ──► released offsets ride on the next request to that worker

One thread waits on everything at once with ``zmq.Poller``: the ROUTER socket, the
eventfd that callers bump, each worker's ``pidfd`` (readable when it exits) and its
stderr pipe. So a dead worker is noticed the moment it dies, and nothing sleep-polls.
Only this thread touches the sockets and the workers; callers only append to the inbox.

Memory: each model has one request arena shared by its instances (callers copy inputs
into it before the worker is chosen); each worker has its own response arena. Both are
memfds created here, so a SIGKILL of any process leaves nothing behind.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import os
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zmq

from ._batch import Batch
from ._batcher import Batcher, Orderer
from ._binding import Binder, output_positions
from ._call import Call
from ._gpu import DeviceBuffers
from ._state import (
    BACKOFF_BASE,
    BACKOFF_MAX,
    CRASH_LOOP,
    DEAD,
    READY,
    STOPPED,
    WARMING,
    _Model,
    _Slot,
    _Worker,
    gpu_index,
)
from .config.model import ModelConfig
from .deadlines import poll_ms
from .errors import (
    ConfigError,
    InvalidInputError,
    ModelError,
    ModelUnavailableError,
    PoolClosedError,
    ProtocolError,
    TimeoutError,
    TorchRTError,
    UnknownModelError,
    WorkerDiedError,
    WorkerStartError,
)
from .info import InstanceHealth, ModelHealth, ModelStats, ModelStatus, WorkerInfo
from .transport import tensors as tensor_io
from .transport import wire
from .transport.arena import Allocator, Arena
from .transport.heldgil import HeldSocket, PyzmqSocket, held
from .transport.sockets import PrivateDir, send
from .workers.outputs import DeclaredOutput
from .workers.process import WorkerProcess
from .workers.worker import WorkerSpec

__all__ = ["Router", "RouterOptions"]

log = logging.getLogger("libtorchrt")

#: Batches sent ahead to one worker: the next one waits while one runs.
BATCHES_PER_WORKER = 2


@dataclass
class RouterOptions:
    """Tunables of the router (see ``Pool`` for their meaning)."""

    request_arena_bytes: int = 256 << 20
    response_arena_bytes: int = 64 << 20
    inline_threshold: int = tensor_io.DEFAULT_INLINE_THRESHOLD
    busy_poll_us: int = 0
    max_inflight: int = 4
    start_timeout: float = 120.0


def _one_line(text: str) -> str:
    """A message on one line: its first line, and its last when they differ (a
    TorchScript error says where first and what last)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    return f"{lines[0]} ... {lines[-1]}"


def _declared_outputs(cfg: ModelConfig) -> list[list[Any]]:
    """The outputs each worker checks its results against (see workers/outputs.py)."""
    out = []
    for position, spec in output_positions(cfg.outputs):
        shape = spec.reshape if spec.reshape is not None else spec.dims
        dims = None if shape is None else tuple(shape)
        assert isinstance(spec.dtype, str)
        out.append(DeclaredOutput(position, spec.name, spec.dtype, dims, cfg.max_batch_size > 0).to_json())
    return out


class Router:
    """Starts the workers and routes calls to them from its own thread.

    Construction starts the thread; :meth:`wait_started` blocks until every worker
    is READY (or raises why not); :meth:`stop` drains and shuts everything down.
    """

    def __init__(self, configs: Sequence[ModelConfig], options: RouterOptions) -> None:
        self.options = options
        #: every model version served, and each model's default (highest) version
        self.models: dict[tuple[str, int], _Model] = {}
        self.default: dict[str, _Model] = {}
        self.inbox: collections.deque[Call] = collections.deque()
        #: (worker, offset) of response slots whose last tensor died; any thread appends
        self.released: collections.deque[tuple[_Worker, int]] = collections.deque()
        self._ids = itertools.count(1)
        self._identities = itertools.count()
        self._by_identity: dict[bytes, _Worker] = {}
        self._unknown_peers: set[bytes] = set()
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._stop_at: float | None = None  # drain deadline, once stop() was called
        self._stopped = False
        #: the exception that stopped the router thread, if one did (a bug)
        self.failure: BaseException | None = None
        self._submit_lock = threading.Lock()
        self._idle = True  # the router thread may be blocked in poll()
        self._waking = False  # a caller is waking it (or has) since it last looked
        # Request deadlines, a heap of weak references: a finished call must not be
        # kept alive (with its outputs) until its deadline; dead entries are dropped
        # when they come due, or in a sweep when they pile up.
        self._timers: list[tuple[float, int, weakref.ref[Call]]] = []
        self._timers_sweep_at = 1024
        self._timer_seq = itertools.count()
        self._endpoint = ""
        self._dir = PrivateDir()
        self._ctx = zmq.Context(1)
        self._sock: zmq.Socket | None = None
        #: the same socket's sends and receives without letting go of the GIL
        self._held: HeldSocket | PyzmqSocket | None = None
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # The watch pipe: workers exit when its write end (held only here) closes.
        self._watch_r, self._watch_w = os.pipe()
        self._poller = zmq.Poller()
        self._fd_handlers: dict[int, Any] = {}
        #: CUDA buffers for CUDA tensors (made on first use)
        self.gpu = DeviceBuffers(options.request_arena_bytes, options.response_arena_bytes)
        try:
            for cfg in configs:
                try:
                    placements = cfg.placements()
                    unplaceable = None
                except ConfigError as e:  # (a GPU this machine lacks): this model only fails
                    placements, unplaceable = [], e
                arena = Arena(options.request_arena_bytes, name=f"libtorchrt-{cfg.name}-v{cfg.version}-req")
                m = _Model(cfg, arena, Allocator(arena.size))
                m.declared_outputs = _declared_outputs(cfg)
                if unplaceable is not None:
                    m.failed, m.start_error = str(unplaceable), unplaceable
                m.slots = [_Slot(i, d) for i, d in enumerate(placements)]
                m.gpus = tuple(sorted({g for g in map(gpu_index, placements) if g is not None}))
                # (string inputs are not batched yet: see docs/batching.md)
                if (
                    cfg.dynamic_batching is not None
                    and cfg.max_batch_size > 0
                    and not any(spec.is_string for spec in cfg.inputs)
                ):
                    m.batcher = Batcher(m)
                    if cfg.dynamic_batching.preserve_ordering:
                        m.orderer = Orderer()
                self.models[(cfg.name, cfg.version)] = m
                if cfg.name not in self.default or cfg.version > self.default[cfg.name].version:
                    self.default[cfg.name] = m
        except BaseException:
            self._close_resources()
            raise
        self._thread = threading.Thread(target=self._run, name="libtorchrt-router", daemon=True)
        self._thread.start()

    # ── called from caller threads ─────────────────────────────────────────────

    def wait_started(self, timeout: float) -> None:
        """Block until every model is loaded (all its workers READY) or failed.

        A model whose workers fail to start while the pool starts is marked failed
        (``statuses()`` says why) and the others are served.

        Raises:
            WorkerStartError: no model could be loaded (the first one's error), or
                the start did not finish in time.
        """
        if not self._started.wait(timeout):
            raise WorkerStartError("*", -1, f"workers did not start within {timeout:.0f} s")
        if self._start_error is not None:
            raise self._start_error

    def lookup(self, name: str, version: int | None = None) -> _Model:
        """The model serving ``name`` (its highest version unless ``version`` is given).

        Raises:
            UnknownModelError: no such model, or no such version of it.
        """
        m = self.default.get(name) if version is None else self.models.get((name, version))
        if m is None:
            versions = sorted(v for n, v in self.models if n == name)
            raise UnknownModelError(name, sorted(self.default), version=version, versions=versions)
        return m

    def submit(self, call: Call) -> None:
        """Hand a call to the router thread (thread-safe).

        Raises:
            PoolClosedError: the router has stopped.
        """
        call.id = next(self._ids)
        if self._stopped:
            call.free()
            raise PoolClosedError("the pool is closed")
        self.inbox.append(call)
        # Wake the router only if it may be asleep: it publishes _idle before its last
        # look at the inbox, so either it sees this call or we see _idle. Under load it
        # is awake, and callers take no lock at all (with many caller threads, a lock
        # here was where they queued up).
        if self._idle and not self._waking:
            # One wake-up is enough: the others see _waking and skip the syscall
            # (the router clears it before it looks at the inbox). The lock orders
            # the write against closing the eventfd (a write to a closed, possibly
            # reused descriptor number would be a bug).
            self._waking = True
            with self._submit_lock:
                if not self._stopped:
                    os.eventfd_write(self._wake_fd, 1)
        if self._stopped:  # stopped meanwhile: its last sweep of the inbox may be past
            try:
                self.inbox.remove(call)
            except ValueError:
                return  # the router took it, and answers it
            call.fail(PoolClosedError("the pool is closed"))

    def stop(self, grace: float, timeout: float) -> None:
        """Drain for up to ``grace`` seconds, stop the workers, release everything.

        Idempotent. Returns once the router thread has finished, or after ``timeout``.
        """
        if self._stop_at is None:
            self._stop_at = time.monotonic() + grace
        with self._submit_lock:
            if not self._stopped:
                os.eventfd_write(self._wake_fd, 1)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def workers(self) -> list[WorkerInfo]:
        """Snapshot of every current worker (thread-safe: reads fields only)."""
        out = []
        for m in list(self.models.values()):
            for w in m.workers:
                ready = w.ready
                out.append(
                    WorkerInfo(
                        version=m.version,
                        model=m.name,
                        instance=w.instance,
                        pid=w.proc.pid,
                        device=ready.device if ready else "cpu",
                        state=w.state,
                        flags=dict(ready.flags) if ready else {},
                        inputs=tuple(ready.inputs) if ready else (),
                        inflight=len(w.inflight),
                        served=w.served,
                        exitcode=w.proc.returncode,
                    )
                )
        return out

    def health(self) -> dict[str, ModelHealth]:
        """Per model and instance: state, restarts, last error (thread-safe snapshot).

        Keyed by model name; a model served in several versions has one entry per
        version, keyed ``"name/version"``, and its name keys its default version.
        """
        out = {}
        counts = collections.Counter(name for name, _ in self.models)
        for (name, version), m in list(self.models.items()):
            health = self._model_health(m)
            if counts[name] == 1:
                out[name] = health
            else:
                out[f"{name}/{version}"] = health
                if self.default.get(name) is m:
                    out[name] = health
        return out

    def _model_health(self, m: _Model) -> ModelHealth:
        instances = []
        for s in list(m.slots):
            w = s.worker
            if self._stopped or m.failed is not None:
                state = "stopped"
            elif s.start_failures >= CRASH_LOOP:
                state = "failed"
            elif w is None or w.state == DEAD or w.doomed:  # (doomed: killed, its exit not seen yet)
                state = "restarting"
            else:
                state = w.state
            instances.append(
                InstanceHealth(
                    instance=s.instance,
                    pid=w.proc.pid if w is not None else None,
                    state=state,
                    restarts=s.restarts,
                    last_error=s.last_error,
                )
            )
        ready = sum(i.state == READY for i in instances)
        state, error = self._model_state(m, ready)
        return ModelHealth(m.name, state, ready, tuple(instances), error, m.pending, m.version)

    def _model_state(self, m: _Model, ready: int) -> tuple[str, str | None]:
        if m.failed is not None:
            return "failed", m.failed
        if self._stopped:
            return "stopped", None
        if ready:
            return "ready", None
        if m.unavailable is not None:
            return "unavailable", m.unavailable
        return "loading", None

    def pending(self) -> int:
        """Requests taken and not finished, all models together (approximate, any thread)."""
        total = len(self.inbox)
        for m in list(self.models.values()):
            total += m.pending + sum(len(w.inflight) for w in m.workers)
        return total

    def stats(self) -> list[ModelStats]:
        """Each model version's counters (thread-safe snapshot)."""
        return [m.stats.snapshot(m.pending) for m in list(self.models.values())]

    def statuses(self) -> list[ModelStatus]:
        """Each model version served: its state and error (thread-safe snapshot)."""
        out = []
        for m in list(self.models.values()):
            ready = sum(1 for w in m.workers if w.state == READY)
            state, error = self._model_state(m, ready)
            out.append(ModelStatus(m.name, m.version, state, error, ready, len(m.slots)))
        return out

    # ── the router thread ──────────────────────────────────────────────────────

    def _run(self) -> None:
        try:
            self._setup()
            self._loop()
        except BaseException as e:  # a bug here must not leave callers waiting forever
            log.critical("libtorchrt router thread failed; the pool is closed", exc_info=True)
            self.failure = e
            if self._start_error is None and not self._started.is_set():
                self._start_error = e if isinstance(e, TorchRTError) else WorkerStartError("*", -1, repr(e))
            self._fail_all(PoolClosedError(f"the pool's router thread failed: {e!r}"))
        finally:
            self._shutdown()
            self._started.set()

    def _setup(self) -> None:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a gone worker raises, not drops
        self._endpoint = self._dir.endpoint("router")
        sock.bind(self._endpoint)
        os.chmod(self._endpoint.removeprefix("ipc://"), 0o600)
        self._sock = sock
        self._held = held(sock)
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._wake_fd, zmq.POLLIN)
        self._fd_handlers[self._wake_fd] = None
        self._start_deadline = time.monotonic() + self.options.start_timeout
        for m in self.models.values():
            for slot in m.slots:
                self._spawn(m, slot)
        self._check_started()  # (when no model has a worker to wait for)

    def _spawn(self, m: _Model, slot: _Slot) -> None:
        identity = f"w{next(self._identities)}".encode()
        spec = WorkerSpec(
            model=m.name,
            instance=slot.instance,
            path=os.fspath(m.cfg.path),
            endpoint=self._endpoint,
            identity=identity.decode(),
            parameters={k: str(v) for k, v in m.cfg.parameters.items()},
            request_bytes=m.arena.size,
            response_bytes=self.options.response_arena_bytes,
            parent_pid=os.getpid(),
            device=slot.device,
            method=m.cfg.method,
            inline_threshold=self.options.inline_threshold,
            busy_poll_us=self.options.busy_poll_us,
            outputs=m.declared_outputs,
        )
        assert m.arena.fd is not None
        spec.request_fd = m.arena.fd
        env = dict(m.cfg.env)
        intra = m.cfg.flags.get("INTRA_OP_THREAD_COUNT") or 1
        env.setdefault("OMP_NUM_THREADS", str(intra))
        env.setdefault("MKL_NUM_THREADS", str(intra))
        proc = WorkerProcess(spec, self._watch_r, env)
        w = _Worker(m, slot.instance, identity, proc, gpu=gpu_index(slot.device))
        w.outputs = np.frombuffer(proc.responses.flat.numpy(), dtype=np.uint8)
        slot.worker = w
        slot.restart_at = None
        self._by_identity[identity] = w
        assert proc.pidfd is not None
        self._poller.register(proc.pidfd, zmq.POLLIN)
        self._fd_handlers[proc.pidfd] = (self._on_exit, w)
        self._poller.register(proc.stderr_fd, zmq.POLLIN)
        self._fd_handlers[proc.stderr_fd] = (self._on_stderr, w)

    def _loop(self) -> None:
        sock = self._sock
        assert sock is not None
        while True:
            now = time.monotonic()
            self._run_timers(now)
            wake = self._next_wake(now)
            if not self._started.is_set() and now >= self._start_deadline:
                self._start_failed_timeout()
                if self._start_error is not None:
                    return
            if self._stop_at is not None and (self._drained() or now >= self._stop_at):
                return
            self._idle = True
            # A call that arrived while we were busy came without a wake-up: do not sleep.
            # (poll_ms caps the wait: a far deadline must never overflow zmq_poll's int.)
            wait_ms = None if wake is None else poll_ms(wake - now)
            events = [] if self.inbox else self._poll(wait_ms)
            self._idle = False
            if self.inbox:
                self._on_inbox()
            for target, _ in events:
                if target is sock:
                    self._on_messages(sock)
                elif target == self._wake_fd:
                    self._waking = False
                    try:
                        os.eventfd_read(self._wake_fd)
                    except BlockingIOError:
                        pass
                    self._on_inbox()
                else:
                    handler = self._fd_handlers.get(target)
                    if handler is not None:
                        handler[0](handler[1])
            if self._start_error is not None:
                return

    def _poll(self, wait_ms: int | None) -> list[tuple[Any, int]]:
        spin = self.options.busy_poll_us
        if spin and any(w.inflight for m in self.models.values() for w in m.workers):
            # A reply is due soon: poll without sleeping for a while, since a thread
            # that sleeps and wakes pays for it (see Pool's busy_poll_us).
            deadline = time.perf_counter() + spin / 1e6
            while time.perf_counter() < deadline and not self.inbox:
                events = self._poller.poll(0)
                if events:
                    return events
            if self.inbox:
                return []
        return self._poller.poll(wait_ms)

    def _next_wake(self, now: float) -> float | None:
        """The earliest moment something is due: a deadline, a restart, a timeout."""
        due = []
        if not self._started.is_set():
            due.append(self._start_deadline)
        if self._stop_at is not None:
            due.append(self._stop_at)
        timers = self._timers
        # Finished calls' deadlines are dropped here, so they never decide a wake-up.
        while timers and ((call := timers[0][2]()) is None or call.future.done()):
            heapq.heappop(timers)
        if timers:
            due.append(timers[0][0])
        for m in self.models.values():
            if m.batcher is not None:
                wake = m.batcher.wake_at()
                if wake is not None:
                    due.append(wake)
            limit = m.cfg.execution_timeout
            for s in m.slots:
                if s.restart_at is not None:
                    due.append(s.restart_at)
                w = s.worker
                if limit is not None and w is not None and w.busy_since is not None and not w.doomed:
                    due.append(w.busy_since + limit)
        return min(due) if due else None

    def _run_timers(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            call = heapq.heappop(timers)[2]()
            if call is not None:
                self._expire(call)
        for m in self.models.values():
            if m.batcher is not None:
                wake = m.batcher.wake_at()
                if wake is not None and wake <= now:
                    self._dispatch(m)
            limit = m.cfg.execution_timeout
            for s in m.slots:
                if s.restart_at is not None and s.restart_at <= now and self._stop_at is None:
                    self._spawn(m, s)
                w = s.worker
                if (
                    limit is not None
                    and w is not None
                    and w.busy_since is not None
                    and not w.doomed
                    and w.busy_since + limit <= now
                ):
                    self._execution_timed_out(w, limit)

    def _expire(self, call: Call) -> None:
        """A request's deadline passed: fail it (and drop it, if it was not sent yet)."""
        if call.future.done():
            return
        exc = TimeoutError(f"model {call.model.name!r}: the request's deadline passed before it completed")
        if not call.dispatched:
            m = call.model
            if m.batcher is not None:
                m.batcher.remove(call)
            else:
                try:
                    m.queue.remove(call)
                except ValueError:
                    pass
            call.fail(exc)
        else:  # a worker is reading its tensors: free them when it answers or dies
            call.resolve_error(exc)

    def _execution_timed_out(self, w: _Worker, limit: float) -> None:
        # The instance's record says what happened before the caller hears of it: a
        # caller that looks at health() when its request fails must see it.
        log.error("worker %s/%d (pid %d) exceeded execution_timeout; killing it", w.model.name, w.instance, w.proc.pid)
        w.model.slots[w.instance].last_error = (
            f"worker {w.instance} (pid {w.proc.pid}) was killed: an execution took longer than "
            f"execution_timeout={limit:g} s"
        )
        w.explained = True
        w.doomed = True
        w.busy_since = None
        w.proc.kill()
        call = next(iter(w.inflight.values()))
        del w.inflight[call.id]
        call.fail(
            TimeoutError(
                f"model {w.model.name!r}: an execution took longer than execution_timeout={limit:g} s; "
                f"worker {w.instance} (pid {w.proc.pid}) was killed and is being replaced"
            )
        )

    def _drained(self) -> bool:
        return not self.inbox and all(
            not m.pending and not any(w.inflight for w in m.workers) for m in self.models.values()
        )

    def _on_inbox(self) -> None:
        touched = set()
        inbox = self.inbox
        now = time.monotonic()  # (the calls taken together are queued at one moment)
        while inbox:
            call = inbox.popleft()
            m = call.model
            if m.batcher is None:
                m.queue.append(call)
            else:
                if m.orderer is not None:
                    m.orderer.number(call)
                m.batcher.add(call, now)
            if call.deadline is not None:
                self._add_timer(call)
            touched.add(m)
        for m in touched:
            self._dispatch(m)

    def _add_timer(self, call: Call) -> None:
        timers = self._timers
        if len(timers) >= self._timers_sweep_at:
            timers[:] = [t for t in timers if t[2]() is not None]
            heapq.heapify(timers)
            self._timers_sweep_at = max(1024, 2 * len(timers))
        assert call.deadline is not None
        heapq.heappush(timers, (call.deadline, next(self._timer_seq), weakref.ref(call)))

    def _dispatch(self, m: _Model) -> None:
        if self.released or self.gpu.released:
            self._collect_releases()
        if not m.pending:
            return
        if m.failed is not None:
            self._fail_queued(m, ModelUnavailableError(m.name, m.failed, loaded=False))
            return
        if m.unavailable is not None and not any(w.state == READY for w in m.workers):
            self._fail_queued(m, ModelUnavailableError(m.name, m.unavailable))
            return
        if m.batcher is not None:
            self._dispatch_batches(m, m.batcher)
            return
        queue = m.queue
        limit = self.options.max_inflight
        while queue:
            best = self._least_loaded(m, limit, queue[0].device)
            if best is None:
                return  # a reply, a restart or a death will call us again
            call = queue.popleft()
            if not call.dispatched:
                if not call.future.set_running_or_notify_cancel():
                    call.free()  # cancelled while queued
                    continue
                call.dispatched = True
            elif call.future.done():  # its deadline passed while it waited to be re-sent
                call.free()
                continue
            self._send(best, call)

    def _dispatch_batches(self, m: _Model, batcher: Batcher) -> None:
        """Send the batches that are due, while an instance can take one more
        (two each: the next waits while one runs)."""
        now = time.monotonic()
        while len(batcher):
            best = self._least_loaded(m, BATCHES_PER_WORKER, None)
            if best is None:
                return
            batch = batcher.next_batch(now)
            if batch is None:
                return  # it waits for more rows, at most its delay (see _next_wake)
            batch.id = next(self._ids)
            batch.dispatched = True
            self._send(best, batch)

    def _fail_queued(self, m: _Model, exc: TorchRTError) -> None:
        while m.queue:
            m.queue.popleft().fail(exc)
        if m.batcher is not None:
            for call in m.batcher.drain():
                call.fail(exc)

    def _least_loaded(self, m: _Model, limit: int, device: int | None) -> _Worker | None:
        """The ready worker of ``m`` with the fewest requests in flight (below
        ``limit``, on GPU ``device`` if given); ties go round-robin (scanning from the
        one after the last choice), so that even sequential traffic reaches every
        instance."""
        slots = m.slots
        n = len(slots)
        best = None
        for k in range(n):
            w = slots[(m.next + k) % n].worker
            if (
                w is not None
                and w.state == READY
                and not w.doomed
                and len(w.inflight) < limit
                and (device is None or w.gpu == device)
                and (best is None or len(w.inflight) < len(best.inflight))
            ):
                best = w
        if best is not None:
            m.next = (best.instance + 1) % n
        return best

    def _send(self, w: _Worker, call: Call) -> None:
        """Send ``call`` to worker ``w`` (which records it as in flight)."""
        releases, w.releases = w.releases, []
        batch = call.member_rows if isinstance(call, Batch) else []
        if w.gpu is None:
            header = wire.encode(wire.Request(call.id, call.descs, releases, call.blobs, batch=batch))
        else:
            try:
                header = self._gpu_request(w, call, releases, batch)
            except Exception as e:  # e.g. no device memory left for its response buffer
                w.releases = releases + w.releases
                call.fail(ModelError(w.model.name, type(e).__name__, f"cannot set up CUDA buffers: {e}", ""))
                return
        if not w.inflight:
            w.busy_since = time.monotonic()
        w.inflight[call.id] = call
        call.sent_ns = time.perf_counter_ns()
        try:
            assert self._held is not None
            self._held.send(w.identity, header, call.frames)
        except zmq.ZMQError:
            # The worker went away between its exit and our noticing: the pidfd
            # event follows, and re-sends this call with the worker's others.
            pass

    def _gpu_request(self, w: _Worker, call: Call, releases: list[int], batch: list[int]) -> bytes:
        """The header of ``call`` for GPU worker ``w``, with the CUDA allocations it
        needs (the caller's ones every time: the worker caches them by id)."""
        exports = list(call.device_exports)
        device_in = device_out = -1
        fresh = []
        if call.device_offsets:
            assert call.device_buffer is not None
            device_in = call.device_buffer.export.id
            fresh.append(call.device_buffer.export)
        if call.cuda_outputs:
            assert w.gpu is not None
            export = self.gpu.output_buffer(w.identity, w.gpu).export
            device_out = export.id
            fresh.append(export)
        for export in fresh:
            if export.id not in w.mapped:
                w.mapped.add(export.id)
                exports.append(export)
        device_releases, w.device_releases = w.device_releases, []
        msg = wire.Request(
            call.id,
            call.descs,
            releases,
            call.blobs,
            exports,
            device_in,
            device_out,
            device_releases,
            call.device_ids,
            batch=batch,
        )
        return wire.encode(msg)

    def _collect_releases(self) -> None:
        released = self.released
        while released:
            w, offset = released.popleft()
            if w.state == READY:
                w.releases.append(offset)
        if self.gpu.released:
            self.gpu.collect(self._device_released)

    def _device_released(self, identity: bytes, offset: int) -> None:
        w = self._by_identity.get(identity)
        if w is not None and w.state == READY:
            w.device_releases.append(offset)

    def _on_messages(self, sock: zmq.Socket) -> None:
        touched: set[_Model] = set()
        held = self._held
        assert held is not None
        while True:
            got = held.recv()
            if got is None:
                break
            identity, header, frames = got
            w = self._by_identity.get(identity)
            if w is None or not header:
                self._unknown_peer(identity)
                continue
            try:
                msg = wire.decode(header)
            except ProtocolError as e:
                log.warning("dropped a malformed message from worker %s/%d: %s", w.model.name, w.instance, e)
                continue
            if isinstance(msg, wire.Response):
                self._on_response(w, msg, frames)
            elif isinstance(msg, wire.Error):
                self._on_error(w, msg)
            elif isinstance(msg, wire.Ready):
                self._on_ready(w, msg)
            elif isinstance(msg, wire.Failed):
                self._on_failed(w, msg)
            touched.add(w.model)
        for m in touched:
            self._dispatch(m)

    def _unknown_peer(self, identity: bytes) -> None:
        # Once per peer (a bounded memory of them), so a noisy peer cannot flood the log.
        if identity not in self._unknown_peers:
            if len(self._unknown_peers) < 1024:
                self._unknown_peers.add(identity)
            log.warning("dropped a message from an unknown peer %r", identity[:32])

    def _output_slot(self, w: _Worker, d: wire.TensorDesc) -> torch.Tensor:
        tensor, owner = tensor_io.as_tensor(self._slot_bytes(w, d), wire.DTYPES[d.dtype], d.shape)
        # The slot is the caller's until the last tensor sharing its storage dies; then
        # its offset is queued and rides back to the worker on the next request.
        weakref.finalize(owner, self.released.append, (w, d.where)).atexit = False
        return tensor

    def _output_array(self, w: _Worker, d: wire.TensorDesc) -> Any:
        """An output slot as a numpy array where its dtype allows (else as a tensor),
        released like :meth:`_output_slot`'s once the last view of it is freed."""
        made = tensor_io.as_array(self._slot_bytes(w, d), wire.DTYPES[d.dtype], d.shape)
        if made is None:
            return self._output_slot(w, d)
        weakref.finalize(made[1], self.released.append, (w, d.where)).atexit = False
        return made[0]

    @staticmethod
    def _slot_bytes(w: _Worker, d: wire.TensorDesc) -> np.ndarray:
        base = w.outputs
        assert base is not None
        end = d.where + d.nbytes
        if end > base.size:
            raise ValueError(f"output slot [{d.where}, {end}) lies outside the response arena")
        return base[d.where : end]

    def _answered(self, w: _Worker, req_id: int) -> Call | None:
        call = w.inflight.pop(req_id, None)
        if call is None:
            log.warning("worker %s/%d answered unknown request %d", w.model.name, w.instance, req_id)
            return None
        w.served += 1
        w.busy_since = time.monotonic() if w.inflight else None
        call.free()
        return call

    def _on_response(self, w: _Worker, msg: wire.Response, frames: list[zmq.Frame]) -> None:
        call = self._answered(w, msg.id)
        if call is None:
            return
        if call.warmup:
            self._warmed(w, msg)
            return
        w.model.stats.executed(call.rows)
        batch = isinstance(call, Batch)
        try:
            if w.gpu is None:
                # A batch's outputs stay numpy arrays here: its members make their
                # tensors in their own threads (see Batch.resolve).
                slot = self._output_array if batch else self._output_slot
                outputs = tensor_io.read(msg.tensors, msg.blobs, frames, lambda d: slot(w, d), arrays=batch)
            else:
                outputs = self._gpu_outputs(w, call, msg, frames)
        except Exception as e:  # a reply we cannot rebuild fails its request, not the router
            call.resolve_error(e if isinstance(e, ProtocolError) else ProtocolError(f"unreadable reply: {e!r}"))
            return
        binder = w.model.binder
        assert binder is not None
        result = dict(zip(binder.output_names(len(outputs)), outputs))
        call.resolve(binder.shape_outputs(result) if binder.reshapes and not batch else result)

    def _gpu_outputs(self, w: _Worker, call: Call, msg: wire.Response, frames: list[zmq.Frame]) -> list[torch.Tensor]:
        """A GPU worker's outputs: ``DEVICE`` ones view its response buffer (no copy);
        the others are read as from any worker, and moved to the GPU if the caller
        asked for CUDA outputs (only when the response buffer was full)."""
        if not call.cuda_outputs and any(d.kind == wire.DEVICE for d in msg.tensors):
            raise ProtocolError("device outputs for a request that did not ask for them")
        gpu = self.gpu
        outputs = tensor_io.read(
            msg.tensors,
            msg.blobs,
            frames,
            lambda d: self._output_slot(w, d),
            lambda d: gpu.output_view(w.identity, d),
        )
        if call.cuda_outputs:  # (strings stay lists)
            outputs = [t.to(f"cuda:{w.gpu}") if isinstance(t, torch.Tensor) and not t.is_cuda else t for t in outputs]
        return outputs

    def _on_error(self, w: _Worker, msg: wire.Error) -> None:
        if msg.fatal:
            # It exits after this (sticky CUDA error): the requests queued in it did
            # not run, and are re-sent elsewhere when its exit is seen.
            w.doomed = True
            log.error(
                "worker %s/%d reported a sticky error and is being replaced: %s", w.model.name, w.instance, msg.message
            )
        call = self._answered(w, msg.id)
        if call is None:
            return
        if call.warmup:
            self._warmup_failed(w, _one_line(msg.message), f"{msg.message}\n{msg.traceback}")
            return
        w.model.stats.executed(call.rows)
        exc: TorchRTError
        if msg.input_error:
            exc = InvalidInputError(w.model.name, None, "a well-formed request", msg.message)
        else:
            exc = ModelError(w.model.name, msg.error_type, msg.message, msg.traceback)
        call.resolve_error(exc)

    def _on_ready(self, w: _Worker, msg: wire.Ready) -> None:
        if msg.protocol != wire.PROTOCOL_VERSION:
            self._start_error = WorkerStartError(
                w.model.name, w.instance, f"speaks protocol {msg.protocol}; this front speaks {wire.PROTOCOL_VERSION}"
            )
            self._started.set()
            return
        w.ready = msg
        m = w.model
        if m.binder is None:
            m.binder = Binder(m.cfg, msg.inputs, dict_input=msg.dict_input)
            if msg.dict_input and m.batcher is not None and not len(m.batcher):
                m.batcher = m.orderer = None  # a Dict[str, Tensor] model is not batched yet
        if m.warmup is None:
            try:
                m.warmup = [m.binder.bind(sample) for sample in m.cfg.warmup_requests()]
            except TorchRTError as e:  # a warm-up sample the model cannot take
                self._warmup_failed(w, f"its warm-up requests do not fit the model: {e}", "")
                return
        if m.warmup:
            self._send_warmup(w, m.warmup)
        else:
            self._became_ready(w)

    def _send_warmup(self, w: _Worker, samples: list[list[Any]]) -> None:
        """Run the model's warm-up requests on ``w`` before it takes any request."""
        m = w.model
        w.state = WARMING
        w.warmup_left = len(samples)
        w.busy_since = time.monotonic()
        for tensors in samples:
            call = Call(m, tensor_io.write(tensors, m.arena, m.allocator, self.options.inline_threshold))
            call.id, call.warmup, call.dispatched = next(self._ids), True, True
            w.inflight[call.id] = call
            header = wire.encode(wire.Request(call.id, call.descs, [], call.blobs))
            try:
                send(self._sock, header, call.frames, identity=w.identity)  # type: ignore[arg-type]
            except zmq.ZMQError:
                return  # it is gone: its exit follows

    def _warmed(self, w: _Worker, msg: wire.Response) -> None:
        """A warm-up request came back: drop its outputs; the last one makes ``w`` READY."""
        w.served -= 1  # not a caller's request
        for d in msg.tensors:
            if d.kind == wire.ARENA:
                w.releases.append(d.where)
            elif d.kind == wire.DEVICE:
                w.device_releases.append(d.where)
        w.warmup_left -= 1
        if w.warmup_left == 0 and w.state == WARMING:
            self._became_ready(w)

    def _warmup_failed(self, w: _Worker, text: str, tb: str) -> None:
        """``w``'s warm-up failed: a start failure (the worker is stopped and replaced,
        or the model fails to load while the pool starts)."""
        w.served -= 1
        text = f"warm-up failed: {text}"
        w.model.slots[w.instance].last_error = text
        w.explained = True
        log.error("worker %s/%d %s", w.model.name, w.instance, text)
        if not self._started.is_set():
            self._model_failed(w.model, WorkerStartError(w.model.name, w.instance, text, tb))
        elif w.state != DEAD:
            w.doomed = True
            w.proc.kill()  # its exit counts as a start failure, with backoff

    def _became_ready(self, w: _Worker) -> None:
        w.state = READY
        w.busy_since = None
        m = w.model
        slot = m.slots[w.instance]
        slot.start_failures = 0
        m.unavailable = None
        ready = w.ready
        log.info("worker %s/%d ready (pid %d) with %s", m.name, w.instance, w.proc.pid, ready.flags if ready else {})
        self._check_started()
        self._dispatch(m)

    def _check_started(self) -> None:
        """The pool has started once every model is loaded or failed."""
        if self._started.is_set():
            return
        models = list(self.models.values())
        if not all(m.failed is not None or all(w.state == READY for w in m.workers) for m in models):
            return
        if all(m.failed is not None for m in models):  # nothing to serve
            self._start_error = models[0].start_error
        self._started.set()

    def _model_failed(self, m: _Model, error: WorkerStartError) -> None:
        """``m`` could not be loaded while the pool started: stop its workers, keep its
        error, serve the others."""
        if m.failed is not None:
            return
        m.failed = str(error).split("\n", 1)[0]
        m.start_error = error
        log.error("model %s (version %d) failed to load: %s", m.name, m.version, m.failed)
        for w in m.workers:
            if w.state != DEAD:
                w.state = STOPPED
                w.proc.kill()
        while m.queue:
            m.queue.popleft().fail(ModelUnavailableError(m.name, m.failed, loaded=False))
        self._check_started()

    def _on_failed(self, w: _Worker, msg: wire.Failed) -> None:
        text = f"{msg.error_type}: {msg.message}"
        w.model.slots[w.instance].last_error = text
        w.explained = True
        if not self._started.is_set():
            self._model_failed(w.model, WorkerStartError(w.model.name, w.instance, text, msg.traceback))
        else:
            log.error("worker %s/%d failed to start: %s", w.model.name, w.instance, text)

    def _on_stderr(self, w: _Worker) -> None:
        if not w.proc.read_stderr():
            self._poller.unregister(w.proc.stderr_fd)
            self._fd_handlers.pop(w.proc.stderr_fd, None)

    def _on_exit(self, w: _Worker) -> None:
        """A worker exited: re-send or fail what it held, and schedule its restart."""
        pidfd = w.proc.pidfd
        if pidfd is not None:
            self._poller.unregister(pidfd)
            self._fd_handlers.pop(pidfd, None)
        if w.proc.stderr_fd in self._fd_handlers:
            self._poller.unregister(w.proc.stderr_fd)
            del self._fd_handlers[w.proc.stderr_fd]
        code = w.proc.wait(1.0)
        tail = w.proc.tail()
        # Replies it sent before dying may still wait in the socket: take them first,
        # so an answered request is not run a second time (or blamed for the death).
        if self._sock is not None:
            self._on_messages(self._sock)
        self._by_identity.pop(w.identity, None)
        m = w.model
        if (self._stop_at is not None or m.failed is not None) and w.state == STOPPED:
            self._drop_worker(w)
            return
        slot = m.slots[w.instance]
        was_ready = w.state == READY
        w.state = DEAD
        w.busy_since = None
        log.error("worker %s/%d (pid %d) exited with %s", m.name, w.instance, w.proc.pid, code)
        if not self._started.is_set() and self._start_error is None:
            reason = slot.last_error or f"the process exited with code {code}"
            self._model_failed(m, WorkerStartError(m.name, w.instance, reason, tail))
            self._drop_worker(w)
            return
        self._resend_or_fail(w, code, tail)
        # Replace it: a fresh process, after a backoff that grows while it keeps dying
        # before it is ready.
        if not w.explained:  # (a reason this worker gave, or the watchdog's, is kept)
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
            slot.last_error = f"worker {w.instance} (pid {w.proc.pid}) {how}" + (
                f": {tail.splitlines()[-1]}" if tail else ""
            )
        if not was_ready:
            slot.start_failures += 1
        slot.restarts += 1
        delay = 0.0 if was_ready else min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (slot.start_failures - 1))
        slot.restart_at = time.monotonic() + delay
        self._drop_worker(w)
        if all(s.start_failures >= CRASH_LOOP for s in m.slots):
            m.unavailable = slot.last_error or f"exited with code {code}"
        self._dispatch(m)

    def _drop_worker(self, w: _Worker) -> None:
        """Release what the front holds for an exited worker."""
        for call in w.inflight.values():
            if call.warmup:
                call.free()
        w.inflight = {k: c for k, c in w.inflight.items() if not c.warmup}
        w.outputs = None
        w.proc.close()
        if w.gpu is not None:
            self.gpu.drop_worker(w.identity)

    def _resend_or_fail(self, w: _Worker, code: int | None, tail: str) -> None:
        """Decide the fate of what a dead worker held (see docs/reliability.md).

        Only the request at the head of its queue was running; it is re-sent while it
        has retries left and has not now been running in two workers that died
        (a poison request). The others never ran, and are re-sent, in order, ahead
        of newer requests.
        """
        m = w.model
        calls = list(w.inflight.values())
        w.inflight = {}
        resend = []
        for i, call in enumerate(calls):
            if call.future.done() or call.warmup:  # its deadline passed; or the router's own
                call.free()
                continue
            if i == 0 and not w.doomed:
                call.attempts += 1
                if call.attempts >= 2 or call.attempts > m.cfg.max_retries:
                    call.fail(WorkerDiedError(m.name, w.instance, w.proc.pid, code, tail, poison=call.attempts >= 2))
                    continue
            resend.append(call)
        if m.batcher is not None:
            m.batcher.extendleft(resend, time.monotonic())
        else:
            m.queue.extendleft(reversed(resend))

    def _start_failed_timeout(self) -> None:
        """The start deadline passed: the models still loading fail to load."""
        for m in list(self.models.values()):
            slow = [w for w in m.workers if w.state != READY]
            if m.failed is None and slow:
                w = slow[0]
                what = "warm up" if w.state == WARMING else "load"
                self._model_failed(
                    m,
                    WorkerStartError(
                        m.name,
                        w.instance,
                        f"did not {what} within start_timeout={self.options.start_timeout:.0f} s "
                        "(raise it for slow-loading models)",
                        w.proc.tail(),
                    ),
                )
        self._check_started()

    def _fail_all(self, exc: BaseException) -> None:
        while self.inbox:
            self.inbox.popleft().fail(exc)
        for m in self.models.values():
            self._fail_queued(m, exc)  # type: ignore[arg-type]
            for w in m.workers:
                inflight, w.inflight = w.inflight, {}
                for call in inflight.values():
                    call.fail(exc)

    def _shutdown(self) -> None:
        """Stop every worker in order and release every resource (router thread)."""
        with self._submit_lock:
            self._stopped = True
        self._fail_all(PoolClosedError("the pool was closed before this request completed"))
        live = [w for m in self.models.values() for w in m.workers if w.proc.reap() is None]
        for w in live:
            w.state = STOPPED
            try:
                send(self._sock, wire.encode(wire.Shutdown()), identity=w.identity)  # type: ignore[arg-type]
            except (zmq.ZMQError, AttributeError, TypeError):
                pass  # not connected yet (or no socket): the watch pipe stops it
        # Closing the watch pipe's write end tells every worker, even one that never
        # connected, that the front is gone.
        os.close(self._watch_w)
        self._watch_w = -1
        deadline = time.monotonic() + 5.0
        for w in live:
            w.proc.stop(max(0.0, deadline - time.monotonic()))
        for m in self.models.values():
            for w in m.workers:
                if w.state != DEAD:
                    w.state = STOPPED
        self._close_resources()

    def _close_resources(self) -> None:
        for m in self.models.values():
            for w in m.workers:
                w.outputs = None
                w.proc.close()
            m.arena.close()
        self.gpu.close()  # after the workers, which map its buffers, are gone
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
            self._held = None
        self._ctx.term()
        for fd in (self._wake_fd, self._watch_r, self._watch_w):
            if fd >= 0:
                os.close(fd)
        self._wake_fd = self._watch_r = self._watch_w = -1
        self._dir.close()
        # Calls submitted in the instant after the last check fail here.
        while self.inbox:
            self.inbox.popleft().fail(PoolClosedError("the pool is closed"))

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
import itertools
import logging
import os
import threading
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zmq

from ._binding import Binder
from .config.model import ModelConfig
from .errors import (
    InvalidInputError,
    ModelError,
    PoolClosedError,
    ProtocolError,
    TorchRTError,
    WorkerDiedError,
    WorkerStartError,
)
from .info import WorkerInfo
from .transport import tensors as tensor_io
from .transport import wire
from .transport.arena import Allocator, Arena
from .transport.sockets import PrivateDir, recv, send
from .workers.process import WorkerProcess
from .workers.worker import WorkerSpec

__all__ = ["Call", "Router", "RouterOptions"]

log = logging.getLogger("libtorchrt")

_STARTING, _READY, _DEAD, _STOPPED = "starting", "ready", "dead", "stopped"


@dataclass
class RouterOptions:
    """Tunables of the router (see ``Pool`` for their meaning)."""

    request_arena_bytes: int = 256 << 20
    response_arena_bytes: int = 64 << 20
    inline_threshold: int = tensor_io.DEFAULT_INLINE_THRESHOLD
    max_inflight: int = 2
    start_timeout: float = 120.0


class Call:
    """One request on its way: its tensors' placement and the caller's future."""

    __slots__ = ("blobs", "descs", "frames", "future", "id", "model", "offsets")

    def __init__(self, model: _Model, placed: tensor_io.Placed) -> None:
        self.model = model
        self.descs, self.blobs, self.frames, self.offsets = placed
        self.future: Future[dict[str, torch.Tensor]] = Future()
        self.id = 0

    def free(self) -> None:
        """Give the request's arena slots back (once the worker is done with them)."""
        offsets, self.offsets = self.offsets, []
        for offset in offsets:
            self.model.allocator.free(offset)

    def fail(self, exc: BaseException) -> None:
        self.free()
        if not self.future.done():
            try:
                self.future.set_exception(exc)
            except Exception:  # cancelled or resolved concurrently by the caller
                pass


@dataclass(eq=False)
class _Worker:
    model: _Model
    instance: int
    identity: bytes
    proc: WorkerProcess
    state: str = _STARTING
    ready: wire.Ready | None = None
    inflight: dict[int, Call] = field(default_factory=dict)
    releases: list[int] = field(default_factory=list)
    served: int = 0
    #: the response arena as a numpy byte array, the base of zero-copy outputs
    outputs: np.ndarray | None = None


@dataclass(eq=False)
class _Model:
    cfg: ModelConfig
    arena: Arena
    allocator: Allocator
    workers: list[_Worker] = field(default_factory=list)
    queue: collections.deque[Call] = field(default_factory=collections.deque)
    binder: Binder | None = None
    next: int = 0  # where the next round-robin scan starts

    @property
    def name(self) -> str:
        return self.cfg.name


class Router:
    """Starts the workers and routes calls to them from its own thread.

    Construction starts the thread; :meth:`wait_started` blocks until every worker
    is READY (or raises why not); :meth:`stop` drains and shuts everything down.
    """

    def __init__(self, configs: Sequence[ModelConfig], options: RouterOptions) -> None:
        self.options = options
        self.models: dict[str, _Model] = {}
        self.inbox: collections.deque[Call] = collections.deque()
        #: (worker, offset) of response slots whose last tensor died; any thread appends
        self.released: collections.deque[tuple[_Worker, int]] = collections.deque()
        self._ids = itertools.count(1)
        self._identities = itertools.count()
        self._by_identity: dict[bytes, _Worker] = {}
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._stop_at: float | None = None  # drain deadline, once stop() was called
        self._stopped = False
        self._submit_lock = threading.Lock()
        self._idle = True  # the router thread may be blocked in poll()
        self._dir = PrivateDir()
        self._ctx = zmq.Context(1)
        self._sock: zmq.Socket | None = None
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # The watch pipe: workers exit when its write end (held only here) closes.
        self._watch_r, self._watch_w = os.pipe()
        self._poller = zmq.Poller()
        self._fd_handlers: dict[int, Any] = {}
        try:
            for cfg in configs:
                arena = Arena(options.request_arena_bytes, name=f"libtorchrt-{cfg.name}-req")
                self.models[cfg.name] = _Model(cfg, arena, Allocator(arena.size))
        except BaseException:
            self._close_resources()
            raise
        self._thread = threading.Thread(target=self._run, name="libtorchrt-router", daemon=True)
        self._thread.start()

    # ── called from caller threads ─────────────────────────────────────────────

    def wait_started(self, timeout: float) -> None:
        """Block until every worker is READY.

        Raises:
            WorkerStartError: a worker failed to start or did not start in time.
        """
        if not self._started.wait(timeout):
            raise WorkerStartError("*", -1, f"workers did not start within {timeout:.0f} s")
        if self._start_error is not None:
            raise self._start_error

    def submit(self, call: Call) -> None:
        """Hand a call to the router thread (thread-safe).

        Raises:
            PoolClosedError: the router has stopped.
        """
        call.id = next(self._ids)
        # The lock orders this against closing the eventfd (a write to a closed,
        # possibly reused descriptor number would be a bug); it is held for one
        # non-blocking syscall.
        with self._submit_lock:
            if self._stopped:
                call.free()
                raise PoolClosedError("the pool is closed")
            self.inbox.append(call)
            # Wake the router only if it may be asleep: it publishes _idle before its
            # last look at the inbox, so either it sees this call or we see _idle.
            if self._idle:
                os.eventfd_write(self._wake_fd, 1)

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
        """Snapshot of every worker (thread-safe: reads immutable fields only)."""
        out = []
        for m in list(self.models.values()):
            for w in list(m.workers):
                ready = w.ready
                out.append(
                    WorkerInfo(
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

    # ── the router thread ──────────────────────────────────────────────────────

    def _run(self) -> None:
        try:
            self._setup()
            self._loop()
        except BaseException as e:  # a bug here must not leave callers waiting forever
            log.exception("libtorchrt router thread failed")
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
        endpoint = self._dir.endpoint("router")
        sock.bind(endpoint)
        os.chmod(endpoint.removeprefix("ipc://"), 0o600)
        self._sock = sock
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._wake_fd, zmq.POLLIN)
        self._fd_handlers[self._wake_fd] = None
        self._start_deadline = time.monotonic() + self.options.start_timeout
        for m in self.models.values():
            for i in range(m.cfg.instances):
                self._spawn(m, i, endpoint)

    def _spawn(self, m: _Model, instance: int, endpoint: str) -> None:
        identity = f"w{next(self._identities)}".encode()
        spec = WorkerSpec(
            model=m.name,
            instance=instance,
            path=os.fspath(m.cfg.path),
            endpoint=endpoint,
            identity=identity.decode(),
            parameters={k: str(v) for k, v in m.cfg.parameters.items()},
            request_bytes=m.arena.size,
            response_bytes=self.options.response_arena_bytes,
            parent_pid=os.getpid(),
            method=m.cfg.method,
            inline_threshold=self.options.inline_threshold,
        )
        assert m.arena.fd is not None
        spec.request_fd = m.arena.fd
        env = dict(m.cfg.env)
        intra = m.cfg.flags.get("INTRA_OP_THREAD_COUNT") or 1
        env.setdefault("OMP_NUM_THREADS", str(intra))
        env.setdefault("MKL_NUM_THREADS", str(intra))
        proc = WorkerProcess(spec, self._watch_r, env)
        w = _Worker(m, instance, identity, proc)
        w.outputs = np.frombuffer(proc.responses.flat.numpy(), dtype=np.uint8)
        m.workers.append(w)
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
            timeout = None
            if not self._started.is_set():
                timeout = max(0.0, self._start_deadline - time.monotonic())
                if timeout == 0.0:
                    self._start_failed_timeout()
                    return
            if self._stop_at is not None:
                if self._drained() or time.monotonic() >= self._stop_at:
                    return
                timeout = max(0.0, self._stop_at - time.monotonic())
            self._idle = True
            # A call that arrived while we were busy came without a wake-up: do not sleep.
            wait_ms = None if timeout is None else int(timeout * 1000) + 1
            events = [] if self.inbox else self._poller.poll(wait_ms)
            self._idle = False
            if self.inbox:
                self._on_inbox()
            for target, _ in events:
                if target is sock:
                    self._on_messages(sock)
                elif target == self._wake_fd:
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

    def _drained(self) -> bool:
        return not self.inbox and all(
            not m.queue and not any(w.inflight for w in m.workers) for m in self.models.values()
        )

    def _on_inbox(self) -> None:
        touched = set()
        inbox = self.inbox
        while inbox:
            call = inbox.popleft()
            call.model.queue.append(call)
            touched.add(call.model.name)
        for name in touched:
            self._dispatch(self.models[name])

    def _dispatch(self, m: _Model) -> None:
        if self.released:
            self._collect_releases()
        limit = self.options.max_inflight
        queue = m.queue
        workers = m.workers
        n = len(workers)
        while queue:
            # Least-loaded ready worker; ties go round-robin (scanning from the one after
            # the last choice), so that even sequential traffic reaches every instance.
            best = None
            for k in range(n):
                w = workers[(m.next + k) % n]
                if (
                    w.state == _READY
                    and len(w.inflight) < limit
                    and (best is None or len(w.inflight) < len(best.inflight))
                ):
                    best = w
            if best is None:
                if not any(w.state in (_READY, _STARTING) for w in m.workers):
                    self._fail_queue(m)
                return
            call = queue.popleft()
            if not call.future.set_running_or_notify_cancel():
                call.free()  # cancelled while queued
                continue
            m.next = (workers.index(best) + 1) % n
            releases, best.releases = best.releases, []
            header = wire.encode(wire.Request(call.id, call.descs, releases, call.blobs))
            best.inflight[call.id] = call
            try:
                send(self._sock, header, call.frames, identity=best.identity)  # type: ignore[arg-type]
            except zmq.ZMQError as e:  # the worker went away between its exit and our noticing
                best.inflight.pop(call.id, None)
                call.fail(WorkerDiedError(m.name, best.instance, best.proc.pid, best.proc.reap(), f"send failed: {e}"))
            call.frames = call.blobs = []  # sent (or copied by ZeroMQ); let the buffers go

    def _collect_releases(self) -> None:
        released = self.released
        while released:
            w, offset = released.popleft()
            if w.state == _READY:
                w.releases.append(offset)

    def _on_messages(self, sock: zmq.Socket) -> None:
        touched: set[str] = set()
        while True:
            try:
                identity, header, frames = recv(sock, zmq.NOBLOCK, routed=True)
            except zmq.Again:
                break
            w = self._by_identity.get(identity)
            if w is None or not header:
                log.warning("dropped a message from an unknown peer")
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
            touched.add(w.model.name)
        for name in touched:
            self._dispatch(self.models[name])

    def _output_slot(self, w: _Worker, d: wire.TensorDesc) -> torch.Tensor:
        base = w.outputs
        assert base is not None
        nbytes = d.nbytes
        if d.where + nbytes > base.size:
            raise ValueError(f"output slot [{d.where}, {d.where + nbytes}) lies outside the response arena")
        tensor, owner = tensor_io.as_tensor(base[d.where : d.where + nbytes], wire.DTYPES[d.dtype], d.shape)
        # The slot is the caller's until the last tensor sharing its storage dies; then
        # its offset is queued and rides back to the worker on the next request.
        weakref.finalize(owner, self.released.append, (w, d.where)).atexit = False
        return tensor

    def _on_response(self, w: _Worker, msg: wire.Response, frames: list[zmq.Frame]) -> None:
        call = w.inflight.pop(msg.id, None)
        if call is None:
            log.warning("worker %s/%d answered unknown request %d", w.model.name, w.instance, msg.id)
            return
        w.served += 1
        call.free()
        try:
            outputs = tensor_io.read(msg.tensors, msg.blobs, frames, lambda d: self._output_slot(w, d))
        except ProtocolError as e:
            call.fail(e)
            return
        binder = w.model.binder
        assert binder is not None
        result = dict(zip(binder.output_names(len(outputs)), outputs))
        try:
            call.future.set_result(result)
        except Exception:
            pass  # resolved concurrently (cannot happen once running, but never kill the router)

    def _on_error(self, w: _Worker, msg: wire.Error) -> None:
        call = w.inflight.pop(msg.id, None)
        if call is None:
            log.warning("worker %s/%d reported %s: %s", w.model.name, w.instance, msg.error_type, msg.message)
            return
        w.served += 1
        exc: TorchRTError
        if msg.input_error:
            exc = InvalidInputError(w.model.name, None, "a well-formed request", msg.message)
        else:
            exc = ModelError(w.model.name, msg.error_type, msg.message, msg.traceback)
        call.fail(exc)

    def _on_ready(self, w: _Worker, msg: wire.Ready) -> None:
        if msg.protocol != wire.PROTOCOL_VERSION:
            self._start_error = WorkerStartError(
                w.model.name, w.instance, f"speaks protocol {msg.protocol}; this front speaks {wire.PROTOCOL_VERSION}"
            )
            self._started.set()
            return
        w.ready = msg
        w.state = _READY
        if w.model.binder is None:
            w.model.binder = Binder(w.model.cfg, msg.inputs)
        log.info("worker %s/%d ready (pid %d) with %s", w.model.name, w.instance, msg.pid, msg.flags)
        if all(x.state == _READY for m in self.models.values() for x in m.workers):
            self._started.set()

    def _on_failed(self, w: _Worker, msg: wire.Failed) -> None:
        text = f"{msg.error_type}: {msg.message}"
        if not self._started.is_set():
            self._start_error = WorkerStartError(w.model.name, w.instance, text, msg.traceback)
            self._started.set()
        else:
            log.error("worker %s/%d failed: %s", w.model.name, w.instance, text)

    def _on_stderr(self, w: _Worker) -> None:
        if not w.proc.read_stderr():
            self._poller.unregister(w.proc.stderr_fd)
            self._fd_handlers.pop(w.proc.stderr_fd, None)

    def _on_exit(self, w: _Worker) -> None:
        pidfd = w.proc.pidfd
        if pidfd is not None:
            self._poller.unregister(pidfd)
            self._fd_handlers.pop(pidfd, None)
        code = w.proc.wait(1.0)
        tail = w.proc.tail()
        stopping = self._stop_at is not None and w.state == _STOPPED
        w.state = _STOPPED if stopping else _DEAD
        if stopping:
            return
        log.error("worker %s/%d (pid %d) exited with %s", w.model.name, w.instance, w.proc.pid, code)
        if not self._started.is_set() and self._start_error is None:
            self._start_error = WorkerStartError(w.model.name, w.instance, f"the process exited with code {code}", tail)
            self._started.set()
        inflight, w.inflight = w.inflight, {}
        for call in inflight.values():
            call.fail(WorkerDiedError(w.model.name, w.instance, w.proc.pid, code, tail))
        self._dispatch(w.model)

    def _fail_queue(self, m: _Model) -> None:
        dead = [w for w in m.workers if w.state == _DEAD]
        w = dead[-1] if dead else None
        while m.queue:
            call = m.queue.popleft()
            if w is not None:
                call.fail(WorkerDiedError(m.name, w.instance, w.proc.pid, w.proc.returncode, w.proc.tail()))
            else:
                call.fail(PoolClosedError(f"model {m.name!r} has no worker left"))

    def _start_failed_timeout(self) -> None:
        slow = [w for m in self.models.values() for w in m.workers if w.state == _STARTING]
        w = slow[0]
        self._start_error = WorkerStartError(
            w.model.name,
            w.instance,
            f"not READY within start_timeout={self.options.start_timeout:.0f} s (raise it for slow-loading models)",
            w.proc.tail(),
        )
        self._started.set()

    def _fail_all(self, exc: BaseException) -> None:
        while self.inbox:
            self.inbox.popleft().fail(exc)
        for m in self.models.values():
            while m.queue:
                m.queue.popleft().fail(exc)
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
            w.state = _STOPPED
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
            if w.state != _DEAD:
                w.state = _STOPPED
        self._close_resources()

    def _close_resources(self) -> None:
        for m in self.models.values():
            for w in m.workers:
                w.outputs = None
                w.proc.close()
            m.arena.close()
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        self._ctx.term()
        for fd in (self._wake_fd, self._watch_r, self._watch_w):
            if fd >= 0:
                os.close(fd)
        self._wake_fd = self._watch_r = self._watch_w = -1
        self._dir.close()
        # Calls submitted in the instant after the last check fail here.
        while self.inbox:
            self.inbox.popleft().fail(PoolClosedError("the pool is closed"))

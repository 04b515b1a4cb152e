"""The router thread: owns the ROUTER socket and sends calls to workers (front process).

::

    caller threads                         router thread                     workers
    ──────────────                         ─────────────                     ───────
    admission: bind + check inputs,
    copy tensors → model's request arena
    Call(future) ──► inbox ──(eventfd)──►  model's queue (FIFO | batcher |
                                           sequences); dispatch to the ──► DEALER (one per
                                           least-loaded ready worker         worker process)
                                           (≤ per_worker), or, for
                                           sequences, the one holding it
    future ◄── replies: outputs ◄───────── ROUTER ◄──────────────────────── reply: outputs in
    outputs alias the response arena;                                       its response arena
    dropping them frees the slot ──► released offsets ride on the next request to that worker

One thread waits on everything at once (``transport/loop.py``): the ROUTER socket, the
inbox's eventfd, each worker's ``pidfd`` (readable when it exits) and its stderr pipe,
so a dead worker is noticed the moment it dies and nothing sleep-polls. Only this
thread touches the socket and the records; callers only put calls in the inbox. Its
jobs are split: ``replies.py`` reads the socket, ``supervisor.py`` runs the workers'
lives, ``snapshots.py`` answers the read-only questions; this module is the loop,
the timers and dispatch.

Memory: each model has one request arena shared by its instances (callers copy inputs
into it before the worker is chosen); each worker has its own response arena. Both are
memfds created here, so a SIGKILL of any process leaves nothing behind.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import weakref
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from ..config.model import ModelConfig
from ..errors import (
    ConfigError,
    ModelError,
    ModelUnavailableError,
    PoolClosedError,
    TimeoutError,
    TorchRTError,
    UnknownModelError,
    WorkerStartError,
)
from ..info import ModelHealth, ModelStats, ModelStatus, WorkerInfo
from ..transport import lanes, wire
from ..transport import tensors as tensor_io
from ..transport.arena import Arena
from ..transport.channel import MAX_DATAGRAM
from ..transport.heldgil import HeldSocket, PyzmqSocket, held
from ..transport.lending import LendingAllocator
from ..transport.loop import Deadlines, Inbox, Loop
from ..transport.sockets import PrivateDir
from . import snapshots
from .batch import Batch
from .batcher import Batcher, Orderer
from .call import Call
from .compile_cache import CompileCache
from .control import ModelControl
from .copygate import CopyGate
from .fastlane import FastLane
from .gpu import DeviceBuffers
from .queues import Fifo
from .records import READY, _Model, _Slot, _Worker, gpu_index, shares_weights
from .replies import Replies
from .sequences import SequenceQueue
from .supervisor import Supervisor, declared_outputs

__all__ = ["Router", "RouterOptions"]

#: A request whose inline tensors are bigger than this goes over ZeroMQ, not by the
#: worker's channel (whose datagrams hold at most MAX_DATAGRAM bytes).
MAX_CHANNEL_BLOBS = 32 << 10
#: Response slots released to a worker per request (more wait for the next one).
MAX_RELEASES = 1024

log = logging.getLogger("libtorchrt")


@dataclass
class RouterOptions:
    """Tunables of the router (see ``Pool`` for their meaning)."""

    request_arena_bytes: int = 256 << 20
    response_arena_bytes: int = 64 << 20
    inline_threshold: int = tensor_io.DEFAULT_INLINE_THRESHOLD
    busy_poll_us: int = 0
    max_inflight: int = 4
    #: bytes of large inputs ``infer``/``infer_async`` callers may have copied ahead, per instance
    #: of a model (``copygate.py``); None: no bound
    max_inflight_bytes: int | None = 4 << 20
    #: caller threads a batch's replies wake at once at most (the hub's wake-up gate)
    wake_limit: int = 2
    start_timeout: float = 120.0
    #: Inductor's cache for PT2 workers: True (per user), a path, or False (per worker)
    compile_cache: bool | str | os.PathLike[str] = True
    #: "forkserver" (workers forked from a template process) or "spawn" (fresh ones)
    start_method: str = "forkserver"
    #: the CPUs the workers run on (``Pool(front_cpus=...)``); None: as the kernel places them
    worker_cpus: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        """Refuse the values ``Pool`` passes on that no part of the front could use.

        Raises:
            ValueError: naming the option, what it was and what is expected.
        """
        if not _count(self.busy_poll_us) or self.busy_poll_us > lanes.MAX_SPIN_US:
            raise ValueError(
                f"Pool: busy_poll_us is {self.busy_poll_us!r}; expected an integer from 0 (no busy polling) "
                f"to {lanes.MAX_SPIN_US} microseconds"
            )
        if not _count(self.wake_limit) or self.wake_limit > lanes.MAX_AWAKE:
            raise ValueError(
                f"Pool: wake_limit is {self.wake_limit!r}; expected an integer from 0 (wake them all) "
                f"to {lanes.MAX_AWAKE}"
            )
        if self.max_inflight_bytes is not None and (not _count(self.max_inflight_bytes) or self.max_inflight_bytes < 1):
            raise ValueError(
                f"Pool: max_inflight_bytes is {self.max_inflight_bytes!r}; expected a positive integer or None"
            )


def _count(value: object) -> bool:
    """Whether ``value`` is an integer >= 0 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _pending_call(ref: weakref.ref[Call]) -> bool:
    """A deadline still has something to do: its call lives and is not finished."""
    call = ref()
    return call is not None and not call.future.done()


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
        #: calls from callers' threads, and the eventfd that wakes this thread for them
        self.inbox: Inbox[Call] = Inbox()
        #: request deadlines, as weak references: a finished call (and its outputs)
        #: is not kept alive until its deadline
        self.deadlines: Deadlines[weakref.ref[Call]] = Deadlines(_pending_call)
        #: the poll over the socket, the inbox and every worker's pidfd and stderr
        self.loop = Loop()
        #: the private directory of the ipc:// endpoint, the context and the socket
        self._dir = PrivateDir()
        self.compile_cache = CompileCache(options.compile_cache, self._dir.path)
        self._ctx = zmq.Context(1)
        self.sock: zmq.Socket | None = None
        #: the same socket's sends and receives without letting go of the GIL
        self.held: HeldSocket | PyzmqSocket | None = None
        self.endpoint = ""
        #: CUDA buffers for CUDA tensors (made on first use)
        self.gpu = DeviceBuffers(options.request_arena_bytes, options.response_arena_bytes)
        #: the workers' lives (and the watch pipe); the socket's reader
        self.supervisor = Supervisor(self)
        self.replies = Replies(self)
        #: Pool.infer's way to CPU workers without this thread (fastlane.py)
        self.fast = FastLane(self, MAX_CHANNEL_BLOBS)
        #: models loaded, replaced and unloaded while the pool serves (control.py)
        self.control = ModelControl(self)
        self._ids = itertools.count(1)
        self._stop_at: float | None = None  # drain deadline, once stop() was called
        self.stopped = False
        #: the exception that stopped the router thread, if one did (a bug)
        self.failure: BaseException | None = None
        try:
            for cfg in configs:
                self._add_model(cfg)
        except BaseException:
            self._close_resources()
            raise
        self._thread = threading.Thread(target=self._run, name="libtorchrt-router", daemon=True)
        self._thread.start()

    def _add_model(self, cfg: ModelConfig) -> None:
        m = self.make_model(cfg)
        self.models[(cfg.name, cfg.version)] = m
        if cfg.name not in self.default or cfg.version > self.default[cfg.name].version:
            self.default[cfg.name] = m

    def make_model(self, cfg: ModelConfig) -> _Model:
        """A model version's record, its arena and queue made, served by nobody yet (the
        pool's start serves it; while the pool runs, ``control.py`` does)."""
        try:
            placements = cfg.placements()
            by_model = cfg.placed_by_model()
            unplaceable = None
        except ConfigError as e:  # (a GPU this machine lacks): this model only fails
            placements, by_model, unplaceable = [], [], e
        arena = Arena(self.options.request_arena_bytes, name=f"libtorchrt-{cfg.name}-v{cfg.version}-req")
        m = _Model(cfg, arena, LendingAllocator(arena, arena.size // 2))
        m.declared_outputs = declared_outputs(cfg)
        if shares_weights(cfg, placements):
            m.weights_fd = os.memfd_create(
                f"libtorchrt-{cfg.name}-v{cfg.version}-weights", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
            )
        if unplaceable is not None:
            m.failed, m.start_error = str(unplaceable), unplaceable
        m.slots = [_Slot(i, d, placed_by_model=p) for i, (d, p) in enumerate(zip(placements, by_model))]
        if self.options.max_inflight_bytes is not None:
            instances = max(1, len(m.slots))
            m.gate = CopyGate(cfg.name, instances * self.options.max_inflight_bytes, 2 * instances)
        m.gpus = tuple(sorted({g for g in map(gpu_index, placements) if g is not None}))
        # (string inputs are not batched yet: see docs/batching.md)
        db = cfg.dynamic_batching
        seq = cfg.sequence_batching
        if seq is not None:
            m.queue = SequenceQueue(m)
            if seq.preserve_ordering:
                m.orderer = Orderer()
        elif db is not None and cfg.max_batch_size > 0 and not any(spec.is_string for spec in cfg.inputs):
            m.queue = Batcher(m)
            if db.preserve_ordering:
                m.orderer = Orderer()
        else:
            m.queue = Fifo(cfg.name, self.options.max_inflight)
        self.fast.add_model(m)
        return m

    # ── called from caller threads ─────────────────────────────────────────────

    def wait_started(self, timeout: float) -> None:
        """Block until every model is loaded (all its workers READY) or failed.

        A model whose workers fail to start while the pool starts is marked failed
        (``statuses()`` says why) and the others are served.

        Raises:
            WorkerStartError: no model could be loaded (the first one's error), or
                the start did not finish in time.
        """
        supervisor = self.supervisor
        if not supervisor.started.wait(timeout):
            raise WorkerStartError("*", -1, f"workers did not start within {timeout:.0f} s")
        if supervisor.start_error is not None:
            raise supervisor.start_error

    def lookup(self, name: str, version: int | None = None) -> _Model:
        """The model serving ``name`` (its highest version unless ``version`` is given).

        Raises:
            UnknownModelError: no such model, or no such version of it.
        """
        m = self.default.get(name) if version is None else self.models.get((name, version))
        if m is None:
            versions = sorted(v for n, v in list(self.models) if n == name)  # (a copy: control.py changes it)
            raise UnknownModelError(name, sorted(self.default), version=version, versions=versions)
        return m

    def submit(self, call: Call) -> None:
        """Hand a call to the router thread (thread-safe).

        Raises:
            PoolClosedError: the router has stopped.
        """
        call.id = next(self._ids)
        if not self.inbox.put(call):
            call.free()
            raise PoolClosedError("the pool is closed")

    def lost(self, call: Call, w: _Worker) -> None:
        """Hand over a fast lane request that ``w`` may have been running when it died
        (thread-safe): it is re-sent or failed as the router's own would be.

        Raises:
            PoolClosedError: the router has stopped.
        """
        call.lost_on = w
        if not self.inbox.put(call):
            call.free()
            raise PoolClosedError("the pool is closed")

    def stop(self, grace: float, timeout: float) -> None:
        """Drain for up to ``grace`` seconds, stop the workers, release everything.

        Idempotent. Returns once the router thread has finished, or after ``timeout``.
        """
        if self._stop_at is None:
            self._stop_at = time.monotonic() + grace
        self.inbox.wake()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def stopping(self) -> bool:
        return self._stop_at is not None

    def next_id(self) -> int:
        return next(self._ids)

    def records(self) -> Collection[_Model]:
        """Every model record this router runs: those served, and those that a change of
        models is loading or retiring (``control.py``)."""
        extra = self.control.extra
        return [*self.models.values(), *extra] if extra else self.models.values()

    def pending(self) -> int:
        """Requests taken and not finished, all models together (approximate, any thread)."""
        total = len(self.inbox) + self.fast.pending()
        for m in list(self.records()):
            total += m.pending + sum(len(w.inflight) for w in m.workers)
            if m.gate is not None:
                total += m.gate.waiting  # (infer callers about to copy: a close drains them too)
        return total

    def workers(self) -> list[WorkerInfo]:
        return snapshots.workers(self.records(), self.fast.counts)

    def health(self) -> dict[str, ModelHealth]:
        return snapshots.health(self.models, self.default, self.stopped)

    def stats(self) -> list[ModelStats]:
        return snapshots.stats(self.models.values(), self.fast.queued)

    def statuses(self) -> list[ModelStatus]:
        return snapshots.statuses(self.models.values(), self.stopped)

    # ── the router thread ──────────────────────────────────────────────────────

    def _run(self) -> None:
        supervisor = self.supervisor
        try:
            self._open()
            supervisor.start()
            self._loop()
        except BaseException as e:  # a bug here must not leave callers waiting forever
            log.critical("libtorchrt router thread failed; the pool is closed", exc_info=True)
            self.failure = e
            if supervisor.start_error is None and not supervisor.started.is_set():
                supervisor.start_error = e if isinstance(e, TorchRTError) else WorkerStartError("*", -1, repr(e))
            self._fail_all(PoolClosedError(f"the pool's router thread failed: {e!r}"))
        finally:
            self._shutdown()
            supervisor.started.set()

    def _open(self) -> None:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a gone worker raises, not drops
        self.endpoint = self._dir.endpoint("router")
        sock.bind(self.endpoint)
        os.chmod(self.endpoint.removeprefix("ipc://"), 0o600)
        self.sock = sock
        self.held = held(sock)
        self.loop.watch(sock, self._on_replies)
        self.loop.watch(self.inbox.waker.fd, self._take_inbox)

    def _loop(self) -> None:
        while True:
            now = time.monotonic()
            self._run_timers(now)
            if self.supervisor.start_error is not None or self._finished(now):
                return
            self.loop.dispatch(self._wait_for_events(self._next_wake(now)))
            if self.supervisor.start_error is not None:
                return

    def _finished(self, now: float) -> bool:
        return self._stop_at is not None and (self._drained() or now >= self._stop_at)

    def _drained(self) -> bool:
        return (
            not self.inbox
            and not self.fast.pending()
            and all(not m.pending and not any(w.inflight for w in m.workers) for m in self.records())
            and not self._gated()
        )

    def _gated(self) -> bool:
        """Some ``infer`` or ``infer_async`` caller holds or waits for room in a copy gate (draining
        waits for it: it is a request about to be sent, or being answered)."""
        return any(m.gate is not None and not m.gate.idle for m in self.records())

    def _wait_for_events(self, wake: float | None) -> list[Any]:
        """Block until something happens or ``wake`` (monotonic) comes; the ready
        targets. With ``busy_poll_us``, poll without sleeping that long first while a
        reply is due (a thread that sleeps and wakes pays for it: see Pool)."""
        loop, inbox = self.loop, self.inbox
        spin = self.options.busy_poll_us
        if spin and any(w.inflight for m in self.models.values() for w in m.workers):
            until = time.perf_counter() + spin / 1e6
            while time.perf_counter() < until:
                targets = loop.wait(0.0, inbox)
                if targets:
                    return targets
        return loop.wait(None if wake is None else wake - time.monotonic(), inbox)

    def _next_wake(self, now: float) -> float | None:
        """The earliest moment something is due: a deadline, a batch, a restart, a timeout."""
        due: list[float] = []
        if self._stop_at is not None:
            due.append(self._stop_at)
            if self.fast.pending() or self._gated():  # (the hub's replies do not wake this thread)
                due.append(now + 0.002)
        deadline = self.deadlines.next()
        if deadline is not None:
            due.append(deadline)
        for m in self.records():
            wake = m.queue.wake_at()
            if wake is not None:
                due.append(wake)
        self.supervisor.next_wake(due)
        self.control.next_wake(due)
        return min(due) if due else None

    def _run_timers(self, now: float) -> None:
        self.control.run(now)  # (first: a failed load's workers are not restarted)
        for ref in self.deadlines.due(now):
            call = ref()
            if call is not None:
                self._expire(call)
        for m in self.records():
            wake = m.queue.wake_at()
            if wake is not None and wake <= now:
                self.dispatch(m)
        self.supervisor.run_timers(now, self._stop_at is not None)
        if self._stop_at is not None:  # (draining: closed loops' replies are read by nobody)
            self.fast.drop_closed_loops()

    def _expire(self, call: Call) -> None:
        """A request's deadline passed: fail it (and drop it, if it was not sent yet)."""
        if call.future.done():
            return
        exc = TimeoutError(f"model {call.model.name!r}: the request's deadline passed before it completed")
        if not call.dispatched:
            call.model.queue.remove(call)
            call.fail(exc)
        else:  # a worker is reading its tensors: free them when it answers or dies
            call.resolve_error(exc)

    def _take_inbox(self) -> None:
        touched = set()
        now = time.monotonic()  # (the calls taken together are queued at one moment)
        for call in self.inbox.take():
            m = call.model
            if call.lost_on is not None:
                self.supervisor.lost(call, now)
                touched.add(m)
                continue
            m.queue.add(call, now)
            if call.deadline is not None:
                self.deadlines.add(call.deadline, weakref.ref(call))
            touched.add(m)
        for m in touched:
            self.dispatch(m)

    def on_channel(self, w: _Worker) -> None:
        """Replies on ``w``'s channel."""
        self.replies.read_channel(w)
        self.dispatch(w.model)

    def _on_replies(self) -> None:
        for m in self.replies.read():
            self.dispatch(m)

    # ── dispatch ───────────────────────────────────────────────────────────────

    def dispatch(self, m: _Model) -> None:
        """Send ``m``'s waiting work to its ready workers, while they can take it."""
        if self.replies.released or self.gpu.released:
            self.replies.collect_releases()
        queue = m.queue
        if queue.pinned:
            queue.expire(time.monotonic())
        if not len(queue):
            return
        if m.failed is not None:
            self._fail_queued(m, ModelUnavailableError(m.name, m.failed, loaded=False))
            return
        if m.unavailable is not None and not any(w.state == READY for w in m.workers):
            self._fail_queued(m, ModelUnavailableError(m.name, m.unavailable))
            return
        limit = queue.per_worker
        now = time.monotonic()
        if queue.pinned:
            self._dispatch_pinned(m, limit, now)
            return
        while len(queue):
            best = self._least_loaded(m, limit, queue.head_device())
            if best is None:
                return  # a reply, a restart or a death will call us again
            call = queue.take(now)
            if call is None:
                return  # (a batch waits for more rows, at most its delay: see _next_wake)
            if call.device is not None and best.gpu != call.device:  # (its head was cancelled)
                best = self._least_loaded(m, limit, call.device)
                if best is None:
                    queue.requeue([call], now)
                    return
            if call.id == 0:  # a batch gets its id as it leaves
                call.id = next(self._ids)
            if not self._send(best, call):
                queue.requeue([call], now)
                return  # it waits for that worker to be idle (its reply calls us again)

    def _dispatch_pinned(self, m: _Model, limit: int, now: float) -> None:
        """Send each ready worker of ``m`` the units its queue keeps for it (sequence
        batching: a sequence's requests go to the instance that holds it)."""
        queue = m.queue
        for slot in m.slots:
            w = slot.worker
            while w is not None and w.state == READY and not w.doomed and len(w.inflight) < limit and not w.serial:
                unit = queue.take_for(w.instance, now)
                if unit is None:
                    break
                if unit.id == 0:
                    unit.id = next(self._ids)
                if not self._send(w, unit):
                    queue.requeue([unit], now)
                    break

    def _fail_queued(self, m: _Model, exc: TorchRTError) -> None:
        for call in m.queue.drain():
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
                and not w.serial
                and (device is None or w.gpu == device)
                and (best is None or len(w.inflight) < len(best.inflight))
            ):
                best = w
        if best is not None:
            m.next = (best.instance + 1) % n
        return best

    def _send(self, w: _Worker, call: Call) -> bool:
        """Send ``call`` to worker ``w`` (which records it as in flight); False if it
        must wait until ``w`` has nothing in flight.

        A request goes by ``w``'s channel (``transport/channel.py``) when it fits in
        one datagram, else over ZeroMQ; a worker gets requests by one way at a time, so
        it runs them in the order they were sent (the rule ``supervisor.py``'s re-send
        and the execution watchdog rely on): a request that must go over ZeroMQ waits
        for an idle worker, and nothing else is sent to that worker until it answers.
        """
        by_channel = w.channel is not None and not call.frames and sum(map(len, call.blobs)) <= MAX_CHANNEL_BLOBS
        if not by_channel and w.inflight:
            return False
        if len(w.releases) <= MAX_RELEASES:
            releases, w.releases = w.releases, []
        else:
            releases, w.releases = w.releases[:MAX_RELEASES], w.releases[MAX_RELEASES:]
        batch = call.member_rows if isinstance(call, Batch) else []
        if w.gpu is None:
            if call.sequences is None:
                header = wire.encode(wire.Request(call.id, call.descs, releases, call.blobs, batch=batch))
            else:
                rows, ids, forget = call.sequences
                msg = wire.Request(
                    call.id, call.descs, releases, call.blobs, batch=batch, sequence=rows, corrids=ids, forget=forget
                )
                header = wire.encode(msg)
            if by_channel and len(header) > MAX_DATAGRAM:
                by_channel = False
                if w.inflight:
                    w.releases = releases + w.releases
                    return False
        else:
            try:
                header = self._gpu_request(w, call, releases, batch)
            except Exception as e:  # e.g. no device memory left for its response buffer
                w.releases = releases + w.releases
                call.fail(ModelError(w.model.name, type(e).__name__, f"cannot set up CUDA buffers: {e}", ""))
                return True
        if not w.inflight:
            w.busy_since = time.monotonic()
        w.inflight[call.id] = call
        call.sent_ns = time.perf_counter_ns()
        try:
            if by_channel:
                assert w.channel is not None
                w.channel.send(header)
            else:
                w.serial = call.id
                assert self.held is not None
                self.held.send(w.identity, header, call.frames)
        except (zmq.ZMQError, OSError):
            # The worker went away between its exit and our noticing: the pidfd
            # event follows, and re-sends this call with the worker's others.
            pass
        return True

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
        if call.sequences is not None:
            msg.sequence, msg.corrids, msg.forget = call.sequences
        return wire.encode(msg)

    # ── shutdown ───────────────────────────────────────────────────────────────

    def _fail_all(self, exc: BaseException) -> None:
        for call in self.inbox.take():
            call.fail(exc)
        for m in self.records():
            self._fail_queued(m, exc)  # type: ignore[arg-type]
            for w in m.workers:
                inflight, w.inflight = w.inflight, {}
                for call in inflight.values():
                    call.fail(exc)

    def _shutdown(self) -> None:
        """Stop every worker in order and release every resource (router thread)."""
        self.stopped = True
        for m in self.records():
            if m.gate is not None:
                m.gate.close()  # (callers waiting to copy fail)
        self.fast.close()  # (its callers fail, as those of the calls below)
        for call in self.inbox.close():  # (later submits are refused)
            call.fail(PoolClosedError("the pool is closed"))
        self._fail_all(PoolClosedError("the pool was closed before this request completed"))
        self.supervisor.stop_workers()
        self._close_resources()

    def _close_resources(self) -> None:
        self.fast.close()
        self.control.close()  # (the changes not done fail; its records are closed below)
        self.supervisor.close()
        for m in self.records():
            m.arena.close()
            if m.weights_fd >= 0:
                os.close(m.weights_fd)
                m.weights_fd = -1
        self.gpu.close()  # after the workers, which map its buffers, are gone
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None
            self.held = None
        self._ctx.term()
        self.inbox.close()
        self._dir.close()

"""Models loaded, replaced and unloaded while the pool serves (front: the router thread).

::

    Pool.load(configs) / Pool.unload(name)         router thread
    ──────────────────────────────────────         ─────────────
    Load | Unload(future) ──► changes inbox ──────► load: a record per version, its workers
                              (eventfd)              spawned; callers do not see it yet
                                                        │ every worker READY (warmed up)
                                                        ▼
                                                     swap: the served index names the new
                                                     records; those they replace retire
                                                     unload: the index forgets the model's
                                                     records; they retire
    future.result() ◄──────────────────────────────  retiring: it takes the calls callers
                                                     looked up before the swap, drains its
                                                     queue and what its workers hold, then
                                                     SHUTDOWN; once every worker's exit is
                                                     seen, its arena and weights are closed

The router's served index (``Router.models`` and ``Router.default``) only ever names
records whose workers are ready, so a replacement drops no request: callers keep
getting the old records until the new ones can serve, and what the old ones took
finishes on them. Records that load or retire are the router's all the same
(``Router.records()``): the supervisor restarts their workers, runs their timers, and
stops them if the pool closes. A load fails as a whole, with the worker's error, if any
of its workers fails to start or warm up, or the load takes longer than
``start_timeout``; the model is then served as it was before.

Only the router thread touches the records: callers hand changes over in an
:class:`~..transport.loop.Inbox` of their own (a change is rare; a request's inbox is
not slowed down to look for one) and wait on the change's future.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import zmq

from ..config.model import ModelConfig
from ..errors import ModelUnavailableError, PoolClosedError, TorchRTError, WorkerStartError
from ..info import ModelStatus
from ..transport import wire
from ..transport.loop import Inbox
from ..transport.sockets import send
from .records import DEAD, READY, STOPPED, WARMING, _Model

if TYPE_CHECKING:
    from .router import Router

__all__ = ["LATE_CALLS_S", "STOP_S", "UNLOADED", "Load", "ModelControl", "Unload"]

log = logging.getLogger("libtorchrt")

#: How long a record keeps taking calls after it left the served index: a caller that
#: looked it up just before binds and copies its inputs into the record's arena, then
#: hands the call over; the record's workers must still be there to run it.
LATE_CALLS_S = 1.0
#: How long a retiring record's workers have to exit after SHUTDOWN (then SIGKILL).
STOP_S = 5.0
#: Why a retired record serves nothing (``_Model.failed``: its workers' exits are then
#: expected, and a call that still reaches it fails with this).
UNLOADED = "the model was unloaded"


@dataclass(eq=False)
class Load:
    """Serve ``configs`` (every version of model ``name``) instead of what is served."""

    name: str
    configs: list[ModelConfig]
    future: concurrent.futures.Future[None] = field(default_factory=concurrent.futures.Future)


@dataclass(eq=False)
class Unload:
    """Stop serving model ``name``; what it took finishes, for up to ``grace`` seconds."""

    name: str
    grace: float | None = None
    future: concurrent.futures.Future[None] = field(default_factory=concurrent.futures.Future)


@dataclass(eq=False)
class _Loading:
    change: Load
    records: list[_Model]
    deadline: float


@dataclass(eq=False)
class _Waiter:
    """A future resolved once ``left`` retiring records are gone (with ``error`` if set)."""

    future: concurrent.futures.Future[None]
    left: int
    error: BaseException | None = None


@dataclass(eq=False)
class _Retiring:
    record: _Model
    #: until then it takes the calls callers looked up before it left the index
    late_until: float
    #: past it, what it still holds fails (None: it drains, however long it takes)
    drain_until: float | None
    waiter: _Waiter | None
    #: SHUTDOWN was sent to its workers; those alive at ``kill_at`` are killed
    stopping: bool = False
    kill_at: float = 0.0


class ModelControl:
    """Applies :class:`Load` and :class:`Unload` changes in the router thread."""

    def __init__(self, router: Router) -> None:
        self.router = router
        #: changes from callers' threads, and the eventfd that wakes the router for them
        self.inbox: Inbox[Load | Unload] = Inbox()
        #: records loading or retiring: the router's, outside its served index
        self.extra: list[_Model] = []
        self.loading: list[_Loading] = []
        self.retiring: list[_Retiring] = []
        router.loop.watch(self.inbox.waker.fd, self._take)

    # ── callers' threads ───────────────────────────────────────────────────────

    def submit(self, change: Load | Unload) -> None:
        """Hand ``change`` to the router thread (any thread); its future says how it went.

        Raises:
            PoolClosedError: the pool is closed.
        """
        if not self.inbox.put(change):
            raise PoolClosedError("the pool is closed")

    def statuses(self) -> list[ModelStatus]:
        """Model versions being loaded (whose name is not served yet) or unloaded (any thread)."""
        served = set(self.router.default)
        out = []
        for ld in list(self.loading):
            for m in ld.records:
                if m.name not in served:
                    ready = sum(w.state == READY for w in m.workers)
                    out.append(ModelStatus(m.name, m.version, "loading", None, ready, len(m.slots)))
        for r in list(self.retiring):
            m = r.record
            if r.waiter is not None and r.waiter.error is None and m.name not in served:
                out.append(ModelStatus(m.name, m.version, "unloading", None, 0, len(m.slots)))
        return out

    # ── the router thread ──────────────────────────────────────────────────────

    def _take(self) -> None:
        """The inbox's eventfd fired: apply every change waiting."""
        inbox = self.inbox
        inbox.woke(True)
        while True:
            for change in inbox.take():
                if isinstance(change, Load):
                    self._load(change)
                else:
                    self._unload(change)
            # (it publishes that the next change must wake us; one put meanwhile is seen)
            if inbox.may_sleep():
                return

    def next_wake(self, due: list[float]) -> None:
        """Add to ``due`` when a load times out or a retiring record moves on."""
        for ld in self.loading:
            due.append(ld.deadline)
        for r in self.retiring:
            if r.stopping:
                due.append(r.kill_at)
            else:
                due.append(r.late_until)
                if r.drain_until is not None:
                    due.append(r.drain_until)

    def run(self, now: float) -> None:
        """Move loads and retirements on (every turn of the router's loop)."""
        if self.loading:
            for ld in list(self.loading):
                self._check_load(ld, now)
        if self.retiring:
            for r in list(self.retiring):
                self._check_retiring(r, now)

    def close(self) -> None:
        """Fail the changes not done (the pool is closing; its records are stopped with
        the others). Idempotent."""
        router = self.router
        if router.loop.watching(self.inbox.waker.fd):
            router.loop.unwatch(self.inbox.waker.fd)
        closed = PoolClosedError("the pool was closed before the model was loaded or unloaded")
        for change in self.inbox.close():
            _settle(change.future, closed)
        for ld in self.loading:
            _settle(ld.change.future, closed)
        for r in self.retiring:
            if r.waiter is not None:
                _settle(r.waiter.future, r.waiter.error)
        self.loading = []

    # ── load ───────────────────────────────────────────────────────────────────

    def _load(self, change: Load) -> None:
        router = self.router
        if router.stopping:
            _settle(change.future, PoolClosedError("the pool is closing"))
            return
        records: list[_Model] = []
        try:
            for cfg in change.configs:
                records.append(router.make_model(cfg))
        except (OSError, TorchRTError) as e:
            for m in records:
                _close_record(m)
            _settle(change.future, e)
            return
        unplaceable = next((m for m in records if m.failed is not None), None)
        if unplaceable is not None:  # (a GPU this machine lacks)
            for m in records:
                _close_record(m)
            error = unplaceable.start_error or WorkerStartError(change.name, -1, unplaceable.failed or "")
            _settle(change.future, error)
            return
        self.extra += records
        ld = _Loading(change, records, time.monotonic() + router.options.start_timeout)
        self.loading.append(ld)
        log.info("loading model %s (versions %s)", change.name, [m.version for m in records])
        try:
            for m in records:
                for slot in m.slots:
                    router.supervisor.spawn(m, slot)
        except (OSError, TorchRTError) as e:
            self._abandon(ld, WorkerStartError(change.name, -1, f"cannot start its workers: {e}"))

    def _check_load(self, ld: _Loading, now: float) -> None:
        error: BaseException | None = None
        if self.router.stopping:
            error = PoolClosedError("the pool was closed while the model loaded")
        for m in ld.records:
            for slot in m.slots:
                w = slot.worker
                if error is None and (slot.start_failures or slot.restart_at is not None):
                    # A worker of a load that died before it was ready fails the load
                    # (the supervisor would retry it with backoff; a load says why now).
                    reason = slot.last_error or "its worker exited before it was ready"
                    error = WorkerStartError(m.name, slot.instance, reason, w.proc.tail() if w else "")
        slow = [w for m in ld.records for w in m.workers if w.state != READY]
        if error is None and not slow and all(s.worker is not None for m in ld.records for s in m.slots):
            self._commit(ld)
            return
        if error is None and now >= ld.deadline:
            what = "warm up" if any(w.state == WARMING for w in slow) else "load"
            w = slow[0] if slow else None
            error = WorkerStartError(
                ld.change.name,
                w.instance if w is not None else -1,
                f"did not {what} within start_timeout={self.router.options.start_timeout:g} s "
                "(raise it for slow-loading models)",
                w.proc.tail() if w is not None else "",
            )
        if error is not None:
            self._abandon(ld, error)

    def _commit(self, ld: _Loading) -> None:
        """Every worker of the load is ready: serve its records, retire what they replace."""
        router = self.router
        self.loading.remove(ld)
        name = ld.change.name
        before = [m for (n, _), m in list(router.models.items()) if n == name]
        for m in ld.records:
            router.models[(m.name, m.version)] = m
            self.extra.remove(m)
        for m in before:
            key = (m.name, m.version)
            if router.models.get(key) is m:  # a version no longer served
                del router.models[key]
        _set_default(router, name)
        now = time.monotonic()
        for m in before:
            self._retire(m, now, None, None)
        log.info("model %s loaded: versions %s", name, [m.version for m in ld.records])
        _settle(ld.change.future, None)

    def _abandon(self, ld: _Loading, error: BaseException) -> None:
        """The load failed: stop its workers; the model is served as it was."""
        if ld in self.loading:
            self.loading.remove(ld)
        log.error("model %s failed to load: %s", ld.change.name, str(error).split("\n", 1)[0])
        waiter = _Waiter(ld.change.future, len(ld.records), error)
        now = time.monotonic()
        for m in ld.records:
            m.failed = f"its load failed: {error}"
            self._retire(m, now, 0.0, waiter, late=False)

    # ── unload ─────────────────────────────────────────────────────────────────

    def _unload(self, change: Unload) -> None:
        router = self.router
        served = [m for (n, _), m in list(router.models.items()) if n == change.name]
        for m in served:
            del router.models[(m.name, m.version)]
        router.default.pop(change.name, None)
        if not served:
            _settle(change.future, None)
            return
        log.info("unloading model %s (versions %s)", change.name, [m.version for m in served])
        waiter = _Waiter(change.future, len(served))
        now = time.monotonic()
        for m in served:
            self._retire(m, now, change.grace, waiter)

    # ── retirement ─────────────────────────────────────────────────────────────

    def _retire(self, m: _Model, now: float, grace: float | None, waiter: _Waiter | None, late: bool = True) -> None:
        """``m`` left the served index (or never entered it): drain it, then stop it."""
        if m not in self.extra:
            self.extra.append(m)
        self.router.fast.drop_model(m)  # (its later requests go by this thread, which drains them)
        r = _Retiring(
            m,
            late_until=now + LATE_CALLS_S if late else now,
            drain_until=None if grace is None else now + grace,
            waiter=waiter,
        )
        self.retiring.append(r)
        self._check_retiring(r, now)

    def _check_retiring(self, r: _Retiring, now: float) -> None:
        m = r.record
        if not r.stopping:
            busy = (
                bool(m.pending)
                or any(not c.warmup for w in m.workers for c in w.inflight.values())
                or any(self.router.fast.inflight(w) for w in m.workers)
            )
            if now < r.late_until or (busy and (r.drain_until is None or now < r.drain_until)):
                return
            self._stop(r, now)
        alive = [w for w in m.workers if w.proc.pidfd is not None]
        if not alive:
            self._close(r)
        elif now >= r.kill_at:
            for w in alive:
                w.proc.kill()  # (its exit is an event; the supervisor drops it then)
            r.kill_at = now + STOP_S  # (in case the exit is not seen: kill again later)

    def _stop(self, r: _Retiring, now: float) -> None:
        """Fail what ``r`` still holds (its drain ran out), then ask its workers to exit."""
        m = r.record
        gone = ModelUnavailableError(m.name, "it was unloaded before this request completed", unloaded=True)
        for call in m.queue.drain():
            call.fail(gone)
        for w in m.workers:
            for call in w.inflight.values():
                if not call.warmup:
                    call.resolve_error(gone)  # (freed once the worker is gone: it may read them)
        m.failed = m.failed or UNLOADED  # its workers' exits are expected from now on
        router = self.router
        for slot in m.slots:
            slot.restart_at = None
        for w in m.workers:
            if w.proc.pidfd is None or w.state == DEAD:
                continue
            # A worker still running a request (its drain ran out: the request failed) or
            # not ready yet (maybe not connected) has nothing to finish: it is killed.
            idle = w.state == READY and not w.inflight
            w.state = STOPPED
            w.busy_since = None
            try:
                if not idle:
                    raise zmq.ZMQError()
                send(router.sock, wire.encode(wire.Shutdown()), identity=w.identity)  # type: ignore[arg-type]
            except (zmq.ZMQError, AttributeError, TypeError):
                w.proc.kill()
        r.stopping = True
        r.kill_at = now + STOP_S

    def _close(self, r: _Retiring) -> None:
        """Every worker of ``r`` has exited (and was dropped): release the record."""
        m = r.record
        self.retiring.remove(r)
        if m in self.extra:
            self.extra.remove(m)
        for w in m.workers:
            held, w.inflight = w.inflight, {}
            for call in held.values():
                call.free()
        _close_record(m)
        log.info("model %s version %d stopped", m.name, m.version)
        waiter = r.waiter
        if waiter is not None:
            waiter.left -= 1
            if waiter.left == 0:
                _settle(waiter.future, waiter.error)


def _set_default(router: Router, name: str) -> None:
    """The highest version of ``name`` served answers requests that name none."""
    versions = [m for (n, _), m in router.models.items() if n == name]
    if versions:
        router.default[name] = max(versions, key=lambda m: m.version)
    else:
        router.default.pop(name, None)


def _close_record(m: _Model) -> None:
    """Release a record's own memory (its workers are gone, or never started)."""
    m.arena.close()
    if m.weights_fd >= 0:
        os.close(m.weights_fd)
        m.weights_fd = -1


def _settle(future: concurrent.futures.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)

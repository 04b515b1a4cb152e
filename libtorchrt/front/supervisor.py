"""The worker processes' lives, seen from the front (router thread).

Spawn (a process per instance, forked from the pool's template process or a fresh
interpreter, never a fork of the caller's), READY (the protocol checked, the model's
inputs learnt), warm-up (the model's warm-up requests
run before it takes callers'), exit (what it held is re-sent or failed, see
``resend_or_fail``), restart with a backoff that grows while an instance keeps dying
before it is ready, a crash loop that makes the model unavailable, the execution
watchdog, and the pool's start (every model loaded or failed, within
``start_timeout``). Process mechanics live in ``workers/process.py`` and
``workers/launcher.py``; this is policy.

The template (``start_method="forkserver"``, the default) is started with the pool and
closed after its workers. Workers are forked from it once it is READY; the pool's start
waits for that (up to ``TEMPLATE_START_TIMEOUT``). A template that dies after it was
ready is restarted at once, without waiting for it: until the new one is READY,
replacements are started as fresh interpreters (slower, never blocked). One that dies
before it is ready is not restarted (it would fail again): the pool then starts every
worker fresh, as ``start_method="spawn"`` does, and says so in a warning.
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

from ..config.formats import PT2_FORMATS
from ..config.model import ModelConfig
from ..errors import ModelUnavailableError, TimeoutError, TorchRTError, WorkerDiedError, WorkerStartError
from ..transport import channel, wire
from ..transport import tensors as tensor_io
from ..transport.sockets import send
from ..workers.launcher import Template, TemplateError
from ..workers.outputs import DeclaredOutput
from ..workers.process import WorkerProcess
from ..workers.worker import WorkerSpec
from .binding import Binder, output_positions
from .call import Call
from .queues import Fifo
from .records import (
    BACKOFF_BASE,
    BACKOFF_MAX,
    CRASH_LOOP,
    DEAD,
    READY,
    STARTING,
    STOPPED,
    WARMING,
    _Model,
    _Slot,
    _Worker,
    gpu_index,
)
from .sequences import warmup_fields

if TYPE_CHECKING:
    from .router import Router

__all__ = ["START_METHODS", "TEMPLATE_START_TIMEOUT", "Supervisor", "declared_outputs"]

log = logging.getLogger("libtorchrt")

#: How workers are started: forked from a template process, or fresh interpreters.
START_METHODS = ("forkserver", "spawn")
#: The longest the pool's start waits for its template (then it spawns workers fresh).
TEMPLATE_START_TIMEOUT = 60.0
#: How long the exit of a worker that failed to start (exit code 1) waits for the FAILED
#: message it sent before it exited, which may still be crossing the front's ZeroMQ I/O
#: thread when its exit is seen (seconds).
FAILED_GRACE_S = 0.5


def declared_outputs(cfg: ModelConfig) -> list[list[Any]]:
    """The outputs each worker checks its results against (see workers/outputs.py)."""
    out = []
    for position, spec in output_positions(cfg.outputs):
        shape = spec.reshape if spec.reshape is not None else spec.dims
        dims = None if shape is None else tuple(shape)
        assert isinstance(spec.dtype, str)
        out.append(DeclaredOutput(position, spec.name, spec.dtype, dims, cfg.max_batch_size > 0).to_json())
    return out


class Supervisor:
    """Starts, watches, warms up and replaces the pool's workers (router thread)."""

    def __init__(self, router: Router) -> None:
        self.router = router
        #: set once every model is loaded or failed (or the start failed: start_error)
        self.started = threading.Event()
        self.start_error: BaseException | None = None
        self.start_deadline = 0.0
        #: every live worker by its ZeroMQ identity
        self.by_identity: dict[bytes, _Worker] = {}
        self._identities = itertools.count()
        # The watch pipe: workers exit when its write end (held only here) closes.
        self._watch_r, self._watch_w = os.pipe()
        #: the template process workers are forked from (None: spawn them fresh)
        self.template: Template | None = None

    # ── start ──────────────────────────────────────────────────────────────────

    def start(self) -> None:
        """Spawn every instance of every model (router thread, once)."""
        self.start_deadline = time.monotonic() + self.router.options.start_timeout
        if self.router.options.start_method == "forkserver":
            self._start_template()
            self._await_template()
            if self.router.stopping:
                return  # (closed while the template started: nothing to spawn)
        for m in self.router.models.values():
            for slot in m.slots:
                self.spawn(m, slot)
        self.check_started()  # (when no model has a worker to wait for)

    def spawn(self, m: _Model, slot: _Slot) -> None:
        router = self.router
        options = router.options
        identity = f"w{next(self._identities)}".encode()
        spec = WorkerSpec(
            model=m.name,
            instance=slot.instance,
            path=os.fspath(m.cfg.path),
            endpoint=router.endpoint,
            identity=identity.decode(),
            parameters={k: str(v) for k, v in m.cfg.parameters.items()},
            request_bytes=m.arena.size,
            response_bytes=options.response_arena_bytes,
            parent_pid=os.getpid(),
            device=slot.device,
            method=m.cfg.method,
            inline_threshold=options.inline_threshold,
            busy_poll_us=options.busy_poll_us,
            outputs=m.declared_outputs,
            format=m.cfg.format or "torchscript",
            max_batch_size=m.cfg.max_batch_size,
            input_names=[s.name for s in m.cfg.inputs],
            sequence=m.cfg.sequence_batching.to_json() if m.cfg.sequence_batching is not None else {},
            placed_by_model=slot.placed_by_model,
        )
        assert m.arena.fd is not None
        spec.request_fd = m.arena.fd
        if router.options.worker_cpus is not None:
            spec.cpus = list(router.options.worker_cpus)
        if slot.device == "cpu":
            spec.weights_fd = m.weights_fd
        env = dict(m.cfg.env)
        intra = m.cfg.flags.get("INTRA_OP_THREAD_COUNT") or 1
        env.setdefault("OMP_NUM_THREADS", str(intra))
        env.setdefault("MKL_NUM_THREADS", str(intra))
        if m.cfg.format in PT2_FORMATS:
            env.update(router.compile_cache.env(env, identity.decode()))
        # A CPU worker gets a request channel; a GPU worker's requests go over ZeroMQ.
        mine, theirs = channel.pair() if slot.device == "cpu" else (None, None)
        spec.channel_fd = theirs.fileno() if theirs is not None else -1
        # ... and a fast lane, if its model's requests can take one (fastlane.py).
        lane = router.fast.lane_for(m) if slot.device == "cpu" else None
        spec.lane_fd = lane[1].fileno() if lane is not None else -1
        template = self.template if self.template is not None and self.template.usable else None
        try:
            proc = WorkerProcess(spec, self._watch_r, env, template)
        except TemplateError as e:
            # The template broke after it got this request: whether it forked the worker
            # is unknown, so its identity and channel are not reused (a worker that was
            # forked after all is an unknown peer to the router, and exits with the pool).
            if mine is not None:
                mine.close()
            if lane is not None:
                lane[0].close()
            log.warning("worker %s/%d: %s; starting it fresh", m.name, slot.instance, e)
            self.spawn(m, slot)  # (the template is broken now: a fresh process)
            return
        except BaseException:
            if mine is not None:
                mine.close()
            if lane is not None:
                lane[0].close()
            raise
        finally:
            if theirs is not None:
                theirs.close()  # (the worker has its own copy now)
            if lane is not None:
                lane[1].close()
        w = _Worker(m, slot.instance, identity, proc, gpu=gpu_index(slot.device), shares_weights=spec.weights_fd >= 0)
        w.outputs = np.frombuffer(proc.responses.flat.numpy(), dtype=np.uint8)
        slot.worker = w
        slot.restart_at = None
        self.by_identity[identity] = w
        assert proc.pidfd is not None
        router.loop.watch(proc.pidfd, lambda: self.on_exit(w))
        router.loop.watch(proc.stderr_fd, lambda: self._on_stderr(w))
        if mine is not None:
            w.channel = mine
            router.loop.watch(mine.fd, lambda: router.on_channel(w))
        if lane is not None:
            w.lane_sock = lane[0]

    # ── the template ───────────────────────────────────────────────────────────

    def _start_template(self) -> None:
        """Start a template process; READY (or its death) is an event on its socket."""
        template = Template()
        try:
            template.start()
        except OSError as e:
            log.warning("could not start the template process (%s); workers are started fresh", e)
            return
        self.template = template
        self.router.loop.watch(template.fd, self._on_template)

    def _await_template(self) -> None:
        """Wait for the template's READY (the pool's start), but not past the start's
        limit, nor once the pool is being closed (the inbox's eventfd says so)."""
        template = self.template
        if template is None:
            return
        limit = min(TEMPLATE_START_TIMEOUT, self.router.options.start_timeout)
        deadline = time.monotonic() + limit
        waker = self.router.inbox.waker.fd
        watched = [template.fd, waker]
        while not template.ready:
            left = deadline - time.monotonic()
            if self.router.stopping:
                return
            if left <= 0:
                self._template_gone(f"not ready within {limit:g} s")
                return
            readable, _, _ = select.select(watched, [], [], left)
            if template.fd in readable:
                if not template.read_ready():
                    self._template_gone(template.broken or "gone")
                    return
            elif waker in readable and not self.router.stopping:
                watched.remove(waker)  # (a call, not a stop: the loop takes it later)

    def _on_template(self) -> None:
        """The template's socket is readable: it says READY, or it is gone."""
        template = self.template
        if template is not None and not template.read_ready():
            self._template_gone(template.broken or "gone")

    def _template_gone(self, why: str) -> None:
        """Close a dead template; start another unless it never became ready."""
        template = self.template
        if template is None:
            return
        was_ready = template.ready
        self.router.loop.unwatch(template.fd)
        template.close()
        self.template = None
        if self.router.stopping:
            return
        if was_ready:
            log.warning("the template process (pid %d) died: %s; starting another", template.pid, why)
            self._start_template()
        else:
            log.warning(
                "the template process (pid %d) failed to start: %s; workers are started fresh (start_method='spawn')",
                template.pid,
                why,
            )

    def check_started(self) -> None:
        """The pool has started once every model is loaded or failed."""
        if self.started.is_set():
            return
        models = list(self.router.models.values())
        if not all(m.failed is not None or all(w.state == READY for w in m.workers) for m in models):
            return
        if models and all(m.failed is not None for m in models):  # nothing to serve
            self.start_error = models[0].start_error
        self.started.set()

    def start_timed_out(self) -> None:
        """The start deadline passed: the models still loading fail to load."""
        for m in list(self.router.models.values()):
            slow = [w for w in m.workers if w.state != READY]
            if m.failed is None and slow:
                w = slow[0]
                what = "warm up" if w.state == WARMING else "load"
                self.model_failed(
                    m,
                    WorkerStartError(
                        m.name,
                        w.instance,
                        f"did not {what} within start_timeout={self.router.options.start_timeout:.0f} s "
                        "(raise it for slow-loading models)",
                        w.proc.tail(),
                    ),
                )
        self.check_started()

    def model_failed(self, m: _Model, error: WorkerStartError) -> None:
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
        for call in m.queue.drain():
            call.fail(ModelUnavailableError(m.name, m.failed, loaded=False))
        self.check_started()

    # ── messages from a starting worker ────────────────────────────────────────

    def on_ready(self, w: _Worker, msg: wire.Ready) -> None:
        if msg.protocol != wire.PROTOCOL_VERSION:
            self.start_error = WorkerStartError(
                w.model.name, w.instance, f"speaks protocol {msg.protocol}; this front speaks {wire.PROTOCOL_VERSION}"
            )
            self.started.set()
            return
        w.ready = msg
        m = w.model
        if m.binder is None:
            m.binder = Binder(m.cfg, msg.inputs, dict_input=msg.dict_input, output_names=msg.outputs)
            if msg.dict_input and not isinstance(m.queue, Fifo) and not len(m.queue):
                # a Dict[str, Tensor] model is not batched yet
                m.queue = Fifo(m.name, self.router.options.max_inflight)
                m.orderer = None
        if m.warmup is None:
            try:
                m.warmup = [m.binder.bind(sample) for sample in m.cfg.warmup_requests()]
            except TorchRTError as e:  # a warm-up sample the model cannot take
                self.warmup_failed(w, f"its warm-up requests do not fit the model: {e}", "")
                return
        if m.warmup:
            self._send_warmup(w, m.warmup)
        else:
            self._became_ready(w)

    def on_failed(self, w: _Worker, msg: wire.Failed) -> None:
        text = f"{msg.error_type}: {msg.message}"
        w.model.slots[w.instance].last_error = text
        w.explained = True
        if not self.started.is_set():
            self.model_failed(w.model, WorkerStartError(w.model.name, w.instance, text, msg.traceback))
        else:
            log.error("worker %s/%d failed to start: %s", w.model.name, w.instance, text)

    def _send_warmup(self, w: _Worker, samples: list[list[Any]]) -> None:
        """Run the model's warm-up requests on ``w`` before it takes any request."""
        m = w.model
        router = self.router
        w.state = WARMING
        w.warmup_left = len(samples)
        w.busy_since = time.monotonic()
        for tensors in samples:
            call = Call(m, tensor_io.write(tensors, m.arena, m.allocator, router.options.inline_threshold))
            call.id, call.warmup, call.dispatched = router.next_id(), True, True
            w.inflight[call.id] = call
            rows = len(tensors[0]) if m.cfg.max_batch_size > 0 and tensors and hasattr(tensors[0], "shape") else 1
            header = wire.encode(wire.Request(call.id, call.descs, [], call.blobs, **warmup_fields(m.cfg, rows)))
            try:
                send(router.sock, header, call.frames, identity=w.identity)  # type: ignore[arg-type]
            except zmq.ZMQError:
                return  # it is gone: its exit follows

    def warmed(self, w: _Worker, msg: wire.Response) -> None:
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

    def warmup_failed(self, w: _Worker, text: str, tb: str) -> None:
        """``w``'s warm-up failed: a start failure (the worker is stopped and replaced,
        or the model fails to load while the pool starts)."""
        w.served -= 1
        text = f"warm-up failed: {text}"
        w.model.slots[w.instance].last_error = text
        w.explained = True
        log.error("worker %s/%d %s", w.model.name, w.instance, text)
        if not self.started.is_set():
            self.model_failed(w.model, WorkerStartError(w.model.name, w.instance, text, tb))
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
        self.router.fast.ready(w)
        self.check_started()
        self.router.dispatch(m)

    # ── timers ─────────────────────────────────────────────────────────────────

    def next_wake(self, due: list[float]) -> None:
        """Add to ``due`` the moments this needs to act: the start deadline, restarts,
        and the execution watchdog's limits."""
        if not self.started.is_set():
            due.append(self.start_deadline)
        for m in self.router.records():
            limit = m.cfg.execution_timeout
            for s in m.slots:
                if s.restart_at is not None:
                    due.append(s.restart_at)
                w = s.worker
                if limit is not None and w is not None and w.busy_since is not None and not w.doomed:
                    due.append(w.busy_since + limit)

    def run_timers(self, now: float, stopping: bool) -> None:
        """Restart the instances whose backoff ran out (unless ``stopping``), and kill
        the workers whose execution took longer than their model's limit."""
        for m in self.router.records():
            limit = m.cfg.execution_timeout
            for s in m.slots:
                if s.restart_at is not None and s.restart_at <= now and not stopping:
                    self.spawn(m, s)
                w = s.worker
                if (
                    limit is not None
                    and w is not None
                    and w.busy_since is not None
                    and not w.doomed
                    and w.busy_since + limit <= now
                ):
                    self._execution_timed_out(w, limit)
        if not self.started.is_set() and now >= self.start_deadline:
            self.start_timed_out()

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

    # ── exit ───────────────────────────────────────────────────────────────────

    def _on_stderr(self, w: _Worker) -> None:
        if not w.proc.read_stderr():
            self.router.loop.unwatch(w.proc.stderr_fd)

    def on_exit(self, w: _Worker) -> None:
        """A worker exited: re-send or fail what it held, and schedule its restart."""
        router = self.router
        if w.proc.pidfd is not None:
            router.loop.unwatch(w.proc.pidfd)
        router.loop.unwatch(w.proc.stderr_fd)
        code = w.proc.wait(1.0)
        tail = w.proc.tail()
        # Replies it sent before dying may still wait in the sockets: take them first,
        # so an answered request is not run a second time (or blamed for the death).
        router.replies.read()
        if code == 1 and w.state == STARTING and not w.explained:
            self._await_reason(w)
        self._close_channel(w)
        router.fast.exited(w)  # (its lane's callers hear of it from the hub already)
        self.by_identity.pop(w.identity, None)
        m = w.model
        if (router.stopping or m.failed is not None) and w.state == STOPPED:
            self._drop_worker(w)
            return
        slot = m.slots[w.instance]
        was_ready = w.state == READY
        w.state = DEAD
        w.death = (code, tail)
        w.busy_since = None
        log.error("worker %s/%d (pid %d) exited with %s", m.name, w.instance, w.proc.pid, code)
        unshared = code == -signal.SIGSEGV and self._stop_sharing(w)
        if unshared:  # not its request's fault: re-sent without counting a try (each
            w.doomed = True  # sharing instance can fault once, its replacement does not)
        if not self.started.is_set() and self.start_error is None and not unshared:
            reason = slot.last_error or f"the process exited with code {code}"
            self.model_failed(m, WorkerStartError(m.name, w.instance, reason, tail))
            self._drop_worker(w)
            return
        m.queue.lost(w)  # (what cannot be re-sent elsewhere: its sequences)
        self._resend_or_fail(w, code, tail)
        # Replace it: a fresh process, after a backoff that grows while it keeps dying
        # before it is ready.
        if not w.explained:  # (a reason this worker gave, or the watchdog's, is kept)
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
            slot.last_error = f"worker {w.instance} (pid {w.proc.pid}) {how}" + (
                f": {tail.splitlines()[-1]}" if tail else ""
            )
        if not was_ready and not unshared:
            slot.start_failures += 1
        slot.restarts += 1
        delay = 0.0 if was_ready else min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (slot.start_failures - 1))
        slot.restart_at = time.monotonic() + delay
        self._drop_worker(w)
        if all(s.start_failures >= CRASH_LOOP for s in m.slots):
            m.unavailable = slot.last_error or f"exited with code {code}"
        router.dispatch(m)

    def _await_reason(self, w: _Worker) -> None:
        """Read messages until ``w``'s FAILED (why it could not start) has come, for at
        most FAILED_GRACE_S: a worker sends it, then exits with 1 (workers/worker.py)."""
        sock = self.router.sock
        deadline = time.monotonic() + FAILED_GRACE_S
        while not w.explained and sock is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(max(1, int(left * 1000)), zmq.POLLIN):
                return
            self.router.replies.read()

    def _stop_sharing(self, w: _Worker) -> bool:
        """``w`` died of SIGSEGV while mapping its model's read-only shared weights: the
        model writes into its weights (a counter in a buffer, running statistics).
        Unless sharing was asked for explicitly (then the fault is the protection it
        promises), its instances keep their own copy from now on: the replacement, and
        every sibling that faults the same way. Returns whether ``w`` died of that (its
        replacement then runs unshared; not a start failure).
        """
        m = w.model
        if not w.shares_weights or m.cfg.flags.get("ENABLE_WEIGHT_SHARING") is not None:
            return False
        if m.weights_fd < 0:  # a sibling faulted first
            return True
        os.close(m.weights_fd)  # (its workers keep their mappings; new ones get none)
        m.weights_fd = -1
        log.warning(
            "model %r: worker %d died of SIGSEGV with its weights shared read-only; the model writes into its "
            "weights, so its instances now keep their own copy (set ENABLE_WEIGHT_SHARING: false to start that "
            "way, or true to keep sharing and let such a worker die)",
            m.name,
            w.instance,
        )
        return True

    def _close_channel(self, w: _Worker) -> None:
        """Read what is left in ``w``'s channel, then close it."""
        if w.channel is None:
            return
        self.router.replies.read_channel(w)
        self.router.loop.unwatch(w.channel.fd)
        w.channel.close()
        w.channel = None
        w.serial = 0

    def _drop_worker(self, w: _Worker) -> None:
        """Release what the front holds for an exited worker."""
        for call in w.inflight.values():
            if call.warmup:
                call.free()
        w.inflight = {k: c for k, c in w.inflight.items() if not c.warmup}
        w.outputs = None
        w.proc.close()
        if w.gpu is not None:
            self.router.gpu.drop_worker(w.identity)

    def lost(self, call: Call, now: float) -> None:
        """A fast lane request that ``call.lost_on`` may have been running when it died
        (fastlane.py): it is decided with that worker's requests when its exit is seen,
        as the one it was running; or now, if its exit was seen already."""
        w, call.lost_on = call.lost_on, None
        m = w.model
        if w.death is None and w.state != STOPPED:  # (its exit is still to come)
            w.inflight = {call.id: call, **w.inflight}
            return
        code, tail = w.death or (None, "")
        if call.future.done():
            call.free()
        elif self._retry(w, call, code, tail):
            m.queue.requeue([call], now)

    def _retry(self, w: _Worker, call: Call, code: int | None, tail: str) -> bool:
        """Whether the request ``w`` was running when it died is sent again (else it
        fails): while it has retries left, and unless it has now been running in two
        workers that died (a poison request). A doomed worker's request did not run."""
        if w.doomed:
            return True
        m = w.model
        call.attempts += 1
        if call.attempts >= 2 or call.attempts > m.cfg.max_retries:
            call.fail(WorkerDiedError(m.name, w.instance, w.proc.pid, code, tail, poison=call.attempts >= 2))
            return False
        return True

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
            if i == 0 and not self._retry(w, call, code, tail):
                continue
            resend.append(call)
        m.queue.requeue(resend, time.monotonic())

    # ── stop ───────────────────────────────────────────────────────────────────

    def stop_workers(self) -> None:
        """Ask every live worker to exit, close the watch pipe, and wait for them
        (5 s in all; then they are killed)."""
        router = self.router
        models = list(router.records())
        live = [w for m in models for w in m.workers if w.proc.reap() is None]
        for w in live:
            w.state = STOPPED
            try:
                send(router.sock, wire.encode(wire.Shutdown()), identity=w.identity)  # type: ignore[arg-type]
            except (zmq.ZMQError, AttributeError, TypeError):
                pass  # not connected yet (or no socket): the watch pipe stops it
        # Closing the watch pipe's write end tells every worker, even one that never
        # connected, that the front is gone.
        if self._watch_w >= 0:
            os.close(self._watch_w)
            self._watch_w = -1
        deadline = time.monotonic() + 5.0
        for w in live:
            w.proc.stop(max(0.0, deadline - time.monotonic()))
        for m in models:
            for w in m.workers:
                if w.state != DEAD:
                    w.state = STOPPED

    def close(self) -> None:
        """Release every worker's handle, then the template (which knows how they
        ended) and the watch pipe (idempotent)."""
        for m in self.router.records():
            for w in m.workers:
                if w.channel is not None:
                    w.channel.close()
                    w.channel = None
                if w.lane_sock is not None:
                    w.lane_sock.close()
                    w.lane_sock = None
                w.outputs = None
                w.proc.close()
        if self.template is not None:
            self.router.loop.unwatch(self.template.fd)
            self.template.close()
            self.template = None
        for fd in (self._watch_r, self._watch_w):
            if fd >= 0:
                os.close(fd)
        self._watch_r = self._watch_w = -1

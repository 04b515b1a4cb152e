"""The worker process: one model instance, its flags, and its execution loop.

Runs in a fresh interpreter started by the front (``python -m libtorchrt.workers``),
or in a process forked from the pool's template process (``template.py``).
Start-up order matters: die with the parent first (so a front killed at any moment
leaves no orphan), then apply the execution-mode flags (TorchScript reads them when it
first compiles), then load the model and freeze / optimize it if its flags ask (a failure
is a start failure), then say READY with the flags read back from torch.

The loop is single-threaded and owns the DEALER socket, the request channel (a CPU
worker's socket pair with the front's router, ``transport/channel.py``) and the fast lane
(a second pair, with the front's native hub, ``transport/lanes.py``): receive a request
from any of them, view its inputs in the request arena (no copy), run the model, place the
outputs in the response arena (a CPU model makes its large ones there already, with
``ZERO_COPY_OUTPUTS``: ``transport/outheap.py``; the others are copied), reply the way
the request came. A model exception fails that request only.

String inputs arrive as ``list[str]`` and ``List[str]`` outputs go back as string
tensors; a method that takes one ``Dict[str, Tensor]`` is called with the request's keys
and tensors as that dictionary (see ``transport.wire``). Inputs whose kind (tensor or
strings) does not match the method's argument types are refused as the caller's error.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import zmq

from ..cpus import pin_process
from ..errors import ProtocolError
from ..transport import outheap, wire
from ..transport import tensors as tensor_io
from ..transport.arena import Allocator, Arena, Slots
from ..transport.channel import MAX_DATAGRAM
from ..transport.outheap import OutputHeap
from ..transport.sockets import OWNER_LOCK, recv, send
from . import batching, weights
from . import flags as flag_mod
from .formats import LoadRequest, Runner
from .formats import load as load_model
from .gpu import GpuSide
from .outputs import DeclaredOutput, check_outputs
from .sequences import SequenceSide

__all__ = ["WorkerSpec", "main"]

_PR_SET_PDEATHSIG = 1

#: Messages of CUDA errors after which the CUDA context cannot be trusted: the worker
#: reports the error for its request, then exits to be replaced by a fresh process.
STICKY_ERRORS = (
    "CUDA error",
    "device-side assert",
    "illegal memory access",
    "CUBLAS_STATUS_",
    "CUDNN_STATUS_",
    "cudaError",
)
#: Exit status of a worker that left because of a sticky error.
EXIT_STICKY = 3


def _sticky(e: BaseException) -> bool:
    """Whether ``e`` leaves the CUDA context untrustworthy (see STICKY_ERRORS)."""
    return any(marker in str(e) for marker in STICKY_ERRORS)


@dataclass
class WorkerSpec:
    """Everything a worker needs, passed on its command line as JSON."""

    model: str
    instance: int
    path: str
    endpoint: str
    identity: str
    parameters: dict[str, Any]
    request_bytes: int
    response_bytes: int
    parent_pid: int
    request_fd: int = -1
    response_fd: int = -1
    watch_fd: int = -1
    #: the worker's end of its request channel (transport/channel.py); -1: ZeroMQ only
    channel_fd: int = -1
    #: the worker's end of its fast lane (transport/lanes.py); -1: none
    lane_fd: int = -1
    #: the model's shared-weights memfd (workers/weights.py); -1: weights not shared
    weights_fd: int = -1
    device: str = "cpu"
    method: str = "forward"
    inline_threshold: int = tensor_io.DEFAULT_INLINE_THRESHOLD
    busy_poll_us: int = 0
    #: the declared outputs, checked on every result (DeclaredOutput.to_json items)
    outputs: list[list[Any]] = field(default_factory=list)
    #: the model's format (config/formats.py) and what its loader checks
    format: str = "torchscript"
    max_batch_size: int = 0
    input_names: list[str] = field(default_factory=list)
    #: the template process that forked this worker (set by the template); 0: the
    #: front started it as a fresh interpreter, and is its parent
    template_pid: int = 0
    #: a KIND_MODEL instance: the model is loaded where its file says (no map_location),
    #: its inputs come on the CPU (``device`` is "cpu") and its outputs go back from there
    placed_by_model: bool = False
    #: the model's sequence batching (``SequenceBatching.to_json()``); empty: none
    sequence: dict[str, Any] = field(default_factory=dict)
    #: the CPUs it runs on (``Pool(front_cpus=...)``: libtorchrt/cpus.py); empty: as started
    cpus: list[int] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    def fds(self) -> dict[str, int]:
        """The descriptors this spec names (every ``*_fd`` field that is set)."""
        return {k: v for k, v in self.__dict__.items() if k.endswith("_fd") and isinstance(v, int) and v >= 0}

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        return cls(**json.loads(text))


#: requests read from a socket pair in a row without polling the other sources
_GREEDY = 16
#: with busy polling, a worker that found two requests waiting one behind the other
#: sleeps at once until it has to wait for one, and for this long (seconds) after: the
#: front keeps it busy, and the CPUs have no time to spare (with one caller at a time,
#: the next request may be waiting already, never two)
_QUEUED_S = 0.01


def _wait(poller: zmq.Poller, spin: float) -> dict[Any, int]:
    """Wait for a message on the ZeroMQ socket or a socket pair; with ``spin`` (seconds),
    poll without sleeping that long first: a process that sleeps between requests wakes
    up slowly (see Pool's ``busy_poll_us``)."""
    if spin:
        deadline = time.perf_counter() + spin
        while time.perf_counter() < deadline:
            events = poller.poll(0)
            if events:
                return dict(events)
    return dict(poller.poll())


def _at_eof(fd: int) -> bool:
    try:
        readable, _, _ = select.select([fd], [], [], 0.05)
        return bool(readable) and os.read(fd, 1) == b""
    except OSError:
        return False


def _orphaned_exit(spec: WorkerSpec, front_gone: bool = False) -> None:
    """Leave at once; if the front is gone, remove its endpoint directory first.

    A front that closes its pool removes the directory itself; one that was killed
    cannot, so its workers do (any of them; the others find it gone). The watch pipe's
    EOF means the front is gone or shutting down, so removing is always safe then; a
    SIGTERM may come from anyone, so it counts only if that EOF is there too (the
    kernel closes a dying process's descriptors before it signals PR_SET_PDEATHSIG,
    and before it reparents the children, so getppid() cannot tell yet).
    """
    if front_gone or _at_eof(spec.watch_fd) or (not spec.template_pid and os.getppid() != spec.parent_pid):
        path = spec.endpoint.removeprefix("ipc://")
        with contextlib.suppress(OSError):
            os.unlink(path)
        with contextlib.suppress(OSError):  # (the dead front's lock: nobody holds it now)
            os.unlink(os.path.join(os.path.dirname(path), OWNER_LOCK))
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(path))
    os._exit(0)


def _die_with_parent(spec: WorkerSpec) -> None:
    """Exit when the front exits, however it exits.

    The watch pipe (whose only write end the front holds) reaches EOF when the front
    closes the pool or dies; PR_SET_PDEATHSIG (SIGTERM, handled) covers a main
    thread stuck in a model; getppid covers the window before prctl ran. Each path
    cleans the dead front's endpoint directory before exiting.

    A worker forked from the template (``template_pid``) is not the front's child: its
    parent's death is the template's, which must not end the pool's workers (see
    ``template.py``). It has the watch pipe, and the template, which dies with the
    front, SIGTERMs its workers as it goes.
    """
    signal.signal(signal.SIGTERM, lambda *_: _orphaned_exit(spec))
    if not spec.template_pid:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # not Linux; the watch pipe still works
        if os.getppid() != spec.parent_pid:
            _orphaned_exit(spec)

    def watch() -> None:
        try:
            while os.read(spec.watch_fd, 1):
                pass
        except OSError:
            pass
        # Do not ask getppid() here: the front's descriptors close before the kernel
        # reparents its children, so a dying front may still look like our parent.
        _orphaned_exit(spec, front_gone=True)

    threading.Thread(target=watch, name="libtorchrt-parent-watch", daemon=True).start()


def _is_strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(s, str) for s in value)


class _Worker:
    def __init__(self, spec: WorkerSpec, runner: Runner, sock: zmq.Socket, flags: flag_mod.Flags) -> None:
        self.spec = spec
        self.runner = runner
        self.run_model = runner.run
        #: rows a call must have at least (a PT2 artifact's batch range): fewer are padded
        self.min_rows = runner.batch_range[0] if runner.batch_range and spec.max_batch_size > 0 else 1
        self.sock = sock
        #: the request channel (None: requests come over ZeroMQ only), and whether the
        #: request being run came by it (its reply goes back the same way)
        self.channel = socket.socket(fileno=spec.channel_fd) if spec.channel_fd >= 0 else None
        #: the fast lane: the same datagrams, sent and read by the front's native hub
        self.lane = socket.socket(fileno=spec.lane_fd) if spec.lane_fd >= 0 else None
        #: the socket pair the request being run came by (its reply goes back by it);
        #: None: it came over ZeroMQ
        self._answer: socket.socket | None = None
        #: one receive buffer for the socket pairs' datagrams (a message is copied out of it)
        self._datagram = memoryview(bytearray(MAX_DATAGRAM + 1))
        self.requests = Arena(spec.request_bytes, fd=spec.request_fd)
        self.responses = Arena(spec.response_bytes, fd=spec.response_fd)
        #: the response arena as the model's heap (None: outputs are copied there)
        self.heap: OutputHeap | None = None
        #: why ZERO_COPY_OUTPUTS is off though asked for ("" if it is not)
        self.heap_note = ""
        if spec.device == "cpu" and flags.values.get("ZERO_COPY_OUTPUTS", True):
            self.heap, self.heap_note = outheap.install(self.responses)
        self.requests.close_fd()
        self.responses.close_fd()
        self.allocator: Slots = self.heap if self.heap is not None else Allocator(self.responses.size)
        self.clean_cache = bool(flags.get("ENABLE_CACHE_CLEANING")) and torch.cuda.is_available()
        #: the CUDA side of a GPU instance (None on the CPU)
        self.gpu = GpuSide(spec.device, self.requests, self.responses) if spec.device != "cpu" else None
        self.declared = [DeclaredOutput.from_json(item) for item in spec.outputs]
        #: the model's shared weights (their read-only mapping lives as long as this)
        self.shared: list[weights.Shared] = []
        #: control inputs and implicit state of a sequence-batching model (None: none)
        self.sequences = (
            SequenceSide(
                spec.sequence,
                runner.inputs,
                spec.input_names,
                runner.outputs,
                [d.name for d in self.declared],
                spec.max_batch_size > 0,
                runner.dict_input,
            )
            if spec.sequence
            else None
        )

    def _slot(self, d: wire.TensorDesc) -> torch.Tensor:
        return self.requests.view(d.where, d.nbytes, wire.DTYPES[d.dtype], d.shape)

    def _read(
        self, msg: wire.Request, frames: list[zmq.Frame], device_slot: Callable[[wire.TensorDesc], torch.Tensor] | None
    ) -> list[Any]:
        """A request's inputs; for a batch, one per argument holding every request's rows."""
        if msg.batch:
            return batching.gather(msg.tensors, msg.batch, msg.blobs, frames, self._slot, device_slot)
        return tensor_io.read(msg.tensors, msg.blobs, frames, self._slot, device_slot)

    def _inputs(self, msg: wire.Request, inputs: list[Any]) -> list[Any]:
        """A request's arguments: its inputs checked against the method's schema, with
        a sequence model's control and state inputs filled in (``sequences.py``)."""
        seq = self.sequences
        if seq is None:
            return self._arguments(inputs)
        seq.forget(msg.forget)
        if not msg.sequence:
            raise ProtocolError("a request for a sequence-batching model without its sequences")
        if seq.dict_input:
            return seq.arguments(self._arguments(inputs), msg.sequence, msg.corrids)
        return self._arguments(seq.arguments(inputs, msg.sequence, msg.corrids))

    def _outputs(self, msg: wire.Request, outputs: list[Any]) -> list[Any]:
        """What goes back: a sequence model's state outputs kept and taken out."""
        if self.sequences is not None:
            outputs = self.sequences.results(outputs, msg.sequence)
        if self.declared:
            check_outputs(outputs, self.declared)
        if msg.batch or (msg.sequence and self.spec.max_batch_size > 0):
            batching.check_rows(outputs, sum(msg.batch) if msg.batch else len(msg.sequence) // 2)
        return outputs

    def _arguments(self, inputs: list[Any]) -> list[Any]:
        """The method's arguments for a request's inputs, checked against its schema.

        Raises:
            ProtocolError: strings for a tensor argument or a tensor for a string one;
                for a ``Dict[str, Tensor]`` method, inputs that are not one tensor per
                key followed by the keys (distinct strings).
        """
        sig = self.runner
        if sig.dict_input:
            keys: Any = inputs[-1] if inputs else None
            values = inputs[:-1]
            if not _is_strings(keys) or len(keys) != len(values) or len(set(keys)) != len(keys):
                raise ProtocolError(
                    "a request for a Dict[str, Tensor] method must carry a tensor per key, then the keys (strings)"
                )
            for key, value in zip(keys, values):
                if not isinstance(value, torch.Tensor):
                    raise ProtocolError(f"input {key!r}: the method takes Dict[str, Tensor]; got strings")
            return [dict(zip(keys, values))]
        for name, kind, value in zip(sig.inputs, sig.kinds, inputs):
            if kind is not None and isinstance(value, torch.Tensor) != (kind == "tensor"):
                got = "a tensor" if isinstance(value, torch.Tensor) else f"{len(value)} strings"
                want = "a Tensor" if kind == "tensor" else "a List[str]"
                raise ProtocolError(f"input {name!r}: the method takes {want}; got {got}")
        return inputs

    def serve(self) -> int:
        """Serve requests until told to stop; return the process's exit status.

        Requests come by the fast lane, the channel or over ZeroMQ, one message at a
        time, each answered by the way it came. The router never has requests on its
        channel and over ZeroMQ at once (see its ``_send``); the lane's are the native
        hub's (``transport/lanes.py``), which the router does not count on the order of.

        After a request that came by a socket pair, the next one is looked for there
        first, without polling (a busy front keeps several in flight); every
        ``_GREEDY`` of them, the poll looks at every source, ZeroMQ first. With busy
        polling, the poll spins unless the front keeps this worker busy (``_QUEUED_S``):
        then it needs the CPU itself."""
        sock = self.sock
        spin = self.spec.busy_poll_us / 1e6
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        pairs = {s.fileno(): s for s in (self.lane, self.channel) if s is not None}
        for fd in pairs:
            poller.register(fd, zmq.POLLIN)
        greedy = 0
        # (busy polling stops while requests are found waiting one behind the other, until
        # one must be waited for, and for _QUEUED_S after the last one found so)
        crowded, crowded_at = False, -_QUEUED_S
        clock = time.perf_counter
        while True:
            frames: list[zmq.Frame] = []
            pair = self._answer
            if pair is not None and greedy < _GREEDY:
                greedy += 1
                events = {}
            else:
                greedy = 0
                idle = spin and not crowded and clock() - crowded_at >= _QUEUED_S
                events = _wait(poller, spin if idle else 0.0)
                # (ZeroMQ first: its control messages are not starved by busy pairs)
                pair = None if sock in events else next((pairs[fd] for fd in pairs if fd in events), None)
            if pair is not None:
                try:
                    n = pair.recv_into(self._datagram, 0, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    greedy = _GREEDY  # (nothing waits there: poll)
                    continue
                if spin:
                    if greedy > 1:  # (the second in a row that was there already)
                        crowded, crowded_at = True, clock()
                    elif not greedy:  # (it was waited for)
                        crowded = False
                if not n:  # the front closed it: it is gone (the watch pipe says so too)
                    if pair.fileno() in pairs:
                        poller.unregister(pair.fileno())
                        del pairs[pair.fileno()]
                    self._answer = None
                    continue
                header = bytes(self._datagram[:n])
                self._answer = pair
            elif sock in events:
                _, header, frames = recv(sock)
                self._answer = None
            else:
                continue
            try:
                msg = wire.decode(header)
            except ProtocolError as e:
                self._send_error(wire.request_id(header), e)
                continue
            if isinstance(msg, wire.Request):
                self._release(msg.releases)
                if not self._run(msg, frames):
                    return EXIT_STICKY
            elif isinstance(msg, wire.Batch) and self._answer is self.lane and self.lane is not None:
                if not self._run_lane_batch(msg.requests, self.lane):
                    return EXIT_STICKY
            elif isinstance(msg, wire.Release):
                self._release(msg.offsets)
            elif isinstance(msg, wire.Shutdown):
                return 0
            else:
                self._send_error(-1, ProtocolError(f"unexpected {type(msg).__name__} message"))

    def _release(self, offsets: list[int], unknown: int = 0) -> None:
        for offset in offsets:
            try:
                self.allocator.free(offset)
            except ValueError:
                unknown += 1
        if unknown:  # one line, however many: a hostile peer cannot flood the log
            print(f"libtorchrt worker: ignored the release of {unknown} unknown slot(s)", file=sys.stderr)

    def _run(self, msg: wire.Request, frames: list[zmq.Frame]) -> bool:
        """Run one request; return False if this process must not go on."""
        if self.gpu is not None:
            return self._run_gpu(msg, frames, self.gpu)
        try:
            inputs = self._inputs(msg, self._read(msg, frames, None))
        except Exception as e:  # whatever a hostile descriptor provokes, answer it
            self._send_error(msg.id, e if isinstance(e, ProtocolError) else ProtocolError(f"bad request: {e!r}"))
            return True
        try:
            outputs = self._outputs(msg, self._call(inputs))
            placed = tensor_io.write(outputs, self.responses, self.allocator, self.spec.inline_threshold)
        except Exception as e:
            return self._failed(msg.id, e)
        self._reply(wire.encode(wire.Response(msg.id, placed.descs, placed.blobs)), placed.frames)
        return True

    def _run_lane_batch(self, requests: list[bytes], lane: socket.socket) -> bool:
        """Run a batch the front's hub formed (``wire.Batch``) as one execution, and
        answer each of its requests with its own rows (``wire.Replies``; see
        :func:`batching.join`). Return False if this process must not go on."""
        members: list[wire.Request] = []
        rows: list[int] = []
        replies: list[bytes] = []
        for raw in requests:
            try:
                msg = wire.decode(raw)
                if not isinstance(msg, wire.Request):
                    raise ProtocolError(f"a {type(msg).__name__} message in a batch")
                self._release(msg.releases)
                n = batching.member_rows(msg)
            except ProtocolError as e:
                replies.append(wire.encode(wire.Error(wire.request_id(raw), type(e).__name__, str(e), "", True)))
                continue
            members.append(msg)
            rows.append(n)
        ok = True
        if members:
            answers, ok = self._execute_batch(members, rows)
            replies += answers
        self._send_replies(replies, lane)
        if not ok:
            print("libtorchrt worker: exiting after a sticky CUDA error", file=sys.stderr)
        return ok

    def _execute_batch(self, members: list[wire.Request], rows: list[int]) -> tuple[list[bytes], bool]:
        """Each member's reply to one execution of their joined inputs, and whether this
        process may go on (not after a sticky error)."""
        joined = batching.join(members, rows)
        total = sum(rows)
        try:
            inputs = self._inputs(joined, self._read(joined, [], None))
        except Exception as e:
            err = e if isinstance(e, ProtocolError) else ProtocolError(f"bad request: {e!r}")
            return self._errors(members, err, total), True
        try:
            outputs = self._outputs(joined, self._call(inputs))
        except Exception as e:
            sticky = _sticky(e)
            return self._errors(members, e, total, traceback.format_exc(), sticky), not sticky
        return self._member_replies(members, rows, outputs, total), True

    def _errors(
        self, members: list[wire.Request], e: BaseException, total: int, tb: str = "", fatal: bool = False
    ) -> list[bytes]:
        """The same error for each member of a batch (the first says the batch's rows)."""
        input_error = isinstance(e, ProtocolError)
        name, text = type(e).__name__, str(e)
        return [
            wire.encode(wire.Error(m.id, name, text, tb, input_error, fatal, total if i == 0 else 0))
            for i, m in enumerate(members)
        ]

    def _member_replies(
        self, members: list[wire.Request], rows: list[int], outputs: list[Any], total: int
    ) -> list[bytes]:
        """Each member's reply: its rows of every output, written as its own (copied
        into its own response slots, or inline), so each caller frees its own."""
        replies = []
        start = 0
        for i, (m, n) in enumerate(zip(members, rows)):
            mine = [batching.rows_of(o, start, start + n) for o in outputs]
            start += n
            try:
                placed = tensor_io.write(mine, self.responses, self.allocator, self.spec.inline_threshold)
            except Exception as e:
                replies.append(wire.encode(wire.Error(m.id, type(e).__name__, str(e), traceback.format_exc())))
                continue
            header = wire.encode(wire.Response(m.id, placed.descs, placed.blobs, total if i == 0 else 0))
            if placed.frames:  # (the arena is full: this one goes over ZeroMQ, with its frames)
                send(self.sock, header, placed.frames, zero_copy=True)
            else:
                replies.append(header)
        return replies

    def _send_replies(self, replies: list[bytes], lane: socket.socket) -> None:
        """Send a batch's replies in as few lane datagrams as they fit (one too big for
        any goes over ZeroMQ)."""
        group: list[bytes] = []
        size = 8
        for reply in replies:
            if len(reply) + 16 > MAX_DATAGRAM:
                send(self.sock, reply, [], zero_copy=False)
                continue
            if size + len(reply) + 5 > MAX_DATAGRAM:
                lane.send(wire.encode(wire.Replies(group)))
                group, size = [], 8
            group.append(reply)
            size += len(reply) + 5
        if group:
            lane.send(wire.encode(wire.Replies(group)))

    def _call(self, inputs: list[Any]) -> list[Any]:
        """Run the model on one request's (or batch's) inputs.

        A PT2 artifact compiled for at least ``min_rows`` rows gets a smaller batch
        padded with copies of its last row, and the padding cut from the outputs."""
        if self.min_rows > 1 and inputs and isinstance(inputs[0], torch.Tensor) and 0 < len(inputs[0]) < self.min_rows:
            rows = len(inputs[0])
            pad = self.min_rows - rows
            padded = [
                torch.cat([t, t[-1:].expand(pad, *t.shape[1:])]) if isinstance(t, torch.Tensor) else t for t in inputs
            ]
            return [o[:rows] if isinstance(o, torch.Tensor) and o.dim() else o for o in self._run_model(padded)]
        return self._run_model(inputs)

    def _run_model(self, inputs: list[Any]) -> list[Any]:
        heap = self.heap
        if heap is None:
            return self.run_model(inputs)
        heap.enable(True)  # (its large tensors are made in the response arena)
        try:
            return self.run_model(inputs)
        finally:
            heap.enable(False)

    def _reply(self, header: bytes, frames: list[Any]) -> None:
        """Answer by the way the request came: the channel, unless the reply has data
        frames or is too big for it (then ZeroMQ, which the front reads as well)."""
        if self._answer is not None and not frames and len(header) <= MAX_DATAGRAM:
            self._answer.send(header)
        else:
            send(self.sock, header, frames, zero_copy=True)

    def _run_gpu(self, msg: wire.Request, frames: list[zmq.Frame], gpu: GpuSide) -> bool:
        """Run one request on this worker's GPU, on its own stream (see ``gpu.py``)."""
        try:
            with torch.cuda.stream(gpu.stream):
                gpu.open(msg.exports, msg.device_out)
                self._release([], gpu.release(msg.device_releases))
                if msg.device_in >= 0:
                    gpu.wait_inputs(msg.device_in)
                owners = iter(msg.device_ids)
                inputs = self._inputs(msg, self._read(msg, frames, lambda d: gpu.input_view(next(owners, -1), d)))
        except Exception as e:
            self._send_error(msg.id, e if isinstance(e, ProtocolError) else ProtocolError(f"bad request: {e!r}"))
            return True
        placed: tensor_io.Placed | None = None
        device_offsets: list[int] = []
        try:
            with torch.cuda.stream(gpu.stream):
                outputs = self._outputs(msg, self._call(gpu.to_device(inputs)))
                placed, device_offsets = gpu.place(
                    outputs, msg.device_out, self.responses, self.allocator, self.spec.inline_threshold
                )
            # The front frees this request's slots and reads its outputs on our reply.
            gpu.stream.synchronize()
            if self.clean_cache:
                torch.cuda.empty_cache()
        except Exception as e:
            with contextlib.suppress(Exception):  # queued kernels may still read the inputs
                gpu.stream.synchronize()
            if placed is not None:
                self._release(placed.offsets)
                gpu.release(device_offsets)
            return self._failed(msg.id, e)
        self._reply(wire.encode(wire.Response(msg.id, placed.descs, placed.blobs)), placed.frames)
        return True

    def _failed(self, req_id: int, e: Exception) -> bool:
        """Report a failed execution; return False if this process must not go on."""
        sticky = _sticky(e)
        self._send_error(req_id, e, traceback.format_exc(), fatal=sticky)
        if sticky:
            print(f"libtorchrt worker: exiting after a sticky CUDA error: {e}", file=sys.stderr)
        return not sticky

    def _send_error(self, req_id: int, e: BaseException, tb: str = "", fatal: bool = False) -> None:
        err = wire.Error(req_id, type(e).__name__, str(e), tb, isinstance(e, ProtocolError), fatal)
        self.sock.send(wire.encode(err))


def main(argv: list[str]) -> int:
    """Entry point of ``python -m libtorchrt.workers SPEC_JSON``."""
    spec = WorkerSpec.from_json(argv[0])
    if spec.cpus:  # (before ZeroMQ's and torch's threads start: they inherit it)
        pin_process(spec.cpus)
    _die_with_parent(spec)
    ctx = zmq.Context(1)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.setsockopt(zmq.IDENTITY, spec.identity.encode())
    sock.connect(spec.endpoint)
    try:
        try:
            if spec.device != "cpu":  # before anything touches CUDA: one context, on our GPU
                torch.cuda.set_device(torch.device(spec.device))
            fl = flag_mod.parse(spec.model, spec.parameters)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", RuntimeWarning)
                notes = flag_mod.apply(fl, cpu=spec.device == "cpu")
            for w in caught:
                print(f"libtorchrt worker {spec.model}/{spec.instance}: {w.message}", file=sys.stderr)
            shared: list[weights.Shared] = []

            def share(module: Any) -> None:
                shared.append(weights.share(module, spec.weights_fd, spec.model))

            runner = load_model(
                spec.format,
                LoadRequest(
                    path=spec.path,
                    model=spec.model,
                    device=spec.device,
                    method=spec.method,
                    flags=fl,
                    parameters=spec.parameters,
                    max_batch_size=spec.max_batch_size,
                    input_names=spec.input_names,
                    output_names=[d.name for d in map(DeclaredOutput.from_json, spec.outputs)],
                    on_weights=share if spec.weights_fd >= 0 else None,
                    placed_by_model=spec.placed_by_model,
                ),
            )
            if spec.weights_fd >= 0:  # the mapping, if any, stays; the descriptor is not needed
                os.close(spec.weights_fd)
            worker = _Worker(spec, runner, sock, fl)
            worker.shared = shared
            shared_bytes = sum(s.nbytes for s in shared)
            effective = flag_mod.effective(
                fl, runner.format, shared=shared_bytes > 0, zero_copy=worker.heap is not None
            )
        except Exception as e:
            failed = wire.Failed(wire.PROTOCOL_VERSION, os.getpid(), type(e).__name__, str(e), traceback.format_exc())
            sock.send(wire.encode(failed))
            return 1
        if worker.gpu is not None:
            notes += worker.gpu.notes
        notes += runner.notes
        if worker.heap_note:
            notes.append(worker.heap_note)
        for s in worker.shared:
            notes += s.notes
        if worker.shared:
            runner.info["shared_weight_bytes"] = shared_bytes
        batch = list(runner.batch_range) if runner.batch_range else []
        ready = wire.Ready(
            wire.PROTOCOL_VERSION,
            os.getpid(),
            effective,
            runner.inputs,
            spec.device,
            notes,
            runner.dict_input,
            runner.format,
            runner.outputs,
            batch,
            runner.info,
        )
        sock.send(wire.encode(ready))
        mode = torch.inference_mode if effective["INFERENCE_MODE"] else torch.no_grad
        try:
            with mode():
                return worker.serve()
        finally:
            for pair in (worker.channel, worker.lane):
                if pair is not None:
                    pair.close()
            if worker.gpu is not None:
                worker.gpu.close(worker.requests, worker.responses)
    finally:
        sock.close()
        ctx.term()

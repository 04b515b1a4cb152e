"""The front's records of models, instances and worker processes (front process).

Owned and mutated by the router thread only; other threads read single fields of them
(``Pool.workers()``, ``Pool.health()``), which is safe under the GIL.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config.model import ModelConfig
from ..transport import wire
from ..transport.arena import Arena
from ..transport.channel import Channel
from ..transport.lending import LendingAllocator
from ..workers.process import WorkerProcess
from .binding import Binder
from .call import Call
from .copygate import CopyGate
from .queues import RequestQueue
from .stats import Stats

if TYPE_CHECKING:
    from .batcher import Orderer

__all__ = ["BACKOFF_BASE", "BACKOFF_MAX", "CRASH_LOOP", "DEAD", "READY", "STARTING", "STOPPED", "WARMING", "gpu_index"]

#: Worker states (a worker is WARMING while it runs its model's warm-up requests).
STARTING, WARMING, READY, DEAD, STOPPED = "starting", "warming", "ready", "dead", "stopped"


@dataclass(eq=False)
class _Worker:
    """The front's record of one worker process (one model instance)."""

    model: _Model
    instance: int
    identity: bytes
    proc: WorkerProcess
    state: str = STARTING
    ready: wire.Ready | None = None
    #: requests sent to it and not answered, in the order it runs them
    inflight: dict[int, Call] = field(default_factory=dict)
    releases: list[int] = field(default_factory=list)
    served: int = 0
    #: it was given its model's shared-weights memfd (workers/weights.py)
    shares_weights: bool = False
    #: when the request at the head of ``inflight`` started running
    busy_since: float | None = None
    #: it will exit (sticky error, execution timeout): what it holds did not run
    doomed: bool = False
    #: its slot's last error already says why it is going (it reported a failure, its
    #: warm-up failed, or the watchdog killed it): its exit does not overwrite that
    explained: bool = False
    #: the response arena as a numpy byte array, the base of zero-copy outputs
    outputs: np.ndarray | None = None
    #: its GPU (None on the CPU)
    gpu: int | None = None
    #: ids of the front's CUDA buffers it has mapped
    mapped: set[int] = field(default_factory=set)
    #: slots of its CUDA response buffer the front is done with
    device_releases: list[int] = field(default_factory=list)
    #: warm-up requests it has still to answer before it is READY
    warmup_left: int = 0
    #: its request channel (transport/channel.py; None once it exited)
    channel: Channel | None = None
    #: the front's end of its fast lane until it is READY; then the lane's key in the
    #: pool's hub (0: none; front/fastlane.py)
    lane_sock: socket.socket | None = None
    lane_key: int = 0
    #: its exit code and the tail of its stderr, once its exit was seen
    death: tuple[int | None, str] | None = None
    #: the id of a request sent over ZeroMQ instead (data frames, a big header): until
    #: it is answered nothing else is sent, so the worker gets requests in order (0: none)
    serial: int = 0


def gpu_index(device: str) -> int | None:
    """The GPU number of ``"cuda:N"`` (None for ``"cpu"``)."""
    return int(device.partition(":")[2] or 0) if device.startswith("cuda") else None


@dataclass(eq=False)
class _Slot:
    """One instance of a model across restarts: its current worker and its history."""

    instance: int
    #: where its workers run: "cpu" or "cuda:N"
    device: str = "cpu"
    worker: _Worker | None = None
    #: a KIND_MODEL instance: its workers load the model where its file says
    placed_by_model: bool = False
    restarts: int = 0
    #: deaths in a row before the worker became ready (a crash loop when >= CRASH_LOOP)
    start_failures: int = 0
    last_error: str | None = None
    restart_at: float | None = None


@dataclass(eq=False)
class _Model:
    cfg: ModelConfig
    arena: Arena
    #: the request arena's slots, and the blocks lent to the application (Pool.empty)
    allocator: LendingAllocator
    slots: list[_Slot] = field(default_factory=list)
    #: its waiting requests: a Fifo, or the Batcher of dynamic batching (set by the router)
    queue: RequestQueue = field(init=False)
    binder: Binder | None = None
    next: int = 0  # where the next round-robin scan starts
    #: the last start-up error, while every instance is in a crash loop
    unavailable: str | None = None
    #: the GPUs its instances run on (empty: CPU only)
    gpus: tuple[int, ...] = ()
    #: its queue in the pool's hub, whose requests may take the fast lane (-1: none)
    lane: int = -1
    #: the hub forms its batches (dynamic batching on the fast lane)
    lane_batches: bool = False
    #: why it could not be loaded (its workers failed to start while the pool
    #: started); it then serves nothing and is not retried
    failed: str | None = None
    start_error: Exception | None = None
    #: the bound inputs of its warm-up requests (built at its first READY)
    warmup: list[list[Any]] | None = None
    stats: Stats = field(init=False)
    #: the order keeper of dynamic batching's preserve_ordering
    orderer: Orderer | None = None
    #: the bound on what its ``infer`` and ``infer_async`` callers copy ahead (None: none)
    gate: CopyGate | None = None
    #: its declared outputs, as its workers check every result against them
    declared_outputs: list[list[Any]] = field(default_factory=list)
    #: the memfd its CPU instances share their weights in (workers/weights.py; the
    #: router owns and closes it); -1: each instance keeps its own copy
    weights_fd: int = -1

    def __post_init__(self) -> None:
        self.stats = Stats(self.cfg.name, self.cfg.version)

    def ordered_skip(self, call: Call) -> None:
        if self.orderer is not None:
            self.orderer.skip(call)

    @property
    def pending(self) -> int:
        """Requests waiting for an instance."""
        return len(self.queue)

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def version(self) -> int:
        return self.cfg.version

    @property
    def workers(self) -> list[_Worker]:
        return [s.worker for s in self.slots if s.worker is not None]


#: Deaths before READY in a row after which an instance counts as failing to start.
CRASH_LOOP = 3
#: Restart backoff: 0.1 s, doubling per consecutive start failure, at most 5 s.
BACKOFF_BASE, BACKOFF_MAX = 0.1, 5.0


def shares_weights(cfg: ModelConfig, placements: Sequence[str]) -> bool:
    """Whether ``cfg``'s CPU instances share one copy of its weights.

    ``ENABLE_WEIGHT_SHARING`` says; unset, they do (docs/memory.md measures why), except
    for an AOTInductor package, whose weights live in its compiled library (asked for
    explicitly, its workers say so). GPU instances do not share (yet).
    """
    wanted = cfg.flags.get("ENABLE_WEIGHT_SHARING")
    if wanted is False or not any(p == "cpu" for p in placements):
        return False
    return wanted is True or cfg.format != "aoti"

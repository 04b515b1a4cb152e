"""Read-only snapshots of the pool's state, for callers (front)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["LATENCY_BUCKETS", "InstanceHealth", "ModelHealth", "ModelStats", "ModelStatus", "WorkerInfo"]

#: Upper bounds (seconds) of the request-latency histogram of :class:`ModelStats`.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(frozen=True)
class WorkerInfo:
    """One worker process, as ``Pool.workers()`` reports it.

    Attributes:
        model: the model it serves.
        instance: its instance number within the model (0-based).
        pid: its process id.
        device: the device it runs the model on (``"cpu"``).
        state: ``"starting"``, ``"ready"``, ``"dead"`` or ``"stopped"``.
        flags: the execution-mode flags read back from torch in the worker, e.g.
            ``{"DISABLE_OPTIMIZED_EXECUTION": True, "INTRA_OP_THREAD_COUNT": 1, ...}``.
        inputs: the model method's argument names.
        inflight: requests sent to it and not yet answered.
        served: requests it has answered (results and model errors).
        exitcode: its exit code once dead (negative: the signal that killed it).
        version: the model version it serves.
        cpus: the CPUs it may run on, read from the kernel (``Pool(front_cpus=...)``
            sets them); empty once it is dead.
    """

    model: str
    instance: int
    pid: int
    device: str
    state: str
    flags: dict[str, Any] = field(default_factory=dict)
    inputs: tuple[str, ...] = ()
    inflight: int = 0
    served: int = 0
    exitcode: int | None = None
    version: int = 1
    cpus: tuple[int, ...] = ()


@dataclass(frozen=True)
class InstanceHealth:
    """One instance of a model, as ``Pool.health()`` reports it.

    Attributes:
        instance: its instance number.
        pid: the current worker process (None between a death and the restart).
        state: ``"starting"``, ``"ready"``, ``"restarting"`` (died; a new process is
            due), ``"failed"`` (keeps dying before it is ready; still retried, with
            backoff) or ``"stopped"``.
        restarts: how many times a worker of this instance was replaced.
        last_error: why the last worker died or failed to start (None if none did).
    """

    instance: int
    pid: int | None
    state: str
    restarts: int = 0
    last_error: str | None = None


@dataclass(frozen=True)
class ModelHealth:
    """One model, as ``Pool.health()`` reports it.

    Attributes:
        model: its name.
        state: ``"ready"`` (at least one instance serves), ``"loading"``,
            ``"unavailable"`` (every instance keeps failing to start; requests fail
            fast with ``ModelUnavailableError``), ``"failed"`` (it could not be
            loaded when the pool started; it serves nothing) or ``"stopped"``.
        ready: instances ready now.
        instances: each instance's health.
        error: the last start-up error while unavailable or failed.
        queued: requests waiting for an instance.
        version: the model version.
    """

    model: str
    state: str
    ready: int
    instances: tuple[InstanceHealth, ...] = ()
    error: str | None = None
    queued: int = 0
    version: int = 1


@dataclass(frozen=True)
class ModelStatus:
    """One model version, as ``Pool.models()`` lists it.

    Attributes:
        name: the model's name.
        version: its version (None when its configuration could not be read).
        state: ``"ready"``, ``"loading"`` (its instances are starting or warming
            up), ``"unavailable"`` (its instances keep failing; retried),
            ``"failed"`` (it could not be loaded; not retried), ``"stopped"``, or
            ``"unloading"`` (``Pool.unload`` is draining it).
        error: why it failed or is unavailable (None otherwise).
        ready: instances ready now.
        instances: instances configured.
    """

    name: str
    version: int | None
    state: str
    error: str | None = None
    ready: int = 0
    instances: int = 0


@dataclass(frozen=True)
class ModelStats:
    """One model version's counters since the pool started, as ``Pool.stats()`` reports
    them (Triton's statistics, and the source of the server's metrics).

    Attributes:
        model: its name.
        version: its version.
        success: requests answered with outputs.
        failure: requests that failed (bad input, model error, worker died, timeout,
            unavailable, ...).
        inferences: items inferred: the rows of the batch dimension of each successful
            request when ``max_batch_size > 0``, else one per request (Triton's
            "inference count").
        executions: model executions (Triton's "execution count"): one per request, or
            per batch when requests are batched together.
        queue_ns: total time successful requests waited in the front for an instance.
        compute_ns: total time from sending successful requests to a worker to their
            replies (model execution plus the hand-over both ways).
        request_ns: total time of successful requests, from submit to outputs.
        batch_sizes: executions per batch size (rows executed together).
        latency: cumulative counts of successful requests whose latency was at most each
            bound of :data:`LATENCY_BUCKETS`, as ``((bound_s, count), ...)``; the last
            count is ``success``.
        pending: requests waiting for an instance now.
        sequences: a model with sequence batching: its sequences now (``active``:
            holding a slot, ``backlog``: waiting for one) and so far (``started``,
            ``ended`` by ``sequence_end``, ``idle_freed`` after
            ``max_sequence_idle_microseconds``, ``lost`` with their process);
            empty for other models.
    """

    model: str
    version: int
    success: int = 0
    failure: int = 0
    inferences: int = 0
    executions: int = 0
    queue_ns: int = 0
    compute_ns: int = 0
    request_ns: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    latency: tuple[tuple[float, int], ...] = ()
    pending: int = 0
    sequences: dict[str, int] = field(default_factory=dict)

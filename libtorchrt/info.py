"""Read-only snapshots of the pool's state, for callers (front)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["InstanceHealth", "ModelHealth", "ModelStatus", "WorkerInfo"]


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
            ``"failed"`` (it could not be loaded; not retried) or ``"stopped"``.
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

"""Read-only snapshots of the pool's state, for callers (front)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["WorkerInfo"]


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

"""What ``Pool.workers()``, ``health()``, ``models()`` and ``stats()`` report (any thread).

Read from the router's records without a lock: the router thread alone mutates them,
and these functions read single fields and copy lists first, which is safe under the GIL.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterable, Mapping

from ..info import InstanceHealth, ModelHealth, ModelStats, ModelStatus, WorkerInfo
from .records import CRASH_LOOP, DEAD, READY, STARTING, _Model, _Worker

__all__ = ["health", "model_state", "stats", "statuses", "workers"]


def _cpus(pid: int) -> tuple[int, ...]:
    """The CPUs process ``pid`` may run on (its main thread's); () if it is gone."""
    try:
        return tuple(sorted(os.sched_getaffinity(pid)))
    except OSError:
        return ()


def workers(models: Iterable[_Model], lane: Callable[[_Worker], tuple[int, int]]) -> list[WorkerInfo]:
    """Every current worker process (``lane``: a worker's fast lane requests in flight
    and served)."""
    out = []
    for m in list(models):
        for w in m.workers:
            ready = w.ready
            lane_inflight, lane_served = lane(w)
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
                    inflight=len(w.inflight) + lane_inflight,
                    served=w.served + lane_served,
                    exitcode=w.proc.returncode,
                    cpus=_cpus(w.proc.pid) if w.proc.returncode is None else (),
                )
            )
    return out


def health(
    models: Mapping[tuple[str, int], _Model], default: Mapping[str, _Model], stopped: bool
) -> dict[str, ModelHealth]:
    """Per model and instance: state, restarts, last error.

    Keyed by model name; a model served in several versions has one entry per
    version, keyed ``"name/version"``, and its name keys its default version.
    """
    out = {}
    counts = collections.Counter(name for name, _ in list(models))  # (a copy: models change while it runs)
    for (name, version), m in list(models.items()):
        found = model_health(m, stopped)
        if counts[name] == 1:
            out[name] = found
        else:
            out[f"{name}/{version}"] = found
            if default.get(name) is m:
                out[name] = found
    return out


def model_health(m: _Model, stopped: bool) -> ModelHealth:
    instances = []
    for s in list(m.slots):
        w = s.worker
        if stopped or m.failed is not None:
            state = "stopped"
        elif s.start_failures >= CRASH_LOOP:
            state = "failed"
        elif w is None and not s.restarts:  # (its first worker is not forked yet)
            state = STARTING
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
    state, error = model_state(m, ready, stopped)
    return ModelHealth(m.name, state, ready, tuple(instances), error, m.pending, m.version)


def model_state(m: _Model, ready: int, stopped: bool) -> tuple[str, str | None]:
    """A model's state (failed, stopped, ready, unavailable, loading) and why."""
    if m.failed is not None:
        return "failed", m.failed
    if stopped:
        return "stopped", None
    if ready:
        return "ready", None
    if m.unavailable is not None:
        return "unavailable", m.unavailable
    return "loading", None


def stats(models: Iterable[_Model], queued: Callable[[_Model], int]) -> list[ModelStats]:
    """Each model version's counters (``queued``: a model's requests waiting in the fast
    lane's hub, pending as those in its router queue are)."""
    return [m.stats.snapshot(m.pending + queued(m), m.queue.counts()) for m in list(models)]


def statuses(models: Iterable[_Model], stopped: bool) -> list[ModelStatus]:
    """Each model version served: its state and error."""
    out = []
    for m in list(models):
        ready = sum(1 for w in m.workers if w.state == READY)
        state, error = model_state(m, ready, stopped)
        out.append(ModelStatus(m.name, m.version, state, error, ready, len(m.slots)))
    return out

"""Prometheus metrics of the pool, served on ``--metrics`` (server process).

Nothing is counted here: at each scrape, :class:`PoolCollector` reads the pool's own
snapshots (``Pool.stats()``, ``Pool.health()``, ``Pool.models()`` and the request
arenas) and turns them into metric families, so a request is counted once, by the
pool, whichever front end (HTTP, ZeroMQ, Python) sent it. While the repository loads
there is no pool yet: the scrape then shows each model's state and its instances' from
the loading pool's health, and this process's own metrics.

Triton's metrics keep Triton's exact names and labels (``nv_inference_request_success``
with ``model`` and ``version``), so that dashboards and alerts written for Triton work
unchanged: its counters are written as Triton writes them, without the ``_total`` that
prometheus_client would append (:func:`render`). libtorchrt's own metrics follow
Prometheus' conventions (``libtorchrt_worker_restarts_total``). docs/server.md lists
every metric.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..front.pool import Pool
from ..info import ModelHealth, ModelStats, ModelStatus
from ._internals import arena_usage

__all__ = [
    "INSTANCE_STATES",
    "MODEL_STATES",
    "TRITON_COUNTERS",
    "PoolCollector",
    "Source",
    "TritonCounter",
    "build_metrics_app",
    "registry_for",
    "render",
]

#: every value of the ``state`` label of libtorchrt_model_state
MODEL_STATES = ("ready", "loading", "unavailable", "failed", "stopped")
#: every value of the ``state`` label of libtorchrt_instances
INSTANCE_STATES = ("starting", "warming", "ready", "restarting", "failed", "stopped")
_MV = ["model", "version"]

#: (Triton's name, help, ModelStats field, divisor): Triton's counters, read from
#: ``Pool.stats()``. Triton's compute_input and compute_output durations are not among
#: them: the pool measures the hand-over to a worker and back as one (compute_infer).
TRITON_COUNTERS = (
    ("nv_inference_request_success", "Number of successful inference requests, all batch sizes.", "success", 1),
    ("nv_inference_request_failure",
     "Number of failed inference requests, all batch sizes (bad input, model error, worker died, timeout, ...).",
     "failure", 1),
    ("nv_inference_count",
     "Number of inferences performed: batch rows of successful requests (1 per request without batching).",
     "inferences", 1),
    ("nv_inference_exec_count",
     "Number of model executions performed (one per request, or per batch of requests run together).",
     "executions", 1),
    ("nv_inference_request_duration_us",
     "Cumulative duration of successful inference requests, from arrival to outputs, in microseconds.",
     "request_ns", 1000),
    ("nv_inference_queue_duration_us",
     "Cumulative time successful inference requests waited for an instance, in microseconds.", "queue_ns", 1000),
    ("nv_inference_compute_infer_duration_us",
     "Cumulative time from handing successful requests to a worker to their replies (execution and "
     "transfers), in microseconds.", "compute_ns", 1000),
)  # fmt: skip

Snapshot = Callable[[], dict[str, ModelHealth]]


class Source(Protocol):
    """What the metrics are read from: the pool once it exists (``http.ServerState``)."""

    @property
    def pool(self) -> Pool | None:
        """The pool; None while the repository loads."""

    @property
    def starting(self) -> Snapshot | None:
        """While the pool loads: each model's health, once the pool's router exists."""


class TritonCounter(Metric):
    """A counter family written under its exact name, as Triton writes it: the family
    and its samples are ``name``, not ``name_total`` (see :func:`render`)."""

    def __init__(self, name: str, documentation: str, labels: list[str]) -> None:
        super().__init__(name, documentation, "counter")
        self._labels = labels

    def add_metric(self, values: list[str], value: float) -> None:
        self.add_sample(self.name, dict(zip(self._labels, values)), value)


def _label(version: int | None) -> str:
    return "" if version is None else str(version)


def _histogram(stats: list[ModelStats]) -> Metric:
    family = HistogramMetricFamily(
        "libtorchrt_inference_request_duration_seconds",
        "Latency of successful requests, from arrival to outputs.",
        labels=_MV,
    )
    for s in stats:
        buckets: list[tuple[str, float]] = [(repr(float(b)), float(n)) for b, n in s.latency if not math.isinf(b)]
        buckets.append(("+Inf", float(s.success)))
        family.add_metric([s.model, str(s.version)], buckets, s.request_ns / 1e9)
    return family


class PoolCollector(Collector):
    """Metric families built from one pool's snapshots at each scrape.

    Args:
        source: where to find the pool once it exists (while the repository loads,
            only the models' and instances' states are shown).
    """

    def __init__(self, source: Source) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        pool = self.source.pool
        if pool is None:
            snapshot = self.source.starting
            health = list(snapshot().values()) if snapshot is not None else []
            seen = {(h.model, h.version): h for h in health}  # (a default version is listed twice)
            statuses = [ModelStatus(h.model, h.version, h.state) for _, h in sorted(seen.items())]
            yield from self._states(statuses, list(seen.values()))
            return
        stats_of = getattr(pool, "stats", None)  # Pool.stats() is newer than this module
        if stats_of is not None:
            stats: list[ModelStats] = list(stats_of())
            for name, text, attr, divisor in TRITON_COUNTERS:
                counter = TritonCounter(name, text, _MV)
                for s in stats:
                    counter.add_metric([s.model, str(s.version)], getattr(s, attr) // divisor)
                yield counter
            yield _histogram(stats)
            pending = GaugeMetricFamily(
                "nv_inference_pending_request_count", "Instantaneous number of requests waiting for an instance.",
                labels=_MV,
            )  # fmt: skip
            for s in stats:
                pending.add_metric([s.model, str(s.version)], s.pending)
            yield pending
            yield from _sequences(stats)
        yield from self._states(pool.models(), list(pool.health().values()))
        inflight = GaugeMetricFamily(
            "libtorchrt_inflight_requests", "Requests sent to the model's workers and not answered yet.", labels=_MV
        )
        sent: dict[tuple[str, int], int] = {}
        for w in pool.workers():
            sent[(w.model, w.version)] = sent.get((w.model, w.version), 0) + w.inflight
        for (model, version), n in sorted(sent.items()):
            inflight.add_metric([model, str(version)], n)
        yield inflight
        usage = arena_usage(pool)
        in_use = GaugeMetricFamily(
            "libtorchrt_arena_bytes_in_use", "Bytes of the model's request arena (shared memory) in use.", labels=_MV
        )
        size = GaugeMetricFamily("libtorchrt_arena_bytes", "Size of the model's request arena.", labels=_MV)
        for a in usage:
            in_use.add_metric([a.model, str(a.version)], a.used)
            size.add_metric([a.model, str(a.version)], a.size)
        yield in_use
        yield size

    def _states(self, statuses: Iterable[ModelStatus], health: Iterable[ModelHealth]) -> Iterator[Metric]:
        model_state = GaugeMetricFamily(
            "libtorchrt_model_state",
            "1 for the model version's current state, 0 for the others.",
            labels=[*_MV, "state"],
        )
        for s in statuses:
            for state in MODEL_STATES:
                model_state.add_metric([s.name, _label(s.version), state], 1.0 if s.state == state else 0.0)
        yield model_state
        by_version: dict[tuple[str, int], ModelHealth] = {(h.model, h.version): h for h in health}
        instances = GaugeMetricFamily(
            "libtorchrt_instances", "Instances (worker processes) of the model version in each state.",
            labels=[*_MV, "state"],
        )  # fmt: skip
        restarts = CounterMetricFamily(
            "libtorchrt_worker_restarts", "Times a worker of the instance was replaced.", labels=[*_MV, "instance"]
        )
        for (model, version), h in sorted(by_version.items()):
            labels = [model, str(version)]
            for state in INSTANCE_STATES:
                instances.add_metric([*labels, state], sum(i.state == state for i in h.instances))
            for i in h.instances:
                restarts.add_metric([*labels, str(i.instance)], i.restarts)
        yield instances
        yield restarts


def _sequences(stats: list[ModelStats]) -> Iterator[Metric]:
    """Sequence batching: sequences now, per state, and ended so far, per way."""
    seq = [s for s in stats if s.sequences]
    if not seq:
        return
    now = GaugeMetricFamily(
        "libtorchrt_sequences", "Sequences of a sequence-batching model now: holding a slot, or in the backlog.",
        labels=[*_MV, "state"],
    )  # fmt: skip
    done = TritonCounter(
        "libtorchrt_sequences_ended", "Sequences ended so far: by sequence_end, freed idle, or lost with their worker.",
        [*_MV, "how"],
    )  # fmt: skip
    for s in seq:
        labels = [s.model, str(s.version)]
        for state in ("active", "backlog"):
            now.add_metric([*labels, state], s.sequences.get(state, 0))
        for how in ("ended", "idle_freed", "lost"):
            done.add_metric([*labels, how], s.sequences.get(how, 0))
    yield now
    yield done


def registry_for(source: Source) -> CollectorRegistry:
    """A registry holding the pool's metrics and this process's (memory, CPU, fds).
    Write it out with :func:`render` (``generate_latest`` would rename Triton's counters)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PoolCollector(source))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def _escape(value: str, quote: bool = True) -> str:
    text = value.replace("\\", r"\\").replace("\n", r"\n")
    return text.replace('"', r"\"") if quote else text


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _exact(family: Metric) -> str:
    name = family.name
    lines = [f"# HELP {name} {_escape(family.documentation, quote=False)}", f"# TYPE {name} {family.type}"]
    for s in family.samples:
        labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(s.labels.items()))
        lines.append(f"{s.name}{{{labels}}} {_number(s.value)}" if labels else f"{s.name} {_number(s.value)}")
    return "\n".join(lines) + "\n"


def render(registry: CollectorRegistry) -> bytes:
    """The registry's metrics in Prometheus' text format (0.0.4), collected once:
    each :class:`TritonCounter` under its exact name, the others as prometheus_client
    writes them."""
    families = list(registry.collect())
    exact = "".join(_exact(f) for f in families if isinstance(f, TritonCounter))
    rest = _Families([f for f in families if not isinstance(f, TritonCounter)])
    return exact.encode() + generate_latest(rest)


def build_metrics_app(source: Source) -> Any:
    """The ASGI application of the metrics endpoint: ``GET /metrics`` (read-only; it
    takes no token, as Prometheus scrapes it: bind it where only monitoring reaches it).
    It answers from the moment the server listens: while the repository loads, with the
    models' loading states."""
    registry = registry_for(source)

    async def metrics(request: Request) -> Response:
        body = await run_in_threadpool(render, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/metrics", metrics, methods=["GET"])])

"""Prometheus metrics of the pool, served on ``--metrics`` (server process).

Nothing is counted here: at each scrape, :class:`PoolCollector` reads the pool's own
snapshots (``Pool.stats()``, ``Pool.health()``, ``Pool.models()`` and the request
arenas) and turns them into metric families, so a request is counted once, by the
pool, whichever front end (HTTP, ZeroMQ, Python) sent it. Names follow Triton's where
the meaning is the same (``nv_inference_request_success``, ...); Prometheus counters
carry the ``_total`` suffix. docs/server.md lists every metric.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

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

from ..info import ModelHealth, ModelStats
from ..pool import Pool
from ._internals import arena_usage

__all__ = ["INSTANCE_STATES", "MODEL_STATES", "PoolCollector", "build_metrics_app", "registry_for"]

#: every value of the ``state`` label of libtorchrt_model_state
MODEL_STATES = ("ready", "loading", "unavailable", "failed", "stopped")
#: every value of the ``state`` label of libtorchrt_instances
INSTANCE_STATES = ("starting", "warming", "ready", "restarting", "failed", "stopped")
_MV = ["model", "version"]

#: (name, help, ModelStats field, scale): counters read from ``Pool.stats()``
COUNTERS = (
    ("nv_inference_request_success", "Requests answered with outputs.", "success", 1),
    ("nv_inference_request_failure", "Requests that failed (bad input, model error, worker died, timeout, ...).",
     "failure", 1),
    ("nv_inference_count", "Items inferred: batch rows of successful requests (1 per request without batching).",
     "inferences", 1),
    ("nv_inference_exec_count", "Model executions (one per request, or per batch of requests run together).",
     "executions", 1),
    ("nv_inference_request_duration_us", "Total time of successful requests, from arrival to outputs, in µs.",
     "request_ns", 1e-3),
    ("nv_inference_queue_duration_us", "Total time successful requests waited for an instance, in µs.",
     "queue_ns", 1e-3),
    ("nv_inference_compute_infer_duration_us",
     "Total time from handing successful requests to a worker to their replies (execution and transfers), in µs.",
     "compute_ns", 1e-3),
)  # fmt: skip


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
    """Metric families built from one pool's snapshots at each scrape."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        pool = self.pool
        stats_of = getattr(pool, "stats", None)  # Pool.stats() is newer than this module
        if stats_of is not None:
            stats: list[ModelStats] = list(stats_of())
            for name, text, attr, scale in COUNTERS:
                counter = CounterMetricFamily(name, text, labels=_MV)
                for s in stats:
                    counter.add_metric([s.model, str(s.version)], getattr(s, attr) * scale)
                yield counter
            yield _histogram(stats)
            pending = GaugeMetricFamily(
                "nv_inference_pending_request_count", "Requests waiting for an instance now.", labels=_MV
            )
            for s in stats:
                pending.add_metric([s.model, str(s.version)], s.pending)
            yield pending
        yield from self._states(pool)
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

    def _states(self, pool: Pool) -> Iterator[Metric]:
        model_state = GaugeMetricFamily(
            "libtorchrt_model_state",
            "1 for the model version's current state, 0 for the others.",
            labels=[*_MV, "state"],
        )
        for s in pool.models():
            for state in MODEL_STATES:
                model_state.add_metric([s.name, _label(s.version), state], 1.0 if s.state == state else 0.0)
        yield model_state
        health: dict[tuple[str, int], ModelHealth] = {(h.model, h.version): h for h in pool.health().values()}
        instances = GaugeMetricFamily(
            "libtorchrt_instances", "Instances (worker processes) of the model version in each state.",
            labels=[*_MV, "state"],
        )  # fmt: skip
        restarts = CounterMetricFamily(
            "libtorchrt_worker_restarts", "Times a worker of the instance was replaced.", labels=[*_MV, "instance"]
        )
        for (model, version), h in sorted(health.items()):
            labels = [model, str(version)]
            for state in INSTANCE_STATES:
                instances.add_metric([*labels, state], sum(i.state == state for i in h.instances))
            for i in h.instances:
                restarts.add_metric([*labels, str(i.instance)], i.restarts)
        yield instances
        yield restarts


def registry_for(pool: Pool) -> CollectorRegistry:
    """A registry holding the pool's metrics and this process's (memory, CPU, fds)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PoolCollector(pool))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def build_metrics_app(pool: Pool) -> Any:
    """The ASGI application of the metrics endpoint: ``GET /metrics`` (read-only; it
    takes no token, as Prometheus scrapes it: bind it where only monitoring reaches it)."""
    registry = registry_for(pool)

    async def metrics(request: Request) -> Response:
        body = await run_in_threadpool(generate_latest, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/metrics", metrics, methods=["GET"])])

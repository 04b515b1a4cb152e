"""The server's Prometheus metrics and start-up progress, from fake pool snapshots."""

from __future__ import annotations

import io
import logging
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from libtorchrt.info import InstanceHealth, ModelHealth, ModelStats, ModelStatus, WorkerInfo
from libtorchrt.server.metrics import INSTANCE_STATES, MODEL_STATES, registry_for
from libtorchrt.server.progress import Progress


class FakePool:
    """What the collector reads: stats(), health(), models(), workers(), the arenas."""

    def __init__(self, with_stats: bool = True) -> None:
        if with_stats:
            self.stats = lambda: [
                ModelStats("m", 1, success=4, failure=1, inferences=8, executions=3, queue_ns=2_000, compute_ns=30_000,
                           request_ns=40_000, latency=((0.0001, 3), (0.00025, 4), (float("inf"), 4)), pending=2),
            ]  # fmt: skip
        a = ModelHealth("m", "ready", 1, (InstanceHealth(0, 11, "ready", 2), InstanceHealth(1, None, "restarting", 1)))
        self.health = lambda: {"m": a, "m/1": a}
        self.models = lambda: [ModelStatus("m", 1, "ready", None, 1, 2), ModelStatus("x", None, "failed", "bad")]
        self.workers = lambda: [WorkerInfo("m", 0, 11, "cpu", "ready", inflight=3)]
        model = SimpleNamespace(allocator=SimpleNamespace(used=4096), arena=SimpleNamespace(size=1 << 20))
        self._router = SimpleNamespace(models={("m", 1): model})


def scrape(pool: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry_for(pool)).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(values: dict[Any, float], name: str, **labels: str) -> float:
    return values[(name, tuple(sorted({"model": "m", "version": "1", **labels}.items())))]


def test_counters_histogram_and_gauges() -> None:
    v = scrape(FakePool())
    assert value(v, "nv_inference_request_success_total") == 4
    assert value(v, "nv_inference_request_failure_total") == 1
    assert value(v, "nv_inference_count_total") == 8
    assert value(v, "nv_inference_exec_count_total") == 3
    assert value(v, "nv_inference_queue_duration_us_total") == 2
    assert value(v, "nv_inference_compute_infer_duration_us_total") == 30
    assert value(v, "nv_inference_request_duration_us_total") == 40
    assert value(v, "libtorchrt_inference_request_duration_seconds_bucket", le="0.0001") == 3
    assert value(v, "libtorchrt_inference_request_duration_seconds_bucket", le="+Inf") == 4
    assert value(v, "libtorchrt_inference_request_duration_seconds_count") == 4
    assert value(v, "libtorchrt_inference_request_duration_seconds_sum") == pytest.approx(40e-6)
    assert value(v, "nv_inference_pending_request_count") == 2
    assert value(v, "libtorchrt_inflight_requests") == 3
    assert value(v, "libtorchrt_instances", state="ready") == 1
    assert value(v, "libtorchrt_instances", state="restarting") == 1
    assert sum(value(v, "libtorchrt_instances", state=s) for s in INSTANCE_STATES) == 2
    assert value(v, "libtorchrt_worker_restarts_total", instance="0") == 2
    assert value(v, "libtorchrt_arena_bytes_in_use") == 4096
    assert value(v, "libtorchrt_arena_bytes") == 1 << 20
    assert [value(v, "libtorchrt_model_state", state=s) for s in MODEL_STATES] == [1, 0, 0, 0, 0]
    assert v[("libtorchrt_model_state", (("model", "x"), ("state", "failed"), ("version", "")))] == 1


def test_a_pool_without_stats_still_has_its_state_metrics() -> None:
    v = scrape(FakePool(with_stats=False))
    assert not any(name.startswith("nv_inference_request") for name, _ in v)
    assert value(v, "libtorchrt_instances", state="ready") == 1


def _health(*states: str) -> dict[str, ModelHealth]:
    instances = tuple(InstanceHealth(i, 100 + i, s) for i, s in enumerate(states))
    return {"m": ModelHealth("m", "loading", 0, instances)}


def test_progress_logs_each_change_without_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    snapshots = iter([_health("starting", "starting"), _health("warming", "starting"), _health("ready", "ready")])
    current: list[dict[str, ModelHealth]] = [next(snapshots)]
    progress = Progress(io.StringIO(), tty=False, interval=3600)
    with caplog.at_level(logging.INFO, logger="libtorchrt.server"):
        progress._snapshot = lambda: current[0]
        progress._update()
        current[0] = next(snapshots)
        progress._update()
        progress._update()  # no change: no line
        current[0] = next(snapshots)
        progress._update()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "m v1 instance 0: loading (pid 100)",
        "m v1 instance 1: loading (pid 101)",
        "m v1 instance 0: warming up",
        lines[3],
        lines[4],
    ]
    assert lines[3].startswith("m v1 instance 0: ready after ") and lines[4].startswith("m v1 instance 1: ready")


def test_progress_draws_in_place_on_a_terminal() -> None:
    out = io.StringIO()
    progress = Progress(out, tty=True, interval=0.01)
    health = {"m": ModelHealth("m", "failed", 0, (InstanceHealth(0, 1, "warming"),), "it broke\nbadly")}
    progress.observe(lambda: health)
    progress.write_above("a log line")
    progress.close()
    text = out.getvalue()
    assert "warming up" in text and "m v1 failed: it broke" in text and "a log line" in text
    assert "\x1b[" in text  # redrawn in place

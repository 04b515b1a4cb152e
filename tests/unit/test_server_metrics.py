"""The server's Prometheus metrics and start-up progress, from fake pool snapshots:
Triton's metrics under Triton's exact names, the loading state before the pool exists."""

from __future__ import annotations

import io
import logging
import re
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from libtorchrt.info import InstanceHealth, ModelHealth, ModelStats, ModelStatus, WorkerInfo
from libtorchrt.server.metrics import INSTANCE_STATES, MODEL_STATES, TRITON_COUNTERS, registry_for, render
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


def text_of(pool: Any, starting: Any = None) -> str:
    """What GET /metrics answers, for a pool (None while it loads)."""
    return render(registry_for(SimpleNamespace(pool=pool, starting=starting))).decode()


def scrape(pool: Any, starting: Any = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples by name and labels. (prometheus_client's parser names a counter's samples
    ``<name>_total`` whatever the text says: the names as written are checked in
    test_tritons_metrics_have_tritons_exact_names.)"""
    text = text_of(pool, starting)
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


def test_tritons_metrics_have_tritons_exact_names() -> None:
    """As Triton writes them (docs/user_guide/metrics.md): counters without the _total
    that prometheus_client would append, labels model and version."""
    text = text_of(FakePool())
    expected = {
        "nv_inference_request_success": "4",
        "nv_inference_request_failure": "1",
        "nv_inference_count": "8",
        "nv_inference_exec_count": "3",
        "nv_inference_request_duration_us": "40",
        "nv_inference_queue_duration_us": "2",
        "nv_inference_compute_infer_duration_us": "30",
    }
    assert [name for name, *_ in TRITON_COUNTERS] == list(expected)
    for name, value in expected.items():
        assert f"# TYPE {name} counter\n" in text, name
        assert f'\n{name}{{model="m",version="1"}} {value}\n' in text, name
    assert "# TYPE nv_inference_pending_request_count gauge\n" in text
    assert '\nnv_inference_pending_request_count{model="m",version="1"} 2.0\n' in text
    assert not re.search(r"(?m)^nv_inference_\w+_total\b", text), "a Triton counter with _total"
    assert re.search(r"(?m)^libtorchrt_worker_restarts_total\{", text)  # ours: Prometheus' conventions


def test_label_values_are_escaped() -> None:
    pool = FakePool()
    pool.stats = lambda: [ModelStats('we"ird\\na\nme', 1, success=1)]
    text = text_of(pool)
    assert '\nnv_inference_request_success{model="we\\"ird\\\\na\\nme",version="1"} 1\n' in text
    families = {f.name: f for f in text_string_to_metric_families(text)}  # it parses
    assert families["nv_inference_request_success"].samples[0].labels["model"] == 'we"ird\\na\nme'


def test_while_the_pool_loads_the_models_states_are_shown() -> None:
    instances = (InstanceHealth(0, 100, "starting"), InstanceHealth(1, 101, "warming"))
    health = ModelHealth("m", "loading", 0, instances, version=1)
    v = scrape(None, lambda: {"m": health})
    assert [value(v, "libtorchrt_model_state", state=s) for s in MODEL_STATES] == [0, 1, 0, 0, 0]
    assert value(v, "libtorchrt_instances", state="starting") == 1
    assert value(v, "libtorchrt_instances", state="warming") == 1
    assert ("process_resident_memory_bytes", ()) in v
    assert not any(name.startswith("nv_inference") for name, _ in v)  # no counts before the pool counts
    before_the_router = scrape(None, None)  # the repository is being read: no model known yet
    assert ("process_resident_memory_bytes", ()) in before_the_router
    assert not any(name.startswith("libtorchrt_model_state") for name, _ in before_the_router)


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

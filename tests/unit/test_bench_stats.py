"""libtorchrt.bench: statistics against known samples, stability, throughput, and the
small pure helpers of the tool (no pool, no subprocess; the load generator runs on a
fake call)."""

from __future__ import annotations

import argparse
import gc
import math
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from libtorchrt.bench.cli import best_row, parameter_alternatives, parse_duration, settings_from
from libtorchrt.bench.inputs import InputError, InputSpec, make_inputs, parse_shape
from libtorchrt.bench.loadgen import MeasurementError, measure_count, measure_windows
from libtorchrt.bench.report import CSV_COLUMNS, Row, Table, condense
from libtorchrt.bench.stats import PERCENTILES, Window, is_stable, percentile, summarize, throughput
from libtorchrt.bench.sweep import parameter_grid, plan
from libtorchrt.bench.threads import bind_positional

# ── percentiles ────────────────────────────────────────────────────────────────


def test_percentile_of_one_to_ten_by_hand() -> None:
    values = list(range(1, 11))  # n = 10: index = floor(q/100 * 9 + 0.5)
    assert percentile(values, 50) == 6  # 4.5 rounds half up (numpy's "nearest" gives 5)
    assert percentile(values, 90) == 9  # 8.1 -> 8
    assert percentile(values, 95) == 10  # 8.55 -> 9
    assert percentile(values, 99) == 10  # 8.91 -> 9
    assert percentile(values, 0) == 1
    assert percentile(values, 100) == 10


def test_percentile_is_exact_on_zero_to_hundred() -> None:
    values = list(range(101))
    for q in (*PERCENTILES, 0, 1, 25, 75, 100):
        assert percentile(values, q) == q
        assert percentile(values, q) == np.percentile(values, q)


@pytest.mark.parametrize("n", [7, 100, 1000, 1001, 4999])
def test_percentile_matches_numpy_nearest_away_from_ties(n: int) -> None:
    rng = np.random.default_rng(n)
    values = np.sort(rng.exponential(300.0, size=n)).tolist()
    for q in PERCENTILES:
        position = q / 100 * (n - 1)
        if abs(position - math.floor(position) - 0.5) < 1e-9:
            continue  # a tie: perf_analyzer rounds half up, numpy to even
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q, method="nearest")))


def test_percentile_edge_cases() -> None:
    assert math.isnan(percentile([], 50))
    assert percentile([42.0], 99) == 42.0
    with pytest.raises(ValueError):
        percentile([1, 2], 101)
    with pytest.raises(ValueError):
        percentile([1, 2], -1)


# ── throughput and summaries ───────────────────────────────────────────────────


def test_throughput() -> None:
    assert throughput(300, 1.5) == (200.0, 200.0)
    assert throughput(300, 1.5, batch_size=8) == (200.0, 1600.0)
    rps, ips = throughput(5, 0.0)
    assert math.isnan(rps) and math.isnan(ips)


def _window(latencies_us: list[float], seconds: float = 1.0, **errors: int) -> Window:
    return Window(seconds, [int(us * 1000) for us in latencies_us], Counter(errors))


def test_summarize_merges_windows() -> None:
    a = _window([100, 200, 300, 400], seconds=2.0, ModelError=1)
    b = _window([500, 600, 700, 800, 900, 1000], seconds=2.0, TimeoutError=2, ModelError=1)
    s = summarize([a, b], batch_size=4)
    assert s.requests == 10
    assert s.seconds == 4.0
    assert s.req_per_s == 2.5
    assert s.infer_per_s == 10.0
    assert s.avg_us == pytest.approx(550.0)
    assert (s.min_us, s.max_us) == (100.0, 1000.0)
    # n = 10 over 100..1000 µs: p50 -> index 5 (600), p90 -> 8 (900), p95/p99 -> 9 (1000)
    assert s.percentiles_us == {50: 600.0, 90: 900.0, 95: 1000.0, 99: 1000.0}
    assert s.errors == {"ModelError": 2, "TimeoutError": 2}
    assert s.error_count == 4
    d = s.to_dict()
    assert d["latency_us"]["p99"] == 1000.0 and d["error_count"] == 4


def test_summarize_of_nothing() -> None:
    s = summarize([_window([], seconds=1.0, ValueError=3)])
    assert s.requests == 0 and s.req_per_s == 0.0
    assert math.isnan(s.avg_us) and math.isnan(s.p(99))
    assert s.errors == {"ValueError": 3}


def test_window_properties() -> None:
    w = _window([100, 300], seconds=0.5, X=1)
    assert w.requests == 2
    assert w.rps == 4.0
    assert w.avg_latency_ns == 200_000
    assert w.brief() == {"seconds": 0.5, "requests": 2, "req_per_s": 4.0, "avg_latency_us": 200.0, "errors": {"X": 1}}


# ── stability ──────────────────────────────────────────────────────────────────


def _rate_window(requests: int, latency_us: float) -> Window:
    return _window([latency_us] * requests)


def test_stable_needs_enough_windows() -> None:
    w = _rate_window(1000, 100)
    assert not is_stable([w, w])
    assert is_stable([w, w, w])
    assert is_stable([w, w], count=2)


def test_stability_bounds_are_max_over_min() -> None:
    base = [_rate_window(1000, 100), _rate_window(1050, 100)]
    assert is_stable([*base, _rate_window(1100, 100)])  # 1100 / 1000 = 1.10: within 10%
    assert not is_stable([*base, _rate_window(1101, 100)])
    assert is_stable([*base, _rate_window(1101, 100)], threshold=0.2)


def test_latency_must_be_stable_too() -> None:
    windows = [_rate_window(1000, 100), _rate_window(1000, 100), _rate_window(1000, 120)]
    assert not is_stable(windows)


def test_only_the_last_windows_count_and_none_may_be_empty() -> None:
    settled = [_rate_window(1000, 100)] * 3
    assert is_stable([_rate_window(10, 900), *settled])
    assert not is_stable([*settled[:2], _rate_window(0, 0)])
    assert not is_stable([Window(1.0)] * 3)


# ── the load generator on a fake call ──────────────────────────────────────────


def _sleeper(seconds: float, fail_every: int = 0) -> tuple[object, list[int]]:
    lock = threading.Lock()
    calls = [0]

    def call() -> None:
        with lock:
            calls[0] += 1
            n = calls[0]
        time.sleep(seconds)
        if fail_every and n % fail_every == 0:
            raise ValueError("every third request fails")

    return call, calls


def test_measure_windows_counts_requests_and_errors() -> None:
    call, calls = _sleeper(0.002, fail_every=3)
    m = measure_windows(
        call,  # type: ignore[arg-type]
        concurrency=2,
        window_s=0.1,
        max_windows=4,
        warmup_s=0.05,
        threshold=10.0,  # only the mechanics are tested here, not this machine's noise
        batch_size=2,
    )
    assert m.stable and m.used == 3 and len(m.windows) == 3
    s = m.summary
    assert s.requests > 0
    assert s.seconds == pytest.approx(0.3)
    assert s.req_per_s == pytest.approx(s.requests / 0.3)
    assert s.infer_per_s == pytest.approx(2 * s.req_per_s)
    assert set(s.errors) == {"ValueError"}
    assert 0.2 < s.error_count / (s.error_count + s.requests) < 0.5
    assert s.p(50) >= 2000  # µs: the call sleeps 2 ms
    assert s.requests + s.error_count + m.warmup_requests <= calls[0]


def test_measure_windows_gives_up_after_max_windows() -> None:
    call, _ = _sleeper(0.001)
    m = measure_windows(call, concurrency=1, window_s=0.05, max_windows=2, warmup_s=0.0)  # type: ignore[arg-type]
    assert not m.stable
    assert len(m.windows) == 2 and m.used == 2


@pytest.mark.parametrize("callers", ["threads", "asyncio"])
def test_the_callers_keep_nothing_per_request_for_the_garbage_collector(callers: str) -> None:
    # A record kept as an object per request set off collections that stopped every
    # caller (a full one of the bench process took 100 ms): what a row measured.
    collections = [0]

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collections[0] += 1

    def call() -> None:
        pass

    async def call_async() -> None:
        pass

    gc.collect()
    gc.callbacks.append(count)
    try:
        m = measure_windows(
            call if callers == "threads" else call_async,
            concurrency=4,
            window_s=0.2,
            max_windows=2,
            warmup_s=0.05,
            threshold=10.0,
            callers=callers,
        )
    finally:
        gc.callbacks.remove(count)
    requests = m.summary.requests + m.warmup_requests
    assert requests > 20_000
    assert collections[0] < requests / 7000, (collections[0], requests)


def test_measure_count_counts_exactly() -> None:
    call, _ = _sleeper(0.001, fail_every=5)
    m = measure_count(call, concurrency=3, requests=60, warmup_s=0.02)  # type: ignore[arg-type]
    assert m.kind == "count"
    assert m.summary.requests + m.summary.error_count == 60
    assert m.summary.errors.keys() <= {"ValueError"}


def test_a_call_that_always_fails_fails_the_warmup() -> None:
    def call() -> None:
        raise RuntimeError("model is broken")

    with pytest.raises(MeasurementError, match="RuntimeError: model is broken"):
        measure_windows(call, concurrency=2, window_s=0.05, max_windows=3, warmup_s=0.05)


# ── helpers of the command line ────────────────────────────────────────────────


def test_parse_duration() -> None:
    assert parse_duration("10s") == 10.0
    assert parse_duration("500ms") == 0.5
    assert parse_duration("2m") == 120.0
    assert parse_duration("1.5") == 1.5
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration("soon")


def test_duration_sets_windows() -> None:
    def ns(**kw: object) -> argparse.Namespace:
        base = {
            "window": None,
            "max_windows": None,
            "duration": None,
            "warmup": 0.5,
            "requests": None,
            "stability_percentage": 10.0,
            "request_timeout": 60.0,
            "fresh_pool_per_row": False,
        }
        return argparse.Namespace(**{**base, **kw})

    assert (settings_from(ns()).window_s, settings_from(ns()).max_windows) == (2.0, 10)
    s = settings_from(ns(duration=10.0))
    assert (s.window_s, s.max_windows) == (2.0, 5)
    s = settings_from(ns(duration=1.5))
    assert (s.window_s, s.max_windows) == (0.5, 3)
    s = settings_from(ns(duration=3.0, window=0.25, max_windows=4))
    assert (s.window_s, s.max_windows) == (0.25, 4)


def test_parameter_alternatives_and_grid() -> None:
    alternatives = parameter_alternatives(["DISABLE_OPTIMIZED_EXECUTION=true,false", "INTRA_OP_THREAD_COUNT=1,2"])
    assert alternatives == {"DISABLE_OPTIMIZED_EXECUTION": ["true", "false"], "INTRA_OP_THREAD_COUNT": ["1", "2"]}
    grid = parameter_grid(alternatives)
    assert len(grid) == 4
    assert grid[0] == {"DISABLE_OPTIMIZED_EXECUTION": "true", "INTRA_OP_THREAD_COUNT": "1"}
    assert parameter_grid({}) == [{}]


def test_plan_order_puts_modes_side_by_side() -> None:
    points = plan(
        modes=["processes", "threads"],
        parameter_sets=[{}],
        instances=[1, 2],
        batch_sizes=[None],
        concurrencies=[1, 4],
    )
    assert [(p.instances, p.mode, p.concurrency) for p in points] == [
        (1, "processes", 1),
        (1, "processes", 4),
        (1, "threads", 1),
        (1, "threads", 4),
        (2, "processes", 1),
        (2, "processes", 4),
        (2, "threads", 1),
        (2, "threads", 4),
    ]


def test_parse_shape() -> None:
    assert parse_shape("1,3,224,224") == (1, 3, 224, 224)
    assert parse_shape("1x64") == (1, 64)
    assert parse_shape("[-1, 8]") == (-1, 8)
    assert parse_shape("") == ()
    with pytest.raises(InputError):
        parse_shape("a,b")


def test_make_inputs_shapes_and_batches(tmp_path: Path) -> None:
    plain = InputSpec("x", (1, 64), torch.float32)
    batched = InputSpec("y", (3,), torch.int64, batched=True)
    assert make_inputs([plain, batched], None)["x"].shape == (1, 64)
    out = make_inputs([plain, batched], 8)
    assert out["x"].shape == (8, 64) and out["x"].dtype == torch.float32
    assert out["y"].shape == (8, 3) and out["y"].dtype == torch.int64
    assert torch.equal(make_inputs([plain], 2)["x"], make_inputs([plain], 2)["x"])  # seeded
    assert not make_inputs([plain], None, data="zero")["x"].any()

    np.save(tmp_path / "row.npy", np.arange(4, dtype=np.float32).reshape(1, 4))
    from_file = InputSpec("z", (), torch.float32, file=tmp_path / "row.npy")
    assert make_inputs([from_file], 3)["z"].shape == (3, 4)  # one row repeated
    np.save(tmp_path / "rows.npy", np.zeros((2, 4), dtype=np.float32))
    with pytest.raises(InputError, match="2 row"):
        make_inputs([InputSpec("z", (), torch.float32, file=tmp_path / "rows.npy")], 3)
    with pytest.raises(InputError, match="--shape-override"):
        make_inputs([InputSpec("v", (-1, 4), torch.float32)], None)


def test_bind_positional() -> None:
    a, b = torch.zeros(1), torch.ones(1)
    assert bind_positional(["x", "y"], {"y": b, "x": a}) == [a, b]
    assert bind_positional(["x", "y"], {"INPUT__1": b, "INPUT__0": a}) == [a, b]
    assert bind_positional(["x"], {"whatever": a}) == [a]
    with pytest.raises(ValueError):
        bind_positional(["x"], {"x": a, "y": b})


def test_rows_table_csv_and_best() -> None:
    from libtorchrt.bench.loadgen import Measurement

    def row(requests: int, slow_us: float, conc: int) -> Row:  # 10% of requests are slow: p99 = slow_us
        w = _window([100.0] * (requests - requests // 10) + [slow_us] * (requests // 10))
        return Row("processes", 1, conc, None, measurement=Measurement(summarize([w]), [w], 1, True))

    fast, slow = row(2000, 5000.0, 4), row(1000, 200.0, 1)
    failed = Row("threads", 2, 1, None, status="error", error="first line\n  detail\nValueError: last line")
    assert best_row([fast, slow, failed], None) is fast
    assert best_row([fast, slow, failed], budget_us=1000.0) is slow
    assert best_row([failed], None) is None
    assert condense(failed.error) == "first line ... ValueError: last line"

    record = fast.csv_record()
    assert list(record) == list(CSV_COLUMNS)
    assert record["infer_per_s"] == "2000.0" and record["stable"] == "true"
    assert failed.csv_record()["status"] == "error"

    table = Table(parameter_sets=[])
    assert "infer/s" in table.header()
    assert "2,000" in table.format(fast)
    assert "error" in table.format(failed)
    assert fast.to_dict()["latency_us"]["p50"] == 100.0
    assert math.isnan(failed.to_dict().get("infer_per_s", math.nan))

"""``benchmarks/busy_poll.py`` runs, short: every row of its latency scenario served
requests, polled and not, and it wrote the figures it printed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.scripts import run_script

pytestmark = pytest.mark.timeout(180)


def test_the_busy_poll_benchmark_runs_its_rows(tmp_path: Path) -> None:
    out = run_script(
        "benchmarks/busy_poll.py",
        *("--scenarios", "latency", "--busy-poll-us", "150", "--seconds", "0.6", "--warmup", "0.1"),
        *("--json", str(tmp_path / "out.json")),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads((tmp_path / "out.json").read_text())
    rows = {(r["scenario"], r["label"]): r for r in doc["rows"]}
    assert set(rows) == {
        ("latency", "busy_poll_us=0"),
        ("latency", "busy_poll_us=150"),
        ("latency", "direct (in-process)"),
    }
    assert all(r["req_per_s"] and r["req_per_s"] > 0 for r in rows.values()), rows
    ratio = doc["ratios"]["latency: req/s, polled / default"]
    polled, default = rows[("latency", "busy_poll_us=150")], rows[("latency", "busy_poll_us=0")]
    assert ratio["median"] == pytest.approx(polled["req_per_s"] / default["req_per_s"])
    over = doc["ratios"]["latency: p50 over direct, busy_poll_us=150 (µs)"]["median"]
    assert over == pytest.approx(polled["p50_us"] - rows[("latency", "direct (in-process)")]["p50_us"])
    assert "latency: p50 over direct, busy_poll_us=150 (µs)" in out.stdout


def test_the_busy_poll_benchmark_refuses_a_poll_it_cannot_set() -> None:
    out = run_script("benchmarks/busy_poll.py", "--busy-poll-us", "0", timeout=60)
    assert out.returncode == 2 and "--busy-poll-us must be from 1 to 1000000" in out.stderr

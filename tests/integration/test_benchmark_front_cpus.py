"""``benchmarks/front_cpus.py`` runs, short: every row of its tiny and latency scenarios
served requests, pinned and not, and it wrote the ratios it printed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.scripts import run_script

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to split between front and workers"),
]


def test_the_front_cpus_benchmark_runs_its_rows(tmp_path: Path) -> None:
    out = run_script(
        "benchmarks/front_cpus.py",
        *("--scenarios", "tiny,latency", "--seconds", "0.6", "--warmup", "0.1", "--json", str(tmp_path / "out.json")),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads((tmp_path / "out.json").read_text())
    rates = {(r["scenario"], r["label"]): r["req_per_s"] for r in doc["rows"]}
    assert set(rates) == {
        ("tiny", "libtorchrt"),
        ("tiny", "front_cpus"),
        ("tiny", "mp-queue"),
        ("tiny", "mp-queue pinned"),
        ("latency", "libtorchrt"),
        ("latency", "front_cpus"),
        ("latency", "direct (in-process)"),
    }
    assert all(v and v > 0 for v in rates.values()), rates
    ratio = doc["ratios"]["tiny: front_cpus / default"]
    assert ratio["median"] == pytest.approx(rates[("tiny", "front_cpus")] / rates[("tiny", "libtorchrt")])
    assert "tiny: front_cpus / default" in out.stdout

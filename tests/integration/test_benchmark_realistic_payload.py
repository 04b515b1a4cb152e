"""``benchmarks/realistic.py --scenarios payload`` runs, short, and judges each payload
target on a like-for-like pair: the pool's callers and the transport floor send the same
prepared inputs (all of them in turn, or the first one every time)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.scripts import run_script

pytestmark = pytest.mark.timeout(180)


def test_each_payload_target_compares_rows_that_send_the_same_inputs(tmp_path: Path) -> None:
    out = run_script(
        "benchmarks/realistic.py",
        *("--scenarios", "payload", "--seconds", "0.6", "--warmup", "0.1", "--json", str(tmp_path / "out.json")),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads((tmp_path / "out.json").read_text())
    rows = {(r["label"], r["behaviour"]): r for r in doc["rows"]}
    cycled, one = "8 inputs in turn + result dropped", "same input + result dropped"
    assert set(rows) == {
        ("libtorchrt", "clone + float(sum)"),
        ("libtorchrt", cycled),
        ("libtorchrt, Pool.empty", "clone + float(sum)"),
        ("libtorchrt, Pool.empty", cycled),
        ("libtorchrt, one input", one),
        ("floor-premapped", cycled),
        ("floor-premapped, one input", one),
    }
    assert all(r["req_per_s"] and r["req_per_s"] > 0 and not r["errors"] for r in rows.values()), rows
    targets = {t["target"]: t for t in doc["targets"] if t["value"] is not None}
    pairs = {
        "payload 2i x 8 threads vs floor-premapped, both sending 8 inputs in turn, results dropped: req/s": (
            ("libtorchrt", cycled),
            ("floor-premapped", cycled),
        ),
        "the same, both sending one input every time: req/s": (
            ("libtorchrt, one input", one),
            ("floor-premapped, one input", one),
        ),
        "the same (8 inputs), inputs made in the request arena (Pool.empty): req/s": (
            ("libtorchrt, Pool.empty", cycled),
            ("floor-premapped", cycled),
        ),
    }
    assert set(targets) == set(pairs)
    for name, (pool, floor) in pairs.items():
        assert targets[name]["value"] == pytest.approx(rows[pool]["req_per_s"] / rows[floor]["req_per_s"]), name

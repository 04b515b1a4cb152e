"""``benchmarks/wake_gate.py`` runs, and its three rows are what they say: the gate's
row woke threads through the hub's gate, the others did not (the script swaps private
seams of the library, which this catches if they move). One short round, real pools."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from libtorchrt.transport import lanes

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not lanes.available, reason="the native hub is not built here"),
]


def test_the_wake_gate_benchmark_runs_its_three_settings(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "benchmarks/wake_gate.py",
            "--rounds",
            "1",
            "--seconds",
            "0.6",
            "--kinds",
            "closed",
            "--models",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {
        m.group(1): m
        for m in re.finditer(r"closed\s+(gate|no gate|router)\s+([\d,]+) req/s.*granted (\d+)", out.stdout)
    }
    assert set(rows) == {"gate", "no gate", "router"}, out.stdout
    assert all(int(m.group(2).replace(",", "")) > 0 for m in rows.values())
    assert int(rows["gate"].group(3)) > 0  # (batch replies woke threads through the gate)
    assert int(rows["no gate"].group(3)) == 0 and int(rows["router"].group(3)) == 0

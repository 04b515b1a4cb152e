"""The benchmark scripts' JSON says which code produced it: the command, the commit
(``git rev-parse HEAD``) and whether the tree was dirty (docs/measurements/README.md).
No worker processes: the documents are built from rows made here, and core.py runs only
its in-process ``direct`` mode, for a fraction of a second."""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import batching, core
from benchmarks._report import provenance

ROOT = Path(__file__).resolve().parents[2]
IN_GIT = shutil.which("git") is not None and (ROOT / ".git").exists()

pytestmark = pytest.mark.skipif(not IN_GIT, reason="needs git and a git checkout")


def head() -> str:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def check_provenance(doc: dict[str, Any]) -> None:
    assert doc["commit"] == head()
    assert re.fullmatch(r"[0-9a-f]{40}", doc["commit"])
    assert isinstance(doc["dirty"], bool)
    assert isinstance(doc["dirty_files"], list)
    assert doc["dirty"] == bool(doc["dirty_files"])
    assert doc["command"].startswith("python ")


def test_provenance_names_the_checked_out_commit() -> None:
    check_provenance(provenance())


def test_core_json_document_records_the_commit(tmp_path: Path) -> None:
    args = core.parse_args(["--workloads", "tiny", "--quick", "--json", str(tmp_path / "out.json")])
    runner = core.Runner(args, tmp_path)
    doc = core.json_document(args, provenance(), {"cpu_count": 2}, runner, [], 1.0, complete=True)
    check_provenance(json.loads(json.dumps(doc)))
    assert doc["config"]["json"] == str(tmp_path / "out.json")


def test_core_main_writes_the_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # main() sets process-wide state for a real run; not for a test's process
    monkeypatch.setattr(core.signal, "signal", lambda *a: None)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(core, "stop_resource_tracker", lambda: None)
    out = tmp_path / "core.json"
    argv = ["--workloads", "tiny", "--modes", "direct", "--duration", "0.05", "--repeat", "1", "--warmup", "0"]
    argv += ["--malloc", "glibc"]  # (the workers' settings change this process's malloc and environment)
    assert core.main([*argv, "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    check_provenance(doc)
    assert [(r["workload"], r["mode"]) for r in doc["rows"]] == [("tiny", "direct")]
    assert doc["machine"]["malloc"] == "glibc"


def test_batching_json_document_records_the_commit() -> None:
    args = argparse.Namespace(seconds=1.0, workloads="tiny", json=Path("out.json"))
    alone = {"rps": 1000.0, "p50_ms": 8.0, "p99_ms": 9.0, "batch": 1.0}
    batched = {"rps": 3500.0, "p50_ms": 2.0, "p99_ms": 3.0, "batch": float("nan")}
    rows = [("tiny", 64, "asyncio", False, alone), ("tiny", 64, "asyncio", True, batched)]
    doc = json.loads(json.dumps(batching.json_document(args, provenance(), {}, rows, None)))
    check_provenance(doc)
    assert doc["config"]["json"] == "out.json"
    assert [r["ratio"] for r in doc["rows"]] == [None, 3.5]
    assert doc["rows"][1]["batch"] is None  # NaN (no execution counted) is not JSON
    assert doc["overload"] is None
    assert not any(isinstance(v, float) and math.isnan(v) for r in doc["rows"] for v in r.values())

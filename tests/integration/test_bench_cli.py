"""``python -m libtorchrt.bench`` end to end, in a subprocess: the tiny workload with short
windows (processes and threads), a repository model with a batch size and a parameter
sweep, and the usage errors. Checks the table, the JSON document, the CSV file, the PNG,
and that no worker process outlives the tool."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from libtorchrt import ModelConfig
from libtorchrt.bench.callers import Behaviour
from libtorchrt.bench.report import CSV_COLUMNS
from libtorchrt.bench.serving import InputFeed
from libtorchrt.bench.sweep import Settings, _PoolServer
from libtorchrt.bench.workloads import build
from tests.arena_maps import arena_offset

ROOT = Path(__file__).resolve().parents[2]
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
ROW_KEYS = {
    "mode",
    "instances",
    "concurrency",
    "batch_size",
    "parameters",
    "status",
    "error",
    "flags",
    "notes",
    "requests",
    "seconds",
    "req_per_s",
    "infer_per_s",
    "latency_us",
    "errors",
    "error_count",
    "stable",
    "windows_measured",
    "windows_used",
    "windows",
}


def bench(*args: str, tmp: Path, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
    """Run the tool with its temporary files under ``tmp`` (so leftovers can be found)."""
    env = {**os.environ, "TMPDIR": str(tmp)}
    return subprocess.run(
        [sys.executable, "-m", "libtorchrt.bench", *args, "--no-progress"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (workers carry their model path)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry}: {cmdline[:200]}")
    return found


def assert_nothing_left(tmp: Path) -> None:
    deadline = time.monotonic() + 5.0
    while (left := processes_mentioning(str(tmp))) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"processes left behind: {left}"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One sweep of the tiny workload: 2 instance counts x 2 concurrencies x 2 modes."""
    tmp = tmp_path_factory.mktemp("bench-tiny")
    out = {"json": tmp / "out.json", "csv": tmp / "out.csv", "png": tmp / "out.png"}
    args = ["--workload", "tiny", "--instances", "1,2", "--concurrency", "1,4", "--window", "0.5"]
    args += ["--max-windows", "3", "--warmup", "0.2", "--compare", "threads"]
    args += ["--json", str(out["json"]), "--csv", str(out["csv"])]
    if HAS_MATPLOTLIB:
        args += ["--plot", str(out["png"])]
    proc = bench(*args, tmp=tmp)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_nothing_left(tmp)
    return {"proc": proc, **out}


def test_table_is_printed_row_by_row(tiny_run: dict[str, Any]) -> None:
    stdout = tiny_run["proc"].stdout
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("mode") and "infer/s" in line)
    for column in ("inst", "conc", "batch", "p50", "p90", "p95", "p99", "avg", "errors", "windows"):
        assert column in lines[header]
    rows = [line.split() for line in lines[header + 2 :] if line.startswith(("processes", "threads"))]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (mode, inst, conc) for inst in ("1", "2") for mode in ("processes", "threads") for conc in ("1", "4")
    ]
    assert "best:" in stdout


def test_json_document(tiny_run: dict[str, Any]) -> None:
    doc = json.loads(tiny_run["json"].read_text())
    assert doc["tool"] == "libtorchrt.bench"
    assert doc["complete"] is True and doc["exit_status"] == 0
    assert {"cpu", "cpu_count", "torch", "platform"} <= set(doc["machine"])
    assert doc["model"]["name"] == "tiny"
    assert doc["model"]["inputs"] == [
        {"name": "INPUT__0", "shape": [1, 64], "dtype": "float32", "batched": False, "source": "generated"}
    ]
    assert doc["settings"]["window_s"] == 0.5 and doc["settings"]["max_windows"] == 3
    assert doc["settings"]["modes"] == ["processes", "threads"]
    rows = doc["rows"]
    assert len(rows) == 8
    assert {(r["mode"], r["instances"], r["concurrency"]) for r in rows} == {
        (m, n, c) for m in ("processes", "threads") for n in (1, 2) for c in (1, 4)
    }
    for r in rows:
        assert set(r) >= ROW_KEYS, ROW_KEYS - set(r)
        assert r["status"] == "ok" and r["error"] is None
        assert r["requests"] > 0 and r["error_count"] == 0 and r["errors"] == {}
        assert r["infer_per_s"] == pytest.approx(r["req_per_s"]) and r["infer_per_s"] > 0
        lat = r["latency_us"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        assert 1 <= r["windows_measured"] <= 3 and r["windows_used"] == min(3, r["windows_measured"])
        assert r["req_per_s"] == pytest.approx(r["requests"] / r["seconds"])
        assert sum(w["requests"] for w in r["windows"][-r["windows_used"] :]) == r["requests"]
    processes = [r for r in rows if r["mode"] == "processes"]
    assert all(r["flags"]["INTRA_OP_THREAD_COUNT"] == 1 for r in processes)  # read back from the workers
    assert doc["best"]["infer_per_s"] == max(r["infer_per_s"] for r in rows)


def test_csv_file(tiny_run: dict[str, Any]) -> None:
    with tiny_run["csv"].open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        records = list(reader)
    assert len(records) == 8
    assert {r["mode"] for r in records} == {"processes", "threads"}
    for r in records:
        assert r["status"] == "ok" and r["errors"] == "0"
        assert float(r["infer_per_s"]) > 0 and float(r["p99_us"]) >= float(r["p50_us"]) > 0


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="--plot needs matplotlib (the dev/bench extra)")
def test_png_plot(tiny_run: dict[str, Any]) -> None:
    data = tiny_run["png"].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000


CONFIG = """\
name: "tinyrepo"
platform: "pytorch_libtorch"
max_batch_size: 8
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 64 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 64 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""


def test_repository_model_with_batch_and_parameter_sweep(tmp_path: Path) -> None:
    model_dir = tmp_path / "repo" / "tinyrepo"
    (model_dir / "1").mkdir(parents=True)
    build("tiny", tmp_path).rename(model_dir / "1" / "model.pt")
    (model_dir / "config.pbtxt").write_text(CONFIG)
    out = tmp_path / "out.json"
    proc = bench(
        str(tmp_path / "repo"),
        *("--concurrency", "2", "--batch-size", "4", "--requests", "150", "--warmup", "0.1"),
        *("--parameters", "DISABLE_OPTIMIZED_EXECUTION=true,false", "--json", str(out)),
        tmp=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "DISABLE_OPTIMIZED_EXECUTION=true" in proc.stdout and "DISABLE_OPTIMIZED_EXECUTION=false" in proc.stdout
    assert_nothing_left(tmp_path)
    doc = json.loads(out.read_text())
    assert doc["model"]["name"] == "tinyrepo" and doc["model"]["max_batch_size"] == 8
    assert doc["model"]["inputs"][0]["shape"] == [4, 64]  # the batch dim is prepended
    rows = doc["rows"]
    assert [r["parameters"] for r in rows] == [
        {"DISABLE_OPTIMIZED_EXECUTION": "true"},
        {"DISABLE_OPTIMIZED_EXECUTION": "false"},
    ]
    assert [r["flags"]["DISABLE_OPTIMIZED_EXECUTION"] for r in rows] == [True, False]
    for r in rows:
        assert r["status"] == "ok" and r["measurement"] == "count"
        assert r["batch_size"] == 4
        assert r["requests"] + r["error_count"] == 150
        assert r["infer_per_s"] == pytest.approx(4 * r["req_per_s"])


def test_endpoint_with_pool_options_is_a_usage_error(tmp_path: Path) -> None:
    """--endpoint measures a running server as it is (tests/integration/test_bench_endpoint.py
    drives a real one): options that shape the pools the tool starts are refused."""
    proc = bench("--workload", "tiny", "--endpoint", "http://127.0.0.1:8000", tmp=tmp_path, timeout=60)
    assert proc.returncode == 2
    assert "--workload: a running server's models, instances and parameters are its own" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to split between callers and workers")
def test_front_cpus_pins_the_pools_the_tool_starts(tmp_path: Path) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    out = tmp_path / "out.json"
    args = ["--workload", "tiny", "--instances", "1", "--concurrency", "2", "--requests", "50"]
    proc = bench(*args, "--front-cpus", "1", "--json", str(out), tmp=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert doc["settings"]["front_cpus"] == 1
    [row] = doc["rows"]
    assert row["status"] == "ok" and row["requests"] == 50
    assert f"front_cpus: callers on CPUs {cpus[:1]}, workers on {cpus[1:]}" in row["notes"]
    assert_nothing_left(tmp_path)
    proc = bench("--workload", "tiny", "--front-cpus", "x", tmp=tmp_path, timeout=60)
    assert proc.returncode == 2 and "is not a number of CPUs or a CPU list" in proc.stderr
    proc = bench("--front-cpus", "1", "--endpoint", "http://127.0.0.1:8000", tmp=tmp_path, timeout=60)
    assert proc.returncode == 2 and "--front-cpus: a running server's models" in proc.stderr


def test_inputs_in_arena_makes_the_pools_inputs_with_pool_empty(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    args = ["--workload", "payload", "--instances", "1", "--concurrency", "2", "--requests", "40"]
    for realistic in ([], ["--realistic"]):
        proc = bench(*args, *realistic, "--inputs-in-arena", "--json", str(out), tmp=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "inputs: made with Pool.empty in the model's request arena (--inputs-in-arena)" in proc.stdout
        doc = json.loads(out.read_text())
        assert doc["settings"]["inputs_in_arena"] is True
        [row] = doc["rows"]
        assert row["status"] == "ok" and row["requests"] == 40
        assert "inputs made with Pool.empty, in the request arena" in row["notes"]
    assert_nothing_left(tmp_path)
    proc = bench("--inputs-in-arena", "--endpoint", "http://127.0.0.1:8000", tmp=tmp_path, timeout=60)
    assert proc.returncode == 2 and "--inputs-in-arena: a running server's models" in proc.stderr


@pytest.mark.parametrize("behaviour", [None, Behaviour(fresh="clone", use="sum")])
def test_the_pool_server_sends_inputs_made_in_the_request_arena(tmp_path: Path, behaviour: Behaviour | None) -> None:
    path = build("payload", tmp_path)
    x = torch.randn(1, 1024, 1024)
    feed = InputFeed([{"INPUT__0": x}], behaviour)
    with _PoolServer(ModelConfig("payload", path), Settings(inputs_in_arena=True)) as server:
        pool = server.pool
        sent: list[int] = []
        infer = pool.infer

        def watched(model: str, inputs: dict[str, torch.Tensor], **kw: Any) -> dict[str, torch.Tensor]:
            sent.append(arena_offset(inputs["INPUT__0"], "payload", "req"))
            out = infer(model, inputs, **kw)
            assert torch.equal(out["OUTPUT__0"], x)
            return out

        pool.infer = watched  # type: ignore[method-assign]
        call = server.caller(feed)
        for _ in range(3):
            call()
        assert len(sent) == 3 and min(sent) >= 0, sent


def test_a_pt_file_without_shapes_is_a_usage_error(tmp_path: Path) -> None:
    path = build("tiny", tmp_path)
    proc = bench(str(path), tmp=tmp_path, timeout=60)
    assert proc.returncode == 2
    assert "--input-shape x=" in proc.stderr  # names the model's forward() argument

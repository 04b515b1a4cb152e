"""PyTorch 2 formats from a Triton-style repository on disk (tests/pt2_models.py
``build_repository``): an AOTInductor package (``platform: "torch_aoti"``), a
``torch.export`` program (named by ``default_model_filename``) and a ``model.py``
(``runtime: "model.py"``), served by the real server and queried with
``tritonclient.http``, and the package measured by ``python -m libtorchrt.bench``;
outputs compared with the eager modules. (A Pool on the same repository:
test_formats_pool.py.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.http as tritonhttp
from torch.testing import assert_close

from tests.conftest import wait_for
from tests.pt2_models import MultiIO, Pt2Artifacts, load_python_model, multiio, multiio_expected, multiio_inputs
from tests.server_util import ServerProcess, alive, workers_of

pytestmark = pytest.mark.timeout(240)  # (the first test to ask builds the artifacts: one AOTI compilation)

ROOT = Path(__file__).resolve().parents[2]

WORDS = ["papaya", "fig", "banana"]


@pytest.fixture(scope="module")
def eager(pt2_artifacts: Pt2Artifacts) -> MultiIO:
    return multiio(pt2_artifacts.state_dict)


@pytest.fixture(scope="module")
def env(pt2_artifacts: Pt2Artifacts, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """For the subprocesses: temporary files in tmp, and the per-user compile cache
    there too (a copy of the session's, warm)."""
    tmp = tmp_path_factory.mktemp("serving-env")
    shutil.copytree(pt2_artifacts.compile_cache, tmp / "cache" / "libtorchrt" / "compile")
    return {"TMPDIR": str(tmp), "XDG_CACHE_HOME": str(tmp / "cache")}


# -- the server, through tritonclient.http ---------------------------------------------


@pytest.fixture(scope="module")
def server(pt2_repository: Path, env: dict[str, str]) -> Iterator[ServerProcess]:
    args = ["--model-repository", str(pt2_repository), "--http", "127.0.0.1:0", "--metrics", "off", "--strict"]
    proc = ServerProcess(*args, "--grace", "1", env=env)
    try:
        proc.wait_ready()
        assert proc.http, proc.output
        workers = workers_of(proc.proc.pid)
        assert len(workers) == 3, proc.output  # one per model
        yield proc
        assert proc.stop() == 0, proc.output
        assert not any(alive(pid) for pid in workers), "workers left behind"
    finally:
        proc.kill()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[Any]:
    c = tritonhttp.InferenceServerClient(server.http, network_timeout=60.0)
    yield c
    c.close()


def _input(name: str, value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        i = tritonhttp.InferInput(name, list(value.shape), "FP32")
        i.set_data_from_numpy(value.numpy())
    else:
        arr = np.array([s.encode() for s in value], dtype=np.object_)
        i = tritonhttp.InferInput(name, list(arr.shape), "BYTES")
        i.set_data_from_numpy(arr)
    return i


def test_server_metadata_lists_the_call_spec_inputs(client: Any) -> None:
    meta = client.get_model_metadata("multiio_aoti")
    assert meta["platform"] == "torch_aoti"
    assert meta["inputs"] == [
        {"name": "ARGS[0]", "datatype": "FP32", "shape": [-1, 4]},
        {"name": "ARGS[1]", "datatype": "FP32", "shape": [-1, 3]},
        {"name": "KWARGS[scale]", "datatype": "FP32", "shape": [-1, 1]},
    ]
    assert [o["name"] for o in meta["outputs"]] == ["RESULT[pair][0]", "RESULT[logits]"]
    words = client.get_model_metadata("words")
    assert [(i["name"], i["datatype"]) for i in words["inputs"]] == [("words", "BYTES"), ("bias", "FP32")]
    for name in ("multiio_aoti", "multiio_exported", "words"):
        assert client.is_model_ready(name), name


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_server_answers_the_aoti_package(client: Any, eager: MultiIO, binary: bool) -> None:
    x, y, scale = multiio_inputs(4, seed=8)
    inputs = [_input(name, t) for name, t in zip(("ARGS[0]", "ARGS[1]", "KWARGS[scale]"), (x, y, scale))]
    outputs = [tritonhttp.InferRequestedOutput(n, binary_data=binary) for n in ("RESULT[logits]", "RESULT[pair][0]")]
    result = client.infer("multiio_aoti", inputs, outputs=outputs)
    want = multiio_expected(eager, x, y, scale)
    for name in ("RESULT[logits]", "RESULT[pair][0]"):
        assert_close(torch.from_numpy(np.array(result.as_numpy(name))), want[name])


def test_server_answers_the_model_py(client: Any, pt2_artifacts: Pt2Artifacts) -> None:
    bias = torch.full((len(WORDS), 2), -0.5)
    result = client.infer("words", [_input("words", WORDS), _input("bias", bias)])
    with torch.no_grad():
        scores, labels = load_python_model(pt2_artifacts.py_text)(WORDS, bias)
    assert_close(torch.from_numpy(np.array(result.as_numpy("OUTPUT__0"))), scores)
    assert [s.decode() for s in result.as_numpy("OUTPUT__1")] == labels


def test_server_answers_the_exported_program(client: Any, eager: MultiIO) -> None:
    x, y, scale = multiio_inputs(2, seed=9)
    inputs = [_input(f"INPUT__{i}", t) for i, t in enumerate((x, y, scale))]
    result = client.infer("multiio_exported", inputs)
    for name, want in multiio_expected(eager, x, y, scale).items():
        assert_close(torch.from_numpy(np.array(result.as_numpy(name))), want)


# -- the benchmark tool ----------------------------------------------------------------


def _processes_with(variable: str) -> list[int]:
    """PIDs of this user's live processes whose environment holds ``variable`` (NAME=value):
    the workers a tool started, forked from its template or not, carry its TMPDIR."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if variable.encode() in environ and alive(int(entry)):
            found.append(int(entry))
    return found


def test_bench_measures_the_aoti_package(pt2_repository: Path, env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    mine = {**env, "TMPDIR": str(tmp_path)}  # (the server's compile cache, but temporary files of its own)
    proc = subprocess.run(
        [sys.executable, "-m", "libtorchrt.bench", str(pt2_repository), "--model", "multiio_aoti", "--concurrency", "2",
         "--batch-size", "3", "--requests", "100", "--warmup", "0.1", "--no-progress", "--json", str(out)],
        cwd=ROOT, env={**os.environ, **mine}, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "infer/s" in proc.stdout and "best: processes, 1 instance(s), concurrency 2, batch 3" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["model"]["name"] == "multiio_aoti"
    (row,) = doc["rows"]
    assert row["status"] == "ok" and row["error_count"] == 0, row
    assert row["requests"] == 100 and row["req_per_s"] > 0 and row["flags"]["FORMAT"] == "aoti"
    assert row["infer_per_s"] == pytest.approx(3 * row["req_per_s"])
    wait_for(lambda: not _processes_with(f"TMPDIR={tmp_path}"), 5.0, "the bench's workers to exit")

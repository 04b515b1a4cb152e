"""One model that cannot be loaded never takes the others down (unless ``strict``).

Every load-time failure of one model -- a device this machine does not have, a missing
file, a bad configuration, a flag torch refuses -- leaves that model out, listed as
failed with a true message, while the others serve. It used to be that one ``KIND_GPU``
model on a machine without CUDA (or one missing model file) made ``Pool(repo)`` raise
and ``libtorchrt-pool`` exit 1 saying "no model could be loaded".
"""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from libtorchrt import ConfigError, ModelConfig, ModelUnavailableError, Pool
from libtorchrt.config.instances import cuda_device_count
from tests.conftest import assert_no_leaks, snapshot
from tests.server_util import ServerProcess

pytestmark = pytest.mark.skipif(cuda_device_count() > 0, reason="needs a machine without CUDA")

GOOD = 'name: "good"\nplatform: "pytorch_libtorch"\n'
GPU = 'name: "gpu"\nplatform: "pytorch_libtorch"\ninstance_group [ { count: 1 kind: KIND_GPU } ]\n'
FLAG = (
    'name: "flag"\nplatform: "pytorch_libtorch"\n'
    'parameters: { key: "INFERENCE_MODE" value: { string_value: "maybe" } }\n'
)


def _repo(root: Path, model_dir: Path, configs: dict[str, str], *, file: bool = True) -> Path:
    for name, text in configs.items():
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(text)
        if file or name == "good":
            shutil.copy(model_dir / "identity.pt", root / name / "1" / "model.pt")
    return root


def _serves(pool: Pool) -> None:
    x = torch.arange(4.0)
    assert torch.equal(pool.infer("good", [x], timeout=30)["OUTPUT__0"], x)


def test_a_gpu_model_on_a_cpu_machine_fails_alone(tmp_path: Path, model_dir: Path) -> None:
    repo = _repo(tmp_path / "repo", model_dir, {"good": GOOD, "gpu": GPU, "flag": FLAG})
    before = snapshot()
    with pytest.warns(RuntimeWarning, match="gpu"), Pool(repo) as pool:
        states = {s.name: s for s in pool.models()}
        assert states["good"].state == "ready"
        assert states["gpu"].state == "failed"
        assert "asks for KIND_GPU instances; this machine has no CUDA device" in (states["gpu"].error or "")
        assert states["flag"].state == "failed" and "INFERENCE_MODE" in (states["flag"].error or "")
        with pytest.raises(ModelUnavailableError, match="no CUDA device"):
            pool.infer("gpu", [torch.ones(1)])
        assert pool.health()["gpu"].state == "failed"
        _serves(pool)
    assert_no_leaks(before)


def test_strict_fails_on_the_gpu_model(tmp_path: Path, model_dir: Path) -> None:
    repo = _repo(tmp_path / "repo", model_dir, {"good": GOOD, "gpu": GPU})
    before = snapshot()
    with pytest.raises(ConfigError, match="no CUDA device"):
        Pool(repo, strict=True)
    assert_no_leaks(before)


def test_a_missing_model_file_fails_alone(tmp_path: Path, model_dir: Path) -> None:
    missing = ModelConfig("missing", tmp_path / "nowhere.pt")
    good = ModelConfig("good", model_dir / "identity.pt")
    before = snapshot()
    with pytest.warns(RuntimeWarning, match="no model file"), Pool(models=[missing, good]) as pool:
        states = {s.name: s for s in pool.models()}
        assert states["missing"].state == "failed" and states["missing"].version == 1
        with pytest.raises(ModelUnavailableError, match="no model file"):
            pool.infer("missing", [torch.ones(1)])
        _serves(pool)
    with pytest.raises(ConfigError, match="no model file"):
        Pool(models=[missing, good], strict=True)
    with pytest.raises(ConfigError, match="no model file"):  # nothing at all to serve
        Pool(models=[missing])
    assert_no_leaks(before)


def test_only_gpu_models_is_a_true_error(tmp_path: Path, model_dir: Path) -> None:
    repo = _repo(tmp_path / "repo", model_dir, {"gpu": GPU})
    with pytest.raises(ConfigError, match="no CUDA device"):
        Pool(repo)


def test_the_server_serves_the_others(tmp_path: Path, model_dir: Path) -> None:
    repo = _repo(tmp_path / "repo", model_dir, {"good": GOOD, "gpu": GPU})
    server = ServerProcess("--model-repository", str(repo), "--http", "127.0.0.1:0", "--grace", "1")
    try:
        server.wait_ready()
        assert "model gpu v1 is not served" in server.output and "no CUDA device" in server.output

        def status(path: str) -> int:
            try:
                with urllib.request.urlopen(f"http://{server.http}{path}", timeout=10) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code

        assert status("/v2/health/ready") == 200  # (a failed model does not hold readiness)
        assert status("/v2/models/good/ready") == 200
        assert status("/v2/models/gpu/ready") == 400
        assert server.stop() == 0
    finally:
        server.kill()

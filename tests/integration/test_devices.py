"""Where instances run, on a machine without CUDA: GPU configs fail at load with a
clear error, KIND_AUTO falls back to the CPU, and CUDA-free pools never touch CUDA."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from libtorchrt import ConfigError, ModelConfig, Pool

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")


def test_python_gpu_model_fails_at_load_naming_model_and_gpu(model_dir: Path, no_leaks: None) -> None:
    cfg = ModelConfig("tiny", model_dir / "tiny.pt", devices=["cuda:1"])
    with pytest.raises(ConfigError, match="model 'tiny' asks for GPU 1; this machine has no CUDA device"):
        Pool(models=[cfg])


def _repo(tmp_path: Path, model_dir: Path, config: str) -> Path:
    (tmp_path / "tiny" / "1").mkdir(parents=True)
    shutil.copy(model_dir / "tiny.pt", tmp_path / "tiny" / "1" / "model.pt")
    (tmp_path / "tiny" / "config.pbtxt").write_text(config)
    return tmp_path


def test_kind_gpu_repository_fails_at_load(tmp_path: Path, model_dir: Path, no_leaks: None) -> None:
    repo = _repo(tmp_path, model_dir, 'platform: "pytorch_libtorch"\ninstance_group { kind: KIND_GPU gpus: [0] }\n')
    with pytest.raises(ConfigError, match="model 'tiny' asks for GPU 0; this machine has no CUDA device"):
        Pool(repo)


@pytest.mark.parametrize("group", ["", "instance_group [ { count: 2 kind: KIND_AUTO } ]\n"])
def test_kind_auto_runs_on_the_cpu(tmp_path: Path, model_dir: Path, make_pool: Any, group: str) -> None:
    repo = _repo(tmp_path, model_dir, 'platform: "pytorch_libtorch"\n' + group)
    with Pool(repo) as pool:
        assert {w.device for w in pool.workers()} == {"cpu"}
        assert len(pool.workers()) == (2 if group else 1)
        assert pool.infer("tiny", torch.randn(1, 64))["OUTPUT__0"].shape == (1, 64)

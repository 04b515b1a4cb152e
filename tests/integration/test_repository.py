"""A Triton-style model repository, loaded by Pool(path) and served."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from libtorchrt import ConfigError, Pool
from tests import models
from tests.conftest import assert_no_leaks, snapshot

CONFIG = """
# a minimal Triton configuration for a TorchScript model
name: "tiny"
platform: "pytorch_libtorch"
max_batch_size: 8
input [
  {
    name: "INPUT__0"
    data_type: TYPE_FP32
    dims: [ 64 ]
  }
]
output [
  {
    name: "OUTPUT__0"
    data_type: TYPE_FP32
    dims: [ 64 ]
  }
]
instance_group [ { count: 2, kind: KIND_CPU } ]
parameters: { key: "ENABLE_JIT_PROFILING" value: { string_value: "false" } }
"""


def _repo(root: Path, model_dir: Path, config: str = CONFIG) -> Path:
    (root / "tiny" / "1").mkdir(parents=True)
    (root / "tiny" / "2").mkdir()
    (root / "tiny" / "config.pbtxt").write_text(config)
    (root / "tiny" / "1" / "model.pt").write_bytes(b"version 1 is not even a model")
    shutil.copy(model_dir / "tiny.pt", root / "tiny" / "2" / "model.pt")
    return root


def test_pool_serves_a_model_repository(tmp_path: Path, model_dir: Path) -> None:
    before = snapshot()
    repo = _repo(tmp_path / "repo", model_dir)
    with Pool(repo) as pool:
        assert [(s.name, s.state) for s in pool.models()] == [("tiny", "ready")]
        workers = pool.workers()
        assert len(workers) == 2 and {w.instance for w in workers} == {0, 1}
        assert all(w.flags["ENABLE_JIT_PROFILING"] is False for w in workers)
        x = torch.randn(3, 64)  # 3 rows of a batch of at most 8
        out = pool.infer("tiny", {"INPUT__0": x})
        with torch.no_grad():
            torch.testing.assert_close(out["OUTPUT__0"], models.reference("tiny")(x))
        with pytest.raises(ValueError, match="max_batch_size=8"):
            pool.infer("tiny", {"INPUT__0": torch.randn(9, 64)})
    assert_no_leaks(before)


def test_a_bad_config_names_its_file_and_line(tmp_path: Path, model_dir: Path) -> None:
    repo = _repo(tmp_path / "repo", model_dir, CONFIG.replace("max_batch_size: 8", "max_batch_size: 8\nbogus: 1"))
    with pytest.raises(ConfigError) as info:
        Pool(repo)
    assert "config.pbtxt:6:1: " in str(info.value) and "bogus" in str(info.value)


def test_an_invalid_flag_value_names_model_key_and_value(tmp_path: Path, model_dir: Path) -> None:
    repo = _repo(tmp_path / "repo", model_dir, CONFIG.replace('string_value: "false"', 'string_value: "maybe"'))
    with pytest.raises(ConfigError) as info:
        Pool(repo)
    text = str(info.value)
    assert "'tiny'" in text and "ENABLE_JIT_PROFILING" in text and "'maybe'" in text

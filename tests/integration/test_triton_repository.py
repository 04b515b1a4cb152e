"""The Done-when of the configuration issue: a directory of varied, realistic
``config.pbtxt`` files (``tests/data/repository``) loads unchanged with matching
TorchScript models, and every model (and every version its policy serves) answers
requests correctly; the bad configurations of ``tests/data/bad`` are refused with file
and line (see tests/unit/test_config_data.py)."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest

from libtorchrt import Pool
from tests import triton_models
from tests.conftest import assert_no_leaks, snapshot


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    repo = tmp_path_factory.mktemp("triton") / "repo"
    shutil.copytree(triton_models.REPOSITORY, repo)
    return repo, triton_models.build(repo)


def test_every_model_of_the_repository_loads_and_answers(repository: tuple[Path, list[str]]) -> None:
    repo, served = repository
    assert len(served) >= 15
    before = snapshot()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the configurations' notes (tested elsewhere)
        pool = Pool(repo, strict=True, start_timeout=300)
    try:
        states = {(s.name, s.version): s.state for s in pool.models()}
        for name in served:
            for version in triton_models.RECIPES[name].served:
                assert states[(name, version)] == "ready", (name, version, pool.models())
                inputs, expected = triton_models.example(name, version)
                out = pool.infer(name, inputs, version=version)
                triton_models.check(name, out, expected)
            # the default version is the highest served
            inputs, expected = triton_models.example(name)
            triton_models.check(name, pool.infer(name, inputs), expected)
    finally:
        pool.close()
    assert_no_leaks(before)

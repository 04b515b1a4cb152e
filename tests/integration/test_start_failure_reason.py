"""A worker that cannot load its model sends FAILED (why) and exits with 1. The front
sees the exit by its pidfd, and the message through its ZeroMQ I/O thread: on a busy
machine the exit could come first, and the model then failed with "the process exited
with code 1" instead of the reason (caught once in CI: tests/integration/
test_formats_errors.py). The supervisor now waits for the message, a little. Many models
fail at once here, beside processes that keep both CPUs busy, so that the race is run
often: without the wait, 2 of 120 start failures lost their reason that way."""

from __future__ import annotations

import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from libtorchrt import ModelConfig, Pool
from tests.models import save

pytestmark = pytest.mark.timeout(240)

RAISES = """
import torch
SIZE = int("four")
"""
#: pools started in a row, models failing in each, and busy processes beside them
POOLS, FAILING, BUSY = 4, 8, 3


@pytest.fixture
def busy_cpus() -> Iterator[None]:
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(BUSY)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def test_every_model_that_cannot_load_says_why(tmp_path: Path, busy_cpus: None, no_leaks: None) -> None:
    (tmp_path / "raises").mkdir()
    (tmp_path / "raises" / "model.py").write_text(RAISES)
    models = [ModelConfig("good", save("tiny", tmp_path))]
    models += [ModelConfig(f"bad{i}", tmp_path / "raises" / "model.py") for i in range(FAILING)]
    for _ in range(POOLS):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # ("models not served")
            pool = Pool(models=models)
        with pool:
            errors = {s.name: s.error for s in pool.models() if s.name != "good"}
        assert all(e is not None and "ValueError: invalid literal" in e for e in errors.values()), errors

"""One copy of a model's weights for all its CPU instances (issue #21), through a real
pool: workers map a read-only memfd the front owns; one that writes into its weights
dies alone and is replaced; its siblings' answers do not change."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from libtorchrt import ModelConfig, WorkerDiedError


class _Poker(torch.nn.Module):
    """``x @ w``; with ``poke`` > 0, it first writes into its own weight."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(256, 256))

    def forward(self, x: torch.Tensor, poke: torch.Tensor) -> torch.Tensor:
        if bool(poke.sum() > 0):
            self.w.add_(1.0)
        return x @ self.w


@pytest.fixture(scope="module")
def poker(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("sharing") / "poker.pt"
    model = _Poker().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(model).save(str(path))
    return path, model


def _mapped_weights(pid: int) -> int:
    """Bytes of the model's shared-weights memfd that ``pid`` maps."""
    total = 0
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if "-weights" in line and "memfd:libtorchrt-" in line:
                start, end = (int(a, 16) for a in line.split()[0].split("-"))
                total += end - start
    return total


def test_instances_map_one_read_only_copy_and_answer_as_unshared_ones(
    make_pool: Callable[..., Any], poker: tuple[Path, torch.nn.Module]
) -> None:
    path, model = poker
    x, zero = torch.randn(4, 256), torch.zeros(1)
    shared = make_pool(ModelConfig("shared", path, instances=2))
    private = make_pool(ModelConfig("private", path, instances=2, parameters={"ENABLE_WEIGHT_SHARING": "false"}))
    for w in shared.workers():
        assert w.flags["ENABLE_WEIGHT_SHARING"] is True
        assert _mapped_weights(w.pid) >= 256 * 256 * 4
        with open(f"/proc/{w.pid}/maps") as f:
            mapping = next(line for line in f if "-weights" in line and "memfd:libtorchrt-" in line)
        assert mapping.split()[1].startswith("r-"), f"mapped writable: {mapping}"
    for w in private.workers():
        assert w.flags["ENABLE_WEIGHT_SHARING"] is False and _mapped_weights(w.pid) == 0
    expected = model(x, zero)
    for _ in range(4):  # both instances answer (least-loaded routing)
        torch.testing.assert_close(shared.infer("shared", [x, zero])["OUTPUT__0"], expected)
        torch.testing.assert_close(private.infer("private", [x, zero])["OUTPUT__0"], expected)


def test_a_worker_that_writes_into_its_weights_dies_alone(
    make_pool: Callable[..., Any], poker: tuple[Path, torch.nn.Module]
) -> None:
    """Sharing asked for explicitly: the fault is the protection, and the replacement
    maps the same, unchanged weights."""
    path, model = poker
    x, zero, one = torch.randn(2, 256), torch.zeros(1), torch.ones(1)
    pool = make_pool(ModelConfig("m", path, instances=2, max_retries=0, parameters={"ENABLE_WEIGHT_SHARING": "true"}))
    pids = {w.pid for w in pool.workers()}
    with pytest.raises(WorkerDiedError) as e:
        pool.infer("m", [x, one])
    assert "signal 11" in str(e.value) or "SIGSEGV" in str(e.value), str(e.value)
    expected = model(x, zero)
    for _ in range(6):  # the sibling (and, once ready, the replacement) answer as before
        torch.testing.assert_close(pool.infer("m", [x, zero], timeout=60)["OUTPUT__0"], expected)
    health = pool.health()
    assert sum(i.restarts for i in health["m"].instances) >= 1
    assert {w.pid for w in pool.workers()} != pids
    assert all(w.flags["ENABLE_WEIGHT_SHARING"] for w in pool.workers() if w.state == "ready")


class _Counter(torch.nn.Module):
    """Counts its calls in a buffer: a model that writes into its weights on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1.0)
        return x + self.calls


def test_by_default_a_model_that_writes_into_its_weights_is_served_unshared(
    make_pool: Callable[..., Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Sharing is on by default; a model that turns out to write into its weights
    costs one worker's death (its request is re-sent), then runs unshared."""
    path = tmp_path / "counter.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(_Counter()).save(str(path))
    pool = make_pool(ModelConfig("counter", path, instances=2))
    x = torch.zeros(1)
    assert float(pool.infer("counter", [x], timeout=60)["OUTPUT__0"]) == 1.0
    assert any("writes into its weights" in r.getMessage() for r in caplog.records)
    for _ in range(3):
        pool.infer("counter", [x], timeout=60)
    assert not any(w.flags["ENABLE_WEIGHT_SHARING"] for w in pool.workers() if w.state == "ready")

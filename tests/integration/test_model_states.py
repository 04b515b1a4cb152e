"""Repository semantics at run time: versions served by policy and chosen per request,
broken models isolated (and listed with their error), and warm-up before READY."""

from __future__ import annotations

import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from libtorchrt import (
    ConfigError,
    ModelConfig,
    ModelUnavailableError,
    Pool,
    TensorSpec,
    UnknownModelError,
    WorkerStartError,
)
from tests.conftest import assert_no_leaks, snapshot


class AddConst(nn.Module):
    """``x + k``: each version of a model adds its own constant."""

    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: Tensor) -> Tensor:
        return x + self.k


class Counter(nn.Module):
    """Returns how many times it has run (its warm-up included)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        self.calls.add_(1.0)
        return self.calls.clone()


class HatesZeros(nn.Module):
    """Raises on an all-zero input (so a zero-data warm-up fails)."""

    def forward(self, x: Tensor) -> Tensor:
        if bool((x == 0).all()):
            raise RuntimeError("all-zero input")
        return x


def save(module: nn.Module, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.jit.script(module).save(str(path))
    return path


def model(repo: Path, name: str, config: str, versions: dict[int, nn.Module]) -> None:
    (repo / name).mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(config)
    for v, module in versions.items():
        save(module, repo / name / str(v) / "model.pt")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return tmp_path / "repo"


@pytest.fixture
def pool_of(repo: Path) -> Callable[..., Pool]:
    before = snapshot()
    pools: list[Pool] = []

    def make(**kwargs: object) -> Pool:
        pool = Pool(repo, **kwargs)  # type: ignore[arg-type]
        pools.append(pool)
        return pool

    yield make  # type: ignore[misc]
    for pool in pools:
        pool.close()
    assert_no_leaks(before)


X = torch.zeros(2)
ADDERS = {1: AddConst(1.0), 2: AddConst(2.0), 3: AddConst(3.0)}


@pytest.mark.parametrize(
    ("policy", "served"),
    [
        ("", [3]),
        ("version_policy: { latest: { num_versions: 2 } }\n", [2, 3]),
        ("version_policy: { all: {} }\n", [1, 2, 3]),
        ("version_policy: { specific: { versions: [1, 3] } }\n", [1, 3]),
    ],
    ids=["default-latest-1", "latest-2", "all", "specific"],
)
def test_version_policy_picks_versions_and_requests_pick_one(
    repo: Path, pool_of: Callable[..., Pool], policy: str, served: list[int]
) -> None:
    model(repo, "adder", 'platform: "pytorch_libtorch"\n' + policy, ADDERS)
    pool = pool_of()
    assert [(s.name, s.version, s.state) for s in pool.models()] == [("adder", v, "ready") for v in served]
    assert torch.equal(pool.infer("adder", X)["OUTPUT__0"], X + max(served))  # default: the highest
    for v in served:
        assert torch.equal(pool.infer("adder", X, version=v)["OUTPUT__0"], X + v)
        assert {w.version for w in pool.workers()} == set(served)
    for v in {1, 2, 3, 9} - set(served):
        with pytest.raises(UnknownModelError, match=re.escape(f"has no version {v}; it serves versions {served}")):
            pool.infer("adder", X, version=v)
    health = pool.health()
    assert health["adder"].version == max(served) and health["adder"].state == "ready"
    if len(served) > 1:
        assert {f"adder/{v}" for v in served} <= set(health)


def test_a_broken_model_is_listed_with_its_error_and_the_others_serve(
    repo: Path, pool_of: Callable[..., Pool], model_dir: Path
) -> None:
    model(repo, "good", 'platform: "pytorch_libtorch"\n', {1: AddConst(1.0)})
    model(repo, "bad_config", 'platform: "pytorch_libtorch"\ninput [ { name: "x" data_type: TYPE_FP32 } ]\n', {})
    (repo / "garbage" / "1").mkdir(parents=True)
    (repo / "garbage" / "1" / "model.pt").write_bytes(b"not a TorchScript archive")
    (repo / "garbage" / "config.pbtxt").write_text('platform: "pytorch_libtorch"\n')
    with pytest.warns(RuntimeWarning, match="not served"):
        pool = pool_of()
    states = {s.name: s for s in pool.models()}
    assert states["good"].state == "ready" and states["good"].error is None
    assert states["bad_config"].state == "failed" and states["bad_config"].version is None
    assert "config.pbtxt" in (states["bad_config"].error or "")
    assert states["garbage"].state == "failed" and states["garbage"].version == 1
    assert "failed to start" in (states["garbage"].error or "")
    assert torch.equal(pool.infer("good", X)["OUTPUT__0"], X + 1)
    for name in ("bad_config", "garbage"):
        with pytest.raises(ModelUnavailableError, match="failed to load"):
            pool.infer(name, X)
    assert pool.health()["garbage"].state == "failed"
    assert not [w for w in pool.workers() if w.model == "garbage" and w.state != "stopped"]


def test_strict_fails_the_pool_on_a_broken_model(repo: Path, model_dir: Path) -> None:
    before = snapshot()
    model(repo, "good", 'platform: "pytorch_libtorch"\n', {1: AddConst(1.0)})
    (repo / "garbage" / "1").mkdir(parents=True)
    (repo / "garbage" / "1" / "model.pt").write_bytes(b"not a TorchScript archive")
    (repo / "garbage" / "config.pbtxt").write_text('platform: "pytorch_libtorch"\n')
    with pytest.raises(WorkerStartError, match="garbage"):
        Pool(repo, strict=True)
    (repo / "bad").mkdir()
    (repo / "bad" / "config.pbtxt").write_text('platform: "pytorch_libtorch"\nnot_a_field: 1\n')
    with pytest.raises(ConfigError, match="not_a_field"):
        Pool(repo, strict=True)
    assert_no_leaks(before)


def test_when_no_model_loads_the_pool_fails(repo: Path) -> None:
    (repo / "garbage" / "1").mkdir(parents=True)
    (repo / "garbage" / "1" / "model.pt").write_bytes(b"not a TorchScript archive")
    (repo / "garbage" / "config.pbtxt").write_text('platform: "pytorch_libtorch"\n')
    with pytest.raises(WorkerStartError, match="garbage"):
        Pool(repo)


COUNTER_CONFIG = """
platform: "pytorch_libtorch"
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 2 ] } ]
parameters { key: "INFERENCE_MODE" value: { string_value: "false" } }
"""


@pytest.mark.parametrize(
    ("extra", "runs"),
    [
        (
            'model_warmup [ { name: "zeros" batch_size: 1 count: 3 inputs { key: "INPUT__0" value: '
            "{ data_type: TYPE_FP32 dims: [ 2 ] zero_data: true } } } ]\n",
            3,
        ),
        (
            'model_warmup [ { name: "random" batch_size: 1 inputs { key: "INPUT__0" value: '
            "{ data_type: TYPE_FP32 dims: [ 2 ] random_data: true } } } ]\n",
            1,
        ),
        (
            'model_warmup [ { name: "file" batch_size: 1 count: 2 inputs { key: "INPUT__0" value: '
            '{ data_type: TYPE_FP32 dims: [ 2 ] input_data_file: "two_floats" } } } ]\n',
            2,
        ),
        ('parameters { key: "WARMUP_RUNS" value: { string_value: "4" } }\n', 4),
    ],
    ids=["zero-data-count-3", "random-data", "data-file", "WARMUP_RUNS"],
)
def test_every_instance_warms_up_before_it_is_ready(
    repo: Path, pool_of: Callable[..., Pool], extra: str, runs: int
) -> None:
    model(repo, "counter", COUNTER_CONFIG + extra + "instance_group [ { count: 2 kind: KIND_CPU } ]\n", {1: Counter()})
    (repo / "counter" / "warmup").mkdir()
    (repo / "counter" / "warmup" / "two_floats").write_bytes(torch.tensor([1.0, 2.0]).numpy().tobytes())
    pool = pool_of()
    assert all(w.state == "ready" and w.served == 0 for w in pool.workers())  # warm-ups are not requests
    # Each instance has run its warm-up: whichever serves, the count starts after it.
    for _ in range(4):
        assert pool.infer("counter", torch.ones(2))["OUTPUT__0"].item() > runs


def test_python_warmup_n_uses_the_declared_inputs(
    model_dir: Path, make_pool: Callable[..., Pool], tmp_path: Path
) -> None:
    cfg = ModelConfig(
        "counter",
        save(Counter(), tmp_path / "counter.pt"),
        inputs=[TensorSpec("INPUT__0", "float32", [2])],
        parameters={"INFERENCE_MODE": "false"},
        warmup=5,
    )
    assert cfg.warmup_runs == 5
    pool = make_pool(cfg)
    assert pool.infer("counter", torch.ones(2))["OUTPUT__0"].item() == 6


def test_a_failing_warm_up_fails_the_model_with_its_error(repo: Path, pool_of: Callable[..., Pool]) -> None:
    model(repo, "good", 'platform: "pytorch_libtorch"\n', {1: AddConst(1.0)})
    model(
        repo,
        "picky",
        'platform: "pytorch_libtorch"\ninput [ { name: "x" data_type: TYPE_FP32 dims: [ 3 ] } ]\n'
        'parameters { key: "WARMUP_RUNS" value: { string_value: "1" } }\n',
        {1: HatesZeros()},
    )
    with pytest.warns(RuntimeWarning, match="warm-up failed"):
        pool = pool_of()
    states = {s.name: s for s in pool.models()}
    assert states["picky"].state == "failed"
    assert "warm-up failed" in (states["picky"].error or "") and "all-zero input" in (states["picky"].error or "")
    assert torch.equal(pool.infer("good", X)["OUTPUT__0"], X + 1)


def test_a_restarted_worker_warms_up_again(repo: Path, pool_of: Callable[..., Pool]) -> None:
    import os
    import signal
    import time

    model(
        repo,
        "counter",
        COUNTER_CONFIG + 'parameters { key: "WARMUP_RUNS" value: { string_value: "3" } }\n',
        {1: Counter()},
    )
    pool = pool_of()
    (w,) = pool.workers()
    assert pool.infer("counter", torch.ones(2))["OUTPUT__0"].item() == 4
    os.kill(w.pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (pool.workers()[0].pid != w.pid and pool.workers()[0].state == "ready"):
        time.sleep(0.05)
    assert pool.infer("counter", torch.ones(2))["OUTPUT__0"].item() == 4  # a fresh process, warmed up again
    shutil.rmtree(repo / "counter" / "1")  # (the repository is read only at start)

"""Models loaded, loaded anew and unloaded while the pool serves (``Pool.load``,
``Pool.unload``; front/control.py), with real workers: no request of another model
fails, none of a model loaded anew is dropped, an unloaded model leaves nothing behind."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from libtorchrt import (
    ConfigError,
    ModelConfig,
    ModelUnavailableError,
    PoolClosedError,
    TensorSpec,
    UnknownModelError,
    WorkerStartError,
)
from tests.conftest import assert_no_leaks, snapshot, wait_for

pytestmark = pytest.mark.timeout(300)


class Slow(nn.Module):
    """Busy for seconds on any input (a warm-up that takes long)."""

    def forward(self, x: Tensor) -> Tensor:
        acc = torch.zeros(1)
        for _ in range(50_000_000):
            acc = acc + torch.ones(1)
        return x + acc


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _pids(pool: Any, model: str) -> set[int]:
    return {w.pid for w in pool.workers() if w.model == model}


class Traffic:
    """Threads sending requests to ``model`` until stopped; every answer and error kept."""

    def __init__(self, pool: Any, model: str, make: Callable[[int], list[Tensor]], threads: int = 3) -> None:
        self.pool, self.model, self.make = pool, model, make
        self.answers: list[list[float]] = [[] for _ in range(threads)]
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(k,)) for k in range(threads)]

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        wait_for(lambda: all(self.answers), 60, f"requests to {self.model} to be answered")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def _run(self, k: int) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            inputs = self.make(i)
            try:
                out = self.pool.infer(self.model, inputs, timeout=60)
                # the answer over the input: which version answered (1: identity, 2: raiser)
                self.answers[k].append(float(out["OUTPUT__0"].reshape(-1)[0] / inputs[0].reshape(-1)[0]))
            except Exception as e:
                self.errors.append(e)

    def count(self) -> int:
        return sum(map(len, self.answers))


def test_load_reload_and_unload_while_another_model_serves(make_pool, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(ModelConfig("tiny", model_dir / "tiny.pt", instances=2))
    tiny = _pids(pool, "tiny")
    with Traffic(pool, "tiny", lambda i: [torch.rand(1, 64) + 1]) as other:
        pool.load(ModelConfig("m", model_dir / "identity.pt", instances=2))
        assert pool.infer("m", [torch.tensor([3.0])])["OUTPUT__0"].item() == 3.0
        first = _pids(pool, "m")
        # Loaded anew while it serves a steady stream: nothing dropped, and the new file answers.
        with Traffic(pool, "m", lambda i: [torch.tensor([float(i % 7 + 1)])]) as same:
            before = same.count()
            pool.load(ModelConfig("m", model_dir / "raiser.pt", instances=2))  # x * 2
            mark = same.count()
            # (every thread: a total alone let one starved thread end on the old version)
            wait_for(lambda: same.count() > mark + 20, 60, "requests to the new version")
            wait_for(lambda: all(a[-1] == 2.0 for a in same.answers), 60, "every thread to meet the new version")
        assert not same.errors, same.errors[:3]
        assert same.count() > before
        for answers in same.answers:  # each thread: the old version's answers, then the new one's
            assert set(answers) == {1.0, 2.0}, answers
            assert answers == sorted(answers), "an answer of the old version after one of the new"
        assert pool.infer("m", [torch.tensor([5.0])])["OUTPUT__0"].item() == 10.0
        wait_for(lambda: not _pids(pool, "m") & first, 30, "the old version's workers to be gone")
        assert not any(map(_alive, first))
        second = _pids(pool, "m")
        assert len(second) == 2
        pool.unload("m")
        assert not any(map(_alive, second)), "workers of the unloaded model remain"
        assert not _pids(pool, "m")
        with pytest.raises(UnknownModelError):
            pool.infer("m", [torch.tensor([1.0])])
        assert [s.name for s in pool.models()] == ["tiny"]
    assert not other.errors, other.errors[:3]
    assert _pids(pool, "tiny") == tiny, "the other model's workers were touched"


def test_unload_lets_requests_in_flight_finish_and_refuses_new_ones(make_pool, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool("tiny", ModelConfig("spin", model_dir / "spin.pt"))
    running = pool.submit("spin", [torch.tensor([1_000_000.0])])  # about a second and a half
    queued = pool.submit("spin", [torch.tensor([10.0])])
    wait_for(lambda: pool.workers()[-1].inflight >= 1, 30, "the request to reach the worker")
    unloading = threading.Thread(target=pool.unload, args=("spin",))
    unloading.start()
    wait_for(lambda: [s.state for s in pool.models() if s.name == "spin"] == ["unloading"], 30, "spin to unload")
    with pytest.raises(UnknownModelError):
        pool.submit("spin", [torch.tensor([1.0])])
    assert pool.infer("tiny", [torch.randn(1, 64)])["OUTPUT__0"].shape == (1, 64)
    unloading.join(60)
    assert not unloading.is_alive()
    assert running.result(0)["OUTPUT__0"].item() == 1_000_000.0  # finished, not dropped
    assert queued.result(0)["OUTPUT__0"].item() == 10.0
    assert [s.name for s in pool.models()] == ["tiny"]


def test_unload_with_a_grace_fails_what_is_left_after_it(make_pool, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool("tiny", ModelConfig("spin", model_dir / "spin.pt"))
    hung = pool.submit("spin", [torch.tensor([100_000_000.0])])  # minutes
    wait_for(lambda: pool.workers()[-1].inflight == 1, 30, "the request to reach the worker")
    pid = pool.workers()[-1].pid
    t0 = time.monotonic()
    pool.unload("spin", grace=0.2)
    assert time.monotonic() - t0 < 5  # the late calls' second, the grace, then the busy worker is killed
    with pytest.raises(ModelUnavailableError, match="unloaded"):
        hung.result(0)
    assert not _alive(pid)


def test_an_unloaded_model_leaves_no_descriptor_mapping_or_process(make_pool, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool("tiny", start_method="spawn")  # (spawned workers are this process's children)
    before = snapshot()
    pool.load(ModelConfig("m", model_dir / "tiny.pt", instances=2))
    out = pool.infer("m", [torch.randn(1, 64)])
    assert out["OUTPUT__0"].shape == (1, 64)
    del out
    pool.load(ModelConfig("m", model_dir / "tiny.pt", instances=1))  # anew: the old record retires
    pool.unload("m")
    assert_no_leaks(before)
    pool.load(ModelConfig("m", model_dir / "identity.pt"))  # loaded again under the same name
    assert pool.infer("m", [torch.tensor([4.0])])["OUTPUT__0"].item() == 4.0


def test_versions_added_and_removed(make_pool, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool("tiny")
    pool.load([ModelConfig("m", model_dir / "identity.pt", version=1),
               ModelConfig("m", model_dir / "raiser.pt", version=2)])  # fmt: skip
    assert pool.infer("m", [torch.tensor([3.0])])["OUTPUT__0"].item() == 6.0  # the highest by default
    assert pool.infer("m", [torch.tensor([3.0])], version=1)["OUTPUT__0"].item() == 3.0
    pool.load([ModelConfig("m", model_dir / "identity.pt", version=3)])
    assert [(s.name, s.version) for s in pool.models()] == [("m", 3), ("tiny", 1)]
    with pytest.raises(UnknownModelError, match="no version 2"):
        pool.infer("m", [torch.tensor([3.0])], version=2)
    assert pool.infer("m", [torch.tensor([3.0])])["OUTPUT__0"].item() == 3.0


def test_a_failed_load_leaves_the_model_as_it_was(make_pool, model_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a TorchScript archive")
    pool = make_pool("tiny", ModelConfig("m", model_dir / "identity.pt"))
    served = _pids(pool, "m")
    with pytest.raises(WorkerStartError):
        pool.load(ModelConfig("m", broken, instances=2))
    assert _pids(pool, "m") == served  # the failed load's workers are gone, the old ones serve
    assert pool.infer("m", [torch.tensor([2.0])])["OUTPUT__0"].item() == 2.0
    # A model never served that fails to load is listed as failed, and its requests say why.
    with pytest.raises(WorkerStartError):
        pool.load(ModelConfig("new", broken))
    failed = [s for s in pool.models() if s.name == "new"]
    assert [s.state for s in failed] == ["failed"] and failed[0].error
    with pytest.raises(ModelUnavailableError):
        pool.infer("new", [torch.tensor([1.0])])
    pool.load(ModelConfig("new", model_dir / "identity.pt"))  # fixed: served, the failure forgotten
    assert [s.state for s in pool.models() if s.name == "new"] == ["ready"]
    with pytest.raises(ConfigError, match="no model file"):
        pool.load(ModelConfig("m", tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="one model"):
        pool.load([ModelConfig("a", model_dir / "identity.pt"), ModelConfig("b", model_dir / "identity.pt")])
    with pytest.raises(UnknownModelError):
        pool.unload("never")


def test_a_load_that_outlives_start_timeout_fails(make_pool, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    torch.jit.script(Slow()).save(str(tmp_path / "slow.pt"))
    pool = make_pool("tiny", start_timeout=10.0)
    slow = ModelConfig("slow", tmp_path / "slow.pt", inputs=[TensorSpec("x", "float32", [1])], warmup=1)
    t0 = time.monotonic()
    with pytest.raises(WorkerStartError, match="did not warm up within start_timeout=10"):
        pool.load(slow)
    assert time.monotonic() - t0 < 30
    assert not _pids(pool, "slow")


def test_closing_the_pool_during_a_load_fails_the_load(model_dir: Path, tmp_path: Path) -> None:
    from libtorchrt import Pool

    torch.jit.script(Slow()).save(str(tmp_path / "slow.pt"))
    before = snapshot()
    pool = Pool(models=[ModelConfig("tiny", model_dir / "tiny.pt")])
    slow = ModelConfig("slow", tmp_path / "slow.pt", inputs=[TensorSpec("x", "float32", [1])], warmup=1)
    failure: list[BaseException] = []

    def load() -> None:
        try:
            pool.load(slow)
        except BaseException as e:
            failure.append(e)

    loading = threading.Thread(target=load)
    loading.start()
    wait_for(lambda: any(s.name == "slow" and s.state == "loading" for s in pool.models()), 30, "the load to start")
    workers = {w.pid for w in pool.workers()}
    t0 = time.monotonic()
    pool.close()
    assert time.monotonic() - t0 < 15
    loading.join(30)
    assert len(failure) == 1 and isinstance(failure[0], PoolClosedError), failure
    assert_no_leaks(before)
    wait_for(lambda: not any(map(_alive, workers)), 10, "every worker to exit")


def test_a_pool_may_start_without_models_and_load_them(model_dir: Path, tmp_path: Path) -> None:
    from libtorchrt import Pool

    repo = tmp_path / "repo"
    (repo / "ident" / "1").mkdir(parents=True)
    (repo / "ident" / "1" / "model.pt").write_bytes((model_dir / "identity.pt").read_bytes())
    (repo / "ident" / "config.pbtxt").write_text('name: "ident"\nplatform: "pytorch_libtorch"\n')
    before = snapshot()
    with Pool(repo, load_models=[]) as pool:
        assert pool.models() == []
        pool.load("ident")  # read from the repository
        assert pool.infer("ident", [torch.tensor([2.0])])["OUTPUT__0"].item() == 2.0
        with pytest.raises(ConfigError, match="has no model 'nope'"):
            pool.load("nope")
    assert_no_leaks(before)
    with Pool(repo, load_models=["ident"]) as pool:
        assert [s.name for s in pool.models()] == ["ident"]
    assert_no_leaks(before)

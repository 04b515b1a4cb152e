"""Start-up, shutdown and failure: what a pool leaves behind, and how fast it goes."""

from __future__ import annotations

import builtins
import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from libtorchrt import (
    ConfigError,
    ModelConfig,
    Pool,
    PoolClosedError,
    TimeoutError,
    WorkerDiedError,
    WorkerStartError,
)
from tests.conftest import assert_no_leaks, snapshot, wait_for


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_close_is_idempotent_bounded_and_refuses_new_requests(make_pool) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool("tiny")
    pids = [w.pid for w in pool.workers()]
    pending = [pool.submit("tiny", [torch.randn(1, 64)]) for _ in range(20)]
    start = time.monotonic()
    pool.close()
    assert time.monotonic() - start < 10
    # what was submitted before close() drained, not dropped
    assert all(f.result(timeout=1)["OUTPUT__0"].shape == (1, 64) for f in pending)
    pool.close()
    assert pool.closed
    with pytest.raises(PoolClosedError):
        pool.infer("tiny", [torch.randn(1, 64)])
    assert not any(_pid_alive(p) for p in pids)


def test_leaving_the_with_block_on_an_exception_cleans_up(model_dir: Path) -> None:
    before = snapshot()
    with pytest.raises(KeyError), Pool(models=[ModelConfig("tiny", model_dir / "tiny.pt", instances=2)]) as pool:
        pool.infer("tiny", [torch.randn(1, 64)])
        raise KeyError("boom")
    assert_no_leaks(before)


def test_close_returns_in_bounded_time_when_the_model_hangs(make_pool) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool("spin")
    hung = pool.submit("spin", [torch.tensor([10_000_000.0])])  # minutes of work
    wait_for(lambda: pool.workers()[0].inflight == 1, 30, "the request to reach the worker")
    start = time.monotonic()
    pool.close(grace=0.5)
    assert time.monotonic() - start < 5
    with pytest.raises(PoolClosedError):
        hung.result(timeout=1)


def test_infer_timeout_raises_a_typed_error(make_pool) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool("spin")
    with pytest.raises(TimeoutError) as info:
        pool.infer("spin", [torch.tensor([10_000_000.0])], timeout=0.2)
    assert isinstance(info.value, builtins.TimeoutError)  # catchable as the builtin too


def test_a_worker_that_cannot_load_its_model_fails_the_start(tmp_path: Path) -> None:
    before = snapshot()
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"this is not a TorchScript archive")
    with pytest.raises(WorkerStartError) as info:
        Pool(models=[ModelConfig("broken", bad)])
    assert info.value.model == "broken"
    assert "garbage.pt" in str(info.value) or "archive" in str(info.value).lower()
    assert_no_leaks(before)


def test_a_missing_model_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no model file"):
        Pool(models=[ModelConfig("ghost", tmp_path / "nope.pt")])


def test_a_killed_worker_fails_its_requests_with_worker_died(make_pool, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(ModelConfig("spin", model_dir / "spin.pt", max_retries=0))
    (w,) = pool.workers()
    fut = pool.submit("spin", [torch.tensor([10_000_000.0])])  # minutes of work
    wait_for(lambda: pool.workers()[0].inflight == 1, 30, "the request to reach the worker")
    os.kill(w.pid, signal.SIGKILL)
    # Failed long before the request could have ended: the death was seen (as an event,
    # not by a periodic check: see test_front_promises.py).
    with pytest.raises(WorkerDiedError) as info:
        fut.result(timeout=30)
    err = info.value
    assert (err.model, err.instance, err.pid, err.signal) == ("spin", 0, w.pid, signal.SIGKILL)
    assert pool.health()["spin"].instances[0].restarts == 1  # and it is being replaced


def test_workers_exit_when_the_front_is_killed(model_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "front.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, time
            from libtorchrt import Pool, ModelConfig
            pool = Pool(models=[ModelConfig("tiny", {str(model_dir / "tiny.pt")!r}, instances=2)])
            print(" ".join(str(w.pid) for w in pool.workers()), flush=True)
            print(pool._router._dir.path, flush=True)
            time.sleep(60)
            """
        )
    )
    front = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert front.stdout is not None
        pids = [int(p) for p in front.stdout.readline().split()]
        endpoints = Path(front.stdout.readline().strip())
        assert len(pids) == 2 and all(_pid_alive(p) for p in pids) and endpoints.is_dir()
        front.kill()
        front.wait(10)
        deadline = time.monotonic() + 2.0
        while any(_pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not any(_pid_alive(p) for p in pids), "workers outlived their front by more than 2 s"
        assert not endpoints.exists(), f"the dead front's ipc directory remains: {list(endpoints.iterdir())}"
    finally:
        front.kill()
        front.wait(10)
    assert not [n for n in os.listdir("/dev/shm") if "torchrt" in n]


def test_an_unclosed_pool_warns_and_is_closed_when_collected(model_dir: Path) -> None:
    before = snapshot()
    pool = Pool(models=[ModelConfig("tiny", model_dir / "tiny.pt")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del pool
        gc.collect()
    assert any(issubclass(w.category, ResourceWarning) for w in caught)
    assert_no_leaks(before)


def test_outputs_held_across_close_stay_readable(model_dir: Path) -> None:
    before = snapshot()
    with Pool(models=[ModelConfig("identity", model_dir / "identity.pt")]) as pool:
        x = torch.randn(512, 512)  # 1 MiB: a zero-copy view of the worker's response arena
        y = pool.infer("identity", [x])["OUTPUT__0"]
    # the pool is closed and its worker gone; the caller's tensor must still be valid
    assert torch.equal(y, x)
    del y
    assert_no_leaks(before)


def test_busy_polling_serves_the_same_results(make_pool, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool("tiny", "add", busy_poll_us=200)
    a, b = torch.arange(3.0), torch.ones(3)
    for _ in range(50):
        assert torch.equal(pool.infer("add", [a, b], timeout=10)["OUTPUT__0"], a + b)
    assert pool.infer("tiny", [torch.randn(2, 64)], timeout=10)["OUTPUT__0"].shape == (2, 64)

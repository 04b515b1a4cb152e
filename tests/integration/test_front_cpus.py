"""``Pool(front_cpus=...)`` on real processes: while the pool is open every thread of
this process (the caller's, the router's, ZeroMQ's) runs on the front's CPUs but the
fast lane's hub (native: it runs anywhere), and every thread of every worker on the
others, as ``Pool.workers()`` reports; close() gives this process's threads their CPUs
back; a bad value starts nothing."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from libtorchrt import ConfigError, ModelConfig, Pool
from libtorchrt.transport import lanes
from tests.conftest import assert_no_leaks, snapshot

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to split between front and workers"),
]


def named(tid: int) -> str:
    with open(f"/proc/self/task/{tid}/comm") as f:
        return f.read().strip()


def cpus_of(pid: int) -> dict[int, frozenset[int]]:
    """Every thread of process ``pid``, and the CPUs it may run on."""
    return {int(t): frozenset(os.sched_getaffinity(int(t))) for t in os.listdir(f"/proc/{pid}/task")}


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_the_front_and_the_workers_run_on_their_own_cpus(
    make_pool: Callable[..., Pool], model_dir: Path, start_method: str
) -> None:
    cpus = frozenset(os.sched_getaffinity(0))
    front, rest = frozenset({min(cpus)}), cpus - {min(cpus)}
    before = cpus_of(os.getpid())
    pool = make_pool(ModelConfig("tiny", model_dir / "tiny.pt", instances=2), front_cpus=1, start_method=start_method)
    x = torch.randn(3, 64)
    assert torch.equal(pool.infer("tiny", {"INPUT__0": x})["OUTPUT__0"], pool.infer("tiny", [x])["OUTPUT__0"])
    mine = cpus_of(os.getpid())
    assert len(mine) > len(before)  # (the pool's threads: router, hub, ZeroMQ's)
    hubs = [tid for tid in mine if named(tid) == "libtorchrt-hub"]
    assert len(hubs) == (1 if lanes.available else 0)
    assert {cpus_of_hub for tid, cpus_of_hub in mine.items() if tid in hubs} <= {cpus}
    assert {c for tid, c in mine.items() if tid not in hubs} == {front}
    workers = pool.workers()
    assert len(workers) == 2
    for w in workers:
        assert w.cpus == tuple(sorted(rest))
        threads = cpus_of(w.pid)
        assert len(threads) > 1 and set(threads.values()) == {rest}  # (its ZeroMQ and torch threads too)
    pool.close()
    after = cpus_of(os.getpid())
    assert set(after.values()) == {cpus}


def test_without_front_cpus_nothing_is_pinned(make_pool: Callable[..., Pool], model_dir: Path) -> None:
    cpus = frozenset(os.sched_getaffinity(0))
    pool = make_pool(ModelConfig("tiny", model_dir / "tiny.pt"))
    assert set(cpus_of(os.getpid()).values()) == {cpus}
    [w] = pool.workers()
    assert w.cpus == tuple(sorted(cpus)) and set(cpus_of(w.pid).values()) == {cpus}


@pytest.mark.parametrize("value", [0, True, [10_000], "all", 10_000])
def test_a_bad_front_cpus_starts_nothing(model_dir: Path, value: Any) -> None:
    before = snapshot()
    cpus = frozenset(os.sched_getaffinity(0))
    with pytest.raises(ConfigError, match="front_cpus"):
        Pool(models=[ModelConfig("tiny", model_dir / "tiny.pt")], front_cpus=value)
    assert set(cpus_of(os.getpid()).values()) == {cpus}
    assert_no_leaks(before)


def test_one_open_pool_of_a_process_pins_it(make_pool: Callable[..., Pool], model_dir: Path) -> None:
    cpus = frozenset(os.sched_getaffinity(0))
    first = make_pool(ModelConfig("tiny", model_dir / "tiny.pt"), front_cpus=1)
    before = snapshot()
    with pytest.raises(ConfigError, match="set by another open pool"):
        Pool(models=[ModelConfig("tiny", model_dir / "tiny.pt")], front_cpus=1)
    assert_no_leaks(before)
    held = {c for tid, c in cpus_of(os.getpid()).items() if named(tid) != "libtorchrt-hub"}
    assert held == {frozenset({min(cpus)})}  # (the first pool's pin stands)
    first.close()
    with Pool(models=[ModelConfig("tiny", model_dir / "tiny.pt")], front_cpus=[max(cpus)]) as again:
        assert {c for tid, c in cpus_of(os.getpid()).items() if named(tid) != "libtorchrt-hub"} == {
            frozenset({max(cpus)})
        }
        assert again.infer("tiny", [torch.ones(1, 64)])["OUTPUT__0"].shape == (1, 64)
    assert set(cpus_of(os.getpid()).values()) == {cpus}

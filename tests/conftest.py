"""Shared fixtures: test models, and the resource checks every pool must pass."""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import models, pt2_models


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("models")
    for name in models.MODELS:
        models.save(name, d)
    return d


@pytest.fixture(scope="session")
def pt2_artifacts(tmp_path_factory: pytest.TempPathFactory) -> pt2_models.Pt2Artifacts:
    """The PyTorch 2 artifacts (tests/pt2_models.py), built once per test run: the one
    AOTInductor compilation of the test suite is here. Under pytest-xdist, the workers'
    base directories share a parent, where the first worker to ask builds them."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return pt2_models.build(tmp_path_factory.mktemp("pt2"))
    return pt2_models.build_once(tmp_path_factory.getbasetemp().parent / "pt2")


@pytest.fixture(scope="session")
def pt2_repository(pt2_artifacts: pt2_models.Pt2Artifacts, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository of one PT2 model per format (``pt2_models.build_repository``)."""
    return pt2_models.build_repository(pt2_artifacts, tmp_path_factory.mktemp("pt2-repository"))


@pytest.fixture(scope="module", autouse=True)
def _no_resource_tracker_left() -> Iterator[None]:
    """multiprocessing.shared_memory (tritonclient's shared-memory helpers, some docs
    examples) starts a resource tracker process on first use, which lives as long as this
    one: stop it after each module, so that the tests that count this process's children
    find none, whatever ran before them (pytest-xdist runs the modules in no set order)."""
    yield
    from multiprocessing import resource_tracker

    tracker: Any = resource_tracker._resource_tracker
    tracker._stop()  # (private; the only way to stop it before the interpreter exits; a no-op if none runs)


def children(pid: int | None = None) -> set[int]:
    """PIDs of the live (non-zombie) children of ``pid`` (default: this process)."""
    me = str(os.getpid() if pid is None else pid)
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] != "Z":
            out.add(int(entry))
    return out


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def shm_mappings() -> list[str]:
    with open("/proc/self/maps") as f:
        return [line for line in f if "libtorchrt" in line or "/dev/shm" in line]


def run_threads(target: Callable[[int], None], n: int) -> None:
    """Run ``target(k)`` for k in 0..n-1, each in a thread of its own, and wait for all."""
    threads = [threading.Thread(target=target, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def wait_for(predicate: Callable[[], object], timeout: float = 30.0, what: str = "the condition") -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` once ``timeout`` seconds
    have passed. For waiting on a state the test cannot be told about by an event (a
    worker busy, a request queued, a restart done): never a bare sleep."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.01)


def snapshot() -> dict[str, Any]:
    return {"children": children(), "fds": open_fds(), "maps": shm_mappings()}


def assert_no_leaks(before: dict[str, Any], timeout: float = 5.0) -> None:
    """Everything a pool created is gone: children, descriptors, shared memory."""
    deadline = time.monotonic() + timeout
    while True:
        gc.collect()
        now = snapshot()
        leaks = {
            "children": now["children"] - before["children"],
            "fds": {fd: _fd_target(fd) for fd in now["fds"] - before["fds"]},
            "maps": [m for m in now["maps"] if m not in before["maps"]],
        }
        if not any(leaks.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"resources left behind after Pool.close(): {leaks}")
        time.sleep(0.05)


def _fd_target(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


@contextlib.contextmanager
def closing_pool(*args: Any, **kwargs: Any) -> Iterator[Any]:
    """A ``Pool(*args, **kwargs)``, closed on exit and checked for leaks: for pools
    that several tests share (module-scoped fixtures), which ``make_pool`` cannot build."""
    from libtorchrt import Pool

    before = snapshot()
    pool = Pool(*args, **kwargs)
    try:
        yield pool
    finally:
        # Every worker the pool ever had; a forked one is not a child of this process
        # (but of the pool's template), which assert_no_leaks would not see.
        workers = {w.pid for w in pool.workers()}
        pool.close()
        assert_no_leaks(before)
        wait_for(lambda: not any(map(_alive, workers)), 5.0, f"the pool's workers {sorted(workers)} to exit")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Asserts after the test that no child process, fd or shared memory remains."""
    before = snapshot()
    yield
    assert_no_leaks(before)


@pytest.fixture
def make_pool(model_dir: Path) -> Iterator[Callable[..., Any]]:
    """Build pools that are closed (and checked for leaks) after the test."""
    from libtorchrt import ModelConfig, Pool

    before = snapshot()
    pools: list[Pool] = []

    def make(*specs: Any, **kwargs: Any) -> Pool:
        configs = [s if isinstance(s, ModelConfig) else ModelConfig(name=s, path=model_dir / f"{s}.pt") for s in specs]
        pool = Pool(models=configs, **kwargs)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()
    assert_no_leaks(before)

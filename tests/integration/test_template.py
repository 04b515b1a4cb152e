"""Workers forked from a template process (``start_method="forkserver"``), on real processes.

The template is the pool's child and the workers are its children; a worker dies, the
template dies, or the front dies: what the pool and the processes do then. See
docs/startup.md.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from libtorchrt import ConfigError, ModelConfig, Pool, WorkerDiedError
from libtorchrt.workers import launcher
from libtorchrt.workers.launcher import UNKNOWN_EXIT
from tests import models
from tests.conftest import children, wait_for

pytestmark = pytest.mark.timeout(180)  # pools start interpreters importing torch: slow on a busy machine


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def _parent(pid: int) -> int:
    return int(_stat(pid)[1])


def _alive(pid: int) -> bool:
    try:
        return _stat(pid)[0] != "Z"
    except OSError:
        return False


def _cmdline(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().split(b"\0")


def _is_template(pid: int) -> bool:
    return _cmdline(pid)[1:3] == [b"-m", b"libtorchrt.workers.template"]


def _template(pool: Pool) -> int:
    """The pid of ``pool``'s (ready) template process."""
    template = pool._router.supervisor.template
    assert template is not None and template.ready
    return template.pid


def _replaced(pool: Pool, instance: int, old: int) -> bool:
    return any(w.instance == instance and w.pid != old and w.state == "ready" for w in pool.workers())


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_both_start_methods_serve_the_same_results(make_pool, model_dir: Path, method: str) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(ModelConfig("tiny", model_dir / "tiny.pt", instances=2), start_method=method)
    reference = models.reference("tiny")
    for _ in range(8):
        x = torch.randn(3, 64)
        torch.testing.assert_close(pool.infer("tiny", [x])["OUTPUT__0"], reference(x))
    pids = [w.pid for w in pool.workers()]
    if method == "forkserver":
        template = _template(pool)
        assert children() == {template}  # the front's only child
        assert _is_template(template) and _parent(template) == os.getpid()
        assert all(_parent(pid) == template for pid in pids)
        # the invariants fork relies on, seen from outside: one thread, no CUDA
        assert os.listdir(f"/proc/{template}/task") == [str(template)]
    else:
        assert pool._router.supervisor.template is None
        assert all(_parent(pid) == os.getpid() for pid in pids)
        assert children() == set(pids)


def test_a_killed_worker_is_replaced_by_a_fork_and_its_signal_reported(make_pool, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(ModelConfig("spin", model_dir / "spin.pt", max_retries=0, instances=2))
    template = _template(pool)
    fut = pool.submit("spin", [torch.tensor([10_000_000.0])])  # minutes of work
    wait_for(lambda: any(x.inflight for x in pool.workers()), 30, "the request to reach a worker")
    (busy,) = [x for x in pool.workers() if x.inflight]
    os.kill(busy.pid, signal.SIGKILL)
    with pytest.raises(WorkerDiedError) as info:
        fut.result(timeout=30)
    assert (info.value.pid, info.value.exitcode, info.value.signal) == (busy.pid, -signal.SIGKILL, signal.SIGKILL)
    health = pool.health()["spin"].instances[busy.instance]
    assert health.restarts == 1 and "killed by signal 9" in (health.last_error or "")
    wait_for(lambda: _replaced(pool, busy.instance, busy.pid), 30, "the replacement")
    (new,) = [x for x in pool.workers() if x.instance == busy.instance]
    assert _parent(new.pid) == template  # forked, not spawned
    assert pool.infer("spin", [torch.tensor([3.0])])["OUTPUT__0"].item() == 3.0


def test_a_killed_template_is_replaced_and_its_workers_keep_serving(make_pool, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(ModelConfig("tiny", model_dir / "tiny.pt", instances=2))
    first = _template(pool)
    before = {w.instance: w.pid for w in pool.workers()}
    os.kill(first, signal.SIGKILL)
    # A template is only a factory: its workers live on, and a new one is started.
    wait_for(lambda: (t := pool._router.supervisor.template) is not None and t.pid != first and t.ready, 120,
             "a new template")  # fmt: skip
    second = _template(pool)
    assert {w.instance: w.pid for w in pool.workers()} == before
    assert all(w.state == "ready" for w in pool.workers())
    x = torch.randn(2, 64)
    torch.testing.assert_close(pool.infer("tiny", [x])["OUTPUT__0"], models.reference("tiny")(x))
    # An orphan of the dead template dies: nobody can say how (its parent is gone)...
    os.kill(before[0], signal.SIGKILL)
    wait_for(lambda: _replaced(pool, 0, before[0]), 60, "the orphan's replacement")
    assert f"exited with code {UNKNOWN_EXIT}" in (pool.health()["tiny"].instances[0].last_error or "")
    # ...and is replaced by a fork of the new template, which serves.
    (new,) = [w for w in pool.workers() if w.instance == 0]
    assert _parent(new.pid) == second
    for _ in range(4):
        torch.testing.assert_close(pool.infer("tiny", [x])["OUTPUT__0"], models.reference("tiny")(x))


def test_a_template_that_does_not_answer_is_replaced_and_the_worker_started_fresh(  # type: ignore[no-untyped-def]
    make_pool, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(launcher, "REPLY_TIMEOUT", 0.5)
    pool = make_pool(ModelConfig("tiny", model_dir / "tiny.pt", instances=2))
    stuck = _template(pool)
    before = {w.instance: w.pid for w in pool.workers()}
    os.kill(stuck, signal.SIGSTOP)  # it gets the next spawn request, and never answers
    os.kill(before[0], signal.SIGKILL)
    wait_for(lambda: _replaced(pool, 0, before[0]), 60, "the replacement")
    (new,) = [w for w in pool.workers() if w.instance == 0]
    assert _parent(new.pid) == os.getpid()  # started fresh, under a new identity
    assert not _alive(stuck)  # killed: it must not fork that worker late
    wait_for(lambda: (t := pool._router.supervisor.template) is not None and t.pid != stuck and t.ready, 120,
             "a new template")  # fmt: skip
    x = torch.randn(2, 64)
    for _ in range(4):
        torch.testing.assert_close(pool.infer("tiny", [x])["OUTPUT__0"], models.reference("tiny")(x))


def test_close_leaves_no_template_worker_fd_or_shared_memory(make_pool) -> None:  # type: ignore[no-untyped-def]
    # (make_pool checks children, fds and mappings after the test; this checks the pids)
    pool = make_pool("tiny", "add")
    template = _template(pool)
    pids = [w.pid for w in pool.workers()]
    pool.infer("tiny", [torch.randn(1, 64)])
    start = time.monotonic()
    pool.close()
    assert time.monotonic() - start < 5
    assert not _alive(template) and not any(_alive(p) for p in pids)
    assert not children()


def test_the_front_killed_leaves_no_template_or_worker(model_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "front.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import time
            from libtorchrt import Pool, ModelConfig
            pool = Pool(models=[ModelConfig("tiny", {str(model_dir / "tiny.pt")!r}, instances=2)])
            print(pool._router.supervisor.template.pid, flush=True)
            print(" ".join(str(w.pid) for w in pool.workers()), flush=True)
            print(pool._router._dir.path, flush=True)
            time.sleep(120)
            """
        )
    )
    front = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert front.stdout is not None
        template = int(front.stdout.readline())
        pids = [int(p) for p in front.stdout.readline().split()]
        endpoints = Path(front.stdout.readline().strip())
        assert len(pids) == 2 and all(_parent(p) == template for p in pids) and _parent(template) == front.pid
        front.kill()
        front.wait(10)
        wait_for(lambda: not any(map(_alive, [template, *pids])), 2.0, "the template and workers to exit")
        assert not endpoints.exists(), f"the dead front's ipc directory remains: {list(endpoints.iterdir())}"
    finally:
        front.kill()
        front.wait(10)


PY_MODEL = """
import os

import torch


class Model(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0 + float(os.environ.get("LIBTORCHRT_TEST_VALUE", "-1"))
"""


def test_each_forked_worker_runs_with_its_own_environment_and_thread_counts(make_pool, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "model.py").write_text(PY_MODEL)
    configs = [
        ModelConfig(
            "custom",
            tmp_path / "model.py",
            env={"LIBTORCHRT_TEST_VALUE": "7", "CUDA_LAUNCH_BLOCKING": "1"},
            parameters={"INTRA_OP_THREAD_COUNT": "2", "INTER_OP_THREAD_COUNT": "1"},
        ),
        ModelConfig("plain", tmp_path / "model.py"),
    ]
    pool = make_pool(*configs)
    template = _template(pool)
    workers = {w.model: w for w in pool.workers()}
    assert all(_parent(w.pid) == template for w in workers.values())
    x = torch.zeros(1)
    assert pool.infer("custom", [x])["OUTPUT__0"].item() == 7.0
    assert pool.infer("plain", [x])["OUTPUT__0"].item() == -1.0  # (nothing leaks between workers)
    custom, plain = workers["custom"].flags, workers["plain"].flags
    assert (custom["CUDA_LAUNCH_BLOCKING"], plain["CUDA_LAUNCH_BLOCKING"]) == (True, False)
    assert (custom["INTRA_OP_THREAD_COUNT"], plain["INTRA_OP_THREAD_COUNT"]) == (2, 1)
    assert custom["INTER_OP_THREAD_COUNT"] == 1
    assert plain["INTER_OP_THREAD_COUNT"] == torch.get_num_interop_threads()  # torch's default, as in a fresh one


def test_a_worker_whose_environment_only_exec_applies_is_started_fresh(make_pool, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    config = ModelConfig("tiny", model_dir / "tiny.pt", env={"PYTHONHASHSEED": "12345"})
    pool = make_pool(config, "add")
    template = _template(pool)
    workers = {w.model: w.pid for w in pool.workers()}
    assert _parent(workers["tiny"]) == os.getpid() and _cmdline(workers["tiny"])[1:3] == [b"-m", b"libtorchrt.workers"]
    assert _parent(workers["add"]) == template
    assert pool.infer("tiny", [torch.randn(1, 64)])["OUTPUT__0"].shape == (1, 64)


def test_an_unknown_start_method_is_a_config_error(model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="start_method"):
        Pool(models=[ModelConfig("tiny", model_dir / "tiny.pt")], start_method="fork")


MALLOC_PROBE = """
import ctypes, os
from libtorchrt.workers import template

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
def in_heap(address):
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith("[heap]"):
                lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
                if lo <= address < hi:
                    return True
    return False
before = in_heap(libc.malloc(8 << 20))
template._malloc({"MALLOC_MMAP_THRESHOLD_": str(32 << 20)}, {})
after = in_heap(libc.malloc(8 << 20))
print(before, after)
"""


def test_malloc_settings_are_applied_after_the_fork() -> None:
    # glibc read MALLOC_MMAP_THRESHOLD_ when the template started; a forked worker
    # applies its own value with mallopt: 8 MiB blocks move from mmap to the heap.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", MALLOC_PROBE], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "True"], out.stderr

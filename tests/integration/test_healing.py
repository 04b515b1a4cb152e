"""Self-healing: workers that die are replaced, their requests re-sent or failed, never lost."""

from __future__ import annotations

import gc
import os
import random
import shutil
import signal
import threading
import weakref
from pathlib import Path

import pytest
import torch

from libtorchrt import (
    InvalidInputError,
    ModelConfig,
    ModelError,
    ModelUnavailableError,
    TimeoutError,
    WorkerDiedError,
)
from tests import models
from tests.conftest import wait_for

LONG = torch.tensor([3_000_000.0])  # a few seconds of spinning
SHORT = torch.tensor([10.0])
# Spin iterations a fresh worker runs for a second or two (its first run of the model
# is unoptimized: ~8 us an iteration on the 2-core VM, ~1 us afterwards).
BUSY = 200_000.0


def _ready_pid(pool, model: str, instance: int = 0) -> int | None:  # type: ignore[no-untyped-def]
    inst = pool.health()[model].instances[instance]
    return inst.pid if inst.state == "ready" else None


def _running(pool, model: str) -> bool:  # type: ignore[no-untyped-def]
    return any(w.inflight for w in pool.workers() if w.model == model and w.state == "ready")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV], ids=["sigkill", "segfault"])
def test_a_killed_worker_is_replaced_and_its_request_retried(make_pool, model_dir: Path, sig: int) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(ModelConfig("spin", model_dir / "spin.pt", max_retries=1))
    old = pool.workers()[0].pid
    fut = pool.submit("spin", [torch.tensor([BUSY])])  # still running when the kill lands
    wait_for(lambda: _running(pool, "spin"), what="the request to run")
    os.kill(old, sig)
    # re-sent to the replacement, which runs it to the end
    assert fut.result(timeout=60)["OUTPUT__0"].item() == BUSY
    health = pool.health()["spin"]
    assert health.state == "ready" and health.instances[0].restarts == 1
    assert f"signal {sig}" in (health.instances[0].last_error or "")
    (replacement,) = pool.workers()
    assert replacement.pid != old
    # The replacement ran it: it was re-sent, not finished by the old worker before the kill.
    assert replacement.served == 1


def test_without_retries_the_request_fails_with_the_signal(make_pool, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(ModelConfig("spin", model_dir / "spin.pt", max_retries=0))
    old = pool.workers()[0].pid
    fut = pool.submit("spin", [LONG])
    queued = pool.submit("spin", [SHORT])  # waits behind it in the same worker: never ran
    wait_for(lambda: _running(pool, "spin"), what="the request to run")
    os.kill(old, signal.SIGKILL)
    with pytest.raises(WorkerDiedError) as info:
        fut.result(timeout=30)
    assert (info.value.pid, info.value.signal, info.value.poison) == (old, signal.SIGKILL, False)
    # the innocent one is re-sent whatever max_retries says
    assert queued.result(timeout=60)["OUTPUT__0"].item() == 10.0


def test_a_request_that_kills_two_workers_fails_as_poison(make_pool, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(ModelConfig("spin", model_dir / "spin.pt", max_retries=5))
    fut = pool.submit("spin", [LONG])
    for _ in range(2):
        wait_for(lambda: _running(pool, "spin"), what="the request to run")
        os.kill(pool.workers()[0].pid, signal.SIGKILL)
        wait_for(lambda: pool.workers()[0].state != "ready" or fut.done(), what="the death to be seen")
    with pytest.raises(WorkerDiedError) as info:
        fut.result(timeout=30)
    assert info.value.poison and "poison" in str(info.value)
    wait_for(lambda: _ready_pid(pool, "spin") is not None, what="the replacement")
    assert pool.infer("spin", [SHORT], timeout=30)["OUTPUT__0"].item() == 10.0


def test_a_sticky_cuda_error_replaces_the_worker(make_pool, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(ModelConfig("sticky", model_dir / "sticky.pt"))
    old = pool.workers()[0].pid
    bad = pool.submit("sticky", [torch.tensor([-1.0])])
    after = [pool.submit("sticky", [torch.tensor([float(i)])]) for i in range(1, 4)]
    with pytest.raises(ModelError, match="illegal memory access"):
        bad.result(timeout=30)
    # the requests queued behind it never ran in the broken worker: they are served by its replacement
    assert [f.result(timeout=60)["OUTPUT__0"].item() for f in after] == [2.0, 4.0, 6.0]
    health = pool.health()["sticky"].instances[0]
    assert health.restarts == 1 and pool.workers()[0].pid != old
    assert "exited with code 3" in (health.last_error or "")


def test_execution_timeout_kills_a_hung_worker(make_pool, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(ModelConfig("spin", model_dir / "spin.pt", execution_timeout=0.5))
    old = pool.workers()[0].pid
    # (minutes of spinning: its own deadline would fail it too, but not in these words)
    with pytest.raises(TimeoutError, match=r"execution_timeout=0\.5"):
        pool.infer("spin", [torch.tensor([1e9])], timeout=60)
    assert pool.infer("spin", [SHORT], timeout=60)["OUTPUT__0"].item() == 10.0
    assert pool.workers()[0].pid != old and pool.health()["spin"].instances[0].restarts == 1


def test_a_deadline_drops_a_queued_request_before_dispatch(make_pool, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    # inline_threshold=0: even these 4-byte inputs take request-arena slots, which must
    # all come back (the expired request's at its deadline, the busy one's at its reply)
    pool = make_pool(ModelConfig("spin", model_dir / "spin.pt"), max_inflight=1, inline_threshold=0)
    arena = pool._router.default["spin"].allocator
    busy = pool.submit("spin", [torch.tensor([1.5 * BUSY])])
    late = pool.submit("spin", [SHORT], timeout=0.2)
    with pytest.raises(TimeoutError, match="deadline"):
        late.result(timeout=30)
    # failed at its deadline while it still waited, not once the instance was free
    assert not busy.done(), "the busy request finished before the deadline: the test proves nothing"
    assert arena.used > 0  # the busy request's slot, held while its worker reads it
    busy.result(timeout=60)
    assert pool.workers()[0].served == 1, "the expired request must never reach the worker"
    assert arena.used == 0


def test_cancelling_a_queued_request_removes_it(make_pool, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(ModelConfig("spin", model_dir / "spin.pt"), max_inflight=1)
    busy = pool.submit("spin", [torch.tensor([300_000.0])])
    queued = pool.submit("spin", [torch.full((100_000,), 10.0)])  # 400 KB: an arena slot
    assert queued.cancel()
    busy.result(timeout=60)
    wait_for(lambda: pool._router.default["spin"].allocator.used == 0, 10, "the cancelled request's slot")
    assert pool.workers()[0].served == 1


def test_an_oversized_request_is_refused_before_allocation(make_pool, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(ModelConfig("identity", model_dir / "identity.pt", max_request_bytes=1 << 20))
    with pytest.raises(InvalidInputError, match="max_request_bytes=1048576"):
        pool.infer("identity", [torch.zeros(2 << 20, dtype=torch.uint8)])
    assert pool._router.default["identity"].allocator.used == 0
    x = torch.tensor([float("nan"), float("inf"), -float("inf")])  # served, not an error
    assert torch.equal(pool.infer("identity", [x])["OUTPUT__0"].isnan(), x.isnan())


def test_a_model_that_keeps_failing_to_start_is_unavailable_then_recovers(
    make_pool, model_dir: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "flaky.pt"
    shutil.copy(model_dir / "tiny.pt", path)
    pool = make_pool(ModelConfig("flaky", path))
    path.write_bytes(b"corrupted")  # every restart from now on fails to load
    os.kill(pool.workers()[0].pid, signal.SIGKILL)
    wait_for(lambda: pool.health()["flaky"].state == "unavailable", 60, "the model to be marked unavailable")
    health = pool.health()["flaky"]
    assert health.instances[0].state == "failed" and health.instances[0].restarts >= 3
    # it fails fast: submit() itself refuses, nothing is queued to wait for a start
    with pytest.raises(ModelUnavailableError, match="keep failing to start"):
        pool.submit("flaky", [torch.randn(1, 64)])
    assert pool.health()["flaky"].queued == 0
    shutil.copy(model_dir / "tiny.pt", path)  # fixed: the next restart succeeds
    wait_for(lambda: pool.health()["flaky"].state == "ready", 60, "the model to recover")
    assert pool.infer("flaky", [torch.randn(1, 64)], timeout=30)["OUTPUT__0"].shape == (1, 64)


def test_chaos_every_request_resolves_and_the_pool_recovers(make_pool, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    # inline_threshold=0 (as benchmarks/chaos.py runs it): every input takes a slot of
    # the request arena, which must all come back however their requests ended.
    pool = make_pool(ModelConfig("tiny", model_dir / "tiny.pt", instances=2, max_retries=1), inline_threshold=0)
    ref = models.reference("tiny")
    results: list[tuple[torch.Tensor, object]] = []
    lock = threading.Lock()
    stop = threading.Event()
    kills = [0]
    issued = [0] * 16

    def caller(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        # 16 threads x 125 = 2000 requests at least, and on until the killer has killed
        # 3 workers: a fast machine serves 2000 before the killer's first 0.2 s are up
        i = 0
        while i < 125 or (kills[0] < 3 and i < 20_000):
            i += 1
            issued[seed] = i
            x = torch.randn(256 if i % 4 == 0 else 1, 64, generator=g)  # 64 KiB, or 256 bytes
            try:
                out: object = pool.infer("tiny", [x], timeout=60)["OUTPUT__0"]
            except Exception as e:  # recorded and checked below
                out = e
            with lock:
                results.append((x, out))

    def killer() -> None:
        rng = random.Random(0)
        while not stop.wait(0.2):
            pids = [w.pid for w in pool.workers() if w.state == "ready"]
            if pids:
                try:
                    os.kill(rng.choice(pids), signal.SIGKILL)
                    kills[0] += 1
                except ProcessLookupError:
                    pass

    threads = [threading.Thread(target=caller, args=(s,)) for s in range(16)]
    k = threading.Thread(target=killer)
    for t in threads:
        t.start()
    k.start()
    for t in threads:
        t.join(120)
    stop.set()
    k.join(10)
    assert not any(t.is_alive() for t in [*threads, k]), "a caller (or the killer) is still waiting"
    assert kills[0] >= 3 and sum(issued) >= 2000
    assert len(results) == sum(issued), "every future resolves"
    failures = [out for _, out in results if isinstance(out, BaseException)]
    assert all(isinstance(f, WorkerDiedError) for f in failures), failures[:3]
    assert len(failures) <= max(20, len(results) // 100), (
        f"{len(failures)} of {len(results)} failed (max_retries=1 should keep it under 1%)"
    )
    with torch.no_grad():
        for x, out in results:
            if isinstance(out, torch.Tensor):
                torch.testing.assert_close(out, ref(x))
    # after the storm: all instances back, serving normally, no arena slot lost
    wait_for(lambda: pool.health()["tiny"].ready == 2, 60, "both instances to be back")
    assert pool.infer("tiny", [torch.randn(1, 64)], timeout=30)["OUTPUT__0"].shape == (1, 64)
    arena = pool._router.default["tiny"].allocator
    assert arena.used == 0 and len(arena) == 0, f"{len(arena)} request-arena slots lost"
    assert sum(i.restarts for i in pool.health()["tiny"].instances) >= 1


def test_finished_requests_with_deadlines_do_not_keep_their_outputs(make_pool, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    # A deadline far away must not keep a finished request (and the shared memory of
    # its outputs) alive until it comes due.
    pool = make_pool(ModelConfig("identity", model_dir / "identity.pt", timeout=3600))
    outputs = [weakref.ref(pool.infer("identity", [torch.randn(200, 100)])["OUTPUT__0"]) for _ in range(50)]
    gc.collect()
    assert sum(ref() is not None for ref in outputs) == 0, "finished outputs are still alive"

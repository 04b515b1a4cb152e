"""``benchmarks/batching.py``'s closed-loop driver (``libtorchrt.bench``'s load generator)
against a real pool of the tiny model with dynamic batching: thread and asyncio callers
both measure, the mean batch comes from the pool's counters over the measured windows,
the hooks run while the callers do, failed requests fail the measurement, and both
scripts refuse an unknown kind of callers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks import batching, front_cpu
from libtorchrt import Pool
from libtorchrt.bench import workloads
from libtorchrt.bench.loadgen import MeasurementError

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    path = workloads.build("tiny", tmp_path_factory.mktemp("batching"))
    with Pool(models=[batching.config("tiny", path, batching=True)]) as p:
        yield p


def callers_running() -> bool:
    names = [t.name for t in threading.enumerate()]
    return any(n.startswith("bench-caller-") or n == "bench-event-loop" for n in names)


def _served(pool: Pool) -> int:
    return sum(s.inferences for s in pool.stats())


@pytest.mark.parametrize("kind", ["threads", "asyncio"])
def test_closed_loop_measures_with_the_load_generator(pool: Pool, kind: str) -> None:
    seen: list[tuple[str, bool, int]] = []

    def hook(what: str) -> None:
        seen.append((what, callers_running(), _served(pool)))

    r = batching.closed_loop(pool, "tiny", 8, 0.4, kind, on_start=lambda: hook("start"), on_end=lambda: hook("end"))
    assert set(r) == {"rps", "p50_ms", "p99_ms", "batch"}
    assert r["rps"] > 0
    assert 0 < r["p50_ms"] <= r["p99_ms"]
    assert r["batch"] >= 1.0
    # the hooks ran once each, in order, while the callers ran, after the warm-up
    assert [(what, running) for what, running, _ in seen] == [("start", True), ("end", True)]
    assert 0 < seen[0][2] < seen[1][2]
    assert not callers_running()


@pytest.mark.parametrize("kind", ["threads", "asyncio"])
def test_closed_loop_fails_when_every_request_fails(tmp_path: Path, kind: str) -> None:
    path = workloads.build("tiny", tmp_path)
    closed = Pool(models=[batching.config("tiny", path, batching=True)])
    closed.close()  # every request now fails with PoolClosedError
    with pytest.raises(MeasurementError, match="PoolClosedError"):
        batching.closed_loop(closed, "tiny", 2, 0.2, kind)
    assert not callers_running()


@pytest.mark.parametrize("main", [batching.main, front_cpu.main])
def test_the_scripts_refuse_unknown_callers(main: Any, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["--callers", "threads,fibers"])
    assert stopped.value.code == 2
    assert "choose from threads, asyncio" in capsys.readouterr().err

"""``Pool(busy_poll_us=)`` on real pools: the caller thread polls for the reply to the
one request in flight (the hub, ``transport/_lanes.c``), the worker polls for its next
request unless the front keeps it busy (``workers/worker.py``), and values no part could
use are refused. What polled shows as CPU time: of the caller's thread
(``time.thread_time``), of the worker's process (``/proc/<pid>/stat``)."""

from __future__ import annotations

import os
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from libtorchrt import ModelConfig, Pool, TensorSpec
from libtorchrt.transport import lanes

#: the longest poll there is (1 s): what is seen polling is bounded by the waits
SPIN_US = lanes.MAX_SPIN_US
#: how long the slow model sleeps; the least CPU a thread or worker that polled shows (a
#: quarter: on a busy machine the poller shares its CPU), and the most one that slept does
SLEEP_S = 0.4
POLLED_CPU_S = SLEEP_S / 4
ASLEEP_CPU_S = 0.08

SLEEPER = """
import time

import torch
from torch import nn


class Model(nn.Module):
    def forward(self, wait: torch.Tensor) -> torch.Tensor:
        time.sleep(float(wait.max()))
        return wait * 2.0
"""


@pytest.fixture(scope="module")
def sleeper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("busy_poll") / "sleeper"
    directory.mkdir()
    (directory / "model.py").write_text(textwrap.dedent(SLEEPER).lstrip())
    return directory / "model.py"


def _config(path: Path) -> ModelConfig:
    return ModelConfig("sleep", path, inputs=[TensorSpec("wait", "float32", [1])])


def _ask(pool: Pool, wait: float) -> torch.Tensor:
    return pool.infer("sleep", {"wait": torch.tensor([wait])}, timeout=30)["OUTPUT__0"]


def _caller_cpu(pool: Pool, wait: float) -> float:
    """The CPU time this thread spends in one request that takes ``wait`` seconds."""
    cpu = time.thread_time()
    assert float(_ask(pool, wait)) == pytest.approx(2 * wait)
    return time.thread_time() - cpu


def _process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("value", [-1, SPIN_US + 1, True, 1.5, "100"])
def test_a_busy_poll_out_of_range_is_refused(sleeper: Path, value: object) -> None:
    expected = r"busy_poll_us is .*; expected an integer from 0 \(no busy polling\) to 1000000"
    with pytest.raises(ValueError, match=expected):
        Pool(models=[_config(sleeper)], busy_poll_us=value)  # type: ignore[arg-type]


@pytest.mark.skipif(not lanes.available, reason="the native hub is not built here")
def test_a_caller_polls_for_the_reply_to_the_one_request_in_flight(sleeper: Path, no_leaks: None) -> None:
    with Pool(models=[_config(sleeper)], busy_poll_us=SPIN_US) as pool:
        _ask(pool, 0.0)
        assert _caller_cpu(pool, SLEEP_S) > POLLED_CPU_S, "the caller slept: it should have polled"
    with Pool(models=[_config(sleeper)]) as pool:
        _ask(pool, 0.0)
        assert _caller_cpu(pool, SLEEP_S) < ASLEEP_CPU_S


@pytest.mark.skipif(not lanes.available, reason="the native hub is not built here")
def test_a_caller_sleeps_while_another_request_is_in_flight(sleeper: Path, no_leaks: None) -> None:
    """The first request, alone, is polled for 0.2 s; the second, sent while the first
    runs (and no longer polled for), is not."""
    config = ModelConfig("sleep", sleeper, instances=2, inputs=[TensorSpec("wait", "float32", [1])])
    with Pool(models=[config], busy_poll_us=200_000) as pool:
        _ask(pool, 0.0)
        first = threading.Thread(target=_ask, args=(pool, 1.5))
        first.start()
        time.sleep(0.5)
        assert _caller_cpu(pool, SLEEP_S) < ASLEEP_CPU_S, "it polled beside another request in flight"
        first.join(30)


def test_a_worker_polls_after_a_lone_request_not_after_a_backlog(sleeper: Path, no_leaks: None) -> None:
    """After one request, the worker polls for the next (up to a second); after requests
    that waited one behind the other, it sleeps at once."""
    with Pool(models=[_config(sleeper)], busy_poll_us=SPIN_US, max_inflight=8) as pool:
        [worker] = pool.workers()
        assert worker.pid is not None
        _ask(pool, 0.0)
        time.sleep(1.5)  # (its poll after the warm-up has run out)
        before = _process_cpu(worker.pid)
        _ask(pool, 0.0)
        time.sleep(SLEEP_S)
        assert _process_cpu(worker.pid) - before > POLLED_CPU_S, "the worker slept after a lone request"

        time.sleep(1.0)
        backlog = [threading.Thread(target=_ask, args=(pool, 0.02)) for _ in range(8)]
        for t in backlog:
            t.start()
        for t in backlog:
            t.join(30)
        before = _process_cpu(worker.pid)
        time.sleep(SLEEP_S)
        assert _process_cpu(worker.pid) - before < ASLEEP_CPU_S, "the worker polled after a backlog"

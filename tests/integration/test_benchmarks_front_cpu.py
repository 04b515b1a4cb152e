"""``benchmarks/front_cpu.py`` against a real pool for a fraction of a second: the CPU of
the load generator's callers is counted in their columns (the event loop's in
``main/loop``, not left to ``other``), over requests that were answered, and nothing
is left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import front_cpu
from libtorchrt.bench import workloads
from tests.conftest import assert_no_leaks, snapshot

pytestmark = pytest.mark.timeout(90)


def test_asyncio_callers_cpu_is_the_event_loops(tmp_path: Path) -> None:
    path = workloads.build("tiny", tmp_path)
    before = snapshot()
    r = front_cpu.measure(path, "asyncio", True, 0.4)
    assert_no_leaks(before)
    assert r["callers"] == "asyncio" and r["batching"] is True
    assert r["requests"] > 0 and r["req_per_s"] > 0
    assert r["mean_batch"] is not None and r["mean_batch"] >= 1.0
    # the event loop runs in the load generator's thread, sampled while it runs
    assert r["main_thread_us"] > 0
    assert r["main_thread_us"] > r["other_front_us"]
    # (the process's total and its threads' times are read a moment apart: a few % of slack)
    assert r["front_us"] >= 0.95 * (r["main_thread_us"] + r["router_us"])
    assert r["workers_us"] > 0

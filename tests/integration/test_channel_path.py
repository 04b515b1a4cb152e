"""Requests the router sends to a CPU worker go by its channel (transport/channel.py),
except those that must go over ZeroMQ (data frames: a big tensor whose arena was full); a
worker gets them one way at a time, so mixing both under concurrency keeps every answer
right. (``Pool.infer``'s small requests take the fast lane instead: test_fast_lane.py.)"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from libtorchrt import ModelConfig, Pool
from libtorchrt.bench import workloads
from tests.conftest import assert_no_leaks, snapshot

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    path = workloads.build("payload", tmp_path_factory.mktemp("channel"))  # y = x * 1.0
    # A request arena of 64 KiB: a 256 KiB input cannot be placed in it and travels as
    # a ZeroMQ data frame; a 64-float input travels inline, by the channel.
    with Pool(models=[ModelConfig("echo", path, instances=2)], request_arena_bytes=64 << 10) as p:
        yield p


def _channel_sends(pool: Pool) -> int:
    return sum(w.channel.sent for w in pool._router.supervisor.by_identity.values() if w.channel is not None)


def test_small_requests_go_by_the_channel_and_big_ones_over_zeromq_in_order(pool: Pool) -> None:
    before = _channel_sends(pool)
    errors: list[str] = []
    counts = {"small": 0, "big": 0}
    lock = threading.Lock()

    def caller(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for i in range(40):
            big = (i + seed) % 5 == 0
            x = torch.randn(1, 256, 256 if big else 1, generator=g) if big else torch.randn(1, 64, generator=g)
            y = next(iter(pool.submit("echo", x).result().values()))
            if not torch.equal(y, x):
                errors.append(f"caller {seed} request {i}: a wrong answer")
            with lock:
                counts["big" if big else "small"] += 1

    threads = [threading.Thread(target=caller, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert counts["big"] > 0
    assert _channel_sends(pool) - before == counts["small"]
    workers = list(pool._router.supervisor.by_identity.values())
    assert all(w.serial == 0 for w in workers), "a request sent over ZeroMQ was never marked answered"


def test_a_pool_with_channels_leaves_nothing_behind(tmp_path: Path) -> None:
    path = workloads.build("tiny", tmp_path)
    before = snapshot()
    with Pool(models=[ModelConfig("tiny", path, instances=2)]) as p:
        for _ in range(20):
            p.submit("tiny", torch.randn(1, 64)).result()
            p.infer("tiny", torch.randn(1, 64))
        assert _channel_sends(p) == 20
        assert sum(w.served for w in p.workers()) == 40
    assert_no_leaks(before)

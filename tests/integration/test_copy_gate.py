"""Pool(max_inflight_bytes=...): Pool.infer callers of a model with large inputs wait
for room before they copy them (front/copygate.py), on a real pool.

The model sleeps as long as its input's first element says, so a request can hold the
gate while others come."""

from __future__ import annotations

import asyncio
import contextlib
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from libtorchrt import ModelConfig, Pool, PoolClosedError, TensorSpec, TimeoutError
from tests.conftest import run_threads

#: 1 MiB of float32: above the inline threshold, so copied into the request arena
ROWS = 256 * 1024

SLEEPER = """
import time

import torch
from torch import nn


class Model(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(float(x[0]))
        return x[:8] * 2.0
"""


@pytest.fixture(scope="module")
def sleeper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("copy_gate") / "model.py"
    path.write_text(textwrap.dedent(SLEEPER).lstrip())
    return path


def _pool(path: Path, **kw: object) -> Pool:
    return Pool(models=[ModelConfig("m", path, inputs=[TensorSpec("x", "float32", [ROWS])])], **kw)


def _sleep(seconds: float) -> dict[str, torch.Tensor]:
    x = torch.zeros(ROWS)
    x[0] = seconds
    return {"x": x}


def _busy(pool: Pool, seconds: float) -> list[threading.Thread]:
    """Two callers whose requests hold the gate for ``seconds`` and then some (two
    requests an instance always get in: the first runs, the second waits in the queue)."""

    def run() -> None:
        with contextlib.suppress(PoolClosedError):  # (a close without grace fails it)
            pool.infer("m", _sleep(seconds))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while sum(w.inflight for w in pool.workers()) + pool.stats()[0].pending < 2:
        assert time.monotonic() < deadline, "the two requests did not get in"
        time.sleep(0.005)
    return threads


def test_a_caller_past_the_budget_waits_before_copying_and_its_timeout_says_so(sleeper: Path, no_leaks: None) -> None:
    with _pool(sleeper, max_inflight_bytes=ROWS * 4) as pool:
        busy = _busy(pool, 1.0)
        with pytest.raises(TimeoutError, match="max_inflight_bytes"):
            pool.infer("m", _sleep(0.0), timeout=0.2)
        for t in busy:
            t.join()
        assert torch.equal(pool.infer("m", _sleep(0.0))["OUTPUT__0"], torch.zeros(8))


def test_without_a_bound_the_request_waits_in_the_queue_instead(sleeper: Path, no_leaks: None) -> None:
    with _pool(sleeper, max_inflight_bytes=None) as pool:
        busy = _busy(pool, 1.0)
        with pytest.raises(TimeoutError) as e:
            pool.infer("m", _sleep(0.0), timeout=0.2)
        assert "max_inflight_bytes" not in str(e.value)
        for t in busy:
            t.join()


def test_an_input_made_in_the_arena_is_not_held_back(sleeper: Path, no_leaks: None) -> None:
    # Pool.empty: nothing to copy, so nothing to wait for (the timeout comes from the queue)
    with _pool(sleeper, max_inflight_bytes=ROWS * 4) as pool:
        busy = _busy(pool, 1.0)
        lent = pool.empty("m", (ROWS,)).zero_()

        async def call() -> None:
            await pool.infer_async("m", {"x": lent}, timeout=0.2)

        for caller in (lambda: pool.infer("m", {"x": lent}, timeout=0.2), lambda: asyncio.run(call())):
            with pytest.raises(TimeoutError) as e:
                caller()
            assert "max_inflight_bytes" not in str(e.value)
        for t in busy:
            t.join()
        assert torch.equal(pool.infer("m", {"x": lent})["OUTPUT__0"], torch.zeros(8))


def test_submit_is_not_held_back(sleeper: Path, no_leaks: None) -> None:
    with _pool(sleeper, max_inflight_bytes=ROWS * 4) as pool:
        busy = _busy(pool, 1.0)
        start = time.monotonic()
        future = pool.submit("m", _sleep(0.0))
        assert time.monotonic() - start < 0.5
        assert torch.equal(future.result(30)["OUTPUT__0"], torch.zeros(8))
        for t in busy:
            t.join()


@pytest.mark.parametrize("grace", [0.0, 10.0])
def test_close_drains_the_callers_waiting_at_the_gate_or_fails_them(sleeper: Path, grace: float) -> None:
    # Waiting at the gate is waiting in the queue: a close with time to drain serves
    # them; one without fails them, as it fails queued requests.
    pool = _pool(sleeper, max_inflight_bytes=ROWS * 4)
    try:
        busy = _busy(pool, 1.0)
        results: list[object] = []

        def caller() -> None:
            try:
                results.append(pool.infer("m", _sleep(0.0))["OUTPUT__0"])
            except BaseException as e:
                results.append(e)

        waiting = [threading.Thread(target=caller) for _ in range(3)]
        for t in waiting:
            t.start()
        time.sleep(0.3)
    finally:
        pool.close(grace=grace)
    for t in [*busy, *waiting]:
        t.join(30)
    assert len(results) == 3
    if grace:
        assert all(isinstance(r, torch.Tensor) and torch.equal(r, torch.zeros(8)) for r in results), results
    else:
        assert all(isinstance(r, PoolClosedError) for r in results), results


def test_many_callers_all_answered(sleeper: Path, no_leaks: None) -> None:
    with _pool(sleeper, max_inflight_bytes=ROWS * 4) as pool:

        def caller(i: int) -> None:
            for k in range(20):
                x = torch.full((ROWS,), float(i * 100 + k))
                x[0] = 0.0
                out = pool.infer("m", {"x": x})["OUTPUT__0"]
                assert torch.equal(out, x[:8] * 2.0)

        run_threads(caller, 6)


def test_asyncio_callers_wait_in_their_loop_which_goes_on(sleeper: Path, no_leaks: None) -> None:
    with _pool(sleeper, max_inflight_bytes=ROWS * 4) as pool:

        async def main() -> None:
            held = [asyncio.ensure_future(pool.infer_async("m", _sleep(0.5))) for _ in range(2)]
            while sum(w.inflight for w in pool.workers()) + pool.stats()[0].pending < 2:
                await asyncio.sleep(0.005)
            # the third waits at the gate, the loop goes on (ticks meanwhile) ...
            ticks = 0
            third = asyncio.ensure_future(pool.infer_async("m", _sleep(0.0), timeout=0.2))
            while not third.done():
                ticks += 1
                await asyncio.sleep(0.01)
            assert ticks >= 10
            with pytest.raises(TimeoutError, match="max_inflight_bytes"):
                third.result()
            # ... a cancelled waiter leaves nothing behind, and the next one gets in
            cancelled = asyncio.ensure_future(pool.infer_async("m", _sleep(0.0)))
            await asyncio.sleep(0.05)
            cancelled.cancel()
            for out in await asyncio.gather(*held):
                assert torch.equal(out["OUTPUT__0"], _sleep(0.5)["x"][:8] * 2.0)
            out = await asyncio.wait_for(pool.infer_async("m", _sleep(0.0)), 30)
            assert torch.equal(out["OUTPUT__0"], torch.zeros(8))
            with contextlib.suppress(asyncio.CancelledError):
                await cancelled

        asyncio.run(main())

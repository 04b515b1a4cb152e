"""The realistic callers of ``libtorchrt.bench`` (``callers.py``, ``loadgen.py``, ``cpu.py``)
against a real pool, for a fraction of a second each: every request sent a fresh input
(a copy, never the prepared tensor), every answer was reduced by a torch op, as many
times as requests completed, from thread callers and from asyncio callers; the CPU read
per thread group and per worker process is there and positive; ``--realistic`` on the
command line does the same."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from libtorchrt import ModelConfig, Pool
from libtorchrt.bench.callers import Application, Behaviour, ResultMismatchError
from libtorchrt.bench.cpu import CpuMeter, MeasuredSpan
from libtorchrt.bench.loadgen import measure_windows
from tests import models
from tests.conftest import assert_no_leaks, snapshot, wait_for

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]


class Watched(torch.Tensor):
    """An answer that counts the reductions made on it."""

    sums: ClassVar[int] = 0
    lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.Tensor.sum:
            with cls.lock:
                cls.sums += 1
        return super().__torch_function__(func, types, args, kwargs or {})


class Sends:
    """Wraps ``Pool.infer``: checks that each input is fresh, watches each answer."""

    def __init__(self, templates: list[dict[str, torch.Tensor]]) -> None:
        self.storages = {t.untyped_storage().data_ptr() for s in templates for t in s.values()}
        self.templates = [s["INPUT__0"] for s in templates]
        self.count = 0
        self.stale = 0  # inputs that were a prepared tensor itself, or no copy of one
        self.lock = threading.Lock()

    def check(self, inputs: Mapping[str, torch.Tensor]) -> None:
        x = inputs["INPUT__0"]
        fresh = x.untyped_storage().data_ptr() not in self.storages and any(torch.equal(x, t) for t in self.templates)
        with self.lock:
            self.count += 1
            self.stale += not fresh

    def watch(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: y.as_subclass(Watched) for name, y in outputs.items()}


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    """One pool (the tiny model, one instance) for the tests of this module; closed,
    and checked for anything left behind, at the end."""
    before = snapshot()
    path = models.save("tiny", tmp_path_factory.mktemp("realistic"))
    with Pool(models=[ModelConfig("tiny", path)]) as p:
        yield p
    assert_no_leaks(before)


def drive(
    pool: Pool, app: Application, call: Callable[[], Any], callers: str, concurrency: int
) -> tuple[dict[str, Any], int]:
    """Measure ``call`` in 3 windows of 0.1 s; the CPU per request over the windows (read
    while the callers run), and the requests answered by the pool over the whole drive."""
    success = pool.stats()[0].success
    span = MeasuredSpan(CpuMeter(CpuMeter.labels([w.pid for w in pool.workers()])), 3, lambda: app.counts.answered)
    m = measure_windows(
        call,
        concurrency=concurrency,
        window_s=0.1,
        max_windows=3,
        warmup_s=0.1,
        callers=callers,
        join_timeout=30.0,
        on_start=span.on_start,
        on_window=span.on_window,
    )
    assert m.summary.requests > 0 and not m.all_errors
    # every caller has its answer; the pool's count of them follows (bounded wait)
    n = app.counts.answered
    wait_for(lambda: pool.stats()[0].success - success >= n, timeout=5.0, what=f"the pool to count {n} answers")
    return span.usage().per_request(span.extra_after - span.extra_before), pool.stats()[0].success - success


def sets() -> list[dict[str, torch.Tensor]]:
    return [{"INPUT__0": torch.randn(1, 64, generator=torch.Generator().manual_seed(k))} for k in range(3)]


@pytest.mark.parametrize("callers", ["threads", "asyncio"])
def test_realistic_callers_send_fresh_inputs_and_use_every_answer(pool: Pool, callers: str) -> None:
    templates = sets()
    app = Application(templates, Behaviour(fresh="clone", use="sum"))
    sends = Sends(templates)
    Watched.sums = 0
    call: Callable[[], Any]
    if callers == "threads":

        def send(inputs: dict[str, torch.Tensor]) -> Any:
            sends.check(inputs)
            return sends.watch(pool.infer("tiny", inputs, timeout=30))

        call = app.call(send)
    else:

        async def send_async(inputs: dict[str, torch.Tensor]) -> Any:
            sends.check(inputs)
            return sends.watch(await pool.infer_async("tiny", inputs, timeout=30))

        call = app.call_async(send_async)
    cpu, answered = drive(pool, app, call, callers, concurrency=3)

    counts = app.counts
    assert counts.answered > 20
    assert sends.stale == 0
    assert counts.made == sends.count == counts.answered == answered  # one fresh input per request
    assert Watched.sums == counts.used == counts.answered  # one reduction per answer
    # CPU per request, by who paid
    assert all(math.isfinite(v) for k, v in cpu.items() if k != "processes")
    # (both take the fast lane, whose native thread reads the replies)
    assert cpu["front"] > 0 and cpu["hub"] > 0 and cpu["processes"]["w0"] > 0
    assert cpu["callers" if callers == "threads" else "event_loop"] > 0
    assert cpu["total"] == pytest.approx(cpu["front"] + cpu["processes_total"])


def test_callers_that_drop_results_make_no_reduction(pool: Pool) -> None:
    app = Application(sets(), Behaviour(fresh="clone", use="none"))
    Watched.sums = 0
    call = app.call(lambda inputs: {k: y.as_subclass(Watched) for k, y in pool.infer("tiny", inputs).items()})
    drive(pool, app, call, "threads", concurrency=2)
    assert app.counts.answered > 0 and app.counts.used == 0 and Watched.sums == 0


@pytest.mark.parametrize("use", ["sum", "read"])
def test_every_tensor_of_an_answer_is_reduced(use: str) -> None:
    app = Application(sets(), Behaviour(use=use))

    def answer(inputs: Mapping[str, torch.Tensor]) -> Any:
        x = inputs["INPUT__0"]
        watched = x.as_subclass(Watched)
        return {"a": watched, "label": "text", "pair": [watched, (watched, b"raw")], "array": x.numpy()}

    Watched.sums = 0
    app.call(answer)()
    assert Watched.sums == 3  # the strings and bytes skipped, the numpy array summed by numpy
    Watched.sums = 0
    app.call(lambda inputs: inputs["INPUT__0"].as_subclass(Watched))()  # one tensor, no dict
    assert Watched.sums == 1 and app.counts.used == 2


def test_a_wrong_answer_is_a_failed_request() -> None:
    templates = sets()
    refs = [{"OUTPUT__0": s["INPUT__0"] * 2} for s in templates]
    app = Application(templates, Behaviour(use="allclose"), references=refs)
    call = app.call(lambda inputs: {"OUTPUT__0": inputs["INPUT__0"] * 2})
    call()
    call()
    wrong = app.call(lambda inputs: {"OUTPUT__0": inputs["INPUT__0"] * 3})
    with pytest.raises(ResultMismatchError, match="differs from the reference"):
        wrong()
    with pytest.raises(ValueError, match="one reference answer per input set"):
        Application(templates, Behaviour(use="equal"))


def test_the_command_line_realistic_option(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "libtorchrt.bench", "--workload", "tiny", "--instances", "1"]
    command += ["--concurrency", "2", "--requests", "50", "--warmup", "0.1", "--realistic", "--no-progress"]
    done = subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "callers: clone + float(sum) for every request (--realistic)" in done.stdout


def test_inputs_made_where_empty_says() -> None:
    made: list[torch.Tensor] = []

    def empty(t: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(t, -1.0)
        made.append(out)
        return out

    sets = [{"INPUT__0": torch.randn(4, 3)}, {"INPUT__0": torch.randn(4, 3)}]
    clone = Application(sets, Behaviour(fresh="clone", use="none"), empty=empty)
    for k in (0, 1, 0):
        got_k, inputs = clone.next_inputs()
        assert got_k == k and inputs["INPUT__0"] is made[-1]
        assert torch.equal(inputs["INPUT__0"], sets[k]["INPUT__0"])
    random = Application(sets, Behaviour(fresh="random", use="none"), empty=empty)
    _, inputs = random.next_inputs()
    assert inputs["INPUT__0"] is made[-1] and not torch.equal(inputs["INPUT__0"], torch.full((4, 3), -1.0))
    before = len(made)
    cycle = Application(sets, Behaviour(fresh="cycle", use="none"), empty=empty)
    assert len(made) == before + 2  # (the sets, copied once)
    for k in (0, 1, 0):
        _, inputs = cycle.next_inputs()
        assert inputs["INPUT__0"] is made[before + k]
        assert torch.equal(inputs["INPUT__0"], sets[k]["INPUT__0"])

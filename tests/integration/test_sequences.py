"""Sequence batching on real worker processes: routing by sequence id, implicit state,
control inputs, both strategies, the backlog, idle sequences and a killed instance."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from libtorchrt import (
    ConfigError,
    InvalidInputError,
    ModelConfig,
    SequenceBatching,
    SequenceError,
    SequenceLostError,
    SequenceState,
    TensorSpec,
)
from tests import sequence_models as sm
from tests.conftest import run_threads, wait_for


@pytest.fixture(scope="module")
def seq_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("sequences")
    sm.save(sm.Accumulator(), d / "acc.pt")
    sm.save(sm.ResetAccumulator(), d / "reset.pt")
    sm.save(sm.Controls(), d / "controls.pt")
    sm.save(sm.RnnStep(), d / "rnn.pt")
    return d


def _run_sequence(pool: Any, model: str, sid: int | str, values: list[float], out: dict[Any, list[float]]) -> None:
    got = []
    for i, v in enumerate(values):
        r = pool.infer(
            model,
            torch.tensor([[v]]),
            sequence_id=sid,
            sequence_start=i == 0,
            sequence_end=i == len(values) - 1,
            timeout=60,
        )
        got.append(float(r["OUTPUT__0"][0, 0]))
    out[sid] = got


def _totals(values: list[float]) -> list[float]:
    out, total = [], 0.0
    for v in values:
        total += v
        out.append(total)
    return out


@pytest.mark.parametrize("strategy", ["direct", "oldest"])
def test_interleaved_sequences_from_threads_keep_their_own_state(seq_dir: Path, make_pool: Any, strategy: str) -> None:
    extra: dict[str, Any] = {"strategy": strategy}
    if strategy == "oldest":
        extra.update(max_candidate_sequences=4, max_queue_delay_microseconds=500, preferred_batch_size=[2, 4])
    pool = make_pool(sm.accumulator_config(seq_dir / "acc.pt", instances=2, max_batch_size=4, **extra))
    rng = random.Random(3)
    plans = {
        (t * 10 + k if k % 2 else f"seq-{t}-{k}"): [float(rng.randint(1, 9)) for _ in range(12)]
        for t in range(8)
        for k in range(2)
    }
    results: dict[Any, list[float]] = {}
    ids = list(plans)

    def caller(t: int) -> None:
        for sid in ids[2 * t : 2 * t + 2]:
            _run_sequence(pool, "acc", sid, plans[sid], results)

    run_threads(caller, 8)
    assert results == {sid: _totals(v) for sid, v in plans.items()}
    stats = next(s for s in pool.stats() if s.model == "acc")
    assert stats.sequences["started"] == stats.sequences["ended"] == len(plans)
    assert stats.sequences["active"] == 0
    assert stats.failure == 0


def test_interleaved_sequences_from_asyncio_tasks_are_batched(seq_dir: Path, make_pool: Any) -> None:
    pool = make_pool(
        sm.accumulator_config(
            seq_dir / "acc.pt",
            instances=1,
            max_batch_size=8,
            strategy="oldest",
            max_candidate_sequences=16,
            max_queue_delay_microseconds=2000,
        )
    )
    rng = random.Random(5)
    plans = {sid: [float(rng.randint(1, 9)) for _ in range(10)] for sid in range(1, 17)}

    async def one(sid: int) -> list[float]:
        got = []
        for i, v in enumerate(plans[sid]):
            r = await pool.infer_async(
                "acc", torch.tensor([[v]]), sequence_id=sid, sequence_start=i == 0, sequence_end=i == 9
            )
            got.append(float(r["OUTPUT__0"].sum()))
        return got

    async def main() -> list[list[float]]:
        return await asyncio.gather(*(one(sid) for sid in plans))

    got = asyncio.run(main())
    assert got == [_totals(plans[sid]) for sid in plans]
    stats = next(s for s in pool.stats() if s.model == "acc")
    assert max(stats.batch_sizes) > 1, stats.batch_sizes  # sequences shared executions
    assert stats.executions < stats.success


def test_more_sequences_than_slots_wait_in_the_backlog(seq_dir: Path, make_pool: Any) -> None:
    # one instance with 2 slots, 6 sequences at once: 4 wait until a slot frees
    pool = make_pool(sm.accumulator_config(seq_dir / "acc.pt", instances=1, max_batch_size=2))
    plans = {sid: [float(sid)] * 6 for sid in range(1, 7)}
    results: dict[Any, list[float]] = {}
    seen_backlog = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            s = next(s for s in pool.stats() if s.model == "acc")
            seen_backlog.append(s.sequences["backlog"])
            assert s.sequences["active"] <= 2
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        run_threads(lambda t: _run_sequence(pool, "acc", t + 1, plans[t + 1], results), 6)
    finally:
        stop.set()
        watcher.join()
    assert results == {sid: _totals(v) for sid, v in plans.items()}
    assert max(seen_backlog) > 0


def test_an_idle_sequence_is_freed_and_its_next_request_fails(seq_dir: Path, make_pool: Any) -> None:
    pool = make_pool(sm.accumulator_config(seq_dir / "acc.pt", max_sequence_idle_microseconds=200_000))
    assert float(pool.infer("acc", torch.tensor([[2.0]]), sequence_id=7, sequence_start=True)["OUTPUT__0"]) == 2.0
    assert float(pool.infer("acc", torch.tensor([[3.0]]), sequence_id=7)["OUTPUT__0"]) == 5.0
    wait_for(lambda: next(s for s in pool.stats() if s.model == "acc").sequences["idle_freed"] == 1, 5)
    with pytest.raises(SequenceError, match="idle") as info:
        pool.infer("acc", torch.tensor([[1.0]]), sequence_id=7)
    assert info.value.sequence_id == 7
    # started again, it starts from its initial state
    assert float(pool.infer("acc", torch.tensor([[4.0]]), sequence_id=7, sequence_start=True)["OUTPUT__0"]) == 4.0


def test_requests_that_do_not_fit_a_sequence_are_refused(seq_dir: Path, make_pool: Any, model_dir: Path) -> None:
    acc = sm.accumulator_config(seq_dir / "acc.pt")
    plain = ModelConfig("identity", model_dir / "identity.pt")
    ints = sm.controls_config(seq_dir / "controls.pt")
    pool = make_pool(acc, plain, ints)
    x = torch.tensor([[1.0]])
    with pytest.raises(SequenceError, match="sequence_id"):
        pool.infer("acc", x)
    with pytest.raises(SequenceError, match="not running"):
        pool.infer("acc", x, sequence_id=99)
    for bad in (0, -1, 2**64, 1.5, True, ""):
        with pytest.raises(SequenceError):
            pool.infer("acc", x, sequence_id=bad, sequence_start=True)
    with pytest.raises(SequenceError, match="integer"):  # its CORRID control input is an integer
        pool.infer("controls", x, sequence_id="abc", sequence_start=True)
    with pytest.raises(SequenceError, match="no sequence_batching"):
        pool.infer("identity", torch.ones(3), sequence_id=1, sequence_start=True)
    with pytest.raises(InvalidInputError, match="1 row"):
        pool.infer("acc", torch.ones(2, 1), sequence_id=1, sequence_start=True)
    with pytest.raises(InvalidInputError, match="fills in"):
        pool.infer("acc", {"x": x, "state": x}, sequence_id=1, sequence_start=True)
    # nothing was lost on the way: a sequence runs
    assert float(pool.infer("acc", x, sequence_id=1, sequence_start=True, sequence_end=True)["OUTPUT__0"]) == 1.0


def test_a_killed_instance_loses_its_sequences_and_no_other(seq_dir: Path, make_pool: Any) -> None:
    pool = make_pool(sm.accumulator_config(seq_dir / "acc.pt", instances=2, max_batch_size=1))
    x = torch.tensor([[1.0]])
    pool.infer("acc", x, sequence_id="a", sequence_start=True)  # placed on instance 0
    pool.infer("acc", x, sequence_id="b", sequence_start=True)  # and instance 1
    pids = {w.instance: w.pid for w in pool.workers()}
    os.kill(pids[0], signal.SIGKILL)
    with pytest.raises(SequenceLostError, match="'a'") as info:
        pool.infer("acc", x, sequence_id="a", timeout=30)
    assert info.value.sequence_id == "a"
    with pytest.raises(SequenceLostError):  # and so do later ones: its state is gone
        pool.infer("acc", x, sequence_id="a", timeout=30)
    assert float(pool.infer("acc", x, sequence_id="b")["OUTPUT__0"]) == 2.0  # untouched
    wait_for(lambda: {w.instance: w.pid for w in pool.workers() if w.state == "ready"}.get(0) not in (None, pids[0]))
    assert float(pool.infer("acc", 5 * x, sequence_id="a", sequence_start=True)["OUTPUT__0"]) == 5.0
    stats = next(s for s in pool.stats() if s.model == "acc")
    assert stats.sequences["lost"] == 1


def test_a_request_waiting_behind_a_killed_one_fails_as_lost(seq_dir: Path, make_pool: Any, model_dir: Path) -> None:
    pool = make_pool(sm.accumulator_config(seq_dir / "acc.pt", instances=1, max_batch_size=1))
    x = torch.tensor([[1.0]])
    pool.infer("acc", x, sequence_id=1, sequence_start=True)
    futures = [pool.submit("acc", x, sequence_id=1) for _ in range(20)]
    os.kill(pool.workers()[0].pid, signal.SIGKILL)
    outcomes = []
    for f in futures:
        try:
            outcomes.append(float(f.result(30)["OUTPUT__0"]))
        except SequenceLostError:
            outcomes.append("lost")
    # each answered one is its turn's total; once lost, every later one is lost
    answered = [o for o in outcomes if o != "lost"]
    assert answered == [float(i + 2) for i in range(len(answered))]
    assert outcomes[len(answered) :] == ["lost"] * (len(outcomes) - len(answered))


@pytest.mark.parametrize(("model", "first"), [("acc", 105.0), ("reset", 5.0)])
def test_initial_state_from_a_data_file_and_a_model_that_resets_on_start(
    seq_dir: Path, make_pool: Any, tmp_path: Path, model: str, first: float
) -> None:
    data = tmp_path / "hundred.bin"
    torch.tensor([100.0]).numpy().tofile(data)
    state = SequenceState("state", "OUTPUT__1", "float32", [1], initial=str(data))
    from libtorchrt import ControlInput

    controls = [ControlInput("start", "CONTROL_SEQUENCE_START", "int32", (0, 1))] if model == "reset" else []
    cfg = ModelConfig(
        model,
        seq_dir / f"{model}.pt",
        max_batch_size=2,
        inputs=[TensorSpec("x", "float32", [1])],
        outputs=[TensorSpec("OUTPUT__0", "float32", [1])],
        sequence_batching=SequenceBatching(control_inputs=controls, states=[state]),
    )
    pool = make_pool(cfg)
    got = [
        float(pool.infer(model, torch.tensor([[5.0]]), sequence_id=1, sequence_start=i == 0)["OUTPUT__0"])
        for i in range(3)
    ]
    assert got == [first, first + 5, first + 10]


def test_control_inputs_are_filled_per_row(seq_dir: Path, make_pool: Any) -> None:
    # every slot must be ready before a batch leaves: 3 sequences of 3 steps, in batches
    pool = make_pool(sm.controls_config(seq_dir / "controls.pt", max_batch_size=3))
    ids = [11, 22, 2**63 + 5]
    rows: dict[int, list[list[float]]] = {sid: [] for sid in ids}

    def caller(t: int) -> None:
        sid = ids[t]
        for step in range(3):
            r = pool.infer(
                "controls",
                torch.tensor([[float(step)]]),
                sequence_id=sid,
                sequence_start=step == 0,
                sequence_end=step == 2,
            )
            rows[sid].append(r["OUTPUT__0"][0].tolist())

    run_threads(caller, 3)
    for sid in ids:
        want_id = float(torch.tensor(sid if sid < 2**63 else sid - 2**64, dtype=torch.int64))
        assert rows[sid] == [
            [0.0, 1.0, 0.0, 1.0, want_id],
            [1.0, 0.0, 0.0, 1.0, want_id],
            [2.0, 0.0, 1.0, 1.0, want_id],
        ]
    stats = next(s for s in pool.stats() if s.model == "controls")
    assert max(stats.batch_sizes) > 1


def test_rnn_sequences_match_running_each_alone(seq_dir: Path, make_pool: Any) -> None:
    cfg = ModelConfig(
        "rnn",
        seq_dir / "rnn.pt",
        instances=2,
        max_batch_size=4,
        inputs=[TensorSpec("x", "float32", [sm.INPUTS])],
        outputs=[TensorSpec("OUTPUT__0", "float32", [2])],
        sequence_batching=SequenceBatching(
            "oldest",
            states=[SequenceState("h", "OUTPUT__1", "float32", [sm.HIDDEN])],
            max_candidate_sequences=4,
            max_queue_delay_microseconds=300,
        ),
    )
    pool = make_pool(cfg)
    g = torch.Generator().manual_seed(11)
    plans = {sid: [torch.randn(1, sm.INPUTS, generator=g) for _ in range(8)] for sid in range(1, 9)}
    got: dict[int, list[torch.Tensor]] = {}

    def caller(t: int) -> None:
        sid = t + 1
        outs = []
        for i, x in enumerate(plans[sid]):
            r = pool.infer("rnn", x, sequence_id=sid, sequence_start=i == 0, sequence_end=i == 7)
            outs.append(r["OUTPUT__0"].clone())
        got[sid] = outs

    run_threads(caller, 8)
    for sid, steps in plans.items():
        for y, want in zip(got[sid], sm.rnn_alone(steps)):
            torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


def test_a_sequence_model_without_batching_and_with_warmup(seq_dir: Path, make_pool: Any) -> None:
    cfg = sm.accumulator_config(seq_dir / "acc.pt", max_batch_size=0)
    cfg = ModelConfig(
        cfg.name,
        cfg.path,
        inputs=[TensorSpec("x", "float32", [1, 1])],
        outputs=[TensorSpec("OUTPUT__0", "float32", [1, 1])],
        sequence_batching=SequenceBatching(states=[SequenceState("state", "OUTPUT__1", "float32", [1, 1])]),
        warmup=2,  # zero-data runs before the instance is ready: they keep no state
    )
    pool = make_pool(cfg)
    outs = [
        float(pool.infer("acc", torch.tensor([[2.0]]), sequence_id="s", sequence_start=i == 0)["OUTPUT__0"])
        for i in range(3)
    ]
    assert outs == [2.0, 4.0, 6.0]


def test_a_control_input_with_no_argument_fails_the_start(seq_dir: Path, make_pool: Any) -> None:
    from libtorchrt import ControlInput, WorkerStartError

    cfg = ModelConfig(
        "acc",
        seq_dir / "acc.pt",
        max_batch_size=1,
        inputs=[TensorSpec("x", "float32", [1])],
        sequence_batching=SequenceBatching(
            control_inputs=[ControlInput("start", "CONTROL_SEQUENCE_START")],
            states=[SequenceState("state", "OUTPUT__1", "float32", [1])],
        ),
    )
    with pytest.raises(WorkerStartError, match="'start' has no argument"):
        make_pool(cfg)


def test_sequence_batching_and_dynamic_batching_together_are_refused(seq_dir: Path) -> None:
    from libtorchrt import DynamicBatching

    with pytest.raises(ConfigError, match="both"):
        ModelConfig(
            "acc",
            seq_dir / "acc.pt",
            max_batch_size=2,
            dynamic_batching=DynamicBatching(),
            sequence_batching=SequenceBatching(),
        )


def test_an_id_the_corrid_input_cannot_hold_is_refused_before_it_runs(seq_dir: Path, make_pool: Any) -> None:
    from libtorchrt import ControlInput

    cfg = sm.controls_config(seq_dir / "controls.pt")
    seq = cfg.sequence_batching
    assert seq is not None
    controls = [c if not c.is_corrid else ControlInput(c.name, c.kind, "int32") for c in seq.control_inputs]
    cfg = ModelConfig(
        cfg.name,
        cfg.path,
        max_batch_size=cfg.max_batch_size,
        inputs=cfg.inputs,
        outputs=cfg.outputs,
        sequence_batching=SequenceBatching(control_inputs=controls),
    )
    pool = make_pool(cfg)
    with pytest.raises(SequenceError, match="from 1 to 2147483647"):
        pool.infer("controls", torch.tensor([[1.0]]), sequence_id=2**31, sequence_start=True)
    out = pool.infer("controls", torch.tensor([[1.0]]), sequence_id=2**31 - 1, sequence_start=True)
    assert out["OUTPUT__0"][0, 4] == float(2**31 - 1)


def test_a_torch_export_model_keeps_its_state_too(tmp_path: Path, make_pool: Any) -> None:
    batch = torch.export.Dim("batch", min=1, max=8)
    example = (torch.ones(2, 1), torch.ones(2, 1))
    program = torch.export.export(sm.Accumulator(), example, dynamic_shapes=({0: batch}, {0: batch}))
    torch.export.save(program, str(tmp_path / "acc.pt2"))
    cfg = ModelConfig(
        "acc",
        tmp_path / "acc.pt2",
        max_batch_size=4,
        format="exported",
        inputs=[TensorSpec("INPUT__0", "float32", [1])],
        outputs=[TensorSpec("OUTPUT__0", "float32", [1])],
        sequence_batching=SequenceBatching(states=[SequenceState("INPUT__1", "OUTPUT__1", "float32", [1])]),
    )
    pool = make_pool(cfg)
    got = {1: [], 2: []}  # type: dict[int, list[float]]
    for i in range(3):
        for sid in (1, 2):
            r = pool.infer("acc", torch.tensor([[float(sid)]]), sequence_id=sid, sequence_start=i == 0)
            got[sid].append(float(r["OUTPUT__0"]))
    assert got == {1: [1.0, 2.0, 3.0], 2: [2.0, 4.0, 6.0]}

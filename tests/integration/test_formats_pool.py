"""PyTorch 2 models served by a real Pool, one of each format: an AOTInductor package
and a ``torch.export`` program of MultiIO, and ``model.py`` modules (tests/pt2_models.py),
from a repository on disk and from ``ModelConfig``. Outputs are compared with a direct
call of the eager module: inputs by call-spec path, ordinal and position; dict and
nested-tuple outputs, declared outputs that select leaves; strings in and out of a
``model.py``; the dynamic batch dimension under dynamic batching; warm-up; and a killed
worker replaced. (What cannot be served: test_formats_errors.py.)"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from libtorchrt import (
    DynamicBatching,
    InvalidInputError,
    ModelConfig,
    ModelWarmup,
    Pool,
    TensorSpec,
    WarmupInput,
)
from tests.conftest import closing_pool, wait_for
from tests.pt2_models import (
    INPUT_PATHS,
    OUTPUT_PATHS,
    MultiIO,
    Pt2Artifacts,
    load_python_model,
    multiio,
    multiio_expected,
    multiio_inputs,
)

pytestmark = pytest.mark.timeout(240)  # (the first test to ask builds the artifacts: one AOTI compilation)

#: the declared inputs of the batched PT2 models (dims without the batch dimension)
DECLARED = (
    TensorSpec("ARGS[0]", "float32", [4]),
    TensorSpec("ARGS[1]", "float32", [3]),
    TensorSpec("KWARGS[scale]", "float32", [1]),
)
MAX_BATCH = 16
WORDS = ["banana", "kiwi", "", "avocado"]
#: model -> its format, as its workers report it
FORMATS = {
    "multiio_aoti": "aoti",  # (the repository's: tests/pt2_models.py build_repository)
    "multiio_exported": "exported",
    "words": "python",
    "aoti": "aoti",
    "aoti_batched": "aoti",
    "exported_batched": "exported",
    "plain_batched": "python",
    "counter": "python",
}


def batched(name: str, path: Path) -> ModelConfig:
    """MultiIO's ``path`` with a batch dimension, dynamic batching (a 20 ms window, so
    that requests submitted together are batched) and two warm-up runs of one row."""
    return ModelConfig(
        name,
        path,
        inputs=DECLARED,
        max_batch_size=MAX_BATCH,
        dynamic_batching=DynamicBatching(max_queue_delay_microseconds=20_000),
        warmup_runs=2,
    )


@pytest.fixture(scope="module")
def eager(pt2_artifacts: Pt2Artifacts) -> MultiIO:
    return multiio(pt2_artifacts.state_dict)


@pytest.fixture(scope="module")
def pool(pt2_artifacts: Pt2Artifacts, pt2_repository: Path) -> Iterator[Pool]:
    """One pool for every test here: the repository's three models, and more from
    ModelConfig (their formats found from the files)."""
    a = pt2_artifacts
    models = [
        ModelConfig("aoti", a.aoti),
        batched("aoti_batched", a.aoti),
        batched("exported_batched", a.exported),
        ModelConfig(
            "plain_batched",
            a.py_plain / "model.py",
            inputs=[TensorSpec("x", "float32", [4])],
            max_batch_size=8,
            dynamic_batching=DynamicBatching(max_queue_delay_microseconds=20_000),
        ),
        # Two runs of a model_warmup sample, then one zero-data run: three calls
        # before the first request.
        ModelConfig(
            "counter",
            a.py_counter / "model.py",
            inputs=[TensorSpec("x", "float32", [2])],
            warmup=[ModelWarmup("twice", 1, {"x": WarmupInput("float32", [2], random_data=True)}, count=2)],
            warmup_runs=1,
        ),
    ]
    # (the session's compile cache, warm: not the per-user default, tests write in tmp only)
    with closing_pool(pt2_repository, models=models, strict=True, compile_cache=a.compile_cache) as p:
        yield p


def test_workers_report_their_format(pool: Pool) -> None:
    workers = pool.workers()
    assert {w.model: w.flags["FORMAT"] for w in workers} == FORMATS
    assert {m: pool.config(m).format for m in FORMATS} == FORMATS
    for w in workers:
        assert w.state == "ready"
        if FORMATS[w.model] in ("aoti", "exported"):
            assert w.inputs == INPUT_PATHS
            # TorchScript's executor flags mean nothing to a PT2 model: not reported
            assert "DISABLE_OPTIMIZED_EXECUTION" not in w.flags and "FREEZE_MODULE" not in w.flags
    assert next(w for w in workers if w.model == "words").inputs == ("words", "bias")


# -- AOTInductor packages and exported programs -------------------------------------------


@pytest.mark.parametrize("model", ["aoti", "multiio_exported"])
def test_dict_and_nested_tuple_outputs_match_the_eager_module(pool: Pool, eager: MultiIO, model: str) -> None:
    x, y, scale = multiio_inputs(5, seed=1)
    out = pool.infer(model, {"ARGS[0]": x, "ARGS[1]": y, "KWARGS[scale]": scale}, timeout=30)
    assert list(out) == list(OUTPUT_PATHS)
    assert_close(out, multiio_expected(eager, x, y, scale))


@pytest.mark.parametrize("model", ["aoti", "multiio_exported"])
def test_inputs_bind_by_ordinal_and_by_position(pool: Pool, eager: MultiIO, model: str) -> None:
    x, y, scale = multiio_inputs(4, seed=2)
    want = multiio_expected(eager, x, y, scale)
    # The keyword-only `scale` is input 2 of the call spec: INPUT__2 binds to it.
    assert_close(pool.infer(model, {"INPUT__0": x, "INPUT__1": y, "INPUT__2": scale}, timeout=30), want)
    assert_close(pool.infer(model, {"INPUT__2": scale, "ARGS[1]": y, "INPUT__0": x}, timeout=30), want)
    assert_close(pool.infer(model, [x, y, scale], timeout=30), want)
    with pytest.raises(InvalidInputError, match=r"KWARGS\[scale\]"):
        pool.infer(model, {"ARGS[0]": x, "ARGS[1]": y}, timeout=30)
    with pytest.raises(InvalidInputError, match=r"KWARGS\[mask\]"):
        pool.infer(model, {"ARGS[0]": x, "ARGS[1]": y, "KWARGS[mask]": scale}, timeout=30)


def test_declared_outputs_select_and_order_the_leaves(pool: Pool, eager: MultiIO) -> None:
    # multiio_aoti's config.pbtxt declares RESULT[pair][0] then RESULT[logits], not RESULT[pair][1]
    x, y, scale = multiio_inputs(3, seed=3)
    out = pool.infer("multiio_aoti", {"ARGS[0]": x, "ARGS[1]": y, "INPUT__2": scale}, timeout=30)
    assert list(out) == ["RESULT[pair][0]", "RESULT[logits]"]
    want = multiio_expected(eager, x, y, scale)
    assert_close(out, {k: want[k] for k in out})


@pytest.mark.parametrize("model", ["aoti_batched", "exported_batched"])
def test_dynamic_batch_dimension_under_dynamic_batching(pool: Pool, eager: MultiIO, model: str) -> None:
    before = next(s for s in pool.stats() if s.model == model)
    requests = [multiio_inputs(1 + k % 3, seed=100 + k) for k in range(48)]  # 96 rows
    futures = [pool.submit(model, dict(zip(INPUT_PATHS, r)), timeout=60) for r in requests]
    for r, future in zip(requests, futures):
        out = future.result(60)
        assert list(out) == list(OUTPUT_PATHS)
        assert_close(out, multiio_expected(eager, *r))
    after = next(s for s in pool.stats() if s.model == model)
    sizes = {n: c - before.batch_sizes.get(n, 0) for n, c in after.batch_sizes.items()}
    assert after.success - before.success == 48 and after.inferences - before.inferences == 96
    assert after.executions - before.executions < 48, f"no two requests were batched together: {sizes}"
    assert any(n > 3 and c > 0 for n, c in sizes.items()), sizes  # more rows than one request has


@pytest.mark.parametrize("model", ["aoti_batched", "exported_batched"])
def test_one_row_and_max_batch_size_rows(pool: Pool, eager: MultiIO, model: str) -> None:
    # One row is fewer than the package's minimum (export's 2: sizes 0 and 1 specialize):
    # the worker pads it, and cuts the padding from the outputs.
    for rows in (1, MAX_BATCH):
        x, y, scale = multiio_inputs(rows, seed=rows)
        out = pool.infer(model, dict(zip(INPUT_PATHS, (x, y, scale))), timeout=30)
        assert out["RESULT[logits]"].shape == (rows, 3)
        assert_close(out, multiio_expected(eager, x, y, scale))
    x, y, scale = multiio_inputs(MAX_BATCH + 1)
    with pytest.raises(InvalidInputError, match="max_batch_size"):
        pool.infer(model, dict(zip(INPUT_PATHS, (x, y, scale))), timeout=30)


def test_warm_up_of_pt2_models_ran_before_ready(pool: Pool) -> None:
    # The batched models warmed up twice (warmup_runs=2), one row each: fewer rows than
    # the package's minimum of 2, so its worker padded them. Warm-up requests are not
    # the callers': a worker's count of executions leaves them out. (A warm-up the
    # package refuses fails its model: test_formats_errors.py "bad_warmup".)
    for model in ("aoti_batched", "exported_batched"):
        requests = pool.config(model).warmup_requests()
        shapes = [[tuple(t.shape) for t in r.values() if isinstance(t, torch.Tensor)] for r in requests]
        assert shapes == [[(1, 4), (1, 3), (1, 1)]] * 2
        assert pool.health()[model].state == "ready"
    served = {w.model: w.served for w in pool.workers()}
    stats = {s.model: s for s in pool.stats()}
    for model in ("aoti_batched", "exported_batched"):
        assert served[model] == stats[model].executions


# -- model.py ------------------------------------------------------------------------------


def test_strings_in_and_out_with_the_weights_of_model_pt(pool: Pool, pt2_artifacts: Pt2Artifacts) -> None:
    bias = torch.randn(len(WORDS), 2, generator=torch.Generator().manual_seed(0))
    out = pool.infer("words", {"words": WORDS, "bias": bias}, timeout=30)
    with torch.no_grad():
        scores, labels = load_python_model(pt2_artifacts.py_text)(WORDS, bias)
    assert list(out) == ["OUTPUT__0", "OUTPUT__1"]
    assert_close(out["OUTPUT__0"], scores)
    assert [s.decode() if isinstance(s, bytes) else s for s in out["OUTPUT__1"]] == labels
    assert labels[0].startswith("banana:") and labels[2].startswith(":")
    # by ordinal and by position, too
    assert_close(pool.infer("words", {"INPUT__0": WORDS, "INPUT__1": bias}, timeout=30)["OUTPUT__0"], scores)
    assert_close(pool.infer("words", [WORDS, bias], timeout=30)["OUTPUT__0"], scores)


def test_dynamic_batching_of_a_model_py(pool: Pool, pt2_artifacts: Pt2Artifacts) -> None:
    eager = load_python_model(pt2_artifacts.py_plain)
    before = next(s for s in pool.stats() if s.model == "plain_batched")
    g = torch.Generator().manual_seed(5)
    requests = [torch.randn(1 + k % 3, 4, generator=g) for k in range(36)]
    futures = [pool.submit("plain_batched", {"x": x}, timeout=60) for x in requests]
    with torch.no_grad():
        for x, future in zip(requests, futures):
            assert_close(future.result(60)["OUTPUT__0"], eager(x))
    after = next(s for s in pool.stats() if s.model == "plain_batched")
    sizes = {n: c - before.batch_sizes.get(n, 0) for n, c in after.batch_sizes.items()}
    assert after.executions - before.executions < 36, sizes
    assert any(n > 3 and c > 0 for n, c in sizes.items()), sizes


def test_warm_up_of_a_model_py_runs_before_the_first_request(pool: Pool) -> None:
    # The model returns x + (its calls so far): 2 model_warmup runs + 1 warmup_runs run.
    out = pool.infer("counter", {"x": torch.zeros(2)}, timeout=30)
    assert_close(out["OUTPUT__0"], torch.full((2,), 4.0))


# -- last: breaks a worker -----------------------------------------------------------------


def test_a_killed_worker_is_replaced_and_serves_again(pool: Pool, eager: MultiIO) -> None:
    (old,) = [w for w in pool.workers() if w.model == "aoti"]
    os.kill(old.pid, signal.SIGKILL)
    x, y, scale = multiio_inputs(6, seed=4)
    # A request sent now waits for the replacement (or is retried on it).
    assert_close(pool.infer("aoti", [x, y, scale], timeout=60), multiio_expected(eager, x, y, scale))
    wait_for(
        lambda: [w.state for w in pool.workers() if w.model == "aoti" and w.pid != old.pid] == ["ready"],
        timeout=60,
        what="the replacement worker",
    )
    (new,) = [w for w in pool.workers() if w.model == "aoti" and w.state == "ready"]
    assert new.pid != old.pid and new.flags["FORMAT"] == "aoti"
    x, y, scale = multiio_inputs(2, seed=5)
    assert_close(pool.infer("aoti", [x, y, scale], timeout=30), multiio_expected(eager, x, y, scale))

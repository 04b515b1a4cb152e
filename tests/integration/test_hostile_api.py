"""Hostile input through the in-process API (``Pool``, ``ModelConfig``): the pool keeps serving.

Each attack runs against real worker processes; after it, the same pool answers a
normal request correctly, and the ``make_pool`` fixture checks that closing it leaves
no child process, descriptor or shared memory behind. See docs/reliability.md
("Hostile input") for the table of attacks and answers.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from libtorchrt import (
    ConfigError,
    InstanceGroup,
    InvalidInputError,
    ModelConfig,
    ModelError,
    Pool,
    QueueFullError,
    TensorSpec,
    TimeoutError,
    UnknownModelError,
)
from libtorchrt.config.instances import MAX_INSTANCES
from libtorchrt.config.tensor import MAX_DIMS
from libtorchrt.deadlines import MAX_TIMEOUT_S
from tests import models
from tests.conftest import assert_no_leaks, snapshot, wait_for

X = torch.arange(64, dtype=torch.float32).reshape(1, 64)
LONG = torch.tensor([3_000_000.0])  # a few seconds of spinning


def _serves(pool: Pool, model: str = "tiny") -> None:
    """The pool still answers a normal request, correctly."""
    x = torch.randn(3, 64)
    out = pool.infer(model, [x], timeout=30)
    torch.testing.assert_close(out["OUTPUT__0"], models.reference(model)(x))
    assert pool.failure is None and not pool.closed


@pytest.fixture(scope="module")
def tiny(model_dir: Path) -> Iterator[Pool]:
    """One pool for the attacks that leave it as it was (each checks it still serves);
    checked for leaks once, when it closes."""
    before = snapshot()
    pool = Pool(models=[ModelConfig("tiny", model_dir / "tiny.pt")])
    try:
        yield pool
    finally:
        pool.close()
        assert_no_leaks(before)


# ── deadlines ────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("timeout", [math.inf, 3e12, 3e6, 2.0**40, MAX_TIMEOUT_S * 10])
def test_a_far_deadline_is_capped_and_the_router_lives_on(tiny: Pool, timeout: float) -> None:
    # It used to reach zmq_poll as a C int: OverflowError in the router thread, and
    # every later request got "the pool is closed". The finished call's deadline also
    # stayed at the top of the timer heap and decided the next wake-up.
    out = tiny.infer("tiny", [X], timeout=timeout)
    torch.testing.assert_close(out["OUTPUT__0"], models.reference("tiny")(X))
    fut = tiny.submit("tiny", [X], timeout=timeout)
    assert fut.result(30)["OUTPUT__0"].shape == (1, 64)
    for _ in range(3):  # the router has gone round its loop (and polled) in between
        _serves(tiny)


def test_a_far_deadline_from_asyncio(tiny: Pool) -> None:
    async def main() -> None:
        out = await tiny.infer_async("tiny", [X], timeout=math.inf)
        assert out["OUTPUT__0"].shape == (1, 64)
        with pytest.raises(InvalidInputError, match="timeout"):
            await tiny.infer_async("tiny", [X], timeout=math.nan)
        await tiny.infer_async("tiny", [X])

    asyncio.run(main())
    _serves(tiny)


@pytest.mark.parametrize("timeout", [math.nan, -1.0, -math.inf, "5", b"5", True, [1], object()])
def test_a_bad_timeout_is_the_callers_error(tiny: Pool, timeout: Any) -> None:
    for call in (
        lambda: tiny.infer("tiny", [X], timeout=timeout),
        lambda: tiny.submit("tiny", [X], timeout=timeout),
    ):
        with pytest.raises(InvalidInputError, match="timeout") as info:
            call()
        assert "a number of seconds" in info.value.expected
    _serves(tiny)


def test_a_zero_timeout_fails_the_request_not_the_pool(tiny: Pool) -> None:
    with pytest.raises(TimeoutError):
        tiny.infer("tiny", [X], timeout=0)
    _serves(tiny)


def test_a_model_timeout_of_inf_is_capped(make_pool: Callable[..., Pool], model_dir: Path) -> None:
    cfg = ModelConfig("tiny", model_dir / "tiny.pt", timeout=math.inf, execution_timeout=math.inf)
    assert cfg.timeout == MAX_TIMEOUT_S and cfg.execution_timeout == MAX_TIMEOUT_S
    pool = make_pool(cfg)
    for _ in range(3):
        _serves(pool)


@pytest.mark.parametrize("key", ["timeout", "execution_timeout"])
@pytest.mark.parametrize("value", [math.nan, -1, 0, "5", True])
def test_a_bad_model_timeout_is_a_config_error(model_dir: Path, key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=key) as info:
        ModelConfig("tiny", model_dir / "tiny.pt", **{key: value})
    assert info.value.key == key


# ── hung models ──────────────────────────────────────────────────────────────


def test_execution_timeout_parameter_replaces_a_hung_worker(make_pool: Callable[..., Pool], model_dir: Path) -> None:
    # The name a user tries first, as a parameter (what a config.pbtxt can set).
    cfg = ModelConfig("spin", model_dir / "spin.pt", parameters={"EXECUTION_TIMEOUT": "0.5"})
    assert cfg.execution_timeout == 0.5
    pool = make_pool(cfg, "tiny")
    (before,) = [w.pid for w in pool.workers() if w.model == "spin"]
    with pytest.raises(TimeoutError, match=r"execution_timeout=0\.5"):
        pool.infer("spin", [LONG], timeout=30)
    health = pool.health()["spin"].instances[0]
    assert "execution_timeout=0.5" in (health.last_error or "")
    assert pool.health()["spin"].instances[0].state != "ready"  # its real state, at once

    def replaced() -> bool:
        instance = pool.health()["spin"].instances[0]
        return instance.state == "ready" and instance.pid not in (None, before)

    wait_for(replaced, what="the replacement worker")
    assert pool.health()["spin"].instances[0].restarts == 1
    assert float(pool.infer("spin", [torch.tensor([5.0])], timeout=30)["OUTPUT__0"]) == 5.0
    _serves(pool)


def test_the_pools_execution_timeout_is_a_default(make_pool: Callable[..., Pool], model_dir: Path) -> None:
    own = ModelConfig("tiny", model_dir / "tiny.pt", execution_timeout=60)
    pool = make_pool(ModelConfig("spin", model_dir / "spin.pt"), own, execution_timeout=0.5)
    assert pool.config("spin").execution_timeout == 0.5
    assert pool.config("tiny").execution_timeout == 60  # its own wins
    with pytest.raises(TimeoutError, match=r"execution_timeout=0\.5"):
        pool.infer("spin", [LONG], timeout=30)
    _serves(pool)


@pytest.mark.parametrize("value", ["soon", "-1", "0", "nan", ""])
def test_a_bad_execution_timeout_parameter_names_it(model_dir: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="EXECUTION_TIMEOUT") as info:
        ModelConfig("spin", model_dir / "spin.pt", parameters={"EXECUTION_TIMEOUT": value})
    assert value in str(info.value) or value == ""


def test_execution_timeout_and_its_parameter_must_agree(model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="give one"):
        ModelConfig("spin", model_dir / "spin.pt", execution_timeout=2, parameters={"EXECUTION_TIMEOUT": "3"})
    same = ModelConfig("spin", model_dir / "spin.pt", execution_timeout=3, parameters={"EXECUTION_TIMEOUT": "3"})
    assert same.execution_timeout == 3


# ── outputs checked against the configuration ────────────────────────────────


def _declared(model_dir: Path, dims: list[int], dtype: str = "TYPE_FP32", **kw: Any) -> ModelConfig:
    return ModelConfig("identity", model_dir / "identity.pt", outputs=[TensorSpec("OUTPUT__0", dtype, dims)], **kw)


def test_an_output_of_the_wrong_dtype_and_shape_is_a_model_error(
    make_pool: Callable[..., Pool], model_dir: Path
) -> None:
    pool = make_pool(_declared(model_dir, [1, 64]), "tiny")
    with pytest.raises(ModelError) as info:
        pool.infer("identity", [torch.zeros(2, 3, dtype=torch.int64)], timeout=30)
    text = str(info.value)
    assert "OUTPUT__0" in text and "float32[1, 64]" in text and "int64[2, 3]" in text
    with pytest.raises(ModelError, match=r"declared float32\[1, 64\] but the model returned float32\[2, 64\]"):
        pool.infer("identity", [torch.zeros(2, 64)], timeout=30)
    with pytest.raises(ModelError, match="int32"):
        pool.infer("identity", [torch.zeros(1, 64, dtype=torch.int32)], timeout=30)
    out = pool.infer("identity", [X], timeout=30)  # as declared: served
    torch.testing.assert_close(out["OUTPUT__0"], X)
    _serves(pool)


def test_declared_outputs_with_a_batch_dimension_and_wildcards(make_pool: Callable[..., Pool], model_dir: Path) -> None:
    pool = make_pool(_declared(model_dir, [-1, 4], max_batch_size=8))
    for rows in (1, 5):
        x = torch.ones(rows, 7, 4)
        torch.testing.assert_close(pool.infer("identity", [x], timeout=30)["OUTPUT__0"], x)
    with pytest.raises(ModelError, match=r"declared float32\[batch, -1, 4\].*float32\[2, 7, 5\]"):
        pool.infer("identity", [torch.ones(2, 7, 5)], timeout=30)
    with pytest.raises(ModelError, match=r"float32\[2\]"):  # the rank too
        pool.infer("identity", [torch.ones(2)], timeout=30)


def test_a_missing_declared_output_is_a_model_error(make_pool: Callable[..., Pool], model_dir: Path) -> None:
    cfg = ModelConfig(
        "tiny",
        model_dir / "tiny.pt",
        outputs=[TensorSpec("OUTPUT__0", "float32", [-1, 64]), TensorSpec("OUTPUT__1", "float32", [-1])],
    )
    pool = make_pool(cfg)
    with pytest.raises(ModelError, match=r"'OUTPUT__1' is declared .* returned only 1 output"):
        pool.infer("tiny", [X], timeout=30)


def test_named_outputs_are_checked_in_order(make_pool: Callable[..., Pool], model_dir: Path) -> None:
    outputs = [TensorSpec("plus", "float32", [-1]), TensorSpec("times", "int64", [-1])]
    pool = make_pool(ModelConfig("two", model_dir / "two.pt", outputs=outputs), "tiny")
    with pytest.raises(ModelError, match=r"'times' is declared int64\[-1\] but the model returned float32\[3\]"):
        pool.infer("two", [torch.ones(3)], timeout=30)
    _serves(pool)


# ── other bad input (these already held: kept so they go on holding) ─────────


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda p: p.infer("nope", [X]), UnknownModelError),
        (lambda p: p.infer("tiny", [X], version=7), UnknownModelError),
        (lambda p: p.infer("tiny", {"nope": X}), InvalidInputError),
        (lambda p: p.infer("tiny", [X, X]), InvalidInputError),
        (lambda p: p.infer("tiny", ["a string"]), InvalidInputError),
        (lambda p: p.infer("tiny", [object()]), InvalidInputError),
        (lambda p: p.infer("tiny", [torch.zeros(0, 2**62)], timeout=60), InvalidInputError),
        (lambda p: p.infer("tiny", [torch.zeros([1] * 40)], timeout=60), InvalidInputError),
        (lambda p: p.infer("tiny", [X], priority=1), InvalidInputError),
    ],
    ids=[
        "unknown-model",
        "unknown-version",
        "unknown-input",
        "too-many",
        "string",
        "object",
        "empty-huge",
        "40-dims",
        "priority",
    ],
)
def test_bad_requests_are_typed_errors_and_the_pool_serves_on(
    tiny: Pool, call: Callable[[Pool], Any], error: type[BaseException]
) -> None:
    with pytest.raises(error):
        call(tiny)
    _serves(tiny)


def test_max_request_bytes_and_max_pending_refuse_before_anything_is_allocated(
    make_pool: Callable[..., Pool], model_dir: Path
) -> None:
    pool = make_pool(ModelConfig("tiny", model_dir / "tiny.pt", max_request_bytes=1024), max_pending=1)
    with pytest.raises(InvalidInputError, match="max_request_bytes=1024"):
        pool.infer("tiny", [torch.zeros(100, 64)])
    slow = make_pool(ModelConfig("spin", model_dir / "spin.pt"), max_pending=1)
    running = slow.submit("spin", [torch.tensor([200_000.0])])
    with pytest.raises(QueueFullError, match="max_pending"):
        slow.infer("spin", [torch.tensor([1.0])])
    running.result(60)
    assert float(slow.infer("spin", [torch.tensor([3.0])], timeout=30)["OUTPUT__0"]) == 3.0
    _serves(pool)


# ── configurations no pool could serve ───────────────────────────────────────


def test_instance_counts_are_capped(model_dir: Path) -> None:
    with pytest.raises(ConfigError, match=f"from 1 to {MAX_INSTANCES}"):
        ModelConfig("tiny", model_dir / "tiny.pt", instances=MAX_INSTANCES + 1)
    with pytest.raises(ConfigError, match=f"from 1 to {MAX_INSTANCES}"):
        InstanceGroup(count=10**9, kind="KIND_CPU")
    groups = [InstanceGroup(count=MAX_INSTANCES, kind="KIND_CPU")] * 2
    with pytest.raises(ConfigError, match=f"{2 * MAX_INSTANCES} instances"):
        ModelConfig("tiny", model_dir / "tiny.pt", instance_groups=groups)


def test_shapes_no_request_could_carry_are_refused(model_dir: Path) -> None:
    with pytest.raises(ConfigError, match=f"at most {MAX_DIMS}"):
        ModelConfig("tiny", model_dir / "tiny.pt", inputs=[TensorSpec("x", "float32", [1] * (MAX_DIMS + 1))])
    with pytest.raises(ConfigError, match="plus the batch dimension"):
        ModelConfig(
            "tiny", model_dir / "tiny.pt", max_batch_size=4, outputs=[TensorSpec("y", "float32", [1] * MAX_DIMS)]
        )
    with pytest.raises(ConfigError, match="2\\*\\*63 elements"):
        ModelConfig("tiny", model_dir / "tiny.pt", inputs=[TensorSpec("x", "float32", [2**40, 2**40])])
    ModelConfig("tiny", model_dir / "tiny.pt", inputs=[TensorSpec("x", "float32", [1] * MAX_DIMS)])  # the limit


def test_the_dims_limit_is_the_wires() -> None:
    from libtorchrt.server import kserve
    from libtorchrt.transport import remote, wire

    assert MAX_DIMS == wire._MAX_DIMS == remote._MAX_DIMS == kserve.MAX_DIMS


def test_an_empty_request_to_a_batching_model_is_the_callers_error(
    make_pool: Callable[..., Pool], model_dir: Path
) -> None:
    # It reached the worker as a batch member of 0 rows, which the worker refused as a
    # malformed message: the caller got a ProtocolError (or, before requests refused by
    # the worker were answered under their id, waited forever).
    from libtorchrt import DynamicBatching

    cfg = ModelConfig("tiny", model_dir / "tiny.pt", max_batch_size=8, dynamic_batching=DynamicBatching())
    pool = make_pool(cfg)
    with pytest.raises(InvalidInputError, match="at least 1 row"):
        pool.infer("tiny", [torch.zeros(0, 64)], timeout=30)
    _serves(pool)

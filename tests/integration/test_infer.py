"""Requests end to end: binding, outputs, dtypes, transport paths, errors, concurrency."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from libtorchrt import (
    InvalidInputError,
    ModelConfig,
    ModelError,
    Pool,
    TensorSpec,
    UnknownModelError,
)
from tests import models
from tests.conftest import assert_no_leaks, snapshot

DTYPES = [
    torch.float16,
    torch.float32,
    torch.float64,
    torch.bfloat16,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
]


@pytest.fixture(scope="module")
def pool(model_dir: Path) -> Iterator[Pool]:
    before = snapshot()
    configs = [
        ModelConfig("tiny", model_dir / "tiny.pt", instances=2),
        ModelConfig("add", model_dir / "add.pt"),
        ModelConfig("two", model_dir / "two.pt", outputs=[TensorSpec("PLUS_ONE__0"), TensorSpec("TIMES_TWO__1")]),
        ModelConfig("identity", model_dir / "identity.pt"),
        ModelConfig("raiser", model_dir / "raiser.pt"),
        ModelConfig("listout", model_dir / "listout.pt"),
        ModelConfig(
            "checked",
            model_dir / "add.pt",
            inputs=[TensorSpec("INPUT__0", "TYPE_FP32", [2, -1]), TensorSpec("INPUT__1", "TYPE_FP32", [2, -1])],
        ),
    ]
    with Pool(models=configs) as p:
        yield p
    assert_no_leaks(before)


def _random(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, dtype=dtype)


def test_infer_matches_the_model_in_process(pool: Pool) -> None:
    x = torch.randn(3, 64)
    out = pool.infer("tiny", [x])
    assert list(out) == ["OUTPUT__0"]
    with torch.no_grad():
        expected = models.reference("tiny")(x)
    torch.testing.assert_close(out["OUTPUT__0"], expected)


def test_inputs_bind_by_argument_name_index_and_position(pool: Pool) -> None:
    a, b = torch.arange(4.0), torch.full((4,), 10.0)
    expected = a + b
    for inputs in ({"a": a, "b": b}, {"b": b, "a": a}, {"INPUT__0": a, "INPUT__1": b}, [a, b], (a, b)):
        torch.testing.assert_close(pool.infer("add", inputs)["OUTPUT__0"], expected)
    # a lone tensor binds to a single-input model
    x = torch.randn(1, 64)
    torch.testing.assert_close(pool.infer("tiny", x)["OUTPUT__0"], pool.infer("tiny", {"x": x})["OUTPUT__0"])


def test_outputs_take_the_configured_names(pool: Pool) -> None:
    x = torch.arange(5.0)
    out = pool.infer("two", [x])
    assert list(out) == ["PLUS_ONE__0", "TIMES_TWO__1"]
    torch.testing.assert_close(out["PLUS_ONE__0"], x + 1)
    torch.testing.assert_close(out["TIMES_TWO__1"], x * 2)
    out = pool.infer("listout", [x])
    assert list(out) == ["OUTPUT__0", "OUTPUT__1"]
    torch.testing.assert_close(out["OUTPUT__1"], x.sum(dim=-1))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize(
    "shape",
    [(), (0,), (3, 0, 2), (7,), (2, 3, 5), (64, 1024)],  # (64, 1024) float32 = 256 KiB: through the arena
    ids=["0d", "empty", "empty3d", "vector", "small3d", "large"],
)
def test_dtypes_and_shapes_round_trip_exactly(pool: Pool, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = _random(dtype, shape)
    y = pool.infer("identity", [x])["OUTPUT__0"]
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, x)


@pytest.mark.parametrize("size", [(8, 16), (512, 512)], ids=["inline", "arena"])
def test_non_contiguous_inputs_round_trip(pool: Pool, size: tuple[int, int]) -> None:
    base = torch.randn(*size)
    for x in (base.t(), base[:, ::2], base[1::3], base.expand(2, *size)[1]):
        assert torch.equal(pool.infer("identity", [x])["OUTPUT__0"], x)


def test_caller_may_reuse_its_input_buffer_after_submit(pool: Pool) -> None:
    for shape in [(4,), (300, 300)]:  # inline and arena
        x = torch.ones(shape)
        fut = pool.submit("identity", [x])
        x.fill_(7.0)
        assert torch.equal(fut.result(timeout=30)["OUTPUT__0"], torch.ones(shape))


def test_outputs_stay_valid_while_held_and_do_not_alias_each_other(pool: Pool) -> None:
    held = []
    for i in range(20):
        x = torch.full((256, 256), float(i))  # 256 KiB: an arena slot each
        held.append(pool.infer("identity", [x])["OUTPUT__0"])
    for i, y in enumerate(held):
        assert torch.equal(y, torch.full((256, 256), float(i))), i


def test_tensor_larger_than_the_arena_falls_back_to_frames(make_pool) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool("identity", request_arena_bytes=1 << 20, response_arena_bytes=1 << 20)
    x = torch.randn(1, 1024, 1024)  # 4 MiB, four times each arena
    y = pool.infer("identity", [x], timeout=30)["OUTPUT__0"]
    assert torch.equal(y, x)
    # and the arena path still works beside it
    small = torch.randn(100, 100)
    assert torch.equal(pool.infer("identity", [small], timeout=30)["OUTPUT__0"], small)


def test_numpy_inputs_are_accepted(pool: Pool) -> None:
    x = torch.randn(2, 64)
    torch.testing.assert_close(pool.infer("tiny", [x.numpy()])["OUTPUT__0"], pool.infer("tiny", [x])["OUTPUT__0"])


def test_model_exception_fails_only_that_request(pool: Pool) -> None:
    with pytest.raises(ModelError) as info:
        pool.infer("raiser", [torch.tensor([-1.0])])
    err = info.value
    assert err.model == "raiser"
    assert "negative input rejected by the model" in str(err)
    assert "Traceback" in err.remote_traceback or "RuntimeError" in err.remote_traceback
    # the worker keeps serving
    torch.testing.assert_close(pool.infer("raiser", [torch.tensor([3.0])])["OUTPUT__0"], torch.tensor([6.0]))


def test_bad_requests_get_typed_errors_and_the_pool_keeps_serving(pool: Pool) -> None:
    x = torch.randn(4)
    with pytest.raises(UnknownModelError, match="nope"):
        pool.infer("nope", [x])
    with pytest.raises(InvalidInputError) as info:
        pool.infer("add", {"a": x, "c": x})
    assert info.value.input == "c" and "unknown input" in str(info.value)
    with pytest.raises(InvalidInputError, match="no value for"):
        pool.infer("add", {"a": x})
    with pytest.raises(InvalidInputError, match="2 inputs"):
        pool.infer("add", [x])
    with pytest.raises(InvalidInputError, match=r"torch\.Tensor"):
        pool.infer("add", [x, [1.0, 2.0]])
    with pytest.raises(InvalidInputError, match="a dict of name"):
        pool.infer("add", "not inputs")
    with pytest.raises(InvalidInputError, match="binds to an input already given"):
        pool.infer("add", {"a": x, "INPUT__0": x, "b": x})
    torch.testing.assert_close(pool.infer("add", [x, x])["OUTPUT__0"], x * 2)


def test_declared_inputs_are_checked_in_the_front(pool: Pool) -> None:
    good = torch.randn(2, 5)
    torch.testing.assert_close(pool.infer("checked", [good, good])["OUTPUT__0"], good * 2)
    with pytest.raises(InvalidInputError) as info:
        pool.infer("checked", [good.double(), good])
    assert (info.value.input, info.value.expected, info.value.got) == ("INPUT__0", "dtype float32", "dtype float64")
    with pytest.raises(InvalidInputError, match=r"expected shape \[2, -1\].*got shape \[3, 5\]"):
        pool.infer("checked", {"INPUT__0": good, "INPUT__1": torch.randn(3, 5)})


def test_submit_returns_a_future(pool: Pool) -> None:
    futures = [pool.submit("add", [torch.tensor([float(i)]), torch.tensor([1.0])]) for i in range(50)]
    assert [f.result(timeout=30)["OUTPUT__0"].item() for f in futures] == [i + 1.0 for i in range(50)]


def test_infer_async_from_asyncio(pool: Pool) -> None:
    async def main() -> list[float]:
        calls = [pool.infer_async("add", [torch.tensor([float(i)]), torch.tensor([0.5])]) for i in range(40)]
        return [r["OUTPUT__0"].item() for r in await asyncio.gather(*calls)]

    assert asyncio.run(main()) == [i + 0.5 for i in range(40)]


def test_many_threads_each_get_their_own_results(pool: Pool) -> None:
    errors: list[BaseException] = []
    ref = models.reference("tiny")

    def caller(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        try:
            for _ in range(60):
                x = torch.randn(1, 64, generator=g)
                big = torch.randn(200, 100, generator=g)  # through the arena
                out = pool.infer("tiny", {"x": x}, timeout=60)["OUTPUT__0"]
                with torch.no_grad():
                    torch.testing.assert_close(out, ref(x))
                assert torch.equal(pool.infer("identity", [big], timeout=60)["OUTPUT__0"], big)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=caller, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60  # (before any request's own timeout runs out)
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a caller thread is still waiting for its results"
    assert not errors, errors[0]
    served = {w.instance: w.served for w in pool.workers() if w.model == "tiny"}
    assert all(n > 0 for n in served.values()), f"one instance got no work: {served}"

"""``Pool.empty``: inputs made in the model's request arena are sent where they lie.

The model below looks at itself from inside its worker: where in its mapping of the
request arena's memfd its input lies (-1: not there). The tests find where the caller's
tensor lies in the front's own mapping of that memfd: the same offset means the request
named the caller's memory, with no copy."""

from __future__ import annotations

import asyncio
import gc
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from libtorchrt import DynamicBatching, InvalidInputError, ModelConfig, Pool, PoolClosedError, TensorSpec
from libtorchrt.errors import UnknownModelError
from tests.arena_maps import OFFSET, arena_offset
from tests.conftest import run_threads

#: 1 MiB of float32 a row
WIDTH = 256 * 1024

SELF_AWARE = (
    """
import time

import torch
from torch import nn
"""
    + OFFSET
    + """

class Model(nn.Module):
    def forward(self, x: torch.Tensor, wait: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(float(wait.max()))
        where = [arena_offset(x[i], "m", "req") for i in range(x.shape[0])]
        return x * 2.0, torch.tensor(where)
"""
)


@pytest.fixture(scope="module")
def model_py(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("lent_inputs") / "self_aware"
    directory.mkdir()
    (directory / "model.py").write_text(textwrap.dedent(SELF_AWARE).lstrip())
    return directory / "model.py"


def _config(path: Path, name: str = "m", **kw: object) -> ModelConfig:
    return ModelConfig(
        name,
        path,
        inputs=[TensorSpec("x", "float32", [-1, WIDTH]), TensorSpec("wait", "float32", [1])],
        **kw,
    )


def _ask(pool: Pool, x: torch.Tensor, wait: float = 0.0, model: str = "m") -> dict[str, torch.Tensor]:
    return pool.infer(model, {"x": x, "wait": torch.tensor([wait])})


def test_an_input_made_in_the_arena_is_read_where_it_lies(model_py: Path, no_leaks: None) -> None:
    with Pool(models=[_config(model_py)]) as pool:
        for _ in range(5):
            x = pool.empty("m", (2, WIDTH))
            assert x.dtype == torch.float32 and x.shape == (2, WIDTH)
            mine = arena_offset(x, "m", "req")
            assert mine >= 0, "Pool.empty did not make the tensor in the request arena"
            torch.randn(2, WIDTH, out=x)
            out = _ask(pool, x)
            assert torch.equal(out["OUTPUT__0"], x * 2.0)
            assert int(out["OUTPUT__1"][0]) == mine, "the input was copied, not read where the caller made it"
            # a contiguous view too: the request names the view's own bytes
            row = x[1:]
            out = _ask(pool, row)
            assert torch.equal(out["OUTPUT__0"], row * 2.0)
            assert int(out["OUTPUT__1"][0]) == arena_offset(row, "m", "req") == mine + WIDTH * 4


def test_other_tensors_are_copied(model_py: Path, no_leaks: None) -> None:
    with Pool(models=[_config(model_py), _config(model_py, "n")]) as pool:
        plain = torch.randn(1, WIDTH)
        assert arena_offset(plain, "m", "req") == -1
        out = _ask(pool, plain)
        assert torch.equal(out["OUTPUT__0"], plain * 2.0)
        assert int(out["OUTPUT__1"][0]) >= 0  # (copied into a slot of the arena)
        # not contiguous: copied, rows in order
        x = pool.empty("m", (WIDTH, 2))
        torch.randn(WIDTH, 2, out=x)
        out = _ask(pool, x.t())
        assert torch.equal(out["OUTPUT__0"], x.t() * 2.0)
        assert int(out["OUTPUT__1"][0]) != arena_offset(x, "m", "req")
        # made for another model: that model copies it
        y = pool.empty("n", (1, WIDTH)).fill_(3.0)
        assert arena_offset(y, "n", "req") >= 0
        out = _ask(pool, y)
        assert torch.equal(out["OUTPUT__0"], y * 2.0)
        # small: an ordinary tensor (inline in the request anyway)
        small = pool.empty("m", (4,), torch.int64)
        assert small.dtype == torch.int64 and arena_offset(small, "m", "req") == -1


def test_a_block_is_not_reused_while_a_request_reads_it(model_py: Path, no_leaks: None) -> None:
    with Pool(models=[_config(model_py)]) as pool:
        x = pool.empty("m", (1, WIDTH)).fill_(7.0)
        lent_at = arena_offset(x, "m", "req")
        slow = pool.submit("m", {"x": x, "wait": torch.tensor([1.0])})
        del x  # the caller lets go at once; the request still holds the block
        gc.collect()
        others = [pool.empty("m", (1, WIDTH)).fill_(1.0) for _ in range(3)]
        assert lent_at not in [arena_offset(o, "m", "req") for o in others]
        out = slow.result(30)
        assert torch.equal(out["OUTPUT__0"], torch.full((1, WIDTH), 14.0))
        assert int(out["OUTPUT__1"][0]) == lent_at
        del others, out
        gc.collect()
        again = pool.empty("m", (1, WIDTH))
        assert arena_offset(again, "m", "req") == lent_at  # (first fit: the block came back)


def test_blocks_come_back_and_past_half_the_arena_tensors_are_ordinary(model_py: Path, no_leaks: None) -> None:
    # 16 MiB arena: at most 8 MiB lent at once, 1 MiB a tensor
    with Pool(models=[_config(model_py)], request_arena_bytes=16 << 20) as pool:
        results: list[bool] = []
        lock = threading.Lock()

        def caller(i: int) -> None:
            for _ in range(25):
                x = pool.empty("m", (1, WIDTH)).fill_(float(i))
                inside = arena_offset(x, "m", "req") >= 0
                out = _ask(pool, x)
                assert torch.equal(out["OUTPUT__0"], torch.full((1, WIDTH), 2.0 * i))
                with lock:
                    results.append(inside)
                del x, out

        run_threads(caller, 4)
        assert all(results[-20:]), "later tensors were not lent: blocks did not come back"
        held = [pool.empty("m", (1, WIDTH)) for _ in range(10)]
        inside = [arena_offset(t, "m", "req") >= 0 for t in held]
        assert inside == [True] * 8 + [False] * 2
        for t in held:
            t.fill_(5.0)
            assert torch.equal(_ask(pool, t)["OUTPUT__0"], torch.full((1, WIDTH), 10.0))


def test_batched_members_and_asyncio_callers(model_py: Path, no_leaks: None) -> None:
    config = ModelConfig(
        "m",
        model_py,
        inputs=[TensorSpec("x", "float32", [WIDTH]), TensorSpec("wait", "float32", [1])],
        max_batch_size=8,
        dynamic_batching=DynamicBatching(max_queue_delay_microseconds=50_000),
    )
    with Pool(models=[config]) as pool:
        xs = [pool.empty("m", (1, WIDTH)).fill_(float(k)) for k in range(4)]
        futures = [pool.submit("m", {"x": x, "wait": torch.tensor([[0.0]])}) for x in xs]
        outs = [f.result(30) for f in futures]
        for x, out in zip(xs, outs):
            assert torch.equal(out["OUTPUT__0"], x * 2.0)
        assert pool.stats()[0].executions < 4  # (they were batched)

        async def main() -> list[dict[str, torch.Tensor]]:
            return await asyncio.gather(*(pool.infer_async("m", {"x": x, "wait": torch.tensor([[0.0]])}) for x in xs))

        for x, out in zip(xs, asyncio.run(main())):
            assert torch.equal(out["OUTPUT__0"], x * 2.0)


CRASH_ONCE = """
import os

import torch
from torch import nn


class Model(nn.Module):
    def forward(self, x: torch.Tensor, marker: torch.Tensor) -> torch.Tensor:
        path = bytes(marker.tolist()).decode()
        if not os.path.exists(path):  # the first worker to run it dies
            open(path, "w").close()
            os._exit(3)
        return x * 2.0
"""


def test_a_request_sent_again_after_its_worker_died_reads_the_same_block(tmp_path: Path, no_leaks: None) -> None:
    (tmp_path / "model.py").write_text(textwrap.dedent(CRASH_ONCE).lstrip())
    config = ModelConfig(
        "c", tmp_path / "model.py", inputs=[TensorSpec("x", "float32", [WIDTH]), TensorSpec("marker", "uint8", [-1])]
    )
    marker = torch.tensor(list(str(tmp_path / "died").encode()), dtype=torch.uint8)
    with Pool(models=[config]) as pool:
        x = pool.empty("c", (WIDTH,)).fill_(4.0)
        lent_at = arena_offset(x, "c", "req")
        future = pool.submit("c", {"x": x, "marker": marker})
        del x  # only the request holds the block now
        gc.collect()
        assert torch.equal(future.result(60)["OUTPUT__0"], torch.full((WIDTH,), 8.0))
        assert (tmp_path / "died").exists()
        assert pool.health()["c"].instances[0].restarts == 1
        del future
        gc.collect()
        again = pool.empty("c", (WIDTH,))
        assert arena_offset(again, "c", "req") == lent_at  # (given back once, after the answer)
        assert torch.equal(pool.infer("c", {"x": again.fill_(1.0), "marker": marker})["OUTPUT__0"], again * 2.0)


def test_a_lent_tensor_outlives_its_pool(model_py: Path, no_leaks: None) -> None:
    with Pool(models=[_config(model_py)]) as pool:
        x = pool.empty("m", (1, WIDTH)).fill_(2.5)
    assert float(x.sum()) == 2.5 * WIDTH
    with pytest.raises(PoolClosedError):
        pool.empty("m", (1, WIDTH))


BAD = [
    ((2, -1), torch.float32, "shape"),
    ((2.0, 3), torch.float32, "shape"),
    ("abc", torch.float32, "shape"),
    ((True, 2), torch.float32, "shape"),
    ((2, 3), "float32", "dtype"),
    ((2, 3), torch.quint8, "dtype"),
]


def test_bad_shape_or_dtype_is_refused_by_name(model_py: Path) -> None:
    with Pool(models=[_config(model_py)]) as pool:
        for shape, dtype, wrong in BAD:
            with pytest.raises(InvalidInputError, match=f"expected a {wrong}") as e:
                pool.empty("m", shape, dtype)
            assert e.value.model == "m"
        with pytest.raises(UnknownModelError):
            pool.empty("nope", (1, WIDTH))
        x = pool.empty("m", WIDTH)  # (an int is a shape of one dimension)
        assert x.shape == (WIDTH,) and arena_offset(x, "m", "req") >= 0
        assert torch.equal(_ask(pool, pool.empty("m", (1, WIDTH)).fill_(1.0))["OUTPUT__0"], torch.full((1, WIDTH), 2.0))


def test_a_version_lends_from_its_own_arena(model_py: Path, no_leaks: None) -> None:
    with Pool(models=[_config(model_py), _config(model_py, version=2)]) as pool:
        old = pool.empty("m", (1, WIDTH), version=1).fill_(3.0)
        new = pool.empty("m", (1, WIDTH)).fill_(5.0)  # (the highest version by default)
        assert arena_offset(old, "m-v1", "req") >= 0 and arena_offset(old, "m-v2", "req") == -1
        assert arena_offset(new, "m-v2", "req") >= 0 and arena_offset(new, "m-v1", "req") == -1
        out = pool.infer("m", {"x": old, "wait": torch.tensor([0.0])}, version=1)
        assert torch.equal(out["OUTPUT__0"], old * 2.0)
        assert int(out["OUTPUT__1"][0]) == arena_offset(old, "m-v1", "req")  # (read in place)
        out = _ask(pool, old)  # (to version 2: another arena, so copied)
        assert torch.equal(out["OUTPUT__0"], old * 2.0)
        assert int(out["OUTPUT__1"][0]) != arena_offset(old, "m-v1", "req")

"""ZERO_COPY_OUTPUTS: a CPU worker's model makes its large outputs in the response
arena, and the reply names them there (``transport/outheap.py``).

The model below looks at itself from inside its worker: where in its response arena's
memfd its output lies (-1: not there), and how many bytes the worker's heap held when
the request came (the outputs the front has not released yet). The test finds where the
answer's tensor lies in the front's own mapping of that memfd: the same offset means the
reply named the output where the model made it, with no copy."""

from __future__ import annotations

import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from libtorchrt import ModelConfig, Pool, TensorSpec
from tests.arena_maps import OFFSET, arena_offset
from tests.conftest import run_threads

#: 2 MiB of float32
ROWS = 512 * 1024

SELF_AWARE = (
    """
import torch
from torch import nn

from libtorchrt.transport import _outheap
"""
    + OFFSET
    + """

class Model(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        held = _outheap.stats()["used"] if _outheap.stats()["size"] else -1
        y = x * 2.0
        small = x[:4] + 1.0  # (below the heap's threshold: glibc's, and inline)
        return y, small, torch.tensor([arena_offset(y, "m")]), torch.tensor([held])
"""
)


@pytest.fixture(scope="module")
def model_py(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("zero_copy") / "self_aware"
    directory.mkdir()
    (directory / "model.py").write_text(textwrap.dedent(SELF_AWARE).lstrip())
    return directory / "model.py"


def _config(path: Path, on: str | None = None, **kw: object) -> ModelConfig:
    parameters = {} if on is None else {"ZERO_COPY_OUTPUTS": on}
    return ModelConfig("m", path, inputs=[TensorSpec("x", "float32", [ROWS])], parameters=parameters, **kw)


def test_outputs_are_made_in_the_response_arena_and_named_there(model_py: Path, no_leaks: None) -> None:
    with Pool(models=[_config(model_py)]) as pool:
        assert [w.flags["ZERO_COPY_OUTPUTS"] for w in pool.workers()] == [True]
        for _ in range(5):
            x = torch.randn(ROWS)
            out = pool.infer("m", {"x": x})
            assert torch.equal(out["OUTPUT__0"], x * 2.0)
            assert torch.equal(out["OUTPUT__1"], x[:4] + 1.0)
            made_at = int(out["OUTPUT__2"])
            assert made_at >= 0, "the output was not made in the response arena"
            assert arena_offset(out["OUTPUT__0"], "m") == made_at, "the output was copied, not named where it was made"


def test_off_when_asked_outputs_are_copied(model_py: Path, no_leaks: None) -> None:
    with Pool(models=[_config(model_py, "false")]) as pool:
        assert [w.flags["ZERO_COPY_OUTPUTS"] for w in pool.workers()] == [False]
        x = torch.randn(ROWS)
        out = pool.infer("m", {"x": x})
        assert torch.equal(out["OUTPUT__0"], x * 2.0)
        assert int(out["OUTPUT__2"]) == -1
        assert arena_offset(out["OUTPUT__0"], "m") >= 0  # (copied into a slot of the arena)
        assert int(out["OUTPUT__3"]) == -1  # (no heap in that worker)


def test_released_outputs_give_their_memory_back(model_py: Path) -> None:
    # 8 callers, 400 requests of 2 MiB through a 32 MiB arena (24 MiB for the model's
    # allocations): kept outputs would fill it within a few requests. Each caller drops
    # its answer before its next request, so the heap never holds more than about one
    # output per request in flight, plus the ones whose release is on its way.
    with Pool(models=[_config(model_py)], response_arena_bytes=32 << 20) as pool:
        held: list[int] = []
        inside: list[bool] = []

        def caller(i: int) -> None:
            x = torch.full((ROWS,), float(i))
            for _ in range(50):
                out = pool.infer("m", {"x": x})
                assert torch.equal(out["OUTPUT__0"], x * 2.0)
                held.append(int(out["OUTPUT__3"]))
                inside.append(int(out["OUTPUT__2"]) >= 0)
                del out

        run_threads(caller, 8)
        assert all(inside[-50:]), "later outputs no longer fit in the arena: released slots were not freed"
        assert max(held[-50:]) <= 8 * ((ROWS * 4) + 4096), held[-50:]


def test_an_output_named_twice_is_released_twice(tmp_path: Path) -> None:
    source = """
    import torch
    from torch import nn

    from libtorchrt.transport import _outheap


    class Model(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            held = _outheap.stats()["used"]
            y = x * 3.0
            return y, y, torch.tensor([held], dtype=torch.int64)
    """
    (tmp_path / "model.py").write_text(textwrap.dedent(source).lstrip())
    with Pool(models=[_config(tmp_path / "model.py")], response_arena_bytes=16 << 20) as pool:
        x = torch.randn(ROWS)
        first = pool.infer("m", {"x": x})
        kept = first["OUTPUT__1"]
        del first  # (OUTPUT__0 is released; the same bytes stay named by OUTPUT__1)
        for k in range(20):
            out = pool.infer("m", {"x": torch.full((ROWS,), float(k))})
            assert torch.equal(out["OUTPUT__0"], out["OUTPUT__1"])
            held = int(out["OUTPUT__2"])
            del out
        assert torch.equal(kept, x * 3.0), "an output still named was freed and made again"
        assert held <= 2 * (ROWS * 4 + 4096), held
        del kept


KEEPER = """
import torch
from torch import nn


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.kept: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kept is not None:
            self.kept.fill_(-1.0)  # (changes what it answered last time)
        y = x * 2.0
        self.kept = y
        return y
"""


class _ScriptedKeeper(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.kept = torch.zeros(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.kept.fill_(-1.0)
        y = x * 2.0
        self.kept = y
        return y


@pytest.mark.parametrize("kind", ["model.py", "torchscript"])
def test_an_output_the_model_keeps_is_copied_so_it_cannot_change_under_the_caller(tmp_path: Path, kind: str) -> None:
    if kind == "model.py":
        path = tmp_path / "model.py"
        path.write_text(textwrap.dedent(KEEPER).lstrip())
    else:
        path = tmp_path / "keeper.pt"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(torch.jit.script(_ScriptedKeeper()), str(path))
    with Pool(models=[_config(path)]) as pool:
        assert [w.flags["ZERO_COPY_OUTPUTS"] for w in pool.workers()] == [True]
        x1, x2 = torch.randn(ROWS), torch.randn(ROWS)
        first = pool.infer("m", {"x": x1})["OUTPUT__0"]
        second = pool.infer("m", {"x": x2})["OUTPUT__0"]
        assert torch.equal(second, x2 * 2.0)
        assert torch.equal(first, x1 * 2.0), "the model changed an answer the caller holds"


BATCHED = (
    """
import torch
from torch import nn
"""
    + OFFSET
    + """

class Model(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = x * 2.0
        return y, torch.tensor([[arena_offset(row, "b")] for row in y])
"""
)


def test_each_member_of_a_batch_gets_its_rows_where_the_model_made_them(tmp_path: Path) -> None:
    from libtorchrt import DynamicBatching

    width = 32 * 1024  # 128 KiB a row: above the inline threshold
    (tmp_path / "model.py").write_text(textwrap.dedent(BATCHED).lstrip())
    config = ModelConfig(
        "b",
        tmp_path / "model.py",
        inputs=[TensorSpec("x", "float32", [width])],
        max_batch_size=8,
        dynamic_batching=DynamicBatching(max_queue_delay_microseconds=50_000),
    )
    with Pool(models=[config]) as pool:
        xs = [torch.randn(1, width) for _ in range(4)]
        futures = [pool.submit("b", {"x": x}) for x in xs]
        outs = [f.result(30) for f in futures]
        assert max(int(o["OUTPUT__1"].numel()) for o in outs) == 1
        for x, out in zip(xs, outs):
            assert torch.equal(out["OUTPUT__0"], x * 2.0)
            mine = arena_offset(out["OUTPUT__0"], "b")
            assert mine == int(out["OUTPUT__1"]), "a member's rows were copied, not named where they were made"
        assert pool.stats()[0].executions < 4  # (they were batched)

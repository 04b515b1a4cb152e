"""PyTorch 2 call specifications: the names of a model's inputs and outputs
(``pt2names``), and the ``torch.export`` loader that binds a program to them
(``exported``, through ``pt2call``), in-process on tiny programs.

No AOTInductor compilation here (tens of seconds); ``tests/integration`` serves a
compiled package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.export import Dim
from torch.utils import _pytree as pytree

from libtorchrt.config.flags import Flags
from libtorchrt.workers.formats import LoadError, LoadRequest, Runner, load, pt2call, pt2names

ROWS = 3  # example rows to export with: not 0 or 1, which specialize


def _specs(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> tuple[Any, Any]:
    ep = torch.export.export(module, args, kwargs)
    return ep.call_spec.in_spec, ep.call_spec.out_spec


class _One(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x + 1


class _Tuple(nn.Module):
    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return x + y, x - y


class _Dict(nn.Module):
    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"b": x * 2, "a": x + 1}  # not sorted: the spec keeps the model's order


class _Nested(nn.Module):
    def forward(self, x: Tensor, pair: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        return {"sum": x + pair["p"], "diff": x - pair["q"]}, x.sum(dim=1)


class _Kwargs(nn.Module):
    def forward(self, x: Tensor, *, mask: Tensor) -> Tensor:
        return x * mask


def _t(*shape: int) -> Tensor:
    return torch.ones(*shape)


# --- names of leaves --------------------------------------------------------------


def test_single_tensor_in_and_out() -> None:
    in_spec, out_spec = _specs(_One(), (_t(2, 3),))
    assert pt2names.input_paths(in_spec) == ["ARGS[0]"]
    assert pt2names.output_paths(out_spec) == ["RESULT"]


def test_tuple_result() -> None:
    in_spec, out_spec = _specs(_Tuple(), (_t(2, 3), _t(2, 3)))
    assert pt2names.input_paths(in_spec) == ["ARGS[0]", "ARGS[1]"]
    assert pt2names.output_paths(out_spec) == ["RESULT[0]", "RESULT[1]"]


def test_dict_result_keeps_the_model_s_key_order() -> None:
    _, out_spec = _specs(_Dict(), (_t(2, 3),))
    assert pt2names.output_paths(out_spec) == ["RESULT[b]", "RESULT[a]"]


def test_nested_input_and_result() -> None:
    in_spec, out_spec = _specs(_Nested(), (_t(2, 3), {"p": _t(2, 3), "q": _t(2, 3)}))
    assert pt2names.input_paths(in_spec) == ["ARGS[0]", "ARGS[1][p]", "ARGS[1][q]"]
    assert pt2names.output_paths(out_spec) == ["RESULT[0][sum]", "RESULT[0][diff]", "RESULT[1]"]


def test_kwargs_follow_args() -> None:
    in_spec, _ = _specs(_Kwargs(), (_t(2, 3),), {"mask": _t(2, 3)})
    assert pt2names.input_paths(in_spec) == ["ARGS[0]", "KWARGS[mask]"]


def test_leaf_order_is_pytree_flattening_order() -> None:
    """The paths name the leaves in the order the runner receives them."""
    value = ((1, {"p": 2, "q": 3}), {"mask": 4})
    leaves, spec = pytree.tree_flatten(value)
    assert leaves == [1, 2, 3, 4]
    assert pt2names.input_paths(spec) == ["ARGS[0]", "ARGS[1][p]", "ARGS[1][q]", "KWARGS[mask]"]


# --- resolving declared names -----------------------------------------------------

PATHS = ["RESULT[logits]", "RESULT[pair][0]", "RESULT[pair][1]"]


def test_resolve_paths_and_ordinals() -> None:
    assert pt2names.resolve(["RESULT[pair][1]", "RESULT[logits]"], PATHS, "output", "m") == [2, 0]
    assert pt2names.resolve(["OUTPUT__2", "OUTPUT__0"], PATHS, "output", "m") == [2, 0]
    assert pt2names.resolve(["output__1"], PATHS, "output", "m") == [1]  # any <prefix>__<i>


def test_resolve_unknown_name_lists_the_names() -> None:
    with pytest.raises(LoadError) as e:
        pt2names.resolve(["RESULT[logit]"], PATHS, "output", "m")
    message = str(e.value)
    assert "'RESULT[logit]'" in message
    assert all(p in message for p in PATHS)
    assert "OUTPUT__0..OUTPUT__2" in message


def test_resolve_ordinal_out_of_range() -> None:
    with pytest.raises(LoadError, match="OUTPUT__3"):
        pt2names.resolve(["OUTPUT__3"], PATHS, "output", "m")


def test_resolve_refuses_two_names_for_one_leaf() -> None:
    with pytest.raises(LoadError, match=r"two declared outputs name 'RESULT\[logits\]'"):
        pt2names.resolve(["RESULT[logits]", "OUTPUT__0"], PATHS, "output", "m")


# --- the exported loader ----------------------------------------------------------


class _Model(nn.Module):
    """A positional and a keyword input, a dict with a nested tuple out."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 3)

    def forward(self, x: Tensor, *, scale: Tensor) -> dict[str, Any]:
        logits = self.linear(x) * scale
        return {"logits": logits, "pair": (logits.sum(dim=1), x * 2)}


def _inputs(rows: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(rows)
    return [torch.randn(rows, 4, generator=g), torch.randn(rows, 3, generator=g)]


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``dynamic.pt2`` (batch Dim(min=1, max=16)), ``static.pt2`` (batch fixed at
    ROWS), and a ``torch.save`` checkpoint."""
    d = tmp_path_factory.mktemp("exported")
    model = _Model().eval()
    x, scale = _inputs(ROWS)
    batch = Dim("batch", min=1, max=16)
    dynamic = torch.export.export(model, (x,), {"scale": scale}, dynamic_shapes={"x": {0: batch}, "scale": {0: batch}})
    torch.export.save(dynamic, d / "dynamic.pt2")
    torch.export.save(torch.export.export(model, (x,), {"scale": scale}), d / "static.pt2")
    torch.save(model.state_dict(), d / "checkpoint.pt")
    return {p.stem: p for p in d.iterdir()}


def _load(path: Path, **kwargs: Any) -> Runner:
    kwargs.setdefault("parameters", {})
    req = LoadRequest(path=str(path), model="m", device="cpu", method="forward", flags=Flags(), **kwargs)
    return load("exported", req)


def _expected(rows: int) -> list[Tensor]:
    x, scale = _inputs(rows)
    leaves: list[Tensor] = pytree.tree_leaves(_Model().eval()(x, scale=scale))
    return leaves


def _assert_close(got: list[Any], want: list[Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_exported_runs_like_the_module(programs: dict[str, Path]) -> None:
    runner = _load(programs["dynamic"], max_batch_size=16)
    assert runner.format == "exported"
    assert runner.inputs == ["ARGS[0]", "KWARGS[scale]"]
    assert runner.kinds == ["tensor", "tensor"]
    assert runner.outputs == ["RESULT[logits]", "RESULT[pair][0]", "RESULT[pair][1]"]
    assert runner.batch_range == (1, 16)
    assert runner.info["compiled"] is False
    for rows in (1, 5, 16):  # a Dim(min=1) program takes one row as it is
        _assert_close(runner.run(_inputs(rows)), _expected(rows))


def test_exported_declared_outputs_by_path(programs: dict[str, Path]) -> None:
    runner = _load(
        programs["dynamic"], input_names=["ARGS[0]", "INPUT__1"], output_names=["RESULT[pair][1]", "RESULT[logits]"]
    )
    assert runner.outputs == ["RESULT[pair][1]", "RESULT[logits]"]
    want = _expected(4)
    _assert_close(runner.run(_inputs(4)), [want[2], want[0]])


def test_exported_ordinal_outputs_return_every_leaf(programs: dict[str, Path]) -> None:
    runner = _load(programs["dynamic"], output_names=["OUTPUT__0"])
    assert runner.outputs == ["RESULT[logits]", "RESULT[pair][0]", "RESULT[pair][1]"]
    _assert_close(runner.run(_inputs(2)), _expected(2))


def test_exported_unknown_declared_names(programs: dict[str, Path]) -> None:
    with pytest.raises(LoadError, match=r"output 'RESULT\[probs\]'.*RESULT\[logits\]"):
        _load(programs["dynamic"], output_names=["RESULT[probs]"])
    with pytest.raises(LoadError, match=r"input 'KWARGS\[mask\]'.*KWARGS\[scale\]"):
        _load(programs["dynamic"], input_names=["ARGS[0]", "KWARGS[mask]"])


def test_exported_max_batch_size_over_the_dim_max(programs: dict[str, Path]) -> None:
    with pytest.raises(LoadError) as e:
        _load(programs["dynamic"], max_batch_size=32)
    assert "max_batch_size is 32" in str(e.value)
    assert "1 to 16" in str(e.value)
    assert "at most 16" in str(e.value)


def test_exported_static_batch_refused_for_batching(programs: dict[str, Path]) -> None:
    with pytest.raises(LoadError, match=rf"static first dimension {ROWS}.*torch.export.Dim.*max_batch_size: 0"):
        _load(programs["static"], max_batch_size=8)
    runner = _load(programs["static"])  # no batching: served as exported
    assert runner.batch_range == (ROWS, ROWS)
    _assert_close(runner.run(_inputs(ROWS)), _expected(ROWS))


def test_exported_with_torch_compile(programs: dict[str, Path]) -> None:
    params = {"TORCH_COMPILE_OPTIONAL_PARAMETERS": '{"backend": "eager"}'}
    runner = _load(programs["dynamic"], parameters=params)
    assert runner.info["compiled"] is True
    assert runner.info["compile_options"] == {"backend": "eager"}
    assert "compile_cache" in runner.info
    _assert_close(runner.run(_inputs(5)), _expected(5))
    off = _load(programs["dynamic"], parameters={"TORCH_COMPILE_OPTIONAL_PARAMETERS": '{"disable": true}'})
    assert off.info["compiled"] is False


def test_exported_refuses_another_kind_of_file(programs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(LoadError, match=r"torch\.save checkpoint"):
        _load(programs["checkpoint"])
    text = tmp_path / "model.pt2"
    text.write_text("not a model")
    with pytest.raises(LoadError, match="not a zip file"):
        _load(text)
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(programs["dynamic"].read_bytes()[:2000])
    with pytest.raises(LoadError, match="truncated or corrupt"):
        _load(truncated)


# --- the runner's checks of a model's results -------------------------------------


def _runner_of(call: Any, result_example: Any) -> Runner:
    in_spec = pytree.tree_flatten(((torch.zeros(1),), {}))[1]
    out_spec = pytree.tree_flatten(result_example)[1]
    req = LoadRequest(path="-", model="m", device="cpu", method="forward", flags=Flags(), parameters={})
    return pt2call.make_runner("python", call, in_spec, out_spec, req, batch_range=None)


def test_runner_names_a_leaf_that_is_not_a_tensor() -> None:
    runner = _runner_of(lambda x: {"a": x, "b": 3}, {"a": torch.zeros(1), "b": torch.zeros(1)})
    with pytest.raises(TypeError, match=r"RESULT\[b\] is a int; expected a Tensor"):
        runner.run([torch.zeros(2)])


def test_runner_refuses_a_result_of_another_shape() -> None:
    runner = _runner_of(lambda x: (x, x, x), (torch.zeros(1), torch.zeros(1)))
    with pytest.raises(TypeError, match=r"returned 3 output leaves; its call specification has 2"):
        runner.run([torch.zeros(2)])

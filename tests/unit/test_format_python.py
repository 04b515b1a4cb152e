"""The model.py loader (format "python"), in-process: real model.py files written to a
temporary directory, loaded as a worker would load them, called through the Runner."""

from __future__ import annotations

import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from libtorchrt.config.flags import parse
from libtorchrt.transport.tensors import Strings
from libtorchrt.workers.formats import LoadError, LoadRequest, Runner, load
from libtorchrt.workers.outputs import OutputMismatchError

LINEAR = """
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).relu()
"""


@pytest.fixture(autouse=True)
def forget_models(tmp_path: Path) -> Iterator[None]:
    """Take the loaded models' directories off ``sys.path`` and their modules out of
    ``sys.modules`` (the loader keeps both, as a worker serving one model should)."""
    path = list(sys.path)
    yield
    sys.path[:] = path
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None) or ""
        if name.startswith("libtorchrt_model_") or file.startswith(str(tmp_path)):
            del sys.modules[name]


NEGATE = """
import torch


class Net(torch.nn.Module):
    def forward(self, x):
        return -x
"""


def write(directory: Path, source: str, **siblings: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in siblings.items():
        (directory / name).write_text(textwrap.dedent(text))
    path = directory / "model.py"
    path.write_text(textwrap.dedent(source))
    return path


def request(path: Path, name: str = "m", **kwargs: Any) -> LoadRequest:
    parameters = kwargs.pop("parameters", {})
    return LoadRequest(
        path=str(path),
        model=name,
        device="cpu",
        method=kwargs.pop("method", "forward"),
        flags=parse(name, parameters),
        parameters=parameters,
        **kwargs,
    )


def load_py(path: Path, **kwargs: Any) -> Runner:
    return load("python", request(path, **kwargs))


def load_error(path: Path, **kwargs: Any) -> str:
    with pytest.raises(LoadError) as info:
        load_py(path, **kwargs)
    return str(info.value)


def strings(value: Any) -> Strings:
    assert isinstance(value, Strings), type(value)
    return value


# -- the model and its weights ----------------------------------------------------------


def test_outputs_equal_the_module_called_directly_with_the_saved_weights(tmp_path: Path) -> None:
    path = write(tmp_path, LINEAR)
    namespace: dict[str, Any] = {}
    exec(LINEAR, namespace)
    torch.manual_seed(0)
    reference = namespace["Net"]().eval()
    torch.save(reference.state_dict(), tmp_path / "model.pt")

    runner = load_py(path)
    x = torch.randn(5, 4)
    (out,) = runner.run([x])
    torch.testing.assert_close(out, reference(x))
    # a fresh Net has other random weights: the loaded one must be the saved one
    assert not torch.allclose(namespace["Net"]()(x), out)
    assert runner.format == "python"
    assert runner.inputs == ["x"]
    assert runner.kinds == ["tensor"]
    assert runner.outputs == []
    assert runner.notes == []
    assert runner.info == {"compiled": False}


def test_without_weights_a_module_with_parameters_gets_a_note(tmp_path: Path) -> None:
    runner = load_py(write(tmp_path, LINEAR))
    assert len(runner.notes) == 1
    assert "no model.pt beside model.py" in runner.notes[0]
    assert "state_dict()" in runner.notes[0]


def test_a_model_imports_the_files_beside_it(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        import torch
        from sibling_helper_a1 import double


        class Net(torch.nn.Module):
            def forward(self, x):
                return double(x)
        """,
        **{"sibling_helper_a1.py": "def double(t):\n    return t * 2\n"},
    )
    runner = load_py(path)
    assert runner.kinds == [None]
    (out,) = runner.run([torch.arange(3)])
    assert out.tolist() == [0, 2, 4]


def test_model_is_chosen_among_several_and_may_alias_an_imported_class(tmp_path: Path) -> None:
    path = write(
        tmp_path / "several",
        """
        import torch

        class Block(torch.nn.Module):
            def forward(self, x):
                return x + 1

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.block = Block()

            def forward(self, x):
                return self.block(x) * 10
        """,
    )
    assert load_py(path).run([torch.zeros(1)])[0].tolist() == [10.0]

    path = write(
        tmp_path / "alias",
        """
        import torch
        from sibling_net_b2 import Net as Model
        """,
        **{"sibling_net_b2.py": NEGATE},
    )
    assert load_py(path).run([torch.ones(1)])[0].tolist() == [-1.0]


def test_the_method_named_by_module_method_name_is_served(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        import torch

        class Net(torch.nn.Module):
            def forward(self, x):
                return x

            def score(self, a: torch.Tensor, b: torch.Tensor):
                return a - b
        """,
    )
    runner = load_py(path, method="score")
    assert runner.inputs == ["a", "b"]
    assert runner.run([torch.tensor([5]), torch.tensor([2])])[0].tolist() == [3]
    assert "Net.predict is missing" in load_error(path, method="predict")


# -- load errors ----------------------------------------------------------------------


def test_an_exception_at_import_names_the_file_line_and_error(tmp_path: Path) -> None:
    path = write(tmp_path, "import torch\n\nSCALE = 1 / 0\n")
    message = load_error(path)
    assert str(path) in message
    assert "at line 3 (`SCALE = 1 / 0`)" in message
    assert "ZeroDivisionError: division by zero" in message


def test_a_syntax_error_and_a_failing_sibling_are_located(tmp_path: Path) -> None:
    message = load_error(write(tmp_path / "syntax", "import torch\nclass Net(torch.nn.Module)\n    pass\n"))
    assert "at line 2" in message and "SyntaxError" in message

    helper = {"sibling_broken_c3.py": "x = 1\nraise ValueError('bad helper')\n"}
    message = load_error(write(tmp_path / "sibling", "import torch\nimport sibling_broken_c3\n", **helper))
    assert "at line 2 (`import sibling_broken_c3`)" in message
    assert re.search(r"raised in .*sibling_broken_c3\.py line 2", message), message
    assert "ValueError: bad helper" in message


def test_a_file_without_a_module_class_is_refused(tmp_path: Path) -> None:
    message = load_error(write(tmp_path / "none", "import torch\n\ndef forward(x):\n    return x\n"))
    assert "defines no torch.nn.Module subclass" in message

    imported = load_error(write(tmp_path / "imported", "from torch.nn import Linear\n"))
    assert "it imports Linear" in imported and "`Model = Linear`" in imported


def test_two_module_classes_without_a_model_are_refused_listed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        import torch

        class Encoder(torch.nn.Module):
            def forward(self, x):
                return x

        class Decoder(torch.nn.Module):
            def forward(self, x):
                return x
        """,
    )
    message = load_error(path)
    assert "several torch.nn.Module subclasses (Encoder, Decoder)" in message
    assert "'Model'" in message


def test_a_class_that_needs_arguments_is_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        import torch

        class Net(torch.nn.Module):
            def __init__(self, width):
                super().__init__()
        """,
    )
    message = load_error(path)
    assert "Net() failed" in message and "TypeError" in message and "defaults" in message


def test_args_and_kwargs_are_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        import torch

        class Net(torch.nn.Module):
            def forward(self, *inputs):
                return inputs[0]
        """,
    )
    assert "takes *inputs; expected named arguments" in load_error(path)


def test_a_state_dict_that_does_not_match_names_every_kind_of_mismatch(tmp_path: Path) -> None:
    path = write(tmp_path, LINEAR)
    state = {"fc.weight": torch.zeros(3, 5), "head.weight": torch.zeros(1)}  # no fc.bias; fc.weight 3x5
    torch.save(state, tmp_path / "model.pt")
    message = load_error(path)
    assert "model.pt does not match Net" in message
    assert "missing keys (1): fc.bias" in message
    assert "unexpected keys (1): head.weight" in message
    assert "size mismatches (1): fc.weight is [3, 5], expected [3, 4]" in message


def test_a_pickled_module_as_model_pt_is_refused_with_advice(tmp_path: Path) -> None:
    path = write(tmp_path, LINEAR)
    torch.save(torch.nn.Linear(4, 3), tmp_path / "model.pt")
    message = load_error(path)
    assert "model.pt is not a state dict" in message
    assert "torch.save(model.state_dict(), 'model.pt')" in message


def test_a_checkpoint_or_a_tensor_as_model_pt_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, LINEAR)
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "model.pt")
    assert "a training checkpoint?" in load_error(path)
    torch.save(torch.zeros(2), tmp_path / "model.pt")
    assert "holds a Tensor; expected a state dict" in load_error(path)


# -- inputs and outputs -----------------------------------------------------------------


def test_strings_in_strings_out(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        from typing import List
        import torch

        class Tokenizer(torch.nn.Module):
            def forward(self, texts: List[str], scale: torch.Tensor) -> list[str]:
                return [t.upper() * int(scale) for t in texts]
        """,
    )
    runner = load_py(path)
    assert runner.inputs == ["texts", "scale"]
    assert runner.kinds == ["strings", "tensor"]
    (out,) = runner.run([["ab", "c"], torch.tensor(2)])
    assert strings(out).count == 2
    assert strings(out).blob == Strings.of(["ABAB", "CC"]).blob


def test_numpy_in_numpy_out(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        import numpy as np
        import torch

        class Pre(torch.nn.Module):
            def forward(self, image: np.ndarray, labels: np.ndarray):
                assert isinstance(image, np.ndarray)
                return (image.T * 2).astype(np.float32), np.array(["cat", "dog"])[labels]
        """,
    )
    runner = load_py(path)
    assert runner.kinds == ["tensor", "tensor"]
    image = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    out, names = runner.run([image, torch.tensor([1, 0])])
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, (image.T * 2).float())
    assert strings(names).blob == Strings.of(["dog", "cat"]).blob


def test_numpy_arguments_on_a_gpu_instance_are_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        import numpy
        import torch

        class Pre(torch.nn.Module):
            def forward(self, image: numpy.ndarray):
                return image
        """,
    )
    with pytest.raises(LoadError, match=r"argument 'image' takes a numpy array.*cuda:0"):
        load("python", LoadRequest(str(path), "m", "cuda:0", "forward", parse("m", {}), {}))


DICT_MODEL = """
from typing import Any
import torch

class Heads(torch.nn.Module):
    def forward(self, x: torch.Tensor){returns}:
        return {{"scores": x * 2, "labels": ["a"] * len(x), "count": x.shape[0]}}
"""


def test_a_dict_result_gives_the_declared_outputs_by_key(tmp_path: Path) -> None:
    path = write(tmp_path / "plain", DICT_MODEL.format(returns=""))
    runner = load_py(path, output_names=["labels", "RESULT[scores]"])
    assert runner.outputs == []  # unannotated: named by the front, as the declared outputs in order
    labels, scores = runner.run([torch.ones(2)])
    assert strings(labels).count == 2
    assert scores.tolist() == [2.0, 2.0]

    annotated = write(tmp_path / "annotated", DICT_MODEL.format(returns=" -> dict[str, Any]"))
    runner = load_py(annotated, output_names=["RESULT[scores]", "labels"])
    assert runner.outputs == ["RESULT[scores]", "labels"]
    scores, labels = runner.run([torch.ones(1)])
    assert scores.tolist() == [2.0] and strings(labels).count == 1


def test_ordinal_names_take_the_dict_by_position_in_their_suffix_order(tmp_path: Path) -> None:
    runner = load_py(write(tmp_path, DICT_MODEL.format(returns="")), output_names=["OUTPUT__1", "OUTPUT__0"])
    first, second = runner.run([torch.ones(1)])
    assert first.tolist() == [2.0]  # OUTPUT__0: the dict's first value
    assert strings(second).count == 1


def test_a_dict_result_without_declared_outputs_fails_at_run(tmp_path: Path) -> None:
    runner = load_py(write(tmp_path, DICT_MODEL.format(returns="")))
    with pytest.raises(TypeError, match=r"returned a dict \(keys 'scores', 'labels', 'count'\); declare its outputs"):
        runner.run([torch.ones(1)])
    runner = load_py(tmp_path / "model.py", output_names=["logits"])
    with pytest.raises(OutputMismatchError, match=r"declared output 'logits' is not a key"):
        runner.run([torch.ones(1)])
    runner = load_py(tmp_path / "model.py", output_names=["count"])
    with pytest.raises(TypeError, match=r"RESULT\[count\] is an int \(1\); expected a Tensor"):
        runner.run([torch.ones(1)])


def test_a_scalar_or_none_result_is_a_type_error(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        import torch

        class Net(torch.nn.Module):
            def forward(self, x):
                return None if x.sum() > 0 else float(x.sum())
        """,
    )
    runner = load_py(path)
    with pytest.raises(TypeError, match=r"forward\(\) returned None; expected a Tensor"):
        runner.run([torch.ones(1)])
    with pytest.raises(TypeError, match=r"returned a float \(0\.0\)"):
        runner.run([torch.zeros(1)])


def test_a_tuple_result_is_one_output_per_item(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        import torch

        class Net(torch.nn.Module):
            def forward(self, x):
                return x + 1, ["s"], x.numpy() * 3
        """,
    )
    a, s, n = load_py(path).run([torch.ones(2)])
    assert a.tolist() == [2.0, 2.0] and strings(s).count == 1 and n.tolist() == [3.0, 3.0]


# -- torch.compile ----------------------------------------------------------------------


def test_compile_options_compile_the_method_lazily(tmp_path: Path) -> None:
    path = write(tmp_path, LINEAR)
    runner = load_py(path, parameters={"TORCH_COMPILE_OPTIONAL_PARAMETERS": '{"backend": "eager"}'})
    assert runner.info["compiled"] is True
    assert runner.info["compile_options"] == {"backend": "eager"}
    assert "compile_cache" in runner.info
    x = torch.randn(2, 4)
    (out,) = runner.run([x])
    assert out.shape == (2, 3) and bool((out >= 0).all())


def test_compile_disabled_runs_the_method_as_is(tmp_path: Path) -> None:
    path = write(tmp_path, LINEAR)
    runner = load_py(path, parameters={"TORCH_COMPILE_OPTIONAL_PARAMETERS": '{"disable": true}'})
    assert runner.info["compiled"] is False
    assert runner.info["compile_options"] == {"disable": True}
    assert runner.run([torch.randn(1, 4)])[0].shape == (1, 3)

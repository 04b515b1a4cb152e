"""Errors that say what is wrong and what to do, where they used to mislead.

- a file that is not TorchScript: torch's "your checkpoint file is corrupted" sent users
  looking for disk errors; the worker now says what the file is;
- misspelt parameters, data types, fields and enum values: "did you mean";
- ``Client("http://...")``: what to connect to instead.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import pytest
import torch

from libtorchrt import Client, ConfigError, ModelConfig, TensorSpec
from libtorchrt.workers.formats import modelfile


class _Double(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("files")
    out = {name: d / name for name in ("script.pt", "state.pt", "module.pt", "export.pt2", "legacy.pt", "text.pt")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(_Double()).save(str(out["script.pt"]))
    torch.save(_Double().state_dict() | {"w": torch.zeros(2)}, out["state.pt"])
    torch.save(torch.nn.Linear(2, 2), out["module.pt"])
    torch.export.save(torch.export.export(_Double(), (torch.ones(2),)), out["export.pt2"])
    out["legacy.pt"].write_bytes(pickle.dumps({"w": [1.0, 2.0]}))
    out["text.pt"].write_text("hello")
    return out


@pytest.mark.parametrize(
    "name, words",
    [
        ("state.pt", "a torch.save checkpoint"),
        ("module.pt", "a torch.save checkpoint"),
        ("export.pt2", "a torch.export program"),
        ("legacy.pt", "a pickle"),
        ("text.pt", "not a zip file"),
    ],
)
def test_a_file_that_is_not_torchscript_is_named_for_what_it_is(files: dict[str, Path], name: str, words: str) -> None:
    text = modelfile.describe(files[name])
    assert text is not None and words in text
    assert "not TorchScript" in text or "not a TorchScript archive" in text


def test_torchscript_and_missing_files_are_not_described(files: dict[str, Path], tmp_path: Path) -> None:
    assert modelfile.describe(files["script.pt"]) is None
    assert modelfile.describe(tmp_path / "nowhere.pt") is None


@pytest.mark.parametrize(
    "key, suggestion",
    [("DISABLE_OPTIMISED_EXECUTION", "DISABLE_OPTIMIZED_EXECUTION"), ("INFERENCE_MOD", "INFERENCE_MODE")],
)
def test_a_misspelt_parameter_gets_a_suggestion(key: str, suggestion: str) -> None:
    notes = ModelConfig("m", "m.pt", parameters={key: "true", "SOMETHING_ELSE": "1"}).flags.notes()
    (note,) = notes
    assert f"{key} (did you mean {suggestion}?)" in note
    assert "SOMETHING_ELSE (did" not in note  # no suggestion for what resembles nothing


@pytest.mark.parametrize(
    "dtype, suggestion",
    [("TYPE_FLOAT32", "TYPE_FP32"), ("TYPE_FP23", "TYPE_FP32"), ("TYPE_STRNG", "TYPE_STRING"), ("flaot32", "float32")],
)
def test_a_misspelt_data_type_gets_a_suggestion(dtype: str, suggestion: str) -> None:
    with pytest.raises(ConfigError, match=f"did you mean {suggestion}\\?"):
        TensorSpec("x", dtype)


@pytest.mark.parametrize(
    "line, suggestion",
    [
        ('input [ { name: "x" data_type: TYPE_FLOAT32 dims: [1] } ]', "TYPE_FP32"),
        ('input [ { name: "x" data_type: TYPE_FP32 dim: [1] } ]', "dims"),
        ("instance_group [ { kind: KIND_GPUS } ]", "KIND_GPU"),
        ("max_batchsize: 4", "max_batch_size"),
    ],
)
def test_a_misspelt_pbtxt_field_or_value_gets_a_suggestion(line: str, suggestion: str) -> None:
    with pytest.raises(ConfigError, match=f"did you mean '{suggestion}'\\?") as info:
        ModelConfig.from_pbtxt(f'name: "m"\nplatform: "pytorch_libtorch"\n{line}\n')
    assert "<config.pbtxt>:3:" in str(info.value)


@pytest.mark.parametrize(
    "endpoint, words",
    [
        ("http://127.0.0.1:8000", "tritonclient.http"),
        ("grpc://127.0.0.1:8001", "tritonclient.grpc"),
        ("127.0.0.1:8003", "'tcp://127.0.0.1:8003'"),
        ("udp://x", "tcp://HOST:PORT"),
    ],
)
def test_a_client_endpoint_that_is_not_zeromq_says_what_to_use(endpoint: str, words: str) -> None:
    with pytest.raises(ConfigError, match="endpoint") as info:
        Client(endpoint, connect_timeout=1)
    assert words in str(info.value)


def test_the_bench_takes_a_model_named_after_parameters() -> None:
    # `--parameters` takes one or more values, so argparse handed it the model name,
    # and the tool said "name a model" although one was named.
    from libtorchrt.bench.cli import parse_args

    args = parse_args(["--parameters", "DISABLE_OPTIMIZED_EXECUTION=true,false", "model.pt"])
    assert args.model_or_repository == "model.pt"
    assert args.parameters == ["DISABLE_OPTIMIZED_EXECUTION=true,false"]
    args = parse_args(["model.pt", "--parameters", "A=1", "B=2"])
    assert args.model_or_repository == "model.pt" and args.parameters == ["A=1", "B=2"]

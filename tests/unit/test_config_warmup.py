"""Warm-up samples: their checks, and the tensors warmup_tensors() builds from them."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
import torch

from libtorchrt import ConfigError, ModelConfig, TensorSpec
from libtorchrt.config import ModelWarmup, WarmupInput, warmup_tensors


def sample(batch_size: int = 1, count: int = 0, **inputs: WarmupInput) -> ModelWarmup:
    return ModelWarmup("w", batch_size, inputs, count)


def strings(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(s)) + s for s in items)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    (tmp_path / "warmup").mkdir()
    return tmp_path


# -------------------------------------------------------------------- checks


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"zero_data": True, "random_data": True},
        {"zero_data": True, "input_data_file": "x.bin"},
    ],
)
def test_an_input_takes_exactly_one_data_source(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="exactly one of zero_data, random_data, input_data_file"):
        WarmupInput("float32", [2], **kwargs)


@pytest.mark.parametrize("name", ["/etc/passwd", "../secret.bin", "a/../../b", "", "\\\\server\\share"])
def test_input_data_file_must_stay_in_the_warmup_directory(name: str) -> None:
    with pytest.raises(ConfigError, match="relative path") as e:
        WarmupInput("float32", [2], input_data_file=name)
    assert e.value.key == "input_data_file"


def test_input_data_file_may_be_in_a_subdirectory() -> None:
    assert WarmupInput("int64", [2], input_data_file="tokens/short.bin").input_data_file == "tokens/short.bin"


def test_dims_must_be_fixed() -> None:
    with pytest.raises(ConfigError, match="no -1"):
        WarmupInput("float32", [2, -1], zero_data=True)


@pytest.mark.parametrize(("field", "value"), [("batch_size", -1), ("count", -2), ("batch_size", True)])
def test_negative_batch_size_or_count_is_refused(field: str, value: Any) -> None:
    kwargs = {"name": "w", "inputs": {"x": WarmupInput("float32", [1], zero_data=True)}, field: value}
    with pytest.raises(ConfigError, match=field):
        ModelWarmup(**kwargs)


def test_a_sample_needs_inputs() -> None:
    with pytest.raises(ConfigError, match="has no inputs"):
        ModelWarmup("w", 1, {})


def test_count_zero_means_once_and_batch_size_zero_skips() -> None:
    x = WarmupInput("float32", [1], zero_data=True)
    assert (sample(count=0, x=x).runs, sample(count=3, x=x).runs, sample(batch_size=0, count=3, x=x).runs) == (1, 3, 0)
    assert warmup_tensors(sample(batch_size=0, x=x)) == []


# ------------------------------------------------------------------- tensors


def test_zero_data_with_and_without_a_batch_dimension() -> None:
    w = sample(batch_size=3, count=2, x=WarmupInput("TYPE_INT32", [2, 2], zero_data=True))
    batched = warmup_tensors(w, max_batch_size=4)
    assert len(batched) == 2 and batched[0] is batched[1]
    assert torch.equal(batched[0]["x"], torch.zeros(3, 2, 2, dtype=torch.int32))
    (single,) = warmup_tensors(sample(x=WarmupInput("int32", [2, 2], zero_data=True)))
    assert single["x"].shape == (2, 2)


@pytest.mark.parametrize(
    "dtype", ["float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool"]
)
def test_random_data_is_in_range_for_every_dtype(dtype: str) -> None:
    (req,) = warmup_tensors(sample(batch_size=2, x=WarmupInput(dtype, [64], random_data=True)), max_batch_size=2)
    x = req["x"]
    assert x.dtype == getattr(torch, dtype) and x.shape == (2, 64)
    values = x.double()
    assert values.min() >= 0 and values.max() <= 1, "floats in [0, 1), integers 0 or 1: safe as indices"
    assert torch.equal(x[0], x[1]), "the batch repeats one sample, as Triton does"


def test_random_data_is_reproducible() -> None:
    w = sample(x=WarmupInput("float32", [8], random_data=True))
    assert torch.equal(warmup_tensors(w)[0]["x"], warmup_tensors(w)[0]["x"])


def test_file_data_is_raw_row_major_bytes(model_dir: Path) -> None:
    data = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    (model_dir / "warmup" / "x.bin").write_bytes(data.numpy().tobytes() + b"extra bytes are ignored")
    w = sample(batch_size=2, x=WarmupInput("TYPE_FP32", [2, 3], input_data_file="x.bin"))
    (req,) = warmup_tensors(w, model_dir, max_batch_size=4)
    assert torch.equal(req["x"], data.expand(2, 2, 3))


def test_a_short_file_names_the_sizes(model_dir: Path) -> None:
    (model_dir / "warmup" / "x.bin").write_bytes(b"\x00" * 10)
    w = sample(x=WarmupInput("int64", [2], input_data_file="x.bin"))
    with pytest.raises(ConfigError, match=r"needs 16 bytes \(2 x int64\) but 'x.bin' holds 10"):
        warmup_tensors(w, model_dir)


def test_a_missing_file_names_its_path(model_dir: Path) -> None:
    w = sample(x=WarmupInput("int64", [2], input_data_file="nope.bin"))
    with pytest.raises(ConfigError, match=r"cannot read .*warmup/nope\.bin") as e:
        warmup_tensors(w, model_dir)
    assert e.value.key == "input_data_file"
    with pytest.raises(ConfigError, match="no directory"):
        warmup_tensors(w, None)


def test_string_data_from_zero_random_and_file(model_dir: Path) -> None:
    (model_dir / "warmup" / "s.bin").write_bytes(strings(b"hello", "wörld".encode(), b""))
    w = sample(
        batch_size=2,
        z=WarmupInput("TYPE_STRING", [2], zero_data=True),
        r=WarmupInput("TYPE_STRING", [1], random_data=True),
        f=WarmupInput("TYPE_STRING", [3], input_data_file="s.bin"),
    )
    (req,) = warmup_tensors(w, model_dir, max_batch_size=2)
    assert req["z"] == [""] * 4
    assert req["r"] == ["", ""], "random strings are empty strings, as in Triton"
    assert req["f"] == ["hello", "wörld", "", "hello", "wörld", ""]
    (unbatched,) = warmup_tensors(sample(f=WarmupInput("string", [3], input_data_file="s.bin")), model_dir)
    assert unbatched["f"] == ["hello", "wörld", ""]


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (strings(b"a", b"b"), "holds 2 strings; dims [3] take 3"),
        (strings(b"a", b"b") + b"\x01\x00", "ends inside a 4-byte length"),
        (strings(b"a", b"b") + struct.pack("<I", 100) + b"short", "claims 100 bytes past the end"),
        (strings(b"a", b"\xff\xfe", b"c"), "element 1 is not UTF-8"),
    ],
)
def test_bad_string_files_say_what_is_wrong(model_dir: Path, data: bytes, words: str) -> None:
    (model_dir / "warmup" / "s.bin").write_bytes(data)
    with pytest.raises(ConfigError) as e:
        warmup_tensors(sample(s=WarmupInput("string", [3], input_data_file="s.bin")), model_dir)
    assert words in str(e.value)


# ------------------------------------------------------- from a ModelConfig


def test_model_config_warmup_requests_in_order(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    (model_dir / "warmup").mkdir(parents=True)
    (model_dir / "warmup" / "ids.bin").write_bytes(struct.pack("<3q", 7, 8, 9))
    cfg = ModelConfig(
        "m",
        model_dir / "1" / "model.pt",
        inputs=[
            TensorSpec("ids", "int64", [3]),
            TensorSpec("mask", "bool", [-1]),
            TensorSpec("o", dims=[2], optional=True),
        ],
        max_batch_size=4,
        warmup=[
            ModelWarmup("file", 1, {"ids": WarmupInput("int64", [3], input_data_file="ids.bin")}),
            ModelWarmup("zeros", 2, {"ids": WarmupInput("int64", [3], zero_data=True)}, count=2),
        ],
        warmup_runs=1,
    )
    assert cfg.model_dir == model_dir
    assert [w.name for w in cfg.warmup_samples()] == ["file", "zeros", "WARMUP_RUNS"]
    requests = cfg.warmup_requests()
    assert len(requests) == cfg.warmup_count == 4
    assert torch.equal(requests[0]["ids"], torch.tensor([[7, 8, 9]]))
    assert requests[1]["ids"].shape == (2, 3)
    last = requests[3]
    assert set(last) == {"ids", "mask"}, "optional inputs are left out of WARMUP_RUNS requests"
    assert last["mask"].shape == (1, 1) and last["mask"].dtype == torch.bool, "-1 becomes 1, plus the batch"


def test_model_config_warmup_errors_name_the_model(tmp_path: Path) -> None:
    cfg = ModelConfig(
        "m",
        tmp_path / "m" / "1" / "model.pt",
        warmup=[ModelWarmup("w", 1, {"x": WarmupInput("float32", [1], input_data_file="x.bin")})],
    )
    with pytest.raises(ConfigError, match="model 'm': model_warmup 'w': input 'x': cannot read") as e:
        cfg.warmup_requests()
    assert e.value.model == "m"

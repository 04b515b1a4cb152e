"""The classification extension (libtorchrt/server/classification.py and the codec's
use of it): Triton's strings, shapes and labels, without a server."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from libtorchrt import ModelConfig, TensorSpec
from libtorchrt.server.classification import ClassificationError, Labels, top_classes
from libtorchrt.server.kserve import RequestError, classify_outputs, decode_request, encode_response


def test_a_batch_is_classified_row_by_row() -> None:
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]])
    items, shape = top_classes(scores, 2, batched=True)
    assert shape == [2, 2]
    assert items == [b"0.700000:1", b"0.200000:2", b"0.500000:0", b"0.250000:1"]  # (ties keep index order)


def test_without_batching_every_element_is_one_row() -> None:
    scores = torch.tensor([[0.1, 0.7], [0.9, 0.2]])
    items, shape = top_classes(scores, 3, batched=False)
    assert (items, shape) == ([b"0.900000:2", b"0.700000:1", b"0.200000:3"], [3])
    assert top_classes(torch.tensor(5.0), 4, batched=True) == ([b"5.000000:0"], [1])  # a scalar: one element


def test_the_count_is_capped_by_the_row_and_labels_are_appended() -> None:
    labels = ["cat", "", "dog"]  # an empty line is no label (as in Triton)
    items, shape = top_classes(torch.tensor([[1.0, 3.0, 2.0, 4.0]]), 10, batched=True, labels=labels)
    assert shape == [1, 4]
    assert items == [b"4.000000:3", b"3.000000:1", b"2.000000:2:dog", b"1.000000:0:cat"]


@pytest.mark.parametrize(
    ("dtype", "want"),
    [
        (torch.int64, [b"-1:1", b"-5:0"]),
        (torch.int32, [b"-1:1", b"-5:0"]),
        (torch.uint8, [b"251:0", b"255:1"][::-1]),
        (torch.float16, [b"-1.000000:1", b"-5.000000:0"]),
        (torch.bfloat16, [b"-1.000000:1", b"-5.000000:0"]),
        (torch.float64, [b"-1.000000:1", b"-5.000000:0"]),
    ],
)
def test_values_are_written_as_triton_writes_them(dtype: torch.dtype, want: list[bytes]) -> None:
    t = torch.tensor([-5, -1]).to(dtype)
    assert top_classes(t, 2, batched=False)[0] == want


def test_outputs_that_are_not_numbers_are_refused() -> None:
    with pytest.raises(ClassificationError, match="output 'mask' is bool: classification needs an output of numbers"):
        top_classes(torch.tensor([True]), 1, batched=False, name="mask")
    with pytest.raises(ClassificationError, match="is strings"):
        top_classes(["a"], 1, batched=False)  # type: ignore[arg-type]


def _model(tmp_path: Path, labels: str | None) -> ModelConfig:
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "model.pt").write_bytes(b"")
    if labels is not None:
        (tmp_path / "m" / "labels.txt").write_text(labels)
    return ModelConfig(
        "m",
        tmp_path / "m" / "1" / "model.pt",
        format="torchscript",
        outputs=[TensorSpec("probs", "FP32", [3], label_filename="labels.txt"), TensorSpec("other", "FP32", [3])],
    )


def test_label_files_are_read_once_and_again_when_changed(tmp_path: Path) -> None:
    cfg = _model(tmp_path, "cat\r\ndog\nbird\n")
    labels = Labels()
    assert labels.of(cfg, "probs") == ["cat", "dog", "bird"]
    assert labels.of(cfg, "other") is None and labels.of(cfg, "nope") is None
    path = tmp_path / "m" / "labels.txt"
    path.write_text("ant\nbee\n")
    os.utime(path, ns=(1, 1))  # (another mtime, whatever the clock's resolution)
    assert labels.of(cfg, "probs") == ["ant", "bee"]
    path.unlink()
    with pytest.raises(ClassificationError, match=r"cannot read label file 'labels\.txt' of output 'probs'"):
        labels.of(cfg, "probs")


def test_the_codec_classifies_what_the_request_asks(tmp_path: Path) -> None:
    cfg = _model(tmp_path, "cat\ndog\nbird\n")
    doc = {
        "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],
        "outputs": [
            {"name": "probs", "parameters": {"classification": 2, "binary_data": False}},
            {"name": "other", "parameters": {"classification": 1, "binary_data": True}},
        ],
    }
    req = decode_request(bytearray(json.dumps(doc).encode()), None, "m")
    assert [(o.name, o.class_count) for o in req.outputs or ()] == [("probs", 2), ("other", 1)]
    outputs = {"probs": torch.tensor([[0.2, 0.5, 0.3]]), "other": torch.tensor([[1.0, 3.0, 2.0]])}
    labels = Labels()
    classified = classify_outputs(req, outputs, batched=True, labels=lambda name: labels.of(cfg, name))
    encoded = encode_response("m", 1, req, classified)
    header = json.loads(encoded.header[: encoded.header_length])
    assert header["outputs"][0] == {
        "name": "probs",
        "datatype": "BYTES",
        "shape": [1, 2],
        "data": ["0.500000:1:dog", "0.300000:2:bird"],
    }
    assert header["outputs"][1]["shape"] == [1, 1] and header["outputs"][1]["datatype"] == "BYTES"
    assert bytes(encoded.chunks[0]) == b"\x0a\x00\x00\x003.000000:1"
    with pytest.raises(RequestError) as e:
        classify_outputs(req, {"probs": torch.tensor([True]), "other": outputs["other"]}, batched=False)
    assert e.value.status == 400 and "output 'probs' is bool" in e.value.message

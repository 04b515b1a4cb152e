"""The KServe v2 tensor codec (libtorchrt/server/kserve.py) and the metadata documents."""

from __future__ import annotations

import json
import struct
from typing import Any

import ml_dtypes  # comes with tritonclient (a dev dependency): how clients hold BF16
import numpy as np
import pytest
import torch

from libtorchrt import ModelConfig, TensorSpec
from libtorchrt.deadlines import MAX_TIMEOUT_S
from libtorchrt.info import ModelStats, ModelStatus
from libtorchrt.server import kserve, metadata
from libtorchrt.server.kserve import InferRequest, OutputRequest, RequestError, decode_request, encode_response

DTYPES = ["BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "BF16", "FP32", "FP64"]


def body(doc: dict[str, Any], *data: bytes) -> tuple[bytearray, int | None]:
    header = json.dumps(doc).encode()
    return bytearray(header + b"".join(data)), (len(header) if data else None)


def sample(datatype: str) -> torch.Tensor:
    dtype = getattr(torch, kserve.DATATYPES[datatype])
    if datatype == "BOOL":
        return torch.tensor([[True, False, True], [False, False, True]])
    return (torch.arange(6) * 3 - 5).to(dtype).reshape(2, 3) if "INT" in datatype else torch.linspace(
        -2, 2, 6
    ).to(dtype).reshape(2, 3)  # fmt: skip


def raw(t: torch.Tensor) -> bytes:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


@pytest.mark.parametrize("datatype", DTYPES)
def test_binary_inputs_decode_to_the_same_tensor(datatype: str) -> None:
    t = sample(datatype)
    data = raw(t)
    doc = {
        "inputs": [{"name": "x", "shape": [2, 3], "datatype": datatype, "parameters": {"binary_data_size": len(data)}}]
    }
    req = decode_request(*body(doc, data), "m")
    got = req.inputs["x"]
    assert got.dtype == t.dtype and got.shape == (2, 3) and torch.equal(got, t)


@pytest.mark.parametrize("datatype", DTYPES)
def test_json_inputs_decode_to_the_same_tensor(datatype: str) -> None:
    t = sample(datatype)
    values = t.float().tolist() if t.dtype in (torch.float16, torch.bfloat16) else t.tolist()
    for data in (values, [v for row in values for v in row]):  # nested or flat
        doc = {"inputs": [{"name": "x", "shape": [2, 3], "datatype": datatype, "data": data}]}
        got = decode_request(*body(doc), "m").inputs["x"]
        assert got.dtype == t.dtype and torch.equal(got, t)


def test_bf16_binary_matches_ml_dtypes() -> None:
    arr = np.array([1.5, -2.25, 3.0], dtype=ml_dtypes.bfloat16)  # what tritonclient sends
    doc = {"inputs": [{"name": "x", "shape": [3], "datatype": "BF16", "parameters": {"binary_data_size": 6}}]}
    got = decode_request(*body(doc, arr.tobytes()), "m").inputs["x"]
    assert torch.equal(got, torch.tensor([1.5, -2.25, 3.0], dtype=torch.bfloat16))


def test_bytes_inputs_binary_and_json() -> None:
    items = ["héllo", "", "a b"]
    blob = b"".join(struct.pack("<I", len(s.encode())) + s.encode() for s in items)
    doc = {"inputs": [{"name": "s", "shape": [3], "datatype": "BYTES", "parameters": {"binary_data_size": len(blob)}}]}
    assert decode_request(*body(doc, blob), "m").inputs["s"] == [s.encode() for s in items]
    doc = {"inputs": [{"name": "s", "shape": [1, 3], "datatype": "BYTES", "data": [items]}]}
    assert decode_request(*body(doc), "m").inputs["s"] == [s.encode() for s in items]


def test_binary_inputs_are_views_of_the_body_or_aligned_copies() -> None:
    data = np.arange(4, dtype=np.float32).tobytes()
    doc = {"inputs": [{"name": "x", "shape": [4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}]}
    header = json.dumps(doc).encode()
    for pad in range(4):  # JSON may end in spaces: move the data to every alignment
        b = bytearray(header + b" " * pad + data)
        n = len(header) + pad
        t = decode_request(b, n, "m").inputs["x"]
        assert t.tolist() == [0.0, 1.0, 2.0, 3.0] and t.data_ptr() % 4 == 0
        aligned = np.frombuffer(b, np.uint8)[n:].ctypes.data % 4 == 0
        b[n + 3] = 0x7F  # the last byte of element 0
        assert (t[0].item() != 0) == aligned  # a view when aligned (no copy), else a copy


def test_request_parameters_and_outputs() -> None:
    doc = {
        "id": "7",
        "parameters": {"binary_data_output": True, "timeout": 1500000, "priority": 2},
        "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],
        "outputs": [{"name": "a", "parameters": {"binary_data": False}}, {"name": "b"}],
    }
    req = decode_request(*body(doc), "m")
    assert req.id == "7" and req.binary_output and req.timeout == 1.5 and req.priority == 2
    assert req.outputs == [OutputRequest("a", False), OutputRequest("b", None)]


BAD: list[tuple[dict[str, Any], bytes, str]] = [
    ({"inputs": "x"}, b"", "no 'inputs'"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}, b"", "neither 'data' nor"),
    ({"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}, b"", "has no 'name'"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "data": [1]}]}, b"", "has no 'shape'"),
    ({"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]}, b"", "integer >= 0"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}] * 2}, b"", "given twice"),
    ({"inputs": [{"name": "x", "shape": [2], "datatype": "INT32", "data": [1, 2.5]}]}, b"", "must be integers"),
    ({"inputs": [{"name": "x", "shape": [2], "datatype": "BOOL", "data": [1, 0]}]}, b"", "must be true/false"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "UINT8", "data": [256]}]}, b"", "out of the range"),
    ({"inputs": [{"name": "x", "shape": [2], "datatype": "BYTES", "data": ["a", 1]}]}, b"", "must be strings"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["\udc80"]}]}, b"", "lone surrogate"),
    ({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [[1], [2, 3]]}]}, b"", "ragged"),
    ({"inputs": [{"name": "x", "shape": [2], "datatype": "BOOL", "parameters": {"binary_data_size": 2}}]},
     b"\x00\x07", "0 or 1"),
    ({"inputs": [{"name": "x", "shape": [4], "datatype": "BYTES", "parameters": {"binary_data_size": 3}}]},
     b"\x01\x00\x00", "4-byte length"),
    ({"inputs": [{"name": "x", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": 5}}]},
     b"\x01\x00\x00\x00a", "binary data has 1"),
    ({"parameters": {"binary_data_output": "yes"}, "inputs": []}, b"", "must be true or false"),
    ({"parameters": {"classification": 2}, "inputs": []}, b"", "classification"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], "outputs": {}}, b"", "must be a list"),
]  # fmt: skip


@pytest.mark.parametrize(("doc", "data", "message"), BAD)
def test_bad_requests_name_what_is_wrong(doc: dict[str, Any], data: bytes, message: str) -> None:
    with pytest.raises(RequestError) as e:
        decode_request(*body(doc, *([data] if data else [])), "m")
    assert e.value.status == 400 and message in e.value.message


def test_a_huge_shape_allocates_nothing() -> None:
    doc = {"inputs": [{"name": "x", "shape": [1 << 28, 1 << 20], "datatype": "FP64", "parameters": {
        "binary_data_size": 8}}]}  # fmt: skip
    with pytest.raises(RequestError, match="binary_data_size is 8"):
        decode_request(*body(doc, bytes(8)), "m")


@pytest.mark.parametrize("shape", [[0, 2**62], [2**62], [0, 2**64], [2**24, 0, 2**25], [0] + [2**20] * 10])
def test_an_absurd_shape_is_refused_even_when_empty(shape: list[int]) -> None:
    # [0, 2**62] holds no element, yet its strides overflowed int64 arithmetic further on
    doc = {"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": []}]}
    with pytest.raises(RequestError, match="is too large") as e:
        decode_request(*body(doc), "m")
    assert e.value.status == 400 and len(e.value.message) < 300
    ok = {"inputs": [{"name": "x", "shape": [0, 2**40], "datatype": "FP32", "data": []}]}
    assert decode_request(*body(ok), "m").inputs["x"].shape == (0, 2**40)


@pytest.mark.parametrize(
    ("timeout", "seconds"),
    [(0, None), (1500000, 1.5), (2.5e6, 2.5), (3_000_000_000_000, MAX_TIMEOUT_S), (10**400, MAX_TIMEOUT_S)],
)
def test_the_timeout_parameter_is_microseconds_capped(timeout: Any, seconds: float | None) -> None:
    doc = {"parameters": {"timeout": timeout}, "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}
    assert decode_request(*body(doc), "m").timeout == seconds


def test_infinity_as_timeout_is_capped() -> None:
    x = b'[{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]'
    raw_doc = b'{"parameters": {"timeout": Infinity}, "inputs": ' + x + b"}"
    assert decode_request(bytearray(raw_doc), None, "m").timeout == MAX_TIMEOUT_S


@pytest.mark.parametrize("timeout", ["-1", "NaN", "true", '"5"', "[1]", "-1e-3", "null"])
def test_a_bad_timeout_is_refused_naming_the_parameter(timeout: str) -> None:
    x = '[{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]'
    raw_doc = f'{{"parameters": {{"timeout": {timeout}}}, "inputs": {x}}}'
    if timeout == "null":  # no timeout at all
        assert decode_request(bytearray(raw_doc.encode()), None, "m").timeout is None
        return
    with pytest.raises(RequestError, match="parameter 'timeout' must be a number of microseconds >= 0") as e:
        decode_request(bytearray(raw_doc.encode()), None, "m")
    assert e.value.status == 400


def test_deep_json_is_400_not_a_recursion_error() -> None:
    for nested in (b"[" * 100_000 + b"]" * 100_000, b'{"inputs": ' + b"[" * 100_000):
        with pytest.raises(RequestError, match="nested too deeply"):
            decode_request(bytearray(nested), None, "m")
    deep = json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [[[[[[1]]]]]]}]})
    data = "[" * 200 + "1" + "]" * 200
    doc = '{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": ' + data + "}]}"
    with pytest.raises(RequestError, match="nested deeper than numpy"):
        decode_request(bytearray(doc.encode()), None, "m")
    assert decode_request(bytearray(deep.encode()), None, "m").inputs["x"].numel() == 1


def test_an_output_asked_for_twice_is_refused() -> None:
    doc = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], "outputs": [{"name": "a"}] * 2}
    with pytest.raises(RequestError, match="output 'a' is asked for twice"):
        decode_request(*body(doc), "m")


def test_json_outputs_over_the_limit_are_refused_binary_ones_are_not() -> None:
    outputs = {"big": torch.zeros(1000), "small": torch.zeros(2), "s": ["abc"] * 10}
    assert kserve.data_bytes(outputs["big"]) == 4000 and kserve.data_bytes(outputs["s"]) == 70
    with pytest.raises(RequestError) as e:
        encode_response("m", 1, InferRequest(), outputs, max_json_bytes=4000)
    assert e.value.status == 400 and "4078 bytes of tensor data" in e.value.message
    assert '"binary_data": true' in e.value.message and "--max-json-response-bytes" in e.value.message
    # binary outputs do not count; the others fit
    req = InferRequest(outputs=[OutputRequest("big", True), OutputRequest("small"), OutputRequest("s")])
    doc, data = _decode_response(encode_response("m", 1, req, outputs, max_json_bytes=100))
    assert len(data) == 4000 and doc["outputs"][1]["data"] == [0.0, 0.0]
    doc, data = _decode_response(encode_response("m", 1, InferRequest(binary_output=True), outputs, max_json_bytes=0))
    assert len(data) == 4000 + 8 + 70
    assert encode_response("m", 1, InferRequest(), outputs, max_json_bytes=4078).header_length is None


def test_declared_datatype_is_checked() -> None:
    doc = {"inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": [1]}]}
    with pytest.raises(RequestError, match="input 'x' of model 'm': expected datatype FP32, got INT64"):
        decode_request(*body(doc), "m", {"x": TensorSpec("x", "float32", [1])})


def _decode_response(enc: kserve.EncodedResponse) -> tuple[dict[str, Any], bytes]:
    data = b"".join(bytes(memoryview(c)) for c in enc.chunks)
    assert enc.size == len(enc.header) + len(data)
    return json.loads(enc.header), data


@pytest.mark.parametrize("datatype", DTYPES)
def test_outputs_encode_as_json_and_binary(datatype: str) -> None:
    t = sample(datatype)
    doc, data = _decode_response(encode_response("m", 3, InferRequest(id="i"), {"y": t}))
    out = doc["outputs"][0]
    assert doc["model_name"] == "m" and doc["model_version"] == "3" and doc["id"] == "i"
    assert out["datatype"] == datatype and out["shape"] == [2, 3] and data == b""
    want = t.float().reshape(-1).tolist() if t.dtype in (torch.float16, torch.bfloat16) else t.reshape(-1).tolist()
    assert out["data"] == want
    enc = encode_response("m", 3, InferRequest(binary_output=True), {"y": t})
    doc, data = _decode_response(enc)
    assert enc.header_length == len(enc.header)
    assert doc["outputs"][0]["parameters"]["binary_data_size"] == len(data) and data == raw(t.contiguous())


def test_string_outputs_and_output_selection() -> None:
    outputs = {"s": ["a", "bé"], "n": torch.tensor([1, 2])}
    req = InferRequest(outputs=[OutputRequest("s", True)])
    doc, data = _decode_response(encode_response("m", 1, req, outputs))
    assert [o["name"] for o in doc["outputs"]] == ["s"]
    assert data == struct.pack("<I", 1) + b"a" + struct.pack("<I", 3) + "bé".encode()
    doc, _ = _decode_response(encode_response("m", 1, InferRequest(), outputs))
    assert doc["outputs"][0] == {"name": "s", "datatype": "BYTES", "shape": [2], "data": ["a", "bé"]}
    with pytest.raises(RequestError, match="has no output 'z'"):
        encode_response("m", 1, InferRequest(outputs=[OutputRequest("z")]), outputs)
    with pytest.raises(RequestError) as e:
        encode_response("m", 1, InferRequest(), {"c": torch.zeros(2, dtype=torch.complex64)})
    assert e.value.status == 500


def test_model_metadata_and_config_documents() -> None:
    cfg = ModelConfig.from_pbtxt(
        """
        name: "m"
        max_batch_size: 8
        input [ { name: "x" data_type: TYPE_FP32 dims: [ 3, -1 ] } ]
        output [ { name: "y" data_type: TYPE_STRING dims: [ -1 ] } ]
        instance_group [ { count: 2 kind: KIND_CPU } ]
        """
    )
    meta = metadata.model_metadata(cfg, [2, 1])
    assert meta == {
        "name": "m",
        "versions": ["1", "2"],
        "platform": "pytorch_libtorch",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3, -1]}],
        "outputs": [{"name": "y", "datatype": "BYTES", "shape": [-1, -1]}],
    }
    doc = metadata.model_config(cfg)
    assert doc["max_batch_size"] == 8 and doc["input"][0]["dims"] == [3, -1]
    assert doc["output"][0]["data_type"] == "TYPE_STRING" and doc["instance_group"][0]["count"] == 2
    python_cfg = ModelConfig("p", "p.pt", inputs=[TensorSpec("x")])  # no dims: shown as [-1]
    assert metadata.model_config(python_cfg)["input"][0]["dims"] == [-1]


def test_repository_index_and_statistics() -> None:
    index = metadata.repository_index(
        [ModelStatus("a", 1, "ready"), ModelStatus("b", None, "failed", "bad config"), ModelStatus("c", 2, "loading")]
    )
    assert index == [
        {"name": "a", "state": "READY", "version": "1", "reason": ""},
        {"name": "b", "state": "UNAVAILABLE", "reason": "bad config"},
        {"name": "c", "state": "LOADING", "version": "2", "reason": ""},
    ]
    stats = ModelStats("a", 1, success=3, failure=1, inferences=6, executions=2, queue_ns=10, compute_ns=20,
                       request_ns=40, batch_sizes={2: 1, 4: 1})  # fmt: skip
    doc = metadata.model_statistics([stats])["model_stats"][0]
    assert doc["inference_count"] == 6 and doc["execution_count"] == 2
    assert doc["inference_stats"]["success"] == {"count": 3, "ns": 40}
    assert doc["inference_stats"]["fail"]["count"] == 1
    assert [b["batch_size"] for b in doc["batch_stats"]] == [2, 4]

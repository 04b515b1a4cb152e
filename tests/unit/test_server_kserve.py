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


def test_the_config_document_is_the_same_on_a_protobuf_without_the_newest_json_options() -> None:
    # Before protobuf 7 MessageToDict has no unquote_int64_if_possible: the fallback
    # unquotes the 64-bit integers itself (a clean install resolved protobuf 6.33).
    from google.protobuf import json_format

    from libtorchrt.config import writer

    cfg = ModelConfig.from_pbtxt(
        """
        name: "m"
        max_batch_size: 8
        input [ { name: "x" data_type: TYPE_FP32 dims: [ 3, -1 ] } ]
        output [ { name: "y" data_type: TYPE_FP32 dims: [ 2 ] } ]
        parameters { key: "INFERENCE_MODE" value: { string_value: "true" } }
        sequence_batching {
          max_sequence_idle_microseconds: 5000000
          state [ { input_name: "s" output_name: "t" data_type: TYPE_FP32 dims: [ 4 ] } ]
          oldest { max_queue_delay_microseconds: 300 }
        }
        model_warmup [ { name: "w" batch_size: 1 inputs { key: "x" value: { data_type: TYPE_FP32 dims: [ 3, 5 ] zero_data: true } } } ]
        """  # noqa: E501
    )
    msg = writer.to_message(cfg)
    quoted = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    assert quoted["input"][0]["dims"] == ["3", "-1"]  # (what protobuf's JSON does to int64)
    doc = metadata.unquote_int64(quoted, msg.DESCRIPTOR)
    assert doc["input"][0]["dims"] == [3, -1]
    assert doc["sequence_batching"]["max_sequence_idle_microseconds"] == 5_000_000
    assert doc["sequence_batching"]["state"][0]["dims"] == [4]
    assert doc["model_warmup"][0]["inputs"]["x"]["dims"] == [3, 5]
    assert doc["parameters"] == {"INFERENCE_MODE": {"string_value": "true"}}
    full = metadata.model_config(cfg)
    assert full["input"][0]["dims"] == [3, -1]
    assert full["sequence_batching"]["oldest"]["max_queue_delay_microseconds"] == 300


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


# ------------------------------- found by the mutation pass (docs/measurements/mutation.md)

X = {"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}


def refusal(doc: dict[str, Any], *data: bytes, model: str = "m") -> str:
    with pytest.raises(RequestError) as e:
        decode_request(*body(doc, *data), model)
    assert e.value.status == 400
    return e.value.message


def binary_input(name: str, datatype: str, shape: list[int], data: bytes) -> dict[str, Any]:
    return {"name": name, "shape": shape, "datatype": datatype, "parameters": {"binary_data_size": len(data)}}


EXACT: list[tuple[dict[str, Any], bytes, str]] = [
    ({"inputs": "x"}, b"", "the request has no 'inputs' (a non-empty list of tensors)"),
    ({"inputs": []}, b"", "the request has no 'inputs' (a non-empty list of tensors)"),
    ({"inputs": [7]}, b"", "inputs[0] must be a JSON object, got int"),
    ({"inputs": [X, [1]]}, b"", "inputs[1] must be a JSON object, got list"),
    ({"inputs": [{"name": 5, "shape": [1], "datatype": "FP32", "data": [1]}]}, b"", "inputs[0] has no 'name'"),
    ({"inputs": [{"name": "", "shape": [1], "datatype": "FP32", "data": [1]}]}, b"", "inputs[0] has no 'name'"),
    ({"id": 7, "inputs": [X]}, b"", "'id' must be a string, got 7"),
    ({"parameters": [], "inputs": [X]}, b"", "the parameters of the request must be a JSON object, got list"),
    ({"parameters": {"binary_data_output": 1}, "inputs": [X]}, b"",
     "parameter 'binary_data_output' of the request must be true or false, got 1"),
    ({"parameters": {"priority": -1}, "inputs": [X]}, b"", "parameter 'priority' must be an integer >= 0, got -1"),
    ({"parameters": {"classification": 2}, "inputs": [X]}, b"",
     "parameter 'classification' is an output's: give it in the parameters of each output to classify "
     '("outputs": [{"name": ..., "parameters": {"classification": N}}])'),
    ({"inputs": [{**X, "parameters": 3}]}, b"", "the parameters of input 'x' must be a JSON object, got int"),
    ({"inputs": [{**X, "datatype": 3}]}, b"", "input 'x' has no 'datatype'"),
    ({"inputs": [{**X, "datatype": "UINT16"}]}, b"",
     "input 'x': datatype UINT16 is not supported; use one of BOOL, UINT8, INT8, INT16, INT32, INT64, FP16, BF16, "
     "FP32, FP64, BYTES"),
    ({"inputs": [{**X, "datatype": "FP8"}]}, b"",
     "input 'x': unknown datatype 'FP8'; expected one of BOOL, UINT8, INT8, INT16, INT32, INT64, FP16, BF16, FP32, "
     "FP64, BYTES"),
    ({"inputs": [{**X, "shape": "1"}]}, b"", "input 'x' has no 'shape' (a list of at most 32 sizes)"),
    ({"inputs": [{**X, "shape": [1.5]}]}, b"", "the shape of input 'x' must be an integer >= 0, got 1.5"),
    ({"inputs": [{**X, "shape": [2**40, 2**40]}]}, b"",
     "input 'x': shape [1099511627776, 1099511627776] is too large (its sizes other than 0 multiply to more than "
     "2**48 elements)"),
    ({"inputs": [{**X, "shape": [2]}]}, b"", "input 'x': shape [2] holds 2 elements, 'data' has 1"),
    ({"inputs": [{**X, "datatype": "BYTES", "shape": [2], "data": ["a"]}]}, b"",
     "input 'x': shape [2] holds 2 elements, 'data' has 1"),
    ({"inputs": [{**X, "datatype": "BYTES", "data": [1]}]}, b"", "input 'x': BYTES data must be strings"),
    ({"inputs": [{**X, "datatype": "BYTES", "data": ["\udc80"]}]}, b"",
     "input 'x': BYTES data must be valid Unicode (a string holds a lone surrogate)"),
    ({"inputs": [{**X, "shape": [2], "data": [[1], [2, 3]]}]}, b"",
     "input 'x': 'data' is a ragged list, or nested deeper than numpy's 64 dimensions"),
    ({"inputs": [{**X, "datatype": "INT32", "shape": [2], "data": ["a", "b"]}]}, b"",
     "input 'x': INT32 data must be integers, got strings"),
    ({"inputs": [{**X, "datatype": "INT32", "data": [1.5]}]}, b"",
     "input 'x': INT32 data must be integers, got floats"),
    ({"inputs": [{**X, "datatype": "INT32", "data": [True]}]}, b"",
     "input 'x': INT32 data must be integers, got booleans"),
    ({"inputs": [{**X, "datatype": "FP32", "shape": [2], "data": [1, None]}]}, b"",
     "input 'x': FP32 data must be numbers, got mixed values"),
    ({"inputs": [{**X, "datatype": "FP64", "data": ["1"]}]}, b"", "input 'x': FP64 data must be numbers, got strings"),
    ({"inputs": [{**X, "datatype": "BOOL", "shape": [2], "data": [1, 0]}]}, b"",
     "input 'x': BOOL data must be true/false, got int64"),
    ({"inputs": [{**X, "datatype": "INT8", "data": [128]}]}, b"",
     "input 'x': a value is out of the range of INT8 (-128..127)"),
    ({"inputs": [binary_input("x", "FP32", [2], b"\x00" * 4)]}, b"\x00" * 4,
     "input 'x': shape [2] of FP32 is 8 bytes, binary_data_size is 4"),
    ({"inputs": [binary_input("x", "INT16", [3], b"\x00" * 4)]}, b"\x00" * 4,
     "input 'x': shape [3] of INT16 is 6 bytes, binary_data_size is 4"),
    ({"inputs": [binary_input("x", "BOOL", [2], b"\x00\x02")]}, b"\x00\x02",
     "input 'x': BOOL binary data must be bytes 0 or 1"),
    ({"inputs": [binary_input("x", "BYTES", [1], b"\x01\x00\x00")]}, b"\x01\x00\x00",
     "input 'x': BYTES binary data ends inside an element's 4-byte length"),
    ({"inputs": [binary_input("x", "BYTES", [1], b"\x05\x00\x00\x00ab")]}, b"\x05\x00\x00\x00ab",
     "input 'x': a BYTES element of 5 bytes runs past the end of its binary data"),
    ({"inputs": [binary_input("x", "BYTES", [2], b"\x01\x00\x00\x00a")]}, b"\x01\x00\x00\x00a",
     "input 'x': shape [2] holds 2 elements, the binary data has 1"),
    ({"inputs": [{**binary_input("x", "FP32", [1], b""), "parameters": {"binary_data_size": "4"}}]}, b"\x00" * 4,
     "binary_data_size of input 'x' must be an integer >= 0, got '4'"),
    ({"inputs": [binary_input("x", "FP32", [1], b"\x00" * 4), binary_input("y", "FP32", [2], b"\x00" * 8)]},
     b"\x00" * 8, "input 'y': binary_data_size is 8 but only 4 bytes of binary data are left in the body"),
    ({"inputs": [binary_input("x", "FP32", [1], b"\x00" * 4)]}, b"\x00" * 7,
     "the body has 3 bytes after the inputs' binary data; Inference-Header-Content-Length or a binary_data_size is "
     "wrong"),
    ({"inputs": [X], "outputs": {}}, b"", "'outputs' must be a list"),
    ({"inputs": [X], "outputs": ["y"]}, b"", "outputs[0] must be a JSON object, got str"),
    ({"inputs": [X], "outputs": [{"name": 5}]}, b"", "outputs[0] has no 'name'"),
    ({"inputs": [X], "outputs": [{"name": "y"}, {"name": ""}]}, b"", "outputs[1] has no 'name'"),
    ({"inputs": [X], "outputs": [{"name": "y", "parameters": 1}]}, b"",
     "the parameters of output 'y' must be a JSON object, got int"),
    ({"inputs": [X], "outputs": [{"name": "y", "parameters": {"binary_data": "yes"}}]}, b"",
     "parameter 'binary_data' of output 'y' must be true or false, got 'yes'"),
    ({"inputs": [X], "outputs": [{"name": "y", "parameters": {"classification": -3}}]}, b"",
     "parameter 'classification' of output 'y' must be an integer >= 0, got -3"),
    ({"inputs": [X], "outputs": [{"name": "y", "parameters": {"classification": 2, "shared_memory_region": "r",
                                                               "shared_memory_byte_size": 8}}]}, b"",
     "output 'y': a classification cannot be written to shared memory; ask for one or the other"),
    ({"inputs": [{**X, "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 4}}]}, b"",
     "input 'x' is in shared memory and also has data; give one"),
    ({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32",
                  "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 4}}]}, b"",
     "input 'x': shape [2] of FP32 is 8 bytes, shared_memory_byte_size is 4"),
    ({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"shared_memory_region": "r"}}]}, b"",
     "input 'x': parameter 'shared_memory_byte_size' is missing"),
    ({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"shared_memory_byte_size": 8}}]},
     b"", "input 'x': parameter 'shared_memory_byte_size' needs 'shared_memory_region'"),
    ({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32",
                  "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 8,
                                 "shared_memory_offset": -1}}]}, b"",
     "input 'x': parameter 'shared_memory_offset' must be an integer >= 0, got -1"),
]  # fmt: skip


@pytest.mark.parametrize(("doc", "data", "message"), EXACT)
def test_refusals_say_exactly_what_is_wrong(doc: dict[str, Any], data: bytes, message: str) -> None:
    assert refusal(doc, *([data] if data else [])) == message


def test_refusals_of_the_body_itself() -> None:
    with pytest.raises(RequestError) as e:
        decode_request(bytearray(b"[1, 2]"), None, "m")
    assert e.value.message == "the request must be a JSON object, got list"
    with pytest.raises(RequestError) as e:
        decode_request(bytearray(b"{"), None, "m")
    assert e.value.message.startswith("the request is not valid JSON: Expecting property name")
    with pytest.raises(RequestError) as e:
        decode_request(bytearray(b"[" * 100_000), None, "m")
    assert e.value.message == "the request's JSON is nested too deeply"
    with pytest.raises(RequestError) as e:
        decode_request(bytearray(b"{}"), 3, "m")
    assert e.value.message == "Inference-Header-Content-Length is 3 but the body has only 2 bytes"


def test_a_header_length_equal_to_the_body_is_all_json() -> None:
    raw_body, _ = body({"inputs": [X]})
    assert decode_request(raw_body, len(raw_body), "m").inputs["x"].tolist() == [1.0]


def test_null_parameters_are_no_parameters() -> None:
    doc = {"parameters": None, "inputs": [{**X, "parameters": None}], "outputs": [{"name": "y", "parameters": None}]}
    req = decode_request(*body(doc), "m")
    assert req.binary_output is False and req.outputs == [OutputRequest("y", None)]


def test_sequence_parameters_are_read_and_checked() -> None:
    req = decode_request(
        *body({"parameters": {"sequence_id": 7, "sequence_start": True, "sequence_end": False}, "inputs": [X]}), "m"
    )
    assert (req.sequence_id, req.sequence_start, req.sequence_end) == (7, True, False)
    req = decode_request(*body({"parameters": {"sequence_id": "corr-7", "sequence_end": True}, "inputs": [X]}), "m")
    assert (req.sequence_id, req.sequence_start, req.sequence_end) == ("corr-7", False, True)
    for empty in (None, 0, ""):  # what clients send for "no sequence"
        req = decode_request(*body({"parameters": {"sequence_id": empty}, "inputs": [X]}), "m")
        assert req.sequence_id is None
    for bad in (True, 2.5, [1], -1, 2**64):
        assert "parameter 'sequence_id' must be" in refusal({"parameters": {"sequence_id": bad}, "inputs": [X]})
    for key in ("sequence_start", "sequence_end"):
        assert refusal({"parameters": {key: 1}, "inputs": [X]}) == (
            f"parameter {key!r} of the request must be true or false, got 1"
        )


@pytest.mark.parametrize("priority", [True, 2.5, "3", [1]])
def test_a_priority_that_is_not_an_integer_is_refused(priority: Any) -> None:
    message = refusal({"parameters": {"priority": priority}, "inputs": [X]})
    assert message == f"parameter 'priority' must be an integer >= 0, got {priority!r}"


def test_priority_zero_is_the_default_level() -> None:
    assert decode_request(*body({"parameters": {"priority": 0}, "inputs": [X]}), "m").priority is None


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("x" * 78, repr("x" * 78)),  # an 80-character repr is shown whole
        ("x" * 79, repr("x" * 79)[:60] + "... (81 characters)"),
        ("y" * 1000, repr("y" * 1000)[:60] + "... (1002 characters)"),
    ],
)
def test_long_values_are_cut_short_in_messages(value: str, shown: str) -> None:
    message = refusal({"parameters": {"priority": value}, "inputs": [X]})
    assert message == f"parameter 'priority' must be an integer >= 0, got {shown}"


@pytest.mark.parametrize(
    ("timeout", "message"),
    [
        ("true", "parameter 'timeout' must be a number of microseconds >= 0, got True (bool)"),
        ('"5"', "parameter 'timeout' must be a number of microseconds >= 0, got '5' (str)"),
        ("-1", "parameter 'timeout' must be a number of microseconds >= 0, got -1"),
        ("NaN", "parameter 'timeout' must be a number of microseconds >= 0, got nan"),
    ],
)
def test_a_bad_timeout_message_shows_the_value(timeout: str, message: str) -> None:
    raw_doc = f'{{"parameters": {{"timeout": {timeout}}}, "inputs": [{json.dumps(X)}]}}'
    with pytest.raises(RequestError) as e:
        decode_request(bytearray(raw_doc.encode()), None, "m")
    assert e.value.message == message


def test_request_error_keeps_its_headers() -> None:
    e = RequestError(413, "too large", {"Connection": "close"})
    assert (e.status, e.message, e.headers, str(e)) == (413, "too large", {"Connection": "close"}, "too large")
    assert RequestError(400, "bad").headers is None


def test_32_dims_are_accepted_and_33_refused() -> None:
    doc = {"inputs": [{**X, "shape": [1] * 32}]}
    assert decode_request(*body(doc), "m").inputs["x"].shape == (1,) * 32
    assert refusal({"inputs": [{**X, "shape": [1] * 33}]}) == "input 'x' has no 'shape' (a list of at most 32 sizes)"


@pytest.mark.parametrize(
    ("datatype", "low", "high"),
    [("UINT8", 0, 255), ("INT8", -128, 127), ("INT16", -(2**15), 2**15 - 1), ("INT64", -(2**63), 2**63 - 1)],
)
def test_json_integers_at_the_ends_of_the_range_are_accepted(datatype: str, low: int, high: int) -> None:
    doc = {"inputs": [{"name": "x", "shape": [2], "datatype": datatype, "data": [low, high]}]}
    assert decode_request(*body(doc), "m").inputs["x"].tolist() == [low, high]


@pytest.mark.parametrize(
    ("datatype", "data", "want"),
    [("FP32", 2.5, [2.5]), ("INT64", 7, [7]), ("BOOL", True, [True]), ("BYTES", "abc", [b"abc"])],
)
def test_json_data_may_be_a_single_value(datatype: str, data: Any, want: list[Any]) -> None:
    doc = {"inputs": [{"name": "x", "shape": [1], "datatype": datatype, "data": data}]}
    got = decode_request(*body(doc), "m").inputs["x"]
    assert (got if isinstance(got, list) else got.tolist()) == want


@pytest.mark.parametrize("items", [[""], ["a", ""], ["", "", ""]])
def test_binary_bytes_may_end_with_an_empty_element(items: list[str]) -> None:
    blob = b"".join(struct.pack("<I", len(s)) + s.encode() for s in items)
    doc = {"inputs": [binary_input("s", "BYTES", [len(items)], blob)]}
    assert decode_request(*body(doc, blob), "m").inputs["s"] == [s.encode() for s in items]


def test_data_bytes_counts_utf8_bytes_and_length_prefixes() -> None:
    assert kserve.data_bytes(["é", "ab"]) == (4 + 2) + (4 + 2)
    assert kserve.data_bytes([b"\xff\x00", b""]) == (4 + 2) + 4
    assert kserve.data_bytes(torch.zeros(3, dtype=torch.float64)) == 24
    assert kserve.data_bytes(None) == 0 and kserve.data_bytes(7) == 0


def test_response_header_is_compact_json() -> None:
    enc = encode_response("m", 1, InferRequest(id="a b"), {"y": torch.tensor([1, 2])})
    assert enc.header == (
        b'{"model_name":"m","model_version":"1","id":"a b",'
        b'"outputs":[{"name":"y","datatype":"INT64","shape":[2],"data":[1,2]}]}'
    )


def test_json_outputs_keep_integers_integers() -> None:
    doc, _ = _decode_response(encode_response("m", 1, InferRequest(), {"y": torch.tensor([1, 2], dtype=torch.int32)}))
    assert doc["outputs"] == [{"name": "y", "datatype": "INT32", "shape": [2], "data": [1, 2]}]
    assert all(type(v) is int for v in doc["outputs"][0]["data"])


def test_the_json_limit_message_says_how_to_ask_for_binary_data() -> None:
    with pytest.raises(RequestError) as e:
        encode_response("m", 1, InferRequest(), {"y": torch.zeros(4)}, max_json_bytes=8)
    assert e.value.status == 400
    assert e.value.message == (
        "outputs ['y'] of model 'm' hold 16 bytes of tensor data, more than this server returns as JSON (8 bytes, "
        "--max-json-response-bytes); ask for them as binary data (binary tensor data extension): parameters "
        '{"binary_data": true} on each output, or {"binary_data_output": true} on the request (tritonclient: '
        "InferRequestedOutput(name, binary_data=True))"
    )


def test_bytes_outputs_of_bytes_elements() -> None:
    outputs = {"s": [b"ab", b"\xff", "é"]}
    doc, data = _decode_response(encode_response("m", 1, InferRequest(), outputs))
    assert doc["outputs"] == [{"name": "s", "datatype": "BYTES", "shape": [3], "data": ["ab", "\ufffd", "é"]}]
    enc = encode_response("m", 1, InferRequest(binary_output=True), outputs)
    doc, data = _decode_response(enc)
    blob = b"\x02\x00\x00\x00ab" + b"\x01\x00\x00\x00\xff" + b"\x02\x00\x00\x00" + "é".encode()
    assert doc["outputs"] == [
        {"name": "s", "datatype": "BYTES", "shape": [3], "parameters": {"binary_data_size": len(blob)}}
    ]
    assert data == blob and enc.header_length == len(enc.header)


@pytest.mark.parametrize(
    ("value", "shape", "data"),
    [
        (torch.tensor(2.5), [], struct.pack("<f", 2.5)),
        (torch.zeros(0, 3), [0, 3], b""),
        (torch.arange(6, dtype=torch.int16).reshape(2, 3).t(), [3, 2], struct.pack("<6h", 0, 3, 1, 4, 2, 5)),
    ],
    ids=["scalar", "empty", "transposed"],
)
def test_binary_tensor_outputs_of_any_shape(value: torch.Tensor, shape: list[int], data: bytes) -> None:
    doc, got = _decode_response(encode_response("m", 1, InferRequest(binary_output=True), {"y": value}))
    assert doc["outputs"][0]["shape"] == shape
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": len(data)}
    assert got == data


def test_outputs_the_protocol_cannot_carry_are_server_errors() -> None:
    with pytest.raises(RequestError) as e:
        encode_response("m", 1, InferRequest(), {"y": 5})
    assert (e.value.status, e.value.message) == (500, "output 'y' is a int, not a tensor")
    with pytest.raises(RequestError) as e:
        encode_response("m", 1, InferRequest(), {"c": torch.zeros(2, dtype=torch.complex64)})
    assert (e.value.status, e.value.message) == (500, "output 'c' is complex64, which the KServe protocol cannot carry")

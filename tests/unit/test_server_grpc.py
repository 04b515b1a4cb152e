"""The gRPC front without a server: the codec (a ``ModelInferRequest`` decoded by the
HTTP path's own checks, outputs as ``raw_output_contents``), the status of each error,
and the command line's gRPC options."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from libtorchrt.config import TensorSpec
from libtorchrt.errors import (
    InvalidInputError,
    ModelError,
    ModelUnavailableError,
    PoolClosedError,
    QueueFullError,
    TimeoutError,
    UnknownModelError,
    WorkerDiedError,
)
from libtorchrt.server import grpc_service_pb2 as pb
from libtorchrt.server.cli import build_parser, options_from
from libtorchrt.server.grpc_codec import request_document, response_message
from libtorchrt.server.grpc_server import _status
from libtorchrt.server.kserve import InferRequest, RequestError, decode_document
from libtorchrt.server.security import Address, UsageError
from libtorchrt.server.serving import BusyError

TOKEN = "0123456789abcdef-token"


def tensor(name: str, datatype: str, shape: list[int], **contents: Any) -> pb.ModelInferRequest.InferInputTensor:
    t = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
    if contents:
        t.contents.CopyFrom(pb.InferTensorContents(**contents))
    return t


def decode(request: pb.ModelInferRequest, declared: dict[str, TensorSpec] | None = None) -> InferRequest:
    doc, data = request_document(request)
    return decode_document(doc, memoryview(data), "m", declared or {})


def strings(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(s)) + s for s in items)


# ── requests ───────────────────────────────────────────────────────────────────


def test_raw_contents_become_writable_tensors() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    req = decode(pb.ModelInferRequest(
        id="r1", inputs=[tensor("x", "FP32", [2, 3]), tensor("s", "BYTES", [2])],
        raw_input_contents=[x.tobytes(), strings(b"a", b"\xffbc")],
    ))  # fmt: skip
    assert req.id == "r1" and req.binary_output and req.outputs is None
    t = req.inputs["x"]
    assert torch.equal(t, torch.from_numpy(x)) and t.numpy().flags.writeable  # (torch warns of read-only arrays)
    assert req.inputs["s"] == [b"a", b"\xffbc"]  # BYTES stay bytes, whatever they hold


def test_bf16_travels_raw() -> None:
    x = torch.tensor([1.5, -2.0, 3.25], dtype=torch.bfloat16)
    raw = x.view(torch.int16).numpy().tobytes()
    req = decode(pb.ModelInferRequest(inputs=[tensor("x", "BF16", [3])], raw_input_contents=[raw]))
    assert req.inputs["x"].dtype == torch.bfloat16 and torch.equal(req.inputs["x"], x)
    with pytest.raises(RequestError, match="BF16 has no typed contents; send it in raw_input_contents"):
        decode(pb.ModelInferRequest(inputs=[tensor("x", "BF16", [1], fp32_contents=[1.0])]))


@pytest.mark.parametrize(
    ("datatype", "contents", "expected"),
    [
        ("FP32", {"fp32_contents": [1.5, 2.5]}, torch.tensor([1.5, 2.5])),
        ("FP64", {"fp64_contents": [1.5, 2.5]}, torch.tensor([1.5, 2.5], dtype=torch.float64)),
        ("INT32", {"int_contents": [-1, 7]}, torch.tensor([-1, 7], dtype=torch.int32)),
        ("INT8", {"int_contents": [-128, 127]}, torch.tensor([-128, 127], dtype=torch.int8)),
        ("INT64", {"int64_contents": [-(2**40), 3]}, torch.tensor([-(2**40), 3])),
        ("UINT8", {"uint_contents": [0, 255]}, torch.tensor([0, 255], dtype=torch.uint8)),
        ("BOOL", {"bool_contents": [True, False]}, torch.tensor([True, False])),
    ],
)
def test_typed_contents(datatype: str, contents: dict[str, Any], expected: torch.Tensor) -> None:
    got = decode(pb.ModelInferRequest(inputs=[tensor("x", datatype, [2], **contents)])).inputs["x"]
    assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_typed_bytes_contents() -> None:
    req = decode(pb.ModelInferRequest(inputs=[tensor("s", "BYTES", [1, 2], bytes_contents=[b"x", b"\x00y"])]))
    assert req.inputs["s"] == [b"x", b"\x00y"]


def test_parameters_and_outputs() -> None:
    request = pb.ModelInferRequest(inputs=[tensor("x", "FP32", [1], fp32_contents=[1.0])])
    request.parameters["timeout"].int64_param = 2_000_000
    request.parameters["priority"].uint64_param = 2
    request.parameters["binary_data_output"].bool_param = False  # (gRPC answers in raw contents, whatever)
    out = request.outputs.add(name="y")
    out.parameters["binary_data"].bool_param = False
    req = decode(request)
    assert req.timeout == 2.0 and req.priority == 2 and req.binary_output
    assert [(o.name, o.binary) for o in req.outputs or []] == [("y", True)]
    request.parameters["timeout"].string_param = "soon"
    with pytest.raises(RequestError, match="'timeout' must be a number of microseconds"):
        decode(request)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (pb.ModelInferRequest(inputs=[tensor("x", "FP32", [2]), tensor("y", "FP32", [1])],
                              raw_input_contents=[b"\0" * 8]), "2 inputs and 1 raw_input_contents"),
        (pb.ModelInferRequest(inputs=[tensor("x", "FP32", [2])], raw_input_contents=[b"\0" * 7]),
         r"shape \[2\] of FP32 is 8 bytes, raw_input_contents\[0\] has 7"),
        (pb.ModelInferRequest(inputs=[tensor("x", "FP32", [1], fp32_contents=[1.0])], raw_input_contents=[b"\0" * 4]),
         "both contents and raw_input_contents"),
        (pb.ModelInferRequest(inputs=[tensor("x", "FP32", [2], fp32_contents=[1.0])]),
         r"shape \[2\] holds 2 elements, its contents has 1"),
        (pb.ModelInferRequest(inputs=[tensor("x", "FP32", [1], int_contents=[1])]),
         "is FP32: its elements go in contents.fp32_contents, not int_contents"),
        (pb.ModelInferRequest(inputs=[tensor("x", "FP32", [1], int_contents=[1], fp32_contents=[1.0])]),
         "has elements in int_contents and fp32_contents"),
        (pb.ModelInferRequest(inputs=[tensor("x", "INT8", [1], int_contents=[300])]),
         "out of the range of INT8"),
        (pb.ModelInferRequest(inputs=[tensor("x", "FP32", [-1], fp32_contents=[1.0])]),
         "must be an integer >= 0"),
        (pb.ModelInferRequest(inputs=[tensor("x", "UINT32", [1], uint_contents=[1])]), "UINT32 is not supported"),
        (pb.ModelInferRequest(inputs=[tensor("x", "FLOAT", [1])], raw_input_contents=[b"\0" * 4]), "unknown datatype"),
        (pb.ModelInferRequest(inputs=[tensor("s", "BYTES", [2])], raw_input_contents=[strings(b"a")]),
         r"shape \[2\] holds 2 elements, the binary data has 1"),
        (pb.ModelInferRequest(inputs=[tensor("s", "BYTES", [1])], raw_input_contents=[b"\5\0\0\0ab"]),
         "runs past the end"),
        (pb.ModelInferRequest(inputs=[tensor("x", "BOOL", [1])], raw_input_contents=[b"\2"]), "bytes 0 or 1"),
        (pb.ModelInferRequest(), "no 'inputs'"),
        (pb.ModelInferRequest(inputs=[tensor("x", "FP32", [1], fp32_contents=[1.0])] * 2), "given twice"),
    ],
)  # fmt: skip
def test_bad_requests_are_refused_naming_what_is_wrong(request_: pb.ModelInferRequest, message: str) -> None:
    with pytest.raises(RequestError, match=message) as e:
        decode(request_)
    assert e.value.status == 400


def test_a_datatype_other_than_the_models_is_refused() -> None:
    request = pb.ModelInferRequest(inputs=[tensor("x", "INT64", [1], int64_contents=[1])])
    with pytest.raises(RequestError, match="input 'x' of model 'm': expected datatype FP32, got INT64"):
        decode(request, {"x": TensorSpec("x", "float32", (1,))})


# ── responses ──────────────────────────────────────────────────────────────────


def test_outputs_come_back_as_raw_contents() -> None:
    req = InferRequest(id="7", binary_output=True)
    y = torch.arange(4, dtype=torch.int32).reshape(2, 2)
    bf = torch.tensor([1.5], dtype=torch.bfloat16)
    response = response_message("m", 3, req, {"y": y, "s": ["ab", "c"], "bf": bf, "e": torch.zeros(0)})
    assert (response.model_name, response.model_version, response.id) == ("m", "3", "7")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("y", "INT32", [2, 2]), ("s", "BYTES", [2]), ("bf", "BF16", [1]), ("e", "FP32", [0])]  # fmt: skip
    raw = response.raw_output_contents
    assert raw[0] == y.numpy().tobytes() and raw[1] == strings(b"ab", b"c")
    assert raw[2] == bf.view(torch.int16).numpy().tobytes() and raw[3] == b""
    # tritonclient reads them so (np.frombuffer by datatype, BYTES by their lengths)
    triton = pytest.importorskip("tritonclient.grpc")
    result = triton.InferResult(response)
    assert np.array_equal(result.as_numpy("y"), y.numpy())
    assert list(result.as_numpy("s")) == [b"ab", b"c"]


# ── statuses ───────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (BusyError(503, "busy", {"Retry-After": "1"}), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (RequestError(400, "bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (RequestError(404, "unknown model"), grpc.StatusCode.NOT_FOUND),
        (RequestError(503, "loading"), grpc.StatusCode.UNAVAILABLE),
        (InvalidInputError("m", "x", "shape [1]", "shape [2]"), grpc.StatusCode.INVALID_ARGUMENT),
        (UnknownModelError("m", ["a"]), grpc.StatusCode.NOT_FOUND),
        (ModelError("m", "RuntimeError", "negative input", "Traceback ..."), grpc.StatusCode.INTERNAL),
        (WorkerDiedError("m", 0, 1234, -9, ""), grpc.StatusCode.INTERNAL),
        (ModelUnavailableError("m", "failed to load"), grpc.StatusCode.UNAVAILABLE),
        (QueueFullError("m", 4), grpc.StatusCode.UNAVAILABLE),
        (PoolClosedError("the pool is closed"), grpc.StatusCode.UNAVAILABLE),
        (TimeoutError("deadline passed"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (KeyError("a bug"), grpc.StatusCode.INTERNAL),
    ],
)
def test_each_error_has_its_status(error: Exception, code: grpc.StatusCode) -> None:
    answer = _status(error)
    assert answer.code == code
    assert "\n" not in answer.message and "Traceback" not in answer.message


def test_a_model_error_says_what_the_model_raised() -> None:
    answer = _status(ModelError("m", "RuntimeError", "negative input\nmore", "Traceback ..."))
    assert answer.message == "model 'm' raised RuntimeError: negative input"


# ── the command line ───────────────────────────────────────────────────────────


def parse(*argv: str, repo: Path) -> Any:
    return options_from(build_parser().parse_args(["--model-repository", str(repo), *argv]))


def pem(tmp_path: Path) -> tuple[str, str]:
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    key.write_text("-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n")
    return str(cert), str(key)


def test_grpc_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIBTORCHRT_HTTP_TOKEN", raising=False)
    assert parse("--grpc", "off", repo=tmp_path).grpc is None
    assert parse("--grpc", "9001", repo=tmp_path).grpc == Address("127.0.0.1", 9001)
    assert parse("--grpc", "[::1]:0", repo=tmp_path).grpc == Address("::1", 0)
    only_grpc = parse("--http", "off", repo=tmp_path)  # gRPC alone reaches the models
    assert only_grpc.http is None and only_grpc.grpc == Address("127.0.0.1", 8001)
    cert, key = pem(tmp_path)
    tls = parse("--grpc-tls-cert", cert, "--grpc-tls-key", key, repo=tmp_path).grpc_tls
    assert tls is not None and tls.certificate.startswith(b"-----BEGIN CERTIFICATE") and b"PRIVATE KEY" in tls.key
    monkeypatch.setenv("LIBTORCHRT_HTTP_TOKEN", TOKEN)
    opts = parse("--http", "off", "--grpc", "0.0.0.0:0", repo=tmp_path)  # a token protects gRPC alone
    assert opts.token == TOKEN.encode() and opts.grpc == Address("0.0.0.0", 0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--grpc", "0.0.0.0:8001"), "--grpc 0.0.0.0:8001 is reachable from other machines; give a bearer token"),
        (("--grpc", "8001:"), "--grpc"),
        (("--grpc", "::1:8001"), "brackets"),
        (("--grpc-tls-cert", "CERT"), "--grpc-tls-cert and --grpc-tls-key go together"),
        (("--grpc-tls-cert", "CERT", "--grpc-tls-key", "KEY", "--grpc", "off"), "need a gRPC endpoint"),
        (("--grpc-tls-cert", "/nonexistent", "--grpc-tls-key", "KEY"), "cannot read it"),
        (("--grpc-tls-cert", "KEY", "--grpc-tls-key", "KEY"), "expected a PEM file"),
        # TLS encrypts; it does not say who may call
        (("--grpc", "0.0.0.0:8001", "--grpc-tls-cert", "CERT", "--grpc-tls-key", "KEY"), "give a bearer token"),
    ],
)
def test_refused_grpc_command_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: tuple[str, ...],
                                    message: str) -> None:  # fmt: skip
    monkeypatch.delenv("LIBTORCHRT_HTTP_TOKEN", raising=False)
    cert, key = pem(tmp_path)
    argv = tuple(cert if a == "CERT" else key if a == "KEY" else a for a in argv)
    with pytest.raises(UsageError, match=message):
        parse(*argv, repo=tmp_path)


def test_insecure_waives_the_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIBTORCHRT_HTTP_TOKEN", raising=False)
    assert parse("--grpc", "0.0.0.0:8001", "--insecure", repo=tmp_path).grpc == Address("0.0.0.0", 8001)

"""Hostile input on the gRPC port, against one real ``python -m libtorchrt.pool``.

Every attack gets an error status (never OK with a wrong answer, never a dead server)
and leaves the server whole: after each one a normal inference call is answered
correctly, and at the end the server's descriptors and memory are back near where they
started, its log holds no traceback, and stopping it leaves no child. The server runs
with small limits so that the attacks are cheap: ``--max-inflight 2``,
``--max-request-bytes 1MiB``. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.server_util import SPIN_CONFIG, ServerProcess, alive, build_repository

LIMIT = 1 << 20  # --max-request-bytes
MAX_INFLIGHT = 2
MiB = 1 << 20
INFER = "/inference.GRPCInferenceService/ModelInfer"


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """spin (one instance) and text_normalizer, gRPC only, with small limits; on teardown
    its descriptors and memory are back near their baseline, and it stops leaving no child."""
    repo = build_repository(tmp_path_factory.mktemp("hostile-grpc"), ("text_normalizer",), spin=True)
    (repo / "spin" / "config.pbtxt").write_text(SPIN_CONFIG.replace("count: 2", "count: 1"))
    proc = ServerProcess(
        "--model-repository", str(repo), "--http", "off", "--grpc", "127.0.0.1:0", "--metrics", "off",
        "--max-request-bytes", str(LIMIT), "--max-inflight", str(MAX_INFLIGHT), "--grace", "10",
    )  # fmt: skip
    try:
        proc.wait_ready()
        workers = proc.workers()
        pid = proc.proc.pid
        with grpc.insecure_channel(proc.grpc) as channel:  # warm the paths once before the baseline
            assert_serves(channel)
            assert_status(channel, request("spin", [("INPUT__0", "FP32", [2])], [b"\0" * 4]), "INVALID_ARGUMENT")
        fds, rss = _fds(pid), _rss(pid)
        yield proc
        deadline = time.monotonic() + 15
        while _fds(pid) > fds:  # connections the server has yet to see closed
            assert time.monotonic() < deadline, f"descriptors left open: {fds} -> {_fds(pid)}"
            time.sleep(0.05)
        assert _rss(pid) < rss + 100 * MiB, f"RSS grew from {rss >> 20} MiB to {_rss(pid) >> 20} MiB"
        assert proc.stop() == 0, proc.output
        assert not any(alive(w) for w in workers), "workers left behind"
        assert "Traceback" not in proc.output, proc.output
    finally:
        proc.kill()


@pytest.fixture
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc) as c:
        yield c


def request(model: str, inputs: list[tuple[str, str, list[int]]], raw: list[bytes] | None = None,
            **fields: Any) -> service_pb2.ModelInferRequest:  # fmt: skip
    r = service_pb2.ModelInferRequest(model_name=model, **fields)
    for name, datatype, shape in inputs:
        r.inputs.add(name=name, datatype=datatype, shape=shape)
    if raw is not None:
        r.raw_input_contents.extend(raw)
    return r


def spin(value: float = 10.0) -> service_pb2.ModelInferRequest:
    return request("spin", [("INPUT__0", "FP32", [1])], [np.array([value], dtype=np.float32).tobytes()])


def assert_serves(channel: grpc.Channel, value: float = 10.0) -> None:
    response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(spin(value), timeout=60)
    assert np.frombuffer(response.raw_output_contents[0], np.float32).tolist() == [value]


def assert_status(channel: grpc.Channel, message: Any, code: str, details: str = "") -> None:
    """``message`` (a request, or raw bytes) is answered with status ``code``."""
    call = channel.unary_unary(INFER, request_serializer=None if isinstance(message, bytes) else
                               service_pb2.ModelInferRequest.SerializeToString)  # fmt: skip
    with pytest.raises(grpc.RpcError) as e:
        call(message, timeout=60)
    assert e.value.code().name == code, (e.value.code(), e.value.details())
    assert details in e.value.details(), e.value.details()


@pytest.fixture(autouse=True)
def still_serves(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each attack, the server answers a normal call correctly (once the requests
    an attack left running, which hold its --max-inflight places until their workers
    finish them, are done: the server says "retry" meanwhile)."""
    yield
    if "server" in request.fixturenames:
        with grpc.insecure_channel(request.getfixturevalue("server").grpc) as c:
            deadline = time.monotonic() + 60
            while True:
                try:
                    assert_serves(c)
                    return
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                        raise
                time.sleep(0.05)


# ── messages ───────────────────────────────────────────────────────────────────


def test_an_oversized_message_is_refused(channel: grpc.Channel) -> None:
    big = request("spin", [("INPUT__0", "FP32", [LIMIT // 4 + 16])], [b"\0" * (LIMIT + 64)])
    assert_status(channel, big, "RESOURCE_EXHAUSTED")
    stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                   request_serializer=service_pb2.ModelInferRequest.SerializeToString)  # fmt: skip
    with pytest.raises(grpc.RpcError) as e:
        list(stream(iter([spin(), big]), timeout=60))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_garbage_instead_of_a_message(channel: grpc.Channel) -> None:
    for junk in (b"\xff" * 64, b"\x0a\xff\xff\xff\xff\x0f", b"\x0a\x02\xff\xfe"):
        assert_status(channel, junk, "INVALID_ARGUMENT", "the request is not a ModelInferRequest message")
    for _ in range(20):
        with pytest.raises(grpc.RpcError) as e:
            channel.unary_unary(INFER)(os.urandom(4096), timeout=60)
        assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), e.value.details()
    stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                   response_deserializer=service_pb2.ModelStreamInferResponse.FromString)  # fmt: skip
    answers = list(stream(iter([b"\xff" * 8, spin().SerializeToString()]), timeout=60))  # (the stream goes on)
    failed = [a.error_message for a in answers if a.error_message]
    served = [a.infer_response for a in answers if not a.error_message]
    assert len(failed) == 1 and failed[0].startswith("the request is not a ModelInferRequest message"), answers
    assert len(served) == 1 and np.frombuffer(served[0].raw_output_contents[0], np.float32).tolist() == [10.0]


@pytest.mark.parametrize(
    ("message", "details"),
    [
        (request("spin", [("INPUT__0", "FP32", [1]), ("x", "FP32", [1])], [b"\0" * 4]),
         "2 inputs and 1 raw_input_contents"),
        (request("spin", [("INPUT__0", "FP32", [1])], [b"\0" * 4, b"\0" * 4]), "1 inputs and 2 raw_input_contents"),
        (request("spin", [("INPUT__0", "FP32", [1])], [b"\0" * 3]), "raw_input_contents[0] has 3"),
        (request("spin", [("INPUT__0", "FP32", [2**40])], [b"\0" * 4]), "raw_input_contents[0] has 4"),
        (request("spin", [("INPUT__0", "FP32", [2**31, 2**31, 2**31])], [b"\0" * 4]), "too large"),
        (request("spin", [("INPUT__0", "FP32", [0, 2**62])], [b""]), "too large"),
        (request("spin", [("INPUT__0", "FP32", [-1])], [b"\0" * 4]), ">= 0"),
        (request("spin", [("INPUT__0", "FP32", [1] * 40)], [b"\0" * 4]), "at most 32"),
        (request("spin", [("INPUT__0", "INT64", [1])], [b"\0" * 8]), "expected datatype FP32, got INT64"),
        (request("spin", [("INPUT__0", "FP16", [1])], [b"\0" * 2]), "expected datatype FP32, got FP16"),
        (request("spin", [("INPUT__0", "NOPE", [1])], [b"\0" * 4]), "unknown datatype"),
        (request("spin", [("INPUT__0", "", [1])], [b"\0" * 4]), "datatype"),
        (request("spin", [("INPUT__0", "FP32", [1, 1])], [b"\0" * 4]), "INPUT__0"),
        (request("spin", [("", "FP32", [1])], [b"\0" * 4]), "no 'name'"),
        (request("spin", [("other", "FP32", [1])], [b"\0" * 4]), "other"),
        (request("spin", []), "no 'inputs'"),
        (request("text_normalizer", [("INPUT__0", "BYTES", [1])], [struct.pack("<I", 2**32 - 1) + b"ab"]),
         "runs past the end"),
        (request("text_normalizer", [("INPUT__0", "BYTES", [1])], [b"\1\0"]), "4-byte length"),
        (request("text_normalizer", [("INPUT__0", "BYTES", [3])], [struct.pack("<I", 1) + b"a"]),
         "holds 3 elements"),
        (request("spin", [("INPUT__0", "FP32", [1])], [b"\0" * 4], model_version="1" * 40), "is not a number"),
        (request("spin", [("INPUT__0", "FP32", [1])], [b"\0" * 4], model_version="\u0661"), "is not a number"),
        (request("\udcff".encode("utf-8", "surrogatepass").decode("utf-8", "replace") * 100, [], []), "unknown model"),
    ],
)  # fmt: skip
def test_bad_tensors_are_invalid_arguments(channel: grpc.Channel, message: Any, details: str) -> None:
    code = "NOT_FOUND" if details == "unknown model" else "INVALID_ARGUMENT"
    assert_status(channel, message, code, details)


def test_typed_contents_that_do_not_add_up(channel: grpc.Channel) -> None:
    r = request("spin", [("INPUT__0", "FP32", [4])])
    r.inputs[0].contents.fp32_contents.extend([1.0] * 1000)
    assert_status(channel, r, "INVALID_ARGUMENT", "holds 4 elements, its contents has 1000")
    r = request("spin", [("INPUT__0", "FP32", [1])], [b"\0" * 4])
    r.inputs[0].contents.fp32_contents.append(1.0)
    assert_status(channel, r, "INVALID_ARGUMENT", "both contents and raw_input_contents")
    r = request("spin", [("INPUT__0", "FP32", [1])])
    r.inputs[0].contents.bytes_contents.append(b"x")
    assert_status(channel, r, "INVALID_ARGUMENT", "not bytes_contents")
    r = request("spin", [("INPUT__0", "FP32", [1])])
    r.parameters["timeout"].double_param = float("nan")
    r.inputs[0].contents.fp32_contents.append(1.0)
    assert_status(channel, r, "INVALID_ARGUMENT", "timeout")


def test_a_flood_of_calls_is_bounded_by_max_inflight(server: ServerProcess) -> None:
    codes: list[str] = []
    lock = threading.Lock()

    def caller() -> None:
        with grpc.insecure_channel(server.grpc) as c:
            s = service_pb2_grpc.GRPCInferenceServiceStub(c)
            for _ in range(5):
                try:
                    s.ModelInfer(spin(20_000), timeout=60)
                    code = "OK"
                except grpc.RpcError as e:
                    code = e.code().name
                with lock:
                    codes.append(code)

    threads = [threading.Thread(target=caller) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(codes) == 24 * 5
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, sorted(set(codes))
    assert "OK" in codes and "RESOURCE_EXHAUSTED" in codes


def test_a_flood_of_connections(server: ServerProcess) -> None:
    host, port = server.grpc.rsplit(":", 1)
    sockets = []
    try:
        for i in range(200):
            s = socket.create_connection((host, int(port)), timeout=30)
            if i % 3 == 0:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # not HTTP/2
            elif i % 3 == 1:
                s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(512))  # the preface, then junk
            sockets.append(s)  # (every third sends nothing at all)
        with grpc.insecure_channel(server.grpc) as c:
            assert_serves(c)  # while they are open
    finally:
        for s in sockets:
            s.close()


def test_streams_that_are_abandoned(server: ServerProcess) -> None:
    for _ in range(10):
        with grpc.insecure_channel(server.grpc) as c:
            stream = c.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                     request_serializer=service_pb2.ModelInferRequest.SerializeToString,
                                     response_deserializer=service_pb2.ModelStreamInferResponse.FromString)  # fmt: skip
            responses = stream(iter([spin(50_000), spin(1), spin(-3)] * 3), timeout=60)
            first = next(responses)
            assert first.error_message == "" or "max-inflight" in first.error_message
            responses.cancel()  # mid-stream, requests still running


def test_a_stream_answers_bad_requests_and_goes_on(channel: grpc.Channel) -> None:
    stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                   request_serializer=service_pb2.ModelInferRequest.SerializeToString,
                                   response_deserializer=service_pb2.ModelStreamInferResponse.FromString)  # fmt: skip
    bad = request("spin", [("INPUT__0", "FP32", [1])], [b"\0" * 3], id="bad")
    good = spin(5.0)
    good.id = "good"
    answers = list(stream(iter([bad, good, request("nope", [], [], id="gone")]), timeout=60))
    by_id = {a.infer_response.id: a for a in answers}
    assert set(by_id) == {"bad", "good", "gone"}
    assert "raw_input_contents[0] has 3" in by_id["bad"].error_message
    assert by_id["good"].error_message == ""
    assert np.frombuffer(by_id["good"].infer_response.raw_output_contents[0], np.float32).tolist() == [5.0]
    assert "unknown model 'nope'" in by_id["gone"].error_message


def test_huge_metadata_and_unknown_methods(channel: grpc.Channel) -> None:
    call = channel.unary_unary(INFER, request_serializer=service_pb2.ModelInferRequest.SerializeToString)
    with pytest.raises(grpc.RpcError) as e:
        call(spin(), metadata=[("x-junk", "y" * 100_000)], timeout=60)
    assert e.value.code() != grpc.StatusCode.OK
    unknown = channel.unary_unary("/inference.GRPCInferenceService/Nope")
    with pytest.raises(grpc.RpcError) as e:
        unknown(b"", timeout=60)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    for method, code in (("TraceSetting", "UNIMPLEMENTED"), ("LogSettings", "UNIMPLEMENTED"),
                         ("SystemSharedMemoryRegister", "INVALID_ARGUMENT"),  # (an empty message: no name)
                         ("CudaSharedMemoryRegister", "INVALID_ARGUMENT")):  # fmt: skip
        with pytest.raises(grpc.RpcError) as e:
            channel.unary_unary(f"/inference.GRPCInferenceService/{method}")(b"", timeout=60)
        assert e.value.code().name == code, (method, e.value.details())

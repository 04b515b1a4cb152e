"""Server mode over HTTP: the real ``python -m libtorchrt.pool`` as a subprocess, driven by
tritonclient.http (the acceptance test of the KServe v2 protocol) and by raw HTTP (bad
requests, oversize bodies, clients that go away), its metrics scraped, and SIGTERM
under load (requests in flight finish, new ones are refused, exit 0, nothing left)."""

from __future__ import annotations

import gzip
import http.client
import json
import os
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ml_dtypes  # with tritonclient (a dev dependency): how it holds BF16
import numpy as np
import pytest
import torch
import tritonclient.http as tritonhttp
from tritonclient.utils import np_to_triton_dtype

from libtorchrt import Client
from tests import triton_models
from tests.conftest import wait_for
from tests.server_util import ServerProcess, alive, build_repository, children_of, metrics, request, sample

LIMIT = 1 << 20  # --max-request-bytes of the main server
TOKEN = "s3cret-token-for-the-tests-0123456789"


# ── the servers ────────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The main server: four models of tests/data/repository, spin, and a broken model."""
    repo = build_repository(tmp_path_factory.mktemp("server"), spin=True, broken=True)
    proc = ServerProcess(
        "--model-repository", str(repo), "--http", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
        "--zmq", "tcp://127.0.0.1:0", "--max-request-bytes", str(LIMIT), "--grace", "10",
    )  # fmt: skip
    try:
        proc.wait_ready()
        workers = proc.workers()
        assert len(workers) == 8, proc.output  # 2 resnet, 1 text, 2 seq2seq versions, 1 bf16, 2 spin
        yield proc
        assert proc.stop() == 0, proc.output
        assert not any(alive(pid) for pid in workers), "workers left behind"
    finally:
        proc.kill()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[Any]:
    c = tritonhttp.InferenceServerClient(server.http, network_timeout=60.0)
    yield c
    c.close()


def infer_json(address: str, model: str, doc: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    status, _, body = request(address, "POST", f"/v2/models/{model}/infer", json.dumps(doc).encode(), headers)
    return status, json.loads(body) if body else None


# ── tritonclient.http: the acceptance test ─────────────────────────────────────


def test_server_health_and_metadata(client: Any) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()  # the broken model failed to load; the others serve
    meta = client.get_server_metadata()
    assert meta["name"] == "libtorchrt" and "binary_tensor_data" in meta["extensions"]
    for name in ("resnet_classifier", "text_normalizer", "seq2seq_generator", "masked_bf16", "spin"):
        assert client.is_model_ready(name), name
    assert client.is_model_ready("seq2seq_generator", "2") and client.is_model_ready("seq2seq_generator", "3")
    assert not client.is_model_ready("broken")


def test_model_metadata_and_config(client: Any) -> None:
    meta = client.get_model_metadata("resnet_classifier")
    assert meta["platform"] == "pytorch_libtorch" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "INPUT__0", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert meta["outputs"] == [{"name": "OUTPUT__0", "datatype": "FP32", "shape": [-1, 10]}]
    meta = client.get_model_metadata("seq2seq_generator", "2")
    assert meta["versions"] == ["2", "3"] and meta["inputs"][0]["datatype"] == "INT32"
    assert client.get_model_metadata("text_normalizer")["inputs"][0]["datatype"] == "BYTES"
    config = client.get_model_config("resnet_classifier")
    assert config["name"] == "resnet_classifier" and config["max_batch_size"] == 32
    assert config["input"][0]["data_type"] == "TYPE_FP32" and config["input"][0]["dims"] == [3, 32, 32]
    assert config["instance_group"][0]["count"] == 2 and config["instance_group"][0]["kind"] == "KIND_CPU"
    assert config["dynamic_batching"]["preferred_batch_size"] == [8, 16]
    assert client.get_model_config("seq2seq_generator", "3")["version_policy"]["latest"]["num_versions"] == 2
    index = {(m["name"], m.get("version")): m for m in client.get_model_repository_index()}
    assert index[("resnet_classifier", "1")]["state"] == "READY"
    assert index[("broken", None)]["state"] == "UNAVAILABLE" and "dim" in index[("broken", None)]["reason"]


def _inputs(name: str, version: int | None, binary: bool) -> tuple[list[Any], dict[str, Any]]:
    inputs, expected = triton_models.example(name, version)
    out = []
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            if value.dtype == torch.bfloat16:  # tritonclient sends BF16 from ml_dtypes arrays, as binary only
                arr = value.float().numpy().astype(ml_dtypes.bfloat16)
                kind = "BF16"
            else:
                arr = value.numpy()
                kind = np_to_triton_dtype(arr.dtype)
        else:
            arr = np.array([s.encode() for s in value], dtype=np.object_)
            kind = "BYTES"
        i = tritonhttp.InferInput(key, list(arr.shape), kind)
        i.set_data_from_numpy(arr, binary_data=binary or kind == "BF16")
        out.append(i)
    return out, expected


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value  # JSON gives str, binary bytes


CASES = [("resnet_classifier", None), ("text_normalizer", None), ("seq2seq_generator", 2),
         ("seq2seq_generator", 3), ("masked_bf16", None)]  # fmt: skip


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize(("name", "version"), CASES, ids=[f"{n}-{v}" for n, v in CASES])
def test_infer_gives_the_right_tensors(client: Any, name: str, version: int | None, binary: bool) -> None:
    inputs, expected = _inputs(name, version, binary)
    outputs = [tritonhttp.InferRequestedOutput(key, binary_data=binary) for key in expected]
    result = client.infer(name, inputs, model_version="" if version is None else str(version), outputs=outputs,
                          request_id="r-1")  # fmt: skip
    response = result.get_response()
    assert response["model_name"] == name and response["id"] == "r-1"
    assert response["model_version"] == str(version or max(triton_models.RECIPES[name].served))
    got: dict[str, Any] = {}
    for key, want in expected.items():
        arr = result.as_numpy(key)
        got[key] = torch.from_numpy(np.array(arr)) if isinstance(want, torch.Tensor) else [_text(s) for s in arr]
    triton_models.check(name, got, expected)


def test_infer_without_outputs_returns_all_as_binary(client: Any) -> None:
    inputs, expected = _inputs("text_normalizer", None, True)
    result = client.infer("text_normalizer", inputs)
    outputs = {o["name"]: o for o in result.get_response()["outputs"]}
    assert set(outputs) == set(expected)
    assert all("binary_data_size" in o["parameters"] for o in outputs.values())
    assert [s.decode() for s in result.as_numpy("OUTPUT__0")] == expected["OUTPUT__0"]


def test_compressed_requests_and_concurrency(client: Any, server: ServerProcess) -> None:
    x = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    i = tritonhttp.InferInput("INPUT__0", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    m = x.mean(axis=(2, 3))
    want = np.concatenate([m, m, m, m[:, :1]], axis=1)
    for algorithm in ("gzip", "deflate"):
        out = client.infer("resnet_classifier", [i], request_compression_algorithm=algorithm).as_numpy("OUTPUT__0")
        np.testing.assert_allclose(out, want, rtol=1e-5)

    def one(k: int) -> np.ndarray:
        c = tritonhttp.InferenceServerClient(server.http)
        try:
            y = x + k
            j = tritonhttp.InferInput("INPUT__0", list(y.shape), "FP32")
            j.set_data_from_numpy(y)
            return c.infer("resnet_classifier", [j]).as_numpy("OUTPUT__0") - want  # type: ignore[no-any-return]
        finally:
            c.close()

    with ThreadPoolExecutor(8) as ex:
        for k, diff in enumerate(ex.map(one, range(16))):
            np.testing.assert_allclose(diff, k, atol=1e-4)


def test_the_zmq_client_gets_the_same_answers(server: ServerProcess) -> None:
    with Client(server.zmq, timeout=60) as c:
        for name, version in CASES:
            inputs, expected = triton_models.example(name, version)
            triton_models.check(name, c.infer(name, inputs, version=version), expected)


def test_statistics_extension(client: Any) -> None:
    inputs, _ = _inputs("seq2seq_generator", 3, True)
    for _ in range(3):
        client.infer("seq2seq_generator", inputs, model_version="3")
    stats = client.get_inference_statistics("seq2seq_generator", "3")["model_stats"]
    assert [(s["name"], s["version"]) for s in stats] == [("seq2seq_generator", "3")]
    assert stats[0]["inference_stats"]["success"]["count"] >= 3 and stats[0]["execution_count"] >= 3


# ── raw HTTP: errors are 4xx with a clear message ──────────────────────────────


def _binary(doc: dict[str, Any], data: bytes) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(doc).encode()
    return header + data, {"Inference-Header-Content-Length": str(len(header))}


def _x(**fields: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "INPUT__0", "shape": [1, 3, 32, 32], "datatype": "FP32", **fields}]}


ERRORS: list[tuple[str, str, bytes, dict[str, str], int, str]] = [
    ("bad-json", "resnet_classifier", b'{"inputs": [', {}, 400, "not valid JSON"),
    ("not-an-object", "resnet_classifier", b"[1, 2]", {}, 400, "must be a JSON object"),
    ("no-inputs", "resnet_classifier", b'{"inputs": []}', {}, 400, "no 'inputs'"),
    ("unknown-datatype", "resnet_classifier", json.dumps(_x(datatype="FP8", data=[0])).encode(), {}, 400,
     "unknown datatype 'FP8'"),
    ("unsupported-datatype", "resnet_classifier", json.dumps(_x(datatype="UINT64", data=[0])).encode(), {}, 400,
     "UINT64 is not supported"),
    ("wrong-datatype", "resnet_classifier", json.dumps(_x(datatype="INT64", data=[0] * 3072)).encode(), {}, 400,
     "expected datatype FP32, got INT64"),
    ("strings-as-floats", "resnet_classifier", json.dumps(_x(data=["a"] * 3072)).encode(), {}, 400,
     "FP32 data must be numbers, got strings"),
    ("data-and-shape-differ", "resnet_classifier", json.dumps(_x(data=[0.5] * 10)).encode(), {}, 400,
     "holds 3072 elements, 'data' has 10"),
    ("wrong-shape", "resnet_classifier",
     json.dumps({"inputs": [{"name": "INPUT__0", "shape": [1, 3, 4], "datatype": "FP32", "data": [0] * 12}]}).encode(),
     {}, 400, "expected shape [-1, 3, 32, 32]"),
    ("unknown-input", "resnet_classifier", json.dumps({"inputs": [{"name": "nope", "shape": [1], "datatype": "FP32",
     "data": [1]}]}).encode(), {}, 400, "nope"),
    ("int-out-of-range", "seq2seq_generator", json.dumps({"inputs": [{"name": "input_ids", "shape": [1, 1],
     "datatype": "INT32", "data": [2**40]}]}).encode(), {}, 400, "out of the range of INT32"),
    ("unknown-output", "resnet_classifier", json.dumps({**_x(data=[0] * 3072), "outputs": [{"name": "nope"}]}).encode(),
     {}, 400, "has no output 'nope'"),
    ("binary-size-differs", "resnet_classifier", *_binary(_x(parameters={"binary_data_size": 16}), bytes(16)), 400,
     "is 12288 bytes, binary_data_size is 16"),
    ("binary-past-the-end", "resnet_classifier", *_binary(_x(parameters={"binary_data_size": 12288}), bytes(100)),
     400, "only 100 bytes"),
    ("bytes-after-the-data", "resnet_classifier", *_binary(_x(parameters={"binary_data_size": 12288}),
     bytes(12288 + 7)), 400, "7 bytes after"),
    ("header-longer-than-body", "resnet_classifier", b"{}", {"Inference-Header-Content-Length": "99"}, 400,
     "Inference-Header-Content-Length is 99"),
    ("bad-bytes-element", "text_normalizer", *_binary({"inputs": [{"name": "INPUT__0", "shape": [1], "datatype":
     "BYTES", "parameters": {"binary_data_size": 6}}]}, struct.pack("<I", 50) + b"ab"), 400, "runs past the end"),
    ("unknown-model", "nope", json.dumps(_x(data=[0])).encode(), {}, 404, "unknown model 'nope'"),
    ("failed-model", "broken", json.dumps(_x(data=[0])).encode(), {}, 503, "unavailable"),
    ("content-encoding", "resnet_classifier", b"{}", {"Content-Encoding": "br"}, 415, "not supported"),
    ("sequence", "resnet_classifier", json.dumps({**_x(data=[0] * 3072), "parameters": {"sequence_id": 3}}).encode(),
     {}, 400, "no sequence_batching"),
]  # fmt: skip


@pytest.mark.parametrize(("model", "body", "headers", "status", "message"), [e[1:] for e in ERRORS],
                         ids=[e[0] for e in ERRORS])  # fmt: skip
def test_bad_requests_get_a_clear_error(
    server: ServerProcess, model: str, body: bytes, headers: dict[str, str], status: int, message: str
) -> None:
    code, got_headers, data = request(server.http, "POST", f"/v2/models/{model}/infer", body, headers)
    assert code == status, data
    assert got_headers["content-type"] == "application/json"
    error = json.loads(data)["error"]
    assert message in error, error


@pytest.mark.parametrize(
    ("method", "path", "status", "message"),
    [
        ("GET", "/v2/nothing", 404, "no such endpoint"),
        ("DELETE", "/v2/models/resnet_classifier", 405, "not allowed"),
        ("GET", "/v2/models/nope", 404, "unknown model 'nope'"),
        ("GET", "/v2/models/resnet_classifier/versions/7", 404, "has no version 7"),
        ("GET", "/v2/models/resnet_classifier/versions/x/config", 400, "is not a number"),
        ("GET", "/v2/models/nope/ready", 404, "unknown model"),
    ],
)
def test_bad_paths_get_a_clear_error(server: ServerProcess, method: str, path: str, status: int, message: str) -> None:
    code, _, data = request(server.http, method, path)
    assert code == status, data
    assert message in json.loads(data)["error"]


def _send_until_answered(s: socket.socket, chunks: list[bytes]) -> None:
    """Send ``chunks`` on ``s`` until the server answers, or has closed the connection
    (having answered: the answer then waits in the socket's receive buffer)."""
    for chunk in chunks:
        if select.select([s], [], [], 0)[0]:
            return
        try:
            s.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            return


def test_oversize_bodies_are_refused_before_they_are_read(server: ServerProcess) -> None:
    host, port = server.http.rsplit(":", 1)
    # Content-Length over the limit: refused on the headers, the body never sent.
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v2/models/spin/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n")
        r = http.client.HTTPResponse(s)  # parses what the server answered on this socket
        r.begin()
        assert r.status == 413
        assert "--max-request-bytes" in json.loads(r.read())["error"]
    # A chunked body that grows past the limit: refused once it does. (Had the server not
    # refused it, the last chunk would end the body, and it would answer otherwise.)
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v2/models/spin/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n" % (64 << 10) + bytes(64 << 10) + b"\r\n"
        _send_until_answered(s, [chunk] * (LIMIT // (64 << 10) + 8) + [b"0\r\n\r\n"])
        r = http.client.HTTPResponse(s)
        r.begin()
        assert r.status == 413, r.read()
        assert "larger than" in json.loads(r.read())["error"]
    # A small gzip body that inflates past the limit.
    bomb = gzip.compress(bytes(LIMIT * 4))
    code, _, data = request(server.http, "POST", "/v2/models/spin/infer", bomb, {"Content-Encoding": "gzip"})
    assert code == 413 and "once decompressed" in json.loads(data)["error"]


def _server_fds(server: ServerProcess) -> int:
    return len(os.listdir(f"/proc/{server.proc.pid}/fd"))


def _settled(server: ServerProcess, fds: int, timeout: float = 30.0) -> None:
    """The server's descriptors back to ``fds`` and spin's arena empty, within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        values = metrics(server.metrics)
        in_use = sample(values, "libtorchrt_arena_bytes_in_use", model="spin", version="1")
        pending = sample(values, "nv_inference_pending_request_count", model="spin", version="1")
        pending += sample(values, "libtorchrt_inflight_requests", model="spin", version="1")
        now = _server_fds(server)
        if in_use == 0 and pending == 0 and now <= fds:
            return
        assert time.monotonic() < deadline, f"left behind: arena {in_use} B, pending {pending}, fds {fds} -> {now}"
        time.sleep(0.2)


SPIN_LABELS = {"model": "spin", "version": "1"}


def _spin_body(n: float) -> bytes:
    """A JSON request to spin: about ``n`` * 1.6 µs of work (more on a busy machine)."""
    return json.dumps({"inputs": [{"name": "INPUT__0", "shape": [1], "datatype": "FP32", "data": [n]}]}).encode()


def _spin_load(server: ServerProcess) -> tuple[int, int]:
    """spin's requests sent to its workers, and those waiting in the pool's queue."""
    values = metrics(server.metrics)
    return (int(sample(values, "libtorchrt_inflight_requests", **SPIN_LABELS)),
            int(sample(values, "nv_inference_pending_request_count", **SPIN_LABELS)))  # fmt: skip


def _send_and_keep(server: ServerProcess, body: bytes) -> socket.socket:
    """A connection that has sent one inference request to spin and reads nothing."""
    host, port = server.http.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=30)
    s.sendall(f"POST /v2/models/spin/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
              + body)  # fmt: skip
    return s


def test_clients_that_go_away_leave_nothing_behind(server: ServerProcess) -> None:
    host, port = server.http.rsplit(":", 1)
    status, _, _ = request(server.http, "POST", "/v2/models/spin/infer", _spin_body(10))
    assert status == 200
    fds = _server_fds(server)
    spin = {"inputs": [{"name": "INPUT__0", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}
    body, headers = _binary(spin, struct.pack("<f", 300_000.0))  # about half a second of work
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    for _ in range(3):  # gone half-way through the body
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(f"POST /v2/models/spin/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{head}\r\n"
                      .encode() + body[: len(body) // 2])  # fmt: skip
    for k in range(2):  # gone while the model runs: its outputs are dropped
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(f"POST /v2/models/spin/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{head}\r\n"
                      .encode() + body)  # fmt: skip
            wait_for(lambda k=k: sum(_spin_load(server)) == k + 1, 30, "the request to reach the pool")
    _settled(server, fds)
    status, doc = infer_json(server.http, "spin", {"inputs": [{"name": "INPUT__0", "shape": [1], "datatype": "FP32",
                                                               "data": [10]}]})  # fmt: skip
    assert status == 200 and doc["outputs"][0]["data"] == [10.0]


def test_requests_of_clients_that_went_away_never_run(server: ServerProcess) -> None:
    """A request still in the pool's queue when its client disconnects is cancelled:
    it never runs. Both instances of spin are kept busy by a long request, the requests
    the pool sends ahead to each worker are filled with short ones, and those of the
    clients that go away wait behind them in the pool's queue."""
    # (the first request of the server's event loop opens its fast lane mailbox: an
    # eventfd the pool keeps until it closes)
    assert request(server.http, "POST", "/v2/models/spin/infer", _spin_body(1))[0] == 200
    fds = _server_fds(server)
    before = metrics(server.metrics)
    assert _spin_load(server) == (0, 0)
    with ThreadPoolExecutor(32) as ex:
        kept: list[Future[tuple[int, dict[str, str], bytes]]] = []

        def send(n: float, count: int) -> None:
            for _ in range(count):
                kept.append(ex.submit(request, server.http, "POST", "/v2/models/spin/infer", _spin_body(n)))
            wait_for(lambda: sum(_spin_load(server)) == len(kept), 30, f"{len(kept)} requests to reach the pool")

        send(2_000_000, 2)  # a second or more each, one per instance
        assert _spin_load(server) == (2, 0)
        while _spin_load(server)[1] == 0:  # until requests wait in the pool's queue, not in a worker's
            assert len(kept) < 64, "the workers take every request: the pool queues none"
            send(10, 4)
        fds_kept = _server_fds(server)
        queued = _spin_load(server)[1]
        gone = [_send_and_keep(server, _spin_body(10)) for _ in range(3)]
        wait_for(lambda: _spin_load(server)[1] == queued + len(gone), 30, "the requests to be queued in the pool")
        for s in gone:
            s.close()
        wait_for(lambda: _server_fds(server) <= fds_kept, 30, "the server to close the connections of the clients")
        # (the long requests still run: nothing was sent to a worker since they were queued)
        assert not kept[0].done() and not kept[1].done(), "the long requests ended too early: make them longer"
        answers = [f.result(120) for f in kept]
    assert [status for status, _, _ in answers] == [200] * len(kept), answers
    _settled(server, fds)
    after = metrics(server.metrics)

    def delta(name: str) -> float:
        return sample(after, name, **SPIN_LABELS) - sample(before, name, **SPIN_LABELS)

    # exactly the requests whose clients stayed ran; those of the clients that went away never did
    assert delta("nv_inference_exec_count_total") == len(kept)
    assert delta("nv_inference_request_success_total") == len(kept)


def test_metrics(server: ServerProcess, client: Any) -> None:
    before = metrics(server.metrics)
    labels = {"model": "resnet_classifier", "version": "1"}
    inputs, _ = _inputs("resnet_classifier", None, True)
    for _ in range(5):
        client.infer("resnet_classifier", inputs)
    bad = {"inputs": [{"name": "INPUT__0", "shape": [1, 3, 4], "datatype": "FP32", "data": [0] * 12}]}
    assert infer_json(server.http, "resnet_classifier", bad)[0] == 400
    after = metrics(server.metrics)

    def delta(name: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("nv_inference_request_success_total") == 5
    assert delta("nv_inference_count_total") == 10  # batch rows: 2 per request
    assert delta("nv_inference_exec_count_total") == 5
    for name in ("request", "queue", "compute_infer"):
        assert delta(f"nv_inference_{name}_duration_us_total") > 0, name
    assert delta("libtorchrt_inference_request_duration_seconds_count") == 5
    assert sample(after, "libtorchrt_inference_request_duration_seconds_bucket", le="+Inf", **labels) == sample(
        after, "nv_inference_request_success_total", **labels
    )
    assert sample(after, "libtorchrt_instances", state="ready", **labels) == 2
    assert sample(after, "libtorchrt_worker_restarts_total", instance="0", **labels) == 0
    assert sample(after, "libtorchrt_arena_bytes", **labels) > 0
    assert sample(after, "libtorchrt_model_state", state="ready", **labels) == 1
    assert sample(after, "libtorchrt_model_state", model="broken", version="", state="failed") == 1
    assert sample(after, "nv_inference_pending_request_count", **labels) == 0
    assert ("process_resident_memory_bytes", ()) in after


# ── a guarded server: the bearer token, then SIGTERM under load ────────────────


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("guarded")
    repo = build_repository(tmp, (), spin=True)
    token = tmp / "token"
    token.write_text(TOKEN + "\n")
    proc = ServerProcess(
        "--model-repository", str(repo), "--http", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
        "--http-token-file", str(token), "--grace", "30", "--zmq", f"ipc://{tmp}/zmq/pool.sock",
    )  # fmt: skip
    try:
        yield proc.wait_ready()
    finally:
        proc.kill()


AUTH = {"Authorization": f"Bearer {TOKEN}"}
SPIN = {"inputs": [{"name": "INPUT__0", "shape": [1], "datatype": "FP32", "data": [10]}]}


def test_the_ipc_socket_is_private(guarded: ServerProcess) -> None:
    path = Path(guarded.zmq.removeprefix("ipc://"))
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_ISSOCK(path.stat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o600


def test_the_bearer_token_is_enforced(guarded: ServerProcess) -> None:
    assert "bearer token required" in guarded.output
    for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": f"Basic {TOKEN}"}):
        status, got, data = request(guarded.http, "POST", "/v2/models/spin/infer", json.dumps(SPIN).encode(), headers)
        assert status == 401 and got["www-authenticate"].startswith("Bearer"), data
        assert "bearer token" in json.loads(data)["error"]
        assert request(guarded.http, "GET", "/v2/models/spin", headers=headers)[0] == 401
    # the probes need no token
    assert request(guarded.http, "GET", "/v2/health/live")[0] == 200
    assert request(guarded.http, "GET", "/v2/health/ready")[0] == 200
    status, doc = infer_json(guarded.http, "spin", SPIN, AUTH)
    assert status == 200 and doc["outputs"][0]["data"] == [10.0]
    c = tritonhttp.InferenceServerClient(guarded.http)
    try:
        assert c.get_model_metadata("spin", headers=AUTH)["name"] == "spin"
    finally:
        c.close()
    assert metrics(guarded.metrics)  # read-only, without a token (Prometheus scrapes it as it is)


def test_sigterm_under_load_drains_and_exits_cleanly(guarded: ServerProcess) -> None:
    workers = guarded.workers()
    assert len(workers) == 2
    work = {"inputs": [{"name": "INPUT__0", "shape": [1], "datatype": "FP32", "data": [400_000]}]}
    results: list[tuple[int, Any]] = []
    spin = {"model": "spin", "version": "1"}
    done_before = sample(metrics(guarded.metrics), "nv_inference_request_success_total", **spin)

    def one() -> None:
        results.append(infer_json(guarded.http, "spin", work, AUTH))

    def reached_the_pool() -> float:
        values = metrics(guarded.metrics)
        done = sample(values, "nv_inference_request_success_total", **spin) - done_before
        return done + sum(sample(values, name, **spin) for name in
                          ("libtorchrt_inflight_requests", "nv_inference_pending_request_count"))  # fmt: skip

    threads = [threading.Thread(target=one) for _ in range(4)]  # two run, two wait in the workers
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while reached_the_pool() < 4:
        assert time.monotonic() < deadline, "the requests never reached the pool"
        time.sleep(0.02)
    guarded.proc.terminate()
    guarded.wait_for("stopping: draining", 10)
    # New requests are refused from now on with 503, while the requests in flight run:
    # the listener stays open until they have finished (then closes). (The readiness
    # probe's 400 while draining is tested in tests/integration/test_server_drain.py.)
    refused: list[tuple[int, Any]] = []
    deadline = time.monotonic() + 30
    while len(results) < 4:
        try:
            refused.append(infer_json(guarded.http, "spin", SPIN, AUTH))
        except (ConnectionRefusedError, ConnectionResetError, http.client.RemoteDisconnected):
            break  # not listening any more: only once the requests in flight have finished
        assert time.monotonic() < deadline, f"the requests in flight did not finish: {refused[-3:]}"
    assert refused, "no request was sent while the drain ran: the test proves nothing"
    assert all(status == 503 and "shutting down" in doc["error"] for status, doc in refused), refused
    for t in threads:
        t.join(60)
    assert [status for status, _ in results] == [200] * 4, results
    assert all(doc["outputs"][0]["data"] == [400_000.0] for _, doc in results)
    assert guarded.wait(60) == 0, guarded.output
    assert "stopped" in guarded.output
    assert not any(alive(pid) for pid in workers), "workers left behind"
    assert not os.path.exists(guarded.zmq.removeprefix("ipc://")), "the ipc:// socket file was left behind"


# ── start-up and command-line failures ─────────────────────────────────────────


@pytest.fixture(scope="module")
def spin_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("spin"), (), spin=True)


def test_sigterm_while_loading_exits_cleanly(spin_repo: Path) -> None:
    proc = ServerProcess("--model-repository", str(spin_repo), "--http", "127.0.0.1:0", "--metrics", "off")
    try:
        # (with the template, "loading" comes while it imports torch, before any worker's pid)
        proc.wait_for(r"spin v1 instance \d: loading")
        processes = proc.workers() | children_of(proc.proc.pid)  # (the template too)
        assert proc.stop() == 0, proc.output
        assert "ready:" not in proc.output
        assert not any(alive(pid) for pid in processes), "workers left behind"
    finally:
        proc.kill()


def test_nothing_loaded_exits_1(tmp_path: Path) -> None:
    repo = build_repository(tmp_path, (), broken=True)
    proc = ServerProcess("--model-repository", str(repo), "--http", "127.0.0.1:0", "--metrics", "off")
    try:
        assert proc.wait() == 1, proc.output
        assert "no model could be loaded" in proc.output and "dim" in proc.output
    finally:
        proc.kill()


def test_a_taken_port_exits_1_before_loading(spin_repo: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = ServerProcess("--model-repository", str(spin_repo), "--http", f"127.0.0.1:{port}", "--metrics", "off")
        try:
            assert proc.wait() == 1, proc.output
        finally:
            proc.kill()
    assert f"cannot listen on 127.0.0.1:{port} (--http)" in proc.output and "in use" in proc.output
    assert "loading" not in proc.output


def test_non_loopback_without_authentication_is_refused(spin_repo: Path) -> None:
    # (the other refused command lines: tests/unit/test_server_cli.py)
    proc = ServerProcess("--model-repository", str(spin_repo), "--http", "0.0.0.0:0", "--metrics", "off")
    try:
        assert proc.wait() == 2, proc.output
        assert "--http 0.0.0.0:0 is reachable from other machines" in proc.output and "--insecure" in proc.output
        assert "loading" not in proc.output
    finally:
        proc.kill()

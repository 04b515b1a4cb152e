"""Server mode over gRPC: the real ``python -m libtorchrt.pool`` as a subprocess, driven by
``tritonclient.grpc`` and ``tritonclient.grpc.aio`` (the acceptance test of the KServe v2
/ Triton gRPC protocol): every RPC, raw and typed tensor contents, requested outputs,
streams, each error's status, the bearer token, TLS, and SIGTERM under load. Hostile
input on the gRPC port is in ``test_hostile_grpc.py``."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import ml_dtypes  # with tritonclient (a dev dependency): how it holds BF16
import numpy as np
import pytest
import torch
import tritonclient.grpc as tritongrpc
import tritonclient.grpc.aio as tritonaio
import tritonclient.http as tritonhttp
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from tests import triton_models
from tests.models import Raiser
from tests.server_util import ServerProcess, add_model, alive, build_repository, request

TOKEN = "s3cret-token-for-the-grpc-tests-0123"
MAX_INFLIGHT = 8  # --max-inflight of the main server

RAISER_CONFIG = """
name: "raiser"
platform: "pytorch_libtorch"
max_batch_size: 0
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""


# ── the servers ────────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Four models of tests/data/repository, spin, raiser and a broken model; HTTP and gRPC."""
    repo = build_repository(tmp_path_factory.mktemp("grpc"), spin=True, broken=True)
    add_model(repo, "raiser", RAISER_CONFIG, Raiser())
    proc = ServerProcess(
        "--model-repository", str(repo), "--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0", "--metrics", "off",
        "--max-request-bytes", "1MiB", "--max-inflight", str(MAX_INFLIGHT), "--grace", "10",
    )  # fmt: skip
    try:
        proc.wait_ready()
        assert proc.grpc, proc.output
        workers = proc.workers()
        yield proc
        assert proc.stop() == 0, proc.output
        assert not any(alive(pid) for pid in workers), "workers left behind"
    finally:
        proc.kill()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[Any]:
    c = tritongrpc.InferenceServerClient(server.grpc)
    yield c
    c.close()


def status_of(call: Any) -> tuple[str, str]:
    """The status name and message a tritonclient call fails with."""
    with pytest.raises(InferenceServerException) as e:
        call()
    return str(e.value.status()).removeprefix("StatusCode."), e.value.message()


def _input(name: str, value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bfloat16:  # tritonclient holds BF16 as ml_dtypes arrays
            arr = value.float().numpy().astype(ml_dtypes.bfloat16)
            kind = "BF16"
        else:
            arr = value.numpy()
            kind = np_to_triton_dtype(arr.dtype)
    else:
        arr = np.array([s.encode() for s in value], dtype=np.object_)
        kind = "BYTES"
    i = tritongrpc.InferInput(name, list(arr.shape), kind)
    i.set_data_from_numpy(arr)
    return i


def _outputs(result: Any, expected: dict[str, Any]) -> dict[str, Any]:
    got: dict[str, Any] = {}
    for key, want in expected.items():
        arr = result.as_numpy(key)
        if isinstance(want, torch.Tensor):
            got[key] = torch.from_numpy(np.array(arr.astype(np.float32) if arr.dtype == ml_dtypes.bfloat16 else arr))
        else:
            got[key] = [s.decode() for s in arr]
    return got


def spin_input(value: float) -> Any:
    x = tritongrpc.InferInput("INPUT__0", [1], "FP32")
    x.set_data_from_numpy(np.array([value], dtype=np.float32))
    return x


# ── health, metadata, configuration, statistics, repository ────────────────────


def test_health_and_server_metadata(client: Any, server: ServerProcess) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "libtorchrt" and "model_configuration" in meta["extensions"]
    for name in ("resnet_classifier", "text_normalizer", "seq2seq_generator", "masked_bf16", "spin", "raiser"):
        assert client.is_model_ready(name), name
    assert client.is_model_ready("seq2seq_generator", "2") and client.is_model_ready("seq2seq_generator", "3")
    assert not client.is_model_ready("broken")  # it failed to load: not ready, not an error
    assert status_of(lambda: client.is_model_ready("nope"))[0] == "NOT_FOUND"
    assert status_of(lambda: client.is_model_ready("spin", "7"))[0] == "NOT_FOUND"
    assert "gRPC     127.0.0.1:" in server.output and "(KServe v2 / Triton)" in server.output


def test_model_metadata_and_config_are_the_http_ones(client: Any, server: ServerProcess) -> None:
    for name, version in (("resnet_classifier", ""), ("seq2seq_generator", "2"), ("text_normalizer", "")):
        meta = client.get_model_metadata(name, version, as_json=True)
        path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "")
        status, _, body = request(server.http, "GET", path)
        assert status == 200
        http = json.loads(body)
        for t in (*http["inputs"], *http["outputs"]):
            t["shape"] = [str(d) for d in t["shape"]]  # (protobuf's JSON writes int64 as strings)
        assert meta == http
    config = client.get_model_config("resnet_classifier").config  # a ModelConfig message: Triton's
    assert config.name == "resnet_classifier" and config.max_batch_size == 32
    assert config.input[0].data_type == tritongrpc.model_config_pb2.TYPE_FP32
    assert list(config.input[0].dims) == [3, 32, 32]
    assert config.instance_group[0].count == 2
    assert config.instance_group[0].kind == tritongrpc.model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16]
    v3 = client.get_model_config("seq2seq_generator", "3").config
    assert v3.version_policy.latest.num_versions == 2
    assert status_of(lambda: client.get_model_config("nope"))[0] == "NOT_FOUND"
    assert status_of(lambda: client.get_model_metadata("spin", "x1"))[0] == "INVALID_ARGUMENT"
    assert status_of(lambda: client.get_model_metadata("broken"))[0] == "UNAVAILABLE"


def test_repository_index_and_statistics(client: Any) -> None:
    index = {(m.name, m.version): m for m in client.get_model_repository_index().models}
    assert index[("resnet_classifier", "1")].state == "READY"
    assert index[("broken", "")].state == "UNAVAILABLE" and "dim" in index[("broken", "")].reason
    ready = client._client_stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True))  # (no client option)
    assert {m.name for m in ready.models} >= {"spin", "raiser"} and "broken" not in {m.name for m in ready.models}
    before = client.get_inference_statistics("spin").model_stats[0].inference_stats.success.count
    client.infer("spin", [spin_input(10)])
    stats = client.get_inference_statistics("spin", as_json=True)["model_stats"]
    assert [(s["name"], s["version"]) for s in stats] == [("spin", "1")]
    assert int(stats[0]["inference_stats"]["success"]["count"]) == before + 1
    everything = client.get_inference_statistics().model_stats
    assert {s.name for s in everything} >= {"spin", "resnet_classifier", "seq2seq_generator"}


# ── inference ──────────────────────────────────────────────────────────────────

CASES = [("resnet_classifier", None), ("text_normalizer", None), ("seq2seq_generator", 2),
         ("seq2seq_generator", 3), ("masked_bf16", None)]  # fmt: skip


@pytest.mark.parametrize(("name", "version"), CASES, ids=[f"{n}-{v}" for n, v in CASES])
def test_infer_gives_the_right_tensors(client: Any, name: str, version: int | None) -> None:
    inputs, expected = triton_models.example(name, version)
    outputs = [tritongrpc.InferRequestedOutput(key) for key in expected]
    result = client.infer(name, [_input(k, v) for k, v in inputs.items()], model_version="" if version is None
                          else str(version), outputs=outputs, request_id="r-1")  # fmt: skip
    response = result.get_response()
    assert response.model_name == name and response.id == "r-1"
    assert response.model_version == str(version or max(triton_models.RECIPES[name].served))
    triton_models.check(name, _outputs(result, expected), expected)


def test_requested_outputs_only_are_returned(client: Any) -> None:
    inputs, expected = triton_models.example("text_normalizer")
    ins = [_input(k, v) for k, v in inputs.items()]
    result = client.infer("text_normalizer", ins, outputs=[tritongrpc.InferRequestedOutput("OUTPUT__1")])
    assert [o.name for o in result.get_response().outputs] == ["OUTPUT__1"]
    assert np.array_equal(result.as_numpy("OUTPUT__1"), expected["OUTPUT__1"].numpy())
    everything = client.infer("text_normalizer", ins)  # none asked for: all of them
    assert [o.name for o in everything.get_response().outputs] == ["OUTPUT__0", "OUTPUT__1"]
    code, message = status_of(lambda: client.infer("text_normalizer", ins,
                                                   outputs=[tritongrpc.InferRequestedOutput("OUTPUT__7")]))  # fmt: skip
    assert code == "INVALID_ARGUMENT" and "has no output 'OUTPUT__7'" in message


def stub(server: ServerProcess) -> Any:
    """tritonclient's generated stub, for messages its client does not build (typed contents)."""
    return service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.grpc))


def test_typed_contents(server: ServerProcess) -> None:
    s = stub(server)
    fp32 = service_pb2.ModelInferRequest(model_name="resnet_classifier", id="typed")
    x = torch.rand(1, 3, 32, 32)
    fp32.inputs.add(name="INPUT__0", datatype="FP32", shape=[1, 3, 32, 32]).contents.fp32_contents.extend(
        x.reshape(-1).tolist()
    )
    response = s.ModelInfer(fp32, timeout=60)
    assert response.id == "typed" and [o.name for o in response.outputs] == ["OUTPUT__0"]
    result = tritongrpc.InferResult(response)
    assert result.as_numpy("OUTPUT__0").shape == (1, 10)
    text = service_pb2.ModelInferRequest(model_name="text_normalizer")
    text.inputs.add(name="INPUT__0", datatype="BYTES", shape=[2]).contents.bytes_contents.extend([b"Hi There", b"OK"])
    result = tritongrpc.InferResult(s.ModelInfer(text, timeout=60))
    assert list(result.as_numpy("OUTPUT__0")) == [b"hi there", b"ok"]
    ids = service_pb2.ModelInferRequest(model_name="seq2seq_generator", model_version="2")
    ids.inputs.add(name="input_ids", datatype="INT32", shape=[1, 3]).contents.int_contents.extend([1, 2, 3])
    assert tritongrpc.InferResult(s.ModelInfer(ids, timeout=60)).as_numpy("output_ids").dtype == np.int32
    masked = service_pb2.ModelInferRequest(model_name="masked_bf16")  # BF16 raw beside BOOL typed: refused
    masked.inputs.add(name="INPUT__0", datatype="BF16", shape=[1, 6])
    masked.inputs.add(name="INPUT__1", datatype="BOOL", shape=[1, 6]).contents.bool_contents.extend([True] * 6)
    with pytest.raises(grpc.RpcError) as e:
        s.ModelInfer(masked, timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "BF16 has no typed contents" in e.value.details()


def test_errors_have_their_status(client: Any) -> None:
    x = spin_input(1)
    code, message = status_of(lambda: client.infer("nope", [x]))
    assert code == "NOT_FOUND" and "unknown model 'nope'" in message
    code, message = status_of(lambda: client.infer("spin", [x], model_version="9"))
    assert code == "NOT_FOUND" and "has no version 9" in message
    wrong = tritongrpc.InferInput("INPUT__0", [1], "INT64")
    wrong.set_data_from_numpy(np.array([1], dtype=np.int64))
    code, message = status_of(lambda: client.infer("spin", [wrong]))
    assert code == "INVALID_ARGUMENT"
    assert message == "input 'INPUT__0' of model 'spin': expected datatype FP32, got INT64"
    shaped = tritongrpc.InferInput("INPUT__0", [1, 3, 16, 16], "FP32")
    shaped.set_data_from_numpy(np.zeros((1, 3, 16, 16), dtype=np.float32))
    code, message = status_of(lambda: client.infer("resnet_classifier", [shaped]))
    assert code == "INVALID_ARGUMENT" and "INPUT__0" in message
    code, message = status_of(lambda: client.infer("raiser", [spin_input(-1)]))
    assert code == "INTERNAL" and message == "model 'raiser' raised RuntimeError: negative input rejected by the model"
    assert client.infer("raiser", [spin_input(2)]).as_numpy("OUTPUT__0").tolist() == [4.0]  # it serves on
    code, message = status_of(lambda: client.infer("broken", [x]))
    assert code == "UNAVAILABLE" and "broken" in message
    code, message = status_of(lambda: client.infer("spin", [spin_input(400_000)], timeout=100_000))  # 0.1 s
    assert code == "DEADLINE_EXCEEDED" and "deadline" in message


def test_the_clients_deadline_cancels_its_request(client: Any) -> None:
    code, _ = status_of(lambda: client.infer("spin", [spin_input(600_000)], client_timeout=0.2))
    assert code == "DEADLINE_EXCEEDED"
    assert client.infer("spin", [spin_input(5)]).as_numpy("OUTPUT__0").tolist() == [5.0]


def test_more_than_max_inflight_requests_get_resource_exhausted(server: ServerProcess) -> None:
    clients = [tritongrpc.InferenceServerClient(server.grpc) for _ in range(MAX_INFLIGHT + 4)]
    results: list[Any] = []
    lock = threading.Lock()

    def one(c: Any) -> None:
        try:
            out: Any = c.infer("spin", [spin_input(300_000)]).as_numpy("OUTPUT__0").tolist()
        except InferenceServerException as e:
            out = (str(e.status()), e.message())
        with lock:
            results.append(out)

    threads = [threading.Thread(target=one, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for c in clients:
        c.close()
    busy = [r for r in results if isinstance(r, tuple)]
    assert len(results) == len(clients) and busy, results
    assert all(code == "StatusCode.RESOURCE_EXHAUSTED" and "(--max-inflight)" in msg for code, msg in busy), busy
    assert sum(r == [300_000.0] for r in results) >= MAX_INFLIGHT // 2, results


# ── the shared memory and classification extensions ───────────────────────────

LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_classification(client: Any) -> None:
    # resnet_classifier: OUTPUT__0[:, k] = mean of channel k % 3 of the image (labels.txt)
    x = np.zeros((2, 3, 32, 32), dtype=np.float32)
    x[0, 0], x[0, 1], x[0, 2] = 0.25, 0.75, 0.5  # classes 1, 4, 7 score 0.75
    x[1, 2] = 2.0  # classes 2, 5, 8 score 2
    i = tritongrpc.InferInput("INPUT__0", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    classified = tritongrpc.InferRequestedOutput("OUTPUT__0", class_count=3)
    result = client.infer("resnet_classifier", [i], outputs=[classified])
    want = [[f"0.750000:{k}:{LABELS[k]}" for k in (1, 4, 7)], [f"2.000000:{k}:{LABELS[k]}" for k in (2, 5, 8)]]
    assert [[s.decode() for s in row] for row in result.as_numpy("OUTPUT__0")] == want
    text = [_input("INPUT__0", ["a"])]
    code, _ = status_of(lambda: client.infer("text_normalizer", text, outputs=[
        tritongrpc.InferRequestedOutput("OUTPUT__0", class_count=2)]))  # fmt: skip
    assert code == "INVALID_ARGUMENT"


def test_system_shared_memory(client: Any, server: ServerProcess) -> None:
    shm = pytest.importorskip("tritonclient.utils.shared_memory")
    x = np.random.default_rng(0).random((1, 3, 32, 32), dtype=np.float32)
    expected = client.infer("resnet_classifier", [_input("INPUT__0", torch.from_numpy(x))]).as_numpy("OUTPUT__0")
    regions = [shm.create_shared_memory_region(name, f"/libtorchrt-grpc-{uuid.uuid4().hex[:12]}", size)
               for name, size in (("in", x.nbytes), ("out", 64))]  # fmt: skip
    try:
        shm.set_shared_memory_region(regions[0], [x])
        client.register_system_shared_memory("in", regions[0]._shm_key, x.nbytes)
        http = tritonhttp.InferenceServerClient(server.http)  # a region registered over HTTP serves gRPC too
        http.register_system_shared_memory("out", regions[1]._shm_key, 64)
        http.close()
        status = client.get_system_shared_memory_status(as_json=True)["regions"]
        assert sorted(status) == ["in", "out"] and int(status["in"]["byte_size"]) == x.nbytes
        i = tritongrpc.InferInput("INPUT__0", [1, 3, 32, 32], "FP32")
        i.set_shared_memory("in", x.nbytes)
        o = tritongrpc.InferRequestedOutput("OUTPUT__0")
        o.set_shared_memory("out", 40)
        result = client.infer("resnet_classifier", [i], outputs=[o])
        params = result.get_output("OUTPUT__0").parameters
        assert params["shared_memory_region"].string_param == "out"
        assert params["shared_memory_byte_size"].int64_param == 40
        np.testing.assert_allclose(shm.get_contents_as_numpy(regions[1], np.float32, [1, 10]), expected)
        o.set_shared_memory("out", 8)  # too small
        code, message = status_of(lambda: client.infer("resnet_classifier", [i], outputs=[o]))
        assert code == "INVALID_ARGUMENT" and "OUTPUT__0" in message
        code, _ = status_of(lambda: client.register_system_shared_memory("in", regions[0]._shm_key, 8))
        assert code == "ALREADY_EXISTS"
        code, _ = status_of(lambda: client.get_system_shared_memory_status("nope"))
        assert code == "NOT_FOUND"
        client.unregister_system_shared_memory("in")
        assert sorted(client.get_system_shared_memory_status(as_json=True)["regions"]) == ["out"]
        code, message = status_of(lambda: client.infer("resnet_classifier", [i]))
        assert code == "INVALID_ARGUMENT" and "'in'" in message
    finally:
        client.unregister_system_shared_memory()
        for region in regions:
            shm.destroy_shared_memory_region(region)
    assert client.get_system_shared_memory_status(as_json=True) == {}
    assert client.get_cuda_shared_memory_status(as_json=True) == {}
    code, message = status_of(lambda: client.register_cuda_shared_memory("c", b"aGFuZGxl", 0, 64))
    assert code == "INVALID_ARGUMENT" and "system shared memory" in message


# ── streams ────────────────────────────────────────────────────────────────────


def test_stream_answers_each_request(client: Any) -> None:
    answers: list[tuple[Any, Any]] = []
    done = threading.Event()

    def callback(result: Any, error: Any) -> None:
        answers.append((result, error))
        if len(answers) == 4:
            done.set()

    inputs, expected = triton_models.example("text_normalizer")
    client.start_stream(callback)
    try:
        client.async_stream_infer("text_normalizer", [_input(k, v) for k, v in inputs.items()], request_id="a")
        client.async_stream_infer("raiser", [spin_input(-1)], request_id="b")
        client.async_stream_infer("nope", [spin_input(1)], request_id="c")
        client.async_stream_infer("spin", [spin_input(7)], request_id="d",
                                  outputs=[tritongrpc.InferRequestedOutput("OUTPUT__0")])  # fmt: skip
        assert done.wait(60), answers
    finally:
        client.stop_stream()
    results = {r.get_response().id: r for r, e in answers if e is None}
    errors = sorted(e.message() for r, e in answers if e is not None)
    assert sorted(results) == ["a", "d"], answers
    assert [s.decode() for s in results["a"].as_numpy("OUTPUT__0")] == expected["OUTPUT__0"]
    assert results["d"].as_numpy("OUTPUT__0").tolist() == [7.0]
    assert errors == ["model 'raiser' raised RuntimeError: negative input rejected by the model",
                      "unknown model 'nope'; this server serves " + errors[1].split("serves ", 1)[1]]  # fmt: skip


# ── tritonclient.grpc.aio ──────────────────────────────────────────────────────


def test_the_asyncio_client(server: ServerProcess) -> None:
    async def run() -> None:
        c = tritonaio.InferenceServerClient(server.grpc)
        try:
            assert await c.is_server_live() and await c.is_server_ready()
            assert (await c.get_model_metadata("spin")).name == "spin"
            results = await asyncio.gather(*(c.infer("spin", [spin_input(i)]) for i in range(6)))
            assert [r.as_numpy("OUTPUT__0").tolist() for r in results] == [[float(i)] for i in range(6)]
            with pytest.raises(InferenceServerException) as e:
                await c.infer("raiser", [spin_input(-1)])
            assert "StatusCode.INTERNAL" in str(e.value.status())

            async def requests() -> AsyncIterator[dict[str, Any]]:
                for i in range(5):
                    yield {"model_name": "spin", "inputs": [spin_input(i)], "request_id": str(i)}
                yield {"model_name": "raiser", "inputs": [spin_input(-1)], "request_id": "bad"}

            got, failed = {}, []
            async for result, error in c.stream_infer(requests()):
                if error is not None:
                    failed.append(error.message())
                else:
                    got[result.get_response().id] = result.as_numpy("OUTPUT__0").tolist()
                if len(got) + len(failed) == 6:
                    break
            assert got == {str(i): [float(i)] for i in range(5)}
            assert failed == ["model 'raiser' raised RuntimeError: negative input rejected by the model"]
        finally:
            await c.close()

    asyncio.run(asyncio.wait_for(run(), 60))


# ── a guarded server: the bearer token, then SIGTERM under load ────────────────


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = build_repository(tmp_path_factory.mktemp("grpc-guarded"), (), spin=True)
    proc = ServerProcess(
        "--model-repository", str(repo), "--http", "off", "--grpc", "127.0.0.1:0", "--metrics", "off",
        "--grace", "30", env={"LIBTORCHRT_HTTP_TOKEN": TOKEN},
    )  # fmt: skip
    try:
        yield proc.wait_ready()
    finally:
        proc.kill()


AUTH = {"authorization": f"Bearer {TOKEN}"}


def test_the_bearer_token_is_enforced(guarded: ServerProcess) -> None:
    assert "bearer token required" in guarded.output and "HTTP " not in guarded.output
    c = tritongrpc.InferenceServerClient(guarded.grpc)
    try:
        for headers in ({}, {"authorization": "Bearer wrong-token-wrong-token"}, {"authorization": f"Basic {TOKEN}"}):
            code, message = status_of(lambda headers=headers: c.infer("spin", [spin_input(1)], headers=headers))
            assert code == "UNAUTHENTICATED" and "bearer token" in message
            code, _ = status_of(lambda headers=headers: c.get_model_metadata("spin", headers=headers))
            assert code == "UNAUTHENTICATED"
        # the probes need no token
        assert c.is_server_live() and c.is_server_ready()
        assert c.infer("spin", [spin_input(3)], headers=AUTH).as_numpy("OUTPUT__0").tolist() == [3.0]
        assert c.get_model_metadata("spin", headers=AUTH).name == "spin"
    finally:
        c.close()


def test_sigterm_under_load_drains_and_exits_cleanly(guarded: ServerProcess) -> None:
    workers = guarded.workers()
    assert len(workers) == 2
    results: list[Any] = []
    started = threading.Barrier(5)

    def one() -> None:
        c = tritongrpc.InferenceServerClient(guarded.grpc)
        started.wait(30)
        try:
            results.append(c.infer("spin", [spin_input(400_000)], headers=AUTH).as_numpy("OUTPUT__0").tolist())
        except InferenceServerException as e:
            results.append(e)
        finally:
            c.close()

    threads = [threading.Thread(target=one) for _ in range(4)]  # two run, two wait in the workers
    for t in threads:
        t.start()
    started.wait(30)
    time.sleep(0.3)  # (the requests reach the pool)
    guarded.proc.send_signal(signal.SIGTERM)
    guarded.wait_for("stopping: draining", 10)
    c = tritongrpc.InferenceServerClient(guarded.grpc)
    refused: list[tuple[str, str]] = []
    deadline = time.monotonic() + 30
    while len(results) < 4:
        try:
            c.infer("spin", [spin_input(1)], headers=AUTH)
        except InferenceServerException as e:
            refused.append((str(e.status()), e.message()))
            if ("UNAVAILABLE" in str(e.status()) and "shutting down" not in e.message()) or "CANCELLED" in str(
                e.status()
            ):
                # not listening any more, or stopping (a call that the server's last second of
                # grace caught is cancelled): only once the requests in flight have finished
                break
        assert time.monotonic() < deadline, f"the requests in flight did not finish: {refused[-3:]}"
        time.sleep(0.01)
    c.close()
    assert refused and all("UNAVAILABLE" in code for code, _ in refused[:-1]), refused
    assert "UNAVAILABLE" in refused[-1][0] or "CANCELLED" in refused[-1][0], refused
    assert any("shutting down" in message for _, message in refused), refused
    for t in threads:
        t.join(60)
    assert results == [[400_000.0]] * 4, results
    assert guarded.wait(60) == 0, guarded.output
    assert not any(alive(pid) for pid in workers), "workers left behind"


# ── TLS, ports, the command line ───────────────────────────────────────────────


@pytest.fixture(scope="module")
def spin_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("grpc-spin"), (), spin=True)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls(spin_repo: Path, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    proc = ServerProcess(
        "--model-repository", str(spin_repo), "--http", "off", "--metrics", "off", "--grpc", "127.0.0.1:0",
        "--grpc-tls-cert", str(cert), "--grpc-tls-key", str(key), "--grace", "1",
    )  # fmt: skip
    try:
        proc.wait_ready()
        assert "(TLS, KServe v2 / Triton)" in proc.output
        c = tritongrpc.InferenceServerClient(proc.grpc, ssl=True, root_certificates=str(cert))
        try:
            assert c.infer("spin", [spin_input(4)]).as_numpy("OUTPUT__0").tolist() == [4.0]
        finally:
            c.close()
        plain = tritongrpc.InferenceServerClient(proc.grpc)  # a plaintext client gets nowhere
        try:
            code, _ = status_of(lambda: plain.is_server_live(client_timeout=5))
            assert code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
        finally:
            plain.close()
        assert proc.stop() == 0, proc.output
    finally:
        proc.kill()


def test_a_taken_grpc_port_exits_1_before_loading(spin_repo: Path) -> None:
    with socket_on_a_port() as port:
        proc = ServerProcess("--model-repository", str(spin_repo), "--http", "off", "--metrics", "off",
                             "--grpc-port", str(port))  # fmt: skip
        try:
            assert proc.wait(60) == 1, proc.output
        finally:
            proc.kill()
    assert f"cannot listen on 127.0.0.1:{port} (--grpc)" in proc.output, proc.output
    assert "loading" not in proc.output.split("cannot listen")[0], proc.output


def test_grpc_alone_serves(spin_repo: Path) -> None:
    proc = ServerProcess("--model-repository", str(spin_repo), "--http", "off", "--metrics", "off", "--grpc", "0")
    try:
        proc.wait_ready()
        c = tritongrpc.InferenceServerClient(proc.grpc)
        try:
            assert c.is_server_ready() and c.infer("spin", [spin_input(2)]).as_numpy("OUTPUT__0").tolist() == [2.0]
        finally:
            c.close()
        assert proc.stop() == 0, proc.output
    finally:
        proc.kill()


class socket_on_a_port:
    """A listening TCP socket on a free loopback port, for the duration of a ``with``."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

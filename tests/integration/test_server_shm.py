"""The system shared-memory and classification extensions, and KIND_MODEL instances, on
the real server (``python -m libtorchrt.pool`` as a subprocess) driven by
tritonclient.http and tritonclient.utils.shared_memory, as a Triton user would."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.http as tritonhttp
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from tests.server_util import ServerProcess, add_model, alive, build_repository, model_workers, request

LIMIT = 1 << 20  # --max-request-bytes

#: KIND_MODEL, two instances: x + y and x - y, without batching
ADDER = """
name: "adder"
platform: "pytorch_libtorch"
max_batch_size: 0
input [ { name: "x" data_type: TYPE_FP32 dims: [ -1 ] }, { name: "y" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "sum" data_type: TYPE_FP32 dims: [ -1 ] }, { name: "diff" data_type: TYPE_FP32 dims: [ -1 ] } ]
instance_group [ { count: 2 kind: KIND_MODEL } ]
"""


class Adder(torch.nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x + y, x - y


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """resnet_classifier (batching, labels), text_normalizer (BYTES), adder (KIND_MODEL)."""
    repo = build_repository(tmp_path_factory.mktemp("shm"), ("resnet_classifier", "text_normalizer"))
    add_model(repo, "adder", ADDER, Adder())
    proc = ServerProcess(
        "--model-repository", str(repo), "--http", "127.0.0.1:0", "--metrics", "off",
        "--max-request-bytes", str(LIMIT), "--grace", "5",
    )  # fmt: skip
    try:
        proc.wait_ready()
        workers = proc.workers()
        assert len(workers) == 5, proc.output  # 2 resnet, 1 text, 2 adder
        yield proc
        # Shutdown with a region still registered: exit 0, the client's object left alone.
        left = shm.create_shared_memory_region("left", f"/libtorchrt-it-{uuid.uuid4().hex[:12]}", 64)
        try:
            c = tritonhttp.InferenceServerClient(proc.http)
            c.register_system_shared_memory("left", left._shm_key, 64)
            c.close()
            assert descriptors(proc.proc.pid, left._shm_key)
            assert proc.stop() == 0, proc.output
            assert (Path("/dev/shm") / left._shm_key.lstrip("/")).exists()
        finally:
            shm.destroy_shared_memory_region(left)
        assert not any(alive(pid) for pid in workers), "workers left behind"
    finally:
        proc.kill()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[Any]:
    c = tritonhttp.InferenceServerClient(server.http, network_timeout=60.0)
    yield c
    c.unregister_system_shared_memory()  # (every test leaves none registered)
    c.close()


@pytest.fixture
def region() -> Iterator[Callable[[str, int], Any]]:
    """Make tritonclient shared-memory regions; destroyed (unlinked) after the test."""
    made: list[Any] = []

    def make(name: str, size: int) -> Any:
        handle = shm.create_shared_memory_region(name, f"/libtorchrt-it-{uuid.uuid4().hex[:12]}", size)
        made.append(handle)
        return handle

    yield make
    for handle in made:
        if handle._shm_key in shm.mapped_shared_memory_regions():
            shm.destroy_shared_memory_region(handle)


def descriptors(pid: int, key: str) -> list[str]:
    """What of the object ``key`` process ``pid`` holds: descriptors and mappings."""
    path = str(Path("/dev/shm") / key.lstrip("/"))
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == path:
                found.append(f"fd {fd}")
        except OSError:
            pass
    with open(f"/proc/{pid}/maps") as f:
        found += [line for line in f if path in line]
    return found


def shared_input(name: str, arr: np.ndarray, region: str, offset: int = 0, datatype: str = "FP32") -> Any:
    i = tritonhttp.InferInput(name, list(arr.shape), datatype)
    nbytes = len(serialize_byte_tensor(arr).item()) if datatype == "BYTES" else arr.nbytes
    i.set_shared_memory(region, nbytes, offset)
    return i


def shared_output(name: str, region: str, size: int, offset: int = 0) -> Any:
    o = tritonhttp.InferRequestedOutput(name)
    o.set_shared_memory(region, size, offset)
    return o


# ── registration ─────────────────────────────────────────────────────────────


def test_register_status_unregister(client: Any, server: ServerProcess, region: Callable[..., Any]) -> None:
    a, b = region("a", 64), region("b", 128)
    client.register_system_shared_memory("a", a._shm_key, 64)
    client.register_system_shared_memory("b", b._shm_key, 32, offset=16)
    assert sorted(client.get_system_shared_memory_status(), key=lambda r: r["name"]) == [
        {"name": "a", "key": a._shm_key, "offset": 0, "byte_size": 64},
        {"name": "b", "key": b._shm_key, "offset": 16, "byte_size": 32},
    ]
    assert client.get_system_shared_memory_status("b") == [
        {"name": "b", "key": b._shm_key, "offset": 16, "byte_size": 32}
    ]
    held = descriptors(server.proc.pid, a._shm_key)
    assert len(held) == 1 and held[0].startswith("fd ")  # a descriptor, never a mapping
    client.unregister_system_shared_memory("a")
    assert descriptors(server.proc.pid, a._shm_key) == []
    assert [r["name"] for r in client.get_system_shared_memory_status()] == ["b"]
    with pytest.raises(InferenceServerException, match="no system shared memory region 'a' is registered"):
        client.get_system_shared_memory_status("a")
    client.unregister_system_shared_memory("a")  # not registered: no error, as in Triton
    client.unregister_system_shared_memory()
    assert client.get_system_shared_memory_status() == []
    assert descriptors(server.proc.pid, b._shm_key) == []
    assert "system_shared_memory" in client.get_server_metadata()["extensions"]


@pytest.mark.parametrize(
    ("key", "offset", "size", "status", "message"),
    [
        ("/libtorchrt-it-missing", 0, 8, 400, "No such file or directory"),
        (None, 60, 8, 400, "offset 60 + byte_size 8 is past the end of"),
        (None, 0, 0, 400, "byte_size must be an integer >= 1"),
        ("/a/b", 0, 8, 400, "is not a POSIX shared memory name"),
    ],
)
def test_bad_registrations_are_refused(
    server: ServerProcess, region: Callable[..., Any], key: str | None, offset: int, size: int, status: int,
    message: str,
) -> None:  # fmt: skip
    real = region("r", 64)
    body = json.dumps({"key": real._shm_key if key is None else key, "offset": offset, "byte_size": size}).encode()
    code, _, data = request(server.http, "POST", "/v2/systemsharedmemory/region/r/register", body)
    assert code == status and message in json.loads(data)["error"], data
    assert request(server.http, "GET", "/v2/systemsharedmemory/status")[2] == b"[]"


def test_a_duplicate_name_is_refused(client: Any, region: Callable[..., Any]) -> None:
    a, b = region("a", 64), region("b", 64)
    client.register_system_shared_memory("r", a._shm_key, 64)
    with pytest.raises(InferenceServerException, match="'r' is already registered; unregister it first"):
        client.register_system_shared_memory("r", b._shm_key, 64)
    assert client.get_system_shared_memory_status("r")[0]["key"] == a._shm_key


def test_cuda_shared_memory_is_refused_clearly(client: Any) -> None:
    assert client.get_cuda_shared_memory_status() == []
    with pytest.raises(InferenceServerException, match="CUDA shared memory regions are not supported"):
        client.register_cuda_shared_memory("g", "aGFuZGxl", 0, 64)
    client.unregister_cuda_shared_memory()


# ── inference ────────────────────────────────────────────────────────────────


def test_inputs_and_outputs_in_shared_memory(client: Any, region: Callable[..., Any]) -> None:
    x, y = np.arange(16, dtype=np.float32), np.full(16, 0.5, dtype=np.float32)
    inp, out = region("in", 128), region("out", 256)
    shm.set_shared_memory_region(inp, [x, y])
    client.register_system_shared_memory("in", inp._shm_key, 128)
    client.register_system_shared_memory("out", out._shm_key, 256)
    result = client.infer(
        "adder",
        [shared_input("x", x, "in"), shared_input("y", y, "in", 64)],
        outputs=[shared_output("sum", "out", 64), shared_output("diff", "out", 64, 128)],
    )
    assert "data" not in result.get_output("sum")  # the data is in the region, not the response
    assert result.get_output("diff") == {
        "name": "diff", "datatype": "FP32", "shape": [16],
        "parameters": {"shared_memory_region": "out", "shared_memory_byte_size": 64, "shared_memory_offset": 128},
    }  # fmt: skip
    np.testing.assert_array_equal(shm.get_contents_as_numpy(out, np.float32, [16]), x + y)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(out, np.float32, [16], offset=128), x - y)


def test_shared_memory_and_body_inputs_mix(client: Any, region: Callable[..., Any]) -> None:
    x, y = np.arange(4, dtype=np.float32), np.array([10, 20, 30, 40], dtype=np.float32)
    inp = region("in", 16)
    shm.set_shared_memory_region(inp, [x])
    client.register_system_shared_memory("in", inp._shm_key, 16)
    body_y = tritonhttp.InferInput("y", [4], "FP32")
    body_y.set_data_from_numpy(y)
    json_y = tritonhttp.InferInput("y", [4], "FP32")
    json_y.set_data_from_numpy(y, binary_data=False)
    for second in (body_y, json_y):
        result = client.infer("adder", [shared_input("x", x, "in"), second])
        np.testing.assert_array_equal(result.as_numpy("sum"), x + y)
        np.testing.assert_array_equal(result.as_numpy("diff"), x - y)


def test_strings_in_shared_memory(client: Any, region: Callable[..., Any]) -> None:
    texts = np.array([b"  Hello, World ", b"TorchScript", b""], dtype=np.object_)
    serialized = serialize_byte_tensor(texts)  # (one object: the 4-byte-length encoding of them all)
    size = len(serialized.item())
    inp, out = region("in", size), region("out", 256)
    shm.set_shared_memory_region(inp, [serialized])
    client.register_system_shared_memory("in", inp._shm_key, size)
    client.register_system_shared_memory("out", out._shm_key, 256)
    result = client.infer(
        "text_normalizer",
        [shared_input("INPUT__0", texts, "in", datatype="BYTES")],
        outputs=[shared_output("OUTPUT__0", "out", 128), shared_output("OUTPUT__1", "out", 128, 128)],
    )
    got = result.get_output("OUTPUT__0")
    assert got["datatype"] == "BYTES" and got["shape"] == [3]
    assert list(shm.get_contents_as_numpy(out, np.object_, [3])) == [b"hello, world", b"torchscript", b""]
    np.testing.assert_array_equal(shm.get_contents_as_numpy(out, np.int64, [3], offset=128), [12, 11, 0])


def _error(server: ServerProcess, doc: dict[str, Any]) -> tuple[int, str]:
    code, _, data = request(server.http, "POST", "/v2/models/adder/infer", json.dumps(doc).encode())
    return code, json.loads(data)["error"] if code != 200 else ""


def _in(name: str, size: int, offset: int = 0, region: str = "r", shape: int = 4) -> dict[str, Any]:
    return {"name": name, "shape": [shape], "datatype": "FP32", "parameters": {
        "shared_memory_region": region, "shared_memory_byte_size": size, "shared_memory_offset": offset}}  # fmt: skip


def _out(name: str, size: int, offset: int = 0) -> dict[str, Any]:
    return {"name": name, "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": size,
                                         "shared_memory_offset": offset}}  # fmt: skip


def test_inference_errors_name_what_is_wrong(client: Any, server: ServerProcess, region: Callable[..., Any]) -> None:
    r = region("r", 64)
    client.register_system_shared_memory("r", r._shm_key, 64)
    y = {"name": "y", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]}
    cases = [
        ({"inputs": [_in("x", 16, region="nope"), y]},
         "input 'x': no system shared memory region 'nope' is registered; register it first"),
        ({"inputs": [_in("x", 16, 56), y]}, "input 'x': offset 56 + byte size 16 is past the end of shared memory "
         "region 'r' (64 bytes)"),
        ({"inputs": [_in("x", 12), y]}, "input 'x': shape [4] of FP32 is 16 bytes, shared_memory_byte_size is 12"),
        ({"inputs": [_in("x", 16), y], "outputs": [_out("sum", 8)]},
         "output 'sum' needs 16 bytes but its shared memory (region 'r') was given 8 (shared_memory_byte_size)"),
        ({"inputs": [_in("x", 16), y], "outputs": [_out("sum", 16, 56)]},
         "output 'sum': offset 56 + byte size 16 is past the end of shared memory region 'r' (64 bytes)"),
    ]  # fmt: skip
    for doc, message in cases:
        assert _error(server, doc) == (400, message)
    big = region("big", LIMIT + 4)
    client.register_system_shared_memory("big", big._shm_key, LIMIT + 4)
    n = (LIMIT + 4) // 4
    code, message = _error(server, {"inputs": [_in("x", n * 4, region="big", shape=n), {**y, "shape": [n],
                                                                                        "data": [0] * n}]})  # fmt: skip
    assert code == 413 and f"its inputs in shared memory are {n * 4} bytes" in message


def test_a_region_its_client_removed_fails_cleanly(
    client: Any, server: ServerProcess, region: Callable[..., Any]
) -> None:
    x = np.arange(4, dtype=np.float32)
    shrunk, removed = region("shrunk", 64), region("removed", 64)
    shm.set_shared_memory_region(shrunk, [x])
    for r in (shrunk, removed):
        client.register_system_shared_memory(r._triton_shm_name, r._shm_key, 64)
    shm.destroy_shared_memory_region(removed)  # the client closes and unlinks it
    os.truncate(Path("/dev/shm") / shrunk._shm_key.lstrip("/"), 8)  # (a mapping of it would SIGBUS the server)
    y = tritonhttp.InferInput("y", [4], "FP32")
    y.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match="'removed' was removed by its client"):
        client.infer("adder", [shared_input("x", x, "removed"), y])
    with pytest.raises(InferenceServerException, match="'shrunk' was shrunk by its client to 8 bytes"):
        client.infer("adder", [shared_input("x", x, "shrunk"), y])
    with pytest.raises(InferenceServerException, match="'shrunk' was shrunk"):
        client.infer("adder", [y, shared_input("x", x, "shrunk")], outputs=[shared_output("sum", "shrunk", 16)])
    ok = tritonhttp.InferInput("x", [4], "FP32")
    ok.set_data_from_numpy(x)
    np.testing.assert_array_equal(client.infer("adder", [ok, y]).as_numpy("sum"), x + x)  # it keeps serving
    assert client.is_server_live()
    client.unregister_system_shared_memory()
    assert descriptors(server.proc.pid, shrunk._shm_key) == []


# ── classification ───────────────────────────────────────────────────────────

LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_classification_of_a_batch_with_labels(client: Any, binary: bool) -> None:
    # resnet_classifier: OUTPUT__0[:, k] = mean of channel k % 3 of the image (labels.txt)
    x = np.zeros((2, 3, 32, 32), dtype=np.float32)
    x[0, 0], x[0, 1], x[0, 2] = 0.25, 0.75, 0.5  # classes 1, 4, 7 score 0.75
    x[1, 2] = 2.0  # classes 2, 5, 8 score 2
    i = tritonhttp.InferInput("INPUT__0", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    out = tritonhttp.InferRequestedOutput("OUTPUT__0", binary_data=binary, class_count=3)
    result = client.infer("resnet_classifier", [i], outputs=[out])
    got = result.as_numpy("OUTPUT__0")
    assert got.shape == (2, 3)
    want = [[f"0.750000:{k}:{LABELS[k]}" for k in (1, 4, 7)], [f"2.000000:{k}:{LABELS[k]}" for k in (2, 5, 8)]]
    assert [[s.decode() if isinstance(s, bytes) else s for s in row] for row in got] == want
    assert result.get_output("OUTPUT__0")["datatype"] == "BYTES"


def test_classification_without_batching_or_labels(client: Any) -> None:
    x, y = np.array([0.5, 3.0, -1.0, 2.0], dtype=np.float32), np.zeros(4, dtype=np.float32)
    inputs = []
    for name, value in (("x", x), ("y", y)):
        i = tritonhttp.InferInput(name, [4], "FP32")
        i.set_data_from_numpy(value)
        inputs.append(i)
    outputs = [tritonhttp.InferRequestedOutput("sum", class_count=2), tritonhttp.InferRequestedOutput("diff")]
    result = client.infer("adder", inputs, outputs=outputs)
    assert list(result.as_numpy("sum")) == [b"3.000000:1", b"2.000000:3"]
    np.testing.assert_array_equal(result.as_numpy("diff"), x)
    many = client.infer("adder", inputs, outputs=[tritonhttp.InferRequestedOutput("sum", class_count=9)])
    assert many.as_numpy("sum").shape == (4,)  # at most the elements there are


def test_classification_of_strings_is_refused(client: Any) -> None:
    i = tritonhttp.InferInput("INPUT__0", [1], "BYTES")
    i.set_data_from_numpy(np.array([b"a"], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="output 'OUTPUT__0' is strings"):
        client.infer("text_normalizer", [i], outputs=[tritonhttp.InferRequestedOutput("OUTPUT__0", class_count=1)])


# ── KIND_MODEL ───────────────────────────────────────────────────────────────


def test_kind_model_instances_serve(client: Any, server: ServerProcess) -> None:
    config = client.get_model_config("adder")
    assert config["instance_group"][0]["kind"] == "KIND_MODEL" and config["instance_group"][0]["count"] == 2
    assert len(model_workers(server.proc.pid, "adder")) == 2
    assert client.is_model_ready("adder")

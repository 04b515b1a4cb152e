"""Which way a server's inference request goes into the pool (``server/serving.py``):
inputs of up to 64 KiB by ``Pool.infer_async`` in the event loop's thread, which takes
the fast lane for a CPU model (the router thread runs no Python for it); bigger ones by
``Pool.submit`` in a worker thread. HTTP through the ASGI application, gRPC through
grpc.aio on a real port with tritonclient, each against a real pool in this process."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tritongrpc

from libtorchrt import ModelConfig, Pool
from libtorchrt.server.grpc_server import GrpcServer
from libtorchrt.server.http import Limits, ServerState, build_app
from libtorchrt.server.security import Address
from tests import models
from tests.integration.test_fast_lane import channel_sends, lane_served
from tests.server_util import IDENTITY_CONFIG, add_model, asgi_call

SMALL = 16  # floats: 64 bytes
BIG = 20_000  # floats: 80,000 bytes, over the 64 KiB the event loop copies itself


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    repo = tmp_path_factory.mktemp("repo")
    add_model(repo, "identity", IDENTITY_CONFIG, models.Identity())
    with Pool(models=[ModelConfig.from_pbtxt(repo / "identity" / "config.pbtxt", repo / "identity")]) as p:
        yield p


def paths(pool: Pool) -> tuple[int, int]:
    """(requests the fast lane served, requests the router sent) for ``identity`` so far."""
    return lane_served(pool, "identity"), channel_sends(pool)


def http_infer(app: Any, values: list[float]) -> list[float]:
    doc = {"inputs": [{"name": "INPUT__0", "shape": [len(values)], "datatype": "FP32", "data": values}]}
    status, _, body = asgi_call(app, "POST", "/v2/models/identity/infer", json.dumps(doc).encode())
    assert status == 200, body
    [output] = json.loads(body)["outputs"]
    assert output["name"] == "OUTPUT__0" and output["shape"] == [len(values)]
    return list(output["data"])


def test_http_small_requests_take_the_fast_lane(pool: Pool) -> None:
    app = build_app(ServerState(pool, Limits()))
    served, sent = paths(pool)
    for k in range(5):
        values = [float(k * SMALL + i) for i in range(SMALL)]
        assert http_infer(app, values) == values
    assert paths(pool) == (served + 5, sent)  # (none by the router)


def test_http_big_requests_go_by_submit(pool: Pool) -> None:
    app = build_app(ServerState(pool, Limits()))
    served, sent = paths(pool)
    values = [float(i % 1000) for i in range(BIG)]
    assert http_infer(app, values) == values
    assert paths(pool) == (served, sent + 1)


@pytest.fixture(scope="module")
def grpc_address(pool: Pool) -> Iterator[str]:
    """A gRPC server for ``pool`` on a loop of its own thread, as the server's serving
    thread has; its address."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-grpc-loop", daemon=True)
    thread.start()
    server = GrpcServer(ServerState(pool, Limits()))
    try:
        port = asyncio.run_coroutine_threadsafe(server.start(Address("127.0.0.1", 0)), loop).result(60)
        yield f"127.0.0.1:{port}"
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(60)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


def grpc_infer(address: str, x: np.ndarray) -> np.ndarray:
    with tritongrpc.InferenceServerClient(address) as client:
        given = tritongrpc.InferInput("INPUT__0", list(x.shape), "FP32")
        given.set_data_from_numpy(x)
        out: np.ndarray = client.infer("identity", [given]).as_numpy("OUTPUT__0")
        return out


def test_grpc_small_requests_take_the_fast_lane(pool: Pool, grpc_address: str) -> None:
    served, sent = paths(pool)
    for k in range(5):
        x = np.arange(k * SMALL, (k + 1) * SMALL, dtype=np.float32)
        np.testing.assert_array_equal(grpc_infer(grpc_address, x), x)
    assert paths(pool) == (served + 5, sent)


def test_grpc_big_requests_go_by_submit(pool: Pool, grpc_address: str) -> None:
    served, sent = paths(pool)
    x = np.arange(BIG, dtype=np.float32)
    np.testing.assert_array_equal(grpc_infer(grpc_address, x), x)
    assert paths(pool) == (served, sent + 1)


def test_an_http_request_the_model_refuses_is_answered_from_the_fast_lane_path(pool: Pool) -> None:
    """Errors of the request itself still answer 400 (infer_async raises them when awaited)."""
    app = build_app(ServerState(pool, Limits()))
    doc = {"inputs": [{"name": "INPUT__0", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    status, _, body = asgi_call(app, "POST", "/v2/models/identity/infer", json.dumps(doc).encode())
    assert status == 400, body
    assert "INPUT__0" in json.loads(body)["error"]
    assert http_infer(app, [1.0, 2.0]) == [1.0, 2.0]  # (it serves on)

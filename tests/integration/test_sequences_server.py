"""Sequences through the server: KServe v2 HTTP parameters (tritonclient.http), the
ZeroMQ Client, and the metrics, against a real ``libtorchrt-pool`` process."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from libtorchrt import SequenceError
from libtorchrt.client import Client
from tests import sequence_models as sm
from tests.conftest import run_threads
from tests.server_util import ServerProcess, add_model, metrics, sample

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

CONFIG = """
name: "acc"
platform: "pytorch_libtorch"
max_batch_size: 4
input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 1 ] } ]
instance_group [ { count: 2 kind: KIND_CPU } ]
sequence_batching {
  max_sequence_idle_microseconds: 10000000
  state [ {
    input_name: "state" output_name: "OUTPUT__1" data_type: TYPE_FP32 dims: [ 1 ]
    initial_state { data_type: TYPE_FP32 dims: [ 1 ] zero_data: true name: "zero" }
  } ]
  oldest { max_candidate_sequences: 4 max_queue_delay_microseconds: 500 }
}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base = tmp_path_factory.mktemp("seqserver")
    repo = base / "repo"
    add_model(repo, "acc", CONFIG, sm.Accumulator())
    endpoint = f"ipc://{base / 'zmq.sock'}"
    proc = ServerProcess(
        "--model-repository", str(repo), "--http", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
        "--grpc", "127.0.0.1:0", "--zmq", endpoint, "--grace", "1",
    )  # fmt: skip
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.kill()


def _http_step(client: object, sid: int | str, value: float, start: bool = False, end: bool = False) -> float:
    inp = httpclient.InferInput("x", [1, 1], "FP32")
    inp.set_data_from_numpy(np.array([[value]], dtype=np.float32))
    result = client.infer("acc", [inp], sequence_id=sid, sequence_start=start, sequence_end=end)  # type: ignore[attr-defined]
    return float(result.as_numpy("OUTPUT__0")[0, 0])


def test_sequences_over_http_from_many_threads(server: ServerProcess) -> None:
    plans = {sid: [float(len(str(sid)) + i)] * 6 for i, sid in enumerate([*range(1, 7), "s-a", "s-b"])}
    got: dict[object, list[float]] = {}
    ids = list(plans)

    def caller(t: int) -> None:
        client = httpclient.InferenceServerClient(server.http)
        try:
            sid = ids[t]
            got[sid] = [
                _http_step(client, sid, v, start=i == 0, end=i == len(plans[sid]) - 1) for i, v in enumerate(plans[sid])
            ]
        finally:
            client.close()

    run_threads(caller, len(ids))
    for sid, values in plans.items():
        assert got[sid] == [values[0] * (i + 1) for i in range(len(values))], sid


def test_http_errors_name_the_sequence(server: ServerProcess) -> None:
    client = httpclient.InferenceServerClient(server.http)
    try:
        with pytest.raises(InferenceServerException, match="not running") as info:
            _http_step(client, 4242, 1.0)
        assert info.value.status() == "400"
        with pytest.raises(InferenceServerException, match="sequence_id") as info:
            inp = httpclient.InferInput("x", [1, 1], "FP32")
            inp.set_data_from_numpy(np.array([[1.0]], dtype=np.float32))
            client.infer("acc", [inp])
        assert info.value.status() == "400"
    finally:
        client.close()


def test_sequences_through_the_client_and_the_metrics(server: ServerProcess) -> None:
    with Client(server.zmq) as client:
        x = torch.tensor([[3.0]])
        assert float(client.infer("acc", x, sequence_id="c", sequence_start=True)["OUTPUT__0"]) == 3.0
        assert float(client.infer("acc", x, sequence_id="c")["OUTPUT__0"]) == 6.0
        with pytest.raises(SequenceError) as info:
            client.infer("acc", x, sequence_id="never")
        assert info.value.sequence_id == "never"
        assert float(client.infer("acc", x, sequence_id="c", sequence_end=True)["OUTPUT__0"]) == 9.0
    values = metrics(server.metrics)
    assert sample(values, "libtorchrt_sequences", model="acc", version="1", state="active") == 0
    assert sample(values, "libtorchrt_sequences_ended_total", model="acc", version="1", how="ended") >= 1
    assert sample(values, "libtorchrt_sequences", model="acc", version="1", state="backlog") == 0


def test_sequences_over_grpc_sync_and_asyncio(server: ServerProcess) -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc")
    grpc_aio = pytest.importorskip("tritonclient.grpc.aio")

    def inp(value: float) -> Any:
        x = grpcclient.InferInput("x", [1, 1], "FP32")
        x.set_data_from_numpy(np.array([[value]], dtype=np.float32))
        return x

    client = grpcclient.InferenceServerClient(server.grpc)
    try:
        outs = [
            float(
                client.infer("acc", [inp(2.0)], sequence_id="g", sequence_start=i == 0, sequence_end=i == 2).as_numpy(
                    "OUTPUT__0"
                )[0, 0]
            )
            for i in range(3)
        ]
        assert outs == [2.0, 4.0, 6.0]
        with pytest.raises(InferenceServerException, match="not running") as info:
            client.infer("acc", [inp(1.0)], sequence_id=31337)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    finally:
        client.close()

    async def main() -> list[float]:
        aclient = grpc_aio.InferenceServerClient(server.grpc)
        try:

            async def one(sid: int) -> float:
                out = 0.0
                for i in range(4):
                    r = await aclient.infer(
                        "acc", [inp(float(sid))], sequence_id=sid, sequence_start=i == 0, sequence_end=i == 3
                    )
                    out = float(r.as_numpy("OUTPUT__0")[0, 0])
                return out

            return list(await asyncio.gather(*(one(sid) for sid in range(100, 106))))
        finally:
            await aclient.close()

    assert asyncio.run(main()) == [4.0 * sid for sid in range(100, 106)]

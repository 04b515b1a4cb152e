"""libtorchrt.bench's own KServe v2 HTTP client (``remote.HttpServer``) against a stub
server in a thread of this process: the binary request and answer, keep-alive
connections reused, a connection the server closed while idle replaced without
counting an error, and error statuses counted as ``HTTP <status>``; how gRPC endpoints
are read, and their errors named. The real server is driven in
tests/integration/test_bench_endpoint.py."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
import torch

from libtorchrt.bench.endpoint import Endpoint, parse_endpoint
from libtorchrt.bench.loadgen import error_name
from libtorchrt.bench.remote import GrpcError, GrpcServer, HttpError, HttpServer
from libtorchrt.bench.serving import InputFeed
from libtorchrt.bench.source import SourceError


class Stub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[dict[str, Any]] = []
        self.connections = 0
        self.status = 200
        self.close_after_answer = False  # close the connection without saying so


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Stub

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        n = int(self.headers["Inference-Header-Content-Length"])
        doc = json.loads(body[:n])
        (entry,) = doc["inputs"]
        x = np.frombuffer(body[n:], dtype=np.float32).reshape(entry["shape"])
        self.server.requests.append({"path": self.path, "doc": doc, "x": x})
        if self.server.status != 200:
            answer = json.dumps({"error": "model 'm' is unavailable"}).encode()
            self.send_response(self.server.status)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)
            return
        out = (x * 2).astype(np.float32).tobytes()
        header = json.dumps(
            {"outputs": [{"name": "OUTPUT__0", "datatype": "FP32", "shape": entry["shape"],
                          "parameters": {"binary_data_size": len(out)}}]}
        ).encode()  # fmt: skip
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Inference-Header-Content-Length", str(len(header)))
        self.send_header("Content-Length", str(len(header) + len(out)))
        self.end_headers()
        self.wfile.write(header + out)
        if self.server.close_after_answer:
            self.close_connection = True


@pytest.fixture
def stub() -> Iterator[Stub]:
    server = Stub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(10)


def client(stub: Stub) -> HttpServer:
    host, port = stub.server_address[:2]
    return HttpServer(parse_endpoint(f"http://{host}:{port}"), "m", request_timeout=10.0)


def feed() -> InputFeed:
    return InputFeed([{"INPUT__0": torch.full((2, 3), float(i))} for i in range(3)])


def test_binary_requests_on_one_kept_alive_connection(stub: Stub) -> None:
    with client(stub) as server:
        call = server.caller(feed())
        for _ in range(4):
            call()
    assert stub.connections == 1
    assert [r["path"] for r in stub.requests] == ["/v2/models/m/infer"] * 4
    doc = stub.requests[0]["doc"]
    assert doc["inputs"] == [
        {"name": "INPUT__0", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": 24}}
    ]
    assert doc["parameters"] == {"binary_data_output": True, "timeout": 10_000_000}
    # each request takes the next input set
    assert [float(r["x"][0, 0]) for r in stub.requests] == [0.0, 1.0, 2.0, 0.0]


def test_a_connection_closed_while_idle_is_replaced_without_an_error(stub: Stub) -> None:
    stub.close_after_answer = True
    with client(stub) as server:
        call = server.caller(feed())
        for _ in range(3):
            call()  # the 2nd and 3rd find their connection closed: sent again on a new one
    assert len(stub.requests) == 3
    assert stub.connections == 3


def test_an_error_status_is_counted_by_status(stub: Stub) -> None:
    stub.status = 503
    with client(stub) as server:
        call = server.caller(feed())
        with pytest.raises(HttpError, match="HTTP 503: model 'm' is unavailable") as info:
            call()
        assert error_name(info.value) == "HTTP 503"
        stub.status = 200
        call()  # the connection was kept: the error answer was read whole
    assert stub.connections == 1


@pytest.mark.parametrize(
    "url, endpoint, address",
    [
        ("grpc://127.0.0.1:8001", Endpoint("grpc://127.0.0.1:8001", "grpc", "127.0.0.1", 8001), "127.0.0.1:8001"),
        ("GRPC://host", Endpoint("grpc://host:8001", "grpc", "host", 8001), "host:8001"),  # Triton's port
        ("grpcs://[::1]:9000/", Endpoint("grpcs://[::1]:9000", "grpc", "::1", 9000, tls=True), "[::1]:9000"),
    ],
)
def test_grpc_endpoints(url: str, endpoint: Endpoint, address: str) -> None:
    assert parse_endpoint(url) == endpoint
    assert endpoint.address == address


@pytest.mark.parametrize(
    "url, words",
    [
        ("grpc://127.0.0.1:8001/v2", "without a path"),
        ("grpc://127.0.0.1:99999", "the port is not a number"),
        ("grpc://:8001", "expected http://HOST:PORT (KServe v2 over HTTP), grpc://HOST:PORT"),
    ],
)
def test_grpc_endpoint_mistakes(url: str, words: str) -> None:
    with pytest.raises(SourceError, match="--endpoint") as info:
        parse_endpoint(url)
    assert words in str(info.value)


def test_grpc_needs_tritonclient(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tritonclient.grpc", None)  # import fails
    with pytest.raises(SourceError, match=r"needs tritonclient: pip install 'tritonclient\[grpc\]'"):
        GrpcServer(parse_endpoint("grpc://127.0.0.1:8001"), "m", request_timeout=1.0)


def test_grpc_errors_are_counted_by_status() -> None:
    exc = GrpcError("UNAVAILABLE", "the server is shutting down")
    assert error_name(exc) == "gRPC UNAVAILABLE" and str(exc) == "gRPC UNAVAILABLE: the server is shutting down"

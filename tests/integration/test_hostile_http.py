"""Hostile input over HTTP, against one real ``python -m libtorchrt.pool``.

Every attack gets a clear 4xx (or a bounded 5xx) and leaves the server whole: after
each one a normal inference request is answered correctly, and at the end the
server's descriptors and memory are back near where they started and stopping it
leaves no child. The server runs with small limits so that the attacks are cheap:
``--max-inflight 2``, ``--max-request-bytes 1MiB``, ``--body-timeout 5``,
``--max-json-response-bytes 64k``. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import ctypes
import gzip
import http.client
import json
import os
import select
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import pytest
import torch

from libtorchrt.errors import PoolClosedError
from libtorchrt.server.http import Limits, ServerState, build_app
from tests.server_util import SPIN_CONFIG, ServerProcess, alive, asgi_call, build_repository
from tests.server_util import request as http_request

LIMIT = 1 << 20  # --max-request-bytes
MAX_INFLIGHT = 2
BODY_TIMEOUT = 5.0
MAX_JSON = 64 << 10
MiB = 1 << 20


def spin(value: float = 10.0, **parameters: Any) -> dict[str, Any]:
    """A request for the spin model, busy about ``value`` times 1.6 µs; it answers ``[value]``."""
    doc: dict[str, Any] = {"inputs": [{"name": "INPUT__0", "shape": [1], "datatype": "FP32", "data": [value]}]}
    if parameters:
        doc["parameters"] = parameters
    return doc


SPIN = json.dumps(spin()).encode()
INFER = "/v2/models/spin/infer"


# ── the server ─────────────────────────────────────────────────────────────────


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
    """spin (one instance) and text_normalizer, with small limits; on teardown, its
    descriptors and memory are back near their baseline, and it stops leaving no child."""
    repo = build_repository(tmp_path_factory.mktemp("hostile"), ("text_normalizer",), spin=True)
    (repo / "spin" / "config.pbtxt").write_text(SPIN_CONFIG.replace("count: 2", "count: 1"))
    proc = ServerProcess(
        "--model-repository", str(repo), "--http", "127.0.0.1:0", "--metrics", "off",
        "--max-request-bytes", str(LIMIT), "--max-inflight", str(MAX_INFLIGHT),
        "--body-timeout", str(BODY_TIMEOUT), "--max-json-response-bytes", str(MAX_JSON), "--grace", "10",
    )  # fmt: skip
    try:
        proc.wait_ready()
        workers = proc.workers()
        assert len(workers) == 2, proc.output
        pid = proc.proc.pid
        # warm every path once (JSON, binary, gzip, an error) before the baseline
        assert_serves(proc)
        assert request(proc, "POST", INFER, gzip.compress(SPIN), {"Content-Encoding": "gzip"})[0] == 200
        assert request(proc, "POST", INFER, b"{")[0] == 400
        assert request(proc, "POST", "/v2/models/text_normalizer/infer", *_strings(["A "], binary=True))[0] == 200
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


def request(
    server: ServerProcess, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    return http_request(server.http, method, path, body, headers)


def raw(server: ServerProcess, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` (a request, as bytes) on a new connection; the answer."""
    host, port = server.http.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(data)
        return _answer(s)


def _answer(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    r = http.client.HTTPResponse(s)
    r.begin()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()


def _head(length: int, path: str = INFER, extra: str = "") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n{extra}\r\n".encode()


def assert_serves(server: ServerProcess, value: float = 10.0) -> None:
    """A normal inference request is answered correctly."""
    status, _, body = request(server, "POST", INFER, json.dumps(spin(value)).encode())
    assert status == 200, body
    assert json.loads(body)["outputs"][0]["data"] == [value]


@pytest.fixture(autouse=True)
def still_serves(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each attack, the server answers a normal request correctly."""
    yield
    if "server" in request.fixturenames:
        assert_serves(request.getfixturevalue("server"))


def _strings(items: list[str], binary: bool, **parameters: Any) -> tuple[bytes, dict[str, str]]:
    """A text_normalizer request body (binary BYTES input) and its headers."""
    blob = b"".join(len(s.encode()).to_bytes(4, "little") + s.encode() for s in items)
    doc: dict[str, Any] = {
        "inputs": [{"name": "INPUT__0", "shape": [len(items)], "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(blob)}}],
        "parameters": {"binary_data_output": binary, **parameters},
    }  # fmt: skip
    header = json.dumps(doc).encode()
    return header + blob, {"Inference-Header-Content-Length": str(len(header))}


# ── attacks answered by one request ────────────────────────────────────────────


def _x(**fields: Any) -> bytes:
    return json.dumps({"inputs": [{"name": "INPUT__0", "shape": [1], "datatype": "FP32", **fields}]}).encode()


def _binary(doc: bytes, data: bytes, length: int | None = None) -> tuple[bytes, dict[str, str]]:
    return doc + data, {"Inference-Header-Content-Length": str(len(doc) if length is None else length)}


GZIP = gzip.compress(SPIN)
DEFLATE = zlib.compress(SPIN)
NESTED = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
DEEP_DATA = (
    b'{"inputs": [{"name": "INPUT__0", "shape": [1], "datatype": "FP32", "data": ' + b"[" * 500 + b"1" + b"]" * 500
)
DEEP_DATA += b"}]}"

#: (id, path, body, headers, status, what the error says; None: not our JSON error)
ATTACKS: list[tuple[str, str, bytes, dict[str, str], int, str | None]] = [
    # the far deadline and bad timeouts (1)
    ("timeout-string", INFER, json.dumps(spin(timeout="abc")).encode(), {}, 400,
     "parameter 'timeout' must be a number of microseconds >= 0, got 'abc'"),
    ("timeout-negative", INFER, json.dumps(spin(timeout=-1)).encode(), {}, 400, "parameter 'timeout' must be"),
    ("timeout-bool", INFER, json.dumps(spin(timeout=True)).encode(), {}, 400, "parameter 'timeout' must be"),
    ("timeout-nan", INFER, json.dumps(spin(timeout=float("nan"))).encode(), {}, 400, "parameter 'timeout' must be"),
    ("priority-huge", INFER, json.dumps(spin(priority=2**70)).encode(), {}, 400, "priority"),
    # numbers that str.isdigit() takes and int() does not, or reads as another number (7)
    ("header-length-superscript", INFER, SPIN, {"Inference-Header-Content-Length": "\u00b2"}, 400,
     "Inference-Header-Content-Length '²' is not a number"),
    # h11 refuses it; no body: uvicorn closes at once, and body bytes left unread in its
    # socket would turn that close into a reset that can reach the client before the 400
    ("content-length-superscript", INFER, b"", {"Content-Length": "\u00b2"}, 400, None),
    ("version-arabic-digit", "/v2/models/spin/versions/%D9%A1/infer", SPIN, {}, 400, "is not a number"),
    ("version-superscript", "/v2/models/spin/versions/%C2%B2/infer", SPIN, {}, 400, "is not a number"),
    ("version-huge", "/v2/models/spin/versions/" + "9" * 5000 + "/infer", SPIN, {}, 400, "is not a number"),
    ("empty-shape-huge-dim", INFER, _x(shape=[0, 2**62], data=[]), {}, 400, "is too large"),
    ("shape-past-int64", INFER, _x(shape=[0, 2**64], data=[]), {}, 400, "is too large"),
    ("json-nested-100k-deep", INFER, NESTED, {}, 400, "nested too deeply"),
    ("data-nested-500-deep", INFER, DEEP_DATA, {}, 400, "nested deeper than numpy"),
    # compressed bodies: one whole stream, nothing after it (8)
    ("gzip-truncated-trailer", INFER, GZIP[:-4], {"Content-Encoding": "gzip"}, 400, "truncated"),
    ("gzip-truncated-half", INFER, GZIP[: len(GZIP) // 2], {"Content-Encoding": "gzip"}, 400, "truncated"),
    ("gzip-two-members", INFER, GZIP + gzip.compress(b" "), {"Content-Encoding": "gzip"}, 400,
     "after the end of its compressed stream"),
    ("gzip-trailing-garbage", INFER, GZIP + b"garbage", {"Content-Encoding": "gzip"}, 400, "7 bytes after the end"),
    ("deflate-trailing-garbage", INFER, DEFLATE + b"xx", {"Content-Encoding": "deflate"}, 400, "2 bytes after"),
    ("deflate-truncated", INFER, DEFLATE[:-2], {"Content-Encoding": "deflate"}, 400, "truncated"),
    ("gzip-not-gzip", INFER, SPIN, {"Content-Encoding": "gzip"}, 400, "does not decompress"),
    ("gzip-bomb", INFER, gzip.compress(bytes(LIMIT * 8)), {"Content-Encoding": "gzip"}, 413, "once decompressed"),
    ("content-encoding-br", INFER, SPIN, {"Content-Encoding": "br"}, 415, "not supported"),
    ("bytes-lone-surrogate", "/v2/models/text_normalizer/infer",
     b'{"inputs": [{"name": "INPUT__0", "shape": [1], "datatype": "BYTES", "data": ["\\udc80"]}]}', {}, 400,
     "lone surrogate"),
    # outputs: asked for twice (each copy would be encoded again)
    ("output-twice", INFER, json.dumps({**spin(), "outputs": [{"name": "OUTPUT__0"}] * 2}).encode(), {}, 400,
     "asked for twice"),
    # what passed before, kept passing
    ("malformed-json", INFER, b'{"inputs": [', {}, 400, "not valid JSON"),
    ("not-an-object", INFER, b"[1]", {}, 400, "must be a JSON object"),
    ("unknown-model", "/v2/models/nope/infer", SPIN, {}, 404, "unknown model 'nope'"),
    ("unknown-version", "/v2/models/spin/versions/7/infer", SPIN, {}, 404, "has no version 7"),
    ("wrong-datatype", INFER, _x(datatype="INT64", data=[1]), {}, 400, "expected datatype FP32, got INT64"),
    ("wrong-shape", INFER, _x(shape=[2], data=[1, 2]), {}, 400, "expected shape [1]"),
    ("data-and-shape-differ", INFER, _x(data=[1, 2, 3]), {}, 400, "holds 1 elements, 'data' has 3"),
    ("negative-dim", INFER, _x(shape=[-1], data=[1]), {}, 400, "integer >= 0"),
    ("binary-size-differs", INFER, *_binary(_x(parameters={"binary_data_size": 16}), bytes(16)), 400,
     "is 4 bytes, binary_data_size is 16"),
    ("binary-past-the-end", INFER, *_binary(_x(parameters={"binary_data_size": 1 << 40}), bytes(4)), 400,
     "only 4 bytes"),
    ("header-longer-than-body", INFER, b"{}", {"Inference-Header-Content-Length": "99"}, 400,
     "Inference-Header-Content-Length is 99"),
    ("bytes-element-past-the-end", "/v2/models/text_normalizer/infer",
     *_binary(json.dumps({"inputs": [{"name": "INPUT__0", "shape": [1], "datatype": "BYTES",
              "parameters": {"binary_data_size": 6}}]}).encode(), (1 << 31).to_bytes(4, "little") + b"ab"),
     400, "runs past the end"),
    ("sequence", INFER, json.dumps(spin(sequence_id=3)).encode(), {}, 400, "no sequence_batching"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "headers", "status", "message"), [a[1:] for a in ATTACKS],
                         ids=[a[0] for a in ATTACKS])  # fmt: skip
def test_an_attack_gets_a_clear_answer(
    server: ServerProcess, path: str, body: bytes, headers: dict[str, str], status: int, message: str | None
) -> None:
    code, got, data = request(server, "POST", path, body, headers)
    assert code == status, data[:500]
    if message is not None:
        assert got["content-type"] == "application/json"
        error = json.loads(data)["error"]
        assert message in error, error
        assert len(error) < 1000, "the error echoes the request back"


def test_version_paths_of_other_endpoints(server: ServerProcess) -> None:
    for path in ("/v2/models/spin/versions/%D9%A1", "/v2/models/spin/versions/%D9%A1/ready",
                 "/v2/models/spin/versions/%C2%B2/config", "/v2/models/spin/versions/%C2%B2/stats"):  # fmt: skip
        status, _, data = request(server, "GET", path)
        assert status == 400, (path, data)
    assert request(server, "GET", "/v2/models/spin/versions/1")[0] == 200


def test_oversize_bodies_are_refused_and_closed(server: ServerProcess) -> None:
    # Content-Length over the limit: refused on the headers, the body never sent
    status, headers, data = raw(server, _head(99_999_999_999))
    assert status == 413 and "--max-request-bytes" in json.loads(data)["error"]
    assert headers["connection"] == "close"
    # a chunked body that grows past the limit
    host, port = server.http.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", INFER, body=(bytes(64 << 10) for _ in range(LIMIT // (64 << 10) + 8)),
                     encode_chunked=True)  # fmt: skip
        r = conn.getresponse()
        assert r.status == 413 and "larger than" in json.loads(r.read())["error"]
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed while the rest was still being sent
    finally:
        conn.close()


# ── far deadlines (1) ──────────────────────────────────────────────────────────


def test_a_far_deadline_is_capped_and_the_pool_lives_on(server: ServerProcess) -> None:
    # 3e12 µs is 35 days: as a poll wait in ms it overflowed a C int, and the router
    # thread (and the whole pool with it) died, then or some seconds later
    infinity = json.dumps(spin(9)).encode().replace(b'"inputs"', b'"parameters": {"timeout": Infinity}, "inputs"')
    far = [json.dumps(spin(7, timeout=3_000_000_000_000)).encode(), json.dumps(spin(8, timeout=10**30)).encode(),
           infinity]  # fmt: skip
    for body in far:
        status, _, data = request(server, "POST", INFER, body)
        assert status == 200, data
    assert [json.loads(request(server, "POST", INFER, b)[2])["outputs"][0]["data"] for b in far] == [[7], [8], [9]]
    # some seconds on, the pool still serves (each request below keeps spin busy ~0.25 s)
    end = time.monotonic() + 3.0
    while time.monotonic() < end:
        assert request(server, "GET", "/v2/health/live")[0] == 200
        assert request(server, "GET", "/v2/health/ready")[0] == 200
        assert_serves(server, 150_000)


# ── slow bodies (3) ────────────────────────────────────────────────────────────


def _connect(server: ServerProcess) -> socket.socket:
    host, port = server.http.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=30)


def _read_until_blank_line(s: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n\r\n"):
        byte = s.recv(1)  # (the socket's timeout bounds the wait)
        assert byte, f"connection closed after {data!r}"
        data += byte
    return data


def test_slow_bodies_hold_no_slot_and_time_out(server: ServerProcess) -> None:
    slow: list[socket.socket] = []

    def slow_client() -> None:
        s = _connect(server)
        slow.append(s)
        s.sendall(_head(10_000, extra="Expect: 100-continue\r\n"))  # a body that will not come in time
        # uvicorn answers "100 Continue" when the handler first asks for the body:
        # the request is in the handler, waiting for its body
        assert _read_until_blank_line(s).startswith(b"HTTP/1.1 100 "), "a slow client was refused"

    try:
        for _ in range(MAX_INFLIGHT):  # as many slow clients as there are slots
            slow_client()
        started = time.monotonic()
        for _ in range(3):  # every slot is free for complete requests meanwhile
            assert_serves(server)
        slow_client()  # and more slow clients than slots are not refused either
        # a byte every 0.2 s keeps each body coming, too slowly: --body-timeout ends it
        answers: dict[socket.socket, tuple[int, dict[str, str], bytes]] = {}
        while len(answers) < len(slow):
            assert time.monotonic() < started + BODY_TIMEOUT + 30, "slow bodies were never timed out"
            waiting = [s for s in slow if s not in answers]
            readable, _, _ = select.select(waiting, [], [], 0.2)
            for s in readable:
                answers[s] = _answer(s)
            for s in waiting:
                if s not in readable:
                    s.send(b" ")
        assert time.monotonic() - started >= BODY_TIMEOUT - 1.0
        for s, (status, headers, data) in answers.items():
            assert status == 408, data
            assert "--body-timeout" in json.loads(data)["error"] and headers["connection"] == "close"
            try:
                assert s.recv(1) == b"", "the connection was left open"
            except ConnectionResetError:
                pass  # closed with body bytes it never read still queued: the kernel resets
    finally:
        for s in slow:
            s.close()


def test_bodies_being_received_are_bounded_together(server: ServerProcess) -> None:
    # --max-inflight times --max-request-bytes (2 MiB) of bodies may be in the air at once:
    # three bodies of 0.9 MiB, each but its last byte sent, make one too many
    body = SPIN + b" " * (int(0.9 * MiB) - len(SPIN))  # (JSON may end with spaces)
    conns = [_connect(server) for _ in range(3)]
    try:
        for s in conns:
            s.sendall(_head(len(body)) + body[:-1])
        deadline = time.monotonic() + BODY_TIMEOUT - 1
        refused: list[socket.socket] = []
        while not refused:
            left = deadline - time.monotonic()
            assert left > 0, "all three bodies were taken in"
            refused, _, _ = select.select(conns, [], [], left)
        assert len(refused) == 1
        status, headers, data = _answer(refused[0])
        assert status == 503 and headers["retry-after"] == "1" and headers["connection"] == "close", data
        assert "--max-inflight times --max-request-bytes" in json.loads(data)["error"]
        for s in conns:
            if s is not refused[0]:  # the others are served once their last byte comes
                s.sendall(body[-1:])
                status, _, data = _answer(s)
                assert status == 200 and json.loads(data)["outputs"][0]["data"] == [10.0], data
    finally:
        for s in conns:
            s.close()


# ── large JSON responses (6) ───────────────────────────────────────────────────


def test_large_json_outputs_are_refused_binary_ones_are_served(server: ServerProcess) -> None:
    items = [f"W{i % 10}" for i in range(12_000)]  # lengths: 12,000 INT64 = 96,000 bytes > 64 KiB
    path = "/v2/models/text_normalizer/infer"
    status, _, data = request(server, "POST", path, *_strings(items, binary=False))
    assert status == 400, data
    error = json.loads(data)["error"]
    assert "--max-json-response-bytes" in error and '"binary_data": true' in error, error
    assert "OUTPUT__1" in error and str(MAX_JSON) in error
    status, headers, data = request(server, "POST", path, *_strings(items, binary=True))
    assert status == 200 and headers["content-type"] == "application/octet-stream"
    length = int(headers["inference-header-content-length"])
    outputs = {o["name"]: o for o in json.loads(data[:length])["outputs"]}
    assert outputs["OUTPUT__1"]["parameters"]["binary_data_size"] == 8 * len(items)
    assert len(data) == length + sum(o["parameters"]["binary_data_size"] for o in outputs.values())
    # outputs that fit are still JSON
    status, _, data = request(server, "POST", path, *_strings(items[:10], binary=False))
    assert status == 200 and json.loads(data)["outputs"][0]["data"] == [s.lower() for s in items[:10]]


# ── liveness once the pool has failed (1) ──────────────────────────────────────


class _RouterBug(BaseException):
    """Raised inside the router thread to stand for a bug there (a BaseException, so
    that no ``except Exception`` on the way can swallow it)."""


def _get(app: Callable[..., Any], path: str) -> tuple[int, bytes]:
    """GET ``path`` from the ASGI ``app`` directly."""
    status, _, data = asgi_call(app, "GET", path)
    return status, data


def test_live_answers_503_once_the_pool_has_failed(make_pool: Callable[..., Any]) -> None:
    before = {t.ident for t in threading.enumerate()}
    pool = make_pool("spin")
    app = build_app(ServerState(pool, Limits()))
    assert _get(app, "/v2/health/live")[0] == 200
    assert _get(app, "/v2/health/ready")[0] == 200
    (router,) = [t for t in threading.enumerate() if t.name == "libtorchrt-router" and t.ident not in before]
    # A real failure of the real router thread: an exception raised in it, as a bug would.
    assert router.ident is not None
    assert ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(router.ident), ctypes.py_object(_RouterBug)) == 1
    future: Future[Any] | None = None
    try:
        future = pool.submit("spin", {"x": torch.tensor([1.0])})  # wakes the router
    except PoolClosedError:
        pass
    if future is not None:
        with pytest.raises(PoolClosedError):
            future.result(30)
    router.join(30)
    assert not router.is_alive() and isinstance(pool.failure, _RouterBug)
    status, body = _get(app, "/v2/health/live")
    assert status == 503 and "_RouterBug" in json.loads(body)["error"]
    assert _get(app, "/v2/health/ready")[0] == 400


def test_slow_headers_cost_a_descriptor_not_a_slot(server: ServerProcess) -> None:
    # (uvicorn has no timeout for a request's headers; see docs/server.md) They take no slot:
    with _connect(server) as a, _connect(server) as b, _connect(server) as c:
        for s in (a, b, c):
            s.sendall(b"POST /v2/models/spin/infer HTTP/1.1\r\nHost: x\r\n")
        for _ in range(MAX_INFLIGHT + 1):
            assert_serves(server)

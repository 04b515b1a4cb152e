"""``python -m libtorchrt.bench --endpoint URL`` against a real ``libtorchrt-pool`` process:
the bench runs as a subprocess over HTTP (its own client, and tritonclient), over gRPC
(tritonclient.grpc; TLS and a token too) and over ZeroMQ (``libtorchrt.Client``); its
JSON must hold sane figures, and the server's own statistics must have counted the
requests. A URL that answers nothing, an unknown model and options that only shape pools
the tool starts are usage errors (exit 2)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from libtorchrt.bench import cli
from tests.server_util import ServerProcess, alive, build_repository, request

ROOT = Path(__file__).resolve().parents[2]
MODEL = "resnet_classifier"  # FP32 [3, 32, 32], max_batch_size 32, two instances
HAS_TRITONCLIENT = importlib.util.find_spec("tritonclient") is not None
HAS_TRITONCLIENT_GRPC = HAS_TRITONCLIENT and importlib.util.find_spec("tritonclient.grpc") is not None
needs_grpc_client = pytest.mark.skipif(not HAS_TRITONCLIENT_GRPC, reason="tritonclient[grpc] is a dev dependency")
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
#: a short measurement: two windows of 0.3 s after a 0.1 s warm-up
SHORT = ("--window", "0.3", "--max-windows", "2", "--warmup", "0.1", "--no-progress")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = build_repository(tmp_path_factory.mktemp("bench-endpoint"), names=(MODEL,))
    proc = ServerProcess(
        "--model-repository", str(repo), "--http", "127.0.0.1:0", "--zmq", "tcp://127.0.0.1:0",
        "--grpc", "127.0.0.1:0", "--metrics", "off",
    )  # fmt: skip
    try:
        proc.wait_ready()
        assert proc.http and proc.zmq and proc.grpc, proc.output
        workers = proc.workers()
        yield proc
        assert proc.stop() == 0, proc.output
        assert not any(alive(pid) for pid in workers), "workers left behind"
    finally:
        proc.kill()


def bench(*args: str, timeout: float = 60.0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "libtorchrt.bench", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def served(server: ServerProcess) -> tuple[int, int]:
    """The server's own count of successful and failed requests of the model."""
    status, _, body = request(server.http, "GET", f"/v2/models/{MODEL}/stats")
    assert status == 200, body
    stats = json.loads(body)["model_stats"][0]["inference_stats"]
    return stats["success"]["count"], stats["fail"]["count"]


def check_rows(doc: dict[str, Any], mode: str, points: set[tuple[int, int]]) -> int:
    """Every row measured, without errors, with sane figures; returns the requests."""
    rows = doc["rows"]
    assert {(r["concurrency"], r["batch_size"]) for r in rows} == points
    for r in rows:
        assert r["mode"] == mode and r["instances"] == 2  # the server's instance count
        assert r["status"] == "ok" and r["error"] is None, r
        assert r["requests"] > 0 and r["error_count"] == 0 and r["errors"] == {}, r
        assert r["infer_per_s"] == pytest.approx(r["batch_size"] * r["req_per_s"]) and r["infer_per_s"] > 0
        lat = r["latency_us"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p99"] <= lat["max"] < 10e6
    assert doc["complete"] is True and doc["exit_status"] == 0
    assert doc["settings"]["modes"] == [mode]
    return sum(r["requests"] for r in rows)


def test_http_endpoint_measures_the_server(server: ServerProcess, tmp_path: Path) -> None:
    before = served(server)
    out = tmp_path / "http.json"
    extra = ["--plot", str(tmp_path / "http.png"), "--latency-budget", "1s"] if HAS_MATPLOTLIB else []
    proc = bench(
        "--endpoint", f"http://{server.http}", MODEL, "--concurrency", "1,2", "--batch-size", "1,2",
        *SHORT, "--json", str(out), "--csv", str(tmp_path / "http.csv"), *extra,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"libtorchrt-pool at http://{server.http} (KServe v2 over HTTP), model {MODEL}" in proc.stdout
    doc = json.loads(out.read_text())
    requests = check_rows(doc, "http", {(1, 1), (2, 1), (1, 2), (2, 2)})
    assert doc["model"]["endpoint"] == f"http://{server.http}" and doc["model"]["max_batch_size"] == 32
    assert [i["shape"] for i in doc["model"]["inputs"]] == [[1, 3, 32, 32], [2, 3, 32, 32]]  # from the metadata
    assert doc["settings"]["input_sets"] == {"1": 8, "2": 8}
    after = served(server)
    assert after[0] - before[0] >= requests  # the server answered them (and the warm-ups)
    assert after[1] == before[1]
    assert len((tmp_path / "http.csv").read_text().splitlines()) == 5
    if HAS_MATPLOTLIB:
        assert (tmp_path / "http.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_zmq_endpoint_measures_the_server(server: ServerProcess, tmp_path: Path) -> None:
    before = served(server)
    out = tmp_path / "zmq.json"
    proc = bench(
        "--endpoint", server.zmq, "--model", MODEL, "--metadata", f"http://{server.http}",
        "--concurrency", "1,2", *SHORT, "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"libtorchrt-pool at {server.zmq} (libtorchrt.Client" in proc.stdout
    doc = json.loads(out.read_text())
    requests = check_rows(doc, "zmq", {(1, 1), (2, 1)})
    assert [i["shape"] for i in doc["model"]["inputs"]] == [[1, 3, 32, 32]]
    after = served(server)
    assert after[0] - before[0] >= requests and after[1] == before[1]


def test_zmq_endpoint_takes_the_inputs_from_the_command_line(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "zmq.json"
    proc = bench(
        "--endpoint", server.zmq, MODEL, "--input-shape", "INPUT__0=3,3,32,32",
        "--concurrency", "2", "--requests", "40", "--warmup", "0.1", "--no-progress", "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    (r,) = doc["rows"]
    assert r["status"] == "ok" and r["requests"] == 40 and r["error_count"] == 0
    assert [i["shape"] for i in doc["model"]["inputs"]] == [[3, 3, 32, 32]]


@pytest.mark.skipif(not HAS_TRITONCLIENT, reason="tritonclient is a dev dependency")
def test_http_endpoint_through_tritonclient(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "triton.json"
    proc = bench(
        "--endpoint", f"http://{server.http}", MODEL, "--http-client", "tritonclient",
        "--concurrency", "2", "--requests", "40", "--warmup", "0.1", "--no-progress", "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tritonclient.http" in proc.stdout
    (r,) = json.loads(out.read_text())["rows"]
    assert r["status"] == "ok" and r["requests"] == 40 and r["error_count"] == 0


@needs_grpc_client
def test_grpc_endpoint_measures_the_server(server: ServerProcess, tmp_path: Path) -> None:
    before = served(server)
    out = tmp_path / "grpc.json"
    proc = bench(
        "--endpoint", f"grpc://{server.grpc}", MODEL, "--concurrency", "1,2", "--batch-size", "1,2",
        "--requests", "30", "--warmup", "0.1", "--no-progress", "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"libtorchrt-pool at grpc://{server.grpc} (KServe v2 over gRPC), model {MODEL}" in proc.stdout
    assert "client: tritonclient.grpc" in proc.stdout
    doc = json.loads(out.read_text())
    requests = check_rows(doc, "grpc", {(1, 1), (2, 1), (1, 2), (2, 2)})
    assert [r["requests"] for r in doc["rows"]] == [30] * 4 and requests == 120
    assert doc["model"]["endpoint"] == f"grpc://{server.grpc}" and doc["model"]["max_batch_size"] == 32
    assert [i["shape"] for i in doc["model"]["inputs"]] == [[1, 3, 32, 32], [2, 3, 32, 32]]  # from the metadata
    after = served(server)
    assert after[0] - before[0] >= requests and after[1] == before[1]  # the server answered them all


@needs_grpc_client
def test_grpc_usage_errors(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    err = usage_error(capsys, "--endpoint", f"grpc://{server.grpc}", "nope")
    assert f"cannot benchmark model 'nope': unknown model 'nope'; this server serves ['{MODEL}']" in err
    err = usage_error(capsys, "--endpoint", f"grpc://{server.http}", MODEL)  # the HTTP port speaks no gRPC
    assert f"no server answered at grpc://{server.http}" in err and "--grpc" in err
    err = usage_error(capsys, "--endpoint", f"grpc://{server.grpc}", MODEL, "--batch-size", "64")
    assert "exceeds the max_batch_size 32" in err
    assert "--metadata applies to a ZeroMQ" in usage_error(
        capsys, "--endpoint", f"grpc://{server.grpc}", MODEL, "--metadata", f"http://{server.http}"
    )


@needs_grpc_client
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_grpcs_endpoint_with_a_token(tmp_path: Path) -> None:
    cert, key, token = tmp_path / "cert.pem", tmp_path / "key.pem", "bench-token-0123456789abcdef"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    (tmp_path / "token").write_text(token)
    repo = build_repository(tmp_path, names=(MODEL,))
    proc = ServerProcess(
        "--model-repository", str(repo), "--http", "off", "--metrics", "off", "--grpc", "127.0.0.1:0",
        "--grpc-tls-cert", str(cert), "--grpc-tls-key", str(key), "--http-token-file", str(tmp_path / "token"),
    )  # fmt: skip
    try:
        proc.wait_ready()
        url, roots = f"grpcs://{proc.grpc}", {"GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(cert)}
        args = (url, MODEL, "--concurrency", "2", "--requests", "20", "--warmup", "0.1", "--no-progress")
        untrusted = bench("--endpoint", *args, env={"LIBTORCHRT_HTTP_TOKEN": token})
        assert untrusted.returncode == 2 and "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH" in untrusted.stderr
        no_token = bench("--endpoint", *args, env=roots)
        assert no_token.returncode == 2, no_token.stdout + no_token.stderr
        assert "requires a token: put it in $LIBTORCHRT_HTTP_TOKEN" in no_token.stderr
        out = tmp_path / "grpcs.json"
        ok = bench("--endpoint", *args, "--json", str(out), env={**roots, "LIBTORCHRT_HTTP_TOKEN": token})
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert f"at {url} (KServe v2 over gRPC, TLS)" in ok.stdout
        (r,) = json.loads(out.read_text())["rows"]
        assert r["mode"] == "grpc" and r["status"] == "ok" and r["requests"] == 20 and r["error_count"] == 0
        assert proc.stop() == 0, proc.output
    finally:
        proc.kill()


def usage_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run the CLI in this process (the argument checks need no subprocess): exit 2, the message."""
    try:
        status = cli.main([*args, "--no-progress"])
    except SystemExit as exc:  # argparse's own errors
        status = exc.code  # type: ignore[assignment]
    captured = capsys.readouterr()
    assert status == 2, captured.out + captured.err
    assert captured.out == ""
    return captured.err


def test_usage_errors(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    http = f"http://{server.http}"
    err = usage_error(capsys, "--endpoint", http, "nope")
    assert f"cannot benchmark model 'nope': unknown model 'nope'; this server serves ['{MODEL}']" in err
    err = usage_error(capsys, "--endpoint", server.zmq, "nope", "--input-shape", "x=1")
    assert f"does not serve model 'nope'; it serves ['{MODEL}']" in err
    err = usage_error(capsys, "--endpoint", server.zmq, MODEL)  # no input metadata over ZeroMQ
    assert "--input-shape NAME=" in err and "--metadata http://HOST:PORT" in err
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert "no server answered at" in usage_error(capsys, "--endpoint", closed, MODEL)
    assert "expected http://HOST:PORT" in usage_error(capsys, "--endpoint", "127.0.0.1:8000", MODEL)
    assert "unknown scheme 'ftp'" in usage_error(capsys, "--endpoint", "ftp://127.0.0.1:8000", MODEL)
    assert "--instances: a running server's" in usage_error(capsys, "--endpoint", http, MODEL, "--instances", "2")
    err = usage_error(capsys, "--endpoint", http, MODEL, "--batch-size", "64")
    assert "exceeds the max_batch_size 32" in err
    assert "--metadata applies to --endpoint" in usage_error(capsys, "--workload", "tiny", "--metadata", http)

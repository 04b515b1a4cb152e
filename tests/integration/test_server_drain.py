"""Server mode's drain (docs/server.md, "Start-up, signals, exit status"): while it
drains, the readiness probe answers 400 and new inference requests 503; a second
SIGTERM/SIGINT stops the drain. Each on a server of its own, stopped by the test; the
meaning of the draining flag itself on the HTTP application, without processes."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from libtorchrt.info import ModelStatus
from libtorchrt.server.http import Limits, ServerState, build_app
from tests.conftest import wait_for
from tests.server_util import ServerProcess, alive, asgi_call, build_repository, metrics, request, sample


@pytest.fixture(scope="module")
def spin_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("drain"), (), spin=True)


def spin_body(n: float) -> bytes:
    """A request to spin: about ``n`` * 1.6 µs of work (more on a busy machine)."""
    return json.dumps({"inputs": [{"name": "INPUT__0", "shape": [1], "datatype": "FP32", "data": [n]}]}).encode()


def running(server: ServerProcess) -> int:
    """spin's requests sent to its workers and not answered yet."""
    return int(sample(metrics(server.metrics), "libtorchrt_inflight_requests", model="spin", version="1"))


def test_ready_answers_400_while_a_request_in_flight_drains(spin_repo: Path) -> None:
    proc = ServerProcess("--model-repository", str(spin_repo), "--http", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
                         "--grace", "30")  # fmt: skip
    try:
        proc.wait_ready()
        with ThreadPoolExecutor(1) as ex:
            in_flight = ex.submit(request, proc.http, "POST", "/v2/models/spin/infer", spin_body(600_000))
            wait_for(lambda: running(proc) == 1, 30, "the request to run")
            assert request(proc.http, "GET", "/v2/health/ready")[0] == 200
            proc.proc.terminate()
            proc.wait_for("stopping: draining", 10)
            probes = 0
            while not in_flight.done():  # (it runs for a second or so)
                assert request(proc.http, "GET", "/v2/health/ready", timeout=10)[0] == 400
                probes += 1
                time.sleep(0.02)
            assert probes > 1
            status, _, data = in_flight.result(60)
        assert status == 200, data
        assert proc.wait(60) == 0, proc.output
    finally:
        proc.kill()


def test_a_second_signal_stops_the_drain(spin_repo: Path) -> None:
    proc = ServerProcess("--model-repository", str(spin_repo), "--http", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
                         "--grace", "60")  # fmt: skip
    try:
        proc.wait_ready()
        workers = proc.workers()
        with ThreadPoolExecutor(1) as ex:
            in_flight = ex.submit(request, proc.http, "POST", "/v2/models/spin/infer", spin_body(100_000_000))
            wait_for(lambda: running(proc) == 1, 30, "the request to run")  # it runs for minutes
            proc.proc.terminate()
            proc.wait_for("stopping: draining", 10)
            proc.proc.send_signal(signal.SIGINT)
            t0 = time.monotonic()
            assert proc.wait(10) == 0, proc.output  # well before --grace
            assert time.monotonic() - t0 < 10
            status, _, data = in_flight.result(30)  # failed by the pool, answered as such
            assert status == 503 and "closed" in json.loads(data)["error"], (status, data)
        assert not any(alive(pid) for pid in workers), "workers left behind"
    finally:
        proc.kill()


# ── the draining flag, on the HTTP application alone ───────────────────────────


class _ServingPool:
    """What the endpoints read of a pool before they would submit: one ready model."""

    closed = False
    failure = None

    def models(self) -> list[ModelStatus]:
        return [ModelStatus("m", 1, "ready")]


def _call(app: Callable[..., Awaitable[None]], method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    status, _, data = asgi_call(app, method, path, body)
    return status, data


def test_draining_reports_not_ready_and_refuses_inference() -> None:
    state = ServerState(_ServingPool(), Limits())  # type: ignore[arg-type]
    app = build_app(state)
    assert _call(app, "GET", "/v2/health/ready")[0] == 200
    assert _call(app, "GET", "/v2/models/m/ready")[0] == 200
    state.draining = True
    assert _call(app, "GET", "/v2/health/ready")[0] == 400
    assert _call(app, "GET", "/v2/models/m/ready")[0] == 400
    assert _call(app, "GET", "/v2/health/live")[0] == 200  # draining is not dead: it ends by itself
    status, data = _call(app, "POST", "/v2/models/m/infer", b'{"inputs": []}')
    assert status == 503 and "shutting down" in json.loads(data)["error"], data

"""Server mode's drain (docs/server.md, "Start-up, signals, exit status"): while it
drains, the readiness probe answers 400 and new inference requests 503; a second
SIGTERM/SIGINT stops the drain. Each on a server of its own, stopped by the test; the
meaning of the draining flag itself on the HTTP application, without processes."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
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


_TGKILL = {"x86_64": 234, "aarch64": 131}.get(platform.machine())  # tgkill(2)'s system call number


def thread_kill(pid: int, tid: int, sig: int) -> None:
    """Send ``sig`` to thread ``tid`` of process ``pid`` alone, as the kernel may choose
    to deliver a signal sent to the process."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_TGKILL, pid, tid, sig) != 0:
        raise OSError(ctypes.get_errno(), f"tgkill({pid}, {tid}, {sig})")


def blocked_signals(pid: int, tid: int) -> int:
    """Thread ``tid``'s blocked signals, as the bit mask ``/proc`` shows."""
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        return int(next(line for line in f if line.startswith("SigBlk:")).split()[1], 16)


def a_thread_taking(pid: int, sig: int) -> int:
    """A thread of process ``pid`` other than its main one that does not block ``sig``."""
    for tid in sorted(int(t) for t in os.listdir(f"/proc/{pid}/task")):
        with contextlib.suppress(OSError):
            if tid != pid and not blocked_signals(pid, tid) & (1 << (sig - 1)):
                return tid
    raise LookupError(f"every thread of process {pid} but its main one blocks signal {sig}")


@pytest.mark.skipif(_TGKILL is None, reason="tgkill's number is known here for x86-64 and aarch64 only")
def test_a_stop_signal_that_another_thread_catches_stops_the_server(spin_repo: Path) -> None:
    """Linux gives a signal sent to a process to any of its threads that does not block
    it, and Python runs the handler in the main thread only, once that thread runs
    again: the main thread, waiting for the serving thread to end, might never. The
    server stops whichever thread caught SIGTERM (here one of its Python threads)."""
    proc = ServerProcess("--model-repository", str(spin_repo), "--http", "127.0.0.1:0", "--metrics", "off",
                         "--grace", "5")  # fmt: skip
    try:
        proc.wait_ready()
        thread_kill(proc.proc.pid, a_thread_taking(proc.proc.pid, signal.SIGTERM), signal.SIGTERM)
        assert proc.wait(30) == 0, proc.output
        assert "stopping" in proc.output
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

"""Server mode while its models load (docs/server.md, "Start-up, signals, exit status"):
the real ``python -m libtorchrt.pool`` answers its probes and metrics from the moment it
listens, before any model is loaded -- live 200, ready 400, each model's state
``loading`` in the metrics, inference 503 -- then ready 200 once loaded; a SIGTERM in
the middle of the load stops it at once and exits 0. The HTTP application's answers
while there is no pool yet are also checked without processes.

The load is held for as long as a test wants, deterministically: every worker process
takes a shared ``flock`` on a gate file before it even imports libtorchrt (a
``sitecustomize`` on its ``PYTHONPATH``), and the test holds the gate exclusively.
"""

from __future__ import annotations

import fcntl
import json
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import IO

import pytest

from libtorchrt.info import InstanceHealth, ModelHealth, ModelStatus
from libtorchrt.server.http import Limits, ServerState, build_app
from tests.conftest import wait_for
from tests.server_util import ServerProcess, alive, asgi_call, build_repository, metrics, request, sample

#: runs at the start of every Python process with the test's PYTHONPATH; in a worker
#: (``python -m libtorchrt.workers``) it waits for the gate before anything else, and so
#: does a worker forked from the template (``-m libtorchrt.workers.template``), at its fork
GATE = """
import os

if os.environ.get("LIBTORCHRT_TEST_LOAD_GATE"):
    with open("/proc/self/cmdline", "rb") as f:
        argv = f.read().split(b"\\0")

    def wait_at_the_gate():
        import fcntl

        with open(os.environ["LIBTORCHRT_TEST_LOAD_GATE"]) as gate:
            fcntl.flock(gate, fcntl.LOCK_SH)  # blocks while the test holds the gate

    if argv[1:3] == [b"-m", b"libtorchrt.workers"]:
        wait_at_the_gate()
    elif argv[1:3] == [b"-m", b"libtorchrt.workers.template"]:
        os.register_at_fork(after_in_child=wait_at_the_gate)
"""

pytestmark = pytest.mark.timeout(300)  # a server start imports torch: slow on a busy machine

#: how long a probe may take, as a Kubernetes probe with ``timeoutSeconds: 1``
PROBE_TIMEOUT = 1.0
SPIN = {"model": "spin", "version": "1"}
LISTENING = r"listening on (http://\S+) \(HTTP\) and (http://\S+)/metrics \(metrics\)"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("startup"), (), spin=True)


class Gate:
    """The gate every worker waits for before it starts: closed while held."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "gate"
        self.path.touch()
        site = directory / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(GATE)
        self.env = {"PYTHONPATH": str(site), "LIBTORCHRT_TEST_LOAD_GATE": str(self.path)}
        self._file: IO[str] | None = None

    def close(self) -> None:
        self._file = open(self.path)  # noqa: SIM115 (held until open())
        fcntl.flock(self._file, fcntl.LOCK_EX)

    def open(self) -> None:
        if self._file is not None:
            self._file.close()  # (which releases the lock)
            self._file = None


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Gate]:
    g = Gate(tmp_path)
    g.close()
    try:
        yield g
    finally:
        g.open()


def probe(address: str, path: str) -> int:
    return request(address, "GET", path, timeout=PROBE_TIMEOUT)[0]


def first_answer(address: str, path: str, within: float) -> tuple[int, float]:
    """The first answer to ``GET path`` (polled every 20 ms), and how long it took."""
    t0 = time.monotonic()
    while True:
        try:
            return probe(address, path), time.monotonic() - t0
        except OSError as e:
            assert time.monotonic() - t0 < within, f"no answer to {path} within {within} s: {e!r}"
            time.sleep(0.02)


def model_state(address: str, state: str) -> float:
    """spin's ``libtorchrt_model_state`` for ``state`` (0 before spin is listed: the
    pool's router does not exist yet)."""
    return metrics(address).get(("libtorchrt_model_state", tuple(sorted({**SPIN, "state": state}.items()))), 0.0)


def spin_request() -> bytes:
    return json.dumps({"inputs": [{"name": "INPUT__0", "shape": [1], "datatype": "FP32", "data": [7]}]}).encode()


def start_held(repo: Path, gate: Gate) -> tuple[ServerProcess, str, str, float]:
    """A server whose workers wait at the gate; its HTTP and metrics addresses, and
    when it said it listens."""
    proc = ServerProcess("--model-repository", str(repo), "--http", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
                         "--grace", "5", env=gate.env)  # fmt: skip
    m = proc.wait_for(LISTENING, 120)  # (Python importing torch comes first: seconds, more on a busy machine)
    return proc, m.group(1).removeprefix("http://"), m.group(2).removeprefix("http://"), time.monotonic()


def test_the_probes_and_metrics_answer_while_the_models_load(repo: Path, gate: Gate) -> None:
    proc, http, metrics_at, listening = start_held(repo, gate)
    try:
        status, took = first_answer(http, "/v2/health/live", within=2.0)
        assert status == 200, proc.output
        print(f"live answered {time.monotonic() - listening:.2f} s after 'listening' ({took:.2f} s of polling)")
        assert "loading" not in proc.output.split("listening on", 1)[0], "it listened only after the load began"
        # The models are loading (their workers are held at the gate): not ready yet.
        wait_for(lambda: model_state(metrics_at, "loading") == 1, 30, "spin's state to be 'loading' in /metrics")
        values = metrics(metrics_at)
        assert sample(values, "libtorchrt_instances", state="starting", **SPIN) == 2
        assert sample(values, "libtorchrt_model_state", state="ready", **SPIN) == 0
        assert probe(http, "/v2/health/live") == 200
        assert probe(http, "/v2/health/ready") == 400
        assert probe(http, "/v2/models/spin/ready") == 400
        status, headers, data = request(http, "POST", "/v2/models/spin/infer", spin_request(), timeout=10)
        assert status == 503 and headers["retry-after"] == "1", data
        assert "loading its models" in json.loads(data)["error"]
        status, _, data = request(http, "POST", "/v2/repository/index", b"", timeout=10)
        assert status == 200 and json.loads(data) == [{"name": "spin", "state": "LOADING", "version": "1",
                                                       "reason": ""}], data  # fmt: skip
        assert not any("ready:" in line for line in proc.lines), "the banner came before the models loaded"
        gate.open()
        wait_for(lambda: probe(http, "/v2/health/ready") == 200, 120, "ready once the models are loaded")
        assert probe(http, "/v2/models/spin/ready") == 200
        assert model_state(metrics_at, "ready") == 1 and model_state(metrics_at, "loading") == 0
        status, _, data = request(http, "POST", "/v2/models/spin/infer", spin_request(), timeout=60)
        assert status == 200 and json.loads(data)["outputs"][0]["data"] == [7.0], data
        proc.wait_ready(60)  # the banner, once every model is loaded
        assert proc.http == http
        workers = proc.workers()
        assert proc.stop() == 0, proc.output
        assert not any(alive(pid) for pid in workers), "workers left behind"
    finally:
        proc.kill()


def test_sigterm_in_the_middle_of_the_load_exits_0_at_once(repo: Path, gate: Gate) -> None:
    proc, http, metrics_at, _ = start_held(repo, gate)
    try:
        wait_for(lambda: model_state(metrics_at, "loading") == 1, 30, "spin's state to be 'loading' in /metrics")
        # (forked from the template once it has imported torch: they may come after "loading")
        wait_for(lambda: len(proc.workers()) == 2, 60, "both workers to start, held at the gate")
        workers = proc.workers()
        assert probe(http, "/v2/health/live") == 200
        t0 = time.monotonic()
        assert proc.stop(timeout=30) == 0, proc.output
        assert time.monotonic() - t0 < 20, "the load was not stopped at once"
        assert "ready:" not in proc.output
        assert not any(alive(pid) for pid in workers), "workers left behind"
    finally:
        proc.kill()


# ── the HTTP application before the pool exists, without processes ─────────────


call = asgi_call


def test_without_a_pool_the_app_answers_probes_and_refuses_inference() -> None:
    state = ServerState(None, Limits())
    app = build_app(state)
    assert call(app, "GET", "/v2/health/live")[0] == 200
    assert call(app, "GET", "/v2/health/ready")[0] == 400
    assert call(app, "GET", "/v2/models/m/ready")[0] == 400
    assert call(app, "GET", "/v2/models/anything/versions/3/ready")[0] == 400  # not known yet: not ready either
    assert call(app, "GET", "/v2")[0] == 200
    for method, path in (("POST", "/v2/models/m/infer"), ("GET", "/v2/models/m"), ("GET", "/v2/models/m/config"),
                         ("GET", "/v2/models/m/stats"), ("GET", "/v2/models/stats")):  # fmt: skip
        status, headers, data = call(app, method, path, b'{"inputs": []}' if method == "POST" else b"")
        assert status == 503 and headers["retry-after"] == "1", (path, data)
        assert "loading its models" in json.loads(data)["error"], path
    assert json.loads(call(app, "POST", "/v2/repository/index")[2]) == []  # before the pool's router exists
    health = ModelHealth("m", "loading", 0, (InstanceHealth(0, 1, "warming"),), version=2)
    state.starting = lambda: {"m": health, "m/2": health}
    assert json.loads(call(app, "POST", "/v2/repository/index")[2]) == [
        {"name": "m", "version": "2", "state": "LOADING", "reason": ""}
    ]
    state.pool = SimpleNamespace(closed=False, failure=None, models=lambda: [ModelStatus("m", 2, "ready")])  # type: ignore[assignment]
    assert call(app, "GET", "/v2/health/ready")[0] == 200
    assert call(app, "GET", "/v2/models/m/ready")[0] == 200

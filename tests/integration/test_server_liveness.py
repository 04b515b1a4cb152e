"""The server never lingers as a zombie that reports live, and a hung model is replaced.

- A bug that stops the pool's router thread (injected here: nothing a client sends can
  do it any more) makes ``/v2/health/live`` fail and the process exit with status 1, so
  that a supervisor (Kubernetes, systemd) restarts it. It used to stay live while every
  request got 503 "the pool is closed".
- ``--execution-timeout`` is the watchdog's default for models that set none: a model
  that spins forever answers 504, its worker is killed and replaced, and the model is
  ready again; it used to keep a worker at 100% CPU and fail every later request.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.server_util import ServerProcess, alive, build_repository

# (spin's requests are made to go by the router, not the fast lane, which it would not see)
INJECT = """
import os
if os.environ.get("LIBTORCHRT_TEST_INJECT_ROUTER_BUG") == "spin":
    import libtorchrt.front.fastlane as _fastlane
    import libtorchrt.front.router as _router

    _serves = _fastlane.FastLane.serves
    _fastlane.FastLane.serves = lambda self, model, version: model != "spin" and _serves(self, model, version)

    _on_inbox = _router.Router._take_inbox

    def _buggy(self):
        if any(call.model.name == "spin" for call in self.inbox.items):
            raise RuntimeError("a bug injected into the router thread")
        _on_inbox(self)

    _router.Router._take_inbox = _buggy
"""


def _post(base: str, model: str, value: float, timeout: float = 60.0) -> tuple[int, dict]:
    body = json.dumps({"inputs": [{"name": "INPUT__0", "datatype": "FP32", "shape": [1], "data": [value]}]}).encode()
    req = urllib.request.Request(f"http://{base}/v2/models/{model}/infer", data=body, method="POST")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _get(base: str, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://{base}{path}", timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("liveness"), names=(), spin=True)


@pytest.fixture
def server_with_a_bug(repo: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(INJECT)
    env = {"PYTHONPATH": str(site), "LIBTORCHRT_TEST_INJECT_ROUTER_BUG": "spin"}
    server = ServerProcess("--model-repository", str(repo), "--http", "127.0.0.1:0", "--grace", "2", env=env)
    try:
        yield server.wait_ready()
    finally:
        server.kill()


def test_a_dead_router_fails_liveness_and_exits_1(server_with_a_bug: ServerProcess) -> None:
    server = server_with_a_bug
    workers = server.workers()
    assert workers and _get(server.http, "/v2/health/live") == 200
    status, _ = _post(server.http, "spin", 1.0)
    assert status == 503  # the pool is closed under this request
    code = server.wait(60)
    assert code == 1, server.output
    assert "stopped unexpectedly; exiting with status 1" in server.output
    assert "a bug injected into the router thread" in server.output
    wait_for(lambda: not any(alive(pid) for pid in workers), 10, "the workers to exit")


@pytest.fixture(scope="module")
def watched(repo: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(
        "--model-repository", str(repo), "--http", "127.0.0.1:0", "--execution-timeout", "0.5", "--grace", "2"
    )
    try:
        yield server.wait_ready()
    finally:
        server.kill()


def test_the_servers_execution_timeout_replaces_a_hung_worker(watched: ServerProcess) -> None:
    server = watched
    before = server.workers()
    status, body = _post(server.http, "spin", 3_000_000.0)  # seconds of spinning
    assert status == 504, body
    assert "execution_timeout=0.5" in body["error"]

    def replaced() -> bool:
        now = server.workers()
        return len(now) == len(before) and now != before and _get(server.http, "/v2/models/spin/ready") == 200

    wait_for(replaced, 60, "the hung worker's replacement")
    status, body = _post(server.http, "spin", 7.0)
    assert status == 200 and body["outputs"][0]["data"] == [7.0], body
    assert _get(server.http, "/v2/health/live") == 200
    assert _get(server.http, "/v2/health/ready") == 200
    assert server.stop() == 0

"""Model control over the wire, against the real ``python -m libtorchrt.pool``:
``--model-control-mode explicit`` (tritonclient's load_model / unload_model over HTTP
and gRPC, the repository index) and ``poll`` (models added, changed and removed in the
repository), with traffic to the other models and to the model loaded anew: no request
fails; an unloaded model's workers are gone. Mode ``none`` refuses, as Triton does."""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import tritonclient.grpc as tritongrpc
import tritonclient.http as tritonhttp
from tritonclient.utils import InferenceServerException

from libtorchrt import ModelStatus
from libtorchrt.server.control import NOT_ALLOWED, RepositoryControl
from libtorchrt.server.http import Limits, ServerState, build_app
from tests import models
from tests.conftest import wait_for
from tests.server_util import SPIN_CONFIG, ServerProcess, add_model, alive, asgi_call, model_workers, request

pytestmark = pytest.mark.timeout(600)

IDENT = """
name: "{name}"
platform: "pytorch_libtorch"
max_batch_size: 0
input [ {{ name: "INPUT__0" data_type: TYPE_FP32 dims: [ 1 ] }} ]
output [ {{ name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 1 ] }} ]
instance_group [ {{ count: {count} kind: KIND_CPU }} ]
"""


def ident_config(name: str, count: int = 1) -> str:
    return IDENT.format(name=name, count=count)


def repository(root: Path) -> Path:
    """spin (two instances), and ident and other (Identity, one instance each)."""
    repo = root / "repo"
    repo.mkdir()
    add_model(repo, "spin", SPIN_CONFIG, models.Spin())
    for name in ("ident", "other"):
        add_model(repo, name, ident_config(name), models.Identity())
    return repo


def replace_model(repo: Path, name: str, module: torch.nn.Module) -> None:
    """Write a new model file for ``name`` (as a deployment would: a new file moved in)."""
    new = repo / name / "1" / "model.pt.new"
    torch.jit.script(module).save(str(new))
    os.replace(new, repo / name / "1" / "model.pt")


def infer(address: str, model: str, value: float) -> tuple[int, Any]:
    doc = {"inputs": [{"name": "INPUT__0", "shape": [1], "datatype": "FP32", "data": [value]}]}
    status, _, body = request(address, "POST", f"/v2/models/{model}/infer", json.dumps(doc).encode(), timeout=60)
    answer = json.loads(body) if body else None
    if status == 200:
        return status, answer["outputs"][0]["data"][0]
    return status, answer


class Traffic:
    """Threads sending ``model`` requests over HTTP until stopped: (input, status, answer)."""

    def __init__(self, address: str, model: str, threads: int = 3) -> None:
        self.address, self.model = address, model
        self.results: list[list[tuple[float, int, Any]]] = [[] for _ in range(threads)]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(k,)) for k in range(threads)]

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        wait_for(lambda: all(self.results), 60, f"requests to {self.model}")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def _run(self, k: int) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            value = float(i % 5 + 1)
            self.results[k].append((value, *infer(self.address, self.model, value)))

    def count(self) -> int:
        return sum(map(len, self.results))

    def failures(self) -> list[tuple[float, int, Any]]:
        return [r for results in self.results for r in results if r[1] != 200]


def index(address: str) -> dict[str, list[dict[str, str]]]:
    status, _, body = request(address, "POST", "/v2/repository/index", b"")
    assert status == 200, body
    out: dict[str, list[dict[str, str]]] = {}
    for entry in json.loads(body):
        out.setdefault(entry["name"], []).append(entry)
    return out


def start(repo: Path, *args: str) -> ServerProcess:
    proc = ServerProcess("--model-repository", str(repo), "--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0",
                         "--metrics", "off", "--grace", "10", *args)  # fmt: skip
    try:
        return proc.wait_ready(180)
    except BaseException:
        proc.kill()
        raise


@pytest.fixture(scope="module")
def explicit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    repo = repository(tmp_path_factory.mktemp("explicit"))
    proc = start(repo, "--model-control-mode", "explicit", "--load-model", "spin")
    try:
        yield proc, repo
        workers = proc.workers()
        assert proc.stop() == 0, proc.output
        assert not any(alive(pid) for pid in workers), "workers left behind"
        assert "Traceback" not in proc.output, proc.output
    finally:
        proc.kill()


def test_explicit_loads_only_load_model_then_loads_and_unloads_on_request(
    explicit: tuple[ServerProcess, Path],
) -> None:
    proc, _ = explicit
    http = tritonhttp.InferenceServerClient(proc.http, network_timeout=120.0)
    grpc = tritongrpc.InferenceServerClient(proc.grpc)
    try:
        found = index(proc.http)
        assert found["spin"] == [{"name": "spin", "version": "1", "state": "READY", "reason": ""}]
        assert found["ident"] == [{"name": "ident"}] and found["other"] == [{"name": "other"}]  # never loaded
        assert http.is_server_ready() and not http.is_model_ready("ident")
        assert infer(proc.http, "ident", 1.0)[0] == 404
        spin_workers = model_workers(proc.proc.pid, "spin")
        with Traffic(proc.http, "spin") as spin:
            http.load_model("ident")
            assert infer(proc.http, "ident", 3.0) == (200, 3.0)
            grpc.load_model("other")  # (gRPC: the same control)
            assert http.is_model_ready("other")
            idents = model_workers(proc.proc.pid, "ident")
            assert len(idents) == 1
            http.unload_model("ident")
            assert infer(proc.http, "ident", 1.0)[0] == 404  # unknown, as Triton says
            assert not any(alive(pid) for pid in idents), "the unloaded model's worker remains"
            assert not model_workers(proc.proc.pid, "ident")
            assert index(proc.http)["ident"] == [{"name": "ident", "version": "1", "state": "UNAVAILABLE",
                                                  "reason": "unloaded"}]  # fmt: skip
            assert not http.is_model_ready("ident")
            grpc.unload_model("other")
            grpc.unload_model("never-loaded")  # (nothing to do: not an error, as in Triton)
            ready = grpc.get_model_repository_index(as_json=True)["models"]
            assert [m["name"] for m in ready] == ["ident", "other", "spin"]
            mark = spin.count()
            wait_for(lambda: spin.count() > mark + 10, 60, "more spin requests")
        assert spin.count() > 30 and not spin.failures(), spin.failures()[:3]
        assert model_workers(proc.proc.pid, "spin") == spin_workers, "the other model's workers were touched"
        only_ready = http.get_model_repository_index(query_params=None)
        assert {m["name"] for m in only_ready} == {"spin", "ident", "other"}
        status, _, body = request(proc.http, "POST", "/v2/repository/index", b'{"ready": true}')
        assert status == 200 and [m["name"] for m in json.loads(body)] == ["spin"], body
    finally:
        http.close()
        grpc.close()


def test_a_model_loaded_anew_while_it_serves_drops_no_request(explicit: tuple[ServerProcess, Path]) -> None:
    proc, repo = explicit
    http = tritonhttp.InferenceServerClient(proc.http, network_timeout=120.0)
    try:
        http.load_model("ident")
        first = model_workers(proc.proc.pid, "ident")
        with Traffic(proc.http, "ident") as traffic:
            http.load_model("ident")  # its files did not change: nothing happens (as in Triton)
            assert model_workers(proc.proc.pid, "ident") == first
            replace_model(repo, "ident", models.Raiser())  # x * 2
            http.load_model("ident")
            mark = traffic.count()
            wait_for(lambda: traffic.count() > mark + 20, 60, "requests to the new version")
        assert not traffic.failures(), traffic.failures()[:3]
        for results in traffic.results:  # each thread: the old answers (x), then the new (2x), never back
            ratios = [answer / value for value, _, answer in results]
            assert set(ratios) == {1.0, 2.0} and ratios == sorted(ratios), ratios
        assert infer(proc.http, "ident", 4.0) == (200, 8.0)
        wait_for(lambda: not model_workers(proc.proc.pid, "ident") & first, 30, "the old worker to exit")
        http.unload_model("ident")
    finally:
        replace_model(repo, "ident", models.Identity())
        http.close()


def test_load_with_a_configuration_and_the_errors_of_a_load(explicit: tuple[ServerProcess, Path]) -> None:
    proc, repo = explicit
    http = tritonhttp.InferenceServerClient(proc.http, network_timeout=120.0)
    try:
        http.load_model("other")
        config = http.get_model_config("other")
        config["instance_group"][0]["count"] = 2
        http.load_model("other", config=json.dumps(config))  # Triton's config override
        assert http.get_model_config("other")["instance_group"][0]["count"] == 2
        wait_for(lambda: len(model_workers(proc.proc.pid, "other")) == 2, 30, "other's two workers")
        http.load_model("other")  # from its files again: the override is undone
        assert http.get_model_config("other")["instance_group"][0]["count"] == 1
        wait_for(lambda: len(model_workers(proc.proc.pid, "other")) == 1, 30, "other's one worker")

        def refused(name: str, body: bytes) -> tuple[int, str]:
            status, _, data = request(proc.http, "POST", f"/v2/repository/models/{name}/load", body)
            return status, json.loads(data)["error"]

        assert refused("nope", b"") == (
            500,
            f"failed to load 'nope', failed to poll from model repository: {str(repo)!r} has no nope/config.pbtxt",
        )
        status, error = refused("other", b'{"parameters": {"config": "{not json"}}')
        assert status == 400 and error.startswith("Invalid config override:"), error
        assert refused("other", b'{"parameters": {"priority": 3}}') == (
            400,
            "Unrecognized load parameter 'priority' with type 'INT64'",
        )
        status, error = refused("other", b'{"parameters": {"file:1/model.pt": "AAAA"}}')
        assert status == 400 and "not supported" in error
        assert refused("other", b"[1]") == (400, "the body is not a JSON object")
        # A model whose configuration is broken: 400 with why, and the index says so.
        shutil.copytree(repo / "other", repo / "bad")
        (repo / "bad" / "config.pbtxt").write_text(ident_config("bad").replace("dims", "dim"))
        status, error = refused("bad", b"")
        assert status == 400 and error.startswith("load failed for model 'bad':") and "dim" in error, error
        (bad,) = index(proc.http)["bad"]
        assert bad["state"] == "UNAVAILABLE" and "dim" in bad["reason"], bad
        with pytest.raises(InferenceServerException, match="load failed for model 'bad'"):
            http.load_model("bad")
        assert infer(proc.http, "other", 2.0) == (200, 2.0)  # the others serve on
        http.unload_model("other")
    finally:
        shutil.rmtree(repo / "bad", ignore_errors=True)
        http.close()


def test_poll_applies_the_repository_changes(tmp_path: Path) -> None:
    repo = repository(tmp_path)
    shutil.rmtree(repo / "other")
    moved = tmp_path / "ident"
    shutil.move(str(repo / "ident"), str(moved))  # it comes later
    proc = start(repo, "--model-control-mode", "poll", "--repository-poll-secs", "0.3")
    try:
        http = tritonhttp.InferenceServerClient(proc.http, network_timeout=120.0)
        assert set(index(proc.http)) == {"spin"}
        with pytest.raises(InferenceServerException, match=NOT_ALLOWED):
            http.load_model("spin")
        with pytest.raises(InferenceServerException, match=NOT_ALLOWED):
            http.unload_model("spin")
        with Traffic(proc.http, "spin") as spin:
            shutil.move(str(moved), str(repo / "ident"))  # a model added: loaded
            wait_for(lambda: infer(proc.http, "ident", 2.0) == (200, 2.0), 60, "ident to be loaded")
            with Traffic(proc.http, "ident") as ident:
                (repo / "ident" / "config.pbtxt").write_text(ident_config("ident", count=2))  # changed: anew
                wait_for(lambda: len(model_workers(proc.proc.pid, "ident")) == 2, 60, "ident's two workers")
                wait_for(lambda: http.get_model_config("ident")["instance_group"][0]["count"] == 2, 30, "the config")
                mark = ident.count()
                wait_for(lambda: ident.count() > mark + 10, 60, "more ident requests")
            assert not ident.failures(), ident.failures()[:3]
            shutil.rmtree(repo / "ident")  # removed: unloaded
            wait_for(lambda: infer(proc.http, "ident", 1.0)[0] == 404, 60, "ident to be unloaded")
            wait_for(lambda: not model_workers(proc.proc.pid, "ident"), 30, "ident's workers to exit")
            # (listed as UNLOADING until the pool has seen every exit of its retired workers)
            wait_for(lambda: set(index(proc.http)) == {"spin"}, 30, "ident to leave the index")
        assert not spin.failures(), spin.failures()[:3]
        http.close()
        workers = proc.workers()
        assert proc.stop() == 0, proc.output
        assert not any(alive(pid) for pid in workers), "workers left behind"
    finally:
        proc.kill()


def test_mode_none_refuses_load_and_unload_as_triton_does(tmp_path: Path) -> None:
    state = ServerState(None, Limits())
    app = build_app(state)
    status, _, body = asgi_call(app, "POST", "/v2/repository/models/m/load")
    assert status == 503 and "loading its models" in json.loads(body)["error"]
    state.control = RepositoryControl(tmp_path, "none")
    state.pool = SimpleNamespace(closed=False, failure=None, models=lambda: [ModelStatus("m", 1, "ready")])  # type: ignore[assignment]
    state.control.pool = state.pool  # type: ignore[assignment]
    for what in ("load", "unload"):
        status, _, body = asgi_call(app, "POST", f"/v2/repository/models/m/{what}")
        assert (status, json.loads(body)) == (503, {"error": NOT_ALLOWED}), what
    status, _, body = asgi_call(app, "POST", "/v2/repository/index", b'{"ready": "yes"}')
    assert status == 400
    (tmp_path / "n").mkdir()
    (tmp_path / "n" / "config.pbtxt").write_text('name: "n"')
    status, _, body = asgi_call(app, "POST", "/v2/repository/index")
    assert json.loads(body) == [{"name": "m", "version": "1", "state": "READY", "reason": ""}, {"name": "n"}]


def test_a_server_in_explicit_mode_may_start_without_models(tmp_path: Path) -> None:
    repo = repository(tmp_path)
    proc = start(repo, "--model-control-mode", "explicit")
    try:
        http = tritonhttp.InferenceServerClient(proc.http, network_timeout=120.0)
        assert http.is_server_ready()  # (Triton's too: nothing is loading)
        assert {m["name"]: m.get("state") for m in http.get_model_repository_index()} == {
            "ident": None, "other": None, "spin": None}  # fmt: skip
        assert not proc.workers()  # (the template process only)
        http.load_model("spin")
        assert infer(proc.http, "spin", 5.0) == (200, 5.0)
        http.close()
        assert proc.stop() == 0, proc.output
    finally:
        proc.kill()

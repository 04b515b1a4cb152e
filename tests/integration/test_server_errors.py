"""Server mode's 5xx answers (docs/server.md, "Errors"), each caused for real on a real
``python -m libtorchrt.pool``: 500 for a model that raises and for a worker that dies
under a request (after the retry of docs/reliability.md), 504 for a request's deadline,
503 with ``Retry-After`` for a full model queue and for ``--max-inflight`` requests.

And what a 500 tells (docs/server.md, "Logs"): the client gets one line, never the
model's traceback, paths or code; the server's log gets the traceback once, in one
record, as text or (``--log-format json``) as one JSON object per line."""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from libtorchrt.errors import ModelError, WorkerDiedError
from libtorchrt.info import ModelStatus
from libtorchrt.server.http import _TORCHSCRIPT, Limits, ServerState, build_app, summary
from tests.conftest import wait_for
from tests.models import Raiser, Spin, SpinDouble
from tests.server_util import ServerProcess, add_model, alive, asgi_call, metrics, model_workers, request, sample

MAX_INFLIGHT = 4  # --max-inflight of the server

#: spin (tests/models.py Spin) with one instance: a long request occupies it
LONE_CONFIG = """
name: "lone"
platform: "pytorch_libtorch"
max_batch_size: 0
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""

#: raises for a negative input (tests/models.py Raiser)
RAISER_CONFIG = """
name: "raiser"
platform: "pytorch_libtorch"
max_batch_size: 0
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""

#: x * 2 + 1 after spinning x[0, 0] iterations (tests/models.py SpinDouble); one request
#: may wait in its queue
QUEUED_CONFIG = """
name: "queued"
platform: "pytorch_libtorch"
max_batch_size: 4
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
dynamic_batching { default_queue_policy { max_queue_size: 1 } }
"""

Answer = tuple[int, dict[str, str], bytes]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("errors") / "repo"
    add_model(repo, "lone", LONE_CONFIG, Spin())
    add_model(repo, "raiser", RAISER_CONFIG, Raiser())
    add_model(repo, "queued", QUEUED_CONFIG, SpinDouble())
    proc = ServerProcess(
        "--model-repository", str(repo), "--http", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
        "--max-inflight", str(MAX_INFLIGHT), "--grace", "5",
    )  # fmt: skip
    try:
        proc.wait_ready()
        yield proc
        assert proc.stop() == 0, proc.output
        assert not proc.workers(), "workers left behind"
    finally:
        proc.kill()


def body(value: float, *, batch: bool = False, timeout_us: int | None = None) -> bytes:
    doc: dict[str, Any] = {"inputs": [{"name": "INPUT__0", "shape": [1, 1] if batch else [1], "datatype": "FP32",
                                       "data": [value]}]}  # fmt: skip
    if timeout_us is not None:
        doc["parameters"] = {"timeout": timeout_us}
    return json.dumps(doc).encode()


def infer(server: ServerProcess, model: str, data: bytes) -> Answer:
    return request(server.http, "POST", f"/v2/models/{model}/infer", data)


def load(server: ServerProcess, model: str) -> tuple[int, int]:
    """The model's requests sent to its workers, and those waiting in the pool's queue."""
    values = metrics(server.metrics)
    return (int(sample(values, "libtorchrt_inflight_requests", model=model, version="1")),
            int(sample(values, "nv_inference_pending_request_count", model=model, version="1")))  # fmt: skip


def ready_instances(server: ServerProcess, model: str) -> int:
    return int(sample(metrics(server.metrics), "libtorchrt_instances", model=model, version="1", state="ready"))


def restarts(server: ServerProcess, model: str) -> int:
    values = metrics(server.metrics)
    return int(sample(values, "libtorchrt_worker_restarts_total", model=model, version="1", instance="0"))


def error_of(answer: Answer) -> str:
    status, headers, data = answer
    assert headers["content-type"] == "application/json", (status, data)
    message: str = json.loads(data)["error"]
    return message


# ── 500 ────────────────────────────────────────────────────────────────────────


def test_a_model_error_gives_500(server: ServerProcess) -> None:
    answer = infer(server, "raiser", body(-1))
    assert answer[0] == 500, answer
    assert error_of(answer).startswith("model 'raiser' raised")
    status, _, data = infer(server, "raiser", body(2))  # the instance serves on
    assert status == 200 and json.loads(data)["outputs"][0]["data"] == [4.0]


def test_a_model_error_answers_only_its_headline(server: ServerProcess) -> None:
    answer = infer(server, "raiser", body(-1))
    assert answer[0] == 500, answer
    error = error_of(answer)
    assert error.startswith("model 'raiser' raised") and "negative input rejected by the model" in error, error
    assert "\n" not in error and "Traceback" not in error and "models.py" not in error, error


def test_a_worker_that_dies_twice_under_a_request_gives_500(server: ServerProcess) -> None:
    """SIGKILL the worker running a request: the request is sent again, to the
    replacement (max_retries, 1 by default: docs/reliability.md); SIGKILL that one too
    while it runs the request: 500, and it is not sent a third time."""
    (first,) = model_workers(server.proc.pid, "lone")
    restarted = restarts(server, "lone")
    with ThreadPoolExecutor(1) as ex:
        answer = ex.submit(infer, server, "lone", body(100_000_000))  # minutes: it never ends by itself here
        wait_for(lambda: load(server, "lone") == (1, 0), 30, "the request to run")
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: answer.done() or (restarts(server, "lone") == restarted + 1
                                           and ready_instances(server, "lone") == 1 and load(server, "lone") == (1, 0)),
                 60, "the replacement to run the request again")  # fmt: skip
        assert not answer.done(), f"failed at the first death, not sent again: {answer.result()}"
        (second,) = model_workers(server.proc.pid, "lone")
        assert second != first
        os.kill(second, signal.SIGKILL)
        got = answer.result(60)
    assert got[0] == 500, got
    error = error_of(got)
    assert f"(pid {second}) was killed by signal 9" in error and "not retried" in error, error
    wait_for(lambda: ready_instances(server, "lone") == 1 and load(server, "lone") == (0, 0), 60,
             "lone to be served again")  # fmt: skip
    assert not alive(first) and not alive(second)


# ── 504 ────────────────────────────────────────────────────────────────────────


def test_a_request_past_its_deadline_gives_504(server: ServerProcess) -> None:
    answer = infer(server, "lone", body(400_000, timeout_us=100_000))  # 0.1 s for 0.6 s of work or more
    assert answer[0] == 504, answer
    assert "deadline passed" in error_of(answer)
    assert load(server, "lone") == (1, 0), "answered when the model finished, not at the deadline"
    wait_for(lambda: load(server, "lone") == (0, 0), 60, "the model to finish")


# ── 503 with Retry-After ───────────────────────────────────────────────────────


def test_a_full_model_queue_gives_503_with_retry_after(server: ServerProcess) -> None:
    with ThreadPoolExecutor(3) as ex:
        held: list[Future[Answer]] = []
        for value, state in ((400_000, (1, 0)), (1, (2, 0)), (2, (2, 1))):
            # one runs, one is sent ahead to the worker, one waits in the model's queue
            held.append(ex.submit(infer, server, "queued", body(value, batch=True)))
            wait_for(lambda state=state: load(server, "queued") == state, 30, f"queued's load to be {state}")
        answer = infer(server, "queued", body(3, batch=True))
        assert answer[0] == 503, answer
        assert answer[1]["retry-after"] == "1"
        assert "the queue is full (max_queue_size=1)" in error_of(answer)
        answers = [f.result(60) for f in held]
    assert [status for status, _, _ in answers] == [200] * 3, answers
    assert [json.loads(data)["outputs"][0]["data"] for _, _, data in answers] == [[800_001.0], [3.0], [5.0]]


def test_more_than_max_inflight_requests_get_503_with_retry_after(server: ServerProcess) -> None:
    with ThreadPoolExecutor(MAX_INFLIGHT) as ex:
        held = [ex.submit(infer, server, "lone", body(400_000))]  # the others wait behind it
        wait_for(lambda: load(server, "lone") == (1, 0), 30, "the long request to run")
        while len(held) < MAX_INFLIGHT:
            held.append(ex.submit(infer, server, "lone", body(10)))
            wait_for(lambda: sum(load(server, "lone")) == len(held), 30, f"request {len(held)} to reach the pool")
        answer = infer(server, "raiser", body(1))
        assert answer[0] == 503, answer
        assert answer[1]["retry-after"] == "1"
        assert f"handling {MAX_INFLIGHT} requests already (--max-inflight)" in error_of(answer)
        answers = [f.result(60) for f in held]
    assert [status for status, _, _ in answers] == [200] * MAX_INFLIGHT, answers
    status, _, data = infer(server, "raiser", body(1))  # a slot is free again
    assert status == 200 and json.loads(data)["outputs"][0]["data"] == [2.0]


# ── what a 500 tells: one line to the client, the traceback once to the log ────

#: the one line a client gets when the raiser model raises
HEADLINE = "model 'raiser' raised RuntimeError: negative input rejected by the model"


def raise_once(tmp_path: Path, *args: str) -> tuple[Answer, ServerProcess]:
    """A server of the raiser model alone (with ``args``), asked once to raise, then
    stopped: the answer, and the server with its whole output."""
    repo = tmp_path / "repo"
    add_model(repo, "raiser", RAISER_CONFIG, Raiser())
    proc = ServerProcess("--model-repository", str(repo), "--http", "127.0.0.1:0", "--metrics", "off",
                         "--grace", "5", *args)  # fmt: skip
    try:
        proc.wait_ready()
        answer = infer(proc, "raiser", body(-1))
        assert proc.stop() == 0, proc.output  # (every record is written by then)
    finally:
        proc.kill()
    return answer, proc


def assert_one_line_for_the_client(answer: Answer) -> None:
    assert answer[0] == 500, answer
    error = error_of(answer)
    assert error == HEADLINE, error
    raw = answer[2].decode()
    for leak in ("Traceback", "models.py", "worker.py", "RaiseException", "<--- HERE", "/"):
        assert leak not in raw, (leak, raw)


@pytest.mark.timeout(300)
def test_a_500_is_one_line_and_its_traceback_is_logged_once(tmp_path: Path) -> None:
    answer, proc = raise_once(tmp_path)
    assert_one_line_for_the_client(answer)
    log = proc.output
    assert log.count(f"ERROR   libtorchrt.server: inference failed (500): {HEADLINE}") == 1, log
    # the worker's traceback, and TorchScript's two with the author's code, once each
    assert log.count("Traceback (most recent call last):") == 1, log
    assert log.count("Traceback of TorchScript, original code (most recent call last):") == 1, log
    assert log.count('raise RuntimeError("negative input rejected by the model")') == 1, log  # the author's code


@pytest.mark.timeout(300)
def test_json_logs_are_one_object_per_line(tmp_path: Path) -> None:
    answer, proc = raise_once(tmp_path, "--log-format", "json")
    assert_one_line_for_the_client(answer)
    banner = [i for i, line in enumerate(proc.lines) if line.startswith("libtorchrt-pool ") and " ready:" in line]
    assert len(banner) == 1, proc.output
    records = []
    for i, line in enumerate(proc.lines):
        if banner[0] <= i <= banner[0] + 1:  # the banner (stdout): its line, and HTTP's
            continue
        doc = json.loads(line)  # every other line: a log record
        assert {"time", "level", "logger", "message"} <= set(doc) <= {"time", "level", "logger", "message",
                                                                       "exception"}, doc  # fmt: skip
        records.append(doc)
    assert any(r["message"].startswith("listening on http://") for r in records)
    assert any(r["message"].startswith("raiser v1 instance 0: ready after ") for r in records)
    failed = [r for r in records if "exception" in r]
    assert len(failed) == 1, failed
    (record,) = failed
    assert record["level"] == "ERROR" and record["logger"] == "libtorchrt.server"
    assert record["message"] == f"inference failed (500): {HEADLINE}"
    assert record["exception"].count("Traceback (most recent call last):") == 1
    assert "Traceback of TorchScript, original code" in record["exception"]
    assert sum(line.count("Traceback") for line in proc.lines) == record["exception"].count("Traceback")


def test_every_summary_is_one_line() -> None:
    """What a 500 tells for each kind of failure (the TorchScript one: above, for real)."""
    plain = ModelError("m", "ValueError", "bad value\n  more about it\n", "Traceback (most recent call last):\n ...")
    assert summary(plain) == "model 'm' raised ValueError: bad value"
    scripted = ModelError("m", "Error", f"{_TORCHSCRIPT}\nTraceback of TorchScript ...\n  File \"/src/m.py\"\n"
                          "torch.OutOfMemoryError: out of memory\n", "tb")  # fmt: skip
    assert summary(scripted) == "model 'm' raised OutOfMemoryError: out of memory"
    died = WorkerDiedError("m", 0, 42, -9, "line one\nline two")
    assert summary(died) == "worker 0 of model 'm' (pid 42) was killed by signal 9"
    assert summary(ModelError("m", "Error", "", "")) == "model 'm' raised Error: "


class _BrokenPool:
    """A pool whose model list fails: a bug in the server's reach into it."""

    closed = False
    failure = None

    def models(self) -> list[ModelStatus]:
        raise RuntimeError("a bug\nwith a second line")


def test_an_internal_error_answers_one_line_and_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """Starlette re-raises what its error handler answered; uvicorn would log it again."""
    app = build_app(ServerState(_BrokenPool(), Limits()))  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO):
        status, _, body = asgi_call(app, "GET", "/v2/models/m")  # it does not raise: uvicorn logs nothing
    assert status == 500
    assert json.loads(body) == {"error": "internal error: RuntimeError: a bug"}
    (record,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert record.levelno == logging.ERROR and record.exc_info is not None

"""Helpers for the server tests: a small repository, and the real server as a subprocess."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch
from prometheus_client import parser as prometheus_parser

from tests import models, triton_models
from tests.conftest import children

__all__ = [
    "SPIN_CONFIG",
    "Metrics",
    "ServerProcess",
    "add_model",
    "build_repository",
    "children_of",
    "metrics",
    "model_workers",
    "request",
    "sample",
    "workers_of",
]

ROOT = Path(__file__).resolve().parent.parent

#: the models of tests/data/repository the server tests serve: FP32 with batching and
#: two instances, BYTES, INT32 in two versions, BF16 with BOOL
TRITON_MODELS = ("resnet_classifier", "text_normalizer", "seq2seq_generator", "masked_bf16")

#: an identity model (tests/models.py Identity) on a float32 vector of any length, one instance
IDENTITY_CONFIG = """
name: "identity"
platform: "pytorch_libtorch"
max_batch_size: 0
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ -1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""

#: a model busy for about x[0] * 1.6 µs (tests/models.py Spin), two instances
SPIN_CONFIG = """
name: "spin"
platform: "pytorch_libtorch"
max_batch_size: 0
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 1 ] } ]
instance_group [ { count: 2 kind: KIND_CPU } ]
"""

#: a model whose configuration does not parse: listed as failed, answers 503
BROKEN_CONFIG = (
    'name: "broken"\nplatform: "pytorch_libtorch"\ninput [ { name: "x" data_type: TYPE_FP32 dim: [ 1 ] } ]\n'
)


def build_repository(directory: Path, names: tuple[str, ...] = TRITON_MODELS, *, spin: bool = False,
                     broken: bool = False) -> Path:  # fmt: skip
    """A repository of some models of tests/data/repository (their TorchScript built),
    optionally with the ``spin`` model and a ``broken`` one."""
    repo = directory / "repo"
    repo.mkdir(parents=True)
    for name in names:
        shutil.copytree(triton_models.REPOSITORY / name, repo / name)
    triton_models.build(repo, cuda=False)
    if spin:
        (repo / "spin" / "1").mkdir(parents=True)
        (repo / "spin" / "config.pbtxt").write_text(SPIN_CONFIG)
        shutil.move(str(models.save("spin", repo / "spin" / "1")), str(repo / "spin" / "1" / "model.pt"))
    if broken:
        (repo / "broken" / "1").mkdir(parents=True)
        (repo / "broken" / "config.pbtxt").write_text(BROKEN_CONFIG)
    return repo


def add_model(repo: Path, name: str, config: str, module: torch.nn.Module) -> None:
    """Add model ``name`` to the repository ``repo``: ``config`` as its config.pbtxt,
    ``module`` scripted as its version 1."""
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(config)
    torch.jit.script(module).save(str(repo / name / "1" / "model.pt"))


def _argv(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def workers_of(pid: int) -> set[int]:
    """PIDs of the live workers of the pool in process ``pid``: its children, and the
    children of its template process (``start_method="forkserver"``), not the template."""
    found = set()
    for child in children_of(pid):
        if _argv(child)[1:3] == [b"-m", b"libtorchrt.workers.template"]:
            found |= children_of(child)
        else:
            found.add(child)
    return found


def _serves(pid: int, model: str) -> bool:
    """Whether worker ``pid`` serves ``model``: a fresh one's command line ends with its
    spec; a forked one has the template's, and maps its response arena, named for it."""
    argv = _argv(pid)
    if len(argv) >= 4 and argv[1:3] == [b"-m", b"libtorchrt.workers"]:
        return bool(json.loads(argv[3])["model"] == model)
    try:
        with open(f"/proc/{pid}/maps") as f:
            maps = f.read()
    except OSError:
        return False
    return re.search(rf"memfd:libtorchrt-{re.escape(model)}-\d+-resp\b", maps) is not None


def model_workers(pid: int, model: str) -> set[int]:
    """PIDs of the live workers of ``model`` in the pool of the server ``pid``."""
    return {worker for worker in workers_of(pid) if _serves(worker, model)}


def request(
    address: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request on a connection of its own: status, headers (lower-case names), body."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


#: scraped metrics: (name, sorted labels) -> value
Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metrics(address: str, headers: dict[str, str] | None = None) -> Metrics:
    """Scrape ``http://address/metrics``."""
    status, _, body = request(address, "GET", "/metrics", headers=headers)
    assert status == 200, body
    out = {}
    for family in prometheus_parser.text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(values: Metrics, name: str, **labels: str) -> float:
    """One sample of scraped ``values``."""
    return values[(name, tuple(sorted(labels.items())))]


def children_of(pid: int) -> set[int]:
    """PIDs of the live (non-zombie) children of ``pid``."""
    return children(pid)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class ServerProcess:
    """``python -m libtorchrt.pool`` as a subprocess, its output read line by line.

    gRPC is off unless ``args`` name it (``--grpc 127.0.0.1:0``): its default address
    (127.0.0.1:8001) would be taken by the first of the servers that run at once.

    Args:
        args: the command line after ``python -m libtorchrt.pool``.
        env: extra environment variables.
    """

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        if not any(a.split("=")[0] in ("--grpc", "--grpc-port") for a in args):
            args = (*args, "--grpc", "off")
        self.args = [sys.executable, "-m", "libtorchrt.pool", *args]
        self.proc = subprocess.Popen(
            self.args,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.http = ""
        self.grpc = ""
        self.metrics = ""
        self.zmq = ""

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        """The first line (from now on) matching ``pattern``.

        Raises:
            AssertionError: the server exited or ``timeout`` passed first.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self._queue.get(timeout=max(left, 0.01))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n{self.output}") from None
            if line is None:
                self._queue.put(None)
                raise AssertionError(f"the server exited ({self.proc.wait()}) before {pattern!r}:\n{self.output}")
            m = regex.search(line)
            if m:
                return m

    def wait_ready(self, timeout: float = 120.0) -> ServerProcess:
        """Wait for the banner; set :attr:`http`, :attr:`grpc` and :attr:`metrics`
        (host:port) and :attr:`zmq` (the endpoint)."""
        self.wait_for(r"libtorchrt-pool \S+ ready", timeout)
        while True:
            try:  # the banner is one write: its lines are queued together
                line = self._queue.get(timeout=1)
            except queue.Empty:
                break
            assert line is not None, self.output
            m = re.match(r"\s+(HTTP|gRPC|metrics|ZeroMQ)\s+(\S+)", line)
            if not m:
                self._queue.put(line)  # not the banner's: leave it for later waits
                break
            if m.group(1) == "HTTP":
                self.http = m.group(2).removeprefix("http://")
            elif m.group(1) == "gRPC":
                self.grpc = m.group(2)
            elif m.group(1) == "ZeroMQ":
                self.zmq = m.group(2)
            elif m.group(1) == "metrics":
                self.metrics = m.group(2).removeprefix("http://").removesuffix("/metrics")
            if line.lstrip().startswith("metrics"):
                break
        return self

    def workers(self) -> set[int]:
        return workers_of(self.proc.pid)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send ``sig``; return the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout: float = 60.0) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"the server did not exit within {timeout} s:\n{self.output}") from None
        self._reader.join(10)
        return code

    def kill(self) -> None:
        """For teardown: make sure the process is gone (SIGKILL after a SIGTERM)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def asgi_call(
    app: Callable[..., Awaitable[None]], method: str, path: str, body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    """One request to an ASGI ``app`` directly, without a server: status, headers
    (lower-case names), body. For the application's behaviour in states a real server
    passes through too quickly to probe (no pool yet, a broken pool, draining)."""
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.Event().wait()  # (the client stays until it has its response)
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-length", str(len(body)).encode())], "server": ("127.0.0.1", 80),
             "client": ("127.0.0.1", 1)}  # fmt: skip
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))
    headers = {k.decode().lower(): v.decode() for k, v in sent[0].get("headers", [])}
    return sent[0]["status"], headers, b"".join(m.get("body", b"") for m in sent[1:])

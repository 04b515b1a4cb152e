"""Every Python example in README.md and docs/*.md runs, so that none drifts again.

A block fenced ```` ```python ```` is run as it is written, in a fresh namespace, from a
working directory holding what the examples name: a model repository ``models/``
(``tiny``, ``resnet`` in versions 1 and 2) and the files ``tiny.pt`` and
``tokenize.pt``. Top-level ``await`` runs as the README says (as at the prompt of
``python -m asyncio``). A block that talks to ``http://127.0.0.1:8000`` (or to gRPC on
``127.0.0.1:8001``) runs against a real ``libtorchrt-pool`` serving that repository (at
the address it really got).
Blocks fenced ```` ```python norun ```` are signatures or need a cluster; they are
listed here so that a new block is run unless it says why not.
"""

from __future__ import annotations

import ast
import asyncio
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests import models
from tests.server_util import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.S | re.M)

RESNET = """name: "resnet"
platform: "pytorch_libtorch"
max_batch_size: 8
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 3, -1, -1 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""
TINY = """name: "tiny"
platform: "pytorch_libtorch"
max_batch_size: 8
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 64 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 64 ] } ]
"""


class _Resnet(torch.nn.Module):
    """A stand-in for the docs' "resnet": images in, four class scores out."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))


class _Upper(torch.nn.Module):
    def forward(self, text: list[str]) -> list[str]:
        return [s.upper() for s in text]


def _blocks() -> list[tuple[str, int, str, str]]:
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in FENCE.finditer(text):
            line = text[: m.start()].count("\n") + 1
            out.append((f"{path.relative_to(ROOT)}:{line}", line, m.group(1).strip(), m.group(2)))
    return out


BLOCKS = _blocks()
RUNNABLE = [b for b in BLOCKS if b[2] != "norun"]


def _script(module: torch.nn.Module, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(module).save(str(path))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("docs")
    repo = root / "models"
    for name, config, module, versions in (
        ("tiny", TINY, models.Tiny(), (1,)),
        ("resnet", RESNET, _Resnet(), (1, 2)),
    ):
        (repo / name).mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(config)
        for v in versions:
            (repo / name / str(v)).mkdir()
            _script(module, repo / name / str(v) / "model.pt")
    shutil.copy(repo / "tiny" / "1" / "model.pt", root / "tiny.pt")
    _script(_Upper(), root / "tokenize.pt")
    return root


@pytest.fixture(scope="module")
def server(workspace: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess("--model-repository", str(workspace / "models"), "--http", "127.0.0.1:0", "--grpc",
                         "127.0.0.1:0", "--grace", "1")  # fmt: skip
    try:
        yield proc.wait_ready()
    finally:
        proc.kill()


def test_every_python_block_is_run_or_says_why_not() -> None:
    assert len(RUNNABLE) >= 6, [b[0] for b in RUNNABLE]
    for where, _, info, _code in BLOCKS:
        assert info in ("", "norun"), f"{where}: unknown fence info {info!r} (use 'python' or 'python norun')"


@pytest.mark.parametrize("block", RUNNABLE, ids=[b[0] for b in RUNNABLE])
def test_the_example_runs(
    block: tuple[str, int, str, str], workspace: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    where, line, _, code = block
    if "127.0.0.1:8000" in code or "127.0.0.1:8001" in code:
        server = request.getfixturevalue("server")
        code = code.replace("127.0.0.1:8000", server.http).replace("127.0.0.1:8001", server.grpc)
    monkeypatch.chdir(workspace)
    # The block's own lines, numbered as in the file, for tracebacks.
    compiled = compile(
        "\n" * line + code, os.fspath(ROOT / where.rsplit(":", 1)[0]), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    )
    namespace: dict[str, object] = {"__name__": "__docs__"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # (torch.jit in the examples)
        warnings.simplefilter("ignore", RuntimeWarning)
        result = eval(compiled, namespace)  # a coroutine when the block awaits
        if asyncio.iscoroutine(result):
            asyncio.run(result)

"""PyTorch 2 artifacts that the tests build themselves (no files are shipped): an
AOTInductor package, ``torch.export`` programs and ``model.py`` directories of small
models, and broken variants of each.

AOTInductor compiles C++ for about 10-40 s on a small machine, so :func:`build` compiles
ONE package per test session (the ``pt2_artifacts`` fixture in ``tests/conftest.py``,
through :func:`build_once`, which pytest-xdist's workers share); the broken packages are
derived from it by rewriting its zip, which costs nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import shutil
import sys
import textwrap
import time
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from torch import Tensor, nn

__all__ = [
    "BATCH_MAX",
    "INPUT_PATHS",
    "OUTPUT_PATHS",
    "MultiIO",
    "Pt2Artifacts",
    "build",
    "build_repository",
    "load_python_model",
    "multiio",
    "multiio_expected",
    "multiio_inputs",
]

#: the batch dimension's range the programs are exported with
BATCH_MIN, BATCH_MAX = 1, 64
#: rows of the example inputs torch.export traces with (not 0 or 1, which specialize)
EXAMPLE_ROWS = 3


class MultiIO(nn.Module):
    """Two positional inputs and one keyword-only input; a dict holding a tensor and a
    nested tuple out: every kind of call-spec path (``ARGS[i]``, ``KWARGS[key]``,
    ``RESULT[key]``, ``RESULT[key][i]``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 3)

    def forward(self, x: Tensor, y: Tensor, *, scale: Tensor) -> dict[str, Any]:
        logits = self.linear(x) * scale
        return {"logits": logits, "pair": (logits + y.sum(dim=1, keepdim=True), x.sum(dim=1))}


#: MultiIO's inputs and outputs, named by its call specification
INPUT_PATHS = ("ARGS[0]", "ARGS[1]", "KWARGS[scale]")
OUTPUT_PATHS = ("RESULT[logits]", "RESULT[pair][0]", "RESULT[pair][1]")


def multiio_expected(module: MultiIO, x: Tensor, y: Tensor, scale: Tensor) -> dict[str, Tensor]:
    """The eager module's result, its leaves keyed by their call-spec paths."""
    with torch.no_grad():
        out = module(x, y, scale=scale)
    return dict(zip(OUTPUT_PATHS, (out["logits"], out["pair"][0], out["pair"][1])))


def multiio_inputs(rows: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``x`` [rows, 4], ``y`` [rows, 3], ``scale`` [rows, 1], float32, from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 4, generator=g), torch.randn(rows, 3, generator=g), torch.randn(rows, 1, generator=g)


def multiio(state_dict: Path) -> MultiIO:
    """The eager module with the weights the artifacts were built from (for expected outputs)."""
    module = MultiIO()
    module.load_state_dict(torch.load(state_dict, weights_only=True))
    return module.eval()


# -- model.py directories ---------------------------------------------------------------

#: pre- and post-processing in the instance: words in, features made from their text, a
#: linear layer, a score per word and a label per word out
TEXT_MODEL = """
import torch
from torch import nn


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, words: list[str], bias: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        features = torch.tensor([[float(len(w)), float(w.count("a")), 1.0] for w in words])
        scores = self.linear(features) + bias
        labels = [f"{w}:{'high' if s > 0 else 'low'}" for w, s in zip(words, scores[:, 0].tolist())]
        return scores, labels
"""

#: a plain tensor model (served with a batch dimension)
PLAIN_MODEL = """
import torch
from torch import nn


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x)) * 2
"""

#: a linear layer only: Inductor compiles it to a call of an extern kernel (addmm) and
#: no C++ of its own, in about 1 s here (a pointwise op more costs a C++ compilation,
#: 10-15 s on 2 cores)
LINEAR_MODEL = """
import torch
from torch import nn


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)
"""

#: fails on its third line, at import
RAISES_AT_IMPORT = """
import torch

SIZE = int("four")


class Model(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
"""


#: counts its calls: what it returns tells how many warm-up runs came first
COUNTER_MODEL = """
import torch
from torch import nn


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x + self.calls
"""


@dataclass(frozen=True)
class Pt2Artifacts:
    """Paths of the session's artifacts (see :func:`build`)."""

    root: Path
    #: MultiIO's weights (a state dict), for expected outputs: ``multiio(state_dict)``
    state_dict: Path
    #: MultiIO as an AOTInductor package for the CPU, dynamic batch 1..64
    aoti: Path
    #: MultiIO as a torch.export program, dynamic batch 1..64
    exported: Path
    #: MultiIO exported with a static batch of EXAMPLE_ROWS (no Dim)
    exported_static: Path
    #: ``aoti`` whose metadata claims AOTI_DEVICE_KEY "cuda"
    aoti_wrong_device: Path
    #: ``aoti`` cut in half
    aoti_corrupt: Path
    #: model.py directories: strings and tensors in and out (weights in model.pt);
    #: a plain tensor model (weights in model.pt); a linear layer (weights in model.pt,
    #: cheap to compile with Inductor); one that raises at import; the plain model with
    #: a model.pt that does not match it; a model that counts its calls
    py_text: Path
    py_plain: Path
    py_linear: Path
    py_raises: Path
    py_mismatch: Path
    py_counter: Path
    #: the Inductor cache the package was compiled with, for the tests' pools
    #: (``Pool(compile_cache=...)``): it holds the build of Inductor's probe of the
    #: CPU's vector instructions, which loading a package runs too (a C++ compilation
    #: of some seconds in every worker that finds the cache cold)
    compile_cache: Path
    #: seconds the AOTInductor compilation took, and the whole build
    aoti_seconds: float
    build_seconds: float


def _export(module: nn.Module, dynamic: bool) -> Any:
    x, y, scale = multiio_inputs(EXAMPLE_ROWS)
    shapes = None
    if dynamic:
        batch = torch.export.Dim("batch", min=BATCH_MIN, max=BATCH_MAX)
        shapes = {"x": {0: batch}, "y": {0: batch}, "scale": {0: batch}}
    return torch.export.export(module, (x, y), {"scale": scale}, dynamic_shapes=shapes)


@contextlib.contextmanager
def _inductor_cache(directory: Path) -> Iterator[None]:
    """Point this process's Inductor at ``directory`` for a while. (Inductor sets
    ``TORCHINDUCTOR_CACHE_DIR`` in ``os.environ`` itself when it is not set: the
    previous state is restored, whatever it was.)"""
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = before


def _rewrite_device(package: Path, out: Path, device: str) -> None:
    """Copy ``package`` to ``out`` with every ``*_metadata.json`` claiming ``device``."""
    with zipfile.ZipFile(package) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("_metadata.json"):
                meta = json.loads(data)
                meta["AOTI_DEVICE_KEY"] = device
                data = json.dumps(meta).encode()
            dst.writestr(item, data)


def _linear_state(n_in: int, n_out: int, seed: int) -> dict[str, Tensor]:
    """The state dict of a module whose one layer is ``linear = nn.Linear(n_in, n_out)``."""
    torch.manual_seed(seed)
    return {f"linear.{k}": v for k, v in nn.Linear(n_in, n_out).state_dict().items()}


def _python_dir(root: Path, name: str, source: str, weights: dict[str, Tensor] | None) -> Path:
    directory = root / name
    directory.mkdir()
    (directory / "model.py").write_text(textwrap.dedent(source).lstrip())
    if weights is not None:
        torch.save(weights, directory / "model.pt")
    return directory


def build(root: Path) -> Pt2Artifacts:
    """Build every artifact into ``root`` (one AOTInductor compilation)."""
    start = time.monotonic()
    module = MultiIO().eval()
    state_dict = root / "multiio_state.pt"
    torch.save(module.state_dict(), state_dict)
    compile_cache = root / "compile-cache"
    with torch.no_grad(), _inductor_cache(compile_cache):
        program = _export(module, dynamic=True)
        exported = root / "multiio_exported.pt2"
        torch.export.save(program, exported)
        exported_static = root / "multiio_static.pt2"
        torch.export.save(_export(module, dynamic=False), exported_static)
        aoti = root / "multiio_aoti.pt2"
        compile_start = time.monotonic()
        with warnings.catch_warnings():
            # (torch's own deprecation, inside the packager)
            warnings.filterwarnings("ignore", "`isinstance\\(treespec, LeafSpec\\)` is deprecated", FutureWarning)
            torch._inductor.aoti_compile_and_package(program, package_path=str(aoti))
        aoti_seconds = time.monotonic() - compile_start

    wrong_device = root / "multiio_cuda_claimed.pt2"
    _rewrite_device(aoti, wrong_device, "cuda")
    corrupt = root / "multiio_truncated.pt2"
    data = aoti.read_bytes()
    corrupt.write_bytes(data[: len(data) // 2])

    text = _python_dir(root, "py_text", TEXT_MODEL, _linear_state(3, 2, seed=1))
    plain = _python_dir(root, "py_plain", PLAIN_MODEL, _linear_state(4, 3, seed=2))
    linear = _python_dir(root, "py_linear", LINEAR_MODEL, _linear_state(4, 3, seed=4))
    raises = _python_dir(root, "py_raises", RAISES_AT_IMPORT, None)
    counter = _python_dir(root, "py_counter", COUNTER_MODEL, None)
    # PLAIN_MODEL's state dict has linear.weight [3, 4]: one of [3, 5], and a key too many
    mismatch = _python_dir(root, "py_mismatch", PLAIN_MODEL, {**_linear_state(5, 3, seed=3), "extra": torch.ones(1)})
    return Pt2Artifacts(
        root=root,
        state_dict=state_dict,
        aoti=aoti,
        exported=exported,
        exported_static=exported_static,
        aoti_wrong_device=wrong_device,
        aoti_corrupt=corrupt,
        py_text=text,
        py_plain=plain,
        py_linear=linear,
        py_raises=raises,
        py_mismatch=mismatch,
        py_counter=counter,
        compile_cache=compile_cache,
        aoti_seconds=aoti_seconds,
        build_seconds=time.monotonic() - start,
    )


def build_once(root: Path) -> Pt2Artifacts:
    """What :func:`build` made in ``root``, built by the first caller of any process (the
    test session's xdist workers share one ``root``) while the others wait on a lock."""
    record = root / "artifacts.json"
    with FileLock(f"{root}.lock"):
        if not record.exists():
            root.mkdir(parents=True, exist_ok=True)
            built = build(root)
            fields = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(built).items()}
            record.write_text(json.dumps(fields))
    fields = json.loads(record.read_text())  # (paths as strings, timings as numbers)
    return Pt2Artifacts(**{k: Path(v) if isinstance(v, str) else v for k, v in fields.items()})


def load_python_model(directory: Path) -> nn.Module:
    """Import ``directory/model.py`` in this process, under a name of its own, and load
    its ``model.pt``: the eager reference for a served ``model.py``."""
    name = f"pt2_models_reference_{directory.name}"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, directory / "model.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    model: nn.Module = module.Model()
    model.load_state_dict(torch.load(directory / "model.pt", weights_only=True))
    return model.eval()


# -- a repository on disk ----------------------------------------------------------------

#: the package, batched, declaring two of its three outputs, in another order than the
#: model returns them (Triton's dims: without the batch dimension)
AOTI_CONFIG = """
name: "multiio_aoti"
platform: "torch_aoti"
max_batch_size: 8
input [
  { name: "ARGS[0]" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "ARGS[1]" data_type: TYPE_FP32 dims: [ 3 ] },
  { name: "KWARGS[scale]" data_type: TYPE_FP32 dims: [ 1 ] }
]
output [
  { name: "RESULT[pair][0]" data_type: TYPE_FP32 dims: [ 3 ] },
  { name: "RESULT[logits]" data_type: TYPE_FP32 dims: [ 3 ] }
]
dynamic_batching { max_queue_delay_microseconds: 1000 }
instance_group [ { count: 1 kind: KIND_CPU } ]
"""

#: the exported program, its format found from the file; nothing declared
EXPORTED_CONFIG = """
name: "multiio_exported"
backend: "pytorch"
default_model_filename: "model.pt2"
max_batch_size: 0
"""

#: Triton's Python-based runtime (model.py and its model.pt): strings in and out
PYTHON_CONFIG = """
name: "words"
runtime: "model.py"
max_batch_size: 0
input [
  { name: "words" data_type: TYPE_STRING dims: [ -1 ] },
  { name: "bias" data_type: TYPE_FP32 dims: [ -1, 2 ] }
]
output [
  { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ -1, 2 ] },
  { name: "OUTPUT__1" data_type: TYPE_STRING dims: [ -1 ] }
]
"""


def build_repository(artifacts: Pt2Artifacts, root: Path) -> Path:
    """A Triton-style repository under ``root`` of one model per format:
    ``multiio_aoti`` (``platform: "torch_aoti"``, ``1/model.pt2``), ``multiio_exported``
    (``default_model_filename: "model.pt2"``) and ``words`` (``runtime: "model.py"``,
    ``1/model.py`` and ``1/model.pt``: TEXT_MODEL)."""
    a = artifacts
    for name, config, files in [
        ("multiio_aoti", AOTI_CONFIG, {"model.pt2": a.aoti}),
        ("multiio_exported", EXPORTED_CONFIG, {"model.pt2": a.exported}),
        ("words", PYTHON_CONFIG, {"model.py": a.py_text / "model.py", "model.pt": a.py_text / "model.pt"}),
    ]:
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(textwrap.dedent(config).lstrip())
        for filename, source in files.items():
            shutil.copy(source, root / name / "1" / filename)
    return root

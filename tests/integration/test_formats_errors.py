"""PyTorch 2 models that cannot be served, through a real Pool: a package for another
device, a corrupt package, the wrong format for the file, a batch size over the export's
or a static one, a warm-up the package refuses, a name not in the call spec, a
``model.py`` that raises at import, a state dict that does not match; each fails its
model with a message that says why (or a strict pool, with WorkerStartError). And the
parameters a format ignores (ConfigError), and ``torch.compile`` with the pool's
compile cache."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from libtorchrt import ConfigError, ModelConfig, ModelUnavailableError, Pool, TensorSpec, WorkerStartError
from tests.conftest import closing_pool
from tests.pt2_models import Pt2Artifacts, load_python_model, multiio, multiio_expected, multiio_inputs

pytestmark = pytest.mark.timeout(240)  # (the first test to ask builds the artifacts: one AOTI compilation)

#: the declared inputs of MultiIO, but for ARGS[0]'s 5 columns where the package takes 4
WRONG_WIDTH = (
    TensorSpec("ARGS[0]", "float32", [5]),
    TensorSpec("ARGS[1]", "float32", [3]),
    TensorSpec("KWARGS[scale]", "float32", [1]),
)

#: model -> what its start error says
REFUSED = {
    "cuda_claimed": ["compiled for 'cuda'", "runs on 'cpu'", "KIND_GPU"],
    "corrupt": ["not a valid AOTInductor package", "truncated or corrupt"],
    "exported_as_aoti": ["not a valid AOTInductor package", "torch.export program", "format 'exported'"],
    "over_max": ["max_batch_size is 128", "at most 64"],
    "static": ["static first dimension 3", "torch.export.Dim"],
    "bad_warmup": ["warm-up failed", "unmatched dim value at 1, expected: 4"],
    "unknown_input": ["'ARGS[7]' is not in the model's call specification", "KWARGS[scale]"],
    "raises": ["importing", "model.py failed at line 3", 'SIZE = int("four")', "ValueError", "'four'"],
    "mismatch": [
        "model.pt does not match Model",
        "unexpected keys (1): extra",
        "linear.weight is [3, 5], expected [3, 4]",
    ],
}


@pytest.fixture(scope="module")
def cache(pt2_artifacts: Pt2Artifacts) -> Path:
    """The pools' compile cache: the session's, warm (not the per-user default: tests
    write in tmp only)."""
    return pt2_artifacts.compile_cache


@pytest.fixture(scope="module")
def pool(pt2_artifacts: Pt2Artifacts, cache: Path) -> Iterator[Pool]:
    """A pool (not strict) of one good model and every artifact it cannot serve."""
    a = pt2_artifacts
    models = [
        ModelConfig("good", a.aoti),
        ModelConfig("cuda_claimed", a.aoti_wrong_device),
        ModelConfig("corrupt", a.aoti_corrupt, format="aoti"),
        ModelConfig("exported_as_aoti", a.exported, format="aoti"),
        ModelConfig("over_max", a.aoti, max_batch_size=128),
        ModelConfig("static", a.exported_static, max_batch_size=8),
        # The front lets the warm-up request through (it fits the declared [5]); the
        # package's own input checks refuse it, in the worker, before it is ready.
        ModelConfig("bad_warmup", a.aoti, inputs=WRONG_WIDTH, max_batch_size=4, warmup_runs=1),
        ModelConfig("unknown_input", a.aoti, inputs=(TensorSpec("ARGS[7]", "float32", [4]),)),
        ModelConfig("raises", a.py_raises / "model.py"),
        ModelConfig("mismatch", a.py_mismatch / "model.py"),
    ]
    with pytest.warns(RuntimeWarning, match="not served"), closing_pool(models=models, compile_cache=cache) as p:
        yield p


@pytest.mark.parametrize("model", list(REFUSED))
def test_what_cannot_be_served_fails_its_model_only(pool: Pool, pt2_artifacts: Pt2Artifacts, model: str) -> None:
    statuses = {s.name: s for s in pool.models()}
    status = statuses[model]
    assert status.state == "failed" and status.error is not None
    for part in REFUSED[model]:
        assert part in status.error, status.error
    x, y, scale = multiio_inputs(2)
    with pytest.raises(ModelUnavailableError):
        pool.infer(model, [x, y, scale], timeout=30)
    assert statuses["good"].state == "ready"
    want = multiio_expected(multiio(pt2_artifacts.state_dict), x, y, scale)
    assert_close(pool.infer("good", [x, y, scale], timeout=30), want)


def test_a_package_for_another_device_fails_a_strict_pool(
    pt2_artifacts: Pt2Artifacts, cache: Path, no_leaks: None
) -> None:
    with pytest.raises(WorkerStartError) as info:
        Pool(models=[ModelConfig("cuda_claimed", pt2_artifacts.aoti_wrong_device)], strict=True, compile_cache=cache)
    message = str(info.value)
    assert "compiled for 'cuda'" in message and "runs on 'cpu'" in message, message
    assert info.value.model == "cuda_claimed"


@pytest.mark.parametrize(
    ("fmt", "key"),
    [
        ("aoti", "FREEZE_MODULE"),
        ("aoti", "DISABLE_OPTIMIZED_EXECUTION"),
        ("aoti", "TORCH_COMPILE_OPTIONAL_PARAMETERS"),
        ("exported", "OPTIMIZE_FOR_INFERENCE"),
        ("python", "FREEZE_MODULE"),
        ("python", "ENABLE_TENSOR_FUSER"),
    ],
)
def test_a_parameter_the_format_ignores_is_a_config_error(pt2_artifacts: Pt2Artifacts, fmt: str, key: str) -> None:
    a = pt2_artifacts
    path = {"aoti": a.aoti, "exported": a.exported, "python": a.py_plain / "model.py"}[fmt]
    value = '{"backend": "eager"}' if key == "TORCH_COMPILE_OPTIONAL_PARAMETERS" else "true"
    with pytest.raises(ConfigError) as info:
        ModelConfig("m", path, parameters={key: value})
    assert key in str(info.value) and f"format {fmt!r}" in str(info.value), str(info.value)
    assert info.value.key == key


def test_torch_compile_with_inductor_fills_the_compile_cache(
    pt2_artifacts: Pt2Artifacts, tmp_path: Path, no_leaks: None
) -> None:
    """The one test that pays for an Inductor compilation (in the warm-up run): of a
    linear layer, about 1 s here; a model with a pointwise op takes 10-15 s (C++)."""
    # A copy of the session's cache (warm for what every PT2 worker does at start):
    # what appears in it is this model's.
    cache = shutil.copytree(pt2_artifacts.compile_cache, tmp_path / "compile-cache")
    before = {p for p in cache.rglob("*") if p.is_file()}
    config = ModelConfig(
        "compiled",
        pt2_artifacts.py_linear / "model.py",
        inputs=[TensorSpec("x", "float32", [3, 4])],
        parameters={"TORCH_COMPILE_OPTIONAL_PARAMETERS": json.dumps({"backend": "inductor", "dynamic": False})},
        warmup_runs=1,
        # one compile thread: no pool of compile processes to start, on 2 cores
        env={"TORCHINDUCTOR_COMPILE_THREADS": "1"},
    )
    with Pool(models=[config], compile_cache=cache, strict=True) as pool:
        (worker,) = pool.workers()
        assert worker.flags["FORMAT"] == "python"
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            want = load_python_model(pt2_artifacts.py_linear)(x)
        assert_close(pool.infer("compiled", {"x": x}, timeout=60)["OUTPUT__0"], want)
    # Inductor wrote its graph where the pool pointed it (its FX graph cache and the
    # generated code), not in its default /tmp/torchinductor_<user>.
    new = {p for p in cache.rglob("*") if p.is_file()} - before
    assert "fxgraph" in {p.relative_to(cache).parts[0] for p in new}, sorted(map(str, new))
    assert any(p.suffix == ".py" for p in new), sorted(map(str, new))

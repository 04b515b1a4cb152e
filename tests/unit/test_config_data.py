"""The committed configurations: ``tests/data/repository`` (good) and ``tests/data/bad``.

Each good configuration parses, round-trips through ``to_pbtxt``, and, once
``tests/triton_models.py`` has built its models into a copy, loads as a repository
whose models compute their examples and take their own warm-up requests. Each bad
configuration fails with the field and line written below.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from libtorchrt import ConfigError, ModelConfig
from libtorchrt.config import load_repository
from libtorchrt.config.pbtxt import parse
from libtorchrt.workers import flags
from tests import triton_models

DATA = Path(__file__).resolve().parents[1] / "data"
GOOD = sorted(p.name for p in (DATA / "repository").iterdir() if (p / "config.pbtxt").is_file())
BAD = sorted(p.name for p in (DATA / "bad").glob("*.pbtxt"))

#: bad file -> (line, error key, words of the message)
EXPECTED: dict[str, tuple[int, str, str]] = {
    "bad_flag_value.pbtxt": (12, "INFERENCE_MODE", "'maybe'"),
    "batch_input.pbtxt": (6, "batch_input", "not supported"),
    "decoupled.pbtxt": (7, "model_transaction_policy.decoupled", "decoupled models"),
    "ensemble.pbtxt": (6, "ensemble_scheduling", "ensembles are not served"),
    "latest_zero_versions.pbtxt": (5, "version_policy.latest.num_versions", "num_versions is 0"),
    "missing_dims.pbtxt": (6, "output", "must give dims"),
    "misspelt_dims.pbtxt": (8, "dim", "ModelInput has no field 'dim'"),
    "nchw_two_dims.pbtxt": (8, "input.format", "FORMAT_NCHW needs 3 dims"),
    "negative_count.pbtxt": (7, "instance_group.count", "count is -1"),
    "onnx_platform.pbtxt": (2, "platform", "'onnxruntime_onnx' is not served"),
    "preferred_too_big.pbtxt": (8, "dynamic_batching.preferred_batch_size", "[64] exceeds max_batch_size 32"),
    "priority_out_of_range.pbtxt": (8, "dynamic_batching.default_priority_level", "expected 1..2"),
    "python_runtime.pbtxt": (9, "FREEZE_MODULE", "does not apply to format 'python'"),
    "ragged_batch.pbtxt": (9, "input.allow_ragged_batch", "allow_ragged_batch"),
    "reshape_mismatch.pbtxt": (9, "input.reshape", "reshape [8] does not hold the elements of dims [4, 4]"),
    "sequence_control_declared.pbtxt": (10, "sequence_batching", "'START__1' is both a declared input"),
    "shape_tensor.pbtxt": (15, "input.is_shape_tensor", "input 'image_shape'"),
    "tensorrt_profile.pbtxt": (10, "instance_group.profile", "TensorRT"),
    "uint64_input.pbtxt": (7, "input.data_type", "'TYPE_UINT64' is not supported"),
    "warmup_absolute_path.pbtxt": (15, "model_warmup.inputs.token_ids.input_data_file", "must be a relative path"),
    "warmup_batch_without_batching.pbtxt": (9, "model_warmup.batch_size", "max_batch_size 0 takes batch_size 1"),
    "warmup_dtype_mismatch.pbtxt": (13, "model_warmup.inputs.INPUT__0.data_type", "the model declares float16"),
    "warmup_unknown_input.pbtxt": (10, "model_warmup.inputs.input", "does not declare"),
    "warmup_variable_dims.pbtxt": (13, "model_warmup.inputs.INPUT__0.dims", "no -1"),
    "zero_dim.pbtxt": (8, "input.dims", "dims [0, 3]"),
}


def _read(model: str) -> ModelConfig:
    d = DATA / "repository" / model
    return parse((d / "config.pbtxt").read_text(), str(d / "config.pbtxt"), d)


# ------------------------------------------------------------------------- bad


def test_every_bad_file_has_an_expectation() -> None:
    assert set(BAD) == set(EXPECTED)
    assert len(BAD) >= 15


@pytest.mark.parametrize("case", BAD)
def test_bad_config_names_its_field_and_line(case: str) -> None:
    path = DATA / "bad" / case
    line, key, words = EXPECTED[case]
    with pytest.raises(ConfigError) as e:
        parse(path.read_text(), str(path))
    text = str(e.value)
    assert text.startswith(f"{path}:{line}:"), text
    assert e.value.key == key
    assert words in text


# ------------------------------------------------------------------------ good


def test_there_are_enough_realistic_configurations() -> None:
    assert len(GOOD) >= 15
    assert set(GOOD) == set(triton_models.RECIPES)


@pytest.mark.parametrize("model", GOOD)
def test_good_config_parses_and_round_trips(model: str) -> None:
    cfg = _read(model)
    assert cfg.name == model
    again = ModelConfig.from_pbtxt(cfg.to_pbtxt())
    assert again == cfg
    assert again.to_pbtxt() == cfg.to_pbtxt()


@pytest.mark.parametrize(
    ("model", "words"),
    [
        ("resnet_classifier", []),  # label_filename is used (classification)
        ("yolo_detector", ["optimization { cuda, input_pinned_memory, output_pinned_memory } is ignored"]),
        ("gpu_segmenter", ["response_cache is ignored"]),
        ("masked_bf16", ["metric_tags {'team': 'search'} are ignored"]),
        ("multi_group", ["'cpu_pool': rate_limiter is ignored", "'anywhere': host_policy 'numa0' is ignored"]),
        ("optional_bias", []),  # response_cache { enable: false } changes nothing
        ("seq2seq_generator", []),  # decoupled: false changes nothing
    ],
)
def test_fields_that_mean_nothing_here_are_noted(model: str, words: list[str]) -> None:
    notes = _read(model).notes
    assert len(notes) == len(words), notes
    for note, want in zip(notes, words):
        assert want in note


def test_the_data_covers_the_features() -> None:
    cfgs = {m: _read(m) for m in GOOD}
    kinds = {g.kind for c in cfgs.values() for g in c.instance_groups}
    assert kinds == {"KIND_AUTO", "KIND_CPU", "KIND_GPU"}
    assert {c.version_policy.kind for c in cfgs.values()} == {"latest", "all"}
    assert any(s.is_string for c in cfgs.values() for s in (*c.inputs, *c.outputs))
    assert any(s.reshape == () for c in cfgs.values() for s in c.inputs)
    assert any(s.optional for c in cfgs.values() for s in c.inputs)
    assert any(-1 in (s.dims or ()) for c in cfgs.values() for s in c.inputs)
    sources = {
        ("file" if i.input_data_file else "random" if i.random_data else "zero")
        for c in cfgs.values()
        for w in c.warmup
        for i in w.inputs.values()
    }
    assert sources == {"zero", "random", "file"}
    assert any(c.warmup_runs for c in cfgs.values())
    assert any(c.dynamic_batching and c.dynamic_batching.priority_queue_policy for c in cfgs.values())
    params = {k for c in cfgs.values() for k in c.parameters}
    assert {"FREEZE_MODULE", "OPTIMIZE_FOR_INFERENCE", "CUDA_LAUNCH_BLOCKING", "MODULE_METHOD_NAME"} <= params
    assert cfgs["legacy_noname"].name == "legacy_noname"  # from the directory
    assert cfgs["gpu_segmenter"].env == {"CUDA_LAUNCH_BLOCKING": "1"}


# ------------------------------------------------------------ built repository


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[ModelConfig]]:
    repo = tmp_path_factory.mktemp("triton") / "repo"
    shutil.copytree(DATA / "repository", repo)
    assert triton_models.build(repo, cuda=True) == GOOD
    return repo, load_repository(repo)


def test_built_repository_serves_the_versions_of_each_policy(built: tuple[Path, list[ModelConfig]]) -> None:
    repo, cfgs = built
    versions: dict[str, list[int]] = {}
    for cfg in cfgs:
        versions.setdefault(cfg.name, []).append(cfg.version)
        assert Path(cfg.path) == repo / cfg.name / str(cfg.version) / Path(cfg.path).name
    assert versions == {name: list(r.served) for name, r in triton_models.RECIPES.items()}


def test_build_without_cuda_leaves_out_the_gpu_models(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(DATA / "repository", repo)
    gpu = {n for n, r in triton_models.RECIPES.items() if r.gpu}
    assert gpu
    assert triton_models.build(repo, cuda=False) == sorted(set(GOOD) - gpu)
    assert not any((repo / n).exists() for n in gpu)


def _run(cfg: ModelConfig, module: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """Call a model the way Triton's PyTorch backend binds it (a stand-in for the pool)."""
    batched = cfg.max_batch_size > 0
    args = []
    for spec in cfg.inputs:
        if spec.name not in inputs:
            assert spec.optional, spec.name
            continue
        value = inputs[spec.name]
        if isinstance(value, torch.Tensor):
            value = value.reshape(spec.model_shape(value.shape, batched))
        args.append(value)
    fn = getattr(module, cfg.method)
    as_dict = triton_models.RECIPES[cfg.name].dict_input
    out = fn({s.name: a for s, a in zip(cfg.inputs, args)}) if as_dict else fn(*args)
    outs = out if isinstance(out, tuple) else (out,)
    result = {}
    for spec, value in zip(cfg.outputs, outs):
        if isinstance(value, torch.Tensor) and spec.reshape is not None:
            value = value.reshape((value.shape[0], *(spec.dims or ())) if batched else tuple(spec.dims or ()))
        result[spec.name] = value
    return result


def _load(cfg: ModelConfig) -> Any:
    module = torch.jit.load(str(cfg.path))
    return flags.prepare(module, cfg.flags, method=cfg.method, model=cfg.name)


def test_built_models_compute_their_examples(built: tuple[Path, list[ModelConfig]]) -> None:
    for cfg in built[1]:
        inputs, expected = triton_models.example(cfg.name, cfg.version)
        with torch.inference_mode():
            got = _run(cfg, _load(cfg), inputs)
        triton_models.check(f"{cfg.name}/{cfg.version}", got, expected)


def test_models_in_directories_that_are_not_versions_are_not_served(built: tuple[Path, list[ModelConfig]]) -> None:
    repo, cfgs = built
    for name in ("0", "03", "v3", "latest"):
        assert (repo / "legacy_noname" / name / "model.pt").is_file()
    (cfg,) = [c for c in cfgs if c.name == "legacy_noname"]
    assert cfg.version == 2 and cfg.path == repo / "legacy_noname" / "2" / "model.pt"


def test_warmup_requests_run_through_the_built_models(built: tuple[Path, list[ModelConfig]]) -> None:
    ran = {}
    for cfg in built[1]:
        module = _load(cfg)
        requests = cfg.warmup_requests()
        assert len(requests) == cfg.warmup_count
        with torch.inference_mode():
            for request in requests:
                _run(cfg, module, request)
        ran[cfg.name] = len(requests)
    assert ran["token_embedding"] == 1 + 3 + 1  # file sample, zero sample x count 3, WARMUP_RUNS 1
    assert ran["yolo_detector"] == 2 and ran["scalar_affine"] == 2 and ran["text_normalizer"] == 1
    assert ran["mnist_uint8"] == 1 and ran["resnet_classifier"] == 0


def test_warmup_file_data_is_what_the_file_holds(built: tuple[Path, list[ModelConfig]]) -> None:
    cfgs = {c.name: c for c in built[1]}
    first = cfgs["token_embedding"].warmup_requests()[0]
    assert torch.equal(first["token_ids"], torch.arange(1, 9).unsqueeze(0))
    (texts,) = cfgs["text_normalizer"].warmup_requests()
    assert texts == {"INPUT__0": ["Hello, World", "  Triton Inference  "]}

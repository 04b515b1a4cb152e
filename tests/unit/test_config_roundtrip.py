"""``ModelConfig.to_pbtxt``: what it writes reads back as the same configuration.

The committed configurations are checked in test_config_data.py; here hypothesis
builds configurations with every field ``config.pbtxt`` can hold.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libtorchrt import ConfigError, ModelConfig, TensorSpec
from libtorchrt.config import DynamicBatching, InstanceGroup, ModelWarmup, QueuePolicy, VersionPolicy, WarmupInput
from libtorchrt.config.model import TRITON_DTYPES

NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,7}(__[0-9])?", fullmatch=True)
DTYPES = st.sampled_from(sorted(TRITON_DTYPES))
DIMS = st.lists(st.sampled_from([-1, 1, 2, 3, 4, 7]), min_size=1, max_size=4)


@st.composite
def tensors(draw: st.DrawFn, kind: str, batched: bool) -> TensorSpec:
    dims = draw(DIMS)
    shapes: list[tuple[int, ...] | None] = [None, tuple(dims)]
    if -1 not in dims:
        shapes.append((math.prod(dims),))
        if math.prod(dims) == 1 and batched:
            shapes.append(())
    optional = draw(st.booleans()) if kind == "input" else False
    return TensorSpec(draw(NAMES), draw(DTYPES), dims, optional, draw(st.sampled_from(shapes)))


def unique(specs: list[TensorSpec]) -> list[TensorSpec]:
    seen: dict[str, TensorSpec] = {}
    for s in specs:
        seen.setdefault(s.name, s)
    return list(seen.values())


GROUPS = st.builds(
    lambda count, kind, gpus, name: InstanceGroup(count, kind, gpus if kind != "KIND_CPU" else [], name),
    st.integers(1, 4),
    st.sampled_from(["KIND_AUTO", "KIND_CPU", "KIND_GPU"]),
    st.lists(st.integers(0, 3), max_size=3),
    st.sampled_from(["", "group_a", "gpu pool"]),
)
POLICIES = st.builds(
    QueuePolicy,
    st.sampled_from(["REJECT", "DELAY"]),
    st.integers(0, 10**9),
    st.booleans(),
    st.integers(0, 1000),
)
VERSIONS = st.one_of(
    st.builds(VersionPolicy, st.just("latest"), st.integers(1, 5)),
    st.just(VersionPolicy("all")),
    st.builds(lambda v: VersionPolicy("specific", versions=v), st.lists(st.integers(1, 50), min_size=1, max_size=4)),
)
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)


@st.composite
def batching(draw: st.DrawFn, mbs: int) -> DynamicBatching | None:
    if not draw(st.booleans()):
        return None
    levels = draw(st.integers(0, 3))
    ordering = draw(st.booleans()) and levels <= 1
    default = draw(POLICIES)
    if ordering and default.timeout_action == "DELAY":
        default = QueuePolicy("REJECT", default.default_timeout_microseconds)
    per_level = {}
    if levels:
        for level in draw(st.lists(st.integers(1, levels), max_size=levels, unique=True)):
            policy = draw(POLICIES)
            if ordering and policy.timeout_action == "DELAY":
                policy = QueuePolicy("REJECT")
            per_level[level] = policy
    return DynamicBatching(
        draw(st.lists(st.integers(1, mbs), max_size=3)) if mbs else [],
        draw(st.integers(0, 10**7)),
        ordering,
        levels,
        draw(st.integers(1, levels)) if levels else 0,
        default,
        per_level,
    )


@st.composite
def warmups(draw: st.DrawFn, inputs: list[TensorSpec], mbs: int) -> list[ModelWarmup]:
    out = []
    for i in range(draw(st.integers(0, 2))):
        chosen = draw(st.lists(st.sampled_from(inputs), min_size=1, unique_by=lambda s: s.name)) if inputs else []
        feeds = {}
        for spec in chosen:
            dims = [1 if d == -1 else d for d in spec.dims or (1,)]
            source = draw(st.sampled_from(["zero", "random", "file"]))
            feeds[spec.name] = WarmupInput(
                str(spec.dtype),
                dims,
                zero_data=source == "zero",
                random_data=source == "random",
                input_data_file=f"{spec.name}.bin" if source == "file" else None,
            )
        if not feeds:
            continue
        batch = draw(st.integers(0, max(mbs, 1)))
        out.append(ModelWarmup(draw(st.sampled_from(["", f"sample_{i}"])), batch, feeds, draw(st.integers(0, 3))))
    return out


@st.composite
def configs(draw: st.DrawFn) -> ModelConfig:
    mbs = draw(st.sampled_from([0, 1, 8, 64]))
    inputs = unique(draw(st.lists(tensors("input", mbs > 0), max_size=4)))
    outputs = unique(draw(st.lists(tensors("output", mbs > 0), max_size=3)))
    parameters = draw(st.dictionaries(st.from_regex(r"[A-Z][A-Z_]{0,10}", fullmatch=True), TEXT, max_size=3))
    for key in list(parameters):
        if key in ("MODULE_METHOD_NAME", "WARMUP_RUNS") or key.startswith(("ENABLE", "DISABLE", "INTER", "INTRA")):
            del parameters[key]
    if draw(st.booleans()):
        parameters["INFERENCE_MODE"] = draw(st.sampled_from(["true", "False", "0"]))
    if draw(st.booleans()):
        parameters["CUDA_LAUNCH_BLOCKING"] = draw(st.sampled_from(["1", "0"]))
    return ModelConfig(
        name=draw(st.from_regex(r"[A-Za-z0-9_.\-]{1,12}", fullmatch=True)),
        path=Path(draw(st.sampled_from(["model.pt", "traced.ts", "model.torchscript"]))),
        instance_groups=draw(st.lists(GROUPS, min_size=1, max_size=3)),
        parameters=parameters,
        inputs=inputs,
        outputs=outputs,
        max_batch_size=mbs,
        method=draw(st.sampled_from(["forward", "predict"])),
        dynamic_batching=draw(batching(mbs)),
        warmup=draw(warmups(inputs, mbs)),
        version_policy=draw(VERSIONS),
        warmup_runs=draw(st.integers(0, 3)) if inputs and all(not s.optional for s in inputs) else 0,
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_to_pbtxt_reads_back_as_the_same_config(cfg: ModelConfig) -> None:
    text = cfg.to_pbtxt()
    again = ModelConfig.from_pbtxt(text)
    assert again == cfg, text
    assert again.to_pbtxt() == text


def test_python_devices_are_written_as_the_groups_they_stand_for() -> None:
    cfg = ModelConfig("m", "/models/m/3/model.pt", instances=2, devices=["cpu", "cuda:1"])
    again = ModelConfig.from_pbtxt(cfg.to_pbtxt())
    assert again.groups == cfg.groups == (InstanceGroup(2, "KIND_CPU"), InstanceGroup(2, "KIND_GPU", (1,)))
    assert again.placements(2) == cfg.placements(2)
    assert str(again.path) == "model.pt" and again.version == 1, "the repository layout is not written"


def test_python_only_settings_are_not_written() -> None:
    cfg = ModelConfig("m", "m.pt", env={"OMP_PROC_BIND": "close"}, timeout=3.0, max_retries=4, max_request_bytes=64)
    text = cfg.to_pbtxt()
    for word in ("OMP_PROC_BIND", "timeout", "retries", "max_request_bytes"):
        assert word not in text
    assert 'default_model_filename: "m.pt"' in text and 'platform: "pytorch_libtorch"' in text


def test_an_input_without_dims_cannot_be_written() -> None:
    with pytest.raises(ConfigError, match="input 'x' has no dims") as e:
        ModelConfig("m", "m.pt", inputs=[TensorSpec("x")]).to_pbtxt()
    assert e.value.key == "dims"


def test_a_complex_dtype_cannot_be_written() -> None:
    with pytest.raises(ConfigError, match="'complex64' has no Triton data type"):
        ModelConfig("m", "m.pt", outputs=[TensorSpec("y", "complex64", [2])]).to_pbtxt()

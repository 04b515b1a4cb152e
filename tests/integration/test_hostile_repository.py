"""Hostile model repositories: one bad model never takes the others down.

One repository holds a good model beside each hostile one; one pool serves it. Every
hostile model is either listed as failed with an error that names what is wrong, or
served with its limits enforced (a hung model replaced, outputs checked), while the
good model answers correctly throughout; closing the pool leaves nothing behind.
"""

from __future__ import annotations

import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from libtorchrt import ModelError, ModelUnavailableError, Pool, TimeoutError
from libtorchrt.config.instances import MAX_INSTANCES
from tests import models
from tests.conftest import assert_no_leaks, snapshot, wait_for

HEAD = 'platform: "pytorch_libtorch"\nmax_batch_size: 0\n'
F32_IN = 'input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
F32_OUT = 'output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'


def _param(key: str, value: str) -> str:
    return f'parameters: {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'


class _Evil:
    """Unpickling this creates a file: proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


#: name → (config.pbtxt body after the name, model file to copy, or raw bytes)
HOSTILE: dict[str, tuple[str, str | bytes]] = {
    # served, with its limits
    "hung": (HEAD + F32_IN + F32_OUT + _param("EXECUTION_TIMEOUT", "0.5"), "spin"),
    "liar": (
        HEAD
        + 'input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ -1, 64 ] } ]\n'
        + 'output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 1, 64 ] } ]\n',
        "identity",
    ),
    # left out, each with its error
    "bad_timeout": (HEAD + F32_IN + F32_OUT + _param("EXECUTION_TIMEOUT", "soon"), "identity"),
    "many_instances": (HEAD + F32_IN + F32_OUT + "instance_group [ { count: 100000 kind: KIND_CPU } ]\n", "identity"),
    "many_dims": (
        HEAD + f'input [ {{ name: "INPUT__0" data_type: TYPE_FP32 dims: [ {", ".join(["1"] * 40)} ] }} ]\n' + F32_OUT,
        "identity",
    ),
    "huge_dims": (
        HEAD + 'input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 4294967296, 4294967296 ] } ]\n' + F32_OUT,
        "identity",
    ),
    "unknown_field": (HEAD + F32_IN + F32_OUT + "no_such_field: 1\n", "identity"),
    "garbage_text": (HEAD + "input [ { name: \n\x00\xff", "identity"),
    "not_a_model": (HEAD + F32_IN + F32_OUT, b"PK\x03\x04 this is no TorchScript archive"),
    "a_pickle": (HEAD + F32_IN + F32_OUT, b""),  # filled in with a hostile pickle
    "a_checkpoint": (HEAD + F32_IN + F32_OUT, b""),  # filled in with a torch.save state dict
}
FAILED = ("bad_timeout", "many_instances", "many_dims", "huge_dims", "unknown_field", "garbage_text")
#: models whose workers fail to load the file: failed at start, with the load error
UNLOADABLE = {
    "not_a_model": "is a zip file that is neither TorchScript nor a PT2 archive (truncated or corrupt?)",
    "a_pickle": "is a pickle (torch.save with the legacy format, or pickle.dump), not TorchScript",
    "a_checkpoint": "is a torch.save checkpoint (a state dict or a pickled module), not TorchScript",
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pool, Path]]:
    root = tmp_path_factory.mktemp("hostile-repo")
    built = tmp_path_factory.mktemp("hostile-models")
    marker = root.parent / f"{root.name}-unpickled"
    repo = root / "repo"
    for name, (body, model) in {**HOSTILE, "good": (HEAD + F32_IN, "identity"), "tiny": ("", "tiny")}.items():
        (repo / name / "1").mkdir(parents=True)
        text = f'name: "{name}"\n' + body if name != "tiny" else 'name: "tiny"\nplatform: "pytorch_libtorch"\n'
        (repo / name / "config.pbtxt").write_text(text, errors="surrogateescape")
        target = repo / name / "1" / "model.pt"
        if name == "a_pickle":
            target.write_bytes(pickle.dumps(_Evil(marker)))
        elif name == "a_checkpoint":
            torch.save(models.reference("tiny").state_dict(), target)
        elif isinstance(model, bytes):
            target.write_bytes(model)
        else:
            shutil.copy(models.save(model, built), target)
    before = snapshot()
    with pytest.warns(RuntimeWarning):
        pool = Pool(repo)
    try:
        yield pool, marker
    finally:
        pool.close()
        assert_no_leaks(before)


def _serves(pool: Pool) -> None:
    x = torch.randn(2, 64)
    torch.testing.assert_close(pool.infer("tiny", [x], timeout=30)["OUTPUT__0"], models.reference("tiny")(x))
    assert pool.failure is None


def test_each_broken_model_is_left_out_with_its_error(hostile: tuple[Pool, Path]) -> None:
    pool, _ = hostile
    states = {s.name: s for s in pool.models()}
    assert {n: states[n].state for n in ("good", "tiny", "hung", "liar")} == dict.fromkeys(
        ("good", "tiny", "hung", "liar"), "ready"
    )
    expected = {
        "bad_timeout": "EXECUTION_TIMEOUT",
        "many_instances": f"from 1 to {MAX_INSTANCES}",
        "many_dims": "at most 32",
        "huge_dims": "2**63 elements",
        "unknown_field": "no_such_field",
        "garbage_text": "config.pbtxt",
    }
    for name, words in expected.items():
        assert states[name].state == "failed", states[name]
        assert words in (states[name].error or ""), states[name]
        with pytest.raises(ModelUnavailableError, match=name):
            pool.infer(name, [torch.ones(1)])
    _serves(pool)


def test_a_file_that_is_no_torchscript_fails_its_model_only_and_is_never_unpickled(
    hostile: tuple[Pool, Path],
) -> None:
    pool, marker = hostile
    states = {s.name: s for s in pool.models()}
    for name, words in UNLOADABLE.items():  # (torch says "your checkpoint file is corrupted")
        assert states[name].state == "failed", states[name]
        assert words in (states[name].error or ""), states[name]
        with pytest.raises(ModelUnavailableError):
            pool.infer(name, [torch.ones(1)])
    assert not marker.exists(), "a pickle in the repository was unpickled"
    _serves(pool)


def test_a_hung_model_is_replaced_by_its_execution_timeout(hostile: tuple[Pool, Path]) -> None:
    pool, _ = hostile
    assert pool.config("hung").execution_timeout == 0.5
    (before,) = [w.pid for w in pool.workers() if w.model == "hung"]
    with pytest.raises(TimeoutError, match=r"execution_timeout=0\.5"):
        pool.infer("hung", [torch.tensor([3_000_000.0])], timeout=30)

    def replaced() -> bool:
        health = pool.health()["hung"]
        return health.state == "ready" and health.instances[0].pid not in (None, before)

    wait_for(replaced, what="the hung worker's replacement")
    assert "execution_timeout" in (pool.health()["hung"].instances[0].last_error or "")
    assert float(pool.infer("hung", [torch.tensor([4.0])], timeout=30)["OUTPUT__0"]) == 4.0
    _serves(pool)


def test_outputs_that_contradict_the_configuration_are_model_errors(hostile: tuple[Pool, Path]) -> None:
    pool, _ = hostile
    with pytest.raises(ModelError, match=r"'OUTPUT__0' is declared float32\[1, 64\].*float32\[2, 64\]"):
        pool.infer("liar", [torch.ones(2, 64)], timeout=30)
    x = torch.randn(1, 64)  # when it tells the truth, it is served
    torch.testing.assert_close(pool.infer("liar", [x], timeout=30)["OUTPUT__0"], x)
    assert pool.health()["liar"].instances[0].restarts == 0  # the model's error, not a dead worker
    _serves(pool)

"""The server's model control without processes (server/control.py): a model directory's
fingerprint, the ``config`` load parameter, the index's JSON, the modes' refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from libtorchrt import ModelStatus
from libtorchrt.config.repository import load_model, model_names
from libtorchrt.server import metadata
from libtorchrt.server.control import (
    NOT_ALLOWED,
    ControlError,
    IndexEntry,
    RepositoryControl,
    config_text,
    fingerprint,
    index_json,
)

CONFIG = """name: "m"
platform: "pytorch_libtorch"
max_batch_size: 4
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 3 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 3 ] } ]
"""


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "config.pbtxt").write_text(CONFIG)
    (tmp_path / "m" / "1" / "model.pt").write_bytes(b"weights")
    (tmp_path / "not-a-model").mkdir()
    return tmp_path


def test_a_fingerprint_changes_with_the_files_and_the_configuration(repo: Path) -> None:
    d = repo / "m"
    first = fingerprint(d)
    assert fingerprint(d) == first
    (d / "config.pbtxt").write_text(CONFIG.replace("max_batch_size: 4", "max_batch_size: 8"))
    second = fingerprint(d)
    assert second != first
    stat = (d / "1" / "model.pt").stat()
    (d / "1" / "model.pt").write_bytes(b"WEIGHTS")  # same size; a new modification time
    os.utime(d / "1" / "model.pt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    third = fingerprint(d)
    assert third != second
    (d / "2").mkdir()
    (d / "2" / "model.pt").write_bytes(b"v2")
    assert fingerprint(d) != third
    assert fingerprint(repo / "gone") == ("", ())


def test_the_config_parameter_is_the_configuration_as_json(repo: Path) -> None:
    (cfg,) = load_model(repo, "m")
    doc = metadata.model_config(cfg)  # what GET /v2/models/m/config answers
    doc["max_batch_size"] = 2
    text = config_text("m", {"config": json.dumps(doc)})
    assert text is not None
    (given,) = load_model(repo, "m", text)
    assert given.max_batch_size == 2 and given.inputs == cfg.inputs and given.path == cfg.path
    assert config_text("m", {}) is None
    for parameters, message in (
        ({"config": "{oops"}, "Invalid config override:"),
        ({"config": json.dumps({"no_such_field": 1})}, "Invalid config override:"),
        ({"file:1/model.pt": b"x"}, "not supported"),
        ({"threads": True}, "Unrecognized load parameter 'threads' with type 'BOOL'"),
    ):
        with pytest.raises(ControlError, match=message) as e:
            config_text("m", parameters)
        assert e.value.status == 400


def test_index_json_says_what_triton_says() -> None:
    entries = [IndexEntry("a", 1, "READY"), IndexEntry("b"), IndexEntry("c", None, "UNAVAILABLE", "bad config"),
               IndexEntry("d", 2, "UNAVAILABLE", "unloaded")]  # fmt: skip
    assert index_json(entries) == [
        {"name": "a", "state": "READY", "version": "1", "reason": ""},
        {"name": "b"},
        {"name": "c", "state": "UNAVAILABLE", "reason": "bad config"},
        {"name": "d", "state": "UNAVAILABLE", "version": "2", "reason": "unloaded"},
    ]


def test_modes_and_their_refusals(repo: Path) -> None:
    assert model_names(repo) == ["m"]
    with pytest.raises(ValueError, match="model control mode"):
        RepositoryControl(repo, "sometimes")
    none = RepositoryControl(repo, "none")
    assert none.startup_models() is None  # every model, as without model control
    for mode in ("none", "poll"):
        control = RepositoryControl(repo, mode)
        for call, args in ((control.load, ("m", {})), (control.unload, ("m",))):
            with pytest.raises(ControlError) as e:
                call(*args)  # type: ignore[operator]
            assert (e.value.status, e.value.message) == (503, NOT_ALLOWED)
    assert RepositoryControl(repo, "poll").startup_models() == ["m"]
    assert RepositoryControl(repo, "explicit", load_models=["m", "x", "m"]).startup_models() == ["m", "x"]
    assert RepositoryControl(repo, "explicit", load_models=["*"]).startup_models() == ["m"]
    explicit = RepositoryControl(repo, "explicit")
    assert explicit.startup_models() == []
    with pytest.raises(ControlError, match="loading its models") as e:
        explicit.load("m")  # (no pool yet)
    assert e.value.status == 503
    explicit.pool = SimpleNamespace(models=lambda: [ModelStatus("m", 1, "ready")])  # type: ignore[assignment]
    for name in ("nope", "..", "a/b"):
        with pytest.raises(ControlError, match="failed to poll from model repository") as e:
            explicit.load(name)
        assert e.value.status == 500
    assert explicit.index() == [IndexEntry("m", 1, "READY", "")]

"""Model repositories: version directories, version policies, and broken models."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from libtorchrt import ConfigError, ModelConfig
from libtorchrt.config import load_repository
from libtorchrt.config.pbtxt import load_versions
from libtorchrt.config.versions import version_dirs

MODEL = b"\x00 not a model, never loaded"


def write_model(root: Path, name: str, config: str, versions: dict[str, str] | None = None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "config.pbtxt").write_text(textwrap.dedent(config))
    for version, filename in (versions or {"1": "model.pt"}).items():
        (d / version).mkdir(exist_ok=True)
        if filename:
            (d / version / filename).write_bytes(MODEL)
    return d


def served(cfgs: list[ModelConfig], name: str = "m") -> list[int]:
    return [c.version for c in cfgs if c.name == name]


def test_version_directories_are_numbers_not_starting_with_zero(tmp_path: Path) -> None:
    for name in ("1", "2", "10", "0", "01", "007", "v3", "latest", "1.5", "-1", "²"):
        (tmp_path / name).mkdir()
    (tmp_path / "3").write_text("a file, not a directory")
    assert sorted(version_dirs(tmp_path)) == [1, 2, 10]


@pytest.mark.parametrize(
    ("policy", "want"),
    [
        ("", [3]),
        ("version_policy: { latest: { num_versions: 2 } }", [2, 3]),
        ("version_policy: { latest: { num_versions: 9 } }", [1, 2, 3]),
        ("version_policy: { all: {} }", [1, 2, 3]),
        ("version_policy: { specific: { versions: [ 1, 3 ] } }", [1, 3]),
    ],
)
def test_one_config_per_served_version(tmp_path: Path, policy: str, want: list[int]) -> None:
    d = write_model(tmp_path, "m", f'name: "m"\n{policy}\n', {"1": "model.pt", "2": "model.pt", "3": "model.pt"})
    cfgs = load_repository(tmp_path)
    assert served(cfgs) == want
    assert [Path(c.path) for c in cfgs] == [d / str(v) / "model.pt" for v in want]
    assert ModelConfig.from_pbtxt(d / "config.pbtxt").version == want[-1]  # one config: the highest


@pytest.mark.parametrize(
    ("path", "version", "model_dir", "filename"),
    [
        ("/models/m/3/model.pt", 3, "/models/m", "model.pt"),
        ("/models/1/m/1/traced.ts", 1, "/models/1/m", "traced.ts"),
        ("/srv/m.pt", 1, "/", "m.pt"),
        ("m.pt", 1, ".", "m.pt"),
    ],
)
def test_model_dir_and_filename_follow_the_layout(path: str, version: int, model_dir: str, filename: str) -> None:
    cfg = ModelConfig("m", path, version=version)
    assert (cfg.model_dir, cfg.model_filename) == (Path(model_dir), filename)


def test_versions_of_one_model_differ_only_in_version_and_path(tmp_path: Path) -> None:
    write_model(
        tmp_path, "m", 'name: "m"\nversion_policy { all { } }\nmax_batch_size: 4\n', {"1": "model.pt", "2": "model.pt"}
    )
    one, two = load_repository(tmp_path)
    assert (one.version, two.version) == (1, 2)
    assert one.max_batch_size == two.max_batch_size == 4 and one.path != two.path


def test_a_specific_version_that_is_missing_names_it_and_the_line(tmp_path: Path) -> None:
    d = write_model(
        tmp_path, "m", 'name: "m"\n\nversion_policy {\n  specific { versions: [ 2, 5 ] }\n}\n', {"2": "model.pt"}
    )
    with pytest.raises(ConfigError) as e:
        load_repository(tmp_path)
    assert str(e.value).startswith(f"{d / 'config.pbtxt'}:3: version_policy asks for version(s) [5]")
    assert "versions [2]" in str(e.value) and e.value.key == "version_policy"


def test_version_directories_without_the_model_file_are_noted(tmp_path: Path) -> None:
    write_model(tmp_path, "m", 'name: "m"\n', {"1": "model.pt", "2": "", "4": "other.pt"})
    (cfg,) = load_repository(tmp_path)
    assert cfg.version == 1
    assert any("version directories [2, 4] hold no 'model.pt'" in n for n in cfg.notes)


def test_default_model_filename_may_name_a_file_in_a_subdirectory(tmp_path: Path) -> None:
    d = write_model(tmp_path, "m", 'name: "m"\ndefault_model_filename: "ts/model.ts"\n', {"1": ""})
    (d / "1" / "ts").mkdir()
    (d / "1" / "ts" / "model.ts").write_bytes(MODEL)
    (cfg,) = load_repository(tmp_path)
    assert cfg.path == d / "1" / "ts" / "model.ts"
    assert (cfg.model_dir, cfg.model_filename) == (d, "ts/model.ts")
    assert 'default_model_filename: "ts/model.ts"' in cfg.to_pbtxt()


# ------------------------------------------------------------- broken models


def _repository_with_broken_models(root: Path) -> None:
    write_model(root, "good", 'name: "good"\nmax_batch_size: 2\n')
    write_model(root, "syntax", 'name: "syntax"\nmax_batch_size: "two"\n')
    write_model(root, "nofile", 'name: "nofile"\n', {"1": ""})
    write_model(root, "wrongname", 'name: "other"\n')
    write_model(root, "bad name", "max_batch_size: 1\n")
    bad_text = root / "binary"
    bad_text.mkdir()
    (bad_text / "config.pbtxt").write_bytes(b"name: \xff\xfe\n")


def test_with_an_errors_list_broken_models_are_reported_and_the_others_load(tmp_path: Path) -> None:
    _repository_with_broken_models(tmp_path)
    errors: list[tuple[str, ConfigError]] = []
    cfgs = load_repository(tmp_path, errors=errors)
    assert [c.name for c in cfgs] == ["good"]
    reasons = {name: str(e) for name, e in errors}
    assert sorted(reasons) == ["bad name", "binary", "nofile", "syntax", "wrongname"]
    assert f"{tmp_path / 'syntax' / 'config.pbtxt'}:2:" in reasons["syntax"]
    assert "no version directory" in reasons["nofile"] and "holds 'model.pt'" in reasons["nofile"]
    assert "does not match the model directory 'wrongname'" in reasons["wrongname"]
    assert "model name 'bad name' is invalid" in reasons["bad name"]
    assert "cannot read the configuration" in reasons["binary"]
    assert all(isinstance(e, ConfigError) for _, e in errors)


def test_without_an_errors_list_the_first_broken_model_raises(tmp_path: Path) -> None:
    _repository_with_broken_models(tmp_path)
    with pytest.raises(ConfigError, match="model name 'bad name' is invalid"):
        load_repository(tmp_path)


def test_a_repository_of_broken_models_loads_nothing_with_an_errors_list(tmp_path: Path) -> None:
    write_model(tmp_path, "m", 'name: "m"\n', {"1": ""})
    errors: list[tuple[str, ConfigError]] = []
    assert load_repository(tmp_path, errors=errors) == []
    assert [name for name, _ in errors] == ["m"]


def test_an_empty_repository_raises_even_with_an_errors_list(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    with pytest.raises(ConfigError, match="holds no"):
        load_repository(tmp_path, errors=[])


def test_load_versions_reads_the_model_directory(tmp_path: Path) -> None:
    d = write_model(tmp_path, "m", "version_policy { all { } }\n", {"3": "model.pt", "1": "model.pt"})
    assert [c.version for c in load_versions(d)] == [1, 3]
    assert [c.version for c in load_versions(d, 'name: "m"\n')] == [3]  # text given: the file is not read


WARMUP_FILE = """\
name: "m"
max_batch_size: 2
input [ { name: "ids" data_type: TYPE_INT64 dims: [ 2 ] } ]
model_warmup [
  {
    name: "tokens"
    batch_size: 1
    inputs {
      key: "ids"
      value {
        data_type: TYPE_INT64
        dims: [ 2 ]
        input_data_file: "ids.bin"
      }
    }
  }
]
"""


@pytest.mark.parametrize(("data", "words"), [(None, "cannot read"), (b"\x01" * 8, "needs 16 bytes")])
def test_a_broken_warmup_file_breaks_the_model_when_the_repository_is_read(
    tmp_path: Path, data: bytes | None, words: str
) -> None:
    d = write_model(tmp_path, "m", WARMUP_FILE)
    (d / "warmup").mkdir()
    if data is not None:
        (d / "warmup" / "ids.bin").write_bytes(data)
    errors: list[tuple[str, ConfigError]] = []
    assert load_repository(tmp_path, errors=errors) == []
    ((name, e),) = errors
    assert name == "m"
    assert str(e).startswith(f"{d / 'config.pbtxt'}:13: ") and words in str(e)
    assert e.key == "model_warmup.inputs.ids.input_data_file"
    (d / "warmup" / "ids.bin").write_bytes(b"\x01" * 16)
    (cfg,) = load_repository(tmp_path)
    assert cfg.warmup_requests()[0]["ids"].shape == (1, 2)

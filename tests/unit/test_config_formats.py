"""Model formats in the configuration: found from the file, named by ``config.pbtxt``,
and the parameters each takes (config/formats.py). Real files, no worker."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

from libtorchrt import ConfigError, ModelConfig, load_repository
from libtorchrt.config import formats


class _Double(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("formats")
    out = {name: d / name for name in ("exported.pt2", "state.pt", "aoti.pt2", "model.py", "plain.bin")}
    torch.export.save(torch.export.export(_Double(), (torch.ones(2),)), out["exported.pt2"])
    torch.save({"w": torch.ones(1)}, out["state.pt"])
    # The layout of an AOTInductor package's zip directory (what detection reads);
    # the real thing is compiled by the integration tests' session artifacts.
    with zipfile.ZipFile(out["aoti.pt2"], "w") as z:
        z.writestr("pkg/data/aotinductor/model/x.wrapper.cpp", "")
        z.writestr("pkg/archive_format", "pt2")
    out["model.py"].write_text("import torch\n")
    out["plain.bin"].write_bytes(b"\x00" * 16)
    return out


@pytest.mark.parametrize(
    "name, expected",
    [("exported.pt2", "exported"), ("aoti.pt2", "aoti"), ("model.py", "python"), ("plain.bin", "torchscript")],
)
def test_the_format_is_found_from_the_file(files: dict[str, Path], name: str, expected: str) -> None:
    assert formats.detect(files[name]) == expected
    assert ModelConfig("m", files[name]).format == expected


def test_zip_kind_tells_checkpoints_from_programs(files: dict[str, Path]) -> None:
    assert formats.zip_kind(files["state.pt"]) == "checkpoint"
    assert formats.zip_kind(files["plain.bin"]) is None


def test_a_given_format_wins_and_an_unknown_one_is_refused(files: dict[str, Path]) -> None:
    assert ModelConfig("m", files["plain.bin"], format="aoti").format == "aoti"
    with pytest.raises(ConfigError, match=r"format 'onnx'; expected one of \['torchscript', 'aoti'") as e:
        ModelConfig("m", files["plain.bin"], format="onnx")
    assert e.value.key == "format"


@pytest.mark.parametrize("fmt", ["aoti", "exported", "python"])
@pytest.mark.parametrize("key", ["ENABLE_JIT_EXECUTOR", "FREEZE_MODULE", "DISABLE_OPTIMIZED_EXECUTION"])
def test_torchscript_parameters_are_refused_for_pt2_formats(fmt: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        ModelConfig("m", "model.bin", format=fmt, parameters={key: "true"})
    assert f"parameter {key} does not apply to format {fmt!r}" in str(e.value)
    assert e.value.key == key


def test_compile_parameters_apply_to_python_and_exported_only() -> None:
    opts = '{"mode": "max-autotune", "fullgraph": true}'
    for fmt in ("python", "exported"):
        ModelConfig("m", "model.bin", format=fmt, parameters={formats.COMPILE_KEY: opts})
    for fmt in ("aoti", "torchscript"):
        with pytest.raises(ConfigError, match=f"does not apply to format {fmt!r}"):
            ModelConfig("m", "model.bin", format=fmt, parameters={formats.COMPILE_KEY: opts})


def test_a_pt2_program_has_one_entry_point() -> None:
    ModelConfig("m", "model.py", method="predict")
    with pytest.raises(ConfigError, match="one entry point"):
        ModelConfig("m", "model.bin", format="aoti", method="predict")


@pytest.mark.parametrize(
    "raw, words",
    [
        ("{nope", "is not JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"speed": 1}', "has key 'speed'"),
        ('{"fullgraph": "yes"}', "fullgraph is 'yes'; expected a bool"),
        ('{"mode": "fastest"}', "mode 'fastest'"),
        ('{"mode": "default", "options": {}}', "mode or options, not both"),
    ],
)
def test_bad_compile_options_are_config_errors(raw: str, words: str) -> None:
    with pytest.raises(ConfigError, match=None) as e:
        formats.compile_options("m", raw)
    assert words in str(e.value)
    assert e.value.key == formats.COMPILE_KEY


def test_good_compile_options_parse() -> None:
    assert formats.compile_options("m", '{"backend": "eager", "disable": false}') == {
        "backend": "eager",
        "disable": False,
    }


def _repository(root: Path, config: str, filename: str) -> Path:
    (root / "m" / "1").mkdir(parents=True)
    (root / "m" / "config.pbtxt").write_text(config)
    (root / "m" / "1" / filename).write_text("x")
    return root


@pytest.mark.parametrize(
    "config, filename, fmt",
    [
        ('platform: "torch_aoti"\n', "model.pt2", "aoti"),
        ('backend: "pytorch"\nruntime: "model.py"\n', "model.py", "python"),
        ('platform: "pytorch_libtorch"\n', "model.pt", "torchscript"),
    ],
)
def test_a_repository_names_the_format_and_its_default_file(
    tmp_path: Path, config: str, filename: str, fmt: str
) -> None:
    (cfg,) = load_repository(_repository(tmp_path, config, filename))
    assert cfg.format == fmt
    assert Path(cfg.path).name == filename
    again = ModelConfig.from_pbtxt(cfg.to_pbtxt())
    assert again.format == fmt, "to_pbtxt writes what names the format"


def test_an_exported_program_in_a_repository_is_found_from_its_file(tmp_path: Path, files: dict[str, Path]) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "config.pbtxt").write_text('platform: "pytorch_libtorch"\ndefault_model_filename: "model.pt2"\n')
    (tmp_path / "m" / "1" / "model.pt2").write_bytes(files["exported.pt2"].read_bytes())
    (cfg,) = load_repository(tmp_path)
    assert cfg.format == "exported"


def test_a_platform_and_a_runtime_naming_two_formats_are_refused() -> None:
    with pytest.raises(ConfigError, match="name two formats") as e:
        ModelConfig.from_pbtxt('name: "m"\nplatform: "torch_aoti"\nruntime: "model.py"\n')
    assert ":3:" in str(e.value)


def test_a_refused_parameter_in_a_repository_names_its_line(tmp_path: Path) -> None:
    config = 'platform: "torch_aoti"\nparameters { key: "ENABLE_TENSOR_FUSER" value: { string_value: "false" } }\n'
    with pytest.raises(ConfigError) as e:
        load_repository(_repository(tmp_path, config, "model.pt2"))
    assert "config.pbtxt:2:" in str(e.value) and "ENABLE_TENSOR_FUSER" in str(e.value)

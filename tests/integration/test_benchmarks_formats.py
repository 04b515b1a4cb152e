"""``benchmarks/formats.py``'s start-up scenario, quick, for the two formats that need
no compiler (TorchScript and the eager ``model.py``; the AOTInductor and
``torch.compile`` rows take minutes and are left to the benchmark's own runs): every
pool starts, every row has its figures and its ratio to TorchScript, the JSON says where
the figures came from, and nothing is left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import formats

pytestmark = pytest.mark.timeout(120)


def test_quick_startup_of_the_formats_without_a_compiler(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_leaks: None
) -> None:
    out = tmp_path / "formats.json"
    argv = ["--quick", "--scenarios", "startup", "--formats", "torchscript,python-eager"]
    assert formats.main([*argv, "--workdir", str(tmp_path / "work"), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["command"] and "commit" in doc and "dirty" in doc
    cpus = doc["machine"]["cpu_count"]
    assert f"on {cpus} CPUs" in printed
    assert doc["complete"] and doc["throughput"] == []
    rows = {(r["format"], r["instances"]): r for r in doc["startup"]}
    assert set(rows) == {("torchscript", 1), ("torchscript", 2), ("python-eager", 1), ("python-eager", 2)}
    for (_, instances), r in rows.items():
        assert r["cache"] == "-" and not r["note"], r
        assert 0 < r["ready_s"] < 60 and r["children_cpu_s"] > 0
        assert r["ratios"]["over_torchscript"] == pytest.approx(
            r["ready_s"] / rows["torchscript", instances]["ready_s"]
        )
    assert rows["torchscript", 1]["ratios"]["over_torchscript"] == 1.0
    assert rows["python-eager", 2]["ratios"]["over_fewest_instances"] is not None
    # the models were built in the work directory; no AOTInductor package was compiled
    assert doc["artifacts"]["aoti"] is None
    assert (tmp_path / "work" / "models" / "cnn-python" / "model.pt").is_file()


def test_unknown_formats_and_scenarios_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--formats", "torchscript,onnx"], ["--scenarios", "latency"]):
        with pytest.raises(SystemExit) as stopped:
            formats.main(argv)
        assert stopped.value.code == 2
        assert "choose from" in capsys.readouterr().err

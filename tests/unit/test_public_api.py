"""The public surface of ``libtorchrt``: what it exports, what is documented, and that
importing it has no side effects."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import libtorchrt

API_DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def public_names() -> set[str]:
    """Names a user would see on the package: no privates, no submodules."""
    return {
        name
        for name, value in vars(libtorchrt).items()
        if not name.startswith("_")
        and not inspect.ismodule(value)
        and name != "annotations"  # `from __future__ import annotations` leaves this behind
    }


def test_all_has_no_duplicates() -> None:
    assert len(libtorchrt.__all__) == len(set(libtorchrt.__all__))


def test_all_equals_the_public_names() -> None:
    assert set(libtorchrt.__all__) - {"__version__"} == public_names()


def test_every_name_in_all_is_importable() -> None:
    namespace: dict[str, object] = {}
    exec("from libtorchrt import *", namespace)
    for name in libtorchrt.__all__:
        assert getattr(libtorchrt, name) is not None, name
        if name != "__version__":
            assert namespace[name] is getattr(libtorchrt, name), name


def test_version_is_a_string() -> None:
    assert isinstance(libtorchrt.__version__, str)
    assert libtorchrt.__version__.count(".") >= 1


def test_errors_share_the_root_class() -> None:
    for name in libtorchrt.__all__:
        value = getattr(libtorchrt, name)
        if isinstance(value, type) and issubclass(value, BaseException):
            assert issubclass(value, libtorchrt.TorchRTError), name


def documented_names(markdown: str) -> set[str]:
    """Whole identifiers written as code in ``markdown`` (code spans and fenced blocks):
    ``Pool`` is documented by `` `Pool(...)` `` or `` `Pool` ``, never by
    `` `PoolClosedError` `` or the word "pool" in prose."""
    code = re.findall(r"```.*?```|`[^`\n]+`", markdown, flags=re.DOTALL)
    return {word for span in code for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", span)}


def test_documented_names_are_whole_identifiers() -> None:
    text = "`PoolClosedError` is raised; a pool of `ModelConfig`s; Pool in prose\n```\nClient(x)\n```"
    assert documented_names(text) == {"PoolClosedError", "ModelConfig", "Client", "x"}


def test_every_public_name_is_documented_in_api_md() -> None:
    if not API_DOC.is_file():
        pytest.fail(f"{API_DOC} does not exist: the public API ({len(libtorchrt.__all__)} names) is undocumented")
    documented = documented_names(API_DOC.read_text())
    missing = [name for name in libtorchrt.__all__ if name != "__version__" and name not in documented]
    assert not missing, f"names in libtorchrt.__all__ not mentioned in docs/api.md: {missing}"


def test_import_has_no_side_effects() -> None:
    code = textwrap.dedent(
        """
        import json, multiprocessing, threading
        before = multiprocessing.get_start_method(allow_none=True)
        import libtorchrt
        print(json.dumps({
            "threads": threading.active_count(),
            "names": [t.name for t in threading.enumerate()],
            "start_before": before,
            "start_after": multiprocessing.get_start_method(allow_none=True),
            "children": multiprocessing.active_children() != [],
        }))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["threads"] == 1, f"import started threads: {report['names']}"
    assert report["start_before"] is None
    assert report["start_after"] is None, "import changed the multiprocessing start method"
    assert report["children"] is False

"""libtorchrt installs beside a current ``tritonclient[all]`` (whose ``[grpc]`` part needs
``protobuf<7``): pip's own resolver, from scratch (``--ignore-installed``) and without
installing anything (``--dry-run``), against the package index pip is configured with.
Skipped only when that index cannot be reached."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRITONCLIENT = "tritonclient[all]>=2.73"
PIP_TIMEOUT = 180  # about 30 s here; most of it is fetching index pages and metadata

pytestmark = pytest.mark.timeout(PIP_TIMEOUT + 60)


def _pip(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def _index_url() -> str:
    """The index pip installs from: PIP_INDEX_URL, else pip's configuration, else PyPI."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"].split()[0]
    for line in _pip("config", "list", timeout=60).stdout.splitlines():
        key, _, value = line.partition("=")
        if key.endswith(".index-url"):
            return value.strip().strip("'\"").split()[0]
    return "https://pypi.org/simple"


def _unreachable(url: str) -> str | None:
    """Why the index at ``url`` cannot be reached (through the proxy pip would use), or None."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        path = urllib.request.url2pathname(parts.path)
        return None if os.path.isdir(path) else f"{path} is not a directory"
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=10).close()
    except OSError as e:
        return f"cannot connect to {host}:{port}: {e}"
    return None


def test_pip_resolves_libtorchrt_with_a_current_tritonclient_all() -> None:
    # It did not while libtorchrt wanted protobuf>=7.35.1 and tritonclient[grpc] protobuf<7.
    index = _index_url()
    why = _unreachable(index)
    if why is not None:
        pytest.skip(f"package index {index} unreachable ({why}): cannot check what pip resolves")
    # torch pinned to the one installed, so that pip resolves it without fetching another
    # build (a CUDA one); it is libtorchrt's dependency, not tritonclient's.
    args = ["install", "--dry-run", "--ignore-installed", "--quiet", "--report", "-"]
    args += [str(ROOT), TRITONCLIENT, f"torch=={version('torch')}"]
    try:
        proc = _pip(*args, timeout=PIP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"pip took more than {PIP_TIMEOUT} s to resolve: pip {' '.join(args)}")
    assert proc.returncode == 0, f"pip {' '.join(args)} failed:\n{proc.stderr[-4000:]}"
    resolved = {item["metadata"]["name"].lower(): item for item in json.loads(proc.stdout)["install"]}

    assert resolved["libtorchrt"]["download_info"]["url"] == ROOT.as_uri()
    triton = resolved["tritonclient"]["metadata"]["version"]
    assert tuple(int(n) for n in re.findall(r"\d+", triton)[:2]) >= (2, 73), triton

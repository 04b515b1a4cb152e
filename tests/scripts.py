"""Running the repository's scripts (``benchmarks/*.py``) as a user does, from its root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *argv: str, timeout: float = 170) -> subprocess.CompletedProcess[str]:
    """Run ``python script argv...`` in the repository's root; its output captured as text."""
    return subprocess.run(
        [sys.executable, script, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )

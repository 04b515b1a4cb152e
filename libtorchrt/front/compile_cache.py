"""Where the pool's workers keep what ``torch.compile`` and Inductor compile (front).

A ``torch.compile``d ``model.py`` or exported program is compiled by each instance
process, on its first call: N instances would compile N times, and every worker that
replaces a dead one once more. Inductor caches compiled graphs on disk (its FX graph
and AOTAutograd caches, keyed by the graph, the inputs' shapes, the torch version and
the machine), so processes that share its cache directory compile once between them.
The pool points every PT2 worker's ``TORCHINDUCTOR_CACHE_DIR`` at one directory:

- by default a per-user directory that outlives the pool
  (``$XDG_CACHE_HOME/libtorchrt/compile``, else ``~/.cache/libtorchrt/compile``):
  compiled once per machine, and a restarted server starts warm;
- a directory the caller names (``Pool(compile_cache=path)``);
- ``compile_cache=False``: each worker gets a private directory of its own inside the
  pool's private directory (removed with it), so every instance compiles from scratch:
  the baseline the benchmark compares against (benchmarks/formats.py).

Variables the caller set for the model (``ModelConfig.env``) win over these.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CompileCache"]


def default_directory() -> Path:
    """The per-user directory that the pools of this machine share."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "libtorchrt" / "compile"


class CompileCache:
    """The compile cache of one pool.

    Args:
        setting: True (the per-user directory), a path, or False (one private
            directory per worker, under ``private_root``).
        private_root: the pool's private directory (removed when the pool closes).
    """

    def __init__(self, setting: bool | str | os.PathLike[str], private_root: str) -> None:
        if setting is True:
            self.shared: Path | None = default_directory()
        elif setting is False:
            self.shared = None
        else:
            self.shared = Path(setting)
        self.private_root = private_root

    def directory(self, worker: str) -> Path:
        """The cache directory of the worker named ``worker`` (created, mode 0700)."""
        path = self.shared if self.shared is not None else Path(self.private_root) / f"compile-{worker}"
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path

    def env(self, given: dict[str, str], worker: str) -> dict[str, str]:
        """The variables that point a worker's Inductor at its cache (``given`` wins)."""
        wanted = {
            "TORCHINDUCTOR_CACHE_DIR": str(self.directory(worker)),
            "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
            "TORCHINDUCTOR_AUTOGRAD_CACHE": "1",
        }
        return {k: given.get(k, v) for k, v in wanted.items()}

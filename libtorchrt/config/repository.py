"""A Triton-style model repository: ``<repo>/<model>/config.pbtxt`` (runs in the front).

Each model directory holds a ``config.pbtxt`` and numeric version directories with the
model file (``<repo>/<model>/<version>/model.pt``); the highest version is served.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError
from .model import ModelConfig
from .pbtxt import load

__all__ = ["load_repository"]


def load_repository(path: str | os.PathLike[str]) -> list[ModelConfig]:
    """Read every model of a repository.

    Raises:
        ConfigError: the directory does not exist, holds no model, or a model's
            configuration is invalid (the message names its file and line).
    """
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"model repository {os.fspath(path)!r} is not a directory")
    models = [
        load(d / "config.pbtxt", d) for d in sorted(root.iterdir()) if d.is_dir() and (d / "config.pbtxt").is_file()
    ]
    if not models:
        raise ConfigError(f"model repository {os.fspath(path)!r} holds no <model>/config.pbtxt")
    return models

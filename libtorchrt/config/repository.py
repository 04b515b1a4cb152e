"""A Triton-style model repository: ``<repo>/<model>/config.pbtxt`` (runs in the front).

Each model directory holds a ``config.pbtxt`` and numeric version directories with the
model file (``<repo>/<model>/<version>/model.pt``); the model's ``version_policy``
picks the versions served (by default the highest). A directory without a
``config.pbtxt`` is not a model and is skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError
from .model import ModelConfig
from .pbtxt import load_versions

__all__ = ["load_model", "load_repository", "model_names"]


def load_repository(
    path: str | os.PathLike[str], errors: list[tuple[str, ConfigError]] | None = None
) -> list[ModelConfig]:
    """Read every model of a repository: one configuration per version served.

    Args:
        path: the repository directory.
        errors: when given, a model whose configuration is broken (a bad
            ``config.pbtxt``, no model file, a missing version, ...) is left out
            and ``(model directory name, ConfigError)`` appended here, so that the
            other models still load. When None, the first broken model raises.

    Returns:
        The configurations, by model name, then ascending version.

    Raises:
        ConfigError: the directory does not exist or holds no model; or, without
            ``errors``, a model's configuration is invalid (the message names its
            file and line).
    """
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"model repository {os.fspath(path)!r} is not a directory")
    model_dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and (d / "config.pbtxt").is_file()]
    if not model_dirs:
        raise ConfigError(f"model repository {os.fspath(path)!r} holds no <model>/config.pbtxt")
    configs: list[ModelConfig] = []
    for d in model_dirs:
        try:
            configs += load_versions(d)
        except ConfigError as e:
            if errors is None:
                raise
            errors.append((d.name, e))
    return configs


def model_names(path: str | os.PathLike[str]) -> list[str]:
    """The models of a repository: its directories that hold a ``config.pbtxt``, sorted.

    Raises:
        ConfigError: ``path`` is not a directory.
    """
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"model repository {os.fspath(path)!r} is not a directory")
    return sorted(d.name for d in root.iterdir() if d.is_dir() and (d / "config.pbtxt").is_file())


def load_model(path: str | os.PathLike[str], name: str, config: str | None = None) -> list[ModelConfig]:
    """Read one model of a repository: one configuration per version served.

    Args:
        path: the repository directory.
        name: the model (its directory's name).
        config: its configuration as ``config.pbtxt`` text, instead of the file's.

    Raises:
        ConfigError: the repository has no such model, or its configuration is invalid.
    """
    directory = Path(path) / name
    if "/" in name or name in ("", ".", "..") or not (config is not None or (directory / "config.pbtxt").is_file()):
        raise ConfigError(
            f"model repository {os.fspath(path)!r} has no model {name!r} (no {name}/config.pbtxt)", model=name
        )
    if config is None:
        return load_versions(directory)
    return load_versions(directory, config, f"the configuration given for {name!r}")

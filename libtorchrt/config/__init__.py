"""Model configuration: Python dataclasses, ``config.pbtxt`` files, repositories (front)."""

from __future__ import annotations

from .model import ModelConfig, TensorSpec
from .repository import load_repository

__all__ = ["ModelConfig", "TensorSpec", "load_repository"]

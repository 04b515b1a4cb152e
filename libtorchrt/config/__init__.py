"""Model configuration: in Python, or from a Triton-style repository (runs in the front)."""

from __future__ import annotations

from .batching import DynamicBatching, QueuePolicy
from .instances import InstanceGroup
from .model import ModelConfig
from .repository import load_repository
from .sequences import ControlInput, SequenceBatching, SequenceState
from .tensor import TensorSpec
from .versions import VersionPolicy
from .warmup import ModelWarmup, WarmupInput, warmup_tensors

__all__ = [
    "ControlInput",
    "DynamicBatching",
    "InstanceGroup",
    "ModelConfig",
    "ModelWarmup",
    "QueuePolicy",
    "SequenceBatching",
    "SequenceState",
    "TensorSpec",
    "VersionPolicy",
    "WarmupInput",
    "load_repository",
    "warmup_tensors",
]

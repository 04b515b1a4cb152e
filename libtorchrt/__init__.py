"""libtorchrt: serve TorchScript models from a pool of worker processes.

One OS process per model instance, requests routed over ZeroMQ, tensors through shared
memory, each worker running with its own model's execution-mode flags. See README.md and
docs/architecture.md. Importing this package has no side effects: no threads, no
processes, no changes to multiprocessing or the environment.
"""

from __future__ import annotations

from .config import ModelConfig, TensorSpec
from .errors import (
    ConfigError,
    InvalidInputError,
    ModelError,
    ModelUnavailableError,
    PoolClosedError,
    ProtocolError,
    TimeoutError,
    TorchRTError,
    UnknownModelError,
    WorkerDiedError,
    WorkerStartError,
)
from .info import InstanceHealth, ModelHealth, WorkerInfo
from .pool import Pool

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "InstanceHealth",
    "InvalidInputError",
    "ModelConfig",
    "ModelError",
    "ModelHealth",
    "ModelUnavailableError",
    "Pool",
    "PoolClosedError",
    "ProtocolError",
    "TensorSpec",
    "TimeoutError",
    "TorchRTError",
    "UnknownModelError",
    "WorkerDiedError",
    "WorkerInfo",
    "WorkerStartError",
    "__version__",
]

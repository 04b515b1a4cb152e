"""libtorchrt: serve TorchScript models from a pool of worker processes.

One OS process per model instance, requests routed over ZeroMQ, tensors through shared
memory, each worker running with its own model's execution-mode flags. See README.md and
docs/architecture.md. Importing this package has no side effects: no threads, no
processes, no changes to multiprocessing or the environment.
"""

from __future__ import annotations

from .client import Client
from .config import (
    ControlInput,
    DynamicBatching,
    InstanceGroup,
    ModelConfig,
    ModelWarmup,
    QueuePolicy,
    SequenceBatching,
    SequenceState,
    TensorSpec,
    VersionPolicy,
    WarmupInput,
    load_repository,
)
from .errors import (
    ConfigError,
    InvalidInputError,
    ModelError,
    ModelUnavailableError,
    PoolClosedError,
    ProtocolError,
    QueueFullError,
    SequenceError,
    SequenceLostError,
    ServerConnectionError,
    TimeoutError,
    TorchRTError,
    UnknownModelError,
    WorkerDiedError,
    WorkerStartError,
)
from .front.pool import Pool
from .info import InstanceHealth, ModelHealth, ModelStats, ModelStatus, WorkerInfo

__version__ = "0.1.0"

__all__ = [
    "Client",
    "ConfigError",
    "ControlInput",
    "DynamicBatching",
    "InstanceGroup",
    "InstanceHealth",
    "InvalidInputError",
    "ModelConfig",
    "ModelError",
    "ModelHealth",
    "ModelStats",
    "ModelStatus",
    "ModelUnavailableError",
    "ModelWarmup",
    "Pool",
    "PoolClosedError",
    "ProtocolError",
    "QueueFullError",
    "QueuePolicy",
    "SequenceBatching",
    "SequenceError",
    "SequenceLostError",
    "SequenceState",
    "ServerConnectionError",
    "TensorSpec",
    "TimeoutError",
    "TorchRTError",
    "UnknownModelError",
    "VersionPolicy",
    "WarmupInput",
    "WorkerDiedError",
    "WorkerInfo",
    "WorkerStartError",
    "__version__",
    "load_repository",
]

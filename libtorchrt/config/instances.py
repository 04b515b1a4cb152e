"""Where a model's instances run: :class:`InstanceGroup` (runs in the front).

Triton's ``instance_group``: each instance is one worker process here, on the CPU or
on one GPU. A ``KIND_MODEL`` instance places itself: its worker is given no device
(to the pool it is a CPU instance: inputs arrive on the CPU) and loads the model where
the model file says, so a model that spreads itself over GPUs runs as it was saved.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import ConfigError

__all__ = ["KINDS", "MAX_INSTANCES", "InstanceGroup", "cuda_device_count"]

#: Where an instance group runs (Triton's ``instance_group.kind``).
KINDS = ("KIND_AUTO", "KIND_CPU", "KIND_GPU", "KIND_MODEL")

#: The most worker processes one model may ask for (all groups and GPUs together): each
#: is a process with its own interpreter and torch, so an unbounded count is a way to
#: exhaust the machine with one line of configuration.
MAX_INSTANCES = 256


@dataclass
class InstanceGroup:
    """A group of instances and where they run, as Triton's ``instance_group``.

    ``count`` instances are started on *each* GPU of ``gpus`` (all visible GPUs when
    empty) for ``KIND_GPU``; ``count`` CPU instances for ``KIND_CPU``; ``KIND_AUTO``
    is ``KIND_GPU`` when CUDA is available and every listed GPU exists, else
    ``KIND_CPU`` (Triton's rule); ``count`` instances for ``KIND_MODEL``, each placing
    itself (its worker is given no device: ``"cpu"`` to the pool).

    Raises:
        ConfigError: an unknown kind, a count below 1, negative GPU numbers, or GPUs
            listed for ``KIND_CPU`` or ``KIND_MODEL``.
    """

    count: int = 1
    kind: str = "KIND_AUTO"
    gpus: Sequence[int] = ()
    name: str = ""

    def __post_init__(self) -> None:
        kind = str(self.kind).upper()
        if not kind.startswith("KIND_"):
            kind = "KIND_" + kind
        if kind not in KINDS:
            raise ConfigError(
                f"instance_group kind {self.kind!r} is not supported; expected one of {', '.join(KINDS)}", key="kind"
            )
        self.kind = kind
        if not isinstance(self.count, int) or isinstance(self.count, bool) or not 1 <= self.count <= MAX_INSTANCES:
            raise ConfigError(
                f"instance_group count is {self.count!r}; expected an integer from 1 to {MAX_INSTANCES}", key="count"
            )
        self.gpus = tuple(int(g) for g in self.gpus)
        if any(g < 0 for g in self.gpus):
            raise ConfigError(f"instance_group gpus {list(self.gpus)} must be GPU numbers >= 0", key="gpus")
        if self.gpus and kind in ("KIND_CPU", "KIND_MODEL"):
            raise ConfigError(f"instance_group lists gpus but its kind is {kind}", key="gpus")
        self.name = str(self.name)

    def devices(self, model: str, cuda_devices: int) -> list[str]:
        """The device of each instance of this group on a machine with ``cuda_devices`` GPUs.

        Raises:
            ConfigError: a ``KIND_GPU`` group asks for a GPU this machine does not have.
        """
        kind = self.kind
        if kind == "KIND_AUTO":
            on_gpu = cuda_devices > 0 and all(g < cuda_devices for g in self.gpus)
            kind = "KIND_GPU" if on_gpu else "KIND_CPU"
        if kind in ("KIND_CPU", "KIND_MODEL"):  # (a KIND_MODEL worker is given no device)
            return ["cpu"] * self.count
        gpus = self.gpus or tuple(range(cuda_devices))
        if not gpus:
            raise ConfigError(
                f"model {model!r} asks for KIND_GPU instances; this machine has no CUDA device", model=model, key="kind"
            )
        for g in gpus:
            if g >= cuda_devices:
                have = (
                    "no CUDA device" if cuda_devices == 0 else f"{cuda_devices} CUDA device(s) (0..{cuda_devices - 1})"
                )
                raise ConfigError(f"model {model!r} asks for GPU {g}; this machine has {have}", model=model, key="gpus")
        return [f"cuda:{g}" for g in gpus for _ in range(self.count)]


def cuda_device_count() -> int:
    """GPUs visible to this process (0 without a CUDA build of torch or a driver)."""
    try:
        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:  # a broken driver counts as none
        return 0

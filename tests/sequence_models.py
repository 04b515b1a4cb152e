"""Stateful test models for sequence batching, and what running a sequence alone gives.

Each model keeps its state only through Triton's implicit state (``state`` in
``sequence_batching``): the worker hands it the state its sequence's last request
left, and keeps the new one it returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from libtorchrt import ControlInput, ModelConfig, SequenceBatching, SequenceState, TensorSpec

__all__ = [
    "HIDDEN",
    "Accumulator",
    "Controls",
    "ResetAccumulator",
    "RnnStep",
    "accumulator_config",
    "rnn_alone",
    "save",
]

HIDDEN = 8
INPUTS = 4


class Accumulator(torch.nn.Module):
    """The running total of a sequence's inputs: state + x, returned and kept."""

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total = state + x
        return total, total


class ResetAccumulator(torch.nn.Module):
    """A running total that the model itself restarts on CONTROL_SEQUENCE_START."""

    def forward(self, x: torch.Tensor, start: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total = torch.where(start > 0, torch.zeros_like(state), state) + x
        return total, total


class Controls(torch.nn.Module):
    """Echoes each row's input and control values: [x, start, end, ready, corrid]."""

    def forward(
        self, x: torch.Tensor, start: torch.Tensor, end: torch.Tensor, ready: torch.Tensor, corrid: torch.Tensor
    ) -> torch.Tensor:
        return torch.cat([x, start.float(), end.float(), ready.float(), corrid.float()], dim=1)


class RnnStep(torch.nn.Module):
    """One step of an RNN cell: h' = tanh(x W + h U), y = h' V; h is the state."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.w = torch.nn.Parameter(torch.randn(INPUTS, HIDDEN, generator=g) * 0.5)
        self.u = torch.nn.Parameter(torch.randn(HIDDEN, HIDDEN, generator=g) * 0.5)
        self.v = torch.nn.Parameter(torch.randn(HIDDEN, 2, generator=g))

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(x @ self.w + h @ self.u)
        return h @ self.v, h


def save(module: torch.nn.Module, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(module).save(str(path))
    return path


def accumulator_config(
    path: Path, name: str = "acc", *, instances: int = 1, max_batch_size: int = 4, **sequence: object
) -> ModelConfig:
    """The accumulator's configuration: input ``x`` [1], output ``OUTPUT__0`` [1], the
    state ``state`` -> ``OUTPUT__1``; ``sequence`` sets SequenceBatching's fields."""
    return ModelConfig(
        name,
        path,
        instances=instances,
        max_batch_size=max_batch_size,
        inputs=[TensorSpec("x", "float32", [1])],
        outputs=[TensorSpec("OUTPUT__0", "float32", [1])],
        sequence_batching=SequenceBatching(
            states=[SequenceState("state", "OUTPUT__1", "float32", [1])],
            **sequence,  # type: ignore[arg-type]
        ),
    )


def controls_config(path: Path, name: str = "controls", *, max_batch_size: int = 4) -> ModelConfig:
    """The control echo's configuration, with every control kind."""
    return ModelConfig(
        name,
        path,
        max_batch_size=max_batch_size,
        inputs=[TensorSpec("x", "float32", [1])],
        outputs=[TensorSpec("OUTPUT__0", "float32", [5])],
        sequence_batching=SequenceBatching(
            control_inputs=[
                ControlInput("start", "CONTROL_SEQUENCE_START", "int32", (0, 1)),
                ControlInput("end", "CONTROL_SEQUENCE_END", "float32", (0.0, 1.0)),
                ControlInput("ready", "CONTROL_SEQUENCE_READY", "bool", (False, True)),
                ControlInput("corrid", "CONTROL_SEQUENCE_CORRID", "uint64"),
            ],
            max_queue_delay_microseconds=20_000,
            minimum_slot_utilization=1.0,
        ),
    )


def rnn_alone(steps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """What running one sequence alone in this process gives, step by step."""
    model = RnnStep()
    h = torch.zeros(1, HIDDEN)
    out = []
    with torch.no_grad():
        for x in steps:
            y, h = model(x, h)
            out.append(y)
    return out

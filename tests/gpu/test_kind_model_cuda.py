"""KIND_MODEL instances on a GPU machine: the worker, given no device, loads a TorchScript
file without ``map_location``, so weights saved on a GPU stay there; inputs arrive on
the CPU, and outputs the model leaves on the GPU come back on the CPU.

Skipped without a CUDA device. ``scripts/gpu_check.sh`` runs them on a GPU machine.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from libtorchrt import InstanceGroup, ModelConfig, Pool

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class PlacedOnGpu(nn.Module):
    """Its weight lives on cuda:0; ``x`` is moved there; also says where it ran."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.full([4], 2.0))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        on = torch.tensor([1 if self.w.is_cuda else 0, 1 if x.is_cuda else 0], device=self.w.device)
        return x.to(self.w.device) * self.w, on


def test_a_kind_model_instance_keeps_its_weights_where_they_were_saved(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.jit.script(PlacedOnGpu().cuda()).save(str(tmp_path / "placed.pt"))
    cfg = ModelConfig("placed", tmp_path / "placed.pt", instance_groups=[InstanceGroup(2, "KIND_MODEL")])
    assert cfg.placements() == ["cpu", "cpu"] and cfg.placed_by_model() == [True, True]
    with Pool(models=[cfg]) as pool:
        assert [w.device for w in pool.workers()] == ["cpu", "cpu"]
        for x in (torch.arange(4.0), torch.arange(4.0, device="cuda")):  # (a CUDA input arrives on the CPU)
            out = pool.infer("placed", x)
            assert out["OUTPUT__0"].device.type == "cpu" and torch.equal(out["OUTPUT__0"], torch.arange(4.0) * 2)
            assert out["OUTPUT__1"].tolist() == [1, 0]  # weights on the GPU; the input came on the CPU
    cpu = ModelConfig("placed", tmp_path / "placed.pt", instance_groups=[InstanceGroup(1, "KIND_CPU")])
    with Pool(models=[cpu]) as pool:  # KIND_CPU maps it to the CPU, as before
        assert pool.infer("placed", torch.arange(4.0))["OUTPUT__1"].tolist() == [0, 0]

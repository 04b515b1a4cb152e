"""PT2 formats on a GPU: an AOTInductor package compiled for CUDA serves on KIND_GPU
instances (batched), the same package on a CPU instance is refused naming its device,
and an exported program and a model.py are moved to the instance's GPU.

Skipped without a CUDA device (``scripts/gpu_check.sh`` runs tests/gpu on a GPU machine).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from libtorchrt import DynamicBatching, ModelConfig, Pool, WorkerStartError

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pt2-cuda")
    model = _Net().eval().cuda()
    batch = torch.export.Dim("batch", min=1, max=32)
    program = torch.export.export(model, (torch.randn(4, 32, device="cuda"),), dynamic_shapes={"x": {0: batch}})
    out = {"aoti": d / "net_cuda.pt2", "exported": d / "net_cuda_program.pt2", "py": d / "py" / "model.py"}
    torch._inductor.aoti_compile_and_package(program, package_path=str(out["aoti"]))
    torch.export.save(program, out["exported"])
    out["py"].parent.mkdir()
    out["py"].write_text(
        textwrap.dedent(
            """
            import torch

            class Model(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.body = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))

                def forward(self, x: torch.Tensor) -> torch.Tensor:
                    return self.body(x)
            """
        )
    )
    torch.save(_Net().state_dict(), out["py"].parent / "model.pt")
    return out


def test_cuda_package_serves_on_gpu_instances_batched(artifacts: dict[str, Path]) -> None:
    cfg = ModelConfig(
        "net",
        artifacts["aoti"],
        devices="cuda:0",
        instances=2,
        max_batch_size=16,
        dynamic_batching=DynamicBatching(max_queue_delay_microseconds=500),
    )
    reference = _Net().eval()
    with Pool(models=[cfg], strict=True) as pool:
        assert {w.flags["FORMAT"] for w in pool.workers()} == {"aoti"}
        futures = [pool.submit("net", [torch.randn(1 + i % 3, 32)]) for i in range(24)]
        for f in futures:
            assert f.result(timeout=60)["OUTPUT__0"].shape[1] == 8
        x = torch.randn(3, 32)
        torch.testing.assert_close(pool.infer("net", [x])["OUTPUT__0"].cpu(), reference(x), rtol=1e-3, atol=1e-3)


def test_cuda_package_on_a_cpu_instance_is_refused_naming_its_device(artifacts: dict[str, Path]) -> None:
    with pytest.raises(WorkerStartError, match="compiled for 'cuda'"):
        Pool(models=[ModelConfig("net", artifacts["aoti"], devices="cpu")], strict=True)


@pytest.mark.parametrize("which", ["exported", "py"])
def test_exported_program_and_model_py_run_on_the_instance_gpu(artifacts: dict[str, Path], which: str) -> None:
    reference = _Net().eval()
    x = torch.randn(2, 32)
    with Pool(models=[ModelConfig("net", artifacts[which], devices="cuda:0")], strict=True) as pool:
        out = pool.infer("net", [x])["OUTPUT__0"]
        torch.testing.assert_close(out.cpu(), reference(x), rtol=1e-3, atol=1e-3)

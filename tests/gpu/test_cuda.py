"""GPU instances: CUDA tensor round trips through CUDA IPC, instances per GPU, sticky
errors, per-model GPU flags, and no device memory left after close.

Skipped without a CUDA device. ``scripts/gpu_check.sh`` runs them on a GPU machine.
"""

from __future__ import annotations

import gc
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from libtorchrt import ConfigError, DynamicBatching, ModelConfig, ModelError, Pool, TensorSpec
from tests import models
from tests.conftest import assert_no_leaks, run_threads, snapshot

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class IndexSelect(nn.Module):
    """``x[idx]`` on the GPU: an index out of range trips a device-side assert."""

    def forward(self, x: Tensor, idx: Tensor) -> Tensor:
        return torch.index_select(x, 0, idx)


class Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.conv(x))


class RowsOnDevice(nn.Module):
    """``x * 2 + 1`` per row, and per row 1 when it ran on a GPU (else 0)."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        on = torch.full([x.shape[0]], 1 if x.is_cuda else 0, dtype=torch.int64, device=x.device)
        return x * 2 + 1, on


EXTRA = {"index_select": IndexSelect, "conv": Conv, "rows": RowsOnDevice}


@pytest.fixture(scope="module")
def gpu_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("gpu-models")
    for name in ("tiny", "identity", "add", "two"):
        models.save(name, d)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        for name, cls in EXTRA.items():
            torch.jit.script(cls()).save(str(d / f"{name}.pt"))
    return d


@pytest.fixture(scope="module", autouse=True)
def cuda_ready(gpu_dir: Path) -> None:
    """CUDA round trips of both kinds first (in place, and copied), so that the CUDA
    driver's own per-process descriptors and mappings exist before the leak checks
    take their snapshots: its first interprocess event opens /dev/shm/cuda.shm.*,
    which it keeps for the life of the process."""
    torch.cuda.init()
    with Pool(models=[ModelConfig("identity", gpu_dir / "identity.pt", devices="cuda:0")]) as pool:
        pool.infer("identity", torch.ones(4, device="cuda"))
        pool.infer("identity", torch.ones(4, 4, device="cuda").t())  # non-contiguous: copied


@pytest.fixture
def gpu_pool(gpu_dir: Path) -> Iterator[Callable[..., Pool]]:
    before = snapshot()
    pools: list[Pool] = []

    def make(*specs: Any, **kwargs: Any) -> Pool:
        configs = [
            s if isinstance(s, ModelConfig) else ModelConfig(s, gpu_dir / f"{s}.pt", devices="cuda:0") for s in specs
        ]
        pool = Pool(models=configs, **kwargs)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()
    assert_no_leaks(before, timeout=15.0)


def test_gpu_workers_run_on_their_gpu_and_answer_cpu_inputs_on_the_cpu(gpu_pool: Callable[..., Pool]) -> None:
    pool = gpu_pool("tiny")
    assert [w.device for w in pool.workers()] == ["cuda:0"]
    x = torch.randn(8, 64)
    out = pool.infer("tiny", x)["OUTPUT__0"]
    assert out.device.type == "cpu"
    torch.testing.assert_close(out, models.reference("tiny")(x), rtol=1e-4, atol=1e-4)


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.uint8, torch.bool]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_cuda_tensors_round_trip_on_the_gpu(gpu_pool: Callable[..., Pool], dtype: torch.dtype) -> None:
    pool = gpu_pool("identity")
    for shape in [(3,), (5, 7), (2, 3, 4, 5), (1 << 20,), (0, 3)]:
        x = (torch.randn(shape, device="cuda") * 100).to(dtype)
        out = pool.infer("identity", x)["OUTPUT__0"]
        assert out.device == x.device and out.dtype == dtype and out.shape == x.shape
        assert torch.equal(out, x), shape


def test_non_contiguous_cuda_inputs_arrive_in_order(gpu_pool: Callable[..., Pool]) -> None:
    pool = gpu_pool("identity")
    base = torch.arange(4096 * 3, device="cuda", dtype=torch.float32).reshape(4096, 3)
    for x in (base.t(), base[::2], base[:, 1], base.t()[1:, ::3]):
        assert not x.is_contiguous()
        out = pool.infer("identity", x)["OUTPUT__0"]
        assert out.is_cuda and torch.equal(out, x)


def test_mixed_cpu_and_cuda_inputs(gpu_pool: Callable[..., Pool]) -> None:
    pool = gpu_pool("add")
    a, b = torch.randn(1000), torch.randn(1000, device="cuda")
    out = pool.infer("add", {"a": a, "b": b})["OUTPUT__0"]
    assert out.is_cuda
    torch.testing.assert_close(out, a.cuda() + b)


def test_cuda_outputs_false_gives_cpu_tensors(gpu_pool: Callable[..., Pool]) -> None:
    pool = gpu_pool("two", cuda_outputs=False)
    x = torch.randn(300, 300, device="cuda")
    out = pool.infer("two", x)
    assert all(t.device.type == "cpu" for t in out.values())
    torch.testing.assert_close(out["OUTPUT__0"], (x + 1).cpu())
    torch.testing.assert_close(out["OUTPUT__1"], (x * 2).cpu())


def test_outputs_stay_valid_while_the_buffer_is_reused(gpu_pool: Callable[..., Pool]) -> None:
    # Outputs are the caller's own tensors: later requests must not overwrite them.
    pool = gpu_pool("identity", response_arena_bytes=1 << 20)
    kept = [(i, pool.infer("identity", torch.full((100_000,), float(i), device="cuda"))) for i in range(50)]
    for i, out in kept:
        assert torch.all(out["OUTPUT__0"] == i)


def test_inputs_still_being_computed_are_read_when_done(gpu_pool: Callable[..., Pool]) -> None:
    # The worker reads CUDA inputs in place: the front must wait for the kernels still
    # writing them on the caller's stream (here, a side stream).
    pool = gpu_pool("identity")
    side = torch.cuda.Stream()
    a = torch.randn(2048, 2048, device="cuda")
    with torch.cuda.stream(side):
        for _ in range(3):
            slow = a @ a  # keeps the stream busy
        x = torch.full((1 << 20,), 7.0, device="cuda") + slow[0, 0] * 0
        out = pool.infer("identity", x)["OUTPUT__0"]
    assert torch.all(out == 7.0)


def test_inputs_dropped_after_submit_are_kept_until_read(gpu_pool: Callable[..., Pool]) -> None:
    pool = gpu_pool("identity")
    futures = [pool.submit("identity", torch.full((300_000,), float(i), device="cuda")) for i in range(20)]
    junk = [torch.full((300_000,), -1.0, device="cuda") for _ in range(20)]  # would reuse freed blocks
    for i, f in enumerate(futures):
        assert torch.all(f.result(30)["OUTPUT__0"] == i)
    del junk


def test_outputs_chain_into_the_next_model_and_back(gpu_dir: Path, gpu_pool: Callable[..., Pool]) -> None:
    pool = gpu_pool("two", "identity")
    x = torch.randn(500, 500, device="cuda")
    first = pool.infer("two", x)
    again = pool.infer("two", first["OUTPUT__0"])  # its own output as its input
    other = pool.infer("identity", first["OUTPUT__1"])  # another model's worker reads it
    torch.testing.assert_close(again["OUTPUT__0"], x + 2)
    torch.testing.assert_close(other["OUTPUT__0"], x * 2)


def test_many_threads_get_their_own_results(gpu_dir: Path, gpu_pool: Callable[..., Pool]) -> None:
    pool = gpu_pool(ModelConfig("identity", gpu_dir / "identity.pt", instances=3, devices="cuda:0"))
    assert len({w.pid for w in pool.workers()}) == 3
    errors: list[str] = []

    def caller(k: int) -> None:
        for i in range(40):
            value = float(k * 1000 + i)
            size = 10 if i % 2 else 300_000  # small and large
            x = torch.full((size,), value, device="cuda")
            out = pool.infer("identity", x)["OUTPUT__0"]
            if not torch.all(out == value):
                errors.append(f"thread {k} request {i}")

    run_threads(caller, 8)
    assert not errors
    assert all(w.served > 0 for w in pool.workers()), [w.served for w in pool.workers()]


def test_dynamic_batching_runs_batches_on_the_gpu(gpu_dir: Path, gpu_pool: Callable[..., Pool]) -> None:
    cfg = ModelConfig(
        "rows",
        gpu_dir / "rows.pt",
        instances=2,
        devices="cuda:0",
        max_batch_size=16,
        inputs=[TensorSpec("INPUT__0", "float32", [4])],
        dynamic_batching=DynamicBatching(max_queue_delay_microseconds=2000),
    )
    pool = gpu_pool(cfg)
    errors: list[str] = []

    def caller(k: int) -> None:
        for i in range(30):
            n = 1 + (k + i) % 3
            x = torch.tensor([[float(k * 1000 + i * 10 + r)] * 4 for r in range(n)])
            if i % 3 == 0:  # CUDA inputs are gathered on the host too (docs/batching.md)
                x = x.cuda()
            out = pool.infer("rows", x)
            y, on = out["OUTPUT__0"], out["OUTPUT__1"]
            if y.is_cuda or not torch.equal(y, x.cpu() * 2 + 1) or on.tolist() != [1] * n:
                errors.append(f"caller {k} request {i}: {y[:, 0].tolist()} on={on.tolist()}")

    run_threads(caller, 8)
    assert not errors, errors[:5]
    (stats,) = pool.stats()
    assert stats.success == 240 and stats.executions < 240  # batched, on the GPU workers
    assert all(w.device == "cuda:0" for w in pool.workers())


def test_device_side_assert_replaces_the_worker(gpu_pool: Callable[..., Pool]) -> None:
    pool = gpu_pool("index_select")
    x = torch.randn(10, 4, device="cuda")
    ok = pool.infer("index_select", {"x": x, "idx": torch.tensor([1, 2], device="cuda")})["OUTPUT__0"]
    torch.testing.assert_close(ok, x[[1, 2]])
    pid = pool.workers()[0].pid
    with pytest.raises(ModelError) as e:
        pool.infer("index_select", {"x": x, "idx": torch.tensor([10**6], device="cuda")})
    assert "device-side assert" in str(e.value) or "CUDA error" in str(e.value)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        w = pool.workers()[0]
        if w.pid != pid and w.state == "ready":
            break
        time.sleep(0.1)
    assert pool.workers()[0].pid != pid
    assert pool.health()["index_select"].instances[0].restarts == 1
    again = pool.infer("index_select", {"x": x, "idx": torch.tensor([3], device="cuda")})["OUTPUT__0"]
    torch.testing.assert_close(again, x[[3]])


def test_gpu_flags_and_environment_are_per_model(gpu_dir: Path, gpu_pool: Callable[..., Pool]) -> None:
    a = ModelConfig(
        "conv",
        gpu_dir / "conv.pt",
        devices="cuda:0",
        parameters={"DISABLE_CUDNN": "true", "ENABLE_CACHE_CLEANING": "true"},
        env={"CUDA_LAUNCH_BLOCKING": "1"},
    )
    b = ModelConfig("tiny", gpu_dir / "tiny.pt", devices="cuda:0")
    pool = gpu_pool(a, b)
    flags = {w.model: w.flags for w in pool.workers()}
    assert flags["conv"]["DISABLE_CUDNN"] is True and flags["tiny"]["DISABLE_CUDNN"] is False
    assert flags["conv"]["ENABLE_CACHE_CLEANING"] is True
    environ = {w.model: Path(f"/proc/{w.pid}/environ").read_bytes().split(b"\0") for w in pool.workers()}
    assert b"CUDA_LAUNCH_BLOCKING=1" in environ["conv"]
    assert not any(e.startswith(b"CUDA_LAUNCH_BLOCKING=") for e in environ["tiny"])
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        ref = torch.jit.load(str(gpu_dir / "conv.pt"))(x)  # float32 on the CPU
    out = pool.infer("conv", x.cuda())["OUTPUT__0"]
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-3, atol=1e-3)


def test_kind_gpu_repository_starts_count_per_gpu(gpu_dir: Path, gpu_pool: Callable[..., Pool], tmp_path: Path) -> None:
    (tmp_path / "tiny" / "1").mkdir(parents=True)
    (tmp_path / "tiny" / "1" / "model.pt").write_bytes((gpu_dir / "tiny.pt").read_bytes())
    (tmp_path / "tiny" / "config.pbtxt").write_text(
        'platform: "pytorch_libtorch"\ninstance_group [ { count: 2 kind: KIND_GPU gpus: [ 0 ] } ]\n'
    )
    pool = Pool(tmp_path)
    try:
        assert [w.device for w in pool.workers()] == ["cuda:0", "cuda:0"]
        assert pool.infer("tiny", torch.randn(1, 64, device="cuda"))["OUTPUT__0"].is_cuda
    finally:
        pool.close()


def test_kind_auto_picks_the_gpu(gpu_dir: Path) -> None:
    assert ModelConfig("m", gpu_dir / "tiny.pt", devices="auto").placements()[0] == "cuda:0"
    n = torch.cuda.device_count()
    with pytest.raises(ConfigError, match=f"asks for GPU {n}; this machine has {n} CUDA device"):
        ModelConfig("m", gpu_dir / "tiny.pt", devices=f"cuda:{n}").placements()


def test_no_device_memory_is_left_after_close(gpu_dir: Path) -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free_before = torch.cuda.mem_get_info()[0]
    pool = Pool(
        models=[ModelConfig("identity", gpu_dir / "identity.pt", instances=2, devices="cuda:0")],
        request_arena_bytes=64 << 20,
        response_arena_bytes=64 << 20,
    )
    with pool:
        during = torch.cuda.mem_get_info()[0]
        outs = [pool.infer("identity", torch.full((1 << 20,), float(i), device="cuda")) for i in range(20)]
        assert len(outs) == 20
    # Outputs view the pool's memory: they stay valid after close, and free it when dropped.
    assert all(torch.all(o["OUTPUT__0"] == i) for i, o in enumerate(outs))
    del outs
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        free_after = torch.cuda.mem_get_info()[0]
        if free_after >= free_before - (8 << 20):
            break
        time.sleep(0.2)
    print(f"free before {free_before >> 20} MiB, with the pool {during >> 20} MiB, after close {free_after >> 20} MiB")
    assert free_after >= free_before - (8 << 20), (free_before >> 20, free_after >> 20)

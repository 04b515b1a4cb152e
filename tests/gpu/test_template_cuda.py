"""GPU workers forked from the template (``start_method="forkserver"``): the template never
touches CUDA, each forked worker initializes it on its own device, and a worker killed
with a CUDA context is replaced by another fork (docs/startup.md).

Skipped without a CUDA device. ``scripts/gpu_check.sh`` runs them on a GPU machine.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from libtorchrt import ModelConfig, Pool
from tests import models
from tests.conftest import closing_pool, wait_for

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _maps_cuda(pid: int) -> bool:
    """Whether process ``pid`` initialized the CUDA driver (it holds /dev/nvidia* open)."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/dev/nvidia"):
                return True
        except OSError:
            continue
    return False


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    d = tmp_path_factory.mktemp("gpu-template")
    models.save("tiny", d)
    with closing_pool(models=[ModelConfig("tiny", Path(d) / "tiny.pt", instances=2, devices="cuda:0")]) as p:
        yield p


def test_gpu_workers_are_forked_and_the_template_never_starts_cuda(pool: Pool) -> None:
    template = pool._router.supervisor.template
    assert template is not None and template.ready
    workers = pool.workers()
    assert all(_parent(w.pid) == template.pid and w.device == "cuda:0" for w in workers)
    assert not _maps_cuda(template.pid)
    assert all(_maps_cuda(w.pid) for w in workers)
    x = torch.randn(4, 64, device="cuda:0")
    out = pool.infer("tiny", [x])["OUTPUT__0"]
    torch.testing.assert_close(out, models.reference("tiny").to("cuda:0")(x))


def test_a_killed_gpu_worker_is_replaced_by_a_fork_that_serves(pool: Pool) -> None:
    template = pool._router.supervisor.template
    assert template is not None
    victim = pool.workers()[0]
    os.kill(victim.pid, signal.SIGKILL)

    def replaced() -> bool:
        return any(w.instance == victim.instance and w.pid != victim.pid and w.state == "ready" for w in pool.workers())

    wait_for(replaced, 60, "the replacement")
    (new,) = [w for w in pool.workers() if w.instance == victim.instance]
    assert _parent(new.pid) == template.pid and _maps_cuda(new.pid) and not _maps_cuda(template.pid)
    x = torch.randn(2, 64, device="cuda:0")
    for _ in range(4):
        torch.testing.assert_close(pool.infer("tiny", [x])["OUTPUT__0"], models.reference("tiny").to("cuda:0")(x))

"""Execution-mode flags: applied per worker process, read back from torch, reported."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from libtorchrt import ModelConfig


def test_each_model_runs_with_its_own_flags(make_pool, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    plain = ModelConfig("plain", model_dir / "tiny.pt", instances=2)
    tuned = ModelConfig(
        "tuned",
        model_dir / "tiny.pt",
        parameters={
            "DISABLE_OPTIMIZED_EXECUTION": "true",
            "ENABLE_JIT_PROFILING": "false",
            "ENABLE_JIT_EXECUTOR": "false",
            "ENABLE_TENSOR_FUSER": "false",
            "INFERENCE_MODE": "false",
            "INTRA_OP_THREAD_COUNT": "2",
            "INTER_OP_THREAD_COUNT": "1",
        },
    )
    pool = make_pool(plain, tuned)
    flags = {(w.model, w.instance): w.flags for w in pool.workers()}
    for i in (0, 1):
        f = flags[("plain", i)]
        assert f["DISABLE_OPTIMIZED_EXECUTION"] is False
        assert f["ENABLE_JIT_PROFILING"] is True and f["ENABLE_JIT_EXECUTOR"] is True
        assert f["ENABLE_TENSOR_FUSER"] is True and f["INFERENCE_MODE"] is True
        assert f["INTRA_OP_THREAD_COUNT"] == 1, "CPU instances default to one intra-op thread"
    f = flags[("tuned", 0)]
    assert f["DISABLE_OPTIMIZED_EXECUTION"] is True
    assert f["ENABLE_JIT_PROFILING"] is False and f["ENABLE_JIT_EXECUTOR"] is False
    assert f["ENABLE_TENSOR_FUSER"] is False and f["INFERENCE_MODE"] is False
    assert f["INTRA_OP_THREAD_COUNT"] == 2 and f["INTER_OP_THREAD_COUNT"] == 1
    # and both still compute the same thing
    x = torch.randn(4, 64)
    torch.testing.assert_close(pool.infer("plain", [x])["OUTPUT__0"], pool.infer("tuned", [x])["OUTPUT__0"])
    assert len({w.pid for w in pool.workers()}) == 3


def policy(pid: int) -> int:
    """The scheduling policy of every thread of process ``pid``, if they all share one."""
    policies = {os.sched_getscheduler(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}
    assert len(policies) == 1, policies
    return policies.pop()


def test_workers_run_under_sched_batch_unless_told_not_to(make_pool, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    plain = ModelConfig("plain", model_dir / "tiny.pt")
    other = ModelConfig(
        "other", model_dir / "tiny.pt", parameters={"SCHED_BATCH": "false", "INTRA_OP_THREAD_COUNT": "2"}
    )
    pool = make_pool(plain, other)
    x = torch.randn(64, 64)  # (enough rows for torch to start its intra-op threads in "other")
    for name in ("plain", "other"):
        pool.infer(name, [x])
    workers = {w.model: w for w in pool.workers()}
    assert workers["plain"].flags["SCHED_BATCH"] is True
    assert workers["other"].flags["SCHED_BATCH"] is False
    assert workers["plain"].pid is not None and workers["other"].pid is not None
    # (the model's thread, and torch's threads started after it)
    main_plain = os.sched_getscheduler(workers["plain"].pid)
    assert main_plain == os.SCHED_BATCH
    assert policy(workers["other"].pid) == os.SCHED_OTHER
    assert os.sched_getscheduler(0) == os.SCHED_OTHER, "the front's own threads keep theirs"


def test_nvfuser_is_accepted_with_a_warning_that_it_does_nothing(make_pool, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = ModelConfig("fused", model_dir / "tiny.pt", parameters={"ENABLE_NVFUSER": "true"})
    with pytest.warns(RuntimeWarning, match="ENABLE_NVFUSER .* no effect"):
        pool = make_pool(cfg)
    assert pool.workers()[0].flags["ENABLE_NVFUSER"] is False
    assert pool.infer("fused", [torch.randn(1, 64)])["OUTPUT__0"].shape == (1, 64)


def test_unknown_parameters_pass_through_with_a_warning(make_pool, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = ModelConfig("typo", model_dir / "tiny.pt", parameters={"DISABLE_OPTIMISED_EXECUTION": "true"})
    with pytest.warns(RuntimeWarning, match="DISABLE_OPTIMISED_EXECUTION"):
        pool = make_pool(cfg)
    assert pool.workers()[0].flags["DISABLE_OPTIMIZED_EXECUTION"] is False

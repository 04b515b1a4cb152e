"""Shared, read-only weights (workers/weights.py): real memfds, real mappings, and a
real process that writes into its weights and dies of it."""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Iterator

import pytest
import torch

from libtorchrt.workers import weights


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64), torch.nn.Linear(64, 8)).eval()


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("libtorchrt-test-weights", os.MFD_ALLOW_SEALING)
    yield fd
    os.close(fd)


def test_the_first_instance_fills_and_every_instance_maps_one_copy(memfd: int) -> None:
    a, b = _model(), _model()
    x = torch.randn(4, 64)
    expected = a(x)
    first = weights.share(a, memfd, "m")
    second = weights.share(b, memfd, "m")
    assert first.filled and not second.filled
    total = sum(t.nbytes for _, t in weights.tensors_of(a))
    assert first.nbytes == second.nbytes == total
    assert weights.shared_bytes(a, first.mapping) == total
    assert not first.notes and not second.notes
    torch.testing.assert_close(a(x), expected)
    torch.testing.assert_close(b(x), expected)
    # The two modules' weights are the same pages: one mapping's bytes change, both see it
    # (read-only for us; the kernel shares the pages of the one memfd).
    assert os.fstat(memfd).st_size >= total


def test_the_memfd_is_sealed_once_filled(memfd: int) -> None:
    weights.share(_model(), memfd, "m")
    with pytest.raises(PermissionError):
        os.ftruncate(memfd, 16)
    with pytest.raises(PermissionError):
        os.pwrite(memfd, b"x", 200)


def test_weights_that_differ_are_kept_private_with_a_note(memfd: int) -> None:
    weights.share(_model(seed=0), memfd, "m")
    other = _model(seed=1)
    x = torch.randn(2, 64)
    expected = other(x)
    shared = weights.share(other, memfd, "m")
    # Only the batch norm's tensors (zeros and ones in both models) are the same bytes.
    assert shared.nbytes == sum(t.nbytes for t in (*other[1].parameters(), *other[1].buffers()))
    assert any("differ from the shared copy" in n for n in shared.notes)
    torch.testing.assert_close(other(x), expected)


def test_a_tied_weight_is_stored_once(memfd: int) -> None:
    m = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False))
    m[1].weight = m[0].weight
    shared = weights.share(m, memfd, "m")
    assert shared.nbytes == 8 * 8 * 4
    assert m[0].weight.data_ptr() == m[1].weight.data_ptr()


_WRITER = textwrap.dedent(
    """
    import os, sys, torch
    from libtorchrt.workers import weights
    fd = int(sys.argv[1])
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64), torch.nn.Linear(64, 8)).eval()
    weights.share(m, fd, "m")
    print("mapped", flush=True)
    with torch.no_grad():
        m[0].weight.add_(1.0)   # a model that writes into its weights
    print("wrote", flush=True)
    """
)


def test_a_process_that_writes_into_shared_weights_dies_alone(memfd: int) -> None:
    mine = _model()
    x = torch.randn(3, 64)
    expected = mine(x)
    weights.share(mine, memfd, "m")
    proc = subprocess.run(
        [sys.executable, "-c", _WRITER, str(memfd)], pass_fds=(memfd,), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -signal.SIGSEGV, proc.stderr[-2000:]
    assert "mapped" in proc.stdout and "wrote" not in proc.stdout
    torch.testing.assert_close(mine(x), expected)


_SHARER = textwrap.dedent(
    """
    import sys, time, torch
    from libtorchrt.workers import weights
    torch.manual_seed(0)
    m = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(4)]).eval()
    time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # all three at once
    s = weights.share(m, int(sys.argv[1]), "m")
    print(s.filled, s.nbytes, s.notes, flush=True)
    """
)


def test_instances_that_start_together_take_turns(memfd: int) -> None:
    """The one that fills seals the memfd while no sibling maps it (a lock that mmap's
    own descriptor could release would let one in, and sealing would fail)."""
    at = str(time.time() + 5.0)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SHARER, str(memfd), at], pass_fds=(memfd,), stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120)[0].split(maxsplit=2) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    assert sorted(o[0] for o in outs) == ["False", "False", "True"], "exactly one fills"
    assert {o[1] for o in outs} == {str(4 * (1024 * 1024 + 1024) * 4)}


_TRY_LOCK = textwrap.dedent(
    """
    import fcntl, os, sys
    own = os.open(f"/proc/self/fd/{sys.argv[1]}", os.O_RDONLY)
    try:
        fcntl.flock(own, fcntl.LOCK_EX | fcntl.LOCK_NB)
        print("got it")
    except BlockingIOError:
        print("held")
    """
)


def test_the_fill_lock_survives_the_mapping_closing_its_descriptor(memfd: int) -> None:
    """mmap duplicates the descriptor and closes the duplicate: a lock that this
    releases (a POSIX record lock) would let a sibling map the memfd mid-fill."""
    os.ftruncate(memfd, 4096)
    with weights._locked(memfd):
        mmap.mmap(memfd, 4096).close()
        other = subprocess.run(
            [sys.executable, "-c", _TRY_LOCK, str(memfd)], pass_fds=(memfd,), capture_output=True, text=True
        )
        assert other.stdout.strip() == "held", other.stderr
    after = subprocess.run(
        [sys.executable, "-c", _TRY_LOCK, str(memfd)], pass_fds=(memfd,), capture_output=True, text=True
    )
    assert after.stdout.strip() == "got it"


def test_a_model_without_weights_shares_nothing_and_says_nothing(memfd: int) -> None:
    shared = weights.share(torch.nn.ReLU(), memfd, "m")
    assert (shared.nbytes, shared.mapping, shared.notes) == (0, None, [])
    assert os.fstat(memfd).st_size == 0, "nothing filled: a sibling with weights would fill it"


def test_freezing_keeps_unfolded_weights_in_the_shared_copy(memfd: int) -> None:
    """Sharing happens before FREEZE_MODULE / OPTIMIZE_FOR_INFERENCE: the constants
    freezing makes of unfolded weights still point into the shared mapping."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU()).eval())
        shared = weights.share(scripted, memfd, "m")
        frozen = torch.jit.freeze(scripted.eval())
    assert shared.nbytes == (32 * 32 + 32) * 4
    assert weights.shared_bytes(frozen, shared.mapping) == shared.nbytes

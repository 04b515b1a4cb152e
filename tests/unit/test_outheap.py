"""The native output heap (``transport/_outheap.c``) in a process of its own: it
redirects that process's libc10 for good, so each test runs a script in a fresh
interpreter, on a real memfd and real torch tensors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("libtorchrt.transport._outheap")

PRELUDE = """
import os
import torch
from libtorchrt.transport import _outheap as heap
from libtorchrt.transport.arena import Arena
from libtorchrt.transport.outheap import OutputHeap, install

SIZE = 16 << 20
arena = Arena(SIZE)
"""


def run(body: str) -> str:
    script = textwrap.dedent(PRELUDE) + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_large_tensors_made_while_enabled_live_in_the_arena_and_are_freed_there() -> None:
    run("""
        out, note = install(arena)
        assert out is not None and note == "", note
        x = torch.randn(1 << 20)
        before = x * 1.0  # (not enabled: glibc's)
        out.enable(True)
        y = x * 2.0
        small = x[:16] * 2.0
        out.enable(False)
        after = x * 1.0
        inside = lambda t: 0 <= t.data_ptr() - out.address < SIZE
        assert inside(y) and not inside(small) and not inside(before) and not inside(after)
        assert torch.equal(y, x * 2.0)
        # the front's view of the same bytes (another mapping of the memfd)
        offset = out.adopt(y)
        assert torch.equal(arena.view(offset, y.nbytes, torch.float32, (1 << 20,)), y)
        assert out.adopt(small) is None and out.adopt(y[::2]) is None
        assert out.used >= y.nbytes
        del y
        assert out.used >= 4 << 20, "an adopted output was freed before its release"
        out.free(offset)
        assert out.used == 0 and heap.stats()["hooked_allocs"] == 1
    """)


def test_copies_share_the_heap_and_coalesce() -> None:
    run("""
        out, _ = install(arena)
        a, b, c = (out.alloc(1 << 20) for _ in range(3))
        assert a is not None and b is not None and c is not None and len({a, b, c}) == 3
        assert all(o % 64 == 0 for o in (a, b, c))
        out.free(b)
        out.free(a)
        out.free(c)
        assert out.used == 0 and heap.stats()["free_blocks"] == 1
        try:
            out.free(a)
        except ValueError as e:
            assert "no allocated slot" in str(e)
        else:
            raise AssertionError("a double free was accepted")
        whole = out.alloc(SIZE - 64)
        assert whole is not None and out.alloc(1) is None
        out.free(whole)
    """)


def test_the_model_cannot_take_the_whole_arena() -> None:
    # Hooked allocations stop at 3/4 of the arena (then torch gets glibc's memory),
    # so a copy still finds room.
    run("""
        out, _ = install(arena)
        out.enable(True)
        kept = [torch.empty((1 << 20) - 16) for _ in range(5)]  # 4 MiB with its header: 3 fit
        out.enable(False)
        inside = [0 <= t.data_ptr() - out.address < SIZE for t in kept]
        assert inside == [True, True, True, False, False], inside
        assert heap.stats()["fallbacks"] == 2
        assert out.alloc(3 << 20) is not None
        for t in kept:
            t.fill_(1.0)
        del kept
        assert heap.stats()["hooked_used"] == 0
    """)


def test_once_per_process() -> None:
    run("""
        out, _ = install(arena)
        try:
            install(Arena(SIZE))
        except RuntimeError as e:
            assert "already" in str(e)
        else:
            raise AssertionError("a second install was accepted")
    """)


def test_a_forked_child_leaves_the_parents_arena_alone() -> None:
    # A model that forks: the child shares the arena, so it must not allocate or free
    # there (its parent's blocks would be corrupted).
    run("""
        out, _ = install(arena)
        out.enable(True)
        y = torch.randn(1 << 20)
        offset = out.adopt(y)
        assert offset is not None
        pid = os.fork()
        if pid == 0:
            z = torch.ones(1 << 20)  # (while enabled, in the child)
            ok = not (0 <= z.data_ptr() - out.address < SIZE) and heap.alloc(1 << 20) == -1
            del y, z  # (frees the child's view of the parent's block: ignored)
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        out.enable(False)
        assert os.waitstatus_to_exitcode(status) == 0
        assert heap.stats()["hooked_used"] >= 4 << 20
        y2 = torch.randn(1 << 20)
        out.enable(True)
        w = y2 * 1.0
        out.enable(False)
        assert 0 <= w.data_ptr() - out.address < SIZE and w.data_ptr() != y.data_ptr()
        out.free(offset)
        del y, w
        assert out.used == 0
    """)

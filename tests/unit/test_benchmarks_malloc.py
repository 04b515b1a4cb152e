"""``benchmarks/_proc.choose_malloc``: the benchmarks' own process (callers, direct rows)
and the baselines' processes take the workers' glibc malloc settings, so that a baseline
keeps a big block on the heap as a worker does, instead of mmapping it afresh on every
call in some processes (docs/benchmarks.md). Checked in a fresh interpreter, by glibc's
own count of mmapped blocks (``mallinfo2``), and in the environment its children get."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import ctypes

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def mmapped(nbytes):
    before = libc.mallinfo2().hblks
    block = libc.malloc(nbytes)
    grew = libc.mallinfo2().hblks - before
    libc.free(block)
    return grew

# glibc's defaults: a block above 128 KiB is mmapped, and freeing it raises that
# threshold to its size (4 MiB here), up to 32 MiB
first = mmapped(4 << 20)

import os
import subprocess
import sys

from benchmarks._proc import choose_malloc
from libtorchrt.workers.process import MALLOC_ENV

choose_malloc(sys.argv[1])
child = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('MALLOC_MMAP_THRESHOLD_'))"],
                       capture_output=True, text=True, check=True).stdout.strip()
print(first, mmapped(16 << 20), mmapped(64 << 20), child == MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"])
"""


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        # glibc's default: a 4 MiB block mmapped; the workers' settings: a 16 MiB one on the
        # heap (their threshold is 32 MiB, glibc's had risen to 4); a 64 MiB one mmapped;
        # a child started afterwards has them in its environment
        ("workers", ["1", "0", "1", "True"]),
        ("glibc", ["1", "1", "1", "False"]),
    ],
)
def test_the_benchmark_processes_take_the_workers_malloc_settings(choice: str, expected: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, choice], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == expected, done.stdout

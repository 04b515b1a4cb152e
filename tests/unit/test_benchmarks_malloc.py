"""``benchmarks/_proc.use_malloc``: realistic.py's own process (its callers and the
direct rows) takes the workers' glibc malloc settings, so that the direct baseline keeps
a big block on the heap as a worker does, instead of mmapping it afresh on every call in
some processes (docs/benchmarks.md). Checked in a fresh interpreter, by glibc's own count
of mmapped blocks (``mallinfo2``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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

from benchmarks._proc import use_malloc
from libtorchrt.workers.process import MALLOC_ENV

use_malloc(MALLOC_ENV)
print(first, mmapped(16 << 20), mmapped(64 << 20))
"""


def test_the_benchmark_process_takes_the_workers_malloc_settings() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # glibc's default: a 4 MiB block mmapped; the workers' settings: a 16 MiB one on the
    # heap (their threshold is 32 MiB, glibc's had risen to 4); a 64 MiB one mmapped
    assert done.stdout.split() == ["1", "0", "1"], done.stdout

"""Process hygiene helpers shared by the benchmark's child processes.

The rules every child of the benchmark follows:

* it is started inside :func:`children_ignore_sigint`, so it is born with
  SIGINT ignored: a Ctrl-C in the terminal reaches only the parent, which then
  shuts its children down in order (no child dies half-way or prints a trace);
* :func:`child_setup` asks Linux to SIGTERM it when its parent dies, so nothing
  is left behind even if the parent is killed hard;
* the parent reaps it (sentinel or "stop" message, then terminate, then kill).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import subprocess
import threading
from collections.abc import Iterator, Mapping
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from libtorchrt.workers.process import MALLOC_ENV
from libtorchrt.workers.template import MALLOPT

_PR_SET_PDEATHSIG = 1
_PARENT_ENV = "TORCHRT_BENCH_PARENT_PID"

REPO_ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def children_ignore_sigint() -> Iterator[None]:
    """Start child processes inside this block: they inherit SIGINT = SIG_IGN.

    The parent itself ignores SIGINT only for the (millisecond) duration of the
    block; a no-op outside the main thread (where signals cannot be set).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def child_setup() -> None:
    """First thing a child does: ignore SIGINT, and die with the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    parent = multiprocessing.parent_process()
    expected = parent.pid if parent is not None else int(os.environ.get(_PARENT_ENV, "0"))
    if expected and os.getppid() != expected:  # the parent died before prctl
        os._exit(1)


def child_env() -> dict[str, str]:
    """Environment for ``python -m benchmarks.*`` children (repo on PYTHONPATH)."""
    env = dict(os.environ)
    parts = [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    env[_PARENT_ENV] = str(os.getpid())
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def use_malloc(settings: Mapping[str, str]) -> None:
    """Apply glibc malloc settings (``MALLOC_MMAP_THRESHOLD_``...) to this running
    process with ``mallopt``, as a forked worker applies its own (glibc reads the
    environment variables only when a process starts).

    Raises:
        OSError: glibc refused one of them.
    """
    libc = ctypes.CDLL(None)
    for key, value in settings.items():
        if not libc.mallopt(MALLOPT[key], int(value)):
            raise OSError(f"mallopt refused {key}={value}")


MALLOC_CHOICES = ("workers", "glibc")
MALLOC_HELP = (
    "glibc's malloc settings of this process and of the baselines' processes: the workers' "
    "(MALLOC_ENV: blocks up to 32 MiB stay on the heap), or glibc's defaults, under which a process "
    "may mmap a tensor of hundreds of KB afresh on every call, or not, from one process to the next "
    "(default: workers)"
)


def choose_malloc(choice: str) -> str:
    """With ``"workers"``, give this process (``mallopt``) and every process it starts
    from now on (the environment, read by glibc at start) the malloc settings that
    libtorchrt's workers run with, so that a baseline differs from a pool by its design,
    not by glibc's mmap threshold; ``"glibc"`` changes nothing. Returns a line for the
    report."""
    if choice == "glibc":
        return "malloc: glibc's defaults in this process and the baselines' (--malloc glibc)"
    os.environ.update(MALLOC_ENV)
    use_malloc(MALLOC_ENV)
    settings = ", ".join(f"{k}={v}" for k, v in MALLOC_ENV.items())
    return f"malloc: the workers' settings in this process and the baselines' ({settings})"


def stop_resource_tracker() -> None:
    """Stop and reap this process's multiprocessing resource tracker, if it runs.

    Otherwise the tracker outlives us briefly and is reparented to init.  Call
    it only once every queue/pool/shared-memory object has been released.
    """
    with contextlib.suppress(Exception):  # private API; best effort
        from multiprocessing import resource_tracker

        tracker: Any = resource_tracker._resource_tracker
        tracker._stop()


def stop_popen(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """Wait ``grace`` seconds for ``proc`` to exit; then terminate, then kill it."""
    for action in (None, proc.terminate, proc.kill):
        if action is not None:
            with contextlib.suppress(ProcessLookupError):
                action()
        try:
            proc.wait(timeout=grace if action is None else 5.0)
            return
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


def stop_process(proc: BaseProcess, grace: float = 10.0) -> bool:
    """Join a multiprocessing child for ``grace`` seconds; then terminate, then kill it.

    Returns True if it had to be forced.
    """
    if proc.pid is None:  # never started
        return False
    proc.join(timeout=grace)
    if proc.exitcode is not None:
        return False
    proc.terminate()
    proc.join(timeout=5.0)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
    return True

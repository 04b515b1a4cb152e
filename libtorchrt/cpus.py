"""Which CPUs the front's threads and the workers run on: ``Pool(front_cpus=...)`` (any process).

By default nothing is pinned: the kernel places every thread. An application whose
threads call ``Pool.infer`` then meets CPython's GIL convoy: once two of its threads
wait for the GIL on different CPUs, each of the many times a torch call lets go of it
becomes a hand-off between CPUs, and the front slows down for seconds at a
time (figures: docs/benchmarks.md, "Front CPUs"). The front's Python runs one thread
at a time anyway, so keeping it on its own CPUs costs it little, and the workers, which
are other processes with their own interpreters, get the rest.

:func:`split` turns ``front_cpus`` into the two sets; :class:`FrontPin` pins every thread
of the front process (threads started later inherit it) but the fast lane's hub, which
never takes the GIL and may run anywhere, and puts back what it changed; a worker pins
itself with :func:`pin_process` before it starts any thread; :func:`parse` reads the
command lines' ``--front-cpus``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable

from .errors import ConfigError

__all__ = ["FrontPin", "allowed", "parse", "pin_process", "split"]

#: the one FrontPin of this process that is in force (two pools pinning the same
#: threads would undo each other at close)
_active: FrontPin | None = None
_active_lock = threading.Lock()


def allowed() -> frozenset[int]:
    """The CPUs this thread may run on now."""
    return frozenset(os.sched_getaffinity(0))


def split(front_cpus: int | Iterable[int], cpus: frozenset[int]) -> tuple[frozenset[int], frozenset[int]]:
    """``(front, workers)``: the CPUs for the front's threads and for the workers, out of
    ``cpus`` (the ones this process may run on).

    ``front_cpus`` is a number of CPUs (the lowest-numbered of ``cpus``) or the CPU
    numbers themselves; the workers get the others.

    Raises:
        ConfigError: not a positive number or a set of CPU numbers, a CPU this process
            may not run on, or no CPU left for the workers.
    """
    mine = sorted(cpus)
    if isinstance(front_cpus, (bool, str, bytes)):
        raise ConfigError(_expected(front_cpus, mine), key="front_cpus")
    if isinstance(front_cpus, int):
        if front_cpus < 1:
            raise ConfigError(_expected(front_cpus, mine), key="front_cpus")
        front = frozenset(mine[:front_cpus])
    else:
        try:
            chosen = list(front_cpus)
        except TypeError:
            raise ConfigError(_expected(front_cpus, mine), key="front_cpus") from None
        if not chosen or any(isinstance(c, bool) or not isinstance(c, int) for c in chosen):
            raise ConfigError(_expected(front_cpus, mine), key="front_cpus")
        outside = sorted(set(chosen) - cpus)
        if outside:
            raise ConfigError(
                f"Pool: front_cpus names CPUs {outside}, on which this process may not run (it may run on {mine})",
                key="front_cpus",
            )
        front = frozenset(chosen)
    workers = cpus - front
    if not workers:
        raise ConfigError(
            f"Pool: front_cpus={front_cpus!r} leaves no CPU for the workers: this process may run on {mine}",
            key="front_cpus",
        )
    return front, workers


def parse(text: str) -> int | tuple[int, ...]:
    """A command line's ``front_cpus``: a number of CPUs (``2``), or a CPU list as
    ``taskset -c`` and ``/proc/*/status`` write it (``0,2``, ``4-7``, ``3,``: CPU 3 alone).

    Raises:
        ValueError: neither (says what was expected).
    """
    spec = text.strip()
    if spec.isascii() and spec.isdigit():
        return int(spec)
    cpus: set[int] = set()
    for part in filter(None, spec.split(",")):
        low, dash, high = part.partition("-")
        if not (low.isascii() and low.isdigit() and (not dash or (high.isascii() and high.isdigit()))):
            raise ValueError(f"{text!r} is not a number of CPUs or a CPU list (e.g. 1, 0,2 or 0-3)")
        first, last = int(low), int(high) if dash else int(low)
        if last < first:
            raise ValueError(f"{text!r}: the range {part} runs backwards")
        cpus.update(range(first, last + 1))
    if not cpus:
        raise ValueError(f"{text!r} names no CPU")
    return tuple(sorted(cpus))


def _expected(value: object, mine: list[int]) -> str:
    return (
        f"Pool: front_cpus is {value!r}; expected None, a number of CPUs from 1 to {len(mine) - 1}, "
        f"or CPU numbers out of {mine}"
    )


def _threads() -> list[int]:
    """The thread ids of this process."""
    return [int(t) for t in os.listdir("/proc/self/task")]


def pin_process(cpus: Iterable[int]) -> None:
    """Run every thread of this process, and those it starts later, on ``cpus``."""
    chosen = set(cpus)
    for tid in _threads():
        with contextlib.suppress(ProcessLookupError):  # (a thread that just ended)
            os.sched_setaffinity(tid, chosen)


class FrontPin:
    """Every thread of this process on the front's CPUs of ``front_cpus`` (see
    :func:`split`; :attr:`workers` are the others) until :meth:`restore`.

    Threads started meanwhile inherit the pin from the thread that starts them;
    :meth:`restore` gives each thread pinned here its former CPUs back, and those
    started meanwhile the CPUs the process had before.

    Raises:
        ConfigError: another FrontPin of this process is in force (another open pool
            with ``front_cpus``), or as :func:`split`.
    """

    def __init__(self, front_cpus: int | Iterable[int]) -> None:
        global _active
        with _active_lock:
            if _active is not None:
                raise ConfigError(
                    "Pool: front_cpus is set by another open pool of this process; close it first, "
                    "or give front_cpus to one pool only",
                    key="front_cpus",
                )
            self._before = allowed()
            cpus, self.workers = split(front_cpus, self._before)
            self.cpus = cpus
            self._former: dict[int, frozenset[int]] = {}
            for tid in _threads():
                with contextlib.suppress(ProcessLookupError):
                    self._former[tid] = frozenset(os.sched_getaffinity(tid))
                    os.sched_setaffinity(tid, cpus)
            _active = self

    def exempt(self, tid: int) -> None:
        """Let thread ``tid`` run on every CPU the process had: one that never takes the
        GIL (the fast lane's hub), which may then take a free CPU from the workers
        rather than wait for the front's."""
        with contextlib.suppress(OSError):  # (gone; or a CPU taken from the process since)
            os.sched_setaffinity(tid, self._before)

    def restore(self) -> None:
        """Give the threads back their CPUs (idempotent). A thread that has been
        pinned elsewhere since is left alone."""
        global _active
        with _active_lock:
            if _active is not self:
                return
            _active = None
            for tid in _threads():
                with contextlib.suppress(OSError):  # (as in exempt: it stays as it is)
                    if frozenset(os.sched_getaffinity(tid)) == self.cpus:
                        os.sched_setaffinity(tid, self._former.get(tid, self._before))

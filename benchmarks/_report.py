"""Reporting: result rows, the aligned table, the targets block and machine info."""

from __future__ import annotations

import math
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zmq

from benchmarks._harness import Measurement


@dataclass
class Row:
    """One result row: a measurement, or an error."""

    workload: str  # workload name, or "floor"
    mode: str
    instances: int | None  # None for the transport floor
    concurrency: int
    measurement: Measurement | None = None
    status: str = "ok"  # "ok" | "error"
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly representation."""
        d: dict[str, Any] = {
            "workload": self.workload,
            "mode": self.mode,
            "instances": self.instances,
            "concurrency": self.concurrency,
            "status": self.status,
            "note": self.note,
        }
        if self.measurement is not None:
            d.update(self.measurement.to_dict())
        return d


def fmt_us(us: float | None) -> str:
    """Format a latency given in µs with a readable unit."""
    if us is None or math.isnan(us):
        return "n/a"
    if abs(us) < 1_000:
        return f"{us:.0f} µs"
    return f"{us / 1e3:.2f} ms" if abs(us) < 100_000 else f"{us / 1e3:.0f} ms"


def fmt_rps(rps: float | None) -> str:
    """Format a throughput."""
    if rps is None or math.isnan(rps):
        return "n/a"
    return f"{rps:,.0f}" if rps >= 100 else f"{rps:,.1f}"


class Table:
    """Aligned table, printed row by row as results arrive."""

    COLUMNS: tuple[tuple[str, int, str], ...] = (
        *(("workload", 8, "<"), ("mode", 16, "<"), ("inst", 4, ">"), ("conc", 4, ">")),
        *(("req/s", 9, ">"), ("p50", 9, ">"), ("p99", 9, ">"), ("spread", 6, ">")),
    )

    def __init__(self) -> None:
        self._printed_header = False
        self._last_workload: str | None = None

    def _line(self, cells: Sequence[str], note: str = "") -> str:
        parts = [f"{c:{align}{width}}" for c, (_, width, align) in zip(cells, self.COLUMNS, strict=True)]
        return "  ".join([*parts, note]).rstrip()

    def row(self, row: Row) -> None:
        """Print one row (the header before the first; a blank line between workloads)."""
        if not self._printed_header:
            head = self._line([name for name, _, _ in self.COLUMNS], "note")
            print(f"{head}\n{'-' * (len(head) + 10)}")
            self._printed_header = True
        elif row.workload != self._last_workload:
            print()
        self._last_workload = row.workload
        m = row.measurement
        cells = [row.workload, row.mode, "-" if row.instances is None else str(row.instances), str(row.concurrency)]
        if m is None:
            cells += ["n/a", "n/a", "n/a", ""]
        else:
            cells += [fmt_rps(m.rps), fmt_us(m.p50_us), fmt_us(m.p99_us), f"{100 * m.spread:.0f}%"]
        print(self._line(cells, row.note), flush=True)


def _find(rows: Sequence[Row], workload: str, mode: str, inst: int | None, conc: int) -> Measurement | None:
    for r in rows:
        if (r.workload, r.mode, r.instances, r.concurrency) == (workload, mode, inst, conc):
            return r.measurement
    return None


def _target(name: str, goal: str, value: float | None, ok: bool, measured: str) -> dict[str, Any]:
    status = "n/a" if value is None else ("PASS" if ok else "FAIL")
    shown = measured if value is not None else "n/a"
    return {"target": name, "measured": shown, "goal": goal, "status": status, "value": value}


def _ratio_target(
    name: str, goal: float, lib: Measurement | None, base: Measurement | None, pct: bool
) -> dict[str, Any]:
    """``lib.rps / base.rps >= goal``."""
    goal_text = f">= {100 * goal:.0f}%" if pct else f">= {goal:.2f}x"
    if lib is None or base is None or base.rps <= 0:
        return _target(name, goal_text, None, False, "")
    r = lib.rps / base.rps
    shown = f"{100 * r:.0f}%" if pct else f"{r:.2f}x"
    return _target(name, goal_text, r, r >= goal, f"{fmt_rps(lib.rps)} vs {fmt_rps(base.rps)} = {shown}")


def evaluate_targets(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Compute the target figures from the rows of this run."""
    lib, base = _find(rows, "tiny", "libtorchrt", 1, 1), _find(rows, "tiny", "direct", 1, 1)
    d = lib.p50_us - base.p50_us if lib is not None and base is not None else None
    measured = f"{fmt_us(lib.p50_us)} - {fmt_us(base.p50_us)} = {fmt_us(d)}" if lib and base else ""
    return [
        _target("tiny c=1 i=1: libtorchrt p50 - direct p50", "<= 200 µs", d, d is not None and d <= 200, measured),
        _ratio_target(
            "tiny c=8 i=2: libtorchrt req/s vs mp-queue(2)",
            1.0,
            _find(rows, "tiny", "libtorchrt", 2, 8),
            _find(rows, "tiny", "mp-queue", 2, 8),
            pct=False,
        ),
        _ratio_target(
            "payload c=8 i=2: libtorchrt req/s vs floor-premapped",
            0.5,
            _find(rows, "payload", "libtorchrt", 2, 8),
            _find(rows, "floor", "floor-premapped", None, 1),
            pct=True,
        ),
        _ratio_target(
            "cnn c=8: libtorchrt i=2 vs i=1 req/s",
            1.6,
            _find(rows, "cnn", "libtorchrt", 2, 8),
            _find(rows, "cnn", "libtorchrt", 1, 8),
            pct=False,
        ),
    ]


def print_targets(targets: Sequence[dict[str, Any]], title: str = "targets") -> None:
    """Print the targets block."""
    print(f"\n{title}")
    w_name = max(len(t["target"]) for t in targets)
    w_meas = max(len(t["measured"]) for t in targets)
    for t in targets:
        name, measured = f"{t['target']:<{w_name}}", f"{t['measured']:>{w_meas}}"
        print(f"  {name}  {measured}  goal {t['goal']:<9}  {t['status']}")


def machine_info() -> dict[str, Any]:
    """Describe the machine and the software versions."""
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pyzmq": zmq.__version__,
    }


#: the repository this file belongs to: the commit recorded is the one the benchmark ran from
_REPO = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=_REPO, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def provenance() -> dict[str, Any]:
    """What a stored result needs to be rerun: the command line, the commit
    (``git rev-parse HEAD``; None outside a git checkout), whether the working tree
    differed from it (``dirty``: changed or untracked files, as ``git status`` lists
    them; None when git could not tell) and which files (``dirty_files``: the figures
    may depend on them, or not)."""
    head = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain=v1", "-z") if head is not None else None
    changed: list[str] | None = None
    if status is not None:
        changed = []
        entries = iter(status.split("\0"))
        for entry in entries:
            if len(entry) > 3:
                changed.append(entry[3:])
                if entry[0] in "RC":  # a rename or copy: its source path comes next
                    next(entries, None)
    return {
        "command": shlex.join(["python", *sys.argv]),
        "commit": None if head is None else head.strip(),
        "dirty": None if changed is None else bool(changed),
        "dirty_files": changed,
    }


def loadavg() -> float | None:
    """The 1-minute load average, or None where unavailable."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None

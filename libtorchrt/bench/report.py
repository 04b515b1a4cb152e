"""Results of a sweep: the :class:`Row` record, the live table, JSON and CSV files.

Runs in the bench process. The table is printed one row at a time, as each
configuration finishes. The JSON document holds the machine, the command and settings,
the model and its inputs, and every row with its windows; the CSV file holds one flat
line per row (see :data:`CSV_COLUMNS`).
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .loadgen import Measurement
from .stats import PERCENTILES

__all__ = ["CSV_COLUMNS", "Row", "Table", "condense", "format_parameters", "machine_info", "write_csv", "write_json"]

#: Columns of the CSV file, in order.
CSV_COLUMNS: tuple[str, ...] = (
    "mode",
    "instances",
    "concurrency",
    "batch_size",
    "parameters",
    "status",
    "stable",
    "windows",
    "requests",
    "errors",
    "infer_per_s",
    "req_per_s",
    "avg_us",
    *(f"p{q}_us" for q in PERCENTILES),
    "error",
)


def format_parameters(parameters: Mapping[str, str]) -> str:
    """``{"A": "1", "B": "x"}`` → ``"A=1;B=x"`` (``"-"`` when empty)."""
    return ";".join(f"{k}={v}" for k, v in parameters.items()) or "-"


@dataclass
class Row:
    """One configuration's result.

    Attributes:
        mode: ``"processes"`` (a libtorchrt pool) or ``"threads"`` (one process).
        instances, concurrency: the configuration.
        batch_size: rows per request (None: ``--batch-size`` not given; counts as 1).
        parameters: the swept parameter values of this configuration.
        status: ``"ok"``, or ``"error"`` when it could not be measured (``error`` says why).
        measurement: the figures (None on error).
        flags: the execution-mode flags the instances reported (processes mode).
        notes: remarks (a parameter ignored in threads mode, ...).
        start_s: how long the pool or thread server took to start.
    """

    mode: str
    instances: int
    concurrency: int
    batch_size: int | None
    parameters: dict[str, str] = field(default_factory=dict)
    status: str = "ok"
    measurement: Measurement | None = None
    error: str = ""
    flags: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    start_s: float | None = None

    @property
    def batch(self) -> int:
        return self.batch_size or 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly representation (NaN becomes null)."""
        d: dict[str, Any] = {
            "mode": self.mode,
            "instances": self.instances,
            "concurrency": self.concurrency,
            "batch_size": self.batch,
            "parameters": dict(self.parameters),
            "status": self.status,
            "error": self.error or None,
            "flags": dict(self.flags),
            "notes": list(self.notes),
            "start_s": self.start_s,
        }
        if self.measurement is not None:
            d.update(self.measurement.to_dict())
        return _clean(d)

    def csv_record(self) -> dict[str, Any]:
        """The row as :data:`CSV_COLUMNS` (empty cells where there is no value)."""
        m = self.measurement
        rec: dict[str, Any] = {
            "mode": self.mode,
            "instances": self.instances,
            "concurrency": self.concurrency,
            "batch_size": self.batch,
            "parameters": format_parameters(self.parameters),
            "status": self.status,
            "error": condense(self.error, limit=1000),
        }
        if m is not None:
            s = m.summary
            rec.update(
                stable=str(m.stable).lower(),
                windows=len(m.windows),
                requests=s.requests,
                errors=s.error_count,
                infer_per_s=_num(s.infer_per_s),
                req_per_s=_num(s.req_per_s),
                avg_us=_num(s.avg_us),
                **{f"p{q}_us": _num(s.p(q)) for q in PERCENTILES},
            )
        return {c: rec.get(c, "") for c in CSV_COLUMNS}


def _num(x: float) -> str:
    return "" if math.isnan(x) else f"{x:.1f}"


def _clean(value: Any) -> Any:
    """Replace NaN/inf by None, recursively (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def condense(message: str, limit: int = 200) -> str:
    """One line of an error message: its first line and, for a traceback, its last."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return ""
    text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fmt_us(us: float) -> str:
    """A latency given in µs, in a readable unit."""
    if math.isnan(us):
        return "n/a"
    if us < 1_000:
        return f"{us:.0f} µs"
    if us < 100_000:
        return f"{us / 1e3:.2f} ms"
    return f"{us / 1e3:.0f} ms"


def fmt_rate(x: float) -> str:
    """A throughput, with a precision that suits its size."""
    if math.isnan(x):
        return "n/a"
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"


class Table:
    """The results table, printed row by row.

    Args:
        out: where to print.
        parameter_sets: the swept parameter values; a column shows them when there are any.
    """

    def __init__(self, out: TextIO | None = None, *, parameter_sets: Sequence[Mapping[str, str]] = ()) -> None:
        self.out = out if out is not None else sys.stdout
        self.columns: list[tuple[str, int, str]] = [("mode", 9, "<")]
        show_parameters = any(parameter_sets)
        if show_parameters:
            width = max(len("parameters"), *(len(format_parameters(p)) for p in parameter_sets))
            self.columns.append(("parameters", width, "<"))
        self.columns += [
            ("inst", 4, ">"),
            ("conc", 4, ">"),
            ("batch", 5, ">"),
            ("infer/s", 9, ">"),
            *((f"p{q}", 9, ">") for q in PERCENTILES),
            ("avg", 9, ">"),
            ("errors", 6, ">"),
            ("windows", 11, "<"),
        ]
        self.show_parameters = show_parameters
        self._header = False
        self._group: tuple[Any, ...] | None = None

    def _line(self, cells: Sequence[str]) -> str:
        parts = [f"{c:{align}{width}}" for c, (_, width, align) in zip(cells, self.columns)]
        parts += list(cells[len(self.columns) :])
        return "  ".join(parts).rstrip()

    def header(self) -> str:
        head = self._line([name for name, _, _ in self.columns])
        return f"{head}\n{'-' * len(head)}"

    def format(self, row: Row) -> str:
        """The row's line."""
        cells = [row.mode]
        if self.show_parameters:
            cells.append(format_parameters(row.parameters))
        cells += [str(row.instances), str(row.concurrency), str(row.batch)]
        m = row.measurement
        if m is None:
            cells += ["n/a"] * (2 + len(PERCENTILES)) + ["", "error", condense(row.error)]
        else:
            s = m.summary
            cells += [fmt_rate(s.infer_per_s), *(fmt_us(s.p(q)) for q in PERCENTILES), fmt_us(s.avg_us)]
            cells.append(str(s.error_count))
            if m.kind == "count":
                cells.append("count")
            else:
                cells.append(f"{m.used}/{len(m.windows)} stable" if m.stable else f"{len(m.windows)} UNSTABLE")
            if s.errors:
                cells.append(", ".join(f"{k}: {v}" for k, v in s.errors.items()))
        if row.notes:
            cells.append("; ".join(row.notes))
        return self._line(cells)

    def print(self, row: Row) -> None:
        """Print the row (the header first; a blank line between instance groups)."""
        group = (tuple(row.parameters.items()), row.instances, row.mode)
        if not self._header:
            print(self.header(), file=self.out)
            self._header = True
        elif group != self._group:
            print(file=self.out)
        self._group = group
        print(self.format(row), file=self.out, flush=True)


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def machine_info() -> dict[str, Any]:
    """The machine and software the figures were taken on."""
    import numpy
    import torch

    import libtorchrt

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in _read("/proc/cpuinfo").splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    mem = next((line.split()[1] for line in _read("/proc/meminfo").splitlines() if line.startswith("MemTotal")), None)
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 0
    try:
        load: float | None = os.getloadavg()[0]
    except OSError:
        load = None
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "memory_gib": round(int(mem) / (1 << 20), 1) if mem else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "libtorchrt": libtorchrt.__version__,
        "loadavg_1min": load,
    }


def write_json(path: Path, document: Mapping[str, Any]) -> None:
    """Write the JSON report (NaN written as null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(dict(document)), indent=2) + "\n")


def write_csv(path: Path, rows: Sequence[Row]) -> None:
    """Write one line per row, with the :data:`CSV_COLUMNS` header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow(row.csv_record())

"""The ``--plot`` figure: throughput vs concurrency, and latency vs throughput (bench process).

Two panels, one line per (mode, parameters, instances, batch size) series: left,
inferences/s against concurrency; right, p99 latency against inferences/s (each point
one concurrency level, so the curve shows what latency a throughput costs). Process
rows are solid lines, thread rows dashed; colours follow the instance count.

matplotlib is imported only here, with the Agg backend through its object API (no
pyplot global state, no display needed); it is an optional dependency
(``pip install libtorchrt[bench]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .report import Row, format_parameters

__all__ = ["PlotError", "plot"]


class PlotError(RuntimeError):
    """The figure cannot be drawn (matplotlib missing, nothing measured)."""


def _series(rows: Sequence[Row]) -> dict[tuple[Any, ...], list[Row]]:
    out: dict[tuple[Any, ...], list[Row]] = {}
    for r in rows:
        if r.measurement is None or r.measurement.summary.requests == 0:
            continue
        key = (r.mode, tuple(r.parameters.items()), r.instances, r.batch)
        out.setdefault(key, []).append(r)
    for series in out.values():
        series.sort(key=lambda r: r.concurrency)
    return out


def plot(rows: Sequence[Row], path: Path, *, title: str = "") -> None:
    """Draw the two panels of ``rows`` into ``path`` (PNG, or any format matplotlib knows).

    Raises:
        PlotError: matplotlib is not installed, or no row has a measurement.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        raise PlotError("--plot needs matplotlib: pip install 'libtorchrt[bench]' (or matplotlib)") from None
    series = _series(rows)
    if not series:
        raise PlotError("no configuration was measured; nothing to plot")
    swept = len({key[1] for key in series}) > 1
    batches = len({key[3] for key in series}) > 1
    instance_counts = sorted({key[2] for key in series})
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray"]
    colours = {n: palette[i % len(palette)] for i, n in enumerate(instance_counts)}
    markers = "os^Dvx*P"
    param_sets = list(dict.fromkeys(key[1] for key in series))

    fig = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax_tp, ax_lat = fig.subplots(1, 2)
    for (mode, params, instances, batch), rs in series.items():
        label = f"{mode}, {instances} inst"
        if swept:
            label += f", {format_parameters(dict(params))}"
        if batches:
            label += f", batch {batch}"
        style: dict[str, Any] = {
            "color": colours[instances],
            "linestyle": "-" if mode == "processes" else "--",
            "marker": markers[param_sets.index(params) % len(markers)],
            "label": label,
        }
        conc = [r.concurrency for r in rs]
        rate = [r.measurement.summary.infer_per_s for r in rs if r.measurement is not None]
        p99_ms = [r.measurement.summary.p(99) / 1e3 for r in rs if r.measurement is not None]
        ax_tp.plot(conc, rate, **style)
        ax_lat.plot(rate, p99_ms, **style)
        for c, x, y in zip(conc, rate, p99_ms):
            ax_lat.annotate(f"c{c}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7, color="0.35")
    ax_tp.set_xscale("log", base=2)
    ticks = sorted({r.concurrency for rs in series.values() for r in rs})
    ax_tp.set_xticks(ticks, [str(t) for t in ticks])
    ax_tp.minorticks_off()
    ax_tp.set_xlabel("concurrency (closed-loop callers)")
    ax_tp.set_ylabel("throughput (inferences/s)")
    ax_tp.set_title("throughput vs concurrency")
    ax_tp.set_ylim(bottom=0)
    ax_lat.set_xlabel("throughput (inferences/s)")
    ax_lat.set_ylabel("p99 latency (ms, log scale)")
    ax_lat.set_title("p99 latency vs throughput (labels: concurrency)")
    ax_lat.set_yscale("log")
    ax_lat.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    ax_lat.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax_lat.yaxis.set_minor_formatter(NullFormatter())
    for ax in (ax_tp, ax_lat):
        ax.grid(True, alpha=0.3)
    ax_tp.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=110)

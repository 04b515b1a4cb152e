"""The ``--plot`` figure: throughput vs concurrency, and latency vs throughput (bench process).

Two panels, one line per (mode, parameters, instances, batch size) series: left,
inferences/s against concurrency; right, p99 latency against inferences/s (each point
one concurrency level, so the curve shows what latency a throughput costs).

How series are told apart: each has its own colour and a label naming what
distinguishes it (mode, instances, parameters when swept, batch size); the marker
says the batch size (one marker per batch size, listed in the legend); thread rows are
dashed. Both panels have a legend. A configuration that never became stable (its
figures are its last windows) is drawn as a hollow marker, and the legend says so.
``--latency-budget`` is a horizontal line on the latency panel.

matplotlib is imported only here, with the Agg backend through its object API (no
pyplot global state, no display needed); it is an optional dependency
(``pip install libtorchrt[bench]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .report import Row, fmt_us, format_parameters

__all__ = ["BUDGET_GID", "UNSTABLE_GID", "PlotError", "figure", "plot"]

#: The ``gid`` of the artists that mark unstable points, and of the budget line.
UNSTABLE_GID = "unstable"
BUDGET_GID = "latency-budget"
_PALETTE = (
    "tab:blue",
    "tab:orange",
    "tab:green",
    "tab:red",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:gray",
    "tab:olive",
    "tab:cyan",
)
_MARKERS = "osD^vP*Xph"


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


def _label(key: tuple[Any, ...], swept: bool) -> str:
    mode, params, instances, batch = key
    label = f"{mode}, {instances} inst"
    if swept:
        label += f", {format_parameters(dict(params))}"
    return label + f", batch {batch}"


def figure(rows: Sequence[Row], *, title: str = "", latency_budget_us: float | None = None) -> Any:
    """The two panels of ``rows``, as a matplotlib ``Figure`` (axes: throughput, latency).

    Args:
        rows: the sweep's rows; those without a measurement are left out.
        title: the figure's title.
        latency_budget_us: draw this p99 budget on the latency panel.

    Raises:
        PlotError: matplotlib is not installed, or no row has a measurement.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        raise PlotError("--plot needs matplotlib: pip install 'libtorchrt[bench]' (or matplotlib)") from None
    series = _series(rows)
    if not series:
        raise PlotError("no configuration was measured; nothing to plot")
    swept = len({key[1] for key in series}) > 1
    batches = sorted({key[3] for key in series})
    markers = {b: _MARKERS[i % len(_MARKERS)] for i, b in enumerate(batches)}

    fig = Figure(figsize=(12, 5.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_tp, ax_lat = fig.subplots(1, 2)
    any_unstable = False
    for i, (key, rs) in enumerate(series.items()):
        mode, batch = key[0], key[3]
        colour = _PALETTE[i % len(_PALETTE)]
        conc = [r.concurrency for r in rs]
        rate = [r.measurement.summary.infer_per_s for r in rs if r.measurement is not None]
        p99_ms = [r.measurement.summary.p(99) / 1e3 for r in rs if r.measurement is not None]
        unstable = [j for j, r in enumerate(rs) if r.measurement is not None and not r.measurement.stable]
        stable = [j for j in range(len(rs)) if j not in unstable]
        style: dict[str, Any] = {
            "color": colour,
            "linestyle": "--" if mode == "threads" else "-",
            "marker": markers[batch],
            "markevery": stable,  # unstable points get hollow markers below
            "label": _label(key, swept),
        }
        ax_tp.plot(conc, rate, **style)
        ax_lat.plot(rate, p99_ms, **style)
        if unstable:
            any_unstable = True
            hollow: dict[str, Any] = {
                "linestyle": "none",
                "marker": markers[batch],
                "markerfacecolor": "none",
                "markeredgecolor": colour,
                "markeredgewidth": 1.5,
                "gid": UNSTABLE_GID,
                "label": "_nolegend_",
            }
            ax_tp.plot([conc[j] for j in unstable], [rate[j] for j in unstable], **hollow)
            ax_lat.plot([rate[j] for j in unstable], [p99_ms[j] for j in unstable], **hollow)
        for c, x, y in zip(conc, rate, p99_ms):
            ax_lat.annotate(f"c{c}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7, color="0.35")
    if latency_budget_us is not None:
        ax_lat.axhline(
            latency_budget_us / 1e3,
            color="tab:red",
            linestyle=":",
            linewidth=1.5,
            gid=BUDGET_GID,
            label=f"latency budget {fmt_us(latency_budget_us)}",
        )

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
    extra = []
    if any_unstable:
        extra.append(
            Line2D(
                [],
                [],
                linestyle="none",
                marker="o",
                markerfacecolor="none",
                markeredgecolor="0.3",
                label="hollow: never stable (last windows)",
            )
        )
    for ax in (ax_tp, ax_lat):
        ax.grid(True, alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        ax.legend(handles=handles + extra, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot(rows: Sequence[Row], path: Path, *, title: str = "", latency_budget_us: float | None = None) -> None:
    """Draw :func:`figure` into ``path`` (PNG, or any format matplotlib knows).

    Raises:
        PlotError: matplotlib is not installed, or no row has a measurement.
    """
    fig = figure(rows, title=title, latency_budget_us=latency_budget_us)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=110)

"""libtorchrt.bench's ``--plot`` figure, checked through matplotlib's objects (no image
comparison): series told apart by batch size, a legend on both panels, the latency
budget line, unstable points marked. Synthetic rows; no pool, no subprocess."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib")

from matplotlib.colors import to_rgba
from matplotlib.lines import Line2D

from libtorchrt.bench.loadgen import Measurement
from libtorchrt.bench.plot import BUDGET_GID, UNSTABLE_GID, PlotError, figure, plot
from libtorchrt.bench.report import Row
from libtorchrt.bench.stats import Window, summarize


def row(concurrency: int, batch: int, latency_ms: float, *, stable: bool = True, instances: int = 1) -> Row:
    """A measured row: 100 requests of ``latency_ms`` in one second."""
    window = Window(seconds=1.0, latencies_ns=[int(latency_ms * 1e6)] * (100 * concurrency))
    m = Measurement(summarize([window], batch_size=batch), [window], used=1, stable=stable)
    return Row(mode="http", instances=instances, concurrency=concurrency, batch_size=batch, measurement=m)


ROWS = [
    row(1, 1, 2.0),
    row(4, 1, 5.0, stable=False),
    row(1, 8, 9.0),
    row(4, 8, 30.0, stable=False),
    Row(mode="http", instances=1, concurrency=16, batch_size=8, status="error", error="every request failed"),
]


@pytest.fixture(scope="module")
def axes() -> Any:
    fig = figure(ROWS, title="t", latency_budget_us=20_000)
    ax_tp, ax_lat = fig.axes
    return ax_tp, ax_lat


def legend_texts(ax: Any) -> list[str]:
    legend = ax.get_legend()
    assert legend is not None, f"no legend on {ax.get_title()!r}"
    return [t.get_text() for t in legend.get_texts()]


def series_lines(ax: Any) -> dict[str, Line2D]:
    return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}


def test_both_panels_have_a_legend_naming_each_batch_size(axes: Any) -> None:
    for ax in axes:
        texts = legend_texts(ax)
        assert "http, 1 inst, batch 1" in texts
        assert "http, 1 inst, batch 8" in texts


def test_series_of_different_batch_sizes_differ_in_marker_and_colour(axes: Any) -> None:
    for ax in axes:
        lines = series_lines(ax)
        one, eight = lines["http, 1 inst, batch 1"], lines["http, 1 inst, batch 8"]
        assert one.get_marker() != eight.get_marker()
        assert to_rgba(one.get_color()) != to_rgba(eight.get_color())
    ax_tp, _ = axes
    lines = series_lines(ax_tp)
    assert list(lines["http, 1 inst, batch 1"].get_xdata()) == [1, 4]
    assert list(lines["http, 1 inst, batch 8"].get_ydata()) == pytest.approx([800.0, 3200.0])  # inferences/s


def test_the_latency_budget_is_a_horizontal_line_on_the_latency_panel(axes: Any) -> None:
    ax_tp, ax_lat = axes
    budget = [line for line in ax_lat.get_lines() if line.get_gid() == BUDGET_GID]
    assert len(budget) == 1
    assert list(budget[0].get_ydata()) == [20.0, 20.0]  # ms, the whole width
    assert list(budget[0].get_xdata()) == [0, 1]  # axes coordinates: a horizontal line
    assert "latency budget 20.00 ms" in legend_texts(ax_lat)
    assert not [line for line in ax_tp.get_lines() if line.get_gid() == BUDGET_GID]


def test_unstable_points_are_hollow_and_the_legend_says_so(axes: Any) -> None:
    ax_tp, ax_lat = axes
    for ax in axes:
        hollow = [line for line in ax.get_lines() if line.get_gid() == UNSTABLE_GID]
        assert len(hollow) == 2  # one per series with an unstable point
        for line in hollow:
            assert line.get_markerfacecolor() == "none" and line.get_linestyle() == "None"
        assert any("never stable" in t for t in legend_texts(ax))
        # the stable points keep filled markers: the series' own markers skip the unstable ones
        assert series_lines(ax)["http, 1 inst, batch 1"].get_markevery() == [0]
    hollow_tp = sorted((float(x), float(y)) for line in ax_tp.get_lines() if line.get_gid() == UNSTABLE_GID
                       for x, y in zip(line.get_xdata(), line.get_ydata()))  # fmt: skip
    assert hollow_tp == [(4.0, 400.0), (4.0, 3200.0)]
    hollow_lat = sorted(float(y) for line in ax_lat.get_lines() if line.get_gid() == UNSTABLE_GID
                        for y in line.get_ydata())  # fmt: skip
    assert hollow_lat == pytest.approx([5.0, 30.0])  # p99, ms


def test_no_budget_and_all_stable_draw_neither_mark() -> None:
    fig = figure([row(1, 1, 2.0), row(2, 1, 3.0)])
    for ax in fig.axes:
        assert not [line for line in ax.get_lines() if line.get_gid() in (BUDGET_GID, UNSTABLE_GID)]
        assert legend_texts(ax) == ["http, 1 inst, batch 1"]


def test_plot_writes_a_png_and_refuses_nothing_measured(tmp_path: Path) -> None:
    plot(ROWS, tmp_path / "out.png", latency_budget_us=20_000)
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(PlotError, match="nothing to plot"):
        figure(ROWS[-1:])

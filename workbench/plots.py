"""Matplotlib figures as pure functions that return a `Figure`, with the titles (`partition_title`) and
number formats (`format_number`) that figures and tables share."""

from __future__ import annotations

import dataclasses
import math
import textwrap
from typing import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import Formatter, MaxNLocator

from workbench.config import ExperimentConfig, PartitionConfig
# The scheme -> knobs map lives once, beside the partitioners that read the knobs.
from workbench.partition import SCHEME_KNOBS, knobs_in_use
from workbench.tasks import client_metric, curve_metrics, metric_goal


def learning_curves(
    curves: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]],
    metrics: Sequence[str] = ("test_accuracy", "test_loss"),
    *,
    title: str = "",
) -> Figure:
    """One panel per metric, one line per run: `curves[run_label][metric] = [(round, value), ...]`;
    `title` says what the runs are (dataset, partition, clients: `partition_title` builds that part)."""
    figure = Figure(figsize=(5 * len(metrics), 3.6), layout="constrained")
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        for label, series in curves.items():
            points = series.get(metric, [])
            if points:
                rounds, values = zip(*points)
                ax.plot(rounds, values, label=label)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(metric.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].legend()
    if title:
        _suptitle(figure, title)
    return figure


#: Metrics that live in [0, 1] (their axes show all of it); an error's axis starts at 0.
_UNIT_INTERVAL_METRICS = ("test_accuracy", "train_accuracy")
_ERROR_METRICS = ("test_mse", "train_mse", "test_mae", "train_mae")


def live_view(
    curves: Mapping[str, Sequence[tuple[int, float]]],
    client_values: Sequence[tuple[int, Sequence[float]]],
    total_rounds: int,
    title: str = "",
    *,
    task: str = "classification",
) -> Figure:
    """A run as it trains: the task's two curves (`tasks.curve_metrics`: test accuracy and test loss; test
    MSE and test R^2 for a regression) and the spread over clients of the task's per-client test metric
    (`tasks.client_metric`: accuracy, or MSE).

    `curves[metric] = [(round, value), ...]`; `client_values` holds every client's value of each evaluated
    round. The x axis spans all `total_rounds` from the start, so the plot fills in rather than rescales.
    """
    first, second = curve_metrics(task)
    client_name, _ = client_metric(task)
    # A fixed layout: redrawn after every round, and constrained layout would double the cost of a draw.
    figure = Figure(figsize=(12, 3.3))
    figure.subplots_adjust(left=0.05, right=0.99, bottom=0.15, top=0.8 if title else 0.9, wspace=0.2)
    first_ax, second_ax, spread_ax = figure.subplots(1, 3)
    for ax, metric, color in ((first_ax, first, "tab:blue"), (second_ax, second, "tab:red")):
        points = curves.get(metric, [])
        if points:
            rounds, values = zip(*points)
            ax.plot(rounds, values, color=color, marker="o" if len(points) < 30 else None, markersize=3)
            ax.set_title(f"{metric.replace('_', ' ')}: {values[-1]:.4f}")
        else:
            ax.set_title(metric.replace("_", " "))
        _bound_axis(ax, metric)
    spread = [(r, sorted(v)) for r, v in client_values if len(v)]
    if spread:
        import numpy as np

        rounds = [r for r, _ in spread]
        q = np.array([np.percentile(v, [0, 10, 50, 90, 100]) for _, v in spread])
        spread_ax.fill_between(rounds, q[:, 0], q[:, 4], color="tab:green", alpha=0.12, label="min-max")
        spread_ax.fill_between(rounds, q[:, 1], q[:, 3], color="tab:green", alpha=0.3, label="p10-p90")
        spread_ax.plot(rounds, q[:, 2], color="tab:green", label="median")
        # the legend where the good end is, out of the way of the bad tail
        spread_ax.legend(loc="lower right" if metric_goal(client_name) == "max" else "upper right", fontsize="small")
    spread_ax.set_title(f"per-client {client_name.replace('_', ' ')}")
    _bound_axis(spread_ax, client_name)
    for ax in (first_ax, second_ax, spread_ax):
        ax.set_xlim(0.5, max(total_rounds, 2) + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    if title:
        _suptitle(figure, title, fontsize="medium")
    return figure


def _bound_axis(ax, metric: str) -> None:
    """The whole of [0, 1] for an accuracy; 0 at the bottom for an error."""
    if metric in _UNIT_INTERVAL_METRICS:
        ax.set_ylim(0, 1)
    elif metric in _ERROR_METRICS:
        ax.set_ylim(bottom=0)


def study_grid(
    curves: Mapping[tuple[str, str], Mapping[str, Sequence[tuple[int, float]]]],
    metric: str = "test_accuracy",
    *,
    title: str = "",
) -> Figure:
    """A grid of panels like Figure 1 of Li et al. (MLSys 2020): `curves[(row, column)][line] = [(round,
    value), ...]`, rows and columns in first-seen order (e.g. dataset x straggler fraction, one line
    per algorithm); `title` says what every panel shares (model, clients, rounds)."""
    rows = list(dict.fromkeys(r for r, _ in curves))
    columns = list(dict.fromkeys(c for _, c in curves))
    figure = Figure(figsize=(3.6 * len(columns), 2.6 * len(rows)), layout="constrained")
    axes = figure.subplots(len(rows), len(columns), squeeze=False, sharex=True)
    for (row, column), lines in curves.items():
        ax = axes[rows.index(row)][columns.index(column)]
        for label, points in lines.items():
            if points:
                rounds, values = zip(*points)
                ax.plot(rounds, values, label=label)
        ax.set_title(f"{row} | {column}", fontsize="small")
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for row_axes in axes:
        row_axes[0].set_ylabel(metric.replace("_", " "))
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="outside lower center", ncols=len(labels))
    if title:
        _suptitle(figure, title)
    return figure


def _suptitle(figure: Figure, title: str, fontsize: str = "large") -> None:
    """`title` above the figure's panels, wrapped to the figure's width (after a ` · `, else at a space),
    so that a long title over one narrow panel is not cut off."""
    # An estimate for DejaVu Sans: 0.1 in per character at `large` (12 pt), 0.085 at `medium`.
    per_line = max(int(figure.get_figwidth() / (0.1 if fontsize == "large" else 0.085)), 20)
    figure.suptitle("\n".join(_wrap(line, per_line) for line in title.splitlines()), fontsize=fontsize)


def _wrap(line: str, width: int) -> str:
    rows: list[str] = []
    for part in line.split(" · "):
        if rows and len(rows[-1]) + 3 + len(part) <= width:
            rows[-1] += " · " + part
        else:
            if rows:
                rows[-1] += " ·"
            rows.extend(textwrap.wrap(part, width, break_long_words=False, break_on_hyphens=False) or [""])
    return "\n".join(rows)


def to_png(figure: Figure, dpi: int = 80) -> bytes:
    """The figure as PNG bytes (no pyplot, no display: safe to call from a worker thread)."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def comparison_figure(
    curves: Mapping[str, tuple[Sequence[int], Sequence[float], Sequence[float]]],
    finals: Mapping[str, tuple[float, float] | tuple[float, float, int]],
    metric: str = "test_accuracy",
    target: float | None = None,
    *,
    title: str = "",
) -> Figure:
    """Learning curves of groups of runs, mean ± std over seeds, and each group's final value as a dot with
    its ± std bar.

    `curves[group] = (rounds, mean, std)`; `finals[group] = (mean, std)` or `(mean, std, num_runs)` of the
    last round's value. A group of one run has no spread to show: no bar, and its label says n = 1 (a NaN
    std draws no bar either). The final values' axis spans their range with a margin, not 0..max, so
    that 0.51 and 0.56 look as different as they are; its label says so when it does not start at 0.
    """
    figure = Figure(figsize=(11, 3.8), layout="constrained")
    curve_ax, final_ax = figure.subplots(1, 2, width_ratios=(2, 1))
    for index, (label, (rounds, mean, std)) in enumerate(curves.items()):
        color = f"C{index % 10}"
        low = [m - s for m, s in zip(mean, std)]
        high = [m + s for m, s in zip(mean, std)]
        curve_ax.plot(rounds, mean, color=color, label=label)
        curve_ax.fill_between(rounds, low, high, color=color, alpha=0.2, linewidth=0)
    if target is not None:
        curve_ax.axhline(target, color="0.4", linestyle="--", linewidth=1, label=f"target {target:.3g}")
    name = metric.replace("_", " ")
    curve_ax.set_xlabel("round")
    curve_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    curve_ax.set_ylabel(name)
    curve_ax.set_title(f"{name} per round (mean ± std over seeds)")
    curve_ax.grid(alpha=0.3)
    curve_ax.legend(fontsize="small")
    stats = {label: _final_stat(value) for label, value in finals.items()}
    for index, (mean, spread, _) in enumerate(stats.values()):
        final_ax.errorbar([mean], [index], xerr=None if spread is None else [[spread], [spread]], fmt="o",
                          color=f"C{index % 10}", markersize=7, capsize=4, elinewidth=1.5)
    final_ax.set_yticks(range(len(stats)), [f"{label}\n{_final_text(*finals[label])}" for label in stats],
                        fontsize="small")
    final_ax.set_ylim(len(stats) - 0.5, -0.5)  # first group on top, as in the legend
    low, high = _value_range([(m - (s or 0.0), m + (s or 0.0)) for m, s, _ in stats.values()])
    final_ax.set_xlim(low, high)
    starts_at_zero = low <= 0.0 <= high
    final_ax.set_xlabel(f"final {name}" + ("" if starts_at_zero else "\n(axis does not start at 0)"))
    final_ax.set_title("final value (mean ± std)", fontsize="medium")
    final_ax.grid(alpha=0.3, axis="x")
    if title:
        _suptitle(figure, title)
    return figure


def _final_stat(value: Sequence[float]) -> tuple[float, float | None, int | None]:
    """(mean, the bar's half width or None for no bar, number of runs or None when not given)."""
    mean, std = float(value[0]), float(value[1])
    count = int(value[2]) if len(value) > 2 else None
    has_spread = math.isfinite(std) and (count is None or count > 1)
    return mean, std if has_spread else None, count


def _final_text(mean: float, std: float, count: int | None = None) -> str:
    if count == 1:
        return f"{mean:.4g} (n = 1)"
    spread = f" ± {std:.2g}" if math.isfinite(std) else ""
    return f"{mean:.4g}{spread}" + ("" if count is None else f" (n = {count})")


def _value_range(intervals: Sequence[tuple[float, float]], margin: float = 0.15) -> tuple[float, float]:
    """The span of `intervals`, widened by `margin` of it on each side (or by a tenth of the value, when
    every interval is one and the same point)."""
    finite = [v for pair in intervals for v in pair if math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    low, high = min(finite), max(finite)
    pad = margin * (high - low) if high > low else (abs(high) / 10 or 1.0)
    return low - pad, high + pad


def tradeoff_figure(x: Sequence[float], y: Sequence[float], y_error: Sequence[float], labels: Sequence[str], *,
                    x_label: str, y_label: str, title: str = "") -> Figure:
    """One point per setting (mean y with its error bar against x), each labelled: a trade-off such as
    accuracy against the privacy spent."""
    figure = Figure(figsize=(6, 4), layout="constrained")
    ax = figure.subplots()
    ax.errorbar(x, y, yerr=[0.0 if e != e else e for e in y_error], marker="o", capsize=3, linestyle="-")
    for xi, yi, label in zip(x, y, labels):
        ax.annotate(label, (xi, yi), textcoords="offset points", xytext=(5, 5), fontsize="small")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return figure


# ----- partitions: client x class counts, as `workbench.partition.count_matrix` returns them -----


def partition_title(config: ExperimentConfig, *, dataset: str | None = None, num_clients: int | None = None,
                    task: str = "classification") -> str:
    """What a partition's picture shows, in one line: the dataset (Synthetic with its alpha and beta), the
    scheme with the knobs it reads, the number of clients and the seed, e.g.
    `digits · dirichlet(alpha=0.1) · 20 clients · seed 0`.

    `dataset` and `num_clients` replace the config's where the caller knows better (a loaded dataset's
    name; the clients a natural partition really has); `task` is the dataset's (`Dataset.task`: a
    regression's Dirichlet skew shows its `target_bins`).
    """
    name = dataset or config.data.name
    if name == "synthetic":
        name = f"synthetic(alpha={config.data.alpha:g}, beta={config.data.beta:g})"
    part = config.partition
    used = {key.removeprefix("partition.") for key in knobs_in_use(part, task)}
    # The scheme's own knobs first (a mixture's skew next), then any other in the config's order.
    order = [*SCHEME_KNOBS[part.scheme], *(f.name for f in dataclasses.fields(PartitionConfig))]
    knobs = sorted(used - {"scheme"}, key=order.index)
    if part.min_size == PartitionConfig.min_size:  # every scheme honours it: only a limit the user set says something
        knobs.remove("min_size")
    shown = [f"{knob}={_knob_text(getattr(part, knob))}" for knob in knobs]
    scheme = f"{part.scheme}({', '.join(shown)})" if shown else part.scheme
    clients = config.federation.num_clients if num_clients is None else num_clients
    return f"{name} · {scheme} · {clients:,} client{'s' if clients != 1 else ''} · seed {config.seed}"


def _knob_text(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def format_number(value: float) -> str:
    """A statistic as a table shows it: whole numbers (counts) as integers with thousands separators
    (`60,000`, never `6e+04`), large fractional ones with one decimal (`8,571.4`), the rest with four
    significant digits (`0.4123`)."""
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if value.is_integer():
        return f"{int(value):,}"
    if abs(value) >= 1000:
        return f"{value:,.1f}"
    return f"{value:.4g}"


def partition_heatmap(counts: np.ndarray, *, title: str = "client x class samples",
                      row_label: str = "class") -> Figure:
    """A heatmap of a partition's client x class sample counts (clients across, classes down); say which
    partition in `title`, e.g. `f"client x class samples\\n{partition_title(config)}"`. `row_label` names
    the rows (`PartitionStats.row_label`: "target bin" for a regression's client x target bin counts)."""
    figure = Figure(figsize=(7, 3.2), layout="constrained")
    _draw_heatmap(figure, figure.subplots(), counts, title, row_label)
    return figure


def client_label_bars(counts: np.ndarray, *, max_clients: int = 100, normalize: bool = False,
                      title: str = "labels per client") -> Figure:
    """Stacked bars, one per client (the first `max_clients`), one colour per class; `title` as for
    `partition_heatmap`."""
    figure = Figure(figsize=(7, 3.2), layout="constrained")
    _draw_bars(figure.subplots(), counts, max_clients, normalize, title)
    return figure


def client_size_histogram(sizes: np.ndarray, *, bins: int = 30, title: str = "client sizes") -> Figure:
    """A histogram of the number of samples per client; `title` as for `partition_heatmap`."""
    figure = Figure(figsize=(4.5, 3.2), layout="constrained")
    _draw_sizes(figure.subplots(), sizes, bins, title)
    return figure


def partition_overview(counts: np.ndarray, *, max_clients: int = 100, title: str = "",
                       row_label: str = "class") -> Figure:
    """Heatmap, stacked label bars and size histogram of one partition, side by side; `title` says which
    partition it is (`partition_title(config)`), `row_label` what the heatmap's rows are (as for
    `partition_heatmap`)."""
    counts = np.asarray(counts)
    # Fixed margins instead of a layout engine: half the drawing time, which the explorer redraws live.
    figure = Figure(figsize=(14, 3.6))
    heat, _, _ = figure.subplots(1, 3, width_ratios=[5, 5, 3])
    figure.subplots_adjust(left=0.045, right=0.98, bottom=0.17, top=0.83, wspace=0.42)
    _draw_heatmap(figure, heat, counts, f"client x {row_label} samples", row_label)
    # The heatmap's class labels, in each class's bar colour, are the legend (a legend box costs a
    # fifth of the drawing time).
    colors = _class_colors(counts.shape[1])
    if len(colors) <= 20:
        heat.set_yticks(range(len(colors)))
        for tick, color in zip(heat.get_yticklabels(), colors):
            tick.set_color(color)
            tick.set_fontweight("bold")
    # Fixed title positions (no tick labels above the axes to clear); the axis labels are placed by
    # matplotlib beyond their tick labels, whose width depends on the counts (5 digits for 60k samples).
    for ax in figure.axes[:3]:
        ax.title.set_y(1.0)
        ax._autotitlepos = False
    _fill_overview(figure, counts, max_clients, title)
    return figure


def update_overview(figure: Figure, counts: np.ndarray, *, max_clients: int = 100, title: str = "",
                    row_label: str = "class") -> Figure:
    """`partition_overview(counts, ...)` drawn onto a figure that function made, reusing its axes, ticks
    and colour bar: the explorer's fast path (the same picture, about 3x faster to redraw). Returns that
    figure, or a new one when the number of classes (or the `row_label`) differs."""
    counts = np.asarray(counts)
    if (figure.axes[0].images[0].get_array().shape[0] != counts.shape[1]
            or figure.axes[0].get_ylabel() != row_label):
        return partition_overview(counts, max_clients=max_clients, title=title, row_label=row_label)
    _fill_overview(figure, counts, max_clients, title)
    return figure


def _fill_overview(figure: Figure, counts: np.ndarray, max_clients: int, title: str) -> None:
    heat, bars, sizes = figure.axes[:3]
    _set_heatmap(heat, counts)
    _draw_bars(bars, counts, max_clients, False, "labels per client", legend=False)
    _draw_sizes(sizes, counts.sum(axis=1), 30, "client sizes")
    _suptitle(figure, title)


def compare_partitions(partitions: Mapping[str, np.ndarray], *, max_clients: int = 30,
                       normalize: bool = False, title: str = "") -> Figure:
    """Several partitions side by side (`{name: client x class counts}`): each client's label mix as a
    stacked bar, so label, quantity and mixed skews can be told apart at a glance; `title` says what they
    share (the dataset, the number of clients)."""
    names = list(partitions)
    columns = min(len(names), 3)
    rows = -(-len(names) // columns)
    figure = Figure(figsize=(4.6 * columns, 2.6 * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    for ax, name in zip(axes, names):
        _draw_bars(ax, partitions[name], max_clients, normalize, name, legend=False)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    num_classes = max(np.asarray(c).shape[1] for c in partitions.values())
    colors = _class_colors(num_classes)
    handles = [Rectangle((0, 0), 1, 1, color=colors[c]) for c in range(num_classes)]
    figure.legend(handles, [str(c) for c in range(num_classes)], loc="outside right center", title="class",
                  fontsize="small")
    if title:
        _suptitle(figure, title)
    return figure


def heterogeneity_curve(values: Sequence[float], summaries: Sequence[Mapping[str, float]],
                        metrics: Sequence[str] = ("label_tv_mean", "label_js_mean", "effective_classes_mean"),
                        *, xlabel: str = "alpha", log_x: bool = True, title: str = "") -> Figure:
    """How summary statistics move with one parameter: one panel per metric, `summaries[i]` at `values[i]`;
    `title` says what stays fixed (the dataset, the scheme, the number of clients)."""
    figure = Figure(figsize=(4 * len(metrics), 3.2), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(metrics), squeeze=False)[0])
    for ax, metric in zip(axes, metrics):
        ax.plot(values, [s[metric] for s in summaries], marker="o")
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_title(metric.replace("_", " "))
        ax.grid(alpha=0.3)
    if title:
        _suptitle(figure, title)
    return figure


def _class_colors(num_classes: int) -> list:
    cmap = colormaps["tab10" if num_classes <= 10 else "tab20" if num_classes <= 20 else "viridis"]
    if num_classes <= 20:
        return [cmap(c) for c in range(num_classes)]
    return [cmap(c / max(num_classes - 1, 1)) for c in range(num_classes)]


def _draw_heatmap(figure: Figure, ax, counts: np.ndarray, title: str, row_label: str = "class") -> None:
    counts = np.asarray(counts)
    image = ax.imshow(counts.T, aspect="auto", interpolation="nearest", cmap="viridis")
    bar = figure.colorbar(image, ax=ax, label="samples", fraction=0.05, pad=0.02)
    # A colour bar resets its axis' ticks on every change of range: it keeps its own locator and formatter.
    bar.locator, bar.formatter = _count_locator(), _CountFormatter()
    _count_ticks(ax.xaxis)
    _count_ticks(ax.yaxis)
    ax.set_ylabel(row_label)
    ax.set_title(title)
    _set_heatmap(ax, counts)


def _set_heatmap(ax, counts: np.ndarray) -> None:
    """Put `counts` into the heatmap of `ax` (its colour bar follows the new range)."""
    image = ax.images[0]
    image.set_data(counts.T)
    image.set_extent((-0.5, counts.shape[0] - 0.5, counts.shape[1] - 0.5, -0.5))
    image.set_clim(0, max(int(counts.max(initial=0)), 1))
    ax.set_xlim(-0.5, counts.shape[0] - 0.5)
    ax.set_ylim(counts.shape[1] - 0.5, -0.5)
    ax.set_xlabel(f"client ({counts.shape[0]})")


def _draw_bars(ax, counts: np.ndarray, max_clients: int, normalize: bool, title: str,
               legend: bool = True) -> None:
    counts = np.asarray(counts, dtype=np.float64)
    shown = counts[:max_clients]
    if normalize:
        shown = shown / np.maximum(shown.sum(axis=1, keepdims=True), 1)
    colors = _class_colors(counts.shape[1])
    for layer in list(ax.collections):  # redrawing onto the same axes (update_overview)
        layer.remove()
    bottom = np.zeros(len(shown))
    # One filled step outline per class instead of one Rectangle per bar: the same picture, drawn
    # an order of magnitude faster for 100 clients (it keeps the explorer interactive).
    edges = np.repeat(np.arange(len(shown) + 1) - 0.5, 2)[1:-1]
    for c in range(counts.shape[1]):
        top = bottom + shown[:, c]
        ax.fill_between(edges, np.repeat(bottom, 2), np.repeat(top, 2), color=colors[c], linewidth=0,
                        label=str(c))
        bottom = top
    ax.set_xlim(-0.5, max(len(shown), 1) - 0.5)
    ax.set_ylim(0, 1.05 * max(float(bottom.max(initial=0)), 1e-9))
    _count_ticks(ax.xaxis)
    if not normalize:
        _count_ticks(ax.yaxis)
    ax.set_xlabel("client" if len(shown) == len(counts) else f"client (first {len(shown)} of {len(counts)})")
    ax.set_ylabel("label share" if normalize else "samples")
    ax.set_title(title)
    if legend and counts.shape[1] <= 20:
        ax.legend(title="class", fontsize="x-small", ncols=2, loc="upper right", framealpha=0.8)


def _draw_sizes(ax, sizes: np.ndarray, bins: int, title: str) -> None:
    for patch in list(ax.patches):  # redrawing onto the same axes (update_overview)
        patch.remove()
    sizes = np.asarray(sizes)
    low, high = (int(sizes.min()), int(sizes.max())) if len(sizes) else (0, 0)
    # Sizes are whole numbers: with fewer distinct values than bins, one bin per size, centred on it.
    edges = np.arange(low - 0.5, high + 1.5) if high - low + 1 <= bins else bins
    heights, edges = np.histogram(sizes, bins=edges)
    # One filled step patch instead of a Rectangle per bin: the same picture, much cheaper to draw.
    ax.stairs(heights, edges, fill=True, color="tab:blue", alpha=0.85)
    ax.relim()
    ax.autoscale_view()
    _count_ticks(ax.xaxis)
    _count_ticks(ax.yaxis)
    ax.set_xlabel("samples per client")
    ax.set_ylabel("clients")
    ax.set_title(title)


def _count_ticks(axis) -> None:
    """Ticks at whole numbers only (as many as fit the axis), written by `_CountFormatter`."""
    axis.set_major_locator(_count_locator())
    axis.set_major_formatter(_CountFormatter())


def _count_locator() -> MaxNLocator:
    return MaxNLocator(nbins="auto", integer=True, min_n_ticks=1)


class _CountFormatter(Formatter):
    """Whole-number tick labels: `2,500` (never `2.5e3` or an offset). From 10,000 up, in thousands or
    millions (`60k`, `1.25M`: separators would make the labels too wide for their neighbours), one unit
    for the whole axis, unless that would write two different ticks alike (599,999 and 600,000)."""

    _unit: tuple[float, str] | None = None

    def set_locs(self, locs) -> None:
        super().set_locs(locs)
        values = [abs(float(v)) for v in locs]
        self._unit = next(((unit, suffix) for unit, suffix in ((1e6, "M"), (1e3, "k"))
                           if values and max(values) >= 10 * unit
                           and all(float(v / (unit / 100)).is_integer() for v in values)), None)

    def __call__(self, value: float, pos: int | None = None) -> str:
        if self._unit is None or not value:
            return f"{value:,.0f}"
        unit, suffix = self._unit
        return f"{value / unit:g}{suffix}"


def feature_skew_preview(samples: np.ndarray, titles: Sequence[str], *, title: str = "") -> Figure:
    """The same kind of input as several clients see it: images (C, H, W) shown as pictures on the grey
    scale of the first, vectors as line plots; `titles[i]` names the client of `samples[i]`."""
    samples = np.asarray(samples, dtype=np.float64)
    # One grey scale for all, that of the first (least skewed) sample, so growing noise shows as noise.
    low, high = float(samples[0].min()), float(samples[0].max())
    # Fixed margins in inches: room for each line of the title above the clients' names.
    lines = len(title.splitlines()) if title else 0
    height = 1.9 + 0.25 * lines
    # Wide enough for the title's longest line too (the estimate `_suptitle` wraps by: 0.1 in per character).
    width = max(1.6 * len(samples) + 0.4, 0.1 * max((len(line) for line in title.splitlines()), default=0) + 0.2)
    figure = Figure(figsize=(width, height))
    axes = np.atleast_1d(figure.subplots(1, len(samples), squeeze=False)[0])
    figure.subplots_adjust(left=0.02, right=0.98, bottom=0.1 / height, top=1 - (0.35 + 0.25 * lines) / height,
                           wspace=0.1)
    for ax, sample, name in zip(axes, samples, titles):
        if sample.ndim == 3:
            picture = np.moveaxis(sample, 0, -1)
            picture = np.clip((picture - low) / (high - low), 0, 1) if high > low else np.zeros_like(picture)
            ax.imshow(picture[..., 0] if picture.shape[-1] == 1 else picture, cmap="gray", interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
        else:
            ax.plot(sample.ravel(), linewidth=0.8)
            ax.set_xticks([]), ax.set_yticks([])  # feature index and value: the shape is what matters
        ax.set_title(name, fontsize="small")
    if title:
        _suptitle(figure, title)
    return figure



def plot_reconstructions(real: np.ndarray, reconstructed: np.ndarray, real_labels: Sequence[float],
                         reconstructed_labels: Sequence[float], *, is_image: bool | None = None,
                         max_columns: int = 16, title: str = "") -> Figure:
    """What a gradient-inversion attack recovered of a client's samples, beside the samples themselves.

    `real[i]` and `reconstructed[i]` are the same sample (k of them, in the same order), titled with the true
    and the recovered label (red where they differ). Images (`(k, C, H, W)`, or `is_image=True` for
    `(k, H, W)`) form a 2 x k grid, real samples on top and reconstructions below, each pair on the grey
    scale of its real sample so that a perfect reconstruction looks identical; beyond `max_columns` samples
    the pairs of rows wrap. Feature vectors `(k, d)` get one panel of bar pairs (real, reconstructed) per
    sample when there are at most 8 samples of at most 40 features, else two heat maps of k rows, real and
    reconstructed, on one colour scale."""
    def label_text(label: float) -> str:
        # a class label as an integer; a regression target with four significant digits
        value = float(label)
        return str(int(value)) if value.is_integer() else f"{value:.4g}"

    real = np.asarray(real, dtype=np.float64)
    reconstructed = np.asarray(reconstructed, dtype=np.float64)
    if real.shape != reconstructed.shape or real.ndim < 2 or len(real) == 0:
        raise ValueError(f"real and reconstructed must be (k, *input_shape) arrays of one shape with k >= 1, "
                         f"got {real.shape} and {reconstructed.shape} (pass a LeakageReport's real_inputs and "
                         f"reconstructed_inputs)")
    num_samples = len(real)
    if not len(real_labels) == len(reconstructed_labels) == num_samples:
        raise ValueError(f"need one true and one recovered label per sample: {num_samples} samples, "
                         f"{len(real_labels)} true and {len(reconstructed_labels)} recovered labels")
    if max_columns < 1:
        raise ValueError(f"max_columns must be >= 1, got {max_columns}")
    if is_image is None:
        is_image = real.ndim == 4
    if is_image and real.ndim not in (3, 4):
        raise ValueError(f"images must be (k, C, H, W) or (k, H, W), got shape {real.shape} "
                         f"(pass is_image=False for feature vectors)")
    true = [label_text(v) for v in real_labels]
    recovered = [label_text(v) for v in reconstructed_labels]
    wrong = "#b00020"

    def top_for(width: float) -> float:
        # inches above the panels for the title as `_suptitle` wraps it at this width (0.085 in a character)
        per_line = max(int(width / 0.085), 20)
        lines = sum(len(_wrap(line, per_line).splitlines()) for line in title.splitlines()) if title else 0
        return 0.3 + 0.22 * lines

    if is_image:
        columns = min(num_samples, max_columns)
        bands = -(-num_samples // columns)
        # Fixed margins instead of a layout engine: a third of the drawing time, redrawn on every change.
        width = max(1.1 * columns + 0.5, 3.0)
        top = top_for(width)
        height = 2.5 * bands + top
        figure = Figure(figsize=(width, height))
        figure.subplots_adjust(left=0.4 / width, right=1 - 0.1 / width, bottom=0.05 / height,
                               top=1 - top / height, wspace=0.1, hspace=0.35)
        grid = figure.add_gridspec(2 * bands, columns)
        for row in range(2):  # every real sample, then every reconstruction: the axes' order
            for i in range(num_samples):
                band, column = divmod(i, columns)
                ax = figure.add_subplot(grid[2 * band + row, column])
                sample = (real if row == 0 else reconstructed)[i]
                low, high = float(real[i].min()), float(real[i].max())
                picture = np.moveaxis(sample, 0, -1) if sample.ndim == 3 else sample
                picture = np.clip((picture - low) / (high - low), 0, 1) if high > low else np.zeros_like(picture)
                ax.imshow(picture[..., 0] if picture.ndim == 3 and picture.shape[-1] == 1 else picture,
                          cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                ax.set_xticks([]), ax.set_yticks([])
                if row == 0:
                    ax.set_title(f"true {true[i]}", fontsize="small")
                else:
                    ax.set_title(f"recovered {recovered[i]}", fontsize="small",
                                 color=wrong if recovered[i] != true[i] else "black")
                if column == 0:
                    ax.set_ylabel("real" if row == 0 else "reconstructed", fontsize="small")
    else:
        flat_real, flat_rec = real.reshape(num_samples, -1), reconstructed.reshape(num_samples, -1)
        num_features = flat_real.shape[1]
        if num_samples <= 8 and num_features <= 40:
            width = max(6.0, 0.15 * num_features + 1.0)
            top = top_for(width)
            height = 1.3 * num_samples + 0.5 + top
            figure = Figure(figsize=(width, height))
            figure.subplots_adjust(left=0.6 / width, right=1 - 0.15 / width, bottom=0.45 / height,
                                   top=1 - top / height, hspace=0.6)
            axes = figure.subplots(num_samples, 1, squeeze=False, sharex=True)[:, 0]
            index = np.arange(num_features)
            for i, ax in enumerate(axes):
                ax.bar(index - 0.2, flat_real[i], width=0.4, color="tab:blue", label="real")
                ax.bar(index + 0.2, flat_rec[i], width=0.4, color="tab:orange", label="reconstructed")
                ax.axhline(0, color="0.5", linewidth=0.5)
                ax.tick_params(labelsize="x-small")
                ax.set_title(f"sample {i}: true {true[i]} · recovered {recovered[i]}", fontsize="small",
                             loc="left", color=wrong if recovered[i] != true[i] else "black")
            axes[0].set_xlim(-0.6, num_features - 0.4)
            axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
            axes[-1].set_xlabel("feature")
            axes[0].legend(fontsize="x-small", ncols=2, loc="upper right")
        else:
            width, top = 11.0, top_for(11.0)
            height = min(0.22 * num_samples, 12.0) + 0.8 + top
            figure = Figure(figsize=(width, height))
            figure.subplots_adjust(left=0.7 / width, right=1 - 0.7 / width, bottom=0.55 / height,
                                   top=1 - (top + 0.05) / height, wspace=0.45)
            axes = figure.subplots(1, 2, sharey=True)
            # One colour scale for both, the real features' range, so a reconstruction's errors show.
            low, high = float(flat_real.min()), float(flat_real.max())
            for ax, values, name, labels in ((axes[0], flat_real, "real", true),
                                             (axes[1], flat_rec, "reconstructed", recovered)):
                ax.imshow(values, aspect="auto", interpolation="nearest", cmap="coolwarm", vmin=low,
                          vmax=high if high > low else low + 1)
                ax.set_title(name, fontsize="small")
                ax.set_xlabel("feature")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                if num_samples <= 40:
                    ax.set_yticks(range(num_samples), [f"{i}: {label}" for i, label in enumerate(labels)],
                                  fontsize="x-small")
                    ax.yaxis.set_tick_params(labelleft=True)
                    for tick, i in zip(ax.get_yticklabels(), range(num_samples)):
                        tick.set_color(wrong if name == "reconstructed" and recovered[i] != true[i] else "black")
            axes[0].set_ylabel("sample: label")
    if title:
        _suptitle(figure, title, fontsize="medium")
    return figure

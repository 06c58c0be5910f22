"""Matplotlib figures as pure functions that return a `Figure`."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle


def learning_curves(
    curves: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]],
    metrics: Sequence[str] = ("test_accuracy", "test_loss"),
) -> Figure:
    """One panel per metric, one line per run: `curves[run_label][metric] = [(round, value), ...]`."""
    figure = Figure(figsize=(5 * len(metrics), 3.6), layout="constrained")
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        for label, series in curves.items():
            points = series.get(metric, [])
            if points:
                rounds, values = zip(*points)
                ax.plot(rounds, values, label=label)
        ax.set_xlabel("round")
        ax.set_title(metric.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].legend()
    return figure


def live_view(
    curves: Mapping[str, Sequence[tuple[int, float]]],
    client_accuracy: Sequence[tuple[int, Sequence[float]]],
    total_rounds: int,
    title: str = "",
) -> Figure:
    """A run as it trains: global test accuracy, test loss, and the spread of per-client accuracy.

    `curves[metric] = [(round, value), ...]` (test_accuracy, test_loss); `client_accuracy` holds every
    client's accuracy of each evaluated round. The x axis spans all `total_rounds` from the start, so
    the plot fills in rather than rescales.
    """
    # A fixed layout: redrawn after every round, and constrained layout would double the cost of a draw.
    figure = Figure(figsize=(12, 3.3))
    figure.subplots_adjust(left=0.05, right=0.99, bottom=0.15, top=0.8 if title else 0.9, wspace=0.2)
    acc_ax, loss_ax, spread_ax = figure.subplots(1, 3)
    for ax, metric, color in ((acc_ax, "test_accuracy", "tab:blue"), (loss_ax, "test_loss", "tab:red")):
        points = curves.get(metric, [])
        if points:
            rounds, values = zip(*points)
            ax.plot(rounds, values, color=color, marker="o" if len(points) < 30 else None, markersize=3)
            ax.set_title(f"{metric.replace('_', ' ')}: {values[-1]:.4f}")
        else:
            ax.set_title(metric.replace("_", " "))
    acc_ax.set_ylim(0, 1)
    spread = [(r, sorted(v)) for r, v in client_accuracy if len(v)]
    if spread:
        import numpy as np

        rounds = [r for r, _ in spread]
        q = np.array([np.percentile(v, [0, 10, 50, 90, 100]) for _, v in spread])
        spread_ax.fill_between(rounds, q[:, 0], q[:, 4], color="tab:green", alpha=0.12, label="min-max")
        spread_ax.fill_between(rounds, q[:, 1], q[:, 3], color="tab:green", alpha=0.3, label="p10-p90")
        spread_ax.plot(rounds, q[:, 2], color="tab:green", label="median")
        spread_ax.legend(loc="lower right", fontsize="small")
    spread_ax.set_title("per-client test accuracy")
    spread_ax.set_ylim(0, 1)
    for ax in (acc_ax, loss_ax, spread_ax):
        ax.set_xlim(0.5, max(total_rounds, 2) + 0.5)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    if title:
        figure.suptitle(title, fontsize="medium")
    return figure


def study_grid(
    curves: Mapping[tuple[str, str], Mapping[str, Sequence[tuple[int, float]]]],
    metric: str = "test_accuracy",
) -> Figure:
    """A grid of panels like Figure 1 of Li et al. (MLSys 2020): `curves[(row, column)][line] = [(round,
    value), ...]`, rows and columns in first-seen order (e.g. dataset x straggler fraction, one line
    per algorithm)."""
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
    for row_axes in axes:
        row_axes[0].set_ylabel(metric.replace("_", " "))
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="outside lower center", ncols=len(labels))
    return figure


def to_png(figure: Figure, dpi: int = 80) -> bytes:
    """The figure as PNG bytes (no pyplot, no display: safe to call from a worker thread)."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def comparison_figure(
    curves: Mapping[str, tuple[Sequence[int], Sequence[float], Sequence[float]]],
    finals: Mapping[str, tuple[float, float]],
    metric: str = "test_accuracy",
    target: float | None = None,
) -> Figure:
    """Learning curves of groups of runs, mean ± std over seeds, and each group's final value.

    `curves[group] = (rounds, mean, std)`; `finals[group] = (mean, std)` of the last round's value.
    """
    from matplotlib.ticker import MaxNLocator

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
    curve_ax.set_xlabel("round")
    curve_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    curve_ax.set_ylabel(metric.replace("_", " "))
    curve_ax.set_title(f"{metric.replace('_', ' ')} per round (mean ± std over seeds)")
    curve_ax.grid(alpha=0.3)
    curve_ax.legend(fontsize="small")
    labels = list(finals)
    final_ax.barh(range(len(labels)), [finals[k][0] for k in labels], xerr=[finals[k][1] for k in labels],
                  color=[f"C{i % 10}" for i in range(len(labels))], capsize=3)
    final_ax.set_yticks(range(len(labels)), labels, fontsize="small")
    final_ax.invert_yaxis()
    final_ax.set_xlabel(f"final {metric.replace('_', ' ')}")
    final_ax.grid(alpha=0.3, axis="x")
    return figure


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


def partition_heatmap(counts: np.ndarray, *, title: str = "client x class samples") -> Figure:
    """A heatmap of a partition's client x class sample counts (clients across, classes down)."""
    figure = Figure(figsize=(7, 3.2), layout="constrained")
    _draw_heatmap(figure, figure.subplots(), counts, title)
    return figure


def client_label_bars(counts: np.ndarray, *, max_clients: int = 100, normalize: bool = False,
                      title: str = "labels per client") -> Figure:
    """Stacked bars, one per client (the first `max_clients`), one colour per class."""
    figure = Figure(figsize=(7, 3.2), layout="constrained")
    _draw_bars(figure.subplots(), counts, max_clients, normalize, title)
    return figure


def client_size_histogram(sizes: np.ndarray, *, bins: int = 30, title: str = "client sizes") -> Figure:
    """A histogram of the number of samples per client."""
    figure = Figure(figsize=(4.5, 3.2), layout="constrained")
    _draw_sizes(figure.subplots(), sizes, bins, title)
    return figure


def partition_overview(counts: np.ndarray, *, max_clients: int = 100, title: str = "") -> Figure:
    """Heatmap, stacked label bars and size histogram of one partition, side by side."""
    counts = np.asarray(counts)
    # Fixed margins instead of a layout engine: half the drawing time, which the explorer redraws live.
    figure = Figure(figsize=(14, 3.4))
    heat, _, _ = figure.subplots(1, 3, width_ratios=[5, 5, 3])
    figure.subplots_adjust(left=0.04, right=0.99, bottom=0.15, top=0.82, wspace=0.4)
    _draw_heatmap(figure, heat, counts, "client x class samples")
    # The heatmap's class labels, in each class's bar colour, are the legend (a legend box costs a
    # fifth of the drawing time).
    colors = _class_colors(counts.shape[1])
    if len(colors) <= 20:
        heat.set_yticks(range(len(colors)))
        for tick, color in zip(heat.get_yticklabels(), colors):
            tick.set_color(color)
            tick.set_fontweight("bold")
    # Fixed title and axis-label positions: matplotlib otherwise measures every tick label to place
    # them, on every redraw.
    for ax, left in zip(figure.axes[:3], (-0.06, -0.12, -0.14)):
        ax.title.set_y(1.0)
        ax._autotitlepos = False
        ax.xaxis.set_label_coords(0.5, -0.13)
        ax.yaxis.set_label_coords(left, 0.5)
    _fill_overview(figure, counts, max_clients, title)
    return figure


def update_overview(figure: Figure, counts: np.ndarray, *, max_clients: int = 100, title: str = "") -> Figure:
    """`partition_overview(counts, ...)` drawn onto a figure that function made, reusing its axes, ticks
    and colour bar: the explorer's fast path (the same picture, about 3x faster to redraw). Returns that
    figure, or a new one when the number of classes differs."""
    counts = np.asarray(counts)
    if figure.axes[0].images[0].get_array().shape[0] != counts.shape[1]:
        return partition_overview(counts, max_clients=max_clients, title=title)
    _fill_overview(figure, counts, max_clients, title)
    return figure


def _fill_overview(figure: Figure, counts: np.ndarray, max_clients: int, title: str) -> None:
    heat, bars, sizes = figure.axes[:3]
    _set_heatmap(heat, counts)
    _draw_bars(bars, counts, max_clients, False, "labels per client", legend=False)
    _draw_sizes(sizes, counts.sum(axis=1), 30, "client sizes")
    figure.suptitle(title)


def compare_partitions(partitions: Mapping[str, np.ndarray], *, max_clients: int = 30,
                       normalize: bool = False) -> Figure:
    """Several partitions side by side (`{name: client x class counts}`): each client's label mix as a
    stacked bar, so label, quantity and mixed skews can be told apart at a glance."""
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
    return figure


def heterogeneity_curve(values: Sequence[float], summaries: Sequence[Mapping[str, float]],
                        metrics: Sequence[str] = ("label_tv_mean", "label_js_mean", "effective_classes_mean"),
                        *, xlabel: str = "alpha", log_x: bool = True) -> Figure:
    """How summary statistics move with one parameter: one panel per metric, `summaries[i]` at `values[i]`."""
    figure = Figure(figsize=(4 * len(metrics), 3.2), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(metrics), squeeze=False)[0])
    for ax, metric in zip(axes, metrics):
        ax.plot(values, [s[metric] for s in summaries], marker="o")
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_title(metric.replace("_", " "))
        ax.grid(alpha=0.3)
    return figure


def _class_colors(num_classes: int) -> list:
    cmap = colormaps["tab10" if num_classes <= 10 else "tab20" if num_classes <= 20 else "viridis"]
    if num_classes <= 20:
        return [cmap(c) for c in range(num_classes)]
    return [cmap(c / max(num_classes - 1, 1)) for c in range(num_classes)]


def _draw_heatmap(figure: Figure, ax, counts: np.ndarray, title: str) -> None:
    counts = np.asarray(counts)
    image = ax.imshow(counts.T, aspect="auto", interpolation="nearest", cmap="viridis")
    figure.colorbar(image, ax=ax, label="samples", fraction=0.05, pad=0.02)
    ax.set_ylabel("class")
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
    ax.set_xlabel("client" if len(shown) == len(counts) else f"client (first {len(shown)} of {len(counts)})")
    ax.set_ylabel("label share" if normalize else "samples")
    ax.set_title(title)
    if legend and counts.shape[1] <= 20:
        ax.legend(title="class", fontsize="x-small", ncols=2, loc="upper right", framealpha=0.8)


def _draw_sizes(ax, sizes: np.ndarray, bins: int, title: str) -> None:
    for patch in list(ax.patches):  # redrawing onto the same axes (update_overview)
        patch.remove()
    heights, edges = np.histogram(np.asarray(sizes), bins=bins)
    # One filled step patch instead of a Rectangle per bin: the same picture, much cheaper to draw.
    ax.stairs(heights, edges, fill=True, color="tab:blue", alpha=0.85)
    ax.relim()
    ax.autoscale_view()
    ax.set_xlabel("samples per client")
    ax.set_ylabel("clients")
    ax.set_title(title)


def feature_skew_preview(samples: np.ndarray, titles: Sequence[str], *, title: str = "") -> Figure:
    """The same kind of input as several clients see it: images (C, H, W) shown as pictures on the grey
    scale of the first, vectors as line plots; `titles[i]` names the client of `samples[i]`."""
    samples = np.asarray(samples, dtype=np.float64)
    # One grey scale for all, that of the first (least skewed) sample, so growing noise shows as noise.
    low, high = float(samples[0].min()), float(samples[0].max())
    figure = Figure(figsize=(1.6 * len(samples) + 0.4, 2.0))
    axes = np.atleast_1d(figure.subplots(1, len(samples), squeeze=False)[0])
    figure.subplots_adjust(left=0.02, right=0.98, bottom=0.05, top=0.72 if title else 0.82, wspace=0.1)
    for ax, sample, name in zip(axes, samples, titles):
        if sample.ndim == 3:
            picture = np.moveaxis(sample, 0, -1)
            picture = np.clip((picture - low) / (high - low), 0, 1) if high > low else np.zeros_like(picture)
            ax.imshow(picture[..., 0] if picture.shape[-1] == 1 else picture, cmap="gray", interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
        else:
            ax.plot(sample.ravel(), linewidth=0.8)
            ax.set_yticks([])
        ax.set_title(name, fontsize="small")
    if title:
        figure.suptitle(title)
    return figure

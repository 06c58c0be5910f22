"""Matplotlib figures as pure functions that return a `Figure`."""

from __future__ import annotations

from typing import Mapping, Sequence

from matplotlib.figure import Figure


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

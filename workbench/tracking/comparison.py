"""Comparison of finished runs, grouped by the config keys they vary: a table, learning curves and a figure."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from workbench.config import ExperimentConfig, knobs
from workbench.plots import comparison_figure, partition_title
from workbench.tasks import common_task, headline_metric, metric_goal, task_of_metrics
from workbench.tracking.store import open_client

#: Tag of a sweep's parent run; its children carry `mlflow.parentRunId`, `sweep_id` and `sweep_group`.
SWEEP_PARENT_TAG = "workbench.sweep"


@dataclass
class Comparison:
    """Runs grouped by the config keys they vary: one table row and one curve per group."""

    table: "pandas.DataFrame"  # noqa: F821 - pandas comes with mlflow
    figure: Figure
    metric: str
    target: float
    varied_keys: tuple[str, ...]
    #: group -> run id -> [(round, value), ...]
    curves: dict[str, dict[str, list[tuple[int, float]]]]


def compare(experiment: str, tracking_uri: str | None = None, metric: str | None = None, *,
            sweep_id: str | None = None, target: float | None = None) -> Comparison:
    """Compare the finished runs of an experiment (or of one sweep): group them by the config keys whose
    values differ (seeds are averaged over), and return a table (final value mean ± std, best value, rounds
    to reach `target`) and a figure (learning curves mean ± std, final values). A group of one run has no
    spread: its std and ci95 are NaN (`format_comparison` shows them as n=1).

    Without `metric`, the runs' task's headline metric (`tasks.headline_metric`: test_accuracy, or test_mse
    for a regression; runs of both tasks need a metric named). Without `target`, it is the final mean of
    the weakest group: the level every group ends up reaching, so 'rounds to target' says which gets there
    first. Lower is better for a loss, an MSE or an MAE (`tasks.metric_goal`), higher for the rest.
    """
    import pandas

    client = open_client(tracking_uri)
    runs = finished_runs(client, experiment, sweep_id)
    if metric is None:
        metric, _ = headline_metric(common_task([r.data.metrics for r in runs]))
    varied = varied_keys(runs)
    groups: dict[str, list] = {}
    for r in runs:
        label = ", ".join(f"{k}={r.data.params.get(k)}" for k in varied) or "all runs"
        groups.setdefault(label, []).append(r)
    curves = {label: {r.info.run_id: sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, metric)
                                            if m.step > 0) for r in members}
              for label, members in groups.items()}
    curves = {label: {run_id: points for run_id, points in series.items() if points} for label, series in curves.items()}
    curves = {label: series for label, series in curves.items() if series}
    if not curves:
        suggestion, _ = headline_metric(task_of_metrics(runs[-1].data.metrics))
        raise ValueError(f"no run in {experiment!r} logged metric {metric!r} (try --metric {suggestion}, or "
                         "test_loss, which every task logs)")
    higher_is_better = metric_goal(metric) == "max"
    finals = {label: [points[-1][1] for points in series.values()] for label, series in curves.items()}
    if target is None:
        means = [float(np.mean(v)) for v in finals.values()]
        target = min(means) if higher_is_better else max(means)
    rows, mean_curves, final_stats = [], {}, {}
    for label, series in curves.items():
        members = {r.info.run_id: r for r in groups[label]}
        reached = [rounds_to_reach(points, target, higher_is_better) for points in series.values()]
        hits = [r for r in reached if r is not None]
        best = [max(v for _, v in p) if higher_is_better else min(v for _, v in p) for p in series.values()]
        final_mean, final_std = mean_std(finals[label])
        final_stats[label] = (final_mean, final_std, len(series))  # the figure says n = 1 for one run
        mean_curves[label] = mean_curve(list(series.values()))
        first = next(iter(members.values()))
        rows.append({"group": label, **{k: first.data.params.get(k) for k in varied},
                     "num_runs": len(series),
                     "seeds": ",".join(sorted((members[i].data.params.get("seed", "?") for i in series), key=str)),
                     f"final_{metric}_mean": final_mean,
                     f"final_{metric}_std": final_std if len(series) > 1 else math.nan,
                     f"final_{metric}_ci95": ci95_half_width(finals[label]),
                     f"best_{metric}_mean": float(np.mean(best)),
                     "rounds_to_target_mean": float(np.mean(hits)) if hits else math.nan,
                     "reached_target": f"{len(hits)}/{len(reached)}"})
    table = pandas.DataFrame(rows)
    table.attrs.update(metric=metric, target=target)
    figure = comparison_figure(mean_curves, final_stats, metric, target, title=shared_title(runs, varied))
    return Comparison(table, figure, metric, float(target), varied, curves)


#: The config keys that change what `plots.partition_title` says (the data, its split, the clients).
_TITLE_KEYS = ("data.", "partition.", "federation.num_clients")


def shared_title(runs: Sequence, varied: Sequence[str]) -> str:
    """What every compared run has in common, as `plots.partition_title` writes it but without the seed
    (groups average over seeds): `synthetic(alpha=1, beta=1) · natural · 30 clients`, the scheme the runs
    used (`resolved_partition_scheme` where they logged it). Empty when the runs differ in one of those
    keys (each group's label says how), or their params do not describe them."""
    if not runs or any(key.startswith(_TITLE_KEYS) for key in varied):
        return ""
    params = runs[0].data.params
    keys = [k.key for k in knobs() if k.key.startswith("partition.") or k.key in ("data.alpha", "data.beta")]
    shown = {k: params[k] for k in keys if k in params}  # not the `partition.stat.*` params beside them
    if params.get("resolved_partition_scheme"):
        shown["partition.scheme"] = params["resolved_partition_scheme"]
    try:
        # only these keys: a model or dataset registered in another session need not be registered here
        config = ExperimentConfig().with_overrides(shown)
        title = partition_title(config, dataset=params["data.name"],
                                num_clients=int(params["federation.num_clients"]),
                                task=task_of_metrics(runs[0].data.metrics))
    except (KeyError, ValueError, TypeError):
        return ""
    return title.removesuffix(f" · seed {config.seed}")


def runs_task(experiment: str, tracking_uri: str | None = None, *, sweep_id: str | None = None) -> str:
    """The task of an experiment's finished runs (or one sweep's), from what they logged
    (`tasks.common_task`); ValueError when they mix tasks."""
    return common_task([r.data.metrics for r in finished_runs(open_client(tracking_uri), experiment, sweep_id)])


def finished_runs(client, experiment: str, sweep_id: str | None = None) -> list:
    """The FINISHED runs of an experiment (or of one sweep), sweep parents left out, oldest first."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"no MLflow experiment named {experiment!r} (experiments: {', '.join(names) or 'none'})")
    runs = [r for r in client.search_runs([found.experiment_id], "attributes.status = 'FINISHED'", max_results=5000)
            if r.data.tags.get(SWEEP_PARENT_TAG) != "parent"
            and (sweep_id is None or r.data.tags.get("sweep_id") == sweep_id)]
    if not runs:
        where = f"sweep {sweep_id}" if sweep_id else f"experiment {experiment!r}"
        raise ValueError(f"{where} has no FINISHED runs to compare (run some with workbench run / sweep)")
    return sorted(runs, key=lambda r: r.info.start_time)


def varied_keys(runs: Sequence) -> tuple[str, ...]:
    """The config keys (seed aside) whose logged values differ between `runs`."""
    return tuple(k.key for k in knobs() if k.key != "seed" and len({r.data.params.get(k.key) for r in runs}) > 1)


def rounds_to_reach(points: Sequence[tuple[int, float]], target: float, higher_is_better: bool = True) -> int | None:
    """The first round whose value reaches `target` (>= it, or <= where lower is better), else None."""
    for round_, value in points:
        if (value >= target) if higher_is_better else (value <= target):
            return round_
    return None


def ci95_half_width(values: Sequence[float]) -> float:
    """Half-width of the 95 % confidence interval of the mean over seeds: t(0.975, n-1) * s / sqrt(n)
    (Student's t; NaN for a single run, whose mean has no interval)."""
    from scipy.stats import t

    array = np.asarray(values, dtype=np.float64)
    if len(array) < 2:
        return math.nan
    return float(t.ppf(0.975, len(array) - 1) * array.std(ddof=1) / math.sqrt(len(array)))


def final_values(experiment: str, metrics: Sequence[str], tracking_uri: str | None = None, *,
                 sweep_id: str | None = None) -> "pandas.DataFrame":  # noqa: F821
    """One row per FINISHED run of an experiment (or one sweep): its run id, the config keys that vary
    between the runs, its seed, and the last logged value of each of `metrics` (NaN where it logged none)."""
    import pandas

    runs = finished_runs(open_client(tracking_uri), experiment, sweep_id)
    varied = varied_keys(runs)
    return pandas.DataFrame([{"run_id": r.info.run_id, **{k: r.data.params.get(k) for k in varied},
                              "seed": r.data.params.get("seed"), **{m: r.data.metrics.get(m, math.nan) for m in metrics}}
                             for r in runs])


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def mean_curve(series: Sequence[Sequence[tuple[int, float]]]) -> tuple[list[int], list[float], list[float]]:
    """(rounds, mean, std) over runs, at the rounds every run logged."""
    common = sorted(set.intersection(*(set(r for r, _ in points) for points in series)))
    lookup = [dict(points) for points in series]
    stats = [mean_std([values[r] for values in lookup]) for r in common]
    return common, [m for m, _ in stats], [s for _, s in stats]


#: Columns of the comparison table that count something (runs, rounds): integers print as integers.
COUNT_COLUMNS = ("num_runs", "rounds_to_target_mean")


def format_count(value: float) -> str:
    """A count, or a mean of counts: `5` where it is a whole number, else at most 2 decimals (`5.5`,
    `5.33`); `-` for NaN (a target never reached)."""
    if value != value:
        return "-"
    if float(value).is_integer():
        return f"{value:.0f}"
    return f"{value:.2f}".rstrip("0").rstrip(".")


def format_comparison(comparison: Comparison) -> str:
    """The comparison table as aligned text, with its target stated: values to 4 decimals, counts as
    integers where they are whole (`format_count`), and the std and ci95 of a single-run group as `n=1`
    (one run has no spread; a 0 there would claim a perfectly repeatable result)."""
    import pandas

    table = comparison.table.drop(columns=list(comparison.varied_keys))
    metric = comparison.metric
    counts = {*COUNT_COLUMNS, *((f"final_{metric}_mean", f"best_{metric}_mean") if metric.startswith("num_") else ())}
    single = (table["num_runs"] == 1).to_numpy()
    spread = {f"final_{metric}_std", f"final_{metric}_ci95"}
    shown = pandas.DataFrame(index=table.index)
    for column in table.columns:
        cells = []
        for is_single, value in zip(single, table[column]):
            if column in spread and is_single:
                cells.append("n=1")
            elif isinstance(value, str):
                cells.append(value)
            elif column in counts:
                cells.append(format_count(value))
            else:
                cells.append("-" if value != value else f"{value:.4f}")
        shown[column] = cells
    text = shown.to_string(index=False)
    better = "<=" if metric_goal(metric) == "min" else ">="
    notes = [f"(rounds_to_target: first round with {metric} {better} {comparison.target:.4f}, mean over the "
             "runs that reached it; - = none did)"]
    if single.any():
        notes.append("(n=1: a group of one run has no std or ci95; give it more seeds: --seeds 0,1,2, or "
                     "seeds=[0, 1, 2] in sweep(...))")
    return "\n".join([text, *notes])

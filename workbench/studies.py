"""Studies and demonstrations the teaching notebooks call: the FedProx paper's Synthetic grid, curves of
several runs side by side, and the equivalences that show what the algorithms are (FedProx with mu = 0
is FedAvg; FedAvg with one client is plain SGD)."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from workbench.config import ExperimentConfig
from workbench.simulation import STREAM_TRAINING, History, prepare, run, stream
from workbench.plots import tradeoff_figure
from workbench.tasks import common_task, headline_metric, training_loss
from workbench.tracking import MlflowCallback, ci95_half_width, final_values
from workbench.tracking.comparison import runs_task

#: The heterogeneity levels of Li et al. (MLSys 2020), Figure 1: Synthetic-IID, then Synthetic(alpha, beta).
FEDPROX_HETEROGENEITY: dict[str, dict[str, object]] = {
    "IID": {"data.name": "synthetic_iid"},
    "Synthetic(0,0)": {"data.name": "synthetic", "data.alpha": 0.0, "data.beta": 0.0},
    "Synthetic(0.5,0.5)": {"data.name": "synthetic", "data.alpha": 0.5, "data.beta": 0.5},
    "Synthetic(1,1)": {"data.name": "synthetic", "data.alpha": 1.0, "data.beta": 1.0},
}


def fedprox_algorithms(mu: float) -> dict[str, dict[str, object]]:
    """The three lines of each panel of Li et al., Figure 1: FedAvg drops stragglers; FedProx with mu = 0
    keeps their partial work; FedProx with mu > 0 adds the proximal term as well."""
    return {
        "FedAvg": {"strategy.name": "fedavg"},
        "FedProx mu=0": {"strategy.name": "fedprox", "strategy.mu": 0.0},
        f"FedProx mu={mu:g}": {"strategy.name": "fedprox", "strategy.mu": float(mu)},
    }


@dataclass(frozen=True)
class StudyPoint:
    """One run of a study: the panel it belongs to (row, column), its line, and its config."""

    row: str
    column: str
    line: str
    config: ExperimentConfig


def fedprox_study_points(base: ExperimentConfig, heterogeneity: Sequence[str], stragglers: Sequence[float],
                         mu: float) -> list[StudyPoint]:
    """Every (heterogeneity, straggler fraction, algorithm) of the FedProx Synthetic study, validated up
    front. All points share `base`'s seed, so every algorithm sees the same data, clients and stragglers."""
    unknown = [h for h in heterogeneity if h not in FEDPROX_HETEROGENEITY]
    if unknown:
        raise ValueError(f"heterogeneity {unknown[0]!r} is not one of {list(FEDPROX_HETEROGENEITY)}")
    points = []
    for level in heterogeneity:
        for fraction in stragglers:
            for line, algorithm in fedprox_algorithms(mu).items():
                overrides = {**FEDPROX_HETEROGENEITY[level], **algorithm,
                             "federation.straggler_fraction": float(fraction)}
                points.append(StudyPoint(level, f"{fraction:.0%} stragglers", line, base.with_overrides(overrides)))
    return points


@dataclass
class Study:
    """The runs of a study: each point's history and MLflow run id, in the order they ran."""

    points: list[StudyPoint]
    histories: list[History] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)

    def curves(self, metric: str | None = None) -> dict[tuple[str, str], dict[str, list[tuple[int, float]]]]:
        """`[(row, column)][line] = [(round, value), ...]`, the shape `plots.study_grid` takes; `metric`
        defaults to the runs' headline metric (`headline_of`)."""
        metric = metric or headline_of(self.histories)
        grid: dict[tuple[str, str], dict[str, list[tuple[int, float]]]] = {}
        for point, history in zip(self.points, self.histories):
            grid.setdefault((point.row, point.column), {})[point.line] = history.metric(metric)
        return grid

    def table(self, metric: str | None = None):
        """Final `metric` of each run (default: their headline metric): one row per panel, one column per
        line."""
        import pandas

        metric = metric or headline_of(self.histories)
        rows: dict[tuple[str, str], dict[str, float]] = {}
        for point, history in zip(self.points, self.histories):
            rows.setdefault((point.row, point.column), {})[point.line] = history.final().get(metric, np.nan)
        frame = pandas.DataFrame.from_dict(rows, orient="index")
        frame.index = pandas.MultiIndex.from_tuples(frame.index, names=["data", "stragglers"])
        return frame


def headline_of(histories: Sequence[History]) -> str:
    """The headline metric (`tasks.headline_metric`) of the task these runs share: test_accuracy, or
    test_mse for a regression."""
    metric, _ = headline_metric(common_task([history.final() for history in histories]))
    return metric


def run_study(points: Sequence[StudyPoint], tracking_uri: str | None = None, experiment: str = "study", *,
              show_progress: bool = True, stop: threading.Event | None = None) -> Study:
    """Run every point, each as an MLflow run tagged with its panel and line; stops early (the runs so
    far kept) when `stop` is set."""
    from tqdm.auto import tqdm

    study = Study(list(points))
    for point in tqdm(study.points, desc="runs", disable=not show_progress):
        tracker = MlflowCallback(tracking_uri, experiment=experiment, run_name=f"{point.row} | {point.column} | {point.line}",
                                 extra_tags={"study_row": point.row, "study_column": point.column,
                                             "study_line": point.line})
        history = run(point.config, [tracker], stop=stop)
        study.histories.append(history)
        study.run_ids.append(tracker.run_id)
        if history.status != "FINISHED":
            study.points = study.points[:len(study.histories)]
            break
    return study


def curves(histories: Mapping[str, History], metrics: Sequence[str]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """`[label][metric] = [(round, value), ...]` of several runs, the shape `plots.learning_curves` takes."""
    return {label: {metric: history.metric(metric) for metric in metrics} for label, history in histories.items()}


def history_table(histories: Mapping[str, History], metrics: Sequence[str], *, below: float | None = None):
    """Several runs' metrics as a table to read beside their curves: one row per (metric, run), with the
    value of the first and of the last round that logged it and the lowest and highest over the run; with
    `below`, also the number of rounds under that value (`below=0` on cosines: the rounds in which some
    client's update pulled against the mean).

    The first two columns are named after their rounds (`round 1`, `round 30`) when every series starts
    and ends at the same rounds, else `first round` and `last round`.
    """
    import pandas

    series = {(metric, label): history.metric(metric) for metric in metrics for label, history in histories.items()}
    ends = {(points[0][0], points[-1][0]) for points in series.values() if points}
    first, last = "first round", "last round"
    if len(ends) == 1:
        ((start, stop),) = ends
        if start != stop:
            first, last = f"round {start}", f"round {stop}"
    rows = {}
    for key, points in series.items():
        values = np.array([v for _, v in points], dtype=np.float64)
        found = len(values) > 0
        row = {first: values[0] if found else np.nan, last: values[-1] if found else np.nan,
               "lowest": values.min() if found else np.nan, "highest": values.max() if found else np.nan}
        if below is not None:
            row[f"rounds below {below:g}"] = int((values < below).sum())
        rows[key] = row
    table = pandas.DataFrame.from_dict(rows, orient="index")
    table.index = pandas.MultiIndex.from_tuples(table.index, names=["metric", "run"])
    return table


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of a model's weights."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_weight_difference(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """max |a - b| over every weight of two model states with the same keys."""
    if a.keys() != b.keys():
        raise ValueError(f"the states differ in their keys: {sorted(set(a) ^ set(b))}")
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@dataclass(frozen=True)
class Equivalence:
    """Two ways of computing the same model: how far apart their weights and metrics ended up.

    `max_metric_difference` is NaN where no metrics were compared (the SGD reference logs none);
    `metric_differences` holds the largest difference of each metric compared, `(name, value)` by name.
    """

    max_weight_difference: float
    max_metric_difference: float
    num_rounds: int
    metric_differences: tuple[tuple[str, float], ...] = ()

    @property
    def is_exact(self) -> bool:
        """Bit-for-bit the same weights, and the same value of every metric compared."""
        return self.max_weight_difference == 0.0 and not self.max_metric_difference > 0.0

    @property
    def largest_metric(self) -> str:
        """The metric that differs most ("" when none differs or none was compared)."""
        name, value = max(self.metric_differences, key=lambda item: item[1], default=("", 0.0))
        return name if value > 0.0 else ""


def equivalence_table(results: Mapping[str, Equivalence], metrics: Sequence[str] | None = None):
    """Comparisons of `run_both` / `one_client_vs_sgd` as a table, one row per comparison: rounds, the
    largest weight difference, the largest difference of each of `metrics` (default: the compared runs'
    headline metric, test_accuracy or test_mse), the largest of any metric and which one it was, and
    whether the two are exactly equal. Metrics that were not compared (the SGD reference logs none) read
    NaN and 'not compared'."""
    import pandas

    if metrics is None:
        compared = [dict(r.metric_differences) for r in results.values() if r.metric_differences]
        metrics = (headline_metric(common_task(compared))[0],)
    rows = {}
    for label, result in results.items():
        compared = math.isfinite(result.max_metric_difference)
        differences = dict(result.metric_differences)
        rows[label] = {"rounds": result.num_rounds, "largest weight difference": result.max_weight_difference,
                       **{f"largest {metric} difference": differences.get(metric, math.nan) for metric in metrics},
                       "largest metric difference": result.max_metric_difference,
                       "in metric": (result.largest_metric or "none differs") if compared else "not compared",
                       "exactly equal": result.is_exact}
    return pandas.DataFrame.from_dict(rows, orient="index")


def run_both(config_a: ExperimentConfig, config_b: ExperimentConfig) -> Equivalence:
    """Run two configs from scratch and compare their final global models and every round's metrics
    (timings excluded). FedAvg vs FedProx with mu = 0 and no stragglers differ only in name."""
    results = []
    for config in (config_a, config_b):
        federation = prepare(config)
        history = run(federation)
        results.append((snapshot(federation.model), history))
    (state_a, history_a), (state_b, history_b) = results
    by_metric: dict[str, float] = {}
    for ra, rb in zip(history_a.rounds, history_b.rounds):
        for k in ra.metrics:
            if k != "round_time_s" and k in rb.metrics:
                by_metric[k] = max(by_metric.get(k, 0.0), abs(ra.metrics[k] - rb.metrics[k]))
    return Equivalence(max_weight_difference(state_a, state_b), max(by_metric.values(), default=0.0),
                       len(history_a.rounds), tuple(sorted(by_metric.items())))


def sgd_reference(config: ExperimentConfig) -> dict[str, torch.Tensor]:
    """What plain mini-batch SGD (`torch.optim.SGD`) on the task's loss (`tasks.training_loss`) on the single
    client's data reaches after rounds x local_epochs epochs, with the shuffles the federated run draws: the
    reference that FedAvg with one client (McMahan et al. 2017: with C = 1 client FedAvg is sequential SGD)
    must equal."""
    if config.federation.num_clients != 1:
        raise ValueError(f"federation.num_clients must be 1 for the SGD reference, got "
                         f"{config.federation.num_clients} (set federation.num_clients=1, clients_per_round=1)")
    federation = prepare(config)  # the same data, client and initial model as the federated run
    model = federation.model
    x = federation.dataset.x_train[torch.as_tensor(federation.clients[0], device=federation.device)]
    y = federation.dataset.y_train[torch.as_tensor(federation.clients[0], device=federation.device)]
    optimizer = torch.optim.SGD(model.parameters(), lr=config.training.lr)
    batch = config.training.batch_size
    model.train()
    for round_ in range(1, config.federation.rounds + 1):
        # The seed the round loop gives client 0 in this round: each round reshuffles from it.
        seed = int(stream(config.seed, STREAM_TRAINING, round_, 0).integers(2**63))
        generator = torch.Generator().manual_seed(seed)
        for _ in range(config.training.local_epochs):
            order = torch.randperm(len(y), generator=generator).to(x.device)
            for start in range(0, len(y), batch):
                index = order[start:start + batch]
                optimizer.zero_grad()
                training_loss(federation.dataset.task, model(x[index]), y[index]).backward()
                optimizer.step()
    return snapshot(model)


def one_client_vs_sgd(config: ExperimentConfig) -> Equivalence:
    """Federated training with one client against `sgd_reference` on the same data and shuffles."""
    federation = prepare(config)
    history = run(federation)
    # The reference logs no metrics: there is nothing to compare them with (NaN, not a reassuring 0).
    return Equivalence(max_weight_difference(snapshot(federation.model), sgd_reference(config)), math.nan,
                       len(history.rounds))


#: The methods of notebook 06, in the order the README's strategy table lists them.
BEYOND_FEDAVG = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold", "fednova")
ROBUST_AGGREGATORS = ("fedavg", "median", "trimmed_mean", "krum", "multi_krum")


def privacy_tradeoff(experiment: str, tracking_uri: str | None = None, *, sweep_id: str | None = None,
                     metric: str | None = None):
    """DP-FedAvg's privacy-utility trade-off from MLflow: per noise multiplier z, the epsilon spent (at the
    run's privacy.delta) and `metric` at the end (default: the runs' headline metric, test_accuracy or
    test_mse), mean and 95 % interval over seeds; with its figure."""
    import pandas

    if metric is None:
        metric, _ = headline_metric(runs_task(experiment, tracking_uri, sweep_id=sweep_id))
    runs = final_values(experiment, [metric, "dp_epsilon"], tracking_uri, sweep_id=sweep_id)
    if "strategy.noise_multiplier" not in runs:
        raise ValueError(f"the runs of {experiment!r} do not vary strategy.noise_multiplier (sweep it: "
                         f"--grid strategy.noise_multiplier=0.5,1,2)")
    rows = []
    for z, group in runs.groupby(runs["strategy.noise_multiplier"].astype(float), sort=True):
        values = group[metric].to_numpy(dtype=float)
        rows.append({"noise_multiplier": z, "num_runs": len(group), "dp_epsilon": float(group["dp_epsilon"].mean()),
                     f"{metric}_mean": float(values.mean()), f"{metric}_ci95": ci95_half_width(values)})
    table = pandas.DataFrame(rows)
    noisy = table[table["noise_multiplier"] > 0]  # z = 0 spends an unbounded epsilon: no point on the axis
    figure = tradeoff_figure(noisy["dp_epsilon"], noisy[f"{metric}_mean"], noisy[f"{metric}_ci95"],
                             [f"z={z:g}" for z in noisy["noise_multiplier"]], x_label="epsilon spent",
                             y_label=metric.replace("_", " "),
                             title=f"DP-FedAvg on {experiment}: privacy against "
                                   f"{metric.removeprefix('test_').replace('_', ' ')} ({len(runs)} runs)")
    return table, figure

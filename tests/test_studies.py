"""The studies the teaching notebooks run: the FedProx Synthetic grid and the algorithm equivalences."""

from __future__ import annotations

import math

import pytest
from mlflow.tracking import MlflowClient

from workbench.config import ExperimentConfig
from workbench.simulation import History, RoundResult
from workbench.studies import (FEDPROX_HETEROGENEITY, Equivalence, curves, equivalence_table, fedprox_study_points,
                               history_table, one_client_vs_sgd, run_both, run_study, sgd_reference)


@pytest.fixture
def small(tiny_config) -> ExperimentConfig:
    """8 synthetic clients holding ~600 samples in all (seed 57), 2 rounds."""
    return tiny_config.with_overrides({"seed": 57, "federation.rounds": 2})


def test_study_points_cover_the_grid_with_one_seed(small):
    points = fedprox_study_points(small, list(FEDPROX_HETEROGENEITY), [0.0, 0.5, 0.9], mu=1.0)
    assert len(points) == 4 * 3 * 3
    assert {p.row for p in points} == set(FEDPROX_HETEROGENEITY)
    assert {p.column for p in points} == {"0% stragglers", "50% stragglers", "90% stragglers"}
    assert {p.line for p in points} == {"FedAvg", "FedProx mu=0", "FedProx mu=1"}
    assert {p.config.seed for p in points} == {57}
    iid = [p.config for p in points if p.row == "IID"]
    assert {c.data.name for c in iid} == {"synthetic_iid"}
    prox1 = [p.config for p in points if p.line == "FedProx mu=1"]
    assert {(c.strategy.name, c.strategy.mu) for c in prox1} == {("fedprox", 1.0)}
    with pytest.raises(ValueError, match="heterogeneity 'Synthetic"):
        fedprox_study_points(small, ["Synthetic(2,2)"], [0.0], mu=1.0)


def test_run_study_logs_each_point_and_fills_the_grid(small, tracking_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_STATE_DIR", str(tmp_path / "state"))
    points = fedprox_study_points(small, ["Synthetic(1,1)"], [0.5], mu=1.0)
    study = run_study(points, tracking_uri, experiment="study", show_progress=False)
    assert len(study.run_ids) == 3 and all(h.status == "FINISHED" for h in study.histories)
    grid = study.curves()
    assert list(grid) == [("Synthetic(1,1)", "50% stragglers")]
    lines = grid[("Synthetic(1,1)", "50% stragglers")]
    assert set(lines) == {"FedAvg", "FedProx mu=0", "FedProx mu=1"}
    assert all([r for r, _ in series] == [1, 2] for series in lines.values())
    # FedAvg drops the two stragglers of each round that FedProx (mu=0) keeps: different models.
    assert lines["FedAvg"] != lines["FedProx mu=0"]
    table = study.table()
    assert table.shape == (1, 3) and table.loc[("Synthetic(1,1)", "50% stragglers"), "FedAvg"] == lines["FedAvg"][-1][1]
    client = MlflowClient(tracking_uri)
    tags = {client.get_run(r).data.tags["study_line"] for r in study.run_ids}
    assert tags == {"FedAvg", "FedProx mu=0", "FedProx mu=1"}


def test_fedprox_with_mu_zero_and_no_stragglers_is_fedavg_exactly(small):
    fedavg = small.with_overrides({"strategy.name": "fedavg"})
    fedprox0 = small.with_overrides({"strategy.name": "fedprox", "strategy.mu": 0.0})
    same = run_both(fedavg, fedprox0)
    assert same.is_exact and same.num_rounds == 2
    different = run_both(fedavg, small.with_overrides({"strategy.name": "fedprox", "strategy.mu": 1.0}))
    assert different.max_weight_difference > 1e-4 and not different.is_exact


def test_fedavg_with_one_client_is_plain_sgd():
    config = ExperimentConfig().with_overrides({
        "data.name": "digits", "partition.scheme": "iid", "federation.num_clients": 1,
        "federation.clients_per_round": 1, "federation.rounds": 2, "training.local_epochs": 1,
        "training.batch_size": 32, "training.lr": 0.05, "device": "cpu"})
    same = one_client_vs_sgd(config)
    assert same.max_weight_difference < 1e-6 and same.num_rounds == 2
    assert math.isnan(same.max_metric_difference)  # the reference logs no metrics: none compared, none claimed
    # The reference is not trivially equal to anything: another learning rate lands elsewhere.
    from workbench.studies import max_weight_difference, snapshot
    from workbench.simulation import prepare, run

    federation = prepare(config)
    run(federation)
    other = sgd_reference(config.with_overrides({"training.lr": 0.01}))
    assert max_weight_difference(snapshot(federation.model), other) > 1e-3
    with pytest.raises(ValueError, match="federation.num_clients must be 1"):
        sgd_reference(config.with_overrides({"federation.num_clients": 2}))


def test_curves_has_the_shape_learning_curves_takes(small):
    from workbench.simulation import run

    history = run(small)
    shaped = curves({"a": history}, ["test_accuracy", "train_loss"])
    assert shaped == {"a": {"test_accuracy": history.metric("test_accuracy"),
                            "train_loss": history.metric("train_loss")}}


def _history(values: dict[str, list[float]]) -> History:
    rounds = len(next(iter(values.values())))
    return History([RoundResult(r + 1, {k: v[r] for k, v in values.items()}, (), ()) for r in range(rounds)],
                   status="FINISHED")


def test_history_table_reads_first_last_lowest_highest_and_rounds_below_zero():
    runs = {"IID": _history({"client_drift_mean": [0.9, 0.7, 0.5], "test_accuracy": [0.6, 0.8, 0.9]}),
            "skewed": _history({"client_drift_mean": [0.3, -0.2, 0.1], "test_accuracy": [0.3, 0.5, 0.4]})}
    table = history_table(runs, ["client_drift_mean", "test_accuracy"], below=0)
    assert list(table.columns) == ["round 1", "round 3", "lowest", "highest", "rounds below 0"]
    assert list(table.index) == [("client_drift_mean", "IID"), ("client_drift_mean", "skewed"),
                                 ("test_accuracy", "IID"), ("test_accuracy", "skewed")]
    assert table.loc[("client_drift_mean", "skewed")].tolist() == [0.3, 0.1, -0.2, 0.3, 1]
    assert table.loc[("test_accuracy", "IID")].tolist() == [0.6, 0.9, 0.6, 0.9, 0]
    plain = history_table(runs, ["test_accuracy"])
    assert list(plain.columns) == ["round 1", "round 3", "lowest", "highest"]
    # runs of different lengths: the columns cannot be named after one round
    uneven = history_table({"a": runs["IID"], "b": _history({"test_accuracy": [0.1, 0.2]})}, ["test_accuracy"])
    assert list(uneven.columns)[:2] == ["first round", "last round"]
    assert uneven.loc[("test_accuracy", "b"), "last round"] == 0.2


def test_equivalence_table_names_the_metric_that_differs_and_what_was_not_compared(small):
    fedavg = small.with_overrides({"strategy.name": "fedavg"})
    same = run_both(fedavg, small.with_overrides({"strategy.name": "fedprox", "strategy.mu": 0.0}))
    other = run_both(fedavg, small.with_overrides({"strategy.name": "fedprox", "strategy.mu": 1.0}))
    differences = dict(other.metric_differences)
    assert other.max_metric_difference == max(differences.values()) > 0
    assert other.largest_metric == max(differences, key=differences.get) and same.largest_metric == ""
    reference = Equivalence(4.8e-7, math.nan, 3)
    table = equivalence_table({"mu=0": same, "mu=1": other, "vs SGD": reference})
    assert list(table.columns) == ["rounds", "largest weight difference", "largest test_accuracy difference",
                                   "largest metric difference", "in metric", "exactly equal"]
    assert table.loc["mu=0"].tolist() == [2, 0.0, 0.0, 0.0, "none differs", True]
    assert table.loc["mu=1", "in metric"] == other.largest_metric
    assert table.loc["mu=1", "largest test_accuracy difference"] == differences["test_accuracy"]
    assert table.loc["mu=1", "largest weight difference"] == other.max_weight_difference
    assert not table.loc["mu=1", "exactly equal"]
    assert table.loc["vs SGD", "in metric"] == "not compared" and not table.loc["vs SGD", "exactly equal"]
    assert math.isnan(table.loc["vs SGD", "largest metric difference"])
    assert Equivalence(0.0, math.nan, 3).is_exact  # equal weights, and no metric to disagree


def test_privacy_tradeoff_figure_says_which_experiment_it_plots(tracking_uri):
    from workbench.studies import privacy_tradeoff

    client = MlflowClient(tracking_uri)
    experiment = client.create_experiment("dp-digits")
    for z, seed, epsilon, accuracy in ((0.5, 0, 8.0, 0.80), (0.5, 1, 8.0, 0.84), (2.0, 0, 1.0, 0.60)):
        run_id = client.create_run(experiment).info.run_id
        client.log_param(run_id, "strategy.noise_multiplier", z)
        client.log_param(run_id, "seed", seed)
        client.log_metric(run_id, "dp_epsilon", epsilon)
        client.log_metric(run_id, "test_accuracy", accuracy)
        client.set_terminated(run_id, "FINISHED")
    table, figure = privacy_tradeoff("dp-digits", tracking_uri)
    assert table["num_runs"].tolist() == [2, 1]
    assert table["test_accuracy_mean"].tolist() == pytest.approx([0.82, 0.60])
    assert figure.axes[0].get_title() == "DP-FedAvg on dp-digits: privacy against accuracy (3 runs)"
    x, y = figure.axes[0].lines[0].get_data()
    assert list(x) == [8.0, 1.0] and list(y) == pytest.approx([0.82, 0.60])

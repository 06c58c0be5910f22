"""The studies the teaching notebooks run: the FedProx Synthetic grid and the algorithm equivalences."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from workbench.config import ExperimentConfig
from workbench.studies import (FEDPROX_HETEROGENEITY, curves, fedprox_study_points, one_client_vs_sgd, run_both,
                               run_study, sgd_reference)


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

"""Sweeps (one parent run, a nested child per grid point and seed) and the comparison of their runs."""

import math
import shutil

import numpy as np
import pytest
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from workbench.cli import main
from workbench.tracking import SWEEP_PARENT_TAG, compare, mean_curve, rounds_to_reach, sweep

GRID = {"strategy.name": ["fedavg", "fedprox"]}
SEEDS = [0, 1]


@pytest.fixture(scope="module")
def swept(tiny_config_module, tmp_path_factory, _template_store):
    folder = tmp_path_factory.mktemp("sweep-store")
    shutil.copy(_template_store, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    base = tiny_config_module.with_overrides({"execution.threads": 1, "federation.straggler_fraction": 0.5})
    return uri, sweep(base, GRID, SEEDS, uri, experiment="grid", state_dir=folder / "state")


@pytest.fixture(scope="module")
def tiny_config_module():
    from workbench.config import ExperimentConfig

    return ExperimentConfig().with_overrides({
        "federation.num_clients": 8, "federation.clients_per_round": 4, "federation.rounds": 3,
        "training.local_epochs": 2, "training.batch_size": 10, "training.lr": 0.05, "device": "cpu"})


def test_sweep_is_one_parent_with_a_tagged_child_per_point_and_seed(swept):
    uri, result = swept
    client = MlflowClient(uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[SWEEP_PARENT_TAG] == "parent"
    assert parent.data.params["grid.strategy.name"] == "fedavg,fedprox" and parent.data.params["seeds"] == "0,1"
    children = [client.get_run(run_id) for run_id in result.child_run_ids]
    assert len(children) == 4
    seen = set()
    for child in children:
        tags, params = child.data.tags, child.data.params
        assert child.info.status == "FINISHED"
        assert tags["mlflow.parentRunId"] == result.parent_run_id == tags["sweep_id"]
        assert tags["sweep_group"] == f"strategy.name={params['strategy.name']}"
        assert tags["algorithm"] == params["strategy.name"] and tags["seed"] == params["seed"]
        seen.add((params["strategy.name"], params["seed"]))
    assert seen == {(a, str(s)) for a in GRID["strategy.name"] for s in SEEDS}
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "comparison")}
    assert artifacts == {"comparison/comparison.csv", "comparison/comparison.png"}


def test_comparison_table_matches_the_children(swept):
    uri, result = swept
    client = MlflowClient(uri)
    comparison = compare("grid", uri)
    table = comparison.table.set_index("group")
    assert comparison.varied_keys == ("strategy.name",)
    assert list(table.index) == ["strategy.name=fedavg", "strategy.name=fedprox"]
    target = comparison.target
    for name in GRID["strategy.name"]:
        runs = [client.get_run(i) for i in result.child_run_ids]
        runs = [r for r in runs if r.data.params["strategy.name"] == name]
        finals = [r.data.metrics["test_accuracy"] for r in runs]
        row = table.loc[f"strategy.name={name}"]
        assert row["num_runs"] == 2 and row["seeds"] == "0,1"
        assert row["final_test_accuracy_mean"] == pytest.approx(np.mean(finals))
        assert row["final_test_accuracy_std"] == pytest.approx(np.std(finals, ddof=1))
        curves = [sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, "test_accuracy"))
                  for r in runs]
        reached = [next((s for s, v in c if v >= target), None) for c in curves]
        hits = [r for r in reached if r is not None]
        assert row["reached_target"] == f"{len(hits)}/2"
        assert (math.isnan(row["rounds_to_target_mean"]) if not hits
                else row["rounds_to_target_mean"] == pytest.approx(np.mean(hits)))
    # the default target is the weakest group's final mean: that group reaches it with at least one seed
    assert target == pytest.approx(table["final_test_accuracy_mean"].min())
    assert isinstance(comparison.figure, Figure) and len(comparison.figure.axes) == 2
    assert compare("grid", uri, sweep_id=result.parent_run_id).table.equals(comparison.table)
    loss = compare("grid", uri, metric="test_loss", target=10.0).table
    assert (loss["reached_target"] == "2/2").all() and (loss["rounds_to_target_mean"] == 1).all()


def test_curve_math():
    assert rounds_to_reach([(1, 0.2), (2, 0.5), (3, 0.4)], 0.5) == 2
    assert rounds_to_reach([(1, 0.2)], 0.5) is None
    assert rounds_to_reach([(1, 2.0), (2, 0.9)], 1.0, higher_is_better=False) == 2
    rounds, mean, std = mean_curve([[(1, 0.0), (2, 1.0)], [(1, 2.0), (2, 3.0), (3, 9.0)]])
    assert rounds == [1, 2] and mean == [1.0, 2.0] and std == pytest.approx([math.sqrt(2)] * 2)


def test_compare_and_sweep_on_the_command_line(swept, capsys, tmp_path):
    uri, _ = swept
    figure = tmp_path / "cmp.png"
    assert main(["compare", "--experiment", "grid", "--tracking-uri", uri, "--output", str(figure)]) == 0
    out = capsys.readouterr().out
    assert "strategy.name=fedavg" in out and "strategy.name=fedprox" in out and "rounds_to_target" in out
    assert figure.stat().st_size > 0
    assert main(["compare", "--experiment", "nope", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "no MLflow experiment named 'nope'" in err and "grid" in err
    runs_before = len(MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("grid").experiment_id]))
    for args, words in [
        (["--grid", "strategy.name=fedavg,fedprx"], ["strategy.name", "did you mean 'fedprox'"]),
        (["--grid", "training.lr=0.1,-1"], ["training.lr", "-1"]),
        (["--grid", "strategy.name=fedavg", "--seeds", "0,x"], ["--seeds", "0,1,2"]),
        (["--grid", "seed=1,2"], ["--seeds"]),
    ]:
        assert main(["sweep", *args, "--tracking-uri", uri, "--experiment", "grid", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and all(w in err for w in words), err
    client = MlflowClient(uri)
    assert len(client.search_runs([client.get_experiment_by_name("grid").experiment_id])) == runs_before

"""Sweeps (one parent run, a nested child per grid point and seed) and the comparison of their runs."""

import math
import shutil

import numpy as np
import pandas
import pytest
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from workbench.cli import main
from workbench.tracking import (SWEEP_PARENT_TAG, Comparison, compare, format_comparison, mean_curve,
                                rounds_to_reach, sweep, sweep_configs)

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
    # titled with what the runs share (the sweep's base: Synthetic(1, 1), its 8 natural clients), no seed
    assert comparison.figure._suptitle.get_text() == "synthetic(alpha=1, beta=1) · natural · 8 clients"
    assert [t.get_text().endswith("(n = 2)") for t in comparison.figure.axes[1].get_yticklabels()] == [True, True]
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
        # the flag the user typed, its form and an example: it answered "--set expects KEY=VALUE"
        (["--grid", "training.lr"], ["--grid expects KEY=V1,V2, got 'training.lr' (for example --grid "
                                     "training.lr=0.01,0.1)"]),
        (["--grid", "training.lr="], ["grid key training.lr has no values", "--grid training.lr=v1,v2"]),
        (["--set", "training.lr", "--grid", "strategy.name=fedavg"], ["--set expects KEY=VALUE"]),
    ]:
        assert main(["sweep", *args, "--tracking-uri", uri, "--experiment", "grid", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and all(w in err for w in words), err
        assert ("--set" in err) == ("--set" in args), err
    client = MlflowClient(uri)
    assert len(client.search_runs([client.get_experiment_by_name("grid").experiment_id])) == runs_before


def test_python_sweeps_are_told_the_python_spelling_too(tiny_config_module):
    with pytest.raises(ValueError, match=r"seeds=\[0, 1, 2\] in sweep\(\.\.\.\)"):
        sweep_configs(tiny_config_module, {"seed": [1, 2]}, [0])
    with pytest.raises(ValueError, match=r"grid=\{'training.lr': \[v1, v2\]\} in sweep"):
        sweep_configs(tiny_config_module, {"training.lr": []}, [0])


def printed_rows(text):
    """The rows of a printed comparison table as {column: cell} (cells hold no spaces here)."""
    header, *rows = [line.split() for line in text.splitlines() if line and not line.startswith("(")]
    assert all(len(row) == len(header) for row in rows), text
    return [dict(zip(header, row)) for row in rows]


def test_printed_table_says_n_1_and_prints_counts_as_counts():
    """Written-out cells for a hand-made table: one run has no std (it printed 0.0000) and no ci95 (NaN);
    whole round counts print as integers, a real mean of rounds as 5.5 (it printed 5.5000)."""
    table = pandas.DataFrame([
        {"group": "a", "num_runs": 1, "seeds": "0", "final_test_accuracy_mean": 0.51,
         "final_test_accuracy_std": math.nan, "final_test_accuracy_ci95": math.nan,
         "best_test_accuracy_mean": 0.6, "rounds_to_target_mean": 7.0, "reached_target": "1/1"},
        {"group": "b", "num_runs": 2, "seeds": "0,1", "final_test_accuracy_mean": 0.56,
         "final_test_accuracy_std": 0.02, "final_test_accuracy_ci95": 0.179687,
         "best_test_accuracy_mean": 0.6125, "rounds_to_target_mean": 5.5, "reached_target": "2/2"},
        {"group": "c", "num_runs": 3, "seeds": "0,1,2", "final_test_accuracy_mean": 0.4,
         "final_test_accuracy_std": 0.1, "final_test_accuracy_ci95": 0.248414,
         "best_test_accuracy_mean": 0.45, "rounds_to_target_mean": math.nan, "reached_target": "0/3"},
        {"group": "d", "num_runs": 3, "seeds": "0,1,2", "final_test_accuracy_mean": 0.52,
         "final_test_accuracy_std": 0.01, "final_test_accuracy_ci95": 0.0248414,
         "best_test_accuracy_mean": 0.53, "rounds_to_target_mean": 16 / 3, "reached_target": "3/3"},
    ])
    comparison = Comparison(table, Figure(), "test_accuracy", 0.5, (), {})
    text = format_comparison(comparison)
    a, b, c, d = printed_rows(text)
    assert (a["num_runs"], a["final_test_accuracy_std"], a["final_test_accuracy_ci95"]) == ("1", "n=1", "n=1")
    assert (a["final_test_accuracy_mean"], a["rounds_to_target_mean"]) == ("0.5100", "7")
    assert (b["num_runs"], b["final_test_accuracy_std"], b["final_test_accuracy_ci95"]) == ("2", "0.0200", "0.1797")
    assert b["rounds_to_target_mean"] == "5.5"
    assert (c["rounds_to_target_mean"], c["reached_target"]) == ("-", "0/3")
    assert d["rounds_to_target_mean"] == "5.33"
    assert "0.0000" not in text and "NaN" not in text and "nan" not in text
    assert "(n=1: a group of one run has no std or ci95" in text
    assert "n=1" not in format_comparison(Comparison(table.iloc[1:], Figure(), "test_accuracy", 0.5, (), {}))


def test_comparison_rounds_print_as_the_table_holds_them(swept, capsys, tmp_path):
    """The two-seed sweep: each group's printed rounds_to_target_mean is its mean of two first rounds,
    a whole number or a half, written as such."""
    uri, _ = swept
    table = compare("grid", uri).table.set_index("group")
    assert main(["compare", "--experiment", "grid", "--tracking-uri", uri, "--output", str(tmp_path / "c.png")]) == 0
    for row in printed_rows(capsys.readouterr().out.split("\nfigure:")[0]):
        mean = table.loc[row["group"], "rounds_to_target_mean"]
        expected = "-" if math.isnan(mean) else str(int(mean)) if mean == int(mean) else str(mean)
        assert row["rounds_to_target_mean"] == expected and row["num_runs"] == "2"


def test_single_seed_sweep_says_n_1_on_the_command_line(tracking_uri, capsys, tmp_path):
    status = main(["sweep", "--grid", "data.alpha=0,1", "--seeds", "0",
                   "--set", "federation.num_clients=6", "--set", "federation.clients_per_round=3",
                   "--set", "federation.rounds=3", "--set", "training.local_epochs=1", "--set", "device=cpu",
                   "--tracking-uri", tracking_uri, "--experiment", "one-seed", "--quiet",
                   "--output", str(tmp_path / "sweep.png")])
    assert status == 0
    out = capsys.readouterr().out
    rows = printed_rows(out.split("child runs)\n")[1].split("\nfigure:")[0])
    assert [r["group"] for r in rows] == ["data.alpha=0.0", "data.alpha=1.0"]
    for row in rows:
        assert (row["num_runs"], row["final_test_accuracy_std"], row["final_test_accuracy_ci95"]) == ("1", "n=1", "n=1")
        assert row["rounds_to_target_mean"] == "-" or row["rounds_to_target_mean"] in {"1", "2", "3"}
    comparison = compare("one-seed", tracking_uri)
    table = comparison.table
    assert table["final_test_accuracy_std"].isna().all() and table["final_test_accuracy_ci95"].isna().all()
    # the figure says it too, and draws no spread bar of a single run
    assert [t.get_text().endswith("(n = 1)") for t in comparison.figure.axes[1].get_yticklabels()] == [True, True]
    # the groups differ in their data: no title claims one dataset for all (each label says which)
    assert comparison.figure._suptitle is None

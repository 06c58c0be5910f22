"""The command line, run as a user runs it: a real process writing a real SQLite store."""

import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from workbench.cli import main
from workbench.config import knobs

TINY = ["--set", "federation.num_clients=6", "--set", "federation.clients_per_round=3",
        "--set", "federation.rounds=3", "--set", "training.local_epochs=2", "--set", "device=cpu"]


def workbench(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "workbench.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=300)


def runs_in(tracking_uri):
    client = MlflowClient(tracking_uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_run_end_to_end_reads_metrics_back(tracking_uri, tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text("strategy:\n  name: fedprox\n  mu: 0.1\n")
    result = workbench("run", "--config", str(config), *TINY, "--tracking-uri", tracking_uri,
                       "--experiment", "cli")
    assert result.returncode == 0, result.stderr
    run_id = result.stdout.split("MLflow run id: ")[1].split()[0]
    assert "test_accuracy" in result.stdout
    client = MlflowClient(tracking_uri)
    logged = client.get_run(run_id)
    assert logged.data.params["strategy.name"] == "fedprox" and logged.data.params["strategy.mu"] == "0.1"
    for key in ("test_accuracy", "test_loss", "train_loss"):
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == [1, 2, 3]  # one point per round, steps 1..R


def test_a_privacy_budget_ends_the_run_finished_early_and_says_why(tracking_uri):
    """DP-FedAvg with privacy.target_epsilon: the run stops before the round that would spend more, ends
    FINISHED with fewer rounds, its epsilon per round logged, and the reason on stderr and as a tag."""
    result = workbench("run", *TINY, "--set", "federation.rounds=20", "--set", "strategy.name=dp_fedavg",
                       "--set", "strategy.noise_multiplier=1.5", "--set", "privacy.target_epsilon=8",
                       "--tracking-uri", tracking_uri, "--experiment", "dp", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "privacy.target_epsilon" in result.stderr
    (logged,) = runs_in(tracking_uri)
    client = MlflowClient(tracking_uri)
    epsilon = sorted((m.step, m.value) for m in client.get_metric_history(logged.info.run_id, "dp_epsilon"))
    assert logged.info.status == "FINISHED" and 1 <= len(epsilon) < 20 and epsilon[-1][1] <= 8.0
    assert [v for _, v in epsilon] == sorted(v for _, v in epsilon)
    assert "privacy.target_epsilon" in logged.data.tags["stop_reason"]
    assert logged.data.params["strategy.noise_multiplier"] == "1.5" and logged.data.params["privacy.delta"] == "1e-05"


@pytest.mark.parametrize("args, words", [
    (["--set", "partition.alpha=-0.5", "--set", "partition.scheme=dirichlet"], ["partition.alpha", "-0.5", "> 0"]),
    (["--set", "strategy.name=fedprx"], ["strategy.name", "did you mean 'fedprox'"]),
    (["--set", "training.lrr=0.1"], ["unknown config key 'training.lrr'", "did you mean 'training.lr'"]),
    (["--set", "data.name=digits"], ["partition.scheme='natural'", "real clients"]),
    (["--set", "federation.num_clients=5000", "--set", "partition.scheme=iid", "--set", "data.name=digits"],
     ["federation.num_clients=5000", "use at most"]),
    (["--config", "/nonexistent.yaml"], ["cannot be read"]),
    (["--set", "training.lr"], ["KEY=VALUE"]),
    (["--set", "strategy.name=krum", "--set", "federation.clients_per_round=5"],
     ["federation.clients_per_round=5", "krum", "strategy.num_byzantine"]),
    (["--set", "strategy.name=dp_fedavg", "--set", "strategy.noise_multiplier=0", "--set",
      "privacy.target_epsilon=2"], ["privacy.target_epsilon", "strategy.noise_multiplier"]),
])
def test_bad_config_exits_2_with_one_line_and_no_run(tracking_uri, capsys, args, words):
    status = main(["run", *args, "--tracking-uri", tracking_uri, "--quiet"])
    err = capsys.readouterr().err
    assert status == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    for word in words:
        assert word in err
    assert runs_in(tracking_uri) == []


def test_bad_config_in_a_real_process(tracking_uri):
    result = workbench("run", "--set", "federation.straggler_fraction=2", "--tracking-uri", tracking_uri)
    assert result.returncode == 2
    assert "federation.straggler_fraction must be >= 0.0 and <= 1.0, got 2.0" in result.stderr
    assert "Traceback" not in result.stderr
    assert runs_in(tracking_uri) == []


def test_help_lists_every_key_with_default_and_range():
    result = workbench("run", "--help")
    assert result.returncode == 0
    for k in knobs():
        assert f"{k.key} = {k.default!r}  [{k.describe_range()}]" in result.stdout


def test_demo_prints_side_by_side_table(tracking_uri):
    status = main(["demo", *TINY, "--set", "federation.straggler_fraction=0.5", "--tracking-uri", tracking_uri,
                   "--quiet"])
    assert status == 0
    runs = runs_in(tracking_uri)
    assert sorted(r.data.tags["algorithm"] for r in runs) == ["fedavg", "fedprox"]
    assert len({r.data.params["partition.scheme"] + r.data.params["seed"] for r in runs}) == 1


def test_demo_output(tracking_uri, capsys):
    main(["demo", *TINY, "--tracking-uri", tracking_uri, "--quiet"])
    out = capsys.readouterr().out
    assert "FedAvg" in out and "FedProx (mu=1)" in out and "test_accuracy" in out
    assert f"mlflow ui --backend-store-uri {tracking_uri}" in out


def test_default_store_is_mlruns_in_the_current_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    result = subprocess.run([sys.executable, "-m", "workbench.cli", "run", *TINY, "--set", "federation.rounds=1",
                             "--quiet"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "mlruns" / "mlflow.db").exists()

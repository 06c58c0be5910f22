"""The command line, run as a user runs it: a real process writing a real SQLite store."""

import os
import re
import subprocess
import sys
import threading

import pytest
from mlflow.tracking import MlflowClient

from workbench.cli import main
from workbench.config import ExperimentConfig, knobs
from workbench.simulation import Callback, run
from workbench.tracking import MlflowCallback

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
    # the whole run id (what `workbench resume` takes) and the experiment it is in, on one line
    (run_id, experiment), = re.findall(r"^MLflow run id: ([0-9a-f]{32}) in experiment '(\w+)'$", result.stdout,
                                       re.MULTILINE)
    assert experiment == "cli"
    assert "test_accuracy" in result.stdout
    client = MlflowClient(tracking_uri)
    logged = client.get_run(run_id)
    assert client.get_experiment(logged.info.experiment_id).name == "cli"
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
    (["--set", "partition.scheme=natural", "--set", "data.name=digits"],
     ["partition.scheme='natural'", "real clients"]),
    (["--set", "federation.num_clients=5000", "--set", "partition.scheme=iid", "--set", "data.name=digits"],
     ["federation.num_clients=5000", "use at most"]),
    (["--config", "/nonexistent.yaml"], ["cannot be read"]),
    (["--set", "training.lr"], ["--set expects KEY=VALUE, got 'training.lr'"]),
    (["--set", "federation.rounds=2.5"], ["federation.rounds must be an int", "got '2.5'"]),
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
    # every run id in full, beside its strategy: the demo printed 12 characters and an ellipsis, which
    # `workbench resume` answered with "no MLflow run"
    assert "…" not in out
    for logged in runs_in(tracking_uri):
        title = {"fedavg": "FedAvg", "fedprox": "FedProx (mu=1)"}[logged.data.tags["algorithm"]]
        (line,) = [line for line in out.splitlines() if logged.info.run_id in line]
        assert line.split() == [*title.split(), logged.info.run_id]
        assert main(["resume", logged.info.run_id, "--tracking-uri", tracking_uri, "--quiet"]) == 2
        assert "already FINISHED" in capsys.readouterr().err  # found: the id is one resume takes


class StopAfterRound(Callback):
    """Asks the run to stop once `round_` is over, as a notebook panel's Stop button does."""

    def __init__(self, round_: int, stop: threading.Event):
        self.round, self.stop = round_, stop

    def on_round_end(self, result, federation):
        if result.round == self.round:
            self.stop.set()


def test_a_resumed_run_counts_its_progress_from_the_round_it_resumes_at(tracking_uri, capsys):
    """Killed after round 3 of 6, then `workbench resume`: the bar ends at 6/6 [100%] and never shows the
    rounds 1-2 that this session did not train (it showed 0->3 and ended at 3/6 [50%])."""
    config = ExperimentConfig().with_overrides({"federation.num_clients": 6, "federation.clients_per_round": 3,
                                                "federation.rounds": 6, "training.local_epochs": 1,
                                                "device": "cpu", "execution.executor": "sequential"})
    stop = threading.Event()
    tracker = MlflowCallback(tracking_uri, experiment="bar")
    assert run(config, [tracker, StopAfterRound(3, stop)], stop=stop).status == "KILLED"
    capsys.readouterr()
    assert main(["resume", tracker.run_id, "--tracking-uri", tracking_uri]) == 0
    captured = capsys.readouterr()
    states = [s for s in re.split(r"[\r\n]", captured.err) if re.search(r"\d+/6 \[", s)]
    counts = [int(re.search(r"(\d+)/6 \[", s).group(1)) for s in states]
    assert counts[-1] == 6 and "100%" in states[-1], captured.err
    assert not {1, 2} & set(counts) and counts == sorted(counts), captured.err
    assert counts[0] == 3, captured.err  # from its first display on: the rounds already done
    assert f"MLflow run id: {tracker.run_id} (resumed, FINISHED)" in captured.out


def test_default_store_is_mlruns_in_the_current_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    result = subprocess.run([sys.executable, "-m", "workbench.cli", "run", *TINY, "--set", "federation.rounds=1",
                             "--quiet"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "mlruns" / "mlflow.db").exists()


def test_the_default_partition_runs_any_dataset_and_says_what_it_picked(tracking_uri, capsys):
    """`workbench run --set data.name=digits` failed with the default partition.scheme=natural; `auto` picks
    iid there and natural for Synthetic's real clients, prints it, and the run records both."""
    picked = {}
    for data, scheme, why in [("digits", "iid", "digits has no natural clients"),
                              ("synthetic", "natural", "synthetic has natural clients")]:
        assert main(["run", *TINY, "--set", f"data.name={data}", "--tracking-uri", tracking_uri,
                     "--experiment", data, "--quiet"]) == 0
        out = capsys.readouterr().out
        assert f"partition.scheme=auto: {scheme} ({why};" in out
        (run_id,) = re.findall(r"^MLflow run id: ([0-9a-f]{32}) in experiment", out, re.MULTILINE)
        logged = MlflowClient(tracking_uri).get_run(run_id)
        picked[data] = (logged.data.params["partition.scheme"], logged.data.params["resolved_partition_scheme"],
                        logged.data.tags["partition"])
    assert picked == {"digits": ("auto", "iid", "iid"), "synthetic": ("auto", "natural", "natural")}


def test_partition_command_resolves_auto(tmp_path, capsys):
    assert main(["partition", "--set", "data.name=digits", "--set", "federation.num_clients=5",
                 "--set", "federation.clients_per_round=5", "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert "partition.scheme=auto: iid (digits has no natural clients;" in out
    assert "digits, partition.scheme=iid, 5 clients, seed 0" in out

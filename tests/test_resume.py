"""Resume: a run killed hard (SIGKILL), stopped (SIGTERM, Ctrl-C) or failed continues in the same MLflow
run and ends with the model and metrics of an uninterrupted run, one metric point per round."""

import csv
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from workbench.cli import main
from workbench.simulation import Callback, prepare, run
from workbench.tracking import (CLIENT_TABLE, FLUSH_ENV, UNPUBLISHED_DIR, MlflowCallback, checkpoint_rounds,
                                load_model, resume)

PER_ROUND = ("test_accuracy", "test_loss", "train_loss", "update_norm_mean", "client_drift_mean", "bytes_up",
             "bytes_down", "num_updates", "round_time_s")


@pytest.fixture
def config(tiny_config):
    return tiny_config.with_overrides({"federation.rounds": 6, "execution.threads": 1,
                                       "federation.straggler_fraction": 0.5, "strategy.name": "fedprox"})


def cli_args(config):
    return [arg for key, value in config.to_flat().items() for arg in ("--set", f"{key}={value}")]


def start_cli(*args):
    # every round sent on its own (as with slow rounds), so that polling the store sees each one
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_WAIT_POLICY": "PASSIVE", FLUSH_ENV: "0"}
    return subprocess.Popen([sys.executable, "-m", "workbench.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def wait_for_round(tracking_uri, process, round_, timeout_s=240):
    """The run id once the subprocess's run has logged `round_` (polling the store, as a user would)."""
    client = MlflowClient(tracking_uri)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        experiments = [e.experiment_id for e in client.search_experiments()]
        for logged in client.search_runs(experiments):
            if logged.data.metrics.get("num_updates") is not None:
                steps = [m.step for m in client.get_metric_history(logged.info.run_id, "num_updates")]
                if max(steps) >= round_:
                    return logged.info.run_id
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"no round {round_} within {timeout_s} s")


def assert_one_point_per_round(client, run_id, rounds, expected=None):
    for key in PER_ROUND:
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert [step for step, _ in history] == list(range(1, rounds + 1)), key
        if expected is not None and key != "round_time_s":
            assert history == expected.metric(key), key


def assert_same_model(model, reference):
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(config, tracking_uri, tmp_path):
    # Checkpoints every 2 rounds and no local state (as on another machine): the resume starts from an
    # older checkpoint than the last logged round, recomputes, and must not log any round twice.
    # 30 rounds of a fraction of a second each: the kill lands mid-run even when the poll that saw round 3
    # is slow (with 6 rounds the run sometimes finished before the signal arrived).
    rounds = 30
    config = config.with_overrides({"checkpoint.every": 2, "federation.rounds": rounds})
    process = start_cli("run", *cli_args(config), "--tracking-uri", tracking_uri, "--experiment", "kill", "--quiet")
    run_id = wait_for_round(tracking_uri, process, 3)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    client = MlflowClient(tracking_uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # what a hard kill leaves
    shutil.rmtree(tmp_path / "run-state" / run_id)

    history = resume(run_id, tracking_uri)
    assert history.status == "FINISHED"
    reference = prepare(config)
    expected = run(reference, [])
    logged = client.get_run(run_id)
    assert logged.info.status == "FINISHED"
    resumed_from = int(logged.data.tags["resumed_from_round"])
    assert resumed_from % 2 == 0 and 2 <= resumed_from < rounds  # the newest round_<even> checkpoint
    assert_one_point_per_round(client, run_id, rounds, expected)
    assert_same_model(load_model(run_id, tracking_uri), reference.model)
    rows = list(csv.DictReader(open(client.download_artifacts(run_id, CLIENT_TABLE, str(tmp_path)))))
    keys = [(r["round"], r["client"]) for r in rows]
    assert len(keys) == len(set(keys)) and {int(r["round"]) for r in rows} == set(range(1, rounds + 1))


def test_sigkill_with_uploads_queued_loses_no_checkpoint(config, tracking_uri, tmp_path):
    # A slow store (every artifact upload takes 0.4 s) lets the run get rounds ahead of its uploads; a hard
    # kill then leaves their checkpoints in the local state, and the resume uploads them before going on.
    rounds = 12
    config = config.with_overrides({"federation.rounds": rounds})
    slow_store = ("import time; from mlflow.tracking import MlflowClient as C; original = C.log_artifacts; "
                  "C.log_artifacts = lambda *a, **k: (time.sleep(0.4), original(*a, **k))[1]; "
                  "from workbench.cli import main; raise SystemExit(main())")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_WAIT_POLICY": "PASSIVE"}
    process = subprocess.Popen([sys.executable, "-c", slow_store, "run", *cli_args(config), "--tracking-uri",
                                tracking_uri, "--experiment", "queued", "--quiet"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    run_id = wait_for_round(tracking_uri, process, 2)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    client = MlflowClient(tracking_uri)
    # staged for the next send, or in a send the kill interrupted
    queued = sorted({p.name for p in (tmp_path / "run-state" / run_id / UNPUBLISHED_DIR).glob("*/checkpoints/round_*")})
    uploaded = checkpoint_rounds(client, run_id)
    assert queued, "the kill should have left rounds waiting for upload"
    assert max(uploaded, default=0) < rounds

    history = resume(run_id, tracking_uri)
    assert history.status == "FINISHED"
    class EveryRound(Callback):
        states = {}

        def on_round_end(self, result, federation):
            self.states[result.round] = {k: v.clone() for k, v in federation.model.state_dict().items()}

    reference = prepare(config)
    expected = run(reference, [EveryRound()])
    assert checkpoint_rounds(client, run_id) == list(range(1, rounds + 1))  # the queued ones too
    assert_one_point_per_round(client, run_id, rounds, expected)
    assert_same_model(load_model(run_id, tracking_uri), reference.model)
    for name in queued:  # each snapshot holds its own round's model, not a later one's
        round_ = int(name.removeprefix("round_"))
        model = load_model(run_id, tracking_uri, round=round_)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in EveryRound.states[round_].items()), name
    assert not (tmp_path / "run-state" / run_id).exists()


@pytest.mark.parametrize("signum, exit_status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_end_killed_and_resumable(config, tracking_uri, signum, exit_status):
    config = config.with_overrides({"federation.rounds": 40})
    process = start_cli("run", *cli_args(config), "--tracking-uri", tracking_uri, "--experiment", "sig", "--quiet")
    run_id = wait_for_round(tracking_uri, process, 1)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == exit_status, err
    assert f"workbench resume {run_id}" in err and "KILLED" in err
    client = MlflowClient(tracking_uri)
    logged = client.get_run(run_id)
    assert logged.info.status == "KILLED"
    done = max(m.step for m in client.get_metric_history(run_id, "num_updates"))
    assert_one_point_per_round(client, run_id, done)
    assert load_model(run_id, tracking_uri, round=done) is not None  # the last round is checkpointed


def test_failed_run_ends_failed_and_resumes_to_the_uninterrupted_result(config, tracking_uri, capsys):
    class CrashOnceAtRound3(Callback):
        def on_round_end(self, result, federation):
            if result.round == 3:
                raise RuntimeError("worker lost")

    tracker = MlflowCallback(tracking_uri, experiment="fail")
    with pytest.raises(RuntimeError, match="worker lost"):
        run(config, [tracker, CrashOnceAtRound3()])
    client = MlflowClient(tracking_uri)
    assert client.get_run(tracker.run_id).info.status == "FAILED"
    assert "worker lost" in client.get_run(tracker.run_id).data.tags["error"]

    assert main(["resume", tracker.run_id, "--tracking-uri", tracking_uri, "--quiet"]) == 0
    reference = prepare(config)
    expected = run(reference, [])
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert_one_point_per_round(client, tracker.run_id, 6, expected)
    assert_same_model(load_model(tracker.run_id, tracking_uri), reference.model)

    capsys.readouterr()
    assert main(["resume", tracker.run_id, "--tracking-uri", tracking_uri]) == 2
    err = capsys.readouterr().err
    assert "already FINISHED" in err and len(err.strip().splitlines()) == 1
    assert main(["resume", "0" * 32, "--tracking-uri", tracking_uri]) == 2
    assert "no MLflow run" in capsys.readouterr().err


def test_checkpoint_upload_cut_short_is_skipped_by_resume(config, tracking_uri, tmp_path):
    # A hard kill in the middle of an upload can leave a checkpoint folder in MLflow without its weights:
    # resume (here without local state, as on another machine) starts from the newest whole one.
    class CrashAtRound3(Callback):
        def on_round_end(self, result, federation):
            if result.round == 3:
                raise RuntimeError("power cut")

    tracker = MlflowCallback(tracking_uri, experiment="cut")
    with pytest.raises(RuntimeError, match="power cut"):
        run(config, [tracker, CrashAtRound3()])
    client = MlflowClient(tracking_uri)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "model.json").write_text('{"model": "logreg", "input_shape": [60], "num_classes": 10}')
    client.log_artifacts(tracker.run_id, str(partial), "checkpoints/round_0004")
    shutil.rmtree(tmp_path / "run-state" / tracker.run_id)

    history = resume(tracker.run_id, tracking_uri)
    assert history.status == "FINISHED"
    assert client.get_run(tracker.run_id).data.tags["resumed_from_round"] == "3"
    reference = prepare(config)
    expected = run(reference, [])
    assert_one_point_per_round(client, tracker.run_id, 6, expected)
    assert_same_model(load_model(tracker.run_id, tracking_uri), reference.model)


class RunsCode:
    """A pickle payload that creates a file when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_checkpoint_crafted_to_run_code_is_refused(config, tracking_uri, tmp_path, capsys):
    marker = tmp_path / "pwned"
    tracker = MlflowCallback(tracking_uri, experiment="evil")
    stop_after = config.with_overrides({"federation.rounds": 2})
    run(stop_after, [tracker])
    client = MlflowClient(tracking_uri)
    payload = pickle.dumps({"linear.weight": RunsCode(marker)})
    assert b"touch" in payload
    # A pickle where a checkpoint should be, and a pickle disguised as safetensors.
    evil = tmp_path / "evil"
    (evil / "pickled").mkdir(parents=True)
    (evil / "pickled" / "weights.pt").write_bytes(payload)
    (evil / "disguised").mkdir()
    (evil / "disguised" / "weights.safetensors").write_bytes(payload)
    (evil / "disguised" / "model.json").write_text('{"model": "logreg", "input_shape": [60], "num_classes": 10}')
    client.log_artifacts(tracker.run_id, str(evil / "pickled"), "checkpoints/round_0007")
    client.log_artifacts(tracker.run_id, str(evil / "disguised"), "checkpoints/round_0008")
    with pytest.raises(ValueError, match="refusing to load 'weights.pt'"):
        load_model(tracker.run_id, tracking_uri, round=7)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_model(tracker.run_id, tracking_uri, round=8)
    client.set_terminated(tracker.run_id, "KILLED")  # so resume picks the newest checkpoint: round 8
    assert main(["resume", tracker.run_id, "--tracking-uri", tracking_uri, "--quiet"]) == 2
    assert "not a valid safetensors file" in capsys.readouterr().err
    assert not marker.exists()
    pickle.loads(payload)  # the payload is live: unpickling it does run code
    assert marker.exists()

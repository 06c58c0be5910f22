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
from workbench.tracking import (CLIENT_COLUMNS, CLIENT_TABLE, FLUSH_ENV, UNPUBLISHED_DIR, MlflowCallback,
                                checkpoint_rounds, client_rows, load_model, resume)

PER_ROUND = ("test_accuracy", "test_loss", "train_loss", "update_norm_mean", "client_drift_mean", "bytes_up",
             "bytes_down", "num_updates", "round_time_s")


@pytest.fixture
def config(tiny_config):
    return tiny_config.with_overrides({"federation.rounds": 6, "execution.threads": 1,
                                       "federation.straggler_fraction": 0.5, "strategy.name": "fedprox"})


def cli_args(config):
    return [arg for key, value in config.to_flat().items() for arg in ("--set", f"{key}={value}")]


def assert_one_point_per_round(client, run_id, rounds, expected=None):
    for key in PER_ROUND:
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert [step for step, _ in history] == list(range(1, rounds + 1)), key
        if expected is not None and key != "round_time_s":
            assert history == expected.metric(key), key


def assert_same_model(model, reference):
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


#: `workbench run` that holds before round HOLD_AFTER_ROUND + 1 (after creating HOLD_GATE) until the run is
#: asked to stop (SIGTERM sets the stop event; Ctrl-C interrupts the wait; SIGKILL ends it there): a signal
#: sent once the gate exists lands mid-run, however fast or slow the machine, never after the last round.
HOLD_RUN = """
import os, pathlib, time
import workbench.simulation as simulation
hold, run_round = int(os.environ["HOLD_AFTER_ROUND"]), simulation.run_round
def held(federation, executor, round_, stop=None):
    if round_ == hold + 1:
        pathlib.Path(os.environ["HOLD_GATE"]).touch()
        while stop is None or not stop.is_set():
            time.sleep(0.02)
    return run_round(federation, executor, round_, stop)
simulation.run_round = held
from workbench.cli import main
raise SystemExit(main())
"""


def start_held_cli(gate, hold_after_round, *args):
    """`workbench run ARGS` holding after `hold_after_round` rounds (HOLD_RUN); returns once it holds there."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_WAIT_POLICY": "PASSIVE", FLUSH_ENV: "0",
           "HOLD_AFTER_ROUND": str(hold_after_round), "HOLD_GATE": str(gate)}
    process = subprocess.Popen([sys.executable, "-c", HOLD_RUN, *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    wait_for_file(process, gate)
    return process


def wait_for_file(process, *paths, timeout_s=240):
    deadline = time.monotonic() + timeout_s
    while not all(Path(p).exists() for p in paths):
        assert process.poll() is None, process.communicate()
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{[str(p) for p in paths]} did not appear within {timeout_s} s")
        time.sleep(0.05)


def only_run_id(tracking_uri, experiment):
    client = MlflowClient(tracking_uri)
    (logged,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return logged.info.run_id


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(config, tracking_uri, tmp_path):
    # Checkpoints every 2 rounds and no local state (as on another machine): the resume starts from an
    # older checkpoint than the last logged round, recomputes, and must not log any round twice. The kill
    # lands while the run holds after round 5 (rounds 1-5 logged, round 5's send perhaps still going).
    rounds = 8
    config = config.with_overrides({"checkpoint.every": 2, "federation.rounds": rounds})
    process = start_held_cli(tmp_path / "held", 5, "run", *cli_args(config), "--tracking-uri", tracking_uri,
                             "--experiment", "kill", "--quiet")
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    run_id = only_run_id(tracking_uri, "kill")
    client = MlflowClient(tracking_uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # what a hard kill leaves
    shutil.rmtree(tmp_path / "run-state" / run_id)

    history = resume(run_id, tracking_uri)
    assert history.status == "FINISHED"
    reference = prepare(config)
    expected = run(reference, [])
    logged = client.get_run(run_id)
    assert logged.info.status == "FINISHED"
    # round 4's send was through before round 5's began (one send in flight): the newest round_<even>
    assert logged.data.tags["resumed_from_round"] == "4"
    assert_one_point_per_round(client, run_id, rounds, expected)
    assert_same_model(load_model(run_id, tracking_uri), reference.model)
    rows = list(csv.DictReader(open(client.download_artifacts(run_id, CLIENT_TABLE, str(tmp_path)))))
    keys = [(r["round"], r["client"]) for r in rows]
    assert len(keys) == len(set(keys)) and {int(r["round"]) for r in rows} == set(range(1, rounds + 1))


@pytest.mark.parametrize("strategy", ["fedadam", "scaffold", "dp_fedavg", "dp_fedavg+secure_aggregation"])
def test_stateful_strategies_resume_from_mlflow_alone_to_the_uninterrupted_result(config, tracking_uri, tmp_path,
                                                                                  strategy):
    """Server moments, every client's control variate and the privacy accountant come back from the
    checkpoint in MLflow (the local state deleted), two rounds older than the kill: the resumed run
    recomputes them and ends with the uninterrupted run's model and every metric (dp_epsilon included).
    Behind secure aggregation too: its masks are fresh key material every round, but they cancel exactly in
    the ring, so the numbers do not depend on them."""
    rounds = 6
    name, _, secure = strategy.partition("+")
    config = config.with_overrides({"checkpoint.every": 2, "federation.rounds": rounds, "strategy.name": name,
                                    "federation.straggler_fraction": 0.0, "strategy.noise_multiplier": 0.3,
                                    "strategy.adaptive_lr": 0.05, "strategy.secure_aggregation": bool(secure)})
    process = start_held_cli(tmp_path / "held", 3, "run", *cli_args(config), "--tracking-uri", tracking_uri,
                             "--experiment", "stateful", "--quiet")
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    run_id = only_run_id(tracking_uri, "stateful")
    shutil.rmtree(tmp_path / "run-state" / run_id)

    assert resume(run_id, tracking_uri).status == "FINISHED"
    client = MlflowClient(tracking_uri)
    assert client.get_run(run_id).data.tags["resumed_from_round"] == "2"
    reference = prepare(config)
    expected = run(reference, [])
    assert_one_point_per_round(client, run_id, rounds, expected)
    if name == "dp_fedavg":
        epsilon = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "dp_epsilon"))
        assert epsilon == expected.metric("dp_epsilon") and len(epsilon) == rounds
    assert_same_model(load_model(run_id, tracking_uri), reference.model)


#: `workbench run` on a store whose second upload of checkpoints never ends (after creating GATE): the run
#: trains on until its next send has to wait for that one, leaving checkpoints queued in its local state.
STUCK_UPLOAD = """
import os, pathlib, time
from mlflow.tracking import MlflowClient
seen, upload = [0], MlflowClient.log_artifacts
def log_artifacts(self, run_id, local_dir, artifact_path=None):
    if artifact_path == "checkpoints":
        seen[0] += 1
        if seen[0] == 2:
            pathlib.Path(os.environ["GATE"]).touch()
            time.sleep(3600)
    return upload(self, run_id, local_dir, artifact_path)
MlflowClient.log_artifacts = log_artifacts
from workbench.cli import main
raise SystemExit(main())
"""


def test_sigkill_with_uploads_queued_loses_no_checkpoint(config, tracking_uri, tmp_path):
    # Round 2's checkpoint upload never ends; round 3 trains, stages its checkpoint and waits for that send.
    # A hard kill then leaves both checkpoints in the local state, and the resume uploads them before going on.
    rounds = 6
    config = config.with_overrides({"federation.rounds": rounds})
    gate = tmp_path / "upload-stuck"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_WAIT_POLICY": "PASSIVE", FLUSH_ENV: "0", "GATE": str(gate)}
    process = subprocess.Popen([sys.executable, "-c", STUCK_UPLOAD, "run", *cli_args(config), "--tracking-uri",
                                tracking_uri, "--experiment", "queued", "--quiet"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_for_file(process, gate)
    run_id = only_run_id(tracking_uri, "queued")
    staged = tmp_path / "run-state" / run_id / UNPUBLISHED_DIR / "next" / "checkpoints" / "round_0003"
    wait_for_file(process, staged / "weights.safetensors", staged / "model.json")
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    client = MlflowClient(tracking_uri)
    # staged for the next send, or in the send the kill interrupted
    queued = sorted({p.name for p in (tmp_path / "run-state" / run_id / UNPUBLISHED_DIR).glob("*/checkpoints/round_*")})
    assert queued == ["round_0002", "round_0003"]
    assert checkpoint_rounds(client, run_id) == [1]

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


#: A store whose upload of the client table stops halfway, on the CUT_AT-th upload of a file under clients/:
#: the first half of the file is in the store (as a copy or a server's write cut short by a kill leaves
#: it), GATE is created, and the upload never returns. Every other file is stored as MLflow stores it.
CUT_TABLE_UPLOAD = """
import os, pathlib, sys, time
from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository as Repo
cut_at, seen, store_file = int(os.environ["CUT_AT"]), [0], Repo.log_artifact
def log_artifact(self, local_file, artifact_path=None):
    if (artifact_path or "").split("/")[0] == "clients":
        seen[0] += 1
        if seen[0] == cut_at:
            target = pathlib.Path(self._get_or_create_artifact_dir(artifact_path), os.path.basename(local_file))
            data = pathlib.Path(local_file).read_bytes()
            target.write_bytes(data[:len(data) // 2])
            pathlib.Path(os.environ["GATE"]).touch()
            time.sleep(3600)
    return store_file(self, local_file, artifact_path)
def log_artifacts(self, local_dir, artifact_path=None):
    for root, _, files in sorted(os.walk(local_dir)):
        relative = os.path.relpath(root, local_dir)
        folder = "/".join(p for p in (artifact_path, None if relative == "." else relative) if p) or None
        for name in sorted(files):
            log_artifact(self, os.path.join(root, name), folder)
Repo.log_artifact, Repo.log_artifacts = log_artifact, log_artifacts
from workbench.cli import main
raise SystemExit(main())
"""


def test_sigkill_during_the_client_table_upload_loses_no_row(config, tracking_uri, tmp_path):
    # The kill lands while the client table is being uploaded (the store waits for it there, no timer):
    # the store then holds a table cut in half. Resumed from MLflow alone (no local state, as on another
    # machine), the finished run's table still has every round's rows, once each, as an uninterrupted run's.
    rounds, gate = 8, tmp_path / "upload-started"
    config = config.with_overrides({"federation.rounds": rounds})
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_WAIT_POLICY": "PASSIVE", FLUSH_ENV: "0",
           "CUT_AT": "4", "GATE": str(gate)}
    process = subprocess.Popen([sys.executable, "-c", CUT_TABLE_UPLOAD, "run", *cli_args(config), "--tracking-uri",
                                tracking_uri, "--experiment", "cut-table", "--quiet"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while not gate.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the table upload was never reached"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    client = MlflowClient(tracking_uri)
    (run_id,) = [r.info.run_id for r in client.search_runs([client.get_experiment_by_name("cut-table").experiment_id])]
    shutil.rmtree(tmp_path / "run-state" / run_id)

    history = resume(run_id, tracking_uri)
    assert history.status == "FINISHED"
    rows = list(csv.reader(open(client.download_artifacts(run_id, CLIENT_TABLE, str(tmp_path / "table")))))

    class Rows(Callback):
        table = []

        def on_round_end(self, result, federation):
            self.table += [[str(cell) for cell in row] for row in client_rows(result)]

    run(prepare(config), [Rows()])
    assert rows[0] == list(CLIENT_COLUMNS)
    assert rows[1:] == Rows.table
    assert {int(r[0]) for r in rows[1:]} == set(range(1, rounds + 1))


@pytest.mark.parametrize("signum, exit_status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_end_killed_and_resumable(config, tracking_uri, tmp_path, signum, exit_status):
    process = start_held_cli(tmp_path / "held", 2, "run", *cli_args(config), "--tracking-uri", tracking_uri,
                             "--experiment", "sig", "--quiet")
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    run_id = only_run_id(tracking_uri, "sig")
    assert process.returncode == exit_status, err
    assert f"workbench resume {run_id}" in err and "KILLED" in err
    client = MlflowClient(tracking_uri)
    logged = client.get_run(run_id)
    assert logged.info.status == "KILLED"
    assert max(m.step for m in client.get_metric_history(run_id, "num_updates")) == 2
    assert_one_point_per_round(client, run_id, 2)
    assert load_model(run_id, tracking_uri, round=2) is not None  # the last round is checkpointed


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
    finished = client.get_run(tracker.run_id)
    assert finished.info.status == "FINISHED"
    # the crash is history, not the finished run's error
    assert "error" not in finished.data.tags and "worker lost" in finished.data.tags["previous_error"]
    assert finished.data.tags["resumed_from_round"] == "3"
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

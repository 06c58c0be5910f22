"""The MLflow record against a real `mlflow server` process: reachability, the full record, a server that
goes away mid-run and a resume once it is back."""

import socket

import pytest
import torch
from mlflow.tracking import MlflowClient

from workbench.cli import main
from workbench.simulation import Callback, prepare, run
from workbench.tracking import CLIENT_TABLE, MlflowCallback, TrackingUnavailable, checkpoint_rounds, load_model

TINY = ["--set", "federation.num_clients=6", "--set", "federation.clients_per_round=3",
        "--set", "federation.rounds=2", "--set", "training.local_epochs=2", "--set", "device=cpu"]


@pytest.fixture
def config(tiny_config):
    return tiny_config.with_overrides({"federation.rounds": 5, "execution.threads": 1})


def free_port_uri():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"  # nothing listens there once closed


class Rounds(Callback):
    def __init__(self):
        self.seen = []

    def on_round_end(self, result, federation):
        self.seen.append(result.round)


def test_unreachable_server_is_reported_before_any_training(config, capsys):
    uri = free_port_uri()
    status = main(["run", *TINY, "--tracking-uri", uri, "--quiet"])
    err = capsys.readouterr().err
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert uri in err and "not reachable" in err and "--tracking-uri" in err

    rounds = Rounds()
    with pytest.raises(TrackingUnavailable, match="not reachable"):
        run(config, [MlflowCallback(uri, experiment="x"), rounds])
    assert rounds.seen == []


def test_full_record_over_http(config, mlflow_server):
    tracker = MlflowCallback(mlflow_server.uri, experiment="remote-record")
    federation = prepare(config)
    run(federation, [tracker])
    client = MlflowClient(mlflow_server.uri)
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    for key in ("test_accuracy", "update_norm_mean", "client_drift_mean", "bytes_up", "bytes_down", "round_time_s"):
        assert sorted(m.step for m in client.get_metric_history(tracker.run_id, key)) == [1, 2, 3, 4, 5]
    assert checkpoint_rounds(client, tracker.run_id) == [1, 2, 3, 4, 5]
    final = load_model(tracker.run_id, mlflow_server.uri)
    last = load_model(tracker.run_id, mlflow_server.uri, round=5)
    for key, value in federation.model.state_dict().items():
        assert torch.equal(final.state_dict()[key], value) and torch.equal(last.state_dict()[key], value)
    table = client.download_artifacts(tracker.run_id, CLIENT_TABLE)
    assert len(open(table).read().splitlines()) > 1


def test_server_gone_mid_run_stops_after_the_round_and_resumes_when_back(config, mlflow_server, tmp_path,
                                                                          fast_http_failures, capsys):
    reference = prepare(config)
    expected = run(reference, [])

    class ServerDiesAfterRound2(Callback):
        def on_round_end(self, result, federation):
            if result.round == 2:
                mlflow_server.stop()

    rounds = Rounds()
    tracker = MlflowCallback(mlflow_server.uri, experiment="remote-loss", flush_every_s=0)
    try:
        with pytest.raises(TrackingUnavailable) as caught:
            run(config, [tracker, ServerDiesAfterRound2(), rounds])
    finally:
        mlflow_server.start()
    message = str(caught.value)
    # Sent every round (flush_every_s=0), in the background, one send in flight: the failure to log round
    # 2 or 3 is noticed at the end of the next round, which then stops the run (observers after the tracker
    # never see it).
    stopped_after = int(message.split("after round ")[1].split()[0])
    assert stopped_after in (3, 4) and rounds.seen == list(range(1, stopped_after))
    assert f"workbench resume {tracker.run_id}" in message and str(tmp_path / "run-state") in message
    client = MlflowClient(mlflow_server.uri)
    assert client.get_run(tracker.run_id).info.status == "RUNNING"  # the server never heard the end
    logged = sorted(m.step for m in client.get_metric_history(tracker.run_id, "test_accuracy"))
    assert logged == list(range(1, len(logged) + 1)) and len(logged) < stopped_after

    assert main(["resume", tracker.run_id, "--tracking-uri", mlflow_server.uri, "--quiet"]) == 0
    assert "resumed, FINISHED" in capsys.readouterr().out
    logged = client.get_run(tracker.run_id)
    assert logged.info.status == "FINISHED"
    assert logged.data.tags["resumed_from_round"] == str(stopped_after)  # from the local state
    for key in ("test_accuracy", "test_loss", "train_loss", "client_drift_mean", "bytes_up"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(tracker.run_id, key))
        assert history == expected.metric(key)  # every round once, round 3 from the local state
    model = load_model(tracker.run_id, mlflow_server.uri)
    for key, value in reference.model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)
    assert not (tmp_path / "run-state" / tracker.run_id).exists()  # finished: local state cleaned up

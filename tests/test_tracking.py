import pytest
import torch
from mlflow.tracking import MlflowClient

from workbench.simulation import Callback, prepare, run
from workbench.tracking import MlflowCallback, load_model


def test_every_round_logged_once_with_params_tags_and_model(tiny_config, tracking_uri):
    tracker = MlflowCallback(tracking_uri, experiment="t")
    federation = prepare(tiny_config)
    run(federation, [tracker])
    client = MlflowClient(tracking_uri)
    logged = client.get_run(tracker.run_id)
    assert logged.info.status == "FINISHED"
    assert logged.data.params["training.lr"] == "0.05"
    assert set(tiny_config.to_flat()) <= set(logged.data.params)
    assert {logged.data.tags[k] for k in ("algorithm", "dataset", "partition", "seed")} == {
        "fedavg", "synthetic", "natural", "0"}
    for key in ("test_accuracy", "test_loss", "train_loss"):
        steps = [m.step for m in client.get_metric_history(tracker.run_id, key)]
        assert sorted(steps) == [1, 2, 3]
    model = load_model(tracker.run_id, tracking_uri)
    assert type(model) is type(federation.model)
    for key, value in federation.model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)
    artifacts = {a.path for a in client.list_artifacts(tracker.run_id, "model")}
    assert artifacts == {"model/weights.safetensors", "model/model.json"}


def test_artifacts_live_beside_the_database(tiny_config, tracking_uri, tmp_path):
    tracker = MlflowCallback(tracking_uri, experiment="beside")
    run(tiny_config.with_overrides({"federation.rounds": 1}), [tracker])
    files = list((tmp_path / "mlruns" / "artifacts").rglob("weights.safetensors"))
    assert len(files) == 1


def test_failed_run_ends_failed_and_keeps_its_rounds(tiny_config, tracking_uri):
    class Crash(Callback):
        def on_round_end(self, result, federation):
            if result.round == 2:
                raise RuntimeError("disk on fire")

    tracker = MlflowCallback(tracking_uri, experiment="t")
    with pytest.raises(RuntimeError):
        run(tiny_config, [tracker, Crash()])
    client = MlflowClient(tracking_uri)
    logged = client.get_run(tracker.run_id)
    assert logged.info.status == "FAILED"
    assert "disk on fire" in logged.data.tags["error"]
    assert [m.step for m in client.get_metric_history(tracker.run_id, "test_accuracy")] == [1, 2]


def test_interrupted_run_ends_killed(tiny_config, tracking_uri):
    class CtrlC(Callback):
        def on_round_end(self, result, federation):
            raise KeyboardInterrupt

    tracker = MlflowCallback(tracking_uri, experiment="t")
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config, [tracker, CtrlC()])
    assert MlflowClient(tracking_uri).get_run(tracker.run_id).info.status == "KILLED"


def test_stopped_run_ends_killed_with_its_rounds(tiny_config, tracking_uri):
    import threading

    stop = threading.Event()

    class StopAfterOne(Callback):
        def on_round_end(self, result, federation):
            stop.set()

    tracker = MlflowCallback(tracking_uri, experiment="t")
    run(tiny_config, [tracker, StopAfterOne()], stop=stop)
    client = MlflowClient(tracking_uri)
    assert client.get_run(tracker.run_id).info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(tracker.run_id, "test_accuracy")] == [1]


def test_default_store_is_found_from_a_subfolder(tmp_path, monkeypatch):
    from workbench.tracking import default_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "mlruns").mkdir()
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    assert default_tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert default_tracking_uri() == "http://127.0.0.1:1"

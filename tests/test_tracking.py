import threading

import pytest
import torch
from mlflow.tracking import MlflowClient

from workbench.simulation import Callback, prepare, run
from workbench.tracking import CLIENT_COLUMNS, MlflowCallback, client_rows, load_model


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
    assert {"model/weights.safetensors", "model/model.json", "model/MLmodel"} <= artifacts  # + the MLflow model


def test_artifacts_live_beside_the_database(tiny_config, tracking_uri, tmp_path):
    tracker = MlflowCallback(tracking_uri, experiment="beside")
    run(tiny_config.with_overrides({"federation.rounds": 1}), [tracker])
    files = list((tmp_path / "mlruns" / "artifacts").rglob("weights.safetensors"))
    assert sorted(f.parent.name for f in files) == ["best", "model", "round_0001"]


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


def test_round_record_checkpoints_and_client_table(tiny_config, tracking_uri, tmp_path):
    import csv

    from workbench.tracking import CLIENT_TABLE, checkpoint_rounds

    config = tiny_config.with_overrides({"federation.rounds": 5, "checkpoint.every": 2,
                                         "federation.straggler_fraction": 0.5, "strategy.name": "fedprox"})
    states = {}

    class Snapshot(Callback):
        def on_round_end(self, result, federation):
            states[result.round] = {k: v.clone() for k, v in federation.model.state_dict().items()}

    tracker = MlflowCallback(tracking_uri, experiment="record")
    history = run(config, [tracker, Snapshot()])
    client = MlflowClient(tracking_uri)
    for key in ("client_accuracy_min", "client_accuracy_p10", "client_accuracy_median", "update_norm_mean",
                "client_drift_mean", "client_drift_min", "bytes_up", "bytes_down", "round_time_s"):
        assert [m.step for m in client.get_metric_history(tracker.run_id, key)] == [1, 2, 3, 4, 5], key
    # logistic regression 60 -> 10 in float32: 610 numbers of 4 bytes; 4 sampled, all kept by FedProx
    assert history.metric("bytes_down")[0][1] == 4 * 610 * 4 == history.metric("bytes_up")[0][1]
    assert all(-1 <= v <= 1 for _, v in history.metric("client_drift_min"))
    # checkpoints every 2 rounds, plus the last; the best by test accuracy
    assert checkpoint_rounds(client, tracker.run_id) == [2, 4, 5]
    for round_ in (2, 4, 5):
        model = load_model(tracker.run_id, tracking_uri, round=round_)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in states[round_].items())
    best_round = max(history.metric("test_accuracy"), key=lambda p: p[1])[0]
    assert client.get_run(tracker.run_id).data.tags["best_round"] == str(best_round)
    best = load_model(tracker.run_id, tracking_uri, round="best")
    assert all(torch.equal(best.state_dict()[k], v) for k, v in states[best_round].items())
    with pytest.raises(ValueError, match=r"round=3 has no checkpoint .* \[2, 4, 5\]"):
        load_model(tracker.run_id, tracking_uri, round=3)
    # one bounded table: a row per round and client that trained or was evaluated, nothing else
    rows = list(csv.DictReader(open(client.download_artifacts(tracker.run_id, CLIENT_TABLE, str(tmp_path)))))
    assert len(rows) <= 5 * config.federation.num_clients
    for result in history.rounds:
        mine = {int(r["client"]): r for r in rows if int(r["round"]) == result.round}
        assert {c for c, r in mine.items() if r["is_sampled"] == "1"} == set(result.sampled)
        for client_id, values in result.client_metrics.items():
            assert float(mine[client_id]["drift"]) == pytest.approx(values["drift"])
            assert float(mine[client_id]["update_norm"]) == pytest.approx(values["update_norm"])
            assert float(mine[client_id]["local_train_loss"]) == pytest.approx(values["local_train_loss"])
        for client_id, accuracy in result.client_accuracy.items():
            assert float(mine[client_id]["test_accuracy"]) == pytest.approx(accuracy)
        assert result.client_train_loss and set(result.client_train_loss) <= set(mine)
        for client_id, loss in result.client_train_loss.items():
            assert float(mine[client_id]["train_loss"]) == pytest.approx(loss)
    metric_keys = client.get_run(tracker.run_id).data.metrics
    assert not any(str(c) in key.split("_") for key in metric_keys for c in range(8))  # no per-client keys


def test_rounds_are_sent_together_but_logged_once_each(tiny_config, tracking_uri, monkeypatch):
    # Short rounds go to MLflow together (a store write costs as much as a small model's round), yet
    # each metric has exactly one point per round and every round's checkpoint arrives.
    from workbench.tracking import checkpoint_rounds

    rounds = 6
    tracker = MlflowCallback(tracking_uri, experiment="coalesced", flush_every_s=3600)
    sent_steps = []
    log_batch = tracker.client.log_batch

    def recording_log_batch(run_id, metrics=(), **kwargs):
        sent_steps.append(sorted({m.step for m in metrics}))
        return log_batch(run_id, metrics=metrics, **kwargs)

    monkeypatch.setattr(tracker.client, "log_batch", recording_log_batch)
    run(tiny_config.with_overrides({"federation.rounds": rounds}), [tracker])
    # params first (the partition's statistics among them), without metrics; then all rounds at once
    assert [steps for steps in sent_steps if steps] == [list(range(1, rounds + 1))]
    client = MlflowClient(tracking_uri)
    for key in ("test_accuracy", "train_loss", "round_time_s"):
        assert sorted(m.step for m in client.get_metric_history(tracker.run_id, key)) == list(range(1, rounds + 1))
    assert checkpoint_rounds(client, tracker.run_id) == list(range(1, rounds + 1))


def test_bad_flush_interval_is_a_usage_error(monkeypatch, tracking_uri, capsys):
    from workbench.cli import main

    monkeypatch.setenv("WORKBENCH_FLUSH_EVERY_S", "soon")
    assert main(["run", "--set", "federation.rounds=1", "--tracking-uri", tracking_uri, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "WORKBENCH_FLUSH_EVERY_S='soon'" in err and ">= 0" in err and len(err.strip().splitlines()) == 1


def test_client_table_parts_merge_newest_complete_part_per_round():
    from workbench.tracking.record import client_part_name, merge_client_parts

    header = ",".join(CLIENT_COLUMNS)

    def part(*rows):
        return "\n".join([header, *(",".join([str(r), str(c)] + ["1"] * (len(CLIENT_COLUMNS) - 2))
                                      for r, c in rows)]) + "\n"

    first = part((1, 0), (1, 1), (2, 0))
    resent = part((2, 5))  # a resume recomputed round 2 (different clients)
    cut = part((3, 0), (3, 1))[:-15]  # a kill cut its upload short: one row and a half
    merged = merge_client_parts({client_part_name(1, 1, 3): first, client_part_name(2, 1, 1): resent,
                                 client_part_name(2, 2, 2): cut, "notes.txt": "ignored"})
    assert [(r[0], r[1]) for r in merged] == [("1", "0"), ("1", "1"), ("2", "5")]
    # the part numbers order parts, not the names' text: part 10 comes after part 9
    later = merge_client_parts({client_part_name(1, 9, 1): part((4, 0)), client_part_name(1, 10, 1): part((4, 7))})
    assert [(r[0], r[1]) for r in later] == [("4", "7")]


def test_a_killed_runs_client_table_is_read_from_its_parts(tiny_config, tracking_uri):
    from workbench.tracking import CLIENT_PARTS_DIR, CLIENT_TABLE, load_client_table

    stop = threading.Event()

    class StopAtThree(Callback):
        rows = []

        def on_round_end(self, result, federation):
            self.rows += client_rows(result)
            if result.round == 3:
                stop.set()

    tracker = MlflowCallback(tracking_uri, experiment="parts", flush_every_s=0)
    history = run(tiny_config.with_overrides({"federation.rounds": 6}), [tracker, StopAtThree()], stop=stop)
    assert history.status == "KILLED"
    client = MlflowClient(tracking_uri)
    names = {a.path for a in client.list_artifacts(tracker.run_id, "clients")}
    assert CLIENT_TABLE not in names and CLIENT_PARTS_DIR in names  # no whole table until it finishes
    assert len(client.list_artifacts(tracker.run_id, CLIENT_PARTS_DIR)) == 3  # one part per send
    table = load_client_table(tracker.run_id, tracking_uri)
    assert list(table.columns) == list(CLIENT_COLUMNS)
    expected = [[-1.0 if cell == "" else float(cell) for cell in row] for row in StopAtThree.rows]
    assert table.fillna(-1.0).values.tolist() == expected
    assert sorted(set(table["round"])) == [1, 2, 3]

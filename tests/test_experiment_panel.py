"""The experiment panel, driven through its widgets and buttons as a user would (no browser: see
test_browser.py for that), against a real MLflow store."""

from __future__ import annotations

import html
import time

import ipywidgets as widgets
import pytest
from mlflow.tracking import MlflowClient

from workbench.config import SUM_STRATEGIES, knobs
from workbench.ui import CompareView, ExperimentPanel
from workbench.ui.experiment_panel import applies, field_of_error

PNG_MAGIC = b"\x89PNG"


@pytest.fixture
def tiny_config(tiny_config):
    """conftest's tiny config with a seed whose 8 synthetic clients hold ~600 samples in all (other
    seeds draw a client of thousands from the lognormal sizes): rounds take milliseconds."""
    return tiny_config.with_overrides({"seed": 57})


@pytest.fixture(autouse=True)
def _local_state(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_STATE_DIR", str(tmp_path / "state"))


def wait_until(predicate, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def hold_after_round(monkeypatch):
    """`hold_after_round(n)`: the panel's next run waits after round n until Stop is pressed, so that Stop
    lands mid-run however fast the rounds are (the run itself waits for it; no timer races the work)."""
    from workbench.simulation import Callback
    from workbench.ui import experiment_panel

    def hold(round_: int) -> None:
        class Hold(Callback):
            def __init__(self, stop):
                self.stop = stop

            def on_round_end(self, result, federation):
                if result.round == round_:
                    assert self.stop.wait(60), "Stop was not pressed"

        original = experiment_panel.run

        def held_once(federation, callbacks, stop=None, **kwargs):
            monkeypatch.setattr(experiment_panel, "run", original)
            return original(federation, [*callbacks, Hold(stop)], stop=stop, **kwargs)

        monkeypatch.setattr(experiment_panel, "run", held_once)

    return hold


def shown(widget: widgets.HTML) -> str:
    """The text an HTML widget shows."""
    return html.unescape(widget.value)


def steps(client: MlflowClient, run_id: str, metric: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, metric))


def test_controls_are_generated_from_every_config_knob(tiny_config, tracking_uri):
    panel = ExperimentPanel(tiny_config, tracking_uri=tracking_uri)
    every = {k.key: k for k in knobs()}
    assert set(panel.controls) == set(every)
    flat = tiny_config.to_flat()
    for key, control in panel.controls.items():
        assert control.value == flat[key], key
        if every[key].choices is not None:
            assert isinstance(control, widgets.Dropdown) and list(control.options) == list(every[key].choices)
        assert every[key].help in control.tooltip
    assert panel.validate() == tiny_config
    assert not panel.run_button.disabled


def test_knobs_that_do_not_apply_are_disabled_not_hidden(tiny_config, tracking_uri):
    panel = ExperimentPanel(tiny_config, tracking_uri=tracking_uri)
    assert panel.controls["strategy.mu"].disabled  # fedavg has no proximal term
    panel.controls["strategy.name"].value = "fedprox"
    assert not panel.controls["strategy.mu"].disabled
    assert panel.controls["partition.alpha"].disabled  # the natural partition has no alpha
    panel.controls["partition.scheme"].value = "dirichlet"
    assert not panel.controls["partition.alpha"].disabled and panel.controls["partition.shards_per_client"].disabled
    assert not panel.controls["partition.min_size"].disabled  # every scheme uses it
    assert applies("partition.alpha", {"partition.scheme": "dirichlet"})
    assert not applies("partition.alpha", {"partition.scheme": "iid"})


def test_every_strategy_knob_is_editable_exactly_under_the_strategies_that_use_it(tiny_config, tracking_uri):
    """The server optimizers' eta, SCAFFOLD's eta_g, Krum's f, DP's C and z, secure aggregation, privacy.*: each is greyed out
    unless the chosen strategy uses it (as the config's `Knob.used_by` says), and attack.* always applies."""
    panel = ExperimentPanel(tiny_config, tracking_uri=tracking_uri)
    expected = {"fedadam": {"adaptive_lr", "beta1", "beta2", "tau"}, "fedadagrad": {"adaptive_lr", "beta1", "tau"},
                "scaffold": {"server_lr"}, "fedavgm": {"server_lr", "server_momentum"},
                "krum": {"num_byzantine"}, "multi_krum": {"num_byzantine", "num_selected"},
                "trimmed_mean": {"trim_fraction"}, "median": set(), "fednova": set(),
                "dp_fedavg": {"clip_norm", "noise_multiplier", "privacy.delta", "privacy.target_epsilon"}}
    # secure aggregation's knobs under every sum-based strategy; the membership audit under every strategy
    secure = {"secure_aggregation", "secagg_threshold", "secagg_scale_bits"}
    audit = {"privacy.audit", "privacy.audit_client", "privacy.audit_samples"}
    expected = {name: keys | audit | (secure if name in SUM_STRATEGIES else set()) for name, keys in expected.items()}
    strategy_keys = [k for k in panel.controls if k.startswith(("strategy.", "privacy.")) and k != "strategy.name"]
    for name, editable in expected.items():
        panel.controls["strategy.name"].value = name
        enabled = {k.removeprefix("strategy.") for k in strategy_keys if not panel.controls[k].disabled}
        assert enabled == editable, name
        assert not panel.controls["attack.fraction"].disabled and not panel.controls["training.momentum"].disabled


def test_a_bad_value_is_shown_at_its_control_and_blocks_run(tiny_config, tracking_uri):
    panel = ExperimentPanel(tiny_config, tracking_uri=tracking_uri)
    panel.controls["data.name"].value = "digits"
    panel.controls["partition.scheme"].value = "dirichlet"
    panel.controls["partition.alpha"].value = -0.5
    error = panel.errors["partition.alpha"]
    assert "partition.alpha must be > 0.0, got -0.5" in shown(error) and error.layout.display is None
    assert panel.errors["training.lr"].value == ""
    assert panel.run_button.disabled and panel.validate() is None
    assert panel.start() is False and not panel.is_running
    panel.controls["partition.alpha"].value = 0.3
    assert error.value == "" and error.layout.display == "none" and not panel.run_button.disabled

    # A rule across two fields lands at the field the message names first.
    panel.controls["federation.clients_per_round"].value = 50
    assert "federation.clients_per_round must be <= federation.num_clients" in \
        shown(panel.errors["federation.clients_per_round"])
    assert panel.errors["federation.num_clients"].value == ""


def test_an_error_found_only_when_building_the_experiment_is_shown_at_its_control(tiny_config, tracking_uri):
    panel = ExperimentPanel(tiny_config.with_overrides({"data.name": "digits", "partition.scheme": "natural"}),
                            tracking_uri=tracking_uri, experiment="prepare-error")
    assert panel.validate() is not None  # each value is fine on its own
    panel.run_button.click()
    panel.wait(60)
    assert "needs a dataset with real clients" in shown(panel.errors["partition.scheme"])
    assert "not started" in panel.status.value and panel.history.status == "FAILED"
    assert panel.run_id is None
    assert MlflowClient(tracking_uri).get_experiment_by_name("prepare-error") is None
    assert not panel.run_button.disabled and panel.stop_button.disabled


def test_run_trains_in_the_background_logs_to_mlflow_and_draws_every_round(tiny_config, tracking_uri):
    config = tiny_config.with_overrides({"federation.rounds": 4})
    panel = ExperimentPanel(config, tracking_uri=tracking_uri, experiment="panel-run", min_redraw_s=0.0)
    panel.run_button.click()
    assert panel.is_running and panel.run_button.disabled and not panel.stop_button.disabled
    assert all(c.disabled for c in panel.controls.values())  # no editing the config of a running run
    assert panel.start() is False  # one run at a time
    history = panel.wait(120)
    assert not panel.is_running and history.status == "FINISHED"
    assert [r.round for r in history.rounds] == [1, 2, 3, 4]
    assert panel.progress.value == 4 == panel.progress.max and panel.progress.bar_style == "success"
    assert bytes(panel.plot.value).startswith(PNG_MAGIC)
    assert "live view up to round 4" in panel.plot_caption.value and len(panel.update_lag_s) >= 1
    assert panel.figure().axes[0].get_lines()[0].get_xdata().tolist() == [1, 2, 3, 4]
    assert panel.run_id and panel.run_id[:8] in panel.status.value and "FINISHED" in panel.status.value
    client = MlflowClient(tracking_uri)
    logged = client.get_run(panel.run_id)
    assert logged.info.status == "FINISHED"
    assert logged.data.params["federation.rounds"] == "4"
    assert steps(client, panel.run_id, "test_accuracy") == [1, 2, 3, 4]
    assert [v for _, v in history.metric("test_accuracy")] == \
        [m.value for m in sorted(client.get_metric_history(panel.run_id, "test_accuracy"), key=lambda m: m.step)]
    assert not panel.run_button.disabled and panel.stop_button.disabled
    assert not any(panel.controls[k].disabled for k in ("seed", "training.lr"))


def test_stop_ends_the_run_killed_and_keeps_its_rounds(tiny_config, tracking_uri, hold_after_round):
    config = tiny_config.with_overrides({"federation.rounds": 10_000})
    hold_after_round(2)
    panel = ExperimentPanel(config, tracking_uri=tracking_uri, experiment="panel-stop")
    panel.run_button.click()
    wait_until(lambda: len(panel.history.rounds) >= 2)
    panel.stop_button.click()
    history = panel.wait(60)
    assert not panel.is_running and history.status == "KILLED"
    done = len(history.rounds)
    assert done == 2  # ended within the round after Stop: before any client of round 3 trained
    assert "KILLED" in panel.status.value and f"{done} rounds logged" in panel.status.value
    assert panel.progress.bar_style == "warning"
    client = MlflowClient(tracking_uri)
    assert client.get_run(panel.run_id).info.status == "KILLED"
    assert steps(client, panel.run_id, "test_accuracy") == list(range(1, done + 1))


def test_compare_view_overlays_the_runs_of_an_experiment(tiny_config, tracking_uri):
    panel = ExperimentPanel(tiny_config, tracking_uri=tracking_uri, experiment="cmp")
    run_ids = []
    for strategy in ("fedavg", "fedprox"):
        panel.controls["strategy.name"].value = strategy
        panel.run_button.click()
        assert panel.wait(120).status == "FINISHED"
        run_ids.append(panel.run_id)
    view = CompareView("cmp", tracking_uri=tracking_uri)
    assert set(view.runs.value) == set(run_ids) and len(view.runs.options) == 2
    assert any("fedprox" in label for label, _ in view.runs.options)
    assert set(view.metrics.value) == {"test_accuracy", "test_loss"}
    assert bytes(view.plot.value).startswith(PNG_MAGIC)
    assert "compare-runs" in view.link.value and all(r in view.link.value for r in run_ids)
    figure = view.figure()
    lines = figure.axes[0].get_lines()
    assert len(lines) == 2 and all(list(line.get_xdata()) == [1, 2, 3] for line in lines)
    view.runs.value = (run_ids[0],)
    assert len(view.figure().axes[0].get_lines()) == 1
    assert run_ids[0] in view.link.value and "runs/" in view.link.value

    empty = CompareView("no-such-experiment", tracking_uri=tracking_uri)
    assert empty.runs.options == () and "no runs" in empty.link.value


def test_field_of_error_picks_the_field_named_first():
    keys = [k.key for k in knobs()]
    assert field_of_error("partition.alpha must be > 0.0, got -0.5", keys) == "partition.alpha"
    assert field_of_error("federation.num_clients=30, but data.name=digits has 1", keys) == \
        "federation.num_clients"
    assert field_of_error("partition.scheme='natural' needs a dataset with real clients", keys) == \
        "partition.scheme"
    assert field_of_error("data.alpha must be >= 0.0", keys) == "data.alpha"
    assert field_of_error("out of memory", keys) is None


def test_resume_continues_a_stopped_run_in_the_same_mlflow_run(tiny_config, tracking_uri, hold_after_round):
    config = tiny_config.with_overrides({"federation.rounds": 6})
    hold_after_round(2)
    panel = ExperimentPanel(config, tracking_uri=tracking_uri, experiment="panel-resume")
    assert panel.resume_button.disabled and panel.resume() is False
    panel.run_button.click()
    wait_until(lambda: len(panel.history.rounds) >= 2)
    panel.stop_button.click()
    assert panel.wait(60).status == "KILLED"
    run_id, done = panel.run_id, len(panel.history.rounds)
    assert not panel.resume_button.disabled
    panel.resume_button.click()
    history = panel.wait(120)
    assert history.status == "FINISHED" and panel.run_id == run_id
    assert [r.round for r in history.rounds] == [1, 2, 3, 4, 5, 6] and panel.progress.value == 6
    client = MlflowClient(tracking_uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert steps(client, run_id, "test_accuracy") == [1, 2, 3, 4, 5, 6]
    assert done == 2 and panel.resume_button.disabled

    # The same numbers as a run that was never stopped.
    straight = ExperimentPanel(config, tracking_uri=tracking_uri, experiment="panel-resume")
    straight.run_button.click()
    assert straight.wait(120).metric("test_accuracy") == history.metric("test_accuracy")

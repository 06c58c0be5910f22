"""The leakage explorer, driven through its own widgets as a user would: it shows what `leakage_report` finds
for the run, round, client, defense and attack picked, from configs in the notebook or runs in MLflow, and
`plot_reconstructions` draws real samples above their reconstructions."""

import re

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from workbench.config import ExperimentConfig
from workbench.plots import format_number, plot_reconstructions
from workbench.privacy import leakage_report
from workbench.simulation import run, sample_round
from workbench.tracking import MlflowCallback, load_model
from workbench.ui import LeakageExplorer

PNG = b"\x89PNG\r\n\x1a\n"
#: digits with 100 clients of about 14 samples each, one sample per step: an attack inverts a client's
#: 14 small images in well under a second, and the 3 clients of a round stay under max_samples together.
SMALL = {"data.name": "digits", "model.name": "logreg", "federation.num_clients": 100,
         "federation.clients_per_round": 3, "federation.rounds": 2, "training.local_epochs": 1,
         "training.batch_size": 1, "device": "cpu", "execution.executor": "sequential"}


def shown_quality(explorer: LeakageExplorer) -> dict[str, tuple[str, str]]:
    """The table's cells as a user reads them: {measure: (attack, mean image)}."""
    return {name: (attack, baseline) for name, attack, baseline in re.findall(
        r"<code>(\w+)</code></td><td class='attack'[^>]*>([^<]*)</td><td class='baseline'[^>]*>([^<]*)</td>",
        explorer.table.value)}


def test_it_shows_what_leakage_report_finds_for_the_settings_picked(one_thread):
    config = ExperimentConfig().with_overrides(SMALL)
    explorer = LeakageExplorer(runs={"digits": config})
    assert explorer.error == "" and explorer.round_slider.max == 2
    # the client picked at first is the first one sampled in round 1: its update exists
    assert explorer.client_picker.value == int(sample_round(config, 1)[0][0])
    explorer.round_slider.value = 2
    sampled = [int(c) for c in sample_round(config, 2)[0]]
    assert explorer.client_picker.value == sampled[0]
    explorer.client_picker.value = sampled[1]
    direct = leakage_report(config, 2, sampled[1], defense="none", attack="idlg")
    assert explorer.error == "" and explorer.report.quality == direct.quality
    shown = shown_quality(explorer)
    assert set(shown) == set(direct.quality)
    for name, value in direct.quality.items():
        baseline = format_number(direct.baseline[name]) if name in direct.baseline else "n/a"
        assert shown[name] == (format_number(value), baseline)
    k = len(direct.real_inputs)
    geometry = {ax.get_subplotspec().get_geometry()[:2] for ax in explorer.reconstruction_figure.axes}
    assert len(explorer.reconstruction_figure.axes) == 2 * k and geometry == {(2, k)}
    assert bytes(explorer.image.value).startswith(PNG)
    assert "n/a" in explorer.accuracy.value and explorer.run_accuracy is None
    assert re.search(r"the attack took \d+\.\d\d s", explorer.status.value)

    explorer.defense_picker.value = "secure_aggregation"
    secure = leakage_report(config, 2, sampled[1], defense="secure_aggregation", attack="idlg")
    assert explorer.report.quality == secure.quality
    # the cohort's aggregate hides this client's samples among 3 clients' (17.05 dB alone, 9.97 behind it)
    assert float(shown_quality(explorer)["psnr"][0]) < float(shown["psnr"][0])

    assert explorer.noise_slider.layout.display == "none"
    explorer.noise_slider.value = 0.5  # z means nothing to secure aggregation: the same report, from the cache
    assert explorer.is_cached and explorer.report.quality == secure.quality
    explorer.defense_picker.value = "dp"
    assert explorer.noise_slider.layout.display is None and not explorer.is_cached
    noisy = leakage_report(config, 2, sampled[1], defense="dp", noise_multiplier=0.5, attack="idlg")
    assert explorer.report.quality == noisy.quality

    # flipping back is instant: the report computed before, from the cache
    explorer.defense_picker.value = "none"
    assert explorer.is_cached and "from the cache" in explorer.status.value
    assert explorer.report.quality == direct.quality


def test_a_failure_shows_in_the_status_line_and_keeps_the_last_result(one_thread):
    config = ExperimentConfig().with_overrides(SMALL)
    scaffold = config.with_overrides({"strategy.name": "scaffold"})
    explorer = LeakageExplorer(runs={"digits": config, "scaffold": scaffold})
    shown, table = explorer.report, explorer.table.value
    # only the round's sampled clients are offered: the others sent nothing to attack
    assert list(explorer.client_picker.options) == [(str(c), c) for c in sample_round(config, 1)[0]]
    explorer.run_picker.value = "scaffold"  # the attack refuses SCAFFOLD's corrected steps
    assert "SCAFFOLD" in explorer.error and "not supported" in explorer.error
    assert "⚠" in explorer.status.value
    assert explorer.report is shown and explorer.table.value == table
    explorer.run_picker.value = "digits"
    assert explorer.error == "" and explorer.is_cached
    with pytest.raises(TypeError, match=r"runs\['digits'\] must be an ExperimentConfig"):
        LeakageExplorer(runs={"digits": SMALL})


def test_an_mlflow_run_shows_its_rounds_and_logged_accuracy(tracking_uri, one_thread):
    empty = LeakageExplorer(tracking_uri, "leaks")
    assert "no runs in MLflow experiment 'leaks'" in empty.error and empty.report is None
    config = ExperimentConfig().with_overrides(SMALL)
    tracker = MlflowCallback(tracking_uri, experiment="leaks")
    run(config, [tracker])
    explorer = LeakageExplorer(tracking_uri, "leaks")
    assert explorer.run_picker.value == tracker.run_id and tracker.run_id[:8] in explorer.run_picker.label
    assert explorer.round_slider.max == 2 and explorer.error == ""
    logged = {m.step: m.value for m in MlflowClient(tracking_uri).get_metric_history(tracker.run_id,
                                                                                     "test_accuracy")}
    assert explorer.run_accuracy == logged[1] and f"{logged[1]:.4f}" in explorer.accuracy.value
    explorer.round_slider.value = 2
    assert explorer.run_accuracy == logged[2] and f"{logged[2]:.4f}" in explorer.accuracy.value
    # round 2 starts from the checkpoint of round 1, which the run logged
    client = explorer.client_picker.value
    start = load_model(tracker.run_id, tracking_uri, round=1).state_dict()
    direct = leakage_report(config, 2, client, global_state=start)
    assert explorer.error == "" and explorer.report.quality == direct.quality


def test_plot_reconstructions_draws_images_in_two_rows_and_feature_rows_per_sample():
    rng = np.random.default_rng(3)
    images = rng.random((3, 1, 8, 8))
    figure = plot_reconstructions(images, images[::-1], [4, 7, 1], [4, 2, 1], title="three digits")
    assert len(figure.axes) == 6
    assert {ax.get_subplotspec().get_geometry()[:2] for ax in figure.axes} == {(2, 3)}
    assert [ax.get_title() for ax in figure.axes] == ["true 4", "true 7", "true 1",
                                                      "recovered 4", "recovered 2", "recovered 1"]
    assert figure.axes[4].title.get_color() != figure.axes[3].title.get_color()  # a wrong label stands out
    # each pair on the real sample's grey scale: a reconstruction equal to it looks the same
    first = figure.axes[0].images[0].get_array()
    assert np.allclose(first, (images[0, 0] - images[0].min()) / (images[0].max() - images[0].min()))

    many = rng.random((20, 1, 8, 8))  # beyond max_columns the pairs of rows wrap
    wrapped = plot_reconstructions(many, many, range(20), range(20), max_columns=8)
    assert len(wrapped.axes) == 40
    assert {ax.get_subplotspec().get_geometry()[:2] for ax in wrapped.axes} == {(6, 8)}

    rows = rng.standard_normal((4, 12))
    bars = plot_reconstructions(rows, 0.5 * rows, [0, 1, 0, 1], [0, 1, 1, 1])
    assert len(bars.axes) == 4 and all(len(ax.patches) == 24 for ax in bars.axes)  # a bar pair per feature
    assert bars.axes[2].get_title(loc="left") == "sample 2: true 0 · recovered 1"
    assert np.allclose([p.get_height() for p in bars.axes[1].patches[:12]], rows[1])
    wide = plot_reconstructions(rng.standard_normal((10, 60)), rng.standard_normal((10, 60)), [0] * 10, [1] * 10)
    assert len(wide.axes) == 2 and all(ax.images[0].get_array().shape == (10, 60) for ax in wide.axes)
    assert [ax.get_title() for ax in wide.axes] == ["real", "reconstructed"]
    with pytest.raises(ValueError, match="one shape"):
        plot_reconstructions(images, rows, [0, 1, 2], [0, 1, 2])

"""The leakage explorer: pick a run, a round, a client, a defense and an attack, and see what a server
could reconstruct of that client's samples from its update (`workbench.privacy.leakage_report`)."""

from __future__ import annotations

import html
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import ipywidgets as widgets
from matplotlib.figure import Figure

from workbench import privacy, tracking
from workbench.config import ExperimentConfig
from workbench.plots import format_number, plot_reconstructions, to_png
from workbench.simulation import sample_round

if TYPE_CHECKING:
    import torch

    from workbench.privacy.replay import LeakageReport

#: The noise multipliers the dp defense's slider spans (z; the std of the noise is z times the clip norm).
NOISE_RANGE = (0.0, 4.0, 0.05)
#: What each quality measure says, and which way is a closer reconstruction.
MEASURES = {
    "psnr": "peak signal-to-noise ratio in dB (higher: closer to the real images)",
    "ssim": "structural similarity, Wang et al. 2004 (1: identical)",
    "feature_mae": "mean absolute error over the features (lower: closer)",
    # a multiset count (`privacy.quality.label_accuracy`): the figure's red titles, pair by pair, can differ
    "label_accuracy": "share of the labels recovered, counted as a multiset (the mean image recovers none)",
}
_ERROR_STYLE = "color:#b00020"


@dataclass(frozen=True)
class _Run:
    """One entry of the run picker: its config (None until an MLflow run's params are read) and the MLflow
    run it came from (None: held in the notebook)."""

    label: str
    config: ExperimentConfig | None = None
    run_id: str | None = None


class LeakageExplorer(widgets.VBox):
    """Replay one client's update of one round of a run and show what a gradient-inversion attack recovers
    from it, under a defense, beside what the mean training image alone gives away.

    Runs come from an MLflow experiment (`tracking_uri`, `experiment`) or, with `runs={label: config}`, from
    configs held in the notebook; `num_iterations` sets the attack's iterations (fewer: faster and weaker).
    Each change recomputes (sliders only on release); every result is kept,
    so returning to settings seen before is instant.

    After each update: `report` (the `LeakageReport` shown, or None), `reconstruction_figure`,
    `run_accuracy` (the run's logged test accuracy at the round, None when it has none), `error` (the message
    shown when the attack could not run, else ""), `last_update_s` and `is_cached` (whether the report came
    from the cache).
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str = tracking.DEFAULT_EXPERIMENT, *,
                 runs: Mapping[str, ExperimentConfig] | None = None, num_iterations: int | None = None):
        self.experiment = experiment
        #: the attack's iterations (None: the attack's default, `reconstruction.DEFAULT_ITERATIONS`)
        self.num_iterations = num_iterations
        self.tracking_uri: str | None = None
        if runs is not None:
            for label, config in runs.items():
                if not isinstance(config, ExperimentConfig):
                    raise TypeError(f"runs[{label!r}] must be an ExperimentConfig, got {type(config).__name__} "
                                    f"(build one with ExperimentConfig().with_overrides({{...}}))")
            self._runs = {label: _Run(label, config=config) for label, config in runs.items()}
        else:
            self.tracking_uri = tracking_uri or tracking.default_tracking_uri()
            self._runs = self._mlflow_runs()
        self.report: LeakageReport | None = None
        self.reconstruction_figure: Figure | None = None
        self.run_accuracy: float | None = None
        self.error = ""
        self.is_cached = False
        self.last_update_s = 0.0
        self._cache: dict[tuple, tuple[LeakageReport, Figure, bytes]] = {}
        self._accuracies: dict[str, dict[int, float]] = {}
        self._checkpoints: dict[str, list[int]] = {}
        self._is_quiet = False
        self._client_is_chosen = False

        common = {"style": {"description_width": "90px"}, "layout": widgets.Layout(width="360px")}
        self.run_picker = widgets.Dropdown(options=[(r.label, key) for key, r in self._runs.items()],
                                           description="run", **common)
        self.round_slider = widgets.IntSlider(value=1, min=1, max=1, description="round",
                                              continuous_update=False, **common)
        self.client_picker = widgets.Dropdown(options=[0], value=0, description="client",
                                              tooltip="the clients sampled in the round", **common)
        self.defense_picker = widgets.Dropdown(options=list(privacy.DEFENSES), value="none",
                                               description="defense", **common)
        low, high, step = NOISE_RANGE
        self.noise_slider = widgets.FloatSlider(value=1.0, min=low, max=high, step=step, description="noise z",
                                                continuous_update=False, readout_format=".2f",
                                                tooltip="dp: noise std = z x the clip norm", **common)
        self.noise_slider.layout.display = "none"
        # `privacy.ATTACKS`: DLG (Zhu et al. 2019), iDLG (Zhao et al. 2020), Geiping et al. (2020); iDLG first
        # shown, as the cheapest (its labels come from the update, no search over them).
        self.attack_picker = widgets.Dropdown(options=list(privacy.ATTACKS), value="idlg", description="attack",
                                              **common)
        self.status = widgets.HTML()
        self.image = widgets.Image(format="png", layout=widgets.Layout(max_width="980px", display="none"))
        self.table = widgets.HTML()
        self.accuracy = widgets.HTML()
        controls = widgets.HBox([
            widgets.VBox([self.run_picker, self.round_slider, self.client_picker]),
            widgets.VBox([self.defense_picker, self.noise_slider, self.attack_picker]),
        ])
        super().__init__([controls, self.status, self.image,
                          widgets.HBox([self.table, self.accuracy],
                                       layout=widgets.Layout(align_items="flex-start"))])
        self.run_picker.observe(self._on_run, names="value")
        self.round_slider.observe(self._on_round, names="value")
        self.client_picker.observe(self._on_client, names="value")
        for control in (self.defense_picker, self.noise_slider, self.attack_picker):
            control.observe(self._on_change, names="value")
        if not self._runs:
            self.error = (f"no runs in MLflow experiment {experiment!r} at {self.tracking_uri}: run one, or "
                          f"pass runs={{label: config}}")
            self.status.value = html.escape(self.error)
            for control in (self.run_picker, self.round_slider, self.client_picker):
                control.disabled = True
            return
        if self._select_run():
            self.update()

    # ----- the runs -----

    def _mlflow_runs(self) -> dict[str, _Run]:
        return {entry["run_id"]: _Run(f"{entry['name']} · {entry['run_id'][:8]}", run_id=entry["run_id"])
                for entry in tracking.list_runs(self.experiment, self.tracking_uri)}

    @property
    def run(self) -> _Run:
        return self._runs[self.run_picker.value]

    @property
    def config(self) -> ExperimentConfig:
        """The config of the run picked (an MLflow run's from its params, read when first picked)."""
        run = self.run
        if run.config is None:
            params = tracking.open_client(self.tracking_uri).get_run(run.run_id).data.params
            run = self._runs[self.run_picker.value] = _Run(run.label, tracking.config_from_params(params),
                                                           run.run_id)
        return run.config

    def _select_run(self) -> bool:
        """Fit the round slider and the client picker to the run picked (round 1, its first sampled client);
        False, with the reason in the status line, when its config cannot be read."""
        self._is_quiet = True
        try:
            rounds = self.config.federation.rounds
            self.round_slider.max = rounds
            self.round_slider.value = 1
            self._client_is_chosen = False
            self._set_clients()
        except (ValueError, TypeError) as err:  # a run logged by another version, or with an unknown model
            self._show_error(f"run {self.run.label} cannot be replayed: {type(err).__name__}: {err}")
            return False
        finally:
            self._is_quiet = False
        for control in (self.round_slider, self.client_picker):
            control.disabled = False
        return True

    def _set_clients(self) -> None:
        """The client picker's options for the round: its sampled clients, the only ones that can have sent
        an update (a federation of thousands of clients lists ten, not thousands); the first is picked unless
        the user chose one that is sampled again."""
        config, round_ = self.config, self.round_slider.value
        sampled = [int(c) for c in sample_round(config, round_)[0]]
        chosen = self.client_picker.value
        options = [(str(c), c) for c in sampled]
        value = chosen if self._client_is_chosen and chosen in sampled else sampled[0]
        was_quiet, self._is_quiet = self._is_quiet, True
        try:
            self.client_picker.options = options
            self.client_picker.value = value
        finally:
            self._is_quiet = was_quiet

    # ----- reacting to the controls -----

    def _on_run(self, change: dict) -> None:
        if self._is_quiet:
            return
        if self._select_run():
            self.update()
        else:
            for control in (self.round_slider, self.client_picker):
                control.disabled = True

    def _on_round(self, change: dict) -> None:
        if self._is_quiet:
            return
        self._set_clients()
        self.update()

    def _on_client(self, change: dict) -> None:
        if self._is_quiet:
            return
        self._client_is_chosen = True
        self.update()

    def _on_change(self, change: dict) -> None:
        self.noise_slider.layout.display = None if self.defense_picker.value == "dp" else "none"
        if not self._is_quiet:
            self.update()

    def settings(self) -> dict[str, Any]:
        """The controls' values as `leakage_report` arguments (without the config and the global model)."""
        defense = self.defense_picker.value
        settings = {"round_": self.round_slider.value, "client": self.client_picker.value, "defense": defense,
                    "attack": self.attack_picker.value, "num_iterations": self.num_iterations}
        if defense == "dp":  # z means nothing to the other defenses: they share one cache entry
            settings["noise_multiplier"] = float(self.noise_slider.value)
        return settings

    # ----- computing and showing -----

    def update(self) -> None:
        """Attack the update the controls pick (or take it from the cache) and show the result; a failure
        shows its message in the status line and keeps the last result on screen."""
        started = time.perf_counter()
        settings = self.settings()
        key = (self.run_picker.value, *sorted(settings.items()))
        self.is_cached = key in self._cache
        if not self.is_cached:
            self.status.value = (f"computing: {html.escape(settings['attack'])} on client {settings['client']}'s "
                                 f"update of round {settings['round_']} under defense "
                                 f"{html.escape(_defense_text(settings))}…")
        try:
            if not self.is_cached:
                report = privacy.leakage_report(self.config, global_state=self._global_state(), **settings)
                figure = plot_reconstructions(
                    report.real_inputs.detach().cpu().numpy(), report.reconstructed_inputs.detach().cpu().numpy(),
                    report.real_labels.tolist(), report.reconstructed_labels.tolist(), is_image=report.is_image,
                    title=(f"{self.run.label} · round {report.round} · client {report.client} · {report.attack} · "
                           f"defense {_defense_text(settings)}"))
                # the picture too: drawing it costs as much as a small attack
                self._cache[key] = (report, figure, to_png(figure))
            self.report, self.reconstruction_figure, png = self._cache[key]
            self.run_accuracy = self._accuracy(settings["round_"])
        except Exception as err:  # any failure is the user's to see in the status line, never a traceback
            self._show_error(f"{type(err).__name__}: {err}")
            self.last_update_s = time.perf_counter() - started
            return
        self.image.value = png
        self.image.layout.display = None
        self.table.value = _quality_table(self.report.quality, self.report.baseline)
        self.accuracy.value = self._accuracy_html(settings["round_"])
        self.error = ""
        self.last_update_s = time.perf_counter() - started
        self.status.value = (f"{html.escape(self.report.attack)} on client {self.report.client}, round "
                             f"{self.report.round}, defense {html.escape(_defense_text(settings))}: the attack "
                             f"took {self.report.seconds:.2f} s"
                             + (" (shown from the cache)" if self.is_cached else ""))

    def _show_error(self, message: str) -> None:
        self.error = message
        self.status.value = f'<span style="{_ERROR_STYLE}">⚠ {html.escape(message)}</span>'

    def _global_state(self) -> dict[str, torch.Tensor] | None:
        """The global model the round started from, when the run checkpointed it (None: `leakage_report`
        replays the rounds before, from the config's seed)."""
        run, round_ = self.run, self.round_slider.value
        if run.run_id is None or round_ == 1:
            return None  # round 1 starts from the initial model, which the seed gives
        if run.run_id not in self._checkpoints:
            self._checkpoints[run.run_id] = tracking.checkpoint_rounds(tracking.open_client(self.tracking_uri),
                                                                       run.run_id)
        if round_ - 1 not in self._checkpoints[run.run_id]:
            return None
        model = tracking.load_model(run.run_id, self.tracking_uri, round=round_ - 1)
        return {name: value.detach().clone() for name, value in model.state_dict().items()}

    def _accuracy(self, round_: int) -> float | None:
        run = self.run
        if run.run_id is None:
            return None
        if run.run_id not in self._accuracies:
            history = tracking.metric_histories([run.run_id], ["test_accuracy"], self.tracking_uri)
            self._accuracies[run.run_id] = dict(history[run.run_id]["test_accuracy"])
        return self._accuracies[run.run_id].get(round_)

    def _accuracy_html(self, round_: int) -> str:
        if self.run_accuracy is not None:
            text = f"{self.run_accuracy:.4f}"
        elif self.run.run_id is None:
            text = "n/a (held in the notebook, not run)"
        else:
            text = f"n/a (not evaluated in round {round_})"
        return (f"<div style='margin-left:24px'>run test accuracy at round {round_}: "
                f"<b class='run-accuracy'>{text}</b></div>")


def _defense_text(settings: Mapping[str, Any]) -> str:
    z = settings.get("noise_multiplier")
    return settings["defense"] + (f" (z={z:g})" if z is not None else "")


def _quality_table(quality: Mapping[str, float], baseline: Mapping[str, float]) -> str:
    """The attack's reconstruction quality beside the mean training image's (no attack at all), as HTML."""
    rows = "".join(
        f"<tr><td><code>{html.escape(name)}</code></td>"
        f"<td class='attack' style='text-align:right'>{format_number(value)}</td>"
        f"<td class='baseline' style='text-align:right'>"
        f"{format_number(baseline[name]) if name in baseline else 'n/a'}</td>"
        f"<td>{html.escape(MEASURES.get(name, ''))}</td></tr>"
        for name, value in quality.items())
    return (f"<table><tr><th>measure</th><th>attack</th><th>mean image</th><th>meaning</th></tr>{rows}"
            f"</table>")

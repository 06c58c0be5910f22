"""The experiment panel: controls generated from the config, a run on a worker thread with a live view,
Stop and resume, and a compare view over the runs of an MLflow experiment.

The worker thread never prints or displays anything: it only sets widget values (which reach the
browser as comm messages, wherever the panel is shown), so its output cannot land in another cell.
"""

from __future__ import annotations

import html
import re
import threading
import time
from typing import Any, Mapping, Sequence

import ipywidgets as widgets

from workbench import tracking
from workbench.config import TASKS, ExperimentConfig, Knob, PartitionConfig, knobs
from workbench.data import DATASET_TASKS
from workbench.partition import knobs_in_use
from workbench.plots import learning_curves, live_view, to_png
from workbench.simulation import Callback, Federation, History, RoundResult, prepare, run
from workbench.tasks import client_metric, curve_metrics, headline_metric, summary_metrics, task_of_metrics

#: Sections shown open, in this order; the rest sit under "advanced".
MAIN_SECTIONS = ("data", "model", "partition", "federation", "training", "strategy", "")
SECTION_TITLES = {"": "experiment", "data": "data", "model": "model", "partition": "partition",
                  "federation": "federation", "training": "training", "strategy": "algorithm",
                  "execution": "execution", "evaluation": "evaluation"}
#: Keys that only matter for some values of another key: disabled (not hidden) otherwise.
APPLIES_WHEN: dict[str, tuple[str, tuple[Any, ...]]] = {
    "data.alpha": ("data.name", ("synthetic", "synthetic_regression")),
    "data.beta": ("data.name", ("synthetic", "synthetic_regression")),
    "data.root": ("data.name", ("fashion_mnist", "mnist", "cifar10")),
}  # partition.* keys: `workbench.partition.knobs_in_use` decides; strategy knobs: their `Knob.used_by`
#: The strategies each strategy-specific knob is used by (from the config: one place).
KNOBS_USED_BY = {k.key: k.used_by for k in knobs() if k.used_by}
_ERROR_STYLE = "color:#b00020;font-size:12px;line-height:1.3"


def field_of_error(message: str, keys: Sequence[str]) -> str | None:
    """The config key an error message is about: the one it names first (None if it names none)."""
    best: tuple[int, int, str] | None = None
    for key in keys:
        match = re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", message)
        if match and (best is None or (match.start(), -len(key)) < best[:2]):
            best = (match.start(), -len(key), key)
    return best[2] if best else None


def applies(key: str, values: Mapping[str, Any]) -> bool:
    """Whether `key` has any effect given the other values (e.g. strategy.mu only for fedprox, and
    partition.alpha only for the schemes that use it)."""
    if key.startswith("partition."):
        try:
            section = PartitionConfig(**{k.partition(".")[2]: v for k, v in values.items()
                                         if k.startswith("partition.")})
        except (ValueError, TypeError):
            return True  # an invalid partition section: keep every control editable to fix it
        task = DATASET_TASKS.get(values.get("data.name"))
        # a registered dataset's task is known only once it is loaded: keep what either task reads editable
        return any(key in knobs_in_use(section, t) for t in ([task] if task else TASKS))
    used_by = KNOBS_USED_BY.get(key, ())
    if used_by:
        return values.get("strategy.name") in used_by
    if key not in APPLIES_WHEN:
        return True
    other, accepted = APPLIES_WHEN[key]
    return values.get(other) in accepted


def build_control(knob: Knob, value: Any) -> widgets.ValueWidget:
    """The widget for one config key: a dropdown for choices, else a text box of the knob's type."""
    tooltip = f"{knob.key}: {knob.help} (allowed: {knob.describe_range()}; default {knob.default!r})"
    common = dict(description=knob.key.rpartition(".")[2], tooltip=tooltip,
                  style={"description_width": "125px"}, layout=widgets.Layout(width="285px"))
    if knob.choices is not None:
        options = list(knob.choices)
        if knob.registry and value not in options:  # a `module:Name` path the config accepted
            options.append(value)
        return widgets.Dropdown(options=options, value=value, **common)
    if knob.type is bool:
        return widgets.Checkbox(value=value, indent=False, **common)
    if knob.type is int:
        return widgets.IntText(value=value, **common)
    if knob.type is float:
        return widgets.FloatText(value=value, **common)
    return widgets.Text(value=str(value), **common)


class _LiveView(Callback):
    """Feeds the panel from the round loop (on the worker thread)."""

    def __init__(self, panel: "ExperimentPanel"):
        self.panel = panel

    def on_run_start(self, federation: Federation) -> None:
        self.panel._on_run_start(federation)

    def on_round_end(self, result: RoundResult, federation: Federation) -> None:
        self.panel._on_round_end(result)


class ExperimentPanel(widgets.VBox):
    """Every config knob as a control, Run / Stop / Resume, a progress bar and a live view of the run.

    Run trains on a worker thread (the kernel stays free) and logs to MLflow; Stop ends the run within
    one client update and its MLflow run ends KILLED with what it logged.
    """

    def __init__(self, config: ExperimentConfig | None = None, *, tracking_uri: str | None = None,
                 experiment: str = "panel", autostart: bool = False, min_redraw_s: float = 0.2):
        self.base = config or ExperimentConfig()
        self.tracking_uri = tracking_uri or tracking.default_tracking_uri()
        self.experiment = experiment
        self.min_redraw_s = min_redraw_s
        self.knobs = {k.key: k for k in knobs()}
        current = self.base.to_flat()
        self.controls: dict[str, widgets.ValueWidget] = {}
        self.errors: dict[str, widgets.HTML] = {}
        sections: dict[str, list[widgets.Widget]] = {}
        for key, knob in self.knobs.items():
            control = build_control(knob, current[key])
            error = widgets.HTML(layout=widgets.Layout(width="285px", display="none"))
            control.observe(self._on_change, names="value")
            self.controls[key], self.errors[key] = control, error
            sections.setdefault(key.rpartition(".")[0], []).extend([control, error])

        def box(name: str) -> widgets.VBox:
            return widgets.VBox([widgets.HTML(f"<b>{SECTION_TITLES.get(name, name)}</b>"), *sections[name]],
                                layout=widgets.Layout(margin="0 12px 6px 0"))

        main = [box(name) for name in MAIN_SECTIONS if name in sections]
        rest = [box(name) for name in sections if name not in MAIN_SECTIONS]
        grid = widgets.GridBox(main, layout=widgets.Layout(grid_template_columns="repeat(4, 300px)"))
        advanced = widgets.Accordion([widgets.HBox(rest)], titles=("advanced",), selected_index=None)

        self.run_button = widgets.Button(description="Run", button_style="success", icon="play")
        self.stop_button = widgets.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        self.resume_button = widgets.Button(
            description="Resume", icon="forward", disabled=True,
            tooltip="continue the last stopped run from its last checkpoint, in the same MLflow run")
        self.run_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        self.resume_button.on_click(lambda _: self.resume())
        self.progress = widgets.IntProgress(value=0, min=0, max=self.base.federation.rounds,
                                            description="round", layout=widgets.Layout(width="320px"))
        self.progress_label = widgets.HTML()
        self.status = widgets.HTML("ready: press Run")
        self.message = widgets.HTML()
        self.plot = widgets.Image(format="png", layout=widgets.Layout(max_width="980px", display="none"))
        self.plot_caption = widgets.HTML()
        controls = widgets.HBox([self.run_button, self.stop_button, self.resume_button, self.progress,
                                 self.progress_label], layout=widgets.Layout(align_items="center"))
        super().__init__([grid, advanced, controls, self.status, self.message, self.plot, self.plot_caption])
        self.add_class("workbench-experiment-panel")

        self.history = History(status="NOT STARTED")
        self.config: ExperimentConfig | None = self.base
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        #: Seconds from a round's end until the live view showed it, for each redraw (for the curious).
        self.update_lag_s: list[float] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._round_ended_at: dict[int, float] = {}
        self._dirty = threading.Event()
        self._run_over = threading.Event()
        self._total_rounds = self.base.federation.rounds
        #: the task of the run shown (its dataset's, once prepared): what the live view and summary show
        self._task = DATASET_TASKS.get(self.base.data.name, "classification")
        self._refresh_applicability()
        self.validate()
        if autostart:
            self.start()

    # ----- values and validation -----

    def values(self) -> dict[str, Any]:
        """The controls' current values, by config key."""
        return {key: control.value for key, control in self.controls.items()}

    def validate(self) -> ExperimentConfig | None:
        """The config the controls describe, or None with every problem shown next to its control."""
        problems: dict[str, str] = {}
        overrides = {}
        for key, value in self.values().items():
            try:
                overrides[key] = self.knobs[key].check(value)
            except (ValueError, TypeError) as err:
                problems[key] = str(err)
        config = None
        if not problems:
            try:
                config = self.base.with_overrides(overrides)
            except (ValueError, TypeError) as err:
                problems[field_of_error(str(err), list(self.knobs)) or ""] = str(err)
        self._show_problems(problems)
        self.config = config
        self.run_button.disabled = config is None or self.is_running
        return config

    def _show_problems(self, problems: Mapping[str, str]) -> None:
        for key, error in self.errors.items():
            text = problems.get(key, "")
            error.value = f'<div style="{_ERROR_STYLE}">⚠ {html.escape(text)}</div>' if text else ""
            error.layout.display = None if text else "none"
            self.controls[key].add_class("workbench-invalid") if text else \
                self.controls[key].remove_class("workbench-invalid")
        general = problems.get("", "")
        self.message.value = f'<div style="{_ERROR_STYLE}">⚠ {html.escape(general)}</div>' if general else ""

    def _on_change(self, change: Mapping[str, Any]) -> None:
        self._refresh_applicability()
        self.validate()

    def _refresh_applicability(self) -> None:
        values = self.values()
        for key, control in self.controls.items():
            control.disabled = not applies(key, values)

    # ----- running -----

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, config: ExperimentConfig | None = None) -> bool:
        """Start a run of `config` (default: the controls' config) on a worker thread, as Run does.

        Returns False, with the reason shown in the panel, when a run is going or the config is invalid.
        """
        if self.is_running:
            self.status.value = "a run is already going: Stop it first"
            return False
        if config is None:
            config = self.validate()
            if config is None:
                self.status.value = "fix the values marked ⚠ first"
                return False
        return self._launch(config, resume_from=None)

    def stop(self) -> None:
        """Ask the run to stop; it ends within one client update, its MLflow run KILLED."""
        if self.is_running:
            self._stop.set()
            self.stop_button.disabled = True
            self.status.value = "stopping after the current client update…"

    def resume(self) -> bool:
        """Continue the last stopped or failed run from its last checkpoint, in the same MLflow run."""
        if self.is_running or self.run_id is None or self.history.status not in ("KILLED", "FAILED"):
            self.status.value = "nothing to resume: Resume continues a stopped or failed run"
            return False
        return self._launch(self.config or self.base, resume_from=self.run_id)

    def wait(self, timeout: float | None = None) -> History:
        """Block until the current run ends (or `timeout` seconds pass); the run's history so far."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.history

    def _launch(self, config: ExperimentConfig, resume_from: str | None) -> bool:
        self._stop = threading.Event()
        self.config = config
        self._total_rounds = config.federation.rounds
        self._task = DATASET_TASKS.get(config.data.name, self._task)
        self.progress.max, self.progress.bar_style = config.federation.rounds, ""
        self.message.value = ""
        self.update_lag_s = []
        self._round_ended_at = {}
        self._dirty.clear()
        self._run_over.clear()
        if resume_from is None:  # a resumed run keeps its rounds so far on screen
            self.history = History()
            self.run_id = self.experiment_id = None
            self.progress.value = 0
            self.progress_label.value = ""
            self.plot.value = b""
            self.plot.layout.display = "none"
            self.plot_caption.value = ""
        else:
            self.history = History(rounds=list(self.history.rounds))
        self._set_running(True)
        self.status.value = "preparing data and model…"
        self._thread = threading.Thread(target=self._work, args=(config, resume_from), daemon=True,
                                        name="workbench-panel-run")
        self._thread.start()
        return True

    def _set_running(self, is_running: bool) -> None:
        self.run_button.disabled = is_running or self.config is None
        self.stop_button.disabled = not is_running
        self.resume_button.disabled = is_running or not (
            self.history.status in ("KILLED", "FAILED") and self.run_id)
        for control in self.controls.values():
            control.disabled = is_running
        if not is_running:
            self._refresh_applicability()

    def _work(self, config: ExperimentConfig, resume_from: str | None) -> None:
        # Everything is caught here: an exception escaping a thread would print into whichever cell
        # happens to be running.
        tracker = tracking.MlflowCallback(self.tracking_uri, experiment=self.experiment)
        self._tracker = tracker
        # Drawing happens on its own thread, latest round wins: the round loop never waits for a plot.
        renderer = threading.Thread(target=self._render_loop, daemon=True, name="workbench-panel-view")
        renderer.start()
        try:
            if resume_from is not None:
                self.status.value = f"resuming run {resume_from[:8]} from its last checkpoint…"
                resumed = tracking.resume(resume_from, self.tracking_uri, [_LiveView(self)], stop=self._stop)
                resumed.rounds = list(self.history.rounds)
                self.history = resumed
            else:
                try:
                    federation = prepare(config)
                except Exception as err:  # any failure to build the experiment is the user's to fix
                    self.history.status = "FAILED"
                    key = field_of_error(str(err), list(self.knobs))
                    self._show_problems({key or "": f"{err}"})
                    self.status.value = "<b>not started</b>: the experiment cannot be built (see ⚠)"
                    return
                self.history = run(federation, [tracker, _LiveView(self)], stop=self._stop)
        except Exception as err:  # the run failed: MlflowCallback has already ended it FAILED
            self.history.status = "FAILED"
            self.message.value = (f'<div style="{_ERROR_STYLE}">⚠ the run failed: '
                                  f'{html.escape(type(err).__name__)}: {html.escape(str(err))}</div>')
        finally:
            self._run_over.set()
            renderer.join()
            try:
                self._draw()
                self._finish()
            except Exception as err:  # never let a display problem escape the thread
                self.message.value = f"display error: {html.escape(repr(err))}"
            self._set_running(False)

    def _on_run_start(self, federation: Federation) -> None:
        self._task = federation.dataset.task
        self.run_id = self._tracker.run_id or self.run_id  # a resumed run keeps its id
        if self.run_id:
            self.experiment_id = self._tracker.client.get_run(self.run_id).info.experiment_id
        self.status.value = f"running… {self._mlflow_html()}"

    def _on_round_end(self, result: RoundResult) -> None:
        with self._lock:
            # A resumed run restarts after its last checkpoint, which may be behind the last round shown.
            self.history.rounds = [r for r in self.history.rounds if r.round < result.round] + [result]
        self.progress.value = result.round
        headline, _ = headline_metric(self._task)
        value = result.metrics.get(headline)
        self.progress_label.value = (
            f"{result.round}/{self._total_rounds}"
            + (f" · {headline.replace('_', ' ')} {value:.3f}" if value is not None else "")
            + f" · {result.metrics.get('round_time_s', 0):.2f} s/round")
        self._round_ended_at[result.round] = time.perf_counter()
        self._dirty.set()

    def _finish(self) -> None:
        status = self.history.status
        self.progress.bar_style = {"FINISHED": "success", "KILLED": "warning", "FAILED": "danger"}.get(status, "")
        done = len(self.history.rounds)
        if self.run_id is None:
            return
        kept = f"{done} round{'s' * (done != 1)} logged"
        self.status.value = f"<b>{status}</b> after {kept} · {self._mlflow_html()}"

    def summary(self) -> widgets.HTML:
        """The last run in a few lines: MLflow run, status, final metrics, link and UI command."""
        if self.run_id is None:
            return widgets.HTML("no run yet: press Run in the panel above")
        final = self.history.final()
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td style='text-align:right'>{final[k]:.4f}</td></tr>"
                       for k in summary_metrics(self._task) if k in final)
        return widgets.HTML(
            f"<b>{html.escape(self.history.status)}</b> after {len(self.history.rounds)} rounds · MLflow "
            f"experiment <code>{html.escape(self.experiment)}</code>, run <code>{self.run_id}</code><br>"
            f"<table>{rows}</table>{self._mlflow_html()}")

    def figure(self):
        """The live view of the current (or last) run, as a matplotlib Figure."""
        with self._lock:
            rounds = list(self.history.rounds)
        curves = {m: [(r.round, r.metrics[m]) for r in rounds if m in r.metrics] for m in curve_metrics(self._task)}
        name, _ = client_metric(self._task)
        spread = [(r.round, [m[name] for m in r.client_test_metrics.values() if name in m])
                  for r in rounds if r.client_test_metrics]
        config = self.config or self.base
        title = (f"{config.strategy.name}" + (f" (mu={config.strategy.mu})" if config.strategy.name == "fedprox"
                                               else "")
                 + f" · {config.data.name} · {config.partition.scheme} · {config.federation.num_clients} clients"
                 + f" · seed {config.seed}")
        return live_view(curves, spread, self._total_rounds, title, task=self._task)

    def _render_loop(self) -> None:
        while not self._run_over.is_set():
            if not self._dirty.wait(0.05):
                continue
            self._dirty.clear()
            try:
                self._draw()
            except Exception as err:  # never let a display problem escape the thread
                self.message.value = f"live view error: {html.escape(repr(err))}"
            self._run_over.wait(self.min_redraw_s)

    def _draw(self) -> None:
        """Show the rounds so far (a no-op when the view already shows the latest one)."""
        with self._lock:
            if not self.history.rounds:
                return
            last = self.history.rounds[-1].round
        if f"up to round {last}<" in self.plot_caption.value:
            return
        self.plot.value = to_png(self.figure())
        self.plot.layout.display = None
        self.plot_caption.value = f'<span class="workbench-live-caption">live view up to round {last}</span>'
        if last in self._round_ended_at:
            self.update_lag_s.append(time.perf_counter() - self._round_ended_at[last])

    def _mlflow_html(self) -> str:
        if self.run_id is None:
            return ""
        return mlflow_link_html(self.tracking_uri, self.experiment_id, [self.run_id])


def _headline_text(metrics: Mapping[str, float]) -> str:
    """` · test accuracy 0.912` (or test mse) of a run's latest metrics; empty before its first evaluation."""
    name, _ = headline_metric(task_of_metrics(metrics))
    return f" · {name.removeprefix('test_').replace('_', ' ')} {metrics[name]:.3f}" if name in metrics else ""


def mlflow_link_html(tracking_uri: str, experiment_id: str | None, run_ids: Sequence[str],
                     ui_url: str = "http://127.0.0.1:5000") -> str:
    """Where runs are in the MLflow UI (its "Model training" view: `tracking.ui_url`): the link, once the UI
    runs, and the command that starts it."""
    url = tracking.ui_url(experiment_id, list(run_ids), ui_url)
    label = f"MLflow run {run_ids[0]}" if len(run_ids) == 1 else f"compare {len(run_ids)} runs in MLflow"
    return (f'<a href="{html.escape(url)}" target="_blank">{label}</a> '
            f'<span style="color:#666">(UI: <code>{html.escape(tracking.ui_command(tracking_uri))}</code>)</span>')


class CompareView(widgets.VBox):
    """Pick runs of an MLflow experiment and overlay their curves; links to the same runs in the MLflow UI."""

    def __init__(self, experiment: str = "panel", *, tracking_uri: str | None = None,
                 metrics: Sequence[str] = curve_metrics("classification")):
        self.tracking_uri = tracking_uri or tracking.default_tracking_uri()
        self.experiment = widgets.Text(value=experiment, description="experiment")
        self.refresh_button = widgets.Button(description="Refresh", icon="refresh")
        self.runs = widgets.SelectMultiple(description="runs", rows=8, layout=widgets.Layout(width="640px"),
                                           style={"description_width": "80px"})
        self.metrics = widgets.SelectMultiple(options=list(metrics), value=tuple(metrics[:2]),
                                              description="metrics", rows=8)
        self.plot = widgets.Image(format="png", layout=widgets.Layout(max_width="980px", display="none"))
        self.link = widgets.HTML()
        self.refresh_button.on_click(lambda _: self.refresh())
        self.runs.observe(lambda _: self.draw(), names="value")
        self.metrics.observe(lambda _: self.draw(), names="value")
        super().__init__([widgets.HBox([self.experiment, self.refresh_button]),
                          widgets.HBox([self.runs, self.metrics]), self.link, self.plot])
        self.refresh()

    def refresh(self) -> None:
        """Reload the experiment's runs (newest first) and the metrics they logged; select them all."""
        found = tracking.list_runs(self.experiment.value, self.tracking_uri)
        self._experiment_id = found[0]["experiment_id"] if found else None
        options = [(f"{r['name']} · {r['status']} · {r['num_rounds']} rounds" + _headline_text(r["metrics"]),
                    r["run_id"]) for r in found]
        names = sorted({m for r in found for m in r["metrics"] if not m.startswith("partition_")})
        self.metrics.options = names or list(self.metrics.options)
        # the curves of the task most of the runs are (the newest run's, on a tie)
        tasks_found = [task_of_metrics(r["metrics"]) for r in found]
        task = max(tasks_found, key=tasks_found.count) if tasks_found else "classification"
        self.metrics.value = tuple(m for m in curve_metrics(task) if m in self.metrics.options)
        self.runs.options = options
        self.runs.value = tuple(run_id for _, run_id in options)
        if not options:
            self.link.value = f"no runs in experiment {html.escape(self.experiment.value)!r} yet"
            self.plot.value = b""
            self.plot.layout.display = "none"

    def figure(self):
        """The selected runs' curves of the selected metrics, one panel per metric."""
        run_ids = list(self.runs.value)
        labels = {run_id: label.split(" · ")[0] + f" ({run_id[:6]})" for label, run_id in self.runs.options}
        histories = tracking.metric_histories(run_ids, list(self.metrics.value), self.tracking_uri)
        curves = {labels[run_id]: histories[run_id] for run_id in run_ids}
        return learning_curves(curves, list(self.metrics.value) or ["test_loss"])

    def draw(self) -> None:
        if not self.runs.value or not self.metrics.value:
            self.plot.value = b""
            self.plot.layout.display = "none"
            return
        self.plot.value = to_png(self.figure())
        self.plot.layout.display = None
        self.link.value = mlflow_link_html(self.tracking_uri, self._experiment_id, list(self.runs.value))

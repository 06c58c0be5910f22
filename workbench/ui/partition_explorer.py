"""The partition explorer: pick a dataset, a scheme and its parameters, and see the partition a run of that
config would train on, with its statistics and figures, redrawn on every change."""

from __future__ import annotations

import html
import time
from typing import Any, Callable

import ipywidgets as widgets
import numpy as np
from matplotlib.figure import Figure

from workbench import plots
from workbench.config import ExperimentConfig, Knob, knobs
from workbench.data import Dataset, DatasetUnavailableError
from workbench.partition import (FEATURE_SKEWS, STAT_DESCRIPTIONS, PartitionStats, describe, knobs_in_use,
                                 partition_hash, skew_preview)
from workbench.simulation import STREAM_PARTITION, load_data, partition_clients, stream

#: The keys the explorer offers, in display order, and the slider range for numbers (the knob's own range
#: is wider; the config still validates every value).
CONTROLS: dict[str, dict[str, Any]] = {
    "data.name": {},
    "partition.scheme": {},
    "federation.num_clients": {"low": 1, "high": 1000},
    "partition.alpha": {"log": True, "low": -3, "high": 3},
    "partition.shards_per_client": {"low": 1, "high": 20},
    "partition.classes_per_client": {"low": 1, "high": 10},
    "partition.quantity_distribution": {},
    "partition.quantity_alpha": {"log": True, "low": -2, "high": 2},
    "partition.quantity_sigma": {"low": 0.0, "high": 4.0, "step": 0.1},
    "partition.noise_sigma": {"low": 0.0, "high": 2.0, "step": 0.05},
    "partition.max_rotation": {"low": 0.0, "high": 360.0, "step": 5.0},
    "partition.iid_fraction": {"low": 0.0, "high": 1.0, "step": 0.05},
    "partition.mixture_skew": {},
    "partition.min_size": {"low": 1, "high": 200},
    "seed": {},
}
#: Clients whose inputs the feature-skew preview shows.
PREVIEW_CLIENTS = 6


class PartitionExplorer:
    """Widgets for the partition knobs of one `ExperimentConfig`; every change re-partitions (with the seed
    stream a run uses, so the picture is the partition a run of `self.config` trains on) and redraws.

    After each update: `config`, `clients`, `stats` (a `PartitionStats`), `summary`, `partition_hash`,
    `error` (the message shown when the settings are infeasible, else ""), `last_update_s`, and the figures
    shown: `overview_figure` (titled by `plots.partition_title`) and `preview_figure` (feature skews only,
    else None).
    """

    def __init__(self, config: ExperimentConfig | None = None, *, max_clients_shown: int = 100,
                 loader: Callable[[ExperimentConfig], Dataset] | None = None):
        self.config = config or ExperimentConfig().with_overrides(
            {"data.name": "digits", "partition.scheme": "dirichlet", "federation.num_clients": 20})
        self.max_clients_shown = max_clients_shown
        self._loader = loader or load_data
        self._datasets: dict[tuple, Dataset] = {}
        self.clients: list[np.ndarray] = []
        self.stats: PartitionStats | None = None
        self.summary: dict[str, float] = {}
        self.partition_hash = ""
        self.error = ""
        self.last_update_s = 0.0
        self.overview_figure: Figure | None = None
        self.preview_figure: Figure | None = None
        known = {k.key: k for k in knobs()}
        self.controls: dict[str, widgets.Widget] = {
            key: _control(known[key], _value(self.config, key), **options) for key, options in CONTROLS.items()
        }
        self.status = widgets.HTML()
        self.table = widgets.HTML()
        self.figure = widgets.Image(format="png", layout=widgets.Layout(width="100%"))
        self.preview = widgets.Image(format="png", layout=widgets.Layout(display="none"))
        controls = list(self.controls.values())
        self.widget = widgets.VBox([
            widgets.HBox([widgets.VBox(controls[: len(controls) // 2 + 1]),
                          widgets.VBox(controls[len(controls) // 2 + 1:])]),
            self.status, self.figure, self.preview, self.table,
        ])
        for control in controls:
            control.observe(self._on_change, names="value")
        self.update()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def _on_change(self, change: dict) -> None:
        self.update()

    def settings(self) -> dict[str, Any]:
        """The widgets' values as config overrides."""
        values = {key: control.value for key, control in self.controls.items()}
        # The explorer trains nothing, so a cohort larger than the new client count is simply shrunk.
        values["federation.clients_per_round"] = min(self.config.federation.clients_per_round,
                                                     values["federation.num_clients"])
        return values

    def update(self) -> None:
        """Re-partition with the widgets' values and redraw; infeasible settings show their error instead."""
        started = time.perf_counter()
        config = self.config
        try:
            config = self.config.with_overrides(self.settings())
            # The knobs of the scheme asked for, even if it fails: they are what the user must change.
            self._enable(config)
            dataset = self._dataset(config)
            clients = partition_clients(config, dataset)
        except (ValueError, TypeError, DatasetUnavailableError) as err:
            self.error = str(err)
            self.status.value = f'<span style="color:#b00020">{html.escape(self.error)}</span>'
            self._enable(config)
            self.last_update_s = time.perf_counter() - started
            return
        self.config, self.clients, self.error = config, clients, ""
        self.stats = describe(dataset.y_train.numpy(), clients, dataset.num_classes, task=dataset.task,
                              num_bins=config.partition.target_bins)
        self.summary = self.stats.summary()
        self.partition_hash = partition_hash(clients)
        title = plots.partition_title(config.with_resolved_partition(dataset.has_natural_clients),
                                      dataset=dataset.name, num_clients=len(clients), task=dataset.task)
        if self.overview_figure is None:
            self.overview_figure = plots.partition_overview(self.stats.counts, title=title,
                                                            max_clients=self.max_clients_shown,
                                                            row_label=self.stats.row_label)
        else:  # redraw onto the same figure: the same picture, reusing its axes and ticks
            self.overview_figure = plots.update_overview(self.overview_figure, self.stats.counts, title=title,
                                                         max_clients=self.max_clients_shown,
                                                         row_label=self.stats.row_label)
        self.figure.value = plots.to_png(self.overview_figure)
        self._update_preview(config, dataset, clients, title)
        self.table.value = _stats_table(self.summary)
        self.last_update_s = time.perf_counter() - started
        self.status.value = (f"{len(dataset.y_train):,} samples, {len(clients)} clients, partition hash "
                             f"<code>{self.partition_hash[:12]}</code>, updated in "
                             f"{1000 * self.last_update_s:.0f} ms")

    def _dataset(self, config: ExperimentConfig) -> Dataset:
        # Synthetic data generates one device per client, so only there does the client count change the data.
        key = (config.data, config.seed,
               config.federation.num_clients if config.data.name.startswith("synthetic") else None)
        if key not in self._datasets:
            self._datasets = {key: self._loader(config)}  # keep one: datasets can be large
        return self._datasets[key]

    def _enable(self, config: ExperimentConfig) -> None:
        used = knobs_in_use(config.partition)
        for key, control in self.controls.items():
            control.disabled = key.startswith("partition.") and key != "partition.scheme" and key not in used

    def _update_preview(self, config: ExperimentConfig, dataset: Dataset, clients: list[np.ndarray],
                        title: str) -> None:
        if config.partition.scheme not in FEATURE_SKEWS:
            self.preview.layout.display = "none"
            self.preview_figure = None
            return
        shown, views = skew_preview(dataset.x_train[0], len(clients), config.partition,
                                    stream(config.seed, STREAM_PARTITION, 1), PREVIEW_CLIENTS)
        self.preview_figure = plots.feature_skew_preview(views.numpy(), [f"client {i}" for i in shown],
                                                         title=f"training sample 0 as each client sees it\n{title}")
        self.preview.value = plots.to_png(self.preview_figure)
        self.preview.layout.display = None


def _value(config: ExperimentConfig, key: str) -> Any:
    obj: Any = config
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _control(knob: Knob, value: Any, *, log: bool = False, low: float = 0, high: float = 1,
             step: float | None = None) -> widgets.Widget:
    name = knob.key.split(".")[-1]
    common = {"description": name, "tooltip": knob.help, "style": {"description_width": "150px"},
              "layout": widgets.Layout(width="420px")}
    if knob.choices is not None:
        return widgets.Dropdown(options=list(knob.choices), value=value, **common)
    if knob.key == "seed":
        return widgets.BoundedIntText(value=value, min=0, max=2**31 - 1, **common)
    if knob.type is int:
        return widgets.IntSlider(value=value, min=int(low), max=int(max(high, value)), continuous_update=False,
                                 **common)
    if log:
        return widgets.FloatLogSlider(value=value, base=10, min=low, max=high, step=0.05, continuous_update=False,
                                      readout_format=".3g", **common)
    return widgets.FloatSlider(value=value, min=low, max=max(high, value), step=step,
                               continuous_update=False, readout_format=".3g", **common)


def _stats_table(summary: dict[str, float]) -> str:
    rows = "".join(
        f"<tr><td><code>{key}</code></td><td style='text-align:right'>{plots.format_number(value)}</td>"
        f"<td>{html.escape(STAT_DESCRIPTIONS.get(key, ''))}</td></tr>"
        for key, value in summary.items()
    )
    return f"<table><tr><th>statistic</th><th>value</th><th>meaning</th></tr>{rows}</table>"

"""The only module that imports mlflow: the logging callback, model files, and queries over logged runs."""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file, save_file
from torch import nn

from workbench.models import build_model
from workbench.simulation import Callback, Federation, History, RoundResult

DEFAULT_EXPERIMENT = "workbench"
MODEL_DIR = "model"
_MLFLOW_PARAM_LIMIT = 100  # log_batch accepts at most 100 params per call


def default_tracking_uri(project_dir: str | Path | None = None) -> str:
    """`MLFLOW_TRACKING_URI` when set, else the embedded store `sqlite:///<project>/mlruns/mlflow.db`.

    The project is the nearest folder, from the current one upwards, that has an `mlruns/` folder (so
    a notebook in `notebooks/` logs to the same store as the CLI), else the current folder.
    """
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if project_dir is None:
        here = Path.cwd().resolve()
        project_dir = next((p for p in (here, *here.parents) if (p / "mlruns").is_dir()), here)
    return local_store_uri(Path(project_dir) / "mlruns")


def local_store_uri(folder: str | Path) -> str:
    """The SQLite store in `folder` (created if missing); artifacts go beside it."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def ui_command(tracking_uri: str) -> str:
    """The one command that opens the MLflow UI on this store."""
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"


def get_or_create_experiment(client: MlflowClient, tracking_uri: str, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:///"):
        # A SQLite store's default artifact root is ./mlartifacts of whatever the current folder is;
        # keep the artifacts beside the database instead, so the store is one self-contained folder.
        folder = Path(tracking_uri.removeprefix("sqlite:///")).parent / "artifacts"
        artifact_location = (folder / re.sub(r"[^A-Za-z0-9_.-]+", "_", name)).as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


class MlflowCallback(Callback):
    """Records a run in MLflow: config as params, tags, one metric batch per round, the final model.

    A run that raises ends FAILED and one interrupted by Ctrl-C ends KILLED; what was logged stays.
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT,
                 run_name: str | None = None, extra_tags: dict[str, str] | None = None):
        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.experiment = experiment
        self.run_name = run_name
        self.extra_tags = dict(extra_tags or {})
        self.client = MlflowClient(self.tracking_uri)
        self.run_id: str | None = None

    def on_run_start(self, federation: Federation) -> None:
        config = federation.config
        experiment_id = get_or_create_experiment(self.client, self.tracking_uri, self.experiment)
        tags = {
            "algorithm": config.strategy.name,
            "dataset": config.data.name,
            "partition": config.partition.scheme,
            "model": config.model.name,
            "seed": str(config.seed),
            **self.extra_tags,
        }
        name = self.run_name or f"{config.strategy.name}-{config.data.name}-{config.partition.scheme}-s{config.seed}"
        run = self.client.create_run(experiment_id, run_name=name, tags=tags)
        self.run_id = run.info.run_id
        params = {**config.to_flat(), "resolved_device": str(federation.device),
                  "torch_threads": torch.get_num_threads()}
        items = [Param(k, str(v)) for k, v in params.items()]
        for start in range(0, len(items), _MLFLOW_PARAM_LIMIT):
            self.client.log_batch(self.run_id, params=items[start:start + _MLFLOW_PARAM_LIMIT])
        now = _now_ms()
        self.client.log_batch(self.run_id, metrics=[
            Metric(f"partition_{k}", float(v), now, 0) for k, v in federation.partition_stats.items()
        ])

    def on_round_end(self, result: RoundResult, federation: Federation) -> None:
        now = _now_ms()
        metrics = [Metric(k, float(v), now, result.round) for k, v in result.metrics.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def on_run_end(self, history: History, federation: Federation, error: BaseException | None) -> None:
        if self.run_id is None:
            return
        if error is not None:
            self.client.set_tag(self.run_id, "error", f"{type(error).__name__}: {error}"[:5000])
        else:
            log_model(self.client, self.run_id, federation)
        status = history.status if history.status in ("FINISHED", "FAILED", "KILLED") else "FAILED"
        self.client.set_terminated(self.run_id, status=RunStatus.to_string(RunStatus.from_string(status)))


def log_model(client: MlflowClient, run_id: str, federation: Federation) -> None:
    """The global model's weights as safetensors (no pickled code) plus what rebuilds its class."""
    spec = {
        "model": federation.config.model.name,
        "input_shape": list(federation.dataset.input_shape),
        "num_classes": federation.dataset.num_classes,
    }
    with tempfile.TemporaryDirectory() as folder:
        state = {k: v.detach().cpu().contiguous() for k, v in federation.model.state_dict().items()}
        save_file(state, os.path.join(folder, "weights.safetensors"))
        Path(folder, "model.json").write_text(json.dumps(spec, indent=2))
        client.log_artifacts(run_id, folder, MODEL_DIR)


def load_model(run_id: str, tracking_uri: str | None = None) -> nn.Module:
    """The final global model of a run, rebuilt as its own class with the logged weights."""
    client = MlflowClient(tracking_uri or default_tracking_uri())
    with tempfile.TemporaryDirectory() as folder:
        local = Path(client.download_artifacts(run_id, MODEL_DIR, folder))
        spec = json.loads((local / "model.json").read_text())
        state = load_file(str(local / "weights.safetensors"))
    model = build_model(spec["model"], tuple(spec["input_shape"]), spec["num_classes"], torch.Generator())
    model.load_state_dict(state)
    return model


def final_metrics(run_ids: Sequence[str], tracking_uri: str | None = None) -> dict[str, dict[str, float]]:
    """Each run's latest value of every metric it logged, keyed by run id."""
    client = MlflowClient(tracking_uri or default_tracking_uri())
    return {run_id: dict(client.get_run(run_id).data.metrics) for run_id in run_ids}


def _now_ms() -> int:
    return int(time.time() * 1000)


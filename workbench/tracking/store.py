"""Where runs are stored and how to reach them: the tracking URI, the local state folder, and read-only queries
over logged runs."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

DEFAULT_EXPERIMENT = "workbench"
#: Where a run keeps its state on this machine until MLflow has all of it (overridable per call).
STATE_DIR_ENV = "WORKBENCH_STATE_DIR"
#: What a lost tracking server (or a broken store) raises from the MLflow client.
TRACKING_ERRORS = (MlflowException, requests.RequestException, OSError)


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


def final_metrics(run_ids: Sequence[str], tracking_uri: str | None = None) -> dict[str, dict[str, float]]:
    """Each run's latest value of every metric it logged, keyed by run id."""
    client = MlflowClient(tracking_uri or default_tracking_uri())
    return {run_id: dict(client.get_run(run_id).data.metrics) for run_id in run_ids}


def list_runs(experiment: str, tracking_uri: str | None = None, max_results: int = 200) -> list[dict[str, Any]]:
    """The runs of an experiment, newest first: id, name, status, tags, latest metrics, rounds logged
    (an experiment that does not exist has no runs)."""
    client = MlflowClient(tracking_uri or default_tracking_uri())
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"],
                              max_results=max_results)
    return [{
        "run_id": r.info.run_id, "experiment_id": r.info.experiment_id, "name": r.info.run_name,
        "status": r.info.status, "tags": dict(r.data.tags), "metrics": dict(r.data.metrics),
        "test_accuracy": r.data.metrics.get("test_accuracy"),
        "num_rounds": len(client.get_metric_history(r.info.run_id, "num_updates")),
    } for r in runs]


def metric_histories(run_ids: Sequence[str], metrics: Sequence[str],
                     tracking_uri: str | None = None) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """`[run_id][metric] = [(round, value), ...]` in round order, from MLflow's metric histories (the
    shape `plots.learning_curves` takes)."""
    client = MlflowClient(tracking_uri or default_tracking_uri())
    return {run_id: {metric: sorted((m.step, m.value) for m in client.get_metric_history(run_id, metric))
                     for metric in metrics} for run_id in run_ids}


def _now_ms() -> int:
    return int(time.time() * 1000)


# ----- tracking store reachability and local state -----


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server cannot be reached (before a run) or went away (during one)."""


def default_state_root() -> Path:
    """Where runs keep their local state: `$WORKBENCH_STATE_DIR`, else ~/.cache/fl-workbench/runs."""
    return Path(os.environ.get(STATE_DIR_ENV) or Path.home() / ".cache" / "fl-workbench" / "runs")


def check_tracking_uri(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """Raise `TrackingUnavailable` when an `http(s)://` tracking server does not answer its health check.

    One quick request, instead of the MLflow client's minutes of retries, so that a wrong or stopped
    server is reported before any training starts.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        response = requests.get(f"{tracking_uri.rstrip('/')}/health", timeout=timeout_s)
        response.raise_for_status()
    except requests.RequestException as err:
        raise TrackingUnavailable(
            f"MLflow tracking server {tracking_uri} is not reachable ({type(err).__name__}); start it "
            f"(mlflow server --host ... --port ...) or fix --tracking-uri / MLFLOW_TRACKING_URI") from err

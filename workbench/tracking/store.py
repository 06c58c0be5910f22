"""Where runs are stored and how to reach them: the tracking URI, the experiment (and how the MLflow UI shows
it), the local state folder, and read-only queries over logged runs."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import urllib.parse
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

try:
    import fcntl
except ImportError:  # Windows: no flock; MLflow's own behaviour, unserialized
    fcntl = None

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


# ----- how the MLflow UI shows an experiment -----

#: The experiment tag that says what kind of work an experiment holds. MLflow UIs that read it open a
#: `custom_model_development` experiment on its runs ("Model training"), not on traces (GenAI).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: MLflow 3.17's UI ignores that tag for its navigation: a browser-wide switch ("GenAI" | "Model training",
#: GenAI until the user flips it) picks the view, unless the page's URL says `workflowType=machine_learning`.
WORKFLOW_PARAM = "workflowType=machine_learning"
#: The runs-table columns of a workbench experiment: the key per-round metrics, the knobs that tell runs
#: apart, and MLflow's Dataset column. The UI's own default (Source, Models, Dataset) shows no metric, and
#: nothing on an experiment changes that default; a saved view ("Views" above the runs table) does.
KEY_METRICS = ("test_accuracy", "test_loss", "train_loss", "client_accuracy_p10")
VIEW_PARAMS = ("strategy.name", "resolved_partition_scheme", "partition.alpha")
#: The saved view, stored as MLflow's UI stores one: the experiment tag `mlflow.sharedViewState.<id>`
#: holding {name, createdAt, updatedAt, state}, `state` the view's JSON. `ui_url` opens it.
RUNS_VIEW_ID = "fl-workbench"
RUNS_VIEW_NAME = "FL runs: key metrics"
_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
#: pixels, so that these columns' names and a float's digits are not cut short
_VIEW_WIDTHS = {"attributes.`Run Name`": 230, "metrics.`test_accuracy`": 160, "metrics.`test_loss`": 160,
                "metrics.`train_loss`": 160, "metrics.`client_accuracy_p10`": 160, "params.`strategy.name`": 125,
                "params.`partition.scheme`": 140, "params.`partition.alpha`": 130}


def runs_view_columns() -> list[str]:
    """The saved view's columns, named as the MLflow UI names them: attributes.`Dataset`, metrics.`<key>`,
    params.`<key>`."""
    return (["attributes.`Dataset`"] + [f"metrics.`{m}`" for m in KEY_METRICS]
            + [f"params.`{p}`" for p in VIEW_PARAMS])


def runs_view_order() -> list[str]:
    """The saved view's column order (the UI would sort the metric columns by name)."""
    return (["attributes.`Run Name`", "runDateAndNestInfo"] + [f"metrics.`{m}`" for m in KEY_METRICS]
            + [f"params.`{p}`" for p in VIEW_PARAMS] + ["attributes.`Dataset`", "duration"])


def experiment_ui_tags(now_ms: int | None = None) -> dict[str, str]:
    """The experiment tags that make the MLflow UI show a workbench experiment as training runs with its
    key metrics as columns (`EXPERIMENT_KIND_TAG`, the saved view `RUNS_VIEW_ID`)."""
    now_ms = _now_ms() if now_ms is None else now_ms
    view = {"name": RUNS_VIEW_NAME, "createdAt": now_ms, "updatedAt": now_ms,
            "state": json.dumps({"selectedColumns": runs_view_columns(), "columnOrder": runs_view_order(),
                                 "columnWidths": dict(_VIEW_WIDTHS)})}
    return {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, f"{_VIEW_TAG_PREFIX}{RUNS_VIEW_ID}": json.dumps(view)}


def ui_url(experiment_id: str, run_ids: str | Sequence[str] = (),
           base_url: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI's page of an experiment's runs (in the saved view: key metrics as columns), of one run,
    or comparing several, in its "Model training" view whatever the browser's GenAI | Model training switch
    says (`ui_command` starts the UI at the default `base_url`)."""
    run_ids = [run_ids] if isinstance(run_ids, str) else list(run_ids)
    base = base_url.rstrip("/")
    if len(run_ids) > 1:
        runs = urllib.parse.quote(json.dumps(run_ids, separators=(",", ":")))
        experiments = urllib.parse.quote(json.dumps([str(experiment_id)]))
        return f"{base}/#/compare-runs?runs={runs}&experiments={experiments}&{WORKFLOW_PARAM}"
    if run_ids:
        return f"{base}/#/experiments/{experiment_id}/runs/{run_ids[0]}?{WORKFLOW_PARAM}"
    return f"{base}/#/experiments/{experiment_id}/runs?{WORKFLOW_PARAM}&viewStateShareKey={RUNS_VIEW_ID}"


def experiment_url(experiment: str, tracking_uri: str | None = None, base_url: str = "http://127.0.0.1:5000") -> str:
    """`ui_url` of the experiment called `experiment` (its runs, key metrics as columns, "Model training")."""
    found = open_client(tracking_uri).get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"no MLflow experiment named {experiment!r} in {tracking_uri or default_tracking_uri()}")
    return ui_url(found.experiment_id, base_url=base_url)


#: The URI schemes of MLflow's SQLAlchemy store (opened by this process: `_opened_stores`).
_DATABASES = ("sqlite", "postgresql", "mysql", "mssql")
_opened_stores: set[str] = set()
_opening = threading.Lock()  # also keeps two threads from raising and restoring the loggers' levels at once
#: MLflow's loggers that report a new store's table creation and migrations at INFO.
_STORE_SETUP_LOGGERS = ("mlflow.store.db.utils", "alembic")


def open_client(tracking_uri: str | None = None) -> MlflowClient:
    """An `MlflowClient` on the store, opened so that any number of processes may open it at once.

    The first open of a SQLite store in a process (MLflow creates its tables and runs its schema migrations
    there when the database is new) happens under `_store_lock`: two processes migrating one database at once
    fail (`duplicate column name`). Its INFO lines about creating and upgrading tables are dropped; warnings
    and errors are not.
    """
    tracking_uri = tracking_uri or default_tracking_uri()
    if tracking_uri in _opened_stores or tracking_uri.split(":", 1)[0].split("+", 1)[0] not in _DATABASES:
        return MlflowClient(tracking_uri)  # MLflow keeps each URI's store; a server's client opens nothing
    with _opening, _quiet_store_setup():
        # The store's modules take most of a second to import: import them before waiting for the lock, so
        # that each process holds it only for the database work (tens of ms on a migrated store).
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
        with _store_lock(tracking_uri):
            client = MlflowClient(tracking_uri)
            if tracking_uri not in _opened_stores:
                client.search_experiments(max_results=1)  # the store is built now, were the client ever lazy
                _opened_stores.add(tracking_uri)
    return client


@contextmanager
def _store_lock(tracking_uri: str) -> Iterator[None]:
    """An exclusive lock on a SQLite store, across processes and threads: `flock` on `<database>.lock` beside
    the database. A no-op for other stores."""
    path, file = _sqlite_path(tracking_uri), None
    if path is not None and fcntl is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            file = open(path.with_name(path.name + ".lock"), "a")
        except OSError:  # a store this user may only read: no migration or creation of ours to serialize
            pass
    if file is None:
        yield
        return
    # flock belongs to the open file, not the process: threads that each open the file exclude each other
    with file:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(file.fileno(), fcntl.LOCK_UN)


def _sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI; None for other stores and in-memory SQLite."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


@contextmanager
def _quiet_store_setup() -> Iterator[None]:
    """MLflow's INFO lines about a new store's tables (noise in a notebook's output) dropped while the store
    opens; its warnings and errors still show."""
    loggers = [logging.getLogger(name) for name in _STORE_SETUP_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def get_or_create_experiment(client: MlflowClient, tracking_uri: str, name: str) -> str:
    """The id of the experiment `name`, created when missing; safe when many processes call it at once.

    The experiment carries `experiment_ui_tags` (created with them; an existing one gets those it lacks,
    never a tag it has changed), so that the MLflow UI shows it as training runs with its key metrics."""
    with _store_lock(tracking_uri):  # on SQLite no two workbench processes even try to create it together
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            _add_missing_tags(client, experiment.experiment_id, dict(experiment.tags))
            return experiment.experiment_id
        artifact_location = None
        if tracking_uri.startswith("sqlite:///"):
            # A SQLite store's default artifact root is ./mlartifacts of whatever the current folder is;
            # keep the artifacts beside the database instead, so the store is one self-contained folder.
            folder = Path(tracking_uri.removeprefix("sqlite:///")).parent / "artifacts"
            artifact_location = (folder / re.sub(r"[^A-Za-z0-9_.-]+", "_", name)).as_uri()
        try:
            return client.create_experiment(name, artifact_location=artifact_location, tags=experiment_ui_tags())
        except MlflowException as err:
            # Another process (a server's other client, or one that does not take the lock) created it
            # between the lookup and the creation: take that one.
            experiment = client.get_experiment_by_name(name) if _is_already_exists(err) else None
            if experiment is None:
                raise
            _add_missing_tags(client, experiment.experiment_id, dict(experiment.tags))
            return experiment.experiment_id


def _add_missing_tags(client: MlflowClient, experiment_id: str, tags: dict[str, str]) -> None:
    """Set the `experiment_ui_tags` that an experiment lacks (one that has a tag keeps its value: a user may
    have chosen another kind, or edited the view)."""
    for key, value in experiment_ui_tags().items():
        if key in tags:
            continue
        try:
            client.set_experiment_tag(experiment_id, key, value)
        except MlflowException:
            # another process set it at the same moment (a server's store may refuse the second insert)
            if key not in client.get_experiment(experiment_id).tags:
                raise


def _is_already_exists(err: MlflowException) -> bool:
    """Whether a failed creation says the name is taken: MLflow's own code, or the database's unique
    constraint as MLflow passes it on (a server reports an IntegrityError raised at commit as BAD_REQUEST)."""
    text = str(err)
    return (err.error_code == "RESOURCE_ALREADY_EXISTS" or "IntegrityError" in text
            or any(words in text.lower() for words in ("unique constraint", "duplicate key", "duplicate entry")))


def final_metrics(run_ids: Sequence[str], tracking_uri: str | None = None) -> dict[str, dict[str, float]]:
    """Each run's latest value of every metric it logged, keyed by run id."""
    client = open_client(tracking_uri)
    return {run_id: dict(client.get_run(run_id).data.metrics) for run_id in run_ids}


def list_runs(experiment: str, tracking_uri: str | None = None, max_results: int = 200) -> list[dict[str, Any]]:
    """The runs of an experiment, newest first: id, name, status, tags, latest metrics, rounds logged
    (an experiment that does not exist has no runs)."""
    client = open_client(tracking_uri)
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
    client = open_client(tracking_uri)
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

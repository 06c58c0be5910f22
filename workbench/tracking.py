"""The only module that imports mlflow: the logging callback, model files, and queries over logged runs."""

from __future__ import annotations

import csv
import functools
import itertools
import json
import math
import os
import re
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import requests
import torch
from matplotlib.figure import Figure
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from workbench.config import ExperimentConfig, knobs
from workbench.execution import Executor
from workbench.models import build_model
from workbench.partition import describe, partition_hash
from workbench.plots import comparison_figure, partition_heatmap, to_png
from workbench.simulation import Callback, Federation, History, RoundResult, prepare, run

DEFAULT_EXPERIMENT = "workbench"
MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"
CLIENT_TABLE = "clients/client_rounds.csv"
#: Rounds that end less than this many seconds after the last send to MLflow wait and go with the next
#: one: a store write costs 10-20 ms of CPU, as much as a whole round of a small model. Every metric
#: still gets exactly one point per round, at step = round; 0 sends every round on its own.
#: `$WORKBENCH_FLUSH_EVERY_S` overrides it for every run (say, to watch a live demo round by round).
FLUSH_ENV = "WORKBENCH_FLUSH_EVERY_S"
FLUSH_EVERY_S = 2.0
#: Where checkpoints wait (hard links, no copies) until they are uploaded, laid out as the run's artifact
#: tree: `next/` collects the rounds since the last send; a send renames it `send_<n>/` and uploads it.
UNPUBLISHED_DIR = "unpublished"
_MLFLOW_METRIC_LIMIT = 1000  # log_batch accepts at most 1000 metrics per call
CLIENT_COLUMNS = ("round", "client", "is_sampled", "num_samples", "num_epochs", "is_partial", "train_loss",
                  "update_norm", "drift", "test_accuracy")
#: Where a run keeps its state on this machine until MLflow has all of it (overridable per call).
STATE_DIR_ENV = "WORKBENCH_STATE_DIR"
#: What a lost tracking server (or a broken store) raises from the MLflow client.
TRACKING_ERRORS = (MlflowException, requests.RequestException, OSError)
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
    """Records a run in MLflow: config as params, tags, one metric batch per round, checkpoints, the
    per-client table and the final model.

    A run that raises ends FAILED and one interrupted (Ctrl-C, a stop event) ends KILLED; what was logged
    stays, and its last round's checkpoint is logged so that `resume` can continue it. Each round's
    checkpoint and metrics are first written to a local state folder, then sent to MLflow by a background
    thread while the next rounds train: every `flush_every_s` seconds the rounds that ended since go in one
    metric batch with their checkpoints (one send in flight at most). A run whose tracking server goes away
    stops with `TrackingUnavailable` at the end of the round in which that shows, and loses nothing:
    `resume` sends the rest from the local state.
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT,
                 run_name: str | None = None, extra_tags: dict[str, str] | None = None, *,
                 parent_run_id: str | None = None, state_dir: str | Path | None = None,
                 flush_every_s: float | None = None):
        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.experiment = experiment
        self.run_name = run_name
        self.extra_tags = dict(extra_tags or {})
        if parent_run_id:
            self.extra_tags["mlflow.parentRunId"] = parent_run_id
        self.state_root = Path(state_dir or os.environ.get(STATE_DIR_ENV) or default_state_root())
        self.client = MlflowClient(self.tracking_uri)
        self.run_id: str | None = None
        self._resume_from: Checkpoint | None = None
        self._last_round = 0
        self._last_state: dict[str, torch.Tensor] | None = None
        self._best_round, self._best_value = 0, -math.inf
        self._uploaded_round = -1
        self._spec: dict[str, Any] = {}
        self._last_server_state: dict[str, torch.Tensor] = {}
        self._local_round = -1  # the round whose checkpoint the local state folder holds
        self._logged_before_resume = 0
        self.flush_every_s = flush_every_s if flush_every_s is not None else flush_interval()
        self._publisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-publish")
        self._in_flight: Future | None = None
        #: metrics of the rounds not sent yet (their checkpoints wait in `unpublished/next/`)
        self._unsent: list[tuple[int, dict[str, float]]] = []
        self._sends = 0
        self._last_flush = 0.0

    @property
    def state_folder(self) -> Path:
        """This run's local state: latest checkpoint, every round's metrics, the client table."""
        return self.state_root / str(self.run_id)

    def on_run_start(self, federation: Federation) -> None:
        check_tracking_uri(self.tracking_uri)
        if self._resume_from is not None:
            self._start_resumed(federation)
            return
        config = federation.config
        experiment_id = get_or_create_experiment(self.client, self.tracking_uri, self.experiment)
        tags = {
            "algorithm": config.strategy.name,
            "dataset": config.data.name,
            "partition": config.partition.scheme,
            "model": config.model.name,
            "seed": str(config.seed),
            "partition_hash": partition_hash(federation.clients),
            **self.extra_tags,
        }
        name = self.run_name or f"{config.strategy.name}-{config.data.name}-{config.partition.scheme}-s{config.seed}"
        run = self.client.create_run(experiment_id, run_name=name, tags=tags)
        self.run_id = run.info.run_id
        self._open_state_folder(federation)
        params = {**config.to_flat(), "resolved_device": str(federation.device),
                  "torch_threads": torch.get_num_threads(),
                  **{f"resolved_{k}": v for k, v in federation.execution.items()}}
        items = [Param(k, str(v)) for k, v in params.items()]
        for start in range(0, len(items), _MLFLOW_PARAM_LIMIT):
            self.client.log_batch(self.run_id, params=items[start:start + _MLFLOW_PARAM_LIMIT])
        now = _now_ms()
        self.client.log_batch(self.run_id, metrics=[
            Metric(f"partition_{k}", float(v), now, 0) for k, v in federation.partition_stats.items()
        ])
        # the partition's files and heatmap (a figure to render: the slowest part of a run's start)
        # are logged while the first round trains
        self._in_flight = self._publisher.submit(log_partition, self.client, self.run_id, federation)
        self._last_flush = time.monotonic()

    def on_round_end(self, result: RoundResult, federation: Federation) -> None:
        # Local first (milliseconds, and all a resume needs); MLflow in the background while the next
        # rounds train, from hard links to this round's checkpoint files (the local ones move on meanwhile).
        self._last_round = result.round
        self._last_state = {k: v.detach().to("cpu", copy=True) for k, v in federation.model.state_dict().items()}
        self._last_server_state = server_state(federation)
        accuracy = result.metrics.get("test_accuracy")
        is_best = accuracy is not None and accuracy > self._best_value
        if is_best:
            self._best_round, self._best_value = result.round, accuracy
        with open(self.state_folder / "metrics.jsonl", "a") as file:
            file.write(json.dumps({"round": result.round, "metrics": result.metrics}) + "\n")
        with open(self.state_folder / "client_rounds.csv", "a", newline="") as file:
            csv.writer(file).writerows(client_rows(result))
        self._write_local_checkpoint()
        every, rounds = federation.config.checkpoint.every, federation.config.federation.rounds
        names = [f"round_{result.round:04d}"] if (every and result.round % every == 0) or result.round == rounds else []
        names += ["best"] if is_best else []
        metrics = dict(result.metrics) if result.round > self._logged_before_resume else {}
        for name in names:
            self._stage_checkpoint(name)
        self._unsent.append((result.round, metrics))
        if self._in_flight is not None and self._in_flight.done():
            self._wait_in_flight(result.round)  # raises if that send failed
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self._flush(result.round)

    def _flush(self, round_: int) -> None:
        """Send the rounds not sent yet, on the publishing thread, after the previous send is through."""
        self._wait_in_flight(round_)
        unsent, self._unsent = self._unsent, []
        staged = self.state_folder / UNPUBLISHED_DIR / "next"
        send = None
        if staged.exists():
            # with the client table as of the last round sent: one upload per send, not one per checkpoint
            (staged / os.path.dirname(CLIENT_TABLE)).mkdir(exist_ok=True)
            shutil.copyfile(self.state_folder / os.path.basename(CLIENT_TABLE), staged / CLIENT_TABLE)
            self._sends += 1
            send = staged.rename(staged.with_name(f"send_{self._sends:04d}"))
        if unsent or send:
            self._in_flight = self._publisher.submit(self._publish, unsent, send)
        self._last_flush = time.monotonic()

    def _publish(self, unsent: list[tuple[int, dict[str, float]]], send: Path | None) -> None:
        """On the publishing thread: the rounds' metrics in one batch (one point per metric and round),
        then their checkpoints and the client table in one upload."""
        now = _now_ms()
        metrics = [Metric(k, float(v), now, round_) for round_, values in unsent for k, v in values.items()]
        for start in range(0, len(metrics), _MLFLOW_METRIC_LIMIT):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + _MLFLOW_METRIC_LIMIT])
        if send is not None:
            self._upload_tree(send)

    def _wait_in_flight(self, round_: int) -> None:
        """Wait for the send in flight; raise `TrackingUnavailable` if it failed."""
        future, self._in_flight = self._in_flight, None
        if future is None:
            return
        try:
            future.result()
        except TRACKING_ERRORS as err:
            raise TrackingUnavailable(
                f"MLflow at {self.tracking_uri} stopped answering ({type(err).__name__}); the run stopped "
                f"after round {round_} and nothing is lost: its state is kept in {self.state_folder}; "
                f"once the server is back, continue with: workbench resume {self.run_id} "
                f"--tracking-uri {self.tracking_uri}") from err

    def on_run_end(self, history: History, federation: Federation, error: BaseException | None) -> None:
        try:
            self._finish(history, federation, error)
        finally:
            self._publisher.shutdown(wait=True)

    def _finish(self, history: History, federation: Federation, error: BaseException | None) -> None:
        if self.run_id is None or isinstance(error, TrackingUnavailable):
            return  # the server is gone: the run stays RUNNING there and its state is kept locally
        try:
            self._flush(self._last_round)
            self._wait_in_flight(self._last_round)
            if error is not None:
                self.client.set_tag(self.run_id, "error", f"{type(error).__name__}: {error}"[:5000])
            if self._last_state is not None and self._uploaded_round != self._last_round:
                # The last round's checkpoint, whatever the policy: a killed run resumes from there.
                if self._local_round != self._last_round:
                    self._write_local_checkpoint()
                self._upload_checkpoint(self.state_folder, f"round_{self._last_round:04d}", self._last_round)
                self.client.log_artifact(self.run_id, str(self.state_folder / os.path.basename(CLIENT_TABLE)),
                                         os.path.dirname(CLIENT_TABLE))
            if self._best_round:
                self.client.set_tag(self.run_id, "best_round", str(self._best_round))
            if history.status == "FINISHED":
                log_model(self.client, self.run_id, federation)
            status = history.status if history.status in ("FINISHED", "FAILED", "KILLED") else "FAILED"
            self.client.set_terminated(self.run_id, status=RunStatus.to_string(RunStatus.from_string(status)))
        except (TrackingUnavailable, *TRACKING_ERRORS) as err:
            message = (f"MLflow at {self.tracking_uri} stopped answering at the end of the run "
                       f"({type(err).__name__}); its state is kept in {self.state_folder}; continue with: "
                       f"workbench resume {self.run_id} --tracking-uri {self.tracking_uri}")
            if error is None:
                raise TrackingUnavailable(message) from err
            error.add_note(message)  # keep the run's own error as the one the caller sees
            return
        if history.status == "FINISHED":
            shutil.rmtree(self.state_folder, ignore_errors=True)

    # ----- local state, checkpoints, resume -----

    def _open_state_folder(self, federation: Federation) -> None:
        self._spec = model_spec(federation)
        self.state_folder.mkdir(parents=True, exist_ok=True)
        (self.state_folder / "run.json").write_text(json.dumps(
            {"run_id": self.run_id, "tracking_uri": self.tracking_uri, "experiment": self.experiment}))
        with open(self.state_folder / "client_rounds.csv", "w", newline="") as file:
            csv.writer(file).writerow(CLIENT_COLUMNS)
        (self.state_folder / "metrics.jsonl").write_text("")

    def _write_local_checkpoint(self) -> None:
        """The last round's state as this run's local checkpoint (what `_upload_checkpoint` sends)."""
        write_checkpoint(self.state_folder / "checkpoint", self._spec, self._last_state, self._last_round,
                         self._best_round, self._best_value, self._last_server_state,
                         spec_unchanged=self._local_round >= 0)
        self._local_round = self._last_round

    def _stage_checkpoint(self, name: str) -> None:
        """The local checkpoint, to be uploaded as `checkpoints/<name>/` with the next send: hard links, as
        later rounds replace the local files (write beside, rename), never rewrite them."""
        target = self.state_folder / UNPUBLISHED_DIR / "next" / CHECKPOINT_DIR / name
        shutil.rmtree(target, ignore_errors=True)  # an earlier "best" of the same send
        target.mkdir(parents=True)
        for source in (self.state_folder / "checkpoint").iterdir():
            try:
                os.link(source, target / source.name)
            except OSError:  # a file system without hard links
                shutil.copy2(source, target / source.name)

    def _upload_tree(self, send: Path) -> None:
        """A staged send (checkpoints and client table, laid out as the run's artifacts) in one upload."""
        self.client.log_artifacts(self.run_id, str(send))
        rounds = [int(p.name.removeprefix("round_")) for p in (send / CHECKPOINT_DIR).glob("round_*")]
        self._uploaded_round = max([self._uploaded_round, *rounds])
        shutil.rmtree(send)

    def _upload_checkpoint(self, folder: Path, name: str, round_: int) -> None:
        """`folder`'s checkpoint (of round `round_`) as `checkpoints/<name>/`: the files as written locally,
        not serialised a second time."""
        self.client.log_artifacts(self.run_id, str(folder / "checkpoint"), f"{CHECKPOINT_DIR}/{name}")
        if name != "best":
            self._uploaded_round = max(self._uploaded_round, round_)

    def _start_resumed(self, federation: Federation) -> None:
        """Reopen the run: log what only the local state holds, trim the client table to the checkpoint."""
        checkpoint = self._resume_from
        self.run_id = checkpoint.run_id
        self._spec = model_spec(federation)
        self._last_round, self._last_state = checkpoint.round, checkpoint.state
        self._last_server_state = checkpoint.server_state
        self._uploaded_round = checkpoint.round if checkpoint.is_remote else -1
        self._best_round, self._best_value = checkpoint.best_round, checkpoint.best_value
        try:
            logged = self.client.get_metric_history(self.run_id, "num_updates")
            self._logged_before_resume = max((m.step for m in logged), default=0)
            local = self.state_folder
            pending = []
            if (local / "metrics.jsonl").exists():
                for line in (local / "metrics.jsonl").read_text().splitlines():
                    entry = json.loads(line)
                    if self._logged_before_resume < entry["round"] <= checkpoint.round:
                        pending.append(entry)
            rows = [r for r in self._client_table_rows(local) if int(r[0]) <= checkpoint.round]
            local.mkdir(parents=True, exist_ok=True)
            with open(local / "client_rounds.csv", "w", newline="") as file:
                writer = csv.writer(file)
                writer.writerow(CLIENT_COLUMNS)
                writer.writerows(rows)
            with open(local / "metrics.jsonl", "w") as file:
                file.writelines(json.dumps(e) + "\n" for e in pending)
            self._write_local_checkpoint()  # what the next uploads send (it may have come from MLflow)
            self._restage_unsent(checkpoint, federation.config.checkpoint.every)
            self.client.update_run(self.run_id, status="RUNNING")
            self.client.set_tag(self.run_id, "resumed_from_round", str(checkpoint.round))
            now = _now_ms()
            for entry in pending:
                self.client.log_batch(self.run_id, metrics=[
                    Metric(k, float(v), now, entry["round"]) for k, v in entry["metrics"].items()])
                self._logged_before_resume = max(self._logged_before_resume, entry["round"])
        except TRACKING_ERRORS as err:
            raise TrackingUnavailable(f"MLflow at {self.tracking_uri} cannot reopen run {self.run_id} "
                                      f"({type(err).__name__}: {err}); try again once it answers") from err

    def _restage_unsent(self, checkpoint: Checkpoint, every: int) -> None:
        """Stage for the first send what a killed run left unsent (oldest first, later rounds' "best"
        winning), and the checkpoint it resumes from when the policy asks for it and the kill came before
        it was staged."""
        unpublished = self.state_folder / UNPUBLISHED_DIR
        staged = unpublished / "next" / CHECKPOINT_DIR
        for send in sorted(unpublished.glob("send_*")):
            for folder in sorted((send / CHECKPOINT_DIR).glob("*")):
                shutil.rmtree(staged / folder.name, ignore_errors=True)
                staged.mkdir(parents=True, exist_ok=True)
                folder.rename(staged / folder.name)
            shutil.rmtree(send)
        for folder in list(staged.glob("round_*")):
            if int(folder.name.removeprefix("round_")) > checkpoint.round:  # cannot happen, but never upload it
                shutil.rmtree(folder)
        name = f"round_{checkpoint.round:04d}"
        if (not checkpoint.is_remote and every and checkpoint.round % every == 0 and not (staged / name).exists()
                and checkpoint.round not in checkpoint_rounds(self.client, self.run_id)):
            self._stage_checkpoint(name)

    def _client_table_rows(self, local: Path) -> list[list[str]]:
        """The client table so far: the local copy when this machine ran it, else MLflow's."""
        path = local / "client_rounds.csv"
        if not path.exists():
            with tempfile.TemporaryDirectory() as folder:
                try:
                    path = Path(self.client.download_artifacts(self.run_id, CLIENT_TABLE, folder))
                    return list(csv.reader(path.read_text().splitlines()))[1:]
                except MlflowException:
                    return []
        return list(csv.reader(path.read_text().splitlines()))[1:]


def model_spec(federation: Federation) -> dict[str, Any]:
    """What rebuilds the global model's class: its name and shapes."""
    return {
        "model": federation.config.model.name,
        "input_shape": list(federation.dataset.input_shape),
        "num_classes": federation.dataset.num_classes,
    }


def log_model(client: MlflowClient, run_id: str, federation: Federation) -> None:
    """The global model's weights as safetensors (no pickled code) plus what rebuilds its class."""
    spec = model_spec(federation)
    with tempfile.TemporaryDirectory() as folder:
        state = {k: v.detach().cpu().contiguous() for k, v in federation.model.state_dict().items()}
        save_file(state, os.path.join(folder, "weights.safetensors"))
        Path(folder, "model.json").write_text(json.dumps(spec, indent=2))
        client.log_artifacts(run_id, folder, MODEL_DIR)


def load_model(run_id: str, tracking_uri: str | None = None, round: int | str | None = None) -> nn.Module:
    """A run's global model, rebuilt as its own class with the logged weights: the final one, the one
    checkpointed after `round` N, or `round="best"` (highest test accuracy).

    Only safetensors files are read: a pickled checkpoint (which could run code when loaded) is refused.
    """
    client = MlflowClient(tracking_uri or default_tracking_uri())
    if round is None:
        path = MODEL_DIR
    elif round == "best":
        path = f"{CHECKPOINT_DIR}/best"
    elif isinstance(round, int) and not isinstance(round, bool):
        path = f"{CHECKPOINT_DIR}/round_{round:04d}"
        available = checkpoint_rounds(client, run_id)
        if round not in available:
            raise ValueError(f"round={round} has no checkpoint in run {run_id}; checkpointed rounds: "
                             f"{available or 'none'} (pick one, or load round='best' or the final model)")
    else:
        raise TypeError(f"round must be an int, 'best' or None, got {round!r}")
    with tempfile.TemporaryDirectory() as folder:
        try:
            local = Path(client.download_artifacts(run_id, path, folder))
        except MlflowException as err:
            raise ValueError(f"run {run_id} has no {path!r} artifacts (a run that did not finish has no "
                             f"final model: load one of its checkpoints with round=N)") from err
        spec, state, _ = read_checkpoint(local)
    return build_ready_model(spec, state)


def build_ready_model(spec: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> nn.Module:
    model = build_model(spec["model"], tuple(spec["input_shape"]), spec["num_classes"], torch.Generator())
    model.load_state_dict(state)
    return model.eval()


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


def flush_interval() -> float:
    """`$WORKBENCH_FLUSH_EVERY_S` (seconds, >= 0) when set, else `FLUSH_EVERY_S`."""
    value = os.environ.get(FLUSH_ENV, "").strip()
    if not value:
        return FLUSH_EVERY_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ValueError(f"{FLUSH_ENV}={value!r} is not a number of seconds >= 0 (how often rounds are sent to "
                         f"MLflow; 0 = every round); unset it for the default {FLUSH_EVERY_S:g}")
    return seconds


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


# ----- checkpoints: safetensors only -----


@dataclass(frozen=True)
class Checkpoint:
    """The state after `round`: all a resume needs (random streams are derived from seed and round)."""

    run_id: str
    round: int
    state: dict[str, torch.Tensor]
    server_state: dict[str, torch.Tensor]
    best_round: int
    best_value: float
    is_remote: bool


def server_state(federation: Federation) -> dict[str, torch.Tensor]:
    """The strategy's own state (server momentum, control variates, ...), for strategies that keep one:
    they expose `state_dict()` / `load_state_dict()`. FedAvg and FedProx keep none."""
    state_dict = getattr(federation.strategy, "state_dict", None)
    return {k: v.detach().to("cpu", copy=True) for k, v in state_dict().items()} if state_dict else {}


def write_checkpoint(folder: Path, spec: Mapping[str, Any], state: Mapping[str, torch.Tensor], round_: int,
                     best_round: int, best_value: float, strategy_state: Mapping[str, torch.Tensor], *,
                     spec_unchanged: bool = False) -> None:
    """`weights.safetensors` (round and best-so-far in its metadata) and `model.json` (kept as it is when
    `spec_unchanged` and present); each file is written beside and renamed into place, so a run killed
    mid-write leaves the previous checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"round": str(round_), "best_round": str(best_round), "best_value": repr(float(best_value)),
                "spec": json.dumps(dict(spec))}
    files = {"weights.safetensors": {k: v.contiguous() for k, v in state.items()}}
    if strategy_state:
        files["server.safetensors"] = {k: v.contiguous() for k, v in strategy_state.items()}
    for name, tensors in files.items():
        save_file(tensors, str(folder / f".{name}.tmp"), metadata=metadata)
        os.replace(folder / f".{name}.tmp", folder / name)
    if not (spec_unchanged and (folder / "model.json").exists()):
        (folder / ".model.json.tmp").write_text(json.dumps(dict(spec), indent=2))
        os.replace(folder / ".model.json.tmp", folder / "model.json")


_PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".joblib")


def read_checkpoint(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """(model spec, weights, metadata) of a checkpoint or model folder; refuses anything but safetensors."""
    weights = folder / "weights.safetensors"
    if not weights.exists():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(f"refusing to load {pickles[0]!r} from {folder.name!r}: pickled checkpoints can run "
                             f"code when loaded; workbench reads only weights.safetensors (re-save the state "
                             f"with safetensors.torch.save_file)")
        raise ValueError(f"{folder.name!r} holds no weights.safetensors")
    try:
        state = load_file(str(weights))
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as handle:
            metadata = dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{folder.name}/weights.safetensors is not a valid safetensors file ({err}); refusing "
                         f"to load it any other way") from err
    spec_file = folder / "model.json"
    spec = json.loads(spec_file.read_text()) if spec_file.exists() else json.loads(metadata.get("spec", "{}"))
    if not {"model", "input_shape", "num_classes"} <= set(spec):
        raise ValueError(f"{folder.name} has no model spec (model.json with model, input_shape, num_classes)")
    return spec, state, metadata


def checkpoint_rounds(client: MlflowClient, run_id: str) -> list[int]:
    """The rounds whose checkpoint a run logged to MLflow, in order."""
    names = [Path(a.path).name for a in client.list_artifacts(run_id, CHECKPOINT_DIR) if a.is_dir]
    return sorted(int(n.removeprefix("round_")) for n in names if re.fullmatch(r"round_\d+", n))


def _checkpoint_from(folder: Path, run_id: str, is_remote: bool) -> Checkpoint:
    _, state, metadata = read_checkpoint(folder)
    server_file = folder / "server.safetensors"
    return Checkpoint(run_id, int(metadata["round"]), state,
                      load_file(str(server_file)) if server_file.exists() else {},
                      int(metadata.get("best_round", 0)), float(metadata.get("best_value", "-inf")), is_remote)


def latest_checkpoint(run_id: str, tracking_uri: str | None = None,
                      state_dir: str | Path | None = None) -> Checkpoint | None:
    """The newest checkpoint of a run: this machine's local state or MLflow's, whichever is later."""
    client = MlflowClient(tracking_uri or default_tracking_uri())
    candidates = []
    local = Path(state_dir or default_state_root()) / run_id / "checkpoint"
    if (local / "weights.safetensors").exists():
        candidates.append(_checkpoint_from(local, run_id, is_remote=False))
    rounds = checkpoint_rounds(client, run_id)
    if rounds and (not candidates or rounds[-1] >= candidates[0].round):
        with tempfile.TemporaryDirectory() as folder:
            path = client.download_artifacts(run_id, f"{CHECKPOINT_DIR}/round_{rounds[-1]:04d}", folder)
            candidates.append(_checkpoint_from(Path(path), run_id, is_remote=True))
    return max(candidates, key=lambda c: (c.round, c.is_remote), default=None)


def config_from_params(params: Mapping[str, str]) -> ExperimentConfig:
    """The config a run logged as params (keys it lacks, from older versions, take their defaults)."""
    known = {k.key for k in knobs()}
    return ExperimentConfig().with_overrides({k: v for k, v in params.items() if k in known})


def resume(run_id: str, tracking_uri: str | None = None, callbacks: Sequence[Callback] = (), *,
           executor: Executor | None = None, stop: threading.Event | None = None,
           state_dir: str | Path | None = None) -> History:
    """Continue a crashed, killed or stopped run from its latest checkpoint, in the same MLflow run.

    Model, strategy state and round counter come from the checkpoint; every random stream is derived from
    (seed, round, client), so the run ends with the same model and metrics as an uninterrupted one, with
    one metric point per round. Raises `ValueError` for a run that cannot be resumed.
    """
    tracking_uri = tracking_uri or default_tracking_uri()
    check_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    try:
        logged = client.get_run(run_id)
    except MlflowException as err:
        raise ValueError(f"no MLflow run {run_id!r} in {tracking_uri} (check the run id and --tracking-uri)") from err
    if logged.info.status == "FINISHED":
        raise ValueError(f"run {run_id} is already FINISHED, nothing to resume (start a new run instead)")
    config = config_from_params(logged.data.params)
    federation = prepare(config)
    checkpoint = latest_checkpoint(run_id, tracking_uri, state_dir)
    if checkpoint is None:  # killed before its first round ended: start from the same initial model
        checkpoint = Checkpoint(run_id, 0, {k: v.detach().cpu().clone() for k, v in federation.model.state_dict().items()},
                                {}, 0, -math.inf, is_remote=False)
    federation.model.load_state_dict(checkpoint.state)
    if checkpoint.server_state:
        federation.strategy.load_state_dict(checkpoint.server_state)
    experiment = client.get_experiment(logged.info.experiment_id).name
    tracker = MlflowCallback(tracking_uri, experiment=experiment, state_dir=state_dir)
    tracker._resume_from = checkpoint
    return run(federation, [tracker, *callbacks], executor, stop=stop, start_round=checkpoint.round + 1)


def client_rows(result: RoundResult) -> list[list[Any]]:
    """One row per client that trained or was evaluated in this round (columns `CLIENT_COLUMNS`)."""
    rows = []
    for client in sorted(set(result.client_metrics) | set(result.client_accuracy) | set(result.sampled)):
        m = result.client_metrics.get(client, {})
        rows.append([result.round, client, int(client in result.sampled),
                     *(_cell(m.get(k)) for k in ("num_samples", "num_epochs", "is_partial", "train_loss",
                                                 "update_norm", "drift")),
                     _cell(result.client_accuracy.get(client))])
    return rows


def _cell(value: float | None) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(float(value))


# ----- sweeps and comparison -----

#: Tag of a sweep's parent run; its children carry `mlflow.parentRunId`, `sweep_id` and `sweep_group`.
SWEEP_PARENT_TAG = "workbench.sweep"


@dataclass(frozen=True)
class Sweep:
    """A sweep's parent run and its child runs, one per grid point and seed, in the order they ran."""

    parent_run_id: str
    child_run_ids: tuple[str, ...]
    experiment: str


def sweep_configs(base: ExperimentConfig, grid: Mapping[str, Sequence[Any]],
                  seeds: Sequence[int]) -> list[tuple[str, ExperimentConfig]]:
    """(group label, config) for every grid point × seed, all validated before anything runs."""
    if "seed" in grid:
        raise ValueError("--grid seed=... is not a grid key: list seeds with --seeds 0,1,2")
    for key, values in grid.items():
        if not values:
            raise ValueError(f"--grid {key}= has no values (write --grid {key}=v1,v2)")
    if not seeds:
        raise ValueError("--seeds has no values (write --seeds 0,1,2)")
    points = []
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values))
        group = ", ".join(f"{k}={v}" for k, v in point.items()) or "base"
        for seed in seeds:
            points.append((group, base.with_overrides({**point, "seed": seed})))
    return points


def sweep(base: ExperimentConfig, grid: Mapping[str, Sequence[Any]], seeds: Sequence[int] = (0,),
          tracking_uri: str | None = None, experiment: str = "sweep", *,
          callbacks: Callable[[str], Sequence[Callback]] | None = None, stop: threading.Event | None = None,
          state_dir: str | Path | None = None) -> Sweep:
    """Run every grid point × seed as a child of one parent MLflow run, then log the comparison of the
    children (table and figure) on the parent. `callbacks(label)` adds observers (progress bars) per child.

    The MLflow UI groups the children under the parent; their `sweep_group` tag names the grid point.
    """
    tracking_uri = tracking_uri or default_tracking_uri()
    points = sweep_configs(base, grid, seeds)
    check_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment_id = get_or_create_experiment(client, tracking_uri, experiment)
    keys = ",".join(grid) or "seeds"
    parent = client.create_run(experiment_id, run_name=f"sweep {keys} x{len(seeds)} seeds",
                               tags={SWEEP_PARENT_TAG: "parent", "sweep_keys": keys})
    parent_id = parent.info.run_id
    params = [Param(f"grid.{k}", ",".join(str(v) for v in values)) for k, values in grid.items()]
    params += [Param("seeds", ",".join(str(s) for s in seeds)), Param("num_runs", str(len(points)))]
    params += [Param(k, str(v)) for k, v in base.to_flat().items() if k not in grid and k != "seed"]
    for start in range(0, len(params), _MLFLOW_PARAM_LIMIT):
        client.log_batch(parent_id, params=params[start:start + _MLFLOW_PARAM_LIMIT])
    children: list[str] = []
    status = "FAILED"
    is_server_lost = False
    try:
        for group, config in points:
            label = f"{group} seed={config.seed}"
            tracker = MlflowCallback(tracking_uri, experiment=experiment, run_name=label, parent_run_id=parent_id,
                                     extra_tags={"sweep_id": parent_id, "sweep_group": group}, state_dir=state_dir)
            history = run(prepare(config), [tracker, *(callbacks(label) if callbacks else ())], stop=stop)
            children.append(tracker.run_id)
            if history.status != "FINISHED":
                status = history.status
                return Sweep(parent_id, tuple(children), experiment)
        comparison = compare(experiment, tracking_uri, sweep_id=parent_id)
        with tempfile.TemporaryDirectory() as folder:
            comparison.table.to_csv(Path(folder, "comparison.csv"), index=False)
            comparison.figure.savefig(Path(folder, "comparison.png"), dpi=100)
            client.log_artifacts(parent_id, folder, "comparison")
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except TrackingUnavailable:
        is_server_lost = True  # nothing more can be logged; the child that was running is resumable
        raise
    except Exception as err:
        client.set_tag(parent_id, "error", f"{type(err).__name__}: {err}"[:5000])
        raise
    finally:
        if not is_server_lost:
            client.set_terminated(parent_id, status=status)
    return Sweep(parent_id, tuple(children), experiment)


@dataclass
class Comparison:
    """Runs grouped by the config keys they vary: one table row and one curve per group."""

    table: "pandas.DataFrame"  # noqa: F821 - pandas comes with mlflow
    figure: Figure
    metric: str
    target: float
    varied_keys: tuple[str, ...]
    #: group -> run id -> [(round, value), ...]
    curves: dict[str, dict[str, list[tuple[int, float]]]]


def compare(experiment: str, tracking_uri: str | None = None, metric: str = "test_accuracy", *,
            sweep_id: str | None = None, target: float | None = None) -> Comparison:
    """Compare the finished runs of an experiment (or of one sweep): group them by the config keys whose
    values differ (seeds are averaged over), and return a table (final value mean ± std, best value, rounds
    to reach `target`) and a figure (learning curves mean ± std, final values).

    Without `target`, it is the final mean of the weakest group: the level every group ends up reaching,
    so 'rounds to target' says which gets there first. Lower is better for metrics named `*loss*`.
    """
    import pandas

    client = MlflowClient(tracking_uri or default_tracking_uri())
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"no MLflow experiment named {experiment!r} (experiments: {', '.join(names) or 'none'})")
    runs = [r for r in client.search_runs([found.experiment_id], "attributes.status = 'FINISHED'", max_results=5000)
            if r.data.tags.get(SWEEP_PARENT_TAG) != "parent"
            and (sweep_id is None or r.data.tags.get("sweep_id") == sweep_id)]
    if not runs:
        where = f"sweep {sweep_id}" if sweep_id else f"experiment {experiment!r}"
        raise ValueError(f"{where} has no FINISHED runs to compare (run some with workbench run / sweep)")
    config_keys = [k.key for k in knobs() if k.key != "seed"]
    varied = tuple(k for k in config_keys if len({r.data.params.get(k) for r in runs}) > 1)
    groups: dict[str, list] = {}
    for r in sorted(runs, key=lambda r: r.info.start_time):
        label = ", ".join(f"{k}={r.data.params.get(k)}" for k in varied) or "all runs"
        groups.setdefault(label, []).append(r)
    curves = {label: {r.info.run_id: sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, metric)
                                            if m.step > 0) for r in members}
              for label, members in groups.items()}
    curves = {label: {run_id: points for run_id, points in series.items() if points} for label, series in curves.items()}
    curves = {label: series for label, series in curves.items() if series}
    if not curves:
        raise ValueError(f"no run in {experiment!r} logged metric {metric!r} (try --metric test_accuracy)")
    higher_is_better = "loss" not in metric
    finals = {label: [points[-1][1] for points in series.values()] for label, series in curves.items()}
    if target is None:
        means = [float(np.mean(v)) for v in finals.values()]
        target = min(means) if higher_is_better else max(means)
    rows, mean_curves, final_stats = [], {}, {}
    for label, series in curves.items():
        members = {r.info.run_id: r for r in groups[label]}
        reached = [rounds_to_reach(points, target, higher_is_better) for points in series.values()]
        hits = [r for r in reached if r is not None]
        best = [max(v for _, v in p) if higher_is_better else min(v for _, v in p) for p in series.values()]
        final_mean, final_std = mean_std(finals[label])
        final_stats[label] = (final_mean, final_std)
        mean_curves[label] = mean_curve(list(series.values()))
        first = next(iter(members.values()))
        rows.append({"group": label, **{k: first.data.params.get(k) for k in varied},
                     "num_runs": len(series),
                     "seeds": ",".join(sorted((members[i].data.params.get("seed", "?") for i in series), key=str)),
                     f"final_{metric}_mean": final_mean, f"final_{metric}_std": final_std,
                     f"best_{metric}_mean": float(np.mean(best)),
                     "rounds_to_target_mean": float(np.mean(hits)) if hits else math.nan,
                     "reached_target": f"{len(hits)}/{len(reached)}"})
    table = pandas.DataFrame(rows)
    table.attrs.update(metric=metric, target=target)
    figure = comparison_figure(mean_curves, final_stats, metric, target)
    return Comparison(table, figure, metric, float(target), varied, curves)


def rounds_to_reach(points: Sequence[tuple[int, float]], target: float, higher_is_better: bool = True) -> int | None:
    """The first round whose value reaches `target` (>= it, or <= for a loss), else None."""
    for round_, value in points:
        if (value >= target) if higher_is_better else (value <= target):
            return round_
    return None


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def mean_curve(series: Sequence[Sequence[tuple[int, float]]]) -> tuple[list[int], list[float], list[float]]:
    """(rounds, mean, std) over runs, at the rounds every run logged."""
    common = sorted(set.intersection(*(set(r for r, _ in points) for points in series)))
    lookup = [dict(points) for points in series]
    stats = [mean_std([values[r] for values in lookup]) for r in common]
    return common, [m for m, _ in stats], [s for _, s in stats]


def format_comparison(comparison: Comparison) -> str:
    """The comparison table as aligned text, with its target stated."""
    table = comparison.table.drop(columns=list(comparison.varied_keys))
    text = table.to_string(index=False, float_format=lambda v: f"{v:.4f}")
    better = "<=" if "loss" in comparison.metric else ">="
    return f"{text}\n(rounds_to_target: first round with {comparison.metric} {better} {comparison.target:.4f})"


PARTITION_DIR = "partition"


def log_partition(client: MlflowClient, run_id: str, federation: Federation) -> None:
    """The run's partition under `partition/`: summary.json (statistics and hash), counts.csv (client x
    class), clients.npz (every client's sample indices) and heatmap.png."""
    labels = federation.dataset.y_train.cpu().numpy()
    stats = describe(labels, federation.clients, federation.dataset.num_classes)
    summary = {"scheme": federation.config.partition.scheme, "partition_hash": partition_hash(federation.clients),
               **stats.summary()}
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "summary.json").write_text(json.dumps(summary, indent=2))
        with open(Path(folder, "counts.csv"), "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["client", *(f"class_{c}" for c in range(stats.counts.shape[1])), "size"])
            writer.writerows([k, *row, size] for k, (row, size) in enumerate(zip(stats.counts.tolist(),
                                                                                  stats.sizes.tolist())))
        sizes = np.array([len(c) for c in federation.clients], dtype=np.int64)
        joined = np.concatenate(federation.clients).astype(np.int64) if len(sizes) else np.zeros(0, np.int64)
        np.savez_compressed(Path(folder, "clients.npz"), indices=joined, sizes=sizes)
        Path(folder, "heatmap.png").write_bytes(_heatmap_png(summary["partition_hash"], stats.counts))
        client.log_artifacts(run_id, folder, PARTITION_DIR)


@functools.lru_cache(maxsize=8)
def _heatmap_png_cached(partition_hash: str, counts_bytes: bytes, shape: tuple[int, int]) -> bytes:
    counts = np.frombuffer(counts_bytes, dtype=np.int64).reshape(shape)
    return to_png(partition_heatmap(counts), dpi=100)


def _heatmap_png(partition_hash: str, counts: np.ndarray) -> bytes:
    """The partition heatmap as PNG, drawn once per partition in a session: the runs of a comparison or
    a sweep usually share their partition, and drawing it takes longer than several rounds."""
    counts = np.ascontiguousarray(counts, dtype=np.int64)
    return _heatmap_png_cached(partition_hash, counts.tobytes(), counts.shape)


def load_partition(run_id: str, tracking_uri: str | None = None) -> list[np.ndarray]:
    """The client index arrays a run trained on, as logged by `log_partition`."""
    client = MlflowClient(tracking_uri or default_tracking_uri())
    with tempfile.TemporaryDirectory() as folder:
        local = Path(client.download_artifacts(run_id, f"{PARTITION_DIR}/clients.npz", folder))
        with np.load(local) as arrays:
            indices, sizes = arrays["indices"], arrays["sizes"]
    return np.split(indices, np.cumsum(sizes)[:-1]) if len(sizes) else []

"""`MlflowCallback`, which records a run in MLflow while it trains, and how often it sends rounds there."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping

import torch
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from workbench.models import describe_model
from workbench.partition import partition_hash
from workbench.simulation import Callback, Federation, History, RoundResult
from workbench.tasks import headline_metric, is_improvement
from workbench.tracking.checkpoints import (CHECKPOINT_DIR, Checkpoint, checkpoint_rounds, log_model, model_spec,
                                            server_state, write_checkpoint)
from workbench.tracking.deploy import log_served_model
from workbench.tracking.record import (CLIENT_COLUMNS, CLIENT_PARTS_DIR, CLIENT_TABLE, client_part_name,
                                      client_part_sessions, client_rows, download_client_rows, log_partition,
                                      partition_stat_params, read_client_rows, write_client_part)
from workbench.tracking.store import (DEFAULT_EXPERIMENT, KEY_METRICS, STATE_DIR_ENV, TRACKING_ERRORS,
                                      TrackingUnavailable, _now_ms, check_tracking_uri, default_state_root,
                                      default_tracking_uri, get_or_create_experiment, open_client)

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
_MLFLOW_PARAM_LIMIT = 100  # log_batch accepts at most 100 params per call
#: Where a resumed run keeps the error tag of the attempt it continues (its `error` tag is what the current
#: attempt raised, if anything: a resumed run that finishes has none).
PREVIOUS_ERROR_TAG = "previous_error"


class MlflowCallback(Callback):
    """Records a run in MLflow: config and the partition's statistics as params (`partition.stat.*`), tags,
    one metric batch per round, checkpoints, the per-client table and the final model.

    A run that raises ends FAILED and one interrupted (Ctrl-C, a stop event) ends KILLED; what was logged
    stays, and its last round's checkpoint is logged so that `resume` can continue it (the resumed run moves
    the interrupted attempt's `error` tag to `previous_error`). Each round's checkpoint and metrics are
    first written to a local state folder, then sent to MLflow by a background thread while the next rounds
    train: every `flush_every_s` seconds the rounds that ended since go in one metric batch with their
    checkpoints (one send in flight at most). A run whose tracking server goes away stops with
    `TrackingUnavailable` at the end of the round in which that shows, and loses nothing: `resume` sends
    the rest from the local state.
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT,
                 run_name: str | None = None, extra_tags: dict[str, str] | None = None, *,
                 parent_run_id: str | None = None, state_dir: str | Path | None = None,
                 flush_every_s: float | None = None, resume_from: Checkpoint | None = None):
        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.experiment = experiment
        self.run_name = run_name
        self.extra_tags = dict(extra_tags or {})
        if parent_run_id:
            self.extra_tags["mlflow.parentRunId"] = parent_run_id
        self.state_root = Path(state_dir or os.environ.get(STATE_DIR_ENV) or default_state_root())
        self.client = open_client(self.tracking_uri)
        self.run_id: str | None = None
        #: the checkpoint a resumed run continues from (None: a new run)
        self._resume_from = resume_from
        self._last_round = 0
        self._last_state: dict[str, torch.Tensor] | None = None
        self._best_round, self._best_value = 0, -math.inf
        self._uploaded_round = -1
        self._spec: dict[str, Any] = {}
        self._last_server_state: dict[str, torch.Tensor] = {}
        self._logged_before_resume = 0
        self.flush_every_s = flush_every_s if flush_every_s is not None else flush_interval()
        self._publisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-publish")
        self._in_flight: Future | None = None
        #: metrics of the rounds not sent yet (their checkpoints wait in `unpublished/next/`)
        self._unsent: list[tuple[int, dict[str, float]]] = []
        #: client table rows not sent yet (they go as one append-only part with the next send)
        self._unsent_rows: list[list[Any]] = []
        #: the first run is session 1, each resume the next one: part names never repeat
        self._session = 1
        self._sends = 0
        self._parts = 0
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
            "partition": federation.partition_scheme,
            "model": config.model.name,
            "seed": str(config.seed),
            "partition_hash": partition_hash(federation.clients),
            **self.extra_tags,
        }
        name = self.run_name or f"{config.strategy.name}-{config.data.name}-{federation.partition_scheme}-s{config.seed}"
        run = self.client.create_run(experiment_id, run_name=name, tags=tags)
        self.run_id = run.info.run_id
        self._open_state_folder(federation)
        params = {**config.to_flat(), **describe_model(config.model.name, federation.model),
                  "resolved_device": str(federation.device),
                  "resolved_partition_scheme": federation.partition_scheme, "torch_threads": torch.get_num_threads(),
                  **{f"resolved_{k}": v for k, v in federation.execution.items()},
                  **partition_stat_params(federation.partition_stats)}
        items = [Param(k, str(v)) for k, v in params.items()]
        for start in range(0, len(items), _MLFLOW_PARAM_LIMIT):
            self.client.log_batch(self.run_id, params=items[start:start + _MLFLOW_PARAM_LIMIT])
        if federation.data_description:  # the UI's Dataset column: name, digest and source of the data
            log_dataset_input(self.client, self.run_id, federation.data_description)
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
        # best = the task's headline metric: highest test_accuracy, lowest test_mse (= test_loss)
        headline, goal = headline_metric(federation.dataset.task)
        value = result.metrics.get(headline)
        is_best = value is not None and is_improvement(value, self._best_value if self._best_round else None, goal)
        if is_best:
            self._best_round, self._best_value = result.round, value
        with open(self.state_folder / "metrics.jsonl", "a") as file:
            file.write(json.dumps({"round": result.round, "metrics": result.metrics}) + "\n")
        rows = client_rows(result)
        with open(self.state_folder / "client_rounds.csv", "a", newline="") as file:
            csv.writer(file).writerows(rows)
        self._unsent_rows += rows
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
        rows, self._unsent_rows = self._unsent_rows, []
        staged = self.state_folder / UNPUBLISHED_DIR / "next"
        if rows:
            # the client table's rows since the last send, as a new part: the store never rewrites a file
            self._parts += 1
            (staged / CLIENT_PARTS_DIR).mkdir(parents=True, exist_ok=True)
            write_client_part(staged / CLIENT_PARTS_DIR / client_part_name(self._session, self._parts, len(rows)),
                              rows)
        send = None
        if staged.exists():
            self._sends += 1
            send = staged.rename(staged.with_name(f"send_{self._sends:04d}"))
        if unsent or send:
            self._in_flight = self._publisher.submit(self._publish, unsent, send)
        self._last_flush = time.monotonic()

    def _publish(self, unsent: list[tuple[int, dict[str, float]]], send: Path | None) -> None:
        """On the publishing thread: the rounds' metrics in one batch (one point per metric and round),
        then their client table part and their checkpoints."""
        now = _now_ms()
        metrics = [Metric(k, float(v), now, round_) for round_, values in unsent for k, v in _key_first(values)]
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
                # The last round's checkpoint, whatever the policy: a killed run resumes from there. The
                # local one holds it (every round and every resume writes it), as written.
                self.client.log_artifacts(self.run_id, str(self.state_folder / "checkpoint"),
                                          f"{CHECKPOINT_DIR}/round_{self._last_round:04d}")
            if history.status == "FINISHED":
                # the whole table, once: a FINISHED run is never resumed, so this file is never rewritten
                self.client.log_artifact(self.run_id, str(self.state_folder / os.path.basename(CLIENT_TABLE)),
                                         os.path.dirname(CLIENT_TABLE))
            if self._best_round:
                self.client.set_tag(self.run_id, "best_round", str(self._best_round))
            if history.stop_reason is not None:  # e.g. the privacy budget: FINISHED before its last round
                self.client.set_tag(self.run_id, "stop_reason", history.stop_reason[:5000])
            if history.status == "FINISHED":
                log_model(self.client, self.run_id, federation)
                log_served_model(self.client, self.run_id, federation)
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
        """The last round's state as this run's local checkpoint (what staged and final uploads send);
        model.json once per run folder."""
        write_checkpoint(self.state_folder / "checkpoint", self._spec, self._last_state, self._last_round,
                         self._best_round, self._best_value, self._last_server_state, spec_unchanged=True)

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
        """A staged send, laid out as the run's artifacts: the client table part first, then the checkpoints,
        so that a checkpoint in the store implies that the rows up to its round are there too."""
        for name in (os.path.dirname(CLIENT_TABLE), CHECKPOINT_DIR):
            if (send / name).exists():
                self.client.log_artifacts(self.run_id, str(send / name), name)
        rounds = [int(p.name.removeprefix("round_")) for p in (send / CHECKPOINT_DIR).glob("round_*")]
        self._uploaded_round = max([self._uploaded_round, *rounds])
        shutil.rmtree(send)

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
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:  # cut short by a kill, after its round's checkpoint
                        continue
                    if self._logged_before_resume < entry["round"] <= checkpoint.round:
                        pending.append(entry)
            parts = [Path(a.path).name for a in self.client.list_artifacts(self.run_id, CLIENT_PARTS_DIR)]
            self._session = max(client_part_sessions(parts), default=0) + 1
            is_local = (local / "client_rounds.csv").exists()
            table = (read_client_rows((local / "client_rounds.csv").read_text()) if is_local
                     else download_client_rows(self.client, self.run_id))
            rows = [r for r in table if int(r[0]) <= checkpoint.round]
            # This machine's rows may include rounds whose part a kill cut short in the store: send them
            # again, as one part of this session (each round's newest complete part counts).
            self._unsent_rows = list(rows) if is_local else []
            local.mkdir(parents=True, exist_ok=True)
            with open(local / ".client_rounds.csv.tmp", "w", newline="") as file:
                writer = csv.writer(file)
                writer.writerow(CLIENT_COLUMNS)
                writer.writerows(rows)
            os.replace(local / ".client_rounds.csv.tmp", local / "client_rounds.csv")  # a kill keeps the old
            with open(local / "metrics.jsonl", "w") as file:
                file.writelines(json.dumps(e) + "\n" for e in pending)
            self._write_local_checkpoint()  # what the next uploads send (it may have come from MLflow)
            self._restage_unsent(checkpoint, federation.config.checkpoint.every)
            self.client.update_run(self.run_id, status="RUNNING")
            self.client.set_tag(self.run_id, "resumed_from_round", str(checkpoint.round))
            self._clear_previous_error()
            self._publish([(entry["round"], entry["metrics"]) for entry in pending], None)
            self._logged_before_resume = max([self._logged_before_resume, *(e["round"] for e in pending)])
        except TRACKING_ERRORS as err:
            raise TrackingUnavailable(f"MLflow at {self.tracking_uri} cannot reopen run {self.run_id} "
                                      f"({type(err).__name__}: {err}); try again once it answers") from err

    def _clear_previous_error(self) -> None:
        """The interrupted attempt's `error` tag becomes `previous_error` (kept first, then the old one
        deleted: a kill between the two leaves both, never neither)."""
        error = self.client.get_run(self.run_id).data.tags.get("error")
        if error is None:
            return
        self.client.set_tag(self.run_id, PREVIOUS_ERROR_TAG, error)
        self.client.delete_tag(self.run_id, "error")

    def _restage_unsent(self, checkpoint: Checkpoint, every: int) -> None:
        """Stage for the first send what a killed run left unsent (oldest first, later rounds' "best"
        winning), and the checkpoint it resumes from when the policy asks for it and the kill came before
        it was staged."""
        unpublished = self.state_folder / UNPUBLISHED_DIR
        staged = unpublished / "next" / CHECKPOINT_DIR
        # parts of the client table left unsent: their rows go again in this session's first part
        shutil.rmtree(unpublished / "next" / os.path.dirname(CLIENT_TABLE), ignore_errors=True)
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


def _key_first(values: dict[str, float]) -> list[tuple[str, float]]:
    """A round's metrics with `KEY_METRICS` first: MLflow lists a run's metrics in the order they were first
    logged, and its compare view plots the first one unless told otherwise."""
    return ([(k, values[k]) for k in KEY_METRICS if k in values]
            + [(k, v) for k, v in values.items() if k not in KEY_METRICS])


def log_dataset_input(client: MlflowClient, run_id: str, description: Mapping[str, str],
                      context: str = "training") -> None:
    """Record a run's data as an MLflow dataset input (the UI's Dataset column and the run's Datasets).

    `description` holds `mlflow.entities.Dataset`'s fields, as `workbench.data.describe_dataset` returns
    them: name, digest, source_type, source, and optionally schema and profile (JSON text). `context` is
    the `mlflow.data.context` input tag ("training", "evaluation", ...).
    """
    missing = [key for key in ("name", "digest", "source_type", "source") if not description.get(key)]
    if missing:
        raise ValueError(f"the dataset description lacks {', '.join(missing)} (got keys {sorted(description)}); "
                         f"build it with workbench.data.describe_dataset(dataset)")
    dataset = Dataset(name=description["name"], digest=description["digest"],
                      source_type=description["source_type"], source=description["source"],
                      schema=description.get("schema"), profile=description.get("profile"))
    client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])])


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

"""Resuming a crashed, killed or stopped run from its latest checkpoint, in the same MLflow run."""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Mapping, Sequence

from mlflow.exceptions import MlflowException

from workbench.config import ExperimentConfig, knobs
from workbench.execution import Executor
from workbench.simulation import Callback, History, prepare, run
from workbench.tracking.callback import MlflowCallback
from workbench.tracking.checkpoints import Checkpoint, latest_checkpoint
from workbench.tracking.store import check_tracking_uri, default_tracking_uri, open_client

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
    client = open_client(tracking_uri)
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
    experiment = client.get_experiment(logged.info.experiment_id).name
    tracker = MlflowCallback(tracking_uri, experiment=experiment, state_dir=state_dir, resume_from=checkpoint)
    return run(federation, [tracker, *callbacks], executor, stop=stop, start_round=checkpoint.round + 1,
               strategy_state=checkpoint.server_state)

"""Sweeps: every grid point × seed run as a child of one parent MLflow run, with their comparison logged on it."""

from __future__ import annotations

import itertools
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from mlflow.entities import Param

from workbench.config import ExperimentConfig
from workbench.simulation import Callback, prepare, run
from workbench.tracking.callback import _MLFLOW_PARAM_LIMIT, MlflowCallback
from workbench.tracking.comparison import SWEEP_PARENT_TAG, compare
from workbench.tracking.store import (TrackingUnavailable, check_tracking_uri, default_tracking_uri,
                                      get_or_create_experiment, open_client)

@dataclass(frozen=True)
class Sweep:
    """A sweep's parent run and its child runs, one per grid point and seed, in the order they ran."""

    parent_run_id: str
    child_run_ids: tuple[str, ...]
    experiment: str


def sweep_configs(base: ExperimentConfig, grid: Mapping[str, Sequence[Any]],
                  seeds: Sequence[int]) -> list[tuple[str, ExperimentConfig]]:
    """(group label, config) for every grid point × seed, all validated before anything runs."""
    # The command line's flags and the Python arguments, both: this is the boundary of each.
    if "seed" in grid:
        raise ValueError("seed cannot be a grid key (--grid seed=..., or grid={'seed': ...}): list the seeds "
                         "apart, with --seeds 0,1,2 on the command line or seeds=[0, 1, 2] in sweep(...)")
    for key, values in grid.items():
        if not values:
            raise ValueError(f"grid key {key} has no values (write --grid {key}=v1,v2 on the command line, "
                             f"or grid={{{key!r}: [v1, v2]}} in sweep(...))")
    if not seeds:
        raise ValueError("no seeds given (write --seeds 0,1,2 on the command line, or seeds=[0, 1, 2] in "
                         "sweep(...))")
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
    client = open_client(tracking_uri)
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

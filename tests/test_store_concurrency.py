"""Opening one MLflow store: many processes and threads at the same moment, on a fresh SQLite store (whose
first open runs its schema migrations) or a migrated one, into one new experiment; and without MLflow's INFO
lines about creating the tables."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from workbench.tracking import get_or_create_experiment, local_store_uri
from workbench.tracking.store import open_client

pytestmark = pytest.mark.mlflow  # every test here opens a store, some without the `tracking_uri` fixture

NUM_PROCESSES = 8
ROUNDS = 3
TINY = ["--set", "federation.num_clients=8", "--set", "federation.clients_per_round=4",
        "--set", f"federation.rounds={ROUNDS}", "--set", "training.local_epochs=2",
        "--set", "execution.executor=sequential", "--set", "device=cpu", "--quiet"]

# `workbench <args>` behind a barrier: torch, mlflow and workbench are imported first, then the process
# says it is ready and waits for the go file, so that every process touches the store in the same moment.
BARRIER_CLI = """
import pathlib, sys, time
from workbench.cli import main
ready, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
ready.touch()
while not go.exists():
    time.sleep(0.005)
sys.exit(main(sys.argv[3:]))
"""


def start_together(tmp_path, argvs: list[list[str]], timeout_s: float = 300) -> list[subprocess.CompletedProcess]:
    """Run `workbench <argv>` for each argv in its own process, all released at once; their results."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore",
           "WORKBENCH_STATE_DIR": str(tmp_path / "run-state")}
    env.pop("MLFLOW_TRACKING_URI", None)
    go = tmp_path / "go"
    ready = [tmp_path / f"ready-{i}" for i in range(len(argvs))]
    processes = [subprocess.Popen([sys.executable, "-c", BARRIER_CLI, str(flag), str(go), *argv],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for flag, argv in zip(ready, argvs)]
    try:
        deadline = time.monotonic() + timeout_s
        while not all(flag.exists() for flag in ready):
            assert time.monotonic() < deadline, "the processes did not get ready in time"
            assert all(p.poll() is None for p in processes), [p.communicate() for p in processes if p.poll()]
            time.sleep(0.05)
        go.touch()
        results = []
        for process, argv in zip(processes, argvs):
            stdout, stderr = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append(subprocess.CompletedProcess(argv, process.returncode, stdout, stderr))
        return results
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_runs_started_together_on_a_fresh_store_all_finish(tmp_path):
    uri = local_store_uri(tmp_path / "mlruns")  # an empty folder: the first open runs the migrations
    results = start_together(tmp_path, [["run", "--tracking-uri", uri, "--experiment", "together",
                                         "--set", f"seed={i}", *TINY] for i in range(NUM_PROCESSES)])
    failed = [(r.returncode, [line for line in r.stderr.splitlines() if "Error" in line or "Exception" in line][-1:])
              for r in results if r.returncode != 0]
    assert not failed, f"{len(failed)} of {NUM_PROCESSES} runs failed: {failed}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("together")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == NUM_PROCESSES
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(r.data.tags["seed"] for r in runs) == sorted(str(i) for i in range(NUM_PROCESSES))
    for logged in runs:
        steps = sorted(m.step for m in client.get_metric_history(logged.info.run_id, "num_updates"))
        assert steps == list(range(1, ROUNDS + 1)), logged.info.run_id
    assert len(client.search_experiments()) == 2  # "Default" and "together", nothing twice


def create_at_once(tracking_uri: str, name: str, num_threads: int = 8) -> list[str]:
    """The experiment ids that `num_threads` threads get from `get_or_create_experiment(name)` when they
    all call it at the same moment (a barrier), each with its own client."""
    barrier = threading.Barrier(num_threads)
    ids, errors = [], []

    def create() -> None:
        client = open_client(tracking_uri)
        barrier.wait()
        try:
            ids.append(get_or_create_experiment(client, tracking_uri, name))
        except Exception as err:  # noqa: BLE001 - the test reports whatever a thread raised
            errors.append(err)

    threads = [threading.Thread(target=create) for _ in range(num_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return ids


def test_threads_creating_one_new_experiment_get_the_same_id(tracking_uri):
    ids = create_at_once(tracking_uri, "one-name")
    assert len(set(ids)) == 1 and len(ids) == 8
    assert MlflowClient(tracking_uri).get_experiment(ids[0]).name == "one-name"


def test_threads_creating_one_new_experiment_over_http_get_the_same_id(mlflow_server):
    ids = create_at_once(mlflow_server.uri, f"one-name-{time.time_ns()}")  # the server lives for the session
    assert len(set(ids)) == 1 and len(ids) == 8


def test_opening_a_new_store_drops_the_info_lines_of_its_migrations_only(tmp_path):
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in ("mlflow.store.db.utils", "alembic")]
    levels = [logger.level for logger in loggers]
    loggers[1].setLevel(logging.INFO)  # as a user who wants alembic's INFO lines elsewhere would have it
    for logger in loggers:
        logger.addHandler(handler)
    try:
        uri = local_store_uri(tmp_path / "mlruns")
        open_client(uri)
        assert [r.getMessage() for r in records if r.levelno < logging.WARNING] == []
        assert loggers[1].level == logging.INFO and loggers[0].level == levels[0]  # as they were
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)
    assert [e.name for e in MlflowClient(uri).search_experiments()] == ["Default"]  # it was created here

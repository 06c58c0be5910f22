"""Shared fixtures: one migrated MLflow SQLite template per session, copied for each test."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from helpers import stop_process_group
import torch

from workbench.config import ExperimentConfig


@pytest.fixture(scope="session")
def _template_store(tmp_path_factory) -> Path:
    from mlflow.tracking import MlflowClient

    from workbench.tracking import local_store_uri

    folder = tmp_path_factory.mktemp("mlflow-template")
    MlflowClient(local_store_uri(folder)).search_experiments()  # runs the migrations once (seconds)
    return folder / "mlflow.db"


@pytest.fixture
def tracking_uri(tmp_path, _template_store) -> str:
    """A fresh, already migrated SQLite MLflow store in this test's folder."""
    store = tmp_path / "mlruns"
    store.mkdir()
    shutil.copy(_template_store, store / "mlflow.db")
    return f"sqlite:///{store / 'mlflow.db'}"


#: `make mutation` sets it to `sequential`, so that no mutant starts a pool of worker processes.
EXECUTOR_ENV = "WORKBENCH_TEST_EXECUTOR"


@pytest.fixture
def tiny_config() -> ExperimentConfig:
    """Synthetic(1, 1), a few clients and rounds: seconds, not minutes."""
    return ExperimentConfig().with_overrides({
        "federation.num_clients": 8, "federation.clients_per_round": 4, "federation.rounds": 3,
        "training.local_epochs": 2, "training.batch_size": 10, "training.lr": 0.05,
        "device": "cpu", "execution.executor": os.environ.get(EXECUTOR_ENV, "auto"),
    })


@pytest.fixture
def one_thread():
    """One intra-op thread, as `run` sets for the small models of these tests: two threads on a shared
    2-core machine only spin-wait."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def pytest_collection_modifyitems(items):
    for item in items:
        if {"tracking_uri", "mlflow_server"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.mlflow)


@pytest.fixture(autouse=True)
def _local_run_state(tmp_path, monkeypatch):
    """Runs keep their local state (checkpoint, pending metrics) in the test's folder, not ~/.cache."""
    monkeypatch.setenv("WORKBENCH_STATE_DIR", str(tmp_path / "run-state"))


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with a SQLite backend and an artifact root, in its own
    process group so that stopping it stops its workers too."""

    def __init__(self, folder: Path, template: Path):
        import socket

        self.folder = folder
        shutil.copy(template, folder / "mlflow.db")  # already migrated: starts seconds sooner
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self, timeout_s: float = 120) -> None:
        import subprocess
        import sys
        import time

        import requests

        mlflow = Path(sys.executable).parent / "mlflow"
        log = open(self.folder / "server.log", "ab")
        self.process = subprocess.Popen(
            [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
             "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.folder / 'server.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{self.uri}/health", timeout=2).ok:
                    return
            except requests.RequestException:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer in {timeout_s} s")

    def stop(self) -> None:
        import os
        import signal
        import subprocess

        if self.process is None or self.process.poll() is not None:
            return
        stop_process_group(self.process)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, _template_store):
    """One real tracking server per test session (it takes ~20 s to start); tests may stop and restart it."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), _template_store)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fast_http_failures(monkeypatch):
    """A lost server fails an MLflow call at once instead of after minutes of retries."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")

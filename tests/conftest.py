"""Shared fixtures: one migrated MLflow SQLite template per session, copied for each test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

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


@pytest.fixture
def tiny_config() -> ExperimentConfig:
    """Synthetic(1, 1), a few clients and rounds: seconds, not minutes."""
    return ExperimentConfig().with_overrides({
        "federation.num_clients": 8, "federation.clients_per_round": 4, "federation.rounds": 3,
        "training.local_epochs": 2, "training.batch_size": 10, "training.lr": 0.05,
        "device": "cpu",
    })

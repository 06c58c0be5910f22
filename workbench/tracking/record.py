"""The partition record and the per-client table that a run logs beside its metrics."""

from __future__ import annotations

import csv
import functools
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.tracking import MlflowClient

from workbench.partition import describe, partition_hash
from workbench.plots import partition_heatmap, to_png
from workbench.simulation import Federation, RoundResult
from workbench.tracking.store import open_client

CLIENT_TABLE = "clients/client_rounds.csv"
CLIENT_COLUMNS = ("round", "client", "is_sampled", "num_samples", "num_epochs", "is_partial", "train_loss",
                  "update_norm", "drift", "test_accuracy")
PARTITION_DIR = "partition"


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
        Path(folder, "heatmap.png").write_bytes(_heatmap_png(stats.counts))
        client.log_artifacts(run_id, folder, PARTITION_DIR)


@functools.lru_cache(maxsize=8)
def _heatmap_png_cached(counts_bytes: bytes, shape: tuple[int, int]) -> bytes:
    counts = np.frombuffer(counts_bytes, dtype=np.int64).reshape(shape)
    return to_png(partition_heatmap(counts), dpi=100)


def _heatmap_png(counts: np.ndarray) -> bytes:
    """The partition heatmap as PNG, drawn once per partition in a session: the runs of a comparison or
    a sweep usually share their partition, and drawing it takes longer than several rounds."""
    counts = np.ascontiguousarray(counts, dtype=np.int64)
    return _heatmap_png_cached(counts.tobytes(), counts.shape)


def load_partition(run_id: str, tracking_uri: str | None = None) -> list[np.ndarray]:
    """The client index arrays a run trained on, as logged by `log_partition`."""
    client = open_client(tracking_uri)
    with tempfile.TemporaryDirectory() as folder:
        local = Path(client.download_artifacts(run_id, f"{PARTITION_DIR}/clients.npz", folder))
        with np.load(local) as arrays:
            indices, sizes = arrays["indices"], arrays["sizes"]
    return np.split(indices, np.cumsum(sizes)[:-1]) if len(sizes) else []

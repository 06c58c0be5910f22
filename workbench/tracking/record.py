"""The partition record and the per-client table that a run logs beside its metrics."""

from __future__ import annotations

import csv
import functools
import io
import itertools
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.tracking import MlflowClient

from workbench.partition import describe, partition_hash
from workbench.plots import partition_heatmap, partition_title, to_png
from workbench.simulation import Federation, RoundResult
from workbench.tracking.store import open_client

#: The whole table, logged once when a run FINISHES; until then (and after) the rows also live in parts.
CLIENT_TABLE = "clients/client_rounds.csv"
#: Append-only parts of the table, one per send to MLflow: `s<session>-<part>-<rows>rows.csv`. A part is
#: never rewritten, so a kill in the middle of an upload can only leave that one part short; its row
#: count in the name tells (`merge_client_parts` skips it), and the rounds it held are sent again.
CLIENT_PARTS_DIR = "clients/parts"
_PART_NAME = re.compile(r"s(\d+)-(\d+)-(\d+)rows\.csv")
#: One row per client and round in which it trained or was evaluated. Of an update (empty for clients that
#: sent none): num_samples, num_epochs, num_steps (local SGD steps), is_partial, is_malicious (a simulated
#: attacker: `attack.*`), local_train_loss (mean loss of its local mini-batches), update_norm, drift (cosine
#: to the sample-weighted mean update). Of the new global model, in evaluation
#: rounds: train_loss on the client's training data (the task's loss), test_accuracy on its own test data
#: (a classification). Then `dropped`: why a sampled client's update did not arrive (executor=ray:
#: `error|worker_died|timeout after N attempts: ...`), empty otherwise. Last, test_mse on its own test data
#: (a regression). Each task fills its own test column (`tasks.client_metric`) and leaves the other empty.
CLIENT_COLUMNS = ("round", "client", "is_sampled", "num_samples", "num_epochs", "num_steps", "is_partial",
                  "is_malicious", "local_train_loss", "update_norm", "drift", "train_loss", "test_accuracy",
                  "dropped", "test_mse")
PARTITION_DIR = "partition"
#: The partition's one-value statistics (`partition.summarize`) are params `partition.stat.<name>`, not
#: metrics: a metric is what a round measures, and one-value metrics at step 0 crowd the MLflow UI's charts
#: and its compare view. `partition/summary.json` holds the same numbers.
PARTITION_STAT_PREFIX = "partition.stat."


def partition_stat_params(stats: dict[str, float]) -> dict[str, str]:
    """The params that record a partition's statistics: whole numbers without ".0", others exact
    (`repr`, so that `float` reads back the same number)."""
    return {f"{PARTITION_STAT_PREFIX}{key}": _number_text(value) for key, value in stats.items()}


def logged_partition_stats(params: dict[str, str]) -> dict[str, float]:
    """A run's partition statistics from its params (`run.data.params`), keyed as `partition.summarize`
    keys them; empty for a run that logged none (or, before they were params, logged them as
    `partition_*` metrics: read those from `run.data.metrics`)."""
    return {key.removeprefix(PARTITION_STAT_PREFIX): float(value) for key, value in params.items()
            if key.startswith(PARTITION_STAT_PREFIX)}


def client_rows(result: RoundResult) -> list[list[Any]]:
    """One row per client that trained or was evaluated in this round (columns `CLIENT_COLUMNS`)."""
    rows = []
    clients = set(result.client_metrics) | set(result.client_test_metrics) | set(result.client_train_loss)
    for client in sorted(clients | set(result.sampled)):
        m, tested = result.client_metrics.get(client, {}), result.client_test_metrics.get(client, {})
        rows.append([result.round, client, int(client in result.sampled),
                     *(_cell(m.get(k)) for k in ("num_samples", "num_epochs", "num_steps", "is_partial",
                                                 "is_malicious", "local_train_loss", "update_norm", "drift")),
                     _cell(result.client_train_loss.get(client)), _cell(tested.get("test_accuracy")),
                     result.dropped.get(client, ""), _cell(tested.get("test_mse"))])
    return rows


def client_part_name(session: int, part: int, num_rows: int) -> str:
    """The file name of a part of the client table (see `CLIENT_PARTS_DIR`)."""
    return f"s{session:03d}-{part:05d}-{num_rows}rows.csv"


def client_part_sessions(names: list[str]) -> list[int]:
    """The sessions (the first run, then each resume) that wrote the parts called `names`."""
    return sorted({int(m[1]) for m in map(_PART_NAME.fullmatch, names) if m})


def write_client_part(path: Path, rows: list[list[Any]]) -> None:
    """One part of the client table: the header, then `rows` (whole rounds)."""
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(CLIENT_COLUMNS)
        writer.writerows(rows)


def _current_rows(lines: list[list[str]]) -> list[list[str]] | None:
    """The body of a client table file in today's `CLIENT_COLUMNS`, rows of a table written before the last
    columns were added padded with empty cells (None: not a client table); a row of another width (the last
    line, cut short by a kill) is dropped."""
    if not lines or tuple(lines[0]) != CLIENT_COLUMNS[:len(lines[0])]:
        return None
    width, missing = len(lines[0]), [""] * (len(CLIENT_COLUMNS) - len(lines[0]))
    return [row + missing for row in lines[1:] if len(row) == width]


def read_client_rows(text: str) -> list[list[str]]:
    """The rows of a client table file (header dropped), without a last line that a kill cut short."""
    return _current_rows(list(csv.reader(io.StringIO(text)))) or []


def merge_client_parts(parts: dict[str, str]) -> list[list[str]]:
    """The client table from its parts (`{file name: text}`): each round's rows from the newest complete
    part that holds it (a resume sends again what it recomputes), rounds in order; a part whose rows fall
    short of the count in its name was cut short by a kill and is skipped."""
    by_round: dict[int, list[list[str]]] = {}
    named = [(m, text) for m, text in ((_PART_NAME.fullmatch(name), text) for name, text in parts.items()) if m]
    for match, text in sorted(named, key=lambda item: (int(item[0][1]), int(item[0][2]))):
        lines = list(csv.reader(io.StringIO(text)))
        body = _current_rows(lines)
        if body is None or len(body) != len(lines) - 1 or len(body) != int(match[3]):
            continue
        for round_, rows in itertools.groupby(body, key=lambda r: int(r[0])):
            by_round[round_] = list(rows)
    return [row for round_ in sorted(by_round) for row in by_round[round_]]


def download_client_rows(client: MlflowClient, run_id: str) -> list[list[str]]:
    """A run's client table as logged in MLflow: the whole table of a finished run, else its parts merged
    (no rows where it logged none)."""
    names = {Path(a.path).name for a in client.list_artifacts(run_id, os.path.dirname(CLIENT_TABLE))}
    with tempfile.TemporaryDirectory() as folder:
        if os.path.basename(CLIENT_TABLE) in names:
            return read_client_rows(Path(client.download_artifacts(run_id, CLIENT_TABLE, folder)).read_text())
        if os.path.basename(CLIENT_PARTS_DIR) not in names:
            return []
        local = Path(client.download_artifacts(run_id, CLIENT_PARTS_DIR, folder))
        return merge_client_parts({p.name: p.read_text() for p in local.iterdir()})


def load_client_table(run_id: str, tracking_uri: str | None = None):
    """A run's per-client table (`CLIENT_COLUMNS`) as a pandas DataFrame, finished or not."""
    import pandas

    rows = download_client_rows(open_client(tracking_uri), run_id)
    frame = pandas.DataFrame(rows, columns=list(CLIENT_COLUMNS))
    return frame.apply(pandas.to_numeric)


def _cell(value: float | None) -> str:
    return "" if value is None else _number_text(value)


def _number_text(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


def log_partition(client: MlflowClient, run_id: str, federation: Federation) -> None:
    """The run's partition under `partition/`: summary.json (statistics, hash, how the clients' test sets
    were chosen), counts.csv (client x class, or x target bin for a regression, training samples; test
    samples per client), clients.npz
    (every client's training and test sample indices) and heatmap.png."""
    labels = federation.dataset.y_train.cpu().numpy()
    stats = describe(labels, federation.clients, federation.dataset.num_classes, task=federation.dataset.task,
                     num_bins=federation.config.partition.target_bins)
    tests = federation.client_tests
    test_sizes = tests.sizes if tests is not None else np.zeros(len(federation.clients), np.int64)
    summary = {"scheme": federation.partition_scheme, "partition_hash": partition_hash(federation.clients),
               "client_test_rule": tests.rule if tests is not None else "none", **stats.summary()}
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "summary.json").write_text(json.dumps(summary, indent=2))
        with open(Path(folder, "counts.csv"), "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["client", *stats.column_names(), "size", "test_size"])
            writer.writerows([k, *row, size, test] for k, (row, size, test) in enumerate(
                zip(stats.counts.tolist(), stats.sizes.tolist(), test_sizes.tolist())))
        sizes = np.array([len(c) for c in federation.clients], dtype=np.int64)
        joined = np.concatenate(federation.clients).astype(np.int64) if len(sizes) else np.zeros(0, np.int64)
        np.savez_compressed(Path(folder, "clients.npz"), indices=joined, sizes=sizes,
                            test_indices=tests.flat if tests is not None else np.zeros(0, np.int64),
                            test_sizes=test_sizes)
        title = partition_title(federation.config, dataset=federation.dataset.name,
                                num_clients=len(federation.clients), task=federation.dataset.task)
        Path(folder, "heatmap.png").write_bytes(_heatmap_png(stats.counts, title, stats.row_label))
        client.log_artifacts(run_id, folder, PARTITION_DIR)


@functools.lru_cache(maxsize=8)
def _heatmap_png_cached(counts_bytes: bytes, shape: tuple[int, int], title: str, row_label: str) -> bytes:
    counts = np.frombuffer(counts_bytes, dtype=np.int64).reshape(shape)
    return to_png(partition_heatmap(counts, title=f"client x {row_label} samples\n{title}", row_label=row_label),
                  dpi=100)


def _heatmap_png(counts: np.ndarray, title: str, row_label: str = "class") -> bytes:
    """The partition heatmap as PNG, drawn once per partition in a session: the runs of a comparison or
    a sweep usually share their partition, and drawing it takes longer than several rounds."""
    counts = np.ascontiguousarray(counts, dtype=np.int64)
    return _heatmap_png_cached(counts.tobytes(), counts.shape, title, row_label)


def load_partition(run_id: str, tracking_uri: str | None = None, split: str = "train") -> list[np.ndarray]:
    """The client index arrays a run trained on (`split="train"`, into the training set) or evaluated each
    client on (`split="test"`, into the test set), as logged by `log_partition`."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    client = open_client(tracking_uri)
    with tempfile.TemporaryDirectory() as folder:
        local = Path(client.download_artifacts(run_id, f"{PARTITION_DIR}/clients.npz", folder))
        with np.load(local) as arrays:
            prefix = "" if split == "train" else "test_"
            if f"{prefix}indices" not in arrays:
                raise ValueError(f"run {run_id} logged no per-client test split (an older version of workbench)")
            indices, sizes = arrays[f"{prefix}indices"], arrays[f"{prefix}sizes"]
    return np.split(indices, np.cumsum(sizes)[:-1]) if len(sizes) else []

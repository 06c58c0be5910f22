"""The round loop: seed streams, client sampling, stragglers, evaluation, `RoundResult`, `History`, `Callback`."""

from __future__ import annotations

import copy
import dataclasses
import math
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from workbench.attacks import attack_update, check_attack, choose_malicious
from workbench.client import ClientTask, ClientUpdate, LocalObjective, finish_update, torch_generator
from workbench.config import ExperimentConfig
from workbench.data import Dataset, describe_dataset, load_dataset
from workbench.execution import (ClientDropped, Executor, RunStopped, SequentialExecutor, build_executor,
                                 check_stop)
from workbench.models import build_model, check_model_fits
from workbench.partition import (FEATURE_SKEWS, apply_feature_skew, check_feature_skew, partition,
                                 partition_test_by_labels, summarize)
from workbench.privacy.membership import audit_samples, membership_audit
from workbench.scaling import scale_features
from workbench.strategies import Strategy, build_strategy
# accuracy_spread: re-exported, where it was before tasks had a module of their own
from workbench.tasks import accuracy_spread, client_metric, client_spread, sample_scores, set_metrics  # noqa: F401
from workbench.updates import state_num_bytes, update_statistics

# Independent random streams, one per purpose, so that changing the algorithm (or skipping a
# straggler's training) never shifts the data, the partition, the sampled clients or the stragglers.
# The partition's sub-streams: (1) the feature skew of the training inputs, (2) the clients' test split,
# (3) the feature skew of their test inputs.
STREAM_DATA, STREAM_PARTITION, STREAM_INIT, STREAM_SAMPLING, STREAM_STRAGGLERS, STREAM_TRAINING = range(6)
# The server's stream, keyed by (seed, round, purpose): which clients attack, the attackers' noise (per
# client) and the aggregation's own randomness (DP noise). Client-side streams never depend on it.
STREAM_SERVER = 6
# The privacy audit's draws of members and non-members (an observer: it never moves another stream).
SERVER_ATTACKERS, SERVER_ATTACK_NOISE, SERVER_AGGREGATION, SERVER_AUDIT = range(4)


def stream(seed: int, purpose: int, *keys: int) -> np.random.Generator:
    """The random generator for one purpose (and round, client): independent of every other stream."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(purpose, *keys)))


def resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA GPU is visible here (use device=auto or device=cpu)")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass(frozen=True)
class ClientTestSets:
    """Each client's own test data: what per-client accuracy is measured on.

    `indices[k]` are client k's samples of the dataset's test set. `rule` says how they were chosen:
    `natural` (the client's own held-out samples, for the dataset's real clients) or `labels` (drawn from
    the held-out pool with the client's training label distribution: `partition_test_by_labels`). Under
    feature skew, `x` holds the clients' test inputs as each client sees them (its own transform applied),
    concatenated in client order; otherwise the inputs are the test set's own and `x` is None.
    """

    indices: list[np.ndarray]
    rule: str
    x: torch.Tensor | None = None

    @property
    def sizes(self) -> np.ndarray:
        return np.array([len(i) for i in self.indices], dtype=np.int64)

    @property
    def flat(self) -> np.ndarray:
        """Every client's test indices, concatenated in client order."""
        return np.concatenate(self.indices).astype(np.int64) if self.indices else np.zeros(0, np.int64)

    def to(self, device: torch.device) -> "ClientTestSets":
        return self if self.x is None else dataclasses.replace(self, x=self.x.to(device))


@dataclass
class Federation:
    """A prepared experiment: data on its device, the partition, the initial global model."""

    config: ExperimentConfig
    dataset: Dataset
    clients: list[np.ndarray]
    model: nn.Module
    strategy: Strategy
    device: torch.device
    partition_stats: dict[str, float]
    #: Each client's own test data (None where none can be defined: then no per-client metric is logged).
    client_tests: ClientTestSets | None = None
    #: How `run` executes the rounds (resolved executor, workers, their threads), for the run's record.
    execution: dict[str, object] = field(default_factory=dict)
    #: The partition scheme used: `partition.scheme` with `auto` resolved for this dataset.
    partition_scheme: str = ""
    #: The first round `run` trains (> 1 for a resumed run), set by `run` before its callbacks start.
    start_round: int = 1
    #: The data as loaded, before any feature skew (`data.describe_dataset`: name, digest, source), for the
    #: run's record: the same data has the same digest under every partition scheme.
    data_description: dict[str, str] = field(default_factory=dict)

    @property
    def client_sizes(self) -> list[int]:
        return [len(c) for c in self.clients]


def load_data(config: ExperimentConfig) -> Dataset:
    """The dataset of `config`, generated or split with the same seed stream as a run's."""
    return load_dataset(config.data, config.federation.num_clients, stream(config.seed, STREAM_DATA))


def partition_clients(config: ExperimentConfig, dataset: Dataset) -> list[np.ndarray]:
    """The client index arrays a run of `config` trains on (same seed stream), checked against the data."""
    num_clients = config.federation.num_clients
    check_feature_skew(config.partition.scheme, dataset.input_shape, f"data.name={dataset.name}")
    clients = partition(dataset.y_train.cpu().numpy(), num_clients, config.partition,
                        stream(config.seed, STREAM_PARTITION), natural=dataset.client_train, task=dataset.task)
    if len(clients) != num_clients:
        raise ValueError(
            f"federation.num_clients={num_clients}, but data.name={dataset.name} has {len(clients)} natural "
            f"clients (set federation.num_clients={len(clients)})"
        )
    return clients


def partition_dataset(config: ExperimentConfig, dataset: Dataset) -> tuple[Dataset, list[np.ndarray]]:
    """Split `dataset` among clients exactly as a run of `config` does (same seed stream); feature-skew
    schemes also return the training inputs as each client sees them (the test set stays untouched)."""
    clients = partition_clients(config, dataset)
    # A sub-stream of the partition stream, so the feature skew never shifts the partition itself.
    x_train = apply_feature_skew(dataset.x_train, clients, config.partition,
                                 stream(config.seed, STREAM_PARTITION, 1))
    if x_train is not dataset.x_train:
        dataset = dataclasses.replace(dataset, x_train=x_train)
    return dataset, clients


def split_client_tests(config: ExperimentConfig, dataset: Dataset,
                       clients: Sequence[np.ndarray]) -> ClientTestSets | None:
    """Each client's own test data, for the partition `clients` of `dataset` (as `partition_dataset`
    returns them): the natural clients' own held-out samples under `natural`; under every other scheme,
    held-out samples with the client's training label distribution (`partition_test_by_labels`, seeded
    from the partition stream), with the client's feature transform applied under feature skew."""
    config = config.with_resolved_partition(dataset.has_natural_clients)
    if config.partition.scheme == "natural":
        if dataset.client_test is None or len(dataset.client_test) != len(clients):
            return None
        return ClientTestSets([np.asarray(i, dtype=np.int64) for i in dataset.client_test], "natural")
    indices = partition_test_by_labels(dataset.y_train.cpu().numpy(), clients, dataset.y_test.cpu().numpy(),
                                       stream(config.seed, STREAM_PARTITION, 2), task=dataset.task,
                                       num_bins=config.partition.target_bins)
    tests = ClientTestSets(indices, "labels")
    if config.partition.scheme in FEATURE_SKEWS:
        # client k's test inputs get client k's transform: lay them out client after client, so that the
        # k-th block is "client k" for `apply_feature_skew`
        blocks = np.split(np.arange(int(tests.sizes.sum())), np.cumsum(tests.sizes)[:-1])
        flat = torch.as_tensor(tests.flat, device=dataset.x_test.device)
        x = apply_feature_skew(dataset.x_test[flat], blocks, config.partition,
                               stream(config.seed, STREAM_PARTITION, 3))
        tests = dataclasses.replace(tests, x=x)
    return tests


def prepare(config: ExperimentConfig) -> Federation:
    """Load data, partition it and build the model; every user error surfaces here, before any round."""
    device = resolve_device(config.device)
    dataset = load_data(config)
    check_attack(config.attack, dataset.task, config.data.name)
    data_description = describe_dataset(dataset, config.data.name)
    check_model_fits(config.model.name, dataset.input_shape)
    dataset, clients = partition_dataset(config, dataset)
    client_tests = split_client_tests(config, dataset, clients)
    dataset, client_tests = scale_features(config.data.scaling, dataset, clients, client_tests)
    stats = summarize(dataset.y_train.numpy(), clients, dataset.num_classes, task=dataset.task,
                      num_bins=config.partition.target_bins)
    init = torch.Generator().manual_seed(int(stream(config.seed, STREAM_INIT).integers(2**63)))
    model = build_model(config.model.name, dataset.input_shape, dataset.num_outputs, init).to(device)
    dataset = dataclasses.replace(
        dataset, x_train=dataset.x_train.to(device), y_train=dataset.y_train.to(device),
        x_test=dataset.x_test.to(device), y_test=dataset.y_test.to(device))
    return Federation(config, dataset, clients, model, build_strategy(config), device, stats,
                      client_tests.to(device) if client_tests is not None else None,
                      partition_scheme=config.with_resolved_partition(dataset.has_natural_clients).partition.scheme,
                      data_description=data_description)


@dataclass(frozen=True)
class RoundResult:
    """What one round did and measured."""

    round: int
    metrics: dict[str, float]
    sampled: tuple[int, ...]
    stragglers: tuple[int, ...]
    #: The new global model on each client's own test data (`Federation.client_tests`), in evaluation
    #: rounds: `{client: {metric: value}}`, the task's per-client metric (`tasks.client_metric`:
    #: test_accuracy, or test_mse for a regression), named as the client table's column; empty in other
    #: rounds and where clients have no test data.
    client_test_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    #: For each client that sent an update: num_samples, num_epochs, is_partial, local_train_loss,
    #: update_norm, drift.
    client_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    #: Loss of the new global model on each client's training data, in evaluation rounds.
    client_train_loss: dict[int, float] = field(default_factory=dict)
    #: Clients whose update did not arrive (executor=ray with execution.on_client_failure=drop, or past
    #: execution.round_timeout_s): why, as the client table says it.
    dropped: dict[int, str] = field(default_factory=dict)

    @property
    def client_accuracy(self) -> dict[int, float]:
        """Each client's test accuracy (`client_test_metrics`' test_accuracy; empty for a regression)."""
        return {client: m["test_accuracy"] for client, m in self.client_test_metrics.items()
                if "test_accuracy" in m}


@dataclass
class History:
    """Every round's result, in order; returned by `run` and shown to callbacks."""

    rounds: list[RoundResult] = field(default_factory=list)
    status: str = "RUNNING"
    #: why the strategy ended the run before its last round (None: it ran every round, or failed)
    stop_reason: str | None = None

    def metric(self, name: str) -> list[tuple[int, float]]:
        """(round, value) for every round that measured `name`."""
        return [(r.round, r.metrics[name]) for r in self.rounds if name in r.metrics]

    def final(self) -> dict[str, float]:
        """The latest value of every metric."""
        latest: dict[str, float] = {}
        for r in self.rounds:
            latest.update(r.metrics)
        return latest


class Callback:
    """Observes a run; override what you need. The round loop knows nothing else about its observers."""

    def on_run_start(self, federation: Federation) -> None:
        pass

    def on_round_end(self, result: RoundResult, federation: Federation) -> None:
        pass

    def on_run_end(self, history: History, federation: Federation, error: BaseException | None) -> None:
        """Called once, also when the run fails (`history.status` FAILED) or is interrupted (KILLED)."""


def sample_round(config: ExperimentConfig, round_: int) -> tuple[np.ndarray, dict[int, int]]:
    """The clients sampled in a round and, for each straggler among them, the epochs it manages.

    Depends only on the seed and the round, so every algorithm faces the same clients and stragglers.
    """
    fed, epochs = config.federation, config.training.local_epochs
    sampled = np.sort(stream(config.seed, STREAM_SAMPLING, round_).choice(
        fed.num_clients, fed.clients_per_round, replace=False))
    rng = stream(config.seed, STREAM_STRAGGLERS, round_)
    num_stragglers = fed.clients_per_round - num_active_clients(config)
    stragglers = np.sort(rng.choice(sampled, num_stragglers, replace=False))
    partial_epochs = rng.integers(1, epochs, size=num_stragglers) if num_stragglers else []
    return sampled, {int(c): int(e) for c, e in zip(stragglers, partial_epochs)}


def num_active_clients(config: ExperimentConfig) -> int:
    """Sampled clients per round that do all their local epochs: round(K * (1 - p)) for K clients per
    round and straggler fraction p, as the FedProx reference code keeps its active clients (Li et al.,
    MLSys 2020; Python's round, halves to even: K = 5, p = 0.5 keeps 2 and makes 3 stragglers)."""
    fed = config.federation
    return int(round(fed.clients_per_round * (1 - fed.straggler_fraction)))


@dataclass(frozen=True)
class Evaluation:
    """A model on a set of samples, as its task measures it (`workbench.tasks`): the set's metrics, unprefixed
    (`tasks.METRICS`: loss and accuracy; loss = mse, mse, mae and r2 for a regression), and the per-sample
    scores that per-client means are taken of (`tasks.sample_scores`: loss, and correct or prediction)."""

    task: str
    metrics: dict[str, float]
    scores: dict[str, torch.Tensor]

    @property
    def loss(self) -> float:
        """The mean of the task's loss: cross-entropy, or the MSE."""
        return self.metrics["loss"]

    @property
    def accuracy(self) -> float:
        """The fraction of correct predictions (a classification only)."""
        if "accuracy" not in self.metrics:
            raise AttributeError(f"a {self.task} has no accuracy; its metrics are {', '.join(self.metrics)}")
        return self.metrics["accuracy"]

    @property
    def losses(self) -> torch.Tensor:
        """The task's loss of each sample: cross-entropy, or the squared error."""
        return self.scores["loss"]


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 4096, *,
             task: str = "classification") -> Evaluation:
    """`model` on (x, y) as `task` measures it (`tasks.sample_scores`, `tasks.set_metrics`), in eval mode,
    without gradients."""
    model.eval()
    parts: list[dict[str, torch.Tensor]] = []
    with torch.no_grad():
        for start in range(0, len(y), batch_size):
            parts.append(sample_scores(task, model(x[start:start + batch_size]), y[start:start + batch_size]))
    scores = {key: torch.cat([part[key] for part in parts]) for key in parts[0]} if parts else {}
    return Evaluation(task, set_metrics(task, scores, y), scores)


def per_client_means(values: torch.Tensor, indices: Sequence[np.ndarray]) -> dict[int, float]:
    """`{k: mean of values[indices[k]]}` for every client with at least one index (one pass, float64)."""
    sizes = np.array([len(i) for i in indices], dtype=np.int64)
    if not sizes.sum():
        return {}
    flat = np.concatenate(indices).astype(np.int64)
    sums = np.bincount(np.repeat(np.arange(len(indices)), sizes),
                       weights=values.detach().double().cpu().numpy()[flat], minlength=len(indices))
    return {int(k): float(sums[k] / sizes[k]) for k in np.flatnonzero(sizes)}


def evaluate_clients(model: nn.Module, dataset: Dataset, tests: ClientTestSets,
                     on_test_set: Evaluation) -> dict[int, float]:
    """Each client's test metric of the task (`tasks.client_metric`: its test accuracy, or its test MSE) on
    its own test data; `on_test_set` is the model's evaluation on the whole test set, reused where the
    clients' inputs are the test set's own."""
    _, score = client_metric(on_test_set.task)
    if tests.x is None:
        return per_client_means(on_test_set.scores[score], tests.indices)
    flat = torch.as_tensor(tests.flat, device=dataset.y_test.device)
    skewed = evaluate(model, tests.x, dataset.y_test[flat], task=on_test_set.task)
    blocks = np.split(np.arange(len(flat)), np.cumsum(tests.sizes)[:-1])
    return per_client_means(skewed.scores[score], blocks)


@contextmanager
def torch_threads(num_threads: int):
    """Use `num_threads` intra-op threads inside the block (0 = leave torch's setting alone)."""
    previous = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run(
    config: ExperimentConfig | Federation,
    callbacks: Sequence[Callback] = (),
    executor: Executor | None = None,
    *,
    stop: threading.Event | None = None,
    start_round: int = 1,
    strategy_state: Mapping[str, torch.Tensor] | None = None,
) -> History:
    """Run every round of the experiment and return its history; callbacks observe each step.

    Setting `stop` (from another thread: a Stop button, a signal handler) ends the run within one
    client update with status KILLED; the history of the finished rounds is returned.

    `start_round` > 1 resumes: the federation's model must hold the global model after round
    `start_round - 1`, and `strategy_state` the strategy's `state_dict()` after that round (server and
    per-client state). Every random stream is derived from (seed, round, client), so nothing else is
    needed for the remaining rounds to match an uninterrupted run.

    A strategy may end the run early, FINISHED (`Strategy.stop_reason`: a privacy budget spent); the
    reason is in `History.stop_reason`.
    """
    federation = config if isinstance(config, Federation) else prepare(config)
    config = federation.config
    if strategy_state:
        federation.strategy.load_state_dict(strategy_state)
    execution = config.execution
    executor = executor or build_executor(execution.executor, federation.model, workers=execution.workers,
                                          ray_address=execution.ray_address,
                                          cpus_per_client=execution.cpus_per_client,
                                          gpus_per_client=execution.gpus_per_client,
                                          clients_per_round=config.federation.clients_per_round,
                                          on_client_failure=execution.on_client_failure,
                                          round_timeout_s=execution.round_timeout_s)
    executor = check_executor(executor, federation, config.execution.executor)
    warn_if_no_updates(config, federation.strategy)
    federation.execution = dict(getattr(executor, "settings", {"executor": type(executor).__name__}))
    federation.start_round = start_round
    history = History()
    error: BaseException | None = None
    with torch_threads(config.execution.threads or getattr(executor, "threads", 0)):
        for callback in callbacks:
            callback.on_run_start(federation)
        try:
            for round_ in range(start_round, config.federation.rounds + 1):
                check_stop(stop)
                history.stop_reason = federation.strategy.stop_reason(round_)
                if history.stop_reason is not None:
                    break
                result = run_round(federation, executor, round_, stop)
                history.rounds.append(result)
                for callback in callbacks:
                    callback.on_round_end(result, federation)
            history.status = "FINISHED"
        except RunStopped as err:
            history.status, error = "KILLED", err
        except KeyboardInterrupt as err:
            history.status, error = "KILLED", err
            raise
        except Exception as err:
            history.status, error = "FAILED", err
            raise
        finally:
            for callback in callbacks:
                callback.on_run_end(history, federation, error)
    return history


def check_executor(executor: Executor, federation: Federation, asked: str) -> Executor:
    """`executor`, if it honours the strategy's local objective exactly; else the sequential reference
    when the executor was chosen by `auto`, or `ValueError` with the executor's reason."""
    why_not = getattr(executor, "why_not_supported", None)
    reason = why_not(local_objective(federation, 1)) if why_not else None
    if reason is None:
        return executor
    if asked == "auto":
        warnings.warn(f"executor {executor.name!r} cannot train strategy.name="
                      f"{federation.config.strategy.name!r} exactly ({reason}); using 'sequential'", stacklevel=3)
        return SequentialExecutor(federation.model)
    raise ValueError(f"execution.executor={asked!r} cannot train strategy.name={federation.config.strategy.name!r} "
                     f"exactly: {reason} (use execution.executor=sequential or auto)")


def warn_if_no_updates(config: ExperimentConfig, strategy: Strategy) -> None:
    """Warn once, before the first round, when the straggler policy leaves every round without an update."""
    if strategy.keeps_partial_work or num_active_clients(config) > 0:
        return
    fed = config.federation
    warnings.warn(
        f"federation.straggler_fraction={fed.straggler_fraction:g} with federation.clients_per_round="
        f"{fed.clients_per_round} leaves round({fed.clients_per_round} x (1 - {fed.straggler_fraction:g})) = 0 "
        f"clients that finish their epochs, and strategy.name={config.strategy.name!r} drops stragglers: no "
        f"round will receive an update (num_updates = 0) and the global model will not change. Lower "
        f"straggler_fraction, raise clients_per_round, or use strategy.name=fedprox (keeps partial work).",
        UserWarning, stacklevel=3)


@dataclass(frozen=True)
class Cohort:
    """A round's plan: who was sampled, who straggles and who attacks, what the clients minimize, and the
    tasks of the clients whose updates the strategy will accept."""

    round: int
    sampled: tuple[int, ...]
    stragglers: dict[int, int]
    malicious: tuple[int, ...]
    objective: LocalObjective
    tasks: list[ClientTask]
    global_state: dict[str, torch.Tensor]


def server_stream(config: ExperimentConfig, round_: int, purpose: int, *keys: int) -> np.random.Generator:
    """The server's random generator for one purpose in one round (attackers, their noise, DP noise)."""
    return stream(config.seed, STREAM_SERVER, round_, purpose, *keys)


def local_objective(federation: Federation, round_: int, *, has_label_flippers: bool = False) -> LocalObjective:
    """What the clients of round `round_` minimize: the strategy's objective (it knows the training config)
    with what the data decides, the task's loss (`Dataset.task`) and, where label-flipping attackers take
    part, the number of classes they flip. Every executor check and every round asks here."""
    objective = federation.strategy.local_objective(federation.config.training, round_)
    objective = dataclasses.replace(objective, task=federation.dataset.task)
    if has_label_flippers:
        objective = dataclasses.replace(objective, num_classes=federation.dataset.num_classes)
    return objective


def plan_cohort(federation: Federation, round_: int) -> Cohort:
    """Sample the round's clients, its stragglers and attackers; build the tasks the strategy accepts,
    each with its seed and the payload the strategy sends it."""
    config, strategy = federation.config, federation.strategy
    sampled, stragglers = sample_round(config, round_)
    attack = config.attack
    malicious = (choose_malicious(sampled, attack.fraction, server_stream(config, round_, SERVER_ATTACKERS))
                 if attack.fraction else ())
    objective = local_objective(federation, round_, has_label_flippers=attack.kind == "label_flip" and bool(malicious))
    global_state = {k: v.detach().clone() for k, v in federation.model.state_dict().items()}
    tasks = []
    for client in (int(c) for c in sampled):
        seed = int(stream(config.seed, STREAM_TRAINING, round_, client).integers(2**63))
        task = ClientTask(client, torch.as_tensor(federation.clients[client], device=federation.device),
                          stragglers.get(client, config.training.local_epochs), client in stragglers, seed,
                          flips_labels=attack.kind == "label_flip" and client in malicious)
        if not strategy.accepts(task):
            continue  # its update would not be aggregated: don't spend the time
        payload, client_state = strategy.client_payload(client, global_state)
        tasks.append(dataclasses.replace(task, payload=payload, client_state=client_state))
    tasks = strategy.plan_tasks(tasks)
    return Cohort(round_, tuple(int(c) for c in sampled), stragglers, malicious, objective, tasks, global_state)


def train_cohort(federation: Federation, executor: Executor, cohort: Cohort,
                 stop: threading.Event | None = None,
                 starts: Sequence[Mapping[str, torch.Tensor]] | None = None,
                 ) -> tuple[list[ClientUpdate], list[ClientDropped]]:
    """The cohort's updates as the clients send them: trained by the executor, completed by
    `finish_update` (steps, clipping, control variates), replaced by the attackers' where they attack;
    and the clients whose update did not arrive (`ClientDropped`, executors that bound failures).
    `starts`: the model each task starts from (default `start_states`)."""
    data, config = federation.dataset, federation.config
    starts = start_states(federation.strategy, cohort) if starts is None else starts
    outcomes: list = []
    for first, last in runs_of_equal(starts):  # one executor call per start model (one: the global model)
        outcomes += executor.run_cohort(starts[first], cohort.tasks[first:last], data.x_train, data.y_train,
                                        cohort.objective, stop)
    updates, dropped = [], []
    for task, update, start in zip(cohort.tasks, outcomes, starts):
        if isinstance(update, ClientDropped):
            dropped.append(update)
            continue
        update = finish_update(update, task, cohort.objective, start)
        if task.client in cohort.malicious:
            noise = torch_generator(server_stream(config, cohort.round, SERVER_ATTACK_NOISE, task.client))
            update = attack_update(update, cohort.global_state, config.attack, noise)
        updates.append(update)
    return updates, dropped


def start_states(strategy: Strategy, cohort: Cohort) -> list[Mapping[str, torch.Tensor]]:
    """The model each task of the cohort starts from (`Strategy.start_state`: the global model, except for
    the local baseline, whose clients continue their own)."""
    return [strategy.start_state(task.client, cohort.global_state) for task in cohort.tasks]


def runs_of_equal(items: Sequence[object]) -> list[tuple[int, int]]:
    """[first, last) of each run of consecutive entries that are the same object."""
    bounds = [i for i in range(1, len(items)) if items[i] is not items[i - 1]]
    edges = [0, *bounds, len(items)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def aggregate_round(federation: Federation, cohort: Cohort, updates: Sequence[ClientUpdate]) -> dict[str, torch.Tensor]:
    """The strategy's next global model, checked for divergence before it replaces the old one."""
    rng = server_stream(federation.config, cohort.round, SERVER_AGGREGATION)
    new_state = federation.strategy.aggregate(cohort.global_state, updates, rng)
    if not all(bool(torch.isfinite(v).all()) for v in new_state.values() if v.is_floating_point()):
        raise FloatingPointError(f"round {cohort.round} diverged: the aggregated model has inf/nan weights "
                                 f"(lower training.lr, currently {federation.config.training.lr})")
    return new_state


def measure_updates(global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate],
                    malicious: Sequence[int], starts: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
                    ) -> tuple[dict[int, dict[str, float]], dict[str, float]]:
    """Each update's row of the client table, and the round's means over them. An update is measured from
    the model its client started from: the global model, or `starts[client]` (the local baseline)."""
    states = [shift_to(u.state, starts[u.client], global_state) if starts and u.client in starts else u.state
              for u in updates]
    norms, drifts = update_statistics(global_state, states, [u.num_samples for u in updates])
    client_metrics = {
        u.client: {"num_samples": float(u.num_samples), "num_epochs": float(u.num_epochs),
                   "num_steps": float(u.num_steps), "is_partial": float(u.is_partial),
                   "is_malicious": float(u.client in malicious), "local_train_loss": u.local_train_loss,
                   "update_norm": n, "drift": d}
        for u, n, d in zip(updates, norms, drifts)
    }
    metrics: dict[str, float] = {"num_updates": float(len(updates))}
    if updates:
        weights = np.array([u.num_samples for u in updates], dtype=np.float64)
        metrics["local_train_loss"] = float(np.dot(weights, [u.local_train_loss for u in updates]) / weights.sum())
        metrics.update(update_norm_mean=float(np.mean(norms)), client_drift_mean=float(np.mean(drifts)),
                       client_drift_min=float(np.min(drifts)))
    return client_metrics, metrics


def shift_to(state: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor],
             global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """global + (state - start): the same update, measured from the global model."""
    return {k: global_state[k] + (v - start[k]) if v.is_floating_point() else v for k, v in state.items()}


def payload_num_bytes(payload: Mapping[str, Mapping[str, torch.Tensor]]) -> int:
    return sum(state_num_bytes(part) for part in payload.values())


def count_bytes(cohort: Cohort, updates: Sequence[ClientUpdate], exchanges_models: bool = True) -> dict[str, float]:
    """Traffic of the round: every sampled client downloads the global model, the clients that train also
    their payload (SCAFFOLD's c); every update used uploads its model and its payload (delta c_i).
    Client state (c_i) stays on the client and is not traffic. The baselines (`exchanges_models` False)
    send nothing."""
    if not exchanges_models:
        return {"bytes_down": 0.0, "bytes_up": 0.0}
    model_bytes = state_num_bytes(cohort.global_state)
    down = model_bytes * len(cohort.sampled) + sum(payload_num_bytes(t.payload) for t in cohort.tasks)
    up = sum(model_bytes + payload_num_bytes(u.payload) for u in updates)
    return {"bytes_down": float(down), "bytes_up": float(up)}


def evaluate_round(federation: Federation) -> tuple[dict[str, float], dict[int, dict[str, float]], dict[int, float]]:
    """The global model's metrics of its task on the test set and on the training data (`test_<name>`,
    `train_<name>` for each of `tasks.METRICS`: loss and accuracy; loss, mse, mae and r2), each client's
    test metric on its own test data (`{client: {"test_accuracy" | "test_mse": value}}`) with their spread
    (`tasks.client_spread`), and each client's training loss."""
    data, task = federation.dataset, federation.dataset.task
    own = federation.strategy.client_models(federation.model.state_dict(), range(len(federation.clients)))
    if own is not None:
        return evaluate_own_models(federation, own)
    on_test = evaluate(federation.model, data.x_test, data.y_test, task=task)
    # The global model on every client's training data (as each client holds it), sample-weighted: the
    # training loss the FedProx paper plots (Li et al. 2020, Fig. 1). Each training sample belongs to exactly
    # one client, so this is the mean over the whole training set.
    on_train = evaluate(federation.model, data.x_train, data.y_train, task=task)
    metrics = {f"{split}_{name}": value for split, evaluation in (("test", on_test), ("train", on_train))
               for name, value in evaluation.metrics.items()}
    client_train_loss = per_client_means(on_train.losses, federation.clients)
    client_test: dict[int, dict[str, float]] = {}
    if federation.client_tests is not None:
        values = evaluate_clients(federation.model, data, federation.client_tests, on_test)
        name, _ = client_metric(task)
        client_test = {client: {name: value} for client, value in values.items()}
        metrics.update(client_spread(task, values))
    return metrics, client_test, client_train_loss


def evaluate_own_models(federation: Federation, models: Mapping[int, Mapping[str, torch.Tensor]],
                        ) -> tuple[dict[str, float], dict[int, dict[str, float]], dict[int, float]]:
    """`evaluate_round` where every client has a model of its own (the local baseline): each client's model
    on its own test data (the client metric and its spread); `test_<name>` the mean over clients of each
    client's model on the whole test set (what a typical client's model does for everyone's data);
    `train_<name>` every training sample scored by its own client's model (so a training set measured as
    the federation's global model is measured, sample by sample)."""
    data, task = federation.dataset, federation.dataset.task
    scratch = copy.deepcopy(federation.model)
    name, _ = client_metric(task)
    on_tests, train_parts, client_train_loss, client_test = [], [], {}, {}
    for client, indices in enumerate(federation.clients):
        scratch.load_state_dict(models[client])
        on_test = evaluate(scratch, data.x_test, data.y_test, task=task)
        on_tests.append(on_test.metrics)
        rows = torch.as_tensor(indices, device=data.y_train.device)
        on_train = evaluate(scratch, data.x_train[rows], data.y_train[rows], task=task)
        train_parts.append(on_train.scores)
        if len(indices):
            client_train_loss[client] = float(on_train.losses.double().mean())
        if federation.client_tests is not None:
            value = evaluate_clients(scratch, data, federation.client_tests, on_test).get(client)
            if value is not None:
                client_test[client] = {name: value}
    metrics = {f"test_{key}": float(np.mean([m[key] for m in on_tests])) for key in on_tests[0]}
    train_scores = {key: torch.cat([part[key] for part in train_parts]) for key in train_parts[0]}
    all_rows = torch.as_tensor(np.concatenate(federation.clients), device=data.y_train.device)
    metrics.update({f"train_{key}": value
                    for key, value in set_metrics(task, train_scores, data.y_train[all_rows]).items()})
    if client_test:
        metrics.update(client_spread(task, {c: v[name] for c, v in client_test.items()}))
    return metrics, client_test, client_train_loss


def audit_membership(federation: Federation, round_: int, updates: Sequence[ClientUpdate]) -> dict[str, float]:
    """The membership-inference audit of a round (`privacy.audit`; Yeom et al., CSF 2018, the loss-threshold
    attack): its AUC separating members from non-members by their loss, against the new global model
    (members: training samples of any client) and against `privacy.audit_client`'s local model, the update
    it sent this round (members: its own training samples; logged only in rounds it trained). Non-members
    are test samples, which no client trains on; each side holds at most `privacy.audit_samples`, drawn
    from the round's audit stream. 0.5 = the attacker learns nothing; 1 = every member is told apart."""
    privacy, data, task = federation.config.privacy, federation.dataset, federation.dataset.task
    rng = server_stream(federation.config, round_, SERVER_AUDIT)

    def audit(model: nn.Module, member_rows: np.ndarray) -> float:
        mine, theirs = audit_samples(len(member_rows), len(data.y_test), rng=rng, limit=privacy.audit_samples)
        rows = torch.as_tensor(member_rows[mine], device=data.y_train.device)
        test_rows = torch.as_tensor(theirs, device=data.y_test.device)
        return membership_audit(model, (data.x_train[rows], data.y_train[rows]),
                                (data.x_test[test_rows], data.y_test[test_rows]), task)

    out = {"privacy_mia_auc_global": audit(federation.model, np.arange(len(data.y_train)))}
    own = next((u for u in updates if u.client == privacy.audit_client), None)
    if own is not None and len(federation.clients[own.client]):
        local = copy.deepcopy(federation.model)
        local.load_state_dict(own.state)
        out["privacy_mia_auc_client"] = audit(local, np.asarray(federation.clients[own.client]))
    return out


def run_round(federation: Federation, executor: Executor, round_: int,
              stop: threading.Event | None = None) -> RoundResult:
    """One round: plan the cohort, train it, aggregate into `federation.model`, measure, evaluate."""
    config = federation.config
    started = time.perf_counter()
    cohort = plan_cohort(federation, round_)
    starts = start_states(federation.strategy, cohort)  # before aggregation: the local baseline's change
    updates, dropped = train_cohort(federation, executor, cohort, stop, starts)
    new_state = aggregate_round(federation, cohort, updates)
    own_starts = {t.client: s for t, s in zip(cohort.tasks, starts) if s is not cohort.global_state}
    client_metrics, metrics = measure_updates(cohort.global_state, updates, cohort.malicious, own_starts)
    federation.model.load_state_dict(new_state)
    metrics.update(num_stragglers=float(len(cohort.stragglers)), num_dropped=float(len(dropped)),
                   **count_bytes(cohort, updates, federation.strategy.exchanges_models),
                   **federation.strategy.round_metrics())
    if cohort.malicious:
        metrics["num_malicious"] = float(len(cohort.malicious))
    client_test: dict[int, dict[str, float]] = {}
    client_train_loss: dict[int, float] = {}
    if round_ % config.evaluation.every == 0 or round_ == config.federation.rounds:
        evaluated, client_test, client_train_loss = evaluate_round(federation)
        metrics.update(evaluated)
    if config.privacy.audit:
        metrics.update(audit_membership(federation, round_, updates))
    metrics["round_time_s"] = time.perf_counter() - started
    if not all(math.isfinite(v) for v in metrics.values()):
        bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
        raise FloatingPointError(
            f"round {round_} diverged: {bad} (lower training.lr, currently {config.training.lr})"
        )
    return RoundResult(round_, metrics, cohort.sampled, tuple(cohort.stragglers), client_test,
                       client_metrics, client_train_loss, {d.client: d.description for d in dropped})

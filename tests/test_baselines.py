"""The local and centralized baselines against independent reconstructions: each client training alone from
its own model, and the pooled data of each round's sampled clients trained as one dataset."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import max_diff

from workbench.client import train_locally
from workbench.config import ExperimentConfig
from workbench.execution import ProcessExecutor, SequentialExecutor, batch_order
from workbench.simulation import (evaluate, plan_cohort, prepare, run, run_round, sample_round)
from workbench.strategies import build_strategy
from workbench.strategies.baselines import POOLED

pytestmark = pytest.mark.usefixtures("one_thread")


def config(strategy: str, **overrides) -> ExperimentConfig:
    """Synthetic(1, 1): natural clients of unequal sizes; 4 of 8 sampled per round, half of them stragglers."""
    return ExperimentConfig().with_overrides({
        "federation.num_clients": 8, "federation.clients_per_round": 4, "federation.rounds": 3,
        "federation.straggler_fraction": 0.5, "training.local_epochs": 3, "training.batch_size": 7,
        "training.lr": 0.05, "training.momentum": 0.5, "device": "cpu", "execution.executor": "sequential",
        "model.name": "mlp", "strategy.name": strategy, **overrides})


def test_local_clients_continue_their_own_model_for_the_rounds_they_are_sampled():
    """Rebuilt by hand: for each round, each sampled client trains (`train_locally`, its task's seed and
    epochs, a straggler's partial epochs included) from its own model of the last time it trained, or from
    the initial model; the run's per-client models must be exactly those, and the global model unchanged."""
    cfg = config("local")
    federation = prepare(cfg)
    initial = copy.deepcopy(federation.model.state_dict())
    scratch = copy.deepcopy(federation.model)
    expected: dict[int, dict[str, torch.Tensor]] = {}
    data = federation.dataset
    for round_ in range(1, cfg.federation.rounds + 1):
        cohort = plan_cohort(federation, round_)
        assert {t.client for t in cohort.tasks} == set(cohort.sampled)  # stragglers keep their partial work
        for task in cohort.tasks:
            start = expected.get(task.client, initial)
            expected[task.client], _ = train_locally(scratch, start, data.x_train[task.indices],
                                                     data.y_train[task.indices], cohort.objective,
                                                     num_epochs=task.num_epochs, generator=batch_order(task))
    reference = prepare(cfg)
    history = run(reference)
    assert history.status == "FINISHED"
    assert max_diff(reference.model.state_dict(), initial) == 0  # nothing is averaged
    models = reference.strategy.models
    assert sorted(models) == sorted(expected) and len(expected) >= 5  # some clients trained twice or more
    for client, state in expected.items():
        assert max_diff(models[client], state) < 1e-6
    assert all(r.metrics["bytes_up"] == 0 and r.metrics["bytes_down"] == 0 for r in history.rounds)


def test_centralized_trains_the_pooled_samples_of_each_rounds_clients_for_the_full_epochs():
    cfg = config("centralized")
    federation = prepare(cfg)
    sampled, stragglers = sample_round(cfg, 1)
    assert stragglers, "the pooled task must include the stragglers' samples, at full epochs"
    cohort = plan_cohort(federation, 1)
    (task,) = cohort.tasks
    pooled = np.sort(np.concatenate([federation.clients[c] for c in sampled]))
    assert task.client == POOLED and task.num_epochs == 3 and not task.is_partial
    assert np.array_equal(task.indices.numpy(), pooled)
    data = federation.dataset
    expected, _ = train_locally(copy.deepcopy(federation.model), federation.model.state_dict(),
                                data.x_train[task.indices], data.y_train[task.indices], cohort.objective,
                                num_epochs=3, generator=batch_order(task))
    result = run_round(federation, SequentialExecutor(federation.model), 1)
    assert max_diff(federation.model.state_dict(), expected) < 1e-6
    assert result.metrics["num_updates"] == 1 and result.client_metrics[POOLED]["num_samples"] == len(pooled)
    # samples visited per round: the federation's sampled clients', every one for the full epochs
    assert result.client_metrics[POOLED]["num_steps"] == 3 * -(-len(pooled) // 7)


def test_the_centralized_baseline_refuses_attacks():
    with pytest.raises(ValueError, match=r"attack\.fraction=0\.25 with strategy\.name='centralized'"):
        build_strategy(config("centralized", **{"attack.fraction": 0.25, "attack.kind": "sign_flip"}))


@pytest.mark.parametrize("strategy", ["local", "centralized"])
def test_the_processes_executor_agrees_with_sequential_on_the_baselines(strategy):
    cfg = config(strategy, **{"federation.rounds": 2})
    reference, parallel = prepare(cfg), prepare(cfg)
    run(reference)
    run(parallel, executor=ProcessExecutor(parallel.model, 2))
    assert max_diff(reference.model.state_dict(), parallel.model.state_dict()) < 1e-5
    if strategy == "local":
        assert reference.strategy.models.keys() == parallel.strategy.models.keys()
        for client, state in reference.strategy.models.items():
            assert max_diff(state, parallel.strategy.models[client]) < 1e-5


def test_local_is_evaluated_with_each_clients_own_model():
    """Each client's own model on its own test data (the client metric), the mean over clients of each own
    model on the whole test set (test_*), every training sample scored by its owner's model (train_*):
    recomputed here with `evaluate` on the run's own per-client models."""
    cfg = config("local", **{"federation.rounds": 2})
    federation = prepare(cfg)
    history = run(federation)
    final = history.rounds[-1]
    models, data = federation.strategy.models, federation.dataset
    scratch = copy.deepcopy(federation.model)
    initial = prepare(cfg).model.state_dict()
    test_accuracy, losses, counts = [], 0.0, 0
    for client, indices in enumerate(federation.clients):
        scratch.load_state_dict(models.get(client, initial))
        test_accuracy.append(evaluate(scratch, data.x_test, data.y_test).accuracy)
        on_train = evaluate(scratch, data.x_train[indices], data.y_train[indices])
        losses, counts = losses + float(on_train.losses.double().sum()), counts + len(indices)
        own = federation.client_tests.indices[client]
        if len(own):
            expected = evaluate(scratch, data.x_test[own], data.y_test[own]).accuracy
            assert final.client_accuracy[client] == pytest.approx(expected, abs=1e-9)
    assert final.metrics["test_accuracy"] == pytest.approx(float(np.mean(test_accuracy)), abs=1e-9)
    assert final.metrics["train_loss"] == pytest.approx(losses / counts, rel=1e-6)
    assert final.metrics["client_accuracy_mean"] == pytest.approx(float(np.mean(list(final.client_accuracy.values()))))
    # the global model of a local run is the untouched initial model: its own evaluation would differ
    assert final.metrics["test_accuracy"] != pytest.approx(evaluate(federation.model, data.x_test, data.y_test).accuracy)


def test_the_three_baselines_through_workbench_sweep_and_compare(tracking_uri, tmp_path):
    """breast_cancer among 5 hospitals, Dirichlet alpha 0.3: `workbench sweep` over fedavg, local and
    centralized, then `workbench compare` side by side, on the global test set and on each client's data
    (one seed and two rounds here; the README's table is the same command with three seeds)."""
    import os
    import subprocess
    import sys

    def workbench(*args):
        return subprocess.run([sys.executable, "-m", "workbench.cli", *args], capture_output=True, text=True,
                              cwd=tmp_path, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=300)

    settings = ["data.name=breast_cancer", "data.scaling=federated", "model.name=logreg",
                "partition.scheme=dirichlet", "partition.alpha=0.3", "partition.min_size=10",
                "federation.num_clients=5", "federation.clients_per_round=5", "federation.rounds=2",
                "training.batch_size=16", "execution.executor=sequential"]
    sweep = workbench("sweep", *[a for s in settings for a in ("--set", s)], "--grid",
                      "strategy.name=fedavg,local,centralized", "--seeds", "0", "--experiment", "hospitals",
                      "--tracking-uri", tracking_uri, "--quiet", "--output", str(tmp_path / "sweep.png"))
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    for metric in ("test_accuracy", "client_accuracy_mean"):
        shown = workbench("compare", "--experiment", "hospitals", "--metric", metric, "--tracking-uri",
                          tracking_uri, "--output", str(tmp_path / f"{metric}.png"))
        assert shown.returncode == 0, shown.stderr[-3000:]
        rows = {name: line.split() for line in shown.stdout.splitlines()
                for name in ("fedavg", "local", "centralized") if line.lstrip().startswith(f"strategy.name={name} ")}
        assert len(rows) == 3, shown.stdout
        assert all(row[1:3] == ["1", "0"] for row in rows.values()), shown.stdout
        assert f"final_{metric}_mean" in shown.stdout

"""Regression as a task (`workbench.tasks`): MSE as the training loss in every executor, the metrics
(mse, mae, r2 against scikit-learn, their per-client spread against numpy), diabetes and
synthetic_regression runs, checkpoints and resume of a regression, and what needs classes refused."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import in_float64, max_diff
from mlflow.tracking import MlflowClient
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from workbench import tasks
from workbench.client import LocalObjective, train_locally
from workbench.config import ExperimentConfig
from workbench.execution import (ProcessExecutor, SequentialExecutor, VectorizedExecutor, linear_chain,
                                 train_chain_locally)
from workbench.models import build_model
from workbench.simulation import Callback, evaluate, local_objective, prepare, run, run_round
from workbench.tracking import (CLIENT_COLUMNS, CLIENT_TABLE, MlflowCallback, build_ready_model, compare, load_model,
                                resume)

pytestmark = pytest.mark.usefixtures("one_thread")


def diabetes_config(**overrides) -> ExperimentConfig:
    """diabetes among 5 clients, a Dirichlet label skew over target bins, linear regression, features
    standardized the federated way."""
    base = {"data.name": "diabetes", "model.name": "linear", "data.scaling": "federated",
            "partition.scheme": "dirichlet", "partition.alpha": 0.5, "federation.num_clients": 5,
            "federation.clients_per_round": 5, "federation.rounds": 5, "training.local_epochs": 2,
            "training.batch_size": 10, "training.lr": 0.05, "device": "cpu", "execution.executor": "sequential"}
    return ExperimentConfig().with_overrides({**base, **overrides})


def linear_predictions(model, x) -> np.ndarray:
    """A `linear` model's outputs computed with numpy from its weights: x W^T + b, flattened."""
    state = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    (weight,) = [v for k, v in state.items() if k.endswith("weight")]
    (bias,) = [v for k, v in state.items() if k.endswith("bias")]
    return (x.detach().double().numpy().reshape(len(x), -1) @ weight.T + bias).ravel()


# ----- the metrics, against scikit-learn and numpy -----


def test_mse_mae_r2_equal_scikit_learn_on_unequal_clients():
    rng = np.random.default_rng(7)
    sizes = (3, 8, 21)
    for size in sizes:
        targets = rng.normal(2.0, 3.0, size)
        predictions = targets + rng.normal(0.4, 1.5, size)  # biased and noisy: r2 well below 1
        assert tasks.mse(predictions, targets) == pytest.approx(mean_squared_error(targets, predictions), rel=1e-14)
        assert tasks.mae(predictions, targets) == pytest.approx(mean_absolute_error(targets, predictions), rel=1e-14)
        assert tasks.r2(predictions, targets) == pytest.approx(r2_score(targets, predictions), rel=1e-12)
        # torch tensors in float32 give the float64 answer of their values
        as_tensors = (torch.tensor(predictions, dtype=torch.float32), torch.tensor(targets, dtype=torch.float32))
        assert tasks.r2(*as_tensors) == pytest.approx(
            r2_score(as_tensors[1].double().numpy(), as_tensors[0].double().numpy()), rel=1e-12)
    # a model worse than the mean has a negative r2, as in scikit-learn
    targets = np.array([1.0, 2.0, 3.0, 4.0])
    assert tasks.r2(targets[::-1], targets) == pytest.approx(r2_score(targets, targets[::-1])) == -3.0
    # SS_tot = 0: 1 for exact predictions, 0 otherwise (scikit-learn's force_finite), never inf or NaN
    constant = np.full(5, 2.5)
    assert tasks.r2(constant, constant) == r2_score(constant, constant) == 1.0
    assert tasks.r2(constant + 0.1, constant) == r2_score(constant, constant + 0.1) == 0.0


def test_evaluate_a_regression_is_scikit_learn_on_the_model_s_numpy_predictions():
    model = build_model("linear", (6,), 1, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(37, 6, generator=gen), torch.randn(37, generator=gen) * 2 + 0.5
    predictions = linear_predictions(model, x)
    # batches of 10 (the last one ragged) concatenate to the same numbers as one pass
    evaluation = evaluate(model, x, y, batch_size=10, task="regression")
    truth = y.double().numpy()
    assert evaluation.metrics == pytest.approx({
        "loss": mean_squared_error(truth, predictions), "mse": mean_squared_error(truth, predictions),
        "mae": mean_absolute_error(truth, predictions), "r2": r2_score(truth, predictions)}, rel=1e-6)
    assert evaluation.loss == evaluation.metrics["mse"]  # one number, two names
    np.testing.assert_allclose(evaluation.losses.numpy(), (predictions - truth) ** 2, rtol=1e-5)
    with pytest.raises(AttributeError, match="regression has no accuracy"):
        evaluation.accuracy


def test_error_spread_by_hand():
    spread = tasks.error_spread({0: 0.5, 3: 2.0, 1: 1.0, 7: 4.0, 2: 0.1})
    # sorted 0.1, 0.5, 1, 2, 4: median 1; p90 at position 0.9 * 4 = 3.6: 2 + 0.6 * (4 - 2) = 3.2; mean 7.6 / 5
    assert spread == pytest.approx({"client_test_mse_mean": 1.52, "client_test_mse_median": 1.0,
                                    "client_test_mse_p90": 3.2,
                                    "client_test_mse_max": 4.0})
    assert tasks.error_spread({}) == {}
    assert tasks.client_spread("classification", {0: 0.0, 1: 1.0})["num_clients_at_zero_accuracy"] == 1


def test_a_round_s_regression_metrics_and_per_client_mse_against_numpy_and_scikit_learn():
    federation = prepare(diabetes_config())
    result = run_round(federation, SequentialExecutor(federation.model), 1)
    data, metrics = federation.dataset, result.metrics
    for split, x, y in (("test", data.x_test, data.y_test), ("train", data.x_train, data.y_train)):
        p, truth = linear_predictions(federation.model, x), y.double().numpy()
        assert metrics[f"{split}_mse"] == pytest.approx(mean_squared_error(truth, p), rel=1e-6)
        assert metrics[f"{split}_mae"] == pytest.approx(mean_absolute_error(truth, p), rel=1e-6)
        assert metrics[f"{split}_r2"] == pytest.approx(r2_score(truth, p), rel=1e-6)
        assert metrics[f"{split}_loss"] == metrics[f"{split}_mse"]
        assert f"{split}_accuracy" not in metrics
    assert "client_accuracy_min" not in metrics and result.client_accuracy == {}
    # each client's own test data: its MSE, numpy on the model's numpy predictions
    tests = federation.client_tests
    sizes = tests.sizes
    assert len(set(sizes.tolist())) > 1, "the clients must hold unequal test sets"
    p, truth = linear_predictions(federation.model, data.x_test), data.y_test.double().numpy()
    expected = {k: float(np.mean((p[i] - truth[i]) ** 2)) for k, i in enumerate(tests.indices) if len(i)}
    assert set(result.client_test_metrics) == set(expected)
    assert {k: m["test_mse"] for k, m in result.client_test_metrics.items()} == pytest.approx(expected, rel=1e-6)
    values = np.array([expected[k] for k in sorted(expected)])
    assert metrics["client_test_mse_median"] == pytest.approx(np.median(values), rel=1e-6)
    assert metrics["client_test_mse_p90"] == pytest.approx(np.percentile(values, 90), rel=1e-6)
    assert metrics["client_test_mse_max"] == pytest.approx(values.max(), rel=1e-6)
    assert values.max() > 1.2 * np.median(values)  # the spread is a spread
    # each client's training loss is its own MSE too
    p_train, truth_train = linear_predictions(federation.model, data.x_train), data.y_train.double().numpy()
    assert result.client_train_loss == pytest.approx(
        {k: float(np.mean((p_train[c] - truth_train[c]) ** 2)) for k, c in enumerate(federation.clients)}, rel=1e-6)


# ----- training: the loss is MSE, in every executor -----


def test_one_local_step_is_the_closed_form_gradient_of_mse():
    """One full-batch step of `train_locally` on a regression: w <- w - lr * (2/B) X^T (X w + b - y)."""
    model = build_model("linear", (4,), 1, torch.Generator().manual_seed(1)).double()
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(9, 4, dtype=torch.float64, generator=gen), torch.randn(9, generator=gen).float()
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    objective = LocalObjective(lr=0.1, batch_size=9, task="regression")
    state, loss = train_locally(model, global_state, x, y, objective, num_epochs=1,
                                generator=torch.Generator().manual_seed(0))
    w, b = global_state["linear.weight"].numpy(), global_state["linear.bias"].numpy()
    X, t = x.numpy(), y.double().numpy()
    residual = X @ w[0] + b[0] - t
    np.testing.assert_allclose(state["linear.weight"].numpy()[0], w[0] - 0.1 * 2 / 9 * X.T @ residual, rtol=1e-12)
    np.testing.assert_allclose(state["linear.bias"].numpy(), b - 0.1 * 2 / 9 * residual.sum(), rtol=1e-12)
    assert loss == pytest.approx(np.mean(residual ** 2), rel=1e-12)


#: The kernel's two ways of stepping: in place without momentum, the formed gradient with it.
REGRESSION_OBJECTIVES = {"prox": {"proximal_mu": 0.7}, "decay+prox": {"weight_decay": 0.05, "proximal_mu": 0.7},
                         "momentum+prox": {"momentum": 0.9, "proximal_mu": 0.7},
                         "momentum+decay+prox": {"momentum": 0.9, "weight_decay": 0.05, "proximal_mu": 0.7}}


@pytest.mark.parametrize("terms", list(REGRESSION_OBJECTIVES))
@pytest.mark.parametrize("model_name", ["linear", "tabular_mlp"])
def test_fused_kernel_trains_a_regression_as_train_locally_does(model_name, terms):
    model = build_model(model_name, (7,), 1, torch.Generator().manual_seed(0)).double()
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(23, 7, dtype=torch.float64, generator=gen), torch.randn(23, generator=gen) * 3 + 1
    objective = LocalObjective(lr=0.05, batch_size=5, task="regression", **REGRESSION_OBJECTIVES[terms])
    ref, ref_loss = train_locally(model, global_state, x, y, objective, num_epochs=3,
                                  generator=torch.Generator().manual_seed(4))
    out, loss = train_chain_locally(linear_chain(model), global_state, x, y, objective, num_epochs=3,
                                    generator=torch.Generator().manual_seed(4))
    assert max_diff(ref, global_state) > 1e-3  # it really trained
    assert max_diff(ref, out) < 1e-12
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    plain, _ = train_locally(model, global_state, x, y, LocalObjective(lr=0.05, batch_size=5, task="regression"),
                             num_epochs=3, generator=torch.Generator().manual_seed(4))
    assert max_diff(plain, out) > 1e-4  # the terms really change the result


def test_the_kernel_refuses_a_regression_model_with_more_than_one_output():
    model = build_model("linear", (7,), 3, torch.Generator().manual_seed(0))
    state = model.state_dict()
    with pytest.raises(ValueError, match="regression needs a model with one output.*3.*num_outputs=1"):
        train_chain_locally(linear_chain(model), state, torch.randn(4, 7), torch.randn(4),
                            LocalObjective(lr=0.1, batch_size=2, task="regression"), num_epochs=1,
                            generator=torch.Generator())


@pytest.mark.workers
def test_a_round_of_diabetes_agrees_on_sequential_processes_and_vectorized():
    """FedProx with momentum, stragglers and ragged batches, float64: the same global model to 1e-10."""
    config = diabetes_config(**{"strategy.name": "fedprox", "strategy.mu": 0.5, "training.momentum": 0.9,
                                "federation.straggler_fraction": 0.4, "training.batch_size": 7})
    federation = in_float64(prepare(config))
    objective = local_objective(federation, 1)
    assert objective.task == "regression" and objective.proximal_mu == 0.5
    assert len({len(c) for c in federation.clients}) == 5, "unequal clients"
    initial = {k: v.clone() for k, v in federation.model.state_dict().items()}
    kinds = {"sequential": SequentialExecutor, "processes": ProcessExecutor, "vectorized": VectorizedExecutor}
    states, results = {}, {}
    for name, kind in kinds.items():
        copied = copy.deepcopy(federation)
        results[name] = run_round(copied, kind(copied.model), 1)
        states[name] = copied.model.state_dict()
    assert results["sequential"].metrics["num_stragglers"] == 2
    assert max_diff(states["sequential"], initial) > 1e-2  # the round changed the model
    for name in ("processes", "vectorized"):
        assert max_diff(states["sequential"], states[name]) < 1e-10, name
        assert results[name].metrics["test_mse"] == pytest.approx(results["sequential"].metrics["test_mse"], rel=1e-10)
        assert results[name].metrics["local_train_loss"] == pytest.approx(
            results["sequential"].metrics["local_train_loss"], rel=1e-10)


# ----- whole runs -----


def test_diabetes_federated_linear_regression_explains_the_target():
    history = run(diabetes_config())
    r2 = [value for _, value in history.metric("test_r2")]
    assert len(r2) == 5
    # measured: test_r2 0.401, 0.363, 0.390, 0.397, 0.402 (test MSE 0.634 of a standardized target)
    assert r2[-1] > 0.3
    final = history.final()
    assert final["test_loss"] == final["test_mse"] and 0 < final["test_mae"] < 1
    assert final["client_test_mse_median"] <= final["client_test_mse_p90"] <= final["client_test_mse_max"]


def test_synthetic_regression_with_a_tabular_mlp_learns():
    config = ExperimentConfig().with_overrides({
        "data.name": "synthetic_regression", "data.alpha": 0.5, "data.beta": 0.5, "model.name": "tabular_mlp",
        "data.scaling": "federated", "federation.num_clients": 10, "federation.clients_per_round": 5,
        "federation.rounds": 6, "training.local_epochs": 1, "training.batch_size": 10, "training.lr": 0.001,
        "device": "cpu", "execution.executor": "sequential"})
    history = run(config)
    mse = [value for _, value in history.metric("test_mse")]
    # measured: 194.1, 162.9, 137.2, 119.2, 108.3, 105.4 (the raw target: std about 17 across clients)
    assert all(later < earlier for earlier, later in zip(mse, mse[1:])), mse
    assert mse[-1] < 0.6 * mse[0]
    assert history.final()["test_r2"] > 0.2


# ----- refusals -----


def test_label_flipping_is_refused_for_a_regression():
    with pytest.raises(ValueError, match=r"attack.kind='label_flip'.*data.name=diabetes is a regression.*"
                                         r"attack.kind=sign_flip.*attack.kind=gaussian"):
        prepare(diabetes_config(**{"attack.kind": "label_flip", "attack.fraction": 0.2}))
    prepare(diabetes_config(**{"attack.kind": "sign_flip", "attack.fraction": 0.2}))  # these need no classes


def test_the_panel_s_target_bins_knob_follows_the_dataset_s_task():
    from workbench.ui.experiment_panel import applies

    dirichlet = {"partition.scheme": "dirichlet"}
    assert applies("partition.target_bins", {"data.name": "diabetes", **dirichlet})
    assert applies("partition.target_bins", {"data.name": "synthetic_regression", **dirichlet})
    assert not applies("partition.target_bins", {"data.name": "digits", **dirichlet})
    assert not applies("partition.target_bins", {"data.name": "diabetes", "partition.scheme": "iid"})
    # a registered dataset's task is unknown until it is loaded: the knob stays editable
    assert applies("partition.target_bins", {"data.name": "my_own_data", **dirichlet})


# ----- checkpoints, the best round, resume, the record -----


def test_a_failed_regression_run_resumes_and_its_model_loads_and_predicts(tracking_uri, tmp_path):
    from test_resume import assert_same_model

    # measured test MSE 0.635, 0.675, 0.647: the best round (1) is neither the highest nor the last
    config = diabetes_config(**{"federation.rounds": 3})

    class CrashAtRound2(Callback):
        def on_round_end(self, result, federation):
            if result.round == 2:
                raise RuntimeError("power cut")

    tracker = MlflowCallback(tracking_uri, experiment="regression")
    with pytest.raises(RuntimeError, match="power cut"):
        run(config, [tracker, CrashAtRound2()])
    client = MlflowClient(tracking_uri)
    assert client.get_run(tracker.run_id).info.status == "FAILED"
    history = resume(tracker.run_id, tracking_uri)
    assert history.status == "FINISHED" and [r.round for r in history.rounds] == [3]

    class States(Callback):
        def __init__(self):
            self.states = {}

        def on_round_end(self, result, federation):
            self.states[result.round] = copy.deepcopy(federation.model.state_dict())

    reference, states = prepare(config), States()
    expected = run(reference, [states])
    logged = client.get_run(tracker.run_id)
    assert logged.data.tags["resumed_from_round"] == "2"
    for key in ("test_mse", "test_mae", "test_r2", "train_mse", "client_test_mse_max", "test_loss"):
        points = sorted((m.step, m.value) for m in client.get_metric_history(tracker.run_id, key))
        assert points == expected.metric(key), key
    assert "test_accuracy" not in logged.data.metrics
    # the final model: rebuilt with one output, the weights of the uninterrupted run, predicting as it does
    model = load_model(tracker.run_id, tracking_uri)
    assert_same_model(model, reference.model)
    x = reference.dataset.x_test[:8]
    assert model(x).shape == (8, 1)
    assert torch.equal(model(x), reference.model.eval()(x))
    spec = json.loads(Path(client.download_artifacts(tracker.run_id, "model/model.json", str(tmp_path))).read_text())
    assert (spec["task"], spec["num_outputs"], spec["num_classes"]) == ("regression", 1, 0)
    # the best round is the one of lowest test MSE (= test_loss), and its checkpoint holds that round's model
    mse = dict(expected.metric("test_mse"))
    best = min(mse, key=mse.get)
    assert best not in (max(mse, key=mse.get), 3)
    assert logged.data.tags["best_round"] == str(best)
    best_model = _model_with(reference, states.states[best])
    assert_same_model(load_model(tracker.run_id, tracking_uri, round="best"), best_model)
    # the client table: each client's test MSE, last column, and no test accuracy
    rows = list(csv.DictReader(open(client.download_artifacts(tracker.run_id, CLIENT_TABLE, str(tmp_path)))))
    assert CLIENT_COLUMNS[-1] == "test_mse" and list(rows[0]) == list(CLIENT_COLUMNS)
    last = {int(r["client"]): float(r["test_mse"]) for r in rows if r["round"] == "3"}
    assert last == pytest.approx({k: m["test_mse"] for k, m in expected.rounds[-1].client_test_metrics.items()},
                                 rel=1e-12)
    assert all(r["test_accuracy"] == "" for r in rows)
    # the comparison of regression runs goes by test MSE, lower is better, under the run's partition title
    comparison = compare("regression", tracking_uri)
    assert comparison.metric == "test_mse"
    assert comparison.table["final_test_mse_mean"].tolist() == pytest.approx([mse[3]])
    assert "target_bins=10" in comparison.figure._suptitle.get_text()


def _model_with(federation, state):
    model = copy.deepcopy(federation.model)
    model.load_state_dict(state)
    return model


def test_a_model_spec_without_num_outputs_still_builds_as_before():
    """Specs written before tasks existed hold num_classes only: the model outputs that many values."""
    model = build_model("logreg", (60,), 10, torch.Generator().manual_seed(0))
    rebuilt = build_ready_model({"model": "logreg", "input_shape": [60], "num_classes": 10}, model.state_dict())
    x = torch.randn(3, 60)
    assert torch.equal(rebuilt(x), model.eval()(x)) and rebuilt(x).shape == (3, 10)


def test_the_cli_prints_a_regression_s_metrics_and_compares_by_test_mse(tracking_uri, tmp_path, capsys):
    from workbench.cli import main

    config = diabetes_config(**{"federation.rounds": 2})
    args = [arg for key, value in config.to_flat().items() for arg in ("--set", f"{key}={value}")]
    assert main(["run", *args, "--tracking-uri", tracking_uri, "--experiment", "cli-regression", "--quiet"]) == 0
    printed = capsys.readouterr().out
    expected = run(config).final()
    for key in tasks.summary_metrics("regression"):
        (line,) = [line for line in printed.splitlines() if line.split()[:1] == [key]]
        assert float(line.split()[1]) == pytest.approx(expected[key], abs=5e-5), key
    assert "accuracy" not in printed
    assert main(["compare", "--experiment", "cli-regression", "--tracking-uri", tracking_uri,
                 "--output", str(tmp_path / "compare.png")]) == 0
    printed = capsys.readouterr().out
    assert "final_test_mse_mean" in printed and "test_mse <=" in printed

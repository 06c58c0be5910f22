"""What a task means, in one place: its training loss, its per-sample loss and scores for evaluation, its
metrics as pure functions, the names a run logs them under, and which metric headlines a run.

A task is what a dataset's labels are (`Dataset.task`, one of `workbench.config.TASKS`):

- `classification`: the model outputs logits (B, C), the labels are int64 class indices (B,); the loss is
  cross-entropy; metrics `loss` (mean cross-entropy) and `accuracy`.
- `regression`: the model outputs one value per sample (B, 1), the targets are float (B,); the loss is the
  mean squared error between the output flattened to (B,) and the target; metrics `loss` (= `mse`, the
  same number), `mse`, `mae` and `r2` (the coefficient of determination).

A round logs each set metric as `test_<name>` (the held-out test set) and `train_<name>` (every client's
training data); each client's own test data gives one per-client number (`client_metric`) and its spread
over clients (`client_spread`).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from workbench.config import TASKS

#: The set metrics of each task, unprefixed, in the order a round logs them (`set_metrics`).
METRICS = {"classification": ("loss", "accuracy"), "regression": ("loss", "mse", "mae", "r2")}
#: Each task's per-client test metric: (its name in `RoundResult.client_test_metrics` and the client
#: table, the per-sample score it is the mean of).
CLIENT_METRICS = {"classification": ("test_accuracy", "correct"), "regression": ("test_mse", "loss")}
#: The metric that says how good a run is, and which way is better: what the best checkpoint, the compare
#: view, the progress bar and the panel go by. For a regression test_mse is test_loss, the same number.
HEADLINE_METRICS = {"classification": ("test_accuracy", "max"), "regression": ("test_mse", "min")}
#: The two curves a live view and a compare view show by default.
CURVE_METRICS = {"classification": ("test_accuracy", "test_loss"), "regression": ("test_mse", "test_r2")}
#: What a finished run's summary lists (the CLI's table, the panel's summary), in order.
SUMMARY_METRICS = {
    "classification": ("test_accuracy", "test_loss", "train_loss", "train_accuracy", "client_accuracy_median",
                       "client_accuracy_p10", "num_clients_at_zero_accuracy"),
    "regression": ("test_mse", "test_mae", "test_r2", "train_mse", "train_mae", "train_r2",
                   "client_test_mse_median", "client_test_mse_p90", "client_test_mse_max"),
}
#: Parts of a metric's name that make lower values better (everything else: higher is better).
_LOWER_IS_BETTER = ("loss", "mse", "mae")


def check_task(task: str) -> str:
    """`task`, or ValueError when it is not one of `TASKS`."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r} (a dataset's task is "
                         f"Dataset.task: classification for class labels, regression for a continuous target)")
    return task


# ----- losses -----


def training_loss(task: str, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean loss of a mini-batch that local SGD minimizes: cross-entropy of logits (B, C) against int64
    labels (B,), or, for a regression, mean squared error mean_b (z_b - y_b)^2 between the output (B, 1)
    flattened to (B,) and the float target (B,) (the target is cast to the output's dtype)."""
    if task == "regression":
        return F.mse_loss(_flat(outputs, targets), targets.to(outputs.dtype))
    return F.cross_entropy(outputs, targets)


def per_sample_loss(task: str, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`training_loss` of each sample, (B,), in the outputs' dtype: cross-entropy, or the squared error."""
    if task == "regression":
        return (_flat(outputs, targets) - targets.to(outputs.dtype)).square()
    return F.cross_entropy(outputs, targets, reduction="none")


def _flat(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # reshape, not squeeze: a (B, k > 1) output must fail here, never broadcast against a (B,) target
    return outputs.reshape(targets.shape)


# ----- a regression's metrics: pure functions of predictions and targets (float64) -----


def _as_float64(values) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.float64).reshape(-1)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)).reshape(-1)


def squared_errors(predictions, targets) -> torch.Tensor:
    """(p_i - y_i)^2 of each sample, float64."""
    return (_as_float64(predictions) - _as_float64(targets)).square()


def mse(predictions, targets) -> float:
    """Mean squared error: mean_i (p_i - y_i)^2 (scikit-learn's `mean_squared_error`)."""
    return float(squared_errors(predictions, targets).mean())


def mae(predictions, targets) -> float:
    """Mean absolute error: mean_i |p_i - y_i| (scikit-learn's `mean_absolute_error`)."""
    return float((_as_float64(predictions) - _as_float64(targets)).abs().mean())


def r2(predictions, targets) -> float:
    """The coefficient of determination over the evaluated set, as scikit-learn's `r2_score` defines it:
    1 - SS_res / SS_tot, SS_res = sum_i (y_i - p_i)^2, SS_tot = sum_i (y_i - mean(y))^2. 1 is a perfect
    fit, 0 is what predicting the set's own mean scores, and it is negative for worse.

    A set whose targets are all equal has SS_tot = 0, where the ratio is undefined: then, as scikit-learn
    does (`force_finite=True`), R^2 is 1.0 for exact predictions and 0.0 otherwise, never inf or NaN
    (a round's metrics must be finite: `run_round` treats a non-finite one as divergence)."""
    y = _as_float64(targets)
    ss_res = float(squared_errors(predictions, y).sum())
    ss_tot = float((y - y.mean()).square().sum())
    if ss_tot == 0.0:
        return 1.0 if ss_res == 0.0 else 0.0
    return 1.0 - ss_res / ss_tot


# ----- evaluation: per-sample scores, then the metrics of a set -----


def sample_scores(task: str, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """What evaluation keeps of each sample, (B,) each: `loss` (the task's per-sample loss) and, for a
    classification, `correct` (bool: argmax == label); for a regression, `prediction` (the output, float64)
    and `loss` its squared error (float64, so that test_loss and test_mse are the same number)."""
    if task == "regression":
        prediction = _flat(outputs, targets).double()
        return {"prediction": prediction, "loss": (prediction - targets.double()).square()}
    return {"loss": F.cross_entropy(outputs, targets, reduction="none"), "correct": outputs.argmax(dim=1) == targets}


def set_metrics(task: str, scores: Mapping[str, torch.Tensor], targets: torch.Tensor) -> dict[str, float]:
    """The task's metrics (`METRICS`) of a set of samples from their `sample_scores` (concatenated) and
    targets: mean loss and accuracy; or loss = mse, mse, mae and r2 of the predictions."""
    if task == "regression":
        predictions = scores["prediction"]
        error = mse(predictions, targets)
        return {"loss": error, "mse": error, "mae": mae(predictions, targets), "r2": r2(predictions, targets)}
    return {"loss": float(scores["loss"].double().mean()), "accuracy": float(scores["correct"].double().mean())}


# ----- per-client numbers and their spread -----


def client_metric(task: str) -> tuple[str, str]:
    """(name, per-sample score) of the task's per-client test metric: each client's test accuracy, or its
    test MSE, the mean of `sample_scores[score]` over the client's own test samples."""
    return CLIENT_METRICS[check_task(task)]


def accuracy_spread(client_accuracy: Mapping[int, float]) -> dict[str, float]:
    """The spread of per-client accuracy: the mean over clients (each client counts once, whatever its
    size: what a typical client sees on its own data), min, 10th percentile, median (numpy's linear
    interpolation), and how many clients are at exactly 0 (which min and p10 alone do not tell)."""
    if not client_accuracy:
        return {}
    values = np.array(list(client_accuracy.values()), dtype=np.float64)
    return {"client_accuracy_mean": float(values.mean()), "client_accuracy_min": float(values.min()),
            "client_accuracy_p10": float(np.percentile(values, 10)),
            "client_accuracy_median": float(np.median(values)),
            "num_clients_at_zero_accuracy": float(np.sum(values == 0.0))}


def error_spread(client_mse: Mapping[int, float]) -> dict[str, float]:
    """The spread of each client's own test MSE: the mean over clients (each counts once), median, 90th
    percentile (numpy's linear interpolation) and max. For an error the bad tail is the high one: the
    clients the global model serves worst."""
    if not client_mse:
        return {}
    values = np.array(list(client_mse.values()), dtype=np.float64)
    return {"client_test_mse_mean": float(values.mean()), "client_test_mse_median": float(np.median(values)),
            "client_test_mse_p90": float(np.percentile(values, 90)),
            "client_test_mse_max": float(values.max())}


def client_spread(task: str, values: Mapping[int, float]) -> dict[str, float]:
    """The spread over clients of the task's per-client test metric (`client_metric`)."""
    return error_spread(values) if check_task(task) == "regression" else accuracy_spread(values)


# ----- names: which metric headlines a run, which way is better -----


def headline_metric(task: str) -> tuple[str, str]:
    """(metric, "max" | "min"): test_accuracy, higher is better; test_mse (= test_loss), lower is better."""
    return HEADLINE_METRICS[check_task(task)]


def curve_metrics(task: str) -> tuple[str, ...]:
    """The curves a live or compare view shows by default."""
    return CURVE_METRICS[check_task(task)]


def summary_metrics(task: str) -> tuple[str, ...]:
    """The metrics a finished run's summary lists, in order."""
    return SUMMARY_METRICS[check_task(task)]


def metric_goal(name: str) -> str:
    """"min" for a metric where lower is better (a loss, an MSE or MAE, and their spreads), else "max"."""
    return "min" if any(part in name for part in _LOWER_IS_BETTER) else "max"


def is_improvement(value: float, best: float | None, goal: str) -> bool:
    """Whether `value` beats `best` (None: nothing yet) in the direction `goal` ("max" or "min")."""
    if best is None:
        return value == value  # a NaN never becomes the best
    return value > best if goal == "max" else value < best


def task_of_metrics(names: Iterable[str]) -> str:
    """The task whose metrics these are (a run's logged metric names, a round's metrics): regression where
    a set's MSE was logged, else classification. For views over logged runs, which know no dataset."""
    return "regression" if any(name in ("test_mse", "train_mse") for name in names) else "classification"


def common_task(metric_sets: Sequence[Iterable[str]]) -> str:
    """The one task of several runs (each given by its logged metric names); ValueError when they mix."""
    found = {task_of_metrics(names) for names in metric_sets}
    if len(found) > 1:
        raise ValueError(f"the runs mix tasks ({', '.join(sorted(found))}), so no metric applies to all; "
                         f"name the metric to compare (e.g. --metric test_loss, which every task logs)")
    return found.pop() if found else "classification"

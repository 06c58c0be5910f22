"""Feature scaling the federated way: per-client moments, their pooled standardization, and `data.scaling`
applied to a partitioned dataset (federated, local or none).

A federation cannot pool its clients' inputs to standardize them, but it can pool three numbers per
feature: each client sends the sum, the sum of squares and the count of its training inputs, and the
server adds them up. That gives exactly the pooled mean and (population) variance,

    mean_j = S_j / N,   var_j = Q_j / N - mean_j^2,   S_j = sum_k S_kj,  Q_j = sum_k Q_kj,  N = sum_k N_k,

(partial moments combine exactly: Chan, Golub & LeVeque, "Updating formulae and a pairwise algorithm for
computing sample variances", 1979; sums are also what secure aggregation can add without revealing any
client's own). Local scaling, each client with its own mean and std, is what silos do when they do not
coordinate: each client's inputs look standardized to it, but the same raw value means different things at
different clients, a feature skew (the problem Hsieh et al., "The Non-IID Data Quagmire of Decentralized
Machine Learning", ICML 2020, show for batch normalization's per-client statistics).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from workbench.config import SCALINGS
from workbench.data import Dataset

#: A feature whose variance is at most this times its squared mean is constant up to rounding (the
#: sum-of-squares formula cancels: float64 leaves about 1e-16 * mean^2 of noise): it gets std 1, so a
#: constant feature is centred and not blown up.
ZERO_VARIANCE_RTOL = 1e-12


class Moments(NamedTuple):
    """What one client sends for federated standardization: per flattened input feature, the sum and the
    sum of squares of its training inputs (float64), and how many inputs it has."""

    sum: torch.Tensor
    sumsq: torch.Tensor
    count: int


def feature_matrix(x: torch.Tensor) -> torch.Tensor:
    """`x` of shape (N, *input_shape) as an (N, F) float64 matrix, one column per input element (a pixel,
    a time step of a channel, a tabular feature): standardization is per element, over the samples."""
    x = torch.as_tensor(x)
    return x.reshape(len(x), int(np.prod(x.shape[1:]))).to(torch.float64)


def client_moments(x: torch.Tensor, parts: Sequence[np.ndarray]) -> list[Moments]:
    """Each client's `Moments` of its rows `parts[k]` of `x` (shape (N, *input_shape)); a client without
    rows sends zeros."""
    matrix = feature_matrix(x)
    moments = []
    for part in parts:
        rows = matrix[torch.as_tensor(np.asarray(part, dtype=np.int64), device=matrix.device)]
        moments.append(Moments(rows.sum(dim=0), (rows * rows).sum(dim=0), len(rows)))
    return moments


def pooled_standardization(moments: Sequence[Moments]) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and the (population, ddof=0) standard deviation per feature of the union of the clients'
    inputs, from their moments alone: mean = S / N, var = Q / N - mean^2 (clipped at 0). Features of zero
    variance (up to `ZERO_VARIANCE_RTOL`) get std 1; with no inputs at all, mean 0 and std 1 (the identity).
    One client's moments give that client's own mean and std (local scaling)."""
    if not moments:
        raise ValueError("pooled_standardization needs the moments of at least one client")
    total = sum(m.sum for m in moments)
    total_sq = sum(m.sumsq for m in moments)
    count = sum(m.count for m in moments)
    if count == 0:
        return torch.zeros_like(total), torch.ones_like(total)
    mean = total / count
    var = torch.clamp(total_sq / count - mean * mean, min=0.0)
    constant = var <= ZERO_VARIANCE_RTOL * mean * mean
    std = torch.where(constant, torch.ones_like(var), torch.sqrt(var))
    return mean, std


def standardize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std per flattened feature (computed in float64), in the shape and dtype of `x`."""
    matrix = feature_matrix(x)
    scaled = (matrix - mean.to(matrix.device)) / std.to(matrix.device)
    return scaled.reshape(x.shape).to(x.dtype)


def scale_features(scaling: str, dataset: Dataset, clients: Sequence[np.ndarray],
                   client_tests: Any = None) -> tuple[Dataset, Any]:
    """`dataset` and its clients' test sets with the inputs scaled as `data.scaling` says; labels never change.

    `clients` are the partition's disjoint index arrays into the training set (as `partition_dataset`
    returns them, the training inputs as the clients hold them, feature skew included); `client_tests` is
    the `ClientTestSets` of `split_client_tests` (its `indices` into the test set and, under feature skew,
    `x`: the clients' test inputs in client order) or None.

    - `none`: everything as given (the same objects).
    - `federated`: the pooled mean and std of the clients' training inputs (`pooled_standardization` of
      their `client_moments`) standardize every client's training inputs, the global test set and every
      client's test inputs.
    - `local`: client k standardizes its training inputs and its own test inputs with the mean and std of
      its own training inputs (a test set is scaled with the statistics fitted on training data, never its
      own). No client's statistics apply to the global test set, which is held by no client: it is
      standardized with the pooled statistics, what the clients could agree on for new data (the model has
      seen inputs that are roughly mean 0 and std 1 at every client, and so are these). The clients' test
      inputs then differ from the global test set's rows, so `client_tests.x` holds them.

    The returned dataset records the statistics applied to the global test set in `feature_scale`
    (mean, std per flattened feature, float64 numpy), so new raw inputs can be mapped the same way.
    """
    if scaling not in SCALINGS:
        raise ValueError(f"data.scaling must be one of {{{', '.join(SCALINGS)}}}, got {scaling!r} (federated = "
                         "standardize with the clients' pooled mean and std; local = each client with its own)")
    if scaling == "none":
        return dataset, client_tests
    moments = client_moments(dataset.x_train, clients)
    mean, std = pooled_standardization(moments)
    x_test = standardize(dataset.x_test, mean, std)
    test_x = None
    if scaling == "federated":
        x_train = standardize(dataset.x_train, mean, std)
        if client_tests is not None and client_tests.x is not None:
            test_x = standardize(client_tests.x, mean, std)
    else:
        owners = np.concatenate([np.asarray(c, dtype=np.int64) for c in clients]) if len(clients) else []
        if len(np.unique(owners)) != len(owners):
            raise ValueError("data.scaling=local needs disjoint clients (each training sample in one client's "
                             "index array), as every partition scheme makes them")
        matrix = feature_matrix(dataset.x_train)
        scaled = (matrix - mean) / std  # rows no client holds (none, for a partition) keep the pooled scaling
        own = [pooled_standardization([m]) for m in moments]
        for part, (own_mean, own_std) in zip(clients, own):
            rows = torch.as_tensor(np.asarray(part, dtype=np.int64), device=matrix.device)
            scaled[rows] = (matrix[rows] - own_mean) / own_std
        x_train = scaled.reshape(dataset.x_train.shape).to(dataset.x_train.dtype)
        if client_tests is not None:
            if len(client_tests.indices) != len(clients):
                raise ValueError(f"data.scaling=local: {len(client_tests.indices)} client test sets for "
                                 f"{len(clients)} clients; each client's test set needs its client")
            # the clients' test inputs as each client holds them: its transformed rows under feature skew,
            # else its rows of the raw test set
            sizes = [len(i) for i in client_tests.indices]
            if client_tests.x is not None:
                held = torch.split(client_tests.x, sizes)
            else:
                held = [dataset.x_test[torch.as_tensor(np.asarray(i, dtype=np.int64), device=dataset.x_test.device)]
                        for i in client_tests.indices]
            blocks = [standardize(x, own_mean, own_std) for x, (own_mean, own_std) in zip(held, own)]
            test_x = torch.cat(blocks) if blocks else dataset.x_test[:0]
    dataset = dataclasses.replace(dataset, x_train=x_train, x_test=x_test,
                                  feature_scale=(mean.cpu().numpy(), std.cpu().numpy()))
    if test_x is not None:
        client_tests = dataclasses.replace(client_tests, x=test_x)
    return dataset, client_tests

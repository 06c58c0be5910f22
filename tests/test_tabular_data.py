"""Tabular and sequence datasets that work offline (scikit-learn's diabetes, breast_cancer and wine; a
Synthetic(alpha, beta) regression; MNIST-1D as sequences) and federated feature scaling (`data.scaling`)."""

import hashlib
import json

import numpy as np
import pytest
import sklearn.datasets
import torch

from workbench.config import DATASETS, DataConfig, ExperimentConfig
from workbench.data import (SYNTHETIC_REGRESSION_NOISE_STD, Dataset, describe_dataset, load_dataset, make_mnist1d,
                            make_synthetic, make_synthetic_regression, register_dataset)
from workbench.scaling import client_moments, pooled_standardization, scale_features, standardize
from workbench.simulation import ClientTestSets, load_data, prepare, run

# name -> (scikit-learn loader, its arguments, samples, features, classes (0 = a regression))
TABULAR = {
    "diabetes": (sklearn.datasets.load_diabetes, {"scaled": False}, 442, 10, 0),
    "breast_cancer": (sklearn.datasets.load_breast_cancer, {}, 569, 30, 2),
    "wine": (sklearn.datasets.load_wine, {}, 178, 13, 3),
}


def load(name, seed=0, num_clients=10, **fields):
    return load_dataset(DataConfig(name=name, **fields), num_clients, np.random.default_rng(seed))


def row_indices(rows: np.ndarray, table: np.ndarray) -> np.ndarray:
    """For each of `rows`, the index of the identical row of `table` (whose rows are all distinct)."""
    where = {r.tobytes(): i for i, r in enumerate(table)}
    assert len(where) == len(table), "the reference rows must be distinct to be located"
    return np.array([where[r.tobytes()] for r in rows])


# ----- scikit-learn's bundled sets -----


@pytest.mark.parametrize("name", sorted(TABULAR))
def test_tabular_sets_are_scikit_learns_rows_split_by_the_seed(name):
    loader, arguments, num_samples, num_features, num_classes = TABULAR[name]
    bunch = loader(**arguments)
    data = load(name)
    assert name in DATASETS and data.name == name and data.source == "workbench built-in"
    assert data.input_shape == (num_features,) and data.x_train.dtype == data.x_test.dtype == torch.float32
    assert data.num_classes == num_classes
    is_regression = num_classes == 0
    assert data.task == ("regression" if is_regression else "classification")
    assert data.num_outputs == (1 if is_regression else num_classes)
    assert data.y_train.dtype == data.y_test.dtype == (torch.float32 if is_regression else torch.int64)
    assert data.y_train.shape == (len(data.x_train),) and data.y_test.shape == (len(data.x_test),)
    assert not data.has_natural_clients

    # every row is scikit-learn's own (raw feature values, float32), each exactly once, in its original order
    table = bunch.data.astype(np.float32)
    train = row_indices(data.x_train.numpy(), table)
    test = row_indices(data.x_test.numpy(), table)
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(num_samples))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)

    target = bunch.target
    if is_regression:
        assert len(test) == round(0.2 * num_samples)  # a random 20%
        mean, std = target[train].mean(), target[train].std()  # the training split's, ddof=0
        assert data.target_scale == pytest.approx((mean, std), rel=1e-12)
        np.testing.assert_allclose(data.y_train.numpy(), (target[train] - mean) / std, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(data.y_test.numpy(), (target[test] - mean) / std, rtol=1e-6, atol=1e-6)
        # a prediction maps back to the raw target through target_scale
        np.testing.assert_allclose(data.y_test.numpy() * std + mean, target[test], rtol=1e-5)
        assert float(data.y_train.double().mean()) == pytest.approx(0, abs=1e-6)
        assert float(data.y_train.double().std(correction=0)) == pytest.approx(1, rel=1e-6)
    else:
        assert data.target_scale is None
        assert np.array_equal(data.y_train.numpy(), target[train]) and np.array_equal(data.y_test.numpy(),
                                                                                      target[test])
        # stratified: each class gives round(20%) of its samples to the test set
        for label, count in enumerate(np.bincount(target)):
            assert int((data.y_test == label).sum()) == round(0.2 * count), label

    # the same seed, the same split; another seed, another
    again, other = load(name), load(name, seed=1)
    assert torch.equal(again.x_train, data.x_train) and torch.equal(again.y_test, data.y_test)
    assert again.digest == data.digest
    assert not np.array_equal(row_indices(other.x_test.numpy(), table), test)


def test_split_sizes_are_the_documented_ones():
    sizes = {name: (len(load(name).y_train), len(load(name).y_test)) for name in TABULAR}
    # diabetes: round(0.2 * 442) = 88; breast_cancer: 212, 357 -> 42 + 71; wine: 59, 71, 48 -> 12 + 14 + 10
    assert sizes == {"diabetes": (354, 88), "breast_cancer": (456, 113), "wine": (142, 36)}


def test_a_builtin_tabular_name_cannot_be_registered_over():
    x = np.zeros((4, 2))
    with pytest.raises(ValueError, match="'wine' is a built-in dataset"):
        register_dataset("wine", x_train=x, y_train=[0, 1, 0, 1], x_test=x, y_test=[0, 1, 0, 1])


# ----- synthetic_regression -----


def synthetic_regression_recipe(num_clients, alpha, beta, seed, num_features=60, noise_std=0.5):
    """The documented recipe, written out from the docstring and the FedProx paper: the clients' sizes,
    models and inputs as Synthetic(alpha, beta) draws them with one output, then the targets' noise."""
    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(4, 2, num_clients).astype(int) + 50
    sigma = np.array([j ** -1.2 for j in range(1, num_features + 1)])
    rng.normal(0, 1, (num_features, 1)), rng.normal(0, 1, 1)  # Synthetic-IID's shared model, drawn always
    clients = []
    for size in sizes:
        u, big_b = rng.normal(0, alpha), rng.normal(0, beta)
        w, b, v = rng.normal(u, 1, (num_features, 1)), rng.normal(u, 1, 1), rng.normal(big_b, 1, num_features)
        clients.append((rng.normal(v, np.sqrt(sigma), (size, num_features)), w[:, 0], b[0]))
    return [(x, x @ w + b + rng.normal(0, noise_std, len(x)), w, b) for x, w, b in clients]


def test_synthetic_regression_follows_its_recipe_with_natural_clients():
    data = load("synthetic_regression", seed=4, num_clients=7, alpha=0.5, beta=0.3)
    clients = synthetic_regression_recipe(7, 0.5, 0.3, seed=4)
    assert data.task == "regression" and data.num_classes == 0 and data.num_outputs == 1
    assert data.input_shape == (60,) and data.y_train.dtype == data.y_test.dtype == torch.float32
    assert data.y_train.shape == (len(data.x_train),) and data.target_scale is None
    assert len(data.client_train) == len(data.client_test) == 7
    for k, (x, y, _, _) in enumerate(clients):
        num_train = int(0.9 * len(y))
        train, test = data.client_train[k], data.client_test[k]
        assert len(train) == num_train and len(test) == len(y) - num_train  # 90/10, as the FedProx code
        np.testing.assert_allclose(data.x_train[train].numpy(), x[:num_train], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(data.y_train[train].numpy(), y[:num_train], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(data.x_test[test].numpy(), x[num_train:], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(data.y_test[test].numpy(), y[num_train:], rtol=1e-5, atol=1e-5)
    assert np.array_equal(np.concatenate(data.client_train), np.arange(len(data.y_train)))
    # the clients' sizes are the classification synthetic's for the same seed (the first draw of both)
    classification = make_synthetic(7, 0.5, 0.3, np.random.default_rng(4))
    assert [len(c) for c in data.client_train] == [len(c) for c in classification.client_train]
    again = load("synthetic_regression", seed=4, num_clients=7, alpha=0.5, beta=0.3)
    assert again.digest == data.digest and torch.equal(again.y_test, data.y_test)


def test_synthetic_regression_is_linear_per_client_with_the_stated_noise():
    """Least squares (numpy) on one client's training samples recovers its linear model: the residual std
    is the stated noise std, on its training and its test samples alike; another client's model is far
    off (each client has its own model)."""
    data = make_synthetic_regression(6, 1.0, 1.0, np.random.default_rng(2))
    x, y = data.x_train.double().numpy(), data.y_train.double().numpy()
    xt, yt = data.x_test.double().numpy(), data.y_test.double().numpy()
    big = [k for k, c in enumerate(data.client_train) if len(c) >= 150]
    assert len(big) >= 2
    fits = {}
    for k in big:
        rows, held = data.client_train[k], data.client_test[k]
        design = np.c_[x[rows], np.ones(len(rows))]
        coef, *_ = np.linalg.lstsq(design, y[rows], rcond=None)
        fits[k] = coef
        dof = len(rows) - design.shape[1]
        residual = np.sqrt(np.sum((design @ coef - y[rows]) ** 2) / dof)
        assert residual == pytest.approx(SYNTHETIC_REGRESSION_NOISE_STD, rel=0.2), k
        test_error = np.sqrt(np.mean((np.c_[xt[held], np.ones(len(held))] @ coef - yt[held]) ** 2))
        assert test_error < 3 * SYNTHETIC_REGRESSION_NOISE_STD, k
    first, second = big[:2]
    rows = data.client_train[second]
    foreign = np.sqrt(np.mean((np.c_[x[rows], np.ones(len(rows))] @ fits[first] - y[rows]) ** 2))
    assert foreign > 5 * SYNTHETIC_REGRESSION_NOISE_STD


def test_synthetic_regression_heterogeneity_grows_with_alpha_and_beta():
    """alpha spreads the clients' models: w_k ~ N(u_k, 1), u_k ~ N(0, alpha), so the mean coefficient of a
    client's least-squares fit is about u_k (spread ~alpha, 1/sqrt(60) at alpha 0); beta spreads the clients'
    input means: v_k ~ N(B_k, 1), B_k ~ N(0, beta)."""
    def spreads(alpha, beta):
        data = make_synthetic_regression(20, alpha, beta, np.random.default_rng(5))
        x, y = data.x_train.double().numpy(), data.y_train.double().numpy()
        mean_coefficients = []
        for rows in data.client_train:
            if len(rows) >= 120:
                coef, *_ = np.linalg.lstsq(np.c_[x[rows], np.ones(len(rows))], y[rows], rcond=None)
                mean_coefficients.append(coef[:-1].mean())
        assert len(mean_coefficients) >= 5
        input_means = [x[rows].mean() for rows in data.client_train]
        return np.std(mean_coefficients), np.std(input_means)

    (w00, v00), (w10, v10), (w01, v01) = spreads(0, 0), spreads(1, 0), spreads(0, 1)
    assert w00 < 0.3 < 0.5 < w10 and w01 < 0.3
    assert v00 < 0.3 < 0.5 < v01 and v10 < 0.3


# ----- MNIST-1D as sequences -----


def test_mnist1d_seq_is_mnist1d_as_40_steps_of_one_channel():
    seq = load("mnist1d_seq", seed=3)
    flat = make_mnist1d(np.random.default_rng(3))  # what data.name=mnist1d loads for the same seed
    assert seq.name == "mnist1d_seq" and seq.input_shape == (40, 1) and seq.x_train.shape == (4000, 40, 1)
    assert seq.x_test.shape == (1000, 40, 1) and seq.x_train.dtype == torch.float32
    assert seq.y_train.dtype == torch.int64 and seq.task == "classification" and seq.num_classes == 10
    assert torch.equal(seq.x_train[:, :, 0], flat.x_train) and torch.equal(seq.x_test[:, :, 0], flat.x_test)
    assert torch.equal(seq.y_train, flat.y_train) and torch.equal(seq.y_test, flat.y_test)
    small = [make_mnist1d(np.random.default_rng(seed), 200, as_sequence=True) for seed in (3, 3, 4)]
    assert small[0].digest == small[1].digest != small[2].digest


# ----- the record: digest, description -----


def recipe_digest(data: Dataset, task_suffix: bool) -> str:
    """`Dataset.digest` as its docstring states it, written out independently."""
    h = hashlib.sha256()
    for tensor in (data.x_train, data.y_train, data.x_test, data.y_test):
        array = tensor.numpy()
        h.update(f"{array.dtype.name} {array.shape};".encode() + array.astype(array.dtype.newbyteorder("<")).tobytes())
    h.update(f"num_classes={data.num_classes};".encode())
    for clients in (data.client_train, data.client_test):
        h.update(b"clients=none;" if clients is None else f"clients={len(clients)};".encode())
        for part in clients or ():
            part = np.asarray(part).astype("<i8")
            h.update(np.array([len(part)], "<i8").tobytes() + part.tobytes())
    if task_suffix:
        h.update(b"task=regression;")
    return h.hexdigest()[:16]


@pytest.mark.parametrize("name", ["diabetes", "synthetic_regression", "breast_cancer", "wine"])
def test_digest_and_description_of_the_new_sets(name):
    data = load(name, num_clients=5)
    is_regression = data.task == "regression"
    assert data.digest == recipe_digest(data, task_suffix=is_regression)
    if is_regression:  # the same tensors as a classification would have another digest
        assert data.digest != recipe_digest(data, task_suffix=False)
    described = describe_dataset(data)
    assert described["name"] == name and described["digest"] == data.digest and described["source_type"] == "code"
    assert described["source"] == "workbench built-in"
    profile = json.loads(described["profile"])
    expected = {"num_train": len(data.y_train), "num_test": len(data.y_test), "num_classes": data.num_classes,
                "input_shape": list(data.input_shape),
                "num_natural_clients": 5 if name == "synthetic_regression" else 0,
                "has_client_test": name == "synthetic_regression"}
    if is_regression:
        expected["task"] = "regression"
    if data.target_scale is not None:
        expected["target_mean"], expected["target_std"] = data.target_scale
    assert profile == expected
    targets = json.loads(json.loads(described["schema"])["mlflow_tensorspec"]["targets"])
    assert targets == [{"type": "tensor", "tensor-spec": {"dtype": "float32" if is_regression else "int64",
                                                          "shape": [-1]}}]


# ----- feature scaling: the math -----


def unequal_clients(seed=0, shape=(2, 3)):
    """Inputs of shape (N, 2, 3) whose features have different means and scales, one constant feature,
    split into clients of 3, 17 and 40 shuffled samples, each with its own input distribution."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(60)
    clients = [np.sort(order[:3]), np.sort(order[3:20]), np.sort(order[20:])]
    num_features = int(np.prod(shape))
    x = np.empty((60, num_features))
    for k, part in enumerate(clients):
        x[part] = rng.normal(np.arange(num_features) * (k + 1) - 4, np.linspace(0.1, 30, num_features) / (k + 1),
                             (len(part), num_features))
    x[:, 2] = 7.5  # a constant feature
    return x.reshape(60, *shape).astype(np.float32), clients


def test_pooled_standardization_from_client_moments_equals_numpy_on_the_pooled_data():
    x, clients = unequal_clients()
    moments = client_moments(torch.from_numpy(x), clients)
    assert [m.count for m in moments] == [3, 17, 40]
    flat = x.reshape(60, -1).astype(np.float64)
    np.testing.assert_allclose(moments[1].sum.numpy(), flat[clients[1]].sum(0), rtol=1e-12)
    np.testing.assert_allclose(moments[1].sumsq.numpy(), (flat[clients[1]] ** 2).sum(0), rtol=1e-12)
    mean, std = pooled_standardization(moments)
    pooled = np.concatenate([flat[c] for c in clients])
    np.testing.assert_allclose(mean.numpy(), pooled.mean(0), rtol=1e-9, atol=1e-9)
    expected_std = pooled.std(0)
    assert expected_std[2] == 0
    expected_std[2] = 1.0  # zero variance: std 1
    np.testing.assert_allclose(std.numpy(), expected_std, rtol=1e-9)
    # one client's moments: its own mean and std
    own_mean, own_std = pooled_standardization([moments[2]])
    np.testing.assert_allclose(own_mean.numpy(), flat[clients[2]].mean(0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(np.delete(own_std.numpy(), 2), np.delete(flat[clients[2]].std(0), 2), rtol=1e-9)
    scaled = standardize(torch.from_numpy(x), mean, std)
    assert scaled.shape == x.shape and scaled.dtype == torch.float32
    np.testing.assert_allclose(scaled.numpy().reshape(60, -1), (flat - pooled.mean(0)) / expected_std, atol=1e-6)


def test_a_client_with_one_sample_and_no_samples_scale_to_finite_values():
    x = torch.tensor([[1.0, -2.0], [3.0, 5.0], [4.0, 5.0]])
    one, none_ = client_moments(x, [np.array([1]), np.array([], dtype=np.int64)])
    mean, std = pooled_standardization([one])
    assert mean.tolist() == [3.0, 5.0] and std.tolist() == [1.0, 1.0]
    assert standardize(x[1:2], mean, std).tolist() == [[0.0, 0.0]]
    mean, std = pooled_standardization([none_])
    assert mean.tolist() == [0.0, 0.0] and std.tolist() == [1.0, 1.0]  # the identity
    assert standardize(x[:0], mean, std).shape == (0, 2)


def tiny_dataset(x, clients, num_test=10, seed=1):
    rng = np.random.default_rng(seed)
    x_test = (rng.normal(0, 5, (num_test, *x.shape[1:])) + 3).astype(np.float32)
    return Dataset("tiny", torch.from_numpy(x), torch.arange(len(x)) % 2, torch.from_numpy(x_test),
                   torch.arange(num_test) % 2, num_classes=2)


def test_federated_scaling_standardizes_every_client_and_the_test_set_with_the_pooled_statistics():
    x, clients = unequal_clients()
    data = tiny_dataset(x, clients)
    tests = ClientTestSets([np.array([0, 4]), np.array([1, 2, 3]), np.array([5, 9, 8])], "labels")
    scaled, scaled_tests = scale_features("federated", data, clients, tests)
    flat = x.reshape(60, -1).astype(np.float64)
    mean, std = flat.mean(0), flat.std(0)
    std[std == 0] = 1
    np.testing.assert_allclose(scaled.x_train.numpy().reshape(60, -1), (flat - mean) / std, atol=1e-6)
    x_test = data.x_test.double().numpy().reshape(10, -1)
    np.testing.assert_allclose(scaled.x_test.numpy().reshape(10, -1), (x_test - mean) / std, atol=1e-6)
    assert scaled_tests is tests  # the clients' test inputs are the test set's rows: nothing to hold
    np.testing.assert_allclose(scaled.feature_scale[0], mean, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(scaled.feature_scale[1], std, rtol=1e-9)
    assert torch.equal(scaled.y_train, data.y_train) and torch.equal(scaled.y_test, data.y_test)
    assert torch.equal(data.x_train, torch.from_numpy(x))  # the argument is left as it was
    # under feature skew the clients hold their own test inputs: those are scaled with the same statistics
    held = torch.from_numpy(np.random.default_rng(3).normal(2, 4, (8, 2, 3)).astype(np.float32))
    _, skewed = scale_features("federated", data, clients, ClientTestSets(tests.indices, "labels", held))
    np.testing.assert_allclose(skewed.x.numpy().reshape(8, -1), (held.double().numpy().reshape(8, -1) - mean) / std,
                               atol=1e-6)


def test_local_scaling_gives_each_client_mean_0_std_1_on_its_own_data():
    x, clients = unequal_clients(seed=7)
    data = tiny_dataset(x, clients)
    tests = ClientTestSets([np.array([0, 4, 6]), np.array([1, 2]), np.array([5, 9, 8, 3])], "labels")
    scaled, scaled_tests = scale_features("local", data, clients, tests)
    flat = x.reshape(60, -1).astype(np.float64)
    x_test = data.x_test.double().numpy().reshape(10, -1)
    blocks = np.split(scaled_tests.x.numpy().reshape(9, -1), np.cumsum(scaled_tests.sizes)[:-1])
    for k, part in enumerate(clients):
        own = scaled.x_train.numpy().reshape(60, -1)[part].astype(np.float64)
        varying = np.delete(np.arange(6), 2)
        np.testing.assert_allclose(own.mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(own[:, varying].std(0), 1, rtol=1e-5)
        assert np.all(own[:, 2] == 0)  # the constant feature: centred, std 1
        # the client's test inputs: scaled with its training statistics, not their own
        mean, std = flat[part].mean(0), flat[part].std(0)
        std[std == 0] = 1
        np.testing.assert_allclose(blocks[k], (x_test[tests.indices[k]] - mean) / std, atol=1e-5)
    # the global test set, held by no client: the pooled statistics
    mean, std = flat.mean(0), flat.std(0)
    std[std == 0] = 1
    np.testing.assert_allclose(scaled.x_test.numpy().reshape(10, -1), (x_test - mean) / std, atol=1e-6)
    assert scaled_tests.indices is tests.indices and tests.x is None


def test_no_scaling_is_the_identity():
    x, clients = unequal_clients()
    data = tiny_dataset(x, clients)
    tests = ClientTestSets([np.array([0])] * 3, "labels")
    scaled, scaled_tests = scale_features("none", data, clients, tests)
    assert scaled is data and scaled_tests is tests and scaled.feature_scale is None
    assert torch.equal(scaled.x_train, torch.from_numpy(x))


def test_scaling_is_checked_where_the_user_sets_it():
    with pytest.raises(ValueError, match=r"data.scaling must be one of \{none, federated, local\}, got 'global'"):
        ExperimentConfig().with_overrides({"data.scaling": "global"})
    x, clients = unequal_clients()
    with pytest.raises(ValueError, match="data.scaling must be one of"):
        scale_features("pooled", tiny_dataset(x, clients), clients)
    with pytest.raises(ValueError, match="disjoint clients"):
        scale_features("local", tiny_dataset(x, clients), [clients[0], clients[0]])
    assert ExperimentConfig().data.scaling == "none"  # every existing run keeps its numbers


# ----- feature scaling in a run -----


def tabular_config(**overrides):
    return ExperimentConfig().with_overrides({
        "data.name": "breast_cancer", "model.name": "logreg", "partition.scheme": "dirichlet",
        "partition.alpha": 0.5, "federation.num_clients": 5, "federation.clients_per_round": 5,
        "federation.rounds": 3, "training.local_epochs": 1, "training.lr": 0.05, "device": "cpu",
        "execution.executor": "sequential", **overrides})


@pytest.mark.parametrize("scaling", ["federated", "local"])
def test_a_run_prepares_the_clients_scaled_after_partitioning(scaling):
    config = tabular_config(**{"data.scaling": scaling, "partition.scheme": "feature_noise",
                               "partition.noise_sigma": 50.0})
    federation = prepare(config)
    raw = prepare(config.with_overrides({"data.scaling": "none"}))
    loaded = load_data(config)
    assert [c.tolist() for c in federation.clients] == [c.tolist() for c in raw.clients]
    held = raw.dataset.x_train.double().numpy()  # the clients' inputs, feature skew included
    mean, std = held.mean(0), held.std(0)
    np.testing.assert_allclose(federation.dataset.x_test.numpy(), (loaded.x_test.double().numpy() - mean) / std,
                               atol=1e-5)
    test_blocks = np.split(federation.client_tests.x.numpy(), np.cumsum(federation.client_tests.sizes)[:-1])
    raw_blocks = np.split(raw.client_tests.x.double().numpy(), np.cumsum(raw.client_tests.sizes)[:-1])
    for k, part in enumerate(federation.clients):
        if scaling == "local":
            mean, std = held[part].mean(0), held[part].std(0)
        np.testing.assert_allclose(federation.dataset.x_train[part].numpy(), (held[part] - mean) / std, atol=1e-4)
        np.testing.assert_allclose(test_blocks[k], (raw_blocks[k] - mean) / std, atol=1e-4)
    assert federation.data_description == raw.data_description  # the record describes the data as loaded


def test_an_experiment_with_federated_scaling_runs_and_beats_raw_inputs():
    scaled = run(tabular_config(**{"data.scaling": "federated"}))
    raw = run(tabular_config())
    assert scaled.status == raw.status == "FINISHED" and len(scaled.rounds) == 3
    final = scaled.final()
    assert np.isfinite(final["test_loss"]) and 0 <= final["test_accuracy"] <= 1
    assert final["test_loss"] < raw.final()["test_loss"]

"""Partitions of a continuous target (a regression): quantile target bins, the schemes that work and the
ones refused, each client's test split, the Wasserstein-1 statistics, and the partition as a run, its
record and the explorer see it."""

import csv
import json

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from scipy.stats import wasserstein_distance

from workbench.config import ExperimentConfig, PartitionConfig
from workbench.data import Dataset
from workbench.partition import (STAT_DESCRIPTIONS, describe, knobs_in_use, partition, partition_test_by_labels, summarize,
                                 target_bin_edges, target_bins, target_wasserstein)
from workbench.plots import partition_heatmap, partition_overview, partition_title, update_overview
from workbench.simulation import (STREAM_PARTITION, Federation, partition_clients, partition_dataset,
                                  split_client_tests, stream)
from workbench.strategies import build_strategy
from workbench.tracking.record import log_partition

NUM_CLIENTS = 12
#: Every scheme that makes sense for a continuous target (natural is tested with its own clients).
REGRESSION_SCHEMES = [("iid", {}), ("dirichlet", {"alpha": 0.3}), ("quantity", {"quantity_alpha": 0.5}),
                      ("quantity", {"quantity_distribution": "lognormal"}), ("feature_noise", {}),
                      ("mixture", {"mixture_skew": "dirichlet"}), ("mixture", {"mixture_skew": "quantity"})]


def skewed_targets(num_samples: int = 1000, seed: int = 14) -> np.ndarray:
    """A right-skewed continuous target (log-normal, median e^3 = 20, a long tail to ~180), float32 as a
    regression dataset's y."""
    return np.random.default_rng(seed).lognormal(3.0, 0.8, num_samples).astype(np.float32)


def regression_dataset(num_train: int = 1000, num_test: int = 300) -> Dataset:
    x = torch.as_tensor(np.random.default_rng(3).normal(size=(num_train + num_test, 5)), dtype=torch.float32)
    y = torch.as_tensor(skewed_targets(num_train + num_test, seed=5))
    return Dataset("targets", x[:num_train], y[:num_train], x[num_train:], y[num_train:], num_classes=0,
                   task="regression")


def regression_config(**overrides) -> ExperimentConfig:
    return ExperimentConfig().with_overrides({"federation.num_clients": NUM_CLIENTS,
                                              "federation.clients_per_round": 4, "device": "cpu", **overrides})


def sqrt_cdf_integral(targets: np.ndarray) -> float:
    """J = integral of sqrt(F (1 - F)) over the empirical CDF F of `targets`: a sample of n from that
    distribution has an expected Wasserstein-1 distance from it of at most J / sqrt(n) (Bobkov & Ledoux
    2019, "One-dimensional empirical measures, order statistics, and Kantorovich transport distances",
    §3), so W1 * sqrt(n) / J is a client's distance in units of IID sampling noise."""
    s = np.sort(np.asarray(targets, dtype=np.float64))
    cdf = np.arange(1, len(s)) / len(s)
    return float(np.sqrt(cdf * (1 - cdf)) @ np.diff(s))


# ----- the bins -----


def test_target_bins_by_hand():
    # sorted 1..6 in thirds: edges are the 2nd and 4th smallest (ranks ceil(b*6/3) - 1 = 1, 3), right-inclusive
    assert target_bin_edges(np.array([5.0, 1.0, 4.0, 2.0, 3.0, 6.0]), 3).tolist() == [2.0, 4.0]
    assert target_bins(np.array([5.0, 1.0, 4.0, 2.0, 3.0, 6.0]), 3).tolist() == [2, 0, 1, 0, 1, 2]
    # ties share a bin, the tie at an edge going to the lower bin: edges [1, 2], sizes 3, 1, 2
    assert target_bins(np.array([3.0, 1.0, 1.0, 2.0, 1.0, 3.0]), 3).tolist() == [2, 0, 0, 1, 0, 2]
    # test targets with the training targets' edges: outside the range they go to the end bins
    assert target_bins(np.array([-50.0, 2.0, 2.5, 4.0, 99.0]), 3,
                       reference=np.array([5.0, 1.0, 4.0, 2.0, 3.0, 6.0])).tolist() == [0, 0, 1, 1, 2]


@pytest.mark.parametrize("num_samples, num_bins", [(1000, 10), (1003, 10), (997, 7), (442, 10), (1177, 33),
                                                   (50, 64), (1000, 1)])
def test_bins_of_distinct_targets_are_ordered_and_within_one_of_equal(num_samples, num_bins):
    targets = skewed_targets(num_samples)
    codes = target_bins(targets, num_bins)
    sizes = np.bincount(codes, minlength=num_bins)
    assert len(sizes) == num_bins and sizes.sum() == num_samples
    assert set(sizes.tolist()) <= {num_samples // num_bins, -(-num_samples // num_bins)}
    assert sizes.max() - sizes.min() <= 1
    held = np.flatnonzero(sizes)
    highest = [targets[codes == b].max() for b in held[:-1]]
    lowest = [targets[codes == b].min() for b in held[1:]]
    assert all(h < low for h, low in zip(highest, lowest))  # bin b lies wholly below bin b + 1


def test_bins_are_numpys_inverted_cdf_quantiles():
    """Pinned against numpy where b / B is exact in binary (B = 8): edges np.quantile(.., "inverted_cdf"),
    bins np.digitize(.., right=True), for the training targets and for held-out ones."""
    train, test = skewed_targets(1000), skewed_targets(300, seed=99)
    edges = np.quantile(train.astype(np.float64), np.arange(1, 8) / 8, method="inverted_cdf")
    assert np.array_equal(target_bin_edges(train, 8), edges)
    assert np.array_equal(target_bins(train, 8), np.digitize(train.astype(np.float64), edges, right=True))
    assert np.array_equal(target_bins(test, 8, reference=train),
                          np.digitize(test.astype(np.float64), edges, right=True))


def test_heavily_tied_targets_keep_equal_values_together():
    targets = np.round(skewed_targets(1000) / 10.0).astype(np.float32)  # 15 or so distinct values
    codes = target_bins(targets, 10)
    for value in np.unique(targets):
        assert len(np.unique(codes[targets == value])) == 1
    assert codes.min() >= 0 and codes.max() <= 9


def test_non_finite_targets_and_bad_bins_are_refused():
    targets = skewed_targets(100)
    targets[[7, 30]] = np.nan
    with pytest.raises(ValueError, match=r"2 of 100 are NaN or infinite \(the first at index 7\)"):
        target_bins(targets, 10)
    with pytest.raises(ValueError, match="partition.target_bins must be a whole number >= 1, got 0"):
        target_bins(skewed_targets(100), 0)


# ----- the partitions -----


@pytest.mark.parametrize("scheme, knobs", REGRESSION_SCHEMES, ids=lambda v: str(v))
def test_every_regression_scheme_covers_each_index_once_and_repeats_for_a_seed(scheme, knobs):
    targets = skewed_targets()
    config = PartitionConfig(scheme=scheme, **knobs)
    parts = partition(targets, NUM_CLIENTS, config, np.random.default_rng(4), task="regression")
    assert len(parts) == NUM_CLIENTS and min(len(p) for p in parts) >= 1
    assert all(np.array_equal(p, np.sort(p)) for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(targets)))
    again = partition(targets, NUM_CLIENTS, config, np.random.default_rng(4), task="regression")
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition(targets, NUM_CLIENTS, config, np.random.default_rng(5), task="regression")
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other))


def test_natural_clients_work_for_a_continuous_target():
    natural = [np.arange(0, 300), np.arange(300, 310), np.arange(310, 1000)]
    parts = partition(skewed_targets(), 3, PartitionConfig(scheme="auto"), np.random.default_rng(0),
                      natural=natural, task="regression")
    assert all(np.array_equal(a, b) for a, b in zip(parts, natural))


def test_dirichlet_splits_each_target_bin_like_a_class():
    """With the same rng, a regression's Dirichlet partition is the classification one on the bin codes
    (over all targets, also inside a mixture, whose skewed part sees only some of them)."""
    targets = skewed_targets()
    for config in (PartitionConfig(scheme="dirichlet", alpha=0.2, target_bins=7),
                   PartitionConfig(scheme="mixture", mixture_skew="dirichlet", alpha=0.2, target_bins=7)):
        as_bins = partition(target_bins(targets, 7), NUM_CLIENTS, config, np.random.default_rng(1))
        as_targets = partition(targets, NUM_CLIENTS, config, np.random.default_rng(1), task="regression")
        assert all(np.array_equal(a, b) for a, b in zip(as_bins, as_targets))


def test_label_skew_grows_as_alpha_falls():
    """Mean W1 of the 12 clients' targets from all targets (target units; the targets' std is 23.7), for
    alpha 100 / 1 / 0.1: seed 0: 1.94 / 5.83 / 14.71, seed 1: 1.92 / 7.62 / 15.85, seed 2: 1.90 / 7.86 /
    18.46. The max: seed 0: 2.47 / 11.64 / 32.65."""
    targets = skewed_targets()
    for seed in range(3):
        means = [summarize(targets, partition(targets, NUM_CLIENTS, PartitionConfig(scheme="dirichlet", alpha=a),
                                              np.random.default_rng(seed), task="regression"),
                           0, task="regression")["target_w1_mean"] for a in (100.0, 1.0, 0.1)]
        assert means[0] * 2 < means[1] and means[1] * 1.5 < means[2], (seed, means)


def test_quantity_skew_keeps_the_targets_iid():
    """Quantity skew makes sizes unequal (size Gini 0.44-0.70 for seeds 0-4) and leaves each client's
    targets an IID sample: its W1 is sampling noise, W1 * sqrt(n) / J about 0.7 on average as for an IID
    split, at most 1 in expectation (`sqrt_cdf_integral`); over seeds 0-199 the clients' mean of it was
    0.56-1.07 under quantity skew (Dirichlet or log-normal sizes) and 0.55-0.99 for iid, but 2.34-4.48 under
    Dirichlet label skew with alpha 0.1."""
    targets = skewed_targets()
    scale = sqrt_cdf_integral(targets)
    for seed in range(5):
        def noise_units(config):
            stats = describe(targets, partition(targets, NUM_CLIENTS, config, np.random.default_rng(seed),
                                                task="regression"), 0, task="regression")
            return float(np.mean(stats.target_w1 * np.sqrt(stats.sizes) / scale)), stats.summary()

        quantity, summary = noise_units(PartitionConfig(scheme="quantity", quantity_alpha=0.5))
        lognormal, _ = noise_units(PartitionConfig(scheme="quantity", quantity_distribution="lognormal"))
        skewed, _ = noise_units(PartitionConfig(scheme="dirichlet", alpha=0.1))
        assert summary["size_gini"] > 0.3
        assert quantity < 1.25 and lognormal < 1.25 and skewed > 2.0, (seed, quantity, lognormal, skewed)


# ----- the refusals -----


@pytest.mark.parametrize("scheme, knobs, key", [("shards", {}, "scheme"), ("classes_per_client", {}, "scheme"),
                                                ("mixture", {"mixture_skew": "shards"}, "mixture_skew"),
                                                ("mixture", {"mixture_skew": "classes_per_client"},
                                                 "mixture_skew")])
def test_schemes_that_need_classes_are_refused_with_what_to_use(scheme, knobs, key):
    config = PartitionConfig(scheme=scheme, target_bins=6, **knobs)
    with pytest.raises(ValueError) as caught:
        partition(skewed_targets(), NUM_CLIENTS, config, np.random.default_rng(0), task="regression")
    message = str(caught.value)
    named = knobs.get("mixture_skew", scheme)
    assert message.startswith(f"partition.{key}={named!r} ")
    assert "continuous (task=regression)" in message and "no classes" in message
    assert f"use partition.{key}=dirichlet" in message and "partition.target_bins=6 quantile bins" in message
    assert f"partition.{key}=quantity" in message


def test_a_continuous_target_without_task_and_an_unknown_task_are_refused():
    with pytest.raises(ValueError, match="labels are not whole numbers.*task='regression'"):
        partition(skewed_targets(), 4, PartitionConfig(scheme="dirichlet"), np.random.default_rng(0))
    with pytest.raises(ValueError, match="task must be one of classification, regression, got 'forecast'"):
        partition(skewed_targets(), 4, PartitionConfig(scheme="iid"), np.random.default_rng(0), task="forecast")
    # whole-number float labels remain class labels, as before
    labels = np.random.default_rng(0).integers(0, 5, 500)
    as_float = partition(labels.astype(np.float32), 4, PartitionConfig(scheme="dirichlet"), np.random.default_rng(0))
    as_int = partition(labels, 4, PartitionConfig(scheme="dirichlet"), np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(as_float, as_int))


# ----- the statistics -----


def test_w1_by_hand_on_small_unequal_clients():
    targets = np.array([0.0, 1.0, 3.0])
    # client 0 holds {3}: integral of |0 - F| = 1/3 on [0, 1) + 2/3 on [1, 3) = 5/3;
    # client 1 holds {0, 1}: |1/2 - 1/3| on [0, 1) + |1 - 2/3| on [1, 3) = 1/6 + 2/3 = 5/6; client 2 none
    w1 = target_wasserstein(targets, [np.array([2]), np.array([0, 1]), np.array([], dtype=np.int64)])
    assert w1[:2] == pytest.approx([5 / 3, 5 / 6], abs=1e-15) and np.isnan(w1[2])
    # ties: all = {1, 1, 2, 5}, client {1, 5}: |1/2 - 1/2| on [1, 2) + |1/2 - 3/4| on [2, 5) = 3/4
    assert target_wasserstein(np.array([1.0, 1.0, 2.0, 5.0]), [np.array([0, 3]), np.array([1, 2])]) == \
        pytest.approx([0.75, 0.75], abs=1e-15)


def test_w1_and_the_summary_match_scipy_and_numpy():
    targets = skewed_targets()
    parts = partition(targets, NUM_CLIENTS, PartitionConfig(scheme="dirichlet", alpha=0.3),
                      np.random.default_rng(2), task="regression")
    sizes = np.array([len(p) for p in parts])
    assert sizes.max() > 2 * sizes.min()  # unequal clients
    expected = np.array([wasserstein_distance(targets[p].astype(np.float64), targets.astype(np.float64))
                         for p in parts])
    stats = describe(targets, parts, 0, task="regression", num_bins=8)
    assert np.allclose(stats.target_w1, expected, rtol=1e-12, atol=0)
    summary = stats.summary()
    assert list(summary) == ["num_clients", "num_samples", "size_min", "size_mean", "size_max", "size_std",
                             "size_gini", "target_w1_mean", "target_w1_max"]
    assert summary["target_w1_mean"] == pytest.approx(expected.mean(), rel=1e-12)
    assert summary["target_w1_max"] == pytest.approx(expected.max(), rel=1e-12)
    assert [summary[k] for k in ("num_clients", "num_samples", "size_min", "size_max")] == \
        [NUM_CLIENTS, len(targets), sizes.min(), sizes.max()]
    assert summary["size_mean"] == pytest.approx(sizes.mean()) and summary["size_std"] == pytest.approx(sizes.std())
    # the counts are per target bin: numpy's bins of the targets, counted per client
    edges = np.quantile(targets.astype(np.float64), np.arange(1, 8) / 8, method="inverted_cdf")
    codes = np.digitize(targets.astype(np.float64), edges, right=True)
    assert np.array_equal(stats.counts, np.stack([np.bincount(codes[p], minlength=8) for p in parts]))
    assert np.array_equal(stats.bin_edges, edges)
    assert stats.column_names() == [f"target_bin_{b}" for b in range(8)] and stats.row_label == "target bin"
    assert summarize(targets, parts, 0, task="regression", num_bins=8) == summary
    # every number either task reports is described, and every description is of a number reported
    labels = np.random.default_rng(0).integers(0, 3, 100)
    classification = summarize(labels, partition(labels, 4, PartitionConfig(), np.random.default_rng(0)), 3)
    assert set(summary) | set(classification) == set(STAT_DESCRIPTIONS)


def test_w1_matches_scipy_on_tied_targets_and_tiny_clients():
    targets = np.round(skewed_targets(700, seed=8) / 4.0)  # about 40 distinct values, many ties
    owner = np.random.default_rng(3).integers(0, 40, len(targets))
    owner[owner == 17] = 16  # client 17 holds nothing
    parts = [np.flatnonzero(owner == k) for k in range(40)]
    w1 = target_wasserstein(targets, parts)
    expected = [wasserstein_distance(targets[p], targets) for p in parts if len(p)]
    assert np.isnan(w1[17]) and np.allclose(np.delete(w1, 17), expected, rtol=1e-12, atol=1e-12)


def test_classification_statistics_are_unchanged():
    labels = np.random.default_rng(0).integers(0, 6, 800)
    stats = describe(labels, partition(labels, 5, PartitionConfig(scheme="dirichlet"), np.random.default_rng(0)), 6)
    assert stats.target_w1 is None and not stats.is_regression and stats.row_label == "class"
    assert stats.column_names() == [f"class_{c}" for c in range(6)]
    assert "label_tv_mean" in stats.summary() and "target_w1_mean" not in stats.summary()


# ----- each client's test data -----


def test_each_clients_test_set_follows_its_target_bins():
    """The test split of a classification applied to the 8 target bins (training edges for both sets):
    client k gets floor or ceil of test_bin[c] * train[k, c] / train_bin[c] test targets of bin c."""
    train, test = skewed_targets(1000), skewed_targets(300, seed=99)
    parts = partition(train, NUM_CLIENTS, PartitionConfig(scheme="dirichlet", alpha=0.3),
                      np.random.default_rng(0), task="regression")
    tests = partition_test_by_labels(train, parts, test, np.random.default_rng(1), task="regression", num_bins=8)
    joined = np.concatenate(tests)
    assert len(joined) == len(np.unique(joined)) and joined.min() >= 0 and joined.max() < len(test)
    edges = np.quantile(train.astype(np.float64), np.arange(1, 8) / 8, method="inverted_cdf")
    train_codes = np.digitize(train.astype(np.float64), edges, right=True)
    test_codes = np.digitize(test.astype(np.float64), edges, right=True)
    train_counts = np.stack([np.bincount(train_codes[p], minlength=8) for p in parts])
    test_counts = np.stack([np.bincount(test_codes[t], minlength=8) for t in tests])
    share = np.bincount(test_codes, minlength=8) * train_counts / train_counts.sum(axis=0)
    assert np.all(test_counts >= np.floor(share)) and np.all(test_counts <= np.ceil(share))
    assert np.array_equal(test_counts.sum(axis=0), np.bincount(test_codes, minlength=8))


# ----- the partition as a run, its record, the figures and the explorer see it -----


def test_a_run_partitions_and_splits_tests_by_the_datasets_task():
    dataset = regression_dataset()
    config = regression_config(**{"partition.scheme": "dirichlet", "partition.alpha": 0.2,
                                  "partition.target_bins": 5})
    clients = partition_clients(config, dataset)
    expected = partition(dataset.y_train.numpy(), NUM_CLIENTS, config.partition,
                         stream(config.seed, STREAM_PARTITION), task="regression")
    assert all(np.array_equal(a, b) for a, b in zip(clients, expected))
    tests = split_client_tests(config, dataset, clients)
    expected_tests = partition_test_by_labels(dataset.y_train.numpy(), clients, dataset.y_test.numpy(),
                                              stream(config.seed, STREAM_PARTITION, 2), task="regression",
                                              num_bins=5)
    assert tests.rule == "labels" and all(np.array_equal(a, b) for a, b in zip(tests.indices, expected_tests))
    # feature skew on a regression's vector inputs: targets untouched, inputs noised per client
    noisy, noisy_clients = partition_dataset(regression_config(**{"partition.scheme": "feature_noise"}), dataset)
    assert torch.equal(noisy.y_train, dataset.y_train) and not torch.equal(noisy.x_train, dataset.x_train)
    assert np.array_equal(np.sort(np.concatenate(noisy_clients)), np.arange(len(dataset.y_train)))
    with pytest.raises(ValueError, match="partition.scheme='shards'.*continuous"):
        partition_clients(regression_config(**{"partition.scheme": "shards"}), dataset)


def test_figures_and_titles_name_the_target_bins():
    targets = skewed_targets()
    config = regression_config(**{"partition.scheme": "dirichlet", "partition.alpha": 0.3,
                                  "partition.target_bins": 8})
    stats = describe(targets, partition(targets, NUM_CLIENTS, config.partition, np.random.default_rng(0),
                                        task="regression"), 0, task="regression", num_bins=8)
    heat = partition_heatmap(stats.counts, row_label=stats.row_label).axes[0]
    assert heat.get_ylabel() == "target bin" and np.array_equal(heat.images[0].get_array(), stats.counts.T)
    overview = partition_overview(stats.counts, row_label=stats.row_label)
    assert overview.axes[0].get_title() == "client x target bin samples"
    # a classification's overview is redrawn anew, not relabelled in place
    assert update_overview(partition_overview(stats.counts), stats.counts, row_label="target bin") is not overview
    assert "dirichlet(alpha=0.3, target_bins=8)" in partition_title(config, task="regression")
    assert "dirichlet(alpha=0.3) " in partition_title(config)
    assert knobs_in_use(config.partition, "regression") == {"partition.alpha", "partition.min_size",
                                                            "partition.target_bins"}
    assert "partition.target_bins" not in knobs_in_use(config.partition.resolved(False), "classification")
    assert knobs_in_use(PartitionConfig(scheme="quantity"), "regression") == \
        knobs_in_use(PartitionConfig(scheme="quantity"))


def test_the_run_record_counts_clients_per_target_bin(tracking_uri):
    dataset = regression_dataset()
    config = regression_config(**{"partition.scheme": "dirichlet", "partition.alpha": 0.3,
                                  "partition.target_bins": 6})
    clients = partition_clients(config, dataset)
    stats = describe(dataset.y_train.numpy(), clients, 0, task="regression", num_bins=6)
    federation = Federation(config, dataset, clients, torch.nn.Linear(5, 1), build_strategy(config),
                            torch.device("cpu"), stats.summary(), split_client_tests(config, dataset, clients),
                            partition_scheme="dirichlet")
    client = MlflowClient(tracking_uri)
    run_id = client.create_run(client.create_experiment("regression-partition")).info.run_id
    log_partition(client, run_id, federation)
    folder = client.download_artifacts(run_id, "partition")
    with open(f"{folder}/counts.csv") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["client", *(f"target_bin_{b}" for b in range(6)), "size", "test_size"]
    body = np.array(rows[1:], dtype=np.int64)
    assert np.array_equal(body[:, 1:7], stats.counts) and np.array_equal(body[:, 7], [len(c) for c in clients])
    summary = json.loads(open(f"{folder}/summary.json").read())
    assert summary["target_w1_mean"] == pytest.approx(stats.summary()["target_w1_mean"], rel=1e-15)
    assert "label_tv_mean" not in summary


def test_the_explorer_shows_a_regressions_partition():
    from workbench.ui import PartitionExplorer

    dataset = regression_dataset()
    explorer = PartitionExplorer(regression_config(**{"partition.scheme": "dirichlet", "partition.alpha": 0.1}),
                                 loader=lambda config: dataset)
    assert explorer.error == "" and explorer.stats.is_regression
    assert explorer.overview_figure.axes[0].get_ylabel() == "target bin"
    assert "target_w1_mean" in explorer.table.value
    explorer.controls["partition.scheme"].value = "shards"
    assert "continuous" in explorer.error and "partition.scheme=dirichlet" in explorer.error

"""One conformance suite over every partitioner, the properties of each skew, the statistics, and the
partition as a run, the command line and MLflow see it."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient

from workbench.cli import main
from workbench.config import PARTITION_SCHEMES, ExperimentConfig, PartitionConfig
from workbench.partition import (apply_feature_skew, count_matrix, describe, gini, knobs_in_use, label_skew,
                                 partition, partition_hash, partition_test_by_labels, rotate_images,
                                 stats_from_counts, summarize)
from workbench.simulation import prepare, run
from workbench.tracking import MlflowCallback, load_partition

SCHEMES = [s for s in PARTITION_SCHEMES if s != "natural"]
#: Schemes that may refuse only when num_clients * min_size > num_samples: they must succeed otherwise.
ALWAYS_FEASIBLE = {"iid", "dirichlet", "quantity", "feature_noise", "rotation"}


def labels_of(num_samples: int, num_classes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, num_samples)


def config_of(scheme: str, **knobs) -> PartitionConfig:
    return PartitionConfig(scheme=scheme, **knobs)


@settings(max_examples=120, deadline=None)
@given(
    scheme=st.sampled_from(SCHEMES),
    num_samples=st.integers(20, 3000),
    num_clients=st.integers(1, 60),
    num_classes=st.integers(1, 12),
    alpha=st.floats(0.001, 100.0),
    shards=st.integers(1, 4),
    k=st.integers(1, 5),
    quantity=st.sampled_from(["dirichlet", "lognormal"]),
    quantity_alpha=st.floats(0.01, 10.0),
    quantity_sigma=st.floats(0.0, 4.0),
    iid_fraction=st.floats(0.0, 1.0),
    mixture_skew=st.sampled_from(["dirichlet", "shards", "classes_per_client", "quantity"]),
    min_size=st.integers(1, 5),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_scheme_covers_exactly_once_is_deterministic_and_honours_min_size(
        scheme, num_samples, num_clients, num_classes, alpha, shards, k, quantity, quantity_alpha,
        quantity_sigma, iid_fraction, mixture_skew, min_size, seed):
    labels = labels_of(num_samples, num_classes, seed)
    config = config_of(scheme, alpha=alpha, shards_per_client=shards, classes_per_client=k,
                       quantity_distribution=quantity, quantity_alpha=quantity_alpha, quantity_sigma=quantity_sigma,
                       iid_fraction=iid_fraction, mixture_skew=mixture_skew, min_size=min_size)
    try:
        parts = partition(labels, num_clients, config, np.random.default_rng(seed))
    except ValueError as err:  # an infeasible request: refused with the field named and a fix
        message = str(err)
        assert "partition." in message or "federation.num_clients" in message
        assert "(" in message and ")" in message  # the fix
        if scheme in ALWAYS_FEASIBLE:
            assert num_clients * min_size > num_samples, message
        return
    assert len(parts) == num_clients
    assert all(p.dtype.kind == "i" and np.all(np.diff(p) > 0) for p in parts)  # sorted, no repeats
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(num_samples))  # every sample once
    assert min(len(p) for p in parts) >= min_size
    again = partition(labels, num_clients, config, np.random.default_rng(seed))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))  # same seed, same partition
    assert partition_hash(parts) == partition_hash(again)


@settings(max_examples=60, deadline=None)
@given(num_classes=st.integers(1, 12), k=st.integers(1, 12), num_clients=st.integers(1, 80),
       per_class=st.integers(1, 200), seed=st.integers(0, 2**32 - 1))
def test_classes_per_client_gives_every_client_exactly_k_classes(num_classes, k, num_clients, per_class, seed):
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(num_classes), per_class + rng.integers(0, 5, num_classes)))
    config = config_of("classes_per_client", classes_per_client=k)
    feasible_by_margin = k <= num_classes and num_clients * k >= num_classes and per_class >= num_clients
    try:
        parts = partition(labels, num_clients, config, np.random.default_rng(seed))
    except ValueError as err:
        assert "partition.classes_per_client" in str(err) or "federation.num_clients" in str(err)
        assert not feasible_by_margin, str(err)
        return
    counts = count_matrix(labels, parts, num_classes)
    assert np.all((counts > 0).sum(axis=1) == k)
    assert np.all(counts.sum(axis=0) == np.bincount(labels, minlength=num_classes))


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_clients=st.integers(10, 100))
def test_mean_heterogeneity_decreases_as_alpha_grows(seed, num_clients):
    labels = labels_of(20_000, 10, seed)
    summaries = [summarize(labels, partition(labels, num_clients, config_of("dirichlet", alpha=alpha),
                                             np.random.default_rng(seed)), 10)
                 for alpha in (0.01, 0.1, 1.0, 10.0, 1000.0)]
    for metric in ("label_tv_mean", "label_js_mean", "classes_missing_mean"):
        values = [s[metric] for s in summaries]
        assert values == sorted(values, reverse=True), (metric, values)
    effective = [s["effective_classes_mean"] for s in summaries]
    assert effective == sorted(effective)
    assert summaries[0]["label_tv_mean"] > 0.8 and summaries[-1]["label_tv_mean"] < 0.1


def test_dirichlet_skew_at_fixed_alpha_has_its_expected_value():
    # Each class is split by shares s ~ Dir(alpha * 1_N) (Hsu et al. 2019), so that E[sum_k s_k^2] =
    # (alpha + 1) / (N alpha + 1) (the Dirichlet's second moment), and the expected mean total variation
    # is what shares drawn directly from numpy's Dirichlet give (Monte Carlo, independent of `partition`).
    # Getting alpha wrong by 2x either way (e.g. alpha / N per client) moves both far outside the bounds.
    num_clients, num_classes, per_class, alpha = 20, 10, 3000, 0.5
    labels = np.repeat(np.arange(num_classes), per_class)
    concentration, tv = [], []
    for seed in range(10):
        parts = partition(labels, num_clients, config_of("dirichlet", alpha=alpha), np.random.default_rng(seed))
        shares = count_matrix(labels, parts, num_classes) / per_class
        concentration += list((shares ** 2).sum(axis=0))
        tv.append(summarize(labels, parts, num_classes)["label_tv_mean"])
    assert np.mean(concentration) == pytest.approx((alpha + 1) / (num_clients * alpha + 1), abs=0.015)
    rng = np.random.default_rng(12345)
    drawn = rng.dirichlet(np.full(num_clients, alpha), size=(4000, num_classes))  # draw x class x client
    local = np.swapaxes(drawn, 1, 2) / np.swapaxes(drawn, 1, 2).sum(axis=2, keepdims=True)
    expected_tv = float((0.5 * np.abs(local - 1 / num_classes).sum(axis=2)).mean())
    assert expected_tv == pytest.approx(0.448, abs=0.005)
    assert np.mean(tv) == pytest.approx(expected_tv, abs=0.03)


def test_tiny_alpha_many_clients_terminates_with_no_empty_client():
    labels = labels_of(10_000, 10, 1)
    parts = partition(labels, 1000, config_of("dirichlet", alpha=1e-3, min_size=5), np.random.default_rng(0))
    assert min(len(p) for p in parts) >= 5
    # Almost every class went to one client; the repair gave the empty ones exactly what they lacked.
    assert sum(len(p) == 5 for p in parts) >= 900


def test_dirichlet_min_size_is_met_even_when_it_takes_every_spare_sample():
    labels = labels_of(1000, 4, 2)
    parts = partition(labels, 100, config_of("dirichlet", alpha=0.01, min_size=10), np.random.default_rng(0))
    assert {len(p) for p in parts} == {10}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_more_clients_than_samples_is_refused_with_a_fix(scheme):
    labels = labels_of(50, 5, 0)
    with pytest.raises(ValueError, match="federation.num_clients=60") as info:
        partition(labels, 60, config_of(scheme), np.random.default_rng(0))
    assert "use at most 50 clients" in str(info.value)
    with pytest.raises(ValueError, match="partition.min_size=6"):
        partition(labels, 10, config_of(scheme, min_size=6), np.random.default_rng(0))


@pytest.mark.parametrize("knobs, message", [
    ({"classes_per_client": 6}, r"partition.classes_per_client=6 is more than the 5 classes .*use classes_per_client <= 5"),
    ({"classes_per_client": 1}, r"cannot hold all 5 classes.*\(use classes_per_client >= 2 or at least 5 clients\)"),
    ({"classes_per_client": 2, "min_size": 33}, r"partition.min_size=33 cannot be met with partition.classes_per_client=2"),
])
def test_classes_per_client_infeasible_requests_name_the_field(knobs, message):
    labels = np.repeat(np.arange(5), 20)
    with pytest.raises(ValueError, match=message):
        partition(labels, 3, config_of("classes_per_client", **knobs), np.random.default_rng(0))


def test_classes_per_client_refuses_a_class_too_small_for_its_clients():
    labels = np.array([0] * 100 + [1] * 100 + [2] * 2)  # class 2 cannot be shared by many clients
    with pytest.raises(ValueError, match=r"class 2 has 2 samples but \d+ clients hold it"):
        partition(labels, 40, config_of("classes_per_client", classes_per_client=3), np.random.default_rng(0))


def test_shards_give_each_client_few_labels():
    labels = np.repeat(np.arange(10), 600)  # MNIST-like: sorted classes, equal sizes
    parts = partition(labels, 100, config_of("shards", shards_per_client=2), np.random.default_rng(0))
    counts = count_matrix(labels, parts, 10)
    assert (counts > 0).sum(axis=1).max() <= 2
    assert set(counts.sum(axis=1)) == {60}


def test_iid_is_balanced_and_unskewed():
    labels = labels_of(10_000, 10, 4)
    parts = partition(labels, 10, config_of("iid"), np.random.default_rng(0))
    assert {len(p) for p in parts} == {1000}
    assert summarize(labels, parts, 10)["label_tv_mean"] < 0.05


def test_quantity_skew_makes_sizes_unequal_but_keeps_labels_iid():
    labels = labels_of(50_000, 10, 5)
    gentle, harsh = (partition(labels, 50, config_of("quantity", quantity_alpha=a, min_size=20),
                               np.random.default_rng(1)) for a in (100.0, 0.1))
    assert gini([len(p) for p in harsh]) > 0.6 > 0.1 > gini([len(p) for p in gentle])
    assert min(len(p) for p in harsh) >= 20
    big = [p for p in harsh if len(p) >= 2000]
    assert big and label_skew(count_matrix(labels, big, 10)).max() < 0.05  # labels stay IID
    equal = partition(labels, 50, config_of("quantity", quantity_distribution="lognormal", quantity_sigma=0.0),
                      np.random.default_rng(1))
    assert {len(p) for p in equal} == {1000}
    spread = partition(labels, 50, config_of("quantity", quantity_distribution="lognormal", quantity_sigma=2.0),
                       np.random.default_rng(1))
    assert gini([len(p) for p in spread]) > 0.5


def test_mixture_puts_iid_clients_first_beside_skewed_ones():
    labels = labels_of(30_000, 10, 6)
    config = config_of("mixture", iid_fraction=0.3, mixture_skew="classes_per_client", classes_per_client=2)
    parts = partition(labels, 40, config, np.random.default_rng(2))
    counts = count_matrix(labels, parts, 10)
    assert np.all((counts[:12] > 0).sum(axis=1) == 10) and label_skew(counts[:12]).max() < 0.1
    assert np.all((counts[12:] > 0).sum(axis=1) == 2)
    assert abs(sum(len(p) for p in parts[:12]) - 0.3 * 30_000) <= 1
    all_iid = partition(labels, 40, config.__class__(scheme="mixture", iid_fraction=1.0), np.random.default_rng(2))
    assert label_skew(count_matrix(labels, all_iid, 10)).max() < 0.1


def test_mixture_errors_say_which_part_failed():
    labels = labels_of(100, 10, 0)
    with pytest.raises(ValueError, match=r"partition.scheme='mixture' with partition.iid_fraction=0.5 leaves 5 "
                                         r"shards clients .*partition.shards_per_client=20"):
        partition(labels, 10, config_of("mixture", mixture_skew="shards", shards_per_client=20),
                  np.random.default_rng(0))


@pytest.mark.parametrize("scheme", ["feature_noise", "rotation"])
def test_feature_skew_leaves_labels_iid_and_the_partition_that_of_iid(scheme):
    labels = labels_of(5000, 10, 7)
    parts = partition(labels, 25, config_of(scheme), np.random.default_rng(3))
    iid = partition(labels, 25, config_of("iid"), np.random.default_rng(3))
    assert all(np.array_equal(a, b) for a, b in zip(parts, iid))
    assert summarize(labels, parts, 10)["label_tv_mean"] < 0.1


def test_feature_noise_grows_with_the_client_index_and_leaves_its_input_alone():
    x = torch.zeros(4000, 3, 4, 4)
    parts = partition(labels_of(4000, 10, 0), 4, config_of("iid"), np.random.default_rng(0))
    config = config_of("feature_noise", noise_sigma=2.0)
    noisy = apply_feature_skew(x, parts, config, np.random.default_rng(1))
    assert torch.count_nonzero(x) == 0  # input untouched
    for i, part in enumerate(parts):  # client i of N: std = sigma * i / N
        assert float(noisy[part].std()) == pytest.approx(2.0 * i / 4, abs=0.03)
    again = apply_feature_skew(x, parts, config, np.random.default_rng(1))
    assert torch.equal(noisy, again)


def test_rotation_turns_client_i_by_its_angle_and_refuses_vectors():
    image = torch.arange(2 * 6 * 6, dtype=torch.float32).view(1, 2, 6, 6)
    x = image.repeat(4, 1, 1, 1)
    parts = [np.array([0]), np.array([1]), np.array([2]), np.array([3])]
    rotated = apply_feature_skew(x, parts, config_of("rotation", max_rotation=360.0), np.random.default_rng(0))
    assert torch.equal(x, image.repeat(4, 1, 1, 1))  # input untouched
    assert torch.equal(rotated[0], image[0])  # client 0: no rotation
    for i in (1, 2, 3):  # 90, 180, 270 degrees counter-clockwise
        assert torch.allclose(rotated[i], torch.rot90(image[0], i, dims=(-2, -1)), atol=1e-4)
    assert torch.allclose(rotate_images(image, torch.tensor([45.0])).sum(), image.sum(), rtol=0.5)
    with pytest.raises(ValueError, match=r"partition.scheme='rotation' rotates images .* shape \(60,\) "
                                         r"\(use partition.scheme=feature_noise"):
        apply_feature_skew(torch.zeros(10, 60), [np.arange(10)], config_of("rotation"), np.random.default_rng(0))


def test_statistics_of_known_partitions():
    disjoint = np.diag([50, 50])  # two clients, one class each
    stats = stats_from_counts(disjoint)
    assert np.allclose(stats.tv, 0.5)
    # Reference values computed by hand: p = (1, 0), q = (1/2, 1/2), m = (3/4, 1/4).
    js = 0.5 * (1 * math.log2(1 / 0.75)) + 0.5 * (0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25))
    assert np.allclose(stats.js, js)
    assert np.allclose(stats.effective_classes, 1.0) and np.all(stats.missing_classes == 1)
    iid = stats_from_counts(np.full((4, 5), 7))
    assert np.allclose(iid.tv, 0) and np.allclose(iid.js, 0) and np.allclose(iid.effective_classes, 5)
    assert gini([3, 3, 3]) == pytest.approx(0.0) and gini([0, 0, 0, 8]) == pytest.approx(0.75)
    summary = stats.summary()
    assert summary["classes_missing_mean"] == 1 and summary["size_gini"] == pytest.approx(0.0)
    assert summary["label_tv_max"] == pytest.approx(0.5) and not any("emd" in key for key in summary)
    with pytest.raises(ValueError, match=r"labels must lie in 0..5 for num_classes=6, got 0..6"):
        count_matrix(np.array([0, 6]), [np.array([0, 1])], 6)  # would spill into the next client's row


@settings(max_examples=30, deadline=None)
@given(num_samples=st.integers(1, 500), num_clients=st.integers(1, 20), seed=st.integers(0, 2**32 - 1))
def test_count_matrix_and_statistics_agree_with_a_direct_count(num_samples, num_clients, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 6, num_samples)
    owner = rng.integers(0, num_clients, num_samples)
    parts = [np.flatnonzero(owner == k) for k in range(num_clients)]
    counts = count_matrix(labels, parts, 6)
    direct = np.array([[np.sum(labels[p] == c) for c in range(6)] for p in parts])
    assert np.array_equal(counts, direct)
    stats = describe(labels, parts, 6)
    overall = np.bincount(labels, minlength=6) / num_samples
    for k, p in enumerate(parts):
        if len(p):
            local = np.bincount(labels[p], minlength=6) / len(p)
            assert stats.tv[k] == pytest.approx(0.5 * np.abs(local - overall).sum())
            assert 0 <= stats.js[k] <= 1


def test_partition_hash_changes_when_one_sample_moves():
    parts = [np.array([0, 2, 4]), np.array([1, 3])]
    moved = [np.array([0, 2]), np.array([1, 3, 4])]
    assert partition_hash(parts) != partition_hash(moved)
    assert partition_hash(parts) == partition_hash([p.astype(np.int32) for p in parts])
    assert len(partition_hash(parts)) == 64


def test_knobs_in_use_follow_the_scheme():
    assert knobs_in_use(config_of("dirichlet")) == {"partition.alpha", "partition.min_size"}
    assert "partition.quantity_sigma" in knobs_in_use(config_of("quantity", quantity_distribution="lognormal"))
    mixed = knobs_in_use(config_of("mixture", mixture_skew="shards"))
    assert {"partition.iid_fraction", "partition.mixture_skew", "partition.shards_per_client"} <= mixed


@settings(max_examples=60, deadline=None)
@given(num_train=st.integers(50, 3000), test_fraction=st.floats(0.05, 0.6), num_clients=st.integers(1, 40),
       num_classes=st.integers(1, 10), alpha=st.floats(0.05, 10.0), seed=st.integers(0, 2**32 - 1))
def test_each_clients_test_set_follows_its_own_training_labels(num_train, test_fraction, num_clients, num_classes,
                                                              alpha, seed):
    rng = np.random.default_rng(seed)
    labels = labels_of(num_train, num_classes, seed)
    test_labels = labels_of(max(1, int(test_fraction * num_train)), num_classes, seed + 1)
    try:
        parts = partition(labels, num_clients, config_of("dirichlet", alpha=alpha), rng)
    except ValueError:
        return  # more clients than samples: refused, tested above
    tests = partition_test_by_labels(labels, parts, test_labels, np.random.default_rng(seed))
    assert len(tests) == num_clients
    assert all(t.dtype.kind == "i" and np.all(np.diff(t) > 0) for t in tests)
    train_counts = count_matrix(labels, parts, num_classes)
    test_counts = count_matrix(test_labels, tests, num_classes)
    class_train, class_test = train_counts.sum(axis=0), np.bincount(test_labels, minlength=num_classes)
    # never a class the client does not train on
    assert np.all(test_counts[train_counts == 0] == 0)
    # every client gets a test set unless none of its classes is in the test pool
    has_pool = (train_counts * (class_test > 0)).sum(axis=1) > 0
    sizes = np.array([len(t) for t in tests])
    assert np.all(sizes[has_pool] >= 1) and np.all(sizes[~has_pool] == 0)
    # in proportion to the client's training samples of each class: within one sample of the exact share
    # (a client whose shares all round to zero is topped up with one sample of a class it holds: still so)
    exact = class_test[None, :] * train_counts / np.maximum(class_train, 1)[None, :]
    assert np.all(np.abs(test_counts - exact) < 1)
    # disjoint but for those top-ups, and every test sample of a class that some client trains on is used
    joined = np.concatenate(tests)
    assert len(joined) - len(np.unique(joined)) <= int(np.sum(exact.max(axis=1) < 1))
    assert set(np.flatnonzero(class_train[test_labels] > 0)) <= set(joined.tolist())
    again = partition_test_by_labels(labels, parts, test_labels, np.random.default_rng(seed))
    assert all(np.array_equal(a, b) for a, b in zip(tests, again))


def test_natural_needs_a_dataset_with_clients():
    with pytest.raises(ValueError, match="partition.scheme='natural' needs a dataset with real clients"):
        partition(labels_of(100, 3, 0), 5, config_of("natural"), np.random.default_rng(0))


# ----- the partition as a run, the command line and MLflow see it -----


def test_a_run_trains_on_feature_skewed_inputs_and_tests_on_clean_ones(tiny_config):
    base = tiny_config.with_overrides({"data.name": "digits", "federation.num_clients": 10,
                                       "federation.clients_per_round": 3})
    iid = prepare(base.with_overrides({"partition.scheme": "iid"}))
    noisy = prepare(base.with_overrides({"partition.scheme": "feature_noise", "partition.noise_sigma": 1.0}))
    assert all(np.array_equal(a, b) for a, b in zip(iid.clients, noisy.clients))
    assert torch.equal(iid.dataset.x_test, noisy.dataset.x_test)
    first, last = noisy.clients[0], noisy.clients[-1]
    assert torch.equal(iid.dataset.x_train[first], noisy.dataset.x_train[first])
    assert float((noisy.dataset.x_train[last] - iid.dataset.x_train[last]).std()) == pytest.approx(0.9, abs=0.05)
    with pytest.raises(ValueError, match=r"^partition.scheme='rotation' rotates images of shape \(channels, "
                                         r"height, width\), but data.name=synthetic has inputs of shape \(60,\) "
                                         r"\(use partition.scheme=feature_noise for vector data, or an image dataset: "
                                         r"data.name=digits, fashion_mnist, mnist or cifar10\)$"):
        prepare(tiny_config.with_overrides({"partition.scheme": "rotation"}))
    with pytest.raises(ValueError, match=r"but this dataset has inputs of shape \(4,\)"):
        apply_feature_skew(torch.zeros(2, 4), [np.arange(2)], config_of("rotation"), np.random.default_rng(0))
    # the noise is seeded from the whole seed space: 40 seeds, 40 different noises
    noises = {float(apply_feature_skew(torch.zeros(2, 3), [np.array([0]), np.array([1])],
                                       config_of("feature_noise", noise_sigma=1.0),
                                       np.random.default_rng(seed))[1, 0]) for seed in range(40)}
    assert len(noises) == 40


def test_runs_record_their_partition_in_mlflow(tiny_config, tracking_uri):
    config = tiny_config.with_overrides({"partition.scheme": "dirichlet", "partition.alpha": 0.2,
                                         "federation.rounds": 1})
    trackers = [MlflowCallback(tracking_uri, experiment="p") for _ in range(2)]
    federations = [prepare(config), prepare(config.with_overrides({"strategy.name": "fedprox"}))]
    for tracker, federation in zip(trackers, federations):
        run(federation, [tracker])
    client = MlflowClient(tracking_uri)
    logged = client.get_run(trackers[0].run_id)
    digest = partition_hash(federations[0].clients)
    assert logged.data.tags["partition_hash"] == digest
    assert float(logged.data.params["partition.stat.label_js_mean"]) == federations[0].partition_stats["label_js_mean"]
    artifacts = {a.path for a in client.list_artifacts(trackers[0].run_id, "partition")}
    assert artifacts == {"partition/summary.json", "partition/counts.csv", "partition/clients.npz",
                         "partition/heatmap.png"}
    restored = load_partition(trackers[0].run_id, tracking_uri)
    assert all(np.array_equal(a, b) for a, b in zip(restored, federations[0].clients))
    folder = client.download_artifacts(trackers[0].run_id, "partition")
    summary = json.loads(open(f"{folder}/summary.json").read())
    assert summary["partition_hash"] == digest and summary["scheme"] == "dirichlet"
    rows = np.loadtxt(f"{folder}/counts.csv", delimiter=",", skiprows=1, dtype=int)
    labels = federations[0].dataset.y_train.cpu().numpy()
    assert np.array_equal(rows[:, 1:-2], count_matrix(labels, federations[0].clients, 10))
    assert np.array_equal(rows[:, -2], [len(c) for c in federations[0].clients])
    # each client's own test set, recorded beside its training samples
    tests = federations[0].client_tests
    assert summary["client_test_rule"] == tests.rule == "labels"
    assert np.array_equal(rows[:, -1], tests.sizes) and tests.sizes.min() >= 1
    restored_tests = load_partition(trackers[0].run_id, tracking_uri, split="test")
    assert len(restored_tests) == 8 and all(np.array_equal(a, b) for a, b in zip(restored_tests, tests.indices))
    # Runs that differ only in the algorithm share the partition, and the hash finds them.
    found = client.search_runs([logged.info.experiment_id], f"tags.partition_hash = '{digest}'")
    assert {r.info.run_id for r in found} == {t.run_id for t in trackers}


def test_cli_partition_prints_statistics_and_writes_figures(tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["partition", "--set", "data.name=digits", "--set", "partition.scheme=classes_per_client",
                 "--set", "partition.classes_per_client=3", "--set", "federation.num_clients=12",
                 "--set", "federation.clients_per_round=4", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "classes_per_client_mean" in printed and "label_js_mean" in printed and "partition_hash" in printed
    line = next(l for l in printed.splitlines() if l.startswith("classes_per_client_mean"))
    assert line.split()[1] == "3"
    for name in ("overview.png", "heatmap.png", "label_bars.png", "sizes.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    config = ExperimentConfig().with_overrides({"data.name": "digits", "partition.scheme": "classes_per_client",
                                                "partition.classes_per_client": 3, "federation.num_clients": 12,
                                                "federation.clients_per_round": 4, "device": "cpu"})
    assert summary["partition_hash"] == partition_hash(prepare(config).clients)  # what a run trains on


def test_cli_partition_refuses_infeasible_settings_in_one_line(tmp_path, capsys):
    code = main(["partition", "--set", "data.name=digits", "--set", "partition.scheme=classes_per_client",
                 "--set", "partition.classes_per_client=11", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("workbench: error: partition.classes_per_client=11 is more than the 10 classes")


# ----- pinned by hand: what mutation testing showed the properties above let through -----

from workbench.partition import (STAT_DESCRIPTIONS, _repair_min_size, owner_of,  # noqa: E402
                                 partition_classes_per_client, partition_dirichlet, partition_natural,
                                 partition_quantity, partition_shards, skew_preview)


def test_summary_of_a_known_partition_by_hand():
    # client 0: 3 of class 0, 1 of class 1 (a class with one sample still counts as present);
    # client 1: 4 of class 1; class 2 is absent everywhere (not "missing" for anyone)
    stats = stats_from_counts(np.array([[3, 1, 0], [0, 4, 0]]))
    overall = np.array([3, 5, 0]) / 8
    local = np.array([[0.75, 0.25, 0], [0, 1, 0]])
    tv = 0.5 * np.abs(local - overall).sum(axis=1)
    entropy0 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    summary = stats.summary()
    assert set(summary) == set(STAT_DESCRIPTIONS) - {"target_w1_mean", "target_w1_max"}  # a regression's
    assert summary == pytest.approx({
        "num_clients": 2, "num_samples": 8, "size_min": 4, "size_mean": 4, "size_max": 4, "size_std": 0,
        "size_gini": 0, "classes_per_client_mean": 1.5, "classes_missing_mean": 0.5,
        "effective_classes_mean": (math.exp(entropy0) + 1) / 2, "effective_classes_min": 1.0,
        "label_tv_mean": tv.mean(), "label_tv_max": tv.max(),
        "label_js_mean": float(stats.js.mean()), "label_js_max": float(stats.js.max())})
    assert 0 < stats.js[0] < stats.js[1] <= 1
    unequal = stats_from_counts(np.array([[1, 0], [2, 0], [9, 0]])).summary()
    assert unequal["size_std"] == pytest.approx(np.std([1, 2, 9])) and unequal["size_min"] == 1


def test_gini_by_hand():
    assert gini([0, 1]) == pytest.approx(0.5) and gini([1, 3]) == pytest.approx(0.25)
    assert gini([]) == 0.0 and gini([0, 0]) == 0.0 and gini([7]) == 0.0


def test_owner_of_marks_unheld_samples():
    assert owner_of([np.array([2]), np.array([0, 3])], 5).tolist() == [1, -1, 0, 1, -1]
    assert owner_of([], 2).tolist() == [-1, -1]


def test_count_matrix_of_no_clients_and_of_empty_clients():
    assert count_matrix(np.array([0, 1]), [], 2).shape == (0, 2)
    assert count_matrix(np.array([0, 1]), [np.zeros(0, int), np.array([1])], 2).tolist() == [[0, 0], [0, 1]]


def test_quantity_sizes_are_the_largest_remainder_of_the_drawn_shares():
    # the same draw as partition_quantity makes first: sizes within one sample of min_size + share * rest
    for distribution, draw in (("dirichlet", lambda rng: rng.dirichlet(np.full(7, 0.5))),
                               ("lognormal", lambda rng: rng.lognormal(0.0, 1.0, 7))):
        parts = partition_quantity(1000, 7, np.random.default_rng(3), distribution=distribution, min_size=5)
        weights = draw(np.random.default_rng(3))
        exact = 5 + weights / weights.sum() * (1000 - 7 * 5)
        sizes = np.array([len(p) for p in parts])
        assert sizes.sum() == 1000 and np.all(np.abs(sizes - exact) < 1), distribution
        # the extra samples went to the largest remainders
        extra, remainder = sizes - np.floor(exact), exact - np.floor(exact)
        assert remainder[extra == 1].min(initial=1) >= remainder[extra == 0].max(initial=0), distribution
        # the defaults are the documented ones: dirichlet, alpha 0.5, sigma 1, min_size 1
    defaults = partition_quantity(500, 6, np.random.default_rng(4))
    explicit = partition_quantity(500, 6, np.random.default_rng(4), distribution="dirichlet", alpha=0.5, min_size=1)
    assert all(np.array_equal(a, b) for a, b in zip(defaults, explicit))
    lognormal = partition_quantity(500, 6, np.random.default_rng(4), distribution="lognormal")
    assert all(np.array_equal(a, b) for a, b in zip(lognormal, partition_quantity(
        500, 6, np.random.default_rng(4), distribution="lognormal", sigma=1.0)))
    # tiny alpha: everything beyond min_size goes to one client
    tiny = partition_quantity(500, 6, np.random.default_rng(4), alpha=1e-300, min_size=3)
    assert sorted(len(p) for p in tiny) == [3, 3, 3, 3, 3, 485]
    with pytest.raises(ValueError, match=r"^partition.quantity_distribution 'uniform' is unknown "
                                         r"\(choose dirichlet or lognormal\)$"):
        partition_quantity(500, 6, np.random.default_rng(4), distribution="uniform")


def test_dirichlet_at_the_limits_of_alpha():
    labels = np.repeat(np.arange(6), 50)
    one_each = partition_dirichlet(labels, 12, 1e-300, np.random.default_rng(0), min_size=0)
    counts = count_matrix(labels, one_each, 6)
    assert np.all((counts > 0).sum(axis=0) == 1)  # alpha -> 0: each class goes to one client
    # the default min_size is 1: some clients keep exactly one sample after the repair
    sizes = [len(p) for p in partition_dirichlet(labels, 40, 1e-3, np.random.default_rng(0))]
    assert min(sizes) == 1 and sizes.count(1) >= 20


def test_min_size_repair_takes_from_the_clients_with_most_to_spare():
    # sizes 10, 6, 0, 0 with min_size 2: 4 samples missing; water-filling from the top takes all 4 from
    # client 0 (spare 8 vs 4), leaving 6, 6, 2, 2; one missing takes one from client 0 only
    owner = np.repeat([0, 1], [10, 6])
    repaired = _repair_min_size(np.concatenate([owner, []]).astype(np.int64), 4, 2, np.random.default_rng(0))
    assert np.bincount(repaired, minlength=4).tolist() == [6, 6, 2, 2]
    assert np.array_equal(repaired[10:], owner[10:])  # client 1 gave nothing
    one_short = np.repeat([0, 1, 2], [9, 5, 1])
    repaired = _repair_min_size(one_short, 3, 2, np.random.default_rng(0))
    assert np.bincount(repaired, minlength=3).tolist() == [8, 5, 2]
    # levels: spares 7, 6, 1 with 3 missing -> 7 and 6 give down to a common level (5 and 5): 2 + 1
    three_short = np.repeat([0, 1, 2, 3], [9, 8, 3, 0])
    repaired = _repair_min_size(three_short, 4, 2, np.random.default_rng(0))
    sizes = np.bincount(repaired, minlength=4).tolist()
    assert sizes[2:] == [3, 2] and sorted(sizes[:2]) == [7, 8]
    assert np.array_equal(_repair_min_size(one_short, 3, 1, np.random.default_rng(0)), one_short)


def test_shards_boundaries_and_messages():
    labels = np.repeat(np.arange(4), 5)  # 20 samples
    parts = partition_shards(labels, 10, 2, np.random.default_rng(0))  # 20 shards of one sample: allowed
    assert [len(p) for p in parts] == [2] * 10
    with pytest.raises(ValueError, match=r"^partition.shards_per_client=3 x federation.num_clients=10 = 30 "
                                         r"shards, more than the 20 training samples \(use shards_per_client <= 2\)$"):
        partition_shards(labels, 10, 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"^partition.min_size=5 cannot be met: 2 shards of 2 samples per client "
                                         r"can give a client 4 \(lower min_size or raise shards_per_client\)$"):
        partition_shards(labels, 5, 2, np.random.default_rng(0), min_size=5)
    assert min(len(p) for p in partition_shards(labels, 5, 2, np.random.default_rng(0), min_size=4)) == 4
    with pytest.raises(ValueError, match=r"^partition.min_size=5 cannot be met: 2 shards of 2 or 3"):  # partition()
        partition(labels, 4, config_of("shards", shards_per_client=2, min_size=5), np.random.default_rng(0))
    # 23 samples in 6 shards: five of 4 and one of 3; 3 shards per client give at least 3 + 4 + 4 = 11
    odd = np.arange(23) % 4
    for seed in range(10):
        assert min(len(p) for p in partition_shards(odd, 2, 3, np.random.default_rng(seed), min_size=11)) >= 11
    with pytest.raises(ValueError, match=r"min_size=12 cannot be met: 3 shards of 3 or 4 samples per client can "
                                         r"give a client 11"):
        partition_shards(odd, 2, 3, np.random.default_rng(0), min_size=12)
    with pytest.raises(ValueError, match=r"\(use shards_per_client <= 1\)$"):
        partition_shards(np.arange(10) % 2, 10, 2, np.random.default_rng(0))
    # labels in any order: shards are cut from the label-sorted samples, so clients still hold few labels
    shuffled = np.random.default_rng(1).permutation(np.repeat(np.arange(10), 60))
    parts = partition_shards(shuffled, 30, 2, np.random.default_rng(0))
    assert (count_matrix(shuffled, parts, 10) > 0).sum(axis=1).max() <= 2
    # the default min_size is 1: one shard of one sample each is fine
    assert [len(p) for p in partition_shards(labels, 20, 1, np.random.default_rng(0))] == [1] * 20
    # shards hold consecutive label-sorted samples: with one shard per client, each client holds one class
    single = partition(labels, 4, config_of("shards", shards_per_client=1), np.random.default_rng(0))
    assert np.all((count_matrix(labels, single, 4) > 0).sum(axis=1) == 1)


def test_classes_per_client_covers_every_class_when_the_slots_just_suffice():
    labels = np.repeat(np.arange(10), 30)
    for seed in range(20):
        parts = partition(labels, 5, config_of("classes_per_client", classes_per_client=2),
                          np.random.default_rng(seed))  # 5 x 2 = 10 slots for 10 classes
        counts = count_matrix(labels, parts, 10)
        assert np.all((counts > 0).sum(axis=1) == 2) and np.all((counts > 0).sum(axis=0) == 1)
    with pytest.raises(ValueError, match=r"partition.classes_per_client=2 x federation.num_clients=4 = 8 class "
                                         r"slots cannot hold all 10 classes, .*\(use classes_per_client >= 3 or at "
                                         r"least 5 clients\)$"):
        partition(labels, 4, config_of("classes_per_client", classes_per_client=2), np.random.default_rng(0))
    for seed in range(20):  # one class each: the slots are exactly the classes
        parts = partition(labels, 10, config_of("classes_per_client", classes_per_client=1),
                          np.random.default_rng(seed))
        assert np.all((count_matrix(labels, parts, 10) > 0).sum(axis=0) == 1)
    # the default min_size is 1: a class of one sample may be a client's only data
    single = partition_classes_per_client(np.array([0, 1, 1, 1]), 2, 1, np.random.default_rng(0))
    assert sorted(len(p) for p in single) == [1, 3]
    # min_size is per client: 2 classes of 100 among 3 clients leave a class split in two, clients of 50
    with pytest.raises(ValueError, match=r"partition.min_size=60 .* the smallest of 3 clients gets 50 samples"):
        partition(np.repeat(np.arange(2), 100), 3, config_of("classes_per_client", classes_per_client=1,
                                                             min_size=60), np.random.default_rng(0))
    # min_size is checked per client (each of 3 clients gets 100 samples of its classes), not per class
    parts = partition(np.repeat(np.arange(3), 100), 3, config_of("classes_per_client", classes_per_client=1,
                                                                 min_size=100), np.random.default_rng(0))
    assert sorted(len(p) for p in parts) == [100, 100, 100]
    with pytest.raises(ValueError, match=r"partition.min_size=101 .* the smallest of 3 clients gets 100 samples"):
        partition(np.repeat(np.arange(3), [100, 105, 110]), 3, config_of("classes_per_client", classes_per_client=1,
                                                                         min_size=101), np.random.default_rng(0))


def test_mixture_keeps_min_size_for_both_groups_at_the_feasibility_limit():
    labels = labels_of(50, 2, 0)  # 10 clients x min_size 5 = exactly the 50 samples
    for fraction in (0.1, 0.3, 0.7, 0.9):
        parts = partition(labels, 10, config_of("mixture", iid_fraction=fraction, min_size=5,
                                                mixture_skew="quantity"), np.random.default_rng(0))
        assert [len(p) for p in parts] == [5] * 10, fraction


def test_natural_clients_meet_min_size_exactly_or_are_refused():
    clients = [np.array([0, 1, 2]), np.array([3, 4])]
    assert [p.tolist() for p in partition_natural(clients, 5, 2)] == [[0, 1, 2], [3, 4]]
    with pytest.raises(ValueError, match=r"^partition.min_size=3 cannot be met by the natural clients, the "
                                         r"smallest holds 2 samples \(lower min_size\)$"):
        partition_natural(clients, 5, 3)
    for overlapping in ([np.array([0, 1]), np.array([1, 2])], [np.array([0, 1]), np.array([1])]):
        with pytest.raises(ValueError, match=r"^the dataset's natural clients do not cover every training sample "
                                             r"exactly once$"):
            partition_natural(overlapping, 3, 1)
    with pytest.raises(ValueError, match=r"^partition.scheme='natural' needs a dataset with real clients, and this "
                                         r"one has none \(use data.name=synthetic or synthetic_iid, or choose "
                                         r"partition.scheme=iid/dirichlet/shards\)$"):
        partition(labels_of(10, 2, 0), 2, config_of("natural"), np.random.default_rng(0))


def test_infeasible_sizes_name_the_numbers():
    with pytest.raises(ValueError, match=r"^federation.num_clients=7 x partition.min_size=3 needs 21 training "
                                         r"samples, but the dataset has 20 \(use at most 6 clients, or a smaller "
                                         r"min_size\)$"):
        partition(labels_of(20, 2, 0), 7, config_of("iid", min_size=3), np.random.default_rng(0))


def test_knobs_in_use_of_quantity_skew_follow_the_distribution():
    assert knobs_in_use(config_of("quantity")) == {"partition.min_size", "partition.quantity_distribution",
                                                   "partition.quantity_alpha"}
    assert knobs_in_use(config_of("quantity", quantity_distribution="lognormal")) == {
        "partition.min_size", "partition.quantity_distribution", "partition.quantity_sigma"}
    assert knobs_in_use(config_of("mixture", mixture_skew="quantity")) == {
        "partition.min_size", "partition.iid_fraction", "partition.mixture_skew",
        "partition.quantity_distribution", "partition.quantity_alpha"}
    assert knobs_in_use(config_of("iid")) == {"partition.min_size"}


def test_test_split_leaves_out_classes_no_client_trains_on_and_keeps_single_sample_classes():
    train = np.array([0, 0, 0, 1, 1, 2])  # class 2 has one training sample (client 1); class 3 has none
    clients = [np.array([0, 1, 2, 3]), np.array([4, 5])]
    test = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    split = partition_test_by_labels(train, clients, test, np.random.default_rng(0))
    assert sorted(test[split[1]].tolist()).count(2) == 2  # the holder of class 2 gets both its test samples
    assert 3 not in test[np.concatenate(split)]  # nobody trains on class 3: nobody is tested on it
    assert sorted(np.concatenate(split).tolist()) == [0, 1, 2, 3, 4, 5]
    # a test set without the highest classes
    split = partition_test_by_labels(train, clients, np.array([0, 0, 1]), np.random.default_rng(0))
    assert sorted(np.concatenate(split).tolist()) == [0, 1, 2]


def test_skew_preview_shows_spread_clients_as_they_see_one_input():
    sample = torch.arange(64, dtype=torch.float32).reshape(1, 8, 8) / 64
    shown, views = skew_preview(sample, 11, config_of("rotation", max_rotation=100.0), np.random.default_rng(0))
    assert shown.tolist() == [0, 2, 4, 6, 8, 10] and views.shape == (6, 1, 8, 8)
    assert torch.equal(views[0], sample)  # client 0 of 11: no rotation
    expected = rotate_images(sample.unsqueeze(0), torch.tensor([100.0 * 10 / 11]))[0]
    assert torch.allclose(views[-1], expected, atol=1e-6)
    few, _ = skew_preview(sample, 3, config_of("feature_noise"), np.random.default_rng(0), num_shown=6)
    assert few.tolist() == [0, 1, 2]
    colour = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))
    _, views = skew_preview(colour, 5, config_of("feature_noise", noise_sigma=0.0), np.random.default_rng(0))
    assert views.shape == (5, 3, 4, 4) and torch.equal(views[2], colour)


def test_more_than_65535_clients_or_classes_keep_their_own_indices():
    # client and class ids are narrowed to uint16 for a radix sort where they fit, and only there
    from workbench.partition import _class_codes, _groups

    groups = _groups(np.array([70_000, 5_000, 70_000, 0]), 70_001)
    assert groups[0].tolist() == [3] and groups[5_000].tolist() == [1] and groups[70_000].tolist() == [0, 2]
    labels = np.arange(70_001)[::-1]
    codes, sizes = _class_codes(labels)
    assert np.array_equal(codes, labels) and np.all(sizes == 1)
    num = 70_000
    parts = partition(np.zeros(num + 5, dtype=np.int64), num, config_of("iid"), np.random.default_rng(0))
    assert len(parts) == num and sorted(len(p) for p in parts)[-5:] == [2] * 5
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(num + 5))
    distinct = np.arange(num)  # every sample its own class
    parts = partition(distinct, 2, config_of("dirichlet", alpha=0.5), np.random.default_rng(0))
    assert np.array_equal(np.sort(np.concatenate(parts)), distinct)
    assert np.all(count_matrix(distinct, parts, num).sum(axis=0) == 1)

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.config import PartitionConfig
from workbench.partition import count_matrix, label_skew, partition, summarize

SCHEMES = ["iid", "dirichlet", "shards"]


def labels_of(num_samples: int, num_classes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, num_samples)


@settings(max_examples=60, deadline=None)
@given(
    scheme=st.sampled_from(SCHEMES),
    num_samples=st.integers(20, 3000),
    num_clients=st.integers(1, 60),
    num_classes=st.integers(1, 12),
    alpha=st.floats(0.001, 100.0),
    shards=st.integers(1, 4),
    min_size=st.integers(1, 5),
    seed=st.integers(0, 2**32 - 1),
)
def test_exact_cover_determinism_and_min_size(scheme, num_samples, num_clients, num_classes, alpha, shards,
                                              min_size, seed):
    labels = labels_of(num_samples, num_classes, seed)
    config = PartitionConfig(scheme=scheme, alpha=alpha, shards_per_client=shards, min_size=min_size)
    try:
        parts = partition(labels, num_clients, config, np.random.default_rng(seed))
    except ValueError as err:  # infeasible settings must be rejected, naming a field
        assert "partition." in str(err) or "federation.num_clients" in str(err)
        assert num_clients * min_size > num_samples or num_clients * shards > num_samples or scheme == "shards"
        return
    assert len(parts) == num_clients
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.arange(num_samples))  # every sample exactly once
    assert min(len(p) for p in parts) >= min_size  # no empty client
    again = partition(labels, num_clients, config, np.random.default_rng(seed))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))  # same seed, same partition


@pytest.mark.parametrize("scheme", SCHEMES)
def test_infeasible_settings_are_rejected_with_a_fix(scheme):
    labels = labels_of(50, 5, 0)
    with pytest.raises(ValueError, match="federation.num_clients=60") as info:
        partition(labels, 60, PartitionConfig(scheme=scheme), np.random.default_rng(0))
    assert "use at most 50 clients" in str(info.value)
    with pytest.raises(ValueError, match="partition.min_size=6"):
        partition(labels, 10, PartitionConfig(scheme=scheme, min_size=6), np.random.default_rng(0))


def test_natural_needs_a_dataset_with_clients():
    with pytest.raises(ValueError, match="partition.scheme='natural' needs a dataset with real clients"):
        partition(labels_of(100, 3, 0), 5, PartitionConfig(scheme="natural"), np.random.default_rng(0))


def test_tiny_alpha_many_clients_terminates_with_no_empty_client():
    labels = labels_of(10_000, 10, 1)
    parts = partition(labels, 1000, PartitionConfig(scheme="dirichlet", alpha=1e-3, min_size=5),
                      np.random.default_rng(0))
    assert min(len(p) for p in parts) >= 5


def test_smaller_alpha_means_more_label_skew():
    labels = labels_of(20_000, 10, 2)
    skews = []
    for alpha in (0.05, 0.5, 5.0, 500.0):
        parts = partition(labels, 50, PartitionConfig(scheme="dirichlet", alpha=alpha), np.random.default_rng(3))
        skews.append(label_skew(count_matrix(labels, parts, 10)).mean())
    assert skews == sorted(skews, reverse=True)
    assert skews[0] > 0.6 and skews[-1] < 0.1


def test_shards_give_each_client_few_labels():
    labels = np.repeat(np.arange(10), 600)  # MNIST-like: sorted classes, equal sizes
    parts = partition(labels, 100, PartitionConfig(scheme="shards", shards_per_client=2), np.random.default_rng(0))
    counts = count_matrix(labels, parts, 10)
    assert (counts > 0).sum(axis=1).max() <= 2
    assert set(counts.sum(axis=1)) == {60}


def test_iid_is_balanced_and_unskewed():
    labels = labels_of(10_000, 10, 4)
    parts = partition(labels, 10, PartitionConfig(scheme="iid"), np.random.default_rng(0))
    assert {len(p) for p in parts} == {1000}
    assert summarize(labels, parts, 10)["label_tv_mean"] < 0.05

"""Pure functions from labels (and a random generator) to one index array per client, and their statistics."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from workbench.config import PartitionConfig


def partition(
    labels: np.ndarray,
    num_clients: int,
    config: PartitionConfig,
    rng: np.random.Generator,
    natural: Sequence[np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Split sample indices `0..len(labels)-1` among `num_clients` by `config.scheme`."""
    labels = np.asarray(labels)
    if config.scheme == "natural":
        if natural is None:
            raise ValueError(
                "partition.scheme='natural' needs a dataset with real clients, and this one has none "
                "(use data.name=synthetic or synthetic_iid, or choose partition.scheme=iid/dirichlet/shards)"
            )
        return partition_natural(natural, len(labels), config.min_size)
    check_feasible(len(labels), num_clients, config.min_size)
    if config.scheme == "iid":
        return partition_iid(len(labels), num_clients, rng)
    if config.scheme == "dirichlet":
        return partition_dirichlet(labels, num_clients, config.alpha, rng, min_size=config.min_size)
    if config.scheme == "shards":
        return partition_shards(labels, num_clients, config.shards_per_client, rng, min_size=config.min_size)
    raise ValueError(f"partition.scheme {config.scheme!r} is unknown")


def check_feasible(num_samples: int, num_clients: int, min_size: int) -> None:
    if num_clients * min_size > num_samples:
        most = num_samples // min_size
        raise ValueError(
            f"federation.num_clients={num_clients} x partition.min_size={min_size} needs "
            f"{num_clients * min_size} training samples, but the dataset has {num_samples} "
            f"(use at most {most} clients, or a smaller min_size)"
        )


def partition_iid(num_samples: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A uniform random split into clients whose sizes differ by at most one."""
    return [np.sort(part) for part in np.array_split(rng.permutation(num_samples), num_clients)]


def partition_dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator, *, min_size: int = 1,
) -> list[np.ndarray]:
    """Label skew: each class is split among clients by proportions ~ Dir(alpha) (Hsu et al. 2019).

    Unlike the usual resample-until-big-enough loop (which never ends for small alpha or many clients),
    clients below `min_size` are topped up with samples taken from the largest clients: a bounded
    repair that changes as few assignments as possible.
    """
    owner = np.empty(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        if not np.isfinite(shares).all() or shares.sum() <= 0:  # underflow for tiny alpha
            shares = np.eye(num_clients)[rng.integers(num_clients)]
        cuts = np.round(np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
        for client, chunk in enumerate(np.split(members, cuts)):
            owner[chunk] = client
    _top_up(owner, num_clients, min_size, rng)
    return _groups(owner, num_clients)


def partition_shards(
    labels: np.ndarray, num_clients: int, shards_per_client: int, rng: np.random.Generator,
    *, min_size: int = 1,
) -> list[np.ndarray]:
    """McMahan et al. 2017, §3: sort by label, cut into equal shards, deal `shards_per_client` to each client."""
    num_shards = num_clients * shards_per_client
    if num_shards > len(labels):
        raise ValueError(
            f"partition.shards_per_client={shards_per_client} x federation.num_clients={num_clients} = "
            f"{num_shards} shards, more than the {len(labels)} training samples "
            f"(use shards_per_client <= {max(1, len(labels) // num_clients)})"
        )
    if (len(labels) // num_shards) * shards_per_client < min_size:
        raise ValueError(
            f"partition.min_size={min_size} cannot be met: shards of {len(labels) // num_shards} samples x "
            f"{shards_per_client} per client (lower min_size or raise shards_per_client)"
        )
    # Random order inside each label, so which samples of a class share a shard is random too.
    order = np.lexsort((rng.random(len(labels)), labels))
    shards = np.array_split(order, num_shards)
    dealt = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([shards[s] for s in row])) for row in dealt]


def partition_natural(clients: Sequence[np.ndarray], num_samples: int, min_size: int) -> list[np.ndarray]:
    """The dataset's own clients, checked to cover every sample once and to meet `min_size`."""
    parts = [np.sort(np.asarray(c, dtype=np.int64)) for c in clients]
    sizes = [len(p) for p in parts]
    if min(sizes) < min_size:
        raise ValueError(f"partition.min_size={min_size} cannot be met by the natural clients, the "
                         f"smallest holds {min(sizes)} samples (lower min_size)")
    joined = np.concatenate(parts)
    if len(joined) != num_samples or not np.array_equal(np.sort(joined), np.arange(num_samples)):
        raise ValueError("the dataset's natural clients do not cover every training sample exactly once")
    return parts


def count_matrix(labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Client x class sample counts."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])


def label_skew(counts: np.ndarray) -> np.ndarray:
    """Each client's total-variation distance from the global label distribution (0 = IID, 1 = disjoint)."""
    counts = np.asarray(counts, dtype=np.float64)
    local = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    overall = counts.sum(axis=0) / counts.sum()
    return 0.5 * np.abs(local - overall).sum(axis=1)


def summarize(labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int) -> dict[str, float]:
    """A few numbers that describe a partition, ready to log."""
    counts = count_matrix(labels, parts, num_classes)
    sizes = counts.sum(axis=1)
    skew = label_skew(counts)
    return {
        "num_clients": float(len(parts)),
        "size_min": float(sizes.min()),
        "size_mean": float(sizes.mean()),
        "size_max": float(sizes.max()),
        "classes_per_client_mean": float((counts > 0).sum(axis=1).mean()),
        "label_tv_mean": float(skew.mean()),
        "label_tv_max": float(skew.max()),
    }


def _top_up(owner: np.ndarray, num_clients: int, min_size: int, rng: np.random.Generator) -> None:
    sizes = np.bincount(owner, minlength=num_clients)
    for client in np.flatnonzero(sizes < min_size):
        for _ in range(min_size - sizes[client]):
            donor = int(np.argmax(sizes))
            candidates = np.flatnonzero(owner == donor)
            owner[candidates[rng.integers(len(candidates))]] = client
            sizes[donor] -= 1
            sizes[client] += 1


def _groups(owner: np.ndarray, num_clients: int) -> list[np.ndarray]:
    order = np.argsort(owner, kind="stable")
    return np.split(order, np.cumsum(np.bincount(owner, minlength=num_clients))[:-1])

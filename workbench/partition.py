"""Pure functions from labels (and a random generator) to one index array per client, and their statistics."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from workbench.config import TASKS, PartitionConfig

#: Schemes whose labels are IID and whose clients differ by their inputs (`apply_feature_skew`).
FEATURE_SKEWS = ("feature_noise", "rotation")

#: The `partition.*` knobs each scheme reads, besides `min_size` (which every scheme honours or checks).
SCHEME_KNOBS = {
    "auto": (), "iid": (), "natural": (), "dirichlet": ("alpha",), "shards": ("shards_per_client",),
    "classes_per_client": ("classes_per_client",),
    "quantity": ("quantity_distribution", "quantity_alpha", "quantity_sigma"),
    "feature_noise": ("noise_sigma",), "rotation": ("max_rotation",),
    "mixture": ("iid_fraction", "mixture_skew"),
}

#: Schemes that need class labels, refused for a continuous target (`check_task`): what each does with them.
CLASS_SCHEMES = {"shards": "deals out shards of label-sorted samples",
                 "classes_per_client": "gives every client exactly k classes"}


def knobs_in_use(config: PartitionConfig, task: str = "classification") -> set[str]:
    """The `partition.*` keys that change the partition for `config.scheme` on data of `task` (others are
    ignored): `target_bins` only where a Dirichlet label skew meets a continuous target."""
    names = {"min_size", *SCHEME_KNOBS[config.scheme]}
    if config.scheme == "mixture":
        names |= set(SCHEME_KNOBS[config.mixture_skew])
    if "quantity_distribution" in names:
        names.discard("quantity_sigma" if config.quantity_distribution == "dirichlet" else "quantity_alpha")
    if task == "regression" and "alpha" in names:
        names.add("target_bins")
    return {f"partition.{name}" for name in names}


def check_task(config: PartitionConfig, task: str) -> None:
    """Raise if `config` cannot split data of `task`: the schemes that need classes (`CLASS_SCHEMES`, also as
    a mixture's skew) on a continuous target, whose label skew is a Dirichlet over target bins instead."""
    if _checked_task(task) != "regression":
        return
    key, scheme = (("mixture_skew", config.mixture_skew) if config.scheme == "mixture"
                   else ("scheme", config.scheme))
    if scheme in CLASS_SCHEMES:
        raise ValueError(
            f"partition.{key}={scheme!r} {CLASS_SCHEMES[scheme]}, but this dataset's target is continuous "
            f"(task=regression), so it has no classes (use partition.{key}=dirichlet, a label skew over "
            f"partition.target_bins={config.target_bins} quantile bins of the target, or partition.{key}="
            "quantity for unequal client sizes with IID targets)"
        )


def partition(
    labels: np.ndarray,
    num_clients: int,
    config: PartitionConfig,
    rng: np.random.Generator,
    natural: Sequence[np.ndarray] | None = None,
    *,
    task: str = "classification",
) -> list[np.ndarray]:
    """Split sample indices `0..len(labels)-1` among `num_clients` by `config.scheme`.

    Every sample goes to exactly one client, each client's indices are sorted, and the result depends
    only on the inputs and the state of `rng`. Infeasible settings raise `ValueError` naming the field.
    `task` is the dataset's (`Dataset.task`): for a regression, `labels` are the continuous targets, a
    Dirichlet label skew splits their `config.target_bins` quantile bins (`target_bins`, over all of
    `labels`, also under a mixture) as it splits classes, and the schemes that need classes are refused.
    """
    labels = np.asarray(labels)
    config = config.resolved(has_natural_clients=natural is not None)  # auto: natural where there are clients
    check_task(config, task)
    if config.scheme in ("dirichlet", "mixture", *CLASS_SCHEMES):
        if task == "regression":
            labels = target_bins(labels, config.target_bins)
        elif labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels)):
            raise ValueError(
                f"partition.scheme={config.scheme!r} splits classes, but the labels are not whole numbers, so "
                "they are no class labels (for a continuous target pass task='regression', the dataset's "
                "Dataset.task)"
            )
    if config.scheme == "natural":
        if natural is None:
            raise ValueError(
                "partition.scheme='natural' needs a dataset with real clients, and this one has none "
                "(use data.name=synthetic or synthetic_iid, or choose partition.scheme=iid/dirichlet/shards)"
            )
        return partition_natural(natural, len(labels), config.min_size)
    check_feasible(len(labels), num_clients, config.min_size)
    if config.scheme in ("iid", *FEATURE_SKEWS):
        return partition_iid(len(labels), num_clients, rng)
    if config.scheme == "mixture":
        return partition_mixture(labels, num_clients, config, rng)
    return _partition_skewed(labels, num_clients, config, config.scheme, rng)


def _partition_skewed(labels: np.ndarray, num_clients: int, config: PartitionConfig, scheme: str,
                      rng: np.random.Generator) -> list[np.ndarray]:
    if scheme == "dirichlet":
        return partition_dirichlet(labels, num_clients, config.alpha, rng, min_size=config.min_size)
    if scheme == "shards":
        return partition_shards(labels, num_clients, config.shards_per_client, rng, min_size=config.min_size)
    if scheme == "classes_per_client":
        return partition_classes_per_client(labels, num_clients, config.classes_per_client, rng,
                                            min_size=config.min_size)
    if scheme == "quantity":
        return partition_quantity(len(labels), num_clients, rng, distribution=config.quantity_distribution,
                                  alpha=config.quantity_alpha, sigma=config.quantity_sigma,
                                  min_size=config.min_size)
    raise ValueError(f"partition.scheme {scheme!r} is unknown")


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
    owner = np.empty(num_samples, dtype=np.int64)
    owner[rng.permutation(num_samples)] = np.repeat(np.arange(num_clients), _even_sizes(num_samples, num_clients))
    return _groups(owner, num_clients)


def partition_dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator, *, min_size: int = 1,
) -> list[np.ndarray]:
    """Label skew: each class is split among clients by proportions ~ Dir(alpha) (Hsu et al. 2019, §3).

    Unlike the usual resample-until-big-enough loop (which never ends for small alpha or many clients),
    clients below `min_size` are topped up from the clients with the most to spare: one vectorized,
    bounded repair that moves exactly the missing number of samples.
    """
    labels = np.asarray(labels)
    codes, class_sizes = _class_codes(labels)
    # numpy (>= 1.25) draws tiny alphas by stick-breaking, so every row is finite and sums to 1 even
    # where all gamma draws would underflow (alpha = 1e-300 gives one client per class, the limit)
    shares = rng.dirichlet(np.full(num_clients, alpha), size=len(class_sizes))
    cuts = np.rint(np.cumsum(shares, axis=1) * class_sizes[:, None]).astype(np.int64)
    cuts[:, -1] = class_sizes
    counts = np.diff(cuts, axis=1, prepend=0)
    owner = _owners_from_counts(counts, codes, rng)
    owner = _repair_min_size(owner, num_clients, min_size, rng)
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
    base, num_bigger = divmod(len(labels), num_shards)  # num_bigger shards of base + 1 samples, the rest base
    # the unluckiest client gets as many of the small shards as there are
    smallest = shards_per_client * base + max(0, shards_per_client - (num_shards - num_bigger))
    if smallest < min_size:
        sizes = f"{base} or {base + 1}" if num_bigger else f"{base}"
        raise ValueError(
            f"partition.min_size={min_size} cannot be met: {shards_per_client} shards of {sizes} samples per "
            f"client can give a client {smallest} (lower min_size or raise shards_per_client)"
        )
    codes, _ = _class_codes(np.asarray(labels))
    # Random order inside each label, so which samples of a class share a shard is random too.
    order = _class_sorted_order(codes, rng)
    shard_sizes = np.full(num_shards, base)
    shard_sizes[:num_bigger] += 1
    client_of_shard = np.empty(num_shards, dtype=np.int64)
    client_of_shard[rng.permutation(num_shards)] = np.repeat(np.arange(num_clients), shards_per_client)
    owner = np.empty(len(labels), dtype=np.int64)
    owner[order] = np.repeat(client_of_shard, shard_sizes)
    return _groups(owner, num_clients)


def partition_classes_per_client(
    labels: np.ndarray, num_clients: int, k: int, rng: np.random.Generator, *, min_size: int = 1,
) -> list[np.ndarray]:
    """#C=k of NIID-Bench (Li et al. 2022, §4.1): each client holds exactly `k` distinct classes, and each
    class is split evenly among the clients that hold it.

    NIID-Bench gives client i class i mod K plus k-1 random others, which covers every class only when
    there are at least K clients; here the first K class slots (client-major) take the K classes in a
    random order and every other slot is a random class the client does not hold yet, so every class is
    covered whenever num_clients * k >= K.
    """
    codes, class_sizes = _class_codes(np.asarray(labels))
    num_classes = len(class_sizes)
    if k > num_classes:
        raise ValueError(f"partition.classes_per_client={k} is more than the {num_classes} classes in the "
                         f"training labels (use classes_per_client <= {num_classes})")
    if num_clients * k < num_classes:
        raise ValueError(
            f"partition.classes_per_client={k} x federation.num_clients={num_clients} = {num_clients * k} "
            f"class slots cannot hold all {num_classes} classes, so some samples would have no client "
            f"(use classes_per_client >= {math.ceil(num_classes / num_clients)} or at least "
            f"{math.ceil(num_classes / k)} clients)"
        )
    keys = rng.random((num_clients, num_classes))
    slots = (np.arange(num_clients)[:, None] * k + np.arange(k)[None, :])
    forced = slots < num_classes
    keys[np.nonzero(forced)[0], rng.permutation(num_classes)[slots[forced]]] = -1.0
    chosen = np.argpartition(keys, k - 1, axis=1)[:, :k]
    holds = np.zeros((num_classes, num_clients), dtype=bool)
    holds[chosen, np.arange(num_clients)[:, None]] = True
    holders = holds.sum(axis=1)
    short = np.flatnonzero(class_sizes < holders)
    if len(short):
        c = short[0]
        raise ValueError(
            f"partition.classes_per_client={k} with federation.num_clients={num_clients}: class {c} has "
            f"{class_sizes[c]} samples but {holders[c]} clients hold it, so some would get none of it "
            f"(use fewer clients or a smaller classes_per_client)"
        )
    # Which holders of a class get the one extra sample of an uneven split is random.
    column_order = rng.permutation(num_clients)
    rank = np.empty_like(holds, dtype=np.int64)
    rank[:, column_order] = np.cumsum(holds[:, column_order], axis=1) - 1
    base, extra = np.divmod(class_sizes, np.maximum(holders, 1))
    counts = np.where(holds, base[:, None] + (rank < extra[:, None]), 0)
    sizes = counts.sum(axis=0)
    if sizes.min() < min_size:
        raise ValueError(
            f"partition.min_size={min_size} cannot be met with partition.classes_per_client={k}: the smallest "
            f"of {num_clients} clients gets {sizes.min()} samples (lower min_size, raise classes_per_client "
            f"or use fewer clients)"
        )
    owner = _owners_from_counts(counts, codes, rng)
    return _groups(owner, num_clients)


def partition_quantity(
    num_samples: int, num_clients: int, rng: np.random.Generator, *, distribution: str = "dirichlet",
    alpha: float = 0.5, sigma: float = 1.0, min_size: int = 1,
) -> list[np.ndarray]:
    """Quantity skew with IID labels: client sizes from Dir(alpha) proportions (NIID-Bench, Li et al. 2022)
    or log-normal(0, sigma) weights (as LEAF's device sizes), each client first given `min_size` samples.

    NIID-Bench resamples until every client has enough; giving `min_size` first and sharing out the rest
    by the drawn proportions (largest remainder) needs no loop and always succeeds.
    """
    check_feasible(num_samples, num_clients, min_size)
    if distribution == "dirichlet":
        weights = rng.dirichlet(np.full(num_clients, alpha))  # finite and summing to 1 for any alpha > 0
    elif distribution == "lognormal":
        weights = rng.lognormal(0.0, sigma, num_clients)
    else:
        raise ValueError(f"partition.quantity_distribution {distribution!r} is unknown "
                         "(choose dirichlet or lognormal)")
    sizes = min_size + _largest_remainder(weights / weights.sum(), num_samples - num_clients * min_size)
    owner = np.empty(num_samples, dtype=np.int64)
    owner[rng.permutation(num_samples)] = np.repeat(np.arange(num_clients), sizes)
    return _groups(owner, num_clients)


def partition_mixture(labels: np.ndarray, num_clients: int, config: PartitionConfig,
                      rng: np.random.Generator) -> list[np.ndarray]:
    """The first round(iid_fraction * num_clients) clients get IID data, the others are split by
    `config.mixture_skew`; each group gets a share of the samples proportional to its number of clients."""
    labels = np.asarray(labels)
    num_samples, min_size = len(labels), config.min_size
    num_iid = int(round(config.iid_fraction * num_clients))
    if num_iid == 0:
        return _partition_skewed(labels, num_clients, config, config.mixture_skew, rng)
    if num_iid == num_clients:
        return partition_iid(num_samples, num_clients, rng)
    num_skewed = num_clients - num_iid
    # Each group gets at least min_size per client: num_samples >= num_clients * min_size (check_feasible),
    # so num_samples * num_iid / num_clients >= num_iid * min_size and its rest >= num_skewed * min_size;
    # rounding to the nearest integer cannot cross either bound, which are integers.
    iid_samples = int(round(num_samples * num_iid / num_clients))
    order = rng.permutation(num_samples)
    rest = np.sort(order[iid_samples:])
    try:
        skewed = _partition_skewed(labels[rest], num_skewed, config, config.mixture_skew, rng)
    except ValueError as err:
        raise ValueError(
            f"partition.scheme='mixture' with partition.iid_fraction={config.iid_fraction} leaves "
            f"{num_skewed} {config.mixture_skew} clients on {len(rest)} samples, and: {err}"
        ) from err
    owner = np.empty(num_samples, dtype=np.int64)
    owner[order[:iid_samples]] = np.repeat(np.arange(num_iid), _even_sizes(iid_samples, num_iid))
    owner[rest[np.concatenate(skewed)]] = num_iid + np.repeat(np.arange(num_skewed), [len(p) for p in skewed])
    return _groups(owner, num_clients)


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


# ----- continuous targets -----


def target_bin_edges(targets: np.ndarray, num_bins: int) -> np.ndarray:
    """The `num_bins - 1` inner edges of `num_bins` quantile bins of `targets`: e_b is numpy's inverted-CDF
    quantile `np.quantile(targets, b / num_bins, method="inverted_cdf")`, the sorted target of rank
    ceil(b n / num_bins) - 1, computed here in integers (b / num_bins in floating point can round up and
    move an edge by one rank)."""
    targets = _finite_targets(targets)
    if isinstance(num_bins, bool) or not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
        raise ValueError(f"partition.target_bins must be a whole number >= 1, got {num_bins!r} "
                         "(10 = deciles; more bins = finer skew with fewer samples per bin)")
    if len(targets) == 0:
        raise ValueError("target bins need at least one target, got none")
    ranks = -(-np.arange(1, num_bins, dtype=np.int64) * len(targets) // num_bins) - 1  # ceil(b n / B) - 1
    return np.sort(targets)[ranks]


def target_bins(targets: np.ndarray, num_bins: int, reference: np.ndarray | None = None) -> np.ndarray:
    """Continuous targets as class codes 0..num_bins-1: the quantile bin of each, with the edges of
    `reference` (the training targets; default `targets` itself, `target_bin_edges`).

    Bin b holds the targets in (e_b, e_{b+1}], right edge included; bin 0 everything up to e_1 and the last
    bin everything above e_{B-1}, so targets outside the reference's range (test targets) fall in the end
    bins. On distinct targets the bins of the reference differ in size by at most one. Equal targets always
    share a bin (a tie at an edge goes to the lower one), so under heavy ties some bins hold more and some
    none. Every scheme that needs classes uses these codes for a regression: the Dirichlet label skew
    (Hsu et al. 2019) over target bins, the clients' test split, the statistics' counts and heatmap.
    """
    targets = _finite_targets(targets)
    edges = target_bin_edges(targets if reference is None else reference, num_bins)
    return np.searchsorted(edges, targets, side="left").astype(np.int64)


def _checked_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r} (the dataset's Dataset.task)")
    return task


def _finite_targets(targets: np.ndarray) -> np.ndarray:
    targets = np.asarray(targets, dtype=np.float64).reshape(-1)
    bad = ~np.isfinite(targets)
    if bad.any():
        raise ValueError(f"regression targets must be finite numbers, but {int(bad.sum())} of {len(targets)} are "
                         f"NaN or infinite (the first at index {int(np.argmax(bad))}); drop or impute them "
                         "before registering the data")
    return targets


# ----- each client's test data -----


def partition_test_by_labels(train_labels: np.ndarray, clients: Sequence[np.ndarray], test_labels: np.ndarray,
                             rng: np.random.Generator, *, task: str = "classification",
                             num_bins: int = PartitionConfig.target_bins) -> list[np.ndarray]:
    """Each client's test samples, drawn from the held-out pool so that they follow the client's own
    training labels: one index array into `test_labels` per client, sorted. For a regression (`task`), the
    labels are the `num_bins` target bins (`target_bins`, with the training targets' edges for both sets).

    Every class's test samples (in random order) are dealt out to the clients in proportion to the
    clients' training samples of that class (largest remainder, ties broken at random). A client thus gets
    about its training size times the dataset's test:train ratio, with its own label distribution (exactly
    so when the test set has the training set's class proportions, as the stratified splits here do), and
    no test sample goes to two clients. The one exception: a client whose shares all round to zero (fewer
    training samples than about train:test) gets one test sample of its most frequent class that another
    client also holds, rather than no test set. A client none of whose classes occur in the test set gets
    an empty array (no per-client metric can be defined for it).
    """
    if _checked_task(task) == "regression":
        train_labels, test_labels = (target_bins(train_labels, num_bins),
                                     target_bins(test_labels, num_bins, reference=train_labels))
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    num_clients = len(clients)
    if num_clients == 0:
        return []
    num_classes = int(max(train_labels.max(initial=-1), test_labels.max(initial=-1))) + 1
    train_counts = count_matrix(train_labels, clients, num_classes)          # clients x classes
    class_train = train_counts.sum(axis=0)
    class_test = np.bincount(test_labels, minlength=num_classes)
    held = class_train > 0
    # class c's share for client k is class_test[c] * train_counts[k, c] / class_train[c]: in integers,
    # so that the whole parts and the remainders are exact
    numerator = class_test[:, None].astype(np.int64) * train_counts.T
    denominator = np.maximum(class_train, 1)[:, None]
    counts = np.where(held[:, None], numerator // denominator, 0)
    remainder = np.where(held[:, None], numerator % denominator, 0)
    # largest remainder per class: the `left` largest remainders get one more, random among equal ones
    left = np.where(held, class_test, 0) - counts.sum(axis=1)
    order = np.lexsort((rng.random(counts.shape), -remainder), axis=1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(num_clients)[None, :].repeat(num_classes, 0), axis=1)
    counts += rank < left[:, None]
    owner = np.full(len(test_labels), -1, dtype=np.int64)
    by_class = _class_sorted_order(test_labels.astype(np.int64), rng)   # test samples, class by class
    starts = np.concatenate([[0], np.cumsum(class_test)[:-1]])
    for c in np.flatnonzero(held & (class_test > 0)):
        members = by_class[starts[c]:starts[c] + class_test[c]]
        owner[members] = np.repeat(np.arange(num_clients), counts[c])
    parts = _groups_with_unowned(owner, num_clients)
    for k in np.flatnonzero([len(p) == 0 for p in parts]):
        available = train_counts[k] * (class_test > 0)
        if available.max() > 0:  # the top-up: one sample of its most frequent class present in the test set
            c = int(np.argmax(available))
            parts[k] = np.array([int(rng.choice(np.flatnonzero(test_labels == c)))], dtype=np.int64)
    return parts


def _groups_with_unowned(owner: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """`_groups` for an owner array in which -1 marks samples no client holds."""
    kept = np.flatnonzero(owner >= 0)
    return [kept[p] for p in _groups(owner[kept], num_clients)]


# ----- feature skew -----


def check_feature_skew(scheme: str, input_shape: Sequence[int], dataset: str = "this dataset") -> None:
    """Raise if `scheme` cannot transform inputs of `input_shape` (one sample's shape)."""
    if scheme == "rotation" and len(input_shape) != 3:
        raise ValueError(
            f"partition.scheme='rotation' rotates images of shape (channels, height, width), but {dataset} "
            f"has inputs of shape {tuple(input_shape)} (use partition.scheme=feature_noise for vector data, "
            "or an image dataset: data.name=digits, fashion_mnist, mnist or cifar10)"
        )


def apply_feature_skew(x: torch.Tensor, clients: Sequence[np.ndarray], config: PartitionConfig,
                       rng: np.random.Generator) -> torch.Tensor:
    """The inputs as client i of N sees them: a new tensor, `x` is left unchanged.

    feature_noise: x + N(0, (noise_sigma * i / N)^2), NIID-Bench's noise-based feature skew (Li et al.
    2022, §4.2). rotation: images rotated by max_rotation * i / N degrees about their centre (bilinear,
    zero fill), as in rotated-MNIST domain shifts. Other schemes return `x` itself.
    """
    if config.scheme not in FEATURE_SKEWS:
        return x
    check_feature_skew(config.scheme, tuple(x.shape[1:]))
    level = torch.as_tensor(owner_of(clients, len(x)) / len(clients), dtype=x.dtype, device=x.device)
    if config.scheme == "feature_noise":
        # torch's normal sampler, seeded from `rng`: twice as fast as numpy's for image-sized inputs.
        generator = torch.Generator().manual_seed(int(rng.integers(2**63)))
        noise = torch.randn(tuple(x.shape), generator=generator, dtype=torch.float32).to(x.device, x.dtype)
        return x + (config.noise_sigma * level).view(-1, *[1] * (x.ndim - 1)) * noise
    return rotate_images(x, config.max_rotation * level)


def skew_preview(sample: torch.Tensor, num_clients: int, config: PartitionConfig, rng: np.random.Generator,
                 num_shown: int = 6) -> tuple[np.ndarray, torch.Tensor]:
    """One input (`sample`, without a batch dimension) as a few clients spread over 0..N-1 see it under
    `config`'s feature skew: the clients shown and a stack of their views."""
    shown = np.unique(np.linspace(0, num_clients - 1, min(num_shown, num_clients)).astype(np.int64))
    single = [np.zeros(0, dtype=np.int64)] * num_clients
    for position, client in enumerate(shown):
        single[client] = np.array([position])
    return shown, apply_feature_skew(sample.unsqueeze(0).repeat(len(shown), *[1] * sample.ndim), single,
                                     config, rng)


def rotate_images(images: torch.Tensor, degrees: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Each image (N, C, H, W) rotated counter-clockwise by its own angle about its centre; a new tensor."""
    out = images.clone()
    moved = torch.nonzero(degrees != 0).flatten()
    for start in range(0, len(moved), chunk):
        rows = moved[start:start + chunk]
        theta = torch.deg2rad(degrees[rows].to(torch.float32))
        cos, sin = torch.cos(theta), torch.sin(theta)
        zero = torch.zeros_like(cos)
        affine = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        batch = images[rows].to(torch.float32)
        grid = F.affine_grid(affine.to(batch.device), list(batch.shape), align_corners=False)
        out[rows] = F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros",
                                  align_corners=False).to(images.dtype)
    return out


# ----- statistics -----

#: What each number of `PartitionStats.summary()` means, for tables and tooltips.
STAT_DESCRIPTIONS = {
    "num_clients": "clients",
    "num_samples": "training samples",
    "size_min": "smallest client",
    "size_mean": "mean client size",
    "size_max": "largest client",
    "size_std": "standard deviation of client sizes",
    "size_gini": "Gini coefficient of client sizes (0 = equal, -> 1 = one client holds all)",
    "classes_per_client_mean": "classes present per client, mean",
    "classes_missing_mean": "classes absent from a client, mean",
    "effective_classes_mean": "effective number of classes per client, exp(entropy), mean",
    "effective_classes_min": "effective number of classes per client, exp(entropy), smallest",
    "label_tv_mean": "total variation from the global label distribution, mean (0 = IID, 1 = disjoint)",
    "label_tv_max": "total variation from the global label distribution, max",
    "label_js_mean": "Jensen-Shannon divergence from the global label distribution (bits), mean",
    "label_js_max": "Jensen-Shannon divergence from the global label distribution (bits), max",
    "target_w1_mean": "Wasserstein-1 distance of a client's targets from all clients' (target units), mean "
                      "(0 = same distribution)",
    "target_w1_max": "Wasserstein-1 distance of a client's targets from all clients' (target units), max",
}


@dataclass(frozen=True)
class PartitionStats:
    """Per-client heterogeneity of a partition; `summary()` reduces it to numbers that can be logged.

    No earth mover's distance: over class labels, which have no order, Zhao et al. (2018) use a unit
    ground distance, and with it EMD is the L1 distance between the label distributions, exactly 2 x the
    total variation reported here; a second name for the same number would only suggest a second measure.

    For a continuous target (a regression) the ordered values do have a ground distance: `target_w1` holds
    each client's Wasserstein-1 distance from all clients' targets (`target_wasserstein`), and the summary
    gives it (mean, max) beside the sizes; the per-bin arrays are over the target bins (`target_bins`).
    """

    counts: np.ndarray              #: client x class sample counts (regression: client x target bin)
    sizes: np.ndarray               #: samples per client
    tv: np.ndarray                  #: total variation distance from the global label distribution
    js: np.ndarray                  #: Jensen-Shannon divergence (base 2) from the global label distribution
    effective_classes: np.ndarray   #: exp(Shannon entropy) of each client's label distribution
    missing_classes: np.ndarray     #: globally present classes a client has no sample of
    #: regression only: each client's Wasserstein-1 distance from all clients' targets (NaN for an empty client)
    target_w1: np.ndarray | None = None
    #: regression only: the inner edges of the target bins that `counts` counts over (`target_bin_edges`)
    bin_edges: np.ndarray | None = None

    @property
    def is_regression(self) -> bool:
        return self.target_w1 is not None

    @property
    def row_label(self) -> str:
        """What a row of `counts.T` is, for figures: "class", or "target bin" for a regression."""
        return "target bin" if self.is_regression else "class"

    def column_names(self) -> list[str]:
        """The names of the columns of `counts`, for tables: class_0, ... or target_bin_0, ... (low to high)."""
        prefix = "target_bin" if self.is_regression else "class"
        return [f"{prefix}_{c}" for c in range(self.counts.shape[1])]

    def summary(self) -> dict[str, float]:
        sizes = {
            "num_clients": float(len(self.sizes)),
            "num_samples": float(self.sizes.sum()),
            "size_min": float(self.sizes.min()),
            "size_mean": float(self.sizes.mean()),
            "size_max": float(self.sizes.max()),
            "size_std": float(self.sizes.std()),
            "size_gini": gini(self.sizes),
        }
        if self.target_w1 is not None:
            defined = self.target_w1[np.isfinite(self.target_w1)]  # an empty client has no distribution
            return {**sizes,
                    "target_w1_mean": float(defined.mean()) if len(defined) else math.nan,
                    "target_w1_max": float(defined.max()) if len(defined) else math.nan}
        present = (self.counts > 0).sum(axis=1)
        return {
            **sizes,
            "classes_per_client_mean": float(present.mean()),
            "classes_missing_mean": float(self.missing_classes.mean()),
            "effective_classes_mean": float(self.effective_classes.mean()),
            "effective_classes_min": float(self.effective_classes.min()),
            "label_tv_mean": float(self.tv.mean()),
            "label_tv_max": float(self.tv.max()),
            "label_js_mean": float(self.js.mean()),
            "label_js_max": float(self.js.max()),
        }


def describe(labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int, *,
             task: str = "classification", num_bins: int = PartitionConfig.target_bins) -> PartitionStats:
    """Every heterogeneity measure of a partition, per client. For a regression (`task`; `num_classes` is
    then unused, 0 for a `Dataset`), `labels` are the continuous targets: counts over `num_bins` target bins
    (`target_bins`, the partition's `partition.target_bins`) and each client's Wasserstein-1 distance."""
    if _checked_task(task) == "regression":
        targets = _finite_targets(labels)
        stats = stats_from_counts(count_matrix(target_bins(targets, num_bins), parts, num_bins))
        return dataclasses.replace(stats, target_w1=target_wasserstein(targets, parts),
                                   bin_edges=target_bin_edges(targets, num_bins))
    return stats_from_counts(count_matrix(labels, parts, num_classes))


def stats_from_counts(counts: np.ndarray) -> PartitionStats:
    counts = np.asarray(counts)
    sizes = counts.sum(axis=1)
    local = counts / np.maximum(sizes, 1)[:, None]
    overall = counts.sum(axis=0) / max(counts.sum(), 1)
    tv = 0.5 * np.abs(local - overall).sum(axis=1)
    middle = 0.5 * (local + overall)
    js = 0.5 * _kl_bits(local, middle) + 0.5 * _kl_bits(overall[None, :], middle)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(local > 0, local * np.log(local), 0.0).sum(axis=1)
    missing = ((counts == 0) & (overall > 0)[None, :]).sum(axis=1)
    return PartitionStats(counts, sizes, tv, np.clip(js, 0.0, 1.0), np.exp(entropy), missing)


def summarize(labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int, *,
              task: str = "classification", num_bins: int = PartitionConfig.target_bins) -> dict[str, float]:
    """A few numbers that describe a partition, ready to log (`describe`: the same arguments)."""
    return describe(labels, parts, num_classes, task=task, num_bins=num_bins).summary()


def target_wasserstein(targets: np.ndarray, parts: Sequence[np.ndarray]) -> np.ndarray:
    """Each client's Wasserstein-1 distance between the empirical distribution of its targets and that of
    all clients' targets together (the training set, for a partition); NaN for a client with none.

    Exact, in one dimension: W1 = integral of |F_client(t) - F_all(t)| dt (Vallender 1973, "Calculation of
    the Wasserstein distance between probability distributions on the line"), a sum over the gaps between
    consecutive sorted targets, where both CDFs are constant: a client's targets are among all clients', so
    there are no other breakpoints.
    """
    targets = _finite_targets(targets)
    pieces = [np.asarray(p, dtype=np.int64) for p in parts]
    sizes = np.array([len(p) for p in pieces], dtype=np.int64)
    distances = np.full(len(pieces), math.nan)
    total = int(sizes.sum())
    if total == 0:
        return distances
    pooled = targets[np.concatenate(pieces)]
    owner = np.repeat(np.arange(len(pieces)), sizes)
    order = np.argsort(pooled, kind="stable")
    gaps = np.diff(pooled[order])  # gap g lies between sorted targets g and g + 1, where F_all = (g + 1) / total
    # Between its j-th and (j+1)-th target (sorted positions p_j < p_{j+1}) client k's CDF is j / n_k, and
    # |j / n_k - (g + 1) / total| changes sign once on that run of gaps, at g = floor(j total / n_k): each
    # run is two differences of the prefix sums of gap and (g + 1) / total * gap. O(n log n) for all clients
    # at once, where one CDF per client over all n targets costs O(n) per client.
    width = np.concatenate([[0.0], np.cumsum(gaps)])
    moment = np.concatenate([[0.0], np.cumsum(np.arange(1, total) / total * gaps)])
    position = np.empty(total, dtype=np.int64)
    position[order] = np.arange(total)
    by_client = np.lexsort((position, owner))
    client, start = owner[by_client], position[by_client]  # each client's sorted positions, client by client
    first = np.cumsum(sizes) - sizes
    is_last = np.r_[client[1:] != client[:-1], True]
    end = np.where(is_last, total - 1, np.r_[start[1:], 0])  # the next target of the same client, or the end
    present = np.flatnonzero(sizes)
    # the runs j = 1..n_k start at the client's targets; the run j = 0 goes from position 0 to its first
    run_client = np.concatenate([client, present])
    rank = np.concatenate([np.arange(total) - first[client] + 1, np.zeros(len(present), np.int64)])
    run_start = np.concatenate([start, np.zeros(len(present), np.int64)])
    run_end = np.concatenate([end, start[first[present]]])
    share = rank / sizes[run_client]
    middle = np.clip(rank * total // sizes[run_client], run_start, run_end)
    below = share * (width[middle] - width[run_start]) - (moment[middle] - moment[run_start])
    above = (moment[run_end] - moment[middle]) - share * (width[run_end] - width[middle])
    distances[present] = np.bincount(run_client, weights=below + above, minlength=len(pieces))[present]
    return distances


def count_matrix(labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Client x class sample counts."""
    labels = np.asarray(labels)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1} for num_classes={num_classes}, got "
                         f"{labels.min()}..{labels.max()}")
    sizes = np.array([len(p) for p in parts], dtype=np.int64)
    joined = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]) if len(parts) else np.zeros(0, int)
    cells = np.repeat(np.arange(len(parts)), sizes) * num_classes + labels[joined].astype(np.int64)
    return np.bincount(cells, minlength=len(parts) * num_classes).reshape(len(parts), num_classes)


def label_skew(counts: np.ndarray) -> np.ndarray:
    """Each client's total-variation distance from the global label distribution (0 = IID, 1 = disjoint)."""
    return stats_from_counts(counts).tv


def gini(values: np.ndarray) -> float:
    """Gini coefficient of non-negative values: 0 when all equal, (n-1)/n when one holds everything."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    if len(x) == 0 or x.sum() == 0:
        return 0.0
    ranks = np.arange(1, len(x) + 1)
    return float(2.0 * np.dot(ranks, x) / (len(x) * x.sum()) - (len(x) + 1) / len(x))


def partition_hash(parts: Sequence[np.ndarray]) -> str:
    """A SHA-256 of the client index arrays (in order), the same on every machine: equal hash, equal partition."""
    digest = hashlib.sha256()
    sizes = np.array([len(p) for p in parts], dtype="<i8")
    digest.update(np.array([len(parts)], dtype="<i8").tobytes())
    digest.update(sizes.tobytes())
    for part in parts:
        digest.update(np.asarray(part).astype("<i8", copy=False).tobytes())
    return digest.hexdigest()


def owner_of(parts: Sequence[np.ndarray], num_samples: int) -> np.ndarray:
    """The client of every sample (-1 for a sample no client holds)."""
    owner = np.full(num_samples, -1, dtype=np.int64)
    sizes = [len(p) for p in parts]
    if sum(sizes):
        owner[np.concatenate(parts)] = np.repeat(np.arange(len(parts)), sizes)
    return owner


# ----- helpers -----


def _kl_bits(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p > 0, p * np.log2(p / q), 0.0).sum(axis=1)


def _class_codes(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels as 0..K-1 codes of the classes present (narrow ints sort by radix), and each class's size."""
    classes, codes = np.unique(labels, return_inverse=True)
    dtype = np.uint16 if len(classes) <= np.iinfo(np.uint16).max else np.int64
    return codes.reshape(-1).astype(dtype), np.bincount(codes.reshape(-1), minlength=len(classes))


def _class_sorted_order(codes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sample indices grouped by class, in random order inside each class."""
    shuffled = rng.permutation(len(codes))
    return shuffled[np.argsort(codes[shuffled], kind="stable")]


def _owners_from_counts(counts: np.ndarray, codes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Give client j `counts[c, j]` random samples of class c, for every class c at once."""
    num_classes, num_clients = counts.shape
    owner = np.empty(len(codes), dtype=np.int64)
    owner[_class_sorted_order(codes, rng)] = np.repeat(np.tile(np.arange(num_clients), num_classes),
                                                       counts.ravel())
    return owner


def _repair_min_size(owner: np.ndarray, num_clients: int, min_size: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Move exactly the missing samples to clients below `min_size`, taken from the clients with the most
    to spare (water-filling from the top), random samples of each donor; a new owner array."""
    sizes = np.bincount(owner, minlength=num_clients)
    deficit = np.maximum(min_size - sizes, 0)
    needed = int(deficit.sum())
    if needed == 0:
        return owner
    spare = np.maximum(sizes - min_size, 0)  # sum(spare) - needed = n - N * min_size >= 0 (check_feasible)
    low, high = 0, int(spare.max())  # largest level L with sum(max(spare - L, 0)) >= needed
    while low < high:
        mid = (low + high + 1) // 2
        if np.maximum(spare - mid, 0).sum() >= needed:
            low = mid
        else:
            high = mid - 1
    give = np.maximum(spare - (low + 1), 0)
    at_level = np.flatnonzero(spare > low)  # each can give one more without going below the level
    give[rng.permutation(at_level)[: needed - int(give.sum())]] += 1
    donors = np.flatnonzero(give)
    candidates = np.flatnonzero(give[owner] > 0)
    candidates = candidates[np.lexsort((rng.random(len(candidates)), owner[candidates]))]
    starts = np.cumsum(sizes[donors]) - sizes[donors]
    first = np.cumsum(give[donors]) - give[donors]
    offsets = np.arange(needed) - np.repeat(first, give[donors])
    moved = candidates[np.repeat(starts, give[donors]) + offsets]
    repaired = owner.copy()
    repaired[rng.permutation(moved)] = np.repeat(np.flatnonzero(deficit), deficit[deficit > 0])
    return repaired


def _largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
    """Non-negative integers summing to `total`, each within one of `shares * total` (shares summing to 1):
    the floors, plus one for the largest remainders. The floors never sum to more than `total`: their sum
    is an integer at most sum(shares * total), which float rounding leaves below total + 1."""
    exact = shares * total
    whole = np.floor(exact).astype(np.int64)
    whole[np.argsort(whole - exact, kind="stable")[:total - int(whole.sum())]] += 1
    return whole


def _even_sizes(num_samples: int, num_clients: int) -> np.ndarray:
    sizes = np.full(num_clients, num_samples // num_clients)
    sizes[: num_samples % num_clients] += 1
    return sizes


def _groups(owner: np.ndarray, num_clients: int) -> list[np.ndarray]:
    narrow = owner.astype(np.uint16) if num_clients <= np.iinfo(np.uint16).max else owner  # radix sort
    order = np.argsort(narrow, kind="stable")
    return np.split(order, np.cumsum(np.bincount(owner, minlength=num_clients))[:-1])

"""Named datasets as train/test tensors: generated, bundled offline, torchvision sets from the data cache, or
the user's own (`register_dataset`), each with a content digest and a source for the run's record."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import inspect
import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from workbench.config import DATASETS as BUILTIN_DATASETS
from workbench.config import DataConfig
from workbench.registry import DATASETS, Entry

#: Where Debian's `dataset-fashion-mnist` package puts the gzipped IDX files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
#: Overrides the data cache's folder (`default_data_dir`).
DATA_DIR_ENV = "WORKBENCH_DATA_DIR"
#: `Dataset.source` of the generated and bundled datasets.
BUILTIN_SOURCE = "workbench built-in"
#: The keyword arguments a registered loader may name; it gets those it names (all of them with **kwargs).
LOADER_ARGUMENTS = ("num_clients", "rng", "root")


class DatasetUnavailableError(RuntimeError):
    """The data cannot be had here (offline and not on disk); the message says how to get it."""


@dataclass(frozen=True)
class Dataset:
    """Train and held-out test tensors; natural client splits where the data has real clients."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    #: Classes of a classification (labels int64 in 0..C-1); 0 for a regression.
    num_classes: int
    #: One index array into the train set per real client, for the `natural` partition.
    client_train: list[np.ndarray] | None = None
    #: One index array into the test set per real client, for per-client accuracy.
    client_test: list[np.ndarray] | None = None
    #: Where the data came from, for the run's record: "workbench built-in", "torchvision:<folder>", or the
    #: registry's origin of a registered dataset ("module <name>", "defined in __main__ (a notebook or script)").
    source: str = ""
    #: What the labels are (`TASKS`): "classification" (y int64 class indices) or "regression" (y float32 of
    #: shape (N,), one continuous target; num_classes 0). Loss and metrics follow it.
    task: str = "classification"
    #: A regression target presented standardized: (mean, std) it was standardized with (`load_tabular`
    #: uses the training split's), so a prediction p maps back to the raw target as p * std + mean; None
    #: where the target is as it came (every classification, generated regression targets).
    target_scale: tuple[float, float] | None = None
    #: (mean, std) per flattened input feature that `data.scaling` standardized the inputs with (the
    #: statistics applied to the global test set: `workbench.scaling.scale_features`), so a new raw input x
    #: maps to what the model reads as (x - mean) / std; None where the inputs are as loaded.
    feature_scale: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def num_outputs(self) -> int:
        """What a model for this data outputs per sample: one logit per class, or one value (regression)."""
        return self.num_classes if self.task == "classification" else 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def has_natural_clients(self) -> bool:
        return self.client_train is not None

    @functools.cached_property
    def digest(self) -> str:
        """A content digest, the same on every machine: the first 16 hex digits of a SHA-256 over, in order,
        each of x_train, y_train, x_test, y_test as `"<dtype> <shape>;"` (e.g. `"float32 (5, 2);"`, utf-8)
        and its little-endian bytes, then `"num_classes=<C>;"`, then for client_train and client_test
        `"clients=<K>;"` (`"clients=none;"` without) and each client's indices as little-endian int64
        preceded by their count as int64, and last, for a regression only, `"task=regression;"` (so every
        classification keeps the digest it had before tasks existed). The name and source are not part of
        it: the same data under two names has one digest."""
        hasher = hashlib.sha256()
        for tensor in (self.x_train, self.y_train, self.x_test, self.y_test):
            array = tensor.detach().cpu().numpy()
            hasher.update(f"{array.dtype.name} {tuple(array.shape)};".encode())
            hasher.update(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")))
        hasher.update(f"num_classes={self.num_classes};".encode())
        for clients in (self.client_train, self.client_test):
            hasher.update(b"clients=none;" if clients is None else f"clients={len(clients)};".encode())
            for indices in clients or ():
                indices = np.asarray(indices).astype("<i8")
                hasher.update(np.array([len(indices)], dtype="<i8"))
                hasher.update(np.ascontiguousarray(indices))
        if self.task == "regression":
            hasher.update(b"task=regression;")
        return hasher.hexdigest()[:16]


def load_dataset(config: DataConfig, num_clients: int, rng: np.random.Generator) -> Dataset:
    """Load `config.name`: a built-in dataset, one registered with `register_dataset`, or a loader given as a
    module path `package.module:load`; `num_clients` only matters for generators of natural clients."""
    if config.name in ("synthetic", "synthetic_iid"):
        return make_synthetic(num_clients, config.alpha, config.beta, rng, iid=config.name == "synthetic_iid")
    if config.name == "synthetic_regression":
        return make_synthetic_regression(num_clients, config.alpha, config.beta, rng)
    if config.name == "digits":
        return load_digits(rng)
    if config.name in _TABULAR:
        return load_tabular(config.name, rng)
    if config.name in ("mnist1d", "mnist1d_seq"):
        return make_mnist1d(rng, as_sequence=config.name == "mnist1d_seq")
    if config.name in _TORCHVISION:
        return load_torchvision(config.name, data_root(config.root))
    return load_registered(config.name, num_clients=num_clients, rng=rng, root=data_root(config.root))


# ----- the data cache -----


def default_data_dir() -> Path:
    """The one cache of downloaded and unpacked data: `$WORKBENCH_DATA_DIR`, else ~/.cache/fl-workbench/data."""
    return Path(os.environ.get(DATA_DIR_ENV) or Path.home() / ".cache" / "fl-workbench" / "data").expanduser()


def data_root(root: str | Path) -> Path:
    """The folder `data.root` names: "" is the data cache (`default_data_dir`), anything else that folder."""
    return Path(root).expanduser() if str(root) else default_data_dir()


def make_synthetic(
    num_clients: int, alpha: float, beta: float, rng: np.random.Generator, *, iid: bool = False,
    num_features: int = 60, num_classes: int = 10,
) -> Dataset:
    """Synthetic(alpha, beta) of Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020, §5.1.

    Client k has int(lognormal(4, 2)) + 50 samples; u_k ~ N(0, alpha), B_k ~ N(0, beta) (standard
    deviations); W_k, b_k have entries ~ N(u_k, 1); v_k has entries ~ N(B_k, 1); x ~ N(v_k, Sigma) with
    Sigma_jj = j^-1.2; y = argmax(x W_k + b_k). Synthetic-IID: one W, b ~ N(0, 1) and v_k = 0 for all.
    Each client's samples are split 90/10 into train and test, as in the paper's code.
    """
    clients = _synthetic_clients(num_clients, alpha, beta, rng, iid=iid, num_features=num_features,
                                 num_outputs=num_classes)
    ys = [np.argmax(x @ w + b, axis=1) for x, w, b in clients]
    return _natural_clients_dataset("synthetic_iid" if iid else "synthetic", [x for x, _, _ in clients], ys,
                                    num_classes=num_classes, task="classification")


#: Standard deviation of the noise on `synthetic_regression`'s targets. A client's signal x . w_k has
#: variance sum_j E[w_kj^2] Sigma_jj = (1 + u_k^2) * 3.39 for 60 features (std 1.84 at u_k = 0), so the
#: noise floor is an R^2 of 3.39 / (3.39 + 0.25) = 0.93 for a client's own exact model at u_k = 0.
SYNTHETIC_REGRESSION_NOISE_STD = 0.5


def make_synthetic_regression(
    num_clients: int, alpha: float, beta: float, rng: np.random.Generator, *, num_features: int = 60,
    noise_std: float = SYNTHETIC_REGRESSION_NOISE_STD,
) -> Dataset:
    """A federated regression in the style of Synthetic(alpha, beta) of Li et al., "Federated Optimization
    in Heterogeneous Networks", MLSys 2020, §5.1 (appendix C.1): the clients, their sizes and their inputs
    are drawn exactly as `make_synthetic`'s (u_k ~ N(0, alpha), B_k ~ N(0, beta); w_k, b_k ~ N(u_k, 1);
    v_k ~ N(B_k, 1); x ~ N(v_k, Sigma), Sigma_jj = j^-1.2), with one output instead of one per class, and
    the target y = x . w_k + b_k + e, e ~ N(0, noise_std^2) (default `SYNTHETIC_REGRESSION_NOISE_STD`),
    as it comes (not standardized: alpha and beta set its scale and how it differs between clients; with 30
    clients its std is about 6.5 for (0, 0), 17 for (0.5, 0.5) and 66 for (1, 1), about 2 within a client).
    Natural clients, each split 90/10 into train and test; float32 targets of shape (N,).
    """
    clients = _synthetic_clients(num_clients, alpha, beta, rng, iid=False, num_features=num_features,
                                 num_outputs=1)
    ys = [x @ w[:, 0] + b[0] + rng.normal(0, noise_std, len(x)) for x, w, b in clients]
    return _natural_clients_dataset("synthetic_regression", [x for x, _, _ in clients], ys, num_classes=0,
                                    task="regression")


def _synthetic_clients(num_clients: int, alpha: float, beta: float, rng: np.random.Generator, *, iid: bool,
                       num_features: int, num_outputs: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each client's inputs x (n_k, F) and linear model W_k (F, num_outputs), b_k (num_outputs,) of
    Synthetic(alpha, beta) (`make_synthetic`), drawn from `rng` in the order the paper's code draws them."""
    sizes = rng.lognormal(4, 2, num_clients).astype(int) + 50
    std = np.arange(1, num_features + 1, dtype=np.float64) ** -0.6  # sqrt of Sigma_jj = j^-1.2
    shared_w = rng.normal(0, 1, (num_features, num_outputs))
    shared_b = rng.normal(0, 1, num_outputs)
    clients = []
    for size in sizes:
        if iid:
            w, b, v = shared_w, shared_b, np.zeros(num_features)
        else:
            u_k, b_k = rng.normal(0, alpha), rng.normal(0, beta)
            w = rng.normal(u_k, 1, (num_features, num_outputs))
            b = rng.normal(u_k, 1, num_outputs)
            v = rng.normal(b_k, 1, num_features)
        clients.append((rng.normal(v, std, (size, num_features)), w, b))
    return clients


def _natural_clients_dataset(name: str, xs: list[np.ndarray], ys: list[np.ndarray], *, num_classes: int,
                             task: str) -> Dataset:
    """One dataset of the clients' samples, each client's split 90/10 into train and test, as the FedProx
    code splits Synthetic(alpha, beta); client k's samples are consecutive in both."""
    num_train = [int(0.9 * len(y)) for y in ys]
    label_dtype = torch.long if task == "classification" else torch.float32
    return Dataset(
        name=name,
        x_train=torch.as_tensor(np.concatenate([x[:n] for x, n in zip(xs, num_train)]), dtype=torch.float32),
        y_train=torch.as_tensor(np.concatenate([y[:n] for y, n in zip(ys, num_train)]), dtype=label_dtype),
        x_test=torch.as_tensor(np.concatenate([x[n:] for x, n in zip(xs, num_train)]), dtype=torch.float32),
        y_test=torch.as_tensor(np.concatenate([y[n:] for y, n in zip(ys, num_train)]), dtype=label_dtype),
        num_classes=num_classes,
        client_train=_consecutive(num_train),
        client_test=_consecutive([len(y) - n for y, n in zip(ys, num_train)]),
        source=BUILTIN_SOURCE,
        task=task,
    )


def load_digits(rng: np.random.Generator, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images), a stratified train/test split."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    train, test = _stratified_split(y, test_fraction, rng)
    return _from_arrays("digits", x[train], y[train], x[test], y[test], num_classes=10)


def make_mnist1d(rng: np.random.Generator, num_samples: int = 5000, *, as_sequence: bool = False) -> Dataset:
    """MNIST-1D (Greydanus, "Scaling down Deep Learning", 2020), generated offline: 40-point 1-D signals of
    10 digit templates, inputs of shape (40,); `as_sequence` gives the same samples as sequences of 40 time
    steps of one channel, shape (40, 1) (batch-first, as GRUs, LSTMs and a 1-D CNN after a transpose read
    them), named mnist1d_seq."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = int(rng.integers(2**31))
    # make_dataset seeds numpy's global generator; put it back so nothing outside sees the change.
    saved = np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(saved)
    x, x_test = np.asarray(data["x"]), np.asarray(data["x_test"])
    if as_sequence:
        x, x_test = x[:, :, None], x_test[:, :, None]
    return _from_arrays("mnist1d_seq" if as_sequence else "mnist1d", x, data["y"], x_test, data["y_test"],
                        num_classes=10)


#: scikit-learn's bundled tabular sets: name -> (loader in sklearn.datasets, its keyword arguments, task).
_TABULAR = {
    "diabetes": ("load_diabetes", {"scaled": False}, "regression"),
    "breast_cancer": ("load_breast_cancer", {}, "classification"),
    "wine": ("load_wine", {}, "classification"),
}
#: The task (`Dataset.task`) of every built-in dataset, known without loading it (the panel's knobs ask);
#: a registered dataset's task is known once it is loaded.
DATASET_TASKS = {**dict.fromkeys(BUILTIN_DATASETS, "classification"), "synthetic_regression": "regression",
                 **{name: task for name, (_, _, task) in _TABULAR.items()}}


def load_tabular(name: str, rng: np.random.Generator, test_fraction: float = 0.2,
                 *, standardize_target: bool = True) -> Dataset:
    """One of scikit-learn's bundled tabular datasets, offline, its raw feature values (float32):

    - `diabetes` (Efron et al., "Least Angle Regression", Annals of Statistics 2004): 442 patients, 10
      features (age, sex, BMI, blood pressure, six blood serum measurements), a regression of disease
      progression one year after baseline. The features are the raw ones (`load_diabetes(scaled=False)`):
      scikit-learn's default centres and scales them with statistics of all 442 rows, test rows included,
      which is pooling no federation can do; standardize them with `data.scaling=federated` instead.
      The raw target (25..346) puts MSE values in the thousands and makes SGD at lr 0.05, batch 10,
      diverge for a 200-200 MLP (a linear model still converges, to a test MSE near 3,000), so the
      target is presented standardized with the training split's mean and (population) std:
      `Dataset.target_scale` keeps both, and a prediction p is p * std + mean in the raw units.
      (`standardize_target=False` keeps the raw target.)
    - `breast_cancer` (Wisconsin diagnostic, Street et al. 1993): 569 patients, 30 features, 2 classes
      (0 = malignant, 1 = benign).
    - `wine` (Forina et al., UCI): 178 wines, 13 features, 3 cultivars.

    The test split holds `test_fraction` of the samples drawn with `rng`: stratified by class for a
    classification (as `load_digits`), a uniform random subset for a regression; both keep the original
    row order. Features span very different ranges (breast_cancer's from 0.001 to 4,254, wine's proline
    reaches 1,680): these sets are meant to be run with `data.scaling=federated`.
    """
    import sklearn.datasets

    loader, arguments, task = _TABULAR[name]
    bunch = getattr(sklearn.datasets, loader)(**arguments)
    x = np.asarray(bunch.data, dtype=np.float64)
    if task == "classification":
        y = np.asarray(bunch.target, dtype=np.int64)
        train, test = _stratified_split(y, test_fraction, rng)
        return _from_arrays(name, x[train], y[train], x[test], y[test], num_classes=int(y.max()) + 1)
    y = np.asarray(bunch.target, dtype=np.float64)
    train, test = _random_split(len(y), test_fraction, rng)
    target_scale = None
    if standardize_target:
        mean, std = float(y[train].mean()), float(y[train].std())
        y, target_scale = (y - mean) / std, (mean, std)
    dataset = _from_arrays(name, x[train], y[train], x[test], y[test], num_classes=0, task="regression")
    return dataclasses.replace(dataset, target_scale=target_scale)


_TORCHVISION = {
    "fashion_mnist": ("FashionMNIST", (0.2860,), (0.3530,)),
    "mnist": ("MNIST", (0.1307,), (0.3081,)),
    "cifar10": ("CIFAR10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def load_torchvision(name: str, root: Path) -> Dataset:
    """Fashion-MNIST, MNIST or CIFAR-10 from `root` (the data cache, `data_root("")`, unless the user names
    another folder), unpacked there from Debian's package, or downloaded there when online."""
    import torchvision

    class_name, mean, std = _TORCHVISION[name]
    if name == "fashion_mnist":
        _copy_debian_fashion_mnist(root)
    cls = getattr(torchvision.datasets, class_name)
    try:
        train, test = (cls(str(root), train=flag, download=False) for flag in (True, False))
    except RuntimeError:
        try:
            train, test = (cls(str(root), train=flag, download=True) for flag in (True, False))
        except Exception as err:  # urllib/OSError/RuntimeError: every way a download can fail
            raise DatasetUnavailableError(_how_to_get(name, root)) from err
    arrays = []
    for split in (train, test):
        x = torch.as_tensor(np.asarray(split.data), dtype=torch.float32) / 255.0
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
        arrays += [x, torch.as_tensor(np.asarray(split.targets), dtype=torch.long)]
    return Dataset(name, *arrays, num_classes=10, source=f"torchvision:{root.absolute()}")


def _copy_debian_fashion_mnist(root: Path) -> None:
    raw = root / "FashionMNIST" / "raw"
    packed_files = sorted(DEBIAN_FASHION_MNIST.glob("*-ubyte.gz")) if DEBIAN_FASHION_MNIST.is_dir() else []
    missing = [packed for packed in packed_files if not (raw / packed.stem).exists()]
    if not missing:
        return
    raw.mkdir(parents=True, exist_ok=True)
    for packed in missing:
        # Unpacked beside the target, then renamed: the cache is shared by every process of the user, and
        # a reader sees each file either whole or not at all.
        partial = raw / f".{packed.stem}.{uuid.uuid4().hex}.partial"
        try:
            with gzip.open(packed) as source, open(partial, "xb") as target:
                shutil.copyfileobj(source, target)
            os.replace(partial, raw / packed.stem)
        finally:
            partial.unlink(missing_ok=True)


def _how_to_get(name: str, root: Path) -> str:
    class_name = _TORCHVISION[name][0]
    debian = ("install Debian's package (apt-get install dataset-fashion-mnist), or "
              if name == "fashion_mnist" else "")
    return (
        f"data.name={name}: the {class_name} files are not in {str(root)!r} and the download failed "
        f"(no internet?). To fix: {debian}run once where you are online (the files are kept in {str(root)!r}), "
        f"or copy the torchvision {class_name} folder into {str(root)!r}; offline datasets that need no "
        "download: synthetic, synthetic_iid, synthetic_regression, digits, mnist1d, mnist1d_seq, diabetes, "
        "breast_cancer, wine"
    )


def _from_arrays(name, x_train, y_train, x_test, y_test, num_classes: int,
                 task: str = "classification") -> Dataset:
    label_dtype = torch.long if task == "classification" else torch.float32
    return Dataset(
        name=name,
        x_train=torch.as_tensor(np.asarray(x_train), dtype=torch.float32),
        y_train=torch.as_tensor(np.asarray(y_train), dtype=label_dtype),
        x_test=torch.as_tensor(np.asarray(x_test), dtype=torch.float32),
        y_test=torch.as_tensor(np.asarray(y_test), dtype=label_dtype),
        num_classes=num_classes,
        source=BUILTIN_SOURCE,
        task=task,
    )


def _consecutive(sizes: list[int]) -> list[np.ndarray]:
    bounds = np.cumsum([0, *sizes])
    return [np.arange(bounds[i], bounds[i + 1]) for i in range(len(sizes))]


def _random_split(num_samples: int, test_fraction: float, rng: np.random.Generator):
    order = rng.permutation(num_samples)
    num_test = int(round(test_fraction * num_samples))
    return np.sort(order[num_test:]), np.sort(order[:num_test])


def _stratified_split(y: np.ndarray, test_fraction: float, rng: np.random.Generator):
    train, test = [], []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        num_test = int(round(test_fraction * len(members)))
        test.append(members[:num_test]), train.append(members[num_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


# ----- your own data -----

#: Field names in messages about arrays given by keyword, and about what a (train, test) pair yielded.
_ARRAY_FIELDS = ("x_train", "y_train", "x_test", "y_test")
_PAIR_FIELDS = ("train inputs", "train labels", "test inputs", "test labels")


def register_dataset(
    name: str,
    source: Any = None,
    *,
    x_train: Any = None,
    y_train: Any = None,
    x_test: Any = None,
    y_test: Any = None,
    client_train: Sequence[Any] | None = None,
    client_test: Sequence[Any] | None = None,
    num_classes: int | None = None,
) -> Entry:
    """Make `data.name=<name>` load your data, with every partition scheme and statistic.

    Give the data in one of three ways:

    - arrays or tensors by keyword: `x_train`, `y_train`, `x_test`, `y_test` (inputs of shape
      (num_samples, *input_shape), made float32 as they are, so scale them yourself; integer labels
      0..C-1), with optional natural clients `client_train` (one index array into the training set per
      client; together they hold every training sample exactly once) and `client_test` (one index array
      into the test set per client, in the same order, each test sample in at most one), and
      `num_classes` (default: the largest label + 1);
    - `source=(train, test)`, two `torch.utils.data.Dataset`s of (input, label) pairs, read into tensors
      once, here (the keywords `client_train`, `client_test` and `num_classes` apply as above);
    - `source=load`, a loader called at every `load_dataset` with those of `num_clients` (int), `rng` (the
      run's data stream, a numpy Generator) and `root` (the data folder, `data_root`) that it names; it
      returns a `Dataset` (`dataset_from_arrays` builds and checks one) or a (train, test) pair as above.

    Data given as arrays or a pair is checked and copied now, so later changes to your arrays do not
    change the registered data. Registering a name again replaces it. Returns the registry's entry, whose
    `origin` says where the data was registered ("defined in __main__ (a notebook or script)" or "module
    <name>"): it becomes the `Dataset.source` of the loaded data.
    """
    if name in BUILTIN_DATASETS:
        raise ValueError(f"register_dataset({name!r}, ...): {name!r} is a built-in dataset "
                         f"({', '.join(BUILTIN_DATASETS)}); choose another name")
    arrays = dict(zip(_ARRAY_FIELDS, (x_train, y_train, x_test, y_test)))
    given = [key for key, value in arrays.items() if value is not None]
    splits = {"client_train": client_train, "client_test": client_test, "num_classes": num_classes}
    if source is None:
        missing = [key for key in _ARRAY_FIELDS if arrays[key] is None]
        if missing:
            raise TypeError(f"register_dataset({name!r}, ...) needs {', '.join(missing)} too: give x_train, "
                            "y_train, x_test and y_test, or source=(train, test) torch Datasets, or "
                            "source=<a loader function>")
        dataset = dataset_from_arrays(name, x_train, y_train, x_test, y_test, client_train=client_train,
                                      client_test=client_test, num_classes=num_classes, copy=True)
    elif given:
        raise TypeError(f"register_dataset({name!r}, source, {', '.join(f'{k}=...' for k in given)}): give "
                        "either source or the arrays x_train, y_train, x_test, y_test, not both")
    elif isinstance(source, Dataset):
        dataset = check_dataset(dataclasses.replace(source, name=name), copy=True)
    elif _is_dataset_pair(source, f"register_dataset({name!r}, (array, array))"):
        dataset = dataset_from_torch(name, *source, client_train=client_train, client_test=client_test,
                                     num_classes=num_classes)
    elif callable(source):
        extra = [key for key, value in splits.items() if value is not None]
        if extra:
            raise TypeError(f"register_dataset({name!r}, {_label(source)}, {', '.join(f'{k}=...' for k in extra)}): "
                            "a loader's Dataset carries its own clients and classes; leave these out, or "
                            "register arrays instead")
        return DATASETS.register(name, source)
    else:
        raise TypeError(f"register_dataset({name!r}, source): source is a {type(source).__name__}; give a "
                        "(train, test) pair of torch Datasets, a loader function, or the arrays x_train=..., "
                        "y_train=..., x_test=..., y_test=... by keyword")

    def load_registered_data() -> Dataset:
        return dataset

    # The registry tells where a factory comes from by its module: this one belongs to the caller.
    load_registered_data.__module__ = sys._getframe(1).f_globals.get("__name__", "__main__")
    load_registered_data.__qualname__ = f"<data registered as {name!r}>"
    return DATASETS.register(name, load_registered_data)


def load_registered(name: str, *, num_clients: int, rng: np.random.Generator, root: Path) -> Dataset:
    """The dataset registered as `name` (or the loader at a `module:attribute` path), checked, with its
    name and source set."""
    entry = DATASETS.resolve(name)
    loader = entry.factory
    offered = dict(zip(LOADER_ARGUMENTS, (num_clients, rng, root)))
    try:
        parameters = inspect.signature(loader).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: offer nothing
        parameters = ()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        arguments = offered
    else:
        arguments = {p.name: offered[p.name] for p in parameters if p.name in offered}
    result = loader(**arguments)
    if isinstance(result, Dataset):
        dataset = check_dataset(result)
    elif _is_dataset_pair(result, f"data.name={name!r}: the loader {_label(loader)} returned (array, array)"):
        dataset = dataset_from_torch(name, *result)
    else:
        raise TypeError(f"data.name={name!r}: the loader {_label(loader)} returned a {type(result).__name__}; a "
                        "loader must return a workbench.data.Dataset (build one with dataset_from_arrays) or a "
                        "(train, test) pair of torch Datasets")
    return dataclasses.replace(dataset, name=name, source=entry.origin)


def dataset_from_arrays(
    name: str, x_train: Any, y_train: Any, x_test: Any, y_test: Any, *,
    client_train: Sequence[Any] | None = None, client_test: Sequence[Any] | None = None,
    num_classes: int | None = None, copy: bool = False, fields: Sequence[str] = _ARRAY_FIELDS,
) -> Dataset:
    """A checked `Dataset` from numpy arrays or torch tensors (the rules of `register_dataset`): inputs
    become float32 CPU tensors, labels int64; `copy` makes sure no tensor shares memory with the arguments.
    Errors name the field (`fields`: what to call x_train, y_train, x_test, y_test in messages)."""
    x_name, y_name, xt_name, yt_name = fields
    x_train, x_test = _inputs(x_train, x_name, copy), _inputs(x_test, xt_name, copy)
    y_train, y_test = _labels(y_train, y_name, copy), _labels(y_test, yt_name, copy)
    for x, y, xf, yf in ((x_train, y_train, x_name, y_name), (x_test, y_test, xt_name, yt_name)):
        if len(x) != len(y):
            raise ValueError(f"{xf} has {len(x)} samples but {yf} has {len(y)} labels; they must have the same "
                             "length (one label per input)")
        if len(x) == 0:
            raise ValueError(f"{xf} has no samples; a dataset needs at least one training and one test sample")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"{xt_name} samples have shape {tuple(x_test.shape[1:])} but {x_name} samples have shape "
                         f"{tuple(x_train.shape[1:])}; train and test inputs must have the same shape")
    largest = int(max(y_train.max(), y_test.max()))
    if num_classes is None:
        num_classes = largest + 1
        if num_classes < 2:
            raise ValueError(f"num_classes=1 (the largest label + 1): every label is 0, and a classifier needs at "
                             f"least 2 classes (check {y_name}, or pass num_classes=...)")
    elif isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r}: it must be an integer >= 2, the number of classes "
                         "(leave it out for the largest label + 1)")
    num_classes = int(num_classes)
    for y, yf in ((y_train, y_name), (y_test, yt_name)):
        if int(y.max()) >= num_classes:
            at = int(torch.argmax((y >= num_classes).to(torch.uint8)))
            raise ValueError(f"{yf}: label {int(y[at])} (sample {at}) is >= num_classes={num_classes}; labels must "
                             f"be integers 0..{num_classes - 1} (pass num_classes={largest + 1}, or remap the "
                             f"labels to 0..{num_classes - 1})")
    train_parts = _client_indices(client_train, "client_train", len(y_train), x_name, is_train=True)
    test_parts = _client_indices(client_test, "client_test", len(y_test), xt_name, is_train=False)
    if test_parts is not None:
        if train_parts is None:
            raise ValueError("client_test needs client_train: per-client test splits belong to natural clients "
                             "(give client_train too, or leave client_test out)")
        if len(test_parts) != len(train_parts):
            raise ValueError(f"client_test has {len(test_parts)} clients but client_train has {len(train_parts)}; "
                             "give one test index array per client, in the same order")
    return Dataset(name, x_train, y_train, x_test, y_test, num_classes, train_parts, test_parts)


def check_dataset(dataset: Dataset, *, copy: bool = False) -> Dataset:
    """`dataset` checked by the rules of `register_dataset`, as CPU tensors of the usual dtypes."""
    checked = dataset_from_arrays(dataset.name, dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test,
                                  client_train=dataset.client_train, client_test=dataset.client_test,
                                  num_classes=dataset.num_classes, copy=copy)
    return dataclasses.replace(checked, source=dataset.source)


def dataset_from_torch(
    name: str, train: Any, test: Any, *, client_train: Sequence[Any] | None = None,
    client_test: Sequence[Any] | None = None, num_classes: int | None = None,
) -> Dataset:
    """A checked `Dataset` from two `torch.utils.data.Dataset`s of (input, label) pairs, read once."""
    x_train, y_train = _materialize(train, "train")
    x_test, y_test = _materialize(test, "test")
    return dataset_from_arrays(name, x_train, y_train, x_test, y_test, client_train=client_train,
                               client_test=client_test, num_classes=num_classes, fields=_PAIR_FIELDS)


def describe_dataset(dataset: Dataset, name: str | None = None) -> dict[str, str]:
    """What a run's record says about its data, as the keyword arguments of `mlflow.entities.Dataset`:
    name, digest (`Dataset.digest`), source_type ("local" for a torchvision folder, else "code"), source
    (`Dataset.source`), schema (MLflow's tensor-spec JSON of inputs and labels) and profile (JSON: sample
    and class counts, input shape, natural clients; for a regression also its task and, where the target
    is standardized, target_mean and target_std: `Dataset.target_scale`). Call it on the data as loaded,
    before a feature skew or `data.scaling` transforms the inputs, so the same data has the same digest
    under every scheme and scaling."""
    source = dataset.source or "unknown"

    def spec(tensor: torch.Tensor) -> str:
        dtype = str(tensor.dtype).removeprefix("torch.")
        return json.dumps([{"type": "tensor", "tensor-spec": {"dtype": dtype, "shape": [-1, *tensor.shape[1:]]}}])

    profile = {
        "num_train": len(dataset.y_train), "num_test": len(dataset.y_test), "num_classes": dataset.num_classes,
        "input_shape": list(dataset.input_shape),
        "num_natural_clients": len(dataset.client_train) if dataset.client_train is not None else 0,
        "has_client_test": dataset.client_test is not None,
    }
    if dataset.task != "classification":  # a classification's profile stays as it was before tasks existed
        profile["task"] = dataset.task
    if dataset.target_scale is not None:
        profile["target_mean"], profile["target_std"] = dataset.target_scale
    return {
        "name": name or dataset.name,
        "digest": dataset.digest,
        "source_type": "local" if source.startswith("torchvision:") else "code",
        "source": source,
        "schema": json.dumps({"mlflow_tensorspec": {"features": spec(dataset.x_train),
                                                    "targets": spec(dataset.y_train)}}),
        "profile": json.dumps(profile),
    }


def _label(obj: Any) -> str:
    return getattr(obj, "__qualname__", None) or type(obj).__name__


def _is_dataset_pair(source: Any, context: str) -> bool:
    """Whether `source` is (train, test) torch Datasets; a pair of arrays is refused with how to pass them."""
    if not isinstance(source, (tuple, list)) or len(source) != 2:
        return False
    if all(isinstance(part, (np.ndarray, torch.Tensor)) for part in source):
        raise TypeError(f"{context}: a pair of arrays looks like (x, y); give x_train, y_train, x_test, y_test "
                        "(by keyword to register_dataset, or to dataset_from_arrays), or a (train, test) pair of "
                        "torch Datasets")
    return all(isinstance(part, torch.utils.data.Dataset) or (hasattr(part, "__getitem__") and hasattr(part, "__len__"))
               for part in source)


def _materialize(data: Any, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs and labels of a torch Dataset of (input, label) pairs, stacked into two tensors."""
    if isinstance(data, torch.utils.data.TensorDataset) and len(data.tensors) == 2:
        return data.tensors[0], data.tensors[1]
    items = iter(data) if isinstance(data, torch.utils.data.IterableDataset) else (data[i] for i in range(len(data)))
    inputs, labels = [], []
    for index, item in enumerate(items):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"{split}[{index}] is a {type(item).__name__}; a dataset must yield (input, label) pairs")
        x, y = item
        if type(x).__module__.startswith("PIL."):
            raise TypeError(f"{split}[{index}] input is a PIL image; give the Dataset a transform that makes "
                            "tensors (torchvision.transforms.ToTensor())")
        x = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
        if inputs and x.shape != inputs[0].shape:
            raise ValueError(f"{split}[{index}] input has shape {tuple(x.shape)} but {split}[0] has "
                             f"{tuple(inputs[0].shape)}; every input must have the same shape (resize or pad them)")
        y = torch.as_tensor(np.asarray(y)) if not isinstance(y, torch.Tensor) else y
        if y.numel() != 1:
            raise ValueError(f"{split}[{index}] label has shape {tuple(y.shape)}; a label is one integer 0..C-1 "
                             "(for one-hot labels return y.argmax())")
        inputs.append(x)
        labels.append(y.reshape(()))
    if not inputs:
        raise ValueError(f"{split} has no samples; a dataset needs at least one training and one test sample")
    return torch.stack(inputs), torch.stack(labels)


def _inputs(value: Any, field: str, copy: bool) -> torch.Tensor:
    x = _as_tensor(value, field)
    if x.dtype.is_complex:
        raise TypeError(f"{field} has dtype {str(x.dtype).removeprefix('torch.')}; inputs must be real numbers "
                        "(bool, int or float; they become float32)")
    if x.ndim < 2:
        raise ValueError(f"{field} has shape {tuple(x.shape)}; inputs must have shape (num_samples, *input_shape) "
                         "(for one feature per sample pass x.reshape(-1, 1))")
    x = _detached(x, torch.float32, copy)
    finite = torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
    if not bool(finite.all()):
        raise ValueError(f"{field}: sample {int(torch.argmin(finite.to(torch.uint8)))} holds NaN or infinite values; "
                         "inputs must be finite (drop or impute those samples)")
    return x


def _labels(value: Any, field: str, copy: bool) -> torch.Tensor:
    y = _as_tensor(value, field)
    if y.ndim != 1:
        raise ValueError(f"{field} has shape {tuple(y.shape)}; labels must be one integer per sample, shape "
                         "(num_samples,) (for one-hot labels pass y.argmax(1); for shape (n, 1) pass y.ravel())")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"{field} has dtype {str(y.dtype).removeprefix('torch.')}; labels must be integers 0..C-1 "
                        "(if they are class ids, pass y.astype(np.int64) or y.long())")
    y = _detached(y, torch.int64, copy)
    if len(y) and int(y.min()) < 0:
        at = int(torch.argmin(y))
        raise ValueError(f"{field}: label {int(y[at])} (sample {at}) is negative; labels must be integers 0..C-1 "
                         "(remap them: classes, y = np.unique(y, return_inverse=True))")
    return y


def _as_tensor(value: Any, field: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as err:  # ragged lists and the like
        raise TypeError(f"{field} cannot be read as an array ({err}); give a numpy array or a torch tensor") from err
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{field} has dtype {array.dtype}; it must hold numbers (give a numpy array or a torch tensor "
                        "of numbers)")
    return torch.from_numpy(np.ascontiguousarray(array))


def _detached(tensor: torch.Tensor, dtype: torch.dtype, copy: bool) -> torch.Tensor:
    converted = tensor.detach().to("cpu", dtype)
    return converted.clone() if copy and converted.data_ptr() == tensor.data_ptr() else converted


def _client_indices(clients: Any, field: str, num_samples: int, x_field: str,
                    *, is_train: bool) -> list[np.ndarray] | None:
    """`clients` as int64 index arrays, each sample in at most one (training: exactly one, none empty)."""
    if clients is None:
        return None
    if isinstance(clients, (np.ndarray, torch.Tensor)) and clients.ndim == 1:
        raise TypeError(f"{field} is one array of shape {tuple(clients.shape)}; it must be a list of index arrays, "
                        f"one per client (if it holds each sample's client id, pass "
                        f"[np.flatnonzero(ids == k) for k in range(ids.max() + 1)])")
    if isinstance(clients, (str, bytes, dict)) or not hasattr(clients, "__iter__"):
        raise TypeError(f"{field} is a {type(clients).__name__}; it must be a list of index arrays, one per client")
    parts = []
    for k, part in enumerate(clients):
        array = part.detach().cpu().numpy() if isinstance(part, torch.Tensor) else np.asarray(part)
        if array.ndim != 1:
            raise ValueError(f"{field}[{k}] has shape {array.shape}; each client's indices must be a 1-D array")
        if array.dtype == bool or (array.dtype.kind not in "iu" and len(array)):
            hint = " (for a boolean mask pass np.flatnonzero(mask))" if array.dtype == bool else ""
            raise TypeError(f"{field}[{k}] has dtype {array.dtype}; client indices must be integers into "
                            f"{x_field}{hint}")
        array = array.astype(np.int64)
        if len(array) and (array.min() < 0 or array.max() >= num_samples):
            bad = int(array[(array < 0) | (array >= num_samples)][0])
            raise ValueError(f"{field}[{k}] holds index {bad}; indices must lie in 0..{num_samples - 1} ({x_field} "
                             f"has {num_samples} samples)")
        if is_train and not len(array):
            raise ValueError(f"{field}[{k}] is empty; every natural client needs at least one training sample (drop "
                             "that client from client_train and client_test)")
        parts.append(np.sort(array))
    if not parts:
        raise ValueError(f"{field} is empty; give one index array per client, or leave {field} out")
    owner_count = np.bincount(np.concatenate(parts), minlength=num_samples)
    if owner_count.max() > 1:
        sample = int(np.argmax(owner_count > 1))
        holders = [k for k, part in enumerate(parts) if np.any(part == sample)]
        where = (f"{field}[{holders[0]}] and {field}[{holders[1]}]" if len(holders) > 1
                 else f"{field}[{holders[0]}] twice")
        kind = "training" if is_train else "test"
        raise ValueError(f"{field}: {kind} sample {sample} is in {where}; each sample belongs to at most one client")
    if is_train and owner_count.min() == 0:
        sample = int(np.argmin(owner_count))
        raise ValueError(f"{field} covers {int(owner_count.sum())} of the {num_samples} training samples (sample "
                         f"{sample} has no client); under partition.scheme=natural every training sample belongs "
                         f"to one client (give it a client, or drop it from {x_field} and its labels)")
    return parts

"""Named datasets as train/test tensors: generated, bundled offline, or torchvision sets from a local folder."""

from __future__ import annotations

import gzip
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from workbench.config import DataConfig

#: Where Debian's `dataset-fashion-mnist` package puts the gzipped IDX files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


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
    num_classes: int
    #: One index array into the train set per real client, for the `natural` partition.
    client_train: list[np.ndarray] | None = None
    #: One index array into the test set per real client, for per-client accuracy.
    client_test: list[np.ndarray] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def has_natural_clients(self) -> bool:
        return self.client_train is not None


def load_dataset(config: DataConfig, num_clients: int, rng: np.random.Generator) -> Dataset:
    """Load `config.name`; `num_clients` only matters for generators of natural clients."""
    if config.name in ("synthetic", "synthetic_iid"):
        return make_synthetic(num_clients, config.alpha, config.beta, rng, iid=config.name == "synthetic_iid")
    if config.name == "digits":
        return load_digits(rng)
    if config.name == "mnist1d":
        return make_mnist1d(rng)
    return load_torchvision(config.name, Path(config.root))


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
    sizes = rng.lognormal(4, 2, num_clients).astype(int) + 50
    std = np.arange(1, num_features + 1, dtype=np.float64) ** -0.6  # sqrt of Sigma_jj = j^-1.2
    shared_w = rng.normal(0, 1, (num_features, num_classes))
    shared_b = rng.normal(0, 1, num_classes)
    xs_train, ys_train, xs_test, ys_test = [], [], [], []
    for size in sizes:
        if iid:
            w, b, v = shared_w, shared_b, np.zeros(num_features)
        else:
            u_k, b_k = rng.normal(0, alpha), rng.normal(0, beta)
            w = rng.normal(u_k, 1, (num_features, num_classes))
            b = rng.normal(u_k, 1, num_classes)
            v = rng.normal(b_k, 1, num_features)
        x = rng.normal(v, std, (size, num_features))
        y = np.argmax(x @ w + b, axis=1)
        num_train = int(0.9 * size)
        xs_train.append(x[:num_train]), ys_train.append(y[:num_train])
        xs_test.append(x[num_train:]), ys_test.append(y[num_train:])
    return Dataset(
        name="synthetic_iid" if iid else "synthetic",
        x_train=torch.as_tensor(np.concatenate(xs_train), dtype=torch.float32),
        y_train=torch.as_tensor(np.concatenate(ys_train), dtype=torch.long),
        x_test=torch.as_tensor(np.concatenate(xs_test), dtype=torch.float32),
        y_test=torch.as_tensor(np.concatenate(ys_test), dtype=torch.long),
        num_classes=num_classes,
        client_train=_consecutive([len(y) for y in ys_train]),
        client_test=_consecutive([len(y) for y in ys_test]),
    )


def load_digits(rng: np.random.Generator, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images), a stratified train/test split."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    train, test = _stratified_split(y, test_fraction, rng)
    return _from_arrays("digits", x[train], y[train], x[test], y[test], num_classes=10)


def make_mnist1d(rng: np.random.Generator, num_samples: int = 5000) -> Dataset:
    """MNIST-1D (Greydanus 2020), generated offline: 40-point 1-D signals of 10 digit templates."""
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
    return _from_arrays("mnist1d", data["x"], data["y"], data["x_test"], data["y_test"], num_classes=10)


_TORCHVISION = {
    "fashion_mnist": ("FashionMNIST", (0.2860,), (0.3530,)),
    "mnist": ("MNIST", (0.1307,), (0.3081,)),
    "cifar10": ("CIFAR10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def load_torchvision(name: str, root: Path) -> Dataset:
    """Fashion-MNIST, MNIST or CIFAR-10 from `root`, Debian's package, or a download when online."""
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
    return Dataset(name, *arrays, num_classes=10)


def _copy_debian_fashion_mnist(root: Path) -> None:
    raw = root / "FashionMNIST" / "raw"
    if not DEBIAN_FASHION_MNIST.is_dir() or (raw / "t10k-labels-idx1-ubyte").exists():
        return
    raw.mkdir(parents=True, exist_ok=True)
    for packed in DEBIAN_FASHION_MNIST.glob("*-ubyte.gz"):
        with gzip.open(packed) as source, open(raw / packed.stem, "wb") as target:
            shutil.copyfileobj(source, target)


def _how_to_get(name: str, root: Path) -> str:
    class_name = _TORCHVISION[name][0]
    debian = ("install Debian's package (apt-get install dataset-fashion-mnist), or "
              if name == "fashion_mnist" else "")
    return (
        f"data.name={name}: the {class_name} files are not in {str(root)!r} and the download failed "
        f"(no internet?). To fix: {debian}run once where you are online with data.root={str(root)!r}, "
        f"or copy the torchvision {class_name} folder into {str(root)!r}; offline datasets that need no "
        "download: synthetic, synthetic_iid, digits, mnist1d"
    )


def _from_arrays(name, x_train, y_train, x_test, y_test, num_classes: int) -> Dataset:
    return Dataset(
        name=name,
        x_train=torch.as_tensor(np.asarray(x_train), dtype=torch.float32),
        y_train=torch.as_tensor(np.asarray(y_train), dtype=torch.long),
        x_test=torch.as_tensor(np.asarray(x_test), dtype=torch.float32),
        y_test=torch.as_tensor(np.asarray(y_test), dtype=torch.long),
        num_classes=num_classes,
    )


def _consecutive(sizes: list[int]) -> list[np.ndarray]:
    bounds = np.cumsum([0, *sizes])
    return [np.arange(bounds[i], bounds[i + 1]) for i in range(len(sizes))]


def _stratified_split(y: np.ndarray, test_fraction: float, rng: np.random.Generator):
    train, test = [], []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        num_test = int(round(test_fraction * len(members)))
        test.append(members[:num_test]), train.append(members[num_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench.config import DataConfig
from workbench.data import (DATA_DIR_ENV, DEBIAN_FASHION_MNIST, DatasetUnavailableError, data_root,
                            default_data_dir, load_dataset, make_synthetic)


def test_synthetic_follows_the_fedprox_recipe():
    data = make_synthetic(30, 1.0, 1.0, np.random.default_rng(0))
    assert data.input_shape == (60,) and data.num_classes == 10
    assert len(data.client_train) == len(data.client_test) == 30
    sizes = np.array([len(a) + len(b) for a, b in zip(data.client_train, data.client_test)])
    assert sizes.min() >= 50  # int(lognormal(4, 2)) + 50
    assert all(len(b) == s - int(0.9 * s) for b, s in zip(data.client_test, sizes))  # 90/10 split
    covered = np.sort(np.concatenate(data.client_train))
    assert np.array_equal(covered, np.arange(len(data.y_train)))
    # heterogeneous labels: each client sees only a few classes
    classes = [len(np.unique(data.y_train[c].numpy())) for c in data.client_train]
    assert np.mean(classes) < 6


def test_synthetic_iid_clients_share_one_label_distribution():
    iid = make_synthetic(30, 0, 0, np.random.default_rng(0), iid=True)
    niid = make_synthetic(30, 1, 1, np.random.default_rng(0))

    def mean_classes(d):
        return np.mean([len(np.unique(d.y_train[c].numpy())) for c in d.client_train])

    assert mean_classes(iid) > mean_classes(niid) + 2


def test_synthetic_is_reproducible():
    a = make_synthetic(5, 0.5, 0.5, np.random.default_rng(3))
    b = make_synthetic(5, 0.5, 0.5, np.random.default_rng(3))
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)


def test_digits_offline_with_stratified_test_set():
    data = load_dataset(DataConfig(name="digits"), 10, np.random.default_rng(0))
    assert data.input_shape == (1, 8, 8)
    assert len(data.y_train) + len(data.y_test) == 1797
    assert set(data.y_test.tolist()) == set(range(10))
    assert float(data.x_train.max()) <= 1.0


def test_mnist1d_generated_offline_without_touching_global_numpy_state():
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    data = load_dataset(DataConfig(name="mnist1d"), 10, np.random.default_rng(0))
    assert np.array_equal(np.random.get_state()[1], before)
    assert data.input_shape == (40,) and len(data.y_train) == 4000 and len(data.y_test) == 1000


def test_fashion_mnist_from_debian_package_into_the_data_root_the_user_sets(tmp_path, monkeypatch):
    assert DEBIAN_FASHION_MNIST.is_dir(), "make test installs Debian's dataset-fashion-mnist package"
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "cache"))
    root = tmp_path / "mine"
    data = load_dataset(DataConfig(name="fashion_mnist", root=str(root)), 10, np.random.default_rng(0))
    assert data.x_train.shape == (60_000, 1, 28, 28) and data.x_test.shape == (10_000, 1, 28, 28)
    assert abs(float(data.x_train.mean())) < 0.05  # normalised
    assert torch.bincount(data.y_test).tolist() == [1000] * 10
    # an explicit data.root wins over the cache
    assert (root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    assert not (tmp_path / "cache").exists() and data.source == f"torchvision:{root}"


def test_unpacked_data_goes_to_the_cache_and_nothing_to_the_working_directory(tmp_path, monkeypatch):
    cache, work = tmp_path / "cache", tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv(DATA_DIR_ENV, str(cache))
    monkeypatch.chdir(work)
    packed = {p.stem: p for p in DEBIAN_FASHION_MNIST.glob("*-ubyte.gz")}
    assert len(packed) == 4, "make test installs Debian's dataset-fashion-mnist package"
    data = load_dataset(DataConfig(name="fashion_mnist", root=""), 10, np.random.default_rng(0))
    raw = cache / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(packed)  # no partial files left behind
    assert all((raw / name).read_bytes() == gzip.decompress(source.read_bytes()) for name, source in packed.items())
    assert list(work.iterdir()) == []
    assert data.source == f"torchvision:{cache}" and data.x_test.shape == (10_000, 1, 28, 28)
    # a cache that lost a file gets it back; the files it has are left as they are
    (raw / "t10k-labels-idx1-ubyte").unlink()
    kept = (raw / "train-images-idx3-ubyte").stat().st_mtime_ns
    again = load_dataset(DataConfig(name="fashion_mnist", root=""), 10, np.random.default_rng(0))
    restored = (raw / "t10k-labels-idx1-ubyte").read_bytes()
    assert restored == gzip.decompress(packed["t10k-labels-idx1-ubyte"].read_bytes())
    assert (raw / "train-images-idx3-ubyte").stat().st_mtime_ns == kept
    assert torch.equal(again.y_test, data.y_test) and list(work.iterdir()) == []


def test_the_cache_is_the_environment_variable_else_home_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    home_cache = tmp_path / ".cache" / "fl-workbench" / "data"
    assert default_data_dir() == home_cache and data_root("") == home_cache
    monkeypatch.setenv(DATA_DIR_ENV, "")  # set but empty: the default
    assert default_data_dir() == home_cache
    monkeypatch.setenv(DATA_DIR_ENV, "~/elsewhere")
    assert default_data_dir() == tmp_path / "elsewhere" and data_root("") == tmp_path / "elsewhere"
    # a data.root the user sets is that folder, `~` expanded, relative to the working directory
    assert data_root("~/mine") == tmp_path / "mine" and data_root("data") == Path("data")
    assert not home_cache.exists() and not (tmp_path / "elsewhere").exists()  # naming a folder creates nothing


def test_offline_torchvision_fails_with_how_to_get_the_data(tmp_path):
    try:
        data = load_dataset(DataConfig(name="mnist", root=str(tmp_path)), 10, np.random.default_rng(0))
    except DatasetUnavailableError as err:
        message = str(err)
        assert "data.name=mnist" in message and str(tmp_path) in message
        assert "run once where you are online" in message and "digits" in message
    else:  # online: the real download path worked
        assert data.x_train.shape == (60_000, 1, 28, 28)

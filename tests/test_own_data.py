"""Your own data: arrays, torch Datasets and loaders registered under a name, natural client splits, every
partition scheme on them, the content digest, the messages for bad input, and a run end to end."""

import hashlib
import json

import numpy as np
import pytest
import torch

from workbench.config import PARTITION_SCHEMES, DataConfig, ExperimentConfig
from workbench.data import Dataset, dataset_from_arrays, describe_dataset, load_dataset, register_dataset
from workbench.partition import FEATURE_SKEWS, summarize
from workbench.registry import DATASETS
from workbench.simulation import STREAM_DATA, load_data, prepare, run, stream

NUM_CLASSES = 4


@pytest.fixture(autouse=True)
def _forget_registered_data():
    """Each test's registrations end with it: the registry is one per process."""
    before = set(DATASETS.names())
    yield
    for name in set(DATASETS.names()) - before:
        DATASETS.unregister(name)


def blobs(num_train=120, num_test=40, shape=(12,), seed=0):
    """Separable clusters: class c is a Gaussian around its own mean (float64 inputs, int32 labels)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 3, (NUM_CLASSES, *shape))
    y = np.arange(num_train + num_test) % NUM_CLASSES
    rng.shuffle(y)
    x = means[y] + rng.normal(0, 1, (len(y), *shape))
    return x[:num_train], y[:num_train].astype(np.int32), x[num_train:], y[num_train:].astype(np.int32)


def natural_splits(num_train=120, num_test=40, num_clients=6, seed=1):
    """Uneven, shuffled client splits: every training sample in one client; test samples 0 and 1 in none."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, num_train), num_clients - 1, replace=False))
    client_train = np.split(rng.permutation(num_train), cuts)
    client_test = np.array_split(2 + rng.permutation(num_test - 2), num_clients)
    return client_train, client_test


def tiny(**overrides):
    return ExperimentConfig().with_overrides({
        "federation.num_clients": 6, "federation.clients_per_round": 3, "federation.rounds": 2,
        "training.local_epochs": 1, "training.batch_size": 10, "training.lr": 0.05, "device": "cpu",
        "execution.executor": "sequential", "partition.scheme": "iid", **overrides})


def load(name, seed=0):
    return load_dataset(DataConfig(name=name), 6, np.random.default_rng(seed))


def load_blobs(rng):
    """A loader as a module path names it (`test_own_data:load_blobs`): data drawn from the run's stream."""
    return dataset_from_arrays("ignored", *blobs(seed=int(rng.integers(1000))))


# ----- registration round trips -----


def test_arrays_round_trip_as_float32_inputs_and_int64_labels():
    x_train, y_train, x_test, y_test = blobs()
    entry = register_dataset("blobs", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    x_train[0] += 100.0  # registered data is a copy: later changes to the arrays do not reach it
    data = load("blobs")
    assert data.name == "blobs" and data.source == entry.origin == f"module {__name__}"
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert torch.equal(data.x_train[1:], torch.tensor(x_train[1:], dtype=torch.float32))
    assert float(data.x_train[0, 0]) == pytest.approx(float(x_train[0, 0]) - 100.0, abs=1e-4)
    assert torch.equal(data.y_test, torch.tensor(y_test, dtype=torch.int64))
    assert data.num_classes == int(max(y_train.max(), y_test.max())) + 1 == NUM_CLASSES
    assert data.input_shape == (12,) and not data.has_natural_clients
    # the name is a valid data.name from now on, and a run loads the same tensors
    assert torch.equal(load_data(tiny(**{"data.name": "blobs"})).x_test, data.x_test)


def test_a_name_is_refused_before_it_is_registered_and_num_classes_can_be_more_than_seen():
    with pytest.raises(ValueError, match=r"^data.name .*got 'blobs'"):
        tiny(**{"data.name": "blobs"})
    x_train, y_train, x_test, y_test = (torch.as_tensor(a) for a in blobs())
    register_dataset("blobs", x_train=x_train.float(), y_train=y_train, x_test=x_test, y_test=y_test,
                     num_classes=7)
    data = load("blobs")
    assert data.num_classes == 7 and data.x_train.data_ptr() != x_train.data_ptr()  # tensors are copied too


class Pairs(torch.utils.data.Dataset):
    """A map-style Dataset of (tensor, int) pairs, as users write them."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, index):
        return torch.as_tensor(self.x[index], dtype=torch.float32), int(self.y[index])


class Stream(torch.utils.data.IterableDataset):
    """An iterable Dataset (no len), yielding numpy inputs and numpy integer labels."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x, self.y))


def test_a_torch_dataset_pair_is_read_into_tensors_once():
    x_train, y_train, x_test, y_test = blobs(shape=(1, 5, 5))
    register_dataset("pairs", (Pairs(x_train, y_train), Pairs(x_test, y_test)))
    tensors = torch.utils.data.TensorDataset(torch.tensor(x_train), torch.tensor(y_train, dtype=torch.long))
    register_dataset("tensors", (tensors, Stream(x_test, y_test)))
    pairs, other_kinds = load("pairs"), load("tensors")
    assert pairs.input_shape == (1, 5, 5) and pairs.num_classes == NUM_CLASSES
    assert torch.equal(pairs.x_train, torch.tensor(x_train, dtype=torch.float32))
    assert torch.equal(pairs.y_train, torch.tensor(y_train, dtype=torch.long))
    assert torch.equal(other_kinds.x_train, pairs.x_train) and torch.equal(other_kinds.y_test, pairs.y_test)
    assert pairs.digest == other_kinds.digest  # same content, same digest
    # a workbench Dataset itself can be registered under another name
    register_dataset("renamed", pairs)
    renamed = load("renamed")
    assert renamed.name == "renamed" and renamed.digest == pairs.digest


def test_a_loader_gets_the_runs_data_stream_and_a_module_path_needs_no_registration():
    calls = []

    def my_loader(num_clients, rng):
        calls.append((num_clients, type(rng)))
        x_train, y_train, x_test, y_test = blobs(seed=int(rng.integers(1000)))
        return Pairs(x_train, y_train), Pairs(x_test, y_test)

    entry = register_dataset("loaded", my_loader)
    assert entry.origin == f"module {__name__}"
    first, again = load_data(tiny(**{"data.name": "loaded"})), load_data(tiny(**{"data.name": "loaded"}))
    other_seed = load_data(tiny(**{"data.name": "loaded", "seed": 1}))
    assert calls == [(6, np.random.Generator)] * 3
    assert torch.equal(first.x_train, again.x_train) and not torch.equal(first.x_train, other_seed.x_train)
    assert first.name == "loaded" and first.source == f"module {__name__}"
    path = f"{__name__}:load_blobs"
    by_path = load_data(tiny(**{"data.name": path}))
    assert by_path.name == path and by_path.source == f"module {__name__}"
    expected = blobs(seed=int(stream(tiny().seed, STREAM_DATA).integers(1000)))
    assert torch.equal(by_path.x_train, torch.tensor(expected[0], dtype=torch.float32))


# ----- natural clients and every scheme -----


def test_natural_splits_with_per_client_test_sets_drive_the_partition_and_per_client_accuracy(one_thread):
    x_train, y_train, x_test, y_test = blobs()
    client_train, client_test = natural_splits()
    register_dataset("clients", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                     client_train=client_train, client_test=client_test)
    config = tiny(**{"data.name": "clients", "partition.scheme": "natural"})
    federation = prepare(config)
    assert [c.tolist() for c in federation.clients] == [sorted(c.tolist()) for c in client_train]
    assert federation.client_tests.rule == "natural"
    assert [c.tolist() for c in federation.client_tests.indices] == [sorted(c.tolist()) for c in client_test]
    history = run(federation)
    # each client's accuracy, computed here from the final global model and the client's own test samples
    with torch.no_grad():
        correct = federation.model(torch.tensor(x_test, dtype=torch.float32)).argmax(1).numpy() == y_test
    expected = {k: float(np.mean(correct[idx])) for k, idx in enumerate(client_test)}
    assert history.rounds[-1].client_accuracy == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match=r"federation.num_clients=5, but data.name=clients has 6 natural clients"):
        prepare(config.with_overrides({"federation.num_clients": 5, "federation.clients_per_round": 2}))


@pytest.mark.parametrize("shape", [(1, 6, 6), (12,)], ids=["images", "vectors"])
def test_every_scheme_prepares_user_data(shape):
    x_train, y_train, x_test, y_test = blobs(shape=shape)
    client_train, client_test = natural_splits()
    register_dataset("mine", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                     client_train=client_train, client_test=client_test)
    for scheme in PARTITION_SCHEMES:
        config = tiny(**{"data.name": "mine", "partition.scheme": scheme})
        if scheme == "rotation" and len(shape) != 3:
            with pytest.raises(ValueError, match=r"^partition.scheme='rotation' rotates images .* but "
                                                 r"data.name=mine has inputs of shape \(12,\)"):
                prepare(config)
            continue
        federation = prepare(config)
        clients = federation.clients
        assert len(clients) == 6, scheme
        assert np.array_equal(np.sort(np.concatenate(clients)), np.arange(len(y_train))), scheme
        stats = federation.partition_stats
        assert stats == summarize(y_train, clients, NUM_CLASSES), scheme
        assert stats["num_samples"] == len(y_train) and stats["num_clients"] == 6, scheme
        assert all(np.isfinite(v) for v in stats.values()), scheme
        assert federation.client_tests is not None and federation.client_tests.sizes.sum() > 0, scheme
        skewed = not torch.equal(federation.dataset.x_train, torch.tensor(x_train, dtype=torch.float32))
        assert skewed == (scheme in FEATURE_SKEWS), scheme


# ----- the digest and the record -----


def recipe_digest(x_train, y_train, x_test, y_test, num_classes, client_train=None, client_test=None):
    """`Dataset.digest` as its docstring states it, written out independently."""
    h = hashlib.sha256()
    for array in (np.float32(x_train), np.int64(y_train), np.float32(x_test), np.int64(y_test)):
        h.update(f"{array.dtype.name} {array.shape};".encode() + array.astype(array.dtype.newbyteorder("<")).tobytes())
    h.update(f"num_classes={num_classes};".encode())
    for clients in (client_train, client_test):
        h.update(b"clients=none;" if clients is None else f"clients={len(clients)};".encode())
        for part in clients or ():
            part = np.sort(np.asarray(part)).astype("<i8")
            h.update(np.array([len(part)], "<i8").tobytes() + part.tobytes())
    return h.hexdigest()[:16]


def test_digest_follows_its_recipe_is_stable_and_changes_with_one_label():
    x_train, y_train, x_test, y_test = blobs(num_train=8, num_test=4, shape=(3,))
    client_train, client_test = [np.array([3, 0, 1]), np.arange(4, 8), np.array([2])], [[0], [1, 2], []]
    register_dataset("small", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                     client_train=client_train, client_test=client_test)
    described = describe_dataset(load("small"))
    assert described["digest"] == recipe_digest(x_train, y_train, x_test, y_test, NUM_CLASSES, client_train,
                                                client_test)
    assert describe_dataset(load("small", seed=5))["digest"] == described["digest"]  # another load, same data
    register_dataset("same_data", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                     client_train=client_train, client_test=client_test)
    assert describe_dataset(load("same_data"))["digest"] == described["digest"]  # the name is not content
    changed = y_train.copy()
    changed[5] = (changed[5] + 1) % NUM_CLASSES
    register_dataset("one_label_changed", x_train=x_train, y_train=changed, x_test=x_test, y_test=y_test,
                     client_train=client_train, client_test=client_test)
    assert describe_dataset(load("one_label_changed"))["digest"] != described["digest"]
    register_dataset("no_clients", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    assert describe_dataset(load("no_clients"))["digest"] == recipe_digest(x_train, y_train, x_test, y_test,
                                                                           NUM_CLASSES)


def test_describe_dataset_says_name_source_shape_and_counts():
    x_train, y_train, x_test, y_test = blobs(shape=(1, 6, 6))
    client_train, client_test = natural_splits()
    register_dataset("described", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                     client_train=client_train, client_test=client_test)
    described = describe_dataset(load("described"))
    assert set(described) == {"name", "digest", "source_type", "source", "schema", "profile"}
    assert described["name"] == "described" and described["source"] == f"module {__name__}"
    assert described["source_type"] == "code" and len(described["digest"]) == 16
    int(described["digest"], 16)
    assert json.loads(described["profile"]) == {"num_train": 120, "num_test": 40, "num_classes": NUM_CLASSES,
                                                "input_shape": [1, 6, 6], "num_natural_clients": 6,
                                                "has_client_test": True}
    schema = json.loads(described["schema"])["mlflow_tensorspec"]
    assert json.loads(schema["features"]) == [{"type": "tensor",
                                               "tensor-spec": {"dtype": "float32", "shape": [-1, 1, 6, 6]}}]
    assert json.loads(schema["targets"]) == [{"type": "tensor", "tensor-spec": {"dtype": "int64", "shape": [-1]}}]
    assert describe_dataset(load("described"), "another")["name"] == "another"
    assert describe_dataset(load_dataset(DataConfig(name="digits"), 6, np.random.default_rng(0)))["source"] == \
        "workbench built-in"


def test_describe_dataset_is_what_an_mlflow_dataset_input_takes(tracking_uri):
    from mlflow import MlflowClient
    from mlflow.entities import Dataset as MlflowDataset
    from mlflow.entities import DatasetInput, InputTag

    register_dataset("logged", x_train=blobs()[0], y_train=blobs()[1], x_test=blobs()[2], y_test=blobs()[3])
    described = describe_dataset(load("logged"))
    client = MlflowClient(tracking_uri)
    run_id = client.create_run(client.create_experiment("data")).info.run_id
    client.log_inputs(run_id, datasets=[DatasetInput(MlflowDataset(**described),
                                                     tags=[InputTag("mlflow.data.context", "train")])])
    (logged,) = client.get_run(run_id).inputs.dataset_inputs
    assert (logged.dataset.name, logged.dataset.digest, logged.dataset.source) == \
        ("logged", described["digest"], f"module {__name__}")
    assert json.loads(logged.dataset.profile)["num_train"] == 120


# ----- messages for bad input -----


def arrays(**changes):
    x_train, y_train, x_test, y_test = blobs(num_train=20, num_test=8)
    values = {"x_train": x_train, "y_train": y_train.astype(np.int64), "x_test": x_test,
              "y_test": y_test.astype(np.int64)}
    for key, change in changes.items():
        values[key] = change(values.get(key))
    return values


def with_value(index, value):
    def change(array):
        array = array.copy()
        array[index] = value
        return array
    return change


BAD_INPUT = [
    (arrays(y_train=with_value(3, -1)), ValueError,
     r"^y_train: label -1 \(sample 3\) is negative; labels must be integers 0\.\.C-1 \(remap them"),
    ({**arrays(y_test=with_value(5, 4)), "num_classes": 4}, ValueError,
     r"^y_test: label 4 \(sample 5\) is >= num_classes=4; labels must be integers 0\.\.3 \(pass num_classes=5, "
     r"or remap the labels to 0\.\.3\)$"),
    (arrays(y_train=lambda y: y.astype(np.float64)), TypeError,
     r"^y_train has dtype float64; labels must be integers 0\.\.C-1 \(if they are class ids, pass "),
    (arrays(y_train=lambda y: np.eye(NUM_CLASSES)[y].astype(np.int64)), ValueError,
     r"^y_train has shape \(20, 4\); labels must be one integer per sample, shape \(num_samples,\) \(for one-hot "
     r"labels pass y.argmax\(1\)"),
    (arrays(y_train=lambda y: y[:-1]), ValueError,
     r"^x_train has 20 samples but y_train has 19 labels; they must have the same length \(one label per input\)$"),
    (arrays(x_test=lambda x: x[:, :5]), ValueError,
     r"^x_test samples have shape \(5,\) but x_train samples have shape \(12,\); train and test inputs must have "
     r"the same shape$"),
    (arrays(x_train=lambda x: x[:, 0]), ValueError,
     r"^x_train has shape \(20,\); inputs must have shape \(num_samples, \*input_shape\) \(for one feature per "
     r"sample pass x.reshape\(-1, 1\)\)$"),
    (arrays(x_train=with_value((7, 2), np.nan)), ValueError,
     r"^x_train: sample 7 holds NaN or infinite values; inputs must be finite"),
    ({**arrays(), "client_train": [np.arange(0, 8), np.arange(8, 20), np.array([7])]}, ValueError,
     r"^client_train: training sample 7 is in client_train\[0\] and client_train\[2\]; each sample belongs to at "
     r"most one client$"),
    ({**arrays(), "client_train": [np.arange(20)], "client_test": [np.array([0, 1, 1])]}, ValueError,
     r"^client_test: test sample 1 is in client_test\[0\] twice; each sample belongs to at most one client$"),
    ({**arrays(), "client_train": [np.arange(0, 8), np.arange(9, 20)]}, ValueError,
     r"^client_train covers 19 of the 20 training samples \(sample 8 has no client\); under "
     r"partition.scheme=natural every training sample belongs to one client"),
    ({**arrays(), "client_train": [np.arange(0, 10), np.arange(10, 21)]}, ValueError,
     r"^client_train\[1\] holds index 20; indices must lie in 0\.\.19 \(x_train has 20 samples\)$"),
    ({**arrays(), "client_train": np.arange(20) % 3}, TypeError,
     r"^client_train is one array of shape \(20,\); it must be a list of index arrays, one per client \(if it "
     r"holds each sample's client id, pass \[np.flatnonzero\(ids == k\)"),
    ({**arrays(), "client_train": [np.arange(20) < 10, np.arange(20) >= 10]}, TypeError,
     r"^client_train\[0\] has dtype bool; client indices must be integers into x_train \(for a boolean mask "
     r"pass np.flatnonzero\(mask\)\)$"),
    ({**arrays(), "client_train": [np.arange(20), np.array([], dtype=np.int64)]}, ValueError,
     r"^client_train\[1\] is empty; every natural client needs at least one training sample"),
    ({**arrays(), "client_test": [np.arange(8)]}, ValueError, r"^client_test needs client_train: per-client test "
     r"splits belong to natural clients \(give client_train too, or leave client_test out\)$"),
    ({**arrays(), "client_train": [np.arange(10), np.arange(10, 20)], "client_test": [np.arange(8)]}, ValueError,
     r"^client_test has 1 clients but client_train has 2; give one test index array per client, in the same "
     r"order$"),
    ({**arrays(), "num_classes": 1}, ValueError, r"^num_classes=1: it must be an integer >= 2"),
    ({key: value for key, value in arrays().items() if key != "y_test"}, TypeError,
     r"^register_dataset\('bad', \.\.\.\) needs y_test too"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD_INPUT)
def test_bad_arrays_are_refused_with_the_field_the_value_and_a_fix(kwargs, error, message):
    with pytest.raises(error, match=message):
        register_dataset("bad", **kwargs)
    assert "bad" not in DATASETS


def test_bad_sources_are_refused_with_what_to_pass_instead():
    x_train, y_train, x_test, y_test = blobs()
    with pytest.raises(TypeError, match=r"^register_dataset\('bad', \(array, array\)\): a pair of arrays looks "
                                        r"like \(x, y\); give x_train, y_train, x_test, y_test \(by keyword"):
        register_dataset("bad", (x_train, y_train))
    with pytest.raises(ValueError, match=r"^register_dataset\('digits', \.\.\.\): 'digits' is a built-in dataset"):
        register_dataset("digits", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    with pytest.raises(TypeError, match=r"give either source or the arrays"):
        register_dataset("bad", (Pairs(x_train, y_train), Pairs(x_test, y_test)), x_train=x_train)
    bad_labels = y_train.copy()
    bad_labels[2] = -4
    with pytest.raises(ValueError, match=r"^train labels: label -4 \(sample 2\) is negative"):
        register_dataset("bad", (Pairs(x_train, bad_labels), Pairs(x_test, y_test)))
    from PIL import Image

    images = [(Image.fromarray(np.zeros((5, 5), np.uint8)), 0)] * 3
    with pytest.raises(TypeError, match=r"^train\[0\] input is a PIL image; give the Dataset a transform that makes "
                                        r"tensors \(torchvision.transforms.ToTensor\(\)\)$"):
        register_dataset("bad", (images, images))
    register_dataset("returns_a_dict", lambda: {"x_train": x_train})
    with pytest.raises(TypeError, match=r"^data.name='returns_a_dict': the loader .*<lambda> returned a dict; a "
                                        r"loader must return a workbench.data.Dataset"):
        load("returns_a_dict")
    # a loader's own Dataset is checked as registered arrays are
    register_dataset("returns_bad_labels", lambda: Dataset("x", *(torch.as_tensor(a) for a in
                                                                   (x_train, y_train - 1, x_test, y_test)), 4))
    with pytest.raises(ValueError, match=r"^y_train: label -1 \(sample \d+\) is negative"):
        load("returns_bad_labels")


# ----- end to end -----


def test_a_run_on_registered_data_gives_the_numbers_of_the_same_built_in_data(one_thread):
    overrides = {"partition.scheme": "dirichlet", "federation.rounds": 3, "model.name": "mlp", "training.lr": 0.2,
                 "training.local_epochs": 2}
    builtin = tiny(**{"data.name": "digits", **overrides})
    digits = load_data(builtin)
    register_dataset("my_digits", x_train=digits.x_train, y_train=digits.y_train, x_test=digits.x_test,
                     y_test=digits.y_test)
    mine = prepare(tiny(**{"data.name": "my_digits", **overrides}))
    assert mine.dataset.source == f"module {__name__}"
    ours, theirs = run(mine), run(builtin)  # execution.executor=sequential (tiny)
    assert [r.metrics["test_accuracy"] for r in ours.rounds] == [r.metrics["test_accuracy"] for r in theirs.rounds]
    assert [r.client_accuracy for r in ours.rounds] == [r.client_accuracy for r in theirs.rounds]
    assert ours.final()["test_accuracy"] > 0.5  # 10 classes: far above chance after 3 rounds

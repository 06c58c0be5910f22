"""The deployable global model: every finished run's `runs:/RUN_ID/model` is an MLflow pyfunc model that
`mlflow models serve` serves, `workbench register` puts it in the Model Registry, and `load_model` reads
the same folder as before."""

import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
import torch
from helpers import stop_process_group
from mlflow.tracking import MlflowClient
from torch import nn

from workbench.cli import main
from workbench.config import ExperimentConfig
from workbench.simulation import load_data, prepare, run
from workbench.tracking import MlflowCallback, load_model, log_model
from workbench.tracking.deploy import NUM_EXAMPLE_ROWS, save_served_model, served_model_uri

DIGITS = {"data.name": "digits", "model.name": "logreg", "federation.rounds": 2, "federation.num_clients": 6,
          "federation.clients_per_round": 3, "training.local_epochs": 1, "device": "cpu",
          "execution.executor": "sequential"}


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def logreg_probabilities(state: dict, x: np.ndarray) -> np.ndarray:
    """softmax(x W^T + b) in float64 numpy, from a logreg's weights: the math, apart from torch."""
    weight, bias = state["linear.weight"].double().numpy(), state["linear.bias"].double().numpy()
    return softmax(x.reshape(len(x), -1).astype(np.float64) @ weight.T + bias)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, _template_store):
    """One finished 2-round digits run in a store of this module's own: (tracking URI, run id, federation)."""
    folder = tmp_path_factory.mktemp("deploy-store")
    shutil.copy(_template_store, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    federation = prepare(ExperimentConfig().with_overrides(DIGITS))
    tracker = MlflowCallback(uri, experiment="deploy", state_dir=folder / "state")
    run(federation, [tracker])
    return uri, tracker.run_id, federation


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_model_server(model_uri: str, tracking_uri: str, log: Path, timeout_s: float = 300) -> tuple:
    """`mlflow models serve` in its own process group, once it answers /ping: (process, base URL)."""
    port = free_port()
    bin_dir = Path(sys.executable).parent  # MLflow starts `uvicorn` from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited {process.returncode}: {log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/ping", timeout=2).ok:
                return process, url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    stop_process_group(process)
    raise RuntimeError(f"mlflow models serve did not answer /ping in {timeout_s} s: {log.read_text()[-3000:]}")


@pytest.mark.mlflow
def test_mlflow_models_serve_answers_what_load_model_computes(digits_run, tmp_path):
    uri, run_id, federation = digits_run
    x = federation.dataset.x_test[5:17].numpy()  # 12 rows, not the input example's
    network = load_model(run_id, uri)
    with torch.no_grad():
        logits = network(torch.from_numpy(x)).double().numpy()
    expected = logreg_probabilities(federation.model.state_dict(), x)
    assert np.abs(softmax(logits) - expected).max() < 1e-6  # load_model is the trained model
    process, url = start_model_server(served_model_uri(run_id), uri, tmp_path / "serve.log")
    try:
        answer = requests.post(f"{url}/invocations", json={"inputs": x.tolist()}, timeout=60)
        assert answer.status_code == 200, answer.text
        predictions = answer.json()["predictions"]
        probabilities = np.asarray(predictions["probabilities"])
        assert probabilities.shape == (12, 10)
        assert np.abs(probabilities - softmax(logits)).max() < 1e-5
        assert predictions["predicted_class"] == logits.argmax(axis=1).tolist()
        assert len(set(predictions["predicted_class"])) > 1  # a model that tells digits apart
        example = Path(MlflowClient(uri).download_artifacts(run_id, "model/serving_input_example.json",
                                                            str(tmp_path))).read_text()
        logged = requests.post(f"{url}/invocations", data=example, headers={"Content-Type": "application/json"},
                               timeout=60)
        assert logged.status_code == 200, logged.text
        first = federation.dataset.x_test[:NUM_EXAMPLE_ROWS].numpy()
        assert np.abs(np.asarray(logged.json()["predictions"]["probabilities"])
                      - logreg_probabilities(federation.model.state_dict(), first)).max() < 1e-5
        flat = requests.post(f"{url}/invocations", json={"inputs": x.reshape(12, 64).tolist()}, timeout=60)
        assert flat.status_code == 400 and "shape" in flat.text  # the signature's (-1, 1, 8, 8) is enforced
    finally:
        stop_process_group(process)


@pytest.mark.mlflow
def test_signature_and_input_example(digits_run, monkeypatch, tmp_path):
    uri, run_id, federation = digits_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    info = mlflow.models.get_model_info(served_model_uri(run_id))
    assert info.run_id == run_id and info.flavors["python_function"]["loader_module"] == "workbench_served_model"
    (inputs,) = info.signature.inputs.inputs
    assert (inputs.type, inputs.shape) == (np.dtype("float32"), (-1, 1, 8, 8))
    outputs = {spec.name: (spec.type, spec.shape) for spec in info.signature.outputs.inputs}
    assert outputs == {"predicted_class": (np.dtype("int64"), (-1,)),
                       "probabilities": (np.dtype("float32"), (-1, 10))}
    assert info.metadata["task"] == "classification" and info.metadata["num_classes"] == 10
    model = mlflow.pyfunc.load_model(served_model_uri(run_id))
    example = np.asarray(model.input_example)
    assert np.array_equal(example, federation.dataset.x_test[:NUM_EXAMPLE_ROWS].numpy())  # data.scaling=none
    answer = model.predict(example)
    assert np.abs(answer["probabilities"] - logreg_probabilities(federation.model.state_dict(), example)).max() < 1e-6
    serving = json.loads(Path(MlflowClient(uri).download_artifacts(
        run_id, "model/serving_input_example.json", str(tmp_path))).read_text())
    assert np.array_equal(np.asarray(serving["inputs"], dtype=np.float32), example)  # what a client POSTs


@pytest.mark.mlflow
def test_register_adds_a_version_each_time_and_names_the_fix(digits_run, capsys):
    uri, run_id, federation = digits_run
    for version in ("1", "2"):
        assert main(["register", run_id, "--name", "digits-logreg", "--tracking-uri", uri]) == 0
        out = capsys.readouterr().out
        assert f"runs:/{run_id}/model as model 'digits-logreg', version {version}" in out
        assert f"mlflow models serve -m models:/digits-logreg/{version} --env-manager local" in out
    client = MlflowClient(uri)
    registered = client.get_model_version("digits-logreg", "2")
    assert registered.run_id == run_id and registered.source.endswith(f"{run_id}/artifacts/model")
    model = mlflow.pyfunc.load_model(client.get_model_version_download_uri("digits-logreg", "2"))
    x = federation.dataset.x_test[:3].numpy()
    expected = logreg_probabilities(federation.model.state_dict(), x)
    assert np.abs(model.predict(x)["probabilities"] - expected).max() < 1e-6

    assert main(["register", "0123456789abcdef0123456789abcdef", "--name", "m", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "no run '0123456789abcdef0123456789abcdef'" in err and "--tracking-uri" in err

    experiment = client.get_experiment_by_name("deploy").experiment_id
    running = client.create_run(experiment).info.run_id
    assert main(["register", running, "--name", "m", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert f"run {running} has no MLflow model" in err and f"workbench resume {running}" in err


@pytest.mark.mlflow
def test_a_run_logged_before_mlflow_models_still_loads_and_register_says_why_not(digits_run, capsys):
    uri, _, federation = digits_run
    client = MlflowClient(uri)
    old = client.create_run(client.get_experiment_by_name("deploy").experiment_id).info.run_id
    log_model(client, old, federation)  # the model/ folder as runs logged it before: safetensors only
    client.set_terminated(old, "FINISHED")
    model = load_model(old, uri)
    for key, value in federation.model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)
    assert main(["register", old, "--name", "m", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert f"run {old} has no MLflow model" in err and "logged before workbench logged MLflow models" in err


@pytest.mark.mlflow
def test_a_scaled_run_serves_raw_inputs(tracking_uri, tmp_path, monkeypatch):
    """data.scaling=federated: the model takes inputs as loaded and standardizes them itself, with the
    pooled mean and std of the training inputs (computed here with numpy: the partition covers them all)."""
    config = ExperimentConfig().with_overrides({**DIGITS, "data.scaling": "federated"})
    tracker = MlflowCallback(tracking_uri, experiment="scaled")
    federation = prepare(config)
    run(federation, [tracker])
    raw = load_data(config)
    x_train = raw.x_train.numpy().reshape(len(raw.x_train), -1).astype(np.float64)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std[std <= 1e-12 * mean * mean] = 1.0  # constant pixels (the digits' corners) keep std 1
    x = raw.x_test[:9].numpy()
    expected = logreg_probabilities(federation.model.state_dict(), (x.reshape(9, -1) - mean) / std)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    model = mlflow.pyfunc.load_model(served_model_uri(tracker.run_id))
    assert np.abs(model.predict(x)["probabilities"] - expected).max() < 1e-5
    assert np.abs(np.asarray(model.input_example) - raw.x_test[:NUM_EXAMPLE_ROWS].numpy()).max() < 1e-5


def test_a_regression_model_answers_in_raw_target_units(tmp_path):
    """The regression path of the served model, on a hand-made nn.Linear(3, 1): standardize the raw inputs,
    the linear map, then back to raw target units (p * std + mean), against numpy."""
    network = nn.Linear(3, 1)
    with torch.no_grad():
        network.weight.copy_(torch.tensor([[0.5, -2.0, 1.25]]))
        network.bias.fill_(0.3)
    feature_mean, feature_std = np.array([1.0, -4.0, 10.0]), np.array([2.0, 0.5, 4.0])
    target_mean, target_std = 150.0, 75.0
    x = np.array([[1.0, -4.0, 10.0], [3.0, -3.5, 6.0], [-1.0, -5.0, 18.0], [0.2, 0.0, 0.0]], dtype=np.float32)
    save_served_model(tmp_path / "model", network, task="regression", num_classes=0, input_example=x[:2],
                      feature_scale=(feature_mean, feature_std), target_scale=(target_mean, target_std))
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    scaled = (x.astype(np.float64) - feature_mean) / feature_std
    expected = (scaled @ np.array([0.5, -2.0, 1.25]) + 0.3) * target_std + target_mean
    predicted = model.predict(x)
    assert predicted.shape == (4,) and predicted.dtype == np.float32
    np.testing.assert_allclose(predicted, expected, rtol=1e-6)  # float32 of values up to ~1,300
    assert expected[0] == pytest.approx(0.3 * target_std + target_mean)  # the mean input: the bias alone
    (output,) = model.metadata.signature.outputs.inputs
    assert (output.type, output.shape) == (np.dtype("float32"), (-1,))
    assert model.metadata.metadata["task"] == "regression"


def test_a_network_that_cannot_be_pickled_is_refused_with_the_reason(tmp_path):
    class Locked(nn.Linear):
        def __init__(self):
            super().__init__(2, 2)
            self.lock = threading.Lock()

    with pytest.raises(ValueError, match="Locked.*lock"):
        save_served_model(tmp_path / "model", Locked(), task="classification", num_classes=2,
                          input_example=np.zeros((1, 2), dtype=np.float32))


USER_MODULE = """
import torch
from torch import nn


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(4, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)))
"""


def test_a_model_class_from_the_users_own_module_travels_by_value(tmp_path, monkeypatch):
    """A class from a module of the user's (a notebook's helper file) is pickled by value: the model loads and
    answers after that module is gone, as in a serving process that cannot import it."""
    (tmp_path / "my_cells.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_cells

    torch.manual_seed(3)
    network = my_cells.TwoLayer()
    state = {k: v.double().numpy() for k, v in network.state_dict().items()}
    x = np.array([[0.5, -1.0, 2.0, 0.0], [1.5, 0.25, -0.75, 3.0]], dtype=np.float32)
    save_served_model(tmp_path / "model", network, task="classification", num_classes=3, input_example=x)
    del sys.modules["my_cells"]
    (tmp_path / "my_cells.py").unlink()
    sys.path.remove(str(tmp_path))
    importlib.invalidate_caches()
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("my_cells")
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    hidden = np.tanh(x.astype(np.float64) @ state["hidden.weight"].T + state["hidden.bias"])
    expected = softmax(hidden @ state["out.weight"].T + state["out.bias"])
    answer = model.predict(x)
    assert np.abs(answer["probabilities"] - expected).max() < 1e-6
    assert answer["predicted_class"].tolist() == expected.argmax(axis=1).tolist()

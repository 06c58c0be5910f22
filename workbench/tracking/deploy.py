"""The global model as a deployable MLflow model (a pyfunc with a signature and an input example, which
`mlflow models serve` serves), and its registration in the MLflow Model Registry.

A finished run's `model/` folder holds both: `weights.safetensors` and `model.json`, which
`workbench.tracking.load_model` reads (as it does for runs logged before MLflow models), and beside them
the MLflow model (`MLmodel`, the loader module under `code/`, the pickled network under `data/`, the
environment files, the input example), so that `runs:/RUN_ID/model` is the MLflow model. What it answers is
documented in `workbench/tracking/served_model.py`: inputs as loaded (it applies `data.scaling` itself), the
class and its probabilities, or the value in raw target units.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch
import yaml
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.models.utils import _save_example
from mlflow.protos.databricks_pb2 import (ALREADY_EXISTS, INVALID_PARAMETER_VALUE, RESOURCE_ALREADY_EXISTS,
                                          RESOURCE_DOES_NOT_EXIST, ErrorCode)
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec
from mlflow.utils.environment import _mlflow_conda_env, _PythonEnv
from torch import nn

from workbench.config import TASKS
from workbench.execution import model_payload
from workbench.simulation import Federation
from workbench.tracking import served_model
from workbench.tracking.checkpoints import MODEL_DIR
from workbench.tracking.store import default_tracking_uri, open_client

#: The pyfunc loader module MLflow imports to serve the model, copied into every model's `code/` folder under
#: a name of its own (the folder goes on `sys.path`).
SERVED_MODEL_CODE = Path(served_model.__file__)
LOADER_MODULE = "workbench_served_model"
#: The file that marks an MLflow model folder.
MLMODEL_FILE = "MLmodel"
#: Rows of the test set logged as the model's input example.
NUM_EXAMPLE_ROWS = 5
#: Why a finished run has no MLflow model (its network could not be pickled, say): load_model still works.
SERVED_MODEL_ERROR_TAG = "served_model_error"
#: What the served model needs, pinned to this environment's versions (workbench itself is not on PyPI:
#: a built-in model is served from the venv it was trained in, `--env-manager local`).
SERVING_PACKAGES = ("mlflow", "torch", "numpy", "cloudpickle")


def served_model_uri(run_id: str) -> str:
    """The MLflow model of a run, as `mlflow models serve -m` and the registry take it."""
    return f"runs:/{run_id}/{MODEL_DIR}"


def serving_signature(input_shape: tuple[int, ...], task: str, num_classes: int) -> ModelSignature:
    """Input: one float32 tensor (B, *input_shape). Output: a classification's `predicted_class` (int64, B)
    and `probabilities` (float32, B x C); a regression's value (float32, B)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, *input_shape))])
    if task == "regression":
        outputs = Schema([TensorSpec(np.dtype(np.float32), (-1,))])
    else:
        outputs = Schema([TensorSpec(np.dtype(np.int64), (-1,), "predicted_class"),
                          TensorSpec(np.dtype(np.float32), (-1, num_classes), "probabilities")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def raw_inputs(x: torch.Tensor, feature_scale: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """Inputs as the data was loaded, from inputs that `data.scaling` standardized with `feature_scale`
    (x * std + mean per flattened feature), as float32 numpy: what the served model reads."""
    array = x.detach().to("cpu", torch.float64).numpy()
    if feature_scale is not None:
        mean, std = feature_scale
        array = (array.reshape(len(array), -1) * std + mean).reshape(array.shape)
    return array.astype(np.float32)


def save_served_model(path: str | Path, network: nn.Module, *, task: str, num_classes: int,
                      input_example: np.ndarray, feature_scale: tuple[np.ndarray, np.ndarray] | None = None,
                      target_scale: tuple[float, float] | None = None, run_id: str | None = None) -> None:
    """Write `network` as an MLflow pyfunc model folder at `path` (created; it must not exist or be empty).

    `input_example` (k, *input_shape) is raw inputs (as loaded); `feature_scale` the (mean, std) per
    flattened feature the network's inputs were standardized with, `target_scale` the (mean, std) of a
    regression target the network was trained on standardized. The network is pickled with
    `workbench.execution.model_payload` (a notebook's classes by value), on the CPU, in eval mode; the loader
    module is `served_model.py`. Raises ValueError when the network cannot be pickled.

    The folder is laid out as `mlflow.pyfunc.save_model(loader_module=..., data_path=..., code_paths=...)` lays
    it out, but put together from MLflow's parts: save_model checks the requirements against every installed
    distribution's file list, 1-3 s on a process's first model here, more than a small run's training."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise ValueError(f"{path} is not empty; an MLflow model needs a folder of its own")
    input_shape = tuple(input_example.shape[1:])
    signature = serving_signature(input_shape, task, num_classes)
    try:
        on_cpu = copy.deepcopy(network).to("cpu").eval()
    except Exception as err:  # deepcopy raises what pickling raises, by object (TypeError, RuntimeError, ...)
        raise ValueError(f"the global model ({type(network).__qualname__}) cannot be copied to the CPU: "
                         f"{type(err).__name__}: {err}") from err
    try:
        payload = model_payload(on_cpu)
    except ValueError as err:
        raise ValueError(f"the global model cannot be pickled into an MLflow model ({err})") from err
    (path / "code").mkdir(parents=True, exist_ok=True)
    (path / "data").mkdir()
    shutil.copyfile(SERVED_MODEL_CODE, path / "code" / f"{LOADER_MODULE}.py")
    (path / "data" / served_model.NETWORK_FILE).write_bytes(payload)
    (path / "data" / served_model.SERVING_FILE).write_text(json.dumps(
        {"task": task, "target_scale": [float(v) for v in target_scale] if target_scale is not None else None}))
    if feature_scale is not None:
        mean, std = (np.asarray(v, dtype=np.float64) for v in feature_scale)
        np.savez(path / "data" / served_model.FEATURE_SCALE_FILE, mean=mean, std=std)
    requirements = [f"{p}=={importlib.metadata.version(p)}" for p in SERVING_PACKAGES]
    (path / "requirements.txt").write_text("\n".join(requirements))
    with open(path / "conda.yaml", "w") as file:
        yaml.safe_dump(_mlflow_conda_env(additional_pip_deps=requirements, install_mlflow=False), file,
                       default_flow_style=False)
    _PythonEnv.current().to_yaml(path / "python_env.yaml")
    metadata = {"task": task, "num_classes": num_classes, "input_shape": list(input_shape),
                "inputs": "raw (as loaded): data.scaling is applied inside the model",
                "outputs": ("value in raw target units (B,)" if task == "regression" else
                            "predicted_class (B,), probabilities (B, num_classes): softmax of the logits")}
    model = Model(artifact_path=MODEL_DIR, run_id=run_id, signature=signature, metadata=metadata)
    _save_example(model, np.ascontiguousarray(input_example, dtype=np.float32), str(path))
    mlflow.pyfunc.add_to_model(model, loader_module=LOADER_MODULE, data="data", code="code",
                               conda_env="conda.yaml", python_env="python_env.yaml")
    model.save(str(path / MLMODEL_FILE))


def log_served_model(client: MlflowClient, run_id: str, federation: Federation) -> None:
    """Add the MLflow model of a finished run's global model to its `model/` folder (beside the safetensors
    files `log_model` writes there), with a few raw rows of the test set as the input example.

    A network that cannot be saved so (one that cannot be pickled) leaves the run as it is, with the reason
    in the `served_model_error` tag and a warning: `load_model` still rebuilds it. Store errors propagate."""
    dataset = federation.dataset
    feature_scale = dataset.feature_scale
    example = raw_inputs(dataset.x_test[:NUM_EXAMPLE_ROWS], feature_scale)
    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder, MODEL_DIR)
        try:
            save_served_model(local, federation.model, task=dataset.task, num_classes=dataset.num_classes,
                              input_example=example, feature_scale=feature_scale,
                              target_scale=dataset.target_scale, run_id=run_id)
        except ValueError as err:
            message = f"{err} (load_model({run_id!r}) still rebuilds it from model/weights.safetensors)"
            warnings.warn(f"run {run_id}: {message}", stacklevel=2)
            client.set_tag(run_id, SERVED_MODEL_ERROR_TAG, message[:5000])
            return
        client.log_artifacts(run_id, str(local), MODEL_DIR)


def register_served_model(run_id: str, name: str, tracking_uri: str | None = None) -> ModelVersion:
    """Put a run's MLflow model (`runs:/RUN_ID/model`) in the MLflow Model Registry under `name`: a new
    version each call (1, 2, ...), the registered model created on the first. ValueError names the run and
    the fix when the run does not exist or has no MLflow model."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"--name must be a non-empty model name, got {name!r} (e.g. --name digits-classifier)")
    client = open_client(tracking_uri)
    where = tracking_uri or default_tracking_uri()
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        if err.error_code not in _error_codes(RESOURCE_DOES_NOT_EXIST, INVALID_PARAMETER_VALUE):
            raise
        raise ValueError(f"no run {run_id!r} in the MLflow store {where} (check the id in the MLflow UI, or "
                         f"pass --tracking-uri of the store the run was logged to)") from err
    files = {Path(a.path).name for a in client.list_artifacts(run_id, MODEL_DIR)}
    if MLMODEL_FILE not in files:
        raise ValueError(f"run {run_id} has no MLflow model at {served_model_uri(run_id)}: "
                         f"{_why_no_served_model(run, files)}")
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code not in _error_codes(RESOURCE_ALREADY_EXISTS, ALREADY_EXISTS):
            raise ValueError(f"--name {name!r} cannot name a registered model: {err.message}") from err
    return client.create_model_version(name, source=f"{run.info.artifact_uri.rstrip('/')}/{MODEL_DIR}",
                                       run_id=run_id)


def _error_codes(*codes: int) -> set[str]:
    return {ErrorCode.Name(code) for code in codes}


def _why_no_served_model(run: Any, files: set[str]) -> str:
    run_id, status = run.info.run_id, run.info.status
    if SERVED_MODEL_ERROR_TAG in run.data.tags:
        return (f"it could not be saved as one ({run.data.tags[SERVED_MODEL_ERROR_TAG]}); make the model "
                f"picklable by cloudpickle and run it again")
    if status == "RUNNING":
        return (f"the run is RUNNING and only a finished run logs its final model; wait until it finishes "
                f"(or, if it was stopped without ending, continue it with `workbench resume {run_id}`)")
    if status != "FINISHED":
        return (f"the run is {status} and only a finished run logs its final model; finish it with "
                f"`workbench resume {run_id}`")
    if "weights.safetensors" in files:
        return ("it was logged before workbench logged MLflow models (model/ holds only the safetensors "
                "weights, which load_model reads); run its config again (same config and seed, same model) "
                "and register the new run")
    return "it has no final model (model/ is empty); run its config again and register the new run"

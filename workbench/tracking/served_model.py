"""What a deployed workbench global model runs: the pyfunc loader module that `workbench.tracking.deploy`
copies into every MLflow model it writes (as `code/workbench_served_model.py`). It imports numpy, torch and
cloudpickle only, never workbench.

What the model answers (its signature says the same):

- input: float32 of shape (B, *input_shape), the inputs as the data was loaded, before `data.scaling`: the
  model standardizes them with the federation's statistics itself;
- a classification: {"predicted_class": int64 (B,), "probabilities": float32 (B, C)}, the argmax and the
  softmax of the network's logits;
- a regression: float32 (B,), the predicted value in the target's raw units (a target the data presented
  standardized is mapped back, p * std + mean).

The network is a cloudpickle file: classes defined in a notebook or in the user's own modules travel by
value, installed code (torch, workbench's built-in models) by reference, so serving a built-in model needs
the venv it was trained in (`mlflow models serve ... --env-manager local`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import torch

#: Files of the model's `data/` folder.
NETWORK_FILE = "network.cloudpickle"
SERVING_FILE = "serving.json"
FEATURE_SCALE_FILE = "feature_scale.npz"


def served_outputs(network: torch.nn.Module, inputs: Any, task: str,
                   feature_scale: tuple[np.ndarray, np.ndarray] | None,
                   target_scale: tuple[float, float] | None) -> dict[str, np.ndarray] | np.ndarray:
    """What the served model answers for `inputs` (B, *input_shape): standardize them as the federation did
    ((x - mean) / std per flattened feature, in float64, as `workbench.scaling.standardize`), run the network,
    then the class and softmax probabilities (a classification) or the value in raw target units."""
    x = np.asarray(inputs, dtype=np.float32)
    if feature_scale is not None:
        mean, std = feature_scale
        flat = x.reshape(len(x), -1).astype(np.float64)
        x = ((flat - mean) / std).reshape(x.shape).astype(np.float32)
    with torch.inference_mode():
        out = network(torch.from_numpy(np.ascontiguousarray(x)))
    if task == "regression":
        values = out.reshape(len(x)).to(torch.float64).numpy()
        if target_scale is not None:
            values = values * target_scale[1] + target_scale[0]
        return values.astype(np.float32)
    return {"predicted_class": out.argmax(dim=1).to(torch.int64).numpy(),
            "probabilities": torch.softmax(out.to(torch.float64), dim=1).to(torch.float32).numpy()}


class GlobalModel:
    """A run's final global model behind MLflow's pyfunc `predict`."""

    def __init__(self, network: torch.nn.Module, task: str, feature_scale: tuple[np.ndarray, np.ndarray] | None,
                 target_scale: tuple[float, float] | None):
        self.network = network
        self.task = task
        self.feature_scale = feature_scale
        self.target_scale = target_scale

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> dict[str, np.ndarray] | np.ndarray:
        return served_outputs(self.network, model_input, self.task, self.feature_scale, self.target_scale)


def _load_pyfunc(data_path: str) -> GlobalModel:
    """MLflow's entry point for a pyfunc loader module: the model in `data_path` (the model's `data/`)."""
    folder = Path(data_path)
    serving = json.loads((folder / SERVING_FILE).read_text())
    with open(folder / NETWORK_FILE, "rb") as file:
        network = cloudpickle.load(file).to("cpu").eval()
    feature_scale = None
    if (folder / FEATURE_SCALE_FILE).exists():
        with np.load(folder / FEATURE_SCALE_FILE, allow_pickle=False) as arrays:
            feature_scale = (arrays["mean"], arrays["std"])
    target = serving.get("target_scale")
    return GlobalModel(network, serving["task"], feature_scale,
                       (float(target[0]), float(target[1])) if target else None)

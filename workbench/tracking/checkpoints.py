"""Safetensors checkpoints and models: writing and reading a run's checkpoints, finding its latest one, and
rebuilding its global model."""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from workbench.models import MODELS, build_model, describe_model
from workbench.simulation import Federation
from workbench.tracking.store import default_state_root, open_client

MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"


def model_spec(federation: Federation) -> dict[str, Any]:
    """What rebuilds the global model's class: its name and shapes (`num_outputs`, what it was built with:
    the classes, or 1 for a regression, whose `num_classes` is 0), the dataset's `task`, and where its
    factory came from (`origin`, `import_path` when another process can import it, `factory` and `class`
    as `module:qualname`, for the message that says what to register)."""
    name = federation.config.model.name
    described = describe_model(name, federation.model)
    return {
        "model": name,
        "input_shape": list(federation.dataset.input_shape),
        "num_classes": federation.dataset.num_classes,
        "num_outputs": federation.dataset.num_outputs,
        "task": federation.dataset.task,
        "origin": described["model.source"],
        "import_path": described["model.import_path"] or None,
        "factory": _qualified(MODELS.resolve(name).factory),
        "class": described["model.class"],
    }


def _qualified(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def log_model(client: MlflowClient, run_id: str, federation: Federation) -> None:
    """The global model's weights as safetensors (no pickled code) plus what rebuilds its class."""
    spec = model_spec(federation)
    with tempfile.TemporaryDirectory() as folder:
        state = {k: v.detach().cpu().contiguous() for k, v in federation.model.state_dict().items()}
        save_file(state, os.path.join(folder, "weights.safetensors"))
        Path(folder, "model.json").write_text(json.dumps(spec, indent=2))
        client.log_artifacts(run_id, folder, MODEL_DIR)


def load_model(run_id: str, tracking_uri: str | None = None, round: int | str | None = None) -> nn.Module:
    """A run's global model, rebuilt as its own class with the logged weights: the final one, the one
    checkpointed after `round` N, or `round="best"` (the best by the task's headline metric,
    `tasks.headline_metric`: highest test accuracy, or lowest test MSE for a regression).

    Only safetensors files are read: a pickled checkpoint (which could run code when loaded) is refused.
    """
    client = open_client(tracking_uri)
    if round is None:
        path = MODEL_DIR
    elif round == "best":
        path = f"{CHECKPOINT_DIR}/best"
    elif isinstance(round, int) and not isinstance(round, bool):
        path = f"{CHECKPOINT_DIR}/round_{round:04d}"
        available = checkpoint_rounds(client, run_id)
        if round not in available:
            raise ValueError(f"round={round} has no checkpoint in run {run_id}; checkpointed rounds: "
                             f"{available or 'none'} (pick one, or load round='best' or the final model)")
    else:
        raise TypeError(f"round must be an int, 'best' or None, got {round!r}")
    with tempfile.TemporaryDirectory() as folder:
        try:
            local = Path(client.download_artifacts(run_id, path, folder))
        except MlflowException as err:
            raise ValueError(f"run {run_id} has no {path!r} artifacts (a run that did not finish has no "
                             f"final model: load one of its checkpoints with round=N)") from err
        spec, state, _ = read_checkpoint(local)
    return build_ready_model(spec, state, source=f"run {run_id}")


def build_ready_model(spec: Mapping[str, Any], state: Mapping[str, torch.Tensor], *,
                      source: str = "the checkpoint") -> nn.Module:
    """The model `spec` describes (`model_spec`) with the weights `state`, in eval mode. Its factory is the
    one registered under the spec's name in this session (built-ins included), else the one its `module:Name`
    name or recorded import path imports; otherwise ValueError says what to register. Weights that do not
    fit the model built (another class registered under the name) raise ValueError naming the parameters.
    The model is built with the spec's `num_outputs`; a spec written before tasks existed has only
    `num_classes`, which is then what the model outputs (every such run was a classification)."""
    name = spec["model"]
    shape, num_outputs = tuple(spec["input_shape"]), spec.get("num_outputs", spec["num_classes"])
    factory_name = _register_hint(spec)
    register = f"workbench.register_model({name!r}, {factory_name})"
    if name in MODELS or ":" in name:
        target = name
    elif spec.get("import_path"):
        target = spec["import_path"]
    else:
        origin = spec.get("origin", "an older workbench that did not record where models came from")
        raise ValueError(f"{source} trained model.name={name!r} ({origin}), which is not registered in this "
                         f"session and cannot be imported: define it again and call {register} before "
                         f"load_model")
    try:
        model = build_model(target, shape, num_outputs, torch.Generator())
    except ValueError as err:
        if target == name:
            raise
        raise ValueError(f"{source} trained model.name={name!r} from {target}, which cannot be built here "
                         f"({err}); put its module on PYTHONPATH, or call {register} before load_model") from err
    _check_state_fits(model, state, source, name, register)
    model.load_state_dict(state)
    return model.eval()


def _register_hint(spec: Mapping[str, Any]) -> str:
    """What to pass to `register_model` in a message: the recorded factory's name, or the model class's
    when the factory was a lambda (then its arguments are the user's to repeat)."""
    for key in ("factory", "class"):
        qualname = str(spec.get(key) or "").rpartition(":")[2]
        if qualname and "<" not in qualname:
            return qualname
    return "<your model factory>"


def _brief(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown} and {len(names) - limit} more" if len(names) > limit else shown


def _check_state_fits(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, name: str,
                      register: str) -> None:
    """Raise ValueError, naming a few parameters, when `state` is not `model`'s state_dict layout."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in expected
                if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or reshaped):
        return
    problems = [f"{label}: {_brief(names)}" for label, names in (
        ("missing from the weights", missing), ("in the weights but not in the model", unexpected),
        ("of another shape (weights vs model)", reshaped)) if names]
    built = f"{type(model).__module__}.{type(model).__qualname__}"
    raise ValueError(f"{source}'s weights do not fit model.name={name!r} as built here ({built}): "
                     f"{'; '.join(problems)}. Register the class the run trained ({register}) and load again")


# ----- checkpoints: safetensors only -----


@dataclass(frozen=True)
class Checkpoint:
    """The state after `round`: all a resume needs (random streams are derived from seed and round)."""

    run_id: str
    round: int
    state: dict[str, torch.Tensor]
    server_state: dict[str, torch.Tensor]
    best_round: int
    best_value: float
    is_remote: bool


def server_state(federation: Federation) -> dict[str, torch.Tensor]:
    """The strategy's own state (server moments, control variates, the privacy accountant, ...): its
    `state_dict()`, on the CPU. FedAvg and FedProx keep none."""
    return {k: v.detach().to("cpu", copy=True) for k, v in federation.strategy.state_dict().items()}


def write_checkpoint(folder: Path, spec: Mapping[str, Any], state: Mapping[str, torch.Tensor], round_: int,
                     best_round: int, best_value: float, strategy_state: Mapping[str, torch.Tensor], *,
                     spec_unchanged: bool = False) -> None:
    """`weights.safetensors` (round and best-so-far in its metadata) and `model.json` (kept as it is when
    `spec_unchanged` and present); each file is written beside and renamed into place, so a run killed
    mid-write leaves the previous checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"round": str(round_), "best_round": str(best_round), "best_value": repr(float(best_value)),
                "spec": json.dumps(dict(spec))}
    files = {"weights.safetensors": {k: v.contiguous() for k, v in state.items()}}
    if strategy_state:
        files["server.safetensors"] = {k: v.contiguous() for k, v in strategy_state.items()}
    for name, tensors in files.items():
        save_file(tensors, str(folder / f".{name}.tmp"), metadata=metadata)
        os.replace(folder / f".{name}.tmp", folder / name)
    if not (spec_unchanged and (folder / "model.json").exists()):
        (folder / ".model.json.tmp").write_text(json.dumps(dict(spec), indent=2))
        os.replace(folder / ".model.json.tmp", folder / "model.json")


_PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".joblib")


def read_checkpoint(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """(model spec, weights, metadata) of a checkpoint or model folder; refuses anything but safetensors."""
    weights = folder / "weights.safetensors"
    if not weights.exists():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(f"refusing to load {pickles[0]!r} from {folder.name!r}: pickled checkpoints can run "
                             f"code when loaded; workbench reads only weights.safetensors (re-save the state "
                             f"with safetensors.torch.save_file)")
        raise ValueError(f"{folder.name!r} holds no weights.safetensors")
    try:
        state = load_file(str(weights))
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as handle:
            metadata = dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{folder.name}/weights.safetensors is not a valid safetensors file ({err}); refusing "
                         f"to load it any other way") from err
    spec_file = folder / "model.json"
    spec = json.loads(spec_file.read_text()) if spec_file.exists() else json.loads(metadata.get("spec", "{}"))
    if not {"model", "input_shape", "num_classes"} <= set(spec):
        raise ValueError(f"{folder.name} has no model spec (model.json with model, input_shape, num_classes)")
    return spec, state, metadata


def checkpoint_rounds(client: MlflowClient, run_id: str) -> list[int]:
    """The rounds whose checkpoint a run logged to MLflow, in order."""
    names = [Path(a.path).name for a in client.list_artifacts(run_id, CHECKPOINT_DIR) if a.is_dir]
    return sorted(int(n.removeprefix("round_")) for n in names if re.fullmatch(r"round_\d+", n))


def _checkpoint_from(folder: Path, run_id: str, is_remote: bool) -> Checkpoint:
    _, state, metadata = read_checkpoint(folder)
    server_file = folder / "server.safetensors"
    return Checkpoint(run_id, int(metadata["round"]), state,
                      load_file(str(server_file)) if server_file.exists() else {},
                      int(metadata.get("best_round", 0)), float(metadata.get("best_value", "-inf")), is_remote)


def latest_checkpoint(run_id: str, tracking_uri: str | None = None,
                      state_dir: str | Path | None = None) -> Checkpoint | None:
    """The newest checkpoint of a run: this machine's local state or MLflow's, whichever is later."""
    client = open_client(tracking_uri)
    candidates = []
    local = Path(state_dir or default_state_root()) / run_id / "checkpoint"
    if (local / "weights.safetensors").exists():
        candidates.append(_checkpoint_from(local, run_id, is_remote=False))
    for round_ in reversed(checkpoint_rounds(client, run_id)):
        if candidates and round_ < candidates[0].round:
            break
        name = f"{CHECKPOINT_DIR}/round_{round_:04d}"
        files = [Path(a.path).name for a in client.list_artifacts(run_id, name)]
        if "weights.safetensors" not in files and not any(f.endswith(_PICKLE_SUFFIXES) for f in files):
            continue  # an upload that a hard kill cut short; anything else is read (and refused if unsafe)
        with tempfile.TemporaryDirectory() as folder:
            candidates.append(_checkpoint_from(Path(client.download_artifacts(run_id, name, folder)), run_id,
                                               is_remote=True))
        break
    return max(candidates, key=lambda c: (c.round, c.is_remote), default=None)

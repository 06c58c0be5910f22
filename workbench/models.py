"""The model zoo, by name, with input shapes taken from the dataset: the built-ins and the models users
register (`register_model`), in one registry (`workbench.registry.MODELS`)."""

from __future__ import annotations

import inspect
import math
from typing import Callable

import torch
from torch import nn

from workbench import registry
from workbench.registry import Entry


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: one linear layer on the flattened input (softmax in the loss)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        self.linear = nn.Linear(math.prod(input_shape), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class MLP(nn.Module):
    """The "2NN" of McMahan et al. 2017, §3: two hidden layers of 200 ReLU units."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int = 200):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(input_shape), hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class CNN(nn.Module):
    """The CNN of McMahan et al. 2017, §3: two 5x5 convolutions (32, 64 channels) each followed by 2x2
    max pooling, a 512-unit ReLU layer and a softmax output; 1,663,370 parameters on 28x28 inputs."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        channels, height, width = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        flat = 64 * (height // 4) * (width // 4)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(flat, 512), nn.ReLU(), nn.Linear(512, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


#: Every model by name: the built-ins below and what `register_model` adds (the registry `config`'s
#: `model.name` knob accepts names from; `module:Name` paths resolve by import).
MODELS = registry.MODELS
BUILTIN_MODELS = {"logreg": LogisticRegression, "mlp": MLP, "cnn": CNN}
for _name, _factory in BUILTIN_MODELS.items():
    MODELS.register(_name, _factory, builtin=True)

_SIGNATURE_RULE = "a model factory is called as factory(input_shape, num_classes) and returns a torch.nn.Module"


def register_model(name: str, factory: Callable[..., nn.Module]) -> Entry:
    """Make `model.name=<name>` build `factory(input_shape, num_classes)`: a `torch.nn.Module` class whose
    constructor takes those two arguments, or any callable that returns a module (wrap a class with other
    arguments: `register_model("tiny", lambda input_shape, num_classes: Tiny(hidden=8))`).

    Registering a name again replaces it (a notebook cell run twice). Built-in names cannot be replaced.
    Weights are re-initialised from the run's seed whatever the factory does, like the built-ins'.
    A class defined in a notebook trains with every executor; to rebuild it later in another session
    (`load_model`), register it again there or define it in an importable module.
    """
    if isinstance(name, str) and name in BUILTIN_MODELS and factory is not BUILTIN_MODELS[name]:
        raise ValueError(f"register_model({name!r}, ...): {name!r} is a built-in model of workbench "
                         f"({', '.join(BUILTIN_MODELS)}); register yours under another name")
    if isinstance(factory, nn.Module):
        raise TypeError(f"register_model({name!r}, ...) needs a class or a factory that builds a fresh model, "
                        f"got a {type(factory).__name__} instance (pass the class: "
                        f"register_model({name!r}, {type(factory).__name__}))")
    _check_signature(name, factory)
    return MODELS.register(name, factory)


def _check_signature(name: object, factory: object) -> None:
    if not callable(factory):
        return  # the registry refuses it with its own message
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin or C callable: nothing to check before the first call
        return
    try:
        signature.bind((1,), 2)
    except TypeError as err:
        label = getattr(factory, "__name__", type(factory).__name__)
        fix = ("give it those two parameters: lambda input_shape, num_classes: ..." if label == "<lambda>" else
               f"wrap it: register_model({name!r}, lambda input_shape, num_classes: {label}(...))")
        raise TypeError(f"register_model({name!r}, {label}): {label}{signature} cannot be called as "
                        f"{label}(input_shape, num_classes) ({err}); {_SIGNATURE_RULE} ({fix})") from err


def describe_model(name: str, model: nn.Module | None = None) -> dict[str, str]:
    """Where the model called `name` comes from, for a run's record (MLflow params):
    `model.source` (the registry's origin: "workbench", "module <path>", "defined in __main__ (a notebook
    or script)", "lambda in <module>") and `model.import_path` (`module:Name` that another process can
    import; empty when there is none); with `model`, also `model.class`, the `module:Name` of the class
    actually trained (a hand-built `Federation` may hold another model than its config names)."""
    entry = MODELS.resolve(name)
    described = {"model.source": entry.origin, "model.import_path": entry.import_path or ""}
    if model is not None:
        described["model.class"] = f"{type(model).__module__}:{type(model).__qualname__}"
    return described


def check_model_fits(name: str, input_shape: tuple[int, ...]) -> None:
    """Reject a model that cannot take this input, naming the field and what would work."""
    if name == "cnn" and (len(input_shape) != 3 or min(input_shape[1:]) < 4):
        raise ValueError(
            f"model.name='cnn' needs images (channels x height x width, at least 4x4), but the dataset's "
            f"samples have shape {tuple(input_shape)} (use model.name=logreg or mlp, or an image dataset: "
            "digits, fashion_mnist, mnist, cifar10)"
        )


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, generator: torch.Generator) -> nn.Module:
    """A freshly initialised model: a registered name (built-in or `register_model`) or a `module:Name`
    path; `generator` makes the initial weights reproducible."""
    entry = MODELS.resolve(name)
    check_model_fits(name, input_shape)
    input_shape = tuple(input_shape)
    label = getattr(entry.factory, "__name__", type(entry.factory).__name__)
    try:
        model = entry.factory(input_shape, num_classes)
    except TypeError as err:
        raise TypeError(f"model.name={name!r}: {label}({input_shape}, {num_classes}) failed ({err}); "
                        f"{_SIGNATURE_RULE}") from err
    if not isinstance(model, nn.Module):
        raise TypeError(f"model.name={name!r}: {label}({input_shape}, {num_classes}) returned "
                        f"{type(model).__name__}, not a torch.nn.Module ({_SIGNATURE_RULE})")
    if not any(True for _ in model.parameters()):
        raise ValueError(f"model.name={name!r}: {label}({input_shape}, {num_classes}) built a "
                         f"{type(model).__name__} without parameters: there is nothing to train (give it layers)")
    # nn.init draws from the global generator; re-draw every tensor from ours instead.
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim > 1:
                fan_in = math.prod(param.shape[1:])
                bound = 1.0 / math.sqrt(fan_in)
                param.uniform_(-bound, bound, generator=generator)
            else:
                param.uniform_(-0.01, 0.01, generator=generator)
    return model

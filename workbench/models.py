"""The model zoo, by name, with input shapes taken from the dataset."""

from __future__ import annotations

import math

import torch
from torch import nn


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


MODELS: dict[str, type[nn.Module]] = {"logreg": LogisticRegression, "mlp": MLP, "cnn": CNN}


def check_model_fits(name: str, input_shape: tuple[int, ...]) -> None:
    """Reject a model that cannot take this input, naming the field and what would work."""
    if name == "cnn" and (len(input_shape) != 3 or min(input_shape[1:]) < 4):
        raise ValueError(
            f"model.name='cnn' needs images (channels x height x width, at least 4x4), but the dataset's "
            f"samples have shape {tuple(input_shape)} (use model.name=logreg or mlp, or an image dataset: "
            "digits, fashion_mnist, mnist, cifar10)"
        )


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, generator: torch.Generator) -> nn.Module:
    """A freshly initialised model; `generator` makes the initial weights reproducible."""
    check_model_fits(name, input_shape)
    model = MODELS[name](tuple(input_shape), num_classes)
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

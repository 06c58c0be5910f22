"""One client's local work: epochs of mini-batch SGD, the FedProx proximal term, and stragglers' partial work."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ClientUpdate:
    """What one client sends back after local work."""

    client: int
    state: dict[str, torch.Tensor]
    num_samples: int
    num_epochs: int
    #: mean cross-entropy of the local mini-batches, over every local step (not the global model's loss)
    local_train_loss: float
    is_partial: bool


def proximal_penalty(params: Iterable[torch.Tensor], anchors: Iterable[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's proximal term (mu/2) * ||w - w_global||^2 (Li et al., MLSys 2020, Eq. 2)."""
    return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))


def proximal_gradient(param: torch.Tensor, anchor: torch.Tensor, mu: float) -> torch.Tensor:
    """The gradient of `proximal_penalty` with respect to one parameter: mu * (w - w_global)."""
    return mu * (param - anchor)


def train_locally(
    model: nn.Module,
    global_state: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_epochs: int,
    batch_size: int,
    lr: float,
    mu: float,
    generator: torch.Generator,
) -> tuple[dict[str, torch.Tensor], float]:
    """Run `num_epochs` of mini-batch SGD on (x, y) from the global weights; return the new weights and
    the mean training loss over all local steps (cross-entropy, without the proximal term).

    `model` is scratch space: its weights are overwritten. The proximal term enters as its exact
    gradient mu * (w - w_global) added to each step's gradient, which equals back-propagating
    `proximal_penalty` but skips building its graph.
    """
    model.load_state_dict(global_state)
    model.train()
    names = [name for name, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    anchors = [global_state[name].detach() for name in names]
    total_loss = torch.zeros((), dtype=params[0].dtype, device=x.device)  # float64 models sum in float64
    num_samples = len(y)
    for _ in range(num_epochs):
        order = torch.randperm(num_samples, generator=generator).to(x.device)
        for start in range(0, num_samples, batch_size):
            batch = order[start:start + batch_size]
            loss = F.cross_entropy(model(x[batch]), y[batch])
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for param, grad, anchor in zip(params, grads, anchors):
                    if mu:
                        grad = grad + proximal_gradient(param, anchor, mu)
                    param.add_(grad, alpha=-lr)
                total_loss += loss.detach() * len(batch)
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    return state, float(total_loss) / (num_samples * num_epochs)

"""One client's local work: what it is asked to minimize (`LocalObjective`), its assignment in a round
(`ClientTask`), local SGD on the task's loss with momentum, weight decay, the FedProx proximal term and
SCAFFOLD's gradient correction (`train_locally`), and what it sends back (`ClientUpdate`, `finish_update`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from workbench.tasks import training_loss

Tensors = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class LocalObjective:
    """Everything that decides a client's local computation, for every client of a round: frozen and
    picklable, so every executor receives the same description and either honours all of it or refuses.

    The loss is the task's (`workbench.tasks.training_loss`: cross-entropy for a classification, mean squared
    error for a regression). One local step on parameter w with mini-batch gradient g of it is (PyTorch's
    SGD, dampening 0):
        d = g + weight_decay * w + proximal_mu * (w - w_global) + (c - c_i)
        buf = d on the first step, else momentum * buf + d
        w <- w - lr * buf
    The correction c - c_i is SCAFFOLD's (Karimireddy et al., ICML 2020, Algorithm 1 line 10), present
    when `control_variates`; the momentum buffer starts at zero every round, as in NIID-Bench.
    """

    lr: float
    batch_size: int
    momentum: float = 0.0
    weight_decay: float = 0.0
    #: FedProx's mu: (mu/2) ||w - w_global||^2 added to the local loss (Li et al., MLSys 2020, Eq. 2)
    proximal_mu: float = 0.0
    #: SCAFFOLD: the client receives the server variate c and holds its own c_i; it steps along the
    #: corrected gradient and returns the change of its variate (option II)
    control_variates: bool = False
    #: > 0: the update w - w_global is clipped to this L2 norm before it is sent (DP-FedAvg's C)
    clip_norm: float = 0.0
    #: > 0: the number of classes C; clients marked `flips_labels` train on C - 1 - y (an attack)
    num_classes: int = 0
    #: the dataset's task (`Dataset.task`), which decides the loss: `simulation.local_objective` sets it
    task: str = "classification"


@dataclass(frozen=True)
class ClientTask:
    """One client's assignment in a round: its training samples, how many epochs it manages, its seed,
    and what it receives beyond the global model.

    `payload` is what the server sends (counted in `bytes_down`; SCAFFOLD: `{"c": {...}}`);
    `client_state` is what the client keeps between rounds (SCAFFOLD: `{"c_i": {...}}`): it lives on the
    client, so the simulation hands it over without counting it as traffic.
    """

    client: int
    indices: torch.Tensor
    num_epochs: int
    is_partial: bool
    seed: int
    payload: Mapping[str, Tensors] = field(default_factory=dict)
    client_state: Mapping[str, Tensors] = field(default_factory=dict)
    #: an attacker that trains on flipped labels C - 1 - y (C = `LocalObjective.num_classes`)
    flips_labels: bool = False


@dataclass(frozen=True)
class ClientUpdate:
    """What one client sends back after local work."""

    client: int
    state: dict[str, torch.Tensor]
    num_samples: int
    num_epochs: int
    #: mean loss (the task's) of the local mini-batches, over every local step (not the global model's loss)
    local_train_loss: float
    is_partial: bool
    #: local SGD steps taken: num_epochs * ceil(num_samples / batch_size)
    num_steps: int = 0
    #: what the client returns beyond the model (counted in `bytes_up`; SCAFFOLD: `{"delta_c": {...}}`)
    payload: Mapping[str, Tensors] = field(default_factory=dict)
    #: the client's own state after the round (SCAFFOLD: `{"c_i": {...}}`), written back by the strategy
    client_state: Mapping[str, Tensors] = field(default_factory=dict)


def torch_generator(rng: np.random.Generator) -> torch.Generator:
    """A torch generator seeded from a numpy one (a seed stream of `simulation`): how every torch-side
    random draw (attack noise, DP noise) is keyed to the same (seed, round, ...) as the rest."""
    return torch.Generator().manual_seed(int(rng.integers(2**63)))


def num_local_steps(num_samples: int, num_epochs: int, batch_size: int) -> int:
    """Local SGD steps of a client: every epoch visits all samples in batches of `batch_size` (the last
    one ragged)."""
    return num_epochs * math.ceil(num_samples / batch_size)


def proximal_penalty(params: Iterable[torch.Tensor], anchors: Iterable[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's proximal term (mu/2) * ||w - w_global||^2 (Li et al., MLSys 2020, Eq. 2)."""
    return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))


def proximal_gradient(param: torch.Tensor, anchor: torch.Tensor, mu: float) -> torch.Tensor:
    """The gradient of `proximal_penalty` with respect to one parameter: mu * (w - w_global)."""
    return mu * (param - anchor)


def step_direction(grad: torch.Tensor, param: torch.Tensor, anchor: torch.Tensor, correction: torch.Tensor | None,
                   objective: LocalObjective) -> torch.Tensor:
    """d = g + weight_decay * w + mu * (w - w_global) + (c - c_i): the direction of one local step before
    momentum (see `LocalObjective`). Works on stacked clients too (leading client axis, broadcasting)."""
    if objective.weight_decay:
        grad = grad + objective.weight_decay * param
    if objective.proximal_mu:
        grad = grad + proximal_gradient(param, anchor, objective.proximal_mu)
    if correction is not None:
        grad = grad + correction
    return grad


def momentum_buffer(buffer: torch.Tensor | None, direction: torch.Tensor, momentum: float) -> torch.Tensor:
    """PyTorch's SGD momentum without dampening: the first step's buffer is the direction itself."""
    if not momentum:
        return direction
    return direction if buffer is None else buffer * momentum + direction


def gradient_correction(task_payload: Mapping[str, Tensors], client_state: Mapping[str, Tensors],
                        names: Iterable[str]) -> list[torch.Tensor] | None:
    """SCAFFOLD's c - c_i for each parameter in `names`, or None when the task carries no variates."""
    if "c" not in task_payload:
        return None
    c, c_i = task_payload["c"], client_state["c_i"]
    return [c[name] - c_i[name] for name in names]


def train_locally(
    model: nn.Module,
    global_state: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    objective: LocalObjective,
    *,
    num_epochs: int,
    generator: torch.Generator,
    correction: list[torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], float]:
    """Run `num_epochs` of mini-batch SGD on (x, y) from the global weights, as `objective` describes
    (`correction`: SCAFFOLD's c - c_i per parameter, in `named_parameters` order); return the new weights
    and the mean training loss over all local steps (the task's loss, `objective.task`: cross-entropy or
    mean squared error, without any added term).

    `model` is scratch space: its weights are overwritten. The weight-decay, proximal and correction terms
    enter as their exact gradients added to each step's gradient (`step_direction`), which equals
    back-propagating them but skips building their graph.
    """
    model.load_state_dict(global_state)
    model.train()
    names = [name for name, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    anchors = [global_state[name].detach() for name in names]
    corrections = correction if correction is not None else [None] * len(params)
    buffers: list[torch.Tensor | None] = [None] * len(params)
    total_loss = torch.zeros((), dtype=params[0].dtype, device=x.device)  # float64 models sum in float64
    num_samples, lr, batch_size = len(y), objective.lr, objective.batch_size
    for _ in range(num_epochs):
        order = torch.randperm(num_samples, generator=generator).to(x.device)
        for start in range(0, num_samples, batch_size):
            batch = order[start:start + batch_size]
            loss = training_loss(objective.task, model(x[batch]), y[batch])
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for i, (param, grad, anchor) in enumerate(zip(params, grads, anchors)):
                    direction = step_direction(grad, param, anchor, corrections[i], objective)
                    buffers[i] = momentum_buffer(buffers[i], direction, objective.momentum)
                    param.add_(buffers[i], alpha=-lr)
                total_loss += loss.detach() * len(batch)
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    return state, float(total_loss) / (num_samples * num_epochs)


def flipped_labels(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The labels a label-flipping attacker trains on: C - 1 - y (Fang et al., USENIX Security 2020)."""
    return num_classes - 1 - y


def clip_update(global_state: Tensors, state: Tensors, clip_norm: float) -> dict[str, torch.Tensor]:
    """The model whose update w - w_global is `state`'s scaled to L2 norm at most `clip_norm` (over every
    floating-point tensor together), as DP-FedAvg's clients do (McMahan et al., ICLR 2018, Algorithm 1)."""
    deltas = {k: state[k] - global_state[k] for k in state if state[k].is_floating_point()}
    norm = math.sqrt(sum(float(d.double().pow(2).sum()) for d in deltas.values()))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: (global_state[k] + deltas[k] * scale).to(state[k].dtype) if k in deltas else state[k]
            for k in state}


def control_variate_change(global_state: Tensors, state: Tensors, c: Tensors, num_steps: int,
                           lr: float) -> dict[str, torch.Tensor]:
    """SCAFFOLD's option II (Karimireddy et al. 2020, Algorithm 1 line 12), as the change it sends:
    c_i+ = c_i - c + (x - y_i) / (K lr), so delta_c_i = c_i+ - c_i = (x - y_i) / (K lr) - c."""
    return {k: (global_state[k] - state[k]) / (num_steps * lr) - c[k] for k in c}


def finish_update(update: ClientUpdate, task: ClientTask, objective: LocalObjective,
                  global_state: Tensors) -> ClientUpdate:
    """What the client sends after training, computed once for every executor: its step count, the
    update clipped to `objective.clip_norm`, and (SCAFFOLD) the change of its control variate together
    with its new variate."""
    num_steps = num_local_steps(update.num_samples, update.num_epochs, objective.batch_size)
    state, payload, client_state = update.state, dict(update.payload), dict(update.client_state)
    if objective.control_variates:
        delta_c = control_variate_change(global_state, state, task.payload["c"], num_steps, objective.lr)
        c_i = task.client_state["c_i"]
        payload["delta_c"] = delta_c
        client_state["c_i"] = {k: c_i[k] + delta_c[k] for k in c_i}
    if objective.clip_norm:
        state = clip_update(global_state, state, objective.clip_norm)
    return replace(update, state=state, num_steps=num_steps, payload=payload, client_state=client_state)

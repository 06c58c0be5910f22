"""A fused local-training kernel for chains of linear layers and ReLUs (logreg, linear, the 2NN, the tabular
MLP): the same SGD as `train_locally` on the task's loss (cross-entropy or mean squared error), with the
backward pass written out so each step is a handful of BLAS calls."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from workbench.client import LocalObjective, momentum_buffer, step_direction, train_locally
from workbench.models import LINEAR_CHAINS


def linear_chain(model: nn.Module) -> list[str] | None:
    """The parameter-name prefixes of `model`'s linear layers in forward order, when `model` is a known
    flatten -> linear (-> ReLU -> linear)* chain; None for anything else (the kernel then does not apply).

    Only the zoo's classes qualify: a module's forward order cannot be read off its submodules in general.
    """
    if type(model) not in LINEAR_CHAINS:
        return None
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def train_chain_locally(
    chain: list[str],
    global_state: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    objective: LocalObjective,
    *,
    num_epochs: int,
    generator: torch.Generator,
    correction: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], float]:
    """`train_locally` for the linear chain `chain` (see `linear_chain`): same batch order, same SGD steps
    with every term of the `LocalObjective` (weight decay, the proximal gradient mu * (w - w_global) of Li
    et al. 2020, Eq. 2, SCAFFOLD's correction, by parameter name in `correction`, and momentum), same loss
    (`objective.task`'s) and mean loss; only rounding differs (float64 agrees to 1e-12, float32 within 1e-5
    after a round: tests/test_execution.py, tests/test_regression_task.py).

    Written for few, cheap calls per step, since at B = 10 the per-call cost rivals the arithmetic:
    each epoch gathers its shuffled samples once so batches are views; the gradient of the mean loss w.r.t.
    the last layer's output z is, for cross-entropy on logits, (softmax - onehot) / B, and for a
    regression's mean squared error mean_b (z_b - y_b)^2 on the (B, 1) output, 2 (z - y) / B; without
    momentum each weight update is one in-place
    GEMM (w -= lr * delta^T a), preceded for FedProx by w += lr*mu*(w_global - w) (one lerp; with weight
    decay w <- w(1 - lr(wd + mu)) + lr mu w_global) and followed by w -= lr (c - c_i); with momentum the
    gradient is formed and goes through `step_direction` and `momentum_buffer`, as in `train_locally`; the
    losses are written into one buffer per epoch and summed once (the log-probabilities against the
    one-hot targets, or the residuals z - y, whose squared norm is the epoch's summed squared error)."""
    lr, mu, wd, batch_size = objective.lr, objective.proximal_mu, objective.weight_decay, objective.batch_size
    rho = objective.momentum
    weights = [global_state[f"{p}.weight"].detach().clone() for p in chain]
    biases = [global_state[f"{p}.bias"].detach().clone() for p in chain]
    anchors = [(global_state[f"{p}.weight"], global_state[f"{p}.bias"]) for p in chain]
    corrections = ([(correction[f"{p}.weight"], correction[f"{p}.bias"]) for p in chain] if correction is not None
                   else [(None, None)] * len(chain))
    buffers: list[list[torch.Tensor | None]] = [[None, None] for _ in chain]
    x = x.flatten(1)
    num_samples, last = len(y), len(chain) - 1
    is_regression = objective.task == "regression"
    if is_regression:
        if weights[-1].shape[0] != 1:
            raise ValueError(f"a regression needs a model with one output, but layer {chain[-1]!r} has "
                             f"{weights[-1].shape[0]} (build it with num_outputs=1: Dataset.num_outputs)")
        targets_encoded = y.to(weights[-1].dtype).reshape(-1, 1)  # (N, 1), as the output z
    else:
        targets_encoded = F.one_hot(y, weights[-1].shape[0]).to(weights[-1].dtype)
    # per epoch: the residuals z - y (regression) or the log-probabilities (classification) of every sample
    epoch_values = torch.empty_like(targets_encoded)
    total_loss = torch.zeros((), dtype=weights[0].dtype, device=x.device)
    for _ in range(num_epochs):
        order = torch.randperm(num_samples, generator=generator).to(x.device)
        inputs_all, targets_all = x.index_select(0, order), targets_encoded.index_select(0, order)
        for start in range(0, num_samples, batch_size):
            stop = min(start + batch_size, num_samples)
            activations, targets = [inputs_all[start:stop]], targets_all[start:stop]
            for i, (w, b) in enumerate(zip(weights, biases)):
                z = torch.addmm(b, activations[-1], w.t())
                activations.append(z.relu_() if i < last else z)
            batch_values = epoch_values[start:stop]
            if is_regression:
                # d/dz mean_b (z_b - y_b)^2 = 2 (z - y) / B
                torch.sub(activations.pop(), targets, out=batch_values)
                delta = batch_values.mul(2.0 / (stop - start))
            else:
                torch._log_softmax(activations.pop(), 1, False, out=batch_values)
                delta = batch_values.exp().sub_(targets).div_(stop - start)
            for i in range(last, -1, -1):
                w, b, inputs = weights[i], biases[i], activations[i]
                # the next delta needs this layer's weights before the step; ReLU passes it where a > 0
                below = torch.ops.aten.threshold_backward(delta.mm(w), inputs, 0) if i else None
                if rho:
                    for j, (param, grad) in enumerate(((w, delta.t().mm(inputs)), (b, delta.sum(0)))):
                        direction = step_direction(grad, param, anchors[i][j], corrections[i][j], objective)
                        buffers[i][j] = momentum_buffer(buffers[i][j], direction, rho)
                        param.add_(buffers[i][j], alpha=-lr)
                else:
                    for param, anchor in ((w, anchors[i][0]), (b, anchors[i][1])):
                        if wd:
                            param.mul_(1 - lr * (wd + mu))
                            if mu:
                                param.add_(anchor, alpha=lr * mu)
                        elif mu:
                            param.lerp_(anchor, lr * mu)
                    w.addmm_(delta.t(), inputs, alpha=-lr)
                    b.add_(delta.sum(0), alpha=-lr)
                    if corrections[i][0] is not None:
                        w.add_(corrections[i][0], alpha=-lr)
                        b.add_(corrections[i][1], alpha=-lr)
                delta = below
        if is_regression:
            total_loss += torch.vdot(epoch_values.flatten(), epoch_values.flatten())
        else:
            total_loss -= torch.vdot(epoch_values.flatten(), targets_all.flatten())
    trained = {k: v for prefix, w, b in zip(chain, weights, biases)
               for k, v in ((f"{prefix}.weight", w), (f"{prefix}.bias", b))}
    state = {k: trained[k] if k in trained else v.detach().clone() for k, v in global_state.items()}
    return state, float(total_loss) / (num_samples * num_epochs)


class LocalTrainer:
    """One client's local work on a scratch model: the fused kernel where it applies (the model is a
    linear chain; either task), else `train_locally`."""

    def __init__(self, model: nn.Module, use_kernel: bool = True):
        self.model = model
        self.chain = linear_chain(model) if use_kernel else None

    @property
    def uses_kernel(self) -> bool:
        return self.chain is not None

    def __call__(self, global_state: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                 objective: LocalObjective, *, num_epochs: int, generator: torch.Generator,
                 correction: list[torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], float]:
        if self.chain is not None:
            names = [name for name, _ in self.model.named_parameters()]
            return train_chain_locally(self.chain, global_state, x, y, objective, num_epochs=num_epochs,
                                       generator=generator,
                                       correction=dict(zip(names, correction)) if correction is not None else None)
        return train_locally(self.model, global_state, x, y, objective, num_epochs=num_epochs,
                             generator=generator, correction=correction)

"""A fused local-training kernel for chains of linear layers and ReLUs (logreg, the 2NN): the same SGD
as `train_locally`, with the backward pass written out so each step is a handful of BLAS calls."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from workbench.client import LocalObjective, train_locally
from workbench.models import MLP, LogisticRegression


def linear_chain(model: nn.Module) -> list[str] | None:
    """The parameter-name prefixes of `model`'s linear layers in forward order, when `model` is a known
    flatten -> linear (-> ReLU -> linear)* chain; None for anything else (the kernel then does not apply).

    Only the zoo's classes qualify: a module's forward order cannot be read off its submodules in general.
    """
    if type(model) not in (MLP, LogisticRegression):
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
) -> tuple[dict[str, torch.Tensor], float]:
    """`train_locally` for the linear chain `chain` (see `linear_chain`) and an objective without momentum,
    weight decay or correction (`kernel_supports`): same batch order, same SGD steps,
    same proximal gradient mu * (w - w_global) (Li et al. 2020, Eq. 2), same mean loss; only rounding
    differs (float64 agrees to 1e-12, float32 within 1e-5 after a round: tests/test_execution.py).

    Written for few, cheap calls per step, since at B = 10 the per-call cost rivals the arithmetic:
    each epoch gathers its shuffled samples once so batches are views; the gradient of mean cross-entropy
    w.r.t. the logits is (softmax - onehot) / batch; each weight update is one in-place GEMM
    (w -= lr * delta^T a), preceded for FedProx by w += lr*mu*(w_global - w) (one lerp); the losses are
    written into one buffer per epoch and summed once."""
    reason = why_kernel_cannot(objective)
    if reason is not None:
        raise ValueError(f"the fused kernel cannot train this objective: {reason}")
    lr, mu, batch_size = objective.lr, objective.proximal_mu, objective.batch_size
    weights = [global_state[f"{p}.weight"].detach().clone() for p in chain]
    biases = [global_state[f"{p}.bias"].detach().clone() for p in chain]
    anchors = [(global_state[f"{p}.weight"], global_state[f"{p}.bias"]) for p in chain]
    x = x.flatten(1)
    num_samples, last = len(y), len(chain) - 1
    onehot = F.one_hot(y, weights[-1].shape[0]).to(weights[-1].dtype)
    log_probs = torch.empty_like(onehot)
    total_loss = torch.zeros((), dtype=weights[0].dtype, device=x.device)
    for _ in range(num_epochs):
        order = torch.randperm(num_samples, generator=generator).to(x.device)
        inputs_all, targets_all = x.index_select(0, order), onehot.index_select(0, order)
        for start in range(0, num_samples, batch_size):
            stop = min(start + batch_size, num_samples)
            activations, targets = [inputs_all[start:stop]], targets_all[start:stop]
            for i, (w, b) in enumerate(zip(weights, biases)):
                z = torch.addmm(b, activations[-1], w.t())
                activations.append(z.relu_() if i < last else z)
            batch_log_probs = log_probs[start:stop]
            torch._log_softmax(activations.pop(), 1, False, out=batch_log_probs)
            delta = batch_log_probs.exp().sub_(targets).div_(stop - start)
            for i in range(last, -1, -1):
                w, b, inputs = weights[i], biases[i], activations[i]
                # the next delta needs this layer's weights before the step; ReLU passes it where a > 0
                below = torch.ops.aten.threshold_backward(delta.mm(w), inputs, 0) if i else None
                if mu:
                    w.lerp_(anchors[i][0], lr * mu)
                    b.lerp_(anchors[i][1], lr * mu)
                w.addmm_(delta.t(), inputs, alpha=-lr)
                b.add_(delta.sum(0), alpha=-lr)
                delta = below
        total_loss -= torch.vdot(log_probs.flatten(), targets_all.flatten())
    trained = {k: v for prefix, w, b in zip(chain, weights, biases)
               for k, v in ((f"{prefix}.weight", w), (f"{prefix}.bias", b))}
    state = {k: trained[k] if k in trained else v.detach().clone() for k, v in global_state.items()}
    return state, float(total_loss) / (num_samples * num_epochs)


def why_kernel_cannot(objective: LocalObjective) -> str | None:
    """Why the fused kernel cannot honour `objective` (it implements plain SGD with the proximal term)."""
    if objective.has_local_terms:
        return "it implements plain SGD with the proximal term only (no momentum, weight decay or correction)"
    return None


class LocalTrainer:
    """One client's local work on a scratch model: the fused kernel where it applies (the model is a
    linear chain and the objective plain SGD with the proximal term), else `train_locally`."""

    def __init__(self, model: nn.Module, use_kernel: bool = True):
        self.model = model
        self.chain = linear_chain(model) if use_kernel else None

    @property
    def uses_kernel(self) -> bool:
        return self.chain is not None

    def __call__(self, global_state: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                 objective: LocalObjective, *, num_epochs: int, generator: torch.Generator,
                 correction: list[torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], float]:
        if self.chain is not None and correction is None and why_kernel_cannot(objective) is None:
            return train_chain_locally(self.chain, global_state, x, y, objective, num_epochs=num_epochs,
                                       generator=generator)
        return train_locally(self.model, global_state, x, y, objective, num_epochs=num_epochs,
                             generator=generator, correction=correction)

"""All clients of a round at once: stacked weights, one batched gradient per local step (torch.func)."""

from __future__ import annotations

import copy
import math
import threading
from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from workbench.client import (ClientTask, ClientUpdate, LocalObjective, flipped_labels, gradient_correction,
                              momentum_buffer, step_direction)
from workbench.execution.base import batch_order, check_stop
from workbench.tasks import per_sample_loss


def why_not_batchable(model: nn.Module) -> str | None:
    """Why `model` cannot be trained client-parallel by `VectorizedExecutor`, or None when it can."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)):
            return (f"layer {name!r} is a {type(module).__name__}, whose training-mode forward keeps running "
                    "statistics or draws random masks outside the per-client seed")
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        return f"the model has buffers ({', '.join(buffers[:3])}) that local training would update"
    return None


def batch_schedule(tasks: Sequence[ClientTask], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every client's mini-batches, padded to a common length: positions (clients, steps, batch) into
    each client's own samples and a 0/1 mask of real entries. Each client's permutations come from its
    own `batch_order` generator, epoch after epoch, exactly as `train_locally` draws them; clients with
    fewer samples or epochs (stragglers) simply run out of steps early."""
    steps = [task.num_epochs * math.ceil(len(task.indices) / batch_size) for task in tasks]
    num_steps = max(steps, default=0)
    positions = torch.zeros(len(tasks), num_steps, batch_size, dtype=torch.long)
    mask = torch.zeros(len(tasks), num_steps, batch_size)
    for k, task in enumerate(tasks):
        generator, num_samples = batch_order(task), len(task.indices)
        per_epoch = math.ceil(num_samples / batch_size)
        padded = per_epoch * batch_size
        for epoch in range(task.num_epochs):
            order = torch.randperm(num_samples, generator=generator)
            block = torch.zeros(padded, dtype=torch.long)
            block[:num_samples] = order
            valid = torch.zeros(padded)
            valid[:num_samples] = 1.0
            rows = slice(epoch * per_epoch, (epoch + 1) * per_epoch)
            positions[k, rows] = block.view(per_epoch, batch_size)
            mask[k, rows] = valid.view(per_epoch, batch_size)
    return positions, mask


class VectorizedExecutor:
    """Trains the whole cohort in lock-step: the clients' weights are stacked along a leading axis and
    `vmap(grad(loss))` takes one SGD step for all of them at once (batched matmul, grouped convolution
    underneath). Per-client batch orders, unequal sizes (masked, ragged last batches), stragglers' fewer
    epochs, the task's loss (`objective.task`: cross-entropy or mean squared error, `tasks.per_sample_loss`
    averaged over each client's real samples) and every term of the `LocalObjective` (momentum, weight
    decay, proximal, SCAFFOLD's correction, label-flipping attackers) match `train_locally`: each step
    applies the same `step_direction` and `momentum_buffer` to the stacked weights. Memory grows with the
    clients per round; `max_clients` bounds how many are stacked at a time.

    Pays where kernels are launch-bound (GPUs); on a few CPU cores the stacked weights fall out of cache
    (see the README's benchmark table)."""

    name = "vectorized"

    def __init__(self, model: nn.Module, max_clients: int = 0):
        reason = why_not_batchable(model)
        if reason is not None:
            raise ValueError(f"execution.executor='vectorized' cannot train this model: {reason} "
                             "(use execution.executor=processes or sequential)")
        self._model = copy.deepcopy(model)
        self._max_clients = max_clients
        self.threads = 0  # one big batched step per local step: worth every core
        self.settings = {"executor": self.name}
        #: one batched gradient step per task, built when a cohort of that task first comes
        self._steps: dict[str, Callable] = {}

    def _step(self, task: str) -> Callable:
        if task not in self._steps:
            def client_loss(params, x, y, mask):
                outputs = functional_call(self._model, params, (x,))
                losses = per_sample_loss(task, outputs, y)
                loss = (losses * mask).sum() / mask.sum().clamp(min=1.0)
                return loss, loss

            self._steps[task] = vmap(grad(client_loss, has_aux=True))
        return self._steps[task]

    def run_cohort(
        self, global_state: Mapping[str, torch.Tensor], tasks: Sequence[ClientTask],
        x: torch.Tensor, y: torch.Tensor, objective: LocalObjective,
        stop: threading.Event | None = None, on_update: Callable[[int], None] | None = None,
    ) -> list[ClientUpdate]:
        chunk = self._max_clients or len(tasks) or 1
        updates: list[ClientUpdate] = []
        for start in range(0, len(tasks), chunk):
            done = self._run_chunk(global_state, tasks[start:start + chunk], x, y, objective, stop)
            updates += done
            for update in done if on_update is not None else ():
                on_update(update.client)
        return updates

    def why_not_supported(self, objective: LocalObjective) -> str | None:
        return None

    def _run_chunk(self, global_state, tasks, x, y, objective: LocalObjective, stop) -> list[ClientUpdate]:
        check_stop(stop)
        num_clients, lr, device = len(tasks), objective.lr, x.device
        positions, mask = batch_schedule(tasks, objective.batch_size)
        # positions into each client's samples -> rows of x
        rows = torch.stack([torch.as_tensor(t.indices, device="cpu")[positions[k]]
                            for k, t in enumerate(tasks)]).to(device)
        mask = mask.to(device=device, dtype=x.dtype if x.is_floating_point() else torch.float32)
        names = [name for name, _ in self._model.named_parameters()]
        anchors = {n: global_state[n].detach() for n in names}
        params = {n: anchors[n].unsqueeze(0).repeat(num_clients, *[1] * anchors[n].ndim) for n in names}
        corrections = self._stacked_corrections(tasks, names)
        flips = torch.tensor([t.flips_labels for t in tasks], device=device).view(-1, 1)
        buffers: dict[str, torch.Tensor | None] = dict.fromkeys(names)
        total_loss = torch.zeros(num_clients, dtype=mask.dtype, device=device)
        batched_step = self._step(objective.task)
        for step in range(rows.shape[1]):
            check_stop(stop)
            step_mask = mask[:, step]
            labels = y[rows[:, step]]
            if objective.num_classes:
                labels = torch.where(flips, flipped_labels(labels, objective.num_classes), labels)
            grads, losses = batched_step(params, x[rows[:, step]], labels, step_mask)
            counts = step_mask.sum(1)
            active = (counts > 0).to(step_mask.dtype)
            with torch.no_grad():
                for n in names:
                    # clients that ran out of steps stay put; their buffers are never read again
                    direction = step_direction(grads[n], params[n], anchors[n], corrections.get(n), objective)
                    buffers[n] = momentum_buffer(buffers[n], direction, objective.momentum)
                    scale = (active * -lr).view(-1, *[1] * anchors[n].ndim)
                    params[n] = params[n] + scale * buffers[n]
            total_loss += losses.detach() * counts
        losses = (total_loss.cpu() / torch.tensor([len(t.indices) * t.num_epochs for t in tasks])).tolist()
        updates = []
        for k, task in enumerate(tasks):
            state = {key: value.detach().clone() for key, value in global_state.items()}
            state.update({n: params[n][k].clone() for n in names})
            updates.append(ClientUpdate(task.client, state, len(task.indices), task.num_epochs, losses[k],
                                        task.is_partial))
        return updates

    @staticmethod
    def _stacked_corrections(tasks: Sequence[ClientTask], names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Each parameter's gradient corrections of all clients, stacked (empty without SCAFFOLD)."""
        per_client = [gradient_correction(t.payload, t.client_state, names) for t in tasks]
        if all(c is None for c in per_client):
            return {}
        return {n: torch.stack([c[i] for c in per_client]) for i, n in enumerate(names)}

"""The executor contract (`ClientTask`, `Executor`, stop handling) and the sequential reference executor."""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
from torch import nn

from workbench.client import ClientUpdate, train_locally
from workbench.config import TrainingConfig


class RunStopped(Exception):
    """Raised inside a round when the user asked the run to stop; the run ends KILLED."""


def check_stop(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise RunStopped("stopped by the user")


@dataclass(frozen=True)
class ClientTask:
    """One client's assignment in a round: its training samples, how many epochs it manages, its seed."""

    client: int
    indices: torch.Tensor
    num_epochs: int
    is_partial: bool
    seed: int


class Executor(Protocol):
    name: str

    #: Intra-op threads the run's own process should use with this executor (0 = torch's default).
    threads: int

    #: What the run's record should say about how it was executed (executor name, workers, threads).
    settings: Mapping[str, Any]

    def run_cohort(
        self, global_state: Mapping[str, torch.Tensor], tasks: Sequence[ClientTask],
        x: torch.Tensor, y: torch.Tensor, training: TrainingConfig, mu: float,
        stop: threading.Event | None = None, on_update: Callable[[int], None] | None = None,
    ) -> list[ClientUpdate]:
        """Every task's update, in the order of `tasks`; raises `RunStopped` within one client update
        of `stop` being set. `on_update(client)` is called on the caller's thread as each client's update
        is complete (in completion order), before the cohort is."""


#: Below this many parameters one intra-op thread is fastest on CPU (per-step work is too small to split;
#: a second thread only adds synchronisation and, on a busy machine, OpenMP spin-waiting).
SMALL_MODEL_PARAMS = 1_000_000


def default_threads(model: nn.Module) -> int:
    """Intra-op threads for training `model` in the run's own process: 1 for small models on CPU,
    else 0 (= torch's default, all cores)."""
    device = next(model.parameters()).device
    small = sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS
    return 1 if device.type == "cpu" and small else 0


def batch_order(task: ClientTask) -> torch.Generator:
    """The generator of a task's batch order: every executor must draw `train_locally`'s permutations
    from exactly this, epoch after epoch, so that all of them visit the same batches."""
    return torch.Generator().manual_seed(task.seed)


class SequentialExecutor:
    """Clients one after another on one scratch copy of the model (`train_locally`, unchanged)."""

    name = "sequential"

    def __init__(self, model: nn.Module):
        self._scratch = copy.deepcopy(model)
        self.threads = default_threads(model)
        self.settings = {"executor": self.name}

    def run_cohort(
        self, global_state: Mapping[str, torch.Tensor], tasks: Sequence[ClientTask],
        x: torch.Tensor, y: torch.Tensor, training: TrainingConfig, mu: float,
        stop: threading.Event | None = None, on_update: Callable[[int], None] | None = None,
    ) -> list[ClientUpdate]:
        updates = []
        for task in tasks:
            check_stop(stop)
            state, loss = train_locally(
                self._scratch, global_state, x[task.indices], y[task.indices],
                num_epochs=task.num_epochs, batch_size=training.batch_size, lr=training.lr, mu=mu,
                generator=batch_order(task),
            )
            updates.append(ClientUpdate(task.client, state, len(task.indices), task.num_epochs, loss,
                                        task.is_partial))
            if on_update is not None:
                on_update(task.client)
        return updates

"""How a cohort's updates are computed; the sequential executor is the reference the others must match."""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

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

    def run_cohort(
        self, global_state: Mapping[str, torch.Tensor], tasks: Sequence[ClientTask],
        x: torch.Tensor, y: torch.Tensor, training: TrainingConfig, mu: float,
        stop: threading.Event | None = None,
    ) -> list[ClientUpdate]:
        """Every task's update, in the order of `tasks`; raises `RunStopped` within one client update
        of `stop` being set."""


class SequentialExecutor:
    """Clients one after another on one scratch copy of the model."""

    name = "sequential"

    def __init__(self, model: nn.Module):
        self._scratch = copy.deepcopy(model)

    def run_cohort(
        self, global_state: Mapping[str, torch.Tensor], tasks: Sequence[ClientTask],
        x: torch.Tensor, y: torch.Tensor, training: TrainingConfig, mu: float,
        stop: threading.Event | None = None,
    ) -> list[ClientUpdate]:
        updates = []
        for task in tasks:
            check_stop(stop)
            generator = torch.Generator().manual_seed(task.seed)
            state, loss = train_locally(
                self._scratch, global_state, x[task.indices], y[task.indices],
                num_epochs=task.num_epochs, batch_size=training.batch_size, lr=training.lr, mu=mu,
                generator=generator,
            )
            updates.append(ClientUpdate(task.client, state, len(task.indices), task.num_epochs, loss,
                                        task.is_partial))
        return updates


EXECUTORS = {"sequential": SequentialExecutor}


def build_executor(name: str, model: nn.Module) -> Executor:
    """The executor called `name` (config key `execution.executor`), working on copies of `model`."""
    return EXECUTORS[name](model)

"""The executor contract (`Executor`, stop handling) and the sequential reference executor."""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
from torch import nn

from workbench.client import (ClientTask, ClientUpdate, LocalObjective, flipped_labels, gradient_correction,
                              train_locally)


class RunStopped(Exception):
    """Raised inside a round when the user asked the run to stop; the run ends KILLED."""


def check_stop(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise RunStopped("stopped by the user")


#: What `execution.on_client_failure` may say: end the run, or go on without the client.
FAILURE_POLICIES = ("fail", "drop")
#: Why a client's update did not arrive (`ClientDropped.reason`).
DROP_REASONS = ("error", "worker_died", "timeout")


@dataclass(frozen=True)
class ClientDropped:
    """A task whose update did not arrive: why (`DROP_REASONS`), what happened, and how often it was tried.
    The round goes on without it; the client table says why."""

    client: int
    reason: str
    message: str
    attempts: int

    @property
    def description(self) -> str:
        """One line for the client table: `error after 2 attempts: ValueError: ...`."""
        if not self.attempts:
            return f"{self.reason}: {self.message}"
        tries = "attempt" if self.attempts == 1 else "attempts"
        return f"{self.reason} after {self.attempts} {tries}: {self.message}"


class ClientFailed(RuntimeError):
    """A client's update failed (after its retry) under `execution.on_client_failure=fail`: the run ends
    FAILED, with what it logged so far, and can be resumed from its last checkpoint."""

    def __init__(self, dropped: ClientDropped):
        self.dropped = dropped
        super().__init__(f"client {dropped.client}: {dropped.description} (execution.on_client_failure=fail "
                         "ends the run; set it to drop to go on without failing clients, then resume this run)")


def settle_failure(policy: str, dropped: ClientDropped) -> ClientDropped:
    """The one home of `execution.on_client_failure`: `drop` returns the record of the missing update,
    `fail` raises `ClientFailed`."""
    if policy == "drop":
        return dropped
    raise ClientFailed(dropped)


class Executor(Protocol):
    name: str

    #: Intra-op threads the run's own process should use with this executor (0 = torch's default).
    threads: int

    #: What the run's record should say about how it was executed (executor name, workers, threads).
    settings: Mapping[str, Any]

    def run_cohort(
        self, global_state: Mapping[str, torch.Tensor], tasks: Sequence[ClientTask],
        x: torch.Tensor, y: torch.Tensor, objective: LocalObjective,
        stop: threading.Event | None = None, on_update: Callable[[int], None] | None = None,
    ) -> list[ClientUpdate | ClientDropped]:
        """Every task's outcome in the order of `tasks`: its update (its model and mean local loss;
        `client.finish_update` completes the rest), trained exactly as `objective` and the task describe,
        or, for an executor that bounds failures (Ray: `execution.on_client_failure`, `round_timeout_s`),
        a `ClientDropped`. Raises `RunStopped` within one client update of `stop` being set.
        `on_update(client)` is called on the caller's thread as each client's update is complete (in
        completion order), before the cohort is."""

    def why_not_supported(self, objective: LocalObjective) -> str | None:
        """Why this executor cannot honour `objective` exactly, or None when it can."""


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


def task_labels(y: torch.Tensor, task: ClientTask, objective: LocalObjective) -> torch.Tensor:
    """The labels `task`'s client trains on: its own, or flipped when it is a label-flipping attacker."""
    labels = y[task.indices]
    return flipped_labels(labels, objective.num_classes) if task.flips_labels else labels


class SequentialExecutor:
    """Clients one after another on one scratch copy of the model (`train_locally`, unchanged)."""

    name = "sequential"

    def __init__(self, model: nn.Module):
        self._scratch = copy.deepcopy(model)
        self.threads = default_threads(model)
        self.settings = {"executor": self.name}

    def why_not_supported(self, objective: LocalObjective) -> str | None:
        return None  # the reference: `train_locally` is the definition of every objective

    def run_cohort(
        self, global_state: Mapping[str, torch.Tensor], tasks: Sequence[ClientTask],
        x: torch.Tensor, y: torch.Tensor, objective: LocalObjective,
        stop: threading.Event | None = None, on_update: Callable[[int], None] | None = None,
    ) -> list[ClientUpdate]:
        names = [name for name, _ in self._scratch.named_parameters()]
        updates = []
        for task in tasks:
            check_stop(stop)
            state, loss = train_locally(
                self._scratch, global_state, x[task.indices], task_labels(y, task, objective), objective,
                num_epochs=task.num_epochs, generator=batch_order(task),
                correction=gradient_correction(task.payload, task.client_state, names),
            )
            updates.append(ClientUpdate(task.client, state, len(task.indices), task.num_epochs, loss,
                                        task.is_partial))
            if on_update is not None:
                on_update(task.client)
        return updates

"""The two baselines every federated study reports beside its federation: each client alone (`local`) and
all the data in one place (`centralized`). Both run through the same round loop, executors and record as
the federated methods, so that the compare view shows federated vs local vs centralized side by side."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from workbench.client import ClientTask, ClientUpdate
from workbench.config import ExperimentConfig
from workbench.strategies.base import State, StrategyBase, clients_in, flatten_state, unflatten_state

#: The client id of the centralized baseline's one task: the pooled data of the round's sampled clients.
POOLED = -1
MODEL_PREFIX = "client"


@dataclass(eq=False)
class Local(StrategyBase):
    """Every client trains alone. Each round it is sampled, a client continues from its own model of the
    last time (the run's common initial model the first time) for the same local epochs, batch size and
    learning rate as a federated client, so it takes the same number of local steps; stragglers keep their
    partial work (it is their own model). Nothing is sent and nothing is averaged: the global model stays
    the initial one, and evaluation measures each client's own model (`client_models`): on its own test
    data (the client spread) and on the global test set (the mean over clients)."""

    name: str = "local"
    secure_aggregation_refusal = ("its clients exchange no models: there is no sum to protect")
    keeps_partial_work: bool = True
    exchanges_models: bool = False
    models: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: ExperimentConfig) -> "Local":
        return cls()

    def start_state(self, client: int, global_state: State) -> State:
        return self.models.get(client, global_state)

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate],
                  rng: np.random.Generator) -> dict[str, torch.Tensor]:
        for update in updates:
            self.models[update.client] = {k: v.detach().clone() for k, v in update.state.items()}
        return dict(global_state)

    def client_models(self, global_state: State, clients: Sequence[int]) -> dict[int, State]:
        return {client: self.models.get(client, global_state) for client in clients}

    def state_dict(self) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for client, model in sorted(self.models.items()):
            state.update(flatten_state(f"{MODEL_PREFIX}.{client}", model))
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.models = {client: unflatten_state(f"{MODEL_PREFIX}.{client}", state)
                       for client in clients_in(MODEL_PREFIX, state)}


@dataclass(frozen=True)
class Centralized(StrategyBase):
    """All the data in one place: each round the server pools the training samples of the round's sampled
    clients and trains the model on them as one dataset (one task, client id `POOLED`) for the full local
    epochs, with the clients' batch size and learning rate. Each round therefore visits exactly the samples
    the federation's clients visit (stragglers' included: the server does not straggle), and a run makes
    the same number of passes over the training data as the federation (rounds x E x K/N in expectation).
    Evaluation is the federation's: the one model on the global test set and on each client's test data."""

    local_epochs: int = 1
    name: str = "centralized"
    secure_aggregation_refusal = ("it pools the clients' raw data: there is no update to protect")
    keeps_partial_work: bool = True
    exchanges_models: bool = False

    @classmethod
    def from_config(cls, config: ExperimentConfig) -> "Centralized":
        if config.attack.fraction:
            raise ValueError(f"attack.fraction={config.attack.fraction:g} with strategy.name='centralized': the "
                             "centralized baseline pools the data at the server, so no client sends an update to "
                             "attack (set attack.fraction=0, or compare attacks on a federated strategy)")
        return cls(local_epochs=config.training.local_epochs)

    def plan_tasks(self, tasks: Sequence[ClientTask]) -> list[ClientTask]:
        if not tasks:
            return []
        indices = torch.sort(torch.cat([t.indices for t in tasks])).values
        # the first sampled client's seed: the pooled batch order is as deterministic as every client's
        return [ClientTask(POOLED, indices, self.local_epochs, False, tasks[0].seed)]

"""The `Strategy` protocol and its implementations; aggregation math as pure functions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

import torch

from workbench.client import ClientUpdate
from workbench.config import StrategyConfig

State = Mapping[str, torch.Tensor]


def weighted_average(states: Sequence[State], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """sum_k w_k * state_k / sum_k w_k, key by key (McMahan et al. 2017, Algorithm 1)."""
    if not states:
        raise ValueError("weighted_average needs at least one state")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weighted_average needs a positive total weight, got {total}")
    return {
        key: sum(state[key] * (w / total) for state, w in zip(states, weights)).to(states[0][key].dtype)
        for key in states[0]
    }


class Strategy(Protocol):
    """How the server turns a round's updates into the next global model."""

    name: str

    @property
    def proximal_mu(self) -> float:
        """mu of the proximal term clients add to their local loss (0 = none)."""

    @property
    def keeps_partial_work(self) -> bool:
        """Whether stragglers' partial updates are aggregated (else they are dropped)."""

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate]) -> dict[str, torch.Tensor]:
        """The next global model."""


def aggregate_by_samples(global_state: State, updates: Sequence[ClientUpdate]) -> dict[str, torch.Tensor]:
    """Sample-weighted average of the updates; the global model is kept when no update arrived."""
    if not updates:
        return dict(global_state)
    return weighted_average([u.state for u in updates], [u.num_samples for u in updates])


@dataclass(frozen=True)
class FedAvg:
    """FedAvg (McMahan et al. 2017): sample-weighted averaging; stragglers are dropped."""

    name: str = "fedavg"
    proximal_mu: float = 0.0
    keeps_partial_work: bool = False

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate]) -> dict[str, torch.Tensor]:
        return aggregate_by_samples(global_state, [u for u in updates if not u.is_partial])


@dataclass(frozen=True)
class FedProx:
    """FedProx (Li et al., MLSys 2020): a proximal term in the local loss, and stragglers' partial
    work is aggregated like everyone else's."""

    mu: float = 1.0
    name: str = "fedprox"
    keeps_partial_work: bool = True

    @property
    def proximal_mu(self) -> float:
        return self.mu

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate]) -> dict[str, torch.Tensor]:
        return aggregate_by_samples(global_state, updates)


def build_strategy(config: StrategyConfig) -> Strategy:
    if config.name == "fedprox":
        return FedProx(mu=config.mu)
    return FedAvg()

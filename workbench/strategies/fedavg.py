"""FedAvg and FedProx: sample-weighted averaging; FedProx adds a proximal term and keeps stragglers' work."""

from __future__ import annotations

from dataclasses import dataclass, replace

from workbench.client import LocalObjective
from workbench.config import ExperimentConfig, TrainingConfig
from workbench.strategies.base import StrategyBase


@dataclass(frozen=True)
class FedAvg(StrategyBase):
    """FedAvg (McMahan et al., AISTATS 2017, Algorithm 1): the sample-weighted average of the clients'
    models; stragglers are dropped (they are not asked to train)."""

    name: str = "fedavg"
    keeps_partial_work: bool = False

    @classmethod
    def from_config(cls, config: ExperimentConfig) -> "FedAvg":
        return cls()


@dataclass(frozen=True)
class FedProx(StrategyBase):
    """FedProx (Li et al., MLSys 2020): the proximal term (mu/2) ||w - w_global||^2 in every client's
    local loss (Eq. 2), and stragglers' partial work aggregated like everyone else's."""

    mu: float = 1.0
    name: str = "fedprox"
    keeps_partial_work: bool = True

    @classmethod
    def from_config(cls, config: ExperimentConfig) -> "FedProx":
        return cls(mu=config.strategy.mu)

    def local_objective(self, training: TrainingConfig, round_: int) -> LocalObjective:
        return replace(super().local_objective(training, round_), proximal_mu=self.mu)

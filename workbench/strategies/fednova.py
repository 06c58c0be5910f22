"""FedNova (Wang, Liu, Liang, Joshi, Poor, NeurIPS 2020): normalized averaging of updates made with
different numbers of local steps, and the L1 norm of local (momentum) SGD's aggregation vector."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from workbench.client import ClientUpdate, LocalObjective
from workbench.config import ExperimentConfig, TrainingConfig
from workbench.strategies.base import State, StrategyBase, apply_delta, mean_delta, sample_weights


# ----- FedNova's math: pure functions -----


def local_sgd_norm(num_steps: int, momentum: float = 0.0) -> float:
    """||a_i||_1 of a client that took `num_steps` = tau local SGD steps with momentum rho (PyTorch's, no
    dampening, buffer zero at the start of the round; Wang et al. 2020, Section 5 "local momentum SGD").

    With buffer b_k = rho b_(k-1) + g_k and w_(k+1) = w_k - lr b_k, the round's update is
    lr sum_(k=1..tau) b_k = lr sum_j g_j a_j with a_j = (1 - rho^(tau - j + 1)) / (1 - rho), so
        ||a||_1 = [tau - rho (1 - rho^tau) / (1 - rho)] / (1 - rho),
    which is tau for plain SGD (rho = 0: every a_j = 1)."""
    if num_steps < 1:
        raise ValueError(f"FedNova needs num_steps >= 1 for every update, got {num_steps} (client.finish_update "
                         f"sets it: epochs * ceil(samples / batch_size))")
    if not 0 <= momentum < 1:
        raise ValueError(f"training.momentum must be in [0, 1) for FedNova, got {momentum!r}")
    if momentum == 0:
        return float(num_steps)
    rho = momentum
    return (num_steps - rho * (1 - rho ** num_steps) / (1 - rho)) / (1 - rho)


def normalized_average(global_state: State, updates: Sequence[ClientUpdate],
                       norms: Sequence[float]) -> dict[str, torch.Tensor]:
    """FedNova's server step (Wang et al. 2020, Section 5; p_i = n_i / n over the updates):
        d_i = (x - y_i) / ||a_i||_1,   tau_eff = sum_i p_i ||a_i||_1,   x <- x - tau_eff sum_i p_i d_i,
    i.e. x + sum_i (tau_eff p_i / ||a_i||_1) (y_i - x). Equal norms give FedAvg's sample-weighted mean.
    Integer buffers keep the global model's value."""
    if not updates:
        return dict(global_state)
    p = sample_weights(updates)
    a = np.asarray(norms, dtype=np.float64)
    tau_eff = float(np.dot(p, a))
    return apply_delta(global_state, mean_delta(global_state, updates, weights=tau_eff * p / a))


@dataclass(frozen=True)
class FedNova(StrategyBase):
    """FedNova (Wang, Liu, Liang, Joshi, Poor, NeurIPS 2020, "Tackling the Objective Inconsistency
    Problem in Heterogeneous Federated Optimization").

    FedAvg weights a client that ran tau_i local steps by how far it went, so with unequal tau_i it
    minimizes the surrogate sum_i (p_i tau_i / sum_j p_j tau_j) f_i instead of sum_i p_i f_i (Theorem 1).
    FedNova divides each update by the L1 norm of its aggregation vector a_i (`local_sgd_norm`: tau_i for
    plain SGD, the momentum form for rho > 0) and rescales by tau_eff (`normalized_average`). It is made
    for heterogeneous local work, so stragglers' partial updates are aggregated (`keeps_partial_work`).

    tau_i is `ClientUpdate.num_steps`. Weight decay enters every local step as a gradient term
    (`client.step_direction`), so it is normalised with the gradients, not separately: a_i counts steps
    of the direction d = g + weight_decay * w, whatever d holds. `momentum` must be the clients'
    `training.momentum`: `from_config` reads it and `local_objective` refuses a training config that
    disagrees.
    """

    #: rho, the clients' local SGD momentum (it decides ||a_i||_1)
    momentum: float = 0.0
    name: str = "fednova"
    secure_aggregation_refusal = ("its normalized average divides each update by that client's own local-step norm "
                                  "a_i (not implemented under secure aggregation)")
    keeps_partial_work: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.momentum < 1:
            raise ValueError(f"training.momentum must be in [0, 1) for FedNova, got {self.momentum!r}")

    @classmethod
    def from_config(cls, config: ExperimentConfig) -> "FedNova":
        return cls(momentum=config.training.momentum)

    def local_objective(self, training: TrainingConfig, round_: int) -> LocalObjective:
        if training.momentum != self.momentum:
            raise ValueError(f"training.momentum={training.momentum} but this FedNova normalises for momentum "
                             f"{self.momentum} (build it with FedNova.from_config(config), or "
                             f"FedNova(momentum={training.momentum}))")
        return super().local_objective(training, round_)

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate],
                  rng: np.random.Generator) -> dict[str, torch.Tensor]:
        norms = [local_sgd_norm(u.num_steps, self.momentum) for u in updates]
        return normalized_average(global_state, updates, norms)

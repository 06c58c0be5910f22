"""DP-FedAvg (McMahan et al., ICLR 2018): clipped client updates, Gaussian noise on their sum with a fixed
denominator, and the privacy spent, as dp_accounting's RDP accountant measures it."""

from __future__ import annotations

import functools
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Iterator, Mapping, Sequence

import dp_accounting
import numpy as np
import torch
from dp_accounting import rdp

from workbench.client import ClientUpdate, LocalObjective, clip_update, torch_generator
from workbench.config import ExperimentConfig, TrainingConfig
from workbench.strategies.base import State, StrategyBase

ROUNDS_KEY = "server.dp_rounds"


# ----- the mechanism and its accounting: pure functions -----


@contextmanager
def quiet_absl() -> Iterator[None]:
    """Silence absl's warnings inside the block: dp_accounting logs one per fractional RDP order whose
    series does not converge ("Excluding this order"), which only drops that order from the minimum over
    orders, so the epsilon stays a valid (slightly looser) upper bound."""
    logger = logging.getLogger("absl")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


def round_event(noise_multiplier: float, sampling_rate: float) -> dp_accounting.DpEvent:
    """One round of DP-FedAvg as a DpEvent: each client takes part with probability q (Poisson sampling)
    and the sum of the clipped updates gets Gaussian noise of std z C (McMahan et al. 2018, Algorithm 1)."""
    return dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier))


@functools.lru_cache(maxsize=256)
def dp_epsilon(noise_multiplier: float, sampling_rate: float, num_rounds: int, delta: float) -> float:
    """The epsilon of `num_rounds` rounds at `delta`, client-level under add/remove-one-client: the RDP
    accountant of dp_accounting (Mironov, CSF 2017; the sampled Gaussian of Mironov, Talwar and Zhang 2019)
    composing `round_event` once per round (`count=num_rounds`). Infinite when `noise_multiplier` is 0.

    Computing it costs tens of milliseconds whatever `num_rounds` is (the per-round RDP curve is computed
    once and scaled by the count), and the result depends on the count alone, so a resumed run continues
    bit-identically; cached, since the loop asks for the same count before and after each round."""
    if num_rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    with quiet_absl():
        accountant = rdp.RdpAccountant()
        accountant.compose(round_event(noise_multiplier, sampling_rate), num_rounds)
        return float(accountant.get_epsilon(delta))


def epsilon_without_replacement(noise_multiplier: float, num_clients: int, clients_per_round: int,
                                num_rounds: int, delta: float) -> float:
    """For comparison only (docs/privacy.md): the epsilon of the sampling the simulation performs (exactly
    m of N clients, uniformly without replacement) under the replace-one-client relation, the only one
    dp_accounting analyses it under (Wang, Balle and Kasiviswanathan, AISTATS 2019, Theorem 27).

    Replacing one client can move the sum of clipped updates by 2C, not C, so the noise is z C / (2C) = z/2
    sensitivities: the Gaussian event gets noise multiplier z / 2."""
    if num_rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    event = dp_accounting.SampledWithoutReplacementDpEvent(
        num_clients, clients_per_round, dp_accounting.GaussianDpEvent(noise_multiplier / 2))
    with quiet_absl():
        accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
        accountant.compose(event, num_rounds)
        return float(accountant.get_epsilon(delta))


def dp_noise_std(noise_multiplier: float, clip_norm: float, expected_clients: int) -> float:
    """The std of the noise each coordinate of the new global model gets: z C / m (McMahan et al. 2018,
    Algorithm 1: sigma = z S / (q W) with sensitivity S = C and q W = m for unit weights)."""
    return noise_multiplier * clip_norm / expected_clients


def clipped_delta(global_state: State, state: State, clip_norm: float) -> dict[str, torch.Tensor]:
    """clip(w - w_global, C) in float64 over the floating-point tensors: what one client adds to DP-FedAvg's
    sum (McMahan et al. 2018, Algorithm 1: unweighted, w_k = 1). The clip (`client.clip_update`, the clients'
    own) is applied again here, in float64, to what is summed: a client's clipped model stored in float32
    can sit just outside the ball (rounding), and an attacker's update replaces the clipped one; so the
    sensitivity C holds for every update summed."""
    floats = {k: v.double() for k, v in global_state.items() if v.is_floating_point()}
    clipped = clip_update(floats, {k: state[k].double() for k in floats}, clip_norm)
    return {k: clipped[k] - v for k, v in floats.items()}


def noisy_mean_step(global_state: State, total: Mapping[str, torch.Tensor], clip_norm: float,
                    noise_multiplier: float, expected_clients: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """x + (sum_i clip(Delta_i, C) + N(0, (z C)^2 I)) / m from the sum of `clipped_delta`s: the
    fixed-denominator estimator of McMahan et al. 2018 (Algorithm 1, f~_f with w_k = 1, so q W = m, the
    expected number of clients per round).

    The denominator is m whatever the number of updates summed (a dropped straggler does not change the
    sensitivity C / m), and the updates are not weighted by sample counts: a weight n_k / mean(n) would let
    one large client move the sum by more than C. Noise is drawn from `generator` in float64, one standard
    normal tensor per floating-point entry in the global model's order, and the sum is cast back to each
    entry's dtype; integer buffers keep the global model's value."""
    std = noise_multiplier * clip_norm
    out = {}
    for k, v in global_state.items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        noisy = total[k].to(v.device)
        if std:
            noisy = noisy + torch.randn(v.shape, generator=generator, dtype=torch.float64).to(v.device) * std
        out[k] = (v.double() + noisy / expected_clients).to(v.dtype)
    return out


def dp_fedavg_step(global_state: State, states: Sequence[State], clip_norm: float, noise_multiplier: float,
                   expected_clients: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One DP-FedAvg server step from the clients' models: `noisy_mean_step` of the sum of their
    `clipped_delta`s."""
    deltas = [clipped_delta(global_state, state, clip_norm) for state in states]
    floats = [k for k, v in global_state.items() if v.is_floating_point()]
    total = {k: sum((d[k] for d in deltas), torch.zeros_like(global_state[k], dtype=torch.float64)) for k in floats}
    return noisy_mean_step(global_state, total, clip_norm, noise_multiplier, expected_clients, generator)


# ----- the strategy -----


@dataclass(eq=False)
class DPFedAvg(StrategyBase):
    """DP-FedAvg (McMahan, Ramage, Talwar and Zhang, ICLR 2018, Algorithm 1, fixed-denominator estimator):
    client-level differential privacy for FedAvg.

    Every client clips its update w - w_global to L2 norm C (`LocalObjective.clip_norm`, applied by
    `client.finish_update`); the server adds the clipped updates unweighted (`clipped_delta`, the summand
    that secure aggregation can hide), adds N(0, (z C)^2 I) and divides by m = clients_per_round
    (`noisy_mean_step`). Stragglers are dropped, as in FedAvg: the paper has none, and the fixed
    denominator keeps the sensitivity C / m when fewer updates arrive. A round without any update releases
    nothing that depends on the clients' data: no noise, and it is not composed.

    The privacy spent (`dp_epsilon` at `delta`) is logged every round; with `target_epsilon` > 0 the run
    ends, FINISHED, before the round that would spend more. State: the number of rounds composed
    ("server.dp_rounds"); the noise comes from the (seed, round) server stream, so nothing else is needed
    to resume exactly.
    """

    #: C, the L2 norm every update is clipped to
    clip_norm: float
    #: z: the noise on the sum of the clipped updates has std z C (0 = clipping only, no privacy)
    noise_multiplier: float
    #: m, the expected number of clients per round: the fixed denominator
    clients_per_round: int
    #: N, the number of clients: the accountant's sampling rate is q = m / N
    num_clients: int
    #: the delta of the (epsilon, delta) guarantee that is logged
    delta: float = 1e-5
    #: > 0: end the run before the round that would spend more than this epsilon
    target_epsilon: float = 0.0
    name: str = "dp_fedavg"
    keeps_partial_work: bool = False
    #: rounds composed so far (rounds with at least one update)
    rounds: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.clip_norm > 0:
            raise ValueError(f"strategy.clip_norm must be > 0, got {self.clip_norm!r} (the L2 norm C every "
                             f"update is clipped to; near the median update norm of an unclipped run)")
        if not self.noise_multiplier >= 0:
            raise ValueError(f"strategy.noise_multiplier must be >= 0, got {self.noise_multiplier!r} (0 = "
                             f"clipping only; try 0.5-2)")
        if not 1 <= self.clients_per_round <= self.num_clients:
            raise ValueError(f"federation.clients_per_round must be in 1..federation.num_clients="
                             f"{self.num_clients}, got {self.clients_per_round!r} (build the strategy with "
                             f"DPFedAvg.from_config(config))")
        if not 0 < self.delta < 1:
            raise ValueError(f"privacy.delta must be in (0, 1), got {self.delta!r} (below 1 / num_clients, "
                             f"e.g. 1e-5)")
        if not self.target_epsilon >= 0:
            raise ValueError(f"privacy.target_epsilon must be >= 0, got {self.target_epsilon!r} (0 = no "
                             f"budget; try 1-10)")
        if self.target_epsilon > 0 and self.noise_multiplier == 0:
            raise ValueError(f"privacy.target_epsilon={self.target_epsilon:g} needs strategy.noise_multiplier "
                             f"> 0, got 0 (without noise epsilon is infinite: every round would exceed the "
                             f"budget; set noise_multiplier, e.g. 1.0, or privacy.target_epsilon=0)")
        if self.target_epsilon > 0 and self.epsilon_after(1) > self.target_epsilon:
            raise ValueError(f"privacy.target_epsilon={self.target_epsilon:g} is below the epsilon of a single "
                             f"round ({self.epsilon_after(1):.4g} at privacy.delta={self.delta:g} with "
                             f"strategy.noise_multiplier={self.noise_multiplier:g} and q = "
                             f"{self.clients_per_round}/{self.num_clients}): the run could not train at all "
                             f"(raise target_epsilon or noise_multiplier, or lower federation.clients_per_round)")

    @classmethod
    def from_config(cls, config: ExperimentConfig) -> "DPFedAvg":
        fed, privacy = config.federation, config.privacy
        return cls(clip_norm=config.strategy.clip_norm, noise_multiplier=config.strategy.noise_multiplier,
                   clients_per_round=fed.clients_per_round, num_clients=fed.num_clients, delta=privacy.delta,
                   target_epsilon=privacy.target_epsilon)

    @property
    def sampling_rate(self) -> float:
        """q = m / N, the probability the accountant assumes each client takes part in a round with."""
        return self.clients_per_round / self.num_clients

    @property
    def noise_std(self) -> float:
        """The std of the noise on each coordinate of the new global model: z C / m."""
        return dp_noise_std(self.noise_multiplier, self.clip_norm, self.clients_per_round)

    def epsilon_after(self, num_rounds: int) -> float:
        """The epsilon at `delta` once `num_rounds` rounds are composed (inf when noise_multiplier is 0)."""
        return dp_epsilon(self.noise_multiplier, self.sampling_rate, num_rounds, self.delta)

    def local_objective(self, training: TrainingConfig, round_: int) -> LocalObjective:
        return replace(super().local_objective(training, round_), clip_norm=self.clip_norm)

    def summand(self, global_state: State, update: ClientUpdate) -> dict[str, torch.Tensor]:
        return clipped_delta(global_state, update.state, self.clip_norm)

    def aggregate_sum(self, global_state: State, total: Mapping[str, torch.Tensor], num_updates: int,
                      rng: np.random.Generator) -> dict[str, torch.Tensor]:
        new_state = noisy_mean_step(global_state, total, self.clip_norm, self.noise_multiplier,
                                    self.clients_per_round, torch_generator(rng))
        self.rounds += 1
        return new_state

    def round_metrics(self) -> dict[str, float]:
        """`dp_noise_std` (z C / m) and `dp_epsilon` after the rounds composed so far; without noise
        epsilon is infinite and the round loop keeps finite metrics only, so `dp_epsilon` is left out."""
        metrics = {"dp_noise_std": self.noise_std}
        if self.noise_multiplier > 0:
            metrics["dp_epsilon"] = self.epsilon_after(self.rounds)
        return metrics

    def stop_reason(self, round_: int) -> str | None:
        if not self.target_epsilon:
            return None
        spent, next_ = self.epsilon_after(self.rounds), self.epsilon_after(self.rounds + 1)
        if next_ <= self.target_epsilon:
            return None
        return (f"privacy budget: round {round_} would raise epsilon from {spent:.4g} to {next_:.4g}, above "
                f"privacy.target_epsilon={self.target_epsilon:g} (delta={self.delta:g}, {self.rounds} rounds "
                f"composed)")

    def state_dict(self) -> dict[str, torch.Tensor]:
        # empty while nothing is composed: a fresh strategy's state
        return {ROUNDS_KEY: torch.tensor(self.rounds, dtype=torch.int64)} if self.rounds else {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        unknown = sorted(set(state) - {ROUNDS_KEY})
        if unknown:
            raise ValueError(f"strategy 'dp_fedavg' keeps only {ROUNDS_KEY!r}, but the checkpoint holds "
                             f"{unknown[:3]} (was it written by another strategy?)")
        if ROUNDS_KEY not in state:
            self.rounds = 0
            return
        value = state[ROUNDS_KEY]
        if value.numel() != 1 or value.is_floating_point() or int(value) < 0:
            raise ValueError(f"{ROUNDS_KEY} must be one non-negative integer (the rounds composed), got "
                             f"{value!r} (was the checkpoint edited?)")
        self.rounds = int(value)

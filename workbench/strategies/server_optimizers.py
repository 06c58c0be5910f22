"""Server optimizers: the server steps along the clients' mean update as if it were a gradient, with momentum
(FedAvgM) or adaptively (FedAdagrad, FedYogi, FedAdam; Reddi et al., "Adaptive Federated Optimization",
ICLR 2021, Algorithm 2).

Every method here steps along the pseudo-gradient Delta_t = sum_i p_i (y_i - x_t) of round t, where x_t is the
global model and y_i client i's model, computed from the sum of the clients' n_i (y_i - x_t) (`StrategyBase.summand`),
so secure aggregation composes. Algorithm 2 writes the unweighted mean (1/|S|) sum_{i in S}; we weight
by sample counts, p_i = n_i / sum_j n_j (`strategies.base.mean_delta`), as FedAvg does (McMahan et al.,
AISTATS 2017, Algorithm 1), so that FedAvgM with server_momentum = 0 and server_lr = 1 IS FedAvg, and every
server optimizer here differs from FedAvg only in its server step.

Adaptive step (Algorithm 2, per coordinate; Delta_t^2 elementwise):
    m_t = beta1 m_{t-1} + (1 - beta1) Delta_t
    FedAdagrad: v_t = v_{t-1} + Delta_t^2
    FedYogi:    v_t = v_{t-1} - (1 - beta2) Delta_t^2 sign(v_{t-1} - Delta_t^2)
    FedAdam:    v_t = beta2 v_{t-1} + (1 - beta2) Delta_t^2
    x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)
The moments start at m = 0 and v = tau^2: Algorithm 2 asks for any v_{-1} >= tau^2 (its rounds count from
t = 0); we use exactly tau^2. There is NO bias correction (no division by 1 - beta^t): Algorithm 2 has none.
Flower's FedAdam adds Adam's bias correction (Kingma & Ba 2015, Algorithm 1); we follow the paper, so
FedAdam's first step is eta (1 - beta1) Delta / (sqrt((1 - beta2) Delta^2 + beta2 tau^2) + tau).

Only floating-point tensors are stepped; integer buffers keep the global model's value. Every method drops
stragglers (the paper's clients all run K local steps) and leaves the clients' objective unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch

from workbench.config import ExperimentConfig
from workbench.strategies.base import (State, StrategyBase, apply_delta, flatten_state, mean_update_from_sum,
                                       unflatten_state)

M_PREFIX = "server.m"
V_PREFIX = "server.v"


# ----- the math: pure functions, one tensor at a time -----


def momentum_buffer_step(buffer: torch.Tensor, delta: torch.Tensor, beta: float) -> torch.Tensor:
    """FedAvgM's server momentum v_t = beta v_{t-1} + Delta_t (Hsu, Qi & Brown 2019, with their
    Delta w = x_t - average written here as -Delta_t; Reddi et al. 2021's SGD-with-momentum server)."""
    return buffer * beta + delta


def first_moment(m: torch.Tensor, delta: torch.Tensor, beta1: float) -> torch.Tensor:
    """m_t = beta1 m_{t-1} + (1 - beta1) Delta_t (Reddi et al. 2021, Algorithm 2)."""
    return m * beta1 + delta * (1.0 - beta1)


def adagrad_second_moment(v: torch.Tensor, delta: torch.Tensor, beta2: float) -> torch.Tensor:
    """FedAdagrad: v_t = v_{t-1} + Delta_t^2 (Reddi et al. 2021, Algorithm 2); `beta2` is not used."""
    return v + delta * delta


def yogi_second_moment(v: torch.Tensor, delta: torch.Tensor, beta2: float) -> torch.Tensor:
    """FedYogi: v_t = v_{t-1} - (1 - beta2) Delta_t^2 sign(v_{t-1} - Delta_t^2) (Reddi et al. 2021,
    Algorithm 2; Zaheer et al., NeurIPS 2018): v moves towards Delta_t^2 by at most (1 - beta2) Delta_t^2
    per round, and stays positive when it starts positive."""
    squared = delta * delta
    return v - squared * torch.sign(v - squared) * (1.0 - beta2)


def adam_second_moment(v: torch.Tensor, delta: torch.Tensor, beta2: float) -> torch.Tensor:
    """FedAdam: v_t = beta2 v_{t-1} + (1 - beta2) Delta_t^2 (Reddi et al. 2021, Algorithm 2)."""
    return v * beta2 + delta * delta * (1.0 - beta2)


def adaptive_step(m: torch.Tensor, v: torch.Tensor, eta: float, tau: float) -> torch.Tensor:
    """The server's move eta m_t / (sqrt(v_t) + tau), so that x_{t+1} = x_t + this (Reddi et al. 2021,
    Algorithm 2, last line; no bias correction)."""
    return m * eta / (v.sqrt() + tau)


SecondMoment = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


# ----- the math on whole models -----


def initial_moments(delta: State, tau: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """m = 0 and v = tau^2 for every tensor of `delta` (Algorithm 2 initialises v_{-1} >= tau^2; we use
    exactly tau^2)."""
    return ({k: torch.zeros_like(d) for k, d in delta.items()},
            {k: torch.full_like(d, tau * tau) for k, d in delta.items()})


def adaptive_server_update(delta: State, m: State, v: State, second_moment: SecondMoment, *, eta: float,
                           beta1: float, beta2: float, tau: float
                           ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One round of Algorithm 2 (Reddi et al. 2021) on every tensor of the pseudo-gradient `delta`, from the
    moments (m_{t-1}, v_{t-1}): returns (the move x_{t+1} - x_t, m_t, v_t)."""
    new_m = {k: first_moment(m[k], d, beta1) for k, d in delta.items()}
    new_v = {k: second_moment(v[k], d, beta2) for k, d in delta.items()}
    move = {k: adaptive_step(new_m[k], new_v[k], eta, tau) for k in delta}
    return move, new_m, new_v


def momentum_server_update(delta: State, buffer: State, *, beta: float, server_lr: float
                           ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One round of FedAvgM (Hsu et al. 2019): v_t = beta v_{t-1} + Delta_t, x_{t+1} = x_t + server_lr v_t;
    returns (the move server_lr v_t, v_t)."""
    new_buffer = {k: momentum_buffer_step(buffer[k], d, beta) for k, d in delta.items()}
    return {k: b * server_lr for k, b in new_buffer.items()}, new_buffer


# ----- state helpers -----


def _held_moments(strategy: str, moments: State, delta: State) -> dict[str, torch.Tensor] | None:
    """The moments a strategy holds, on the device of this round's pseudo-gradient; None before its first
    round. Moments for other tensors than `delta`'s (a checkpoint of another model) are refused."""
    if not moments:
        return None
    if set(moments) != set(delta):
        missing, extra = sorted(set(delta) - set(moments)), sorted(set(moments) - set(delta))
        raise ValueError(f"strategy {strategy!r} holds server moments for another model: missing {missing[:3]}, "
                         f"unknown {extra[:3]} (was the checkpoint written for another model.name?)")
    return {k: t.to(delta[k].device) for k, t in moments.items()}


def _check_state_keys(strategy: str, state: Mapping[str, torch.Tensor], prefixes: Sequence[str]) -> None:
    unknown = [k for k in state if not any(k.startswith(p + ".") for p in prefixes)]
    if unknown:
        raise ValueError(f"strategy {strategy!r} keeps only {', '.join(p + '.<name>' for p in prefixes)}, but the "
                         f"checkpoint holds {sorted(unknown)[:3]} (was it written by another strategy?)")


def _require(is_ok: bool, knob: str, value: float, rule: str, hint: str) -> None:
    """Direct construction (not via the config) gets the same range rules as `config.StrategyConfig`."""
    if not is_ok:
        raise ValueError(f"{knob} must be {rule}, got {value!r} ({hint})")


# ----- the strategies -----


@dataclass(eq=False)
class FedAvgM(StrategyBase):
    """FedAvgM (Hsu, Qi & Brown 2019, "Measuring the effects of non-identical data distribution for
    federated visual classification"; Reddi et al. 2021's SGD-with-momentum server): the server keeps a
    momentum buffer v_t = beta v_{t-1} + Delta_t of the pseudo-gradients and moves x_{t+1} = x_t + server_lr v_t.
    beta = 0 and server_lr = 1 is FedAvg. The buffer is saved as "server.m.<name>" (Hsu et al. call it v)."""

    server_momentum: float = 0.9
    server_lr: float = 1.0
    name: str = "fedavgm"
    keeps_partial_work: bool = False
    _m: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        _require(0.0 <= self.server_momentum < 1.0, "strategy.server_momentum", self.server_momentum,
                 ">= 0 and < 1", "Hsu et al. use 0.9; 0 = FedAvg")
        _require(self.server_lr > 0.0, "strategy.server_lr", self.server_lr, "> 0", "1 is FedAvg's step; try 0.5-1")

    @classmethod
    def from_config(cls, config: ExperimentConfig) -> "FedAvgM":
        return cls(server_momentum=config.strategy.server_momentum, server_lr=config.strategy.server_lr)

    def aggregate_sum(self, global_state: State, total: Mapping[str, torch.Tensor], num_updates: int,
                      rng: np.random.Generator) -> dict[str, torch.Tensor]:
        delta = mean_update_from_sum(global_state, total)
        buffer = _held_moments(self.name, self._m, delta) or {k: torch.zeros_like(d) for k, d in delta.items()}
        move, self._m = momentum_server_update(delta, buffer, beta=self.server_momentum, server_lr=self.server_lr)
        return apply_delta(global_state, move)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return flatten_state(M_PREFIX, self._m)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        _check_state_keys(self.name, state, (M_PREFIX,))
        self._m = {k: v.detach().clone() for k, v in unflatten_state(M_PREFIX, state).items()}


@dataclass(eq=False)
class AdaptiveServerOptimizer(StrategyBase):
    """What FedAdagrad, FedYogi and FedAdam share (Reddi et al. 2021, Algorithm 2): the first moment, the
    step, the state; each subclass names its second-moment rule. Moments are saved as "server.m.<name>" and
    "server.v.<name>", in the model's dtypes."""

    adaptive_lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    name: str = "adaptive"
    keeps_partial_work: bool = False
    _m: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    _v: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    #: the second-moment rule v_t = rule(v_{t-1}, Delta_t, beta2), set by each subclass
    second_moment: ClassVar[SecondMoment]

    def __post_init__(self) -> None:
        _require(self.adaptive_lr > 0.0, "strategy.adaptive_lr", self.adaptive_lr, "> 0",
                 "Reddi et al. tune it over 1e-3-1; try 0.01-0.1")
        _require(0.0 <= self.beta1 < 1.0, "strategy.beta1", self.beta1, ">= 0 and < 1", "Reddi et al. use 0.9")
        _require(0.0 <= self.beta2 < 1.0, "strategy.beta2", self.beta2, ">= 0 and < 1", "Reddi et al. use 0.99")
        _require(self.tau > 0.0, "strategy.tau", self.tau, "> 0", "Reddi et al. use 1e-3; larger = closer to FedAvgM")

    @classmethod
    def from_config(cls, config: ExperimentConfig) -> "AdaptiveServerOptimizer":
        s = config.strategy
        return cls(adaptive_lr=s.adaptive_lr, beta1=s.beta1, beta2=s.beta2, tau=s.tau)

    def aggregate_sum(self, global_state: State, total: Mapping[str, torch.Tensor], num_updates: int,
                      rng: np.random.Generator) -> dict[str, torch.Tensor]:
        delta = mean_update_from_sum(global_state, total)
        m, v = _held_moments(self.name, self._m, delta), _held_moments(self.name, self._v, delta)
        if m is None:
            m, v = initial_moments(delta, self.tau)
        move, self._m, self._v = adaptive_server_update(delta, m, v, type(self).second_moment, eta=self.adaptive_lr,
                                                        beta1=self.beta1, beta2=self.beta2, tau=self.tau)
        return apply_delta(global_state, move)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**flatten_state(M_PREFIX, self._m), **flatten_state(V_PREFIX, self._v)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        _check_state_keys(self.name, state, (M_PREFIX, V_PREFIX))
        m, v = unflatten_state(M_PREFIX, state), unflatten_state(V_PREFIX, state)
        if set(m) != set(v):
            raise ValueError(f"strategy {self.name!r} needs server.m.<name> and server.v.<name> for the same "
                             f"tensors, got m for {sorted(m)[:3]} and v for {sorted(v)[:3]} (a damaged checkpoint?)")
        self._m = {k: t.detach().clone() for k, t in m.items()}
        self._v = {k: t.detach().clone() for k, t in v.items()}


@dataclass(eq=False)
class FedAdagrad(AdaptiveServerOptimizer):
    """FedAdagrad (Reddi et al. 2021, Algorithm 2): v_t = v_{t-1} + Delta_t^2 (beta2 unused)."""

    name: str = "fedadagrad"
    second_moment: ClassVar[SecondMoment] = staticmethod(adagrad_second_moment)


@dataclass(eq=False)
class FedYogi(AdaptiveServerOptimizer):
    """FedYogi (Reddi et al. 2021, Algorithm 2): v_t = v_{t-1} - (1 - beta2) Delta_t^2 sign(v_{t-1} - Delta_t^2)."""

    name: str = "fedyogi"
    second_moment: ClassVar[SecondMoment] = staticmethod(yogi_second_moment)


@dataclass(eq=False)
class FedAdam(AdaptiveServerOptimizer):
    """FedAdam (Reddi et al. 2021, Algorithm 2): v_t = beta2 v_{t-1} + (1 - beta2) Delta_t^2, without Adam's
    bias correction (Flower's FedAdam has one; the paper does not)."""

    name: str = "fedadam"
    second_moment: ClassVar[SecondMoment] = staticmethod(adam_second_moment)

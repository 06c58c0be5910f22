"""The `Strategy` protocol (what clients do, what they receive and return, which updates count, how they are
aggregated, what the server remembers), its defaults, and the aggregation math several methods share."""

from __future__ import annotations

from typing import ClassVar, Iterable, Mapping, Protocol, Sequence

import numpy as np
import torch

from workbench.client import ClientTask, ClientUpdate, LocalObjective
from workbench.config import ExperimentConfig, TrainingConfig

State = Mapping[str, torch.Tensor]
Payload = Mapping[str, State]


class Strategy(Protocol):
    """A federated algorithm, as the round loop sees it.

    Every method is called by exactly one step of `simulation.run_round`: `local_objective` and
    `client_payload` when the cohort's tasks are planned, `accepts` for the straggler policy (its single
    home), `aggregate` for the next global model, `round_metrics` after it, `stop_reason` before each
    round, and `state_dict` / `load_state_dict` by every checkpoint and resume.
    """

    name: str
    #: whether stragglers' partial work is trained and aggregated (else stragglers are not asked to train)
    keeps_partial_work: bool
    #: whether clients download and upload models (False for the local and centralized baselines: the
    #: round's bytes_down / bytes_up are 0)
    exchanges_models: bool

    def plan_tasks(self, tasks: Sequence[ClientTask]) -> list[ClientTask]:
        """The tasks the round trains, from the accepted clients' tasks (the centralized baseline pools
        them into one)."""

    def start_state(self, client: int, global_state: State) -> State:
        """The model `client` starts its local training from (the global model; the local baseline: the
        client's own model)."""

    def client_models(self, global_state: State, clients: Sequence[int]) -> Mapping[int, State] | None:
        """The model each of `clients` is evaluated with, or None when every client uses the global model
        (the local baseline: each client's own)."""

    def local_objective(self, training: TrainingConfig, round_: int) -> LocalObjective:
        """What every client of round `round_` minimizes, and how."""

    def client_payload(self, client: int, global_state: State) -> tuple[Payload, Payload]:
        """(what the server sends `client` beyond the model, the client's own state it trains with)."""

    def accepts(self, task: ClientTask) -> bool:
        """Whether the update this task produces will be aggregated (False: the client is not asked)."""

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate],
                  rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """The next global model from the accepted updates; `rng` is the server's stream for this round
        (DP noise), independent of every client-side stream."""

    #: why secure aggregation cannot hide this method's individual updates; None where the server step is
    #: a function of the sum of the clients' `summand`s (then `aggregate` is `aggregate_sum` of that sum)
    secure_aggregation_refusal: str | None

    def summand(self, global_state: State, update: ClientUpdate) -> dict[str, torch.Tensor]:
        """What one update contributes to the sum the server step needs (float64 tensors): the part of
        aggregation a client can compute alone, and what secure aggregation masks."""

    def aggregate_sum(self, global_state: State, total: Mapping[str, torch.Tensor], num_updates: int,
                      rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """The next global model from the sum of `num_updates` (>= 1) updates' `summand`s."""

    def round_metrics(self) -> dict[str, float]:
        """What the strategy measured in the last `aggregate` (e.g. the privacy spent), for the record."""

    def stop_reason(self, round_: int) -> str | None:
        """Why the run should end, FINISHED, before `round_` (e.g. the privacy budget), or None."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Server state and per-client state, as flat named tensors (saved in every checkpoint)."""

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what `state_dict` returned."""


class StrategyBase:
    """Defaults of the protocol for a stateless, FedAvg-like method: the clients' SGD as configured,
    nothing beyond the model on the wire, stragglers dropped unless `keeps_partial_work`, no state."""

    name = "base"
    keeps_partial_work = False
    exchanges_models = True

    def plan_tasks(self, tasks: Sequence[ClientTask]) -> list[ClientTask]:
        return list(tasks)

    def start_state(self, client: int, global_state: State) -> State:
        return global_state

    def client_models(self, global_state: State, clients: Sequence[int]) -> Mapping[int, State] | None:
        return None

    def local_objective(self, training: TrainingConfig, round_: int) -> LocalObjective:
        return base_objective(training, round_)

    def client_payload(self, client: int, global_state: State) -> tuple[Payload, Payload]:
        return {}, {}

    def accepts(self, task: ClientTask) -> bool:
        return self.keeps_partial_work or not task.is_partial

    secure_aggregation_refusal: ClassVar[str | None] = None

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate],
                  rng: np.random.Generator) -> dict[str, torch.Tensor]:
        if not updates:
            return dict(global_state)
        total = sum_summands([self.summand(global_state, u) for u in updates])
        return self.aggregate_sum(global_state, total, len(updates), rng)

    def summand(self, global_state: State, update: ClientUpdate) -> dict[str, torch.Tensor]:
        return weighted_summand(global_state, update)

    def aggregate_sum(self, global_state: State, total: Mapping[str, torch.Tensor], num_updates: int,
                      rng: np.random.Generator) -> dict[str, torch.Tensor]:
        return average_from_sum(global_state, total)

    def round_metrics(self) -> dict[str, float]:
        return {}

    def stop_reason(self, round_: int) -> str | None:
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"strategy {self.name!r} keeps no state, but the checkpoint holds "
                             f"{sorted(state)[:3]} (was it written by another strategy?)")


def base_objective(training: TrainingConfig, round_: int) -> LocalObjective:
    """The clients' SGD of round `round_` as `training` configures it: lr * lr_decay^(round - 1)."""
    return LocalObjective(lr=training.lr * training.lr_decay ** (round_ - 1), batch_size=training.batch_size,
                          momentum=training.momentum, weight_decay=training.weight_decay)


# ----- aggregation math: pure functions -----


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


def aggregate_by_samples(global_state: State, updates: Sequence[ClientUpdate]) -> dict[str, torch.Tensor]:
    """Sample-weighted average of the updates; the global model is kept when no update arrived."""
    if not updates:
        return dict(global_state)
    return weighted_average([u.state for u in updates], [u.num_samples for u in updates])


#: the key of a summand that carries the client's weight n_i (no model tensor is named so)
WEIGHT_KEY = "@num_samples"


def weighted_summand(global_state: State, update: ClientUpdate) -> dict[str, torch.Tensor]:
    """n_i (w_i - w_global) for every floating-point tensor, n_i w_i for integer buffers, and n_i itself
    (`WEIGHT_KEY`), in float64: summed over the updates and divided by sum_i n_i, they give FedAvg's
    sample-weighted average (McMahan et al. 2017, Algorithm 1) as a function of one sum, which is what
    secure aggregation lets the server learn. The update is sent relative to the global model so that
    its quantization (`privacy.secure_aggregation`) rounds the small change, not the weights."""
    n = float(update.num_samples)
    out = {k: (update.state[k].double() - v.double()) * n if v.is_floating_point() else update.state[k].double() * n
           for k, v in global_state.items()}
    out[WEIGHT_KEY] = torch.tensor(n, dtype=torch.float64)
    return out


def sum_summands(summands: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The key-by-key sum of the updates' summands (what the server unmasks under secure aggregation)."""
    return {k: sum(s[k] for s in summands) for k in summands[0]}


def mean_update_from_sum(global_state: State, total: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """sum_i n_i (w_i - w_global) / sum_i n_i over the floating-point tensors, in the global model's dtypes:
    `mean_delta`, computed from the sum of `weighted_summand`s."""
    weight = float(total[WEIGHT_KEY])
    return {k: (total[k] / weight).to(v.dtype) for k, v in global_state.items() if v.is_floating_point()}


def average_from_sum(global_state: State, total: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The sample-weighted average model from the sum of `weighted_summand`s: w_global + the mean update
    (accumulated in float64); integer buffers get their weighted mean, cast back as `weighted_average` does."""
    weight = float(total[WEIGHT_KEY])
    return {k: (v.double() + total[k] / weight).to(v.dtype) if v.is_floating_point() else (total[k] / weight).to(v.dtype)
            for k, v in global_state.items()}


def sample_weights(updates: Sequence[ClientUpdate]) -> np.ndarray:
    """p_i = n_i / sum_j n_j over the updates."""
    counts = np.array([u.num_samples for u in updates], dtype=np.float64)
    return counts / counts.sum()


def mean_delta(global_state: State, updates: Sequence[ClientUpdate],
               weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """sum_i p_i (w_i - w_global) over the floating-point tensors (p = sample weights by default): the
    "pseudo-gradient" that server optimizers step along (Reddi et al., ICLR 2021, Algorithm 2, Delta_t)."""
    p = sample_weights(updates) if weights is None else np.asarray(weights, dtype=np.float64)
    return {k: sum((u.state[k] - v) * float(w) for u, w in zip(updates, p)).to(v.dtype)
            for k, v in global_state.items() if v.is_floating_point()}


def apply_delta(global_state: State, delta: State) -> dict[str, torch.Tensor]:
    """w_global + delta for the tensors in `delta`; every other tensor (integer buffers) kept as it is."""
    return {k: (v + delta[k]).to(v.dtype) if k in delta else v.clone() for k, v in global_state.items()}


# ----- state: flat named tensors for checkpoints -----


def flatten_state(prefix: str, tensors: State) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().to("cpu", copy=True) for k, v in tensors.items()}


def unflatten_state(prefix: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    head = prefix + "."
    return {k[len(head):]: v for k, v in state.items() if k.startswith(head)}


def clients_in(prefix: str, state: Mapping[str, torch.Tensor]) -> Iterable[int]:
    """The client ids of keys `<prefix>.<client>.<name>`."""
    head = prefix + "."
    return sorted({int(k[len(head):].split(".", 1)[0]) for k in state if k.startswith(head)})


def check_num_updates(config: ExperimentConfig, needed: int, why: str, knob: str) -> None:
    """Refuse, at preparation, a config whose rounds cannot have the `needed` updates a method needs."""
    per_round = config.federation.clients_per_round
    if per_round < needed:
        raise ValueError(f"federation.clients_per_round={per_round} is too few for strategy.name="
                         f"{config.strategy.name!r}: {why} needs at least {needed} (raise clients_per_round "
                         f"or lower {knob})")

"""SCAFFOLD (Karimireddy et al., ICML 2020): control variates that correct the clients' drift, the server
and per-client variates it keeps, and its aggregation math."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import numpy as np
import torch

from workbench.client import ClientUpdate, LocalObjective
from workbench.config import ExperimentConfig, TrainingConfig
from workbench.strategies.base import (Payload, State, StrategyBase, apply_delta, clients_in, flatten_state,
                                       mean_delta, unflatten_state)

SERVER_PREFIX = "server.c"
CLIENT_PREFIX = "client"


# ----- SCAFFOLD's server math: pure functions -----


def zero_variate(global_state: State) -> dict[str, torch.Tensor]:
    """A control variate of zeros, one tensor per floating-point entry of the global model (the models of
    the zoo hold parameters only, so these are exactly the names `named_parameters` yields). Algorithm 1
    of Karimireddy et al. 2020 takes c and every c_i as inputs; they start at zero here."""
    return {k: torch.zeros_like(v) for k, v in global_state.items() if v.is_floating_point()}


def scaffold_model_step(global_state: State, updates: Sequence[ClientUpdate],
                        server_lr: float) -> dict[str, torch.Tensor]:
    """x <- x + eta_g * (1/|S|) sum_{i in S} (y_i - x) (Karimireddy et al. 2020, Algorithm 1, lines 16-17).

    The mean over the sampled set S is unweighted, as the paper writes it (its objective is the plain mean
    of the clients' objectives); FedAvg weights by sample counts instead. Integer buffers keep the global
    model's value."""
    if not updates:
        return dict(global_state)
    delta = mean_delta(global_state, updates, weights=[1.0 / len(updates)] * len(updates))
    return apply_delta(global_state, {k: (d * server_lr).to(d.dtype) for k, d in delta.items()})


def scaffold_variate_step(c: State, delta_cs: Sequence[State], num_clients: int) -> dict[str, torch.Tensor]:
    """c <- c + (1/N) sum_{i in S} delta_c_i over the N clients of the federation, not the |S| sampled
    ones (Karimireddy et al. 2020, Algorithm 1, line 17: c + (|S|/N) * mean_S delta_c_i), so that c stays
    the mean of all N client variates (the unsampled ones did not change)."""
    if not delta_cs:
        return dict(c)
    # c follows the updates' device (it is on the CPU after a resume)
    return {k: (v.to(delta_cs[0][k].device) + sum(d[k] for d in delta_cs) / num_clients).to(v.dtype)
            for k, v in c.items()}


def is_zero(tensors: State) -> bool:
    return all(not bool(t.any()) for t in tensors.values())


@dataclass(eq=False)
class Scaffold(StrategyBase):
    """SCAFFOLD (Karimireddy et al., ICML 2020, Algorithm 1 with option II).

    Every client steps along g - c_i + c (line 10; `workbench.client` applies it as the correction
    c - c_i when `LocalObjective.control_variates`), receives the server variate c (counted as traffic),
    keeps its own c_i (not traffic), and sends back y_i and delta_c_i = c_i+ - c_i with option II's
    c_i+ = c_i - c + (x - y_i) / (K eta_l) (lines 12-13, `client.finish_update`). The server steps the model
    along the unweighted mean of y_i - x with `server_lr` = eta_g and adds (1/N) sum delta_c_i to c
    (lines 16-17); each sampled client's new c_i is written back here (line 14, c_i <- c_i+), as the
    client's memory between rounds.
    Stragglers are dropped, as in FedAvg (the paper assumes every sampled client does its K steps).

    State: the server variate ("server.c.<name>", from the first aggregated round on) and every client's
    non-zero c_i ("client.<id>.c_i.<name>"); a client never sampled holds c_i = 0.
    """

    #: N, the number of clients in the federation (Algorithm 1, line 17)
    num_clients: int
    #: eta_g, the server learning rate (1 = the clients' mean model)
    server_lr: float = 1.0
    name: str = "scaffold"
    secure_aggregation_refusal = ("the server of this simulation keeps every client's control variate c_i and reads "
                                  "each delta c_i, so the individual updates stay visible (not implemented under "
                                  "secure aggregation)")
    keeps_partial_work: bool = False
    #: the server variate c (empty until the first aggregated round: c = 0)
    c: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    #: each client's variate c_i, for the clients whose c_i is not zero
    c_i: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.num_clients, int) or self.num_clients < 1:
            raise ValueError(f"Scaffold.num_clients must be an int >= 1 (N of Algorithm 1), got "
                             f"{self.num_clients!r} (build it with Scaffold.from_config(config), which reads "
                             f"federation.num_clients)")
        if not self.server_lr > 0:
            raise ValueError(f"strategy.server_lr must be > 0, got {self.server_lr!r} (1 is FedAvg's step; "
                             f"try 0.5-1)")

    @classmethod
    def from_config(cls, config: ExperimentConfig) -> "Scaffold":
        return cls(num_clients=config.federation.num_clients, server_lr=config.strategy.server_lr)

    def local_objective(self, training: TrainingConfig, round_: int) -> LocalObjective:
        return replace(super().local_objective(training, round_), control_variates=True)

    def client_payload(self, client: int, global_state: State) -> tuple[Payload, Payload]:
        zeros = zero_variate(global_state)
        c = {k: self.c[k].to(v.device) for k, v in zeros.items()} if self.c else zeros
        own = self.c_i.get(client)
        c_i = {k: own[k].to(v.device) for k, v in zeros.items()} if own is not None else zeros
        return {"c": c}, {"c_i": c_i}

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate],
                  rng: np.random.Generator) -> dict[str, torch.Tensor]:
        if not updates:
            return dict(global_state)
        for u in updates:
            if "delta_c" not in u.payload or "c_i" not in u.client_state:
                raise ValueError(f"scaffold needs every update to carry payload['delta_c'] and client_state"
                                 f"['c_i'], but client {u.client}'s has payload {sorted(u.payload)} and "
                                 f"client_state {sorted(u.client_state)} (train with the strategy's "
                                 f"local_objective, control_variates=True, and complete it with "
                                 f"client.finish_update)")
            if not 0 <= u.client < self.num_clients:
                raise ValueError(f"client {u.client} is outside the federation of Scaffold.num_clients="
                                 f"{self.num_clients} (build the strategy from the run's config: "
                                 f"federation.num_clients)")
        new_state = scaffold_model_step(global_state, updates, self.server_lr)
        self.c = scaffold_variate_step(self.c or zero_variate(global_state), [u.payload["delta_c"] for u in updates],
                                       self.num_clients)
        for u in updates:
            new_c_i = {k: v.detach().clone() for k, v in u.client_state["c_i"].items()}
            if is_zero(new_c_i):
                self.c_i.pop(u.client, None)  # a zero variate is what a never-sampled client holds
            else:
                self.c_i[u.client] = new_c_i
        return new_state

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = flatten_state(SERVER_PREFIX, self.c)
        for client in sorted(self.c_i):
            state.update(flatten_state(f"{CLIENT_PREFIX}.{client}.c_i", self.c_i[client]))
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        unknown = [k for k in state if not (k.startswith(SERVER_PREFIX + ".") or k.startswith(CLIENT_PREFIX + "."))]
        if unknown:
            raise ValueError(f"strategy 'scaffold' keeps 'server.c.<name>' and 'client.<id>.c_i.<name>', but "
                             f"the checkpoint holds {sorted(unknown)[:3]} (was it written by another strategy?)")
        try:
            clients = list(clients_in(CLIENT_PREFIX, state))
        except ValueError as err:
            raise ValueError(f"strategy 'scaffold' expects client keys 'client.<id>.c_i.<name>' with an integer "
                             f"id, got {sorted(k for k in state if k.startswith(CLIENT_PREFIX + '.'))[:3]}") from err
        c_i = {client: unflatten_state(f"{CLIENT_PREFIX}.{client}.c_i", state) for client in clients}
        server = unflatten_state(SERVER_PREFIX, state)
        read = {f"{SERVER_PREFIX}.{k}" for k in server}
        read |= {f"{CLIENT_PREFIX}.{client}.c_i.{k}" for client, variate in c_i.items() for k in variate}
        unread = sorted(set(state) - read)
        if unread:
            raise ValueError(f"strategy 'scaffold' expects client keys 'client.<id>.c_i.<name>', got "
                             f"{unread[:3]} (was the checkpoint written by another strategy?)")
        self.c, self.c_i = server, c_i

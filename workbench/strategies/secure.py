"""Secure aggregation around any sum-based strategy: the server step runs on the cohort's sum, unmasked from
the clients' masked, quantized summands (Bonawitz et al., CCS 2017; the protocol is
`workbench.privacy.secure_aggregation`)."""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from workbench.client import ClientTask, ClientUpdate
from workbench.config import ExperimentConfig
from workbench.privacy.secure_aggregation import SecureSum, secure_sum, threshold_for
from workbench.strategies.base import State, Strategy


def flatten_summand(summand: Mapping[str, torch.Tensor]) -> tuple[np.ndarray, list[tuple[str, torch.Size]]]:
    """One float64 vector of a summand's tensors (in their order) and the layout to undo it."""
    layout = [(k, v.shape) for k, v in summand.items()]
    return np.concatenate([v.detach().double().cpu().reshape(-1).numpy() for v in summand.values()]), layout


def unflatten_summand(vector: np.ndarray, layout: Sequence[tuple[str, torch.Size]],
                      device: torch.device) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for key, shape in layout:
        size = math.prod(shape)
        out[key] = torch.from_numpy(vector[start:start + size].copy()).reshape(shape).to(device)
        start += size
    return out


def check_secure_aggregation(strategy: Strategy, config: ExperimentConfig) -> None:
    """Refuse, at preparation, a strategy that needs individual updates or a cohort too small to mask."""
    why = getattr(strategy, "secure_aggregation_refusal", None)
    if why is not None:
        raise ValueError(f"strategy.secure_aggregation=true cannot be used with strategy.name="
                         f"{config.strategy.name!r}: {why} (use fedavg, fedprox, a server optimizer or dp_fedavg, "
                         f"or set strategy.secure_aggregation=false)")
    if config.federation.clients_per_round < 2:
        raise ValueError(f"strategy.secure_aggregation=true needs federation.clients_per_round >= 2, got "
                         f"{config.federation.clients_per_round} (a sum of one update is that update: raise "
                         f"clients_per_round)")


class SecureAggregation:
    """`inner` with its aggregation done under secure aggregation: each accepted client's `summand` is
    quantized into Z_2^64 and masked, the server learns only the ring sum of the clients whose masked input
    arrived (clients that were asked but dropped out are unmasked from the survivors' Shamir shares), and
    `inner.aggregate_sum` turns that sum into the next global model. Everything else is `inner`'s.

    The result equals `inner`'s plain aggregation to the quantization error: each coordinate of each
    summand rounds by at most 2^-(scale_bits + 1), so the sum is within n 2^-(scale_bits + 1), logged per
    round as `secagg_sum_error_bound`. Key material (X25519 keys, mask seeds, Shamir coefficients) comes
    from `random_bytes` (the OS's CSPRNG), not from the experiment's seed: masks cancel exactly, so the
    run's numbers do not depend on them and stay reproducible.
    """

    def __init__(self, inner: Strategy, threshold: float, scale_bits: int,
                 random_bytes: Callable[[int], bytes] = os.urandom) -> None:
        self.inner, self.threshold, self.scale_bits, self.random_bytes = inner, threshold, scale_bits, random_bytes
        self.cohort: tuple[int, ...] = ()
        self.last: SecureSum | None = None

    @classmethod
    def from_config(cls, inner: Strategy, config: ExperimentConfig) -> "SecureAggregation":
        check_secure_aggregation(inner, config)
        return cls(inner, config.strategy.secagg_threshold, config.strategy.secagg_scale_bits)

    def __getattr__(self, name: str) -> Any:
        # only reached for what this class does not define: the rest of the Strategy protocol is inner's
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def plan_tasks(self, tasks: Sequence[ClientTask]) -> list[ClientTask]:
        planned = self.inner.plan_tasks(tasks)
        self.cohort = tuple(t.client for t in planned)  # the clients that take part in the key exchange
        return planned

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate],
                  rng: np.random.Generator) -> dict[str, torch.Tensor]:
        self.last = None
        if not updates:
            return self.inner.aggregate(global_state, updates, rng)
        vectors, layout = {}, None
        for u in updates:
            vectors[u.client], layout = flatten_summand(self.inner.summand(global_state, u))
        # the round's key exchange: the tasks planned this round (a round is planned before it aggregates)
        cohort = self.cohort if set(vectors) <= set(self.cohort) else tuple(sorted(vectors))
        self.cohort = ()
        dropped = [c for c in cohort if c not in vectors]
        for client in dropped:  # shared its keys, then never sent a masked input
            vectors[client] = np.zeros_like(next(iter(vectors.values())))
        self.last = secure_sum(vectors, threshold=threshold_for(len(cohort), self.threshold),
                               scale_bits=self.scale_bits, dropped_after_sharing=dropped,
                               random_bytes=self.random_bytes)
        device = next(iter(global_state.values())).device
        total = unflatten_summand(self.last.total, layout, device)
        return self.inner.aggregate_sum(global_state, total, len(updates), rng)

    def round_metrics(self) -> dict[str, float]:
        metrics = dict(self.inner.round_metrics())
        if self.last is not None:
            metrics.update(secagg_num_unmasked=float(len(self.last.survivors)),
                           secagg_num_recovered=float(len(self.last.dropped)),
                           secagg_sum_error_bound=float(self.last.quantization_error_bound))
        return metrics

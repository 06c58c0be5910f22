"""Simulated malicious clients: which of a round's sampled clients attack, and what they send instead of an
honest update (sign flipping with scaling, Gaussian noise; label flipping happens in local training, and only
where there are classes: `check_attack`)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from workbench.client import ClientUpdate
from workbench.config import AttackConfig

State = dict[str, torch.Tensor]


def check_attack(attack: AttackConfig, task: str, dataset: str) -> None:
    """Raise ValueError, before any round, for an attack the data cannot have: label flipping trains
    attackers on the labels C - 1 - y, which needs classes, and a regression's target has none."""
    if attack.kind == "label_flip" and attack.fraction > 0 and task == "regression":
        raise ValueError(
            f"attack.kind='label_flip' trains attackers on the flipped class labels C-1-y, but data.name={dataset} "
            f"is a regression (task=regression: a continuous target, no classes); use attack.kind=sign_flip "
            f"(send -scale x the honest update) or attack.kind=gaussian (send noise), or attack.fraction=0")


def num_malicious(clients_per_round: int, fraction: float) -> int:
    """Malicious clients per round: round(K * fraction) (Python's round, halves to even)."""
    return int(round(clients_per_round * fraction))


def choose_malicious(sampled: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[int, ...]:
    """The sampled clients that attack this round, drawn with `rng` (the server's stream for the round,
    so every strategy faces the same attackers)."""
    count = num_malicious(len(sampled), fraction)
    if count == 0:
        return ()
    return tuple(sorted(int(c) for c in rng.choice(sampled, count, replace=False)))


def sign_flipped(global_state: State, state: State, scale: float) -> State:
    """The model a sign-flipping attacker sends: w_global - scale * (w - w_global) (Li et al., AAAI 2019;
    with scale > 1, the 'scaled' variant that outweighs honest clients in an average)."""
    return {k: (v - scale * (state[k] - v)).to(v.dtype) if v.is_floating_point() else state[k]
            for k, v in global_state.items()}


def gaussian_update(global_state: State, noise_std: float, generator: torch.Generator) -> State:
    """The model a Gaussian attacker sends: w_global + N(0, noise_std^2) in every coordinate (Blanchard et
    al., NeurIPS 2017, Section 5)."""
    out = {}
    for k, v in global_state.items():
        if v.is_floating_point():
            noise = torch.randn(v.shape, generator=generator, dtype=torch.float64) * noise_std
            out[k] = (v + noise.to(device=v.device, dtype=v.dtype))
        else:
            out[k] = v.clone()
    return out


def attack_update(update: ClientUpdate, global_state: State, attack: AttackConfig,
                  generator: torch.Generator) -> ClientUpdate:
    """What a malicious client sends in place of `update` (label flipping already shaped its training:
    it sends that update as it is)."""
    if attack.kind == "sign_flip":
        return replace(update, state=sign_flipped(global_state, update.state, attack.scale))
    if attack.kind == "gaussian":
        return replace(update, state=gaussian_update(global_state, attack.noise_std, generator))
    return update

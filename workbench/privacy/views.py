"""What the server sees of a client's update under a defense, as pure functions from one `ServerView` (or a
cohort's) to another: DP-FedAvg's noisy release, secure aggregation's cohort average, and both together."""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from workbench.client import ClientUpdate
from workbench.privacy.reconstruction import ServerView
from workbench.strategies.base import aggregate_by_samples
from workbench.strategies.dp import dp_fedavg_step


def dp_view(view: ServerView, clip_norm: float, noise_multiplier: float, generator: torch.Generator) -> ServerView:
    """What DP-FedAvg (McMahan et al., ICLR 2018, Algorithm 1) releases for a cohort of this one client: the
    update clipped to `clip_norm` with Gaussian noise of std z * C on it, computed by the real
    `workbench.strategies.dp.dp_fedavg_step` with expected_clients = 1.

    This is central DP: the server itself still receives the clipped update (it adds the noise), so an
    attacker at the server sees `view` clipped, not this; the noise protects what the round releases (the
    new global model, to every later client and to anyone who reads it). Composing DP with secure
    aggregation is what hides the individual update from the server: then what it sees is the noisy cohort
    sum (`dp_cohort_view`)."""
    _check_dp(clip_norm, noise_multiplier)
    released = dp_fedavg_step(view.global_state, [view.update_state], clip_norm, noise_multiplier,
                              expected_clients=1, generator=generator)
    return replace(view, update_state=released)


def cohort_view(views: Sequence[ServerView]) -> ServerView:
    """What a server behind secure aggregation (Bonawitz et al., CCS 2017) sees of a cohort: only the
    sample-weighted average model (`workbench.strategies.base.aggregate_by_samples`, the real FedAvg
    aggregate), with num_samples = the cohort's total and `client_sizes` = each client's count (FedAvg's
    weights, which the server knows). Every view must share the global model and the training settings.
    Attacking it reconstructs the cohort's samples, the first client's first."""
    first = _check_cohort(views)
    updates = [ClientUpdate(client=i, state=v.update_state, num_samples=v.num_samples, num_epochs=v.num_epochs,
                            local_train_loss=0.0, is_partial=False) for i, v in enumerate(views)]
    average = aggregate_by_samples(first.global_state, updates)
    return replace(first, update_state=average, num_samples=sum(v.num_samples for v in views),
                   client_sizes=tuple(n for v in views for n in (v.client_sizes or (v.num_samples,))))


def dp_cohort_view(views: Sequence[ServerView], clip_norm: float, noise_multiplier: float,
                   generator: torch.Generator) -> ServerView:
    """Secure aggregation + DP-FedAvg: the server sees only the noisy aggregate x + (sum_k clip(Delta_k, C)
    + N(0, (z C)^2 I)) / m of `dp_fedavg_step` over the cohort, m = len(views). The clipped updates are not
    weighted by sample counts there (DP-FedAvg's choice), so the attacker's simulation is told the cohort's
    clients weigh equally: `client_sizes` keeps each client's count, and the average is unweighted only
    when they are equal (as in the tests); with unequal counts the attacker's model of the aggregate is an
    approximation."""
    _check_dp(clip_norm, noise_multiplier)
    first = _check_cohort(views)
    released = dp_fedavg_step(first.global_state, [v.update_state for v in views], clip_norm, noise_multiplier,
                              expected_clients=len(views), generator=generator)
    return replace(first, update_state=released, num_samples=sum(v.num_samples for v in views),
                   client_sizes=tuple(n for v in views for n in (v.client_sizes or (v.num_samples,))))


def update_norm(view: ServerView) -> float:
    """The L2 norm of the update the view holds, over every floating-point tensor (what `clip_norm` bounds)."""
    total = sum(float((view.update_state[k].double() - v.double()).pow(2).sum())
                for k, v in view.global_state.items() if v.is_floating_point())
    return total ** 0.5


def _check_dp(clip_norm: float, noise_multiplier: float) -> None:
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm!r} (the L2 norm C every update is clipped to; "
                         f"update_norm(view) is the update's own)")
    if not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r} (0 = clipping only; try 0.5-2)")


def _check_cohort(views: Sequence[ServerView]) -> ServerView:
    if not views:
        raise ValueError("the cohort needs at least one ServerView, got none")
    first = views[0]
    for i, view in enumerate(views[1:], start=1):
        if view.objective != first.objective or view.num_epochs != first.num_epochs:
            raise ValueError(f"views[{i}] was trained with other settings than views[0] ({view.objective}, "
                             f"{view.num_epochs} epochs vs {first.objective}, {first.num_epochs} epochs): a "
                             f"cohort shares one round's settings")
        if view.global_state.keys() != first.global_state.keys() or any(
                not torch.equal(view.global_state[k], first.global_state[k]) for k in first.global_state):
            raise ValueError(f"views[{i}] started from another global model than views[0]: a cohort shares "
                             f"one round's global model")
    return first

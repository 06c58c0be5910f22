"""A run's client update, replayed exactly from its config and seed, attacked as the server would attack it,
and scored against the client's real samples (`leakage_report`: what the LeakageExplorer and notebook 08
show)."""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Mapping

import torch

from workbench.config import ExperimentConfig
from workbench.execution import SequentialExecutor
from workbench.privacy.quality import match, matched_quality, mean_input_quality
from workbench.privacy.reconstruction import ATTACKS, ServerView, reconstruct
from workbench.privacy.views import cohort_view, dp_cohort_view, dp_view, update_norm
from workbench.simulation import Federation, plan_cohort, prepare, run, stream, train_cohort

#: what the server sees in place of a client's update: the update itself, DP-FedAvg's noisy release of it,
#: or (secure aggregation) only the cohort's aggregate
DEFENSES = ("none", "dp", "secure_aggregation")
#: the replay's own seed stream (the attack's initialization and the DP view's noise): never a run's stream
STREAM_LEAKAGE = 101


@dataclass(frozen=True)
class ClientRound:
    """One client's update of one round, as the run computed it, with what only the client knows."""

    round: int
    client: int
    #: the client's update as the server received it (no defense applied)
    view: ServerView
    #: the views of every update of the round, the client's first (what secure aggregation sums)
    cohort: tuple[ServerView, ...]
    #: the client's real training samples (for scoring only: the attack never sees them)
    inputs: torch.Tensor
    labels: torch.Tensor
    #: the federation's training inputs (the mean-image baseline)
    reference_inputs: torch.Tensor
    is_image: bool
    data_range: float
    #: the run's strategy aggregated under secure aggregation, so the server saw only the cohort's sum
    has_secure_aggregation: bool


@dataclass(frozen=True)
class LeakageReport:
    """What a reconstruction attack recovered of one client's samples in one round, under one defense."""

    round: int
    client: int
    defense: str
    attack: str
    real_inputs: torch.Tensor
    real_labels: torch.Tensor
    #: matched to `real_inputs`' order (`quality.match`)
    reconstructed_inputs: torch.Tensor
    reconstructed_labels: torch.Tensor
    #: psnr, ssim, label_accuracy (images) or feature_mae, label_accuracy (tabular rows)
    quality: dict[str, float]
    #: the same measures for the training set's mean input: the level reached without any update
    baseline: dict[str, float]
    is_image: bool
    seconds: float


def federation_before(config: ExperimentConfig, round_: int,
                      global_state: Mapping[str, torch.Tensor] | None = None) -> Federation:
    """The prepared federation whose global model is the one round `round_` starts from: `global_state`
    when given (a checkpoint of round - 1), else the run replayed from its seed for rounds 1..round - 1 on
    the sequential executor (the same config and seed give the same numbers)."""
    if not 1 <= round_ <= config.federation.rounds:
        raise ValueError(f"round must be in 1..federation.rounds={config.federation.rounds}, got {round_}")
    if global_state is not None or round_ == 1:
        federation = prepare(config)
        if global_state is not None:
            federation.model.load_state_dict(dict(global_state))
        return federation
    before = config.with_overrides({"federation.rounds": round_ - 1, "execution.executor": "sequential"})
    federation = prepare(before)
    run(federation, executor=SequentialExecutor(federation.model))
    return dataclasses.replace(federation, config=config)


def replay_client_round(config: ExperimentConfig, round_: int, client: int, *,
                        global_state: Mapping[str, torch.Tensor] | None = None,
                        with_cohort: bool = True) -> ClientRound:
    """`client`'s update of round `round_` exactly as the run computed it (its seed stream, its straggler
    epochs, its clip), with the round's other updates (`with_cohort`) for the secure-aggregation view."""
    federation = federation_before(config, round_, global_state)
    cohort = plan_cohort(federation, round_)
    tasks = [t for t in cohort.tasks if t.client == client]
    if not tasks:
        raise ValueError(f"client {client} sent no update in round {round_}: the round trained clients "
                         f"{[t.client for t in cohort.tasks]} (sampled {list(cohort.sampled)}; pick one of those)")
    others = [t for t in cohort.tasks if t.client != client] if with_cohort else []
    cohort = dataclasses.replace(cohort, tasks=tasks + others)
    updates, _ = train_cohort(federation, SequentialExecutor(federation.model), cohort)
    data = federation.dataset
    is_image = len(data.input_shape) == 3
    input_range = (float(data.x_train.min()), float(data.x_train.max())) if is_image else None
    views = tuple(ServerView(model=copy.deepcopy(federation.model), global_state=cohort.global_state,
                             update_state=u.state, num_samples=u.num_samples, objective=cohort.objective,
                             num_epochs=u.num_epochs, input_shape=tuple(data.input_shape),
                             num_classes=data.num_classes, input_range=input_range) for u in updates)
    rows = torch.as_tensor(federation.clients[client], device=data.x_train.device)
    return ClientRound(round_, client, views[0], views, data.x_train[rows].cpu(), data.y_train[rows].cpu(),
                       data.x_train.cpu(), is_image, (input_range[1] - input_range[0]) if is_image else 1.0,
                       bool(config.strategy.secure_aggregation))


def defended_view(replayed: ClientRound, defense: str, *, noise_multiplier: float = 1.0,
                  clip_norm: float | None = None, generator: torch.Generator) -> ServerView:
    """What the server sees of the client's update under `defense` (`DEFENSES`). A run that aggregated
    under secure aggregation shows only the cohort's aggregate whatever `defense` says; `dp` then adds
    DP-FedAvg's noise to that aggregate. `clip_norm` None: the update's own norm, so that the clip alone
    changes nothing and the noise is what is measured."""
    if defense not in DEFENSES:
        raise ValueError(f"defense must be one of {DEFENSES}, got {defense!r}")
    secure = defense == "secure_aggregation" or replayed.has_secure_aggregation
    if defense == "dp":
        clip = clip_norm if clip_norm is not None else max(update_norm(replayed.view), 1e-12)
        if secure:
            return dp_cohort_view(replayed.cohort, clip, noise_multiplier, generator)
        return dp_view(replayed.view, clip, noise_multiplier, generator)
    if secure:
        return cohort_view(replayed.cohort)
    return replayed.view


def leakage_report(config: ExperimentConfig, round_: int, client: int, *, defense: str = "none",
                   attack: str = "idlg", noise_multiplier: float = 1.0, clip_norm: float | None = None,
                   global_state: Mapping[str, torch.Tensor] | None = None, max_samples: int = 64,
                   num_iterations: int | None = None, seed: int = 0) -> LeakageReport:
    """Replay `client`'s update of round `round_`, attack what the server sees of it under `defense` with
    `attack` (`reconstruction.ATTACKS`), and score the result against the client's real samples beside the
    training set's mean input. The attack reconstructs one input per sample the server's view covers (the
    client's; the cohort's behind secure aggregation): at most `max_samples`."""
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {ATTACKS}, got {attack!r}")
    if defense not in DEFENSES:
        raise ValueError(f"defense must be one of {DEFENSES}, got {defense!r}")
    sees_the_sum = defense == "secure_aggregation" or bool(config.strategy.secure_aggregation)
    replayed = replay_client_round(config, round_, client, global_state=global_state, with_cohort=sees_the_sum)
    generator = torch.Generator().manual_seed(int(stream(seed, STREAM_LEAKAGE, round_, client).integers(2**63)))
    view = defended_view(replayed, defense, noise_multiplier=noise_multiplier, clip_norm=clip_norm,
                         generator=generator)
    if view.num_samples > max_samples:
        raise ValueError(f"the server's view of client {client} in round {round_} covers {view.num_samples} "
                         f"samples, above max_samples={max_samples}: the attack reconstructs one input per "
                         f"sample (pick a client with fewer samples, more federation.num_clients, or raise "
                         f"max_samples)")
    started = time.perf_counter()
    result = reconstruct(view, attack, num_iterations=num_iterations, generator=generator)
    seconds = time.perf_counter() - started
    order = match(result.inputs, replayed.inputs)
    quality = matched_quality(result, order, replayed.inputs, replayed.labels, is_image=replayed.is_image,
                              data_range=replayed.data_range)
    baseline = mean_input_quality(replayed.inputs, replayed.reference_inputs, is_image=replayed.is_image,
                                  data_range=replayed.data_range)
    return LeakageReport(round_, client, defense, attack, replayed.inputs, replayed.labels,
                         result.inputs[torch.as_tensor(order)], result.labels[torch.as_tensor(order)], quality,
                         baseline, replayed.is_image, seconds)

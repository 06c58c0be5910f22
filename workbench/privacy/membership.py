"""Membership inference against a model: per-sample losses, the loss-threshold attack of Yeom et al. (CSF 2018)
scored by its AUC, the balanced member/non-member samples a per-round audit draws, and the threshold an
attacker calibrates on shadow models (Shokri et al., S&P 2017, reduced to Yeom's threshold).

The attack (Yeom, Giacomelli, Fredrikson and Jha, "Privacy Risk in Machine Learning: Analyzing the Connection
to Overfitting", CSF 2018, Section 3.2, the "bounded loss" adversary) says "member" when a sample's loss is
below a threshold tau: a model fits the samples it was trained on better than the ones it never saw. Over
every tau, its ROC curve (members positive, score -loss) has the area

    AUC = P(loss_nonmember > loss_member) + 0.5 * P(loss_nonmember == loss_member),

the Mann-Whitney statistic U / (n_member * n_nonmember) of the two loss samples: 0.5 is a model whose losses
say nothing about membership, 1.0 one that separates every member from every non-member.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from workbench.tasks import check_task, per_sample_loss

#: Balanced audit samples draw at most this many members and as many non-members (`audit_samples`).
DEFAULT_AUDIT_LIMIT = 500


# ----- per-sample losses -----


def sample_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str = "classification",
                  batch_size: int = 4096) -> torch.Tensor:
    """The task's loss of each sample (`workbench.tasks.per_sample_loss`: cross-entropy of the logits, or the
    squared error of a regression's output), (N,) float64 on the CPU, computed in eval mode without gradients
    in batches of `batch_size` on the model's device. The model's train/eval mode is restored afterwards."""
    check_task(task)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r} (samples per forward pass; "
                         f"the default 4096 suits small models)")
    if len(x) != len(y):
        raise ValueError(f"x and y must hold the same number of samples, got len(x)={len(x)} and len(y)={len(y)} "
                         f"(pass the inputs and the labels of one set)")
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else x.device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            losses = [per_sample_loss(task, model(x[start:start + batch_size].to(device)),
                                      y[start:start + batch_size].to(device)).double().cpu()
                      for start in range(0, len(y), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(losses) if losses else torch.zeros(0, dtype=torch.float64)


# ----- the loss-threshold attack (Yeom et al. 2018) -----


def _losses(values: torch.Tensor | np.ndarray | Sequence[float], name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError(f"{name} is empty: the attack needs at least one loss on each side (members and "
                         f"non-members); pass both sets' `sample_losses`")
    if np.isnan(array).any():
        raise ValueError(f"{name} holds {int(np.isnan(array).sum())} NaN losses of {array.size}: a NaN has no "
                         f"rank (did the model diverge? audit a finite model)")
    return array


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values` in ascending order, tied values sharing the mean of the ranks they span
    (`scipy.stats.rankdata(method="average")`)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse.reshape(-1)]


def loss_threshold_auc(member_losses: torch.Tensor | np.ndarray | Sequence[float],
                       nonmember_losses: torch.Tensor | np.ndarray | Sequence[float]) -> float:
    """The AUC of Yeom et al.'s (CSF 2018) loss-threshold attack over all thresholds: P(loss_nonmember >
    loss_member) + 0.5 P(tie), from ranks with ties averaged. The sum of the non-members' ranks among all
    losses in ascending order, less n0 (n0 + 1) / 2, counts the (member, non-member) pairs where the
    non-member's loss is higher, ties as one half (Mann and Whitney, 1947); divided by n0 * n1 it is the area
    under the ROC curve of the score -loss with members positive (sklearn's `roc_auc_score`)."""
    members, nonmembers = _losses(member_losses, "member_losses"), _losses(nonmember_losses, "nonmember_losses")
    ranks = average_ranks(np.concatenate([members, nonmembers]))
    num_members, num_nonmembers = members.size, nonmembers.size
    u_statistic = ranks[num_members:].sum() - num_nonmembers * (num_nonmembers + 1) / 2.0
    return float(u_statistic / (num_members * num_nonmembers))


def membership_audit(model: nn.Module, members: tuple[torch.Tensor, torch.Tensor],
                     nonmembers: tuple[torch.Tensor, torch.Tensor], task: str = "classification",
                     batch_size: int = 4096) -> float:
    """The loss-threshold attack's AUC (`loss_threshold_auc`) against `model`: members (x, y) are samples it
    was trained on, non-members (x, y) samples it never saw (a held-out test set)."""
    member_losses = sample_losses(model, *members, task=task, batch_size=batch_size)
    nonmember_losses = sample_losses(model, *nonmembers, task=task, batch_size=batch_size)
    return loss_threshold_auc(member_losses, nonmember_losses)


def _count(value: int, name: str, hint: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r} ({hint})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value} ({hint})")
    return int(value)


def audit_samples(num_members: int, num_nonmembers: int, *, rng: np.random.Generator,
                  limit: int = DEFAULT_AUDIT_LIMIT) -> tuple[np.ndarray, np.ndarray]:
    """(member indices, non-member indices): two sorted int64 index arrays of the same size
    k = min(num_members, num_nonmembers, limit), each drawn without replacement with `rng` from
    range(num_members) and range(num_nonmembers). Equal sizes keep the balanced attack accuracy and the AUC
    about the same question; the limit keeps a per-round audit fast, the generator keeps it reproducible."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__} "
                        f"(pass np.random.default_rng(seed), or a seed stream of the simulation)")
    num_members = _count(num_members, "num_members", "the samples the model was trained on")
    num_nonmembers = _count(num_nonmembers, "num_nonmembers", "held-out samples, e.g. the test set")
    limit = _count(limit, "limit", f"at most this many samples per side; default {DEFAULT_AUDIT_LIMIT}")
    size = min(num_members, num_nonmembers, limit)
    # members first, then non-members, from one generator: the same rng gives the same pair of subsets
    member_idx = np.sort(rng.choice(num_members, size, replace=False)).astype(np.int64)
    nonmember_idx = np.sort(rng.choice(num_nonmembers, size, replace=False)).astype(np.int64)
    return member_idx, nonmember_idx


# ----- a threshold calibrated on shadow models (Shokri et al. 2017; Yeom et al. 2018, Section 3.2) -----


def threshold_accuracy(member_losses: torch.Tensor | np.ndarray | Sequence[float],
                       nonmember_losses: torch.Tensor | np.ndarray | Sequence[float], threshold: float) -> float:
    """The balanced accuracy of saying "member" when the loss is strictly below `threshold`:
    0.5 * (P(loss_member < tau) + P(loss_nonmember >= tau)). 0.5 is guessing, whatever the class sizes."""
    members, nonmembers = _losses(member_losses, "member_losses"), _losses(nonmember_losses, "nonmember_losses")
    return float(0.5 * ((members < threshold).mean() + (nonmembers >= threshold).mean()))


def best_threshold(member_losses: torch.Tensor | np.ndarray | Sequence[float],
                   nonmember_losses: torch.Tensor | np.ndarray | Sequence[float]) -> float:
    """The tau that maximizes `threshold_accuracy` on these (shadow) members and non-members. Candidates
    are -inf (everyone a non-member), the midpoints between consecutive distinct losses, and +inf; where
    several reach the maximum, the smallest wins (the most cautious attacker), so the choice is unique."""
    members, nonmembers = _losses(member_losses, "member_losses"), _losses(nonmember_losses, "nonmember_losses")
    distinct = np.unique(np.concatenate([members, nonmembers]))
    finite = distinct[np.isfinite(distinct)]
    candidates = np.concatenate([[-np.inf], (finite[:-1] + finite[1:]) / 2.0, [np.inf]])
    # P(loss < tau) for sorted candidates by binary search: O((n + m) log(n + m)), not one pass per tau
    member_below = np.searchsorted(np.sort(members), candidates, side="left") / members.size
    nonmember_at_or_above = 1.0 - np.searchsorted(np.sort(nonmembers), candidates, side="left") / nonmembers.size
    return float(candidates[int(np.argmax(0.5 * (member_below + nonmember_at_or_above)))])


@dataclass(frozen=True)
class ShadowAttack:
    """What the shadow-calibrated threshold attack found."""

    #: the attacker's tau: "member" when a sample's loss is below it
    threshold: float
    #: the attack's balanced accuracy on the shadow models' own members and non-members (what it was fit on)
    shadow_accuracy: float
    #: its balanced accuracy against the target model's members and non-members: the reported metric
    target_accuracy: float


def shadow_threshold_attack(
    make_model: Callable[[torch.Generator], nn.Module],
    train_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Generator], nn.Module],
    shadow_data: tuple[torch.Tensor, torch.Tensor],
    target_model: nn.Module,
    members: tuple[torch.Tensor, torch.Tensor],
    nonmembers: tuple[torch.Tensor, torch.Tensor],
    *,
    generator: torch.Generator,
    task: str = "classification",
    num_shadows: int = 2,
) -> ShadowAttack:
    """The loss-threshold attack with tau calibrated on shadow models, Shokri et al.'s (S&P 2017, Section
    V.B) shadow training reduced to Yeom et al.'s (CSF 2018) threshold: the attacker holds `shadow_data`
    (x, y), disjoint from the target's training data and from the same distribution. For each of
    `num_shadows` shadows it splits that data at random into two halves (a fresh permutation from
    `generator`), builds `make_model(generator)` and trains it with `train_fn(model, x_in, y_in, generator)`
    (which returns the trained model) on the first half only; the shadows' losses on their halves in and
    out are pooled, and tau = `best_threshold` of those. The reported metric is `threshold_accuracy` at that
    tau against the target on `members` and `nonmembers` (balanced: 0.5 is guessing)."""
    check_task(task)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__} "
                        f"(pass torch.Generator().manual_seed(seed))")
    num_shadows = _count(num_shadows, "num_shadows", "shadow models to calibrate the threshold on; try 1-4")
    shadow_x, shadow_y = shadow_data
    if len(shadow_x) != len(shadow_y) or len(shadow_y) < 2:
        raise ValueError(f"shadow_data must be (x, y) of the same length >= 2, got len(x)={len(shadow_x)}, "
                         f"len(y)={len(shadow_y)} (each shadow trains on one half and is tested on the other)")
    shadow_in, shadow_out = [], []
    half = len(shadow_y) // 2
    for _ in range(num_shadows):
        order = torch.randperm(len(shadow_y), generator=generator)
        inside, outside = order[:half], order[half:]
        shadow = train_fn(make_model(generator), shadow_x[inside], shadow_y[inside], generator)
        if not isinstance(shadow, nn.Module):
            raise TypeError(f"train_fn must return the trained model (a torch.nn.Module), got "
                            f"{type(shadow).__name__}; end it with `return model`")
        shadow_in.append(sample_losses(shadow, shadow_x[inside], shadow_y[inside], task))
        shadow_out.append(sample_losses(shadow, shadow_x[outside], shadow_y[outside], task))
    shadow_in_losses, shadow_out_losses = torch.cat(shadow_in), torch.cat(shadow_out)
    threshold = best_threshold(shadow_in_losses, shadow_out_losses)
    target_in = sample_losses(target_model, *members, task=task)
    target_out = sample_losses(target_model, *nonmembers, task=task)
    return ShadowAttack(threshold=threshold,
                        shadow_accuracy=threshold_accuracy(shadow_in_losses, shadow_out_losses, threshold),
                        target_accuracy=threshold_accuracy(target_in, target_out, threshold))

"""Membership inference: the loss-threshold AUC against scikit-learn's, per-sample losses, the balanced audit
samples, an untrained model that leaks nothing, leakage that grows with local epochs, and the threshold an
attacker calibrates on shadow models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score
from torch import nn

from workbench.client import LocalObjective, train_locally
from workbench.config import DataConfig
from workbench.data import load_dataset
from workbench.models import build_model
from workbench.privacy.membership import (audit_samples, average_ranks, best_threshold, loss_threshold_auc,
                                          membership_audit, sample_losses, shadow_threshold_attack,
                                          threshold_accuracy)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataConfig(name="digits"), 1, np.random.default_rng(0))


# ----- the AUC -----


def test_auc_equals_sklearn_roc_auc_on_unequal_sets_with_ties():
    """Members are the positives and -loss the score; integer losses in 0..5 tie often."""
    for seed in range(5):
        rng = np.random.default_rng(seed)
        members, nonmembers = rng.integers(0, 5, 37).astype(float), rng.integers(1, 6, 61).astype(float)
        labels = np.concatenate([np.ones(37), np.zeros(61)])
        expected = roc_auc_score(labels, -np.concatenate([members, nonmembers]))
        assert loss_threshold_auc(members, nonmembers) == pytest.approx(expected, abs=1e-12)
        assert loss_threshold_auc(torch.tensor(members, dtype=torch.float32), torch.tensor(nonmembers)) \
            == pytest.approx(expected, abs=1e-12)


def test_auc_by_hand():
    """Members (1, 2, 2), non-members (2, 3): of 6 pairs, 4 have the non-member's loss higher and 2 tie,
    so AUC = (4 + 0.5 * 2) / 6 = 5/6."""
    assert loss_threshold_auc([1.0, 2.0, 2.0], [2.0, 3.0]) == pytest.approx(5 / 6, abs=1e-15)
    assert average_ranks(np.array([3.0, 1.0, 2.0, 2.0, 2.0])).tolist() == [5.0, 1.0, 3.0, 3.0, 3.0]
    tied = np.random.default_rng(2).integers(0, 7, 50).astype(float)
    assert np.array_equal(average_ranks(tied), rankdata(tied, method="average"))


def test_auc_extremes():
    rng = np.random.default_rng(7)
    same = loss_threshold_auc(rng.normal(size=2000), rng.normal(size=1500))
    assert abs(same - 0.5) < 0.03  # measured 0.5158 (the sd of the statistic is ~0.01 here)
    assert loss_threshold_auc([2.0] * 4, [2.0] * 9) == 0.5
    assert loss_threshold_auc([0.1, 0.2, 0.3], [0.5, 0.9, 1.0, 4.0]) == 1.0
    assert loss_threshold_auc([0.5, 0.9, 1.0, 4.0], [0.1, 0.2, 0.3]) == 0.0


def test_auc_rejects_empty_and_nan():
    with pytest.raises(ValueError, match="member_losses is empty"):
        loss_threshold_auc([], [1.0])
    with pytest.raises(ValueError, match="nonmember_losses holds 1 NaN"):
        loss_threshold_auc([1.0], [float("nan"), 2.0])


# ----- per-sample losses -----


def test_sample_losses_are_per_sample_cross_entropy_and_squared_error():
    generator = torch.Generator().manual_seed(0)
    model = build_model("logreg", (1, 8, 8), 10, generator)
    model.train()
    x, y = torch.rand(23, 1, 8, 8, generator=generator), torch.randint(0, 10, (23,), generator=generator)
    logits = model(x).detach().double()
    expected = -(logits.log_softmax(dim=1)[torch.arange(23), y])
    losses = sample_losses(model, x, y, batch_size=5)
    assert losses.dtype == torch.float64 and losses.shape == (23,)
    assert torch.allclose(losses, expected, atol=1e-5)
    assert torch.allclose(losses, sample_losses(model, x, y), rtol=0, atol=1e-12)  # batching changes nothing
    assert model.training  # restored after the eval-mode pass

    regression = nn.Linear(3, 1).double()
    xr, yr = torch.randn(11, 3, generator=generator, dtype=torch.float64), torch.randn(11, generator=generator)
    squared = (regression(xr).detach().reshape(-1) - yr.double()) ** 2
    assert torch.allclose(sample_losses(regression, xr, yr, task="regression", batch_size=4), squared)


def test_sample_losses_put_dropout_in_eval_mode():
    """Dropout is off during the audit: two passes agree, although the model was in train mode."""
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(4, 3))
    x, y = torch.ones(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    expected = F.cross_entropy(model[2](x), y, reduction="none").detach().double()
    assert torch.allclose(sample_losses(model, x, y), expected)


def test_sample_losses_and_audit_reject_bad_arguments():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="len\\(x\\)=3 and len\\(y\\)=2"):
        sample_losses(model, torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        sample_losses(model, torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), batch_size=0)
    with pytest.raises(ValueError, match="task must be one of"):
        sample_losses(model, torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), task="ranking")


# ----- balanced audit samples -----


def test_audit_samples_are_balanced_reproducible_and_within_range():
    members, nonmembers = audit_samples(1438, 359, rng=np.random.default_rng(3), limit=500)
    assert len(members) == len(nonmembers) == 359
    assert len(set(members.tolist())) == 359 and members.max() < 1438 and members.dtype == np.int64
    assert nonmembers.tolist() == list(range(359))  # every non-member, when there are fewer than the limit
    again = audit_samples(1438, 359, rng=np.random.default_rng(3), limit=500)
    assert np.array_equal(members, again[0]) and np.array_equal(nonmembers, again[1])
    small = audit_samples(1438, 359, rng=np.random.default_rng(3), limit=50)
    assert len(small[0]) == len(small[1]) == 50 and np.all(np.diff(small[1]) > 0)
    assert not np.array_equal(audit_samples(1438, 359, rng=np.random.default_rng(4), limit=50)[0], small[0])
    with pytest.raises(ValueError, match="limit must be >= 1, got 0"):
        audit_samples(10, 10, rng=np.random.default_rng(0), limit=0)
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        audit_samples(10, 10, rng=0)


# ----- audits of real models on digits -----


def test_untrained_model_leaks_nothing(digits):
    """A fresh MLP never saw the members: measured AUC 0.5128 (100 train vs 100 test digits)."""
    model = build_model("mlp", digits.input_shape, digits.num_outputs, torch.Generator().manual_seed(0))
    auc = membership_audit(model, (digits.x_train[:100], digits.y_train[:100]),
                           (digits.x_test[:100], digits.y_test[:100]))
    assert abs(auc - 0.5) < 0.1


def _client(digits, seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = np.random.default_rng(seed).choice(len(digits.y_train), size, replace=False)
    return digits.x_train[chosen], digits.y_train[chosen]


def test_auc_rises_with_local_epochs(digits):
    """One MLP init, a client of 40 digits, lr 0.1, batch 10 (`train_locally`, the real client): measured
    AUC 0.6725, 0.6894, 0.7129, 0.7951 after 1, 5, 20, 60 epochs, against 200 test digits."""
    x, y = _client(digits, 0, 40)
    model = build_model("mlp", digits.input_shape, digits.num_outputs, torch.Generator().manual_seed(0))
    start = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    objective = LocalObjective(lr=0.1, batch_size=10)
    aucs = []
    for num_epochs in (1, 5, 20, 60):
        state, _ = train_locally(model, start, x, y, objective, num_epochs=num_epochs,
                                 generator=torch.Generator().manual_seed(0))
        model.load_state_dict(state)
        aucs.append(membership_audit(model, (x, y), (digits.x_test[:200], digits.y_test[:200])))
    assert all(later >= earlier for earlier, later in zip(aucs, aucs[1:])), aucs
    assert aucs[-1] - aucs[0] >= 0.1, aucs


# ----- a threshold calibrated on shadows -----


def test_best_threshold_maximizes_balanced_accuracy():
    """Members (0.1, 0.4, 0.5), non-members (0.3, 0.6, 0.8, 0.9): tau = 0.55 gets all members and 3 of 4
    non-members right: 0.5 * (1 + 3/4) = 0.875, which no threshold beats (checked on a fine grid)."""
    members, nonmembers = [0.1, 0.4, 0.5], [0.3, 0.6, 0.8, 0.9]
    tau = best_threshold(members, nonmembers)
    assert tau == pytest.approx(0.55) and threshold_accuracy(members, nonmembers, tau) == pytest.approx(0.875)
    grid = np.linspace(-1, 2, 3001)
    assert max(threshold_accuracy(members, nonmembers, t) for t in grid) == pytest.approx(0.875)
    assert threshold_accuracy(members, nonmembers, -np.inf) == 0.5  # everyone a non-member
    # members above the non-members: no threshold helps; the smallest tau of the maximum wins (-inf)
    assert best_threshold([3.0, 4.0], [1.0, 2.0]) == -np.inf


def test_shadow_threshold_attack_transfers_to_the_target(digits):
    """Two shadows, each trained on 40 of 80 digits disjoint from the target's 40, with the target's recipe
    (60 epochs, lr 0.1, batch 10): measured tau 0.0696, balanced accuracy 0.8188 on the shadows' own halves
    and 0.73 against the target (its 40 members vs 200 test digits)."""
    objective = LocalObjective(lr=0.1, batch_size=10)

    def make_model(generator: torch.Generator) -> nn.Module:
        return build_model("mlp", digits.input_shape, digits.num_outputs, generator)

    def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> nn.Module:
        state, _ = train_locally(model, model.state_dict(), x, y, objective, num_epochs=60, generator=generator)
        model.load_state_dict(state)
        return model

    chosen = np.random.default_rng(1).permutation(len(digits.y_train))
    target_idx, shadow_idx = chosen[:40], chosen[40:120]
    members = digits.x_train[target_idx], digits.y_train[target_idx]
    target = train(make_model(torch.Generator().manual_seed(0)), *members, torch.Generator().manual_seed(1))
    result = shadow_threshold_attack(make_model, train, (digits.x_train[shadow_idx], digits.y_train[shadow_idx]),
                                     target, members, (digits.x_test[:200], digits.y_test[:200]),
                                     generator=torch.Generator().manual_seed(2), num_shadows=2)
    assert result.shadow_accuracy > 0.6 and result.target_accuracy > 0.6

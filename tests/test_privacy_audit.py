"""`privacy.audit`: the membership-inference AUC of every round, against the global model and one client's
local model, measured by an observer that changes nothing in the run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.config import ExperimentConfig
from workbench.privacy import audit_samples, membership_audit
from workbench.simulation import prepare, run

BASE = {"data.name": "digits", "model.name": "mlp", "federation.num_clients": 20,
        "federation.clients_per_round": 6, "federation.rounds": 4, "training.local_epochs": 10,
        "training.batch_size": 10, "training.lr": 0.1, "partition.scheme": "iid", "execution.executor": "sequential",
        "privacy.audit_samples": 200}


def test_the_audit_logs_each_round_s_auc_and_changes_nothing_else():
    audited = prepare(ExperimentConfig.from_dict({**BASE, "privacy.audit": True, "privacy.audit_client": 11}))
    history = run(audited)
    plain = prepare(ExperimentConfig.from_dict(BASE))
    plain_history = run(plain)
    for key, value in plain.model.state_dict().items():
        assert torch.equal(value, audited.model.state_dict()[key])  # an observer: the same model, bit for bit
    for with_audit, without in zip(history.rounds, plain_history.rounds):
        assert with_audit.metrics["test_accuracy"] == without.metrics["test_accuracy"]
        assert 0.0 <= with_audit.metrics["privacy_mia_auc_global"] <= 1.0
        assert "privacy_mia_auc_global" not in without.metrics
        trained = 11 in with_audit.client_metrics
        assert ("privacy_mia_auc_client" in with_audit.metrics) == trained
    assert any("privacy_mia_auc_client" in r.metrics for r in history.rounds), "client 11 trained in rounds 1, 2 and 4"


def test_the_client_s_auc_is_the_loss_threshold_attack_on_its_own_update():
    """The logged global AUC is the attack on the new global model over a draw of all training samples, and
    the logged client AUC equals the attack recomputed by hand on the model that client sent, with its
    own samples as members and test samples as non-members (a 10-epoch local model on ~70 samples leaks:
    measured AUC ~0.65-0.8, above the global model's)."""
    config = ExperimentConfig.from_dict({**BASE, "federation.rounds": 1, "federation.clients_per_round": 20,
                                         "privacy.audit": True, "privacy.audit_client": 5})
    federation = prepare(config)
    from workbench.simulation import SERVER_AUDIT, plan_cohort, server_stream, train_cohort
    from workbench.execution import SequentialExecutor

    cohort = plan_cohort(federation, 1)
    updates, _ = train_cohort(federation, SequentialExecutor(federation.model), cohort)
    audited = prepare(config)
    history = run(audited)
    logged = history.rounds[0].metrics
    own = next(u for u in updates if u.client == 5)
    federation.model.load_state_dict(own.state)
    data = federation.dataset
    rng = server_stream(config, 1, SERVER_AUDIT)
    members, nonmembers = audit_samples(len(data.y_train), len(data.y_test), rng=rng, limit=200)  # drawn first
    expected_global = membership_audit(audited.model, (data.x_train[members], data.y_train[members]),
                                       (data.x_test[nonmembers], data.y_test[nonmembers]))
    assert logged["privacy_mia_auc_global"] == pytest.approx(expected_global, abs=1e-12)
    rows = np.asarray(federation.clients[5])
    mine, theirs = audit_samples(len(rows), len(data.y_test), rng=rng, limit=200)
    expected = membership_audit(federation.model, (data.x_train[rows[mine]], data.y_train[rows[mine]]),
                                (data.x_test[theirs], data.y_test[theirs]))
    assert logged["privacy_mia_auc_client"] == pytest.approx(expected, abs=1e-12)
    assert logged["privacy_mia_auc_client"] > logged["privacy_mia_auc_global"]
    assert logged["privacy_mia_auc_client"] > 0.6


def test_an_audit_client_outside_the_federation_is_refused():
    with pytest.raises(ValueError, match=r"privacy.audit_client must be < federation.num_clients \(20\), got 20"):
        ExperimentConfig.from_dict({**BASE, "privacy.audit": True, "privacy.audit_client": 20})

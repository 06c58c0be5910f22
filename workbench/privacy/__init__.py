"""The privacy lab: what a federated server can learn from the updates it receives (reconstruction and
membership inference) and what protects the clients (secure aggregation; DP-FedAvg lives with the
strategies).

Names are imported on first use: `simulation` and `strategies` import the membership audit and the
secure-aggregation protocol from here, while the reconstruction views replay rounds through `simulation`,
so an eager import would be circular.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "ServerView": "reconstruction", "Reconstruction": "reconstruction", "ATTACKS": "reconstruction",
    "reconstruct": "reconstruction", "infer_labels": "reconstruction", "view_from_training": "reconstruction",
    "psnr": "quality", "ssim": "quality", "feature_error": "quality", "label_accuracy": "quality",
    "reconstruction_quality": "quality", "mean_input_quality": "quality",
    "dp_view": "views", "cohort_view": "views", "dp_cohort_view": "views",
    "secure_sum": "secure_aggregation", "SecureSum": "secure_aggregation",
    "SecureAggregationAborted": "secure_aggregation",
    "loss_threshold_auc": "membership", "membership_audit": "membership", "sample_losses": "membership",
    "audit_samples": "membership", "threshold_accuracy": "membership", "best_threshold": "membership",
    "shadow_threshold_attack": "membership", "ShadowAttack": "membership", "DEFAULT_AUDIT_LIMIT": "membership",
    "DEFENSES": "replay", "LeakageReport": "replay", "leakage_report": "replay", "replay_client_round": "replay",
    "ClientRound": "replay",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'workbench.privacy' has no attribute {name!r}")
    return getattr(importlib.import_module(f"workbench.privacy.{_HOMES[name]}"), name)

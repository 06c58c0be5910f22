"""Federated algorithms on one seam (`Strategy`): FedAvg and FedProx, server optimizers, SCAFFOLD,
FedNova, robust aggregation and DP-FedAvg, and the local and centralized baselines, each built by its
public name, and secure aggregation around any of them whose server step needs only a sum."""

from __future__ import annotations

import importlib

from workbench.config import STRATEGIES, ExperimentConfig
from workbench.strategies.base import (Payload, State, Strategy, StrategyBase, aggregate_by_samples, apply_delta,
                                       base_objective, mean_delta, sample_weights, weighted_average)
from workbench.strategies.fedavg import FedAvg, FedProx

#: public name -> "module:class" whose `from_config(config)` builds it (imported on first use)
REGISTRY = {
    "fedavg": "workbench.strategies.fedavg:FedAvg",
    "fedprox": "workbench.strategies.fedavg:FedProx",
    "fedavgm": "workbench.strategies.server_optimizers:FedAvgM",
    "fedadam": "workbench.strategies.server_optimizers:FedAdam",
    "fedyogi": "workbench.strategies.server_optimizers:FedYogi",
    "fedadagrad": "workbench.strategies.server_optimizers:FedAdagrad",
    "scaffold": "workbench.strategies.scaffold:Scaffold",
    "fednova": "workbench.strategies.fednova:FedNova",
    "median": "workbench.strategies.robust:Median",
    "trimmed_mean": "workbench.strategies.robust:TrimmedMean",
    "krum": "workbench.strategies.robust:Krum",
    "multi_krum": "workbench.strategies.robust:MultiKrum",
    "dp_fedavg": "workbench.strategies.dp:DPFedAvg",
    "local": "workbench.strategies.baselines:Local",
    "centralized": "workbench.strategies.baselines:Centralized",
}

__all__ = ["REGISTRY", "FedAvg", "FedProx", "Payload", "State", "Strategy", "StrategyBase", "aggregate_by_samples",
           "apply_delta", "base_objective", "build_strategy", "mean_delta", "sample_weights", "strategy_class",
           "weighted_average"]


def strategy_class(name: str) -> type:
    """The class behind `strategy.name = name`."""
    if name not in REGISTRY:
        raise ValueError(f"strategy.name must be one of {{{', '.join(STRATEGIES)}}}, got {name!r}")
    module, _, attribute = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def build_strategy(config: ExperimentConfig) -> Strategy:
    """The strategy `config.strategy.name` names, with its knobs (never a silent fallback); behind secure
    aggregation when `strategy.secure_aggregation` (refused, with the reason, where the method needs the
    individual updates)."""
    strategy = strategy_class(config.strategy.name).from_config(config)
    if config.strategy.secure_aggregation:
        from workbench.strategies.secure import SecureAggregation

        return SecureAggregation.from_config(strategy, config)
    return strategy

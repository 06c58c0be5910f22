"""Secure aggregation as a strategy setting: it composes with every sum-based method (a run equals the same
run without it to the quantization error), recovers dropped clients' masks, and is refused, with the
reason, where a method needs the individual updates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.client import ClientTask, ClientUpdate
from workbench.config import STRATEGIES, SUM_STRATEGIES, ExperimentConfig
from workbench.privacy import SecureAggregationAborted
from workbench.simulation import prepare, run
from workbench.strategies import FedAvg, build_strategy, strategy_class
from workbench.strategies.dp import DPFedAvg
from workbench.strategies.secure import SecureAggregation

BASE = {"data.name": "digits", "model.name": "logreg", "federation.num_clients": 8,
        "federation.clients_per_round": 5, "federation.rounds": 3, "training.local_epochs": 1,
        "training.batch_size": 16, "training.lr": 0.2, "partition.scheme": "dirichlet", "partition.alpha": 0.5,
        "execution.executor": "sequential", "evaluation.every": 3}


def final_state(overrides: dict) -> tuple[dict[str, torch.Tensor], list]:
    config = ExperimentConfig.from_dict({**BASE, **overrides})
    federation = prepare(config)
    history = run(federation)
    return {k: v.clone() for k, v in federation.model.state_dict().items()}, history.rounds


@pytest.mark.parametrize("strategy", [
    {"strategy.name": "fedavg"},
    {"strategy.name": "fedprox", "strategy.mu": 0.1},
    {"strategy.name": "fedadam", "strategy.adaptive_lr": 0.05},
    {"strategy.name": "fedavgm"},
    {"strategy.name": "dp_fedavg", "strategy.clip_norm": 0.5, "strategy.noise_multiplier": 0.3},
], ids=lambda s: s["strategy.name"])
def test_a_run_with_secure_aggregation_equals_the_run_without_it(strategy):
    """Quantization with 24 fractional bits rounds each coordinate of each summand by <= 2^-25 (3e-8); a
    FedAvg sum of n_i (w_i - w) over 5 clients then moves the model by <= 5 * 2^-25 / sum n_i per round, far
    below float32's resolution of the weights. Measured after 3 rounds (max |difference| over all weights):
    fedavg, fedprox, fedadam and fedavgm 3.0e-8 (one float32 ulp), dp_fedavg 4.5e-8. The tolerance is 1e-6;
    FedAdam's step divides by sqrt(v) + tau and could amplify the rounding by up to ~1/tau on tiny
    coordinates, so it gets 1e-4."""
    plain, plain_rounds = final_state(strategy)
    secure, secure_rounds = final_state({**strategy, "strategy.secure_aggregation": True})
    tolerance = 1e-4 if strategy["strategy.name"] == "fedadam" else 1e-6
    for key in plain:
        assert torch.allclose(plain[key], secure[key], rtol=0, atol=tolerance), key
    for p, s in zip(plain_rounds, secure_rounds):
        assert s.metrics["secagg_num_unmasked"] == p.metrics["num_updates"]
        assert s.metrics["secagg_num_recovered"] == 0
        assert 0 < s.metrics["secagg_sum_error_bound"] < 1e-6
    assert abs(secure_rounds[-1].metrics["test_accuracy"] - plain_rounds[-1].metrics["test_accuracy"]) <= 1 / 360


def updates_for(global_state: dict, sizes: list[int], rng: np.random.Generator) -> list[ClientUpdate]:
    return [ClientUpdate(client, {k: v + torch.from_numpy(rng.normal(0, 0.1, v.shape)).to(v.dtype)
                                  for k, v in global_state.items()}, n, 1, 0.0, False)
            for client, n in zip(range(len(sizes)), sizes)]


def test_dropped_clients_are_unmasked_and_the_sum_of_the_others_is_exact():
    """10 clients share keys, 3 never send their masked update: the aggregate is FedAvg over the other 7,
    within the quantization bound, and the round says 3 were recovered."""
    rng = np.random.default_rng(3)
    global_state = {"w": torch.from_numpy(rng.normal(size=(6, 4))).float(), "b": torch.zeros(4)}
    sizes = [5, 40, 13, 7, 90, 21, 3, 60, 11, 2]
    updates = updates_for(global_state, sizes, rng)
    arrived = [u for u in updates if u.client not in (2, 5, 8)]
    strategy = SecureAggregation(FedAvg(), threshold=0.67, scale_bits=24)
    strategy.plan_tasks([ClientTask(c, torch.arange(n), 1, False, 0) for c, n in enumerate(sizes)])
    out = strategy.aggregate(global_state, arrived, np.random.default_rng(0))
    expected = FedAvg().aggregate(global_state, arrived, np.random.default_rng(0))
    weights = np.array([u.num_samples for u in arrived], dtype=float)
    expected_by_hand = sum(u.state["w"].double() * w for u, w in zip(arrived, weights)) / weights.sum()
    for key in global_state:
        assert torch.allclose(out[key], expected[key], rtol=0, atol=1e-6)
    assert torch.allclose(out["w"].double(), expected_by_hand, rtol=0, atol=1e-6)
    metrics = strategy.round_metrics()
    assert metrics["secagg_num_unmasked"] == 7 and metrics["secagg_num_recovered"] == 3
    assert sorted(strategy.last.masked) == [u.client for u in arrived]


def test_too_few_survivors_abort_the_round_instead_of_returning_a_wrong_sum():
    rng = np.random.default_rng(4)
    global_state = {"w": torch.zeros(5, 3)}
    updates = updates_for(global_state, [4, 9, 2, 7, 5, 8], rng)
    strategy = SecureAggregation(FedAvg(), threshold=0.67, scale_bits=24)  # t = 4 of 6
    strategy.plan_tasks([ClientTask(c, torch.arange(4), 1, False, 0) for c in range(6)])
    with pytest.raises(SecureAggregationAborted, match="3"):
        strategy.aggregate(global_state, updates[:3], np.random.default_rng(0))


def test_dp_fedavg_behind_secure_aggregation_adds_its_noise_to_the_unmasked_sum():
    """DP-FedAvg's summand is the clipped update, unweighted; the server adds N(0, (zC)^2) to the unmasked sum
    and divides by m: with the same server stream, the noisy model equals the plain DP step to the rounding."""
    rng = np.random.default_rng(5)
    global_state = {"w": torch.from_numpy(rng.normal(size=(8, 3))).double()}
    updates = updates_for(global_state, [3, 30, 8, 12], rng)
    dp = DPFedAvg(clip_norm=0.4, noise_multiplier=1.0, clients_per_round=4, num_clients=20)
    secure = SecureAggregation(DPFedAvg(clip_norm=0.4, noise_multiplier=1.0, clients_per_round=4, num_clients=20),
                               threshold=0.75, scale_bits=30)
    secure.plan_tasks([ClientTask(u.client, torch.arange(u.num_samples), 1, False, 0) for u in updates])
    plain = dp.aggregate(global_state, updates, np.random.default_rng(9))["w"]
    masked = secure.aggregate(global_state, updates, np.random.default_rng(9))["w"]
    assert torch.allclose(plain, masked, rtol=0, atol=4 * 2.0 ** -31 / 4 + 1e-12)
    assert not torch.allclose(plain, global_state["w"])  # it did move (clipped updates plus noise)
    assert secure.rounds == 1 and "dp_epsilon" in secure.round_metrics()


@pytest.mark.parametrize("name", [n for n in STRATEGIES if n not in SUM_STRATEGIES])
def test_methods_that_need_individual_updates_refuse_secure_aggregation_with_the_reason(name):
    config = ExperimentConfig.from_dict({**BASE, "strategy.name": name, "federation.clients_per_round": 8,
                                         "strategy.secure_aggregation": True})
    with pytest.raises(ValueError) as error:
        build_strategy(config)
    message = str(error.value)
    assert f"strategy.name={name!r}" in message and "strategy.secure_aggregation=false" in message
    assert strategy_class(name).secure_aggregation_refusal in message


def test_the_config_s_list_of_sum_strategies_is_the_strategies_own():
    from workbench.strategies import REGISTRY
    assert set(SUM_STRATEGIES) == {n for n in REGISTRY if strategy_class(n).secure_aggregation_refusal is None}
    for name in ("median", "trimmed_mean", "krum", "multi_krum"):
        assert "individual update" in strategy_class(name).secure_aggregation_refusal


def test_one_client_per_round_is_refused():
    config = ExperimentConfig.from_dict({**BASE, "federation.clients_per_round": 1, "strategy.secure_aggregation": True})
    with pytest.raises(ValueError, match="clients_per_round >= 2"):
        prepare(config)


def test_the_wrapper_keeps_the_inner_strategy_s_state_and_name():
    config = ExperimentConfig.from_dict({**BASE, "strategy.name": "fedadam", "strategy.secure_aggregation": True})
    federation = prepare(config)
    run(federation)
    strategy = federation.strategy
    assert isinstance(strategy, SecureAggregation) and strategy.name == "fedadam"
    state = strategy.state_dict()
    assert any(k.startswith("server.m.") for k in state) and any(k.startswith("server.v.") for k in state)

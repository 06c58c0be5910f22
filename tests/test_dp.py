"""DP-FedAvg (McMahan et al., ICLR 2018): clipping, the fixed-denominator noisy sum, the accountant, the
privacy budget and resuming, each pinned against values computed here independently (numpy, dp_accounting)."""

import math

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting import rdp

from workbench.client import ClientTask, ClientUpdate, LocalObjective, finish_update
from workbench.config import TrainingConfig
from workbench.simulation import SERVER_AGGREGATION, Callback, evaluate, prepare, run, server_stream
from workbench.strategies import build_strategy
from workbench.strategies.dp import DPFedAvg, dp_epsilon, epsilon_without_replacement

DELTA = 1e-5


def poisson_epsilon(z, q, rounds, delta=DELTA):
    """The reference: dp_accounting's RDP accountant, called directly."""
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    return rdp.RdpAccountant().compose(event, rounds).get_epsilon(delta)


def dp_config(tiny_config, **overrides):
    return tiny_config.with_overrides({"strategy.name": "dp_fedavg", "execution.executor": "sequential",
                                       **overrides})


def model_update(client, global_state, deltas, num_samples, is_partial=False):
    """An update w_global + delta (delta 0 for floating tensors not in `deltas`); integer buffers moved
    by 3, which aggregation must ignore."""
    state = {k: (v + deltas.get(k, 0)).to(v.dtype) if v.is_floating_point() else v + 3
             for k, v in global_state.items()}
    return ClientUpdate(client, state, num_samples, 1, 0.0, is_partial)


def l2(state, global_state):
    return math.sqrt(sum(float((state[k].double() - v.double()).pow(2).sum())
                         for k, v in global_state.items() if v.is_floating_point()))


# ----- clipping: what every client sends -----


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_clipped_update_lies_in_the_ball_of_radius_c(dtype):
    """finish_update clips w - w_global to norm <= C over all floating tensors together, from tiny to huge
    updates; updates already inside the ball are sent bit-identically, clipped ones keep their direction.
    The clipped model is computed and stored in its dtype, so the bound holds up to a few roundings: within
    2 eps (||w|| + C) for machine epsilon eps (measured: at most 0.7 eps (||w|| + C) over 20,000 draws; a
    strict <= C would need a margin in client.clip_update; the server re-clips in float64 anyway)."""
    gen = torch.Generator().manual_seed(0)
    eps = torch.finfo(dtype).eps
    extremes = [0.0, 1e-30 if dtype == torch.float64 else 1e-20, 1e30]  # no update, tiny, huge
    random_scales = [10 ** float(s) for s in torch.empty(297).uniform_(-8, 8, generator=gen)]
    for trial, scale in enumerate(extremes + random_scales):
        clip_norm = 10 ** float(torch.empty(()).uniform_(-3, 2, generator=gen))
        global_state = {"w": torch.randn(5, 3, generator=gen, dtype=dtype), "b": torch.randn(3, generator=gen,
                        dtype=dtype), "num_batches": torch.tensor(7)}
        deltas = {k: torch.randn(v.shape, generator=gen, dtype=dtype) * scale
                  for k, v in global_state.items() if v.is_floating_point()}
        sent = model_update(0, global_state, deltas, 10)
        norm_before = l2(sent.state, global_state)
        task = ClientTask(0, torch.arange(10), 1, False, 0)
        out = finish_update(sent, task, LocalObjective(lr=0.1, batch_size=10, clip_norm=clip_norm), global_state)
        norm = l2(out.state, global_state)
        model_norm = math.sqrt(sum(float(v.double().pow(2).sum()) for k, v in out.state.items()
                                   if v.is_floating_point()))
        rounding = 2 * eps * (model_norm + clip_norm)
        assert norm <= clip_norm + rounding, (trial, norm, clip_norm)
        assert out.state["num_batches"] == sent.state["num_batches"]  # integer buffers are not clipped
        assert all(out.state[k].dtype == sent.state[k].dtype for k in sent.state)
        if norm_before <= clip_norm:
            assert all(torch.equal(out.state[k], sent.state[k]) for k in sent.state)
        else:
            assert norm == pytest.approx(clip_norm, abs=rounding)
            for k, d in deltas.items():  # same direction: (clipped delta) * ||d|| / C == d
                sent_delta = (sent.state[k].double() - global_state[k].double())
                clipped_delta = (out.state[k].double() - global_state[k].double())
                assert torch.allclose(clipped_delta * (norm_before / clip_norm), sent_delta, rtol=1e-4,
                                      atol=rounding * norm_before / clip_norm)


# ----- the server: x + (sum of clipped deltas + N(0, (zC)^2 I)) / m -----


def test_without_noise_the_model_moves_by_the_unweighted_sum_over_the_expected_cohort():
    """z = 0, C above every honest update: x + (sum of the accepted deltas) / m with m = clients_per_round,
    even though a straggler was dropped (3 updates, m = 4) and the clients hold 5, 50 and 500 samples
    (unweighted). An update above C (an attacker's, which replaces the clipped one) counts with norm C."""
    strategy = DPFedAvg(clip_norm=10.0, noise_multiplier=0.0, clients_per_round=4, num_clients=10)
    straggler = ClientTask(7, torch.arange(4), 1, True, 0)
    assert not strategy.accepts(straggler) and strategy.accepts(ClientTask(3, torch.arange(4), 2, False, 0))
    x = {"w": torch.tensor([[1.0, -2.0], [0.5, 4.0]], dtype=torch.float64), "b": torch.tensor([0.25, -1.0],
         dtype=torch.float64), "steps": torch.tensor(11)}
    raw = [({"w": [[0.3, -0.1], [2.0, 0.0]], "b": [1.0, -0.5]}, 5),
           ({"w": [[-1.0, 0.2], [0.0, 0.7]], "b": [0.1, 0.1]}, 50),
           ({"w": [[0.0, 3.0], [-2.0, 1.5]], "b": [0.0, 4.0]}, 500)]
    updates = [model_update(c, x, {k: torch.tensor(v, dtype=torch.float64) for k, v in d.items()}, n)
               for c, (d, n) in zip((1, 3, 5), raw)]
    out = strategy.aggregate(x, updates, np.random.default_rng(0))
    w = np.array([[1.0, -2.0], [0.5, 4.0]]) + (np.array([[0.3, -0.1], [2.0, 0.0]]) + np.array([[-1.0, 0.2], [0.0, 0.7]])
                                                + np.array([[0.0, 3.0], [-2.0, 1.5]])) / 4
    b = np.array([0.25, -1.0]) + (np.array([1.0, -0.5]) + np.array([0.1, 0.1]) + np.array([0.0, 4.0])) / 4
    np.testing.assert_allclose(out["w"].numpy(), w, rtol=0, atol=1e-14)
    np.testing.assert_allclose(out["b"].numpy(), b, rtol=0, atol=1e-14)
    assert out["steps"].dtype == torch.int64 and int(out["steps"]) == 11  # the global model's buffer
    assert out["w"].dtype == torch.float64

    tight = DPFedAvg(clip_norm=2.0, noise_multiplier=0.0, clients_per_round=4, num_clients=10)
    out = tight.aggregate(x, updates, np.random.default_rng(0))
    flat = [np.concatenate([np.ravel(d["w"]), d["b"]]) for d, _ in raw]
    clipped = [f * min(1.0, 2.0 / np.linalg.norm(f)) for f in flat]  # norms 2.29, 1.24, 5.59
    expected = np.concatenate([[1.0, -2.0, 0.5, 4.0], [0.25, -1.0]]) + sum(clipped) / 4
    np.testing.assert_allclose(np.concatenate([out["w"].numpy().ravel(), out["b"].numpy()]), expected, atol=1e-14)
    assert strategy.aggregate(x, [], np.random.default_rng(0)) == x  # no update: the global model unchanged
    assert strategy.rounds == 1  # and nothing composed


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_server_noise_has_std_z_c_over_m(dtype):
    """Updates equal to the global model: the new model minus the old one is the noise / m, of std z C / m
    (1.3 * 0.7 / 5 = 0.182) whatever the number of updates (3 here), with mean 0; dtype kept."""
    strategy = DPFedAvg(clip_norm=0.7, noise_multiplier=1.3, clients_per_round=5, num_clients=20)
    x = {"w": torch.zeros(50, 40, dtype=dtype), "b": torch.zeros(40, dtype=dtype), "steps": torch.tensor(2)}
    updates = [model_update(c, x, {}, n) for c, n in ((0, 3), (4, 30), (9, 300))]
    draws = []
    for seed in range(40):
        out = strategy.aggregate(x, updates, np.random.default_rng(seed))
        assert out["w"].dtype == dtype and out["w"].shape == (50, 40) and int(out["steps"]) == 2
        draws.append(torch.cat([out["w"].double().ravel(), out["b"].double().ravel()]))
    noise = torch.stack(draws).numpy()
    expected = 1.3 * 0.7 / 5
    assert noise.std() == pytest.approx(expected, rel=0.02)  # 81,600 draws: the std's error is ~0.25 %
    assert abs(noise.mean()) < 4 * expected / math.sqrt(noise.size)
    assert strategy.round_metrics()["dp_noise_std"] == pytest.approx(expected, rel=1e-15)


def test_noise_is_identical_for_the_same_seed_and_round_and_independent_across_rounds(tiny_config):
    config = dp_config(tiny_config, **{"strategy.noise_multiplier": 1.0, "strategy.clip_norm": 1.0})
    x = {"w": torch.zeros(100, 100)}
    updates = [model_update(0, x, {}, 10)]

    def noise(config, round_):
        strategy = build_strategy(config)
        return strategy.aggregate(x, updates, server_stream(config, round_, SERVER_AGGREGATION))["w"].ravel()

    assert torch.equal(noise(config, 3), noise(config, 3))
    first, second, other_seed = noise(config, 3), noise(config, 4), noise(config.with_overrides({"seed": 1}), 3)
    for a, b in ((first, second), (first, other_seed)):
        assert not torch.equal(a, b)
        assert abs(float(np.corrcoef(a.numpy(), b.numpy())[0, 1])) < 0.05  # 10,000 pairs: ~0.01 if independent


# ----- the accountant -----


def test_epsilon_is_dp_accountings_rdp_epsilon_for_poisson_sampling():
    """After 7 rounds with z = 1.1 and q = 3 / 10: dp_accounting's own epsilon at delta, exactly; the same
    as composing the round 7 times one by one (up to float summation order); growing with every round."""
    strategy = DPFedAvg(clip_norm=1.0, noise_multiplier=1.1, clients_per_round=3, num_clients=10, delta=DELTA)
    x = {"w": torch.zeros(3)}
    logged = []
    for round_ in range(1, 8):
        strategy.aggregate(x, [model_update(0, x, {}, 1)], np.random.default_rng(round_))
        logged.append(strategy.round_metrics()["dp_epsilon"])
    assert logged[-1] == poisson_epsilon(1.1, 0.3, 7)
    assert logged[-1] == dp_epsilon(1.1, 0.3, 7, DELTA)
    one_by_one = rdp.RdpAccountant()
    for _ in range(7):
        one_by_one.compose(dp_accounting.PoissonSampledDpEvent(0.3, dp_accounting.GaussianDpEvent(1.1)))
    assert logged[-1] == pytest.approx(one_by_one.get_epsilon(DELTA), rel=1e-12)
    assert logged == [poisson_epsilon(1.1, 0.3, t) for t in range(1, 8)]
    assert all(a < b for a, b in zip(logged, logged[1:]))
    assert dp_epsilon(1.1, 0.3, 0, DELTA) == 0.0 and dp_epsilon(0.0, 0.3, 5, DELTA) == math.inf

    # the comparison docs/privacy.md reports: sampling m of N without replacement, replace-one relation,
    # sensitivity 2C (so the Gaussian has z / 2 sensitivities of noise)
    event = dp_accounting.SampledWithoutReplacementDpEvent(10, 3, dp_accounting.GaussianDpEvent(0.55))
    replace_one = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    assert epsilon_without_replacement(1.1, 10, 3, 7, DELTA) == replace_one.compose(event, 7).get_epsilon(DELTA)


def test_without_noise_epsilon_is_left_out_and_a_budget_is_refused(tiny_config):
    strategy = build_strategy(dp_config(tiny_config, **{"strategy.noise_multiplier": 0.0}))
    x = {"w": torch.zeros(2)}
    strategy.aggregate(x, [model_update(0, x, {"w": torch.ones(2)}, 3)], np.random.default_rng(0))
    assert strategy.round_metrics() == {"dp_noise_std": 0.0}  # epsilon = inf: metrics must be finite
    assert strategy.stop_reason(2) is None
    with pytest.raises(ValueError, match=r"privacy.target_epsilon=5 needs strategy.noise_multiplier > 0, got 0"):
        build_strategy(dp_config(tiny_config, **{"strategy.noise_multiplier": 0.0, "privacy.target_epsilon": 5.0}))
    # one round alone (z = 1, q = 4/8) spends 3.89 > 1: the run could not train at all
    with pytest.raises(ValueError, match=r"privacy.target_epsilon=1 is below the epsilon of a single round \(3.894"):
        build_strategy(dp_config(tiny_config, **{"strategy.noise_multiplier": 1.0, "privacy.target_epsilon": 1.0}))


def test_strategy_from_config_reads_its_knobs(tiny_config):
    config = dp_config(tiny_config, **{"strategy.clip_norm": 0.3, "strategy.noise_multiplier": 0.8,
                                       "privacy.delta": 1e-6, "privacy.target_epsilon": 50.0})
    strategy = build_strategy(config)
    assert isinstance(strategy, DPFedAvg) and strategy.name == "dp_fedavg" and not strategy.keeps_partial_work
    knobs = (strategy.clip_norm, strategy.noise_multiplier, strategy.delta, strategy.target_epsilon)
    assert knobs == (0.3, 0.8, 1e-6, 50.0)
    assert strategy.sampling_rate == 4 / 8
    objective = strategy.local_objective(TrainingConfig(lr=0.2, lr_decay=0.5, momentum=0.9), 3)
    assert (objective.clip_norm, objective.lr, objective.momentum) == (0.3, 0.05, 0.9)


# ----- the run: budget, resume, learning -----


def test_target_epsilon_ends_the_run_finished_before_the_round_that_would_exceed_it(tiny_config):
    config = dp_config(tiny_config, **{"federation.rounds": 10, "strategy.noise_multiplier": 1.0})
    eps = {t: poisson_epsilon(1.0, 4 / 8, t) for t in (4, 5)}  # 7.41, 8.23
    target = (eps[4] + eps[5]) / 2
    history = run(config.with_overrides({"privacy.target_epsilon": target}))
    assert history.status == "FINISHED" and len(history.rounds) == 4
    assert "privacy.target_epsilon" in history.stop_reason
    last = history.rounds[-1].metrics["dp_epsilon"]
    assert last == eps[4] and last <= target < eps[5]


class StateAfter(Callback):
    def __init__(self, round_):
        self.round, self.model, self.strategy = round_, None, None

    def on_round_end(self, result, federation):
        if result.round == self.round:
            self.model = {k: v.clone() for k, v in federation.model.state_dict().items()}
            self.strategy = federation.strategy.state_dict()


def test_state_round_trip_continues_the_accountant_and_the_model_exactly(tiny_config):
    config = dp_config(tiny_config, **{"federation.rounds": 4, "strategy.noise_multiplier": 0.7})
    saved = StateAfter(2)
    whole = prepare(config)
    uninterrupted = run(whole, [saved])
    assert set(saved.strategy) == {"server.dp_rounds"} and int(saved.strategy["server.dp_rounds"]) == 2

    restored = build_strategy(config)
    assert restored.state_dict() == {}  # fresh: nothing composed
    restored.load_state_dict(saved.strategy)
    assert restored.state_dict().keys() == saved.strategy.keys()
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in saved.strategy.items())
    assert restored.round_metrics()["dp_epsilon"] == uninterrupted.rounds[1].metrics["dp_epsilon"]

    resumed_federation = prepare(config)
    resumed_federation.model.load_state_dict(saved.model)
    resumed = run(resumed_federation, start_round=3, strategy_state=saved.strategy)
    assert [r.round for r in resumed.rounds] == [3, 4]
    for a, b in zip(resumed.rounds, uninterrupted.rounds[2:]):
        assert a.metrics["dp_epsilon"] == b.metrics["dp_epsilon"] == poisson_epsilon(0.7, 0.5, a.round)
        assert a.metrics["test_loss"] == b.metrics["test_loss"]
    for k, v in whole.model.state_dict().items():
        assert torch.equal(resumed_federation.model.state_dict()[k], v)
    with pytest.raises(ValueError, match=r"keeps only 'server.dp_rounds', but the checkpoint holds \['server.m.w'\]"):
        restored.load_state_dict({"server.m.w": torch.zeros(2)})


def test_a_tiny_run_with_moderate_noise_learns_and_repeats_bit_identically(tiny_config):
    """z = 0.5, C = 1 on Synthetic(1, 1) with 4 of 8 clients per round (noise std 0.125 per weight, a noise
    norm ~3 per round against clipped updates of norm <= 1): still better than the initial model and than
    always answering the majority class, and the same config gives the same numbers."""
    config = dp_config(tiny_config, **{"federation.rounds": 10, "strategy.noise_multiplier": 0.5})
    first, second = prepare(config), prepare(config)
    y_test = first.dataset.y_test.numpy()
    majority = np.bincount(y_test).max() / len(y_test)  # 0.34
    initial = evaluate(first.model, first.dataset.x_test, first.dataset.y_test)
    initial_train = evaluate(first.model, first.dataset.x_train, first.dataset.y_train)
    history, again = run(first), run(second)
    final = history.rounds[-1].metrics
    assert final["test_accuracy"] > max(majority, initial.accuracy) + 0.05  # 0.46 vs 0.34 and 0.14
    assert final["train_loss"] < initial_train.loss
    assert final["dp_noise_std"] == 0.125
    epsilons = [r.metrics["dp_epsilon"] for r in history.rounds]
    assert all(a < b for a, b in zip(epsilons, epsilons[1:]))
    for a, b in zip(history.rounds, again.rounds):
        assert {k: v for k, v in a.metrics.items() if k != "round_time_s"} == \
               {k: v for k, v in b.metrics.items() if k != "round_time_s"}
    for k, v in first.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[k], v)

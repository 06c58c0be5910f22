import numpy as np
import pytest
import torch

from workbench.client import ClientTask, ClientUpdate
from workbench.config import ExperimentConfig, TrainingConfig
from workbench.strategies import FedAvg, FedProx, build_strategy, weighted_average

RNG = np.random.default_rng(0)


def update(client, value, num_samples, is_partial=False):
    return ClientUpdate(client, {"w": torch.full((2,), float(value))}, num_samples, 1, 0.0, is_partial)


def test_weights_are_proportional_to_sample_counts():
    avg = weighted_average([{"w": torch.tensor([0.0])}, {"w": torch.tensor([10.0])}], [30, 10])
    assert torch.allclose(avg["w"], torch.tensor([2.5]))
    # scaling every weight changes nothing
    again = weighted_average([{"w": torch.tensor([0.0])}, {"w": torch.tensor([10.0])}], [3, 1])
    assert torch.allclose(avg["w"], again["w"])


def test_weighted_average_is_pure_and_rejects_nonsense():
    states = [{"w": torch.ones(3)}, {"w": torch.zeros(3)}]
    weighted_average(states, [1, 1])
    assert torch.equal(states[0]["w"], torch.ones(3))
    with pytest.raises(ValueError):
        weighted_average([], [])
    with pytest.raises(ValueError):
        weighted_average(states, [0, 0])


@pytest.mark.parametrize("strategy", [FedAvg(), FedProx(mu=0.1)])
def test_conformance(strategy):
    """Every strategy: same-valued updates give that value; no updates keep the global model."""
    global_state = {"w": torch.zeros(2)}
    out = strategy.aggregate(global_state, [update(0, 3.0, 5), update(1, 3.0, 50)], RNG)
    assert torch.allclose(out["w"], torch.full((2,), 3.0))
    assert torch.equal(strategy.aggregate(global_state, [], RNG)["w"], global_state["w"])


def test_fedavg_drops_stragglers_fedprox_keeps_them():
    straggler = ClientTask(1, torch.arange(3), 1, True, 0)
    assert not FedAvg().accepts(straggler) and FedProx(mu=1.0).accepts(straggler)
    assert FedAvg().accepts(ClientTask(0, torch.arange(3), 2, False, 0))


def test_build_strategy():
    training = TrainingConfig()
    build = lambda **kv: build_strategy(ExperimentConfig().with_overrides(kv))  # noqa: E731
    assert build(**{"strategy.name": "fedavg"}).local_objective(training, 1).proximal_mu == 0
    assert build(**{"strategy.name": "fedprox", "strategy.mu": 0.3}).local_objective(training, 1).proximal_mu == 0.3


def test_weighted_average_keeps_dtypes_accepts_fractional_weights_and_says_what_is_wrong():
    states = [{"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor(4)},
              {"w": torch.tensor([3.0, 6.0]), "steps": torch.tensor(8)}]
    out = weighted_average(states, [0.25, 0.75])  # total weight 1
    assert torch.allclose(out["w"], torch.tensor([2.5, 5.0]))
    assert out["steps"].dtype == torch.int64 and int(out["steps"]) == 7
    doubled = weighted_average([{"w": torch.tensor([1.0], dtype=torch.float64)}], [3])
    assert doubled["w"].dtype == torch.float64
    with pytest.raises(ValueError, match=r"^weighted_average needs at least one state$"):
        weighted_average([], [])
    with pytest.raises(ValueError, match=r"^weighted_average needs a positive total weight, got 0.0$"):
        weighted_average(states, [0, 0])
    assert torch.allclose(weighted_average(states, [0.5, 0.25])["w"], torch.tensor([5 / 3, 10 / 3]))


# ----- one conformance suite that every registered strategy passes -----

from safetensors.torch import load_file, save_file  # noqa: E402

from workbench.client import finish_update  # noqa: E402
from workbench.config import STRATEGIES  # noqa: E402
from workbench.strategies import REGISTRY, strategy_class  # noqa: E402

#: Methods whose step is not the aggregate itself: an adaptive server optimizer steps along it.
SERVER_OPTIMIZERS = {"fedavgm", "fedadam", "fedyogi", "fedadagrad"}
#: Methods that weight clients by their sample counts (the others are unweighted in their papers).
SAMPLE_WEIGHTED = {"fedavg", "fedprox", "fednova"}
#: A config in which every method's conformance holds exactly: no noise, no clipping in effect, a Krum f that
#: fits five updates, server steps of 1, a trimmed mean that trims one of five at each end.
CONFORMANCE = {"federation.num_clients": 12, "federation.clients_per_round": 5, "strategy.num_byzantine": 1,
               "strategy.noise_multiplier": 0.0, "strategy.clip_norm": 1e9, "strategy.trim_fraction": 0.2,
               "strategy.server_lr": 1.0, "training.lr": 0.1, "training.batch_size": 10}
SIZES = (11, 14, 17, 12, 20)  # unequal, but the same number of local steps (FedNova's equal-steps case)


def conformance_strategy(name, **overrides):
    return build_strategy(ExperimentConfig().with_overrides({**CONFORMANCE, "strategy.name": name, **overrides}))


def global_model():
    return {"w": torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.25, -0.5]], dtype=torch.float64),
            "b": torch.tensor([0.1, -0.2], dtype=torch.float64), "steps": torch.tensor(7)}


def sent_updates(strategy, global_state, trained_states, sizes=SIZES, round_=1, batch_size=10):
    """Updates as the round loop builds them: the strategy's payload for each client, the client's trained
    model, completed by `finish_update`."""
    objective = strategy.local_objective(TrainingConfig(lr=0.1, batch_size=batch_size), round_)
    updates = []
    for client, (state, size) in enumerate(zip(trained_states, sizes)):
        payload, client_state = strategy.client_payload(client, global_state)
        task = ClientTask(client, torch.arange(size), 2, False, client, payload=payload, client_state=client_state)
        raw = ClientUpdate(client, {k: v.clone() for k, v in state.items()}, size, 2, 0.5, False)
        updates.append(finish_update(raw, task, objective, global_state))
    return updates


def shifted(global_state, shift):
    return {k: v + shift if v.is_floating_point() else v.clone() for k, v in global_state.items()}


def test_every_public_name_is_registered_and_builds():
    assert set(REGISTRY) == set(STRATEGIES)
    for name in STRATEGIES:
        assert conformance_strategy(name).name == name
    with pytest.raises(ValueError, match=r"strategy.name must be one of \{fedavg, .*got 'fedavgx'"):
        strategy_class("fedavgx")


@pytest.mark.parametrize("name", STRATEGIES)
def test_identical_updates_give_that_update_with_shapes_dtypes_and_buffers_kept(name):
    strategy = conformance_strategy(name)
    global_state = global_model()
    same = shifted(global_state, 0.125)
    out = strategy.aggregate(global_state, sent_updates(strategy, global_state, [same] * 5), RNG)
    assert out.keys() == global_state.keys()
    for key, value in global_state.items():
        assert out[key].dtype == value.dtype and out[key].shape == value.shape, key
    assert torch.equal(out["steps"], global_state["steps"])
    delta = out["w"] - global_state["w"]
    if name == "local":  # nothing is averaged: each client keeps its own update as its model
        assert all(torch.equal(out[k], v) for k, v in global_state.items())
        assert sorted(strategy.models) == list(range(5))
        assert all(torch.equal(model[k], same[k]) for model in strategy.models.values() for k in same)
    elif name in SERVER_OPTIMIZERS:  # a step along the common update, every coordinate the same way
        assert bool((delta > 0).all())
    else:
        assert torch.allclose(out["w"], same["w"], atol=1e-12) and torch.allclose(out["b"], same["b"], atol=1e-12)


@pytest.mark.parametrize("name", STRATEGIES)
def test_no_update_keeps_the_global_model_and_the_state(name):
    strategy = conformance_strategy(name)
    global_state = global_model()
    strategy.aggregate(global_state, sent_updates(strategy, global_state, [shifted(global_state, 0.1)] * 5), RNG)
    before = strategy.state_dict()
    out = strategy.aggregate(global_state, [], RNG)
    assert all(torch.equal(out[k], v) for k, v in global_state.items())
    after = strategy.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("name", sorted(SAMPLE_WEIGHTED | {"scaffold", "dp_fedavg"}))
def test_sample_weighting_where_the_method_says_so(name):
    """Two clients of 10 and 90 samples: sample-weighted methods land at the 1:9 average, unweighted ones
    (SCAFFOLD's and DP-FedAvg's papers) at 1:1 (DP-FedAvg: the sum over m). The robust aggregators are
    unweighted too: tests/test_robust.py pins them on more clients than two."""
    strategy = conformance_strategy(name, **{"federation.clients_per_round": 2, "strategy.num_byzantine": 0,
                                             "federation.num_clients": 4})
    global_state = global_model()
    states = [shifted(global_state, 1.0), shifted(global_state, 3.0)]
    updates = sent_updates(strategy, global_state, states, sizes=(10, 90), batch_size=100)  # 2 steps each
    out = strategy.aggregate(global_state, updates, RNG)
    expected = 0.1 * 1.0 + 0.9 * 3.0 if name in SAMPLE_WEIGHTED else 2.0
    assert torch.allclose(out["b"] - global_state["b"], torch.full((2,), expected, dtype=torch.float64))


@pytest.mark.parametrize("name", STRATEGIES)
def test_state_round_trips_through_a_checkpoint_file(name, tmp_path):
    """Two rounds, then the state through safetensors (as every checkpoint stores it) into a fresh strategy:
    the third round is bit-identical to the uninterrupted strategy's."""
    global_state = global_model()
    generator = torch.Generator().manual_seed(0)
    rounds = [[{k: (v + torch.randn(v.shape, generator=generator, dtype=v.dtype) if v.is_floating_point() else v)
                for k, v in global_state.items()} for _ in range(5)] for _ in range(3)]
    strategy = conformance_strategy(name, **{"strategy.noise_multiplier": 0.7, "strategy.clip_norm": 1.5})
    current = global_state
    for round_, states in enumerate(rounds[:2], start=1):
        current = strategy.aggregate(current, sent_updates(strategy, current, states, round_=round_),
                                     np.random.default_rng(round_))
    state = strategy.state_dict()
    if state:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "server.safetensors"))
        state = load_file(str(tmp_path / "server.safetensors"))
    restored = conformance_strategy(name, **{"strategy.noise_multiplier": 0.7, "strategy.clip_norm": 1.5})
    restored.load_state_dict(state)
    expected = strategy.aggregate(current, sent_updates(strategy, current, rounds[2], round_=3),
                                  np.random.default_rng(3))
    again = restored.aggregate(current, sent_updates(restored, current, rounds[2], round_=3),
                               np.random.default_rng(3))
    assert all(torch.equal(expected[k], again[k]) for k in expected)
    assert restored.round_metrics() == strategy.round_metrics()
    after, restored_after = strategy.state_dict(), restored.state_dict()
    assert after.keys() == restored_after.keys() and all(torch.equal(after[k], restored_after[k]) for k in after)

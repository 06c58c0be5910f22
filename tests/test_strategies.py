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

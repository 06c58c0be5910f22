"""SCAFFOLD (Karimireddy et al., ICML 2020, Algorithm 1, option II): the server and client variates, their
write-back, the correction's sign, the 1/N variate step, exact state round trip, traffic, and training."""

import dataclasses

import numpy as np
import pytest
import torch

from workbench.client import ClientTask, ClientUpdate, finish_update, gradient_correction
from workbench.config import ExperimentConfig, TrainingConfig
from workbench.execution import SequentialExecutor
from workbench.models import build_model
from workbench.simulation import Callback, prepare, run
from workbench.strategies import FedAvg, build_strategy
from workbench.strategies.scaffold import Scaffold

RNG = np.random.default_rng(0)


class Quadratic:
    """N clients with least-squares losses f_i(w) = ||A_i w - b_i||^2 / (2 n_i) whose optima differ, of
    unequal sizes; each client runs K steps of full-batch GD, w <- w - lr (grad f_i(w) + correction)."""

    def __init__(self, sizes=(6, 11, 17, 26), seed=2):
        rng = np.random.default_rng(seed)
        self.sizes, self.d = list(sizes), 3
        targets = [np.array([3.0, 0, 0]), np.array([0, 3.0, 0]), np.array([0, 0, 3.0]), np.array([-2.0, -2, -2])]
        self.A = [rng.normal(size=(n, self.d)) for n in self.sizes]
        self.b = [a @ w + 0.5 * rng.normal(size=n) for a, w, n in zip(self.A, targets, self.sizes)]
        self.H = [a.T @ a / n for a, n in zip(self.A, self.sizes)]
        self.g = [a.T @ b / n for a, b, n in zip(self.A, self.b, self.sizes)]

    @property
    def num_clients(self):
        return len(self.sizes)

    def optimum(self, weights):
        """argmin sum_i weights_i f_i."""
        return np.linalg.solve(sum(w * h for w, h in zip(weights, self.H)),
                               sum(w * g for w, g in zip(weights, self.g)))

    def grad(self, i, w):
        return self.H[i] @ w - self.g[i]

    def local_gd(self, i, x, steps, lr, correction=None):
        w = x.copy()
        for _ in range(steps):
            w = w - lr * (self.grad(i, w) + (0.0 if correction is None else correction))
        return w

    def fedavg_fixed_point(self, steps, lr):
        """FedAvg's exact fixed point: y_i = o_i + M_i (x - o_i) with M_i = (I - lr H_i)^K and o_i client
        i's optimum, so x = sum p_i y_i solves (I - sum p_i M_i) x = sum p_i (I - M_i) o_i."""
        p = np.array(self.sizes) / sum(self.sizes)
        eye = np.eye(self.d)
        M = [np.linalg.matrix_power(eye - lr * h, steps) for h in self.H]
        o = [np.linalg.solve(h, g) for h, g in zip(self.H, self.g)]
        return np.linalg.solve(eye - sum(pi * m for pi, m in zip(p, M)),
                               sum(pi * (eye - m) @ oi for pi, m, oi in zip(p, M, o)))


def start_state(d):
    # an integer buffer beside the weights: it must keep the global model's value
    return {"w": torch.zeros(d, dtype=torch.float64), "num_batches": torch.tensor(7)}


def quadratic_round(strategy, problem, global_state, sampled, steps, lr, flip_correction=False):
    """One round through the real seam: the strategy's objective and payload, the client's correction
    (`gradient_correction`: c - c_i), local GD in numpy, `finish_update`, the strategy's aggregate."""
    objective = strategy.local_objective(TrainingConfig(lr=lr, batch_size=1000, local_epochs=steps), 1)
    updates = []
    for i in sampled:
        payload, client_state = strategy.client_payload(i, global_state)
        task = ClientTask(i, torch.arange(problem.sizes[i]), steps, False, 0, payload=payload,
                          client_state=client_state)
        correction = gradient_correction(payload, client_state, ["w"])
        c = None if correction is None else correction[0].numpy() * (-1 if flip_correction else 1)
        y = problem.local_gd(i, global_state["w"].numpy(), steps, lr, c)
        trained = ClientUpdate(i, {"w": torch.from_numpy(y), "num_batches": global_state["num_batches"]},
                               problem.sizes[i], steps, 0.0, False)
        updates.append(finish_update(trained, task, objective, global_state))
    return strategy.aggregate(global_state, updates, RNG), updates


def test_scaffold_reaches_the_optimum_where_fedavg_drifts():
    """Many local steps on clients whose optima differ: FedAvg converges to its drifted fixed point (the
    closed form; 1.11 from the optimum, and 0.12 even from argmin sum_i p_i f_i, the optimum of its own
    sample weighting), SCAFFOLD to argmin sum_i f_i itself (1e-15), with all clients and with half of them
    sampled each round."""
    problem, steps, lr = Quadratic(), 50, 0.02
    optimum = problem.optimum([1.0] * problem.num_clients)  # the paper's f = (1/N) sum_i f_i
    fixed_point = problem.fedavg_fixed_point(steps, lr)
    assert np.linalg.norm(fixed_point - optimum) > 1.0
    assert np.linalg.norm(fixed_point - problem.optimum(problem.sizes)) > 0.1  # drift, not just weighting
    sampler = np.random.default_rng(0)
    everyone = list(range(problem.num_clients))
    results = {}
    for name, strategy, sampled in [
        ("fedavg", FedAvg(), lambda: everyone),
        ("scaffold", Scaffold(num_clients=problem.num_clients), lambda: everyone),
        ("scaffold_half", Scaffold(num_clients=problem.num_clients),
         lambda: sorted(sampler.choice(problem.num_clients, 2, replace=False))),
    ]:
        state = start_state(problem.d)
        for _ in range(200):
            state, _ = quadratic_round(strategy, problem, state, sampled(), steps, lr)
        assert state["w"].dtype == torch.float64 and int(state["num_batches"]) == 7
        results[name] = state["w"].numpy()
    assert np.linalg.norm(results["fedavg"] - fixed_point) < 1e-9
    assert np.linalg.norm(results["fedavg"] - optimum) > 1.0
    assert np.linalg.norm(results["scaffold"] - optimum) < 1e-9
    assert np.linalg.norm(results["scaffold_half"] - optimum) < 1e-6


def test_variates_are_written_back_and_the_server_adds_delta_c_over_n():
    """Two rounds with partial participation, recomputed in numpy from the clients' models: c_i+ =
    c_i - c + (x - y_i)/(K lr) is written back for every sampled client (others keep 0), and the server adds
    (1/N) sum delta_c_i (not c_i+, not a 1/|S| mean)."""
    problem, steps, lr, N = Quadratic(), 7, 0.03, 4
    strategy = Scaffold(num_clients=N)
    x0 = start_state(problem.d)
    x1, first = quadratic_round(strategy, problem, x0, [0, 1, 2], steps, lr)
    ys = {u.client: u.state["w"].numpy() for u in first}
    delta1 = {i: (x0["w"].numpy() - ys[i]) / (steps * lr) for i in ys}  # c = c_i = 0 in round 1
    c1 = sum(delta1.values()) / N
    assert np.allclose(strategy.c["w"].numpy(), c1, rtol=0, atol=1e-12)
    assert not np.allclose(c1, sum(delta1.values()) / 3)  # the 1/|S| mean would differ
    for i in (0, 1, 2):
        assert np.allclose(strategy.client_payload(i, x1)[1]["c_i"]["w"].numpy(), delta1[i], rtol=0, atol=1e-12)
    assert torch.equal(strategy.client_payload(3, x1)[1]["c_i"]["w"], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(strategy.client_payload(3, x1)[0]["c"]["w"], strategy.c["w"])

    x2, second = quadratic_round(strategy, problem, x1, [1, 2, 3], steps, lr)
    ys = {u.client: u.state["w"].numpy() for u in second}
    new_c_i = {i: delta1.get(i, 0.0) - c1 + (x1["w"].numpy() - ys[i]) / (steps * lr) for i in ys}
    delta2 = {i: new_c_i[i] - delta1.get(i, 0.0) for i in ys}
    c2 = c1 + sum(delta2.values()) / N
    assert np.allclose(strategy.c["w"].numpy(), c2, rtol=0, atol=1e-12)
    # a server that added the new c_i (clients 1 and 2 already held one) would be far off
    assert np.abs(c1 + sum(new_c_i.values()) / N - c2).max() > 0.1
    state = strategy.state_dict()
    assert sorted(state) == ["client.0.c_i.w", "client.1.c_i.w", "client.2.c_i.w", "client.3.c_i.w", "server.c.w"]
    assert np.allclose(state["client.0.c_i.w"].numpy(), delta1[0], rtol=0, atol=1e-12)  # not sampled again
    for i in (1, 2, 3):
        assert np.allclose(state[f"client.{i}.c_i.w"].numpy(), new_c_i[i], rtol=0, atol=1e-12)
        assert torch.equal(second[[u.client for u in second].index(i)].client_state["c_i"]["w"],
                           strategy.client_payload(i, x2)[1]["c_i"]["w"])


def test_model_step_is_the_unweighted_mean_times_server_lr():
    """x + eta_g mean_S (y_i - x), unweighted (Algorithm 1 line 16) on clients of unequal sizes."""
    x = {"w": torch.tensor([1.0, -1.0]), "n": torch.tensor(3)}
    ys = [torch.tensor([2.0, 0.0]), torch.tensor([0.0, 3.0]), torch.tensor([4.0, -5.0])]
    updates = [ClientUpdate(i, {"w": y, "n": torch.tensor(9)}, n, 1, 0.0, False, num_steps=1,
                            payload={"delta_c": {"w": torch.zeros(2)}}, client_state={"c_i": {"w": torch.zeros(2)}})
               for i, (y, n) in enumerate(zip(ys, [5, 50, 500]))]
    out = Scaffold(num_clients=10, server_lr=0.5).aggregate(x, updates, RNG)
    expected = np.array([1.0, -1.0]) + 0.5 * np.mean([[1.0, 1.0], [-1.0, 4.0], [3.0, -4.0]], axis=0)
    assert np.allclose(out["w"].numpy(), expected, rtol=0, atol=1e-6)
    assert out["w"].dtype == torch.float32 and int(out["n"]) == 3
    assert not torch.allclose(out["w"], FedAvg().aggregate(x, updates, RNG)["w"])
    assert Scaffold(num_clients=10).state_dict() == {}  # zero variates are not kept
    strategy = Scaffold(num_clients=10)
    assert strategy.aggregate(x, [], RNG) == x and strategy.state_dict() == {}


def test_the_correction_reduces_client_drift_and_its_reverse_increases_it():
    """After a few SCAFFOLD rounds, K local steps with the correction c - c_i the strategy hands out land
    closer to K steps of GD on the global objective than plain local GD does; c_i - c (a swapped sign, or c
    and c_i swapped in the payload) lands farther."""
    problem, steps, lr = Quadratic(), 20, 0.02
    strategy = Scaffold(num_clients=problem.num_clients)
    state = start_state(problem.d)
    everyone = list(range(problem.num_clients))
    for _ in range(3):
        state, _ = quadratic_round(strategy, problem, state, everyone, steps, lr)
    x = state["w"].numpy()
    central = x.copy()
    for _ in range(steps):
        central = central - lr * np.mean([problem.grad(i, central) for i in everyone], axis=0)

    def drift(sign):
        total = 0.0
        for i in everyone:
            payload, client_state = strategy.client_payload(i, state)
            correction = gradient_correction(payload, client_state, ["w"])[0].numpy()
            y = problem.local_gd(i, x, steps, lr, None if sign == 0 else sign * correction)
            total += np.linalg.norm(y - central)
        return total

    corrected, plain, reversed_ = drift(+1), drift(0), drift(-1)
    assert corrected < 0.5 * plain and reversed_ > 1.5 * plain, (corrected, plain, reversed_)


def test_scaffold_with_identical_clients_equals_fedavg():
    """Every client holds the same samples and trains full-batch (no batch order to differ), all sampled:
    c = c_i for everyone after each round, the correction vanishes, and SCAFFOLD is FedAvg."""
    generator = torch.Generator().manual_seed(0)
    model = build_model("logreg", (5,), 3, generator)
    x, y = torch.randn(24, 5, generator=generator), torch.randint(0, 3, (24,), generator=generator)
    training = TrainingConfig(lr=0.3, batch_size=24, local_epochs=3)
    num_clients = 4
    finals = []
    for strategy in (FedAvg(), Scaffold(num_clients=num_clients)):
        executor = SequentialExecutor(model)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for round_ in range(1, 6):
            objective = strategy.local_objective(training, round_)
            tasks = []
            for client in range(num_clients):
                payload, client_state = strategy.client_payload(client, state)
                tasks.append(ClientTask(client, torch.arange(24), 3, False, seed=round_ * 10 + client,
                                        payload=payload, client_state=client_state))
            trained = executor.run_cohort(state, tasks, x, y, objective)
            updates = [finish_update(u, t, objective, state) for u, t in zip(trained, tasks)]
            state = strategy.aggregate(state, updates, RNG)
        finals.append(state)
    moved = max(float((finals[0][k] - model.state_dict()[k]).abs().max()) for k in finals[0])
    assert moved > 0.1
    for k in finals[0]:
        assert torch.allclose(finals[0][k], finals[1][k], rtol=0, atol=1e-6), k


def test_from_config_and_refusals():
    config = ExperimentConfig().with_overrides({"strategy.name": "scaffold", "strategy.server_lr": 0.7,
                                                "federation.num_clients": 12, "federation.clients_per_round": 3})
    strategy = build_strategy(config)
    assert isinstance(strategy, Scaffold) and (strategy.num_clients, strategy.server_lr) == (12, 0.7)
    assert not strategy.keeps_partial_work
    assert not strategy.accepts(ClientTask(1, torch.arange(3), 1, True, 0))
    objective = strategy.local_objective(config.training, 2)
    assert objective.control_variates and objective.lr == config.training.lr and objective.proximal_mu == 0
    with pytest.raises(ValueError, match=r"Scaffold\.num_clients must be an int >= 1"):
        Scaffold(num_clients=0)
    with pytest.raises(ValueError, match=r"strategy\.server_lr must be > 0"):
        Scaffold(num_clients=3, server_lr=0.0)
    plain = ClientUpdate(0, {"w": torch.ones(2)}, 3, 1, 0.0, False, num_steps=1)
    with pytest.raises(ValueError, match=r"payload\['delta_c'\]"):
        strategy.aggregate({"w": torch.zeros(2)}, [plain], RNG)
    outside = dataclasses.replace(plain, client=12, payload={"delta_c": {"w": torch.ones(2)}},
                                  client_state={"c_i": {"w": torch.ones(2)}})
    with pytest.raises(ValueError, match=r"client 12 is outside the federation of Scaffold\.num_clients=12"):
        strategy.aggregate({"w": torch.zeros(2)}, [outside], RNG)
    with pytest.raises(ValueError, match=r"checkpoint holds \['server\.m\.w'\]"):
        strategy.load_state_dict({"server.m.w": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"got \['client\.01\.c_i\.w'\]"):
        strategy.load_state_dict({"client.01.c_i.w": torch.zeros(2)})


# ----- end to end -----


def scaffold_config(tiny_config, **overrides):
    return tiny_config.with_overrides({"strategy.name": "scaffold", "execution.executor": "sequential",
                                       "federation.rounds": 4, **overrides})


class KeepStates(Callback):
    """The model and strategy state after each round (what a checkpoint holds)."""

    def __init__(self):
        self.states = {}

    def on_round_end(self, result, federation):
        self.states[result.round] = ({k: v.clone() for k, v in federation.model.state_dict().items()},
                                     federation.strategy.state_dict())


def test_scaffold_run_learns_is_deterministic_and_resumes_bit_identically(tiny_config):
    config = scaffold_config(tiny_config)
    first, again = KeepStates(), KeepStates()
    history = run(config, [first])
    repeat = run(config, [again])
    assert history.final()["test_accuracy"] > 0.3  # 10 classes: chance is 0.1
    losses = [v for _, v in history.metric("train_loss")]
    assert losses[-1] < losses[0]
    for r in range(1, 5):
        for k in first.states[r][0]:
            assert torch.equal(first.states[r][0][k], again.states[r][0][k])
        assert first.states[r][1].keys() == again.states[r][1].keys()
        assert all(torch.equal(first.states[r][1][k], again.states[r][1][k]) for k in first.states[r][1])
    model_state, strategy_state = first.states[2]
    assert any(k.startswith("client.") for k in strategy_state)
    assert any(k.startswith("server.c.") for k in strategy_state)
    fresh = Scaffold(num_clients=config.federation.num_clients)
    fresh.load_state_dict(strategy_state)
    reloaded = fresh.state_dict()
    assert reloaded.keys() == strategy_state.keys()
    assert all(torch.equal(reloaded[k], strategy_state[k]) for k in strategy_state)
    # resume after round 2 from what a checkpoint holds: rounds 3 and 4 bit-identical
    federation = prepare(config)
    federation.model.load_state_dict(model_state)
    resumed = KeepStates()
    run(federation, [resumed], start_round=3, strategy_state=strategy_state)
    for r in (3, 4):
        for k in first.states[r][0]:
            assert torch.equal(resumed.states[r][0][k], first.states[r][0][k]), (r, k)
        assert resumed.states[r][1].keys() == first.states[r][1].keys()
        assert all(torch.equal(resumed.states[r][1][k], first.states[r][1][k]) for k in first.states[r][1])


def test_scaffold_traffic_counts_c_down_and_delta_c_up(tiny_config):
    """bytes_down = sampled x model + tasks x c; bytes_up = updates x (model + delta_c); stragglers are
    sampled (they download the model) but not asked to train, so they get no c."""
    config = scaffold_config(tiny_config, **{"federation.straggler_fraction": 0.5, "federation.rounds": 2})
    federation = prepare(config)
    model_bytes = sum(v.numel() * v.element_size() for v in federation.model.state_dict().values())
    c_bytes = sum(p.numel() * p.element_size() for p in federation.model.parameters())
    history = run(federation)
    sampled = config.federation.clients_per_round
    for result in history.rounds:
        trained = result.metrics["num_updates"]
        assert trained == sampled - len(result.stragglers) == 2
        assert result.metrics["bytes_down"] == sampled * model_bytes + trained * c_bytes
        assert result.metrics["bytes_up"] == trained * (model_bytes + c_bytes)

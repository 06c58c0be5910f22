"""FedNova (Wang, Liu, Liang, Joshi, Poor, NeurIPS 2020): the L1 norm of local (momentum) SGD's aggregation
vector, normalized averaging, the objective it reaches under unequal local steps, and training."""

import numpy as np
import pytest
import torch

from workbench.client import ClientTask, ClientUpdate, LocalObjective, finish_update
from workbench.config import ExperimentConfig, TrainingConfig
from workbench.simulation import Callback, run
from workbench.strategies import FedAvg, build_strategy
from workbench.strategies.fednova import FedNova, local_sgd_norm, normalized_average

RNG = np.random.default_rng(0)


def unrolled_norm(num_steps, momentum):
    """||a||_1 by running torch.optim.SGD (momentum, no dampening) on w with the constant gradient 1: the
    round moves w by lr * sum_j a_j, and every a_j > 0."""
    w = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([w], lr=0.5, momentum=momentum)
    for _ in range(num_steps):
        optimizer.zero_grad()
        w.sum().backward()
        optimizer.step()
    return -float(w.detach()) / 0.5


@pytest.mark.parametrize("momentum", [0.0, 0.3, 0.9, 0.99])
def test_momentum_norm_matches_the_unrolled_recursion(momentum):
    for num_steps in (1, 2, 3, 7, 50, 400):
        expected = unrolled_norm(num_steps, momentum)
        assert local_sgd_norm(num_steps, momentum) == pytest.approx(expected, rel=1e-12), num_steps
        # the coefficients themselves: an impulse gradient at step j reaches the end with weight a_j
        coefficients = []
        for j in range(num_steps):
            buffer, moved = 0.0, 0.0
            for k in range(num_steps):
                buffer = momentum * buffer + (1.0 if k == j else 0.0)
                moved += buffer
            coefficients.append(moved)
        assert sum(coefficients) == pytest.approx(expected, rel=1e-12)
    assert local_sgd_norm(12, 0.0) == 12.0
    with pytest.raises(ValueError, match=r"num_steps >= 1"):
        local_sgd_norm(0, 0.5)


def updates_of(values, sizes, steps):
    return [ClientUpdate(i, {"w": torch.tensor(v, dtype=torch.float64), "n": torch.tensor(5)}, n, 1, 0.0, False,
                         num_steps=s) for i, (v, n, s) in enumerate(zip(values, sizes, steps))]


GLOBAL = {"w": torch.tensor([1.0, -2.0], dtype=torch.float64), "n": torch.tensor(3)}
VALUES = [[2.0, 0.0], [0.0, 1.0], [4.0, -6.0]]
SIZES = [10, 30, 60]


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_equal_steps_make_fednova_fedavg(momentum):
    updates = updates_of(VALUES, SIZES, [6, 6, 6])
    nova = FedNova(momentum=momentum).aggregate(GLOBAL, updates, RNG)
    avg = FedAvg().aggregate(GLOBAL, updates, RNG)
    assert torch.allclose(nova["w"], avg["w"], rtol=0, atol=1e-12)
    assert nova["w"].dtype == torch.float64 and int(nova["n"]) == 3  # the integer buffer keeps its value


def test_normalized_average_by_hand():
    """Unequal steps with momentum 0.5: d_i = (x - y_i)/||a_i||_1, tau_eff = sum p_i ||a_i||_1,
    x - tau_eff sum p_i d_i, with the norms from the unrolled recursion."""
    steps, rho = [2, 5, 20], 0.5
    x, ys = np.array([1.0, -2.0]), np.array(VALUES)
    p = np.array(SIZES) / sum(SIZES)
    a = np.array([unrolled_norm(s, rho) for s in steps])
    expected = x - (p @ a) * sum(pi * (x - y) / ai for pi, y, ai in zip(p, ys, a))
    out = FedNova(momentum=rho).aggregate(GLOBAL, updates_of(VALUES, SIZES, steps), RNG)
    assert np.allclose(out["w"].numpy(), expected, rtol=0, atol=1e-12)
    fedavg = p @ ys
    assert np.abs(expected - fedavg).max() > 0.5  # the normalization matters here
    assert torch.equal(normalized_average(GLOBAL, [], [])["w"], GLOBAL["w"])
    assert FedNova().aggregate(GLOBAL, [], RNG)["w"] is GLOBAL["w"]


class Quadratic:
    """Clients with least-squares losses f_i(w) = ||A_i w - b_i||^2 / (2 n_i) whose optima differ, of
    unequal sizes, each running its own number of full-batch local (momentum) GD steps."""

    def __init__(self, sizes=(12, 20, 30, 45), steps=(40, 10, 4, 2), seed=2):
        rng = np.random.default_rng(seed)
        self.sizes, self.steps, self.d = list(sizes), list(steps), 3
        targets = [np.array([3.0, 0, 0]), np.array([0, 3.0, 0]), np.array([0, 0, 3.0]), np.array([-2.0, -2, -2])]
        A = [rng.normal(size=(n, self.d)) for n in self.sizes]
        b = [a @ w + 0.5 * rng.normal(size=n) for a, w, n in zip(A, targets, self.sizes)]
        self.H = [a.T @ a / n for a, n in zip(A, self.sizes)]
        self.g = [a.T @ y / n for a, y, n in zip(A, b, self.sizes)]
        self.p = np.array(self.sizes) / sum(self.sizes)

    def optimum(self, weights):
        """argmin sum_i weights_i f_i."""
        return np.linalg.solve(sum(w * h for w, h in zip(weights, self.H)),
                               sum(w * g for w, g in zip(weights, self.g)))

    def local_gd(self, i, x, lr, momentum):
        w, buffer = x.copy(), None
        for _ in range(self.steps[i]):
            grad = self.H[i] @ w - self.g[i]
            buffer = grad if buffer is None else momentum * buffer + grad
            w = w - lr * buffer
        return w

    def fixed_points(self, lr):
        """Plain GD: y_i = o_i + M_i (x - o_i), M_i = (I - lr H_i)^tau_i. FedAvg's fixed point solves
        sum p_i (I - M_i)(x - o_i) = 0, FedNova's sum p_i (I - M_i)(x - o_i) / tau_i = 0."""
        eye = np.eye(self.d)
        B = [eye - np.linalg.matrix_power(eye - lr * h, t) for h, t in zip(self.H, self.steps)]
        o = [np.linalg.solve(h, g) for h, g in zip(self.H, self.g)]
        solve = lambda w: np.linalg.solve(sum(wi * b for wi, b in zip(w, B)),  # noqa: E731
                                          sum(wi * b @ oi for wi, b, oi in zip(w, B, o)))
        return solve(self.p), solve(self.p / np.array(self.steps))


def train(strategy, problem, lr, momentum, rounds):
    state = {"w": torch.zeros(problem.d, dtype=torch.float64), "n": torch.tensor(7)}
    objective = LocalObjective(lr=lr, batch_size=1000, momentum=momentum)
    for _ in range(rounds):
        updates = []
        for i, (n, steps) in enumerate(zip(problem.sizes, problem.steps)):
            y = problem.local_gd(i, state["w"].numpy(), lr, momentum)
            trained = ClientUpdate(i, {"w": torch.from_numpy(y), "n": state["n"]}, n, steps, 0.0, False)
            # full batch: finish_update counts tau_i = epochs * ceil(n / batch_size) = steps
            updates.append(finish_update(trained, ClientTask(i, torch.arange(n), steps, False, 0), objective, state))
        assert [u.num_steps for u in updates] == problem.steps
        state = strategy.aggregate(state, updates, RNG)
    assert int(state["n"]) == 7
    return state["w"].numpy()


def test_unequal_steps_fedavg_minimizes_the_tau_weighted_objective_fednova_the_true_one():
    """Clients doing 40, 10, 4 and 2 local steps: FedAvg converges to its fixed point, which lies near
    argmin sum_i (p_i tau_i) f_i (the surrogate of Wang et al. 2020, Theorem 1; 0.06 away at this lr) and
    2.2 from the true optimum argmin sum_i p_i f_i; FedNova converges to within 0.025 of the true optimum.
    With momentum 0.5 the same holds for the surrogate weights p_i ||a_i||_1, and normalizing by tau_i
    instead of the momentum norm is worse."""
    problem, lr = Quadratic(), 0.004
    true = problem.optimum(problem.p)
    surrogate = problem.optimum(problem.p * np.array(problem.steps))
    assert np.linalg.norm(true - surrogate) > 2.0
    fedavg_point, fednova_point = problem.fixed_points(lr)
    fedavg = train(FedAvg(), problem, lr, 0.0, 500)
    fednova = train(FedNova(), problem, lr, 0.0, 500)
    assert np.linalg.norm(fedavg - fedavg_point) < 1e-5 and np.linalg.norm(fednova - fednova_point) < 1e-5
    assert np.linalg.norm(fedavg - surrogate) < 0.07 and np.linalg.norm(fedavg - true) > 2.0
    assert np.linalg.norm(fednova - true) < 0.03

    rho = 0.5
    norms = np.array([unrolled_norm(t, rho) for t in problem.steps])
    surrogate = problem.optimum(problem.p * norms)
    fedavg = train(FedAvg(), problem, lr, rho, 300)
    fednova = train(FedNova(momentum=rho), problem, lr, rho, 300)
    plain_norms = train(FedNova(momentum=0.0), problem, lr, rho, 300)  # forgets the momentum
    assert np.linalg.norm(fedavg - surrogate) < 0.15 and np.linalg.norm(fedavg - true) > 2.0
    assert np.linalg.norm(fednova - true) < 0.05
    assert np.linalg.norm(plain_norms - true) > 2 * np.linalg.norm(fednova - true)


def test_from_config_and_refusals():
    config = ExperimentConfig().with_overrides({"strategy.name": "fednova", "training.momentum": 0.9})
    strategy = build_strategy(config)
    assert isinstance(strategy, FedNova) and strategy.momentum == 0.9 and strategy.keeps_partial_work
    assert strategy.accepts(ClientTask(1, torch.arange(3), 1, True, 0))
    objective = strategy.local_objective(config.training, 3)
    assert objective.momentum == 0.9 and not objective.control_variates and objective.proximal_mu == 0
    with pytest.raises(ValueError, match=r"training\.momentum=0\.0 but this FedNova normalises for momentum 0\.9"):
        strategy.local_objective(TrainingConfig(), 1)
    with pytest.raises(ValueError, match=r"training\.momentum must be in \[0, 1\)"):
        FedNova(momentum=1.0)
    with pytest.raises(ValueError, match=r"got 0 \(client\.finish_update sets it"):
        strategy.aggregate(GLOBAL, updates_of(VALUES, SIZES, [3, 0, 2]), RNG)
    assert strategy.state_dict() == {}
    with pytest.raises(ValueError, match="keeps no state"):
        strategy.load_state_dict({"server.c.w": torch.zeros(1)})


class KeepModels(Callback):
    def __init__(self):
        self.models = []

    def on_round_end(self, result, federation):
        self.models.append({k: v.clone() for k, v in federation.model.state_dict().items()})


def test_fednova_run_with_stragglers_learns_and_is_deterministic(tiny_config):
    """Half the sampled clients straggle (1 of 2 epochs); FedNova keeps their work, normalized."""
    config = tiny_config.with_overrides({"strategy.name": "fednova", "execution.executor": "sequential",
                                         "federation.straggler_fraction": 0.5, "federation.rounds": 4,
                                         "training.momentum": 0.5})
    first, again = KeepModels(), KeepModels()
    history, repeat = run(config, [first]), run(config, [again])
    for result in history.rounds:
        assert result.metrics["num_updates"] == config.federation.clients_per_round and len(result.stragglers) == 2
        steps = {c: m["num_steps"] for c, m in result.client_metrics.items()}
        assert min(steps[c] for c in result.stragglers) < max(steps.values())
    assert history.final()["test_accuracy"] > 0.3  # 10 classes: chance is 0.1
    losses = [v for _, v in history.metric("train_loss")]
    assert losses[-1] < losses[0]
    for a, b in zip(history.rounds, repeat.rounds):
        assert {k: v for k, v in a.metrics.items() if k != "round_time_s"} == \
               {k: v for k, v in b.metrics.items() if k != "round_time_s"}
    for a, b in zip(first.models, again.models):
        assert all(torch.equal(a[k], b[k]) for k in a)

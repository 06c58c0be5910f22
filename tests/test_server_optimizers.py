"""Server optimizers (FedAvgM; FedAdagrad, FedYogi, FedAdam of Reddi et al., ICLR 2021, Algorithm 2): the
update equations against a numpy re-implementation, their limits (FedAvg), Yogi's bounded change, the absence
of bias correction, state round trips, dtypes, and end-to-end runs."""

import math

import numpy as np
import pytest
import torch

from workbench.client import ClientTask, ClientUpdate
from workbench.config import ExperimentConfig
from workbench.simulation import evaluate, prepare, run
from workbench.strategies import FedAvg, build_strategy
from workbench.strategies.server_optimizers import FedAdagrad, FedAdam, FedAvgM, FedYogi

RNG = np.random.default_rng(0)
SIZES = (30, 10)  # unequal clients: p = (3/4, 1/4)

#: per round, the two clients' offsets from the global model: magnitudes that shrink in some coordinates
#: and grow in others, with sign changes, so that Yogi's sign(v - Delta^2) takes both values
OFFSETS = [
    (np.array([1.0, -0.5, 0.02, 0.3]), np.array([-0.2, 0.7, 0.04, 0.1])),
    (np.array([0.1, 0.6, -0.3, 0.01]), np.array([0.3, -0.4, 0.8, -0.05])),
    (np.array([-0.01, -0.2, 0.05, 1.5]), np.array([0.02, 0.3, -0.1, 0.5])),
]
BIAS_OFFSETS = [(np.array([0.5]), np.array([-1.0])), (np.array([-0.1]), np.array([0.2])),
                (np.array([0.03]), np.array([0.3]))]


def model_state(w, b, dtype=torch.float64, steps=7):
    return {"w": torch.tensor(w, dtype=dtype), "b": torch.tensor(b, dtype=dtype), "steps": torch.tensor(steps)}


def client_updates(global_state, round_index, dtype=torch.float64):
    """The two unequal clients' updates of round `round_index` (0-based) around `global_state`; each sends a
    different integer buffer, which must not leak into the global model."""
    updates = []
    for i, n in enumerate(SIZES):
        w = global_state["w"].numpy() + OFFSETS[round_index][i]
        b = global_state["b"].numpy() + BIAS_OFFSETS[round_index][i]
        updates.append(ClientUpdate(i, model_state(w, b, dtype, steps=100 + i), n, 2, 0.0, False))
    return updates


def pseudo_gradient(round_index):
    """Delta_t = sum_i n_i (y_i - x_t) / sum_i n_i, by hand: the offsets are y_i - x_t."""
    n = np.array(SIZES, dtype=np.float64)
    dw = sum(n[i] * OFFSETS[round_index][i] for i in range(2)) / n.sum()
    db = sum(n[i] * BIAS_OFFSETS[round_index][i] for i in range(2)) / n.sum()
    return {"w": dw, "b": db}


def numpy_reference(method, x0, num_rounds, *, eta=0.0, beta1=0.0, beta2=0.0, tau=0.0, beta=0.0, server_lr=0.0):
    """Reddi et al. 2021, Algorithm 2 (and FedAvgM, Hsu et al. 2019), written out in numpy: the global
    models after each round and the final moments."""
    x = {k: np.array(v, dtype=np.float64) for k, v in x0.items()}
    m = {k: np.zeros_like(v) for k, v in x.items()}
    v = {k: np.full_like(val, tau ** 2) for k, val in x.items()}
    models = []
    for t in range(num_rounds):
        delta = pseudo_gradient(t)
        for k in x:
            d = delta[k]
            if method == "fedavgm":
                m[k] = beta * m[k] + d
                x[k] = x[k] + server_lr * m[k]
                continue
            m[k] = beta1 * m[k] + (1 - beta1) * d
            if method == "fedadagrad":
                v[k] = v[k] + d ** 2
            elif method == "fedyogi":
                v[k] = v[k] - (1 - beta2) * d ** 2 * np.sign(v[k] - d ** 2)
            else:
                v[k] = beta2 * v[k] + (1 - beta2) * d ** 2
            x[k] = x[k] + eta * m[k] / (np.sqrt(v[k]) + tau)
        models.append({k: val.copy() for k, val in x.items()})
    return models, m, v


X0 = {"w": [0.5, -1.0, 2.0, 0.0], "b": [0.25]}
KNOBS = dict(adaptive_lr=0.3, beta1=0.6, beta2=0.5, tau=0.05)


def build(method, **knobs):
    return {"fedavgm": FedAvgM, "fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad}[method](**knobs)


def run_rounds(strategy, state, rounds, dtype=torch.float64):
    models = []
    for t in rounds:
        state = strategy.aggregate(state, client_updates(state, t, dtype), RNG)
        models.append(state)
    return models


@pytest.mark.parametrize("method", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_update_equations_match_numpy_over_three_rounds(method):
    strategy = build(method, **KNOBS)
    models = run_rounds(strategy, model_state(*X0.values()), range(3))
    expected, m, v = numpy_reference(method, X0, 3, eta=0.3, beta1=0.6, beta2=0.5, tau=0.05)
    for got, want in zip(models, expected):
        for k in ("w", "b"):
            np.testing.assert_allclose(got[k].numpy(), want[k], rtol=1e-12, atol=1e-14)
        assert int(got["steps"]) == 7  # the integer buffer keeps the global model's value
    saved = strategy.state_dict()
    assert set(saved) == {"server.m.w", "server.m.b", "server.v.w", "server.v.b"}
    for k in ("w", "b"):
        np.testing.assert_allclose(saved[f"server.m.{k}"].numpy(), m[k], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(saved[f"server.v.{k}"].numpy(), v[k], rtol=1e-12, atol=1e-15)


def test_fedavgm_update_equations_match_numpy_over_three_rounds():
    strategy = FedAvgM(server_momentum=0.7, server_lr=0.8)
    models = run_rounds(strategy, model_state(*X0.values()), range(3))
    expected, m, _ = numpy_reference("fedavgm", X0, 3, beta=0.7, server_lr=0.8)
    for got, want in zip(models, expected):
        for k in ("w", "b"):
            np.testing.assert_allclose(got[k].numpy(), want[k], rtol=1e-12, atol=1e-14)
        assert int(got["steps"]) == 7
    saved = strategy.state_dict()
    assert set(saved) == {"server.m.w", "server.m.b"}
    np.testing.assert_allclose(saved["server.m.w"].numpy(), m["w"], rtol=1e-12)
    # by hand, coordinate 0 of w: Delta = (0.7, 0.15, -0.0025); buffer 0.7, 0.64, 0.4455; x moves 0.8 x buffer
    assert math.isclose(float(models[-1]["w"][0]), 0.5 + 0.8 * (0.7 + 0.64 + 0.4455), rel_tol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fedavgm_without_momentum_and_unit_lr_is_fedavg(dtype):
    fedavgm, fedavg = FedAvgM(server_momentum=0.0, server_lr=1.0), FedAvg()
    state = model_state(*X0.values(), dtype=dtype)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6
    for t in range(3):  # also after rounds, where a nonzero buffer would show
        updates = client_updates(state, t, dtype)
        got, want = fedavgm.aggregate(state, updates, RNG), fedavg.aggregate(state, updates, RNG)
        for k in ("w", "b"):
            assert got[k].dtype == dtype
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=tolerance)
        state = got


def test_fedadam_with_large_tau_and_eta_equals_tau_is_fedavg():
    """beta1 = 0, beta2 = 0, eta = tau -> infinity: the step tau Delta / (|Delta| + tau) -> Delta, FedAvg's.
    With beta2 > 0 the same limit is Delta / (1 + sqrt(beta2)) (v ~ beta2 tau^2), pinned below."""
    fedadam, fedavg = FedAdam(adaptive_lr=1e6, beta1=0.0, beta2=0.0, tau=1e6), FedAvg()
    state = model_state(*X0.values())
    for t in range(3):
        updates = client_updates(state, t)
        got, want = fedadam.aggregate(state, updates, RNG), fedavg.aggregate(state, updates, RNG)
        for k in ("w", "b"):
            step, fedavg_step = (got[k] - state[k]).numpy(), (want[k] - state[k]).numpy()
            np.testing.assert_allclose(step, fedavg_step, rtol=1e-5)
        state = got
    # the same limit with beta2 = 0.99: the first step is Delta / (1 + sqrt(0.99))
    first = FedAdam(adaptive_lr=1e6, beta1=0.0, beta2=0.99, tau=1e6)
    state = model_state(*X0.values())
    got = first.aggregate(state, client_updates(state, 0), RNG)
    np.testing.assert_allclose((got["w"] - state["w"]).numpy(), pseudo_gradient(0)["w"] / (1 + math.sqrt(0.99)),
                               rtol=1e-5)


def test_fedadam_has_no_bias_correction():
    """First step: eta (1 - beta1) Delta / (sqrt((1 - beta2) Delta^2 + beta2 tau^2) + tau). Adam's bias
    correction (Flower's FedAdam) divides m by 1 - beta1 and v by 1 - beta2, which gives about
    eta Delta / (|Delta| + tau) instead. (beta1, beta2) = (0.9, 0.99) would hide the difference, since
    (1 - beta1) / sqrt(1 - beta2) = 1 there; (0.5, 0.9) shows it."""
    eta, beta1, beta2, tau = 0.1, 0.5, 0.9, 0.01
    strategy = FedAdam(adaptive_lr=eta, beta1=beta1, beta2=beta2, tau=tau)
    state = model_state(*X0.values())
    got = strategy.aggregate(state, client_updates(state, 0), RNG)
    delta = (30 * 1.0 + 10 * -0.2) / 40  # coordinate 0 of w: 0.7
    expected_move = eta * (1 - beta1) * delta / (math.sqrt((1 - beta2) * delta ** 2 + beta2 * tau ** 2) + tau)
    assert math.isclose(expected_move, 0.035 / (math.sqrt(0.04900 + 0.00009) + 0.01), rel_tol=1e-12)
    assert math.isclose(expected_move, 0.1511470, rel_tol=1e-6)  # by hand: 0.035 / (0.2215626 + 0.01)
    assert math.isclose(float(got["w"][0]) - 0.5, expected_move, rel_tol=1e-12)
    bias_corrected = eta * delta / (abs(delta) + tau)  # 0.0986
    assert float(got["w"][0]) - 0.5 > 1.5 * bias_corrected


def test_fedyogi_second_moment_moves_by_at_most_its_bound_and_differs_from_fedadam():
    yogi, adam = FedYogi(**KNOBS), FedAdam(**KNOBS)
    beta2, tau = KNOBS["beta2"], KNOBS["tau"]
    state_yogi = state_adam = model_state(*X0.values())
    v_before = np.full(4, tau ** 2)
    signs = set()
    for t in range(3):
        state_yogi = yogi.aggregate(state_yogi, client_updates(state_yogi, t), RNG)
        state_adam = adam.aggregate(state_adam, client_updates(state_adam, t), RNG)
        v_yogi, v_adam = yogi.state_dict()["server.v.w"].numpy(), adam.state_dict()["server.v.w"].numpy()
        bound = (1 - beta2) * pseudo_gradient(t)["w"] ** 2
        change = v_yogi - v_before
        assert np.all(np.abs(change) <= bound * (1 + 1e-12))
        assert np.all(v_yogi > 0)
        signs |= set(np.sign(change).tolist())
        assert not np.allclose(v_yogi, v_adam)
        v_before = v_yogi
    assert signs == {-1.0, 1.0}  # v grew in some coordinates and shrank in others
    assert not torch.allclose(state_yogi["w"], state_adam["w"])


@pytest.mark.parametrize("method", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_state_round_trip_mid_sequence_continues_bit_identically(method):
    knobs = dict(server_momentum=0.7, server_lr=0.8) if method == "fedavgm" else KNOBS
    uninterrupted = build(method, **knobs)
    assert uninterrupted.state_dict() == {}
    expected = run_rounds(uninterrupted, model_state(*X0.values()), range(3))

    first = build(method, **knobs)
    after_one = run_rounds(first, model_state(*X0.values()), range(1))[-1]
    saved = first.state_dict()
    assert all(t.device.type == "cpu" for t in saved.values())
    resumed = build(method, **knobs)
    resumed.load_state_dict(saved)
    again = resumed.state_dict()
    assert set(again) == set(saved) and all(torch.equal(again[k], saved[k]) for k in saved)
    for k in saved:  # the strategy keeps its own copy
        saved[k].add_(1.0)
    continued = run_rounds(resumed, after_one, range(1, 3))
    for got, want in zip(continued, expected[1:]):
        assert all(torch.equal(got[k], want[k]) for k in want)
    final = uninterrupted.state_dict()
    assert all(torch.equal(resumed.state_dict()[k], final[k]) for k in final)


@pytest.mark.parametrize("method", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_round_without_updates_changes_neither_model_nor_moments(method):
    strategy = build(method)
    state = model_state(*X0.values())
    assert all(torch.equal(v, state[k]) for k, v in strategy.aggregate(state, [], RNG).items())
    assert strategy.state_dict() == {}
    after = strategy.aggregate(state, client_updates(state, 0), RNG)
    before = strategy.state_dict()
    same = strategy.aggregate(after, [], RNG)
    assert all(torch.equal(same[k], after[k]) for k in after)
    assert all(torch.equal(strategy.state_dict()[k], before[k]) for k in before)


@pytest.mark.parametrize("method", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_dtypes_shapes_and_integer_buffers_are_preserved(method):
    strategy = build(method)
    state = {"w": torch.zeros(2, 3, dtype=torch.float64), "h": torch.zeros(3, dtype=torch.float32),
             "steps": torch.tensor(5)}
    updates = [ClientUpdate(i, {"w": torch.full((2, 3), float(i + 1), dtype=torch.float64),
                                "h": torch.full((3,), -float(i + 1)), "steps": torch.tensor(50 + i)},
                            n, 1, 0.0, False) for i, n in enumerate(SIZES)]
    out = strategy.aggregate(state, updates, RNG)
    assert out["w"].dtype == torch.float64 and out["w"].shape == (2, 3)
    assert out["h"].dtype == torch.float32 and out["h"].shape == (3,)
    assert out["steps"].dtype == torch.int64 and int(out["steps"]) == 5
    assert bool((out["w"] > 0).all()) and bool((out["h"] < 0).all())  # moved along Delta
    saved = strategy.state_dict()
    assert "server.m.steps" not in saved and saved["server.m.w"].dtype == torch.float64
    assert saved["server.m.h"].dtype == torch.float32


def test_registry_knobs_stragglers_and_objective():
    config = ExperimentConfig().with_overrides({
        "strategy.adaptive_lr": 0.2, "strategy.beta1": 0.5, "strategy.beta2": 0.9, "strategy.tau": 0.01,
        "strategy.server_momentum": 0.6, "strategy.server_lr": 0.7})
    for name, cls in [("fedavgm", FedAvgM), ("fedadam", FedAdam), ("fedyogi", FedYogi), ("fedadagrad", FedAdagrad)]:
        strategy = build_strategy(config.with_overrides({"strategy.name": name}))
        assert type(strategy) is cls and strategy.name == name and not strategy.keeps_partial_work
        assert not strategy.accepts(ClientTask(1, torch.arange(3), 1, True, 0))
        assert strategy.accepts(ClientTask(1, torch.arange(3), 2, False, 0))
        assert strategy.local_objective(config.training, 2) == FedAvg().local_objective(config.training, 2)
        if name == "fedavgm":
            assert (strategy.server_momentum, strategy.server_lr) == (0.6, 0.7)
        else:
            assert (strategy.adaptive_lr, strategy.beta1, strategy.beta2, strategy.tau) == (0.2, 0.5, 0.9, 0.01)


def test_bad_knobs_and_foreign_state_are_refused_with_the_knob_named():
    with pytest.raises(ValueError, match=r"^strategy\.tau must be > 0, got 0\.0 \("):
        FedAdam(tau=0.0)
    with pytest.raises(ValueError, match=r"^strategy\.beta1 must be >= 0 and < 1, got 1\.0 \("):
        FedYogi(beta1=1.0)
    with pytest.raises(ValueError, match=r"^strategy\.server_momentum must be >= 0 and < 1, got -0\.1 \("):
        FedAvgM(server_momentum=-0.1)
    with pytest.raises(ValueError, match=r"checkpoint holds \['client\.3\.c_i\.w'\]"):
        FedAdam().load_state_dict({"client.3.c_i.w": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"server\.m\.<name> and server\.v\.<name> for the same tensors"):
        FedAdagrad().load_state_dict({"server.m.w": torch.zeros(1)})
    strategy = FedAdam()
    strategy.load_state_dict({"server.m.other": torch.zeros(1), "server.v.other": torch.ones(1)})
    with pytest.raises(ValueError, match=r"missing \['b', 'w'\], unknown \['other'\]"):
        strategy.aggregate(model_state(*X0.values()), client_updates(model_state(*X0.values()), 0), RNG)


# ----- end to end -----

END_TO_END = {
    "fedavgm": {},
    "fedadam": {},
    "fedyogi": {},
    "fedadagrad": {"strategy.adaptive_lr": 0.1},
}


def run_config(config):
    federation = prepare(config)
    data = federation.dataset
    initial = evaluate(federation.model, data.x_test, data.y_test)
    history = run(federation)
    return initial, history, {k: v.clone() for k, v in federation.model.state_dict().items()}


@pytest.mark.parametrize("method", sorted(END_TO_END))
def test_end_to_end_run_learns_and_is_deterministic(tiny_config, method):
    config = tiny_config.with_overrides({"strategy.name": method, "execution.executor": "sequential",
                                         "federation.rounds": 4, **END_TO_END[method]})
    initial, history, model = run_config(config)
    final = history.final()
    assert history.status == "FINISHED" and len(history.rounds) == 4
    assert final["test_loss"] < 0.8 * initial.loss
    assert final["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
    _, again, model_again = run_config(config)
    assert all(torch.equal(model[k], model_again[k]) for k in model)
    strip = lambda h: [{k: v for k, v in r.metrics.items() if k != "round_time_s"} for r in h.rounds]  # noqa: E731
    assert strip(history) == strip(again)


def test_end_to_end_fedavgm_without_momentum_is_fedavg(tiny_config):
    base = tiny_config.with_overrides({"execution.executor": "sequential"})
    _, fedavg_history, fedavg_model = run_config(base.with_overrides({"strategy.name": "fedavg"}))
    _, history, model = run_config(base.with_overrides({
        "strategy.name": "fedavgm", "strategy.server_momentum": 0.0, "strategy.server_lr": 1.0}))
    assert len(history.rounds) == 3
    for k in fedavg_model:
        torch.testing.assert_close(model[k], fedavg_model[k], rtol=0, atol=1e-6)
    assert math.isclose(history.final()["test_loss"], fedavg_history.final()["test_loss"], rel_tol=1e-5)


def test_end_to_end_resume_after_round_one_is_bit_identical(tiny_config):
    """A run resumed from round 1's model and `state_dict()` ends where the uninterrupted run ends."""
    config = tiny_config.with_overrides({"strategy.name": "fedyogi", "execution.executor": "sequential",
                                         "strategy.adaptive_lr": 0.05})
    _, _, uninterrupted = run_config(config)
    first = prepare(config.with_overrides({"federation.rounds": 1}))
    run(first)
    saved = first.strategy.state_dict()
    assert saved and all(k.startswith(("server.m.", "server.v.")) for k in saved)
    resumed = prepare(config)
    resumed.model.load_state_dict(first.model.state_dict())
    history = run(resumed, start_round=2, strategy_state=saved)
    assert [r.round for r in history.rounds] == [2, 3]
    final = resumed.model.state_dict()
    assert all(torch.equal(final[k], uninterrupted[k]) for k in uninterrupted)

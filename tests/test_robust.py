"""Robust aggregation (median, trimmed mean, Krum, Multi-Krum): the defining property of each method against
independent numpy computations on unequal clients, their refusals, and robustness to attackers in a run."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.stats
import torch

from workbench.client import ClientTask, ClientUpdate
from workbench.config import ExperimentConfig
from workbench.simulation import prepare, run
from workbench.strategies import build_strategy
from workbench.strategies.robust import (Krum, Median, MultiKrum, TrimmedMean, check_trim_fraction,
                                         coordinate_median, coordinate_trimmed_mean, flattened_updates,
                                         krum_scores)

RNG = np.random.default_rng(0)
ROBUST = {"median": Median(), "trimmed_mean": TrimmedMean(trim_fraction=0.2), "krum": Krum(num_byzantine=1),
          "multi_krum": MultiKrum(num_byzantine=1)}


def global_state() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(2, 3), "b": torch.zeros(3, dtype=torch.float64), "steps": torch.tensor(7)}


def make_update(client: int, w: np.ndarray, b: np.ndarray, num_samples: int, steps: int = 100) -> ClientUpdate:
    return ClientUpdate(client, {"w": torch.tensor(w, dtype=torch.float32), "b": torch.tensor(b, dtype=torch.float64),
                                 "steps": torch.tensor(steps)}, num_samples, 1, 0.0, False)


def random_updates(n: int, rng: np.random.Generator) -> list[ClientUpdate]:
    """n updates of unequal values, unequal sample counts and client ids that are not their positions."""
    return [make_update(10 + 3 * i, rng.normal(size=(2, 3)), rng.normal(size=3), int(rng.integers(1, 500)), i)
            for i in range(n)]


def as_numpy(updates, key) -> np.ndarray:
    return np.stack([u.state[key].double().numpy() for u in updates])


# ----- conformance: every robust strategy -----


@pytest.mark.parametrize("name", list(ROBUST))
def test_conformance(name):
    """Identical updates (unequal sample counts) give exactly that update; integer buffers keep the global
    value; dtypes and shapes are kept; no updates keep the global model; no state; stragglers are dropped."""
    strategy = ROBUST[name]
    w, b = RNG.normal(size=(2, 3)), RNG.normal(size=3)
    same = [make_update(c, w, b, n, steps=c) for c, n in zip(range(5), (3, 50, 7, 120, 1))]
    out = strategy.aggregate(global_state(), same, RNG)
    assert torch.equal(out["w"], same[0].state["w"]) and torch.equal(out["b"], same[0].state["b"])
    assert out["w"].dtype == torch.float32 and out["b"].dtype == torch.float64 and out["w"].shape == (2, 3)
    assert out["steps"].dtype == torch.int64 and int(out["steps"]) == 7
    empty = strategy.aggregate(global_state(), [], RNG)
    assert all(torch.equal(empty[k], v) for k, v in global_state().items())
    assert strategy.state_dict() == {}
    strategy.load_state_dict({})
    assert not strategy.keeps_partial_work
    assert not strategy.accepts(ClientTask(1, torch.arange(3), 1, True, 0))
    assert strategy.accepts(ClientTask(1, torch.arange(3), 2, False, 0))


@pytest.mark.parametrize("name", list(ROBUST))
def test_build_from_config(name):
    config = ExperimentConfig().with_overrides({"strategy.name": name, "strategy.trim_fraction": 0.3,
                                                "strategy.num_byzantine": 3, "strategy.num_selected": 4})
    strategy = build_strategy(config)
    assert strategy.name == name
    expected = {"median": Median(), "trimmed_mean": TrimmedMean(0.3), "krum": Krum(num_byzantine=3),
                "multi_krum": MultiKrum(num_byzantine=3, num_selected=4)}[name]
    assert strategy == expected


# ----- median and trimmed mean (Yin et al. 2018) -----


@pytest.mark.parametrize("n", [5, 6])
def test_median_is_numpy_s_unweighted_median_odd_and_even(n):
    """Odd n: the middle value; even n: the mean of the two middle values (numpy's definition); sample
    counts (unequal) play no part."""
    updates = random_updates(n, RNG)
    out = Median().aggregate(global_state(), updates, RNG)
    for key in ("w", "b"):
        expected = np.median(as_numpy(updates, key), axis=0)
        np.testing.assert_allclose(out[key].double().numpy(), expected, rtol=1e-6 if key == "w" else 1e-15)
    # by hand, for one coordinate of the even case: the two middle of sorted values averaged
    values = np.sort(as_numpy(updates, "b")[:, 0])
    by_hand = values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2
    assert float(out["b"][0]) == pytest.approx(by_hand, abs=1e-15)


def test_coordinate_median_by_hand():
    values = torch.tensor([[1.0, 10.0], [4.0, -2.0], [3.0, 5.0], [100.0, 0.0]], dtype=torch.float64)
    assert coordinate_median(values).tolist() == [3.5, 2.5]  # (3 + 4) / 2 and (0 + 5) / 2
    assert coordinate_median(values[:3]).tolist() == [3.0, 5.0]


def with_outliers(rng: np.random.Generator, num_honest: int, num_outliers: int):
    """Honest updates near one model, and outliers far away in every coordinate, mixed in at random places."""
    honest = random_updates(num_honest, rng)
    outliers = [make_update(900 + i, rng.choice([1e6, -1e9], size=(2, 3)), rng.choice([1e6, -1e9], size=3),
                            int(rng.integers(1, 10_000)), 0) for i in range(num_outliers)]
    mixed = honest + outliers
    order = rng.permutation(len(mixed))
    return honest, [mixed[i] for i in order]


@pytest.mark.parametrize("seed", range(5))
def test_median_and_trimmed_mean_ignore_a_minority_of_outliers(seed):
    """3 of 10 updates at 1e6 / -1e9: the median and the 0.3-trimmed mean stay within the honest values'
    range, coordinate by coordinate, and equal numpy's median and scipy's trimmed mean of all 10."""
    rng = np.random.default_rng(seed)
    honest, mixed = with_outliers(rng, 7, 3)
    median = Median().aggregate(global_state(), mixed, rng)
    trimmed = TrimmedMean(trim_fraction=0.3).aggregate(global_state(), mixed, rng)
    for key in ("w", "b"):
        low, high = as_numpy(honest, key).min(axis=0), as_numpy(honest, key).max(axis=0)
        for out in (median, trimmed):
            got = out[key].double().numpy()
            assert np.all(got >= low - 1e-6) and np.all(got <= high + 1e-6)
        values = as_numpy(mixed, key)
        tol = dict(rtol=1e-6, atol=1e-6) if key == "w" else dict(rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(median[key].double().numpy(), np.median(values, axis=0), **tol)
        np.testing.assert_allclose(trimmed[key].double().numpy(), scipy.stats.trim_mean(values, 0.3, axis=0), **tol)


@pytest.mark.parametrize("n, beta, dropped", [(7, 0.2, 1), (10, 0.2, 2), (10, 0.25, 2), (4, 0.2, 0)])
def test_trimmed_mean_drops_floor_beta_n_at_each_end(n, beta, dropped):
    """floor(beta n) per side, against numpy sort-and-slice; with none dropped it is the unweighted mean
    (not FedAvg's sample-weighted one: the sample counts are unequal)."""
    updates = random_updates(n, RNG)
    strategy = TrimmedMean(trim_fraction=beta)
    out = strategy.aggregate(global_state(), updates, RNG)
    values = np.sort(as_numpy(updates, "b"), axis=0)
    expected = values[dropped:n - dropped].mean(axis=0)
    np.testing.assert_allclose(out["b"].numpy(), expected, rtol=1e-13)
    assert strategy.round_metrics() == {"trimmed_per_side": float(dropped)}
    if dropped == 0:
        weighted = np.average(as_numpy(updates, "b"), axis=0, weights=[u.num_samples for u in updates])
        assert not np.allclose(out["b"].numpy(), weighted)


def test_trimmed_mean_refuses_a_fraction_that_leaves_nothing():
    """2 floor(beta K) >= K is refused naming both knobs. The config's range (trim_fraction < 0.5) already
    makes it impossible from a config, so the rule is pinned on the function `from_config` calls."""
    with pytest.raises(ValueError, match=r"strategy\.trim_fraction=0\.5 with federation\.clients_per_round=4 "
                                         r"drops 2 \* floor\(beta K\) = 4 of 4"):
        check_trim_fraction(0.5, 4)
    check_trim_fraction(0.49, 4)
    with pytest.raises(ValueError, match=r"strategy\.trim_fraction must be >= 0 and < 0\.5, got 0\.6"):
        TrimmedMean(trim_fraction=0.6)
    with pytest.raises(ValueError, match="leaving none"):
        coordinate_trimmed_mean(torch.zeros(2, 3), 0.5)


# ----- Krum and Multi-Krum (Blanchard et al. 2017) -----


def brute_force_scores(updates, f: int) -> np.ndarray:
    """score(i) = sum of the n - f - 2 smallest ||V_i - V_j||^2, j != i, over the float tensors only."""
    vectors = [np.concatenate([u.state[k].double().numpy().ravel() for k in ("w", "b")]) for u in updates]
    n = len(vectors)
    scores = []
    for i in range(n):
        distances = sorted(float(np.sum((vectors[i] - vectors[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(distances[:n - f - 2]))
    return np.array(scores)


@pytest.mark.parametrize("n, f", [(5, 1), (7, 2), (9, 3), (4, 0)])
def test_krum_scores_match_brute_force(n, f):
    """On unequal vectors (the integer buffer differs between updates and must be ignored)."""
    updates = random_updates(n, RNG)
    scores = krum_scores(flattened_updates(global_state(), updates), f)
    np.testing.assert_allclose(scores.numpy(), brute_force_scores(updates, f), rtol=1e-12)


@pytest.mark.parametrize("n, f, m", [(7, 2, 1), (7, 2, 3), (7, 2, 0), (10, 3, 4)])
def test_krum_and_multi_krum_average_the_best_scored(n, f, m):
    """Krum returns the lowest-scored update itself and names its client; Multi-Krum the unweighted mean of
    the m lowest-scored (0 = n - f), computed here from the brute-force scores."""
    updates = random_updates(n, RNG)
    best = np.argsort(brute_force_scores(updates, f), kind="stable")[:m or n - f]
    strategy = MultiKrum(num_byzantine=f, num_selected=m)
    out = strategy.aggregate(global_state(), updates, RNG)
    for key in ("w", "b"):
        expected = as_numpy(updates, key)[best].mean(axis=0)
        np.testing.assert_allclose(out[key].double().numpy(), expected, rtol=1e-6 if key == "w" else 1e-13)
    assert int(out["steps"]) == 7
    assert strategy.round_metrics() == {"krum_fallback": 0.0, "krum_num_selected": float(len(best))}
    krum = Krum(num_byzantine=f)
    picked = krum.aggregate(global_state(), updates, RNG)
    winner = updates[int(np.argmin(brute_force_scores(updates, f)))]
    assert all(torch.equal(picked[k], winner.state[k]) for k in ("w", "b"))
    assert krum.round_metrics() == {"krum_fallback": 0.0, "krum_selected_client": float(winner.client)}


def test_multi_krum_with_one_selected_is_krum():
    for seed in range(10):
        rng = np.random.default_rng(seed)
        updates = random_updates(int(rng.integers(5, 12)), rng)
        one = MultiKrum(num_byzantine=1, num_selected=1).aggregate(global_state(), updates, rng)
        krum = Krum(num_byzantine=1).aggregate(global_state(), updates, rng)
        assert all(torch.equal(one[k], krum[k]) for k in one)


def test_krum_never_picks_an_outlier():
    """300 seeded draws of n >= 2f + 3 updates: n - f honest ones around a random model, f Byzantine ones of
    three kinds (far random points, a colluding cluster at one far point, the scaled sign-flipped honest
    mean). Krum's pick is always honest, and Multi-Krum's n - f are exactly the honest ones."""
    rng = np.random.default_rng(1234)
    kinds = ("random", "cluster", "sign_flip")
    for draw in range(300):
        f = int(rng.integers(0, 4))
        n = int(rng.integers(2 * f + 3, 2 * f + 8))
        center = rng.normal(size=9)
        vectors = [center + 0.1 * rng.normal(size=9) for _ in range(n - f)]
        kind = kinds[draw % 3]
        far = rng.normal(size=9) * 100
        for _ in range(f):
            vectors.append({"random": lambda: rng.normal(size=9) * 100, "cluster": lambda: far,
                            "sign_flip": lambda: -10 * center}[kind]())
        order = rng.permutation(n)
        updates = [make_update(int(c), vectors[i][:6].reshape(2, 3), vectors[i][6:], int(rng.integers(1, 99)))
                   for c, i in enumerate(order)]
        is_honest = [i < n - f for i in order]
        krum = Krum(num_byzantine=f)
        krum.aggregate(global_state(), updates, rng)
        assert is_honest[int(krum.round_metrics()["krum_selected_client"])], (draw, kind, n, f)
        chosen = MultiKrum(num_byzantine=f).select(global_state(), updates)
        assert sorted(chosen) == [p for p in range(n) if is_honest[p]], (draw, kind, n, f)


@pytest.mark.parametrize("strategy", [Krum(num_byzantine=2), MultiKrum(num_byzantine=2)], ids=["krum", "multi_krum"])
def test_krum_falls_back_to_the_median_when_too_few_updates_arrive(strategy):
    """Fewer than 2f + 3 = 7 accepted updates (stragglers dropped): the coordinate-wise median of the 6 that
    arrived, a RuntimeWarning that says so, and krum_fallback = 1 in the round metrics."""
    updates = random_updates(6, RNG)
    with pytest.warns(RuntimeWarning, match=r"only 6 updates arrived .* 2f \+ 3 = 7 .* coordinate-wise median"):
        out = strategy.aggregate(global_state(), updates, RNG)
    np.testing.assert_allclose(out["b"].numpy(), np.median(as_numpy(updates, "b"), axis=0), rtol=1e-15)
    assert strategy.round_metrics() == {"krum_fallback": 1.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        strategy.aggregate(global_state(), random_updates(7, RNG), RNG)
    assert strategy.round_metrics()["krum_fallback"] == 0.0


def test_krum_refuses_too_few_clients_per_round_at_preparation():
    config = ExperimentConfig().with_overrides({"strategy.name": "krum", "strategy.num_byzantine": 2,
                                                "federation.num_clients": 10, "federation.clients_per_round": 6})
    with pytest.raises(ValueError, match=r"federation\.clients_per_round=6 is too few for strategy\.name='krum'.*"
                                         r"needs at least 7 \(raise clients_per_round or lower "
                                         r"strategy\.num_byzantine\)"):
        prepare(config)
    build_strategy(config.with_overrides({"federation.clients_per_round": 7}))
    with pytest.raises(ValueError, match=r"strategy\.num_selected=6 is more than federation\.clients_per_round - "
                                         r"strategy\.num_byzantine = 7 - 2 = 5"):
        build_strategy(config.with_overrides({"strategy.name": "multi_krum", "federation.clients_per_round": 7,
                                              "strategy.num_selected": 6}))
    with pytest.raises(ValueError, match="Krum selects exactly one update"):
        Krum(num_byzantine=1, num_selected=2)


# ----- robustness in a run -----

#: 20 clients holding IID shares of the bundled digits, 10 sampled per round, logistic regression.
RUN = {"data.name": "digits", "partition.scheme": "iid", "model.name": "logreg", "federation.num_clients": 20,
       "federation.clients_per_round": 10, "federation.rounds": 10, "training.local_epochs": 2,
       "training.batch_size": 20, "training.lr": 0.2, "device": "cpu", "execution.executor": "sequential"}
ATTACK = {"attack.fraction": 0.2, "attack.kind": "sign_flip", "attack.scale": 10.0}


def test_robust_strategies_survive_sign_flipping_attackers_that_break_fedavg():
    """2 of 10 clients per round send w_g - 10 (w - w_g). Measured test accuracy after 10 rounds (seed 0):
    clean FedAvg 0.897, attacked FedAvg 0.103 (chance), median 0.891, trimmed mean (beta 0.2) 0.889,
    Krum (f 2) 0.886, Multi-Krum (f 2) 0.900. Krum never selects an attacker; the Krum run is bit-identical
    when repeated."""
    def final(**overrides):
        federation = prepare(ExperimentConfig().with_overrides({**RUN, **overrides}))
        history = run(federation)
        return history, federation.model.state_dict()

    clean = final()[0].final()["test_accuracy"]
    attacked = final(**ATTACK)[0].final()["test_accuracy"]
    accuracy = {name: final(**ATTACK, **{"strategy.name": name, **knobs})[0].final()["test_accuracy"]
                for name, knobs in {"median": {}, "trimmed_mean": {"strategy.trim_fraction": 0.2},
                                    "multi_krum": {"strategy.num_byzantine": 2}}.items()}
    krum_run = {**ATTACK, "strategy.name": "krum", "strategy.num_byzantine": 2}
    krum_history, krum_model = final(**krum_run)
    accuracy["krum"] = krum_history.final()["test_accuracy"]
    assert clean > 0.85
    assert attacked <= clean - 0.2
    for name, value in accuracy.items():
        assert value >= clean - 0.05, (name, value, clean)
    for result in krum_history.rounds:
        malicious = {c for c, row in result.client_metrics.items() if row["is_malicious"]}
        assert len(malicious) == 2 and result.metrics["krum_fallback"] == 0.0
        assert int(result.metrics["krum_selected_client"]) in set(result.sampled) - malicious
    again_history, again_model = final(**krum_run)
    assert all(torch.equal(krum_model[k], again_model[k]) for k in krum_model)
    strip = lambda h: [{k: v for k, v in r.metrics.items() if k != "round_time_s"} for r in h.rounds]  # noqa: E731
    assert strip(again_history) == strip(krum_history)

import copy
import threading
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from workbench.client import LocalObjective, train_locally
from workbench.config import ExperimentConfig
from workbench.execution import SequentialExecutor
from workbench.simulation import (STREAM_TRAINING, Callback, num_active_clients, prepare, run, sample_round,
                                  stream)
from workbench.strategies import build_strategy


def final_state(history_config):
    federation = prepare(history_config)
    history = run(federation)
    return federation.model.state_dict(), history


def test_fedprox_with_mu_zero_equals_fedavg(tiny_config):
    fedavg_state, fedavg = final_state(tiny_config)
    fedprox_state, fedprox = final_state(tiny_config.with_overrides({"strategy.name": "fedprox", "strategy.mu": 0}))
    for key in fedavg_state:
        assert torch.allclose(fedavg_state[key], fedprox_state[key], atol=1e-6, rtol=0)
    assert fedavg.final()["test_accuracy"] == pytest.approx(fedprox.final()["test_accuracy"], abs=1e-6)


def test_same_seed_same_numbers_other_seed_other_numbers(tiny_config):
    a_state, a = final_state(tiny_config)
    b_state, b = final_state(tiny_config)
    assert [r.metrics["test_loss"] for r in a.rounds] == [r.metrics["test_loss"] for r in b.rounds]
    assert all(torch.equal(a_state[k], b_state[k]) for k in a_state)
    c_state, _ = final_state(tiny_config.with_overrides({"seed": 1}))
    assert not all(torch.equal(a_state[k], c_state[k]) for k in a_state)


def test_algorithms_face_the_same_partition_clients_and_stragglers(tiny_config):
    config = tiny_config.with_overrides({"federation.straggler_fraction": 0.5, "partition.scheme": "dirichlet",
                                         "federation.rounds": 4})
    prox = config.with_overrides({"strategy.name": "fedprox"})
    fed_a, fed_b = prepare(config), prepare(prox)
    assert all(np.array_equal(x, y) for x, y in zip(fed_a.clients, fed_b.clients))
    history_a, history_b = run(fed_a), run(fed_b)
    for ra, rb in zip(history_a.rounds, history_b.rounds):
        assert ra.sampled == rb.sampled and ra.stragglers == rb.stragglers
        assert len(ra.stragglers) == 2
    # FedAvg drops stragglers, FedProx keeps their partial work
    assert history_a.rounds[0].metrics["num_updates"] == 2
    assert history_b.rounds[0].metrics["num_updates"] == 4


def test_stragglers_do_one_to_e_minus_one_epochs(tiny_config):
    config = tiny_config.with_overrides({"federation.straggler_fraction": 0.9, "training.local_epochs": 5,
                                         "federation.num_clients": 30, "federation.clients_per_round": 10})
    seen = set()
    for round_ in range(1, 30):
        sampled, stragglers = sample_round(config, round_)
        assert len(sampled) == 10 and len(set(sampled)) == 10 and len(stragglers) == 9
        assert set(stragglers) <= set(sampled.tolist())
        seen |= set(stragglers.values())
    assert seen == {1, 2, 3, 4}


def test_history_and_callbacks(tiny_config):
    events = []

    class Recorder(Callback):
        def on_run_start(self, federation):
            events.append("start")

        def on_round_end(self, result, federation):
            events.append(result.round)

        def on_run_end(self, history, federation, error):
            events.append(("end", history.status, error))

    config = tiny_config.with_overrides({"federation.rounds": 4, "evaluation.every": 3})
    history = run(config, [Recorder()])
    assert events == ["start", 1, 2, 3, 4, ("end", "FINISHED", None)]
    assert [r for r, _ in history.metric("test_accuracy")] == [3, 4]  # every 3rd and the last
    assert [r for r, _ in history.metric("train_loss")] == [3, 4]  # the global model's: evaluated
    assert [r for r, _ in history.metric("local_train_loss")] == [1, 2, 3, 4]  # the clients': every round
    assert history.rounds[0].client_accuracy == {} and history.rounds[0].client_train_loss == {}
    last = history.rounds[-1]
    assert set(last.client_accuracy) == set(last.client_train_loss) == set(range(8))
    assert 0 <= last.metrics["client_accuracy_min"] <= last.metrics["client_accuracy_median"] <= 1
    assert last.metrics["round_time_s"] > 0


def test_a_failing_round_ends_failed_and_keeps_history(tiny_config):
    class Boom(Callback):
        def on_round_end(self, result, federation):
            if result.round == 2:
                raise RuntimeError("boom")

        def on_run_end(self, history, federation, error):
            self.seen = (history.status, len(history.rounds), str(error))

    boom = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        run(tiny_config, [boom])
    assert boom.seen == ("FAILED", 2, "boom")


def test_divergence_is_reported_with_a_fix(tiny_config):
    config = tiny_config.with_overrides({"training.lr": 1e37, "model.name": "mlp"})
    with pytest.raises(FloatingPointError, match="lower training.lr"):
        run(config)


def test_learning_happens(tiny_config):
    history = run(tiny_config.with_overrides({"federation.rounds": 8, "data.name": "synthetic_iid"}))
    accuracy = [v for _, v in history.metric("test_accuracy")]
    assert accuracy[-1] > 0.5 and accuracy[-1] > accuracy[0]


@pytest.mark.parametrize("overrides, match", [
    ({"data.name": "digits", "partition.scheme": "natural"}, "partition.scheme='natural' needs a dataset with real "
     "clients"),
    ({"data.name": "mnist1d", "partition.scheme": "iid", "model.name": "cnn"}, "model.name='cnn' needs images"),
])
def test_prepare_rejects_impossible_combinations(tiny_config, overrides, match):
    with pytest.raises(ValueError, match=match):
        prepare(tiny_config.with_overrides(overrides))


def test_cuda_without_gpu_is_a_clear_error(tiny_config):
    if torch.cuda.is_available():
        assert prepare(tiny_config.with_overrides({"device": "cuda"})).device.type == "cuda"
    else:
        with pytest.raises(ValueError, match=r"^device='cuda' but no CUDA GPU is visible here "
                                             r"\(use device=auto or device=cpu\)$"):
            prepare(tiny_config.with_overrides({"device": "cuda"}))


def test_stop_ends_the_run_killed_after_finished_rounds(tiny_config):
    import threading

    stop = threading.Event()

    class StopAtTwo(Callback):
        def on_round_end(self, result, federation):
            if result.round == 2:
                stop.set()

        def on_run_end(self, history, federation, error):
            self.status = history.status

    watcher = StopAtTwo()
    history = run(tiny_config.with_overrides({"federation.rounds": 5}), [watcher], stop=stop)
    assert history.status == watcher.status == "KILLED"
    assert [r.round for r in history.rounds] == [1, 2]


def test_executor_checks_stop_before_every_client(tiny_config):
    import threading

    from workbench.execution import ClientTask, RunStopped, SequentialExecutor

    federation = prepare(tiny_config)
    stop = threading.Event()
    stop.set()
    task = ClientTask(0, torch.as_tensor(federation.clients[0]), 1, False, 0)
    with pytest.raises(RunStopped):
        SequentialExecutor(federation.model).run_cohort(
            federation.model.state_dict(), [task], federation.dataset.x_train, federation.dataset.y_train,
            LocalObjective(lr=0.1, batch_size=10), stop)


def test_threads_setting_applies_during_the_run_only(tiny_config):
    seen = []

    class Threads(Callback):
        def on_round_end(self, result, federation):
            seen.append(torch.get_num_threads())

    before = torch.get_num_threads()
    run(tiny_config.with_overrides({"execution.threads": 1, "federation.rounds": 1}), [Threads()])
    assert seen == [1] and torch.get_num_threads() == before


# ----- the numbers, pinned: recomputed independently on clients that differ -----

def digits_config(**overrides):
    """Real 8x8 digits, logistic regression, unequal label-skewed clients: a few seconds per run."""
    return ExperimentConfig().with_overrides({
        "data.name": "digits", "model.name": "logreg", "partition.scheme": "dirichlet", "partition.alpha": 0.3,
        "federation.num_clients": 12, "federation.clients_per_round": 4, "federation.rounds": 3,
        "training.local_epochs": 1, "training.batch_size": 10, "training.lr": 0.1, "device": "cpu",
        "execution.executor": "sequential", **overrides})


def local_update(federation, start, client, round_, num_epochs):
    """One client's update, trained alone from `start` with the seed the round loop gives it."""
    config = federation.config
    seed = int(stream(config.seed, STREAM_TRAINING, round_, client).integers(2**63))
    index = torch.as_tensor(federation.clients[client])
    state, _ = train_locally(copy.deepcopy(federation.model), start, federation.dataset.x_train[index], federation.dataset.y_train[index],
                             num_epochs=num_epochs, objective=LocalObjective(lr=config.training.lr, batch_size=config.training.batch_size, proximal_mu=0.0), generator=torch.Generator().manual_seed(seed))
    return state


def flat(state, start):
    return np.concatenate([(state[k].double() - start[k].double()).numpy().ravel() for k in start])


def test_aggregation_weights_follow_sample_counts_at_run_level():
    # Two clients of 10 and 90 samples: the new global model is 0.1 * w_0 + 0.9 * w_1, not the plain mean.
    config = digits_config(**{"partition.scheme": "iid", "federation.num_clients": 2,
                              "federation.clients_per_round": 2, "federation.rounds": 1})
    federation = prepare(config)
    order = np.random.default_rng(0).permutation(len(federation.dataset.y_train))
    federation.clients = [np.sort(order[:10]), np.sort(order[10:100])]
    start = {k: v.clone() for k, v in federation.model.state_dict().items()}
    history = run(federation, executor=SequentialExecutor(federation.model))
    states = [local_update(federation, start, k, 1, 1) for k in (0, 1)]
    expected = {k: 0.1 * states[0][k] + 0.9 * states[1][k] for k in start}
    uniform = {k: 0.5 * states[0][k] + 0.5 * states[1][k] for k in start}
    got = federation.model.state_dict()
    assert max(float((got[k] - expected[k]).abs().max()) for k in start) < 1e-6
    assert max(float((got[k] - uniform[k]).abs().max()) for k in start) > 1e-3  # the test can tell them apart
    # norms and drift: the cosine of each update to the 1:9 mean update, in float64
    deltas = [flat(s, start) for s in states]
    mean = 0.1 * deltas[0] + 0.9 * deltas[1]
    measured = history.rounds[0].client_metrics
    for k, delta in enumerate(deltas):
        assert measured[k]["update_norm"] == pytest.approx(np.linalg.norm(delta), rel=1e-5)
        cosine = delta @ mean / (np.linalg.norm(delta) * np.linalg.norm(mean))
        assert measured[k]["drift"] == pytest.approx(cosine, abs=1e-5)
    assert measured[1]["drift"] > measured[0]["drift"]  # the heavy client is closer to the mean


def test_fedavg_drops_and_fedprox_keeps_stragglers_partial_work_at_run_level():
    # 3 clients per round, half straggling: round(3 x 0.5) = 2 do all 3 epochs, 1 does 1 or 2 of them.
    config = digits_config(**{"partition.scheme": "quantity", "federation.num_clients": 3,
                              "federation.clients_per_round": 3, "federation.rounds": 1,
                              "federation.straggler_fraction": 0.5, "training.local_epochs": 3})
    sampled, stragglers = sample_round(config, 1)
    assert list(sampled) == [0, 1, 2] and len(stragglers) == 1
    (straggler, partial_epochs), = stragglers.items()
    results = {}
    for name in ("fedavg", "fedprox"):
        federation = prepare(config.with_overrides({"strategy.name": name, "strategy.mu": 0.0}))
        start = {k: v.clone() for k, v in federation.model.state_dict().items()}
        history = run(federation)
        results[name] = (federation, start, history)
    federation, start, history = results["fedavg"]
    sizes = [len(c) for c in federation.clients]
    assert len(set(sizes)) == 3  # unequal clients
    full = {k: local_update(federation, start, k, 1, 3) for k in (0, 1, 2) if k != straggler}
    partial = local_update(federation, start, straggler, 1, partial_epochs)
    kept = sum(sizes[k] for k in full)
    expected_avg = {key: sum(sizes[k] * s[key] for k, s in full.items()) / kept for key in start}
    everyone = {**full, straggler: partial}
    expected_prox = {key: sum(sizes[k] * s[key] for k, s in everyone.items()) / sum(sizes) for key in start}
    for name, expected, updates in (("fedavg", expected_avg, 2), ("fedprox", expected_prox, 3)):
        federation, _, history = results[name]
        got = federation.model.state_dict()
        assert max(float((got[k] - expected[k]).abs().max()) for k in start) < 1e-6, name
        assert history.rounds[0].metrics["num_updates"] == updates
        assert history.rounds[0].metrics["num_stragglers"] == 1
    assert max(float((expected_avg[k] - expected_prox[k]).abs().max()) for k in start) > 1e-3


@pytest.mark.parametrize("per_round, fraction", [(5, 0.5), (10, 0.9), (3, 0.5), (4, 0.9), (10, 0.0), (7, 1.0),
                                                 (10, 0.3)])
def test_active_clients_are_counted_as_the_fedprox_reference_does(per_round, fraction):
    # The reference (Li et al.'s code) keeps round(K * (1 - p)) active clients, Python's round: at K = 5,
    # p = 0.5 that is round(2.5) = 2 active and 3 stragglers, where round(p * K) stragglers would give 2.
    config = ExperimentConfig().with_overrides({
        "federation.num_clients": 12, "federation.clients_per_round": per_round,
        "federation.straggler_fraction": fraction, "training.local_epochs": 2})
    active = round(per_round * (1 - fraction))
    assert num_active_clients(config) == active
    for round_ in (1, 2, 3):
        sampled, stragglers = sample_round(config, round_)
        assert len(sampled) == per_round and len(stragglers) == per_round - active
    assert num_active_clients(config.with_overrides({"federation.clients_per_round": 5,
                                                     "federation.straggler_fraction": 0.5})) == 2


def test_a_run_that_can_never_get_an_update_warns_once_and_logs_zero_updates(tiny_config):
    import warnings

    config = tiny_config.with_overrides({"federation.straggler_fraction": 1.0, "federation.rounds": 3})
    federation = prepare(config)
    start = {k: v.clone() for k, v in federation.model.state_dict().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = run(federation)
    mine = [w for w in caught if "no round will receive an update" in str(w.message)]
    assert len(mine) == 1
    assert "federation.straggler_fraction=1" in str(mine[0].message) and "strategy.name=fedprox" in str(mine[0].message)
    assert [r.metrics["num_updates"] for r in history.rounds] == [0, 0, 0]
    assert all(torch.equal(federation.model.state_dict()[k], v) for k, v in start.items())
    with warnings.catch_warnings(record=True) as caught:  # FedProx keeps the partial work: nothing to say
        warnings.simplefilter("always")
        kept = run(config.with_overrides({"strategy.name": "fedprox"}))
    assert not [w for w in caught if "no round will receive" in str(w.message)]
    assert [r.metrics["num_updates"] for r in kept.rounds] == [4, 4, 4]


def test_train_loss_is_the_global_models_on_every_clients_training_data():
    # Li et al. 2020 (Fig. 1) plot the global model's loss on all devices' training data, sample-weighted;
    # the mean of the clients' local mini-batch losses is another number (`local_train_loss`).
    config = digits_config(**{"federation.straggler_fraction": 0.5, "training.local_epochs": 3,
                              "strategy.name": "fedprox"})
    federation = prepare(config)
    history = run(federation)
    model, data = federation.model.eval(), federation.dataset
    losses, correct, sizes = [], [], []
    with torch.no_grad():
        for indices in federation.clients:
            index = torch.as_tensor(indices)
            logits = model(data.x_train[index])
            losses.append(float(F.cross_entropy(logits, data.y_train[index], reduction="mean")))
            correct.append(float((logits.argmax(1) == data.y_train[index]).double().mean()))
            sizes.append(len(indices))
    sizes = np.array(sizes, dtype=np.float64)
    assert len(set(sizes)) > 3
    final = history.rounds[-1]
    assert final.metrics["train_loss"] == pytest.approx(np.dot(sizes, losses) / sizes.sum(), rel=1e-5)
    assert final.metrics["train_accuracy"] == pytest.approx(np.dot(sizes, correct) / sizes.sum(), abs=1e-9)
    assert final.client_train_loss == pytest.approx(dict(enumerate(losses)), rel=1e-5)
    assert final.metrics["train_loss"] != pytest.approx(final.metrics["local_train_loss"], rel=1e-3)


def test_per_client_accuracy_is_measured_on_each_clients_own_test_data():
    config = digits_config(**{"partition.alpha": 0.1, "federation.rounds": 2})
    federation = prepare(config)
    history = run(federation)
    tests, data = federation.client_tests, federation.dataset
    assert tests.rule == "labels" and tests.x is None and len(tests.indices) == 12
    train_labels, test_labels = data.y_train.numpy(), data.y_test.numpy()
    for train, test in zip(federation.clients, tests.indices):
        assert len(test) >= 1 and set(test_labels[test]) <= set(train_labels[train])
    model = federation.model.eval()
    with torch.no_grad():
        expected = {k: float((model(data.x_test[torch.as_tensor(i)]).argmax(1) == data.y_test[torch.as_tensor(i)])
                             .double().mean()) for k, i in enumerate(tests.indices)}
    final = history.rounds[-1]
    assert final.client_accuracy == pytest.approx(expected, abs=1e-12)
    values = np.sort(list(expected.values()))
    assert values[-1] - values[0] > 0.2  # the clients differ
    # p10 by hand: linear interpolation between the 2nd and 3rd of 12 sorted values (position 0.1 * 11)
    assert final.metrics["client_accuracy_p10"] == pytest.approx(values[1] + 0.1 * (values[2] - values[1]))
    assert final.metrics["client_accuracy_min"] == values[0]
    assert final.metrics["client_accuracy_median"] == pytest.approx((values[5] + values[6]) / 2)
    assert final.metrics["num_clients_at_zero_accuracy"] == int(np.sum(values == 0))


def test_client_test_sets_follow_the_partition_scheme():
    # natural: the dataset's own clients' held-out samples
    natural = prepare(ExperimentConfig().with_overrides({"federation.num_clients": 8,
                                                         "federation.clients_per_round": 4, "device": "cpu"}))
    assert natural.client_tests.rule == "natural"
    assert all(np.array_equal(a, b) for a, b in zip(natural.client_tests.indices, natural.dataset.client_test))
    # the same synthetic data split by label skew: each client is scored on its own labels, not on the
    # generator's client k (whose labels have nothing to do with partition client k's)
    skewed = prepare(ExperimentConfig().with_overrides({
        "federation.num_clients": 8, "federation.clients_per_round": 4, "device": "cpu",
        "partition.scheme": "dirichlet", "partition.alpha": 0.1}))
    assert skewed.client_tests.rule == "labels"
    for train, test in zip(skewed.clients, skewed.client_tests.indices):
        train_labels = skewed.dataset.y_train.numpy()[train]
        test_labels = skewed.dataset.y_test.numpy()[test]
        assert set(test_labels) <= set(train_labels)
        top = np.bincount(train_labels, minlength=10).argmax()
        assert np.mean(test_labels == top) == pytest.approx(np.mean(train_labels == top), abs=0.25)
    # feature skew: client k's test inputs carry client k's transform (client 0's none, the last the most)
    config = digits_config(**{"partition.scheme": "feature_noise", "partition.noise_sigma": 1.0,
                              "federation.num_clients": 10})
    noisy = prepare(config)
    tests, x_test = noisy.client_tests, noisy.dataset.x_test
    bounds = np.cumsum([0, *tests.sizes])
    assert torch.equal(tests.x[bounds[0]:bounds[1]], x_test[torch.as_tensor(tests.indices[0])])
    for k, indices in enumerate(tests.indices):  # client k of 10: noise of std 1.0 x k / 10
        noise = tests.x[bounds[k]:bounds[k + 1]] - x_test[torch.as_tensor(indices)]
        assert float(noise.std()) == pytest.approx(k / 10, abs=0.04), k
    history = run(noisy)
    model = noisy.model.eval()
    with torch.no_grad():
        y = noisy.dataset.y_test
        expected = {k: float((model(tests.x[bounds[k]:bounds[k + 1]]).argmax(1) == y[torch.as_tensor(i)])
                             .double().mean()) for k, i in enumerate(tests.indices)}
    assert history.rounds[-1].client_accuracy == pytest.approx(expected, abs=1e-12)


# ----- the round loop's contract, pinned: what mutation testing showed the tests above let through -----

from workbench.execution import RunStopped  # noqa: E402
from workbench.simulation import (accuracy_spread, per_client_means, resolve_device, run_round,  # noqa: E402
                                  warn_if_no_updates)
from workbench.updates import state_num_bytes  # noqa: E402


def test_streams_differ_by_purpose_key_and_seed_and_repeat_exactly():
    draw = lambda *args: stream(*args).integers(2**62, size=4).tolist()  # noqa: E731
    assert draw(0, 1) == draw(0, 1) and draw(0, 1, 5) == draw(0, 1, 5)
    assert len({str(draw(0, 1)), str(draw(0, 2)), str(draw(1, 1)), str(draw(0, 1, 5)), str(draw(0, 1, 6))}) == 5


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_prepare_is_a_function_of_the_config_and_its_seed():
    config = digits_config(**{"partition.scheme": "feature_noise", "partition.noise_sigma": 0.5})
    first, again, other = prepare(config), prepare(config), prepare(config.with_overrides({"seed": 1}))
    assert first.device == torch.device("cpu") and first.partition_stats == summarize_of(first)
    for a, b in ((first, again),):
        assert all(np.array_equal(x, y) for x, y in zip(a.clients, b.clients))
        assert all(np.array_equal(x, y) for x, y in zip(a.client_tests.indices, b.client_tests.indices))
        assert torch.equal(a.dataset.x_train, b.dataset.x_train) and torch.equal(a.client_tests.x, b.client_tests.x)
        assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items())
    assert not torch.equal(first.dataset.x_train, other.dataset.x_train)  # other noise
    assert not all(np.array_equal(x, y) for x, y in zip(first.client_tests.indices, other.client_tests.indices))
    assert not torch.equal(first.client_tests.x, other.client_tests.x)
    # the initial model is drawn from the whole seed space: 40 seeds, 40 different models
    inits = {float(prepare(config.with_overrides({"seed": s, "partition.scheme": "iid"})).model.state_dict()
                   ["linear.weight"][0, 0]) for s in range(40)}
    assert len(inits) == 40


def summarize_of(federation):
    from workbench.partition import summarize

    return summarize(federation.dataset.y_train.numpy(), federation.clients, federation.dataset.num_classes)


def test_sampling_and_stragglers_follow_seed_and_round():
    config = digits_config(**{"federation.clients_per_round": 5, "federation.straggler_fraction": 0.4,
                              "training.local_epochs": 4})
    draws = {(seed, round_): sample_round(config.with_overrides({"seed": seed}), round_)
             for seed in (0, 1) for round_ in (1, 2)}
    sampled = {key: tuple(s) for key, (s, _) in draws.items()}
    stragglers = {key: tuple(sorted(d.items())) for key, (_, d) in draws.items()}
    assert len(set(sampled.values())) == 4 and len(set(stragglers.values())) == 4
    assert all(len(set(s)) == 5 for s in sampled.values())  # without replacement
    assert sample_round(config, 1)[0].tolist() == list(sampled[(0, 1)])
    one_epoch = digits_config(**{"training.local_epochs": 1})  # no stragglers: E = 1 is allowed
    assert sample_round(one_epoch, 1)[1] == {}


def test_one_round_measures_what_its_metrics_say():
    # FedProx mu = 0.5 keeps a straggler's partial work: 4 sampled, 2 straggling, every update aggregated
    config = digits_config(**{"partition.scheme": "quantity", "federation.num_clients": 6,
                              "federation.clients_per_round": 4, "federation.rounds": 1,
                              "federation.straggler_fraction": 0.5, "training.local_epochs": 3,
                              "strategy.name": "fedprox", "strategy.mu": 0.5})
    federation = prepare(config)
    start = {k: v.clone() for k, v in federation.model.state_dict().items()}
    sampled, stragglers = sample_round(config, 1)
    began = time.perf_counter()
    result = run_round(federation, SequentialExecutor(federation.model), 1)
    elapsed = time.perf_counter() - began
    assert result.sampled == tuple(int(c) for c in sampled) and all(type(c) is int for c in result.sampled)
    assert result.stragglers == tuple(stragglers) and len(stragglers) == 2
    sizes = {int(c): len(federation.clients[c]) for c in sampled}
    expected = {}
    for client in sampled:
        client, epochs = int(client), stragglers.get(int(client), 3)
        seed = int(stream(config.seed, STREAM_TRAINING, 1, client).integers(2**63))
        index = torch.as_tensor(federation.clients[client])
        expected[client] = (epochs, *train_locally(
            copy.deepcopy(federation.model), start, federation.dataset.x_train[index],
            federation.dataset.y_train[index], num_epochs=epochs, objective=LocalObjective(lr=0.1, batch_size=10, proximal_mu=0.5),
            generator=torch.Generator().manual_seed(seed)))
    weights = np.array([sizes[c] for c in expected], dtype=np.float64)
    average = {k: sum(sizes[c] * e[1][k] for c, e in expected.items()) / weights.sum() for k in start}
    got = federation.model.state_dict()
    assert max(float((got[k] - average[k]).abs().max()) for k in start) < 1e-6
    deltas = {c: flat(e[1], start) for c, e in expected.items()}
    mean = sum(sizes[c] * d for c, d in deltas.items()) / weights.sum()
    norms = {c: np.linalg.norm(d) for c, d in deltas.items()}
    drifts = {c: d @ mean / (norms[c] * np.linalg.norm(mean)) for c, d in deltas.items()}
    assert set(result.client_metrics) == set(expected)
    for client, (epochs, _, loss) in expected.items():
        measured = result.client_metrics[client]
        assert set(measured) == {"num_samples", "num_epochs", "num_steps", "is_partial", "is_malicious",
                                 "local_train_loss", "update_norm", "drift"}
        assert measured["num_samples"] == sizes[client] and measured["num_epochs"] == epochs
        assert measured["num_steps"] == epochs * -(-sizes[client] // 10) and measured["is_malicious"] == 0.0
        assert measured["is_partial"] == float(client in stragglers)
        assert measured["local_train_loss"] == pytest.approx(loss, rel=1e-6)
        assert measured["update_norm"] == pytest.approx(norms[client], rel=1e-5)
        assert measured["drift"] == pytest.approx(drifts[client], abs=1e-5)
    metrics = result.metrics
    model_bytes = state_num_bytes(start)
    assert model_bytes == 4 * (64 * 10 + 10)
    losses = np.array([expected[c][2] for c in expected])
    assert metrics["num_updates"] == 4 and metrics["num_stragglers"] == 2
    assert metrics["local_train_loss"] == pytest.approx(np.dot(weights, losses) / weights.sum(), rel=1e-6)
    assert metrics["update_norm_mean"] == pytest.approx(np.mean(list(norms.values())), rel=1e-5)
    assert metrics["client_drift_mean"] == pytest.approx(np.mean(list(drifts.values())), abs=1e-5)
    assert metrics["client_drift_min"] == pytest.approx(min(drifts.values()), abs=1e-5)
    assert metrics["bytes_down"] == 4 * model_bytes and metrics["bytes_up"] == 4 * model_bytes
    assert 0 < metrics["round_time_s"] <= elapsed
    # FedAvg: the same round drops the 2 stragglers: 4 downloads, 2 uploads
    fedavg = prepare(config.with_overrides({"strategy.name": "fedavg"}))
    dropped = run_round(fedavg, SequentialExecutor(fedavg.model), 1).metrics
    assert dropped["bytes_down"] == 4 * model_bytes and dropped["bytes_up"] == 2 * model_bytes


class RecordingExecutor:
    """A user's own executor, with neither `settings` nor `threads`: the sequential reference inside."""

    def __init__(self, model):
        self.inner = SequentialExecutor(model)
        self.threads_seen = []

    def run_cohort(self, *args, **kwargs):
        self.threads_seen.append(torch.get_num_threads())
        return self.inner.run_cohort(*args, **kwargs)


def test_run_hands_callbacks_its_federation_and_records_how_it_executed(tiny_config):
    seen = []

    class Watcher(Callback):
        def on_run_start(self, federation):
            seen.append(("start", federation))

        def on_round_end(self, result, federation):
            seen.append(("round", federation))

        def on_run_end(self, history, federation, error):
            seen.append(("end", federation))

    federation = prepare(tiny_config.with_overrides({"execution.executor": "sequential", "federation.rounds": 2}))
    run(federation, [Watcher()])
    assert [kind for kind, _ in seen] == ["start", "round", "round", "end"]
    assert all(f is federation for _, f in seen)
    assert federation.execution == {"executor": "sequential"}
    # an executor without settings or a thread preference: named by its class, torch's threads left alone
    before = torch.get_num_threads()
    own = RecordingExecutor(federation.model)
    run(federation, executor=own)
    assert federation.execution == {"executor": "RecordingExecutor"}
    assert own.threads_seen == [before] * 2
    # the sequential executor of a small model: one intra-op thread during the run (default_threads)
    sequential = RecordingExecutor(federation.model)
    sequential.threads = 1
    run(federation, executor=sequential)
    assert sequential.threads_seen == [1, 1]


def test_stop_set_during_a_round_ends_it_unfinished(tiny_config):
    event = threading.Event()

    class StopAfterOneClient(SequentialExecutor):
        trained = 0

        def run_cohort(self, global_state, tasks, x, y, objective, stop=None, on_update=None):
            def one_done(client):
                type(self).trained += 1
                event.set()  # as Stop would, while the round goes on: the executor sees it via `stop`
            return super().run_cohort(global_state, tasks, x, y, objective, stop, one_done)

    federation = prepare(tiny_config.with_overrides({"federation.rounds": 3}))
    history = run(federation, executor=StopAfterOneClient(federation.model), stop=event)
    assert history.status == "KILLED" and history.rounds == [] and StopAfterOneClient.trained == 1


def test_stop_set_before_the_run_starts_no_round(tiny_config):
    stop = threading.Event()
    stop.set()
    # all stragglers under FedAvg: rounds with no client to train, which only the loop's own check stops
    config = tiny_config.with_overrides({"federation.straggler_fraction": 1.0, "execution.executor": "sequential"})
    with pytest.warns(UserWarning, match="no round will receive an update"):
        history = run(config, stop=stop)
    assert history.status == "KILLED" and history.rounds == []


def test_ctrl_c_ends_the_run_killed_and_propagates(tiny_config):
    class CtrlCAtRound2(Callback):
        def on_round_end(self, result, federation):
            if result.round == 2:
                raise KeyboardInterrupt

        def on_run_end(self, history, federation, error):
            self.seen = (history.status, len(history.rounds), type(error))

    watcher = CtrlCAtRound2()
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config.with_overrides({"federation.rounds": 4, "execution.executor": "sequential"}), [watcher])
    assert watcher.seen == ("KILLED", 2, KeyboardInterrupt)  # round 2 is in the history, its callbacks cut short


def test_metrics_that_overflow_while_the_weights_are_finite_are_reported(tiny_config):
    # no updates (every client straggles under FedAvg), weights of 3e37: finite, but the logits overflow
    config = tiny_config.with_overrides({"federation.straggler_fraction": 1.0, "federation.rounds": 1})
    federation = prepare(config)
    with torch.no_grad():
        for parameter in federation.model.parameters():
            parameter.fill_(3e37)
    with pytest.raises(FloatingPointError, match=r"^round 1 diverged: \{'test_loss': nan, 'train_loss': nan\} "
                                                 r"\(lower training.lr, currently 0.05\)$"):
        run_round(federation, SequentialExecutor(federation.model), 1)


def test_accuracy_spread_by_hand():
    values = [0.0, 0.0, 0.2, 0.3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 1.0, 1.0]
    spread = accuracy_spread(dict(enumerate(values)))
    # p10 of 12 values: position 0.1 x 11 = 1.1 -> 0.0 + 0.1 x (0.2 - 0.0); the median: (0.6 + 0.7) / 2;
    # the mean: 6.75 / 12
    assert spread == pytest.approx({"client_accuracy_mean": 0.5625, "client_accuracy_min": 0.0,
                                    "client_accuracy_p10": 0.02,
                                    "client_accuracy_median": 0.65, "num_clients_at_zero_accuracy": 2})
    assert accuracy_spread({}) == {}
    assert accuracy_spread({3: 0.5})["num_clients_at_zero_accuracy"] == 0


def test_per_client_means_skip_clients_without_samples():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    means = per_client_means(values, [np.array([0, 3]), np.zeros(0, int), np.array([1]), np.zeros(0, int)])
    assert means == {0: 2.5, 2: 2.0}
    assert per_client_means(values, [np.zeros(0, int)]) == {}


def test_the_no_update_warning_comes_only_when_no_client_finishes():
    config = digits_config(**{"federation.clients_per_round": 10, "federation.straggler_fraction": 0.9,
                              "training.local_epochs": 2})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_no_updates(config, build_strategy(config))  # round(10 x 0.1) = 1 finishes
    assert not caught
    federation = prepare(config.with_overrides({"federation.straggler_fraction": 1.0, "federation.rounds": 1}))
    with pytest.warns(UserWarning, match="no round will receive an update"):
        run(federation)


def test_stragglers_follow_seed_and_round_even_when_everyone_is_sampled():
    config = digits_config(**{"federation.num_clients": 6, "federation.clients_per_round": 6,
                              "federation.straggler_fraction": 0.5, "training.local_epochs": 5})
    draws = [sample_round(config.with_overrides({"seed": seed}), round_)[1] for seed in (0, 1, 2) for round_ in (1, 2, 3)]
    assert len({tuple(sorted(d.items())) for d in draws}) == 9


def test_the_clients_test_split_and_its_noise_follow_the_seed_alone():
    from workbench.simulation import load_data, partition_dataset, split_client_tests

    config = digits_config(**{"partition.scheme": "feature_noise", "partition.noise_sigma": 1.0})
    dataset, clients = partition_dataset(config, load_data(config))
    same = split_client_tests(config, dataset, clients)
    again = split_client_tests(config, dataset, clients)
    other = split_client_tests(config.with_overrides({"seed": 5}), dataset, clients)  # same data, same clients
    assert all(np.array_equal(a, b) for a, b in zip(same.indices, again.indices)) and torch.equal(same.x, again.x)
    assert not all(np.array_equal(a, b) for a, b in zip(same.indices, other.indices))
    assert not torch.equal(same.x[len(same.indices[0]):], other.x[len(other.indices[0]):])


@pytest.mark.workers
def test_the_run_records_the_workers_it_asked_for():
    config = digits_config(**{"execution.executor": "processes", "execution.workers": 1, "federation.rounds": 1})
    federation = prepare(config)
    run(federation)  # the session's pool of one worker (kept for later runs, closed at exit)
    assert federation.execution == {"executor": "processes", "workers": 1, "worker_threads": 1, "fused_kernel": True}


def test_feature_noise_is_drawn_from_the_seed_for_training_and_test_inputs():
    # the standard normal draws behind the noise (noise / (sigma x level)) change with the seed, for the
    # training inputs and for the clients' test inputs alike
    def draws(seed):
        config = digits_config(**{"partition.scheme": "feature_noise", "partition.noise_sigma": 1.0, "seed": seed})
        federation = prepare(config)
        clean = prepare(config.with_overrides({"partition.scheme": "iid"}))
        from workbench.partition import owner_of

        # by sample: the training draws are one per input position of the training set
        level = torch.as_tensor(owner_of(federation.clients, len(federation.dataset.y_train)) / 12)
        train = (federation.dataset.x_train - clean.dataset.x_train).flatten(1) / level.clamp(min=1e-9)[:, None]
        # by position: the test draws are one per input position of the clients' test blocks
        tests = federation.client_tests
        test_level = torch.as_tensor(np.repeat(np.arange(12), tests.sizes) / 12)
        test = (tests.x - federation.dataset.x_test[torch.as_tensor(tests.flat)]).flatten(1)
        return train, level > 0, test / test_level.clamp(min=1e-9)[:, None], test_level > 0

    (train_0, moved_0, test_0, tested_0), (train_1, moved_1, test_1, tested_1) = draws(0), draws(1)
    both = moved_0 & moved_1
    assert int(both.sum()) > 100 and float(train_0[both].std()) == pytest.approx(1.0, abs=0.15)
    # other draws differ by O(1) somewhere; the same draws agree up to float32 rounding (~1e-5)
    assert float((train_0[both] - train_1[both]).abs().max()) > 0.5
    common = min(len(test_0), len(test_1))
    both = tested_0[:common] & tested_1[:common]
    assert int(both.sum()) > 100 and float((test_0[:common][both] - test_1[:common][both]).abs().max()) > 0.5

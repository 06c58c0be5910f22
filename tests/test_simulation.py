import numpy as np
import pytest
import torch

from workbench.simulation import Callback, prepare, run, sample_round


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
    assert [r for r, _ in history.metric("train_loss")] == [1, 2, 3, 4]
    last = history.rounds[-1]
    assert set(last.client_accuracy) == set(range(8))  # synthetic clients have their own test data
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
    ({"data.name": "digits"}, "partition.scheme='natural' needs a dataset with real clients"),
    ({"data.name": "mnist1d", "partition.scheme": "iid", "model.name": "cnn"}, "model.name='cnn' needs images"),
])
def test_prepare_rejects_impossible_combinations(tiny_config, overrides, match):
    with pytest.raises(ValueError, match=match):
        prepare(tiny_config.with_overrides(overrides))


def test_cuda_without_gpu_is_a_clear_error(tiny_config):
    if torch.cuda.is_available():
        assert prepare(tiny_config.with_overrides({"device": "cuda"})).device.type == "cuda"
    else:
        with pytest.raises(ValueError, match="device='cuda' but no CUDA GPU"):
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
            tiny_config.training, 0.0, stop)


def test_threads_setting_applies_during_the_run_only(tiny_config):
    seen = []

    class Threads(Callback):
        def on_round_end(self, result, federation):
            seen.append(torch.get_num_threads())

    before = torch.get_num_threads()
    run(tiny_config.with_overrides({"execution.threads": 1, "federation.rounds": 1}), [Threads()])
    assert seen == [1] and torch.get_num_threads() == before

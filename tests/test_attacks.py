"""Simulated attackers: who attacks (the server's stream, the same clients for every strategy), what sign
flipping and Gaussian attackers send, and label flipping honoured alike by every executor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.attacks import (attack_update, choose_malicious, gaussian_update, num_malicious, sign_flipped)
from workbench.client import ClientTask, ClientUpdate, LocalObjective, train_locally
from workbench.config import AttackConfig, ExperimentConfig
from workbench.execution import ProcessExecutor, SequentialExecutor, VectorizedExecutor
from workbench.simulation import STREAM_TRAINING, prepare, run, sample_round, stream


pytestmark = pytest.mark.usefixtures("one_thread")


def test_num_malicious_rounds_k_times_fraction():
    assert [num_malicious(10, f) for f in (0.0, 0.2, 0.25, 0.3, 0.05, 0.15)] == [0, 2, 2, 3, 0, 2]
    assert num_malicious(4, 0.125) == 0 and num_malicious(4, 0.375) == 2  # 0.5 -> 0, 1.5 -> 2: halves to even


def test_choose_malicious_is_a_seeded_sorted_subset_of_the_sampled():
    sampled = np.array([17, 3, 8, 11, 25, 4, 9, 30, 2, 14])
    chosen = choose_malicious(sampled, 0.3, np.random.default_rng(5))
    assert len(chosen) == 3 and set(chosen) <= set(sampled.tolist()) and list(chosen) == sorted(chosen)
    assert chosen == choose_malicious(sampled, 0.3, np.random.default_rng(5))
    draws = {choose_malicious(sampled, 0.3, np.random.default_rng(seed)) for seed in range(20)}
    assert len(draws) > 5
    assert choose_malicious(sampled, 0.0, np.random.default_rng(5)) == ()


def test_sign_flipped_by_hand():
    """w_g - scale (w - w_g): w_g = (1, 2), w = (1.5, 1) and scale 10 give (1 - 5, 2 + 10); dtypes kept."""
    global_state = {"w": torch.tensor([1.0, 2.0]), "v": torch.tensor([0.5], dtype=torch.float64),
                    "steps": torch.tensor(3)}
    state = {"w": torch.tensor([1.5, 1.0]), "v": torch.tensor([0.25], dtype=torch.float64), "steps": torch.tensor(4)}
    sent = sign_flipped(global_state, state, 10.0)
    assert sent["w"].tolist() == [-4.0, 12.0] and sent["w"].dtype == torch.float32
    assert sent["v"].tolist() == [3.0] and sent["v"].dtype == torch.float64
    assert sent["steps"].dtype == torch.int64
    assert sign_flipped(global_state, state, 1.0)["w"].tolist() == [0.5, 3.0]


def test_gaussian_attacker_sends_the_global_model_plus_noise_of_the_configured_std():
    global_state = {"w": torch.full((200, 100), 3.0), "steps": torch.tensor(3)}
    honest = ClientUpdate(4, {"w": torch.zeros(200, 100), "steps": torch.tensor(9)}, 12, 1, 0.5, False)
    attack = AttackConfig(kind="gaussian", noise_std=2.5)
    sent = attack_update(honest, global_state, attack, torch.Generator().manual_seed(1))
    noise = (sent.state["w"] - 3.0).double()
    assert abs(float(noise.mean())) < 0.05 and float(noise.std()) == pytest.approx(2.5, rel=0.02)
    assert sent.state["w"].dtype == torch.float32 and int(sent.state["steps"]) == 3
    assert (sent.client, sent.num_samples) == (4, 12)
    again = gaussian_update(global_state, 2.5, torch.Generator().manual_seed(1))
    assert torch.equal(again["w"], sent.state["w"])


def test_label_flipping_attackers_send_their_trained_update_as_it_is():
    update = ClientUpdate(1, {"w": torch.ones(2)}, 5, 1, 0.1, False)
    assert attack_update(update, {"w": torch.zeros(2)}, AttackConfig(kind="label_flip"), torch.Generator()) is update
    flipped = attack_update(update, {"w": torch.zeros(2)}, AttackConfig(kind="sign_flip", scale=2.0),
                            torch.Generator())
    assert flipped.state["w"].tolist() == [-2.0, -2.0]


# ----- label flipping in every executor -----


def flip_cohort(model: str):
    config = ExperimentConfig().with_overrides({
        "federation.num_clients": 10, "federation.clients_per_round": 6, "federation.rounds": 1,
        "training.local_epochs": 2, "training.batch_size": 7, "training.lr": 0.05, "device": "cpu",
        "model.name": model})
    federation = prepare(config)
    sampled, _ = sample_round(config, 1)
    tasks = [ClientTask(int(c), torch.as_tensor(federation.clients[c]), 2, False,
                        int(stream(config.seed, STREAM_TRAINING, 1, int(c)).integers(2**63)), flips_labels=i % 2 == 0)
             for i, c in enumerate(sampled)]
    objective = LocalObjective(lr=0.05, batch_size=7, num_classes=federation.dataset.num_classes)
    return federation, tasks, objective


@pytest.mark.workers
@pytest.mark.parametrize("model", ["logreg", "mlp"])
def test_every_executor_trains_label_flippers_on_c_minus_1_minus_y(model):
    """A cohort of flipping and honest clients: sequential, processes (fused kernel for logreg) and vectorized
    give the same updates within 1e-5, and each flipper's equals `train_locally` on labels 9 - y computed
    here in numpy (and differs from what it would send honestly)."""
    federation, tasks, objective = flip_cohort(model)
    data, model_ = federation.dataset, federation.model
    global_state = {k: v.clone() for k, v in model_.state_dict().items()}
    assert data.num_classes == 10 and len({len(t.indices) for t in tasks}) > 1
    updates = {name: executor(model_).run_cohort(global_state, tasks, data.x_train, data.y_train, objective)
               for name, executor in {"sequential": SequentialExecutor, "processes": ProcessExecutor,
                                      "vectorized": VectorizedExecutor}.items()}
    flipped_y = torch.as_tensor(9 - data.y_train.numpy())
    scratch = prepare(federation.config).model
    for i, task in enumerate(tasks):
        labels = (flipped_y if task.flips_labels else data.y_train)[task.indices]
        expected, loss = train_locally(scratch, global_state, data.x_train[task.indices], labels, objective,
                                       num_epochs=2, generator=torch.Generator().manual_seed(task.seed))
        for name, cohort in updates.items():
            assert cohort[i].client == task.client
            diff = max(float((cohort[i].state[k] - expected[k]).abs().max()) for k in expected)
            assert diff < 1e-5, (name, task.client, diff)
            assert cohort[i].local_train_loss == pytest.approx(loss, abs=1e-5)
        if task.flips_labels:
            honest, _ = train_locally(scratch, global_state, data.x_train[task.indices], data.y_train[task.indices],
                                      objective, num_epochs=2, generator=torch.Generator().manual_seed(task.seed))
            assert max(float((honest[k] - expected[k]).abs().max()) for k in expected) > 1e-3


# ----- attackers in a run -----

RUN = {"federation.num_clients": 12, "federation.clients_per_round": 10, "federation.rounds": 4,
       "training.local_epochs": 1, "training.batch_size": 10, "training.lr": 0.05, "device": "cpu",
       "execution.executor": "sequential", "attack.fraction": 0.3}


def malicious_by_round(history) -> list[set[int]]:
    return [{c for c, row in r.client_metrics.items() if row["is_malicious"]} for r in history.rounds]


def test_every_strategy_faces_the_same_attackers():
    """The attackers are drawn from the server's stream: FedAvg, the median and Krum see the same 3 of 10
    clients each round (not the same in every round), whatever the attack."""
    runs = {(name, kind): run(ExperimentConfig().with_overrides({**RUN, "strategy.name": name, "attack.kind": kind}))
            for name in ("fedavg", "median", "krum") for kind in ("sign_flip", "gaussian")}
    reference = malicious_by_round(runs["fedavg", "sign_flip"])
    assert all(len(m) == 3 for m in reference) and len({frozenset(m) for m in reference}) > 1
    for history in runs.values():
        assert malicious_by_round(history) == reference
        assert [r.metrics["num_malicious"] for r in history.rounds] == [3.0] * 4


def test_sign_flippers_send_scale_times_their_honest_update():
    """Round 1 starts from the same global model with and without the attack, so each attacker's update
    norm is exactly `scale` times the norm of the update it sends in the clean run; honest ones are equal."""
    attacked = run(ExperimentConfig().with_overrides({**RUN, "attack.scale": 7.0})).rounds[0].client_metrics
    clean = run(ExperimentConfig().with_overrides({**RUN, "attack.fraction": 0.0})).rounds[0].client_metrics
    assert attacked.keys() == clean.keys()
    for client, row in attacked.items():
        factor = 7.0 if row["is_malicious"] else 1.0
        assert row["update_norm"] == pytest.approx(factor * clean[client]["update_norm"], rel=1e-5)
        assert clean[client]["is_malicious"] == 0.0


def test_label_flipping_run_trains_worse_and_repeats_bit_for_bit():
    """Label flippers (5 of 10 per round) hold FedAvg back: measured after 6 rounds (seed 0), training loss
    2.02 and test accuracy 0.285 against 1.25 and 0.581 clean; the same config gives the same numbers twice."""
    config = ExperimentConfig().with_overrides({**RUN, "attack.kind": "label_flip", "attack.fraction": 0.5,
                                                "federation.rounds": 6})
    first, second = run(config), run(config)
    clean = run(config.with_overrides({"attack.fraction": 0.0}))
    strip = lambda h: [{k: v for k, v in r.metrics.items() if k != "round_time_s"} for r in h.rounds]  # noqa: E731
    assert strip(first) == strip(second)
    assert first.final()["train_loss"] > clean.final()["train_loss"] + 0.3
    assert first.final()["test_accuracy"] <= clean.final()["test_accuracy"] - 0.1
    assert all(r.metrics["num_malicious"] == 5.0 for r in first.rounds)

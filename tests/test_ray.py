"""The Ray executor against the sequential reference, on one real local Ray instance for the module."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading

import pytest
import torch
from helpers import in_float64, max_diff

from workbench.client import LocalObjective
from workbench.config import ExperimentConfig
from workbench.execution import (ClientTask, RayExecutor, RunStopped, SequentialExecutor, build_executor, close_pools,
                                 ray_pool)
from workbench.simulation import prepare, run, run_round

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def ray_instance():
    try:
        import ray
    except ImportError:
        pytest.fail("ray is missing: pip install -e '.[ray]' (make test installs it)")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    close_pools()
    ray.shutdown()


def config(**overrides) -> ExperimentConfig:
    """Synthetic(1, 1): natural clients of unequal sizes, stragglers, ragged last batches."""
    base = {"federation.num_clients": 10, "federation.clients_per_round": 5, "federation.rounds": 2,
            "training.local_epochs": 2, "training.batch_size": 7, "training.lr": 0.05, "device": "cpu",
            "strategy.name": "fedprox", "strategy.mu": 0.5, "federation.straggler_fraction": 0.4,
            "model.name": "mlp", "execution.executor": "ray"}
    base.update(overrides)
    return ExperimentConfig().with_overrides(base)


def two_rounds(cfg, make, float64=False):
    """The global model after rounds 1 and 2 (round 2 sees SCAFFOLD's non-zero control variates)."""
    federation = prepare(cfg)
    if float64:
        in_float64(federation)
    executor = make(federation.model)
    for round_ in (1, 2):
        result = run_round(federation, executor, round_)
        assert result.metrics["num_updates"] >= 3
    return federation.model.state_dict()


def ray_executor(model):
    return RayExecutor(model, cpus_per_client=1)


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "scaffold"])
def test_every_strategy_agrees_with_sequential_in_float64(ray_instance, strategy):
    cfg = config(**{"strategy.name": strategy})
    reference = two_rounds(cfg, SequentialExecutor, float64=True)
    on_ray = two_rounds(cfg, ray_executor, float64=True)
    assert max_diff(reference, prepare(cfg).model.state_dict()) > 1e-3, "the rounds must change the model"
    assert max_diff(reference, on_ray) < 1e-6


def test_float32_agrees_and_two_ray_runs_are_bit_identical(ray_instance):
    cfg = config(**{"model.name": "logreg"})  # the fused kernel on the actors
    reference = two_rounds(cfg, SequentialExecutor)
    first, second = two_rounds(cfg, ray_executor), two_rounds(cfg, ray_executor)
    assert max_diff(reference, first) < 1e-5
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_actors_hold_the_threads_they_were_given_and_the_run_records_them(ray_instance):
    federation = prepare(config(**{"federation.rounds": 1}))
    executor = build_executor("ray", federation.model, cpus_per_client=1, clients_per_round=5)
    run(federation, executor=executor)
    assert federation.execution == {"executor": "ray", "ray_address": "", "num_actors": 2, "cpus_per_client": 1.0,
                                    "gpus_per_client": 0.0, "actor_threads": 1, "fused_kernel": True}
    actors = ray_pool().actors
    assert len(actors) == 2  # min(5 clients per round, 2 CPUs // 1 CPU per client)
    described = ray_instance.get([a.describe.remote() for a in actors])
    assert [d["threads"] for d in described] == [1, 1]
    assert len({d["pid"] for d in described}) == 2 and os.getpid() not in {d["pid"] for d in described}


def test_training_data_is_put_once_per_dataset(ray_instance):
    federation = prepare(config())
    executor = ray_executor(federation.model)
    run_round(federation, executor, 1)
    key = ray_pool().data_key
    run_round(federation, executor, 2)
    assert ray_pool().data_key == key
    federation.dataset = dataclasses.replace(federation.dataset, x_train=federation.dataset.x_train.clone())
    run_round(federation, executor, 3)
    assert ray_pool().data_key == key + 1


def test_stop_mid_round_raises_within_one_client_update_and_the_pool_survives(ray_instance):
    federation = prepare(config())
    data = federation.dataset
    tasks = [ClientTask(c, torch.as_tensor(federation.clients[c]), 3, False, 100 + c) for c in range(8)]
    args = (federation.model.state_dict(), tasks, data.x_train, data.y_train, LocalObjective(lr=0.05, batch_size=7))
    executor = ray_executor(federation.model)
    stop, done = threading.Event(), []

    def stop_after_first_update(client):
        done.append(client)
        if len(done) == 1:  # from another thread, as the UI's Stop button does
            setter = threading.Thread(target=stop.set)
            setter.start()
            setter.join()

    with pytest.raises(RunStopped):
        executor.run_cohort(*args, stop=stop, on_update=stop_after_first_update)
    assert len(done) == 1  # no update was taken after the one that set the stop
    # the abandoned clients do not leak into the next cohort: complete, in task order, correct
    seen = []
    updates = executor.run_cohort(*args, stop=threading.Event(), on_update=seen.append)
    assert sorted(seen) == list(range(8))
    reference = SequentialExecutor(federation.model).run_cohort(*args)
    assert [u.client for u in updates] == list(range(8))
    for ref, upd in zip(reference, updates):
        assert max_diff(ref.state, upd.state) < 1e-5 and abs(ref.local_train_loss - upd.local_train_loss) < 1e-5


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_ten_runs_in_one_process_keep_one_pool_and_do_not_grow_open_files(ray_instance):
    cfg = config(**{"federation.rounds": 1, "federation.clients_per_round": 4})
    counts, files = [], []
    for _ in range(10):
        federation = prepare(cfg)
        run(federation, executor=ray_executor(federation.model))
        counts.append(len(ray_pool().actors))
        alive = [a for a in ray_instance._private.state.actors().values() if a["State"] == "ALIVE"]
        counts.append(len(alive))
        files.append(open_files())
    assert counts == [2] * 20
    assert files[-1] <= files[1] + 2, files


def test_without_ray_the_executor_says_how_to_install_it(monkeypatch):
    federation = prepare(config())
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ValueError, match=r"execution\.executor='ray' needs Ray.*pip install 'fl-workbench\[ray\]'"):
        build_executor("ray", federation.model)


def test_the_base_install_imports_and_runs_without_ray():
    code = ("import sys; sys.modules['ray'] = None\n"
            "from workbench.config import ExperimentConfig\n"
            "from workbench.simulation import run\n"
            "cfg = ExperimentConfig().with_overrides({'federation.num_clients': 4, 'federation.clients_per_round': 2,"
            " 'federation.rounds': 1, 'execution.executor': 'sequential', 'device': 'cpu'})\n"
            "print(run(cfg).status)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "FINISHED"


def test_the_config_alone_selects_ray_and_the_run_records_it(ray_instance, tiny_config):
    """`execution.executor=ray` from the config (no executor passed): the run trains on the session's Ray
    instance, with the actor pool sized for the clients per round, and lands where the sequential run does."""
    cfg = tiny_config.with_overrides({"execution.executor": "ray", "federation.rounds": 2})
    federation = prepare(cfg)
    history = run(federation)
    assert federation.execution["executor"] == "ray" and federation.execution["num_actors"] == 2
    reference = run(prepare(cfg.with_overrides({"execution.executor": "sequential"})))
    assert abs(history.final()["test_loss"] - reference.final()["test_loss"]) < 1e-5

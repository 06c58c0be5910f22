"""The Ray executor against the sequential reference, on one real local Ray instance for the module."""

from __future__ import annotations

import copy
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from helpers import in_float64, max_diff

from mlflow.tracking import MlflowClient

from workbench.client import LocalObjective
from workbench.config import ExperimentConfig
from workbench.execution import (ClientFailed, ClientTask, RayExecutor, RunStopped, SequentialExecutor,
                                 build_executor, close_pools, ray_pool)
from workbench.models import LogisticRegression
from workbench.simulation import (Callback, aggregate_round, plan_cohort, prepare, run, run_round, train_cohort)
from workbench.tracking import CLIENT_COLUMNS, MlflowCallback, client_rows, resume

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
                                    "gpus_per_client": 0.0, "actor_threads": 1, "fused_kernel": True,
                                    "on_client_failure": "fail", "round_timeout_s": 0.0}
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


# ----- faults: a client that raises, a worker killed with SIGKILL, a client slower than the round -----

#: the first input feature of the faulty client's samples: a value no synthetic feature takes
SENTINEL = 7.25


class Faulty(LogisticRegression):
    """Logistic regression (the same parameter names, so the driver's model and the actors' agree) whose
    forward plants a fault when it sees the faulty client's samples, in the actor process that trains it:

    raise_once / raise: ValueError the first time (a marker file remembers it) / every time;
    die_once / die: write the worker's pid to `folder`/pid-N and wait there (at most 120 s) to be killed;
    hang: wait there until the actor is killed (at most 120 s).
    Every forward on the faulty client's samples also appends the worker's pid to `folder`/seen."""

    def __init__(self, input_shape, num_classes, mode: str, folder: str):
        super().__init__(input_shape, num_classes)
        self.mode, self.folder = mode, folder

    def forward(self, x):
        if (x.flatten(1)[:, 0] == SENTINEL).any():
            self._fault()
        return super().forward(x)

    def _fault(self):
        import os
        import pathlib
        import time

        folder = pathlib.Path(self.folder)
        with open(folder / "seen", "a") as seen:
            seen.write(f"{os.getpid()}\n")
        marker = folder / "fired"
        if self.mode.endswith("_once") and marker.exists():
            return
        marker.touch()
        if self.mode.startswith("raise"):
            raise ValueError("planted fault")
        if self.mode.startswith("die"):
            (folder / f"pid-{len(list(folder.glob('pid-*')))}").write_text(str(os.getpid()))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait to be killed; never returns while the test runs
            time.sleep(0.05)


def faulty_federation(tmp_path, mode: str, faulty_client: int = 3, **overrides):
    """A federation of logreg on Synthetic(1, 1) whose client `faulty_client` (always sampled: every client
    is) has the sentinel in its first feature, and a Ray executor on the `Faulty` model in `mode`."""
    cfg = config(**{"model.name": "logreg", "federation.clients_per_round": 10, "federation.rounds": 2,
                    "federation.straggler_fraction": 0.0, **overrides})
    federation = prepare(cfg)
    x = federation.dataset.x_train.clone()
    x[torch.as_tensor(federation.clients[faulty_client]), 0] = SENTINEL
    federation.dataset = dataclasses.replace(federation.dataset, x_train=x)
    shape, classes = federation.dataset.input_shape, federation.dataset.num_classes
    faulty = Faulty(shape, classes, mode, str(tmp_path))
    faulty.load_state_dict(federation.model.state_dict())
    execution = cfg.execution
    executor = RayExecutor(faulty, cpus_per_client=1, on_client_failure=execution.on_client_failure,
                           round_timeout_s=execution.round_timeout_s)
    return federation, executor


def sequential_reference(federation, rounds: int, drop: tuple[int, ...] = ()):
    """The global model after `rounds` rounds with the sequential executor on the same data, the clients in
    `drop` left out of every round (as a round without their updates aggregates)."""
    reference = dataclasses.replace(federation, model=copy.deepcopy(federation.model))
    executor = SequentialExecutor(reference.model)
    for round_ in range(1, rounds + 1):
        cohort = plan_cohort(reference, round_)
        cohort = dataclasses.replace(cohort, tasks=[t for t in cohort.tasks if t.client not in drop])
        updates, dropped = train_cohort(reference, executor, cohort)
        assert not dropped
        reference.model.load_state_dict(aggregate_round(reference, cohort, updates))
    return reference.model.state_dict()


def seen_pids(tmp_path) -> list[int]:
    return [int(line) for line in (tmp_path / "seen").read_text().split()]


def test_a_client_that_raises_once_is_retried_on_another_worker_and_changes_nothing(ray_instance, tmp_path):
    federation, executor = faulty_federation(tmp_path, "raise_once")
    expected = sequential_reference(federation, 2)
    history = run(federation, executor=executor)
    assert history.status == "FINISHED"
    assert [r.dropped for r in history.rounds] == [{}, {}]
    assert [r.metrics["num_updates"] for r in history.rounds] == [10.0, 10.0]
    assert max_diff(expected, federation.model.state_dict()) < 1e-5
    pids = seen_pids(tmp_path)
    assert pids[1] != pids[0], "the retry ran on the other worker"


@pytest.mark.parametrize("policy", ["drop", "fail"])
def test_a_client_that_always_raises_is_dropped_or_fails_the_run_by_policy(ray_instance, tmp_path, policy):
    federation, executor = faulty_federation(tmp_path, "raise", **{"execution.on_client_failure": policy})
    if policy == "fail":
        with pytest.raises(ClientFailed, match=r"client 3: error after 2 attempts: ValueError: planted fault "
                                               r"\(execution\.on_client_failure=fail ends the run"):
            run(federation, executor=executor)
        assert len(seen_pids(tmp_path)) == 2  # tried, then retried once
        return
    expected = sequential_reference(federation, 2, drop=(3,))
    history = run(federation, executor=executor)
    assert history.status == "FINISHED"
    for result in history.rounds:
        assert result.dropped == {3: "error after 2 attempts: ValueError: planted fault"}
        assert result.metrics["num_dropped"] == 1.0 and result.metrics["num_updates"] == 9.0
        row = next(r for r in client_rows(result) if r[1] == 3)
        assert row[CLIENT_COLUMNS.index("dropped")] == "error after 2 attempts: ValueError: planted fault"
        assert row[CLIENT_COLUMNS.index("num_samples")] == ""  # it sent nothing
    assert max_diff(expected, federation.model.state_dict()) < 1e-5


def test_behind_secure_aggregation_a_dropped_client_s_masks_are_removed_and_the_round_completes(ray_instance,
                                                                                                 tmp_path):
    """Client 3 shares its keys (it is in the cohort), then its update never arrives (it raises, twice): the
    server reconstructs its pairwise masks from the other 9 clients' Shamir shares and unmasks their sum,
    so the model equals the sequential run without client 3 (to the quantization error)."""
    federation, executor = faulty_federation(tmp_path, "raise", **{"execution.on_client_failure": "drop",
                                                                   "strategy.secure_aggregation": True})
    expected = sequential_reference(federation, 2, drop=(3,))
    history = run(federation, executor=executor)
    assert history.status == "FINISHED"
    for result in history.rounds:
        assert result.dropped == {3: "error after 2 attempts: ValueError: planted fault"}
        assert result.metrics["secagg_num_unmasked"] == 9.0 and result.metrics["secagg_num_recovered"] == 1.0
    assert max_diff(expected, federation.model.state_dict()) < 1e-5


def test_a_run_failed_by_a_client_ends_failed_in_mlflow_and_resumes(ray_instance, tmp_path, tracking_uri):
    """on_client_failure=fail: FAILED with the message, everything logged so far kept; `resume` (the model
    rebuilt from the config, so no planted fault) finishes the same MLflow run."""
    federation, executor = faulty_federation(tmp_path, "raise", **{"federation.rounds": 3})
    x = federation.dataset.x_train
    # the fault fires from round 2 on: the faulty client's samples carry the sentinel only then
    clean = x.clone()
    clean[torch.as_tensor(federation.clients[3]), 0] = 0.5

    class FaultFromRound2(Callback):
        def on_round_end(self, result, federation_):
            federation_.dataset = dataclasses.replace(federation_.dataset, x_train=x)

    federation.dataset = dataclasses.replace(federation.dataset, x_train=clean)
    callback = MlflowCallback(tracking_uri=tracking_uri, run_name="fails")
    with pytest.raises(ClientFailed, match="client 3"):
        run(federation, executor=executor, callbacks=[callback, FaultFromRound2()])
    client = MlflowClient(tracking_uri)
    run_info = client.get_run(callback.run_id)
    assert run_info.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(callback.run_id, "test_loss")] == [1]
    assert "client 3: error after 2 attempts" in run_info.data.tags["error"]
    history = resume(callback.run_id, tracking_uri)
    assert history.status == "FINISHED"
    assert client.get_run(callback.run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(callback.run_id, "test_loss")] == [1, 2, 3]


def kill_when_waiting(tmp_path, count: int) -> threading.Thread:
    """SIGKILL each of the first `count` workers that `Faulty` in die mode reports waiting (it waits to be
    killed, so the kill lands mid-round, inside the client's update)."""

    def killer():
        deadline = time.monotonic() + 120
        for n in range(count):
            pid_file = tmp_path / f"pid-{n}"
            while not pid_file.exists() or not pid_file.read_text():
                if time.monotonic() > deadline:
                    return
                time.sleep(0.02)
            os.kill(int(pid_file.read_text()), signal.SIGKILL)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    return thread


def test_a_worker_killed_mid_round_is_replaced_and_the_retry_completes_the_round(ray_instance, tmp_path):
    federation, executor = faulty_federation(tmp_path, "die_once", **{"federation.rounds": 1})
    expected = sequential_reference(federation, 1)
    killer = kill_when_waiting(tmp_path, 1)
    history = run(federation, executor=executor)
    killer.join(timeout=10)
    assert history.status == "FINISHED" and history.rounds[0].dropped == {}
    assert history.rounds[0].metrics["num_updates"] == 10.0
    assert max_diff(expected, federation.model.state_dict()) < 1e-5
    assert len(ray_pool().actors) == 2
    alive = [a for a in ray_instance._private.state.actors().values() if a["State"] == "ALIVE"]
    assert len(alive) == 2  # the dead one replaced, nothing leaked


def test_a_client_whose_worker_dies_twice_is_dropped_and_the_round_completes(ray_instance, tmp_path):
    federation, executor = faulty_federation(tmp_path, "die", **{"federation.rounds": 1,
                                                                 "execution.on_client_failure": "drop"})
    expected = sequential_reference(federation, 1, drop=(3,))
    killer = kill_when_waiting(tmp_path, 2)
    history = run(federation, executor=executor)
    killer.join(timeout=10)
    dropped = history.rounds[0].dropped
    assert list(dropped) == [3] and dropped[3].startswith("worker_died after 2 attempts: ")
    assert history.rounds[0].metrics["num_updates"] == 9.0
    assert max_diff(expected, federation.model.state_dict()) < 1e-5
    assert len(ray_pool().actors) == 2


def test_a_client_slower_than_the_round_timeout_is_dropped_as_timed_out(ray_instance, tmp_path):
    """The faulty client never finishes (it waits to be killed); the round ends at round_timeout_s without
    it, the actor busy with it is replaced, and the next round runs on a full pool. The other nine clients
    take milliseconds each on the warm pool: 10 s leaves them room on a busy machine."""
    federation, executor = faulty_federation(tmp_path, "hang", **{"execution.round_timeout_s": 10.0})
    expected = sequential_reference(federation, 2, drop=(3,))
    history = run(federation, executor=executor)
    for result in history.rounds:
        assert result.dropped == {3: "timeout after 1 attempt: not done within the round's 10 s "
                                     "(execution.round_timeout_s)"}
        assert result.metrics["num_updates"] == 9.0
    assert max_diff(expected, federation.model.state_dict()) < 1e-5
    assert len(ray_pool().actors) == 2

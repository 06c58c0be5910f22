"""Every fast executor against the sequential reference: same updates, same rounds, same runs."""

from __future__ import annotations

import copy
import threading
import warnings

import pytest
import torch
from helpers import in_float64, max_diff
from torch import nn

from workbench.client import LocalObjective, train_locally
from workbench.config import ExperimentConfig
from workbench.execution import (ClientTask, LocalTrainer, ProcessExecutor, RunStopped, SequentialExecutor,
                                 VectorizedExecutor, batch_order, batch_schedule, build_executor,
                                 resolve_executor, train_chain_locally, linear_chain, usable_cpus,
                                 why_not_batchable)
from workbench.models import build_model
from workbench.simulation import prepare, run, run_round
from workbench.strategies import REGISTRY

FAST = ["processes", "vectorized"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make(name: str, model: nn.Module):
    # explicit constructors: these tests must exercise the executor named, never a fallback
    return {"sequential": SequentialExecutor, "processes": ProcessExecutor,
            "vectorized": VectorizedExecutor}[name](model)


def config(**overrides) -> ExperimentConfig:
    """Synthetic(1, 1): natural clients of unequal sizes; FedProx with stragglers and a batch size that
    leaves ragged last batches."""
    base = {"federation.num_clients": 10, "federation.clients_per_round": 6, "federation.rounds": 1,
            "training.local_epochs": 2, "training.batch_size": 7, "training.lr": 0.05, "device": "cpu",
            "strategy.name": "fedprox", "strategy.mu": 0.5, "federation.straggler_fraction": 0.5,
            "model.name": "mlp"}
    base.update(overrides)
    return ExperimentConfig().with_overrides(base)


def cohort(federation, round_=1):
    """The round's tasks, built the way `run_round` builds them."""
    from workbench.simulation import STREAM_TRAINING, sample_round, stream

    cfg = federation.config
    sampled, stragglers = sample_round(cfg, round_)
    return [ClientTask(int(c), torch.as_tensor(federation.clients[c]), stragglers.get(int(c), cfg.training.local_epochs),
                       int(c) in stragglers, int(stream(cfg.seed, STREAM_TRAINING, round_, int(c)).integers(2**63)))
            for c in sampled]


def objective(cfg, mu):
    return LocalObjective(lr=cfg.training.lr, batch_size=cfg.training.batch_size, proximal_mu=mu)


CASES = {
    "logreg": {"model.name": "logreg"},
    "mlp": {},
    "cnn": {"data.name": "digits", "partition.scheme": "dirichlet", "partition.alpha": 0.3, "model.name": "cnn",
            "training.local_epochs": 2, "training.batch_size": 10},
    "mu0-no-stragglers": {"strategy.name": "fedavg", "federation.straggler_fraction": 0.0},
    "momentum-weight-decay": {"training.momentum": 0.9, "training.weight_decay": 0.01},
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", FAST)
def test_every_update_agrees_with_sequential(name, case):
    federation = prepare(config(**CASES[case]))
    tasks = cohort(federation)
    sizes = {len(t.indices) for t in tasks}
    assert len(sizes) > 1, "the case must have clients of unequal sizes"
    if federation.config.federation.straggler_fraction:
        assert {t.num_epochs for t in tasks} != {federation.config.training.local_epochs}
    global_state = {k: v.clone() for k, v in federation.model.state_dict().items()}
    data, cfg = federation.dataset, federation.config
    args = (global_state, tasks, data.x_train, data.y_train, federation.strategy.local_objective(cfg.training, 1))
    reference = make("sequential", federation.model).run_cohort(*args)
    updates = make(name, federation.model).run_cohort(*args)
    assert [u.client for u in updates] == [t.client for t in tasks]
    for ref, upd in zip(reference, updates):
        assert (upd.num_samples, upd.num_epochs, upd.is_partial) == (ref.num_samples, ref.num_epochs, ref.is_partial)
        assert max_diff(ref.state, upd.state) < 1e-5
        assert max_diff(ref.state, global_state) > 1e-3  # they really trained
        assert upd.local_train_loss == pytest.approx(ref.local_train_loss, abs=1e-5)
    assert all(torch.equal(global_state[k], v) for k, v in federation.model.state_dict().items())


#: Knobs that make every strategy's own terms matter within two rounds of `config()` (3 of 6 clients
#: straggle, so strategies that drop them still get 3 updates: robust ones need f small enough for that).
STRATEGY_KNOBS = {"training.momentum": 0.5, "training.weight_decay": 0.001, "strategy.num_byzantine": 0,
                  "strategy.trim_fraction": 0.2, "strategy.noise_multiplier": 0.5, "strategy.clip_norm": 0.5}


@pytest.mark.parametrize("strategy", sorted(REGISTRY))
@pytest.mark.parametrize("name", FAST)
def test_every_strategy_s_round_agrees_with_sequential(name, strategy):
    """Round 2 of every strategy, after a first round that gives it state (server moments, control
    variates, the accountant), on each fast executor and on the reference: the same global model (float64,
    to 1e-10)."""
    cfg = config(**{**STRATEGY_KNOBS, "strategy.name": strategy})
    federation = in_float64(prepare(cfg))
    run_round(federation, SequentialExecutor(federation.model), 1)
    after_one = {k: v.clone() for k, v in federation.model.state_dict().items()}
    strategy_state = federation.strategy.state_dict()
    states, strategy_states = {}, {}
    for executor in ("sequential", name):
        again = in_float64(prepare(cfg))
        again.model.load_state_dict(after_one)
        again.strategy.load_state_dict(strategy_state)
        result = run_round(again, make(executor, again.model), 2)
        states[executor], strategy_states[executor] = again.model.state_dict(), again.strategy.state_dict()
        # the centralized baseline trains one pooled task; every other strategy one task per client
        assert result.metrics["num_updates"] >= (1 if strategy == "centralized" else 3)
    if strategy == "local":  # nothing is averaged: what round 2 changes is the clients' own models
        before, after = strategy_state, strategy_states["sequential"]
        assert after.keys() != before.keys() or max_diff(after, before) > 1e-4, "round 2 must train"
    else:
        assert max_diff(states["sequential"], after_one) > 1e-4, "round 2 must change the model"
    assert max_diff(states["sequential"], states[name]) < 1e-10
    if strategy_states["sequential"]:
        assert max_diff(strategy_states["sequential"], strategy_states[name]) < 1e-10


@pytest.mark.parametrize("name", FAST)
def test_one_round_global_model_agrees(name):
    states = {}
    for executor in ("sequential", name):
        federation = prepare(config())
        run_round(federation, make(executor, federation.model), 1)
        states[executor] = federation.model.state_dict()
    assert max_diff(states["sequential"], states[name]) < 1e-5


def test_twenty_rounds_same_accuracy_and_repeatable():
    cfg = config(**{"data.name": "digits", "partition.scheme": "dirichlet", "partition.alpha": 0.5,
                    "federation.rounds": 20, "federation.num_clients": 20, "federation.clients_per_round": 5,
                    "training.local_epochs": 2, "training.batch_size": 10})
    accuracy, states = {}, {}
    for name in ["sequential", *FAST, "processes"]:
        federation = prepare(cfg.with_overrides({"execution.executor": name}))
        history = run(federation)
        assert federation.execution["executor"] == name
        if name in states:  # the second processes run: identical numbers
            assert all(torch.equal(states[name][k], v) for k, v in federation.model.state_dict().items())
            assert history.final()["test_accuracy"] == accuracy[name]
        accuracy[name] = history.final()["test_accuracy"]
        states[name] = federation.model.state_dict()
    assert accuracy["sequential"] > 0.5
    for name in FAST:
        assert abs(accuracy[name] - accuracy["sequential"]) <= 0.005, accuracy


def test_vectorized_is_repeatable():
    a, b = prepare(config()), prepare(config())
    run_round(a, VectorizedExecutor(a.model), 1)
    run_round(b, VectorizedExecutor(b.model), 1)
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items())


#: Every combination of the local objective's terms the kernel writes differently (the in-place path
#: without momentum, with and without weight decay and the proximal term; the formed-gradient momentum path).
KERNEL_OBJECTIVES = {
    "plain": {}, "prox": {"proximal_mu": 0.7}, "decay": {"weight_decay": 0.05},
    "decay+prox": {"weight_decay": 0.05, "proximal_mu": 0.7},
    "momentum+decay+prox": {"momentum": 0.9, "weight_decay": 0.05, "proximal_mu": 0.7},
}


@pytest.mark.parametrize("corrected", [False, True], ids=["", "scaffold"])
@pytest.mark.parametrize("terms", list(KERNEL_OBJECTIVES))
@pytest.mark.parametrize("model_name", ["logreg", "mlp"])
def test_fused_kernel_equals_train_locally(model_name, terms, corrected):
    model = build_model(model_name, (1, 3, 4), 5, torch.Generator().manual_seed(0)).double()
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(23, 1, 3, 4, dtype=torch.float64), torch.randint(0, 5, (23,))
    names = [n for n, _ in model.named_parameters()]
    correction = ([torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64) * 0.1
                   for i, (_, p) in enumerate(model.named_parameters())] if corrected else None)
    objective = LocalObjective(lr=0.3, batch_size=5, control_variates=corrected, **KERNEL_OBJECTIVES[terms])
    kwargs = dict(num_epochs=3, objective=objective)
    ref, ref_loss = train_locally(model, global_state, x, y, generator=torch.Generator().manual_seed(4),
                                  correction=correction, **kwargs)
    out, loss = train_chain_locally(linear_chain(model), global_state, x, y,
                                    generator=torch.Generator().manual_seed(4),
                                    correction=dict(zip(names, correction)) if corrected else None, **kwargs)
    assert max_diff(ref, out) < 1e-12
    assert loss == pytest.approx(ref_loss, rel=1e-12)  # both sum the loss in the model's precision
    if terms != "plain" or corrected:  # the terms really change the result
        plain, _ = train_locally(model, global_state, x, y, LocalObjective(lr=0.3, batch_size=5), num_epochs=3,
                                 generator=torch.Generator().manual_seed(4))
        assert max_diff(plain, out) > 1e-4
    kwargs = dict(num_epochs=3, objective=LocalObjective(lr=0.3, batch_size=5, proximal_mu=0.7))
    ref, ref_loss = train_locally(model, global_state, x, y, generator=torch.Generator().manual_seed(4), **kwargs)
    out, loss = train_chain_locally(linear_chain(model), global_state, x, y,
                                    generator=torch.Generator().manual_seed(4), **kwargs)
    assert max_diff(ref, out) < 1e-12
    assert loss == pytest.approx(ref_loss, rel=1e-12)  # both sum the loss in the model's precision
    assert linear_chain(build_model("cnn", (1, 8, 8), 3, torch.Generator())) is None
    # a client without the last classes: the one-hot targets still span all 5 outputs
    few = y % 3
    ref, ref_loss = train_locally(model, global_state, x, few, generator=torch.Generator().manual_seed(4), **kwargs)
    out, loss = train_chain_locally(linear_chain(model), global_state, x, few,
                                    generator=torch.Generator().manual_seed(4), **kwargs)
    assert max_diff(ref, out) < 1e-12 and loss == pytest.approx(ref_loss, rel=1e-12)


def test_local_trainer_uses_the_kernel_where_it_applies_and_train_locally_elsewhere():
    x, y = torch.randn(17, 1, 8, 8, dtype=torch.float64), torch.randint(0, 4, (17,))
    kwargs = dict(num_epochs=2, objective=LocalObjective(lr=0.2, batch_size=4, proximal_mu=0.3, momentum=0.5))
    for name, kernel in (("mlp", True), ("mlp", False), ("cnn", True)):
        model = build_model(name, (1, 8, 8), 4, torch.Generator().manual_seed(1)).double()
        global_state = {k: v.clone() for k, v in model.state_dict().items()}
        trainer = LocalTrainer(copy.deepcopy(model), use_kernel=kernel)
        assert trainer.uses_kernel == (kernel and name == "mlp")
        out, loss = trainer(global_state, x, y, generator=torch.Generator().manual_seed(2), **kwargs)
        ref, ref_loss = train_locally(model, global_state, x, y, generator=torch.Generator().manual_seed(2), **kwargs)
        assert max_diff(ref, out) < 1e-12 and loss == pytest.approx(ref_loss, rel=1e-12), (name, kernel)
    assert LocalTrainer(build_model("logreg", (60,), 10, torch.Generator())).uses_kernel


def test_batch_schedule_is_train_locally_s_order():
    tasks = [ClientTask(0, torch.arange(100, 113), 2, False, 5), ClientTask(1, torch.arange(4), 1, True, 6)]
    positions, mask = batch_schedule(tasks, batch_size=5)
    assert positions.shape == (2, 6, 5) and mask.shape == (2, 6, 5)
    generator = batch_order(tasks[0])
    expected = torch.cat([torch.randperm(13, generator=generator) for _ in range(2)])
    real = mask[0].view(-1) > 0
    assert torch.equal(positions[0].reshape(-1)[real], expected)
    # the short client: one ragged batch of 4, then nothing
    assert mask[1].sum() == 4 and mask[1, 0].tolist() == [1, 1, 1, 1, 0] and mask[1, 1:].sum() == 0
    assert sorted(positions[1, 0, :4].tolist()) == [0, 1, 2, 3]


def test_stop_is_honoured_and_the_pool_survives_it():
    federation = prepare(config(**{"training.local_epochs": 6, "federation.clients_per_round": 10,
                                   "federation.straggler_fraction": 0.0}))
    tasks = cohort(federation)
    data, cfg = federation.dataset, federation.config
    args = (federation.model.state_dict(), tasks, data.x_train, data.y_train, objective(cfg, 0.5))
    for name in ["sequential", *FAST]:
        stop = threading.Event()
        stop.set()
        with pytest.raises(RunStopped):
            make(name, federation.model).run_cohort(*args, stop=stop)
    for name in ["sequential", *FAST]:  # every update is reported once, as it is complete
        seen = []
        make(name, federation.model).run_cohort(*args, on_update=seen.append)
        assert sorted(seen) == sorted(t.client for t in tasks), name
    # set mid-round, as the UI's Stop button does: when the first update of the round is in (the pool
    # itself calls back, so the stop lands after the round started and before it can end, however busy
    # the machine), and from another thread, so that only the event crosses over
    executor = make("processes", federation.model)
    stop, done = threading.Event(), []

    def stop_after_first_update(client):
        done.append(client)
        if len(done) == 1:
            setter = threading.Thread(target=stop.set)
            setter.start()
            setter.join()

    with pytest.raises(RunStopped):
        executor.run_cohort(*args, stop=stop, on_update=stop_after_first_update)
    assert len(done) >= 1
    # the workers let go of the cancelled round: the next one is complete and correct
    small = (args[0], tasks[:3], *args[2:5])
    for ref, upd in zip(make("sequential", federation.model).run_cohort(*small), executor.run_cohort(*small)):
        assert max_diff(ref.state, upd.state) < 1e-5


class WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(60, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x):
        return self.layers(x)


def test_unbatchable_model_is_refused_and_falls_back():
    federation = prepare(config())
    model = WithBatchNorm()
    assert "BatchNorm1d" in why_not_batchable(model)
    assert why_not_batchable(federation.model) is None
    with pytest.raises(ValueError, match="BatchNorm1d.*use execution.executor=processes or sequential"):
        VectorizedExecutor(model)
    with pytest.warns(UserWarning, match="cannot batch this model"):
        executor = build_executor("vectorized", model)
    assert executor.name in ("processes", "sequential")
    # the fallback trains batch norm (running statistics included) exactly like the reference
    data, cfg = federation.dataset, federation.config
    # batch norm cannot train on a last batch of one sample, whatever the executor
    tasks = [t for t in cohort(federation) if len(t.indices) % cfg.training.batch_size != 1]
    assert len(tasks) >= 3
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    args = (global_state, tasks, data.x_train, data.y_train, objective(cfg, 0.5))
    for ref, upd in zip(SequentialExecutor(model).run_cohort(*args), executor.run_cohort(*args)):
        assert "layers.2.running_mean" in upd.state and max_diff(ref.state, upd.state) < 1e-5


def test_auto_picks_the_fast_executor_and_the_run_records_it(tracking_uri):
    from mlflow.tracking import MlflowClient

    from workbench.tracking import MlflowCallback

    model = build_model("mlp", (60,), 10, torch.Generator())
    expected = "processes" if usable_cpus() > 1 else "sequential"
    assert ExperimentConfig().execution.executor == "auto"
    assert resolve_executor("auto", model) == expected
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_executor("sequential", model) == "sequential"
    tracker = MlflowCallback(tracking_uri, experiment="execution")
    federation = prepare(config())
    run(federation, [tracker])
    params = MlflowClient(tracking_uri).get_run(tracker.run_id).data.params
    assert params["execution.executor"] == "auto" and params["resolved_executor"] == expected
    if expected == "processes":
        assert params["resolved_workers"] == str(usable_cpus()) and params["resolved_worker_threads"] == "1"
    assert int(params["torch_threads"]) >= 1


def test_process_buffers_follow_the_cohort_not_the_federation():
    federation = prepare(config(**{"data.name": "digits", "partition.scheme": "iid", "federation.num_clients": 100,
                                   "federation.clients_per_round": 4}))
    executor = ProcessExecutor(federation.model)
    run_round(federation, executor, 1)
    # one row per client of the largest cohort this session's pool has served (<= 10 in this module)
    rows = {v.shape[0] for v in executor._pool.out.values()}
    assert len(rows) == 1 and 4 <= rows.pop() <= 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible here")
@pytest.mark.parametrize("name", ["auto", "sequential", "vectorized"])
def test_cuda_runs_the_same_executors(name):
    states = {}
    for device, executor in (("cpu", "sequential"), ("cuda", name)):
        federation = prepare(config(device=device))
        assert federation.device.type == device
        history = run(federation, executor=build_executor(executor, federation.model))
        states[device] = {k: v.cpu() for k, v in federation.model.state_dict().items()}
        assert history.status == "FINISHED"
    assert max_diff(states["cpu"], states["cuda"]) < 1e-4


def test_an_executor_that_cannot_honour_the_objective_is_refused_or_replaced_under_auto():
    """An executor that says it cannot train an objective exactly never trains it: `auto` falls back to the
    sequential reference with a warning naming the reason; an explicit choice fails with it."""
    from workbench.simulation import check_executor

    class NoMomentum(VectorizedExecutor):
        def why_not_supported(self, objective):
            return "no momentum here" if objective.momentum else None

    federation = prepare(config(**{"training.momentum": 0.9}))
    with pytest.warns(UserWarning, match=r"cannot train strategy.name='fedprox' exactly \(no momentum here\)"):
        chosen = check_executor(NoMomentum(federation.model), federation, "auto")
    assert isinstance(chosen, SequentialExecutor)
    with pytest.raises(ValueError, match=r"execution.executor='vectorized' cannot train .*no momentum here"):
        check_executor(NoMomentum(federation.model), federation, "vectorized")
    plain = prepare(config())
    executor = NoMomentum(plain.model)
    assert check_executor(executor, plain, "vectorized") is executor

"""Bring your own model: register a class or factory (or name a module path), run it with every executor,
get an honest record, and rebuild it with `load_model` or be told exactly what to register."""

from __future__ import annotations

import importlib
import inspect
import json
import math
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

import workbench
from workbench.config import ExperimentConfig
from workbench.execution import (ProcessExecutor, SequentialExecutor, WorkerDied, build_executor, resolve_executor,
                                 usable_cpus, user_modules)
from workbench.models import MODELS, build_model, describe_model, register_model
from workbench.simulation import evaluate, prepare, run


class Tiny(nn.Module):
    """Two layers with a tanh: not one of the zoo's classes, so no fused kernel applies."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.hidden = nn.Linear(math.prod(input_shape), 8)
        self.out = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x.flatten(1))))


#: the notebook-style scripts below define the same class in their `__main__`
TINY_SOURCE = inspect.getsource(Tiny)

#: a tiny Synthetic(1, 1) experiment: 6 natural clients, 3 per round, 3 rounds
OVERRIDES = {"data.name": "synthetic", "federation.num_clients": 6, "federation.clients_per_round": 3,
             "federation.rounds": 3, "training.local_epochs": 2, "training.batch_size": 10, "training.lr": 0.05,
             "device": "cpu"}


@pytest.fixture
def registered():
    """Register models for one test; every name is unregistered afterwards."""
    names: list[str] = []

    def register(name, factory):
        names.append(name)
        return register_model(name, factory)

    yield register
    for name in names:
        MODELS.unregister(name)


def run_script(tmp_path: Path, body: str, *, timeout: int = 300) -> dict:
    """Run `body` as the `__main__` of a fresh interpreter (as a notebook's kernel runs cells); it ends by
    printing one JSON line, which is returned."""
    script = tmp_path / "notebook_like.py"
    script.write_text(textwrap.dedent(body))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def final_numbers(history, model: nn.Module) -> dict:
    return {"metrics": history.final(), "state": {k: v.tolist() for k, v in model.state_dict().items()}}


def max_difference(a: dict, b: dict) -> float:
    assert a["state"].keys() == b["state"].keys()
    weights = max(float((torch.tensor(a["state"][k]) - torch.tensor(b["state"][k])).abs().max()) for k in a["state"])
    shared = (set(a["metrics"]) & set(b["metrics"])) - {"round_time_s"}  # wall time is no result
    assert {"test_accuracy", "test_loss", "train_loss"} <= shared
    return max(weights, *(abs(a["metrics"][k] - b["metrics"][k]) for k in shared))


# ----- a model class defined in __main__, with every executor -----


@pytest.mark.workers
def test_a_class_defined_in_main_trains_the_same_with_every_executor(tmp_path, registered, one_thread):
    executors = ["sequential", "processes", "auto", "vectorized"]
    out = run_script(tmp_path, f"""
        import json, math, warnings
        import torch
        from torch import nn
        import workbench
        from workbench.config import ExperimentConfig
        from workbench.models import describe_model
        from workbench.simulation import prepare, run
        {textwrap.indent(TINY_SOURCE, ' ' * 8).strip()}

        workbench.register_model("tiny", Tiny)
        warnings.simplefilter("error")  # a fallback to another executor would warn: fail instead
        results = {{}}
        for executor in {executors!r}:
            config = ExperimentConfig().with_overrides({{**{OVERRIDES!r}, "model.name": "tiny",
                                                        "execution.executor": executor}})
            federation = prepare(config)
            history = run(federation)
            results[executor] = {{"status": history.status, "resolved": federation.execution["executor"],
                                 "class": type(federation.model).__module__ + ":" + type(federation.model).__name__,
                                 "metrics": history.final(),
                                 "state": {{k: v.tolist() for k, v in federation.model.state_dict().items()}}}}
        print(json.dumps({{"results": results, "described": describe_model("tiny")}}))
    """)
    results = out["results"]
    assert {r["status"] for r in results.values()} == {"FINISHED"}
    assert {r["class"] for r in results.values()} == {"__main__:Tiny"}
    assert results["processes"]["resolved"] == "processes"  # the workers trained it: no fallback
    assert results["vectorized"]["resolved"] == "vectorized"
    assert results["auto"]["resolved"] == ("processes" if usable_cpus() > 1 else "sequential")
    assert out["described"] == {"model.source": "defined in __main__ (a notebook or script)", "model.import_path": ""}
    # the reference: the same class, registered and run sequentially in this process
    registered("tiny_reference", Tiny)
    config = ExperimentConfig().with_overrides({**OVERRIDES, "model.name": "tiny_reference",
                                                "execution.executor": "sequential"})
    federation = prepare(config)
    reference = final_numbers(run(federation), federation.model)
    assert reference["metrics"]["test_accuracy"] > 0.2  # it learned something: 10 classes
    for executor in executors:
        assert max_difference(results[executor], reference) < 1e-5, executor


# ----- a model given by module path, through the CLI -----


def test_a_module_path_model_runs_from_the_cli_and_load_model_rebuilds_its_class(tmp_path, tracking_uri,
                                                                                 monkeypatch, request):
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from workbench.tracking import load_model

    package = tmp_path / "userpkg"
    package.mkdir()
    (package / "own_model_tiny.py").write_text("import math\nimport torch\nfrom torch import nn\n" + TINY_SOURCE)
    overrides = {**OVERRIDES, "model.name": "own_model_tiny:Tiny"}
    command = [sys.executable, "-m", "workbench.cli", "run", "--quiet", "--tracking-uri", tracking_uri,
               "--experiment", "own-model"]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1",
                               "PYTHONPATH": os.pathsep.join(filter(None, [str(package), os.environ.get("PYTHONPATH")]))})
    assert done.returncode == 0, done.stderr[-4000:]

    client = MlflowClient(tracking_uri)
    [logged] = client.search_runs([client.get_experiment_by_name("own-model").experiment_id])
    assert logged.info.status == "FINISHED" and logged.data.params["model.name"] == "own_model_tiny:Tiny"
    spec = json.loads(Path(client.download_artifacts(logged.info.run_id, "model/model.json", str(tmp_path))).read_text())
    assert spec["origin"] == "module own_model_tiny" and spec["import_path"] == "own_model_tiny:Tiny"
    assert spec["class"] == "own_model_tiny:Tiny"

    monkeypatch.syspath_prepend(str(package))
    request.addfinalizer(lambda: sys.modules.pop("own_model_tiny", None))
    model = load_model(logged.info.run_id, tracking_uri)
    import own_model_tiny

    assert type(model) is own_model_tiny.Tiny and not model.training
    weights = load_file(client.download_artifacts(logged.info.run_id, "model/weights.safetensors", str(tmp_path)))
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    # the rebuilt model is the one the run measured: its test accuracy is the logged final metric
    data = prepare(ExperimentConfig().with_overrides(overrides)).dataset
    with torch.no_grad():
        accuracy = evaluate(model, data.x_test, data.y_test).accuracy
    assert accuracy == pytest.approx(logged.data.metrics["test_accuracy"], abs=1e-6)


# ----- load_model of a model only its own session could build -----


def test_load_model_of_a_notebook_model_says_what_to_register(tmp_path, tracking_uri, registered):
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from workbench.tracking import load_model

    out = run_script(tmp_path, f"""
        import json, math
        import torch
        from torch import nn
        import workbench
        from workbench.config import ExperimentConfig
        from workbench.simulation import run
        from workbench.tracking import MlflowCallback
        {textwrap.indent(TINY_SOURCE, ' ' * 8).strip()}

        workbench.register_model("tiny_nb", Tiny)
        config = ExperimentConfig().with_overrides({{**{OVERRIDES!r}, "model.name": "tiny_nb",
                                                    "federation.rounds": 1, "execution.executor": "sequential"}})
        tracker = MlflowCallback({tracking_uri!r}, experiment="notebook-model")
        history = run(config, [tracker])
        print(json.dumps({{"run_id": tracker.run_id, "status": history.status}}))
    """)
    run_id = out["run_id"]
    assert out["status"] == "FINISHED"
    client = MlflowClient(tracking_uri)
    spec = json.loads(Path(client.download_artifacts(run_id, "model/model.json", str(tmp_path))).read_text())
    assert spec["origin"] == "defined in __main__ (a notebook or script)" and spec["import_path"] is None
    assert spec["factory"] == "__main__:Tiny"

    with pytest.raises(ValueError) as refused:
        load_model(run_id, tracking_uri)
    message = str(refused.value)
    assert f"run {run_id} trained model.name='tiny_nb' (defined in __main__" in message
    assert "workbench.register_model('tiny_nb', Tiny) before load_model" in message
    assert "state_dict" not in message and "Missing key" not in message

    class Renamed(nn.Module):  # another class under the same name: other parameter names and sizes
        def __init__(self, input_shape, num_classes):
            super().__init__()
            self.body = nn.Linear(math.prod(input_shape), 16)
            self.out = nn.Linear(16, num_classes)

        def forward(self, x):
            return self.out(self.body(x.flatten(1)))

    registered("tiny_nb", Renamed)
    with pytest.raises(ValueError) as mismatched:
        load_model(run_id, tracking_uri)
    message = str(mismatched.value)
    assert "weights do not fit model.name='tiny_nb'" in message
    assert "missing from the weights: body.weight, body.bias" in message
    assert "in the weights but not in the model: hidden.bias, hidden.weight" in message  # safetensors sorts
    assert "out.weight (10, 8) vs (10, 16)" in message
    assert "workbench.register_model('tiny_nb', Tiny)" in message
    assert "Missing key" not in message and "Unexpected key" not in message

    registered("tiny_nb", Tiny)  # the class the run trained, defined again in this session
    model = load_model(run_id, tracking_uri)
    assert type(model) is Tiny
    weights = load_file(client.download_artifacts(run_id, "model/weights.safetensors", str(tmp_path)))
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


EDITED_SOURCE = """
import math
import torch
from torch import nn


class Edited(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.hidden = nn.Linear(math.prod(input_shape), WIDTH)
        self.out = nn.Linear(WIDTH, num_classes)

    def forward(self, x):
        return self.out(torch.ACTIVATION(self.hidden(x.flatten(1))))
"""


@pytest.mark.workers
def test_workers_train_a_user_module_as_the_session_has_it_now(tmp_path, monkeypatch, request, registered, one_thread):
    """A folder put on sys.path after the worker pool started, and a module edited and reloaded: the
    workers train the definition the session has now, not what they could import (or imported before)."""
    base = {**OVERRIDES, "federation.rounds": 2}
    warm = prepare(ExperimentConfig().with_overrides({**base, "model.name": "logreg"}))
    run(warm, executor=ProcessExecutor(warm.model, num_workers=2))  # the pool runs, with today's sys.path
    folder = tmp_path / "src"
    folder.mkdir()
    module_file = folder / "own_model_edited.py"
    module_file.write_text(EDITED_SOURCE.replace("WIDTH", "8").replace("ACTIVATION", "tanh"))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # the reload must read the edited source
    monkeypatch.syspath_prepend(str(folder))
    request.addfinalizer(lambda: sys.modules.pop("own_model_edited", None))
    import own_model_edited

    finals = {}
    for version, (width, activation) in enumerate([("8", "tanh"), ("16", "relu")]):
        if version:
            module_file.write_text(EDITED_SOURCE.replace("WIDTH", width).replace("ACTIVATION", activation))
            importlib.reload(own_model_edited)
        registered("edited", own_model_edited.Edited)
        for executor in ("sequential", "processes"):
            federation = prepare(ExperimentConfig().with_overrides({**base, "model.name": "edited"}))
            make = SequentialExecutor if executor == "sequential" else lambda m: ProcessExecutor(m, num_workers=2)
            history = run(federation, executor=make(federation.model))
            finals[version, executor] = final_numbers(history, federation.model)
        assert torch.tensor(finals[version, "processes"]["state"]["hidden.weight"]).shape == (int(width), 60)
        assert max_difference(finals[version, "processes"], finals[version, "sequential"]) < 1e-5
    assert finals[0, "sequential"]["metrics"]["test_loss"] != finals[1, "sequential"]["metrics"]["test_loss"]
    assert [m.__name__ for m in user_modules(federation.model)] == ["own_model_edited"]
    assert user_modules(build_model("mlp", (60,), 10, torch.Generator())) == []


# ----- workers that die say why -----


def in_worker() -> bool:
    """Whether this code runs in a worker process (the test's own process has no multiprocessing parent)."""
    return multiprocessing.parent_process() is not None


class KilledInWorker(Tiny):
    """Its forward pass kills the worker process running it, as the out-of-memory killer would."""

    def forward(self, x):
        if in_worker():
            os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(x)


class ExitsWhenRebuilt(Tiny):
    """A worker rebuilding it exits (SystemExit escapes the worker's error handling) after reporting."""

    def __setstate__(self, state):
        if in_worker():
            raise SystemExit(3)
        super().__setstate__(state)


class FailsWhenRebuilt(Tiny):
    """A worker cannot rebuild it: an ordinary error, reported, and the worker lives on."""

    def __setstate__(self, state):
        if in_worker():
            raise RuntimeError("this model needs a resource the workers do not have")
        super().__setstate__(state)


@pytest.mark.workers
def test_a_worker_killed_mid_round_names_the_signal_and_the_next_run_starts_fresh_workers(registered, one_thread):
    registered("killed_in_worker", KilledInWorker)
    config = ExperimentConfig().with_overrides({**OVERRIDES, "model.name": "killed_in_worker"})
    federation = prepare(config)
    with pytest.raises(WorkerDied) as died:
        run(federation, executor=ProcessExecutor(federation.model, num_workers=2))
    message = str(died.value)
    assert "killed by signal SIGKILL (exit code -9)" in message and "while training clients" in message
    assert "out of memory?" not in message
    # the pool was closed with the failure: the next run gets fresh workers and finishes
    plain = prepare(config.with_overrides({"model.name": "logreg"}))
    assert run(plain, executor=ProcessExecutor(plain.model, num_workers=2)).status == "FINISHED"


@pytest.mark.workers
def test_a_worker_that_exits_quotes_the_traceback_it_reported(registered, one_thread):
    registered("exits_when_rebuilt", ExitsWhenRebuilt)
    federation = prepare(ExperimentConfig().with_overrides({**OVERRIDES, "model.name": "exits_when_rebuilt"}))
    with pytest.raises(WorkerDied) as died:
        run(federation, executor=ProcessExecutor(federation.model, num_workers=2))
    message = str(died.value)
    assert "exited with code 3 while rebuilding the model it was sent" in message
    assert "the last traceback it reported:" in message and "SystemExit: 3" in message
    assert "in __setstate__" in message  # where it happened, from the worker's own traceback


@pytest.mark.workers
def test_a_model_the_workers_cannot_rebuild_fails_with_their_traceback(registered, one_thread):
    registered("fails_when_rebuilt", FailsWhenRebuilt)
    federation = prepare(ExperimentConfig().with_overrides({**OVERRIDES, "model.name": "fails_when_rebuilt"}))
    with pytest.raises(RuntimeError, match=r"could not rebuild the model test_own_model\.FailsWhenRebuilt") as failed:
        run(federation, executor=ProcessExecutor(federation.model, num_workers=2))
    assert "RuntimeError: this model needs a resource the workers do not have" in str(failed.value)
    assert not isinstance(failed.value, WorkerDied)


class _Owner:
    pass


OWNER = _Owner()


class KeepsAWeakref(Tiny):
    """Keeps a weak reference to an object of the session (a trainer, say): copyable, but not picklable."""

    def __init__(self, input_shape, num_classes):
        super().__init__(input_shape, num_classes)
        self.owner = weakref.ref(OWNER)


def test_a_model_that_cannot_be_sent_to_workers_falls_back_to_sequential_with_the_reason(registered):
    registered("keeps_a_weakref", KeepsAWeakref)
    model = build_model("keeps_a_weakref", (60,), 10, torch.Generator())
    reason = r"cannot be sent to worker processes: TypeError: cannot pickle 'weakref\.ReferenceType' object"
    with pytest.warns(UserWarning, match=rf"execution.executor='processes': the model \(KeepsAWeakref\) {reason}; "
                                         r"using 'sequential' instead"):
        assert resolve_executor("processes", model) == "sequential"
    if usable_cpus() > 1:
        with pytest.warns(UserWarning, match=rf"execution.executor='auto': .*{reason}"):
            assert build_executor("auto", model).name == "sequential"
    with pytest.raises(ValueError, match=rf"execution.executor='processes': .*{reason}.*use execution.executor=sequential"):
        ProcessExecutor(model)
    config = ExperimentConfig().with_overrides({**OVERRIDES, "model.name": "keeps_a_weakref",
                                                "execution.executor": "processes", "federation.rounds": 1})
    federation = prepare(config)
    with pytest.warns(UserWarning, match="cannot be sent to worker processes"):
        history = run(federation)
    assert history.status == "FINISHED" and federation.execution["executor"] == "sequential"


# ----- the registry: names, factories, and what a run records -----


def test_register_model_is_public_and_the_builtins_are_in_the_same_registry(registered):
    assert workbench.register_model is register_model
    assert {"logreg", "mlp", "cnn"} <= set(MODELS.names())
    assert describe_model("logreg") == {"model.source": "workbench",
                                        "model.import_path": "workbench.models:LogisticRegression"}
    assert describe_model("cnn")["model.import_path"] == "workbench.models:CNN"
    # with the model trained, the class it really is (a hand-built Federation may hold another)
    assert describe_model("logreg", Tiny((4,), 2))["model.class"] == f"{__name__}:Tiny"
    entry = registered("tiny", Tiny)
    assert entry.name == "tiny" and entry.factory is Tiny
    assert describe_model("tiny") == {"model.source": f"module {__name__}", "model.import_path": f"{__name__}:Tiny"}
    registered("tiny_lambda", lambda input_shape, num_classes: Tiny(input_shape, num_classes))
    assert describe_model("tiny_lambda") == {"model.source": f"lambda in {__name__}", "model.import_path": ""}
    # registered names and module paths are valid model.name values
    assert ExperimentConfig().with_overrides({"model.name": "tiny"}).model.name == "tiny"
    assert describe_model(f"{__name__}:Tiny") == {"model.source": f"module {__name__}",
                                                   "model.import_path": f"{__name__}:Tiny"}


def test_registered_models_get_the_seeded_initialisation_of_the_builtins(registered):
    class ConstantInit(Tiny):
        def __init__(self, input_shape, num_classes):
            super().__init__(input_shape, num_classes)
            for p in self.parameters():
                nn.init.constant_(p, 5.0)  # whatever the factory draws is replaced

    registered("constant_init", ConstantInit)
    a = build_model("constant_init", (12,), 4, torch.Generator().manual_seed(7))
    b = build_model("constant_init", (12,), 4, torch.Generator().manual_seed(7))
    c = build_model("constant_init", (12,), 4, torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.hidden.weight, c.hidden.weight)
    # weights ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), biases ~ U(-0.01, 0.01), as for the zoo's models
    bound = {k: float(v.abs().max()) for k, v in a.state_dict().items()}
    assert bound["hidden.weight"] <= 1 / math.sqrt(12) and bound["out.weight"] <= 1 / math.sqrt(8)
    assert bound["hidden.bias"] <= 0.01 and bound["out.bias"] <= 0.01
    reference = torch.Generator().manual_seed(7)
    expected = torch.empty(8, 12).uniform_(-1 / math.sqrt(12), 1 / math.sqrt(12), generator=reference)
    assert torch.equal(a.hidden.weight, expected)  # the first parameter's draw from the generator


@pytest.mark.parametrize("name", ["", "pkg:Tiny", " tiny", 3])
def test_bad_model_names_are_refused_with_the_rule(name):
    rule = "a model name must be a non-empty string without ':' or surrounding spaces"
    with pytest.raises(ValueError, match=rf"{rule}, got {re.escape(repr(name))}$"):
        register_model(name, Tiny)
    assert name not in MODELS.names()


def test_bad_factories_are_refused_with_the_value_and_the_rule():
    with pytest.raises(TypeError, match=r"register_model\('tiny', \.\.\.\) needs a class or a callable, got int"):
        register_model("tiny", 42)
    with pytest.raises(TypeError, match=r"got a Tiny instance \(pass the class: register_model\('tiny', Tiny\)\)"):
        register_model("tiny", Tiny((4,), 2))
    with pytest.raises(TypeError, match=r"register_model\('tiny', <lambda>\): <lambda>\(\) cannot be called as "
                                        r"<lambda>\(input_shape, num_classes\)"):
        register_model("tiny", lambda: Tiny((4,), 2))
    with pytest.raises(ValueError, match=r"'logreg' is a built-in model of workbench .*register yours under another"):
        register_model("logreg", Tiny)
    assert "tiny" not in MODELS.names()


def test_unknown_names_and_broken_factories_fail_at_build_time_with_a_fix(registered):
    with pytest.raises(ValueError, match=r"model.name='nope' is not registered .*workbench.register_model\('nope', "):
        build_model("nope", (4,), 2, torch.Generator())
    with pytest.raises(ValueError, match=r"model.name='no_such_module_here:Tiny': module 'no_such_module_here' "
                                         r"cannot be imported"):
        build_model("no_such_module_here:Tiny", (4,), 2, torch.Generator())
    registered("returns_a_tensor", lambda input_shape, num_classes: torch.zeros(3))
    with pytest.raises(TypeError, match=r"model.name='returns_a_tensor': <lambda>\(\(4,\), 2\) returned Tensor, "
                                        r"not a torch.nn.Module"):
        build_model("returns_a_tensor", (4,), 2, torch.Generator())
    registered("no_parameters", lambda input_shape, num_classes: nn.Flatten())
    with pytest.raises(ValueError, match=r"model.name='no_parameters': .*built a Flatten without parameters"):
        build_model("no_parameters", (4,), 2, torch.Generator())
    # check_model_fits keeps guarding the built-in CNN
    with pytest.raises(ValueError, match="model.name='cnn' needs images"):
        build_model("cnn", (60,), 10, torch.Generator())


def test_the_panel_shows_a_module_path_model_in_its_dropdown():
    pytest.importorskip("ipywidgets")
    from workbench.config import knobs
    from workbench.ui.experiment_panel import build_control

    knob = {k.key: k for k in knobs()}["model.name"]
    control = build_control(knob, f"{__name__}:Tiny")
    assert control.value == f"{__name__}:Tiny" and {"logreg", "mlp", "cnn"} <= set(control.options)
